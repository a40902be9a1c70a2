//! Quotes: the TPM signs the digest of chosen PCRs and a caller's nonce
//! with the AK.

use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{AttestInfo, Data, HashScheme, PcrSelectionList, SignatureScheme};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::identity::load_ak;
use super::policy::pcr_values_digest;
use super::{cmd, flushed, read_pcrs, selection, AkBlobs, Quote, Tpm, TpmError};

/// The largest nonce a quote takes (TPM2B_DATA holds one SHA-512 digest).
pub const MAX_NONCE: usize = 64;
/// How often a quote is retaken when a PCR moved between reading the
/// values and quoting them.
const ATTEMPTS: u32 = 5;

impl Tpm {
    /// Quotes the SHA-256 PCRs `pcrs` with the AK in `ak`, `nonce` as the
    /// qualifying data. The returned values are the ones the quote covers.
    pub fn quote(&self, ak: &AkBlobs, nonce: &[u8], pcrs: &[u8]) -> Result<Quote, TpmError> {
        if nonce.len() > MAX_NONCE {
            return Err(TpmError::Invalid(format!(
                "a quote's nonce is at most {MAX_NONCE} bytes, not {}",
                nonce.len()
            )));
        }
        let sel = selection(pcrs)?;
        let mut ctx = self.ctx();
        let key = load_ak(&mut ctx, ak)?;
        let quoted = quote_with(&mut ctx, key, nonce, pcrs, sel);
        let (attest, signature, values) = flushed(&mut ctx, key, quoted)?;
        Ok(Quote {
            attest,
            signature,
            ak_public: ak.public.clone(),
            pcrs: values,
        })
    }
}

type Quoted = (Vec<u8>, Vec<u8>, super::PcrValues);

/// Reads the PCRs, quotes them, and checks that the quote's PCR digest is
/// that of the values read; retries when a PCR moved in between.
fn quote_with(
    ctx: &mut Context,
    key: KeyHandle,
    nonce: &[u8],
    pcrs: &[u8],
    sel: PcrSelectionList,
) -> Result<Quoted, TpmError> {
    let scheme = SignatureScheme::RsaSsa {
        hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
    };
    for _ in 0..ATTEMPTS {
        let values = read_pcrs(ctx, pcrs)?;
        let data = Data::try_from(nonce.to_vec()).map_err(cmd("take the nonce"))?;
        let sel = sel.clone();
        let (attest, signature) = ctx
            .execute_with_nullauth_session(|ctx| ctx.quote(key, data, scheme, sel))
            .map_err(cmd("quote PCRs"))?;
        let AttestInfo::Quote { info } = attest.attested() else {
            return Err(TpmError::Blob {
                what: "TPMS_ATTEST",
                why: "the TPM answered a quote with another kind of attestation".into(),
            });
        };
        if info.pcr_digest().value() == pcr_values_digest(pcrs, &values)? {
            let attest = attest.marshall().map_err(cmd("marshal the quote"))?;
            let signature = signature
                .marshall()
                .map_err(cmd("marshal the quote's signature"))?;
            return Ok((attest, signature, values));
        }
    }
    Err(TpmError::PcrsMoving(ATTEMPTS))
}
