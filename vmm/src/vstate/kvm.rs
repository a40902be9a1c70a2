//! The /dev/kvm handle and what it can do.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Cap;

use super::vcpu_state;
use crate::arch::cpuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm-intel or kvm-amd, or enable virtualization in the firmware)")]
    NoKvm,
    #[error("permission denied on /dev/kvm: run as root or add the user to the 'kvm' group")]
    Permission,
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM lacks a capability kiln-vmm needs: {0}")]
    MissingCap(&'static str),
    #[error("cannot read the CPUID KVM supports: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("cannot read the list of MSRs KVM saves: {0}")]
    MsrList(kvm_ioctls::Error),
}

pub struct Kvm {
    pub fd: kvm_ioctls::Kvm,
    pub max_vcpus: usize,
    pub supported_cpuid: CpuId,
    /// The MSRs a vCPU snapshot holds, in restore order.
    pub msrs_to_save: Vec<u32>,
}

const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

impl Kvm {
    pub fn open() -> Result<Self, Error> {
        let fd = kvm_ioctls::Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => Error::NoKvm,
            libc::EACCES | libc::EPERM => Error::Permission,
            _ => Error::Open(e),
        })?;
        for (cap, name) in REQUIRED_CAPS {
            if !fd.check_extension(*cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let mut supported_cpuid = fd
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::Cpuid)?;
        if fd.check_extension(Cap::TscDeadlineTimer) {
            cpuid::add_tsc_deadline(&mut supported_cpuid);
        }
        let msr_list = fd.get_msr_index_list().map_err(Error::MsrList)?;
        let msrs_to_save = vcpu_state::msrs_to_save(msr_list.as_slice());
        Ok(Self {
            msrs_to_save,
            max_vcpus: fd.get_max_vcpus(),
            fd,
            supported_cpuid,
        })
    }
}
