//! Every counter of a device, defined once. Each entry makes the atomic the device counts with
//! ([`NvdimmMetrics`]), the field of the statistics document with the same name as its JSON
//! key ([`PmemStats`]), and a row of [`COUNTERS`], from which the VMM renders the Prometheus
//! text, the `pmvm stats` table and the line printed at exit ([`PmemStats::summary`]). Adding
//! a counter is adding an entry.

use serde::{Deserialize, Serialize};

use crate::metrics::{Counter, Gauge, LatencyHistogram};
use crate::stats::LatencySummary;

/// What the statistics renderers know of one counter.
#[derive(Clone, Copy, Debug)]
pub struct CounterDef {
    /// The field of [`PmemStats`], and its JSON key.
    pub field: &'static str,
    /// The exported metric's name, and its one-line help.
    pub metric: &'static str,
    pub help: &'static str,
    /// The column of the `pmvm stats` table that shows it, if any.
    pub column: Option<Column>,
    /// What one unit of the value is: the exported metric is in seconds where it is a time.
    pub unit: Unit,
    /// Its words in the exit summary line, if it has some.
    pub summary: Option<fn(&PmemStats) -> String>,
    pub get: fn(&PmemStats) -> u64,
}

/// What a counter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Events, pages or bytes: exported as they are.
    Count,
    /// Nanoseconds of time spent: exported in seconds, as every time in the metrics is.
    Nanoseconds,
}

impl Unit {
    /// The exported metric's value for a counter's `value`.
    pub fn metric_value(self, value: u64) -> String {
        match self {
            Unit::Count => value.to_string(),
            Unit::Nanoseconds => (value as f64 / 1e9).to_string(),
        }
    }
}

/// A table column: its header, and the unit its values are divided by (1 shows the count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Column {
    pub header: &'static str,
    pub per: u64,
}

impl Column {
    /// The cell for `value`: the count, or the value in units of `per` with two decimals.
    pub fn cell(&self, value: u64) -> String {
        if self.per == 1 {
            value.to_string()
        } else {
            format!("{:.2}", value as f64 / self.per as f64)
        }
    }
}

macro_rules! column {
    () => {
        None
    };
    ($header:literal) => {
        Some(Column {
            header: $header,
            per: 1,
        })
    };
    ($header:literal / $per:expr) => {
        Some(Column {
            header: $header,
            per: $per,
        })
    };
}

/// A counter's fragment of the summary line: its format with the value, or the value in units
/// of `per`.
macro_rules! summary {
    ($field:ident) => {
        None
    };
    ($field:ident $fmt:literal) => {
        Some(|s: &PmemStats| format!($fmt, s.$field))
    };
    ($field:ident $fmt:literal / $per:expr) => {
        Some(|s: &PmemStats| format!($fmt, s.$field as f64 / $per as f64))
    };
}

/// A counter's unit: a count unless it says `nanoseconds`.
macro_rules! unit {
    () => {
        Unit::Count
    };
    (nanoseconds) => {
        Unit::Nanoseconds
    };
}

macro_rules! counters {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident: $metric:literal, $help:literal
            $(, in $unit:ident)?
            $(, column $header:literal $(/ $per:expr)?)?
            $(, summary $fmt:literal $(/ $sper:expr)?)?;
    )+) => {
        /// Counters of one device since pmvm started. They only grow; readers compute deltas.
        /// The field names are the JSON keys: server, client and tests share this type.
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct PmemStats {
            $(
                $(#[doc = $doc])+
                #[serde(default)]
                pub $field: u64,
            )+
            /// Dirty pages found by the most recent harvest.
            #[serde(default)]
            pub last_harvest_pages: u64,
            /// Writeback latency of guest flushes: how long the flushing vCPU waited for
            /// durability.
            pub latency_us: LatencySummary,
        }

        /// Everything counted for one device, lock-free: updated on vCPU threads, read by
        /// the API. Field meanings are those of [`PmemStats`].
        #[derive(Debug, Default)]
        pub struct NvdimmMetrics {
            $(pub $field: Counter,)+
            pub last_harvest_pages: Gauge,
            pub latency: LatencyHistogram,
        }

        impl NvdimmMetrics {
            /// Reads each counter once; counters updated meanwhile may be a few events apart.
            pub fn snapshot(&self) -> PmemStats {
                PmemStats {
                    $($field: self.$field.get(),)+
                    last_harvest_pages: self.last_harvest_pages.get(),
                    latency_us: self.latency.summary(),
                }
            }
        }

        /// Every counter, in the order they are shown.
        pub const COUNTERS: &[CounterDef] = &[$(
            CounterDef {
                field: stringify!($field),
                metric: $metric,
                help: $help,
                column: column!($($header $(/ $per)?)?),
                unit: unit!($($unit)?),
                summary: summary!($field $($fmt $(/ $sper)?)?),
                get: |s| s.$field,
            },
        )+];
    };
}

// Listed in the order they are shown: the summary line reads its fragments in this order.
counters! {
    /// Guest flushes: writes of the right width to a flush hint.
    flushes: "pmvm_pmem_flushes_total", "Guest flushes: 8-byte writes to a flush hint.",
        column "FLUSHES", summary "{} flushes";
    /// Guest flushes that found nothing dirty.
    empty_flushes: "pmvm_pmem_empty_flushes_total", "Guest flushes that found no dirty page.",
        summary " ({} empty)";
    /// Writebacks requested from the host (the API), counted apart from guest flushes.
    host_flushes: "pmvm_pmem_host_flushes_total", "Writebacks requested through the API.",
        summary " + {} host flushes";
    /// Pages written back to the file, by guest and host flushes.
    pages_written: "pmvm_pmem_pages_written_total", "Pages written back to the backing file.",
        column "PAGES", summary ", {} pages";
    /// Contiguous runs of pages written back.
    runs: "pmvm_pmem_writeback_runs_total", "Contiguous runs of pages written back.",
        summary " in {} runs";
    /// Bytes written back to the file.
    bytes_written: "pmvm_pmem_bytes_written_total", "Bytes written back to the backing file.",
        column "MiB WRITTEN" / (1 << 20), summary " ({:.1} MiB) written" / (1u64 << 20);
    /// Flush-hint writes of a width other than 8 bytes: ignored.
    bad_width_writes: "pmvm_pmem_bad_width_writes_total",
        "Flush-hint writes not 8 bytes wide, ignored.";
    /// Writes to the hint page that hit no hint register: ignored.
    outside_writes: "pmvm_pmem_outside_writes_total",
        "Writes to the flush-hint page that hit no hint, ignored.";
    /// Harvest-and-writeback rounds run, empty ones included. Concurrent flushes share one
    /// (group commit), so this can be smaller than `flushes + host_flushes`.
    writebacks: "pmvm_pmem_writebacks_total",
        "Harvest-and-writeback rounds, empty ones included; flushes that meet share one.";
    /// Writebacks that failed (dirty-log or file I/O errors), each logged. Their pages stay
    /// pending and are retried by the next flush.
    errors: "pmvm_pmem_writeback_errors_total",
        "Writebacks that failed; their pages stay pending for the next flush.",
        summary ", {} errors";
    /// Rounds of the `writeback-interval=` thread, empty ones included. Not flushes: they
    /// bound what a host crash can lose for a guest that never flushes.
    background_flushes: "pmvm_pmem_background_writebacks_total",
        "Rounds of the writeback-interval thread, empty ones included; not flushes.";
    /// Pages those rounds wrote back (also counted in `pages_written`).
    background_pages: "pmvm_pmem_background_pages_total",
        "Pages the writeback-interval thread wrote back.";
    /// Epochs appended to the `flush-log=` file.
    log_epochs: "pmvm_pmem_flush_log_epochs_total", "Epochs appended to the flush-epoch log.";
    /// `persist=adr` writebacks that unmapped their dirty pages from the guest before the
    /// `fdatasync`: the way the device measured as the faster for that many pages.
    unmapped_writebacks: "pmvm_pmem_unmapped_writebacks_total",
        "Writebacks that unmapped the dirty pages first, measured as faster for that many pages.";
    /// `persist=adr` writebacks that started each run's I/O (`sync_file_range(WRITE)`) before
    /// the `fdatasync`: the way the device measured as the faster for that many pages.
    submitted_writebacks: "pmvm_pmem_submitted_writebacks_total",
        "Writebacks that started each run's I/O first, measured as faster for that many pages.";
    /// Nanoseconds writebacks spent writing the pages into the backing file until durable:
    /// the `fdatasync`, and before it the unmapping of the pages and the start of their I/O or
    /// (`persist=flush`) their copies into the file. A flush's latency minus its writeback's
    /// time is pmvm's own part: checks and harvest.
    writeback_ns: "pmvm_pmem_writeback_seconds_total",
        "Time writebacks spent writing pages to the backing file until durable (fdatasync).",
        in nanoseconds;
}

impl PmemStats {
    /// The line printed for a device at exit: the counters that have summary words, in
    /// [`COUNTERS`] order, then the guest flush latency.
    pub fn summary(&self) -> String {
        let mut line: String = COUNTERS
            .iter()
            .filter_map(|c| Some(c.summary?(self)))
            .collect();
        let l = &self.latency_us;
        line.push_str(&format!(
            ", latency p50 {}us p99 {}us max {}us",
            l.p50, l.p99, l.max
        ));
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_field_metric_and_value() {
        let m = NvdimmMetrics::default();
        m.flushes.add(1);
        m.bytes_written.add(3 << 20);
        m.log_epochs.add(13);
        let s = m.snapshot();
        let json = serde_json::to_value(&s).unwrap();
        let mut metrics = std::collections::HashSet::new();
        for c in COUNTERS {
            assert_eq!(json[c.field], (c.get)(&s), "{}", c.field);
            assert!(c.metric.starts_with("pmvm_pmem_") && c.metric.ends_with("_total"));
            assert!(metrics.insert(c.metric), "{} twice", c.metric);
        }
        // Every u64 of the document but the gauge is a counter.
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), COUNTERS.len() + 2, "{json}");
        let mib = COUNTERS
            .iter()
            .find(|c| c.field == "bytes_written")
            .unwrap();
        assert_eq!(mib.column.unwrap().cell(s.bytes_written), "3.00");
    }

    #[test]
    fn times_are_counted_in_nanoseconds_and_exported_in_seconds() {
        let m = NvdimmMetrics::default();
        m.writeback_ns.add(1_500_000);
        let s = m.snapshot();
        let def = COUNTERS.iter().find(|c| c.field == "writeback_ns").unwrap();
        assert_eq!((def.unit, (def.get)(&s)), (Unit::Nanoseconds, 1_500_000));
        assert_eq!(def.unit.metric_value((def.get)(&s)), "0.0015");
        assert!(def.metric.ends_with("_seconds_total"));
        // Every other counter is a count, exported as it is.
        for c in COUNTERS.iter().filter(|c| c.field != "writeback_ns") {
            assert_eq!(c.unit, Unit::Count, "{}", c.field);
            assert_eq!(c.unit.metric_value(7), "7");
        }
    }

    #[test]
    fn the_summary_line_reads_each_counter_with_summary_words() {
        let m = NvdimmMetrics::default();
        m.flushes.add(4);
        m.empty_flushes.add(1);
        m.host_flushes.add(2);
        m.pages_written.add(3);
        m.runs.add(2);
        m.bytes_written.add(3 << 19);
        m.errors.add(5);
        m.log_epochs.add(7);
        m.latency.record(100);
        assert_eq!(
            m.snapshot().summary(),
            "4 flushes (1 empty) + 2 host flushes, 3 pages in 2 runs (1.5 MiB) written, \
             5 errors, latency p50 100us p99 100us max 100us"
        );
    }
}
