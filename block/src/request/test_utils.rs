//! Requests built in guest memory, for tests of the parser and of the
//! devices that use it (feature `test-utils`).

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::RequestLimits;

/// Where [`write_header`] puts a request's header.
pub const HDR: u64 = 0x10_0000;
/// Where tests put data buffers.
pub const DATA: u64 = 0x20_0000;
/// Where tests put the status byte.
pub const STATUS: u64 = 0x30_0000;
/// `VRING_DESC_F_WRITE`: a device-writable descriptor.
pub const W: u16 = VRING_DESC_F_WRITE as u16;

/// 4 MiB of guest memory from address 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// A 64-sector disk, 4 segments, 2 ranges of up to 32 sectors.
pub fn limits() -> RequestLimits {
    RequestLimits {
        capacity_sectors: 64,
        seg_max: 4,
        max_range_sectors: 32,
        max_ranges: 2,
    }
}

/// A descriptor (the mock queue sets NEXT and the next index).
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// Writes a request header of type `t` for `sector` at [`HDR`].
pub fn write_header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}
