//! Ethernet MAC addresses: parsing and generation.

use std::fmt;
use std::fs::File;
use std::io::Read;

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// Why a string is not a usable MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("MAC address {0:?} must be six two-digit hex octets separated by colons")]
    Format(String),
    #[error("MAC address {0} is a multicast address (low bit of the first octet set)")]
    Multicast(String),
    #[error("MAC address 00:00:00:00:00:00 is not usable")]
    Zero,
}

/// Parses `"52:54:00:12:34:56"` (case-insensitive) into bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], MacError> {
    let bad = || MacError::Format(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(MacError::Multicast(s.to_string()));
    }
    if mac == [0; 6] {
        return Err(MacError::Zero);
    }
    Ok(mac)
}

impl MacAddr {
    /// A random address in the 52:54:00:xx:xx:xx range (locally
    /// administered, unicast).
    pub fn random() -> Self {
        let mut tail = [0u8; 3];
        let from_urandom = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut tail));
        if from_urandom.is_err() {
            let r = vmm_sys_util::rand::xor_pseudo_rng_u32().to_le_bytes();
            tail.copy_from_slice(&r[..3]);
        }
        Self([0x52, 0x54, 0x00, tail[0], tail[1], tail[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_addresses() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        );
        assert_eq!(
            parse_mac("AA:bb:Cc:00:ff:01").unwrap(),
            [0xaa, 0xbb, 0xcc, 0x00, 0xff, 0x01]
        );
    }

    #[test]
    fn rejects_malformed_addresses() {
        for s in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52-54-00-12-34-56",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:+5",
            "52:54:00:12:34:56:",
            " 52:54:00:12:34:56",
        ] {
            assert_eq!(parse_mac(s), Err(MacError::Format(s.into())), "{s:?}");
        }
        assert!(matches!(
            parse_mac("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert_eq!(parse_mac("00:00:00:00:00:00"), Err(MacError::Zero));
    }

    #[test]
    fn random_addresses_are_local_unicast() {
        let m = MacAddr::random();
        assert_eq!(&m.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(parse_mac(&m.to_string()).unwrap(), m.0);
    }
}
