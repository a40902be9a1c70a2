//! kilnctl's attestation verifier on evidence an attacker controls: the
//! TPM structures (TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC) and the
//! firmware and IMA event logs parsed raw, then whole `Evidence` run
//! through `verify` with and without a policy, both as JSON and with the
//! input placed in each binary field. Nothing may panic; hostile evidence
//! never verifies.

#![no_main]

use kiln_attest::eventlog::{parse_firmware_log, parse_ima_log};
use kiln_attest::quote::{parse_attest, parse_public, parse_signature};
use kiln_attest::{
    verify, EventLogs, Evidence, EvidenceNode, ReferencePolicy, TpmEvidence,
    MEASUREMENT_MODE_IMA,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_attest(data);
    let _ = parse_signature(data);
    let _ = parse_public(data);
    let _ = parse_firmware_log(data);
    let _ = parse_ima_log(data);

    let policy = ReferencePolicy {
        allow_insecure_no_tpm: data.first() == Some(&0),
        ..Default::default()
    };
    if let Ok(e) = serde_json::from_slice::<Evidence>(data) {
        let _ = verify(&e, &[0u8; 32], None);
        let _ = verify(&e, &[0u8; 32], Some(&policy));
        let _ = ReferencePolicy::from_evidence(&e);
    }

    // The input as each binary field of otherwise plain evidence; the
    // first byte picks the field, the rest is the field.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let h = hex::encode(rest);
    let mut tpm = TpmEvidence {
        attest: String::new(),
        signature: String::new(),
        ak_public: String::new(),
        ak_public_pem: String::new(),
    };
    let mut logs = EventLogs::default();
    match pick % 5 {
        0 => tpm.attest = h,
        1 => tpm.signature = h,
        2 => tpm.ak_public = h,
        3 => logs.firmware = Some(h),
        _ => logs.ima = Some(h),
    }
    let e = Evidence {
        node: EvidenceNode {
            id: "n".into(),
            name: "n".into(),
        },
        nonce: String::new(),
        tpm: Some(tpm),
        pcrs: Default::default(),
        logs,
        measurement_mode: MEASUREMENT_MODE_IMA.into(),
    };
    let r = verify(&e, &[], Some(&policy));
    assert!(!r.ok(), "evidence without a valid quote verified");
});
