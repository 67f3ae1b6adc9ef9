//! The validated description of the machine to build. The command line makes one
//! (`cli::config`); nothing here knows the options' spelling.

use std::path::PathBuf;

use nvdimm::config::PmemConfig;

use crate::seccomp::SeccompMode;
use crate::x86::cpu_model::CpuModel;

/// Smallest guest RAM pmvm accepts: a Linux kernel needs at least this much to boot.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Local APIC ids are 8 bits in the MADT pmvm builds, and 0xff is the broadcast id.
pub const MAX_CPUS: u32 = 254;

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
}

/// The kernel formats pmvm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// How pmvm learns which pmem pages the guest wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirtyTracking {
    // auto: the ring where KVM offers it and stops vCPUs at the ring's limit, else the
    // bitmap (`--dirty-tracking` documents all three).
    Auto,
    Ring,
    Bitmap,
}

/// A machine description that has passed every check that needs no KVM.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub kernel: Option<(PathBuf, KernelFormat)>,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub cpus: u8,
    pub serial: SerialTarget,
    pub pmem: Vec<PmemConfig>,
    pub cpu_model: CpuModel,
    pub dirty_tracking: DirtyTracking,
    pub seccomp: SeccompMode,
    pub seccomp_selftest: bool,
}
