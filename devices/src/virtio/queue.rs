//! Helpers shared by the device workers for driving a split virtqueue.

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::interrupt::Interrupt;

/// Interrupts the guest if the used ring changed in a way it asked to hear
/// about (`VIRTIO_RING_F_EVENT_IDX` aware). On a ring access error we
/// interrupt anyway: a spurious interrupt is harmless, a lost one hangs I/O.
pub(crate) fn notify_if_needed(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    let needed = queue.needs_notification(mem).unwrap_or_else(|e| {
        warn!("cannot read the used-event index: {e}");
        true
    });
    if needed {
        if let Err(e) = interrupt.signal_used_queue() {
            warn!("cannot raise the device interrupt: {e}");
        }
    }
}

/// Returns a chain to the guest, logging when the guest made that impossible
/// (a head index outside the queue or a used ring outside guest memory).
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            warn!("cannot return descriptor chain {head} to the used ring: {e}");
            false
        }
    }
}
