//! Remote attestation: what a node proves about itself, and how anyone
//! checks it without a TPM of their own.
//!
//! - `evidence`: the wire format (`Evidence`) the agent serves at
//!   `GET /v1/node/attestation?nonce=HEX`, and Kiln's own event log
//!   (`KilnEvent`).
//! - `quote`: the TPM's TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC,
//!   unmarshalled in pure Rust; `eventlog`: the firmware (TCG crypto-agile)
//!   and IMA logs; `reader`: the bounds-checked cursor both parse with.
//! - `verify`: checks evidence against a challenge and, optionally, a
//!   `ReferencePolicy` (`policy`), naming every failure. No TPM needed: kilnctl
//!   runs it on any machine.
//!
//! PCRs: the firmware uses 0–7, IMA 10; Kiln extends its own binaries and
//! configuration into `KILN_SOFTWARE_PCR` when IMA is missing, and every VM
//! launch into `VM_LAUNCH_PCR`.

pub mod eventlog;
pub mod evidence;
pub mod policy;
pub mod quote;
pub mod reader;
pub mod report;
pub mod verify;

pub use evidence::{
    EventLogs, Evidence, EvidenceNode, KilnEvent, KilnLogEntry, TpmEvidence, MEASUREMENT_MODE_IMA,
    MEASUREMENT_MODE_KILN_SELF,
};
pub use policy::ReferencePolicy;
pub use verify::{verify, Check, CheckStatus, Failure, Report};

/// Where Kiln extends its own binaries and configuration when IMA is missing.
pub const KILN_SOFTWARE_PCR: u8 = 14;
/// Where Kiln extends each VM launch.
pub const VM_LAUNCH_PCR: u8 = 15;
/// Where Linux IMA extends its measurements.
pub const IMA_PCR: u8 = 10;
