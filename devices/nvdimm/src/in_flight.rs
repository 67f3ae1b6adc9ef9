//! The writeback a device is in the middle of, readable without waiting for it: a writeback
//! blocked in the file system (a frozen or hung one) must not block whoever asks about it.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::device::FlushSource;

/// A writeback that has started and not returned yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackInProgress {
    /// The device's id.
    pub device: String,
    /// Who is waiting for it: `vCPU N` (a guest flush), `host` or `background`.
    pub by: String,
    /// How long it has been running; seconds mean it is blocked in the file system.
    pub running_ms: u64,
}

/// Set for the length of one writeback; its lock is never held across I/O.
#[derive(Default)]
pub struct InFlight(Mutex<Option<(FlushSource, Instant)>>);

/// Clears the record when the writeback returns, however it returns.
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    pub fn start(&self, source: FlushSource) -> InFlightGuard<'_> {
        *self.slot() = Some((source, Instant::now()));
        InFlightGuard(self)
    }

    /// The writeback in progress on `device`, if any.
    pub fn get(&self, device: &str) -> Option<WritebackInProgress> {
        let (source, since) = (*self.slot())?;
        Some(WritebackInProgress {
            device: device.to_string(),
            by: source_name(source),
            running_ms: since.elapsed().as_millis() as u64,
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(FlushSource, Instant)>> {
        crate::lock::lock(&self.0)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        *self.0.slot() = None;
    }
}

fn source_name(source: FlushSource) -> String {
    match source {
        FlushSource::Vcpu(id) => format!("vCPU {id}"),
        FlushSource::Host => "host".into(),
        FlushSource::Background => "background".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_writeback_is_reported_while_it_runs_and_not_after() {
        let f = InFlight::default();
        assert_eq!(f.get("pmem0"), None);
        {
            let _g = f.start(FlushSource::Vcpu(1));
            std::thread::sleep(Duration::from_millis(5));
            let w = f.get("pmem0").unwrap();
            assert_eq!((w.device.as_str(), w.by.as_str()), ("pmem0", "vCPU 1"));
            assert!(w.running_ms >= 5, "{w:?}");
        }
        assert_eq!(f.get("pmem0"), None);
    }
}
