//! Platforms and byte readers shared by the unit tests.

use crate::{NvdimmDesc, PlatformDesc, PowerDesc};

/// pmvm's own ACPI addresses (`vmm/src/layout.rs`).
pub(crate) struct Layout {
    pub rsdp: u64,
    pub start: u64,
    pub end: u64,
}

pub(crate) const LAYOUT: Layout = Layout {
    rsdp: 0xE0000,
    start: 0xE0040,
    end: 0x10_0000,
};

/// Base of NVDIMM `i`'s range: 1 GiB apart from 4 GiB up, like pmvm places them.
pub(crate) fn spa_base(i: usize) -> u64 {
    0x1_0000_0000 + (i as u64) * (1 << 30)
}

/// NVDIMM `i`'s flush-hint page, like pmvm's `FLUSH_HINT_START + i * 4 KiB`.
pub(crate) fn hint_page(i: usize) -> u64 {
    0xD000_0000 + (i as u64) * 0x1000
}

pub(crate) fn nvdimm(i: usize) -> NvdimmDesc {
    NvdimmDesc {
        handle: i as u32 + 1,
        spa_base: spa_base(i),
        size: (64 << 20) + (i as u64) * (2 << 20),
        flush_hints: vec![hint_page(i)],
        readonly: false,
        serial_number: 0x5000 + i as u32,
    }
}

/// pmvm's platform with two vCPUs and `n` NVDIMMs.
pub(crate) fn desc_with_nvdimms(n: usize) -> PlatformDesc {
    PlatformDesc {
        cpus: 2,
        ioapic_addr: 0xFEC0_0000,
        lapic_addr: 0xFEE0_0000,
        com1_port: 0x3F8,
        com1_gsi: 4,
        power: PowerDesc {
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 1,
            s5_slp_typ: 5,
        },
        nvdimms: (0..n).map(nvdimm).collect(),
        persistence: crate::PersistenceDomain::NotReported,
    }
}

pub(crate) fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Recomputes an SDT's checksum (byte 9) after a test corrupted it on purpose.
pub(crate) fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    table[9] = 0u8.wrapping_sub(sum(table));
}
