//! The rings as the devices see them: [`DirtySource`], the one interface the device crate
//! defines for a VM-wide record of guest stores.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use nvdimm::page_set::PageSet;
use nvdimm::{DirtySource, DirtySourceError};

use super::entries::{first_published, published, RunStart, ENTRY_BYTES};
use super::{mark_all_pending, DirtyRingError, DirtyRings, Sink};

impl DirtySource for DirtyRings {
    /// Routes the pages of the dirty-logged memslot `region` into `pending` from now on. The
    /// caller must [`DirtySource::unregister`] it before deleting the slot or unmapping its
    /// memory: [`DirtySource::rearm`] sets the region again.
    fn register(&self, region: kvm_userspace_memory_region, pending: Arc<Mutex<PageSet>>) {
        let mut state = self.lock();
        state.sinks.retain(|s| s.region.slot != region.slot);
        state.sinks.push(Sink { region, pending });
    }

    /// Stops routing the pages of memslot `slot` (its device is going away).
    fn unregister(&self, slot: u32) {
        self.lock().sinks.retain(|s| s.region.slot != slot);
    }

    /// Moves every page in every ring into its device's pending set and resets the rings
    /// (see the module comment for the ordering and for overflows).
    fn collect(&self) -> Result<(), DirtySourceError> {
        Ok(self.collect_all()?)
    }

    /// After an overflow, and only while no vCPU is in the guest or can enter it: marks every
    /// device page pending, re-protects every page by turning dirty logging off and on for each
    /// device's memslot, and clears the rings, so that tracking is exact again from the next
    /// writeback on (module comment, "Re-arming"). Returns whether there was anything to
    /// re-arm. On an error the rings stay untrusted (whole-device writebacks, nothing lost).
    fn rearm(&self) -> Result<bool, DirtySourceError> {
        let mut state = self.lock();
        if !state.overflowed {
            return Ok(false);
        }
        mark_all_pending(&state.sinks);
        for sink in &state.sinks {
            for on in [false, true] {
                let region = kvm_userspace_memory_region {
                    flags: if on {
                        sink.region.flags | KVM_MEM_LOG_DIRTY_PAGES
                    } else {
                        sink.region.flags & !KVM_MEM_LOG_DIRTY_PAGES
                    },
                    ..sink.region
                };
                // SAFETY: the same slot, address and memory as registered, which the owner keeps
                // mapped until it unregisters (`register`); only the logging flag changes.
                unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| {
                    DirtyRingError::Relog {
                        slot: region.slot,
                        on,
                        source,
                    }
                })?;
            }
        }
        let size = u64::from(self.entries);
        for ring in &mut state.rings {
            for k in 0..size {
                if let Ok(flags) = ring.map.atomic_u32(k * ENTRY_BYTES) {
                    flags.store(0, Ordering::Release);
                }
            }
            ring.unaligned = true;
            ring.phantom = true;
        }
        state.overflowed = false;
        log::info!(
            "the KVM dirty ring is re-armed after its overflow: every device page is written \
             back once, then only the pages the guest writes"
        );
        Ok(true)
    }

    /// The pages of `slot` that the rings hold and no collect has taken yet, without taking
    /// them: a stats read must not reset the rings (which write-protects the guest's pages).
    /// None once the rings overflowed.
    fn peek(&self, slot: u32) -> Option<Vec<u64>> {
        let state = self.lock();
        if state.overflowed {
            return None;
        }
        let size = u64::from(self.entries);
        let mut pages = Vec::new();
        for ring in &state.rings {
            let mut start = ring.freed.load(Ordering::Acquire);
            if ring.unaligned {
                match first_published(ring, start, size) {
                    RunStart::At(gap) => start += gap,
                    RunStart::None | RunStart::Everywhere => continue,
                }
            }
            for k in 0..size {
                match published(ring, start + k, size) {
                    Some((_, s, page)) if s == slot => pages.push(page),
                    Some(_) => {}
                    None => break,
                }
            }
        }
        Some(pages)
    }

    /// Whether an overflow made this VM's rings untrusted (until [`DirtySource::rearm`]).
    fn overflowed(&self) -> bool {
        self.lock().overflowed
    }
}

impl From<DirtyRingError> for DirtySourceError {
    fn from(e: DirtyRingError) -> DirtySourceError {
        let errno = match &e {
            DirtyRingError::Enable { source, .. } | DirtyRingError::Reset { source } => {
                Some(*source)
            }
            DirtyRingError::Relog { source, .. } => Some(*source),
            DirtyRingError::Map { .. } => None,
        };
        DirtySourceError {
            what: e.to_string(),
            errno,
        }
    }
}
