//! kiln-store: Kiln's replicated local block store.
//!
//! Each node pools its local disks ([`engine`]); every volume is mirrored
//! synchronously to 1–3 nodes by the daemon where the volume is attached
//! ([`writer`]), over a versioned, length-framed TCP protocol ([`proto`],
//! [`transport`]). See `store/README.md` for the design.

pub mod checksum;
pub mod client;
pub mod control_socket;
pub mod crc;
pub mod crypt;
pub mod engine;
pub mod error;
pub mod faults;
pub mod io;
pub mod iobuf;
pub mod meta;
pub mod pki;
pub mod proto;
pub mod replica;
pub mod resync;
pub mod server;
pub mod transport;
pub mod types;
pub mod verify;
pub mod vhost_blk;
pub mod writer;

pub use client::{Client, VolumeClient};

/// Why a lock cannot be poisoned: kiln-store is crash-only. The daemon
/// aborts on a panic (`kiln_crash::abort_on_panic` in its `main`, and
/// `panic = "abort"` in release builds), so no thread ever unwinds with a
/// lock held; on restart, the write-ahead log and the replicas' epochs and
/// dirty maps put things right. In tests that use the library in-process,
/// a poisoned lock means a thread already panicked, and panicking again is
/// the honest outcome.
pub(crate) const POISONED: &str = "a thread panicked holding a lock (kiln-store is crash-only)";
pub use engine::Engine;
pub use error::{Error, Result};
pub use io::VolumeIo;
pub use writer::Writer;

/// The daemon's control socket unless told otherwise (`serve --socket`;
/// `volume --socket` or `KILN_STORE_SOCKET`). This is the one place it is
/// written down: kiln-vmm's `--disk volume=` without `store=` leaves the
/// socket to the `kiln-store` command, hence to this default.
pub const DEFAULT_SOCKET: &str = "/run/kiln/store.sock";

/// Where `volume attach NAME --vhost-user` (with no path) serves the
/// volume: `kiln-vhost-NAME.sock` beside the control socket `control`.
pub fn vhost_socket_beside(control: &std::path::Path, volume: &str) -> std::path::PathBuf {
    control
        .parent()
        .unwrap_or(std::path::Path::new("/"))
        .join(format!("kiln-vhost-{volume}.sock"))
}

/// Size of one block: the unit of addressing and checksumming.
pub const BLOCK_SIZE: u64 = 4096;
/// Blocks per extent (1 MiB extents). An extent is also the unit of thin
/// allocation, copy-on-write and dirty-region tracking ("region").
pub const BLOCKS_PER_EXTENT: u64 = 256;
/// Bytes per extent.
pub const EXTENT_SIZE: u64 = BLOCK_SIZE * BLOCKS_PER_EXTENT;
/// Largest single read or write request, in bytes.
pub const MAX_IO: u64 = 4 << 20;
/// Largest volume size accepted (64 TiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// Checks a volume or snapshot name: 1–64 characters of `[A-Za-z0-9._-]`,
/// not starting with a dot.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "bad name {name:?}: use 1-64 characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vhost_socket_sits_beside_the_control_socket() {
        assert_eq!(
            super::vhost_socket_beside(std::path::Path::new(super::DEFAULT_SOCKET), "vm1"),
            std::path::Path::new("/run/kiln/kiln-vhost-vm1.sock")
        );
    }
}
