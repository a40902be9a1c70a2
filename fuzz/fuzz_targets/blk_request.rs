//! Parses and runs every request the fuzz input queues for virtio-blk.

#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use kiln_devices::virtio::block::io::Disk;
use kiln_devices::virtio::block::request::{parse, RequestLimits};
use kiln_devices::virtio::block::BlockBackend;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

#[path = "common.rs"]
mod common;

const DISK_LEN: usize = 64 * 512;

struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        // The parser promised an in-range request: check that it kept it.
        let start = usize::try_from(offset).expect("offset fits");
        let end = start.checked_add(len).expect("no overflow");
        assert!(end <= DISK_LEN, "request past the end of the disk");
        Ok(start..end)
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        DISK_LEN as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let r = self.range(offset, usize::try_from(len).expect("len fits"))?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::guest_memory(data);
    let mut queue = common::queue();
    let disk = Disk {
        backend: Arc::new(MemDisk(Mutex::new(vec![0; DISK_LEN]))),
        read_only: data.first().is_some_and(|b| b & 1 == 1),
        serial: *b"kiln-fuzz-serial-000",
        counters: Arc::default(),
    };
    let limits = RequestLimits {
        capacity_sectors: (DISK_LEN / 512) as u64,
        seg_max: u32::from(common::QUEUE_SIZE) - 2,
        max_range_sectors: 32,
        max_ranges: 4,
    };
    let mut bounce = Vec::new();
    for _ in 0..common::QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let used = match parse(&mem, chain, &limits) {
            Ok(req) => {
                let status = u8::from(disk.execute(&mem, &req, &mut bounce).is_err());
                mem.write_obj(status, req.status)
                    .expect("status address was checked");
                1
            }
            Err(rejected) => match rejected.status {
                Some(addr) => {
                    mem.write_obj(rejected.error.status(), addr)
                        .expect("status address was checked");
                    1
                }
                None => 0,
            },
        };
        let _ = queue.add_used(&mem, head, used);
    }
    let _ = mem.read_obj::<u8>(GuestAddress(0));
});
