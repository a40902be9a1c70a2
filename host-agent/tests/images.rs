//! Images uploaded over the API, against a real agent: files arrive with
//! `PUT /v1/images/{image}/files/{role}`, are checked against the sizes
//! (and hashes) declared, deduplicated, and a refused or broken upload
//! keeps nothing; `kilnctl image import --upload` over TLS; a VM boots
//! from an uploaded kernel.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use hyper::Method;
use kiln_agent::client::Endpoint;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn put(a: &Agent, path: &str, data: &[u8]) -> (u16, Value) {
    a.raw(
        &Endpoint::Unix(a.socket()),
        Method::PUT,
        path,
        &[],
        Some(data.to_vec()),
    )
    .unwrap()
}

fn create_upload(a: &Agent, name: &str, files: Value) -> (u16, Value) {
    a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": name, "spec": {"source": {"kind": "upload", "files": files, "cmdline": "console=ttyS0"}}})),
    )
}

fn tmp_files(a: &Agent) -> Vec<String> {
    std::fs::read_dir(a.data().join("images/tmp"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_uploaded_image_is_ready_when_its_files_have_arrived_and_shares_blobs() {
    let a = Agent::start("upload");
    let kernel = vec![0x5au8; 300_000];
    let initrd: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let (s, v) = create_upload(
        &a,
        "up1",
        json!([{"role": "kernel", "size": kernel.len()}, {"role": "initrd", "size": initrd.len()}]),
    );
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"]["state"], "importing");
    assert_eq!(
        v["status"]["bytes_total"],
        (kernel.len() + initrd.len()) as u64
    );

    let (s, v) = put(&a, "/v1/images/up1/files/kernel", &kernel);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"]["state"], "importing", "the initrd is missing");
    assert_eq!(v["status"]["bytes_done"], kernel.len() as u64);
    // The same file twice: refused.
    assert_eq!(put(&a, "/v1/images/up1/files/kernel", &kernel).0, 409);

    // A hash that does not match is refused and nothing is kept.
    let wrong = "0".repeat(64);
    let (s, v) = put(
        &a,
        &format!("/v1/images/up1/files/initrd?sha256={wrong}"),
        &initrd,
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("SHA-256"));
    assert!(tmp_files(&a).is_empty(), "left {:?}", tmp_files(&a));

    let digest = hex::encode(Sha256::digest(&initrd));
    let (s, v) = put(
        &a,
        &format!("/v1/images/up1/files/initrd?sha256={digest}"),
        &initrd,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"]["state"], "ready", "{v}");
    let files = v["status"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    let blob = a.data().join(format!("images/sha256/{digest}"));
    assert_eq!(std::fs::read(&blob).unwrap(), initrd);
    assert_eq!(
        std::fs::metadata(&blob).unwrap().permissions().mode() & 0o777,
        0o600,
        "blobs are root's only"
    );

    // A second image with the same disk content shares the blob.
    let (s, _) = create_upload(&a, "up2", json!([{"role": "disk", "size": kernel.len()}]));
    assert_eq!(s, 202);
    let (s, v) = put(&a, "/v1/images/up2/files/disk", &kernel);
    assert_eq!((s, v["status"]["state"].as_str()), (200, Some("ready")));
    let blobs = std::fs::read_dir(a.data().join("images/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 2, "the kernel's and the disk's content is one blob");

    // Deleting one keeps the shared blob; deleting both removes it.
    let kdigest = hex::encode(Sha256::digest(&kernel));
    assert_eq!(a.call(Method::DELETE, "/v1/images/up1", None).0, 200);
    assert!(a.data().join(format!("images/sha256/{kdigest}")).exists());
    assert!(!blob.exists(), "the initrd's blob had no other user");
    assert_eq!(a.call(Method::DELETE, "/v1/images/up2", None).0, 200);
    assert!(!a.data().join(format!("images/sha256/{kdigest}")).exists());
}

#[test]
fn bad_uploads_are_refused_and_keep_nothing() {
    let a = Agent::start("badup");
    let seq = a.last_seq();
    // Declarations that cannot be right: no image is made.
    for files in [
        json!([]),
        json!([{"role": "kernel", "size": 10}, {"role": "kernel", "size": 10}]),
        json!([{"role": "kernel", "size": 10}, {"role": "disk", "size": 10}]),
        json!([{"role": "initrd", "size": 10}]),
        json!([{"role": "disk", "size": 0}]),
        json!([{"role": "disk", "size": 1u64 << 41}]),
    ] {
        let (s, v) = create_upload(&a, "bad", files.clone());
        assert_eq!(s, 422, "{files}: {v}");
        assert_eq!(v["error"]["code"], "invalid");
    }
    assert_eq!(a.call(Method::GET, "/v1/images/bad", None).0, 404);
    assert_eq!(a.last_seq(), seq, "refused requests leave no event");

    let (s, _) = create_upload(&a, "img", json!([{"role": "disk", "size": 1000}]));
    assert_eq!(s, 202);
    // Too short, too long: refused, the image waits for a good upload.
    let (s, v) = put(&a, "/v1/images/img/files/disk", &[1u8; 999]);
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("999"));
    let (s, v) = put(&a, "/v1/images/img/files/disk", &[1u8; 1001]);
    assert_eq!(s, 413, "{v}");
    let (_, v) = a.call(Method::GET, "/v1/images/img", None);
    assert_eq!(v["status"]["state"], "importing");
    assert_eq!(v["status"]["files"], json!([]));
    assert!(v["status"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("upload of the disk file failed")));
    assert!(tmp_files(&a).is_empty(), "left {:?}", tmp_files(&a));
    // Roles the image does not have, or that do not exist; bad hashes.
    assert_eq!(put(&a, "/v1/images/img/files/kernel", &[0u8; 4]).0, 422);
    assert_eq!(put(&a, "/v1/images/img/files/rootfs", &[0u8; 4]).0, 404);
    assert_eq!(
        put(&a, "/v1/images/img/files/disk?sha256=xyz", &[0u8; 4]).0,
        400
    );
    assert_eq!(put(&a, "/v1/images/nosuch/files/disk", &[0u8; 4]).0, 404);
    // An image imported from a path takes no upload.
    let f = a.dir.join("k.bin");
    std::fs::write(&f, b"kernel").unwrap();
    let (s, _) = a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": "frompath", "spec": {"source": {"kind": "kernel", "kernel": f}}})),
    );
    assert_eq!(s, 202);
    assert_eq!(
        put(&a, "/v1/images/frompath/files/kernel", b"kernel").0,
        409
    );
    // A good upload after the failures still works.
    let (s, v) = put(&a, "/v1/images/img/files/disk", &[7u8; 1000]);
    assert_eq!((s, v["status"]["state"].as_str()), (200, Some("ready")));
    assert!(v["status"]["reason"].is_null());
}

#[test]
fn kilnctl_uploads_over_tls_and_a_vm_boots_the_uploaded_kernel() {
    let a = Agent::start("ctlup");
    let kernel = a.dir.join("guest.elf");
    std::fs::write(
        &kernel,
        kiln_tests::tiny::print_then_halt(b"KILN-UPLOADED-KERNEL\n"),
    )
    .unwrap();
    let out = std::process::Command::new(KILNCTL)
        .args(["--host", &format!("https://127.0.0.1:{}", a.port)])
        .args([
            "--ca",
            a.ca().to_str().unwrap(),
            "--token",
            &a.token,
            "--json",
        ])
        .args([
            "image",
            "import",
            "tiny",
            "--kernel",
            kernel.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["state"], "ready", "{v}");
    assert_eq!(v["spec"]["source"]["kind"], "upload");
    assert_eq!(
        v["status"]["files"][0]["sha256"],
        hex::encode(Sha256::digest(std::fs::read(&kernel).unwrap()))
    );
    // A file that is not there: a clear error, and no image left.
    let out = a.kilnctl(&[
        "image",
        "import",
        "gone",
        "--upload",
        "--kernel",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
    assert_eq!(a.call(Method::GET, "/v1/images/gone", None).0, 404);

    if kiln_tests::tiny::local_kvm().is_err() || !vmm_binary().is_file() {
        kiln_tests::skip("the VM part (no KVM or no kiln-vmm)");
        return;
    }
    let spec = json!({"vcpus": 1, "memory_mib": 64, "boot": {"image": "tiny"}});
    let (s, v) = a.call(
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "vm1", "spec": spec})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(a.call(Method::POST, "/v1/vms/vm1/start", None).0, 202);
    let start = std::time::Instant::now();
    loop {
        let (s, body) = a
            .raw(
                &Endpoint::Unix(a.socket()),
                Method::GET,
                "/v1/vms/vm1/console",
                &[],
                None,
            )
            .unwrap();
        if s == 200
            && body
                .as_str()
                .is_some_and(|c| c.contains("KILN-UPLOADED-KERNEL"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no marker: {body}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(a.call(Method::POST, "/v1/vms/vm1/power-off", None).0, 202);
    a.wait_for("/v1/vms/vm1", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
    // In use: the image cannot go; after the VM, it can.
    assert_eq!(a.call(Method::DELETE, "/v1/images/tiny", None).0, 409);
    assert_eq!(a.call(Method::DELETE, "/v1/vms/vm1", None).0, 200);
    assert_eq!(a.call(Method::DELETE, "/v1/images/tiny", None).0, 200);
}
