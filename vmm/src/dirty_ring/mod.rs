//! The KVM dirty ring: per-vCPU rings of written guest pages, harvested in O(pages written).
//!
//! The rings are VM-wide: a vCPU's ring holds the stores it made to every device's memslot, so
//! they live here with the VM and its vCPUs, and a device sees them only as the
//! [`nvdimm::DirtySource`] it registers its slot with (`source.rs`).
//!
//! With `KVM_CAP_DIRTY_LOG_RING`, KVM records the first store to each write-protected page of
//! a logged memslot as an entry (slot, page offset) in the ring of the vCPU that made it, then
//! lets the store through. `collect` finds every published entry in every ring,
//! hands its page to the device owning the slot (its pending [`PageSet`]), marks the entry
//! harvested, and calls `KVM_RESET_DIRTY_RINGS`, which write-protects those pages again and
//! frees the entries. The cost depends on the ring size and the pages written, never on the
//! device size. The slot bitmap (`KVM_GET_DIRTY_LOG`) is unavailable once the ring is on, so
//! the choice is per VM.
//!
//! Ordering, and why a store is never lost:
//! - A store to a protected page faults; KVM fills the entry and publishes it by setting
//!   `DIRTY` after a write barrier, before the store is retried. `collect` reads the flags with
//!   acquire, so the slot and offset it reads next are the ones KVM wrote.
//! - Between collecting an entry and the reset, the page stays writable: a store then makes
//!   no new entry. The writeback therefore starts only after the reset returns: such a store
//!   is already in the page, so it is written back; a store after the reset faults again and
//!   goes into the ring for the next flush.
//! - One mutex serialises every collector (vCPU flushes of any device, the API, background
//!   writeback, ring-full exits), and it is held until the reset returns, so a flush that
//!   finds the rings empty knows any entry taken by another collector is already in its
//!   device's pending set and its page protected again.
//!
//! A ring past its soft limit makes `KVM_RUN` return `KVM_EXIT_DIRTY_RING_FULL`; the vCPU
//! thread calls `collect` and re-enters. Nothing is written back then: the pages wait in the
//! pending sets.
//!
//! **Overflow.** KVM checks the soft limit only when it enters the guest. A host that runs
//! many guest instructions per entry (an emulating or nested hypervisor) can push more entries
//! than the ring holds; KVM then overwrites unharvested ones, whose pages stay writable and
//! unrecorded, and its count of used entries no longer matches the ring. pmvm walks each ring in
//! push order and resets it on its own, so KVM must free exactly the entries walked; a walk that
//! finds a ring completely full, a reset that frees a different number, or a ring-full exit
//! with nothing to harvest means an overflow. Until a re-arm (`rearm`) the VM's rings are not
//! trusted: every harvest marks whole devices pending (slow, losing nothing), and a ring-full
//! exit frees as many entries as KVM provably has outstanding, so the vCPU never stalls.
//!
//! **Re-arming.** With every vCPU held out of the guest, `rearm` (`source.rs`) marks every
//! device page pending (the next writeback covers them all), turns dirty logging off and on for
//! each device's memslot, which write-protects every page again, and clears every entry's flags.
//! KVM's next push then lands at its own index, which pmvm no longer knows; the first walk of
//! such a ring finds the one run of published entries and starts there, freeing the entries
//! before it (what KVM still counts from the overflow) in the same reset. What KVM counts beyond
//! that is a whole number of rings, which a ring-full exit with nothing published then frees a
//! ring at a time. From the first writeback on, tracking is exact again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use nvdimm::mmap::{Mapping, MmapError};
use nvdimm::page_set::PageSet;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl;

mod entries;
mod source;

use entries::{
    first_published, mark_harvested, walk_ring, RunStart, VcpuRing, ENTRY_BYTES,
    KVM_DIRTY_GFN_F_DIRTY, KVM_RESET_DIRTY_RINGS,
};

/// Entries per vCPU ring pmvm asks for (256 KiB): a ring-full exit per 16,000-odd pages
/// written, and room for a large burst before an emulating host could overflow it.
pub const DEFAULT_RING_ENTRIES: u32 = 16384;
/// Smallest ring accepted, so that [`SOFT_LIMIT_MARGIN`] leaves a usable ring.
pub const MIN_RING_ENTRIES: u32 = 2048;
/// KVM stops a vCPU once its ring holds `size - reserved` entries, reserved being 64 plus the
/// CPU's dirty-log buffer (512 with Intel PML): never more than this.
const SOFT_LIMIT_MARGIN: u64 = 64 + 512;

/// A dirty-ring operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirtyRingError {
    #[error("KVM_ENABLE_CAP(DIRTY_LOG_RING) with {bytes}-byte rings failed")]
    Enable {
        bytes: u64,
        #[source]
        source: errno::Error,
    },
    #[error("mapping the dirty ring of vCPU {vcpu} failed: {reason}")]
    Map { vcpu: usize, reason: String },
    #[error("KVM_RESET_DIRTY_RINGS failed")]
    Reset {
        #[source]
        source: errno::Error,
    },
    #[error("turning dirty logging {} on memslot {slot} failed", if *.on { "on" } else { "off" })]
    Relog {
        slot: u32,
        on: bool,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Whether this VM's KVM offers the dirty ring, and the largest ring it allows, in bytes.
pub fn ring_support(vm: &VmFd) -> Option<(u32, u64)> {
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let max = vm.check_extension_raw(cap.into());
        if max > 0 {
            return Some((cap, max as u64));
        }
    }
    None
}

/// Why this host's KVM cannot be trusted to stop a vCPU at its ring's soft limit, if it
/// cannot. KVM checks the limit only when it enters the guest. PVM (`kvm_pvm`, a KVM that runs
/// nested without hardware virtualisation) runs long stretches of guest kernel code per entry,
/// and a Linux guest booted there overflows a 16,384-entry ring (measured: the minimal kernel's
/// DAX-root mount). Hardware KVM exits at least at every PML-buffer flush, so it stops in time.
pub fn ring_limit_unenforced() -> Option<&'static str> {
    std::path::Path::new("/sys/module/kvm_pvm")
        .exists()
        .then_some("this host's KVM is PVM (kvm_pvm), which checks the ring's limit too rarely")
}

/// A device's memslot, as the rings feed it.
pub(super) struct Sink {
    /// The slot as registered with KVM (dirty-logged), to re-arm its logging.
    pub(super) region: kvm_userspace_memory_region,
    pub(super) pending: Arc<Mutex<PageSet>>,
}

/// A vCPU's handle on its ring, for the `KVM_EXIT_DIRTY_RING_FULL` protocol and early
/// harvests.
#[derive(Clone, Debug)]
pub struct VcpuRingHandle {
    index: usize,
    freed: Arc<AtomicU64>,
    map: Arc<Mapping>,
    entries: u64,
}

impl VcpuRingHandle {
    /// Read before each `KVM_RUN`; pass to [`DirtyRings::ring_full`] if it exits ring-full.
    pub fn mark(&self) -> u64 {
        self.freed.load(Ordering::Acquire)
    }
}

struct Rings {
    rings: Vec<VcpuRing>,
    sinks: Vec<Sink>,
    /// Entries whose slot no device claims or whose page lies past its end: never expected.
    stray: u64,
    /// An overflow was seen: harvests mark whole devices pending until a re-arm.
    overflowed: bool,
    /// Overflows seen since the VM started.
    overflows: u64,
}

/// An overflow of a VM's rings (module comment, "Overflow"), reported once until the rings
/// are re-armed to the hook set with [`DirtyRings::on_overflow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingOverflow {
    /// Entries per vCPU ring.
    pub entries: u32,
}

impl std::fmt::Display for RingOverflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the KVM dirty ring ({} entries per vCPU) overflowed: this host's KVM entered the \
             guest too rarely to stop at the ring's limit. Flushes write back whole devices \
             until the rings are re-armed (at the next flush)",
            self.entries
        )
    }
}

type OverflowHook = Box<dyn Fn(RingOverflow) + Send + Sync>;

/// The dirty rings of every vCPU of one VM, and where their pages go.
pub struct DirtyRings {
    vm: Arc<VmFd>,
    entries: u32,
    state: Mutex<Rings>,
    on_overflow: OverflowHook,
}

impl std::fmt::Debug for DirtyRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRings")
            .field("entries", &self.entries)
            .finish()
    }
}

impl DirtyRings {
    /// Turns the dirty ring on for `vm` with rings of `entries` entries (clamped to what KVM
    /// allows; a power of two). Must run before any vCPU exists. `Ok(None)` if KVM lacks it.
    pub fn enable(vm: Arc<VmFd>, entries: u32) -> Result<Option<DirtyRings>, DirtyRingError> {
        let Some((cap, max_bytes)) = ring_support(&vm) else {
            return Ok(None);
        };
        let max_entries = (max_bytes / ENTRY_BYTES).min(u64::from(u32::MAX)) as u32;
        // KVM wants a power of two of at least one page of entries.
        let min_entries = (nvdimm::PAGE_SIZE / ENTRY_BYTES) as u32;
        let entries = entries
            .min(max_entries)
            .max(min_entries)
            .max(MIN_RING_ENTRIES)
            .checked_next_power_of_two()
            .unwrap_or(min_entries);
        let bytes = u64::from(entries) * ENTRY_BYTES;
        let mut enable = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = bytes;
        vm.enable_cap(&enable)
            .map_err(|source| DirtyRingError::Enable { bytes, source })?;
        Ok(Some(DirtyRings {
            vm,
            entries,
            state: Mutex::new(Rings {
                rings: Vec::new(),
                sinks: Vec::new(),
                stray: 0,
                overflowed: false,
                overflows: 0,
            }),
            on_overflow: Box::new(|overflow| log::warn!("{overflow}")),
        }))
    }

    /// Reports overflows to `hook` instead of logging them: the caller knows what the user
    /// can change about them. Runs on the thread that found the overflow, with the rings
    /// locked, so it must not call back into them.
    pub fn on_overflow(mut self, hook: impl Fn(RingOverflow) + Send + Sync + 'static) -> Self {
        self.on_overflow = Box::new(hook);
        self
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn lock(&self) -> MutexGuard<'_, Rings> {
        // Every critical section leaves the rings consistent (fetch advances entry by entry).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps the ring of a vCPU just created on this VM (vCPUs in creation order).
    pub fn add_vcpu(&self, vcpu: &VcpuFd) -> Result<VcpuRingHandle, DirtyRingError> {
        let mut state = self.lock();
        let index = state.rings.len();
        let map = Mapping::vcpu_pages(
            vcpu,
            u64::from(self.entries) * ENTRY_BYTES,
            u64::from(KVM_DIRTY_LOG_PAGE_OFFSET),
        )
        .map_err(|e: MmapError| DirtyRingError::Map {
            vcpu: index,
            reason: nvdimm::error_chain(&e),
        })?;
        let freed = Arc::new(AtomicU64::new(0));
        let map = Arc::new(map);
        state.rings.push(VcpuRing {
            map: map.clone(),
            freed: freed.clone(),
            unaligned: false,
            phantom: false,
        });
        Ok(VcpuRingHandle {
            index,
            freed,
            map,
            entries: u64::from(self.entries),
        })
    }

    /// Moves every page in every ring into its device's pending set and resets the rings
    /// (see the module comment for the ordering and for overflows).
    fn collect_all(&self) -> Result<(), DirtyRingError> {
        let mut state = self.lock();
        self.collect_locked(&mut state).map(drop)
    }

    /// Collects if `ring` is at least half full. The vCPU calls it after each exit: KVM stops
    /// a vCPU only at its ring's soft limit and checks that only when it enters the guest, so
    /// harvesting early at exits leaves room for a long burst between two entries (an
    /// emulating host can run thousands of guest stores per entry). One atomic load when not.
    pub fn collect_if_filling(&self, ring: &VcpuRingHandle) -> Result<(), DirtyRingError> {
        let half = ring.freed.load(Ordering::Acquire) + ring.entries / 2;
        let at = (half % ring.entries) * ENTRY_BYTES;
        let filling = ring
            .map
            .atomic_u32(at)
            .is_ok_and(|f| f.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY != 0);
        if filling {
            self.collect_all()?;
        }
        Ok(())
    }

    /// Handles `KVM_EXIT_DIRTY_RING_FULL` on the thread of the vCPU owning `ring`, `mark`
    /// being [`VcpuRingHandle::mark`] from before the `KVM_RUN` that exited. Harvests; and if
    /// the vCPU's ring gave nothing although KVM counts it full, frees entries KVM still counts
    /// (lost to an overflow) so the vCPU can run.
    pub fn ring_full(&self, ring: &VcpuRingHandle, mark: u64) -> Result<(), DirtyRingError> {
        let vcpu = ring.index;
        let mut state = self.lock();
        let walked = self.collect_locked(&mut state)?;
        let Some(ring) = state.rings.get(vcpu) else {
            return Ok(());
        };
        let freed_before = ring.freed.load(Ordering::Acquire);
        // At the exit KVM counted at least its soft limit used; since `mark` (before the
        // run), collectors freed `since`.
        let since = freed_before.saturating_sub(mark);
        let (phantom, unaligned) = (ring.phantom, ring.unaligned);
        if !state.overflowed {
            if walked[vcpu] > 0 || since > 0 {
                return Ok(());
            }
            // Counted full, nothing freed, nothing published. Once re-armed and aligned, what
            // KVM counts is whole rings left from the overflow: free one.
            if phantom && !unaligned {
                return self.free_whole_ring(ring, freed_before);
            }
            // Unaligned, KVM's count is unknown: free what it provably holds (below).
            // Otherwise entries were overwritten.
            if !unaligned {
                self.mark_overflowed(&mut state);
            }
        }
        let Some(ring) = state.rings.get(vcpu) else {
            return Ok(());
        };
        // At least `soft - since` entries are still counted, so freeing that many in order
        // cannot free past KVM's newest one. The vCPU is out of KVM_RUN: nothing is pushed to
        // its ring meanwhile.
        let size = u64::from(self.entries);
        let count = size.saturating_sub(SOFT_LIMIT_MARGIN).saturating_sub(since);
        if count == 0 {
            return Ok(());
        }
        for k in 0..count {
            mark_harvested(ring, freed_before + k, size);
        }
        let freed = self.reset_marked(count)?;
        ring.freed.store(freed_before + freed, Ordering::Release);
        Ok(())
    }

    /// Frees the `size` entries from `freed_before`, with the vCPU out of `KVM_RUN` and KVM
    /// counting at least that many (whole rings left from an overflow).
    fn free_whole_ring(&self, ring: &VcpuRing, freed_before: u64) -> Result<(), DirtyRingError> {
        let size = u64::from(self.entries);
        for k in 0..size {
            mark_harvested(ring, freed_before + k, size);
        }
        let freed = self.reset_marked(size)?;
        ring.freed.store(freed_before + freed, Ordering::Release);
        Ok(())
    }

    /// Walks and resets every ring, or with the rings untrusted marks every device page
    /// pending. Returns the entries walked per ring.
    fn collect_locked(&self, state: &mut Rings) -> Result<Vec<u64>, DirtyRingError> {
        if state.overflowed {
            mark_all_pending(&state.sinks);
            return Ok(vec![0; state.rings.len()]);
        }
        let size = u64::from(self.entries);
        let mut walked = Vec::with_capacity(state.rings.len());
        let mut overflow = false;
        let Rings {
            rings,
            sinks,
            stray,
            ..
        } = state;
        for ring in rings.iter_mut() {
            let start = ring.freed.load(Ordering::Acquire);
            // Entries before the first published one of a re-armed ring: KVM counts them.
            let gap = if ring.unaligned {
                match first_published(ring, start, size) {
                    RunStart::None => {
                        walked.push(0);
                        continue;
                    }
                    RunStart::At(gap) => {
                        ring.unaligned = false;
                        gap
                    }
                    RunStart::Everywhere => {
                        overflow = true;
                        walked.push(size);
                        continue;
                    }
                }
            } else {
                0
            };
            let n = walk_ring(ring, start + gap, size - gap, sinks, stray);
            walked.push(n);
            if gap + n == 0 {
                continue;
            }
            for k in 0..gap {
                mark_harvested(ring, start + k, size);
            }
            // Only this ring has entries marked harvested: KVM's count is this ring's.
            let freed = self.reset_marked(gap + n)?;
            ring.freed.fetch_add(freed, Ordering::AcqRel);
            overflow |= gap + n >= size || freed != gap + n;
        }
        if overflow {
            self.mark_overflowed(state);
        }
        Ok(walked)
    }

    /// Stops trusting the rings (idempotent).
    fn mark_overflowed(&self, state: &mut Rings) {
        if !state.overflowed {
            (self.on_overflow)(RingOverflow {
                entries: self.entries,
            });
            state.overflowed = true;
            state.overflows += 1;
        }
        mark_all_pending(&state.sinks);
    }

    /// KVM_RESET_DIRTY_RINGS: returns how many entries KVM freed.
    fn reset(&self) -> Result<u64, DirtyRingError> {
        loop {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the VM fd is valid (owned by
            // `self.vm`). KVM only touches the rings' entries marked harvested.
            let rc = unsafe { ioctl(self.vm.as_ref(), KVM_RESET_DIRTY_RINGS()) };
            if rc >= 0 {
                return Ok(rc as u64);
            }
            let source = errno::Error::last();
            if source.errno() != libc::EINTR {
                return Err(DirtyRingError::Reset { source });
            }
        }
    }

    /// Resets until KVM has freed the `marked` entries just marked harvested, or stops making
    /// progress. KVM may end a reset early when the calling thread has a signal pending (pmvm
    /// kicks vCPU threads with one to pause them), freeing fewer than were marked; the rest
    /// stay marked for the next call, made once the signal has been delivered.
    fn reset_marked(&self, marked: u64) -> Result<u64, DirtyRingError> {
        let (mut freed, mut idle) = (0, 0);
        while freed < marked && idle < 3 {
            match self.reset()? {
                0 => idle += 1,
                n => {
                    freed += n;
                    idle = 0;
                }
            }
        }
        Ok(freed)
    }

    /// How many times the rings overflowed since the VM started.
    pub fn overflows(&self) -> u64 {
        self.lock().overflows
    }

    /// Entries that named no device's page since the VM started (0 unless KVM misbehaves).
    pub fn stray_entries(&self) -> u64 {
        self.lock().stray
    }
}

fn mark_all_pending(sinks: &[Sink]) {
    for sink in sinks {
        sink.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert_all();
    }
}
