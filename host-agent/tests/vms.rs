//! VMs under the agent, with real kiln-vmm processes running tiny guests on
//! this machine's KVM: start, console, pause, the agent killed and replaced
//! under a running VM, the restart policy, graceful shutdown with its
//! power-off fallback, and a start that fails cleanly.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

/// Whether the tiny-guest tests can run; with CI=true they must.
fn can_run_vms() -> bool {
    let problem = kiln_tests::tiny::local_kvm().err().or_else(|| {
        (!vmm_binary().is_file()).then(|| {
            format!(
                "{} is missing (run `cargo test --workspace`)",
                vmm_binary().display()
            )
        })
    });
    match problem {
        None => true,
        Some(p) => {
            kiln_tests::skip(p);
            false
        }
    }
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn setup(a: &Agent, guest: &[u8], policy: &str) -> String {
    let net = unique("v");
    let (s, v) = a.call(Method::POST, "/v1/networks", Some(json!({"name": net})));
    assert_eq!(s, 201, "{v}");
    let kernel = a.dir.join("guest.elf");
    std::fs::write(&kernel, guest).unwrap();
    let (s, v) = a.call(
        Method::POST,
        "/v1/images",
        Some(json!({"name": "tiny", "spec": {"source": {"kind": "kernel", "kernel": kernel}}})),
    );
    assert_eq!(s, 202, "{v}");
    a.wait_for("/v1/images/tiny", "ready", Duration::from_secs(20), |v| {
        v["status"]["state"] == "ready"
    });
    let spec = json!({"vcpus": 1, "memory_mib": 64, "boot": {"image": "tiny"}, "nics": [{"network": net}], "restart_policy": policy});
    let (s, v) = a.call(
        Method::POST,
        "/v1/vms",
        Some(json!({"name": "vm1", "spec": spec})),
    );
    assert_eq!(s, 201, "{v}");
    net
}

fn running(a: &Agent, not_pid: Option<u64>) -> Value {
    a.wait_for("/v1/vms/vm1", "running", Duration::from_secs(60), |v| {
        v["status"]["state"] == "running"
            && v["status"]["pid"].as_u64().is_some()
            && v["status"]["pid"].as_u64() != not_pid
    })
}

fn console(a: &Agent) -> String {
    let ep = kiln_agent::client::Endpoint::Unix(a.socket());
    let (s, bytes) =
        a.rt.block_on(kiln_agent::client::call(
            &ep,
            Method::GET,
            "/v1/vms/vm1/console",
            &[],
            None,
            Duration::from_secs(10),
        ))
        .unwrap();
    assert_eq!(s, 200);
    String::from_utf8_lossy(&bytes).into_owned()
}

fn events(a: &Agent) -> Vec<Value> {
    a.call(Method::GET, "/v1/events?since=0", None)
        .1
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_vm_runs_under_the_agent_and_outlives_it() {
    if !can_run_vms() {
        return;
    }
    let mut a = Agent::start("vm");
    let net = setup(
        &a,
        &kiln_tests::tiny::print_then_halt(b"KILN-AGENT-VM-OK\n"),
        "always",
    );
    let bridge = format!("kb-{net}");

    let (s, v) = a.call(Method::POST, "/v1/vms/vm1/start", None);
    assert_eq!(
        (s, v["status"]["state"].as_str()),
        (202, Some("starting")),
        "{v}"
    );
    let vm = running(&a, None);
    let pid1 = vm["status"]["pid"].as_u64().unwrap();
    let tap = vm["status"]["nics"][0]["tap"].as_str().unwrap().to_string();
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
    assert_eq!(
        master.file_name().unwrap().to_str(),
        Some(bridge.as_str()),
        "the TAP is on the network's bridge"
    );
    assert!(console(&a).contains("KILN-AGENT-VM-OK"));
    let o = a.kilnctl(&["vm", "console", "vm1"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("KILN-AGENT-VM-OK"),
        "{o:?}"
    );
    // A second start is refused; pause and resume go through kiln-vmm.
    assert_eq!(a.call(Method::POST, "/v1/vms/vm1/start", None).0, 409);
    assert_eq!(
        a.call(Method::POST, "/v1/vms/vm1/pause", None).1["status"]["state"],
        "paused"
    );
    assert_eq!(
        a.call(Method::POST, "/v1/vms/vm1/resume", None).1["status"]["state"],
        "running"
    );
    let metrics = a.metrics();
    assert!(
        metrics.contains("kiln_vm_uptime_seconds{vm=\"vm1\"}"),
        "{metrics}"
    );

    // SIGKILL the agent: the VM keeps running. A new agent from another
    // copy of the binary re-adopts it, same process.
    a.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(pid1), "kiln-vmm died with the agent");
    let copy = a.dir.join("kiln-agent-new");
    std::fs::copy(AGENT, &copy).unwrap();
    a.serve(&copy);
    let vm = running(&a, None);
    assert_eq!(
        vm["status"]["pid"].as_u64(),
        Some(pid1),
        "re-adopted, not restarted"
    );
    assert!(events(&a)
        .iter()
        .any(|e| e["action"] == "adopted" && e["name"] == "vm1"));
    assert!(
        Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "the running VM's TAP stays"
    );
    assert!(console(&a).contains("KILN-AGENT-VM-OK"));

    // Restart policy `always`: a killed kiln-vmm (not the new agent's
    // child) comes back by itself.
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid1.to_string()])
        .status()
        .unwrap()
        .success());
    let vm = running(&a, Some(pid1));
    let pid2 = vm["status"]["pid"].as_u64().unwrap();
    assert_eq!(vm["status"]["restarts"], 1);
    assert!(events(&a).iter().any(|e| e["message"]
        .as_str()
        .is_some_and(|m| m.contains("restart policy"))));

    // Power-off: stopped, and nothing left behind; no restart.
    let (s, _) = a.call(Method::POST, "/v1/vms/vm1/power-off", None);
    assert_eq!(s, 202);
    a.wait_for("/v1/vms/vm1", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
    std::thread::sleep(Duration::from_millis(1500));
    let vm = a.call(Method::GET, "/v1/vms/vm1", None).1;
    assert_eq!(vm["status"]["state"], "stopped", "{vm}");
    assert!(!pid_alive(pid2));
    assert!(
        !Path::new(&format!("/sys/class/net/{tap}")).exists(),
        "TAP removed"
    );
    assert!(!a
        .dir
        .join(format!("run/vms/{}/api.sock", vm["id"].as_str().unwrap()))
        .exists());

    // Graceful shutdown of a guest that ignores its power button: powered
    // off after the timeout, and the event says so.
    a.call(Method::POST, "/v1/vms/vm1/start", None);
    running(&a, None);
    let (s, v) = a.call(
        Method::POST,
        "/v1/vms/vm1/shutdown",
        Some(json!({"timeout_secs": 1})),
    );
    assert_eq!(
        (s, v["status"]["state"].as_str()),
        (202, Some("stopping")),
        "{v}"
    );
    a.wait_for("/v1/vms/vm1", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
    assert!(events(&a).iter().any(|e| e["message"]
        .as_str()
        .is_some_and(|m| m.contains("did not power off within 1 s"))));

    assert_eq!(a.call(Method::DELETE, "/v1/vms/vm1", None).0, 200);
    assert_eq!(
        a.call(Method::DELETE, &format!("/v1/networks/{net}"), None)
            .0,
        200
    );
}

#[test]
fn a_vm_that_cannot_start_fails_with_its_reason_and_leaves_nothing() {
    if !can_run_vms() {
        return;
    }
    let a = Agent::start("vmfail");
    let net = setup(&a, b"this is not a kernel", "on_failure");
    let (s, _) = a.call(Method::POST, "/v1/vms/vm1/start", None);
    assert_eq!(s, 202);
    let vm = a.wait_for("/v1/vms/vm1", "failed", Duration::from_secs(60), |v| {
        v["status"]["state"] == "failed"
    });
    let reason = vm["status"]["reason"].as_str().unwrap();
    assert!(reason.contains("kiln-vmm exited"), "{reason}");
    assert!(
        vm["status"]["pid"].is_null() && vm["status"]["nics"] == json!([]),
        "{vm}"
    );
    let taps: Vec<String> = std::fs::read_dir("/sys/class/net/")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&kiln_agent::netdev::tap_name(vm["id"].as_str().unwrap(), 0)))
        .collect();
    assert!(taps.is_empty(), "left TAPs {taps:?}");
    // A failed VM can be deleted, and then its network.
    assert_eq!(a.call(Method::DELETE, "/v1/vms/vm1", None).0, 200);
    assert_eq!(
        a.call(Method::DELETE, &format!("/v1/networks/{net}"), None)
            .0,
        200
    );
}

#[test]
fn following_the_console_keeps_delivering_the_guests_output() {
    if !can_run_vms() {
        return;
    }
    let a = Agent::start("follow");
    let net = setup(
        &a,
        &kiln_tests::tiny::tiny_elf(&kiln_tests::tiny::print_forever(b'.', 5000)),
        "never",
    );
    a.call(Method::POST, "/v1/vms/vm1/start", None);
    running(&a, None);
    let ep = kiln_agent::client::Endpoint::Unix(a.socket());
    let (chunks, ended) = a.rt.block_on(async {
        use http_body_util::BodyExt;
        let resp = kiln_agent::client::send(
            &ep,
            Method::GET,
            "/v1/vms/vm1/console?follow=true",
            &[],
            None,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut chunks = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return (chunks, false), // still open at the deadline
                Ok(None) => return (chunks, true),
                Ok(Some(f)) => {
                    if f.unwrap().into_data().is_ok_and(|d| !d.is_empty()) {
                        chunks += 1;
                    }
                }
            }
        }
    });
    assert!(!ended, "the console stream ended after {chunks} chunks");
    assert!(
        chunks >= 2,
        "only {chunks} chunks: the replay, then nothing live"
    );
    assert_eq!(a.call(Method::POST, "/v1/vms/vm1/power-off", None).0, 202);
    a.wait_for("/v1/vms/vm1", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
    assert_eq!(a.call(Method::DELETE, "/v1/vms/vm1", None).0, 200);
    assert_eq!(
        a.call(Method::DELETE, &format!("/v1/networks/{net}"), None)
            .0,
        200
    );
}

/// Starts vm1 with the echo guest: what it reads on COM1 it writes back.
fn echo_vm(a: &Agent) -> String {
    let net = setup(
        a,
        &kiln_tests::tiny::tiny_elf(&kiln_tests::tiny::echo_serial(1000)),
        "never",
    );
    let (s, v) = a.call(Method::POST, "/v1/vms/vm1/start", None);
    assert_eq!(s, 202, "{v}");
    running(a, None);
    net
}

fn remove_vm(a: &Agent, net: &str) {
    assert_eq!(a.call(Method::POST, "/v1/vms/vm1/power-off", None).0, 202);
    a.wait_for("/v1/vms/vm1", "stopped", Duration::from_secs(30), |v| {
        v["status"]["state"] == "stopped"
    });
    assert_eq!(a.call(Method::DELETE, "/v1/vms/vm1", None).0, 200);
    assert_eq!(
        a.call(Method::DELETE, &format!("/v1/networks/{net}"), None)
            .0,
        200
    );
}

/// kilnctl on the agent's unix socket, with piped stdin and stdout.
fn kilnctl_piped(a: &Agent, args: &[&str]) -> std::process::Child {
    std::process::Command::new(KILNCTL)
        .arg("--host")
        .arg(format!("unix:{}", a.socket().display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads `r` on a thread until `want` has been seen or `timeout` passed;
/// returns everything read by then.
fn read_until(r: impl std::io::Read + Send + 'static, want: &str, timeout: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = r;
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(want) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => got.extend_from_slice(&chunk),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Waits for a child within `timeout`, killing it if it overstays.
fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kilnctl_attaches_to_the_console_and_detaches_with_ctrl_bracket() {
    if !can_run_vms() {
        return;
    }
    let a = Agent::start("attach");
    let net = setup(
        &a,
        &kiln_tests::tiny::tiny_elf(&kiln_tests::tiny::echo_serial(1000)),
        "never",
    );
    // Not running yet: 409, exit status 4; no such VM: 404, 3.
    let o = a.kilnctl(&["vm", "console", "--attach", "vm1"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let o = a.kilnctl(&["vm", "console", "--attach", "no-such-vm"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");

    a.call(Method::POST, "/v1/vms/vm1/start", None);
    running(&a, None);
    let mut child = kilnctl_piped(&a, &["vm", "console", "--attach", "vm1"]);
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    use std::io::Write;
    stdin.write_all(b"hello-kiln\n").unwrap();
    stdin.flush().unwrap();
    let got = read_until(stdout, "hello-kiln", Duration::from_secs(30));
    assert!(
        got.contains("hello-kiln"),
        "no echo, got {got:?}\nagent log:\n{}",
        a.log()
    );
    // Ctrl-] detaches: exit 0, and the VM runs on.
    stdin.write_all(&[0x1d]).unwrap();
    stdin.flush().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status:?}: {err}");
    std::thread::sleep(Duration::from_millis(300));
    let vm = a.call(Method::GET, "/v1/vms/vm1", None).1;
    assert_eq!(vm["status"]["state"], "running", "{vm}");

    // The end of stdin detaches too; the echo and the earlier input are
    // in the replay.
    let mut child = kilnctl_piped(&a, &["vm", "console", "--attach", "vm1"]);
    drop(child.stdin.take());
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("hello-kiln"), "{out:?}");
    remove_vm(&a, &net);
}

#[test]
fn attaching_over_tls_needs_an_admin_token() {
    if !can_run_vms() {
        return;
    }
    use futures_util::{SinkExt, StreamExt};
    use kiln_agent::client::{websocket, Upgrade};
    use tokio_tungstenite::tungstenite::Message;

    let a = Agent::start("attachtls");
    let net = echo_vm(&a);
    let (s, t) = a.tls(
        Some(&a.token),
        Method::POST,
        "/v1/tokens",
        Some(json!({"name": "ro", "spec": {"role": "reader"}})),
    );
    assert_eq!(s, 201, "{t}");
    let reader = t["token"].as_str().unwrap().to_string();
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];
    let path = "/v1/vms/vm1/console/attach";

    // A reader may read the console but not attach (403, the JSON error).
    assert_eq!(
        a.tls(Some(&reader), Method::GET, "/v1/vms/vm1/console", None)
            .0,
        200
    );
    let refused = a.rt.block_on(websocket(
        &a.https(),
        path,
        &bearer(&reader),
        Duration::from_secs(10),
    ));
    match refused.unwrap() {
        Upgrade::Refused(s, body) => {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                (s.as_u16(), &v["error"]["code"]),
                (403, &json!("forbidden"))
            );
        }
        Upgrade::Open(_) => panic!("a reader attached"),
    }
    // Without the upgrade headers: 400 with the JSON error, not a 5xx.
    let (s, v) = a.tls(Some(&a.token), Method::GET, path, None);
    assert_eq!(
        (s, &v["error"]["code"]),
        (400, &json!("bad_request")),
        "{v}"
    );
    let (s, v) = a.tls(
        Some(&a.token),
        Method::GET,
        "/v1/vms/nope/console/attach",
        None,
    );
    assert_eq!((s, &v["error"]["code"]), (404, &json!("not_found")), "{v}");

    // The admin attaches over TLS: input is echoed back.
    let echoed = a.rt.block_on(async {
        let Upgrade::Open(mut ws) =
            websocket(&a.https(), path, &bearer(&a.token), Duration::from_secs(10))
                .await
                .unwrap()
        else {
            panic!("the admin was refused");
        };
        ws.send(Message::Binary(b"tls-echo\n".to_vec().into()))
            .await
            .unwrap();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !String::from_utf8_lossy(&got).contains("tls-echo") {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        ws.close().await.unwrap();
        String::from_utf8_lossy(&got).into_owned()
    });
    assert!(echoed.contains("tls-echo"), "{echoed:?}");
    assert_eq!(
        a.call(Method::GET, "/v1/vms/vm1", None).1["status"]["state"],
        "running"
    );
    remove_vm(&a, &net);
}
