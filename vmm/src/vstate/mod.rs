//! The KVM objects, one module each: the system handle, guest memory, the
//! VM and its vCPUs; and their state for snapshots and migration.

pub mod dirty;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
