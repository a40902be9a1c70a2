//! Networks against a real kiln-agent process, checked from outside in
//! /sys and /proc: a bridge on an uplink and with an address, a VLAN
//! sub-interface, deletion that leaves the uplink, and a creation that
//! fails half-way and leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use hyper::Method;
use serde_json::{json, Value};

/// A veth pair made for one test, removed when dropped (the peer goes with
/// it).
struct Veth {
    name: String,
    peer: String,
}

impl Veth {
    fn new() -> Veth {
        let name = unique("kv");
        let peer = format!("{name}p");
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
        Veth { name, peer }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sys(ifname: &str) -> PathBuf {
    Path::new("/sys/class/net").join(ifname)
}

fn master(ifname: &str) -> Option<String> {
    std::fs::read_link(sys(ifname).join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Administratively up (`IFF_UP`; a bridge without ports has no carrier).
fn is_up(ifname: &str) -> bool {
    let flags = std::fs::read_to_string(sys(ifname).join("flags")).unwrap();
    u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap() & 1 != 0
}

fn ipv4_addrs(ifname: &str) -> String {
    ip(&["-4", "-o", "addr", "show", "dev", ifname])
}

/// Whether this kernel makes VLAN interfaces; without, a VLAN network
/// cannot be made.
fn kernel_has_vlans(veth: &Veth) -> bool {
    let probe = format!("{}v", veth.peer);
    let out = Command::new("ip")
        .args(["link", "add", "link", &veth.peer, "name", &probe])
        .args(["type", "vlan", "id", "4000"])
        .output()
        .unwrap();
    if out.status.success() {
        ip(&["link", "del", &probe]);
        return true;
    }
    // Not a skip: the failure path is asserted here, and the test host's
    // Debian kernel (host-agent/tests/testhost.rs) makes the VLAN.
    eprintln!(
        "this kernel makes no VLAN interfaces ({}): checking the clean failure here; the test host checks a VLAN network",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    false
}

fn assert_api_error(s: u16, v: &Value) {
    assert!((400..600).contains(&s), "status {s}: {v}");
    assert!(v["error"]["code"].is_string(), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

fn assert_no_network(a: &Agent, name: &str) {
    assert_eq!(
        a.call(Method::GET, &format!("/v1/networks/{name}"), None).0,
        404
    );
    let (_, list) = a.call(Method::GET, "/v1/networks", None);
    assert!(
        !list.as_array().unwrap().iter().any(|n| n["name"] == name),
        "{list}"
    );
}

#[test]
fn a_network_on_an_uplink_enslaves_it_carries_its_address_and_frees_it_when_deleted() {
    let a = Agent::start("net-uplink");
    let veth = Veth::new();
    let name = unique("n");
    let bridge = format!("kb-{name}");
    let (s, v) = a.call(
        Method::POST,
        "/v1/networks",
        Some(json!({"name": name, "spec": {"uplink": veth.name, "address": "10.213.0.1/24"}})),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["status"]["bridge"], bridge.as_str());
    assert!(sys(&bridge).join("bridge").exists(), "{bridge} is a bridge");
    assert!(is_up(&bridge), "{bridge} is up");
    assert_eq!(master(&veth.name).as_deref(), Some(bridge.as_str()));
    assert!(is_up(&veth.name), "the uplink is up");
    assert!(
        ipv4_addrs(&bridge).contains("10.213.0.1/24"),
        "{}",
        ipv4_addrs(&bridge)
    );

    let (s, v) = a.call(Method::DELETE, &format!("/v1/networks/{name}"), None);
    assert_eq!(s, 200, "{v}");
    assert!(!sys(&bridge).exists(), "{bridge} is gone");
    assert!(sys(&veth.name).exists(), "the uplink stays");
    assert_eq!(master(&veth.name), None, "the uplink is on no bridge");
    assert_no_network(&a, &name);
}

#[test]
fn a_network_on_a_vlan_bridges_a_sub_interface_that_goes_with_it() {
    let a = Agent::start("net-vlan");
    let veth = Veth::new();
    let name = unique("n");
    let bridge = format!("kb-{name}");
    let sub = kiln_agent::netdev::vlan_ifname(&veth.name, 42);
    let body = json!({"name": name, "spec": {"uplink": veth.name, "vlan": 42}});
    if !kernel_has_vlans(&veth) {
        // The agent still fails cleanly, after making the bridge.
        let (s, v) = a.call(Method::POST, "/v1/networks", Some(body));
        assert_api_error(s, &v);
        assert!(!sys(&bridge).exists(), "no bridge {bridge} is left");
        assert!(!sys(&sub).exists(), "no {sub} is left");
        assert_no_network(&a, &name);
        return;
    }
    let (s, v) = a.call(Method::POST, "/v1/networks", Some(body));
    assert_eq!(s, 201, "{v}");
    assert!(is_up(&bridge), "{bridge} is up");
    assert_eq!(master(&sub).as_deref(), Some(bridge.as_str()));
    assert_eq!(
        master(&veth.name),
        None,
        "the uplink itself is on no bridge"
    );
    let vlan = std::fs::read_to_string(Path::new("/proc/net/vlan").join(&sub)).unwrap();
    assert!(
        vlan.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["VID:", "42"]),
        "{vlan}"
    );
    assert!(vlan.contains(&format!("Device: {}", veth.name)), "{vlan}");

    let (s, v) = a.call(Method::DELETE, &format!("/v1/networks/{name}"), None);
    assert_eq!(s, 200, "{v}");
    assert!(!sys(&bridge).exists(), "{bridge} is gone");
    assert!(!sys(&sub).exists(), "{sub} is gone");
    assert!(sys(&veth.name).exists(), "the uplink stays");
}

#[test]
fn a_network_that_fails_half_way_leaves_no_bridge_and_no_network() {
    let a = Agent::start("net-undo");
    let name = unique("n");
    let bridge = format!("kb-{name}");
    // The bridge is made and addressed; then the kernel refuses to bridge a
    // loopback device.
    let (s, v) = a.call(
        Method::POST,
        "/v1/networks",
        Some(json!({"name": name, "spec": {"uplink": "lo", "address": "10.213.1.1/24"}})),
    );
    assert_api_error(s, &v);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("uplink lo") && msg.contains(&bridge), "{msg}");
    assert!(!sys(&bridge).exists(), "no bridge {bridge} is left");
    assert!(
        !ip(&["-4", "-o", "addr", "show"]).contains("10.213.1.1/"),
        "the address went with the bridge"
    );
    assert_eq!(master("lo"), None);
    assert_no_network(&a, &name);

    // The name is free again.
    let (s, v) = a.call(Method::POST, "/v1/networks", Some(json!({"name": name})));
    assert_eq!(s, 201, "{v}");
    assert!(sys(&bridge).exists());
    assert_eq!(
        a.call(Method::DELETE, &format!("/v1/networks/{name}"), None)
            .0,
        200
    );
    assert!(!sys(&bridge).exists());
}
