//! The attestation evidence a node hands to a verifier, as wire JSON.
//!
//! Everything binary is lowercase hex: the TPM's own marshalled structures
//! (TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC), exactly as `tpm2_quote -m/-s`
//! and `tpm2_readpublic -o` write them, and the raw securityfs event logs.
//! The verifier (`super::verify`) trusts none of it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What `GET /v1/node/attestation?nonce=HEX` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub node: EvidenceNode,
    /// Hex of the nonce the agent was asked for (the quote's extraData).
    pub nonce: String,
    /// None when the node runs with `--insecure-no-tpm`: such evidence
    /// proves nothing and fails verification unless the reference policy
    /// explicitly allows insecure nodes.
    pub tpm: Option<TpmEvidence>,
    /// SHA-256 bank values (hex) read alongside the quote, by PCR index.
    pub pcrs: BTreeMap<u8, String>,
    pub logs: EventLogs,
    /// `MEASUREMENT_MODE_IMA` or `MEASUREMENT_MODE_KILN_SELF`.
    pub measurement_mode: String,
}

/// The node's identity as the agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceNode {
    pub id: String,
    pub name: String,
}

/// The TPM's own quote structures, hex of their marshalled bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpmEvidence {
    /// Marshalled TPMS_ATTEST (`tpm2_quote -m`).
    pub attest: String,
    /// Marshalled TPMT_SIGNATURE (`tpm2_quote -s`).
    pub signature: String,
    /// Marshalled TPM2B_PUBLIC of the attestation key.
    pub ak_public: String,
    /// The same key as PEM (SubjectPublicKeyInfo), for humans and policies.
    pub ak_public_pem: String,
}

/// The event logs that explain the quoted PCR values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLogs {
    /// Hex of `/sys/kernel/security/tpm0/binary_bios_measurements` (TCG2
    /// crypto-agile), where the firmware left one.
    pub firmware: Option<String>,
    /// Hex of `/sys/kernel/security/ima/binary_runtime_measurements`.
    pub ima: Option<String>,
    /// Kiln's own log: its binaries (weaker mode) and every VM launch.
    pub kiln: Vec<KilnLogEntry>,
}

/// The kernel's IMA measures what runs, extended into PCR 10.
pub const MEASUREMENT_MODE_IMA: &str = "ima";
/// No IMA: Kiln measured its own binaries at start (weaker).
pub const MEASUREMENT_MODE_KILN_SELF: &str =
    "kiln-self (weaker: Kiln measures its own binaries at start)";

/// One entry of Kiln's event log: `digest` was extended into `pcr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KilnLogEntry {
    pub pcr: u8,
    /// Hex SHA-256 that was extended; must equal `event.digest()`.
    pub digest: String,
    pub event: KilnEvent,
}

/// What Kiln measured. The digest extended for an event is SHA-256 of its
/// JSON (`serde_json::to_vec`, fields in declaration order), so field order
/// and names here are part of the format: append, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum KilnEvent {
    /// A file (binary or configuration) Kiln measured itself, into
    /// `KILN_SOFTWARE_PCR`.
    File { path: String, sha256: String },
    /// A VM launch, into `VM_LAUNCH_PCR`.
    VmLaunch {
        /// The VM's id.
        vm: String,
        name: String,
        /// Hex SHA-256 of the kernel.
        kernel: String,
        /// Hex SHA-256 of the initrd.
        initrd: Option<String>,
        cmdline: String,
        vcpus: u32,
        memory_mib: u64,
        /// Identity of each disk: "image:sha256:<d>" or
        /// "volume:<id>@<snapshot or live>".
        disks: Vec<String>,
    },
}

impl KilnEvent {
    /// SHA-256 of the event's canonical JSON: what Kiln extends.
    pub fn digest(&self) -> [u8; 32] {
        // Serializing this enum cannot fail: only strings, integers, vecs.
        let json = serde_json::to_vec(self).unwrap_or_default();
        Sha256::digest(&json).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_is_tagged_kebab_case_and_stable() {
        let e = KilnEvent::File {
            path: "/usr/bin/kiln-agent".into(),
            sha256: "00".into(),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"file","path":"/usr/bin/kiln-agent","sha256":"00"}"#
        );
        assert_eq!(e.digest(), <[u8; 32]>::from(Sha256::digest(json)));
        let v = KilnEvent::VmLaunch {
            vm: "id".into(),
            name: "n".into(),
            kernel: "k".into(),
            initrd: None,
            cmdline: "c".into(),
            vcpus: 1,
            memory_mib: 2,
            disks: vec![],
        };
        assert!(serde_json::to_string(&v)
            .unwrap()
            .starts_with(r#"{"type":"vm-launch","vm":"id""#));
    }
}
