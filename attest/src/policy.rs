//! The reference policy: what a known-good node looked like. Written by
//! `kilnctl attest policy` from a node's verified evidence, read by
//! `kilnctl attest verify --policy`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::evidence::Evidence;
use super::verify::{verify, Report};

/// PCRs that stay the same from boot to boot of an unchanged machine: the
/// firmware's (0–7). IMA's, Kiln's and the VM-launch PCRs change with what
/// runs, so they are judged through their logs' files instead.
pub const STATIC_PCRS: std::ops::RangeInclusive<u8> = 0..=7;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferencePolicy {
    /// The node's attestation key (PEM); quotes by any other key fail.
    pub ak_public_pem: String,
    /// PCR -> expected SHA-256 value (hex).
    #[serde(default)]
    pub pcrs: BTreeMap<u8, String>,
    /// Path -> expected SHA-256 (hex) of every file measured in the IMA log
    /// and Kiln's File events. A measured file not listed fails.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Accept evidence without a TPM (`--insecure-no-tpm`). Never set by
    /// `from_evidence`; only a person editing the file turns it on.
    #[serde(default)]
    pub allow_insecure_no_tpm: bool,
}

impl ReferencePolicy {
    /// The policy a known-good node's evidence implies. Verifies the
    /// evidence against its own nonce first and refuses (with the report)
    /// if anything fails or there is no TPM; the caller checks freshness
    /// against its own challenge before.
    pub fn from_evidence(evidence: &Evidence) -> Result<ReferencePolicy, Box<Report>> {
        let nonce = hex::decode(evidence.nonce.trim()).unwrap_or_default();
        let report = verify(evidence, &nonce, None);
        let Some(tpm) = evidence.tpm.as_ref().filter(|_| report.ok()) else {
            return Err(Box::new(report));
        };
        let pcrs = report
            .quoted_pcrs
            .iter()
            .filter(|(p, _)| STATIC_PCRS.contains(p))
            .map(|(p, v)| (*p, v.clone()))
            .collect();
        // A path measured twice keeps its last digest.
        let files = report
            .files
            .iter()
            .map(|f| (f.path.clone(), f.digest.clone()))
            .collect();
        Ok(ReferencePolicy {
            ak_public_pem: tpm.ak_public_pem.clone(),
            pcrs,
            files,
            allow_insecure_no_tpm: false,
        })
    }
}
