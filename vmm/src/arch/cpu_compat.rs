//! Whether a guest saved on one host may run on this one: every CPU
//! feature it was shown must be one this host's KVM offers.
//!
//! A guest learns its CPU's features once, at boot, and then uses them: a
//! guest moved to a host without, say, AVX-512 dies on its first such
//! instruction. So a restore (from a snapshot or a live migration) compares
//! the feature registers of the CPUID the guest saw (KVM_GET_CPUID2 of its
//! vCPU when saved) with what a VM started here sees (KVM_GET_CPUID2 of the
//! same vCPU just configured for a new VM: KVM_GET_SUPPORTED_CPUID with
//! what kiln-vmm adds, `cpuid::customize`), and refuses the guest, naming
//! the missing bits, before anything of it runs. Both sides are read the
//! same way because a KVM may report more than it was given (this build
//! machine's does). A host with more features is fine. Fields that are not
//! feature flags (family, cache sizes, topology) are not compared.

use kvm_bindings::kvm_cpuid_entry2;

/// A CPUID output register.
#[derive(Debug, Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
}

/// The feature registers compared: (leaf, subleaf, register, bits KVM
/// changes by itself while the guest runs, so that a saved vCPU may show
/// them although no host offers them at boot).
const FEATURES: &[(u32, u32, Reg, u32)] = &[
    // OSXSAVE (27) follows CR4.OSXSAVE; MONITOR (3) may follow
    // IA32_MISC_ENABLE.
    (0x1, 0, Reg::Ecx, (1 << 27) | (1 << 3)),
    // APIC (9) follows the APIC base MSR (only ever cleared).
    (0x1, 0, Reg::Edx, 0),
    (0x7, 0, Reg::Ebx, 0),
    // OSPKE (4) follows CR4.PKE.
    (0x7, 0, Reg::Ecx, 1 << 4),
    (0x7, 0, Reg::Edx, 0),
    (0x7, 1, Reg::Eax, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
    (0x8000_0007, 0, Reg::Edx, 0),
    (0x8000_0008, 0, Reg::Ebx, 0),
];

/// The entry of `leaf`/`subleaf` (the subleaf counts for leaves 7 and 0xd
/// only, as for the CPU).
fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    let indexed = matches!(leaf, 0x7 | 0xd);
    entries
        .iter()
        .find(|e| e.function == leaf && (!indexed || e.index == subleaf))
}

/// The feature bits in `saved` (the CPUID a guest's vCPU had) that
/// `offered` (what this host gives the same vCPU) lacks, one line per
/// register, e.g. `leaf 0x7.0 EBX 0x00010000`. Empty: the guest may run
/// here.
pub fn missing_features(saved: &[kvm_cpuid_entry2], offered: &[kvm_cpuid_entry2]) -> Vec<String> {
    FEATURES
        .iter()
        .filter_map(|&(leaf, subleaf, reg, dynamic)| {
            let had = find(saved, leaf, subleaf).map_or(0, |e| reg.of(e));
            let here = find(offered, leaf, subleaf).map_or(0, |e| reg.of(e));
            let missing = had & !here & !dynamic;
            (missing != 0)
                .then(|| format!("leaf {leaf:#x}.{subleaf} {} {missing:#010x}", reg.name()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn a_feature_this_host_lacks_is_named_and_one_it_adds_is_fine() {
        let offered = [
            entry(0x1, 0, 0, 0x0000_00f0),
            entry(0x7, 0, 0x0000_00ff, 0),
            entry(0x7, 1, 0, 0),
        ];
        // Fewer features than offered: fine.
        let saved = [entry(0x1, 0, 0, 0x10), entry(0x7, 0, 0x0f, 0)];
        assert!(missing_features(&saved, &offered).is_empty());
        // A leaf 7 bit (subleaf 0) the host lacks, and one of leaf 1.
        let saved = [entry(0x1, 0, 0, 0x0100_0010), entry(0x7, 0, 0x100, 0)];
        assert_eq!(
            missing_features(&saved, &offered),
            vec!["leaf 0x1.0 ECX 0x01000000", "leaf 0x7.0 EBX 0x00000100"]
        );
        // A leaf the host does not have at all.
        let saved = [entry(0x8000_0001, 0, 0, 0x1)];
        assert_eq!(
            missing_features(&saved, &offered),
            vec!["leaf 0x80000001.0 ECX 0x00000001"]
        );
    }

    #[test]
    fn bits_kvm_sets_while_the_guest_runs_are_not_held_against_the_host() {
        let offered = [entry(0x1, 0, 0, 0), entry(0x7, 0, 0, 0)];
        // OSXSAVE and MONITOR in leaf 1, OSPKE in leaf 7; and the APIC id
        // and cache fields (EBX of leaf 1) are no features.
        let saved = [
            entry(0x1, 0, 0x0300_0800, (1 << 27) | (1 << 3)),
            entry(0x7, 0, 0, 1 << 4),
        ];
        assert!(missing_features(&saved, &offered).is_empty());
    }
}
