//! Bridges and TAPs, through iproute2's `ip` (the same netlink requests an
//! operator would make by hand, and errors in the words they know).

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tokio::process::Command;

pub fn exists(ifname: &str) -> bool {
    Path::new("/sys/class/net").join(ifname).exists()
}

async fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The VLAN sub-interface a network puts on its uplink.
pub fn vlan_ifname(uplink: &str, vlan: u16) -> String {
    let suffix = format!(".{vlan}");
    let keep = 15usize.saturating_sub(suffix.len()).min(uplink.len());
    format!("{}{suffix}", &uplink[..keep])
}

/// Makes a bridge (which must not exist), optionally with an address and
/// an uplink (or a VLAN on it). Undoes itself on failure.
pub async fn create_bridge(
    bridge: &str,
    address: Option<&str>,
    uplink: Option<&str>,
    vlan: Option<u16>,
) -> Result<()> {
    if exists(bridge) {
        bail!("an interface named {bridge} exists already");
    }
    if let Some(u) = uplink {
        if !exists(u) {
            bail!("uplink {u} does not exist");
        }
    }
    ip(&["link", "add", bridge, "type", "bridge"]).await?;
    let rest = async {
        if let Some(a) = address {
            ip(&["addr", "add", a, "dev", bridge]).await?;
        }
        match (uplink, vlan) {
            (Some(u), Some(v)) => {
                let sub = vlan_ifname(u, v);
                ip(&[
                    "link",
                    "add",
                    "link",
                    u,
                    "name",
                    &sub,
                    "type",
                    "vlan",
                    "id",
                    &v.to_string(),
                ])
                .await?;
                ip(&["link", "set", &sub, "master", bridge, "up"]).await?;
            }
            (Some(u), None) => ip(&["link", "set", u, "master", bridge, "up"]).await?,
            _ => {}
        }
        ip(&["link", "set", bridge, "up"]).await
    };
    if let Err(e) = rest.await {
        let _ = delete_bridge(bridge, uplink, vlan).await;
        return Err(e);
    }
    Ok(())
}

pub async fn delete_bridge(bridge: &str, uplink: Option<&str>, vlan: Option<u16>) -> Result<()> {
    match (uplink, vlan) {
        (Some(u), Some(v)) => {
            let sub = vlan_ifname(u, v);
            if exists(&sub) {
                ip(&["link", "del", &sub]).await?;
            }
        }
        (Some(u), None) if exists(u) => {
            let _ = ip(&["link", "set", u, "nomaster"]).await;
        }
        _ => {}
    }
    if exists(bridge) {
        ip(&["link", "del", bridge]).await?;
    }
    Ok(())
}

/// A persistent TAP on `bridge`, up. An existing TAP of that name (left
/// from an earlier run) is replaced.
pub async fn create_tap(tap: &str, bridge: &str) -> Result<()> {
    if exists(tap) {
        ip(&["link", "del", tap]).await?;
    }
    ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    if let Err(e) = ip(&["link", "set", tap, "master", bridge, "up"]).await {
        let _ = ip(&["link", "del", tap]).await;
        return Err(e);
    }
    Ok(())
}

pub async fn delete_tap(tap: &str) -> Result<()> {
    if exists(tap) {
        ip(&["link", "del", tap]).await?;
    }
    Ok(())
}

/// TAP names: `kt`, 8 hex digits of the VM id, the NIC's index.
pub const TAP_PREFIX: &str = "kt";

pub fn tap_name(vm_id: &str, index: usize) -> String {
    let hex: String = vm_id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect();
    format!("{TAP_PREFIX}{hex}{index}")
}

/// A stable, locally administered unicast MAC for a VM's NIC.
pub fn stable_mac(vm_id: &str, index: usize) -> String {
    let d = Sha256::digest(format!("{vm_id}/{index}").as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
}

/// The TAPs this agent's naming scheme would have made.
pub fn list_taps() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.len() == TAP_PREFIX.len() + 9
                && n.starts_with(TAP_PREFIX)
                && n[TAP_PREFIX.len()..]
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c.is_ascii_digit())
                && Path::new("/sys/class/net")
                    .join(n)
                    .join("tun_flags")
                    .exists()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_and_macs_are_stable_unicast() {
        let id = "1a2b3c4d-5e6f-4000-8000-000000000000";
        assert_eq!(tap_name(id, 3), "kt1a2b3c4d3");
        assert!(tap_name(id, 7).len() <= 15);
        assert_eq!(stable_mac(id, 0), stable_mac(id, 0));
        assert_ne!(stable_mac(id, 0), stable_mac(id, 1));
        crate::validate::mac(&stable_mac(id, 0)).unwrap();
        assert_eq!(vlan_ifname("enp0s31f6abcdef", 4094), "enp0s31f6a.4094");
        assert_eq!(vlan_ifname("eth0", 7), "eth0.7");
    }
}
