//! The CPUID a vCPU sees: KVM's supported set, patched for pmvm's topology.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_POWER: u32 = 0x6;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Energy-performance bias: an MSR pmvm does not emulate.
const ECX_EPB: u32 = 1 << 3;

/// Patches `cpuid` for vCPU `cpu` of `count`: APIC ids, logical CPU count, the hypervisor
/// bit, and x2APIC ids in the topology leaves.
pub fn patch(cpuid: &mut CpuId, cpu: u8, count: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical CPUs, [15:8] CLFLUSH size / 8.
                e.ebx = (u32::from(cpu) << 24) | (u32::from(count) << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_POWER => e.ecx &= !ECX_EPB,
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = u32::from(cpu),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn patch_sets_apic_id_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 {
                function: LEAF_FEATURES,
                ebx: 0xffff_ffff,
                edx: EDX_HTT,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_POWER,
                ecx: ECX_EPB,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_TOPOLOGY,
                index: 1,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        patch(&mut cpuid, 3, 1);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 1);
        assert_eq!((e[0].ebx >> 8) & 0xff, 8);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].ecx & ECX_EPB, 0);
        assert_eq!(e[2].edx, 3);
    }
}
