//! One virtio-blk request: split a descriptor chain into its device-readable
//! and device-writable parts, validate everything the guest controls, run
//! the request on the volume and write the status byte.
//!
//! Layout (virtio 1.x, any descriptor boundaries): device-readable bytes =
//! 16-byte header {type u32, reserved u32, sector u64} + OUT data or
//! discard / write-zeroes segments; then device-writable bytes = IN / GET_ID
//! data + one status byte (the chain's last writable byte).

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::config::{ID_BYTES, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::io::VolumeIo;

/// Size of the request header.
pub const HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_SIZE: u64 = 16;
/// Bytes moved between the volume and guest memory at a time.
const CHUNK: u64 = crate::MAX_IO;

/// Why a request failed; decides the status the guest sees.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor outside guest memory")]
    BadAddress,
    #[error("request header is {0} bytes, expected {HEADER_SIZE}")]
    ShortHeader(u64),
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sector {sector} + {len} bytes is beyond the capacity of {capacity} bytes")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("segment list of {0} bytes (want 1 to {MAX_DISCARD_SEG} segments of 16 bytes)")]
    BadSegmentList(u64),
    #[error("segment of {0} sectors exceeds {MAX_DISCARD_SECTORS}")]
    SegmentTooLarge(u32),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("the device is read-only")]
    ReadOnly,
    #[error("volume I/O failed: {0}")]
    Volume(#[from] crate::Error),
}

impl RequestError {
    /// The virtio-blk status byte for this failure.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A guest-physical buffer from one descriptor.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// Guest buffers of one direction, read or written as one byte stream.
#[derive(Debug, Default)]
struct Stream(Vec<Segment>);

impl Stream {
    fn len(&self) -> u64 {
        self.0.iter().map(|s| s.len).sum()
    }

    /// Calls `f(guest address, range in the stream)` for each piece of
    /// `[from, from + len)`.
    fn for_each_piece(
        &self,
        from: u64,
        len: u64,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), GuestMemoryError>,
    ) -> Result<(), GuestMemoryError> {
        let end = from + len;
        let mut pos = 0u64;
        for s in &self.0 {
            let (a, b) = (pos.max(from), (pos + s.len).min(end));
            if a < b {
                f(
                    s.addr.unchecked_add(a - pos),
                    (a - from) as usize..(b - from) as usize,
                )?;
            }
            pos += s.len;
            if pos >= end {
                break;
            }
        }
        Ok(())
    }

    fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        from: u64,
        buf: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        self.for_each_piece(from, buf.len() as u64, |addr, r| {
            mem.read_slice(&mut buf[r], addr)
        })
    }

    fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        from: u64,
        buf: &[u8],
    ) -> Result<(), GuestMemoryError> {
        self.for_each_piece(from, buf.len() as u64, |addr, r| {
            mem.write_slice(&buf[r], addr)
        })
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

/// Serves the request in one descriptor chain; returns the used length
/// (bytes written into the chain's device-writable buffers) for the used
/// ring. A chain without a writable status byte is returned with 0 and
/// nothing written.
pub fn handle_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: impl Iterator<Item = Descriptor>,
    dev: &Device,
) -> u32 {
    let mut readable = Stream::default();
    let mut writable = Stream::default();
    let mut layout_error = None;
    // The iterator ends early, on a descriptor that still has NEXT set, when
    // the chain loops, points outside the table or at unreadable memory:
    // then the real end (and status byte) is unknown.
    let mut cut_short = false;
    for (i, d) in descriptors.enumerate() {
        if i >= MAX_DESCRIPTORS {
            cut_short = true;
            break;
        }
        cut_short = d.has_next();
        let seg = Segment {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        if seg.len == 0 {
            continue;
        }
        if d.is_write_only() {
            writable.0.push(seg);
        } else if writable.0.is_empty() {
            readable.0.push(seg);
        } else if layout_error.is_none() {
            layout_error = Some(RequestError::ReadableAfterWritable);
        }
    }
    if cut_short {
        if dev.log.allow() {
            tracing::warn!(
                volume = dev.name,
                "vhost-user-blk: descriptor chain loops, is longer than {MAX_DESCRIPTORS} or leaves the table; returned unanswered"
            );
        }
        return 0;
    }
    // The status byte: the last byte of the last writable descriptor.
    let Some(last) = writable.0.last_mut() else {
        if dev.log.allow() {
            tracing::warn!(
                volume = dev.name,
                "vhost-user-blk: request without a writable status byte, returned unanswered"
            );
        }
        return 0;
    };
    let Some(status_addr) = last.addr.checked_add(last.len - 1) else {
        return 0;
    };
    last.len -= 1;
    if last.len == 0 {
        writable.0.pop();
    }
    if !mem.check_range(status_addr, 1, Permissions::Write) {
        if dev.log.allow() {
            tracing::warn!(
                volume = dev.name,
                "vhost-user-blk: status byte outside guest memory, request returned unanswered"
            );
        }
        return 0;
    }
    let result = match layout_error {
        Some(e) => Err(e),
        None => execute(mem, &readable, &writable, dev),
    };
    let (status, written) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            if dev.log.allow() {
                tracing::warn!(volume = dev.name, error = %e, "vhost-user-blk: request failed");
            }
            (e.status(), 0)
        }
    };
    if mem.write_obj(status, status_addr).is_err() {
        return 0;
    }
    u32::try_from(written + 1).unwrap_or(u32::MAX)
}

/// Validates and runs a request; returns the bytes of data written to the
/// guest (before the status byte).
fn execute<M: GuestMemory + ?Sized>(
    mem: &M,
    readable: &Stream,
    writable: &Stream,
    dev: &Device,
) -> Result<u64, RequestError> {
    let in_memory = |stream: &Stream, access| {
        stream
            .0
            .iter()
            .all(|s| usize::try_from(s.len).is_ok_and(|len| mem.check_range(s.addr, len, access)))
    };
    if !in_memory(readable, Permissions::Read) || !in_memory(writable, Permissions::Write) {
        return Err(RequestError::BadAddress);
    }
    let rlen = readable.len();
    if rlen < HEADER_SIZE {
        return Err(RequestError::ShortHeader(rlen));
    }
    let mut hdr = [0u8; HEADER_SIZE as usize];
    readable.read(mem, 0, &mut hdr)?;
    let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
    let vol = dev.volume;
    if dev.read_only
        && matches!(
            kind,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        )
    {
        return Err(RequestError::ReadOnly);
    }
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = writable.len();
            let offset = check_range(vol, sector, len)?;
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                vol.read_at(&mut buf[..n], offset + done)?;
                writable.write(mem, done, &buf[..n])?;
                done += n as u64;
            }
            Ok(len)
        }
        VIRTIO_BLK_T_OUT => {
            let len = rlen - HEADER_SIZE;
            let offset = check_range(vol, sector, len)?;
            let mut buf = vec![0u8; len.min(CHUNK) as usize];
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK) as usize;
                readable.read(mem, HEADER_SIZE + done, &mut buf[..n])?;
                vol.write_at(&buf[..n], offset + done)?;
                done += n as u64;
            }
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            vol.flush()?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let name = dev.name.as_bytes();
            let n = name.len().min(ID_BYTES);
            id[..n].copy_from_slice(&name[..n]);
            let len = writable.len().min(ID_BYTES as u64);
            writable.write(mem, 0, &id[..len as usize])?;
            Ok(len)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            let len = rlen - HEADER_SIZE;
            if len == 0
                || len % SEGMENT_SIZE != 0
                || len / SEGMENT_SIZE > u64::from(MAX_DISCARD_SEG)
            {
                return Err(RequestError::BadSegmentList(len));
            }
            let mut raw = vec![0u8; len as usize];
            readable.read(mem, HEADER_SIZE, &mut raw)?;
            // Validate every segment before touching the volume.
            let mut ranges = Vec::new();
            for seg in raw.chunks_exact(SEGMENT_SIZE as usize) {
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                let allowed = if zeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return Err(RequestError::UnsupportedFlags(flags));
                }
                if sectors > MAX_DISCARD_SECTORS {
                    return Err(RequestError::SegmentTooLarge(sectors));
                }
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                ranges.push((check_range(vol, sector, bytes)?, bytes));
            }
            for (offset, bytes) in ranges {
                if bytes == 0 {
                    continue;
                }
                if zeroes {
                    vol.write_zeroes(offset, bytes)?;
                } else {
                    vol.discard(offset, bytes)?;
                }
            }
            Ok(0)
        }
        other => Err(RequestError::UnsupportedType(other)),
    }
}

/// Checks `len` bytes at `sector` against the volume's capacity (whole
/// sectors) and returns the byte offset.
fn check_range(vol: &dyn VolumeIo, sector: u64, len: u64) -> Result<u64, RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned(len));
    }
    let capacity = vol.size()? / SECTOR_SIZE * SECTOR_SIZE;
    match sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|o| Some((o, o.checked_add(len)?)))
    {
        Some((offset, end)) if end <= capacity => Ok(offset),
        _ => Err(out_of_range(sector, len, capacity)),
    }
}

fn out_of_range(sector: u64, len: u64, capacity: u64) -> RequestError {
    RequestError::OutOfRange {
        sector,
        len,
        capacity,
    }
}
