//! The MADT ("APIC"): one local APIC per vCPU, KVM's in-kernel IOAPIC, and ISA overrides.
//!
//! acpi_tables 0.2.1's `MADT` cannot set the PC-AT flag and has no Interrupt Source Override,
//! so the table is an `Sdt` with its sub-structures appended.

use acpi_tables::{
    madt::{EnabledStatus, IoApic, ProcessorLocalApic},
    sdt::Sdt,
    Aml,
};
use zerocopy::{
    byteorder::{LE, U16, U32},
    Immutable, IntoBytes,
};

use crate::{PlatformDesc, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// ACPI 6.2+ MADT revision.
const MADT_REVISION: u8 = 5;
/// SDT header plus local APIC address and flags.
const MADT_HEADER_LEN: u32 = 44;
/// MADT flags bit 0: the platform also has dual 8259 PICs (KVM's irqchip does).
const PCAT_COMPAT: u32 = 1;
/// KVM's in-kernel IOAPIC resets its ID register to 0, so the MADT says the same; with xAPIC
/// the IOAPIC id is a separate namespace from the local APIC ids, so 0 clashes with nothing.
const IOAPIC_ID: u8 = 0;
/// KVM's IOAPIC serves GSIs 0..24.
const IOAPIC_GSI_BASE: u32 = 0;
/// MPS INTI flags: polarity active high (01), trigger mode edge (01 << 2).
const ISO_EDGE_ACTIVE_HIGH: u16 = 0b0101;
/// ISA IRQ of the PIT.
const PIT_IRQ: u8 = 0;
/// KVM's default routing sends the PIT to IOAPIC pin 0, not pin 2 as PC firmware does.
const PIT_GSI: u32 = 0;

/// MADT Interrupt Source Override (type 2), which acpi_tables 0.2.1 lacks.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    /// 0: ISA.
    bus: u8,
    source_irq: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}
const _: () = assert!(size_of::<InterruptSourceOverride>() == 10);

impl InterruptSourceOverride {
    fn isa(source_irq: u8, gsi: u32, flags: u16) -> Self {
        InterruptSourceOverride {
            r#type: 2,
            length: size_of::<Self>() as u8,
            bus: 0,
            source_irq,
            gsi: gsi.into(),
            flags: flags.into(),
        }
    }
}

/// The MADT for `desc`, which validation has already checked (`com1_gsi` is an ISA IRQ).
pub(crate) fn build(desc: &PlatformDesc) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, desc.lapic_addr);
    madt.write_u32(40, PCAT_COMPAT);

    let mut entries = Vec::new();
    for cpu in 0..desc.cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(IOAPIC_ID, desc.ioapic_addr, IOAPIC_GSI_BASE).to_aml_bytes(&mut entries);
    let com1_irq = u8::try_from(desc.com1_gsi).unwrap_or(u8::MAX);
    for iso in [
        InterruptSourceOverride::isa(PIT_IRQ, PIT_GSI, ISO_EDGE_ACTIVE_HIGH),
        InterruptSourceOverride::isa(com1_irq, desc.com1_gsi, ISO_EDGE_ACTIVE_HIGH),
    ] {
        entries.extend_from_slice(iso.as_bytes());
    }
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc_with_nvdimms, le_u16, le_u32, sum};

    fn madt(cpus: u8) -> Vec<u8> {
        let mut desc = desc_with_nvdimms(0);
        desc.cpus = cpus;
        desc.com1_gsi = 4;
        build(&desc)
    }

    #[test]
    fn header_lapic_address_and_pcat_flag() {
        let b = madt(3);
        assert_eq!(&b[..4], b"APIC");
        assert_eq!(le_u32(&b, 4) as usize, b.len());
        assert_eq!(b.len(), 44 + 3 * 8 + 12 + 2 * 10);
        assert_eq!(sum(&b), 0);
        assert_eq!(le_u32(&b, 36), 0xFEE0_0000);
        assert_eq!(le_u32(&b, 40), 1);
    }

    #[test]
    fn one_enabled_local_apic_per_cpu_with_id_equal_index() {
        let b = madt(4);
        for cpu in 0..4usize {
            let e = 44 + cpu * 8;
            assert_eq!(&b[e..e + 4], &[0, 8, cpu as u8, cpu as u8], "LAPIC {cpu}");
            assert_eq!(le_u32(&b, e + 4), 1, "enabled");
        }
    }

    #[test]
    fn ioapic_then_overrides() {
        let b = madt(1);
        let io = 44 + 8;
        assert_eq!(&b[io..io + 4], &[1, 12, 0, 0]);
        assert_eq!(le_u32(&b, io + 4), 0xFEC0_0000);
        assert_eq!(le_u32(&b, io + 8), 0, "GSI base");

        let pit = io + 12;
        assert_eq!(&b[pit..pit + 4], &[2, 10, 0, 0], "ISA IRQ0");
        assert_eq!(le_u32(&b, pit + 4), 0, "-> GSI 0");
        assert_eq!(le_u16(&b, pit + 8), 0b0101, "edge, active high");

        let com1 = pit + 10;
        assert_eq!(&b[com1..com1 + 4], &[2, 10, 0, 4], "ISA IRQ4");
        assert_eq!(le_u32(&b, com1 + 4), 4, "-> GSI 4");
        assert_eq!(le_u16(&b, com1 + 8), 0b0101);
        assert_eq!(com1 + 10, b.len());
    }

    #[test]
    fn max_cpus_fit() {
        let b = madt(255);
        assert_eq!(b.len(), 44 + 255 * 8 + 12 + 20);
        assert_eq!(b[44 + 254 * 8 + 3], 254, "last APIC id");
        assert_eq!(sum(&b), 0);
    }
}
