//! Dirty-page logging for live migration: which guest pages changed since
//! the last look.
//!
//! KVM logs the pages the *guest* writes (KVM_MEM_LOG_DIRTY_PAGES on each
//! memory slot, fetched and cleared with KVM_GET_DIRTY_LOG). It does not
//! see what the VMM writes into guest memory from user space: virtio
//! devices fill receive buffers, read data and used rings that way, and a
//! vhost-user backend (another process) writes the shared memfd. Those
//! pages must be added by the caller (see [`DirtyBitmap::mark_range`]);
//! kiln-vmm's devices do not record them yet (see docs/snapshots.md).
//!
//! Pages are numbered as guest RAM is laid out in a snapshot's memory
//! file: RAM ranges in guest-address order, back to back (page `n` is at
//! RAM offset `n * 4096`; [`page_address`] turns it into a guest address).

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::vm::{self, Vm};

/// The page size dirty logging works in.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot switch dirty-page logging {}: {source}", if *.on { "on" } else { "off" })]
    Switch { on: bool, source: vm::Error },
    #[error("cannot read the dirty-page log of memory slot {slot}: {source}")]
    Fetch {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// One bit per 4 KiB page of guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl DirtyBitmap {
    /// A bitmap of `pages` clean pages.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// A bitmap with every one of `pages` pages dirty (the first round of
    /// a migration sends all RAM).
    pub fn all(pages: usize) -> Self {
        let mut b = Self::new(pages);
        b.mark_range(0, pages as u64 * PAGE_SIZE);
        b
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The bits: page `i` is bit `i % 64` of word `i / 64` (KVM's layout;
    /// what `migration::send` takes).
    pub fn as_words(&self) -> &[u64] {
        &self.words
    }

    pub fn into_words(self) -> Vec<u64> {
        self.words
    }

    pub fn is_dirty(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    /// Marks one page (ignored past the end).
    pub fn mark(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Marks the pages holding RAM offsets `[offset, offset + len)` (for a
    /// write the VMM made; clipped to RAM).
    pub fn mark_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        let last = last.min(self.pages as u64 - 1);
        for p in first..=last {
            self.mark(p as usize);
        }
    }

    /// Marks the pages of guest addresses `[addr, addr + len)` (a buffer a
    /// device wrote), in RAM page numbers; parts outside RAM are ignored.
    pub fn mark_guest_range(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) {
        let mut offset = 0u64;
        let end = addr.raw_value().saturating_add(len);
        for r in mem.iter() {
            let (start, stop) = (
                r.start_addr().raw_value(),
                r.start_addr().raw_value() + r.len(),
            );
            let (from, to) = (addr.raw_value().max(start), end.min(stop));
            if from < to {
                self.mark_range(offset + (from - start), to - from);
            }
            offset += r.len();
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Adds `other`'s dirty pages (same size; extra pages are ignored).
    pub fn union(&mut self, other: &DirtyBitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        self.clear_tail();
    }

    /// The dirty pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// Appends `bits` (KVM's layout: bit `i % 64` of word `i / 64` is page
    /// `i`) for `pages` pages starting at page `at`.
    fn set_from(&mut self, at: usize, bits: &[u64], pages: usize) {
        for (i, &w) in bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                let p = i * 64 + bit;
                if p < pages {
                    self.mark(at + p);
                }
            }
        }
    }

    fn clear_tail(&mut self) {
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
    }
}

/// The number of 4 KiB pages of guest RAM.
pub fn ram_pages(mem: &GuestMemoryMmap) -> usize {
    mem.iter().map(|r| (r.len() / PAGE_SIZE) as usize).sum()
}

/// The guest address of RAM page `page` (pages numbered across the RAM
/// ranges in guest-address order), or `None` past the end of RAM.
pub fn page_address(mem: &GuestMemoryMmap, page: usize) -> Option<GuestAddress> {
    let mut offset = page as u64 * PAGE_SIZE;
    for r in mem.iter() {
        if offset < r.len() {
            return Some(r.start_addr().unchecked_add(offset));
        }
        offset -= r.len();
    }
    None
}

/// Dirty-page logging switched on for every guest RAM slot of a VM.
pub struct DirtyLog {
    /// Each slot and the number of its first page.
    slots: Vec<(kvm_userspace_memory_region, usize)>,
    pages: usize,
    on: bool,
}

impl DirtyLog {
    /// Switches logging on: from now on KVM records each page the guest
    /// writes. The first [`DirtyLog::fetch`] reports the pages written
    /// since this call.
    pub fn start(vm: &Vm) -> Result<Self, Error> {
        let mut slots = Vec::new();
        let mut pages = 0;
        for r in &vm.slots {
            slots.push((*r, pages));
            pages += (r.memory_size / PAGE_SIZE) as usize;
        }
        let mut log = Self {
            slots,
            pages,
            on: false,
        };
        if let Err(e) = log.switch(vm, true) {
            // Leave no slot half switched.
            let _ = log.switch(vm, false);
            return Err(e);
        }
        log.on = true;
        Ok(log)
    }

    fn switch(&self, vm: &Vm, on: bool) -> Result<(), Error> {
        for (r, _) in &self.slots {
            let r = kvm_userspace_memory_region {
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                ..*r
            };
            // SAFETY: the same mapping the VM registered for this slot
            // (Vm::new), with only the logging flag changed.
            unsafe { vm.set_slot(r) }.map_err(|source| Error::Switch { on, source })?;
        }
        Ok(())
    }

    /// The pages the guest wrote since the last fetch (or since
    /// [`DirtyLog::start`]), and clears KVM's log.
    pub fn fetch(&mut self, vm: &Vm) -> Result<DirtyBitmap, Error> {
        let mut bitmap = DirtyBitmap::new(self.pages);
        for (r, first) in &self.slots {
            let bits = vm
                .fd
                .get_dirty_log(r.slot, r.memory_size as usize)
                .map_err(|source| Error::Fetch {
                    slot: r.slot,
                    source,
                })?;
            bitmap.set_from(*first, &bits, (r.memory_size / PAGE_SIZE) as usize);
        }
        Ok(bitmap)
    }

    /// Switches logging off again (a migration that failed: the VM runs on
    /// without the cost of logging).
    pub fn stop(mut self, vm: &Vm) -> Result<(), Error> {
        self.on = false;
        self.switch(vm, false)
    }

    pub fn is_on(&self) -> bool {
        self.on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_marks_ranges_and_lists_pages_in_order() {
        let mut b = DirtyBitmap::new(130);
        b.mark_range(4095, 2); // pages 0 and 1
        b.mark_range(129 * 4096, 10 * 4096); // clipped to page 129
        b.mark(64);
        b.mark(500); // past the end: ignored
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 1, 64, 129]);
        assert_eq!(b.count(), 4);
        assert!(b.is_dirty(64) && !b.is_dirty(63) && !b.is_dirty(500));
        let mut c = DirtyBitmap::new(130);
        c.set_from(100, &[0b101], 3);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![100, 102]);
        c.union(&b);
        assert_eq!(c.count(), 6);
        assert_eq!(DirtyBitmap::all(130).count(), 130);
        assert_eq!(
            DirtyBitmap::all(130).as_words(),
            &[u64::MAX, u64::MAX, 0b11]
        );
    }

    #[test]
    fn guest_addresses_become_ram_pages_across_the_mmio_gap() {
        use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};
        let mem = crate::vstate::memory::create(
            MMIO_GAP_START + (8 << 20),
            crate::vstate::memory::Backing::Anonymous,
        )
        .unwrap();
        let mut b = DirtyBitmap::new(ram_pages(&mem));
        // The last low page, the gap (ignored), the first high page.
        b.mark_guest_range(
            &mem,
            GuestAddress(MMIO_GAP_START - 4096),
            MMIO_GAP_END - MMIO_GAP_START + 4097,
        );
        let low_pages = (MMIO_GAP_START / PAGE_SIZE) as usize;
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![low_pages - 1, low_pages]);
        assert_eq!(
            page_address(&mem, low_pages),
            Some(GuestAddress(MMIO_GAP_END))
        );
        assert_eq!(page_address(&mem, ram_pages(&mem)), None);
    }
}
