//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, irqfds
//! and ioeventfds.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::Kvm;
use crate::arch::layout::KVM_TSS_ADDRESS;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot set up the VM's {what}: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register guest memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

pub struct Vm {
    pub fd: VmFd,
}

impl Vm {
    /// Creates the VM with its irqchip and PIT, and maps `mem` into it.
    pub fn new(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.fd.create_vm().map_err(Error::Create)?;
        let setup = |what| move |source| Error::Setup { what, source };
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(setup("TSS address"))?;
        fd.create_irq_chip().map_err(setup("in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("PIT"))?;

        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps alive for as long as the VM exists.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(|source| Error::MemorySlot { slot, source })?;
        }
        Ok(Self { fd })
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| Error::Setup {
                what: "interrupt eventfd",
                source,
            })
    }

    /// Makes a 32-bit guest write of `datamatch` to MMIO `addr` signal `evt`
    /// inside KVM, without an exit to the VMM.
    pub fn register_mmio_ioeventfd(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), Error> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| Error::Setup {
                what: "queue notification eventfd",
                source,
            })
    }
}
