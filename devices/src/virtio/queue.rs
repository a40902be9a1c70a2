//! Helpers shared by the device workers for driving a split virtqueue.

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::interrupt::Interrupt;
use crate::dirty;

/// Records the queue's whole used ring (flags, index, elements,
/// `avail_event`) as written by kiln-vmm, for live migration's dirty
/// tracking ([`crate::dirty`]). A few hundred bytes to a few pages.
pub(crate) fn mark_used_ring(queue: &Queue) {
    let len = 4 + 8 * u64::from(queue.size()) + 2;
    dirty::mark(GuestAddress(queue.used_ring()), len);
}

/// `queue.enable_notification`, recording its write into the used ring
/// (the flags, or `avail_event` with `VIRTIO_RING_F_EVENT_IDX`).
pub(crate) fn enable_notification(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    let r = queue.enable_notification(mem);
    mark_used_ring(queue);
    r
}

/// `queue.disable_notification`, recording its write into the used ring.
pub(crate) fn disable_notification(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<(), virtio_queue::Error> {
    let r = queue.disable_notification(mem);
    mark_used_ring(queue);
    r
}

/// Interrupts the guest if the used ring changed in a way it asked to hear
/// about (`VIRTIO_RING_F_EVENT_IDX` aware). On a ring access error we
/// interrupt anyway: a spurious interrupt is harmless, a lost one hangs I/O.
pub(crate) fn notify_if_needed(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    if needs_notification(queue, mem) {
        if let Err(e) = interrupt.signal_used_queue() {
            warn!("cannot raise the device interrupt: {e}");
        }
    }
}

/// Whether the used ring changed in a way the guest asked to hear about
/// since the last time this was asked (`VIRTIO_RING_F_EVENT_IDX` aware); true
/// on a ring access error. A device that serves several queues with one
/// interrupt asks each queue that used entries, then interrupts once.
pub(crate) fn needs_notification(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.needs_notification(mem).unwrap_or_else(|e| {
        warn!("cannot read the used-event index: {e}");
        true
    })
}

/// Returns a chain to the guest, logging when the guest made that impossible
/// (a head index outside the queue or a used ring outside guest memory).
/// The used ring is marked dirty ([`crate::dirty`]) once written.
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    let r = queue.add_used(mem, head, len);
    // Even on an error: the element may be written, the index not.
    mark_used_ring(queue);
    match r {
        Ok(()) => true,
        Err(e) => {
            warn!("cannot return descriptor chain {head} to the used ring: {e}");
            false
        }
    }
}
