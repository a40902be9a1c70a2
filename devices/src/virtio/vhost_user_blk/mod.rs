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
//! device fails (NEEDS_RESET). A backend that accepts the connection but
//! never answers gets a deadline: the handshake at start has 10 s
//! (`handshake::START_DEADLINE`), a vCPU activating or resetting the device
//! waits 5 s (`handshake::VCPU_DEADLINE`); then kiln-vmm shuts the socket
//! down (the vhost crate would otherwise retry its receive forever) and
//! reports an error naming the socket, or fails the device.
//!
//! Several queues (`VIRTIO_BLK_F_MQ`): with `queues=N`, kiln-vmm negotiates
//! `VHOST_USER_PROTOCOL_F_MQ`, checks GET_QUEUE_NUM >= N, shows the guest
//! `num_queues` = N and hands over the rings the driver set up. Config
//! changes: when the backend offers `VHOST_USER_PROTOCOL_F_BACKEND_REQ`,
//! kiln-vmm gives it a request channel (SET_BACKEND_REQ_FD); on
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` the worker rereads the config
//! space (GET_CONFIG) and raises the config-change interrupt, so a resized
//! volume shows its new size to the guest. The channel is served while the
//! device is active; a message sent before that waits in the socket. Not
//! supported yet: reconnecting to a restarted backend.
//!
//! Live migration: when the backend offers `VHOST_F_LOG_ALL` and
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, a migration has it log every guest
//! page it writes (`log_base`, [`crate::dirty::BackendLog`]): the device
//! stops and restarts its rings once with LOG_ALL acked, the log handed
//! over (SET_LOG_BASE after SET_MEM_TABLE) and each used ring's address as
//! its log address. Without it the migration sends all guest RAM again
//! while the VM is paused.

pub mod device;
pub mod handshake;
mod log_base;
mod session;

pub use device::{Error, FindBackend, VhostUserBlock, VhostUserBlockConfig};
pub use handshake::Negotiated;

#[cfg(test)]
mod tests;
