//! The parser on chains built with virtio-queue's mock queue.

use super::test_utils::*;
use super::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;

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
fn zero_length_descriptors_carry_nothing() {
    let req = io_request(VIRTIO_BLK_T_IN, 0, &[desc(DATA, 0, W)]).unwrap();
    assert_eq!((req.data_len, req.data.len()), (0, 0));
    let req = io_request(
        VIRTIO_BLK_T_OUT,
        0,
        &[desc(DATA, 0, 0), desc(DATA, 512, 0), desc(DATA, 0, 0)],
    )
    .unwrap();
    assert_eq!(
        req.data,
        vec![Segment {
            addr: GuestAddress(DATA),
            len: 512
        }]
    );
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
    assert_eq!(e.error, RequestError::HeaderTooShort(0));
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
    // A lone status byte has no header: an error it can carry.
    let e = parse_chain(&m, &[desc(STATUS, 1, W)]).unwrap_err();
    assert_eq!(e.error, RequestError::HeaderTooShort(0));
    assert_eq!(e.status, Some(GuestAddress(STATUS)));
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
    assert_eq!(e, RequestError::BadRangeList(0));
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

#[test]
fn descriptors_may_split_the_request_anywhere() {
    let m = mem();
    // A write whose header and data share a descriptor.
    write_header(&m, VIRTIO_BLK_T_OUT, 5);
    let req = parse_chain(&m, &[desc(HDR, 16 + 1024, 0), desc(STATUS, 1, W)]).unwrap();
    assert_eq!((req.request_type, req.sector), (RequestType::Out, 5));
    assert_eq!(
        req.data,
        vec![Segment {
            addr: GuestAddress(HDR + 16),
            len: 1024
        }]
    );
    // A read whose data and status share a descriptor.
    write_header(&m, VIRTIO_BLK_T_IN, 7);
    let req = parse_chain(&m, &[desc(HDR, 16, 0), desc(DATA, 513, W)]).unwrap();
    assert_eq!(
        req.data,
        vec![Segment {
            addr: GuestAddress(DATA),
            len: 512
        }]
    );
    assert_eq!(req.status, GuestAddress(DATA + 512));
    // A header in two pieces, then ranges in two pieces.
    write_header(&m, VIRTIO_BLK_T_DISCARD, 0);
    let r = range(8, 8, 0);
    m.write_slice(&r, GuestAddress(DATA)).unwrap();
    let req = parse_chain(
        &m,
        &[
            desc(HDR, 9, 0),
            desc(HDR + 9, 7, 0),
            desc(DATA, 3, 0),
            desc(DATA + 3, 13, 0),
            desc(STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(req.ranges.len(), 1);
    assert_eq!((req.ranges[0].sector, req.ranges[0].num_sectors), (8, 8));
}

#[test]
fn readable_after_writable_fails_with_a_status() {
    let m = mem();
    write_header(&m, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 512, 512, 0),
            desc(STATUS, 1, W),
        ],
    );
    assert_eq!(rejected_with_status(e), RequestError::ReadableAfterWritable);
    // The status byte is the last writable one, whatever follows it.
    let e = parse_chain(
        &m,
        &[desc(HDR, 16, 0), desc(STATUS, 1, W), desc(DATA, 512, 0)],
    );
    assert_eq!(rejected_with_status(e), RequestError::ReadableAfterWritable);
}

#[test]
fn every_request_kind_moves_data_one_way() {
    let m = mem();
    // A read that also carries device-readable data after its header.
    write_header(&m, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)]);
    assert_eq!(
        rejected_with_status(e),
        RequestError::WrongDirection(RequestType::In)
    );
    // A flush with a writable buffer before its status.
    write_header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let e = parse_chain(&m, &[desc(HDR, 16, 0), desc(DATA, 2, W)]);
    let e = e.unwrap_err();
    assert_eq!(
        (e.error, e.status),
        (RequestError::UnexpectedData, Some(GuestAddress(DATA + 1)))
    );
}
