//! The results, and what the bench prints and writes of them:
//! - here: the measured cells, `text` for stdout and `write_docs`;
//! - `targets`: the limits and the PASS/FAIL line of each target;
//! - `tables`: the tables, as text and as markdown;
//! - `markdown`: the page docs/benchmarks.md.

mod markdown;
mod tables;
mod targets;

use std::fmt::Write as _;
use std::path::Path;

use crate::error::BenchError;
use crate::flush_path::{Round, FDATASYNC, FSYNC, MSYNC, SUBMIT};
use crate::machine::Machine;
use crate::plot;
use crate::stall::{Stall, BIG};
use crate::stats::median;
use crate::strict_memory::StrictMemory;
use crate::tracking::Tracked;
use crate::vmm_start::{Memory, Start};

use markdown::markdown;
use tables::{flush_table, logging_table, stall_table, tracking_table, vmm_note, vmm_table};
use targets::{targets, Verdict};

/// The rounds of one (device size, dirty pages) cell.
pub struct FlushCell {
    pub size: u64,
    pub pages: u64,
    pub rounds: Vec<Round>,
    /// Bitmap cells: one `KVM_GET_DIRTY_LOG` of the slot with nothing dirty, µs.
    pub get_log_us: Option<f64>,
}

impl FlushCell {
    fn med(&self, f: fn(&Round) -> f64) -> f64 {
        median(&self.rounds.iter().map(f).collect::<Vec<_>>())
    }
    pub fn pmvm(&self) -> f64 {
        self.med(|r| r.pmvm)
    }
    /// The writeback within pmvm's flush (the device's `writeback_ns`).
    pub fn pmvm_writeback(&self) -> f64 {
        self.med(|r| r.pmvm_writeback)
    }
    /// pmvm's own part of its flush: the flush minus its writeback, round by round.
    pub fn pmvm_own(&self) -> f64 {
        self.med(|r| r.pmvm - r.pmvm_writeback)
    }
    /// A host method's median over the rounds in which it did not run right after pmvm.
    fn host_med(&self, method: usize, f: fn(&Round) -> f64) -> f64 {
        let times: Vec<f64> = self
            .rounds
            .iter()
            .filter(|r| r.after_pmvm != Some(method))
            .map(f)
            .collect();
        median(&times)
    }
    pub fn fdatasync(&self) -> f64 {
        self.host_med(FDATASYNC, |r| r.fdatasync)
    }
    /// The share of rounds whose writeback unmapped the pages first.
    pub fn unmapped_share(&self) -> f64 {
        self.share(|r| r.unmapped)
    }
    /// The share of rounds whose writeback started each run's I/O first.
    pub fn submitted_share(&self) -> f64 {
        self.share(|r| r.submitted)
    }
    fn share(&self, f: impl Fn(&Round) -> bool) -> f64 {
        let n = self.rounds.iter().filter(|r| f(r)).count();
        n as f64 / self.rounds.len().max(1) as f64
    }
    pub fn submit(&self) -> f64 {
        self.host_med(SUBMIT, |r| r.submit)
    }
    pub fn msync(&self) -> f64 {
        self.host_med(MSYNC, |r| r.msync)
    }
    pub fn fsync(&self) -> f64 {
        self.host_med(FSYNC, |r| r.fsync)
    }

    /// The fastest host method's median, and its name.
    pub fn floor(&self) -> (f64, &'static str) {
        [
            (self.fdatasync(), "fdatasync"),
            (self.submit(), "submit+fdatasync"),
            (self.msync(), "msync"),
            (self.fsync(), "fsync"),
        ]
        .into_iter()
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("four methods")
    }

    /// pmvm's median over the fastest host method's.
    pub fn ratio(&self) -> f64 {
        self.pmvm() / self.floor().0
    }
}

/// Store rounds into a logged and an unlogged memslot, in microseconds, by pair of VMs.
pub struct LoggingCell {
    pub pages: u64,
    /// (logged rounds, unlogged rounds) of each pair.
    pub pairs: Vec<(Vec<f64>, Vec<f64>)>,
}

impl LoggingCell {
    pub fn logged(&self) -> Vec<f64> {
        self.pairs
            .iter()
            .flat_map(|p| p.0.iter().copied())
            .collect()
    }

    pub fn unlogged(&self) -> Vec<f64> {
        self.pairs
            .iter()
            .flat_map(|p| p.1.iter().copied())
            .collect()
    }

    /// Lowest and highest logged/unlogged ratio of the pairs' medians: the noise of the host.
    pub fn pair_ratio_range(&self) -> (f64, f64) {
        self.pairs
            .iter()
            .map(|(l, u)| median(l) / median(u))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
                (lo.min(r), hi.max(r))
            })
    }
}

/// A measurement that may not have run.
pub enum Measured<T> {
    Done(T),
    Skipped(String),
    Failed(String),
}

pub enum VmmResults {
    Measured {
        starts: Vec<Start>,
        memories: Vec<Memory>,
    },
    Skipped(String),
    Failed(String),
}

pub struct Results {
    pub machine: Machine,
    /// With the dirty ring, as pmvm runs where KVM has it, `persist=adr`...
    pub flush: Vec<FlushCell>,
    /// ...and `persist=flush`.
    pub strict: Vec<FlushCell>,
    /// With the slot bitmap (`--dirty-tracking bitmap`), 0 and 1 dirty pages only.
    pub bitmap: Vec<FlushCell>,
    pub logging: Vec<LoggingCell>,
    pub stall: Stall,
    pub vmm: VmmResults,
    pub strict_memory: Measured<StrictMemory>,
    pub tracking: Measured<Vec<Tracked>>,
    pub seconds: f64,
}

impl Results {
    pub fn cell(&self, size: u64, pages: u64) -> Option<&FlushCell> {
        self.flush
            .iter()
            .find(|c| c.size == size && c.pages == pages)
    }

    pub fn bitmap_cell(&self, size: u64, pages: u64) -> Option<&FlushCell> {
        self.bitmap
            .iter()
            .find(|c| c.size == size && c.pages == pages)
    }

    /// Median `KVM_GET_DIRTY_LOG` time of a device size, over its bitmap cells.
    pub fn get_log_us(&self, size: u64) -> Option<f64> {
        let v: Vec<f64> = self
            .bitmap
            .iter()
            .filter(|c| c.size == size)
            .filter_map(|c| c.get_log_us)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    pub fn sizes(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.flush.iter().map(|c| c.size).collect();
        s.dedup();
        s
    }
}

/// Everything for stdout.
pub fn text(r: &Results) -> String {
    let mut out = String::new();
    writeln!(out, "\n== flush latency, persist=adr (median µs)").unwrap();
    out.push_str(&flush_table(&r.flush, true).text());
    writeln!(out, "\n== flush latency, persist=flush (median µs)").unwrap();
    out.push_str(&flush_table(&r.strict, false).text());
    writeln!(out, "\n== dirty ring against slot bitmap, by device size").unwrap();
    out.push_str(&tracking_table(r).text());
    writeln!(
        out,
        "\n== group commit: a 1-page flush (B) arriving during a {BIG}-page writeback (A)"
    )
    .unwrap();
    out.push_str(&stall_table(r).text());
    writeln!(out, "\n== dirty tracking on guest stores (median µs/round)").unwrap();
    out.push_str(&logging_table(r).text());
    writeln!(out, "\n== VMM start and memory").unwrap();
    if let Some(t) = vmm_table(r) {
        out.push_str(&t.text());
    }
    out.push_str(&vmm_note(r));
    writeln!(out, "\n== targets").unwrap();
    let ts = targets(r);
    for t in &ts {
        writeln!(out, "{}", t.line).unwrap();
        for w in &t.why {
            writeln!(out, "  why: {w}").unwrap();
        }
    }
    let count = |v: Verdict| ts.iter().filter(|t| t.verdict == v).count();
    writeln!(
        out,
        "targets met: {} of {} ({} missed, {} not measured)",
        count(Verdict::Pass),
        ts.len(),
        count(Verdict::Fail),
        count(Verdict::Skip)
    )
    .unwrap();
    writeln!(out, "\n(whole run: {:.0} s)", r.seconds).unwrap();
    out
}

/// Writes `docs/benchmarks.md` and its plots under `docs/bench/`, keeping the sections other
/// benchmarks own (`sections`).
pub fn write_docs(r: &Results, docs: &Path) -> Result<(), BenchError> {
    let bench_dir = docs.join("bench");
    std::fs::create_dir_all(&bench_dir)
        .map_err(BenchError::io(format!("creating {}", bench_dir.display())))?;
    plot::latency_vs_pages(r, &bench_dir.join("flush-vs-pages.svg"))?;
    plot::latency_vs_size(r, &bench_dir.join("flush-vs-size.svg"))?;
    let path = docs.join("benchmarks.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let kept = crate::sections::owned(&old);
    let page = if kept.is_empty() {
        markdown(r)
    } else {
        format!("{}\n{kept}", markdown(r))
    };
    std::fs::write(&path, page).map_err(BenchError::io(format!("writing {}", path.display())))
}
