//! crc32c, computed by whichever of two implementations is faster on the
//! CPU this process runs on, measured once on first use (as Linux picks its
//! RAID and XOR routines at boot).
//!
//! Every checksum of kiln-store is crc32c: each block's sidecar entries,
//! each replication frame, each metadata record. On real hardware the
//! CPU's `crc32` instruction (SSE4.2, through the `crc32c` crate) runs at
//! 20 GB/s and always wins. Under emulation it can be the slowest code on
//! the data path: QEMU's TCG computes that instruction bit by bit, 8 ms per
//! MiB in the test host, where a table-driven implementation takes 2 ms.
//! Both give the same value, so the choice never shows on disk or on the
//! wire.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The table-driven implementation (16 tables, no special instructions).
static TABLE: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// Which implementation computes crc32c here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// The CPU's instruction where it has one (the `crc32c` crate; it falls
    /// back to its own software code where the CPU has none).
    Instruction,
    /// Slicing by 16 tables (the `crc` crate).
    Table,
}

impl Implementation {
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Instruction => "cpu instruction",
            Implementation::Table => "table",
        }
    }

    fn append(self, crc: u32, data: &[u8]) -> u32 {
        match self {
            Implementation::Instruction => crc32c::crc32c_append(crc, data),
            Implementation::Table => {
                // The crc crate starts from the algorithm's register value
                // (reflected, not yet inverted); a finished crc32c is the
                // register inverted.
                let mut d = TABLE.digest_with_initial((!crc).reverse_bits());
                d.update(data);
                d.finalize()
            }
        }
    }
}

/// The implementation this process uses (measured on the first call).
pub fn implementation() -> Implementation {
    static CHOSEN: OnceLock<Implementation> = OnceLock::new();
    *CHOSEN.get_or_init(choose)
}

/// Times both implementations on 64 KiB, best of three rounds each,
/// interleaved so that a burst of load hits both alike.
fn choose() -> Implementation {
    let data: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let time = |imp: Implementation| {
        let start = Instant::now();
        std::hint::black_box(imp.append(0, std::hint::black_box(&data)));
        start.elapsed()
    };
    let (mut instruction, mut table) = (Duration::MAX, Duration::MAX);
    for _ in 0..3 {
        instruction = instruction.min(time(Implementation::Instruction));
        table = table.min(time(Implementation::Table));
    }
    if table < instruction {
        Implementation::Table
    } else {
        Implementation::Instruction
    }
}

/// crc32c of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    implementation().append(0, data)
}

/// crc32c of what `crc` was computed over followed by `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    implementation().append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_implementations_compute_the_same_crc32c() {
        // The check value of CRC-32C (RFC 3720) and random data of every
        // length around the table's 16-byte stride.
        for imp in [Implementation::Instruction, Implementation::Table] {
            assert_eq!(imp.append(0, b"123456789"), 0xE306_9283, "{imp:?}");
            assert_eq!(imp.append(0, b""), 0, "{imp:?}");
        }
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
            .collect();
        for len in (0..70).chain([4095, 4096, 4097, 5000]) {
            let d = &data[..len];
            let a = Implementation::Instruction.append(0, d);
            assert_eq!(Implementation::Table.append(0, d), a, "length {len}");
            // Appending in two pieces gives the crc of the whole.
            let cut = len / 3;
            for imp in [Implementation::Instruction, Implementation::Table] {
                let first = imp.append(0, &d[..cut]);
                assert_eq!(
                    imp.append(first, &d[cut..]),
                    a,
                    "{imp:?} length {len} cut {cut}"
                );
            }
        }
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn choosing_runs_in_every_build_profile() {
        // The timing data must not overflow where overflow checks are on
        // (debug builds, as the agent's tests run it).
        let chosen = choose();
        assert!(matches!(
            chosen,
            Implementation::Instruction | Implementation::Table
        ));
        assert_eq!(chosen.append(0, b"123456789"), 0xE306_9283);
    }
}
