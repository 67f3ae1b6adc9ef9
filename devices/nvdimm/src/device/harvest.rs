//! Harvesting: the barrier that makes every vCPU's stores visible, then moving what the guest
//! dirtied into the pending set (re-arming the dirty rings after an overflow).

use std::sync::Arc;

use super::attach::Tracker;
use super::{FlushError, FlushSource, Nvdimm};
use crate::error_chain as chain;
use crate::lock::lock;
use crate::page_set::Run;
use crate::VcpuId;

/// Called before every harvest with the flushing vCPU (None for host and background
/// writebacks): the VMM makes every other vCPU leave `KVM_RUN` once and returns when each has.
/// With PML (Intel) KVM logs a vCPU's stores only when that vCPU exits, so a store another vCPU
/// completed before the flush would otherwise be missing from the harvest.
pub type HarvestBarrier = Arc<dyn Fn(Option<VcpuId>) -> Result<(), String> + Send + Sync>;

impl Nvdimm {
    /// Sets the VMM's [`HarvestBarrier`]; once per device.
    pub fn set_harvest_barrier(&self, barrier: HarvestBarrier) {
        if self.barrier.set(barrier).is_err() {
            log::warn!("{}: harvest barrier set twice; the first stays", self.id);
        }
    }

    pub(super) fn before_harvest(&self, source: FlushSource) -> Result<(), FlushError> {
        let Some(barrier) = self.barrier.get() else {
            return Ok(());
        };
        let flushing = match source {
            FlushSource::Vcpu(id) => Some(id),
            FlushSource::Host | FlushSource::Background => None,
        };
        barrier(flushing).map_err(FlushError::Barrier)
    }

    /// Takes the pending pages merged with what the guest dirtied (if attached and writable),
    /// in runs. Whatever a failed harvest already took stays pending.
    pub(super) fn harvest(&self) -> Result<Vec<Run>, FlushError> {
        self.harvest_into_pending()?;
        self.rearm_overflowed_rings();
        Ok(lock(&self.pending).take_runs())
    }

    /// After a dirty-ring overflow (every device page now pending), re-arms exact tracking
    /// with the vCPUs held, so that this writeback is the only whole-device one. Without a
    /// fence, or if re-arming fails, the rings stay untrusted: whole-device writebacks, nothing
    /// lost.
    fn rearm_overflowed_rings(&self) {
        let Some(Tracker::Ring(rings)) = self.attachment.get().and_then(|a| a.dirty.as_ref())
        else {
            return;
        };
        let Some(fence) = self.fence.get().filter(|_| rings.overflowed()) else {
            return;
        };
        let mut outcome = Ok(false);
        let held = fence(&mut || outcome = rings.rearm().map_err(|e| chain(&e)));
        if let Err(e) = held.and(outcome) {
            log::warn!(
                "{}: the dirty rings stay untrusted (whole-device writebacks): {e}",
                self.id
            );
        }
    }

    /// Moves what the guest dirtied since the last harvest into the pending set, re-protecting
    /// those pages.
    pub(super) fn harvest_into_pending(&self) -> Result<(), FlushError> {
        match self.attachment.get().and_then(|a| a.dirty.as_ref()) {
            Some(Tracker::Log(log)) => log
                .harvest_into(&mut lock(&self.pending))
                .map_err(FlushError::Harvest)?,
            // Not under the pending lock: collecting takes it (rings first, then pending).
            Some(Tracker::Ring(rings)) => {
                rings.collect().map_err(FlushError::Ring)?;
            }
            None => {}
        }
        Ok(())
    }
}
