//! The TPM layer's one error type: each variant says what an operator can
//! do about it; TPM response codes are kept as the source.

/// What went wrong talking to the TPM.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// Nothing answers at the TCTI (no device, no permission, swtpm down).
    #[error(
        "no TPM at {tcti}: {reason} (check that the device exists and this user may open it \
         (group tss), or that swtpm is running at that address)"
    )]
    NotFound { tcti: String, reason: String },
    /// The TCTI string is not one this layer understands.
    #[error(
        "bad TPM address {0:?}: expected device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321"
    )]
    BadTcti(String),
    /// A TPM command failed; `op` names what Kiln was doing.
    #[error("TPM: {op} failed: {source}")]
    Command {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM refused to unseal because the current PCR values match none
    /// of the values the secret was sealed to: the measurements changed.
    #[error(
        "the measurements changed: PCRs {changed:?} match none of the values the secret was \
         sealed to, so the TPM refuses to unseal it"
    )]
    PolicyMismatch {
        /// The sealed PCRs whose current value matches no sealed branch.
        changed: Vec<u8>,
    },
    /// The PCRs kept changing while a quote was taken.
    #[error("the PCRs changed during each of {0} quote attempts; try again")]
    PcrsMoving(u32),
    /// A caller's argument is out of range (PCR index, nonce or secret size).
    #[error("{0}")]
    Invalid(String),
    /// A stored blob does not parse as the TPM structure it should hold.
    #[error("corrupt TPM blob ({what}): {why}")]
    Blob { what: &'static str, why: String },
}

/// Maps a tss-esapi error to [`TpmError::Command`] naming the operation.
pub(crate) fn cmd(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Command { op, source }
}
