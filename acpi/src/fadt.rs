//! The FADT ("FACP"): a HW-reduced platform whose reset and sleep registers are I/O ports.

use acpi_tables::{
    fadt::{FADTBuilder, Flags},
    gas::{AccessSize, AddressSpace, GAS},
    Aml,
};

use crate::{PowerDesc, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// IAPC_BOOT_ARCH bit 1: an i8042 exists. Linux ignores the i8042 on FADT rev >= 2 without it,
/// and pmvm's reset path (`reboot=k`) and PS/2 device need it.
const IAPC_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH bit 2: do not probe VGA hardware.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT hypervisor vendor identity (ACPI 6.0+), "PMVMKVM" padded with a NUL.
const HYPERVISOR_VENDOR: [u8; 8] = *b"PMVMKVM\0";

/// The FADT for a HW-reduced guest whose DSDT is at `dsdt_addr`.
pub(crate) fn build(power: &PowerDesc, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button: the spec says to set both bits then.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_port_byte(power.reset_port);
    fadt.reset_value = power.reset_value;
    fadt.sleep_control_reg = io_port_byte(power.sleep_control_port);
    fadt.sleep_status_reg = io_port_byte(power.sleep_status_port);
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// A one-byte register at I/O port `port`.
fn io_port_byte(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc_with_nvdimms, le_u16, le_u32, le_u64, sum};

    /// Byte offsets from the ACPI 6.5 FADT layout.
    const FLAGS: usize = 112;
    const RESET_REG: usize = 116;
    const RESET_VALUE: usize = 128;
    const X_DSDT: usize = 140;
    const IAPC_BOOT_ARCH: usize = 109;
    const SLEEP_CONTROL_REG: usize = 244;
    const SLEEP_STATUS_REG: usize = 256;
    const HYPERVISOR_ID: usize = 268;

    fn fadt() -> Vec<u8> {
        let mut power = desc_with_nvdimms(0).power;
        power.reset_port = 0x1602;
        power.reset_value = 0xA5;
        power.sleep_control_port = 0x1600;
        power.sleep_status_port = 0x1601;
        build(&power, 0xE0040)
    }

    /// Asserts a GAS at `off` is a byte-wide I/O port register at `port`.
    fn assert_io_byte_gas(b: &[u8], off: usize, port: u64) {
        assert_eq!(b[off], 1, "address space: system I/O");
        assert_eq!(b[off + 1], 8, "bit width");
        assert_eq!(b[off + 2], 0, "bit offset");
        assert_eq!(b[off + 3], 1, "access size: byte");
        assert_eq!(le_u64(b, off + 4), port);
    }

    #[test]
    fn header_and_checksum() {
        let b = fadt();
        assert_eq!(&b[..4], b"FACP");
        assert_eq!(b.len(), 276);
        assert_eq!(le_u32(&b, 4), 276);
        assert_eq!(b[8], 6, "major revision");
        assert_eq!(b[131], 5, "minor revision");
        assert_eq!(sum(&b), 0);
    }

    #[test]
    fn flags_are_hw_reduced_with_reset_register_and_no_fixed_buttons() {
        let b = fadt();
        let flags = le_u32(&b, FLAGS);
        assert_eq!(
            flags,
            (1 << 20) | (1 << 10) | (1 << 4) | (1 << 5),
            "{flags:#x}"
        );
    }

    #[test]
    fn reset_register_and_value() {
        let b = fadt();
        assert_io_byte_gas(&b, RESET_REG, 0x1602);
        assert_eq!(b[RESET_VALUE], 0xA5);
    }

    #[test]
    fn sleep_registers_are_byte_io_ports() {
        let b = fadt();
        assert_io_byte_gas(&b, SLEEP_CONTROL_REG, 0x1600);
        assert_io_byte_gas(&b, SLEEP_STATUS_REG, 0x1601);
    }

    #[test]
    fn dsdt_only_through_x_dsdt() {
        let b = fadt();
        assert_eq!(le_u64(&b, X_DSDT), 0xE0040);
        assert_eq!(le_u32(&b, 40), 0);
    }

    #[test]
    fn boot_arch_8042_present_vga_absent() {
        let b = fadt();
        assert_eq!(le_u16(&b, IAPC_BOOT_ARCH), 0b110);
    }

    #[test]
    fn hypervisor_vendor_identity() {
        let b = fadt();
        assert_eq!(&b[HYPERVISOR_ID..HYPERVISOR_ID + 8], b"PMVMKVM\0");
    }
}
