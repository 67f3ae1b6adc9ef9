//! The statistics document of one NVDIMM, as the control socket serves it.
//!
//! The field names are the JSON keys: server, client and tests share this type.

use serde::{Deserialize, Serialize};

/// Counters of one device since pmvm started. They only grow; readers compute deltas.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemStats {
    /// Guest flushes: writes of the right width to a flush hint.
    pub flushes: u64,
    /// Pages written back to the file, by guest and host flushes.
    pub pages_written: u64,
    pub bytes_written: u64,
    /// Contiguous runs of pages written back.
    pub runs: u64,
    /// Guest flushes that found nothing dirty.
    pub empty_flushes: u64,
    /// Writebacks requested from the host (the API), counted apart from guest flushes.
    pub host_flushes: u64,
    /// Flush-hint writes of a width other than 8 bytes: ignored.
    pub bad_width_writes: u64,
    /// Dirty pages found by the most recent harvest.
    pub last_harvest_pages: u64,
    /// Writeback latency of guest flushes: how long the flushing vCPU waited for durability.
    pub latency_us: LatencySummary,
    /// Writes to the hint page that hit no hint register: ignored.
    #[serde(default)]
    pub outside_writes: u64,
    /// Harvest-and-writeback rounds run, empty ones included. Concurrent flushes share one
    /// (group commit), so this can be smaller than `flushes + host_flushes`.
    #[serde(default)]
    pub writebacks: u64,
    /// Writebacks that failed (dirty-log or file I/O errors), each logged. Their pages stay
    /// pending and are retried by the next flush.
    #[serde(default)]
    pub errors: u64,
    /// Rounds of the `writeback-interval=` thread, empty ones included. Not flushes: they
    /// bound what a host crash can lose for a guest that never flushes.
    #[serde(default)]
    pub background_flushes: u64,
    /// Pages those rounds wrote back (also counted in `pages_written`).
    #[serde(default)]
    pub background_pages: u64,
    /// Epochs appended to the `flush-log=` file.
    #[serde(default)]
    pub log_epochs: u64,
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
