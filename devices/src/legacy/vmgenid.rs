//! The VM generation id (Microsoft's "Virtual Machine Generation ID"
//! specification; Linux's `drivers/virt/vmgenid.c`, `CONFIG_VMGENID`).
//!
//! 16 random bytes at a fixed guest address that change whenever the VM
//! may have been duplicated or rolled back: after a restore from a snapshot
//! or a live migration. The DSDT describes the device (`_CID
//! "VM_Gen_Counter"`, an `ADDR` method returning the address); after writing
//! a new id the VMM raises the Generic Event Device's [`EVENT_VMGENID`],
//! whose `_EVT` does `Notify (\_SB_.VGEN, 0x80)`. Linux then compares the
//! id with the one it saw and, if it changed, reseeds its RNG
//! (`add_vmfork_randomness`), so that two restored copies of one snapshot
//! stop producing the same random numbers.

use std::io;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::ged::EVENT_POWER_BUTTON;

/// GED event bit: the VM generation id changed.
pub const EVENT_VMGENID: u8 = 1 << 1;
const _: () = assert!(EVENT_VMGENID & EVENT_POWER_BUTTON == 0);

/// Length of the generation id.
pub const VMGENID_LEN: usize = 16;

/// Errors writing a generation id.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot get random bytes for the VM generation id: {0}")]
    Random(#[source] io::Error),
    #[error("cannot write the VM generation id at guest address {addr:#x}: {source}")]
    GuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The generation id of one VM and where the guest finds it.
#[derive(Debug)]
pub struct VmGenId {
    addr: GuestAddress,
    id: [u8; VMGENID_LEN],
}

impl VmGenId {
    /// Writes a fresh random id at `addr` (a reserved, non-RAM page the
    /// DSDT's `ADDR` method points to). Also what a restore does when it has
    /// no `VmGenId` of its own: the new id differs from the snapshot's.
    pub fn new<M: GuestMemory>(mem: &M, addr: GuestAddress) -> Result<Self, Error> {
        let mut g = Self {
            addr,
            id: [0; VMGENID_LEN],
        };
        g.regenerate(mem)?;
        Ok(g)
    }

    /// Writes a new random id. Then raise the GED's [`EVENT_VMGENID`] so
    /// that the guest reads it.
    pub fn regenerate<M: GuestMemory>(&mut self, mem: &M) -> Result<(), Error> {
        let id = random_id().map_err(Error::Random)?;
        mem.write_slice(&id, self.addr)
            .map_err(|source| Error::GuestMemory {
                addr: self.addr.0,
                source,
            })?;
        crate::dirty::mark(self.addr, id.len() as u64);
        self.id = id;
        Ok(())
    }

    /// Where the id lives.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// The id last written.
    pub fn id(&self) -> [u8; VMGENID_LEN] {
        self.id
    }
}

/// 16 bytes from the kernel's CSPRNG (`getrandom(2)`, which blocks only
/// until the pool is first initialized).
fn random_id() -> io::Result<[u8; VMGENID_LEN]> {
    let mut id = [0u8; VMGENID_LEN];
    let mut filled = 0;
    while filled < id.len() {
        let rest = &mut id[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`,
        // a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // 0 <= n <= rest.len().
        filled += n as usize;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const AT: u64 = 0xef000;

    fn read(mem: &GuestMemoryMmap) -> [u8; VMGENID_LEN] {
        let mut b = [0u8; VMGENID_LEN];
        mem.read_slice(&mut b, GuestAddress(AT)).unwrap();
        b
    }

    #[test]
    fn regenerate_writes_a_new_id_at_the_address() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut g = VmGenId::new(&mem, GuestAddress(AT)).unwrap();
        let first = read(&mem);
        assert_eq!(first, g.id());
        assert_ne!(first, [0; VMGENID_LEN]);
        assert_eq!(g.addr(), GuestAddress(AT));
        g.regenerate(&mem).unwrap();
        let second = read(&mem);
        assert_eq!(second, g.id());
        assert_ne!(second, first, "a regenerated id must differ");
        assert_ne!(second, [0; VMGENID_LEN]);
        // Nothing around the 16 bytes is touched.
        let mut around = [0u8; 2];
        mem.read_slice(&mut around[..1], GuestAddress(AT - 1))
            .unwrap();
        mem.read_slice(&mut around[1..], GuestAddress(AT + 16))
            .unwrap();
        assert_eq!(around, [0, 0]);
    }

    #[test]
    fn an_address_outside_guest_memory_is_an_error() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e = VmGenId::new(&mem, GuestAddress((1 << 20) - 8)).unwrap_err();
        assert!(matches!(e, Error::GuestMemory { addr, .. } if addr == (1 << 20) - 8));
        assert!(e.to_string().contains("0xffff8"), "{e}");
    }

    #[test]
    fn its_ged_event_is_not_the_power_button() {
        assert_ne!(EVENT_VMGENID, 0);
        assert_eq!(EVENT_VMGENID & EVENT_POWER_BUTTON, 0);
    }
}
