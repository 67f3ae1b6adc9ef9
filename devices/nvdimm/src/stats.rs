//! The statistics document of one NVDIMM, as the control socket serves it.
//!
//! The field names are the JSON keys: server, client and tests share these types. The
//! counters themselves are defined in [`crate::counters`].

use serde::{Deserialize, Serialize};

pub use crate::counters::PmemStats;

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
