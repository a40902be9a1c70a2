//! vhost-user-blk: a virtio-blk disk whose queues an external process serves.
//!
//! kiln-vmm keeps the virtio-mmio transport and the configuration space;
//! the backend (a vhost-user-blk server such as kiln-store or
//! qemu-storage-daemon) maps guest RAM from the memfd kiln-vmm hands it and
//! processes the rings itself. The guest's queue notifications reach it
//! straight from KVM (the queue's ioeventfd is its kick fd) and its used-ring
//! interrupts go straight to KVM (the device's irqfd is its call fd), so no
//! request passes through kiln-vmm.
//!
//! `handshake` connects and negotiates when the VMM is built; `session`
//! hands the rings over when the driver sets DRIVER_OK and takes them back on
//! reset; `device` is the model the transport sees.
//!
//! A backend that goes away while the guest runs is logged as an error; the
//! guest's I/O on that disk then hangs (its requests are never completed)
//! until the VM is restarted with a backend, and a later activation of the
//! device fails (NEEDS_RESET). The backend is trusted to answer: one that
//! accepts the connection but never replies blocks kiln-vmm's start (the
//! handshake runs on the main thread) or the vCPU that activates the device
//! (which waits for the worker's handshake), because the vhost crate retries
//! a timed-out receive forever. Not supported yet: several queues
//! (`VIRTIO_BLK_F_MQ`), config-change notifications from the backend (they
//! need `VHOST_USER_PROTOCOL_F_BACKEND_REQ`), reconnecting to a restarted
//! backend.

pub mod device;
pub mod handshake;
mod session;

pub use device::{Error, VhostUserBlock, VhostUserBlockConfig};
pub use handshake::Negotiated;

#[cfg(test)]
mod tests;
