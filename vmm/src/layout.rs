//! Every guest-physical address and I/O port pmvm uses, in address order.
//!
//! Overlaps are audited here and nowhere else.

/// GDT used for the 64-bit boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// One empty IDT entry: the guest installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// `boot_params`, the Linux zero page. RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables covering the first 1 GiB: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of usable low RAM; [EBDA_START, 1 MiB) is reserved in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// RSDP, where Linux's legacy scan of 0xE0000..0x100000 finds it too.
pub const RSDP_START: u64 = 0xe0000;
/// The other ACPI tables follow the RSDP up to 1 MiB.
pub const ACPI_TABLES_START: u64 = 0xe0040;
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Kernels are loaded at 1 MiB (bzImage) or at their ELF addresses.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap [MMIO_GAP_START, 4 GiB): never RAM, never a memslot.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// One 4 KiB flush-hint page per NVDIMM, device `i` at `FLUSH_HINT_START + i * 4 KiB`.
/// It is in no memslot, so every guest write to it is a synchronous MMIO exit.
pub const FLUSH_HINT_START: u64 = 0xd000_0000;
pub const FLUSH_HINT_PAGE_SIZE: u64 = 0x1000;
/// Room for this many NVDIMMs' hint pages.
pub const MAX_NVDIMMS: usize = 32;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS region (Firecracker's value).
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// RAM above the gap starts here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// NVDIMMs are placed 1 GiB-aligned above RAM and above 4 GiB.
pub const NVDIMM_ALIGN: u64 = 1 << 30;

/// COM1.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
/// i8042 data and command ports: 0xFE written to 0x64 resets the machine.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The HW-reduced ACPI power device: sleep control, sleep status and reset registers.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register to reboot.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// SLP_TYP for S5, as the DSDT's `\_S5_` package reports it.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// For tests: any byte written here cuts the power (like `PUT /v1/vm/power-cut`). No ACPI
/// table mentions it; the probe's `crash` word uses it.
pub const TEST_CRASH_PORT: u16 = 0x610;

const _: () = assert!(ACPI_TABLES_START > RSDP_START + 36);
const _: () = assert!(FLUSH_HINT_START >= MMIO_GAP_START);
const _: () = assert!(FLUSH_HINT_START + MAX_NVDIMMS as u64 * FLUSH_HINT_PAGE_SIZE <= IOAPIC_START);
const _: () = assert!(HIGH_RAM_START % NVDIMM_ALIGN == 0);
const _: () = assert!(MMIO_GAP_END == HIGH_RAM_START);
const _: () = assert!(TEST_CRASH_PORT > ACPI_RESET_PORT);
