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
/// Requests of one export served at once (across its queues), each in
/// flight into the replicated writer.
pub const WORKERS: usize = 32;
/// Writes up to this size, to a volume whose replicas are all on this
/// node, are served by the queue thread that pops them rather than handed
/// to a worker: such a write is page-cache work (tens of microseconds on
/// real hardware), less than a worker's wake-up on a loaded host.
pub const INLINE_WRITE_MAX: u64 = 64 << 10;
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

#[cfg(test)]
mod tests {
    use super::*;

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
