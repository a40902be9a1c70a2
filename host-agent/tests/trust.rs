//! Trust through a real agent on a real swtpm: an encrypted volume whose
//! data never reaches the store's files in the clear; a quote that verifies
//! with Kiln's verifier, `kilnctl attest` and `tpm2_checkquote`; a replaced
//! agent binary that locks the volumes and names itself; the recovery key,
//! reseal, a reboot, KEK rotation and an online rekey; and no key bytes in
//! the database, the logs or a core dump of the agent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use hyper::Method;
use kiln_agent::attest::{verify, Evidence};
use kiln_agent::trust::secret::Secret;
use kiln_agent::trust::{parse_recovery_key, wrap, KekFile};
use serde_json::json;

const MIB: usize = 1 << 20;
const MARKER: &[u8; 32] = b"KILN-PLAINTEXT-MARKER-0123456789";

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The files under `dir` that hold `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .map(|b| contains(&b, needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The KEK, as the holder of the recovery key can learn it.
fn kek(a: &Agent, recovery: &str) -> Secret<32> {
    let f: KekFile =
        serde_json::from_slice(&std::fs::read(a.data().join("agent/trust/kek.json")).unwrap())
            .unwrap();
    let rk = parse_recovery_key(recovery).unwrap();
    wrap::unwrap(&rk, &f.recovery, "kiln node kek (recovery)").unwrap()
}

/// A volume's DEK, from the database (the agent must be stopped).
fn dek(a: &Agent, kek: &Secret<32>, id: &str) -> Secret<64> {
    let db = kiln_agent::db::Db::open(&a.data().join("agent/state.redb")).unwrap();
    let w = db.volume_key(id).unwrap().expect("a wrapped key");
    wrap::unwrap(kek, &w, &kiln_agent::trust::Trust::volume_purpose(id)).unwrap()
}

fn evidence(a: &Agent, nonce: &[u8]) -> Evidence {
    let (s, v) = a.call(
        Method::GET,
        &format!("/v1/node/attestation?nonce={}", hex::encode(nonce)),
        None,
    );
    assert_eq!(s, 200, "{v}");
    serde_json::from_value(v).unwrap()
}

fn checkquote(dir: &Path, ev: &Evidence, nonce: &[u8]) -> std::process::Output {
    let tpm = ev.tpm.as_ref().unwrap();
    let write = |name: &str, hexdata: &str| {
        let p = dir.join(name);
        std::fs::write(&p, hex::decode(hexdata).unwrap()).unwrap();
        p.display().to_string()
    };
    // tpm2-tools 5.4 hashes a "values" PCR file (-f) only for up to 8
    // PCRs; the quote has 11, so it checks the signature and the nonce, and
    // Kiln's verifier the PCR digest.
    Command::new("tpm2_checkquote")
        .args(["-u", &write("ak.pub", &tpm.ak_public)])
        .args(["-m", &write("quote.msg", &tpm.attest)])
        .args(["-s", &write("quote.sig", &tpm.signature)])
        .args(["-g", "sha256", "-q", &hex::encode(nonce)])
        .output()
        .unwrap()
}

/// A core dump of the running agent (gdb's gcore).
fn gcore(a: &Agent, dir: &Path, name: &str) -> PathBuf {
    let pid = a.child.as_ref().unwrap().id();
    let core = dir.join(name);
    let out = Command::new("gcore")
        .args(["-o", core.to_str().unwrap(), &pid.to_string()])
        .output()
        .unwrap();
    let core = PathBuf::from(format!("{}.{pid}", core.display()));
    assert!(core.is_file(), "gcore: {}", text(&out));
    core
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn volumes_are_encrypted_under_a_sealed_key_that_a_replaced_binary_cannot_unseal() {
    if !store_binary().is_file() {
        kiln_tests::skip(format!("{} is missing", store_binary().display()));
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let exe = work.path().join("kiln-agent");
    std::fs::copy(AGENT, &exe).unwrap();
    let mut a = Agent::start_program("trust", &exe);
    let exe = std::fs::canonicalize(&exe).unwrap();

    let (s, t) = a.call(Method::GET, "/v1/node/trust", None);
    assert_eq!(s, 200, "{t}");
    assert_eq!(
        (t["tpm"].as_bool(), t["locked"].as_bool()),
        (Some(true), Some(false)),
        "{t}"
    );
    assert!(
        t["measurement_mode"]
            .as_str()
            .unwrap()
            .starts_with("kiln-self"),
        "{t}"
    );
    let (_, node) = a.call(Method::GET, "/v1/node", None);
    assert_eq!(node["insecure_no_tpm"], false, "{node}");

    // An encrypted volume from a disk image full of a marker.
    let data: Vec<u8> = MARKER.iter().copied().cycle().take(MIB).collect();
    let img = work.path().join("disk.img");
    std::fs::write(&img, &data).unwrap();
    let (s, v) = a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": "disk", "spec": {"source": {"kind": "disk", "path": img}}})),
    );
    assert_eq!(s, 202, "{v}");
    a.wait_for("/v1/images/disk", "ready", Duration::from_secs(20), |v| {
        v["status"]["state"] == "ready"
    });
    std::fs::remove_file(&img).unwrap();
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes",
        Some(json!({"name": "secret", "spec": {"size_bytes": 2 * MIB, "source": {"kind": "image", "image": "disk"}}})),
    );
    assert_eq!(s, 202, "{v}");
    let vol = volume_ready(&a, "secret");
    let vol_id = vol["id"].as_str().unwrap().to_string();
    assert_eq!(vol["status"]["encrypted"], true, "{vol}");
    let check1 = vol["status"]["key_check"].as_str().unwrap().to_string();
    assert_eq!(
        read_volume(&a, "secret", MIB),
        data,
        "reads back in the clear"
    );
    let store_dir = a.data().join("store");
    assert!(
        files_under(&store_dir)
            .iter()
            .any(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) >= MIB as u64),
        "the store holds the volume's data"
    );
    assert_eq!(
        holding(&store_dir, MARKER),
        Vec::<PathBuf>::new(),
        "plaintext in the store's files"
    );

    // Attestation: Kiln's verifier, tpm2_checkquote, kilnctl.
    let nonce: [u8; 32] = rand::random();
    let ev = evidence(&a, &nonce);
    let report = verify(&ev, &nonce, None);
    assert!(report.ok(), "{:?}", report.failures);
    let out = checkquote(work.path(), &ev, &nonce);
    assert!(out.status.success(), "tpm2_checkquote: {}", text(&out));
    let other: [u8; 32] = rand::random();
    let out = checkquote(work.path(), &ev, &other);
    assert!(
        !out.status.success(),
        "tpm2_checkquote accepted another nonce"
    );
    let policy = work.path().join("policy.json");
    let out = a.kilnctl(&["attest", "policy", "--out", policy.to_str().unwrap()]);
    assert!(out.status.success(), "attest policy: {}", text(&out));
    let out = a.kilnctl(&["attest", "verify", "--policy", policy.to_str().unwrap()]);
    assert!(out.status.success(), "attest verify: {}", text(&out));

    // A core dump of the running agent, searched for keys further down.
    let core = gcore(&a, work.path(), "unsealed");

    // A replaced agent binary: the KEK does not unseal, volumes stay
    // locked, and the reason names the PCR and the file.
    a.kill();
    let kek1 = kek(&a, &a.recovery_key.clone());
    let dek1 = dek(&a, &kek1, &vol_id);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&exe).unwrap();
        f.write_all(b"another build").unwrap();
    }
    a.serve(&exe);
    let (_, t) = a.call(Method::GET, "/v1/node/trust", None);
    assert_eq!(t["locked"], true, "{t}");
    let reason = t["reason"].as_str().unwrap();
    assert!(
        reason.contains("PCR 14") && reason.contains(exe.to_str().unwrap()),
        "{reason}"
    );
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes/secret/snapshots",
        Some(json!({"name": "s1"})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("locked"),
        "{v}"
    );
    let out = a.kilnctl(&["attest", "verify", "--policy", policy.to_str().unwrap()]);
    assert!(!out.status.success(), "a replaced binary verified");
    assert!(text(&out).contains(exe.to_str().unwrap()), "{}", text(&out));

    // The recovery key unlocks; reseal makes the next start unlock alone.
    let (s, v) = a.call(
        Method::POST,
        "/v1/node/unlock",
        Some(json!({"recovery_key": "00".repeat(32)})),
    );
    assert_eq!(s, 422, "a wrong recovery key: {v}");
    let rk_file = work.path().join("recovery");
    std::fs::write(&rk_file, &a.recovery_key).unwrap();
    let out = a.kilnctl(&[
        "trust",
        "unlock",
        "--recovery-key-file",
        rk_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "unlock: {}", text(&out));
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes/secret/snapshots",
        Some(json!({"name": "s1"})),
    );
    assert_eq!(s, 201, "{v}");
    let out = a.kilnctl(&["trust", "reseal"]);
    assert!(out.status.success(), "reseal: {}", text(&out));
    a.kill();
    a.serve(&exe);
    let (_, t) = a.call(Method::GET, "/v1/node/trust", None);
    assert_eq!(t["locked"], false, "after reseal: {t}");

    // A reboot (PCRs reset, measured again from zero) still unseals.
    a.kill();
    a.tpm.as_mut().unwrap().reboot();
    a.serve(&exe);
    let (_, t) = a.call(Method::GET, "/v1/node/trust", None);
    assert_eq!(t["locked"], false, "after a reboot: {t}");

    // Another update, resealed offline: `kiln-agent reseal` with the agent
    // stopped takes the recovery key (the KEK no longer unseals) and seals
    // to the new binary; the next start unlocks by itself.
    a.kill();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&exe).unwrap();
        f.write_all(b"yet another build").unwrap();
    }
    let tcti = a.tpm.as_ref().unwrap().tcti();
    let out = Command::new(&exe)
        .args(Agent::dir_args(&a.dir))
        .args(["reseal", "--tpm", &tcti])
        .arg("--recovery-key-file")
        .arg(&rk_file)
        .arg("--vmm")
        .arg(vmm_binary())
        .arg("--store")
        .arg(store_binary())
        .output()
        .unwrap();
    assert!(out.status.success(), "kiln-agent reseal: {}", text(&out));
    assert!(
        text(&out).contains("is sealed to this node's measurements"),
        "{}",
        text(&out)
    );
    a.serve(&exe);
    let (_, t) = a.call(Method::GET, "/v1/node/trust", None);
    assert_eq!(t["locked"], false, "after an offline reseal: {t}");

    // A new KEK re-wraps the volume's key; a new recovery key replaces the old.
    let out = a.kilnctl(&["trust", "rotate-kek"]);
    assert!(out.status.success(), "rotate-kek: {}", text(&out));
    let new_rk = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    assert_ne!(new_rk, a.recovery_key);
    let (s, v) = a.call(Method::DELETE, "/v1/volumes/secret/snapshots/s1", None);
    assert_eq!(s, 200, "the volume attaches under the new KEK: {v}");

    // Online rekey: a new DEK, the same data.
    let out = a.kilnctl(&["volume", "rekey", "secret"]);
    assert!(out.status.success(), "rekey: {}", text(&out));
    let (_, v) = a.call(Method::GET, "/v1/volumes/secret", None);
    let check2 = v["status"]["key_check"].as_str().unwrap().to_string();
    assert_ne!(check1, check2, "{v}");
    assert_eq!(
        read_volume(&a, "secret", MIB),
        data,
        "the data after the rekey"
    );
    assert_eq!(holding(&store_dir, MARKER), Vec::<PathBuf>::new());

    // Another after a reseal, a KEK rotation and a rekey in this agent.
    let core2 = gcore(&a, work.path(), "rotated");

    // No key bytes in the database, the logs, or the core dumps.
    a.kill();
    let kek2 = kek(&a, &new_rk);
    assert!(
        std::panic::catch_unwind(|| kek(&a, &a.recovery_key.clone())).is_err(),
        "the old recovery key still unwraps the KEK"
    );
    let dek2 = dek(&a, &kek2, &vol_id);
    let mut places: Vec<PathBuf> = vec![a.data().join("agent/state.redb"), core, core2];
    places.extend(
        files_under(&a.dir.join("run"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log")),
    );
    places.push(a.dir.join("agent.log"));
    for (name, key) in [
        ("KEK 1", kek1.expose().to_vec()),
        ("KEK 2", kek2.expose().to_vec()),
        ("DEK 1", dek1.expose().to_vec()),
        ("DEK 2", dek2.expose().to_vec()),
    ] {
        for p in &places {
            let bytes = std::fs::read(p).unwrap_or_default();
            assert!(
                !contains(&bytes, &key[..16]),
                "{name} is in {}",
                p.display()
            );
            assert!(
                !contains(&bytes, hex::encode(&key[..16]).as_bytes()),
                "{name} (hex) is in {}",
                p.display()
            );
        }
    }
}

#[test]
fn a_node_without_a_tpm_says_so_everywhere() {
    let a = Agent::start_insecure("notpm");
    let (_, t) = a.call(Method::GET, "/v1/node/trust", None);
    assert_eq!(
        (t["tpm"].as_bool(), t["insecure_no_tpm"].as_bool()),
        (Some(false), Some(true)),
        "{t}"
    );
    let (_, n) = a.call(Method::GET, "/v1/node", None);
    assert_eq!(n["insecure_no_tpm"], true, "{n}");
    let nonce = [7u8; 16];
    let ev = evidence(&a, &nonce);
    assert!(ev.tpm.is_none());
    let report = verify(&ev, &nonce, None);
    assert!(
        report.failures.iter().any(|f| f.kind() == "NoTpm"),
        "{:?}",
        report.failures
    );
    let out = a.kilnctl(&["trust", "status"]);
    assert!(text(&out).contains("--insecure-no-tpm"), "{}", text(&out));
    // init refuses clearly without a TPM and without the flag.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(AGENT)
        .args(Agent::dir_args(dir.path()))
        .args(["init", "--tpm", "device:/dev/kiln-no-such-tpm"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--insecure-no-tpm") && err.contains("no usable TPM"),
        "{err}"
    );
    assert!(
        !dir.path().join("data/agent").exists() || files_under(&dir.path().join("data")).is_empty(),
        "a refused init left files"
    );
}

#[test]
fn the_image_policy_refuses_or_records_unapproved_images() {
    let a = Agent::start("policy");
    let (_, p) = a.call(Method::GET, "/v1/policies/images", None);
    assert_eq!(p["spec"]["mode"], "audit", "{p}");
    let work = tempfile::tempdir().unwrap();
    let kernel = work.path().join("vmlinux");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let (s, v) = a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": "k", "spec": {"source": {"kind": "kernel", "kernel": kernel}}})),
    );
    assert_eq!(s, 202, "{v}");
    let img = a.wait_for("/v1/images/k", "ready", Duration::from_secs(20), |v| {
        v["status"]["state"] == "ready"
    });
    let digest = img["status"]["files"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = a.call(
        Method::POST,
        "/v1/vms",
        Some(
            json!({"name": "vm1", "spec": {"vcpus": 1, "memory_mib": 64, "boot": {"image": "k"}}}),
        ),
    );
    assert!(s == 201 || s == 202, "{v}");

    // Enforce: the VM does not start, and its state says which image.
    let out = a.kilnctl(&["policy", "enforce"]);
    assert!(out.status.success(), "{}", text(&out));
    let seq = a.last_seq();
    let (s, v) = a.call(Method::POST, "/v1/vms/vm1/start", None);
    let vm = a.wait_for("/v1/vms/vm1", "failed", Duration::from_secs(20), |v| {
        v["status"]["state"] == "failed"
    });
    let reason = vm["status"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("image policy") && reason.contains(&digest),
        "start answered {s} {v}; reason {reason}"
    );
    let (_, events) = a.call(Method::GET, &format!("/v1/events?since={seq}"), None);
    assert!(events.to_string().contains("image policy"), "{events}");

    // Audit: it starts (here kiln-vmm then fails on the fake kernel), and
    // an event records the violation.
    let out = a.kilnctl(&["policy", "audit"]);
    assert!(out.status.success(), "{}", text(&out));
    let seq = a.last_seq();
    a.call(Method::POST, "/v1/vms/vm1/start", None);
    let found = a.wait_for(
        &format!("/v1/events?since={seq}"),
        "a violation",
        Duration::from_secs(20),
        |e| {
            e.as_array().into_iter().flatten().any(|e| {
                e["action"] == "policy-violation"
                    && e["message"].as_str().unwrap_or("").contains(&digest)
            })
        },
    );
    assert!(found.is_array());

    // Approved: no violation; policy changes are events.
    let out = a.kilnctl(&["policy", "approve", "k"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&digest), "{}", text(&out));
    let (_, p) = a.call(Method::GET, "/v1/policies/images", None);
    assert_eq!(p["spec"]["approved"][0]["sha256"], digest.as_str(), "{p}");
    let (_, events) = a.call(Method::GET, "/v1/events?since=0", None);
    let updates = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "policy" && e["action"] == "updated")
        .count();
    assert_eq!(updates, 3, "{events}");
    // Only admins change it: a reader token is refused.
    let (s, v) = a.call(
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "ro", "spec": {"role": "reader"}})),
    );
    assert_eq!(s, 201, "{v}");
    let ro = v["token"].as_str().unwrap().to_string();
    let (s, _) = a.tls(
        Some(&ro),
        Method::PUT,
        "/v1/policies/images",
        Some(json!({"spec": {"mode": "audit"}})),
    );
    assert_eq!(s, 403);
    let (s, _) = a.call(
        Method::PUT,
        "/v1/policies/images",
        Some(json!({"spec": {"mode": "enforce", "approved": [{"sha256": "xyz"}]}})),
    );
    assert_eq!(s, 422, "a bad digest");
}
