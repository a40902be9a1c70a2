//! Policy digests computed in software, so a secret can be sealed to PCR
//! values the TPM does not hold yet (predicted values after an update).
//!
//! TPM 2.0 Part 3, TPM2_PolicyPCR and TPM2_PolicyOR:
//! - PolicyPCR: `H(old || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(values))`
//! - PolicyOR: `H(zeros || TPM_CC_PolicyOR || digest_1 || ... || digest_n)`

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::TpmError;

const TPM_CC_POLICY_PCR: u32 = 0x0000_017F;
const TPM_CC_POLICY_OR: u32 = 0x0000_0171;
const TPM_ALG_SHA256: u16 = 0x000B;
/// The number of PCRs a selection can name (three octets of bitmap, as
/// tss-esapi sends it).
pub const PCR_COUNT: u8 = 24;
/// The most branches TPM2_PolicyOR takes.
pub const MAX_BRANCHES: usize = 8;

/// Checks PCR indices: in range, no duplicates, at least one.
pub(crate) fn check_pcrs(pcrs: &[u8]) -> Result<(), TpmError> {
    if pcrs.is_empty() {
        return Err(TpmError::Invalid("no PCRs selected".into()));
    }
    let mut seen = [false; PCR_COUNT as usize];
    for &p in pcrs {
        if p >= PCR_COUNT {
            return Err(TpmError::Invalid(format!(
                "PCR {p} does not exist (0..={})",
                PCR_COUNT - 1
            )));
        }
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(TpmError::Invalid(format!("PCR {p} selected twice")));
        }
    }
    Ok(())
}

/// The marshalled TPML_PCR_SELECTION of `pcrs` in the SHA-256 bank.
fn selection_bytes(pcrs: &[u8]) -> Vec<u8> {
    let mut bitmap = [0u8; 3];
    for &p in pcrs {
        bitmap[(p / 8) as usize] |= 1 << (p % 8);
    }
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    out.push(3);
    out.extend_from_slice(&bitmap);
    out
}

/// SHA-256 over the values of `pcrs` in ascending PCR order: the PCR
/// digest in PolicyPCR and in a quote's TPMS_QUOTE_INFO.
pub fn pcr_values_digest(
    pcrs: &[u8],
    values: &BTreeMap<u8, [u8; 32]>,
) -> Result<[u8; 32], TpmError> {
    check_pcrs(pcrs)?;
    let mut sorted = pcrs.to_vec();
    sorted.sort_unstable();
    let mut h = Sha256::new();
    for p in sorted {
        let v = values
            .get(&p)
            .ok_or_else(|| TpmError::Invalid(format!("no value given for PCR {p}")))?;
        h.update(v);
    }
    Ok(h.finalize().into())
}

/// The policy digest of one TPM2_PolicyPCR over the SHA-256 PCRs `pcrs`
/// holding `values`, from a fresh session.
pub fn pcr_policy_digest(
    pcrs: &[u8],
    values: &BTreeMap<u8, [u8; 32]>,
) -> Result<[u8; 32], TpmError> {
    let values_digest = pcr_values_digest(pcrs, values)?;
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    h.update(selection_bytes(pcrs));
    h.update(values_digest);
    Ok(h.finalize().into())
}

/// The policy digest of TPM2_PolicyOR over `branches` (2..=8 digests).
pub fn policy_or_digest(branches: &[[u8; 32]]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_OR.to_be_bytes());
    for b in branches {
        h.update(b);
    }
    h.finalize().into()
}

/// The branch digests and the overall policy of a sealed object: one
/// branch is a plain PolicyPCR, more are PolicyOR over their PolicyPCRs.
pub(crate) fn sealing_policy(
    pcrs: &[u8],
    branches: &[BTreeMap<u8, [u8; 32]>],
) -> Result<(Vec<[u8; 32]>, [u8; 32]), TpmError> {
    check_pcrs(pcrs)?;
    if branches.is_empty() || branches.len() > MAX_BRANCHES {
        return Err(TpmError::Invalid(format!(
            "a sealing policy takes 1..={MAX_BRANCHES} sets of PCR values, not {}",
            branches.len()
        )));
    }
    let mut digests = Vec::with_capacity(branches.len());
    for (i, b) in branches.iter().enumerate() {
        if b.len() != pcrs.len() || pcrs.iter().any(|p| !b.contains_key(p)) {
            return Err(TpmError::Invalid(format!(
                "set {i} of PCR values names PCRs {:?}, the policy selects {pcrs:?}",
                b.keys().collect::<Vec<_>>()
            )));
        }
        digests.push(pcr_policy_digest(pcrs, b)?);
    }
    let policy = match digests.as_slice() {
        [one] => *one,
        many => policy_or_digest(many),
    };
    Ok((digests, policy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_marshals_as_tpml_pcr_selection() {
        assert_eq!(
            selection_bytes(&[0, 7, 16, 23]),
            [0, 0, 0, 1, 0, 0x0b, 3, 0x81, 0x00, 0x81]
        );
    }

    #[test]
    fn pcr_policies_match_tpm2_createpolicy() {
        // `tpm2_createpolicy --policy-pcr -l sha256:23 -f <32 zero bytes>`
        let values = BTreeMap::from([(23u8, [0u8; 32])]);
        assert_eq!(
            hex::encode(pcr_policy_digest(&[23], &values).unwrap()),
            "3c87a4b3fb85ebeea58c5fb36ac22d3f280cec27a9f6dd0fa23be9ce560deec8"
        );
        // `-l sha256:16,23 -f <PCR 16 = 32 zeros, PCR 23 = 32 x 0x01>`,
        // selection given out of order.
        let values = BTreeMap::from([(16u8, [0u8; 32]), (23u8, [1u8; 32])]);
        assert_eq!(
            hex::encode(pcr_policy_digest(&[23, 16], &values).unwrap()),
            "587f0589c92769027894e10380098d9c91205031288f54a650ff82ccf720e6e9"
        );
    }

    #[test]
    fn branches_must_name_exactly_the_selected_pcrs() {
        let b = BTreeMap::from([(16u8, [0u8; 32])]);
        assert!(sealing_policy(&[16, 23], std::slice::from_ref(&b)).is_err());
        assert!(sealing_policy(&[16], &[]).is_err());
        assert!(sealing_policy(&[16], &vec![b.clone(); 9]).is_err());
        let (d, p) = sealing_policy(&[16], std::slice::from_ref(&b)).unwrap();
        assert_eq!(d[0], p);
        let (d, p) = sealing_policy(&[16], &[b.clone(), b]).unwrap();
        assert_eq!(p, policy_or_digest(&d));
    }

    #[test]
    fn bad_pcr_selections_are_refused() {
        assert!(check_pcrs(&[]).is_err());
        assert!(check_pcrs(&[24]).is_err());
        assert!(check_pcrs(&[3, 3]).is_err());
        assert!(check_pcrs(&[0, 23]).is_ok());
    }
}
