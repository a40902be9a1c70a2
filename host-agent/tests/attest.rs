//! Remote attestation against a real TPM: swtpm plus tpm2-tools make the
//! quotes (the TPM's own TPMS_ATTEST and TPMT_SIGNATURE, independent of
//! Kiln's TPM layer), the test writes firmware, IMA and Kiln event logs and
//! extends their digests into the PCRs, and Kiln's verifier must accept the
//! honest evidence and name each kind of tampering.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use kiln_agent::attest::eventlog::{ima_ng_record, ima_template_sha256};
use kiln_agent::attest::{
    verify, EventLogs, Evidence, EvidenceNode, Failure, KilnEvent, KilnLogEntry, ReferencePolicy,
    TpmEvidence, KILN_SOFTWARE_PCR, MEASUREMENT_MODE_IMA, VM_LAUNCH_PCR,
};
use sha2::{Digest, Sha256};

const QUOTED: &str = "sha256:0,7,10,14,15";

mod common;

/// A real swtpm (the tests' shared starter) and a directory for the
/// tpm2-tools files made against it.
struct Swtpm {
    dir: tempfile::TempDir,
    tpm: common::swtpm::Swtpm,
}

impl Swtpm {
    /// `None` when swtpm or tpm2-tools are missing outside CI (skipped).
    fn start() -> Option<Swtpm> {
        let tpm = common::swtpm::Swtpm::start()?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-attest-")
            .tempdir()
            .unwrap();
        Some(Swtpm { dir, tpm })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs a tpm2-tools command in the TPM's directory; panics with its
    /// stderr on failure. swtpm has no resource manager, so transient
    /// objects and sessions left by the previous tool are flushed first.
    fn tool(&self, program: &str, args: &[&str]) -> Output {
        for flush in ["-t", "-s"] {
            self.run("tpm2_flushcontext", &[flush]);
        }
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .current_dir(self.dir.path())
            .env("TPM2TOOLS_TCTI", self.tpm.tcti())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    fn extend(&self, pcr: u8, digest: &[u8; 32]) {
        self.tool(
            "tpm2_pcrextend",
            &[&format!("{pcr}:sha256={}", hex::encode(digest))],
        );
    }

    /// An AK under the EK, as `kiln-agent init` makes one: RSA, restricted,
    /// RSASSA with SHA-256. Returns (TPM2B_PUBLIC hex, PEM).
    fn make_ak(&self, name: &str, scheme: &str) -> (String, String) {
        if !self.path("ek.ctx").exists() {
            self.tool(
                "tpm2_createek",
                &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
            );
        }
        let ctx = format!("{name}.ctx");
        self.tool(
            "tpm2_createak",
            &[
                "-C", "ek.ctx", "-c", &ctx, "-G", "rsa", "-g", "sha256", "-s", scheme,
            ],
        );
        let tss = format!("{name}.tss");
        let pem = format!("{name}.pem");
        self.tool("tpm2_readpublic", &["-c", &ctx, "-f", "tss", "-o", &tss]);
        self.tool("tpm2_readpublic", &["-c", &ctx, "-f", "pem", "-o", &pem]);
        (
            hex::encode(std::fs::read(self.path(&tss)).unwrap()),
            std::fs::read_to_string(self.path(&pem)).unwrap(),
        )
    }

    /// A quote by AK `name` over `QUOTED` with `nonce`, checked with
    /// tpm2_checkquote too; the PCR values come from tpm2_quote's output.
    fn quote(
        &self,
        ak: &str,
        nonce: &[u8],
        public: &(String, String),
    ) -> (TpmEvidence, BTreeMap<u8, String>) {
        let nonce = hex::encode(nonce);
        let scheme = if ak.ends_with("pss") {
            "--scheme=rsapss"
        } else {
            "--scheme=rsassa"
        };
        let out = self.tool(
            "tpm2_quote",
            &[
                "-c",
                &format!("{ak}.ctx"),
                "-q",
                &nonce,
                "-l",
                QUOTED,
                "-m",
                "attest",
                "-s",
                "sig",
                "-o",
                "pcrs.out",
                "-g",
                "sha256",
                scheme,
            ],
        );
        // tpm2-tools 5.4's checkquote verifies RSASSA signatures only.
        if !ak.ends_with("pss") {
            self.tool(
                "tpm2_checkquote",
                &[
                    "-u",
                    &format!("{ak}.tss"),
                    "-m",
                    "attest",
                    "-s",
                    "sig",
                    "-f",
                    "pcrs.out",
                    "-g",
                    "sha256",
                    "-q",
                    &nonce,
                ],
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut pcrs = BTreeMap::new();
        let mut in_pcrs = false;
        for line in text.lines() {
            if line.starts_with("pcrs:") {
                in_pcrs = true;
                continue;
            }
            if in_pcrs {
                if let Some((k, v)) = line.trim().split_once(": 0x") {
                    pcrs.insert(k.trim().parse::<u8>().unwrap(), v.to_ascii_lowercase());
                }
            }
        }
        assert_eq!(pcrs.len(), 5, "PCR values in tpm2_quote's output: {text}");
        let tpm = TpmEvidence {
            attest: hex::encode(std::fs::read(self.path("attest")).unwrap()),
            signature: hex::encode(std::fs::read(self.path("sig")).unwrap()),
            ak_public: public.0.clone(),
            ak_public_pem: public.1.clone(),
        };
        (tpm, pcrs)
    }
}

/// A crypto-agile firmware log: the Spec ID event (SHA-1 format), an
/// EV_NO_ACTION event that must not be replayed, then `events`.
fn firmware_log(events: &[(u32, u32, [u8; 32], &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    let mut spec = b"Spec ID Event03\0".to_vec();
    spec.extend_from_slice(&0u32.to_le_bytes());
    spec.extend_from_slice(&[0, 2, 0, 2]);
    spec.extend_from_slice(&2u32.to_le_bytes());
    spec.extend_from_slice(&0x0004u16.to_le_bytes());
    spec.extend_from_slice(&20u16.to_le_bytes());
    spec.extend_from_slice(&0x000bu16.to_le_bytes());
    spec.extend_from_slice(&32u16.to_le_bytes());
    spec.push(0);
    b.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    b.extend_from_slice(&spec);
    let mut all = vec![(0u32, 3u32, [0x55u8; 32], &b"not extended"[..])];
    all.extend_from_slice(events);
    for (pcr, ty, d, data) in all {
        b.extend_from_slice(&pcr.to_le_bytes());
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&0x0004u16.to_le_bytes());
        b.extend_from_slice(&d[..20]);
        b.extend_from_slice(&0x000bu16.to_le_bytes());
        b.extend_from_slice(&d);
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
    }
    b
}

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Evidence made once with a real TPM, shared by every case.
struct Fixture {
    challenge: Vec<u8>,
    good: Evidence,
    /// The same node's quote over another (older) challenge.
    old: Evidence,
    /// A quote by a second AK of the same TPM.
    other_ak: Evidence,
    /// A quote by an RSASSA-PSS AK.
    pss: Evidence,
    /// After the good quote, /usr/bin/kiln-vmm was replaced and IMA
    /// measured it anew: an honest log of a changed node.
    replaced: Evidence,
    replaced_challenge: Vec<u8>,
}

fn fixture() -> Option<&'static Fixture> {
    static F: OnceLock<Option<Fixture>> = OnceLock::new();
    F.get_or_init(|| Swtpm::start().map(make_fixture)).as_ref()
}

fn make_fixture(tpm: Swtpm) -> Fixture {
    let ak = tpm.make_ak("ak", "rsassa");
    let ak2 = tpm.make_ak("ak2", "rsassa");
    let ak_pss = tpm.make_ak("akpss", "rsapss");

    // Firmware: PCR 0 (CRTM) and PCR 7 (Secure Boot state).
    let fw_events: Vec<(u32, u32, [u8; 32], &[u8])> = vec![
        (0, 0x0000_0008, sha(b"crtm version"), b"crtm version"),
        (0, 0x8000_0008, sha(b"firmware blob"), b"firmware blob"),
        (7, 0x8000_0001, sha(b"SecureBoot=1"), b"SecureBoot"),
    ];
    for (pcr, _, d, _) in &fw_events {
        tpm.extend(*pcr as u8, d);
    }
    let firmware = firmware_log(&fw_events);

    // IMA: what the kernel measured into PCR 10.
    let files = [
        ("boot_aggregate", sha(b"aggregate")),
        ("/usr/bin/kiln-agent", sha(b"kiln-agent v1")),
        ("/usr/bin/kiln-vmm", sha(b"kiln-vmm v1")),
        ("/etc/kiln/kiln.toml", sha(b"[agent]\n")),
    ];
    let mut ima = Vec::new();
    for (path, d) in files {
        let rec = ima_ng_record(10, "sha256", &d, path);
        tpm.extend(10, &ima_template_sha256(&rec).unwrap());
        ima.extend_from_slice(&rec);
    }

    // Kiln: a file it measured itself, and a VM launch.
    let mut kiln = Vec::new();
    for (pcr, event) in [
        (
            KILN_SOFTWARE_PCR,
            KilnEvent::File {
                path: "/etc/kiln/policy.json".into(),
                sha256: hex::encode(sha(b"{}")),
            },
        ),
        (
            VM_LAUNCH_PCR,
            KilnEvent::VmLaunch {
                vm: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
                name: "web".into(),
                kernel: hex::encode(sha(b"vmlinuz")),
                initrd: Some(hex::encode(sha(b"initrd"))),
                cmdline: "console=ttyS0".into(),
                vcpus: 2,
                memory_mib: 512,
                disks: vec![format!("image:sha256:{}", hex::encode(sha(b"disk")))],
            },
        ),
    ] {
        let d = event.digest();
        tpm.extend(pcr, &d);
        kiln.push(KilnLogEntry {
            pcr,
            digest: hex::encode(d),
            event,
        });
    }

    let evidence = |nonce: &[u8], q: (TpmEvidence, BTreeMap<u8, String>), ima: &[u8]| Evidence {
        node: EvidenceNode {
            id: "node-1".into(),
            name: "shop-1".into(),
        },
        nonce: hex::encode(nonce),
        tpm: Some(q.0),
        pcrs: q.1,
        logs: EventLogs {
            firmware: Some(hex::encode(&firmware)),
            ima: Some(hex::encode(ima)),
            kiln: kiln.clone(),
        },
        measurement_mode: MEASUREMENT_MODE_IMA.into(),
    };
    let old_nonce = [0x01u8; 32];
    let old = evidence(&old_nonce, tpm.quote("ak", &old_nonce, &ak), &ima);
    let challenge: Vec<u8> = (0..32u8).collect();
    let good = evidence(&challenge, tpm.quote("ak", &challenge, &ak), &ima);
    let other_ak = evidence(&challenge, tpm.quote("ak2", &challenge, &ak2), &ima);
    let pss = evidence(&challenge, tpm.quote("akpss", &challenge, &ak_pss), &ima);

    let rec = ima_ng_record(10, "sha256", &sha(b"kiln-vmm evil"), "/usr/bin/kiln-vmm");
    tpm.extend(10, &ima_template_sha256(&rec).unwrap());
    ima.extend_from_slice(&rec);
    let replaced_challenge = vec![0xabu8; 32];
    let replaced = evidence(
        &replaced_challenge,
        tpm.quote("ak", &replaced_challenge, &ak),
        &ima,
    );
    Fixture {
        challenge,
        good,
        old,
        other_ak,
        pss,
        replaced,
        replaced_challenge,
    }
}

fn kinds(r: &kiln_agent::attest::Report) -> Vec<&'static str> {
    r.failures.iter().map(|f| f.kind()).collect()
}

fn policy(f: &Fixture) -> ReferencePolicy {
    ReferencePolicy::from_evidence(&f.good).expect("a policy from good evidence")
}

#[test]
fn a_good_quote_verifies_with_and_without_policy() {
    let Some(f) = fixture() else { return };
    let r = verify(&f.good, &f.challenge, None);
    assert!(r.ok(), "{:#?}", r.failures);
    assert_eq!(r.files.len(), 5);
    assert_eq!(r.vm_launches.len(), 1);

    let p = policy(f);
    assert_eq!(p.pcrs.keys().copied().collect::<Vec<_>>(), vec![0, 7]);
    assert_eq!(p.files.len(), 5);
    assert!(!p.allow_insecure_no_tpm);
    // Through its JSON file form.
    let p: ReferencePolicy =
        serde_json::from_str(&serde_json::to_string_pretty(&p).unwrap()).unwrap();
    let r = verify(&f.good, &f.challenge, Some(&p));
    assert!(r.ok(), "{:#?}", r.failures);
    // Evidence through its JSON wire form.
    let wire: Evidence = serde_json::from_str(&serde_json::to_string(&f.good).unwrap()).unwrap();
    // The AK as a bare TPMT_PUBLIC (tss-esapi's Public::marshall) is the same key.
    let mut bare = f.good.clone();
    let t = bare.tpm.as_mut().unwrap();
    t.ak_public.replace_range(0..4, "");
    assert!(verify(&bare, &f.challenge, Some(&p)).ok());
    // The weaker mode must have Kiln's PCR quoted; an unknown mode fails.
    let mut e = f.good.clone();
    e.measurement_mode = kiln_agent::attest::MEASUREMENT_MODE_KILN_SELF.into();
    assert!(verify(&e, &f.challenge, Some(&p)).ok());
    e.measurement_mode = "trust me".into();
    assert_eq!(
        kinds(&verify(&e, &f.challenge, None)),
        ["MalformedEvidence"]
    );
    assert!(verify(&wire, &f.challenge, Some(&p)).ok());
}

#[test]
fn an_rsapss_quote_verifies() {
    let Some(f) = fixture() else { return };
    let r = verify(&f.pss, &f.challenge, None);
    assert!(r.ok(), "{:#?}", r.failures);
    let sig = r.checks.iter().find(|c| c.name == "signature").unwrap();
    assert_eq!(sig.detail, "rsapss/sha256");
}

#[test]
fn a_changed_nonce_field_is_nonce_edited() {
    let Some(f) = fixture() else { return };
    // The old quote, its nonce field rewritten to our challenge.
    let mut e = f.old.clone();
    e.nonce = hex::encode(&f.challenge);
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["NonceEdited"], "{:#?}", r.failures);
    assert!(
        matches!(&r.failures[0], Failure::NonceEdited { field, quoted }
        if *field == hex::encode(&f.challenge) && *quoted == hex::encode([1u8; 32]))
    );
}

#[test]
fn a_quote_over_another_challenge_is_stale() {
    let Some(f) = fixture() else { return };
    let r = verify(&f.old, &f.challenge, None);
    assert_eq!(kinds(&r), ["Stale"], "{:#?}", r.failures);
}

#[test]
fn an_edited_log_fails_replay() {
    let Some(f) = fixture() else { return };
    // An IMA entry's file digest changed (to hide a replaced binary).
    let mut e = f.good.clone();
    let mut ima = hex::decode(e.logs.ima.as_ref().unwrap()).unwrap();
    let rec = ima_ng_record(10, "sha256", &sha(b"kiln-vmm v1"), "/usr/bin/kiln-vmm");
    let at = ima.windows(rec.len()).position(|w| w == rec).unwrap();
    let patched = ima_ng_record(10, "sha256", &sha(b"kiln-vmm v2"), "/usr/bin/kiln-vmm");
    ima.splice(at..at + rec.len(), patched);
    e.logs.ima = Some(hex::encode(ima));
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["LogReplayMismatch"], "{:#?}", r.failures);
    assert!(
        matches!(&r.failures[0], Failure::LogReplayMismatch { pcr: 10, log, quoted, .. }
        if log == "ima" && *quoted == f.good.pcrs[&10])
    );

    // A Kiln VM-launch event edited consistently (digest recomputed).
    let mut e = f.good.clone();
    if let KilnEvent::VmLaunch { memory_mib, .. } = &mut e.logs.kiln[1].event {
        *memory_mib = 4096;
    }
    e.logs.kiln[1].digest = hex::encode(e.logs.kiln[1].event.digest());
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["LogReplayMismatch"], "{:#?}", r.failures);
    assert!(matches!(
        &r.failures[0],
        Failure::LogReplayMismatch { pcr: 15, .. }
    ));

    // The same, digest left alone: the entry contradicts itself.
    let mut e = f.good.clone();
    if let KilnEvent::VmLaunch { memory_mib, .. } = &mut e.logs.kiln[1].event {
        *memory_mib = 4096;
    }
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["EventDigestMismatch"], "{:#?}", r.failures);

    // A dropped log: PCR 10 no longer explained.
    let mut e = f.good.clone();
    e.logs.ima = None;
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["LogReplayMismatch"], "{:#?}", r.failures);

    // A firmware event edited.
    let mut e = f.good.clone();
    let mut fw = hex::decode(e.logs.firmware.as_ref().unwrap()).unwrap();
    let last = fw.len() - 1;
    fw[last - 20] ^= 1; // inside PCR 7's SHA-256 digest
    e.logs.firmware = Some(hex::encode(fw));
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["LogReplayMismatch"], "{:#?}", r.failures);
    assert!(matches!(
        &r.failures[0],
        Failure::LogReplayMismatch { pcr: 7, .. }
    ));
}

#[test]
fn a_changed_pcr_value_breaks_the_quote_digest() {
    let Some(f) = fixture() else { return };
    let mut e = f.good.clone();
    e.pcrs.insert(0, hex::encode([0x42u8; 32]));
    let r = verify(&e, &f.challenge, Some(&policy(f)));
    let k = kinds(&r);
    assert!(k.contains(&"PcrDigestMismatch"), "{:#?}", r.failures);
}

#[test]
fn a_replaced_binary_is_file_changed() {
    let Some(f) = fixture() else { return };
    // Honest evidence of a changed node: everything verifies but the file.
    let r = verify(&f.replaced, &f.replaced_challenge, Some(&policy(f)));
    assert_eq!(kinds(&r), ["FileChanged"], "{:#?}", r.failures);
    assert_eq!(
        r.failures[0],
        Failure::FileChanged {
            pcr: 10,
            path: "/usr/bin/kiln-vmm".into(),
            expected: hex::encode(sha(b"kiln-vmm v1")),
            found: hex::encode(sha(b"kiln-vmm evil")),
        }
    );
    let line = r.failures[0].to_string();
    assert!(
        line.contains("/usr/bin/kiln-vmm") && line.contains("PCR 10"),
        "{line}"
    );

    // A policy that expects another digest; and one missing a file.
    let mut p = policy(f);
    p.files
        .insert("/etc/kiln/policy.json".into(), hex::encode([9u8; 32]));
    p.files.remove("/etc/kiln/kiln.toml");
    let r = verify(&f.good, &f.challenge, Some(&p));
    assert_eq!(
        kinds(&r),
        ["UnknownFile", "FileChanged"],
        "{:#?}",
        r.failures
    );
    assert!(
        matches!(&r.failures[1], Failure::FileChanged { pcr: 14, path, expected, .. }
        if path == "/etc/kiln/policy.json" && *expected == hex::encode([9u8; 32]))
    );

    // Firmware PCRs against the policy.
    let mut p = policy(f);
    p.pcrs.insert(7, hex::encode([7u8; 32]));
    let r = verify(&f.good, &f.challenge, Some(&p));
    assert_eq!(kinds(&r), ["PcrNotExpected"], "{:#?}", r.failures);
}

#[test]
fn another_ak_is_not_trusted() {
    let Some(f) = fixture() else { return };
    // Self-consistent and fresh, but not the node's key.
    assert!(verify(&f.other_ak, &f.challenge, None).ok());
    let r = verify(&f.other_ak, &f.challenge, Some(&policy(f)));
    assert_eq!(kinds(&r), ["AkNotTrusted"], "{:#?}", r.failures);

    // The good quote presented with another AK's public key.
    let mut e = f.good.clone();
    let other = f.other_ak.tpm.clone().unwrap();
    let t = e.tpm.as_mut().unwrap();
    t.ak_public = other.ak_public;
    t.ak_public_pem = other.ak_public_pem;
    let r = verify(&e, &f.challenge, Some(&policy(f)));
    assert_eq!(
        kinds(&r),
        ["AkNotTrusted", "BadSignature"],
        "{:#?}",
        r.failures
    );
}

#[test]
fn a_flipped_signature_byte_is_bad_signature() {
    let Some(f) = fixture() else { return };
    let mut e = f.good.clone();
    let t = e.tpm.as_mut().unwrap();
    let mut sig = hex::decode(&t.signature).unwrap();
    let n = sig.len();
    sig[n - 7] ^= 0x80;
    t.signature = hex::encode(sig);
    let r = verify(&e, &f.challenge, Some(&policy(f)));
    assert_eq!(kinds(&r), ["BadSignature"], "{:#?}", r.failures);

    // A byte of TPMS_ATTEST flipped (its clock): signature no longer holds.
    let mut e = f.good.clone();
    let t = e.tpm.as_mut().unwrap();
    let mut attest = hex::decode(&t.attest).unwrap();
    let at = 2 + 4 + 2 + 34 + 2 + 32 + 3;
    attest[at] ^= 1;
    t.attest = hex::encode(attest);
    assert_eq!(kinds(&verify(&e, &f.challenge, None)), ["BadSignature"]);

    // The signature scheme changed to one the AK does not use.
    let mut e = f.good.clone();
    let t = e.tpm.as_mut().unwrap();
    t.signature.replace_range(0..4, "0016");
    let r = verify(&e, &f.challenge, None);
    assert_eq!(kinds(&r), ["BadSignature"], "{:#?}", r.failures);
}

#[test]
fn no_tpm_fails_unless_the_policy_allows_it() {
    let Some(f) = fixture() else { return };
    let mut e = f.good.clone();
    e.tpm = None;
    assert_eq!(kinds(&verify(&e, &f.challenge, None)), ["NoTpm"]);
    let mut p = policy(f);
    assert_eq!(kinds(&verify(&e, &f.challenge, Some(&p))), ["NoTpm"]);
    assert!(ReferencePolicy::from_evidence(&e).is_err());
    p.allow_insecure_no_tpm = true;
    let r = verify(&e, &f.challenge, Some(&p));
    assert!(r.ok(), "{:#?}", r.failures);
    assert!(r.checks[0].detail.contains("insecure"));
}

#[test]
fn hostile_evidence_is_malformed_not_a_panic() {
    let Some(f) = fixture() else { return };
    let t = f.good.tpm.as_ref().unwrap();
    let attest = hex::decode(&t.attest).unwrap();
    // Every truncation of each structure, and a wrong magic.
    for n in 0..attest.len() {
        let mut e = f.good.clone();
        e.tpm.as_mut().unwrap().attest = hex::encode(&attest[..n]);
        let r = verify(&e, &f.challenge, None);
        assert!(kinds(&r).contains(&"MalformedEvidence"), "cut at {n}");
    }
    let mut e = f.good.clone();
    e.tpm.as_mut().unwrap().attest.replace_range(0..2, "00");
    let r = verify(&e, &f.challenge, None);
    assert!(
        r.failures
            .iter()
            .any(|x| x.to_string().contains("TPM_GENERATED_VALUE")),
        "{:#?}",
        r.failures
    );
    type Field = fn(&mut Evidence) -> &mut String;
    let fields: [Field; 4] = [
        |e| e.logs.ima.as_mut().unwrap(),
        |e| e.logs.firmware.as_mut().unwrap(),
        |e| &mut e.tpm.as_mut().unwrap().ak_public,
        |e| &mut e.tpm.as_mut().unwrap().signature,
    ];
    for field in fields {
        let mut e = f.good.clone();
        let full = field(&mut e).clone();
        for cut in (0..full.len()).step_by(6) {
            *field(&mut e) = full[..cut].to_string();
            assert!(!verify(&e, &f.challenge, None).ok());
        }
        *field(&mut e) = "zz".into();
        assert!(!verify(&e, &f.challenge, None).ok());
    }
}

fn kilnctl() -> &'static str {
    env!("CARGO_BIN_EXE_kilnctl")
}

#[test]
fn kilnctl_offline_verify_names_the_failure() {
    let Some(f) = fixture() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ev = dir.path().join("evidence.json");
    std::fs::write(&ev, serde_json::to_vec_pretty(&f.good).unwrap()).unwrap();
    let pol = dir.path().join("policy.json");
    std::fs::write(&pol, serde_json::to_vec_pretty(&policy(f)).unwrap()).unwrap();
    let run = |nonce: &[u8], extra: &[&Path]| {
        let mut c = Command::new(kilnctl());
        c.args(["attest", "verify", "--evidence"])
            .arg(&ev)
            .args(["--nonce", &hex::encode(nonce)]);
        if let Some(p) = extra.first() {
            c.arg("--policy").arg(p);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, text) = run(&f.challenge, &[&pol]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("signature") && text.contains("pass"),
        "{text}"
    );

    // A replayed quote: our challenge is another one.
    let (code, text) = run(&[0xeeu8; 32], &[&pol]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("Stale"), "{text}");

    // A replaced binary.
    std::fs::write(&ev, serde_json::to_vec_pretty(&f.replaced).unwrap()).unwrap();
    let (code, text) = run(&f.replaced_challenge, &[&pol]);
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("FileChanged") && text.contains("/usr/bin/kiln-vmm"),
        "{text}"
    );

    // JSON output carries the report.
    let out = Command::new(kilnctl())
        .args(["--json", "attest", "verify", "--evidence"])
        .arg(&ev)
        .args(["--nonce", &hex::encode(&f.replaced_challenge), "--policy"])
        .arg(&pol)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["failures"][0]["kind"], "FileChanged");
    assert_eq!(v["failures"][0]["facts"]["path"], "/usr/bin/kiln-vmm");
}
