//! What the verifier found: every failure with its facts, the table of
//! checks, and what the evidence showed (files, VM launches).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::evidence::{EvidenceNode, KilnEvent};

/// One reason the evidence is not trusted. As JSON: `{"kind": "FileChanged",
/// "facts": {"pcr": 10, "path": …}}` (no `facts` for `NoTpm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "facts")]
pub enum Failure {
    /// The node has no TPM (`--insecure-no-tpm`) and the policy does not
    /// allow that.
    NoTpm,
    /// The quote's signature does not verify with the AK in the evidence.
    BadSignature { reason: String },
    /// The AK is not a restricted, fixed, signing key: its quotes prove
    /// nothing, since it could sign anything.
    AkNotAttestationKey { reason: String },
    /// The AK is not the one the policy trusts (SHA-256 of each key's
    /// SubjectPublicKeyInfo DER).
    AkNotTrusted { expected: String, found: String },
    /// The evidence's `nonce` differs from the quote's extraData: altered.
    NonceEdited { field: String, quoted: String },
    /// A self-consistent quote, but over another challenge than ours: a
    /// replayed old quote.
    Stale { challenge: String, quoted: String },
    /// The reported PCR values do not hash to the quote's pcrDigest.
    PcrDigestMismatch { quoted: String, computed: String },
    /// A PCR that must be covered is not in the quote's selection.
    PcrNotQuoted { pcr: u8, why: String },
    /// Replaying a log does not give the quoted PCR value: an edited,
    /// truncated or missing log.
    LogReplayMismatch {
        pcr: u8,
        log: String,
        replayed: String,
        quoted: String,
    },
    /// A Kiln log entry's extended digest is not its event's digest.
    EventDigestMismatch {
        pcr: u8,
        index: usize,
        recorded: String,
        computed: String,
    },
    /// A quoted PCR differs from the policy's value.
    PcrNotExpected {
        pcr: u8,
        expected: String,
        found: String,
    },
    /// A measured file's digest differs from the policy's.
    FileChanged {
        pcr: u8,
        path: String,
        expected: String,
        found: String,
    },
    /// A measured file the policy does not know.
    UnknownFile {
        pcr: u8,
        path: String,
        found: String,
    },
    /// The evidence cannot be parsed or contradicts itself.
    MalformedEvidence(String),
}

impl Failure {
    /// The variant's name, for tables and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::NoTpm => "NoTpm",
            Failure::BadSignature { .. } => "BadSignature",
            Failure::AkNotAttestationKey { .. } => "AkNotAttestationKey",
            Failure::AkNotTrusted { .. } => "AkNotTrusted",
            Failure::NonceEdited { .. } => "NonceEdited",
            Failure::Stale { .. } => "Stale",
            Failure::PcrDigestMismatch { .. } => "PcrDigestMismatch",
            Failure::PcrNotQuoted { .. } => "PcrNotQuoted",
            Failure::LogReplayMismatch { .. } => "LogReplayMismatch",
            Failure::EventDigestMismatch { .. } => "EventDigestMismatch",
            Failure::PcrNotExpected { .. } => "PcrNotExpected",
            Failure::FileChanged { .. } => "FileChanged",
            Failure::UnknownFile { .. } => "UnknownFile",
            Failure::MalformedEvidence(_) => "MalformedEvidence",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind())?;
        match self {
            Failure::NoTpm => write!(
                f,
                "the node has no TPM (--insecure-no-tpm); its evidence proves nothing"
            ),
            Failure::BadSignature { reason } => write!(f, "quote signature: {reason}"),
            Failure::AkNotAttestationKey { reason } => write!(f, "attestation key: {reason}"),
            Failure::AkNotTrusted { expected, found } => write!(
                f,
                "attestation key sha256:{found} is not the policy's sha256:{expected}"
            ),
            Failure::NonceEdited { field, quoted } => write!(
                f,
                "evidence nonce {field} differs from the quote's extraData {quoted} (evidence altered)"
            ),
            Failure::Stale { challenge, quoted } => write!(
                f,
                "the quote answers nonce {quoted}, not our challenge {challenge} (a replayed quote)"
            ),
            Failure::PcrDigestMismatch { quoted, computed } => write!(
                f,
                "reported PCR values hash to {computed}, the quote says {quoted} (a PCR value was changed)"
            ),
            Failure::PcrNotQuoted { pcr, why } => write!(f, "PCR {pcr} is not quoted: {why}"),
            Failure::LogReplayMismatch {
                pcr,
                log,
                replayed,
                quoted,
            } => write!(
                f,
                "PCR {pcr}: the {log} log replays to {replayed}, quoted {quoted} (log edited)"
            ),
            Failure::EventDigestMismatch {
                pcr,
                index,
                recorded,
                computed,
            } => write!(
                f,
                "PCR {pcr}: kiln log entry {index} records digest {recorded}, its event hashes to {computed}"
            ),
            Failure::PcrNotExpected {
                pcr,
                expected,
                found,
            } => write!(f, "PCR {pcr}: expected {expected}, found {found}"),
            Failure::FileChanged {
                pcr,
                path,
                expected,
                found,
            } => write!(f, "PCR {pcr}: {path}: expected {expected}, found {found}"),
            Failure::UnknownFile { pcr, path, found } => {
                write!(f, "PCR {pcr}: {path} ({found}) is not in the policy")
            }
            Failure::MalformedEvidence(m) => f.write_str(m),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Pass,
    Fail,
    /// Not checked (no policy, no log): says nothing either way.
    Skipped,
}

/// One line of the verifier's table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: CheckStatus,
    pub detail: String,
}

/// A file some log says was measured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeasuredFile {
    pub pcr: u8,
    pub path: String,
    /// Hex SHA-256 (or "ALG:hex" for an IMA digest in another algorithm).
    pub digest: String,
    /// "ima" or "kiln".
    pub log: String,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: EvidenceNode,
    pub measurement_mode: String,
    pub checks: Vec<Check>,
    pub failures: Vec<Failure>,
    /// SHA-256 of the AK's SubjectPublicKeyInfo DER, when it parsed.
    pub ak_sha256: Option<String>,
    /// The quoted PCR values (hex), when they hash to the quote's digest.
    pub quoted_pcrs: BTreeMap<u8, String>,
    pub files: Vec<MeasuredFile>,
    pub vm_launches: Vec<KilnEvent>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}
