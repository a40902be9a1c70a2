//! Gathers every transmit chain the fuzz input queues for virtio-net.

#![no_main]

use kiln_devices::virtio::net::tx::read_tx_frame;
use kiln_devices::virtio::net::MAX_BUFFER_LEN;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::guest_memory(data);
    let mut queue = common::queue();
    let mut frame = Vec::new();
    for _ in 0..common::QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        if let Ok(len) = read_tx_frame(&mem, chain, queue.size(), &mut frame) {
            assert!(len <= MAX_BUFFER_LEN && len == frame.len());
        }
        let _ = queue.add_used(&mem, head, 0);
    }
});
