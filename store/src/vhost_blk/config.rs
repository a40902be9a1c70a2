//! What the device offers: virtio feature bits, vhost-user protocol
//! features, queue geometry and the virtio-blk config space.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Bytes per virtio-blk sector (the unit of `sector` and capacity), and
/// GET_ID's serial length: virtio-blk's, as the shared parser has them.
pub use kiln_block::request::{ID_BYTES, SECTOR_SIZE};
/// Block size advertised to the guest (the store's block, so guests do
/// aligned I/O and the store never reads-modifies-writes).
pub const BLK_SIZE: u32 = crate::BLOCK_SIZE as u32;
/// Queues offered unless the export says otherwise (`attach --queues`):
/// a frontend uses as many as it likes up to this, typically one per vCPU.
pub const DEFAULT_QUEUES: u16 = 8;
/// Most queues an export offers (the backend library's queue masks are
/// 64 bits wide).
pub const MAX_QUEUES: u16 = 64;
/// Threads that pop an export's queues (queue `q` on thread `q % N`).
/// qemu-storage-daemon pops all of a device's queues on one iothread;
/// each thread more is one more to wake on CPUs the guest's vCPUs need,
/// and a thread that pops also serves (see the backend), so one it is.
pub const QUEUE_THREADS: u16 = 1;
/// Requests of one export served at once (across its queues), each in
/// flight into the replicated writer.
pub const WORKERS: usize = 32;
/// Writes up to this size, to a volume whose replicas are all on this
/// node, are served by the queue thread that pops them rather than handed
/// to a worker: such a write is page-cache work (tens of microseconds on
/// real hardware), less than a worker's wake-up on a loaded host.
pub const INLINE_WRITE_MAX: u64 = 64 << 10;
/// Reads gathered at most before the popping thread serves them together
/// (see [`super::backend`]); a ring that runs dry serves fewer.
pub const READ_BATCH: usize = 64;
/// Largest virtqueue size accepted.
pub const MAX_QUEUE_SIZE: usize = 256;
/// Data segments per request advertised (`seg_max`): QEMU's value for its
/// default 128-entry queue, so a request fits any ring of 128 or more even
/// without indirect descriptors.
pub const SEG_MAX: u32 = 126;
/// Descriptors per chain accepted (header + data + status, and some slack
/// for frontends that split buffers further); longer chains are refused.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Largest discard / write-zeroes segment, in sectors (64 MiB).
pub const MAX_DISCARD_SECTORS: u32 = (64 << 20) / SECTOR_SIZE as u32;
/// Segments per discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;

/// How an export serves its volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// Queues offered (1 to [`MAX_QUEUES`]).
    pub queues: u16,
    /// `VIRTIO_BLK_F_RO`: writes, discards and write-zeroes get IOERR.
    pub read_only: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            queues: DEFAULT_QUEUES,
            read_only: false,
        }
    }
}

impl ExportOptions {
    pub fn validate(&self) -> crate::Result<()> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(crate::Error::Invalid(format!(
                "an export has 1 to {MAX_QUEUES} queues, not {}",
                self.queues
            )));
        }
        Ok(())
    }
}

/// Virtio feature bits offered to the frontend.
pub fn features(opts: &ExportOptions) -> u64 {
    let ro = if opts.read_only {
        1u64 << VIRTIO_BLK_F_RO
    } else {
        0
    };
    let mq = if opts.queues > 1 {
        1u64 << VIRTIO_BLK_F_MQ
    } else {
        0
    };
    ro | mq
        | (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_DISCARD)
        | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// vhost-user protocol features offered: CONFIG (the frontend reads the
/// config space from us), MQ (GET_QUEUE_NUM answers the export's queue
/// count), REPLY_ACK, BACKEND_REQ (the channel a config change is
/// announced on), LOG_SHMFD (a live migration's dirty log, with
/// `VHOST_F_LOG_ALL`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// The virtio-blk config space (`struct virtio_blk_config`, little endian)
/// for a volume of `size` bytes served on `queues` queues.
pub fn config_space(size: u64, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &(size / SECTOR_SIZE).to_le_bytes()); // capacity
    put(12, &SEG_MAX.to_le_bytes()); // seg_max
    put(20, &BLK_SIZE.to_le_bytes()); // blk_size
    put(34, &queues.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
    put(44, &(BLK_SIZE / SECTOR_SIZE as u32).to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
    put(56, &[1]); // write_zeroes_may_unmap
    c
}

/// The `[offset, offset + size)` window of the config space the frontend
/// asked for; bytes past the end read as zero.
pub fn config_window(size: u64, queues: u16, offset: u32, len: u32) -> Vec<u8> {
    let full = config_space(size, queues);
    let mut out = vec![0u8; len as usize];
    let start = (offset as usize).min(full.len());
    let end = (offset as usize)
        .saturating_add(len as usize)
        .min(full.len());
    out[..end - start].copy_from_slice(&full[start..end]);
    out
}

/// How many threads pop `queues` queues when `threads` are asked for: at
/// least one, and no more than there are queues.
pub fn popping_threads(queues: u16, threads: u16) -> u16 {
    threads.clamp(1, queues.clamp(1, MAX_QUEUES))
}

/// The backend library's queue masks: which of `queues` queues each
/// popping thread serves (queue `q` on thread `q % threads`), one mask per
/// thread ([`popping_threads`] of them).
pub fn queue_masks(queues: u16, threads: u16) -> Vec<u64> {
    let threads = popping_threads(queues, threads);
    let queues = queues.min(MAX_QUEUES);
    (0..threads)
        .map(|t| {
            (t..queues)
                .step_by(usize::from(threads))
                .fold(0u64, |m, q| m | 1 << q)
        })
        .filter(|m| *m != 0)
        .collect()
}

/// The queue behind event `event` of popping thread `thread`: the library
/// numbers a thread's queues from 0 in the order of its mask's bits.
pub fn queue_of(thread: usize, event: u16, threads: u16) -> usize {
    thread + usize::from(event) * usize::from(threads.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_spread_over_threads_and_map_back() {
        assert_eq!(queue_masks(1, 1), vec![0b1]);
        assert_eq!(queue_masks(4, 1), vec![0b1111]);
        assert_eq!(queue_masks(4, 2), vec![0b0101, 0b1010]);
        // More threads than queues: one each, none empty.
        assert_eq!(queue_masks(2, 8), vec![0b01, 0b10]);
        assert_eq!(queue_masks(MAX_QUEUES, 1), vec![u64::MAX]);
        assert_eq!(queue_masks(MAX_QUEUES + 5, 64).len(), 64);
        // Every queue on exactly one thread, and event k of a thread is
        // the k-th set bit of its mask.
        for queues in 1..=MAX_QUEUES {
            for threads in [1u16, 2, 3, 8, 64] {
                let masks = queue_masks(queues, threads);
                let n = masks.len() as u16;
                // The backend counts its threads as the library gets them.
                assert_eq!(n, popping_threads(queues, threads));
                let mut seen = 0u64;
                for (t, m) in masks.iter().enumerate() {
                    assert_eq!(seen & m, 0);
                    seen |= m;
                    let bits: Vec<usize> = (0..64).filter(|b| m >> b & 1 == 1).collect();
                    for (k, q) in bits.iter().enumerate() {
                        assert_eq!(queue_of(t, k as u16, n), *q);
                    }
                }
                let all = if queues >= 64 {
                    u64::MAX
                } else {
                    (1u64 << queues) - 1
                };
                assert_eq!(seen, all, "{queues} queues on {threads} threads");
            }
        }
    }

    #[test]
    fn config_space_layout() {
        let c = config_space(8 << 20, 4);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 16384);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        // A window past the end is zero-filled, never a panic.
        assert_eq!(config_window(8 << 20, 4, 1000, 8), vec![0u8; 8]);
        assert_eq!(config_window(8 << 20, 4, 0, 8), c[0..8].to_vec());
        assert_eq!(config_window(8 << 20, 4, u32::MAX, 4), vec![0u8; 4]);
    }

    #[test]
    fn read_only_and_multi_queue_are_feature_bits() {
        let plain = features(&ExportOptions {
            queues: 1,
            read_only: false,
        });
        assert_eq!(plain & (1 << VIRTIO_BLK_F_RO | 1 << VIRTIO_BLK_F_MQ), 0);
        let both = features(&ExportOptions {
            queues: 2,
            read_only: true,
        });
        assert_ne!(both & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(both & 1 << VIRTIO_BLK_F_MQ, 0);
        assert!(ExportOptions {
            queues: 0,
            read_only: false
        }
        .validate()
        .is_err());
        assert!(ExportOptions {
            queues: MAX_QUEUES + 1,
            read_only: false
        }
        .validate()
        .is_err());
        assert!(ExportOptions::default().validate().is_ok());
    }
}
