//! The KVM objects, one module each: the system handle, guest memory, the
//! VM and its vCPUs.

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
