//! Lock-free counters of one device, updated on vCPU threads and read by the API.
//!
//! Counters only grow and are never reset by reading; readers compute deltas. A snapshot reads
//! each counter once, so counters updated concurrently may be a few events apart.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::stats::LatencySummary;

/// A monotonically increasing count. Relaxed: counts order nothing else.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that is overwritten, such as the size of the last harvest.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Number of log2 buckets: the last one holds everything from 2^31 µs (about 36 min) up.
pub const LATENCY_BUCKETS: usize = 32;

/// Microsecond latencies in power-of-two buckets: bucket `i` counts [2^i, 2^(i+1)) µs, and
/// bucket 0 also counts 0 µs.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    max: AtomicU64,
}

/// The bucket a latency falls in.
pub fn bucket_of(us: u64) -> usize {
    let log2 = 63 - us.max(1).leading_zeros() as usize;
    log2.min(LATENCY_BUCKETS - 1)
}

impl LatencyHistogram {
    pub fn record(&self, us: u64) {
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    /// p50 and p99 are the upper bound of the bucket holding that rank (2^(i+1) - 1 µs), capped
    /// at the exact maximum: never below the true percentile, at most about twice it.
    pub fn summary(&self) -> LatencySummary {
        let histogram: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let max = self.max.load(Ordering::Relaxed);
        LatencySummary {
            p50: percentile(&histogram, max, 50),
            p99: percentile(&histogram, max, 99),
            max,
            histogram,
        }
    }
}

/// The upper bound of the bucket that holds the `pct`-th percentile sample, at most `max`.
fn percentile(histogram: &[u64], max: u64, pct: u64) -> u64 {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return 0;
    }
    // Nearest-rank: the smallest sample with at least pct% of samples at or below it.
    let rank = (total * pct).div_ceil(100).max(1);
    let mut seen = 0;
    for (i, &count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let upper = if i + 1 >= 64 {
                u64::MAX
            } else {
                (1u64 << (i + 1)) - 1
            };
            return upper.min(max);
        }
    }
    max
}

pub use crate::counters::NvdimmMetrics;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 1);
        assert_eq!(bucket_of(4), 2);
        assert_eq!(bucket_of(1023), 9);
        assert_eq!(bucket_of(1024), 10);
        assert_eq!(bucket_of(1 << 31), 31);
        assert_eq!(bucket_of(u64::MAX), 31);
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let h = LatencyHistogram::default();
        let s = h.summary();
        assert_eq!((s.p50, s.p99, s.max), (0, 0, 0));
        assert_eq!(s.histogram, vec![0; LATENCY_BUCKETS]);
    }

    #[test]
    fn percentiles_are_bucket_upper_bounds_capped_at_max() {
        let h = LatencyHistogram::default();
        // 98 samples of 100 µs (bucket 6: 64..127), 2 of 5000 µs (bucket 12: 4096..8191).
        for _ in 0..98 {
            h.record(100);
        }
        h.record(5000);
        h.record(5000);
        let s = h.summary();
        assert_eq!(s.p50, 127);
        assert_eq!(s.p99, 5000, "capped at the true maximum");
        assert_eq!(s.max, 5000);
        assert_eq!(s.histogram[6], 98);
        assert_eq!(s.histogram[12], 2);
        assert_eq!(s.histogram.iter().sum::<u64>(), 100);

        let one = LatencyHistogram::default();
        one.record(0);
        assert_eq!(one.summary().p99, 0);
    }

    #[test]
    fn p99_sees_the_slowest_percent() {
        let h = LatencyHistogram::default();
        for _ in 0..90 {
            h.record(10);
        }
        for _ in 0..10 {
            h.record(3000);
        }
        h.record(70_000);
        let s = h.summary();
        assert_eq!(s.p50, 15);
        assert_eq!(s.p99, 4095);
        assert_eq!(s.max, 70_000);
    }

    #[test]
    fn snapshot_does_not_reset() {
        let m = NvdimmMetrics::default();
        m.flushes.inc();
        m.pages_written.add(3);
        m.last_harvest_pages.set(3);
        m.latency.record(42);
        let a = m.snapshot();
        let b = m.snapshot();
        assert_eq!(a, b);
        assert_eq!(a.flushes, 1);
        assert_eq!(a.pages_written, 3);
        assert_eq!(a.last_harvest_pages, 3);
        assert_eq!(a.latency_us.max, 42);
        m.flushes.inc();
        assert_eq!(m.snapshot().flushes, 2);
    }
}
