//! One virtio-blk request: parse the descriptor chain with the parser
//! kiln-vmm's device uses too ([`kiln_block::request`]: any descriptor
//! layout, everything the guest controls checked), run it on the volume and
//! write the status byte.

use std::sync::atomic::{AtomicU64, Ordering};

use kiln_block::request::{self as blk, Request, RequestLimits, RequestType, Segment};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestMemory, GuestMemoryError};

use super::config::{ID_BYTES, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::io::VolumeIo;
use crate::iobuf::IoBuf;

/// Bytes moved between the volume and guest memory at a time.
const CHUNK: u64 = crate::MAX_IO;

/// Why a request failed; decides the status the guest sees.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Invalid(#[from] blk::RequestError),
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("the device is read-only")]
    ReadOnly,
    #[error("volume I/O failed: {0}")]
    Volume(#[from] crate::Error),
}

impl RequestError {
    /// The virtio-blk status byte for this failure.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Invalid(e) => e.status(),
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Counts events and says which ones to log: the first 20, then one in
/// 1000, so a hostile guest cannot flood the daemon's log.
#[derive(Debug, Default)]
pub struct LogLimiter(AtomicU64);

impl LogLimiter {
    pub fn allow(&self) -> bool {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        n < 20 || n % 1000 == 0
    }
}

/// What the device needs to serve requests.
pub struct Device<'a> {
    pub name: &'a str,
    pub volume: &'a dyn VolumeIo,
    pub log: &'a LogLimiter,
    /// Exported read-only: requests that change the volume get IOERR.
    pub read_only: bool,
}

/// Whether the chain is a write (`OUT`) of at most `max` data bytes,
/// judged from its header's type and its descriptors' lengths only (the
/// full parse comes when it is served). Anything unreadable or odd says
/// no, so a hostile chain goes the ordinary way and gets its error there.
pub fn is_write_of_at_most<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: impl Iterator<Item = Descriptor>,
    max: u64,
) -> bool {
    is_request_of_at_most(mem, descriptors, VIRTIO_BLK_T_OUT, max)
}

/// The same for a read (`IN`) of at most `max` data bytes.
pub fn is_read_of_at_most<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: impl Iterator<Item = Descriptor>,
    max: u64,
) -> bool {
    is_request_of_at_most(mem, descriptors, VIRTIO_BLK_T_IN, max)
}

fn is_request_of_at_most<M: GuestMemory + ?Sized>(
    mem: &M,
    mut descriptors: impl Iterator<Item = Descriptor>,
    kind: u32,
    max: u64,
) -> bool {
    // The header whole in the first descriptor (as drivers lay it out), so
    // its type is the one the parser will read.
    let Some(first) = descriptors.next().filter(|d| d.len() >= blk::HEADER_LEN) else {
        return false;
    };
    match mem.read_obj::<u32>(first.addr()) {
        Ok(t) if u32::from_le(t) == kind => {}
        _ => return false,
    }
    // Header (16 bytes) and status (1) around the data, however split.
    let limit = max.saturating_add(u64::from(blk::HEADER_LEN) + 1);
    let mut total = u64::from(first.len());
    for (i, d) in descriptors.enumerate() {
        total += u64::from(d.len());
        if total > limit || i >= MAX_DESCRIPTORS {
            return false;
        }
    }
    total <= limit
}

/// What the parser accepts of a guest's requests to a disk of
/// `capacity_sectors`.
fn limits(capacity_sectors: u64) -> RequestLimits {
    RequestLimits {
        capacity_sectors,
        // The chain's length bounds what is read of it; seg_max (126) is
        // what the driver is told, more is accepted from frontends that
        // split buffers further.
        seg_max: MAX_DESCRIPTORS as u32 - 2,
        max_range_sectors: MAX_DISCARD_SECTORS,
        max_ranges: MAX_DISCARD_SEG,
    }
}

/// Serves the request in one descriptor chain; returns the used length
/// (bytes written into the chain's device-writable buffers) for the used
/// ring. A chain without a usable status byte (it loops, leaves the table
/// or ends without a writable byte in guest memory) is returned with 0 and
/// nothing written.
pub fn handle_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: impl Iterator<Item = Descriptor>,
    dev: &Device,
) -> u32 {
    // The volume's size now (it may grow while exported). Without it the
    // request is still parsed, for its status byte, and fails afterwards.
    let size = dev.volume.size();
    let limits = limits(size.as_ref().map_or(u64::MAX, |s| s / SECTOR_SIZE));
    let (status, result) = match blk::parse(mem, descriptors, &limits) {
        Ok(req) => {
            let result = match size {
                Ok(_) => execute(mem, &req, dev),
                Err(e) => Err(e.into()),
            };
            (req.status, result)
        }
        Err(blk::Rejected {
            error,
            status: Some(status),
        }) => (status, Err(error.into())),
        Err(blk::Rejected {
            error,
            status: None,
        }) => {
            if dev.log.allow() {
                tracing::warn!(
                    volume = dev.name,
                    error = %error,
                    "vhost-user-blk: request without a status byte, returned unanswered"
                );
            }
            return 0;
        }
    };
    finish(mem, status, result, dev)
}

/// Writes the status byte of a request at `status` after its outcome;
/// returns the used length.
fn finish<M: GuestMemory + ?Sized>(
    mem: &M,
    status: vm_memory::GuestAddress,
    result: Result<u64, RequestError>,
    dev: &Device,
) -> u32 {
    let (status_byte, written) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            if dev.log.allow() {
                tracing::warn!(volume = dev.name, error = %e, "vhost-user-blk: request failed");
            }
            (e.status(), 0)
        }
    };
    if mem.write_obj(status_byte, status).is_err() {
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// The chain parsed, if it is a well-formed read of at most [`CHUNK`]
/// bytes: one that [`read_into_guest`] completes with the data of
/// `(sector * 512, data_len)`, read by the caller (with others, in a
/// batch). Anything else (`None`) goes through [`handle_chain`].
pub fn parse_read<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: impl Iterator<Item = Descriptor>,
    dev: &Device,
) -> Option<Request> {
    let size = dev.volume.size().ok()?;
    blk::parse(mem, descriptors, &limits(size / SECTOR_SIZE))
        .ok()
        .filter(|r| r.request_type == RequestType::In && r.data_len > 0 && r.data_len <= CHUNK)
}

/// Completes a read from [`parse_read`] with the data read for it (or
/// why it could not be): copies it into the guest's buffers, writes the
/// status byte, and returns the used length.
pub fn read_into_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    data: crate::Result<IoBuf>,
    dev: &Device,
) -> u32 {
    let result = data
        .map_err(RequestError::from)
        .and_then(|buf| copy_to_guest(mem, req, &buf));
    finish(mem, req.status, result, dev)
}

/// Copies the data of a read of at most [`CHUNK`] into the guest's
/// buffers, refusing a buffer of the wrong length; returns the length.
fn copy_to_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    buf: &[u8],
) -> Result<u64, RequestError> {
    let len = req.data_len;
    if buf.len() as u64 != len {
        return Err(
            crate::Error::Io(format!("volume read gave {} bytes for {len}", buf.len())).into(),
        );
    }
    for_each_piece(&req.data, 0, len, |addr, r| mem.write_slice(&buf[r], addr))?;
    Ok(len)
}

/// Runs a parsed request; returns the bytes of data written to the guest
/// (before the status byte).
fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    dev: &Device,
) -> Result<u64, RequestError> {
    if dev.read_only && req.request_type.changes_disk() {
        return Err(RequestError::ReadOnly);
    }
    let vol = dev.volume;
    let len = req.data_len;
    // For reads and writes the parser checked that this is inside the disk.
    let offset = || req.sector * SECTOR_SIZE;
    match req.request_type {
        RequestType::In if len <= CHUNK => {
            // One piece: straight from the volume's buffer to the guest.
            let buf = vol.read_vec(offset(), len as usize)?;
            copy_to_guest(mem, req, &buf)
        }
        RequestType::In => {
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                vol.read_at(&mut buf[..n], offset() + done)?;
                for_each_piece(&req.data, done, n as u64, |addr, r| {
                    mem.write_slice(&buf[r], addr)
                })?;
                done += n as u64;
            }
            Ok(len)
        }
        RequestType::Out if len <= CHUNK => {
            // One piece: the buffer goes to the volume as it is.
            // Block-aligned, so that a large write reaches the disk
            // (`O_DIRECT`) without another copy.
            // Filled straight from the guest's memory, not zeroed first.
            let buf = IoBuf::fill_with(len as usize, |v| {
                for_each_piece(&req.data, 0, len, |addr, r| {
                    mem.write_all_volatile_to(addr, v, r.len())
                })
            })?;
            // The parser made the segments cover `len` exactly; checked
            // here too, as a short buffer would be written as a shorter
            // write.
            if buf.len() as u64 != len {
                return Err(crate::Error::Io(format!(
                    "guest buffers gave {} bytes of a {len}-byte write",
                    buf.len()
                ))
                .into());
            }
            vol.write_vec(buf, offset())?;
            Ok(0)
        }
        RequestType::Out => {
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                for_each_piece(&req.data, done, n as u64, |addr, r| {
                    mem.read_slice(&mut buf[r], addr)
                })?;
                vol.write_at(&buf[..n], offset() + done)?;
                done += n as u64;
            }
            Ok(0)
        }
        RequestType::Flush => {
            vol.flush()?;
            Ok(0)
        }
        RequestType::GetId => {
            let mut id = [0u8; ID_BYTES];
            let name = dev.name.as_bytes();
            let n = name.len().min(ID_BYTES);
            id[..n].copy_from_slice(&name[..n]);
            let len = len.min(ID_BYTES as u64);
            for_each_piece(&req.data, 0, len, |addr, r| mem.write_slice(&id[r], addr))?;
            Ok(len)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            for r in &req.ranges {
                let bytes = u64::from(r.num_sectors) * SECTOR_SIZE;
                if bytes == 0 {
                    continue;
                }
                if req.request_type == RequestType::WriteZeroes {
                    vol.write_zeroes(r.sector * SECTOR_SIZE, bytes)?;
                } else {
                    vol.discard(r.sector * SECTOR_SIZE, bytes)?;
                }
            }
            Ok(0)
        }
        RequestType::Unsupported(t) => Err(blk::RequestError::Unsupported(t).into()),
    }
}

/// Calls `f(guest address, range in the piece)` for each part of bytes
/// `[from, from + len)` of the stream over `segs`.
fn for_each_piece(
    segs: &[Segment],
    from: u64,
    len: u64,
    mut f: impl FnMut(vm_memory::GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
) -> Result<(), GuestMemoryError> {
    let end = from + len;
    let mut pos = 0u64;
    for s in segs {
        let seg_end = pos + u64::from(s.len);
        let (a, b) = (pos.max(from), seg_end.min(end));
        if a < b {
            // Inside a segment the parser checked in guest memory.
            let addr = vm_memory::GuestAddress(s.addr.0 + (a - pos));
            f(addr, (a - from) as usize..(b - from) as usize)?;
        }
        pos = seg_end;
        if pos >= end {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const MAX: u64 = 64 << 10;

    fn mem(kind: u32) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        m.write_obj(kind.to_le(), GuestAddress(0x1000)).unwrap();
        m
    }

    /// Header at 0x1000, then data descriptors of `lens`, then the status.
    fn chain(lens: &[u32]) -> Vec<Descriptor> {
        let mut d = vec![Descriptor::new(0x1000, 16, 0, 0)];
        d.extend(lens.iter().map(|l| Descriptor::new(0x2000, *l, 0, 0)));
        d.push(Descriptor::new(0x3000, 1, 0, 0));
        d
    }

    #[test]
    fn only_small_writes_and_reads_are_small_ones() {
        let out = mem(VIRTIO_BLK_T_OUT);
        assert!(is_write_of_at_most(&out, chain(&[4096]).into_iter(), MAX));
        assert!(is_write_of_at_most(
            &out,
            chain(&[32 << 10, 32 << 10]).into_iter(),
            MAX
        ));
        // One byte over, however it is split.
        assert!(!is_write_of_at_most(
            &out,
            chain(&[32 << 10, (32 << 10) + 1]).into_iter(),
            MAX
        ));
        assert!(!is_write_of_at_most(
            &out,
            chain(&[1 << 20]).into_iter(),
            MAX
        ));
        // Header, data and status in one descriptor count the same.
        let one = vec![Descriptor::new(0x1000, 16 + 4096 + 1, 0, 0)];
        assert!(is_write_of_at_most(&out, one.into_iter(), MAX));
        // Reads, an empty chain and a header outside guest memory are not.
        let read = mem(VIRTIO_BLK_T_IN);
        assert!(!is_write_of_at_most(&read, chain(&[4096]).into_iter(), MAX));
        // Reads the same way, by their own type.
        assert!(is_read_of_at_most(&read, chain(&[4096]).into_iter(), MAX));
        assert!(!is_read_of_at_most(
            &read,
            chain(&[1 << 20]).into_iter(),
            MAX
        ));
        assert!(!is_read_of_at_most(&out, chain(&[4096]).into_iter(), MAX));
        assert!(!is_write_of_at_most(&out, std::iter::empty(), MAX));
        let outside = vec![Descriptor::new(2 << 20, 16, 0, 0)];
        assert!(!is_write_of_at_most(&out, outside.into_iter(), MAX));
        // A header split over descriptors is left to the parser.
        let split = vec![
            Descriptor::new(0x1000, 2, 0, 0),
            Descriptor::new(0x1002, 14, 0, 0),
            Descriptor::new(0x3000, 1, 0, 0),
        ];
        assert!(!is_write_of_at_most(&out, split.into_iter(), MAX));
        // Lengths past a u32 sum and a limit near u64::MAX do not overflow;
        // an endless chain ends.
        let huge = chain(&[u32::MAX, u32::MAX]);
        assert!(!is_write_of_at_most(&out, huge.clone().into_iter(), MAX));
        assert!(is_write_of_at_most(&out, huge.into_iter(), u64::MAX));
        let endless = std::iter::repeat(Descriptor::new(0x1000, 0, 0, 0));
        assert!(!is_write_of_at_most(&out, endless, MAX));
    }
}
