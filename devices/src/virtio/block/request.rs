//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! Pure code over guest memory: nothing here touches the disk. Everything the
//! guest controls (descriptor directions, addresses, lengths, sector numbers)
//! is checked, so that executing a parsed [`Request`] cannot go outside guest
//! memory or the disk.
//!
//! A request is laid out as (virtio 1.2, 5.2.6):
//! `[header: 16 bytes, device-readable] [data...] [status: 1 byte, device-writable]`.

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
    fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
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
    /// Data buffers, in order (IN/OUT/GET_ID).
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
    /// Maximum data descriptors per request (`seg_max`).
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
    #[error("no usable status descriptor (missing, device-readable or empty)")]
    BadStatusDescriptor,
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("the header descriptor is device-writable")]
    HeaderWriteOnly,
    #[error("the header descriptor holds {0} bytes, less than 16")]
    HeaderTooShort(u32),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("a data descriptor of a {0:?} request has the wrong direction")]
    WrongDirection(RequestType),
    #[error("a data descriptor has zero length")]
    ZeroLengthData,
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
pub fn parse<M: GuestMemory>(
    mem: &M,
    chain: impl IntoIterator<Item = Descriptor>,
    limits: &RequestLimits,
) -> Result<Request, Rejected> {
    let mut descs = chain.into_iter();
    let reject = |error| Rejected {
        error,
        status: None,
    };
    let header = descs.next().ok_or(reject(RequestError::EmptyChain))?;

    // Walk to the end keeping at most seg_max + 1 data descriptors (one more
    // than allowed, to notice the excess) and the last one separately.
    let cap = limits.seg_max as usize + 1;
    let mut data = Vec::new();
    let mut data_count = 0usize;
    let mut last: Option<Descriptor> = None;
    for d in descs {
        if let Some(prev) = last.replace(d) {
            data_count += 1;
            if data.len() < cap {
                data.push(prev);
            }
        }
    }
    let Some(last) = last else {
        // A lone descriptor: either the walk stopped or there is no status.
        return Err(reject(if header.has_next() {
            RequestError::Truncated
        } else {
            RequestError::BadStatusDescriptor
        }));
    };
    if last.has_next() {
        return Err(reject(RequestError::Truncated));
    }
    let status = status_address(mem, &last).ok_or(reject(RequestError::BadStatusDescriptor))?;
    let reject = |error| Rejected {
        error,
        status: Some(status),
    };

    let header = read_header(mem, &header).map_err(reject)?;
    let request_type = RequestType::from(header.0);
    if let RequestType::Unsupported(t) = request_type {
        return Err(reject(RequestError::Unsupported(t)));
    }
    if data_count > limits.seg_max as usize {
        return Err(reject(RequestError::TooManySegments(data_count)));
    }
    let (segments, data_len) = data_segments(mem, &data, request_type).map_err(reject)?;

    let mut req = Request {
        request_type,
        sector: header.1,
        data: segments,
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
        RequestType::Flush => {
            if data_len != 0 {
                return Err(reject(RequestError::UnexpectedData));
            }
        }
        RequestType::GetId => {
            if data_len == 0 {
                return Err(reject(RequestError::MissingData(request_type)));
            }
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            req.ranges = read_ranges(mem, &req, limits).map_err(reject)?;
        }
        RequestType::Unsupported(_) => {}
    }
    Ok(req)
}

/// The status byte's address, if `desc` can hold it.
fn status_address<M: GuestMemory>(mem: &M, desc: &Descriptor) -> Option<GuestAddress> {
    (desc.is_write_only() && desc.len() >= 1 && mem.check_range(desc.addr(), 1, Permissions::Write))
        .then_some(desc.addr())
}

/// Reads `(type, sector)` from the header descriptor.
fn read_header<M: GuestMemory>(mem: &M, desc: &Descriptor) -> Result<(u32, u64), RequestError> {
    if desc.is_write_only() {
        return Err(RequestError::HeaderWriteOnly);
    }
    if desc.len() < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(desc.len()));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, desc.addr())
        .map_err(|_| RequestError::OutsideGuestMemory {
            addr: desc.addr().0,
            len: HEADER_LEN,
        })?;
    let (t, rest) = raw.split_at(4);
    let sector = &rest[4..12];
    let t = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(sector);
    Ok((t, u64::from_le_bytes(s)))
}

/// Checks the data descriptors' directions and addresses.
fn data_segments<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    request_type: RequestType,
) -> Result<(Vec<Segment>, u64), RequestError> {
    let writes = request_type.device_writes_data();
    let mut total = 0u64;
    let mut segments = Vec::with_capacity(descs.len());
    for d in descs {
        if d.is_write_only() != writes {
            return Err(RequestError::WrongDirection(request_type));
        }
        if d.len() == 0 {
            return Err(RequestError::ZeroLengthData);
        }
        let access = if writes {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::OutsideGuestMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        total += u64::from(d.len());
        segments.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok((segments, total))
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
fn read_ranges<M: GuestMemory>(
    mem: &M,
    req: &Request,
    limits: &RequestLimits,
) -> Result<Vec<SectorRange>, RequestError> {
    let len = req.data_len;
    if len == 0 || !len.is_multiple_of(u64::from(RANGE_LEN)) {
        return Err(RequestError::BadRangeList(len));
    }
    let count = len / u64::from(RANGE_LEN);
    if count > u64::from(limits.max_ranges) {
        return Err(RequestError::TooManyRanges(count));
    }
    // At most max_ranges * 16 bytes: small.
    let mut raw = Vec::with_capacity(len as usize);
    for seg in &req.data {
        let start = raw.len();
        raw.resize(start + seg.len as usize, 0);
        mem.read_slice(&mut raw[start..], seg.addr).map_err(|_| {
            RequestError::OutsideGuestMemory {
                addr: seg.addr.0,
                len: seg.len,
            }
        })?;
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    pub(crate) const HDR: u64 = 0x10_0000;
    pub(crate) const DATA: u64 = 0x20_0000;
    pub(crate) const STATUS: u64 = 0x30_0000;
    pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;

    pub(crate) fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    pub(crate) fn limits() -> RequestLimits {
        RequestLimits {
            capacity_sectors: 64,
            seg_max: 4,
            max_range_sectors: 32,
            max_ranges: 2,
        }
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    pub(crate) fn write_header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Parses the chain built from `descs` (NEXT flags and indexes are set
    /// by the mock).
    fn parse_chain(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, Rejected> {
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(mem, chain, &limits())
    }

    fn io_request(t: u32, sector: u64, data: &[RawDescriptor]) -> Result<Request, Rejected> {
        let m = mem();
        write_header(&m, t, sector);
        let mut descs = vec![desc(HDR, 16, 0)];
        descs.extend_from_slice(data);
        descs.push(desc(STATUS, 1, W));
        parse_chain(&m, &descs)
    }

    fn rejected_with_status(r: Result<Request, Rejected>) -> RequestError {
        let r = r.unwrap_err();
        assert_eq!(r.status, Some(GuestAddress(STATUS)), "{:?}", r.error);
        r.error
    }

    #[test]
    fn parses_a_read() {
        let req = io_request(
            VIRTIO_BLK_T_IN,
            3,
            &[desc(DATA, 512, W), desc(DATA + 0x1000, 1024, W)],
        )
        .unwrap();
        assert_eq!(req.request_type, RequestType::In);
        assert_eq!(req.sector, 3);
        assert_eq!(req.data_len, 1536);
        assert_eq!(req.data.len(), 2);
        assert_eq!(req.status, GuestAddress(STATUS));
    }

    #[test]
    fn parses_write_flush_and_get_id() {
        let req = io_request(VIRTIO_BLK_T_OUT, 63, &[desc(DATA, 512, 0)]).unwrap();
        assert_eq!(req.request_type, RequestType::Out);
        let req = io_request(VIRTIO_BLK_T_FLUSH, 0, &[]).unwrap();
        assert_eq!(req.request_type, RequestType::Flush);
        let req = io_request(VIRTIO_BLK_T_GET_ID, 0, &[desc(DATA, 20, W)]).unwrap();
        assert_eq!(req.request_type, RequestType::GetId);
    }

    #[test]
    fn unknown_types_are_unsupported_with_a_status() {
        let e = rejected_with_status(io_request(0x1234, 0, &[]));
        assert_eq!(e, RequestError::Unsupported(0x1234));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn wrong_direction_data_is_an_io_error() {
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 512, 0)]));
        assert_eq!(e, RequestError::WrongDirection(RequestType::In));
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_OUT, 0, &[desc(DATA, 512, W)]));
        assert_eq!(e, RequestError::WrongDirection(RequestType::Out));
    }

    #[test]
    fn requests_past_the_end_of_the_disk_fail() {
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_IN, 64, &[desc(DATA, 512, W)]));
        assert!(matches!(e, RequestError::OutOfRange { sector: 64, .. }));
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_OUT, 63, &[desc(DATA, 1024, 0)]));
        assert!(matches!(e, RequestError::OutOfRange { .. }));
        // sector * 512 overflows u64.
        let e = rejected_with_status(io_request(
            VIRTIO_BLK_T_IN,
            u64::MAX / 2,
            &[desc(DATA, 512, W)],
        ));
        assert!(matches!(e, RequestError::OutOfRange { .. }));
        // start + len overflows u64.
        let e = rejected_with_status(io_request(
            VIRTIO_BLK_T_IN,
            u64::MAX >> SECTOR_SHIFT,
            &[desc(DATA, 512, W)],
        ));
        assert!(matches!(e, RequestError::OutOfRange { .. }));
    }

    #[test]
    fn unaligned_lengths_fail() {
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 511, W)]));
        assert_eq!(e, RequestError::UnalignedLength(511));
    }

    #[test]
    fn zero_length_data_fails() {
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 0, W)]));
        assert_eq!(e, RequestError::ZeroLengthData);
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_GET_ID, 0, &[]));
        assert_eq!(e, RequestError::MissingData(RequestType::GetId));
    }

    #[test]
    fn flush_with_data_fails() {
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_FLUSH, 0, &[desc(DATA, 512, 0)]));
        assert_eq!(e, RequestError::UnexpectedData);
    }

    #[test]
    fn data_outside_guest_memory_fails() {
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_IN, 0, &[desc(0x3f_ff00, 512, W)]));
        assert!(matches!(e, RequestError::OutsideGuestMemory { .. }));
        let e = rejected_with_status(io_request(
            VIRTIO_BLK_T_OUT,
            0,
            &[desc(u64::MAX - 100, 512, 0)],
        ));
        assert!(matches!(e, RequestError::OutsideGuestMemory { .. }));
    }

    #[test]
    fn too_many_segments_fail() {
        let data: Vec<_> = (0..5).map(|i| desc(DATA + i * 512, 512, W)).collect();
        let e = rejected_with_status(io_request(VIRTIO_BLK_T_IN, 0, &data));
        assert_eq!(e, RequestError::TooManySegments(5));
    }

    #[test]
    fn bad_headers_fail_with_a_status() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 0);
        let e = parse_chain(&m, &[desc(HDR, 8, 0), desc(STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::HeaderTooShort(8));
        assert_eq!(e.status, Some(GuestAddress(STATUS)));
        let e = parse_chain(&m, &[desc(HDR, 16, W), desc(STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::HeaderWriteOnly);
        let e = parse_chain(&m, &[desc(0x3f_fff8, 16, 0), desc(STATUS, 1, W)]).unwrap_err();
        assert!(matches!(e.error, RequestError::OutsideGuestMemory { .. }));
    }

    #[test]
    fn unusable_status_descriptors_leave_no_status() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_FLUSH, 0);
        for status in [
            desc(STATUS, 1, 0),    // device-readable
            desc(STATUS, 0, W),    // empty
            desc(0x40_0000, 1, W), // outside memory
            desc(u64::MAX, 1, W),  // at the top of the address space
        ] {
            let e = parse_chain(&m, &[desc(HDR, 16, 0), status]).unwrap_err();
            assert_eq!(e.error, RequestError::BadStatusDescriptor);
            assert_eq!(e.status, None);
        }
        // A lone header.
        let e = parse_chain(&m, &[desc(HDR, 16, 0)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadStatusDescriptor);
        // A lone writable descriptor is not a request either.
        let e = parse_chain(&m, &[desc(STATUS, 1, W)]).unwrap_err();
        assert_eq!(e.error, RequestError::BadStatusDescriptor);
    }

    #[test]
    fn descriptor_loops_are_cut_and_rejected() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, n | W, 0)),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let e = parse(&m, chain, &limits()).unwrap_err();
        assert_eq!(e.error, RequestError::Truncated);
        assert_eq!(e.status, None);
    }

    #[test]
    fn next_index_outside_the_table_is_rejected() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 0);
        let q = MockSplitQueue::new(&m, 16);
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [RawDescriptor::from(Descriptor::new(HDR, 16, n, 200))];
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let e = parse(&m, chain, &limits()).unwrap_err();
        assert_eq!(e.error, RequestError::Truncated);
    }

    #[test]
    fn empty_chain_is_rejected() {
        let m = mem();
        let e = parse(&m, std::iter::empty(), &limits()).unwrap_err();
        assert_eq!(e.error, RequestError::EmptyChain);
        assert_eq!(e.status, None);
    }

    const INDIRECT: u64 = 0x8000;

    /// Parses a chain whose head points at an indirect table holding
    /// `table` (with explicit flags and next indexes).
    fn parse_indirect(m: &GuestMemoryMmap, table: &[Descriptor]) -> Result<Request, Rejected> {
        for (i, d) in table.iter().enumerate() {
            m.write_obj(
                RawDescriptor::from(*d),
                GuestAddress(INDIRECT + 16 * i as u64),
            )
            .unwrap();
        }
        let q = MockSplitQueue::new(m, 16);
        let head = Descriptor::new(
            INDIRECT,
            16 * table.len() as u32,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        );
        q.add_desc_chains(&[RawDescriptor::from(head)], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(m).unwrap().next().unwrap();
        parse(m, chain, &limits())
    }

    #[test]
    fn indirect_chains_parse() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 1);
        let n = VRING_DESC_F_NEXT as u16;
        let req = parse_indirect(
            &m,
            &[
                Descriptor::new(HDR, 16, n, 1),
                Descriptor::new(DATA, 4096, n | W, 2),
                Descriptor::new(STATUS, 1, W, 0),
            ],
        )
        .unwrap();
        assert_eq!(req.data_len, 4096);
        assert_eq!(req.sector, 1);
    }

    #[test]
    fn loops_inside_an_indirect_table_are_rejected() {
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_IN, 1);
        let n = VRING_DESC_F_NEXT as u16;
        let e = parse_indirect(
            &m,
            &[
                Descriptor::new(HDR, 16, n, 1),
                Descriptor::new(DATA, 4096, n | W, 0),
            ],
        )
        .unwrap_err();
        assert_eq!(e.error, RequestError::Truncated);
    }

    #[test]
    fn indirect_table_outside_guest_memory_is_rejected() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let head = Descriptor::new(
            0x3000_0000,
            48,
            virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
            0,
        );
        q.add_desc_chains(&[RawDescriptor::from(head)], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        let e = parse(&m, chain, &limits()).unwrap_err();
        assert_eq!(e.error, RequestError::EmptyChain);
    }

    fn range(sector: u64, n: u32, flags: u32) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&n.to_le_bytes());
        r[12..].copy_from_slice(&flags.to_le_bytes());
        r
    }

    fn range_request(t: u32, ranges: &[[u8; 16]]) -> Result<Request, Rejected> {
        let m = mem();
        write_header(&m, t, 0);
        let raw: Vec<u8> = ranges.concat();
        m.write_slice(&raw, GuestAddress(DATA)).unwrap();
        parse_chain(
            &m,
            &[
                desc(HDR, 16, 0),
                desc(DATA, raw.len() as u32, 0),
                desc(STATUS, 1, W),
            ],
        )
    }

    #[test]
    fn parses_discard_and_write_zeroes_ranges() {
        let req = range_request(VIRTIO_BLK_T_DISCARD, &[range(8, 8, 0), range(32, 32, 0)]).unwrap();
        assert_eq!(
            req.ranges,
            vec![
                SectorRange {
                    sector: 8,
                    num_sectors: 8,
                    unmap: false
                },
                SectorRange {
                    sector: 32,
                    num_sectors: 32,
                    unmap: false
                }
            ]
        );
        let req = range_request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        )
        .unwrap();
        assert!(req.ranges[0].unmap);
    }

    #[test]
    fn bad_ranges_fail() {
        let e = rejected_with_status(range_request(
            VIRTIO_BLK_T_DISCARD,
            &[range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        ));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let e = rejected_with_status(range_request(VIRTIO_BLK_T_WRITE_ZEROES, &[range(0, 1, 2)]));
        assert_eq!(e, RequestError::UnsupportedRangeFlags(2));
        let e = rejected_with_status(range_request(VIRTIO_BLK_T_DISCARD, &[range(60, 8, 0)]));
        assert!(matches!(e, RequestError::OutOfRange { .. }));
        let e = rejected_with_status(range_request(
            VIRTIO_BLK_T_DISCARD,
            &[range(u64::MAX, 1, 0)],
        ));
        assert!(matches!(e, RequestError::OutOfRange { .. }));
        let e = rejected_with_status(range_request(VIRTIO_BLK_T_DISCARD, &[range(0, 33, 0)]));
        assert_eq!(e, RequestError::RangeTooLong(33));
        let e = rejected_with_status(range_request(
            VIRTIO_BLK_T_DISCARD,
            &[range(0, 1, 0), range(1, 1, 0), range(2, 1, 0)],
        ));
        assert_eq!(e, RequestError::TooManyRanges(3));
        let e = rejected_with_status(range_request(VIRTIO_BLK_T_DISCARD, &[]));
        assert_eq!(e, RequestError::ZeroLengthData);
        let m = mem();
        write_header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let e = parse_chain(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 8, 0), desc(STATUS, 1, W)],
        );
        assert_eq!(rejected_with_status(e), RequestError::BadRangeList(8));
        let e = parse_chain(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
        assert_eq!(rejected_with_status(e), RequestError::BadRangeList(0));
    }
}
