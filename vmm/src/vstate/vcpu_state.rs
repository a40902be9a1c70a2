//! A vCPU's complete architectural state, as KVM holds it: what a snapshot
//! saves and a restore puts back into a fresh vCPU.
//!
//! The order of the ioctls matters on both sides:
//! - saving reads the MP state first (KVM_GET_MP_STATE also delivers the
//!   APIC events that are pending, which the rest must then reflect), and
//!   the vcpu events last;
//! - restoring sets CPUID first (KVM validates XSAVE, XCRs and MSRs against
//!   it), the TSC frequency before any MSR, the LAPIC before the MSRs (the
//!   TSC-deadline MSR only holds in a LAPIC in deadline mode), the MSRs
//!   with `IA32_TSC` before `IA32_TSC_DEADLINE` (the deadline is relative
//!   to the TSC), and the vcpu events last (they hold the pending
//!   exception/interrupt/NMI, which the earlier writes would clear).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("vCPU {index}: cannot read its {what}: {source}")]
    Get {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: cannot restore its {what}: {source}")]
    Set {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM restored only {done} of {total} MSRs; MSR {msr:#x} was refused")]
    MsrsRefused {
        index: u8,
        done: usize,
        total: usize,
        msr: u32,
    },
    #[error("vCPU {index}: the saved {what} does not fit a KVM structure: {detail}")]
    Malformed {
        index: u8,
        what: &'static str,
        detail: String,
    },
    #[error("vCPU {index}: the saved XSAVE state ({saved} bytes) uses more than this host's {host} bytes: the snapshot was taken on a CPU with more XSAVE features")]
    XsaveTooLarge {
        index: u8,
        saved: usize,
        host: usize,
    },
    #[error("vCPU {index}: the guest's TSC ran at {saved} kHz, this host's at {host} kHz, and KVM cannot scale it: {source}")]
    TscKhz {
        index: u8,
        saved: u32,
        host: u32,
        source: kvm_ioctls::Error,
    },
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM holds for one vCPU. The KVM structures serialize as
/// their bytes (kvm-bindings' `serde` feature): they are ABI, fixed in
/// layout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The whole XSAVE area as 32-bit words: the legacy 4 KiB of
    /// `kvm_xsave` followed by what KVM_GET_XSAVE2 adds (AMX tiles...).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<MsrValue>,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency; `None` where the host's TSC is unstable
    /// (KVM_GET_TSC_KHZ fails).
    pub tsc_khz: Option<u32>,
    pub events: kvm_vcpu_events,
}

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC registers: saved as the LAPIC state, not as MSRs (reading
/// them fails unless the guest put its APIC in x2APIC mode).
const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;

/// Which MSRs to save, from the list KVM reports (KVM_GET_MSR_INDEX_LIST:
/// the host MSRs it saves for guests plus the ones it emulates, the
/// kvmclock and TSC ones among them). Sorted so that `IA32_TSC` comes
/// first and `IA32_TSC_DEADLINE` last, the order restore needs. MSRs that
/// a given vCPU cannot read are dropped when it is saved (see
/// [`Vcpu::save_state`]), as the list is per host, not per CPUID.
pub fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    let mut msrs: Vec<u32> = index_list
        .iter()
        .copied()
        .filter(|m| !X2APIC_MSRS.contains(m))
        .collect();
    msrs.sort_unstable_by_key(|&m| match m {
        MSR_IA32_TSC => (0, m),
        MSR_IA32_TSC_DEADLINE => (2, m),
        _ => (1, m),
    });
    msrs.dedup();
    msrs
}

const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;

impl Vcpu {
    fn get_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError + '_ {
        move |source| StateError::Get {
            index: self.index,
            what,
            source,
        }
    }

    fn set_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError + '_ {
        move |source| StateError::Set {
            index: self.index,
            what,
            source,
        }
    }

    /// Lets KVM complete an MMIO or port I/O instruction this vCPU left
    /// half done: the VMM answered the exit, but the guest's registers
    /// take the answer only on the next KVM_RUN. With `immediate_exit`
    /// set, KVM_RUN finishes that instruction and returns EINTR without
    /// entering the guest. Without this a snapshot taken after an I/O
    /// read exit would resume with the read never done.
    pub fn complete_pending_io(&mut self) -> Result<(), StateError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run();
        let outcome = match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(self.get_err("pending I/O completion (KVM_RUN)")(e)),
            // A string I/O instruction exits again (once per iteration):
            // that needs the devices, which only the vCPU thread has.
            Ok(exit) => Err(StateError::Malformed {
                index: self.index,
                what: "pending I/O completion",
                detail: format!("KVM_RUN exited again ({exit:?}): save on the vCPU thread"),
            }),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    /// Finishes pending I/O ([`Vcpu::complete_pending_io`]) and reads the
    /// vCPU's whole state. For a vCPU that is not running on its thread
    /// (a running VM's vCPUs save through [`super::vcpu::PauseGate::save_states`],
    /// on their own threads, where a string I/O instruction's further
    /// exits can reach the devices).
    pub fn save_state(&mut self) -> Result<VcpuState, StateError> {
        self.complete_pending_io()?;
        self.read_state()
    }

    /// Reads the vCPU's whole state, nothing pending.
    pub(super) fn read_state(&mut self) -> Result<VcpuState, StateError> {
        let mp_state = self.fd.get_mp_state().map_err(self.get_err("MP state"))?;
        let regs = self.fd.get_regs().map_err(self.get_err("registers"))?;
        let sregs = self.fd.get_sregs().map_err(self.get_err("sregs"))?;
        let xsave = self.get_xsave()?;
        let xcrs = self.fd.get_xcrs().map_err(self.get_err("XCRs"))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(self.get_err("debug registers"))?;
        let lapic = self.fd.get_lapic().map_err(self.get_err("LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self.cpuid()?;
        let msrs = self.get_msrs()?;
        let events = self.fd.get_vcpu_events().map_err(self.get_err("events"))?;
        Ok(VcpuState {
            index: self.index,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            cpuid,
            tsc_khz,
            events,
        })
    }

    fn get_xsave(&self) -> Result<Vec<u32>, StateError> {
        if self.xsave_size <= std::mem::size_of::<kvm_xsave>() {
            let x = self.fd.get_xsave().map_err(self.get_err("XSAVE state"))?;
            return Ok(x.region.to_vec());
        }
        let mut x = self.new_xsave2()?;
        // SAFETY: `x` holds `xsave_size` bytes, the size KVM_CAP_XSAVE2
        // reported for this VM; kiln-vmm enables no XSTATE feature
        // dynamically (arch_prctl) afterwards.
        unsafe { self.fd.get_xsave2(&mut x) }.map_err(self.get_err("XSAVE state"))?;
        let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(x.as_slice());
        Ok(words)
    }

    fn new_xsave2(&self) -> Result<Xsave, StateError> {
        let fam = (self.xsave_size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
        Xsave::new(fam).map_err(|e| StateError::Malformed {
            index: self.index,
            what: "XSAVE state",
            detail: format!("{e:?}"),
        })
    }

    /// Reads the MSRs in `self.msr_list`. KVM_GET_MSRS stops at the first
    /// MSR it cannot read (one the host lists but this vCPU's CPUID does
    /// not have) and returns how many it read: that one is skipped and the
    /// rest read on.
    fn get_msrs(&self) -> Result<Vec<MsrValue>, StateError> {
        let mut out = Vec::with_capacity(self.msr_list.len());
        let mut rest: &[u32] = &self.msr_list;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Malformed {
                index: self.index,
                what: "MSR list",
                detail: format!("{e:?}"),
            })?;
            let read = self.fd.get_msrs(&mut msrs).map_err(self.get_err("MSRs"))?;
            out.extend(msrs.as_slice()[..read].iter().map(|e| MsrValue {
                index: e.index,
                data: e.data,
            }));
            // Skip the refused one, if any.
            let consumed = if read < chunk.len() { read + 1 } else { read };
            rest = &rest[consumed..];
        }
        Ok(out)
    }

    /// The CPUID KVM holds for this vCPU (KVM_GET_CPUID2): what was set,
    /// with the bits KVM keeps up to date as the guest runs.
    pub fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, StateError> {
        Ok(self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.get_err("CPUID"))?
            .as_slice()
            .to_vec())
    }

    /// Puts a saved state into this (new, not yet run) vCPU. Runs before
    /// the vCPU thread starts, in place of `configure`/`configure_boot`.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), StateError> {
        let malformed = |what, detail: String| StateError::Malformed {
            index: self.index,
            what,
            detail,
        };
        let cpuid =
            CpuId::from_entries(&s.cpuid).map_err(|e| malformed("CPUID", format!("{e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(self.set_err("CPUID"))?;
        if let Some(saved) = s.tsc_khz {
            self.restore_tsc_khz(saved)?;
        }
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(self.set_err("MP state"))?;
        self.fd
            .set_regs(&s.regs)
            .map_err(self.set_err("registers"))?;
        self.fd.set_sregs(&s.sregs).map_err(self.set_err("sregs"))?;
        self.set_xsave(&s.xsave)?;
        self.fd.set_xcrs(&s.xcrs).map_err(self.set_err("XCRs"))?;
        self.fd
            .set_debug_regs(&s.debug_regs)
            .map_err(self.set_err("debug registers"))?;
        self.fd.set_lapic(&s.lapic).map_err(self.set_err("LAPIC"))?;
        self.set_msrs(&s.msrs)?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(self.set_err("events"))
    }

    /// Runs the guest's TSC at its saved frequency if this host's differs
    /// (a guest's clocksource calibrated at boot would otherwise drift).
    fn restore_tsc_khz(&self, saved: u32) -> Result<(), StateError> {
        let host = match self.fd.get_tsc_khz() {
            Ok(k) => k,
            // No stable TSC here: nothing to compare with or scale.
            Err(_) => return Ok(()),
        };
        // KVM itself tolerates 250 ppm between hosts before scaling.
        if u64::from(host.abs_diff(saved)) * 4000 <= u64::from(saved) {
            return Ok(());
        }
        self.fd
            .set_tsc_khz(saved)
            .map_err(|source| StateError::TscKhz {
                index: self.index,
                saved,
                host,
                source,
            })
    }

    fn set_xsave(&self, words: &[u32]) -> Result<(), StateError> {
        let host_words = self
            .xsave_size
            .max(std::mem::size_of::<kvm_xsave>())
            .div_ceil(4);
        if words.len() > host_words && words[host_words..].iter().any(|&w| w != 0) {
            return Err(StateError::XsaveTooLarge {
                index: self.index,
                saved: words.len() * 4,
                host: self.xsave_size,
            });
        }
        let mut legacy = kvm_xsave::default();
        let n = words.len().min(XSAVE_LEGACY_WORDS);
        legacy.region[..n].copy_from_slice(&words[..n]);
        if self.xsave_size <= std::mem::size_of::<kvm_xsave>() {
            // SAFETY: without KVM_CAP_XSAVE2 (or with a size of 4 KiB) KVM
            // reads exactly a `kvm_xsave`.
            return unsafe { self.fd.set_xsave(&legacy) }.map_err(self.set_err("XSAVE state"));
        }
        let mut x = self.new_xsave2()?;
        // SAFETY: writing the FAM struct's header and its elements, which
        // new_xsave2 allocated.
        unsafe { x.as_mut_fam_struct() }.xsave = legacy;
        let extra = x.as_mut_slice();
        let saved_extra = words.get(XSAVE_LEGACY_WORDS..).unwrap_or(&[]);
        let m = saved_extra.len().min(extra.len());
        extra[..m].copy_from_slice(&saved_extra[..m]);
        // SAFETY: `x` holds the `xsave_size` bytes KVM_CAP_XSAVE2 reported,
        // all of which KVM reads.
        unsafe { self.fd.set_xsave2(&x) }.map_err(self.set_err("XSAVE state"))
    }

    fn set_msrs(&self, saved: &[MsrValue]) -> Result<(), StateError> {
        for chunk in saved.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    data: m.data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Malformed {
                index: self.index,
                what: "MSRs",
                detail: format!("{e:?}"),
            })?;
            let done = self.fd.set_msrs(&msrs).map_err(self.set_err("MSRs"))?;
            if done < chunk.len() {
                return Err(StateError::MsrsRefused {
                    index: self.index,
                    done,
                    total: chunk.len(),
                    msr: chunk[done].index,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_cpuid2, kvm_msrs, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    use super::*;

    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);

    /// Every ioctl `save_state` makes is allowed on a vCPU thread (which
    /// its seccomp filter would otherwise kill, and the whole VMM with it).
    #[test]
    fn the_vcpu_filter_allows_every_save_ioctl() {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../seccomp/x86_64.json")).unwrap();
        let allowed: Vec<u64> = json["vcpu"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["syscall"] == "ioctl")
            .map(|f| f["args"][0]["val"].as_u64().unwrap())
            .collect();
        for (name, nr) in [
            ("KVM_RUN", KVM_RUN()),
            ("KVM_GET_MP_STATE", KVM_GET_MP_STATE()),
            ("KVM_GET_REGS", KVM_GET_REGS()),
            ("KVM_GET_SREGS", KVM_GET_SREGS()),
            ("KVM_GET_XSAVE", KVM_GET_XSAVE()),
            ("KVM_GET_XSAVE2", KVM_GET_XSAVE2()),
            ("KVM_GET_XCRS", KVM_GET_XCRS()),
            ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS()),
            ("KVM_GET_LAPIC", KVM_GET_LAPIC()),
            ("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ()),
            ("KVM_GET_CPUID2", KVM_GET_CPUID2()),
            ("KVM_GET_MSRS", KVM_GET_MSRS()),
            ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS()),
        ] {
            assert!(allowed.contains(&nr), "{name} ({nr}) is not allowed");
        }
    }

    #[test]
    fn tsc_goes_first_and_the_deadline_last_without_x2apic_registers() {
        let list = [0x6e0, 0x174, 0x10, 0x802, 0x4b56_4d01, 0x10, 0xc000_0080];
        assert_eq!(
            msrs_to_save(&list),
            vec![0x10, 0x174, 0x4b56_4d01, 0xc000_0080, 0x6e0]
        );
    }
}
