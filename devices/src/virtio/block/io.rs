//! Carrying out a parsed virtio-blk request against a [`BlockBackend`].

use std::io;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::backend::BlockBackend;
use super::request::{Request, RequestType, SECTOR_SHIFT};
use crate::dirty;
use crate::virtio::metrics::BlockCounters;

/// Data moves between guest memory and the backend in pieces of at most
/// this size, so a huge request never needs a huge buffer.
pub const IO_CHUNK: usize = 1 << 20;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = 20;

/// Why a valid request failed (reported to the guest as `IOERR`).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("write request to a read-only disk")]
    ReadOnly,
    #[error("backend I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("the request's data buffers are shorter than its length")]
    ShortData,
}

/// The disk a request runs against.
#[derive(Clone)]
pub struct Disk {
    pub backend: Arc<dyn BlockBackend>,
    pub read_only: bool,
    pub serial: [u8; SERIAL_LEN],
    /// Completed reads and writes, for the control API.
    pub counters: Arc<BlockCounters>,
}

impl Disk {
    /// Runs `req`, returning how many bytes were written into the guest's
    /// data buffers. `bounce` is a scratch buffer kept between requests.
    pub fn execute<M: GuestMemory>(
        &self,
        mem: &M,
        req: &Request,
        bounce: &mut Vec<u8>,
    ) -> Result<u32, ExecError> {
        let writes = matches!(
            req.request_type,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.read_only {
            return Err(ExecError::ReadOnly);
        }
        match req.request_type {
            RequestType::In => {
                let n = self.read(mem, req, bounce)?;
                self.counters.read(req.data_len);
                Ok(n)
            }
            RequestType::Out => {
                self.write(mem, req, bounce)?;
                self.counters.wrote(req.data_len);
                Ok(0)
            }
            RequestType::Flush => {
                if !self.read_only {
                    self.backend.flush()?;
                }
                Ok(0)
            }
            RequestType::GetId => self.get_id(mem, req),
            RequestType::Discard => {
                for r in &req.ranges {
                    self.backend.discard(
                        r.sector << SECTOR_SHIFT,
                        u64::from(r.num_sectors) << SECTOR_SHIFT,
                    )?;
                }
                Ok(0)
            }
            RequestType::WriteZeroes => {
                for r in &req.ranges {
                    self.backend.write_zeroes(
                        r.sector << SECTOR_SHIFT,
                        u64::from(r.num_sectors) << SECTOR_SHIFT,
                        r.unmap,
                    )?;
                }
                Ok(0)
            }
            // The parser never returns these.
            RequestType::Unsupported(_) => Ok(0),
        }
    }

    /// Reads the request's span from the backend in pieces of at most
    /// [`IO_CHUNK`] (one backend call each, however many guest segments the
    /// piece covers) and scatters each piece into the guest's buffers.
    fn read<M: GuestMemory>(
        &self,
        mem: &M,
        req: &Request,
        bounce: &mut Vec<u8>,
    ) -> Result<u32, ExecError> {
        let total = req.data_len;
        let buf = scratch(bounce, chunk_len(total));
        let mut offset = req.sector << SECTOR_SHIFT;
        let mut segs = SegmentCursor::new(req);
        let mut remaining = total;
        while remaining > 0 {
            let n = (remaining as usize).min(buf.len());
            self.backend.read_at(offset, &mut buf[..n])?;
            let mut pos = 0;
            while pos < n {
                let (addr, len) = segs.next_piece(n - pos)?;
                mem.write_slice(&buf[pos..pos + len], addr)?;
                dirty::mark(addr, len as u64);
                pos += len;
            }
            offset += n as u64;
            remaining -= n as u64;
        }
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }

    /// Gathers the guest's buffers into pieces of at most [`IO_CHUNK`] and
    /// writes each piece with one backend call.
    fn write<M: GuestMemory>(
        &self,
        mem: &M,
        req: &Request,
        bounce: &mut Vec<u8>,
    ) -> Result<(), ExecError> {
        let buf = scratch(bounce, chunk_len(req.data_len));
        let mut offset = req.sector << SECTOR_SHIFT;
        let mut segs = SegmentCursor::new(req);
        let mut remaining = req.data_len;
        while remaining > 0 {
            let n = (remaining as usize).min(buf.len());
            let mut pos = 0;
            while pos < n {
                let (addr, len) = segs.next_piece(n - pos)?;
                mem.read_slice(&mut buf[pos..pos + len], addr)?;
                pos += len;
            }
            self.backend.write_at(offset, &buf[..n])?;
            offset += n as u64;
            remaining -= n as u64;
        }
        Ok(())
    }

    fn get_id<M: GuestMemory>(&self, mem: &M, req: &Request) -> Result<u32, ExecError> {
        let mut id = &self.serial[..];
        let mut written = 0u32;
        for seg in &req.data {
            if id.is_empty() {
                break;
            }
            let n = id.len().min(seg.len as usize);
            mem.write_slice(&id[..n], seg.addr)?;
            dirty::mark(seg.addr, n as u64);
            id = &id[n..];
            written += n as u32;
        }
        Ok(written)
    }
}

/// The bounce buffer size for a request moving `total` bytes.
fn chunk_len(total: u64) -> usize {
    usize::try_from(total).map_or(IO_CHUNK, |t| t.min(IO_CHUNK))
}

/// Walks a request's data segments in pieces, in order.
struct SegmentCursor<'r> {
    segs: &'r [super::request::Segment],
    index: usize,
    done: usize,
}

impl<'r> SegmentCursor<'r> {
    fn new(req: &'r Request) -> Self {
        Self {
            segs: &req.data,
            index: 0,
            done: 0,
        }
    }

    /// The next piece of guest memory: at most `max` (> 0) bytes, within
    /// one segment. Callers ask for `data_len` bytes in total, the sum of
    /// the segment lengths, so only a malformed `Request` runs out.
    fn next_piece(&mut self, max: usize) -> Result<(GuestAddress, usize), ExecError> {
        loop {
            let seg = self.segs.get(self.index).ok_or(ExecError::ShortData)?;
            let left = seg.len as usize - self.done;
            if left == 0 {
                // Zero-length or used-up segment.
                self.index += 1;
                self.done = 0;
                continue;
            }
            let len = left.min(max);
            let addr = offset_addr(seg.addr, self.done);
            self.done += len;
            return Ok((addr, len));
        }
    }
}

/// The first `n` bytes of `bounce`, grown if needed.
fn scratch(bounce: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if bounce.len() < n {
        bounce.resize(n, 0);
    }
    &mut bounce[..n]
}

/// `addr + n` for a segment already checked to lie in guest memory; should it
/// wrap anyway, the guest memory access fails rather than panicking.
fn offset_addr(addr: GuestAddress, n: usize) -> GuestAddress {
    GuestAddress(addr.0.wrapping_add(n as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::request::{SectorRange, Segment};
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;

    /// An in-memory backend.
    pub(crate) struct MemBackend(pub Mutex<Vec<u8>>);

    impl BlockBackend for MemBackend {
        fn capacity(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(offset, len, true)
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> io::Result<()> {
            let mut d = self.0.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
    }

    fn disk(read_only: bool) -> Disk {
        let mut serial = [0u8; SERIAL_LEN];
        serial[..4].copy_from_slice(b"kiln");
        Disk {
            backend: Arc::new(MemBackend(Mutex::new(
                (0..8192).map(|i| (i % 256) as u8).collect(),
            ))),
            read_only,
            serial,
            counters: Arc::default(),
        }
    }

    fn request(t: RequestType, sector: u64, data: Vec<Segment>) -> Request {
        Request {
            request_type: t,
            sector,
            data_len: data.iter().map(|s| u64::from(s.len)).sum(),
            data,
            ranges: vec![],
            status: GuestAddress(0),
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A write and a read of 2.5 MiB in uneven segments (one empty): pieces
    /// of IO_CHUNK cross segment boundaries, and every byte lands where it
    /// belongs.
    #[test]
    fn large_requests_move_in_chunks_across_segment_boundaries() {
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let d = Disk {
            backend: Arc::new(MemBackend(Mutex::new(vec![0u8; 4 << 20]))),
            read_only: false,
            serial: [0; SERIAL_LEN],
            counters: Arc::default(),
        };
        let lens = [700 << 10, 0, 1000 << 10, 860 << 10];
        let mut addr = 0x1000u64;
        let segs: Vec<Segment> = lens
            .iter()
            .map(|&len| {
                let s = Segment {
                    addr: GuestAddress(addr),
                    len,
                };
                addr += u64::from(len) + 0x1000;
                s
            })
            .collect();
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        assert!(total > 2 * IO_CHUNK);
        let pattern: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        let mut at = 0;
        for s in &segs {
            m.write_slice(&pattern[at..at + s.len as usize], s.addr)
                .unwrap();
            at += s.len as usize;
        }
        let mut bounce = Vec::new();
        d.execute(&m, &request(RequestType::Out, 8, segs.clone()), &mut bounce)
            .unwrap();
        let mut back = vec![0u8; total];
        d.backend.read_at(8 * 512, &mut back).unwrap();
        assert!(back == pattern, "the disk holds the segments in order");

        // Clear guest memory, read back through the device.
        for s in &segs {
            m.write_slice(&vec![0u8; s.len as usize], s.addr).unwrap();
        }
        let n = d
            .execute(&m, &request(RequestType::In, 8, segs.clone()), &mut bounce)
            .unwrap();
        assert_eq!(n as usize, total);
        let mut at = 0;
        for s in &segs {
            let mut b = vec![0u8; s.len as usize];
            m.read_slice(&mut b, s.addr).unwrap();
            assert!(
                b[..] == pattern[at..at + b.len()],
                "segment at {:?}",
                s.addr
            );
            at += b.len();
        }
    }

    #[test]
    fn a_request_longer_than_its_segments_fails_cleanly() {
        let (m, d) = (mem(), disk(false));
        let mut r = request(
            RequestType::In,
            0,
            vec![Segment {
                addr: GuestAddress(0x1000),
                len: 512,
            }],
        );
        r.data_len = 1024;
        assert!(matches!(
            d.execute(&m, &r, &mut Vec::new()),
            Err(ExecError::ShortData)
        ));
        r.request_type = RequestType::Out;
        assert!(matches!(
            d.execute(&m, &r, &mut Vec::new()),
            Err(ExecError::ShortData)
        ));
    }

    #[test]
    fn reads_across_segments() {
        let (m, d) = (mem(), disk(false));
        let segs = vec![
            Segment {
                addr: GuestAddress(0x1000),
                len: 512,
            },
            Segment {
                addr: GuestAddress(0x8000),
                len: 1024,
            },
        ];
        let n = d
            .execute(&m, &request(RequestType::In, 1, segs), &mut Vec::new())
            .unwrap();
        assert_eq!(n, 1536);
        let mut b = [0u8; 2];
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [0, 1]); // sector 1 starts at byte 512: 512 % 256 == 0
        m.read_slice(&mut b, GuestAddress(0x8000 + 1023)).unwrap();
        assert_eq!(b[0], ((1024 + 1023) % 256) as u8);
    }

    #[test]
    fn writes_and_refuses_on_read_only() {
        let (m, d) = (mem(), disk(false));
        m.write_slice(&[9u8; 512], GuestAddress(0x2000)).unwrap();
        let seg = vec![Segment {
            addr: GuestAddress(0x2000),
            len: 512,
        }];
        d.execute(
            &m,
            &request(RequestType::Out, 2, seg.clone()),
            &mut Vec::new(),
        )
        .unwrap();
        let mut b = [0u8; 512];
        d.backend.read_at(1024, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 9));

        let ro = disk(true);
        for t in [
            RequestType::Out,
            RequestType::Discard,
            RequestType::WriteZeroes,
        ] {
            let mut r = request(t, 2, seg.clone());
            r.ranges = vec![SectorRange {
                sector: 0,
                num_sectors: 1,
                unmap: false,
            }];
            assert!(matches!(
                ro.execute(&m, &r, &mut Vec::new()),
                Err(ExecError::ReadOnly)
            ));
        }
        // Reads and flushes still work.
        ro.execute(&m, &request(RequestType::In, 0, seg), &mut Vec::new())
            .unwrap();
        ro.execute(&m, &request(RequestType::Flush, 0, vec![]), &mut Vec::new())
            .unwrap();
    }

    #[test]
    fn get_id_writes_at_most_20_bytes() {
        let (m, d) = (mem(), disk(false));
        m.write_slice(&[0xffu8; 64], GuestAddress(0x3000)).unwrap();
        let segs = vec![
            Segment {
                addr: GuestAddress(0x3000),
                len: 2,
            },
            Segment {
                addr: GuestAddress(0x3010),
                len: 40,
            },
        ];
        let n = d
            .execute(&m, &request(RequestType::GetId, 0, segs), &mut Vec::new())
            .unwrap();
        assert_eq!(n, 20);
        let mut b = [0u8; 20];
        m.read_slice(&mut b, GuestAddress(0x3010)).unwrap();
        assert_eq!(&b[..2], b"ln");
        assert_eq!(b[18], 0xff);
    }

    #[test]
    fn zeroes_and_discards_ranges() {
        let (m, d) = (mem(), disk(false));
        for t in [RequestType::WriteZeroes, RequestType::Discard] {
            let mut r = request(t, 0, vec![]);
            r.ranges = vec![SectorRange {
                sector: 3,
                num_sectors: 2,
                unmap: false,
            }];
            d.execute(&m, &r, &mut Vec::new()).unwrap();
        }
        let mut b = vec![0u8; 8192];
        d.backend.read_at(0, &mut b).unwrap();
        assert!(b[1536..2560].iter().all(|&x| x == 0));
        assert_eq!(b[1535], 255);
        assert_eq!(b[2561], 1);
    }

    #[test]
    fn large_requests_move_in_chunks() {
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let d = Disk {
            backend: Arc::new(MemBackend(Mutex::new(vec![5u8; 0x30_0000]))),
            read_only: false,
            serial: [0; SERIAL_LEN],
            counters: Arc::default(),
        };
        let seg = vec![Segment {
            addr: GuestAddress(0x1000),
            len: 0x28_0000,
        }];
        let mut bounce = Vec::new();
        let n = d
            .execute(&m, &request(RequestType::In, 0, seg), &mut bounce)
            .unwrap();
        assert_eq!(n, 0x28_0000);
        assert_eq!(bounce.len(), IO_CHUNK);
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(0x1000 + 0x27_ffff))
            .unwrap();
        assert_eq!(b[0], 5);
    }
}
