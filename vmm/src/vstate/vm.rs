//! The KVM VM: guest memory slots, the in-kernel irqchip and PIT, irqfds
//! and ioeventfds.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, kvm_xsave, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
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
    /// Guest RAM's memory slots, as registered (slot = index), in guest
    /// address order. Dirty logging re-registers them with a flag.
    pub(super) slots: Vec<kvm_userspace_memory_region>,
    /// The MSRs a vCPU snapshot holds (from [`Kvm::msrs_to_save`]).
    pub(super) msr_list: Arc<[u32]>,
    /// The XSAVE area's size in bytes (KVM_CAP_XSAVE2; 4096 without it).
    pub(super) xsave_size: usize,
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

        let xsave_size = usize::try_from(fd.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(std::mem::size_of::<kvm_xsave>());
        let mut vm = Self {
            fd,
            slots: Vec::new(),
            msr_list: kvm.msrs_to_save.clone().into(),
            xsave_size,
        };
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps alive for as long as the VM exists.
            unsafe { vm.set_slot(r) }?;
            vm.slots.push(r);
        }
        Ok(vm)
    }

    /// Registers (or re-registers, with other flags) a memory slot.
    ///
    /// # Safety
    /// `r` must describe a live mapping of guest RAM that outlives the VM.
    pub(super) unsafe fn set_slot(&self, r: kvm_userspace_memory_region) -> Result<(), Error> {
        // SAFETY: the caller's promise.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| Error::MemorySlot {
            slot: r.slot,
            source,
        })
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
