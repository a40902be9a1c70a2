//! The agent's API against a real kiln-agent process: authentication,
//! validation that leaves nothing behind, conflicts and generations,
//! events, the OpenAPI document, images and networks.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

#[test]
fn every_tcp_request_needs_a_valid_token_and_refusals_reveal_nothing() {
    let a = Agent::start("auth");
    let admin = a.token.clone();
    let unauthorized =
        json!({"error": {"code": "unauthorized", "message": "authentication required"}});
    let id = admin.split('.').nth(1).unwrap();
    let wrong_secret = format!("kiln.{id}.{}", "0".repeat(64));
    for (what, token) in [
        ("no token", None),
        ("a wrong secret", Some(wrong_secret.as_str())),
        ("a malformed token", Some("kiln.x.y")),
        ("garbage", Some("Bearer")),
    ] {
        for path in [
            "/v1/vms",
            "/v1/node",
            "/metrics",
            "/v1/openapi.json",
            "/v1/nothing-here",
        ] {
            let (s, body) = a.tls(token, Method::GET, path, None);
            assert_eq!((s, &body), (401, &unauthorized), "{what} on {path}");
        }
        let (s, _) = a.tls(
            token,
            Method::POST,
            "/v1/networks",
            Some(json!({"name": "x"})),
        );
        assert_eq!(s, 401, "{what}");
    }
    // The admin token works over TLS; the root-only unix socket needs none.
    assert_eq!(a.tls(Some(&admin), Method::GET, "/v1/vms", None).0, 200);
    assert_eq!(a.call(Method::GET, "/v1/vms", None).0, 200);

    // A reader reads and may not write.
    let (s, t) = a.tls(
        Some(&admin),
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "ro", "spec": {"role": "reader"}})),
    );
    assert_eq!(s, 201, "{t}");
    let reader = t["token"].as_str().unwrap().to_string();
    assert!(t.get("secret_sha256").is_none());
    assert_eq!(a.tls(Some(&reader), Method::GET, "/v1/images", None).0, 200);
    let (s, body) = a.tls(
        Some(&reader),
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "evil"})),
    );
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );

    // Listing tokens never shows a value or hash.
    let (_, list) = a.tls(Some(&admin), Method::GET, "/v1/tokens", None);
    let text = list.to_string();
    assert!(
        !text.contains(reader.rsplit('.').next().unwrap()) && !text.contains("sha256"),
        "{text}"
    );

    // A revoked token stops working at once.
    assert_eq!(
        a.tls(Some(&admin), Method::DELETE, "/v1/tokens/ro", None).0,
        200
    );
    assert_eq!(a.tls(Some(&reader), Method::GET, "/v1/images", None).0, 401);

    // The token is stored only as a hash: its secret is nowhere on disk.
    let secret = admin.rsplit('.').next().unwrap();
    let db = std::fs::read(a.data().join("agent/state.redb")).unwrap();
    assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()));

    // Plain HTTP on the TLS port gets no answer.
    let plain = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://127.0.0.1:{}/v1/vms", a.port))
        .output();
    if let Ok(o) = plain {
        assert_ne!(String::from_utf8_lossy(&o.stdout), "200");
    }
}

#[test]
fn bad_input_is_refused_with_its_error_and_leaves_nothing_behind() {
    let a = Agent::start("badinput");
    let before = a.last_seq();
    let kernel = a.dir.join("k.bin");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let k = kernel.display().to_string();
    let huge =
        json!({"name": "x", "spec": {"source": {"kind": "disk", "path": "a".repeat(2 << 20)}}});
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "bad image name",
            "/v1/images",
            json!({"name": "Bad Name", "spec": {"source": {"kind": "kernel", "kernel": k}}}),
            422,
            "invalid",
        ),
        (
            "relative path",
            "/v1/images",
            json!({"name": "i1", "spec": {"source": {"kind": "kernel", "kernel": "k.bin"}}}),
            422,
            "invalid",
        ),
        (
            "missing file",
            "/v1/images",
            json!({"name": "i1", "spec": {"source": {"kind": "disk", "path": "/nonexistent/disk.img"}}}),
            422,
            "invalid",
        ),
        (
            "a directory",
            "/v1/images",
            json!({"name": "i1", "spec": {"source": {"kind": "disk", "path": "/tmp"}}}),
            422,
            "invalid",
        ),
        (
            "unknown field",
            "/v1/images",
            json!({"name": "i1", "spec": {"source": {"kind": "disk", "path": k}}, "extra": 1}),
            422,
            "invalid",
        ),
        (
            "unknown kind",
            "/v1/images",
            json!({"name": "i1", "spec": {"source": {"kind": "iso", "path": k}}}),
            422,
            "invalid",
        ),
        (
            "oversized body",
            "/v1/images",
            huge,
            413,
            "payload_too_large",
        ),
        (
            "bad network name",
            "/v1/networks",
            json!({"name": "-x"}),
            422,
            "invalid",
        ),
        (
            "long bridge",
            "/v1/networks",
            json!({"name": "abcdefghijklmnop"}),
            422,
            "invalid",
        ),
        (
            "bad address",
            "/v1/networks",
            json!({"name": "n1", "spec": {"address": "10.0.0.1/99"}}),
            422,
            "invalid",
        ),
        (
            "vlan without uplink",
            "/v1/networks",
            json!({"name": "n1", "spec": {"vlan": 5}}),
            422,
            "invalid",
        ),
        (
            "vlan out of range",
            "/v1/networks",
            json!({"name": "n1", "spec": {"vlan": 5000, "uplink": "lo"}}),
            422,
            "invalid",
        ),
        (
            "missing uplink",
            "/v1/networks",
            json!({"name": "n1", "spec": {"uplink": "nosuchif0"}}),
            409,
            "conflict",
        ),
        (
            "negative memory",
            "/v1/vms",
            json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": -5, "boot": {"image": "k"}}}),
            422,
            "invalid",
        ),
        (
            "huge memory",
            "/v1/vms",
            json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": 1u64 << 40, "boot": {"image": "k"}}}),
            422,
            "invalid",
        ),
        (
            "zero vcpus",
            "/v1/vms",
            json!({"name": "v1", "spec": {"vcpus": 0, "memory_mib": 64, "boot": {"image": "k"}}}),
            422,
            "invalid",
        ),
        (
            "unknown image",
            "/v1/vms",
            json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": 64, "boot": {"image": "nope"}}}),
            422,
            "invalid",
        ),
        (
            "bad mac",
            "/v1/vms",
            json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": 64, "boot": {"image": "k"}, "nics": [{"network": "n", "mac": "ff:ff:ff:ff:ff:ff"}]}}),
            422,
            "invalid",
        ),
        (
            "short token name",
            "/v1/tokens",
            json!({"name": ""}),
            422,
            "invalid",
        ),
    ];
    for (what, path, body, status, code) in cases {
        let (s, v) = a.call(Method::POST, path, Some(body));
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    // Malformed JSON and a missing content type.
    let ep = kiln_agent::client::Endpoint::Unix(a.socket());
    let (s, v) = a
        .raw(
            &ep,
            Method::POST,
            "/v1/networks",
            &[],
            Some(b"{\"name\": ".to_vec()),
        )
        .unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")));
    // Unknown ids and endpoints, wrong methods.
    for (m, path, status) in [
        (Method::GET, "/v1/vms/nope", 404),
        (Method::DELETE, "/v1/images/nope", 404),
        (Method::POST, "/v1/vms/nope/start", 404),
        (Method::GET, "/v1/nothing", 404),
        (Method::PATCH, "/v1/vms", 405),
        (Method::GET, "/v1/events?since=-1", 400),
    ] {
        let (s, v) = a.call(m.clone(), path, None);
        assert_eq!(s, status, "{m} {path}: {v}");
        assert!(v["error"]["code"].is_string(), "{m} {path}: {v}");
    }
    // An error may come before the body was read: the connection closes,
    // and the response says so.
    let resp =
        a.rt.block_on(kiln_agent::client::send(
            &ep,
            Method::PATCH,
            "/v1/vms",
            &[],
            Some(b"{}".to_vec()),
            Duration::from_secs(5),
        ))
        .unwrap();
    assert_eq!(
        resp.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    // Nothing was created, no event was recorded, no file or bridge made.
    for kind in ["images", "networks", "vms"] {
        assert_eq!(
            a.call(Method::GET, &format!("/v1/{kind}"), None).1,
            json!([]),
            "{kind}"
        );
    }
    assert_eq!(a.last_seq(), before);
    let blobs = a.data().join("images/sha256");
    assert!(!blobs.exists() || std::fs::read_dir(&blobs).unwrap().count() == 0);
    assert!(!std::path::Path::new("/sys/class/net/kb-n1").exists());
}

fn kernel_image(a: &Agent, name: &str, content: &[u8]) -> Value {
    let path = a.dir.join(format!("{name}.elf"));
    std::fs::write(&path, content).unwrap();
    let (s, v) = a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": name, "spec": {"source": {"kind": "kernel", "kernel": path, "cmdline": "console=ttyS0"}}})),
    );
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"]["state"], "importing");
    a.wait_for(
        &format!("/v1/images/{name}"),
        "ready",
        Duration::from_secs(20),
        |v| v["status"]["state"] == "ready",
    )
}

#[test]
fn conflicts_and_generations() {
    let a = Agent::start("conflict");
    kernel_image(&a, "k", b"kernel bytes");
    let spec = json!({"vcpus": 1, "memory_mib": 64, "boot": {"image": "k"}});
    let (s, vm) = a.call(
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "v", "spec": spec})),
    );
    assert_eq!(s, 201, "{vm}");
    assert_eq!(
        (vm["generation"].as_u64(), vm["status"]["state"].as_str()),
        (Some(1), Some("stopped"))
    );
    let (s, _) = a.call(
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "v", "spec": spec})),
    );
    assert_eq!(s, 409);
    let (s, _) = a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": "k", "spec": {"source": {"kind": "disk", "path": "/etc/hostname"}}})),
    );
    assert_eq!(s, 409);

    // Updates name the generation they read.
    let spec2 = json!({"vcpus": 2, "memory_mib": 128, "boot": {"image": "k"}});
    let (s, v) = a.call(Method::PUT, "/v1/vms/v", Some(json!({"spec": spec2})));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (428, Some("precondition_required"))
    );
    let (s, v) = a.call(
        Method::PUT,
        "/v1/vms/v",
        Some(json!({"generation": 1, "spec": spec2})),
    );
    assert_eq!(
        (s, v["generation"].as_u64(), v["spec"]["vcpus"].as_u64()),
        (200, Some(2), Some(2)),
        "{v}"
    );
    let (s, v) = a.call(
        Method::PUT,
        "/v1/vms/v",
        Some(json!({"generation": 1, "spec": spec})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("stale"),
        "{v}"
    );
    assert_eq!(a.call(Method::GET, "/v1/vms/v", None).1["spec"]["vcpus"], 2);
    let ep = kiln_agent::client::Endpoint::Unix(a.socket());
    let (s, _) = a
        .raw(
            &ep,
            Method::DELETE,
            "/v1/vms/v",
            &[("if-match", "\"1\"".into())],
            None,
        )
        .unwrap();
    assert_eq!(s, 409);

    // An image in use cannot go; wrong-state operations are refused.
    let (s, v) = a.call(Method::DELETE, "/v1/images/k", None);
    assert_eq!(s, 409, "{v}");
    for op in ["pause", "resume", "shutdown", "power-off", "restart"] {
        let (s, v) = a.call(Method::POST, &format!("/v1/vms/v/{op}"), None);
        assert_eq!(s, 409, "{op}: {v}");
    }
    let (s, _) = a
        .raw(
            &ep,
            Method::DELETE,
            "/v1/vms/v",
            &[("if-match", "\"2\"".into())],
            None,
        )
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(a.call(Method::DELETE, "/v1/images/k", None).0, 200);

    // kilnctl's exit codes say what went wrong.
    let o = a.kilnctl(&["vm", "show", "nope"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("kilnctl: error: no vm named"));
    let o = a.kilnctl(&["token", "create", "admin"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = a.kilnctl(&["vm", "create", "x"]);
    assert_eq!(o.status.code(), Some(1));
    let o = a.kilnctl(&["vm", "frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn images_are_content_addressed_and_deduplicated() {
    let a = Agent::start("images");
    let one = kernel_image(&a, "one", b"the same kernel");
    let two = kernel_image(&a, "two", b"the same kernel");
    let digest = one["status"]["files"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(two["status"]["files"][0]["sha256"], digest.as_str());
    // sha256("the same kernel")
    assert_eq!(digest, kiln_agent_sha256(b"the same kernel"));
    let blobs = a.data().join("images/sha256");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 1);
    assert_eq!(
        std::fs::read(blobs.join(&digest)).unwrap(),
        b"the same kernel"
    );
    assert_eq!(a.call(Method::DELETE, "/v1/images/one", None).0, 200);
    assert!(blobs.join(&digest).exists(), "still used by image two");
    assert_eq!(a.call(Method::DELETE, "/v1/images/two", None).0, 200);
    assert!(!blobs.join(&digest).exists());
    // kilnctl imports with a path relative to where it runs.
    let o = a.kilnctl(&["--json", "image", "import", "d", "--disk", "/etc/hostname"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"]["state"], "ready");
}

fn kiln_agent_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn networks_are_bridges_that_go_with_them() {
    let a = Agent::start("net");
    let name = unique("t");
    let bridge = format!("kb-{name}");
    let (s, v) = a.call(
        Method::POST,
        "/v1/networks",
        Some(json!({"name": name, "spec": {"address": "10.231.7.1/24"}})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"]["bridge"], bridge.as_str());
    let sys = std::path::Path::new("/sys/class/net").join(&bridge);
    assert!(sys.join("bridge").exists(), "{bridge} is a bridge");
    let addr = std::process::Command::new("ip")
        .args(["-4", "addr", "show", &bridge])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&addr.stdout).contains("10.231.7.1/24"));
    // Its bridge name is taken: a second network cannot claim it.
    let (s, _) = a.call(
        Method::POST,
        "/v1/networks",
        Some(json!({"name": "other", "spec": {"bridge": bridge}})),
    );
    assert_eq!(s, 409);
    assert_eq!(
        a.call(Method::DELETE, &format!("/v1/networks/{name}"), None)
            .0,
        200
    );
    assert!(!sys.exists(), "bridge removed");
}

#[test]
fn events_resume_after_a_sequence_number_and_stream() {
    let a = Agent::start("events");
    let start = a.last_seq();
    for i in 0..3 {
        assert_eq!(
            a.call(
                Method::POST,
                "/v1/tokens",
                Some(json!({"name": format!("t{i}")}))
            )
            .0,
            201
        );
    }
    let (_, all) = a.call(Method::GET, &format!("/v1/events?since={start}"), None);
    let seqs: Vec<u64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![start + 1, start + 2, start + 3]);
    let (_, rest) = a.call(
        Method::GET,
        &format!("/v1/events?since={}", start + 2),
        None,
    );
    assert_eq!(rest.as_array().unwrap().len(), 1);
    assert_eq!(rest[0]["name"], "t2");

    // The stream replays what came after `since`, then new events.
    let ep = kiln_agent::client::Endpoint::Unix(a.socket());
    let got = a.rt.block_on(async {
        use http_body_util::BodyExt;
        let resp = kiln_agent::client::send(
            &ep,
            Method::GET,
            &format!("/v1/events/stream?since={}", start + 1),
            &[],
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut body = resp.into_body();
        let sock = a.socket();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let ep = kiln_agent::client::Endpoint::Unix(sock);
            let body = serde_json::to_vec(&json!({"name": "late"})).unwrap();
            kiln_agent::client::call(
                &ep,
                Method::POST,
                "/v1/tokens",
                &[],
                Some(body),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        });
        let mut text = String::new();
        let mut names = Vec::new();
        while names.len() < 3 {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("an event in time")
                .unwrap()
                .unwrap();
            if let Ok(d) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&d));
            }
            names = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| {
                    serde_json::from_str::<Value>(d.trim()).unwrap()["name"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect();
        }
        (names, text)
    });
    assert_eq!(got.0, vec!["t1", "t2", "late"], "{}", got.1);
    assert!(got.1.contains(&format!("id: {}", start + 2)), "{}", got.1);
}

#[test]
fn the_openapi_document_is_generated_and_matches_the_committed_copy() {
    let a = Agent::start("openapi");
    let (s, served) = a.call(Method::GET, "/v1/openapi.json", None);
    assert_eq!(s, 200);
    let committed_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(&committed_path).unwrap()).unwrap();
    assert!(
        served == committed,
        "the API changed: run `target/debug/kiln-agent openapi > host-agent/openapi.json` and commit it"
    );
    let printed = std::process::Command::new(AGENT)
        .arg("openapi")
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&printed.stdout).unwrap(),
        committed
    );
    assert_eq!(
        served["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    for p in [
        "/v1/vms",
        "/v1/vms/{vm}/start",
        "/v1/images",
        "/v1/networks",
        "/v1/events",
        "/v1/tokens",
        "/metrics",
    ] {
        assert!(served["paths"][p].is_object(), "{p} is documented");
    }
}
