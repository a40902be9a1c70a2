//! Bridges, VLAN sub-interfaces and TAPs, made and removed through
//! rtnetlink (TAPs are made through `/dev/net/tun`, see [`tap`]).

mod rtnl;
mod tap;

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use rtnl::Rtnl;

pub fn exists(ifname: &str) -> bool {
    Path::new("/sys/class/net").join(ifname).exists()
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
    let address = address.map(crate::validate::cidr).transpose()?;
    let nl = Rtnl::open()?;
    if nl.index(bridge).await?.is_some() {
        bail!("an interface named {bridge} exists already");
    }
    let uplink = match uplink {
        Some(u) => {
            let index = nl
                .index(u)
                .await?
                .with_context(|| format!("uplink {u} does not exist"))?;
            Some((u, index))
        }
        None => None,
    };
    nl.add_bridge(bridge)
        .await
        .with_context(|| format!("cannot create bridge {bridge}"))?;
    let mut made_vlan = None;
    if let Err(e) = fill_bridge(&nl, bridge, address, uplink, vlan, &mut made_vlan).await {
        // Deleting the bridge frees the uplink; a VLAN interface made here
        // goes too.
        for name in made_vlan.iter().map(String::as_str).chain([bridge]) {
            if let Err(u) = nl.delete(name).await {
                tracing::warn!("{name} stays after a failed bridge creation: {u:#}");
            }
        }
        return Err(e);
    }
    Ok(())
}

/// The rest of [`create_bridge`] once the bridge exists: its address, its
/// uplink or VLAN interface (named in `made_vlan` once made), and up.
async fn fill_bridge(
    nl: &Rtnl,
    bridge: &str,
    address: Option<(Ipv4Addr, u8)>,
    uplink: Option<(&str, u32)>,
    vlan: Option<u16>,
    made_vlan: &mut Option<String>,
) -> Result<()> {
    let br = nl
        .index(bridge)
        .await?
        .with_context(|| format!("bridge {bridge} vanished as it was made"))?;
    if let Some((a, prefix)) = address {
        nl.add_address(br, a, prefix)
            .await
            .with_context(|| format!("cannot add address {a}/{prefix} to bridge {bridge}"))?;
    }
    match (uplink, vlan) {
        (Some((u, ui)), Some(v)) => {
            let sub = vlan_ifname(u, v);
            // A VLAN interface cannot come up on a lower device that is down.
            nl.up(ui)
                .await
                .with_context(|| format!("cannot set uplink {u} up"))?;
            nl.add_vlan_port(&sub, ui, v, br).await.with_context(|| {
                format!("cannot create VLAN {v} interface {sub} on {u} in bridge {bridge}")
            })?;
            *made_vlan = Some(sub);
        }
        (Some((u, ui)), None) => nl
            .enslave_up(ui, br)
            .await
            .with_context(|| format!("cannot add uplink {u} to bridge {bridge}"))?,
        _ => {}
    }
    nl.up(br)
        .await
        .with_context(|| format!("cannot set bridge {bridge} up"))
}

/// Removes a network's bridge and its VLAN interface, if they exist. The
/// uplink stays (deleting the bridge frees it).
pub async fn delete_bridge(bridge: &str, uplink: Option<&str>, vlan: Option<u16>) -> Result<()> {
    let nl = Rtnl::open()?;
    if let (Some(u), Some(v)) = (uplink, vlan) {
        let sub = vlan_ifname(u, v);
        nl.delete(&sub)
            .await
            .with_context(|| format!("cannot delete VLAN interface {sub}"))?;
    }
    nl.delete(bridge)
        .await
        .with_context(|| format!("cannot delete bridge {bridge}"))
}

/// A persistent TAP on `bridge`, up. An existing TAP of that name (left
/// from an earlier run) is replaced.
pub async fn create_tap(tap: &str, bridge: &str) -> Result<()> {
    let nl = Rtnl::open()?;
    let br = nl
        .index(bridge)
        .await?
        .with_context(|| format!("cannot create TAP {tap}: bridge {bridge} does not exist"))?;
    nl.delete(tap)
        .await
        .with_context(|| format!("cannot delete the old TAP {tap}"))?;
    tap::create_persistent(tap).with_context(|| format!("cannot create TAP {tap}"))?;
    let plugged = async {
        let t = nl
            .index(tap)
            .await?
            .with_context(|| format!("TAP {tap} vanished as it was made"))?;
        nl.enslave_up(t, br)
            .await
            .with_context(|| format!("cannot add TAP {tap} to bridge {bridge}"))
    };
    if let Err(e) = plugged.await {
        if let Err(u) = nl.delete(tap).await {
            tracing::warn!("TAP {tap} stays after a failed creation: {u:#}");
        }
        return Err(e);
    }
    Ok(())
}

pub async fn delete_tap(tap: &str) -> Result<()> {
    Rtnl::open()?
        .delete(tap)
        .await
        .with_context(|| format!("cannot delete TAP {tap}"))
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
