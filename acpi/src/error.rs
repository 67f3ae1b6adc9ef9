//! Why a platform description cannot be turned into tables.

/// A [`crate::PlatformDesc`] that ACPI cannot describe, or tables that do not fit their area.
///
/// NVDIMMs are named by their position in `PlatformDesc::nvdimms` (`index`) and, where known,
/// by their NFIT device handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiError {
    #[error("the platform has 0 vCPUs; it needs at least 1")]
    NoCpus,
    #[error("COM1 GSI {0} cannot be used: it must be an ISA IRQ from 2 to 15 (0 is the PIT, 1 the i8042)")]
    Com1Gsi(u32),
    #[error("S5 SLP_TYP {0} does not fit the 3-bit SLP_TYP field; the maximum is 7")]
    S5SlpTyp(u8),
    #[error("{count} NVDIMMs described; at most {max} fit the DSDT's NV00..NVFF names")]
    TooManyNvdimms { count: usize, max: usize },
    #[error("NVDIMM {index} has device handle 0; NFIT device handles must be non-zero")]
    ZeroHandle { index: usize },
    #[error(
        "NVDIMMs {first} and {second} both have device handle {handle:#x}; handles must be unique"
    )]
    DuplicateHandle {
        first: usize,
        second: usize,
        handle: u32,
    },
    #[error("NVDIMM {index} (handle {handle:#x}) is {size:#x} bytes; its size must be a non-zero multiple of 2 MiB")]
    NvdimmSize {
        index: usize,
        handle: u32,
        size: u64,
    },
    #[error(
        "NVDIMM {index} (handle {handle:#x}) starts at {base:#x}; its base must be 2 MiB aligned"
    )]
    NvdimmBase {
        index: usize,
        handle: u32,
        base: u64,
    },
    #[error("NVDIMM {index} (handle {handle:#x}) at {base:#x} with size {size:#x} runs past the 64-bit address space")]
    NvdimmOverflow {
        index: usize,
        handle: u32,
        base: u64,
        size: u64,
    },
    #[error("NVDIMM {first} [{first_base:#x}, {first_end:#x}) overlaps NVDIMM {second} [{second_base:#x}, {second_end:#x})")]
    NvdimmOverlap {
        first: usize,
        first_base: u64,
        first_end: u64,
        second: usize,
        second_base: u64,
        second_end: u64,
    },
    #[error(
        "NVDIMM {index} (handle {handle:#x}) has {count} flush hints; it needs from 1 to {max}"
    )]
    HintCount {
        index: usize,
        handle: u32,
        count: usize,
        max: usize,
    },
    #[error("NVDIMM {index} (handle {handle:#x}) flush hint {addr:#x} is not 8-byte aligned")]
    HintAlign {
        index: usize,
        handle: u32,
        addr: u64,
    },
    #[error("NVDIMM {index} (handle {handle:#x}) flush hint {addr:#x} lies inside NVDIMM {other}'s range [{base:#x}, {end:#x}); hints must be outside every pmem range")]
    HintInPmem {
        index: usize,
        handle: u32,
        addr: u64,
        other: usize,
        base: u64,
        end: u64,
    },
    #[error("RSDP address {0:#x} is not 16-byte aligned, as the ACPI RSDP scan requires")]
    RsdpAlign(u64),
    #[error("RSDP at {0:#x} runs past the 64-bit address space")]
    RsdpOverflow(u64),
    #[error("ACPI table area [{start:#x}, {end:#x}) is empty: the end must be above the start")]
    EmptyArea { start: u64, end: u64 },
    #[error("RSDP [{rsdp:#x}, {rsdp_end:#x}) overlaps the table area [{start:#x}, {end:#x}); put it outside")]
    RsdpOverlap {
        rsdp: u64,
        rsdp_end: u64,
        start: u64,
        end: u64,
    },
    #[error("the {table} table ({len} bytes, placed at {addr:#x}) does not end at or below {end:#x}; enlarge the ACPI table area or describe fewer devices")]
    TablesDoNotFit {
        table: String,
        addr: u64,
        len: usize,
        end: u64,
    },
}
