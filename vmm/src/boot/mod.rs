//! Loading a kernel, its command line and initramfs, and writing the zero page.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::boot_params;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::machine::KernelFormat;
use crate::memory;

/// Oldest boot protocol with the 64-bit entry and `xloadflags`.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// `startup_64` sits 0x200 past the start of the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Linux's default `initrd_addr_max` when the header says nothing.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("--kernel {path}: cannot load")]
    Kernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("--kernel {path}: cannot open")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--kernel {path}: boot protocol {version:#x} without a 64-bit entry; pmvm needs 2.12+ with XLF_KERNEL_64")]
    KernelTooOld { path: PathBuf, version: u16 },
    #[error("--cmdline is not valid for the kernel")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the command line into guest memory")]
    CmdlineLoad(#[source] linux_loader::loader::Error),
    #[error("--initrd {path}: cannot read")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--initrd {path} is {size} bytes but only {room} bytes of guest RAM are free for it below {limit:#x}; raise --memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        room: u64,
        limit: u64,
    },
    #[error("cannot write the {0} into guest memory")]
    GuestMemory(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Where a loaded kernel starts running.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry(pub u64);

/// Loads everything the guest boots from and writes the zero page. Returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    format: KernelFormat,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<KernelEntry, BootError> {
    let mut file = File::open(kernel).map_err(|source| BootError::KernelOpen {
        path: kernel.to_path_buf(),
        source,
    })?;
    let load_err = |source| BootError::Kernel {
        path: kernel.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let mut params = boot_params::default();
    let (entry, kernel_end) = match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::KernelTooOld {
                    path: kernel.to_path_buf(),
                    version,
                });
            }
            params.hdr = hdr;
            (r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET, r.kernel_end)
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            (r.kernel_load.0, r.kernel_end)
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let mut cl = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl).map_err(BootError::CmdlineLoad)?;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, mem_size, path, kernel_end, &params)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = memory::e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = layout::RSDP_START;

    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|e| BootError::GuestMemory("zero page", e))?;
    Ok(KernelEntry(entry))
}

/// Copies the initramfs page-aligned to the top of low RAM, below the kernel's limit.
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    path: &Path,
    kernel_end: u64,
    params: &boot_params,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::Initrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr_max = match params.hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        m => u64::from(m),
    };
    let limit = memory::low_ram_end(mem_size).min(addr_max + 1);
    let floor = kernel_end.max(layout::HIMEM_START).next_multiple_of(4096);
    let room = limit.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooBig {
            path: path.to_path_buf(),
            size,
            room,
            limit,
        });
    }
    let addr = (limit - size) & !0xfff;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::GuestMemory("initramfs", e))?;
    Ok((addr, size))
}
