//! Scatters a frame into every receive chain the fuzz input queues for
//! virtio-net.

#![no_main]

use kiln_devices::virtio::net::rx::write_rx_frame;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::guest_memory(data);
    let mut queue = common::queue();
    // The frame's length comes from the input too (up to 64 KiB).
    let len = data
        .get(0x300..0x302)
        .map_or(60, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let frame = vec![0xa5u8; len];
    for _ in 0..common::QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let used = write_rx_frame(&mem, chain, queue.size(), &frame).unwrap_or(0);
        assert!(used as usize == len || used == 0);
        let _ = queue.add_used(&mem, head, used);
    }
});
