//! Shared set-up: guest memory laid out by the fuzz input, and a split queue
//! of 16 entries on top of it (descriptor table at 0, avail ring at 0x100,
//! used ring at 0x200), so the real virtio-queue chain walker runs on input
//! the fuzzer controls.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const QUEUE_SIZE: u16 = 16;
const REGION: usize = 0x1_0000;

/// Two regions with a hole between them, the first filled from `data`.
pub fn guest_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION),
        (GuestAddress(0x2_0000), REGION),
    ])
    .expect("guest memory");
    let n = data.len().min(REGION);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("fill guest memory");
    mem
}

pub fn queue() -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    q
}
