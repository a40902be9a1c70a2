//! Per-block checksums and the sidecar entry that makes them crash-safe.
//!
//! Each block has an 8-byte sidecar entry `(current, previous)` of crc32c
//! values. A write goes in three steps: (1) entry := (new, crc of the data on
//! disk), (2) the data, (3) entry := (new, new). A block verifies if its crc
//! matches either value, so a `kill -9` between any two steps (a 4 KiB
//! page-aligned pwrite is never torn by a signal) leaves a block that holds
//! either its old or its new contents and verifies; anything else (bit rot, a
//! torn write after power loss) fails verification and is reported.

use crate::BLOCK_SIZE;

/// crc32c of one block.
pub fn block_crc(data: &[u8]) -> u32 {
    crate::crc::crc32c(data)
}

/// crc32c of a block of zeros.
pub fn zero_crc() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| block_crc(&[0u8; BLOCK_SIZE as usize]))
}

/// The sidecar entry of one block. `(0, 0)` means never written (reads as
/// zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub current: u32,
    pub previous: u32,
}

/// Size of one entry on disk.
pub const ENTRY_SIZE: usize = 8;

impl Entry {
    pub const UNWRITTEN: Entry = Entry {
        current: 0,
        previous: 0,
    };

    pub fn is_unwritten(&self) -> bool {
        *self == Entry::UNWRITTEN
    }

    /// Does `crc` (of the block's data) match this entry?
    pub fn accepts(&self, crc: u32) -> bool {
        crc == self.current || crc == self.previous
    }

    pub fn decode(b: &[u8]) -> Entry {
        Entry {
            current: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            previous: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    pub fn encode(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.current.to_le_bytes());
        out[4..8].copy_from_slice(&self.previous.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_roundtrip_and_accepts() {
        let e = Entry {
            current: 7,
            previous: 9,
        };
        let mut b = [0u8; ENTRY_SIZE];
        e.encode(&mut b);
        assert_eq!(Entry::decode(&b), e);
        assert!(e.accepts(7) && e.accepts(9) && !e.accepts(8));
        assert_ne!(zero_crc(), 0);
    }
}
