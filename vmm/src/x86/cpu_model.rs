//! The CPU model a guest sees: vendor string and features hidden or shown in CPUID.
//!
//! Feature names are Linux's `/proc/cpuinfo` names, so a profile reads like the kernel's
//! `clearcpuid=` list.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::CpuId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// Where a feature bit lives: leaf, subleaf, register, bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u8,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features that can be named. Leaf 1, leaf 7.0 and leaf 0x8000_0001 cover what guests
/// probe for and what emulators stumble on.
const FEATURES: &[Feature] = &[
    f("sse3", 1, 0, Reg::Ecx, 0),
    f("pclmulqdq", 1, 0, Reg::Ecx, 1),
    f("ssse3", 1, 0, Reg::Ecx, 9),
    f("fma", 1, 0, Reg::Ecx, 12),
    f("cx16", 1, 0, Reg::Ecx, 13),
    f("pcid", 1, 0, Reg::Ecx, 17),
    f("sse4_1", 1, 0, Reg::Ecx, 19),
    f("sse4_2", 1, 0, Reg::Ecx, 20),
    f("x2apic", 1, 0, Reg::Ecx, 21),
    f("movbe", 1, 0, Reg::Ecx, 22),
    f("popcnt", 1, 0, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    f("aes", 1, 0, Reg::Ecx, 25),
    f("xsave", 1, 0, Reg::Ecx, 26),
    f("avx", 1, 0, Reg::Ecx, 28),
    f("f16c", 1, 0, Reg::Ecx, 29),
    f("rdrand", 1, 0, Reg::Ecx, 30),
    f("hypervisor", 1, 0, Reg::Ecx, 31),
    f("mce", 1, 0, Reg::Edx, 7),
    f("cx8", 1, 0, Reg::Edx, 8),
    f("mtrr", 1, 0, Reg::Edx, 12),
    f("clflush", 1, 0, Reg::Edx, 19),
    f("mmx", 1, 0, Reg::Edx, 23),
    f("fxsr", 1, 0, Reg::Edx, 24),
    f("sse", 1, 0, Reg::Edx, 25),
    f("sse2", 1, 0, Reg::Edx, 26),
    f("fsgsbase", 7, 0, Reg::Ebx, 0),
    f("bmi1", 7, 0, Reg::Ebx, 3),
    f("hle", 7, 0, Reg::Ebx, 4),
    f("avx2", 7, 0, Reg::Ebx, 5),
    f("smep", 7, 0, Reg::Ebx, 7),
    f("bmi2", 7, 0, Reg::Ebx, 8),
    f("erms", 7, 0, Reg::Ebx, 9),
    f("invpcid", 7, 0, Reg::Ebx, 10),
    f("rtm", 7, 0, Reg::Ebx, 11),
    f("avx512f", 7, 0, Reg::Ebx, 16),
    f("rdseed", 7, 0, Reg::Ebx, 18),
    f("adx", 7, 0, Reg::Ebx, 19),
    f("smap", 7, 0, Reg::Ebx, 20),
    f("clflushopt", 7, 0, Reg::Ebx, 23),
    f("clwb", 7, 0, Reg::Ebx, 24),
    f("sha_ni", 7, 0, Reg::Ebx, 29),
    f("umip", 7, 0, Reg::Ecx, 2),
    f("pku", 7, 0, Reg::Ecx, 3),
    f("waitpkg", 7, 0, Reg::Ecx, 5),
    f("vaes", 7, 0, Reg::Ecx, 9),
    f("la57", 7, 0, Reg::Ecx, 16),
    f("rdpid", 7, 0, Reg::Ecx, 22),
    f("md_clear", 7, 0, Reg::Edx, 10),
    f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    f("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    f("nx", 0x8000_0001, 0, Reg::Edx, 20),
    f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// KVM's paravirtual feature leaf, and the features in it whose use is a hypercall:
/// PV_UNHALT (bit 7, spinlock kicks), PV_SEND_IPI (bit 11), PV_SCHED_YIELD (bit 13).
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const KVM_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// The vendor string in leaf 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Vendor {
    /// Whatever KVM reports (the host's).
    #[default]
    Host,
    Intel,
    Amd,
}

impl FromStr for Vendor {
    type Err = CpuModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Vendor::Host),
            "intel" => Ok(Vendor::Intel),
            "amd" => Ok(Vendor::Amd),
            other => Err(CpuModelError::Vendor(other.to_string())),
        }
    }
}

impl Vendor {
    /// EBX, EDX, ECX of leaf 0, in that (CPUID's) order.
    fn registers(self) -> Option<[u32; 3]> {
        let s: &[u8; 12] = match self {
            Vendor::Host => return None,
            Vendor::Intel => b"GenuineIntel",
            Vendor::Amd => b"AuthenticAMD",
        };
        let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        Some([word(0), word(4), word(8)])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuModelError {
    #[error("--cpu-vendor {0:?}: expected intel, amd or host")]
    Vendor(String),
    #[error(
        "--cpu-features {0:?}: each entry is -NAME (hide) or +NAME (show), e.g. -popcnt,-smap"
    )]
    Sign(String),
    #[error("--cpu-features: unknown feature {name:?}; known: {known}")]
    Unknown { name: String, known: String },
}

/// Features hidden from or shown to the guest, and the vendor it sees.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuModel {
    pub vendor: Vendor,
    hide: Vec<Feature>,
    show: Vec<Feature>,
}

impl CpuModel {
    /// Parses `-popcnt,-smap,+x2apic` and a vendor.
    pub fn parse(features: &str, vendor: &str) -> Result<Self, CpuModelError> {
        let mut model = CpuModel {
            vendor: vendor.parse()?,
            ..Default::default()
        };
        for item in features.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (hide, name) = match item.split_at(1) {
                ("-", n) => (true, n),
                ("+", n) => (false, n),
                _ => return Err(CpuModelError::Sign(item.to_string())),
            };
            let feature =
                FEATURES
                    .iter()
                    .find(|f| f.name == name)
                    .ok_or_else(|| CpuModelError::Unknown {
                        name: name.to_string(),
                        known: FEATURES
                            .iter()
                            .map(|f| f.name)
                            .collect::<Vec<_>>()
                            .join(","),
                    })?;
            if hide {
                model.hide.push(*feature);
            } else {
                model.show.push(*feature);
            }
        }
        Ok(model)
    }

    /// Applies the model to a vCPU's CPUID.
    pub fn apply(&self, cpuid: &mut CpuId) {
        let host = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0)
            .map(|e| [e.ebx, e.edx, e.ecx]);
        let foreign_vendor = matches!(
            (self.vendor.registers(), host),
            (Some(guest), Some(host)) if guest != host
        );
        for e in cpuid.as_mut_slice().iter_mut() {
            if e.function == 0 {
                if let Some([b, d, c]) = self.vendor.registers() {
                    (e.ebx, e.edx, e.ecx) = (b, d, c);
                }
            }
            // A guest told it runs on the other vendor's CPU makes hypercalls with that
            // vendor's instruction (VMCALL for Intel, VMMCALL for AMD), which the host's KVM
            // must rewrite in the guest's read-only kernel text: some hosts retry it forever
            // (a 2-vCPU Linux guest hung in its first PV IPI). Without these features Linux
            // sends IPIs through the APIC, yields and halts without hypercalls.
            if foreign_vendor && e.function == LEAF_KVM_FEATURES {
                e.eax &= !KVM_HYPERCALL_FEATURES;
            }
            for (feature, set) in self
                .hide
                .iter()
                .map(|f| (f, false))
                .chain(self.show.iter().map(|f| (f, true)))
            {
                if e.function != feature.leaf || e.index != feature.subleaf {
                    continue;
                }
                let reg = match feature.reg {
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                    Reg::Edx => &mut e.edx,
                };
                if set {
                    *reg |= 1 << feature.bit;
                } else {
                    *reg &= !(1 << feature.bit);
                }
            }
        }
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .hide
            .iter()
            .map(|x| format!("-{}", x.name))
            .chain(self.show.iter().map(|x| format!("+{}", x.name)))
            .collect();
        write!(
            f,
            "vendor {:?}, features [{}]",
            self.vendor,
            items.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ebx: 0x6874_7541,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 0,
                ebx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                ebx: u32::MAX,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn hides_named_features_in_the_right_leaf() {
        let m = CpuModel::parse("-popcnt,-smap,-fsgsbase,-cx16", "intel").unwrap();
        let mut c = cpuid();
        m.apply(&mut c);
        let e = c.as_slice();
        assert_eq!(e[1].ecx & (1 << 23), 0, "popcnt");
        assert_eq!(e[1].ecx & (1 << 13), 0, "cx16");
        assert_eq!(e[1].ecx | (1 << 23) | (1 << 13), u32::MAX, "nothing else");
        assert_eq!(e[2].ebx, !(1 << 20) & !1, "smap and fsgsbase");
        assert_eq!(e[3].ebx, u32::MAX, "subleaf 1 untouched");
        let vendor: Vec<u8> = [e[0].ebx, e[0].edx, e[0].ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&vendor, b"GenuineIntel");
        assert_eq!(e[0].eax, 0xd, "max leaf kept");
    }

    #[test]
    fn a_foreign_vendor_loses_the_hypercall_features_only() {
        let kvm = kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax: u32::MAX,
            ..Default::default()
        };
        let amd_host = kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(*b"Auth"),
            edx: u32::from_le_bytes(*b"enti"),
            ecx: u32::from_le_bytes(*b"cAMD"),
            ..Default::default()
        };
        let eax = |vendor: &str| {
            let mut c = CpuId::from_entries(&[amd_host, kvm]).unwrap();
            CpuModel::parse("", vendor).unwrap().apply(&mut c);
            c.as_slice()[1].eax
        };
        assert_eq!(eax("intel"), !KVM_HYPERCALL_FEATURES);
        assert_eq!(eax("amd"), u32::MAX, "the host's own vendor keeps them");
        assert_eq!(eax("host"), u32::MAX);
    }

    #[test]
    fn shows_and_keeps_host_vendor() {
        let m = CpuModel::parse("+x2apic", "host").unwrap();
        let mut c = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        }])
        .unwrap();
        m.apply(&mut c);
        assert_eq!(c.as_slice()[0].ecx, 1 << 21);
        assert_eq!(m.vendor, Vendor::Host);
    }

    #[test]
    fn bad_input_is_named() {
        assert_eq!(
            CpuModel::parse("", "via"),
            Err(CpuModelError::Vendor("via".into()))
        );
        assert_eq!(
            CpuModel::parse("popcnt", "host"),
            Err(CpuModelError::Sign("popcnt".into()))
        );
        let e = CpuModel::parse("-warpdrive", "host")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown feature \"warpdrive\""), "{e}");
        assert!(e.contains("popcnt"), "{e}");
        assert!(CpuModel::parse(" , ", "host").is_ok());
    }
}
