//! `persist=flush` memory: dropping the private copies of pages a writeback made durable, with
//! the vCPUs held (see `crate::reclaim`).

use super::Nvdimm;
use crate::error_chain as chain;
use crate::lock::lock;
use crate::page_set::Run;
use crate::reclaim::{self, VcpuFence};

impl Nvdimm {
    /// Sets the VMM's [`VcpuFence`]; once per device. Without it `persist=flush` keeps every
    /// private copy (safe, but memory grows with the pages ever written).
    pub fn set_vcpu_fence(&self, fence: VcpuFence) {
        if self.fence.set(fence).is_err() {
            log::warn!("{}: vCPU fence set twice; the first stays", self.id);
        }
    }

    /// After a `persist=flush` writeback of `runs`: adds them to the copies to drop, and drops
    /// the batch once it is large or old enough (see `reclaim`).
    pub(super) fn reclaim_copies(&self, runs: &[Run]) {
        if self.fence.get().is_none() {
            return;
        }
        let batch = {
            let mut copies = lock(&self.copies);
            let (pages, writebacks) = &mut *copies;
            pages.insert_runs(runs);
            *writebacks += 1;
            if pages.len() < reclaim::BATCH_PAGES && *writebacks < reclaim::BATCH_WRITEBACKS {
                return;
            }
            *writebacks = 0;
            pages.take_runs()
        };
        if !self.drop_private_copies(&batch) {
            // Kept: a later batch tries again.
            lock(&self.copies).0.insert_runs(&batch);
        }
    }

    /// With the vCPUs held, harvests what they wrote since (it stays pending) and drops the
    /// private copies of the pages of `runs` not written since, now equal to the file. A
    /// failure here loses nothing (the copies stay), so it is only reported; false then.
    fn drop_private_copies(&self, runs: &[Run]) -> bool {
        let Some(fence) = self.fence.get() else {
            return false;
        };
        if runs.is_empty() {
            return true;
        }
        let mut outcome = Err("not run".to_string());
        let held = fence(&mut || {
            outcome = self
                .harvest_into_pending()
                .map_err(|e| chain(&e))
                .and_then(|()| {
                    reclaim::drop_clean_copies(
                        &self.mapping,
                        runs,
                        &lock(&self.pending),
                        self.size(),
                    )
                    .map_err(|e| chain(&e))
                });
        });
        match held.and(outcome) {
            Ok(pages) => {
                log::debug!("{}: dropped {pages} private copies", self.id);
                true
            }
            Err(e) => {
                log::warn!(
                    "{}: the private copies of written pages stay in memory: {e}",
                    self.id
                );
                false
            }
        }
    }
}
