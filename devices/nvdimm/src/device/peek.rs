//! Reading a device's state without disturbing the guest or a writeback: the pages the next
//! flush would write, how writes are tracked, the writeback running now.

use super::attach::Tracker;
use super::Nvdimm;
use crate::error_chain as chain;
use crate::in_flight::WritebackInProgress;
use crate::lock::lock;
use crate::stats::Tracking;

impl Nvdimm {
    /// Dirty pages the next flush would write, read without disturbing the guest: exact with
    /// the dirty ring (a read-only walk of the published entries), with manual protect (a GET
    /// without CLEAR) and before attach; None in GET-clears mode, where reading the log would
    /// consume it, and once the rings overflowed.
    pub fn pending_pages(&self) -> Option<u64> {
        let peeked = match self.attachment.get().and_then(|a| a.dirty.as_ref()) {
            Some(Tracker::Log(log)) => log.peek_union(&lock(&self.pending)).map_err(|e| chain(&e)),
            Some(Tracker::Ring(rings)) => Ok(rings.peek(self.params.slot).map(|mut ring| {
                // Rings first, then pending, as collecting locks them; a page collected in
                // between is then in pending and counted once.
                let pending = lock(&self.pending);
                ring.retain(|&p| !pending.contains(p));
                ring.sort_unstable();
                ring.dedup();
                pending.len() + ring.len() as u64
            })),
            None => Ok(Some(lock(&self.pending).len())),
        };
        peeked.unwrap_or_else(|e| {
            log::warn!("{}: cannot peek at the dirty pages: {e}", self.id);
            None
        })
    }

    /// How this device tracks guest writes: "ring", "ring-overflowed" (the rings overflowed
    /// and every writeback covers the whole device), "bitmap", or "none" (read-only or not
    /// attached).
    pub fn dirty_tracking(&self) -> Tracking {
        match self.attachment.get().and_then(|a| a.dirty.as_ref()) {
            Some(Tracker::Log(_)) => Tracking::Bitmap,
            Some(Tracker::Ring(r)) if r.overflowed() => Tracking::RingOverflowed,
            Some(Tracker::Ring(_)) => Tracking::Ring,
            None => Tracking::None,
        }
    }

    /// The writeback running now, if any; answers at once even if it is blocked in the
    /// file system.
    pub fn writeback_in_progress(&self) -> Option<WritebackInProgress> {
        self.in_flight.get(&self.id)
    }
}
