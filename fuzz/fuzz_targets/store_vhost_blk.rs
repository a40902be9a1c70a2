//! kiln-store's vhost-user-blk request parser and executor
//! (`vhost_blk::request::handle_chain`) on every request the fuzz input
//! queues, over an in-memory volume that checks every access is in range;
//! and the queue thread's look ahead (`is_write_of_at_most`).

#![no_main]

use std::sync::Mutex;

use kiln_store::error::Result;
use kiln_store::vhost_blk::request::{handle_chain, is_write_of_at_most, Device, LogLimiter};
use kiln_store::VolumeIo;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

#[path = "common.rs"]
mod common;

const VOLUME_LEN: usize = 64 * 512;

struct MemVolume(Mutex<Vec<u8>>);

impl MemVolume {
    /// The parser promised an in-range request: check that it kept it.
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).expect("offset fits");
        let end = start
            .checked_add(usize::try_from(len).expect("len fits"))
            .expect("no overflow");
        assert!(end <= VOLUME_LEN, "request past the end of the volume");
        start..end
    }
}

impl VolumeIo for MemVolume {
    fn size(&self) -> Result<u64> {
        Ok(VOLUME_LEN as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = self.range(offset, buf.len() as u64);
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.range(offset, len);
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::guest_memory(data);
    let mut queue = common::queue();
    let volume = MemVolume(Mutex::new(vec![0; VOLUME_LEN]));
    let log = LogLimiter::default();
    let dev = Device {
        name: "fuzz",
        volume: &volume,
        log: &log,
        // Both modes: a read-only export refuses writes before touching the
        // volume.
        read_only: data.first().is_some_and(|b| b & 1 == 1),
    };
    for _ in 0..common::QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        // The used length counts only device-writable bytes of the chain.
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        // The queue thread's look at a chain before it is parsed (whether
        // to serve it there) reads guest memory too.
        let small_write = is_write_of_at_most(&mem, chain.clone(), 64 << 10);
        let before = volume.0.lock().unwrap().clone();
        let used = handle_chain(&mem, chain, &dev);
        if small_write {
            // Only a write changes the volume, and a small one at most
            // 64 KiB of it.
            let after = volume.0.lock().unwrap();
            let changed = before.iter().zip(after.iter()).filter(|(a, b)| a != b).count();
            assert!(changed <= 64 << 10, "a small write changed {changed} bytes");
        }
        assert!(u64::from(used) <= writable, "used {used} of {writable} writable bytes");
        let _ = queue.add_used(&mem, head, used);
    }
});
