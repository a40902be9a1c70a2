//! Checks of user input, each giving one clear error (422) before anything
//! is created.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::error::ApiError;
use crate::model::VmSpec;

pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
pub const MAX_CMDLINE: usize = 2048;

/// Names: 1-63 characters of `a-z`, `0-9` and `-`, starting with a letter
/// or digit (they end up in interface, socket and cgroup names).
pub fn name(kind: &str, n: &str) -> Result<(), ApiError> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "bad {kind} name {n:?}: use 1-63 characters a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

/// An absolute path to an existing regular file on this node.
pub fn source_file(what: &str, p: &str) -> Result<(), ApiError> {
    let path = Path::new(p);
    if !path.is_absolute() || p.contains('\0') {
        return Err(ApiError::invalid(format!(
            "{what} must be an absolute path on this node, not {p:?}"
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ApiError::invalid(format!(
            "{what} {p:?} is not a regular file"
        ))),
        Err(e) => Err(ApiError::invalid(format!("{what} {p:?}: {e}"))),
    }
}

/// A unicast, non-zero MAC address `aa:bb:cc:dd:ee:ff`.
pub fn mac(m: &str) -> Result<[u8; 6], ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "bad MAC address {m:?}: want a unicast aa:bb:cc:dd:ee:ff"
        ))
    };
    let parts: Vec<&str> = m.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if out[0] & 1 != 0 || out == [0; 6] {
        return Err(bad());
    }
    Ok(out)
}

/// A Linux interface name: 1-15 characters of letters, digits, `-`, `_`, `.`.
pub fn ifname(what: &str, n: &str) -> Result<(), ApiError> {
    let ok = !n.is_empty()
        && n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && n != "."
        && n != "..";
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "bad {what} {n:?}: an interface name has 1-15 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// An IPv4 address with prefix length, e.g. `10.7.0.1/24`.
pub fn cidr(c: &str) -> Result<(Ipv4Addr, u8), ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "bad address {c:?}: want IPv4/prefix, e.g. 10.7.0.1/24"
        ))
    };
    let (a, p) = c.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if prefix == 0 || prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// The parts of a VM spec that need no lookup.
pub fn vm_spec(s: &VmSpec) -> Result<(), ApiError> {
    if s.vcpus == 0 || s.vcpus > MAX_VCPUS {
        return Err(ApiError::invalid(format!(
            "vcpus must be 1-{MAX_VCPUS}, not {}",
            s.vcpus
        )));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&s.memory_mib) {
        return Err(ApiError::invalid(format!(
            "memory_mib must be {MIN_MEMORY_MIB}-{MAX_MEMORY_MIB}, not {}",
            s.memory_mib
        )));
    }
    if let Some(c) = &s.boot.cmdline {
        if c.len() > MAX_CMDLINE || c.contains('\0') || c.contains('\n') {
            return Err(ApiError::invalid(format!(
                "boot.cmdline must be one line of at most {MAX_CMDLINE} bytes"
            )));
        }
    }
    if s.disks.len() > MAX_DISKS {
        return Err(ApiError::invalid(format!("at most {MAX_DISKS} disks")));
    }
    if s.nics.len() > MAX_NICS {
        return Err(ApiError::invalid(format!("at most {MAX_NICS} nics")));
    }
    for n in &s.nics {
        if let Some(m) = &n.mac {
            mac(m)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-1", "0db", &"x".repeat(63)] {
            name("vm", ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "Web",
            "a_b",
            "a b",
            "é",
            &"x".repeat(64),
            "a/b",
            "../x",
        ] {
            assert_eq!(name("vm", bad).unwrap_err().code, "invalid", "{bad:?}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
        ] {
            assert!(mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_and_interface_names() {
        assert_eq!(
            cidr("10.7.0.1/24").unwrap(),
            (Ipv4Addr::new(10, 7, 0, 1), 24)
        );
        for bad in [
            "10.7.0.1",
            "10.7.0.1/0",
            "10.7.0.1/33",
            "x/24",
            "10.7.0.256/24",
        ] {
            assert!(cidr(bad).is_err(), "{bad}");
        }
        ifname("bridge", "kb-lan").unwrap();
        for bad in ["", "0123456789abcdef", "a b", "a/b", ".."] {
            assert!(ifname("bridge", bad).is_err(), "{bad}");
        }
    }
}
