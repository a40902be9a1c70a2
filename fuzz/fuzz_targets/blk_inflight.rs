//! virtio-blk's asynchronous completion path: `block::inflight::QueueServer`
//! pops the fuzz input's chains, parses them and starts reads, writes and
//! flushes on an engine that the fuzz input drives too: it finishes ops in
//! any order, in full, short, failed, with more bytes than asked, under
//! tokens that were never handed out, or not at all until the server drops
//! (reset). The engine checks that every op's buffers lie inside guest
//! memory and within the depth it allows; at the end nothing is left in
//! flight.

#![no_main]

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use kiln_devices::virtio::block::engine::{self, EngineSlot, IoDone, IoEngine, IoKind, IoOp};
use kiln_devices::virtio::block::inflight::QueueServer;
use kiln_devices::virtio::block::io::Disk;
use kiln_devices::virtio::block::request::RequestLimits;
use kiln_devices::virtio::block::{AsyncIo, BlockBackend};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

#[path = "common.rs"]
mod common;

const DISK_LEN: u64 = 64 * 512;

/// A disk whose synchronous path does nothing (blk_request covers it) and
/// whose asynchronous I/O goes to the fuzz engine.
struct ScriptedDisk {
    align: u64,
}

impl BlockBackend for ScriptedDisk {
    fn capacity(&self) -> u64 {
        DISK_LEN
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        assert!(offset + buf.len() as u64 <= DISK_LEN);
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        assert!(offset + buf.len() as u64 <= DISK_LEN);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Ok(())
    }
    fn async_io(&self) -> Option<AsyncIo> {
        Some(AsyncIo {
            fd: -1,
            align: self.align,
        })
    }
}

/// Host address ranges of guest memory.
fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    mem.iter()
        .map(|r| {
            let start = r.as_ptr() as usize;
            (start, start + r.len() as usize)
        })
        .collect()
}

struct ScriptedEngine {
    script: Vec<u8>,
    at: usize,
    depth: usize,
    ranges: Vec<(usize, usize)>,
    /// Pushed: token and bytes asked.
    queued: VecDeque<(u64, u64)>,
    in_flight: usize,
    notifier: EventFd,
}

impl ScriptedEngine {
    fn next(&mut self) -> u8 {
        let b = self.script.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
}

impl IoEngine for ScriptedEngine {
    fn push(&mut self, op: IoOp) -> io::Result<()> {
        if self.in_flight >= self.depth {
            return Err(io::Error::other("over depth"));
        }
        let mut asked = 0u64;
        if op.kind != IoKind::Sync {
            assert!(op.iovcnt > 0 && op.iovcnt <= 1024);
            assert!(op.offset < DISK_LEN);
            // SAFETY: IoOp's contract: iovcnt iovecs at iovecs, valid until
            // the op is reaped.
            let iovecs = unsafe { std::slice::from_raw_parts(op.iovecs, op.iovcnt as usize) };
            for v in iovecs {
                let (start, len) = (v.iov_base as usize, v.iov_len);
                assert!(len > 0, "empty iovec");
                assert!(
                    self.ranges
                        .iter()
                        .any(|&(s, e)| start >= s && start.checked_add(len).is_some_and(|x| x <= e)),
                    "iovec outside guest memory"
                );
                asked += len as u64;
            }
            assert!(
                op.offset + asked <= DISK_LEN,
                "I/O past the end of the disk"
            );
        }
        self.queued.push_back((op.token, asked));
        self.in_flight += 1;
        Ok(())
    }
    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<IoDone>) {
        let n = self.queued.len();
        for _ in 0..n {
            let Some((token, asked)) = self.queued.pop_front() else {
                break;
            };
            let b = self.next();
            let result = match b % 8 {
                // Not yet: back of the line.
                0 | 1 => {
                    self.queued.push_back((token, asked));
                    continue;
                }
                2 => -i64::from(libc::EIO),
                3 => (asked / 2) as i64,
                4 => asked as i64 + 1 + i64::from(b >> 3),
                5 => {
                    // A token never handed out, then the real one.
                    out.push(IoDone {
                        token: token + 1000 + u64::from(b),
                        result: 0,
                    });
                    asked as i64
                }
                _ => asked as i64,
            };
            out.push(IoDone { token, result });
            self.in_flight -= 1;
        }
    }
    fn wait(&mut self) -> io::Result<()> {
        // Draining: everything finishes, in full.
        self.script.clear();
        self.script.resize(self.at + self.queued.len() * 2, 7);
        Ok(())
    }
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }
    fn depth(&self) -> usize {
        self.depth
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn name(&self) -> &'static str {
        "scripted"
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::guest_memory(data);
    let mut queue = common::queue();
    let script: Vec<u8> = data.iter().rev().take(512).copied().collect();
    let first = data.first().copied().unwrap_or(0);
    let slot = EngineSlot::default();
    engine::put_back(
        &slot,
        Box::new(ScriptedEngine {
            script,
            at: 0,
            depth: usize::from(first >> 4) + 1,
            ranges: host_ranges(&mem),
            queued: VecDeque::new(),
            in_flight: 0,
            notifier: EventFd::new(0).expect("eventfd"),
        }),
    );
    let disk = Disk {
        backend: Arc::new(ScriptedDisk {
            align: if first & 2 != 0 { 512 } else { 1 },
        }),
        read_only: first & 1 == 1,
        serial: *b"kiln-fuzz-serial-000",
        counters: Arc::default(),
    };
    let limits = RequestLimits {
        capacity_sectors: DISK_LEN / 512,
        seg_max: u32::from(common::QUEUE_SIZE) - 2,
        max_range_sectors: 32,
        max_ranges: 4,
    };
    let mut server = QueueServer::new(mem.clone(), disk, limits, Some(&slot));
    for _ in 0..32 {
        server.process_queue(&mut queue, None);
        server.reap(&mut queue);
        if server.in_flight() == 0 && !server.is_stalled() {
            break;
        }
    }
    // A reset with whatever is still in flight.
    drop(server);
    let engine = engine::take(&slot).expect("the engine is handed back");
    assert_eq!(engine.in_flight(), 0, "the server drained every op");
});
