//! Sealing a small secret to PCR values under the storage primary key.

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CreateKeyResult, Digest, DigestList, EccPoint, KeyedHashScheme, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::Context;
use zeroize::Zeroizing;

use super::blobs::{private_from_bytes, private_to_bytes, public_from_bytes, public_to_bytes};
use super::policy::sealing_policy;
use super::{cmd, flushed, read_pcrs, selection, PcrValues, SealedBlob, Tpm, TpmError};

/// The largest secret a sealed object holds (TPM2B_SENSITIVE_DATA).
pub const MAX_SECRET: usize = 128;

impl Tpm {
    /// Seals `secret` so that it unseals only while the SHA-256 PCRs `pcrs`
    /// hold the values of one of `branches` (1..=8; values may be
    /// predicted rather than current).
    pub fn seal(
        &self,
        secret: &[u8],
        pcrs: &[u8],
        branches: &[PcrValues],
    ) -> Result<SealedBlob, TpmError> {
        if secret.is_empty() || secret.len() > MAX_SECRET {
            return Err(TpmError::Invalid(format!(
                "a sealed secret is 1..={MAX_SECRET} bytes, not {}",
                secret.len()
            )));
        }
        let (_, policy) = sealing_policy(pcrs, branches)?;
        let public = sealed_object_public(&policy)?;
        let data = SensitiveData::try_from(secret.to_vec()).map_err(cmd("take the secret"))?;
        let mut ctx = self.ctx();
        let srk = create_srk(&mut ctx)?;
        let made = create_sealed(&mut ctx, srk, public, data);
        let made = flushed(&mut ctx, srk, made)?;
        Ok(SealedBlob {
            public: public_to_bytes(&made.out_public)?,
            private: private_to_bytes(&made.out_private),
            pcrs: pcrs.to_vec(),
            branches: branches.to_vec(),
        })
    }

    /// Unseals `blob` if the current PCR values satisfy its policy;
    /// [`TpmError::PolicyMismatch`] if they do not.
    pub fn unseal(&self, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let (digests, _) = sealing_policy(&blob.pcrs, &blob.branches)?;
        let public = public_from_bytes("sealed object public", &blob.public)?;
        let private = private_from_bytes("sealed object private", &blob.private)?;
        let mut ctx = self.ctx();
        let srk = create_srk(&mut ctx)?;
        let r = unseal_under(&mut ctx, srk, public, private, blob, &digests);
        let secret = flushed(&mut ctx, srk, r)?;
        match secret {
            Some(s) => Ok(s),
            None => {
                let current = read_pcrs(&mut ctx, &blob.pcrs)?;
                Err(TpmError::PolicyMismatch {
                    changed: changed_pcrs(&blob.pcrs, &blob.branches, &current),
                })
            }
        }
    }
}

/// Creates the sealed object under `srk`, the secret sent through an HMAC
/// session salted by the SRK so that it crosses the bus encrypted.
fn create_sealed(
    ctx: &mut Context,
    srk: KeyHandle,
    public: Public,
    data: SensitiveData,
) -> Result<CreateKeyResult, TpmError> {
    let session = salted_session(ctx, srk, SessionType::Hmac)?;
    let (attrs, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_continue_session(true)
        .build();
    let made = ctx
        .tr_sess_set_attributes(session, attrs, mask)
        .map_err(cmd("set the session's attributes"))
        .and_then(|()| {
            ctx.execute_with_session(Some(session), |ctx| {
                ctx.create(srk, public, None, Some(data), None, None)
            })
            .map_err(cmd("seal under the storage key"))
        });
    flushed(ctx, SessionHandle::from(session), made)
}

/// A session salted by `srk`: its key comes from a secret encrypted to
/// the SRK, so parameter encryption in it hides data from a bus sniffer.
fn salted_session(
    ctx: &mut Context,
    srk: KeyHandle,
    kind: SessionType,
) -> Result<AuthSession, TpmError> {
    ctx.start_auth_session(
        Some(srk),
        None,
        None,
        kind,
        SymmetricDefinition::AES_128_CFB,
        HashingAlgorithm::Sha256,
    )
    .map_err(cmd("start a session"))?
    .ok_or_else(|| TpmError::Invalid("the TPM returned no session".into()))
}

/// Loads the sealed object and unseals it through a policy session;
/// `None` when the PCRs do not satisfy the policy.
fn unseal_under(
    ctx: &mut Context,
    srk: KeyHandle,
    public: Public,
    private: tss_esapi::structures::Private,
    blob: &SealedBlob,
    digests: &[[u8; 32]],
) -> Result<Option<Zeroizing<Vec<u8>>>, TpmError> {
    let object = ctx
        .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
        .map_err(cmd(
            "load the sealed object (sealed by another TPM, or the TPM was cleared?)",
        ))?;
    let r = (|| {
        // Salted with the SRK: the unsealed secret crosses the bus encrypted.
        let session = salted_session(ctx, srk, SessionType::Policy)?;
        let r = policy_and_unseal(ctx, session, object, blob, digests);
        flushed(ctx, SessionHandle::from(session), r)
    })();
    flushed(ctx, object, r)
}

fn policy_and_unseal(
    ctx: &mut Context,
    session: AuthSession,
    object: KeyHandle,
    blob: &SealedBlob,
    digests: &[[u8; 32]],
) -> Result<Option<Zeroizing<Vec<u8>>>, TpmError> {
    let (attrs, mask) = SessionAttributesBuilder::new()
        .with_encrypt(true)
        .with_continue_session(true)
        .build();
    ctx.tr_sess_set_attributes(session, attrs, mask)
        .map_err(cmd("set the policy session's attributes"))?;
    let policy_session = PolicySession::try_from(session).map_err(cmd("start a policy session"))?;
    // An empty PCR digest: the TPM takes the current values.
    let sel = selection(&blob.pcrs)?;
    ctx.execute_without_session(|ctx| ctx.policy_pcr(policy_session, Digest::default(), sel))
        .map_err(cmd("PolicyPCR"))?;
    if digests.len() > 1 {
        let mut list = DigestList::new();
        for d in digests {
            let d = Digest::try_from(d.as_slice()).map_err(cmd("PolicyOR"))?;
            list.add(d).map_err(cmd("PolicyOR"))?;
        }
        // The TPM refuses PolicyOR (TPM_RC_VALUE) when the PCR branch it
        // just computed is none of the listed ones.
        match ctx.execute_without_session(|ctx| ctx.policy_or(policy_session, list)) {
            Ok(()) => {}
            Err(e) if is_kind(e, Tss2ResponseCodeKind::Value) => return Ok(None),
            Err(e) => return Err(cmd("PolicyOR")(e)),
        }
    }
    match ctx.execute_with_session(Some(session), |ctx| ctx.unseal(object.into())) {
        Ok(data) => Ok(Some(Zeroizing::new(data.value().to_vec()))),
        Err(e) if is_kind(e, Tss2ResponseCodeKind::PolicyFail) => Ok(None),
        Err(e) => Err(cmd("unseal")(e)),
    }
}

fn is_kind(e: tss_esapi::Error, kind: Tss2ResponseCodeKind) -> bool {
    matches!(e, tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(kind))
}

/// The sealed PCRs whose current value is in no branch; all of them when
/// each PCR alone matches some branch but no branch matches as a whole.
fn changed_pcrs(pcrs: &[u8], branches: &[PcrValues], current: &PcrValues) -> Vec<u8> {
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    let changed: Vec<u8> = sorted
        .iter()
        .copied()
        .filter(|p| !branches.iter().any(|b| b.get(p) == current.get(p)))
        .collect();
    if changed.is_empty() {
        sorted
    } else {
        changed
    }
}

/// A keyed-hash object holding data, usable only through `policy`.
fn sealed_object_public(policy: &[u8; 32]) -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(false)
        .build()
        .map_err(cmd("build the sealed object's attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(Digest::try_from(policy.as_slice()).map_err(cmd("take the policy"))?)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(cmd("build the sealed object's template"))
}

/// The storage root key from the owner seed with the TCG standard ECC
/// NIST P-256 SRK template (AES-128-CFB, as `tpm2_createprimary -C o -G
/// ecc` makes): the same key every time, and quick to derive where an RSA
/// primary takes a hardware TPM seconds. The caller flushes it.
fn create_srk(ctx: &mut Context) -> Result<KeyHandle, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(cmd("build the storage key's attributes"))?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(cmd("build the storage key's template"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(cmd("build the storage key's template"))?;
    ctx.execute_with_nullauth_session(|ctx| {
        ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
    })
    .map(|r| r.key_handle)
    .map_err(cmd("create the storage primary key"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn changed_pcrs_names_those_in_no_branch() {
        let a = BTreeMap::from([(16u8, [1u8; 32]), (23u8, [2u8; 32])]);
        let b = BTreeMap::from([(16u8, [3u8; 32]), (23u8, [4u8; 32])]);
        let now = BTreeMap::from([(16u8, [1u8; 32]), (23u8, [9u8; 32])]);
        assert_eq!(changed_pcrs(&[23, 16], &[a.clone(), b.clone()], &now), [23]);
        // Each PCR matches some branch, no branch matches whole.
        let mixed = BTreeMap::from([(16u8, [1u8; 32]), (23u8, [4u8; 32])]);
        assert_eq!(changed_pcrs(&[23, 16], &[a, b], &mixed), [16, 23]);
    }
}
