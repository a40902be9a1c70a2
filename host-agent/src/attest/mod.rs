//! Remote attestation: what a node proves about itself, and how anyone
//! checks it without a TPM of their own.
//!
//! - `evidence`: the wire format (`Evidence`) the agent serves at
//!   `GET /v1/node/attestation?nonce=HEX`, and Kiln's own event log
//!   (`KilnEvent`).
//!
//! PCRs: the firmware uses 0–7, IMA 10; Kiln extends its own binaries and
//! configuration into `KILN_SOFTWARE_PCR` when IMA is missing, and every VM
//! launch into `VM_LAUNCH_PCR`.

pub mod evidence;

pub use evidence::{
    EventLogs, Evidence, EvidenceNode, KilnEvent, KilnLogEntry, TpmEvidence, MEASUREMENT_MODE_IMA,
    MEASUREMENT_MODE_KILN_SELF,
};

/// Where Kiln extends its own binaries and configuration when IMA is missing.
pub const KILN_SOFTWARE_PCR: u8 = 14;
/// Where Kiln extends each VM launch.
pub const VM_LAUNCH_PCR: u8 = 15;
/// Where Linux IMA extends its measurements.
pub const IMA_PCR: u8 = 10;
