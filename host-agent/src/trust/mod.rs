//! The node's trust: its TPM identity, the key hierarchy that keeps every
//! volume encrypted at rest, and what it measures.
//!
//! Keys: a node key-encryption key (KEK, 256 bits) sealed in the TPM to a
//! policy over the host's measurements (PCRs 0–7, the firmware and boot
//! chain, and `KILN_SOFTWARE_PCR`, Kiln's binaries and configuration), and
//! wrapped a second time by a recovery key shown once at `init`. Each
//! volume has a random data-encryption key (DEK) wrapped by the KEK in the
//! agent's database. Plaintext keys live only in [`secret::Secret`]s.
//!
//! When the measurements change (a replaced binary, a new kernel), the KEK
//! does not unseal: the node runs, its encrypted volumes stay locked, and
//! the status names the PCR and file that changed, until the recovery key
//! unlocks it and `reseal` seals the KEK to the new measurements.

pub mod measure;
pub mod sealing;
pub mod secret;
pub mod wrap;

mod files;
mod node;

pub use files::{dir as files_dir, IdentityFile, KekFile};
pub use node::{InitTrust, Software, Trust, TrustError, TrustStatus};

/// PCRs the KEK is sealed to.
pub const SEAL_PCRS: [u8; 9] = [0, 1, 2, 3, 4, 5, 6, 7, crate::attest::KILN_SOFTWARE_PCR];

/// PCRs a quote covers: firmware, IMA, Kiln's software and VM launches.
pub const QUOTE_PCRS: [u8; 11] = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    crate::attest::IMA_PCR,
    crate::attest::KILN_SOFTWARE_PCR,
    crate::attest::VM_LAUNCH_PCR,
];

/// The kernel's event logs (meaningful only for the kernel's own TPM).
pub const FIRMWARE_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
pub const IMA_LOG: &str = "/sys/kernel/security/ima/binary_runtime_measurements";

/// The TPM the agent uses unless told otherwise: the kernel's resource
/// manager.
pub use crate::tpm::DEFAULT_TCTI;

/// A recovery key as people see it: 64 hex digits in groups of eight.
pub fn format_recovery_key(key: &[u8; 32]) -> String {
    let h = hex::encode(key);
    h.as_bytes()
        .chunks(8)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("-")
}

/// Parses a recovery key, with or without its dashes and spaces.
pub fn parse_recovery_key(text: &str) -> Result<secret::Secret<32>, TrustError> {
    let mut clean: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect();
    let mut bytes = hex::decode(&clean).unwrap_or_default();
    zeroize::Zeroize::zeroize(&mut clean);
    secret::Secret::take(&mut bytes).ok_or_else(|| {
        TrustError::BadInput("a recovery key is 64 hex digits (dashes allowed)".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_keys_round_trip_through_their_printed_form() {
        let k = secret::Secret::<32>::random();
        let shown = format_recovery_key(k.expose());
        assert_eq!(shown.len(), 64 + 7);
        assert_eq!(parse_recovery_key(&shown).unwrap().expose(), k.expose());
        assert_eq!(
            parse_recovery_key(&shown.replace('-', " "))
                .unwrap()
                .expose(),
            k.expose()
        );
        assert!(parse_recovery_key("1234").is_err());
        assert!(parse_recovery_key(&"zz".repeat(32)).is_err());
    }
}
