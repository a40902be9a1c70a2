//! CPUID as each vCPU sees it: what KVM supports, with the topology and
//! identity fields rewritten so that N vCPUs look like one socket of N
//! single-threaded cores with APIC ids 0..N.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERF_MON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_ECX_TOPOEXT: u32 = 1 << 22;

/// Topology-level types in leaves 0xb / 0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits of the APIC id needed to number `n` cores.
fn core_id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Adds the TSC-deadline mode of the local APIC timer to `cpuid`. KVM
/// emulates it with an in-kernel LAPIC but reports it as a capability
/// (KVM_CAP_TSC_DEADLINE_TIMER), not in KVM_GET_SUPPORTED_CPUID. Without
/// it a Linux guest calibrates the LAPIC timer at boot by counting it over
/// 25 ticks of another clock: a tenth of a second spent waiting (measured
/// by sampling the vCPU in the test host: 11 samples of 10 ms in
/// `setup_boot_APIC_clock`). Firecracker and Cloud Hypervisor set it too.
pub fn add_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Rewrites `cpuid` (from KVM_GET_SUPPORTED_CPUID) for vCPU `index` of `count`.
pub fn customize(cpuid: &mut CpuId, index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let shift = core_id_bits(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // APIC id, logical processors per package, CLFLUSH size 64.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package; caches above L2 are shared by all cores.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            // No virtual PMU: perf counters under nesting cost more than
            // they tell, and the guest must not rely on host ones.
            LEAF_PERF_MON => *e = zeroed(e),
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => topology_level(e, apic_id, count, shift),
            LEAF_AMD_EXT_FEATURES => {
                e.ecx |= AMD_ECX_TOPOEXT;
                if count > 1 {
                    e.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
            }
            LEAF_AMD_TOPOLOGY => {
                // Extended APIC id; compute unit id with one thread per unit.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

fn zeroed(e: &kvm_cpuid_entry2) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        ..Default::default()
    }
}

/// Leaves 0xb and 0x1f: subleaf 0 is the thread level (one thread per core),
/// subleaf 1 the core level, anything above is invalid.
fn topology_level(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, shift: u32) {
    let (eax, ebx, ecx) = match e.index {
        0 => (0, 1, (LEVEL_SMT << 8)),
        1 => (shift, count, (LEVEL_CORE << 8) | 1),
        n => (0, 0, n & 0xff),
    };
    e.eax = eax;
    e.ebx = ebx;
    e.ecx = ecx;
    e.edx = apic_id;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    #[test]
    fn tsc_deadline_is_added_to_the_feature_leaf_only() {
        let mut cpuid =
            CpuId::from_entries(&[entry(LEAF_FEATURES, 0), entry(LEAF_AMD_SIZES, 0)]).unwrap();
        add_tsc_deadline(&mut cpuid);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, ECX_TSC_DEADLINE);
        assert_eq!(e[1].ecx, 0);
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu_index() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            entry(LEAF_AMD_SIZES, 0),
            entry(LEAF_PERF_MON, 0),
        ])
        .unwrap();
        customize(&mut cpuid, 2, 3);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 3, LEVEL_CORE));
        assert_eq!(e[3].ebx, 0);
        assert_eq!(e[4].ecx & 0xff, 2);
        assert_eq!(e[5].eax, 0);
    }

    #[test]
    fn core_id_bits_covers_the_count() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(4), 2);
        assert_eq!(core_id_bits(5), 3);
    }
}
