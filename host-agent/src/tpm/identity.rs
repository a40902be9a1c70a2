//! The endorsement key and the attestation key under it.

use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::{BigUint, RsaPublicKey};
use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection, DefaultKey};
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{CapabilityData, Public};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::blobs::{private_from_bytes, private_to_bytes, public_from_bytes, public_to_bytes};
use super::{cmd, flushed, AkBlobs, Identity, Tpm, TpmError};

/// Where TPM makers store the RSA 2048 EK certificate (TCG EK profile).
pub const EK_CERT_NV_INDEX: u32 = 0x01c0_0002;

const EK_ALG: AsymmetricAlgorithmSelection = AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048);

impl Tpm {
    /// Makes the node's AK under its EK and returns what to keep.
    pub fn create_identity(&self) -> Result<Identity, TpmError> {
        let mut ctx = self.ctx();
        let ek_cert_der = read_ek_cert(&mut ctx)?;
        let ek = create_ek(&mut ctx)?;
        let made = make_ak(&mut ctx, ek);
        let (ek_public, ak) = flushed(&mut ctx, ek, made)?;
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

/// The EK from the endorsement seed (deterministic: the same key each
/// time). The caller flushes it.
pub(crate) fn create_ek(ctx: &mut Context) -> Result<KeyHandle, TpmError> {
    ek::create_ek_object_2(ctx, EK_ALG, DefaultKey).map_err(cmd("create the endorsement key"))
}

/// Loads the AK from its blobs under a fresh EK (flushed again here). The
/// caller flushes the AK.
pub(crate) fn load_ak(ctx: &mut Context, blobs: &AkBlobs) -> Result<KeyHandle, TpmError> {
    let public = public_from_bytes("AK public", &blobs.public)?;
    let private = private_from_bytes("AK private", &blobs.private)?;
    let ek = create_ek(ctx)?;
    let loaded = ak::load_ak(ctx, ek, None, private, public).map_err(cmd(
        "load the attestation key (made by another TPM, or the TPM was cleared?)",
    ));
    flushed(ctx, ek, loaded)
}

/// The EK certificate, if the TPM holds one.
fn read_ek_cert(ctx: &mut Context) -> Result<Option<Vec<u8>>, TpmError> {
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, EK_CERT_NV_INDEX, 1)
        .map_err(cmd("list NV indices"))?;
    let present = match data {
        CapabilityData::Handles(list) => list
            .into_inner()
            .into_iter()
            .any(|h| u32::from(h) == EK_CERT_NV_INDEX),
        _ => false,
    };
    if !present {
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
