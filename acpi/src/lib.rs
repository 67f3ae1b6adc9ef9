//! Every ACPI table pmvm gives a guest, built as pure functions from a [`PlatformDesc`] to bytes.
//!
//! Nothing here knows about KVM or guest memory: the VMM copies [`AcpiTables`] into the guest,
//! and `pmvm --dump-acpi` writes the same bytes to files.

/// What the guest's platform looks like, as far as ACPI describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformDesc {
    /// Number of vCPUs; their local APIC ids are `0..cpus`.
    pub cpus: u8,
    /// Guest-physical address of the IOAPIC (24 pins, GSI base 0).
    pub ioapic_addr: u32,
    /// Guest-physical address of the local APICs.
    pub lapic_addr: u32,
    /// COM1's I/O port base and GSI.
    pub com1_port: u16,
    pub com1_gsi: u32,
    /// The HW-reduced power device: FADT sleep control/status and reset registers (I/O ports).
    pub power: PowerDesc,
    /// The NVDIMMs, in NFIT device-handle order.
    pub nvdimms: Vec<NvdimmDesc>,
}

/// Ports of the HW-reduced ACPI power device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerDesc {
    pub sleep_control_port: u16,
    pub sleep_status_port: u16,
    pub reset_port: u16,
    pub reset_value: u8,
    /// SLP_TYP reported by `\_S5_`.
    pub s5_slp_typ: u8,
}

/// One NVDIMM as the NFIT and the DSDT describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvdimmDesc {
    /// NFIT device handle, equal to the DSDT child's `_ADR`. Non-zero and unique.
    pub handle: u32,
    /// Guest-physical base and length of the persistent-memory range.
    pub spa_base: u64,
    pub size: u64,
    /// Flush-hint addresses: 8-byte aligned, outside RAM, pmem and memslots.
    pub flush_hints: Vec<u64>,
    /// Reported as "not armed": the guest treats it as read-only.
    pub readonly: bool,
    /// Serial number in the control region, stable for a given device id.
    pub serial_number: u32,
}
