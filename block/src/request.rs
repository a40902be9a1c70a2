//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! Everything the guest controls (descriptor directions, addresses,
//! lengths, sector numbers, ranges) is checked, so that executing a parsed
//! [`Request`] cannot go outside guest memory or the disk.
//!
//! A request is a byte stream over its descriptors (virtio 1.2, 5.2.6):
//! device-readable bytes `[header: 16 bytes][OUT data or ranges]`, then
//! device-writable bytes `[IN or GET_ID data][status: 1 byte]`. Where the
//! descriptors split that stream is the driver's choice (virtio 1.2, 2.7.4:
//! a device makes no assumption about it), so a header may share its
//! descriptor with data, and data may span any number of descriptors.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// log2 of the virtio-blk sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// The virtio-blk sector: offsets in requests count these.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const RANGE_LEN: u32 = 16;
/// Serial length of GET_ID (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            t => Self::Unsupported(t),
        }
    }
}

impl RequestType {
    /// Whether the data buffers are written by the device.
    pub fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }

    /// Whether the request changes the disk (refused by a read-only one).
    pub fn changes_disk(self) -> bool {
        matches!(self, Self::Out | Self::Discard | Self::WriteZeroes)
    }
}

/// A guest buffer the request's data moves through; always inside guest
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// One range of a discard or write-zeroes request; always inside the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
    /// Write-zeroes may deallocate the range.
    pub unmap: bool,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub request_type: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data buffers, in order (IN/OUT/GET_ID; DISCARD/WRITE_ZEROES: where
    /// the ranges were read from).
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Ranges (DISCARD/WRITE_ZEROES).
    pub ranges: Vec<SectorRange>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// The device's limits a request must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Disk size in sectors.
    pub capacity_sectors: u64,
    /// Maximum data buffers per request (`seg_max`); a chain may hold two
    /// descriptors more (header and status).
    pub seg_max: u32,
    /// Maximum sectors per discard/write-zeroes range.
    pub max_range_sectors: u32,
    /// Maximum ranges per discard/write-zeroes request.
    pub max_ranges: u32,
}

/// Why a descriptor chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is empty (bad head index or descriptor table)")]
    EmptyChain,
    #[error("the descriptor chain is cut short (a loop, a bad next index or an overlong chain)")]
    Truncated,
    #[error("no usable status byte (no device-writable byte, or not in guest memory)")]
    BadStatusDescriptor,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("the request holds {0} device-readable bytes, less than its 16-byte header")]
    HeaderTooShort(u64),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a {0:?} request carries data the device would move the other way")]
    WrongDirection(RequestType),
    #[error("{0} data descriptors, more than the device's seg_max")]
    TooManySegments(usize),
    #[error("a {0:?} request needs data descriptors")]
    MissingData(RequestType),
    #[error("a flush request carries data")]
    UnexpectedData,
    #[error("data length {0} is not a multiple of the 512-byte sector")]
    UnalignedLength(u64),
    #[error("access to sector {sector} (+{len} bytes) is past the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("range list of {0} bytes is not a whole number of 16-byte ranges")]
    BadRangeList(u64),
    #[error("{0} ranges, more than the device supports")]
    TooManyRanges(u64),
    #[error("range flags {0:#x} are not supported for this request")]
    UnsupportedRangeFlags(u32),
    #[error("range of {0} sectors is longer than the device supports")]
    RangeTooLong(u32),
}

impl RequestError {
    /// The status byte to report for this error.
    pub fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::UnsupportedRangeFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain that is not a valid request, and where (if anywhere) its status
/// byte can be reported. Without a status address the chain can only be
/// returned to the guest unanswered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub error: RequestError,
    pub status: Option<GuestAddress>,
}

/// Parses a request from the descriptors of a chain (a virtio-queue
/// `DescriptorChain` or any other iterator over descriptors).
///
/// A chain the device could not walk to its end shows up as a last
/// descriptor that still has `VIRTQ_DESC_F_NEXT` set.
pub fn parse<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    limits: &RequestLimits,
) -> Result<Request, Rejected> {
    let reject = |error| Rejected {
        error,
        status: None,
    };
    // Walk to the end, keeping the buffers of at most seg_max + 2
    // descriptors (header, data, status) and counting the rest; the
    // chain's iterator is bounded by the queue (or indirect table) size.
    let cap = limits.seg_max as usize + 2;
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut count = 0usize;
    let mut last: Option<Descriptor> = None;
    let mut last_writable: Option<Descriptor> = None;
    let mut layout_error = None;
    for d in chain {
        count += 1;
        last = Some(d);
        if d.is_write_only() && d.len() > 0 {
            last_writable = Some(d);
        }
        if count > cap || d.len() == 0 {
            continue;
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            layout_error.get_or_insert(RequestError::ReadableAfterWritable);
        }
    }
    let last = last.ok_or(reject(RequestError::EmptyChain))?;
    if last.has_next() {
        return Err(reject(RequestError::Truncated));
    }
    // The status byte: the last device-writable byte.
    let status = last_writable
        .and_then(|d| status_address(mem, &d))
        .ok_or(reject(RequestError::BadStatusDescriptor))?;
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };
    if count > cap {
        return Err(reject(RequestError::TooManySegments(count - 2)));
    }
    if let Some(e) = layout_error {
        return Err(reject(e));
    }
    // Within the cap, and with no readable descriptor after a writable
    // one, the status byte ends the last writable buffer: the data before
    // it is the rest.
    if let Some(s) = writable.last_mut() {
        s.len -= 1;
        if s.len == 0 {
            writable.pop();
        }
    }
    check_memory(mem, &readable, Permissions::Read).map_err(reject)?;
    check_memory(mem, &writable, Permissions::Write).map_err(reject)?;

    let readable_len = stream_len(&readable);
    if readable_len < u64::from(HEADER_LEN) {
        return Err(reject(RequestError::HeaderTooShort(readable_len)));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    read_stream(mem, &readable, &mut raw).map_err(reject)?;
    let request_type = RequestType::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector);
    if let RequestType::Unsupported(t) = request_type {
        return Err(reject(RequestError::Unsupported(t)));
    }

    let out_data = skip(&readable, u64::from(HEADER_LEN));
    let data = match request_type {
        RequestType::Flush => {
            if !out_data.is_empty() || !writable.is_empty() {
                return Err(reject(RequestError::UnexpectedData));
            }
            Vec::new()
        }
        t if t.device_writes_data() => {
            if !out_data.is_empty() {
                return Err(reject(RequestError::WrongDirection(t)));
            }
            writable
        }
        t => {
            if !writable.is_empty() {
                return Err(reject(RequestError::WrongDirection(t)));
            }
            out_data
        }
    };
    if data.len() > limits.seg_max as usize {
        return Err(reject(RequestError::TooManySegments(data.len())));
    }
    let data_len = stream_len(&data);
    let mut req = Request {
        request_type,
        sector,
        data,
        data_len,
        ranges: Vec::new(),
        status,
    };
    match request_type {
        RequestType::In | RequestType::Out => {
            if data_len % SECTOR_SIZE != 0 {
                return Err(reject(RequestError::UnalignedLength(data_len)));
            }
            check_range(req.sector, data_len, limits).map_err(reject)?;
        }
        RequestType::GetId => {
            if data_len == 0 {
                return Err(reject(RequestError::MissingData(request_type)));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            req.ranges = read_ranges(mem, &req, limits).map_err(reject)?;
        }
        RequestType::Flush | RequestType::Unsupported(_) => {}
    }
    Ok(req)
}

/// The status byte's address (the last byte of `desc`, writable and not
/// empty), if guest memory holds it.
fn status_address<M: GuestMemory + ?Sized>(mem: &M, desc: &Descriptor) -> Option<GuestAddress> {
    let addr = desc.addr().0.checked_add(u64::from(desc.len()) - 1)?;
    mem.check_range(GuestAddress(addr), 1, Permissions::Write)
        .then_some(GuestAddress(addr))
}

/// Checks that every buffer lies in guest memory with `access`.
fn check_memory<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    access: Permissions,
) -> Result<(), RequestError> {
    match segs
        .iter()
        .find(|s| !mem.check_range(s.addr, s.len as usize, access))
    {
        Some(s) => Err(RequestError::OutsideGuestMemory {
            addr: s.addr.0,
            len: s.len,
        }),
        None => Ok(()),
    }
}

fn stream_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The buffers of `segs` after its first `n` bytes.
fn skip(segs: &[Segment], mut n: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX, and addr + len was checked in guest memory.
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + n),
            len: s.len - n as u32,
        });
        n = 0;
    }
    out
}

/// Fills `buf` from the start of the byte stream over `segs`.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| RequestError::OutsideGuestMemory {
                addr: s.addr.0,
                len: s.len,
            })?;
        done += n;
    }
    Ok(())
}

/// Checks that `len` bytes from `sector` lie inside the disk.
fn check_range(sector: u64, len: u64, limits: &RequestLimits) -> Result<(), RequestError> {
    let capacity = limits.capacity_sectors.saturating_mul(SECTOR_SIZE);
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len));
    match end {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange { sector, len }),
    }
}

/// Reads and checks the `virtio_blk_discard_write_zeroes` ranges.
fn read_ranges<M: GuestMemory + ?Sized>(
    mem: &M,
    req: &Request,
    limits: &RequestLimits,
) -> Result<Vec<SectorRange>, RequestError> {
    let len = req.data_len;
    if len == 0 || len % u64::from(RANGE_LEN) != 0 {
        return Err(RequestError::BadRangeList(len));
    }
    let count = len / u64::from(RANGE_LEN);
    if count > u64::from(limits.max_ranges) {
        return Err(RequestError::TooManyRanges(count));
    }
    // At most max_ranges * 16 bytes: small.
    let mut raw = vec![0u8; len as usize];
    read_stream(mem, &req.data, &mut raw)?;
    let allowed_flags = match req.request_type {
        RequestType::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        _ => 0,
    };
    raw.chunks_exact(RANGE_LEN as usize)
        .map(|r| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&r[0..8]);
            let sector = u64::from_le_bytes(sector);
            let num_sectors = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
            let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
            if flags & !allowed_flags != 0 {
                return Err(RequestError::UnsupportedRangeFlags(flags));
            }
            if num_sectors > limits.max_range_sectors {
                return Err(RequestError::RangeTooLong(num_sectors));
            }
            check_range(sector, u64::from(num_sectors) << SECTOR_SHIFT, limits)?;
            Ok(SectorRange {
                sector,
                num_sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
mod tests;
