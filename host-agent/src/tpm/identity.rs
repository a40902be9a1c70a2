//! The endorsement key and the attestation key under it.

use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::{BigUint, RsaPublicKey};
use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection, DefaultKey};
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{CapabilityData, Public};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::blobs::{private_from_bytes, private_to_bytes, public_from_bytes, public_to_bytes};
use super::{cmd, flushed, AkBlobs, Identity, Tpm, TpmError};

/// Where TPM makers store the RSA 2048 EK certificate (TCG EK profile).
pub const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;
/// Where the TCG provisioning guidance persists the RSA 2048 EK.
pub const EK_PERSISTENT_HANDLE: u32 = 0x8101_0001;

const EK_ALG: AsymmetricAlgorithmSelection = AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);

impl Tpm {
    /// Makes the node's AK under its EK and returns what to keep.
    pub fn create_identity(&self) -> Result<Identity, TpmError> {
        let mut ctx = self.ctx();
        let ek_cert_der = read_ek_cert(&mut ctx)?;
        let ek = open_ek(&mut ctx)?;
        let made = make_ak(&mut ctx, ek.handle);
        let (ek_public, ak) = ek.release(&mut ctx, made)?;
        let ak_public = public_from_bytes("AK public", &ak.public)?;
        Ok(Identity {
            ek_public_pem: rsa_public_pem("EK", &ek_public)?,
            ek_cert_der,
            ak_public_pem: rsa_public_pem("AK", &ak_public)?,
            ak_name: name_of(&ak_public)?,
            ak,
        })
    }
}

fn make_ak(ctx: &mut Context, ek: KeyHandle) -> Result<(Public, AkBlobs), TpmError> {
    let (ek_public, _, _) = ctx.read_public(ek).map_err(cmd("read the EK"))?;
    let made = ak::create_ak_2(
        ctx,
        ek,
        HashingAlgorithm::Sha256,
        EK_ALG,
        SignatureSchemeAlgorithm::RsaSsa,
        None,
        DefaultKey,
    )
    .map_err(cmd("create the attestation key"))?;
    let blobs = AkBlobs {
        public: public_to_bytes(&made.out_public)?,
        private: private_to_bytes(&made.out_private),
    };
    Ok((ek_public, blobs))
}

/// The EK in use for one call: the persistent one where the TPM keeps it,
/// else a transient one made from the endorsement seed.
pub(crate) struct Ek {
    pub handle: KeyHandle,
    persistent: bool,
}

impl Ek {
    /// Closes (persistent) or flushes (transient) the EK, then returns
    /// `result`.
    pub fn release<T>(self, ctx: &mut Context, result: Result<T, TpmError>) -> Result<T, TpmError> {
        if !self.persistent {
            return flushed(ctx, self.handle, result);
        }
        let mut object = ObjectHandle::from(self.handle);
        let closed = ctx.tr_close(&mut object).map_err(cmd("close the EK"));
        let v = result?;
        closed?;
        Ok(v)
    }
}

/// The EK: the one persisted at [`EK_PERSISTENT_HANDLE`] if it has the
/// default template (then it is the same key, without the seconds a
/// hardware TPM takes to derive an RSA primary), else a transient one
/// from the endorsement seed (deterministic: the same key each time).
pub(crate) fn open_ek(ctx: &mut Context) -> Result<Ek, TpmError> {
    if let Some(handle) = persistent_ek(ctx)? {
        return Ok(Ek {
            handle,
            persistent: true,
        });
    }
    let handle = ek::create_ek_object_2(ctx, EK_ALG, DefaultKey)
        .map_err(cmd("create the endorsement key"))?;
    Ok(Ek {
        handle,
        persistent: false,
    })
}

fn persistent_ek(ctx: &mut Context) -> Result<Option<KeyHandle>, TpmError> {
    if !handle_exists(ctx, EK_PERSISTENT_HANDLE)? {
        return Ok(None);
    }
    let tpm_handle = PersistentTpmHandle::new(EK_PERSISTENT_HANDLE).map_err(cmd("find the EK"))?;
    let mut object = ctx
        .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)))
        .map_err(cmd("open the persistent EK"))?;
    let key = KeyHandle::from(object);
    let template = ek::create_ek_public_from_default_template_2(EK_ALG, DefaultKey)
        .map_err(cmd("build the EK template"))?;
    let same = ctx
        .read_public(key)
        .map(|(public, _, _)| same_template(&public, &template))
        .map_err(cmd("read the persistent EK"));
    match same {
        Ok(true) => Ok(Some(key)),
        other => {
            ctx.tr_close(&mut object).map_err(cmd("close the EK"))?;
            other.map(|_| None)
        }
    }
}

/// Whether two RSA publics differ at most in the key itself.
fn same_template(a: &Public, b: &Public) -> bool {
    match (a, b) {
        (
            Public::Rsa {
                object_attributes: oa,
                name_hashing_algorithm: na,
                auth_policy: pa,
                parameters: ra,
                ..
            },
            Public::Rsa {
                object_attributes: ob,
                name_hashing_algorithm: nb,
                auth_policy: pb,
                parameters: rb,
                ..
            },
        ) => oa == ob && na == nb && pa == pb && ra == rb,
        _ => false,
    }
}

/// Loads the AK from its blobs under the EK (released again here). The
/// caller flushes the AK.
pub(crate) fn load_ak(ctx: &mut Context, blobs: &AkBlobs) -> Result<KeyHandle, TpmError> {
    let public = public_from_bytes("AK public", &blobs.public)?;
    let private = private_from_bytes("AK private", &blobs.private)?;
    let ek = open_ek(ctx)?;
    let loaded = ak::load_ak(ctx, ek.handle, None, private, public).map_err(cmd(
        "load the attestation key (made by another TPM, or the TPM was cleared?)",
    ));
    ek.release(ctx, loaded)
}

/// Whether the TPM has `handle` (a persistent object or an NV index).
fn handle_exists(ctx: &mut Context, handle: u32) -> Result<bool, TpmError> {
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, handle, 1)
        .map_err(cmd("list TPM handles"))?;
    Ok(match data {
        CapabilityData::Handles(list) => list
            .into_inner()
            .into_iter()
            .any(|h| u32::from(h) == handle),
        _ => false,
    })
}

/// The EK certificate, if the TPM holds one.
fn read_ek_cert(ctx: &mut Context) -> Result<Option<Vec<u8>>, TpmError> {
    if !handle_exists(ctx, EK_CERT_NV_INDEX)? {
        return Ok(None);
    }
    let der = ek::retrieve_ek_pubcert(ctx, EK_ALG).map_err(cmd("read the EK certificate"))?;
    Ok(Some(der))
}

/// The TPM name of an object: its name algorithm (SHA-256, 0x000b) and
/// SHA-256 of its marshalled TPMT_PUBLIC.
pub(crate) fn name_of(public: &Public) -> Result<Vec<u8>, TpmError> {
    let tpmt = public.marshall().map_err(cmd("marshal a public key"))?;
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(&Sha256::digest(tpmt));
    Ok(name)
}

/// An RSA TPM public key as SubjectPublicKeyInfo PEM.
fn rsa_public_pem(what: &'static str, public: &Public) -> Result<String, TpmError> {
    let bad = |why: String| TpmError::Blob { what, why };
    let Public::Rsa {
        parameters, unique, ..
    } = public
    else {
        return Err(bad("not an RSA key".into()));
    };
    let e = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    let key = RsaPublicKey::new(BigUint::from_bytes_be(unique.value()), BigUint::from(e))
        .map_err(|e| bad(e.to_string()))?;
    key.to_public_key_pem(LineEnding::LF)
        .map_err(|e| bad(e.to_string()))
}
