//! pmvm's NVDIMM: a host file mapped into the guest as persistent memory, whose flush hints
//! trap into a synchronous writeback of exactly the pages the guest dirtied.
//!
//! The flush path is [`handler`] (decode the MMIO write) → the VMM's [`DirtySource`] (the KVM
//! dirty rings) or [`dirty`] (the slot's bitmap) to harvest what the guest wrote → [`page_set`]
//! (the pages, in runs) → [`writeback`] (make exactly those file pages durable).
//! [`device::Nvdimm`] ties them together and is all the VMM needs.

pub mod backing;
pub mod cachestat;
pub mod config;
pub mod counters;
pub mod device;
pub mod dirty;
pub mod dirty_source;
pub mod fault;
pub mod file_id;
pub mod files;
pub mod flush_log;
pub mod group_commit;
pub mod handler;
pub mod in_flight;
pub mod lock;
pub mod metrics;
pub mod mmap;
pub mod page_set;
pub mod path_lock;
pub mod path_watch;
pub mod pfn;
pub mod reclaim;
pub mod sigbus;
pub mod size;
pub mod stats;
pub mod writeback;
pub mod writeback_way;

pub use backing::BackingError;
pub use config::PmemConfig;
pub use config::{OnError, PersistMode};
pub use device::{FlushError, FlushSource, HarvestBarrier, Nvdimm, NvdimmParams};

/// A vCPU's index, 0 to the number of vCPUs minus one: pmvm's MADT gives each an 8-bit
/// local APIC id.
pub type VcpuId = u8;
pub use dirty::enable_manual_protect;
pub use dirty_source::{DirtySource, DirtySourceError};
pub use fault::IoFault;
pub use in_flight::WritebackInProgress;
pub use reclaim::VcpuFence;
pub use size::{format_size, parse_size, SizeError};

/// Most NVDIMMs one VM may have. The layout has room for 32 hint pages; 16 keeps the NFIT and
/// the stats table small.
pub const MAX_DEVICES: usize = 16;
/// Most flush-hint addresses one device advertises (8 bytes each, in its own hint page).
pub const MAX_HINTS: u32 = 16;
/// Longest device id accepted.
pub const MAX_ID_LEN: usize = 32;
/// Device sizes (and so file lengths) are multiples of this: Linux maps pmem in 2 MiB sections
/// and KVM can then back the slot with huge pages.
pub const SIZE_ALIGN: u64 = 2 << 20;
/// The dirty-log granule: one bit per 4 KiB guest page.
pub const PAGE_SIZE: u64 = 4096;

/// An error and its sources joined by ": ", for one-line messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Everything that can go wrong setting up or running an NVDIMM.
#[derive(Debug, thiserror::Error)]
pub enum NvdimmError {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error("{id}: {hints} flush hints requested; between 1 and {max} are supported", max = MAX_HINTS)]
    BadHintCount { id: String, hints: u32 },
    #[error("{id}: {what} {addr:#x} is not 4 KiB aligned")]
    Misaligned {
        id: String,
        what: &'static str,
        addr: u64,
    },
    #[error("{id}: cannot map the backing file")]
    Map {
        id: String,
        #[source]
        source: mmap::MmapError,
    },
    #[error("{id}: host access to the device failed")]
    Access {
        id: String,
        #[source]
        source: mmap::MmapError,
    },
    #[error("{id} is already attached to a VM")]
    AlreadyAttached { id: String },
    #[error("{id}: KVM refused memslot {slot} ({size} bytes at guest address {gpa:#x})")]
    Memslot {
        id: String,
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{id}: cannot set up its flush log")]
    FlushLog {
        id: String,
        #[source]
        source: flush_log::FlushLogError,
    },
    #[error("{id}: flush failed")]
    Flush {
        id: String,
        #[source]
        source: FlushError,
    },
}
