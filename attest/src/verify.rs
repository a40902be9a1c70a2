//! The verifier: checks evidence against our challenge and, optionally, a
//! reference policy, and names every failure with its facts. Pure Rust over
//! the evidence's bytes: no TPM, no C library.
//!
//! Order of trust: the AK's signature over TPMS_ATTEST vouches for the
//! quote; the quote's pcrDigest vouches for the reported PCR values; the
//! PCR values vouch for the event logs that replay to them; the logs name
//! the measured files, which the policy judges. Every step runs even when
//! an earlier one failed, so the report shows all that is wrong at once;
//! it passes only when nothing failed.

use std::collections::{BTreeMap, BTreeSet};

use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::{BigUint, Pkcs1v15Sign, Pss, RsaPublicKey};
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::eventlog::{self, extend, NUM_PCRS};
use super::evidence::{Evidence, KilnEvent, MEASUREMENT_MODE_IMA, MEASUREMENT_MODE_KILN_SELF};
use super::policy::ReferencePolicy;
use super::quote::{self, alg_name};
pub use super::report::{Check, CheckStatus, Failure, MeasuredFile, Report};
use super::{IMA_PCR, KILN_SOFTWARE_PCR, VM_LAUNCH_PCR};

struct Run {
    checks: Vec<Check>,
    failures: Vec<Failure>,
    mark: usize,
}

impl Run {
    fn fail(&mut self, f: Failure) {
        self.failures.push(f);
    }
    fn malformed(&mut self, m: impl Into<String>) {
        self.failures.push(Failure::MalformedEvidence(m.into()));
    }
    /// Starts a check: failures pushed until `end` belong to it.
    fn begin(&mut self) {
        self.mark = self.failures.len();
    }
    fn end(&mut self, name: &str, detail: impl Into<String>) {
        let status = if self.failures.len() > self.mark {
            CheckStatus::Fail
        } else {
            CheckStatus::Pass
        };
        self.push(name, status, detail);
    }
    fn push(&mut self, name: &str, status: CheckStatus, detail: impl Into<String>) {
        let mut detail = detail.into();
        if status == CheckStatus::Fail {
            let kinds: BTreeSet<&str> = self.failures[self.mark..]
                .iter()
                .map(|f| f.kind())
                .collect();
            let kinds: Vec<&str> = kinds.into_iter().collect();
            detail = format!("{} ({})", kinds.join(", "), detail);
        }
        self.checks.push(Check {
            name: name.into(),
            status,
            detail,
        });
        self.mark = self.failures.len();
    }
}

fn unhex(s: &str, what: &str) -> Result<Vec<u8>, String> {
    hex::decode(s.trim()).map_err(|e| format!("{what} is not hex: {e}"))
}

fn digest32(s: &str, what: &str) -> Result<[u8; 32], String> {
    let v = unhex(s, what)?;
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| format!("{what} is {} bytes, not a SHA-256 (32)", v.len()))
}

/// SHA-256 of the key's SubjectPublicKeyInfo DER, hex: the AK's identity.
pub fn ak_sha256(key: &RsaPublicKey) -> Option<String> {
    let der = key.to_public_key_der().ok()?;
    Some(hex::encode(Sha256::digest(der.as_bytes())))
}

/// Parses a PEM public key (SubjectPublicKeyInfo or PKCS#1 RSA).
pub fn parse_pem_key(pem: &str) -> Result<RsaPublicKey, String> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    RsaPublicKey::from_public_key_pem(pem.trim())
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(pem.trim()))
        .map_err(|e| format!("not an RSA public key in PEM: {e}"))
}

fn hash(alg: u16, data: &[u8]) -> Option<Vec<u8>> {
    match alg {
        quote::TPM_ALG_SHA256 => Some(Sha256::digest(data).to_vec()),
        quote::TPM_ALG_SHA384 => Some(Sha384::digest(data).to_vec()),
        quote::TPM_ALG_SHA512 => Some(Sha512::digest(data).to_vec()),
        _ => None,
    }
}

fn check_signature(
    key: &RsaPublicKey,
    ak: &quote::RsaAkPublic,
    attest: &[u8],
    sig: &quote::TpmSignature,
) -> Result<String, String> {
    if ak.scheme != quote::TPM_ALG_NULL && (ak.scheme != sig.scheme || ak.scheme_hash != sig.hash) {
        return Err(format!(
            "signed with {}/{}, but the AK's scheme is {}/{}",
            alg_name(sig.scheme),
            alg_name(sig.hash),
            alg_name(ak.scheme),
            alg_name(ak.scheme_hash)
        ));
    }
    let digest = hash(sig.hash, attest).ok_or_else(|| {
        format!(
            "hash {} not accepted (sha256, sha384, sha512)",
            alg_name(sig.hash)
        )
    })?;
    let ok = match sig.scheme {
        quote::TPM_ALG_RSASSA => key.verify(pkcs1v15(sig.hash), &digest, &sig.sig).is_ok(),
        quote::TPM_ALG_RSAPSS => {
            use rsa::traits::PublicKeyParts;
            // TPMs salt with the digest's length, or the most the key allows.
            let max = key.size().saturating_sub(digest.len() + 2);
            [digest.len(), max].into_iter().any(|salt| {
                match sig.hash {
                    quote::TPM_ALG_SHA256 => {
                        key.verify(Pss::new_with_salt::<Sha256>(salt), &digest, &sig.sig)
                    }
                    quote::TPM_ALG_SHA384 => {
                        key.verify(Pss::new_with_salt::<Sha384>(salt), &digest, &sig.sig)
                    }
                    _ => key.verify(Pss::new_with_salt::<Sha512>(salt), &digest, &sig.sig),
                }
                .is_ok()
            })
        }
        s => {
            return Err(format!(
                "scheme {} not accepted (rsassa, rsapss)",
                alg_name(s)
            ))
        }
    };
    if ok {
        Ok(format!("{}/{}", alg_name(sig.scheme), alg_name(sig.hash)))
    } else {
        Err(format!(
            "{}/{} signature does not verify with the AK",
            alg_name(sig.scheme),
            alg_name(sig.hash)
        ))
    }
}

/// PKCS#1 v1.5 with the DigestInfo prefix of the hash (RFC 8017, 9.2),
/// spelled out so sha2 needs no OID feature.
fn pkcs1v15(hash: u16) -> Pkcs1v15Sign {
    let (oid_last, len) = match hash {
        quote::TPM_ALG_SHA384 => (2u8, 48u8),
        quote::TPM_ALG_SHA512 => (3, 64),
        _ => (1, 32),
    };
    let prefix = [
        0x30,
        17 + len,
        0x30,
        0x0d,
        0x06,
        0x09,
        0x60,
        0x86,
        0x48,
        0x01,
        0x65,
        0x03,
        0x04,
        0x02,
        oid_last,
        0x05,
        0x00,
        0x04,
        len,
    ];
    Pkcs1v15Sign {
        hash_len: Some(len as usize),
        prefix: prefix.into(),
    }
}

/// Checks `evidence` as the answer to `challenge_nonce`, and against
/// `policy` when given (without one, the AK, PCR values and files are not
/// judged: the report only shows the evidence is self-consistent and fresh).
pub fn verify(
    evidence: &Evidence,
    challenge_nonce: &[u8],
    policy: Option<&ReferencePolicy>,
) -> Report {
    let mut run = Run {
        checks: Vec::new(),
        failures: Vec::new(),
        mark: 0,
    };
    let mut report = Report {
        node: evidence.node.clone(),
        measurement_mode: evidence.measurement_mode.clone(),
        checks: Vec::new(),
        failures: Vec::new(),
        ak_sha256: None,
        quoted_pcrs: BTreeMap::new(),
        files: Vec::new(),
        vm_launches: Vec::new(),
    };
    let Some(tpm) = &evidence.tpm else {
        if policy.is_some_and(|p| p.allow_insecure_no_tpm) {
            run.push(
                "tpm",
                CheckStatus::Skipped,
                "no TPM: insecure node, allowed by the policy; nothing below is proven",
            );
            // Still show what the logs claim, and judge the files.
            let mut logs = Logs::default();
            parse_logs(evidence, &mut run, &mut logs);
            judge_files(&mut run, policy, &logs.files);
            report.files = logs.files;
            report.vm_launches = logs.vm_launches;
        } else {
            run.fail(Failure::NoTpm);
            run.end("tpm", "node runs with --insecure-no-tpm");
        }
        report.checks = run.checks;
        report.failures = run.failures;
        return report;
    };
    run.push("tpm", CheckStatus::Pass, "evidence carries a TPM quote");

    // The quote's structures.
    run.begin();
    let attest = unhex(&tpm.attest, "tpm.attest")
        .map_err(|e| run.malformed(e))
        .ok();
    let quote = attest.as_deref().and_then(|a| {
        quote::parse_attest(a)
            .map_err(|e| run.malformed(e.to_string()))
            .ok()
    });
    if let Some(q) = &quote {
        if q.magic != quote::TPM_GENERATED_VALUE {
            run.malformed(format!(
                "TPMS_ATTEST magic 0x{:08x} is not TPM_GENERATED_VALUE (0xff544347): not made by a TPM",
                q.magic
            ));
        }
    }
    run.end(
        "quote",
        quote.as_ref().map_or("unreadable".to_string(), |q| {
            format!(
                "TPMS_ATTEST, TPM_ST_ATTEST_QUOTE, reset {} restart {}",
                q.reset_count, q.restart_count
            )
        }),
    );

    // The attestation key.
    run.begin();
    let ak = unhex(&tpm.ak_public, "tpm.ak_public")
        .and_then(|b| quote::parse_public(&b).map_err(|e| e.to_string()))
        .map_err(|e| run.malformed(e))
        .ok();
    let key = ak.as_ref().and_then(|ak| {
        RsaPublicKey::new(
            BigUint::from_bytes_be(&ak.modulus),
            BigUint::from(ak.exponent),
        )
        .map_err(|e| run.malformed(format!("AK public key: {e}")))
        .ok()
    });
    if let Some(ak) = &ak {
        let want = quote::TPMA_OBJECT_FIXEDTPM
            | quote::TPMA_OBJECT_RESTRICTED
            | quote::TPMA_OBJECT_SIGN_ENCRYPT;
        if ak.attributes & want != want {
            run.fail(Failure::AkNotAttestationKey {
                reason: format!(
                    "attributes 0x{:08x} lack fixedTPM, restricted or sign",
                    ak.attributes
                ),
            });
        }
    }
    if let Some(key) = &key {
        report.ak_sha256 = ak_sha256(key);
        match parse_pem_key(&tpm.ak_public_pem) {
            Ok(pem) if &pem == key => {}
            Ok(_) => run.malformed("ak_public_pem is not the key in ak_public"),
            Err(e) => run.malformed(format!("ak_public_pem: {e}")),
        }
    }
    if let (Some(p), Some(key)) = (policy, &key) {
        match parse_pem_key(&p.ak_public_pem) {
            Ok(trusted) if &trusted == key => {}
            Ok(trusted) => run.fail(Failure::AkNotTrusted {
                expected: ak_sha256(&trusted).unwrap_or_default(),
                found: report.ak_sha256.clone().unwrap_or_default(),
            }),
            Err(e) => run.malformed(format!("policy ak_public_pem: {e}")),
        }
    }
    let ak_detail = report
        .ak_sha256
        .as_ref()
        .map_or("unreadable".into(), |s| format!("sha256:{s}"));
    if policy.is_none() && run.failures.len() == run.mark {
        run.push(
            "attestation key",
            CheckStatus::Skipped,
            format!("{ak_detail}, not judged: no policy names a trusted AK"),
        );
    } else {
        run.end("attestation key", ak_detail);
    }

    // The signature.
    run.begin();
    match (&attest, &ak, &key) {
        (Some(attest), Some(ak), Some(key)) => {
            let res = unhex(&tpm.signature, "tpm.signature")
                .and_then(|b| quote::parse_signature(&b).map_err(|e| e.to_string()));
            match res.and_then(|sig| check_signature(key, ak, attest, &sig)) {
                Ok(d) => run.push("signature", CheckStatus::Pass, d),
                Err(reason) => {
                    run.fail(Failure::BadSignature { reason });
                    run.end("signature", "over TPMS_ATTEST with the AK");
                }
            }
        }
        _ => {
            run.fail(Failure::BadSignature {
                reason: "no readable quote or AK to check it with".into(),
            });
            run.end("signature", "");
        }
    }

    // The nonce.
    run.begin();
    let challenge = hex::encode(challenge_nonce);
    match (unhex(&evidence.nonce, "nonce"), &quote) {
        (Err(e), _) => run.malformed(e),
        (Ok(field), Some(q)) => {
            if field != q.extra_data {
                run.fail(Failure::NonceEdited {
                    field: hex::encode(&field),
                    quoted: hex::encode(&q.extra_data),
                });
            } else if q.extra_data != challenge_nonce {
                run.fail(Failure::Stale {
                    challenge: challenge.clone(),
                    quoted: hex::encode(&q.extra_data),
                });
            }
        }
        (Ok(_), None) => {}
    }
    run.end("nonce", format!("challenge {challenge}"));

    // The PCR values against the quote's digest.
    run.begin();
    let mut quoted: BTreeMap<u8, [u8; 32]> = BTreeMap::new();
    if let Some(q) = &quote {
        let mut order = Vec::new();
        for sel in &q.pcr_select {
            if sel.hash != quote::TPM_ALG_SHA256 {
                run.malformed(format!(
                    "the quote selects the {} bank; only SHA-256 is verified",
                    alg_name(sel.hash)
                ));
            }
            order.extend(sel.pcrs.iter().copied());
        }
        let mut values = Vec::new();
        for &pcr in &order {
            match evidence.pcrs.get(&pcr) {
                None => run.malformed(format!("PCR {pcr} is quoted but its value is not reported")),
                Some(v) => match digest32(v, &format!("PCR {pcr}")) {
                    Ok(d) => {
                        values.extend_from_slice(&d);
                        quoted.insert(pcr, d);
                    }
                    Err(e) => run.malformed(e),
                },
            }
        }
        // The quote's digest uses the signing scheme's hash.
        let alg = unhex(&tpm.signature, "")
            .ok()
            .and_then(|b| quote::parse_signature(&b).ok())
            .map_or(quote::TPM_ALG_SHA256, |s| s.hash);
        match hash(alg, &values) {
            Some(computed) if computed == q.pcr_digest => {}
            Some(computed) => run.fail(Failure::PcrDigestMismatch {
                quoted: hex::encode(&q.pcr_digest),
                computed: hex::encode(computed),
            }),
            None => run.malformed(format!("pcrDigest in {}", alg_name(alg))),
        }
        let unquoted: Vec<String> = evidence
            .pcrs
            .keys()
            .filter(|p| !quoted.contains_key(p))
            .map(|p| p.to_string())
            .collect();
        let list: Vec<String> = order.iter().map(|p| p.to_string()).collect();
        let mut detail = format!("sha256:{}", list.join(","));
        if !unquoted.is_empty() {
            detail += &format!(" (ignored, not quoted: {})", unquoted.join(","));
        }
        run.end("pcr values", detail);
    } else {
        run.end("pcr values", "no quote");
    }
    if !run
        .failures
        .iter()
        .any(|f| matches!(f, Failure::PcrDigestMismatch { .. }))
    {
        report.quoted_pcrs = quoted.iter().map(|(p, v)| (*p, hex::encode(v))).collect();
    }

    // The logs, replayed to the quoted values.
    let mut logs = Logs::default();
    parse_logs(evidence, &mut run, &mut logs);
    run.begin();
    let mut must: BTreeMap<u8, &str> = BTreeMap::new();
    must.insert(VM_LAUNCH_PCR, "VM launches are measured there");
    match evidence.measurement_mode.as_str() {
        MEASUREMENT_MODE_IMA => {
            must.insert(IMA_PCR, "measurement mode is ima");
        }
        MEASUREMENT_MODE_KILN_SELF => {
            must.insert(KILN_SOFTWARE_PCR, "measurement mode is kiln-self");
        }
        m => run.malformed(format!("unknown measurement mode {m:?}")),
    }
    for (pcr, why) in must {
        if quote.is_some() && !quoted.contains_key(&pcr) {
            run.fail(Failure::PcrNotQuoted {
                pcr,
                why: why.into(),
            });
        }
    }
    // A PCR a log owns must replay even when its log is missing or empty:
    // dropping a log must not hide what was extended.
    let mut owned = vec![
        (IMA_PCR, "ima"),
        (KILN_SOFTWARE_PCR, "kiln"),
        (VM_LAUNCH_PCR, "kiln"),
    ];
    if evidence.logs.firmware.is_some() {
        owned.extend(super::policy::STATIC_PCRS.map(|p| (p, "firmware")));
    }
    for (pcr, log) in owned {
        if quoted.contains_key(&pcr) && !logs.replayed.contains_key(&pcr) {
            let start = if pcr == 0 { logs.pcr0_start } else { [0u8; 32] };
            logs.replayed.insert(pcr, (start, log.to_string()));
        }
    }
    let mut compared = Vec::new();
    for (pcr, (value, log)) in &logs.replayed {
        match quoted.get(pcr) {
            Some(q) => {
                compared.push(pcr.to_string());
                if q != value {
                    run.fail(Failure::LogReplayMismatch {
                        pcr: *pcr,
                        log: log.clone(),
                        replayed: hex::encode(value),
                        quoted: hex::encode(q),
                    });
                }
            }
            None if quote.is_some() => run.fail(Failure::PcrNotQuoted {
                pcr: *pcr,
                why: format!("the {log} log extends it"),
            }),
            None => {}
        }
    }
    run.end(
        "log replay",
        format!(
            "PCRs {} replayed from {} firmware, {} IMA, {} kiln events",
            compared.join(","),
            logs.counts.0,
            logs.counts.1,
            logs.counts.2
        ),
    );

    // The policy.
    match policy {
        None => run.push("reference pcrs", CheckStatus::Skipped, "no policy"),
        Some(p) => {
            run.begin();
            for (pcr, expected) in &p.pcrs {
                match quoted.get(pcr) {
                    None => run.fail(Failure::PcrNotQuoted {
                        pcr: *pcr,
                        why: "the policy expects a value".into(),
                    }),
                    Some(found) if hex::encode(found) != expected.to_ascii_lowercase() => {
                        run.fail(Failure::PcrNotExpected {
                            pcr: *pcr,
                            expected: expected.clone(),
                            found: hex::encode(found),
                        })
                    }
                    Some(_) => {}
                }
            }
            let list: Vec<String> = p.pcrs.keys().map(|p| p.to_string()).collect();
            run.end("reference pcrs", format!("PCRs {}", list.join(",")));
        }
    }
    judge_files(&mut run, policy, &logs.files);

    report.files = logs.files;
    report.vm_launches = logs.vm_launches;
    report.checks = run.checks;
    report.failures = run.failures;
    report
}

#[derive(Default)]
struct Logs {
    /// PCR -> (replayed value, which log).
    replayed: BTreeMap<u8, ([u8; 32], String)>,
    files: Vec<MeasuredFile>,
    vm_launches: Vec<KilnEvent>,
    /// Firmware, IMA, Kiln events extended.
    counts: (usize, usize, usize),
    /// PCR 0's value before the first extend (StartupLocality).
    pcr0_start: [u8; 32],
}

impl Logs {
    fn extend(&mut self, pcr: u8, digest: &[u8; 32], log: &str, pcr0_start: [u8; 32]) {
        let entry = self.replayed.entry(pcr).or_insert_with(|| {
            let start = if pcr == 0 { pcr0_start } else { [0u8; 32] };
            (start, log.to_string())
        });
        if !entry.1.split('+').any(|l| l == log) {
            entry.1 = format!("{}+{log}", entry.1);
        }
        extend(&mut entry.0, digest);
    }
}

/// Parses every log, replays it, and collects what it measured. Logs are
/// replayed in boot order: firmware, then IMA, then Kiln's.
fn parse_logs(evidence: &Evidence, run: &mut Run, logs: &mut Logs) {
    run.begin();
    let mut pcr0 = [0u8; 32];
    match &evidence.logs.firmware {
        None => run.push(
            "firmware log",
            CheckStatus::Skipped,
            "none (no UEFI TPM log)",
        ),
        Some(h) => {
            match unhex(h, "logs.firmware")
                .and_then(|b| eventlog::parse_firmware_log(&b).map_err(|e| e.to_string()))
            {
                Err(e) => run.malformed(e),
                Ok(fw) => {
                    if let Some(l) = fw.startup_locality {
                        pcr0[31] = l;
                    }
                    logs.pcr0_start = pcr0;
                    logs.counts.0 = fw.extends.len();
                    for e in &fw.extends {
                        logs.extend(e.pcr, &e.digest, "firmware", pcr0);
                    }
                }
            }
            run.end("firmware log", format!("{} events", logs.counts.0));
        }
    }
    match &evidence.logs.ima {
        None => run.push("ima log", CheckStatus::Skipped, "none"),
        Some(h) => {
            match unhex(h, "logs.ima")
                .and_then(|b| eventlog::parse_ima_log(&b).map_err(|e| e.to_string()))
            {
                Err(e) => run.malformed(e),
                Ok(ima) => {
                    logs.counts.1 = ima.extends.len();
                    for e in &ima.extends {
                        logs.extend(e.pcr, &e.digest, "ima", pcr0);
                    }
                    logs.files
                        .extend(ima.files.into_iter().map(|f| MeasuredFile {
                            pcr: f.pcr,
                            path: f.path,
                            digest: f.digest,
                            log: "ima".into(),
                        }));
                }
            }
            run.end("ima log", format!("{} entries", logs.counts.1));
        }
    }
    for (index, entry) in evidence.logs.kiln.iter().enumerate() {
        let want = match entry.event {
            KilnEvent::File { .. } => KILN_SOFTWARE_PCR,
            KilnEvent::VmLaunch { .. } => VM_LAUNCH_PCR,
        };
        if entry.pcr != want || u32::from(entry.pcr) >= NUM_PCRS {
            run.malformed(format!(
                "kiln log entry {index}: PCR {} (this event belongs in PCR {want})",
                entry.pcr
            ));
            continue;
        }
        let recorded = match digest32(&entry.digest, &format!("kiln log entry {index} digest")) {
            Ok(d) => d,
            Err(e) => {
                run.malformed(e);
                continue;
            }
        };
        let computed = entry.event.digest();
        if recorded != computed {
            run.fail(Failure::EventDigestMismatch {
                pcr: entry.pcr,
                index,
                recorded: hex::encode(recorded),
                computed: hex::encode(computed),
            });
        }
        // What the TPM saw is the recorded digest.
        logs.extend(entry.pcr, &recorded, "kiln", pcr0);
        logs.counts.2 += 1;
        match &entry.event {
            KilnEvent::File { path, sha256 } => logs.files.push(MeasuredFile {
                pcr: entry.pcr,
                path: path.clone(),
                digest: sha256.to_ascii_lowercase(),
                log: "kiln".into(),
            }),
            e @ KilnEvent::VmLaunch { .. } => logs.vm_launches.push(e.clone()),
        }
    }
    run.end(
        "kiln log",
        format!(
            "{} entries ({} VM launches)",
            evidence.logs.kiln.len(),
            logs.vm_launches.len()
        ),
    );
}

fn judge_files(run: &mut Run, policy: Option<&ReferencePolicy>, files: &[MeasuredFile]) {
    let Some(p) = policy else {
        run.push(
            "files",
            CheckStatus::Skipped,
            format!("{} measured, not judged: no policy", files.len()),
        );
        return;
    };
    run.begin();
    for f in files {
        match p.files.get(&f.path) {
            None => run.fail(Failure::UnknownFile {
                pcr: f.pcr,
                path: f.path.clone(),
                found: f.digest.clone(),
            }),
            Some(expected) if expected.to_ascii_lowercase() != f.digest => {
                run.fail(Failure::FileChanged {
                    pcr: f.pcr,
                    path: f.path.clone(),
                    expected: expected.clone(),
                    found: f.digest.clone(),
                })
            }
            Some(_) => {}
        }
    }
    run.end(
        "files",
        format!("{} measured, {} in the policy", files.len(), p.files.len()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::{EventLogs, EvidenceNode};

    fn firmware_log(locality: Option<u8>, events: &[(u32, [u8; 32])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&eventlog::EV_NO_ACTION.to_le_bytes());
        b.extend_from_slice(&[0u8; 20]);
        let mut spec = b"Spec ID Event03\0".to_vec();
        spec.extend_from_slice(&[0; 8]);
        spec.extend_from_slice(&1u32.to_le_bytes());
        spec.extend_from_slice(&quote::TPM_ALG_SHA256.to_le_bytes());
        spec.extend_from_slice(&32u16.to_le_bytes());
        spec.push(0);
        b.extend_from_slice(&(spec.len() as u32).to_le_bytes());
        b.extend_from_slice(&spec);
        let mut ev = |pcr: u32, ty: u32, d: [u8; 32], data: &[u8]| {
            b.extend_from_slice(&pcr.to_le_bytes());
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&quote::TPM_ALG_SHA256.to_le_bytes());
            b.extend_from_slice(&d);
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
        };
        if let Some(l) = locality {
            let mut data = b"StartupLocality\0".to_vec();
            data.push(l);
            ev(0, eventlog::EV_NO_ACTION, [0; 32], &data);
        }
        for (pcr, d) in events {
            ev(*pcr, 1, *d, b"x");
        }
        b
    }

    fn replay(fw: Vec<u8>) -> BTreeMap<u8, ([u8; 32], String)> {
        let e = Evidence {
            node: EvidenceNode {
                id: "i".into(),
                name: "n".into(),
            },
            nonce: String::new(),
            tpm: None,
            pcrs: BTreeMap::new(),
            logs: EventLogs {
                firmware: Some(hex::encode(fw)),
                ..Default::default()
            },
            measurement_mode: MEASUREMENT_MODE_IMA.into(),
        };
        let mut run = Run {
            checks: Vec::new(),
            failures: Vec::new(),
            mark: 0,
        };
        let mut logs = Logs::default();
        parse_logs(&e, &mut run, &mut logs);
        assert!(run.failures.is_empty(), "{:?}", run.failures);
        logs.replayed
    }

    #[test]
    fn pcr0_starts_at_the_startup_locality() {
        let d = [9u8; 32];
        let mut start = [0u8; 32];
        start[31] = 3;
        let mut want0 = start;
        extend(&mut want0, &d);
        let mut want7 = [0u8; 32];
        extend(&mut want7, &d);
        let r = replay(firmware_log(Some(3), &[(0, d), (7, d)]));
        assert_eq!(r[&0].0, want0);
        assert_eq!(r[&7].0, want7, "only PCR 0 starts at the locality");
        let r = replay(firmware_log(None, &[(0, d)]));
        assert_eq!(r[&0].0, want7);
    }

    #[test]
    fn every_failure_serializes_with_its_kind() {
        for f in [
            Failure::NoTpm,
            Failure::MalformedEvidence("x".into()),
            Failure::PcrNotQuoted {
                pcr: 1,
                why: "y".into(),
            },
        ] {
            let v = serde_json::to_value(&f).unwrap();
            assert_eq!(v["kind"], f.kind());
            assert_eq!(serde_json::from_value::<Failure>(v).unwrap(), f);
        }
    }

    #[test]
    fn pkcs1v15_prefix_is_the_sha256_digest_info() {
        // RFC 8017, 9.2, note 1.
        let want = "3031300d060960864801650304020105000420";
        assert_eq!(hex::encode(&*pkcs1v15(quote::TPM_ALG_SHA256).prefix), want);
        assert!(hex::encode(&*pkcs1v15(quote::TPM_ALG_SHA512).prefix)
            .starts_with("3051300d0609608648016503040203"));
    }
}
