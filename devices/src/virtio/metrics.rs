//! Per-device counters, bumped by the device's worker and read by the
//! VMM's control API (relaxed atomics: totals, not a consistent snapshot).

use std::sync::atomic::{AtomicU64, Ordering};

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A virtio-blk disk served by kiln-vmm: completed reads and writes, and
/// how many of them went to the disk merged into the transfer of the
/// request before them (adjacent on the disk, same direction).
#[derive(Debug, Default)]
pub struct BlockCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    merged: AtomicU64,
}

impl BlockCounters {
    pub fn read(&self, bytes: u64) {
        add(&self.reads, 1);
        add(&self.read_bytes, bytes);
    }

    pub fn wrote(&self, bytes: u64) {
        add(&self.writes, 1);
        add(&self.write_bytes, bytes);
    }

    /// `n` completed requests went to the disk in the transfer of the
    /// request before them.
    pub fn merged(&self, n: u64) {
        add(&self.merged, n);
    }

    /// (name, value) pairs, named as the control API reports them.
    pub fn values(&self) -> [(&'static str, u64); 5] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("read_bytes", v(&self.read_bytes)),
            ("write_bytes", v(&self.write_bytes)),
            ("reads", v(&self.reads)),
            ("writes", v(&self.writes)),
            ("merged", v(&self.merged)),
        ]
    }
}

/// A virtio-net interface: frames (and their bytes, without the virtio-net
/// header) received from and sent to its TAP.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    tx_frames: AtomicU64,
}

impl NetCounters {
    pub fn received(&self, bytes: u64) {
        add(&self.rx_frames, 1);
        add(&self.rx_bytes, bytes);
    }

    pub fn sent(&self, bytes: u64) {
        add(&self.tx_frames, 1);
        add(&self.tx_bytes, bytes);
    }

    pub fn values(&self) -> [(&'static str, u64); 4] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("rx_bytes", v(&self.rx_bytes)),
            ("tx_bytes", v(&self.tx_bytes)),
            ("rx_frames", v(&self.rx_frames)),
            ("tx_frames", v(&self.tx_frames)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up() {
        let b = BlockCounters::default();
        b.read(512);
        b.read(4096);
        b.wrote(1024);
        b.merged(1);
        assert_eq!(
            b.values(),
            [
                ("read_bytes", 4608),
                ("write_bytes", 1024),
                ("reads", 2),
                ("writes", 1),
                ("merged", 1)
            ]
        );
        let n = NetCounters::default();
        n.received(60);
        n.sent(1500);
        n.sent(42);
        assert_eq!(
            n.values(),
            [
                ("rx_bytes", 60),
                ("tx_bytes", 1542),
                ("rx_frames", 1),
                ("tx_frames", 2)
            ]
        );
    }
}
