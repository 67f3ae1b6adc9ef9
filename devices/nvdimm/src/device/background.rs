//! The `writeback-interval=` loop: periodic writebacks through the same group commit as
//! flushes.

use std::time::Instant;

use super::{FlushError, FlushSource, Nvdimm};
use crate::lock::lock;
use crate::writeback::Written;

impl Nvdimm {
    /// The `writeback-interval=` loop: every interval, a writeback of whatever the guest
    /// dirtied, through the same group commit as flushes. Returns at once without an interval;
    /// otherwise blocks until [`Nvdimm::stop_background_writeback`] or a power cut. Run it on
    /// a thread of its own. Fails when a round meets a fatal error ([`FlushError::is_fatal`]),
    /// after which no round can succeed.
    pub fn run_background_writeback(&self) -> Result<(), FlushError> {
        let Some(interval) = self.writeback_interval else {
            return Ok(());
        };
        let mut stop = lock(&self.background_stop);
        loop {
            let deadline = Instant::now() + interval;
            while !*stop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                stop = self
                    .background_wake
                    .wait_timeout(stop, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if *stop {
                return Ok(());
            }
            drop(stop);
            match self.background_flush() {
                Err(e) if e.is_fatal() => return Err(e),
                _ => {}
            }
            stop = lock(&self.background_stop);
        }
    }

    /// Ends [`Nvdimm::run_background_writeback`]; a round in progress finishes first.
    pub fn stop_background_writeback(&self) {
        *lock(&self.background_stop) = true;
        self.background_wake.notify_all();
    }

    /// One background round, counted apart from flushes.
    fn background_flush(&self) -> Result<Written, FlushError> {
        let committed = self
            .commit
            .commit(|| self.write_back_dirty(FlushSource::Background));
        self.metrics.background_flushes.inc();
        if let Err(FlushError::PoweredOff) = committed.outcome {
            self.stop_background_writeback();
        }
        committed.outcome
    }
}
