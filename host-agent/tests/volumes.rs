//! Volumes through the agent, in a real kiln-store daemon that the agent
//! starts: blank, from a disk image, snapshot and clone, resize, delete;
//! the data is read back through kiln-store's own client.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use kiln_store::VolumeIo;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn can_run() -> bool {
    if store_binary().is_file() {
        return true;
    }
    let msg = format!(
        "{} is missing (run `cargo test --workspace`)",
        store_binary().display()
    );
    kiln_tests::skip(msg);
    false
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn volumes_are_made_copied_snapshotted_cloned_resized_and_deleted_in_the_store() {
    if !can_run() {
        return;
    }
    let a = Agent::start("vol");
    let seq = a.last_seq();
    for (what, spec) in [
        ("zero size", json!({"size_bytes": 0})),
        ("unaligned", json!({"size_bytes": 4095})),
        ("too large", json!({"size_bytes": 1u64 << 50})),
        ("negative", json!({"size_bytes": -4096})),
        (
            "missing image",
            json!({"size_bytes": 4096, "source": {"kind": "image", "image": "nope"}}),
        ),
        (
            "missing volume",
            json!({"size_bytes": 4096, "source": {"kind": "snapshot", "volume": "nope", "snapshot": "s"}}),
        ),
    ] {
        let (s, v) = a.call(
            Method::POST,
            "/v1/volumes",
            Some(json!({"name": "bad", "spec": spec})),
        );
        assert_eq!(s, 422, "{what}: {v}");
    }
    assert_eq!(a.last_seq(), seq, "refused requests leave no event");

    // Blank.
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes",
        Some(json!({"name": "blank", "spec": {"size_bytes": 8 * MIB}})),
    );
    assert_eq!(
        (s, v["status"]["state"].as_str()),
        (202, Some("creating")),
        "{v}"
    );
    let v = volume_ready(&a, "blank");
    assert_eq!(
        v["status"]["replicas"],
        json!([{"node": "test-node", "state": "in-sync"}]),
        "{v}"
    );
    assert!(read_volume(&a, "blank", 4096).iter().all(|b| *b == 0));

    // From a disk image: the image's bytes, then zeros.
    let data = pattern(MIB as usize + 4096, 7);
    let img = a.dir.join("disk.img");
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
    let (s, v) = a.call(Method::POST, "/v1/volumes", Some(json!({"name": "small", "spec": {"size_bytes": 4096, "source": {"kind": "image", "image": "disk"}}})));
    assert_eq!(s, 422, "smaller than the image: {v}");
    let (s, v) = a.call(Method::POST, "/v1/volumes", Some(json!({"name": "root", "spec": {"size_bytes": 4 * MIB, "source": {"kind": "image", "image": "disk"}}})));
    assert_eq!(s, 202, "{v}");
    let v = volume_ready(&a, "root");
    assert_eq!(v["status"]["bytes_done"].as_u64(), Some(data.len() as u64));
    let got = read_volume(&a, "root", 2 * MIB as usize);
    assert_eq!(&got[..data.len()], &data[..], "the image's bytes");
    assert!(got[data.len()..].iter().all(|b| *b == 0));

    // Snapshot, overwrite, clone: the clone has the snapshot's data.
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes/root/snapshots",
        Some(json!({"name": "s1"})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"]["snapshots"], json!(["s1"]));
    assert_eq!(
        a.call(
            Method::POST,
            "/v1/volumes/root/snapshots",
            Some(json!({"name": "s1"}))
        )
        .0,
        409
    );
    let c = kiln_store::VolumeClient::open(&a.dir.join("run/store.sock"), "root").unwrap();
    c.write_at(&pattern(4096, 99), 0).unwrap();
    c.flush().unwrap();
    let (s, v) = a.call(Method::POST, "/v1/volumes", Some(json!({"name": "clone", "spec": {"size_bytes": 4 * MIB, "source": {"kind": "snapshot", "volume": "root", "snapshot": "s1"}}})));
    assert_eq!(s, 202, "{v}");
    volume_ready(&a, "clone");
    assert_eq!(read_volume(&a, "clone", 4096), data[..4096].to_vec());
    assert_eq!(read_volume(&a, "root", 4096), pattern(4096, 99));

    // A VM that stops detaches its volumes; changing them still works.
    let mut store = kiln_store::Client::connect(&a.dir.join("run/store.sock")).unwrap();
    for name in ["blank", "root"] {
        store
            .call(&kiln_store::proto::Request::VolDetach { name: name.into() })
            .unwrap();
    }
    // Resize names the generation it read.
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes/blank/resize",
        Some(json!({"generation": 1, "size_bytes": 16 * MIB})),
    );
    assert_eq!(
        (
            s,
            v["generation"].as_u64(),
            v["spec"]["size_bytes"].as_u64()
        ),
        (200, Some(2), Some(16 * MIB)),
        "{v}"
    );
    let (s, _) = a.call(
        Method::POST,
        "/v1/volumes/blank/resize",
        Some(json!({"generation": 1, "size_bytes": 32 * MIB})),
    );
    assert_eq!(s, 409);

    // Deleting: snapshots, then the volumes; the store forgets them.
    assert_eq!(
        a.call(Method::DELETE, "/v1/volumes/root/snapshots/nope", None)
            .0,
        404
    );
    let (s, v) = a.call(Method::DELETE, "/v1/volumes/root/snapshots/s1", None);
    assert_eq!(
        (s, v["status"]["snapshots"].clone()),
        (200, json!([])),
        "{v}"
    );
    for name in ["blank", "root", "clone"] {
        assert_eq!(
            a.call(Method::DELETE, &format!("/v1/volumes/{name}"), None)
                .0,
            200,
            "{name}"
        );
    }
    assert_eq!(a.call(Method::GET, "/v1/volumes", None).1, json!([]));
    // The same through kilnctl, sizes with suffixes.
    let o = a.kilnctl(&["--json", "volume", "create", "cli", "--size", "2M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            v["status"]["state"].as_str(),
            v["spec"]["size_bytes"].as_u64()
        ),
        (Some("ready"), Some(2 * MIB))
    );
    let o = a.kilnctl(&["volume", "create", "bad", "--size", "2Q"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--size: \"2Q\" is not a size"));
    assert!(a
        .kilnctl(&["volume", "snapshot", "cli", "s"])
        .status
        .success());
    let o = a.kilnctl(&[
        "--json", "volume", "create", "cli2", "--size", "2M", "--from", "cli@s",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for n in ["cli2", "cli"] {
        if n == "cli" {
            assert!(a
                .kilnctl(&["volume", "snapshot", "cli", "s", "--delete"])
                .status
                .success());
        }
        let o = a.kilnctl(&["volume", "delete", n]);
        assert!(
            o.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut client = kiln_store::Client::connect(&a.dir.join("run/store.sock")).unwrap();
    match client.call(&kiln_store::proto::Request::VolList).unwrap() {
        kiln_store::proto::Response::Volumes(v) => assert!(v.is_empty(), "{v:?}"),
        other => panic!("{other:?}"),
    }
}

/// The pid of the store daemon serving this agent's data directory.
fn store_pid(a: &Agent) -> Option<u32> {
    let needle = a.dir.join("data/store").display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains("kiln-store") && cmd.contains(" serve ") && cmd.contains(&needle))
            .then_some(pid)
    })
}

#[test]
fn volume_health_is_in_the_metrics_and_a_dead_store_daemon_is_started_again() {
    if !can_run() {
        return;
    }
    let a = Agent::start("volmetrics");
    let (s, v) = a.call(
        Method::POST,
        "/v1/volumes",
        Some(json!({"name": "m1", "spec": {"size_bytes": 2 * MIB}})),
    );
    assert_eq!(s, 202, "{v}");
    volume_ready(&a, "m1");
    let m = a.metrics();
    for line in [
        "kiln_store_up 1",
        "kiln_store_restarts 0",
        "kiln_volumes{state=\"ready\"} 1",
        "kiln_volume_size_bytes{volume=\"m1\"} 2097152",
        "kiln_volume_replica{volume=\"m1\",node=\"test-node\",state=\"in-sync\"} 1",
        "kiln_volume_replica_dirty_regions{volume=\"m1\",node=\"test-node\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "no {line:?} in:\n{m}");
    }

    // The daemon dies: the agent notices, starts it again, says so, and the
    // volume is still there.
    let pid = store_pid(&a).expect("the agent's kiln-store runs");
    let seq = a.last_seq();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let start = std::time::Instant::now();
    loop {
        let m = a.metrics();
        if m.lines().any(|l| l == "kiln_store_restarts 1") && m.contains("kiln_store_up 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the store did not come back:\n{m}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(store_pid(&a), Some(pid));
    let (_, events) = a.call(Method::GET, &format!("/v1/events?since={seq}"), None);
    let actions: Vec<(&str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "node")
        .map(|e| (e["state"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [("store-down", "store"), ("store-up", "store")],
        "{events}"
    );
    // The new daemon has the volume (from its data directory).
    let mut client = kiln_store::Client::connect(&a.dir.join("run/store.sock")).unwrap();
    match client.call(&kiln_store::proto::Request::VolList).unwrap() {
        kiln_store::proto::Response::Volumes(v) => {
            assert_eq!(
                v.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
                ["m1"]
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.call(Method::DELETE, "/v1/volumes/m1", None).0, 200);
}
