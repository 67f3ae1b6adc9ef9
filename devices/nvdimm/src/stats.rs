//! The statistics document of one NVDIMM, as the control socket serves it.
//!
//! The field names are the JSON keys: server, client and tests share these types. The
//! counters themselves are defined in [`crate::counters`].

use serde::{Deserialize, Serialize};

pub use crate::counters::PmemStats;

/// How the VMM learns which pages the guest wrote. On the wire: `ring`, `bitmap`,
/// `ring-overflowed` or `none`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracking {
    /// The KVM dirty ring of every vCPU: a flush costs O(pages written).
    Ring,
    /// The memslot's dirty bitmap: a flush costs O(device size).
    #[default]
    Bitmap,
    /// The rings overflowed: every writeback covers the whole device.
    RingOverflowed,
    /// Nothing to track: the device is read-only.
    None,
}

impl Tracking {
    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Ring => "ring",
            Tracking::Bitmap => "bitmap",
            Tracking::RingOverflowed => "ring-overflowed",
            Tracking::None => "none",
        }
    }
}

impl std::fmt::Display for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A latency distribution in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// `histogram[i]` counts samples in [2^i, 2^(i+1)) µs; bucket 0 also holds 0 µs.
    pub histogram: Vec<u64>,
}

/// What one writeback made durable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReport {
    /// Dirty pages harvested and written back.
    pub pages: u64,
    pub bytes: u64,
    /// Contiguous runs they formed.
    pub runs: u64,
    /// Time from harvest to durable, in microseconds.
    pub latency_us: u64,
}
