//! The results: tables, the PASS/FAIL lines of the issue's targets, and docs/benchmarks.md.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::BenchError;
use crate::flush_path::{Round, FDATASYNC, FSYNC, FULL_WARM_UP_PAGES, MSYNC, SUBMIT, WARM_UP};
use crate::guest::{MAPPED_END, MARK_EVERY, STRIDE_PAGES};
use crate::machine::Machine;
use crate::stall::{Stall, BIG};
use crate::stats::{fmt_pct, fmt_ratio, fmt_size, fmt_us, median};
use crate::strict_memory::{StrictMemory, DEVICE_MIB, RAM_MIB, SLACK_MIB};
use crate::tracking::{Tracked, DEVICE_PAGES, LATER_PAGES};
use crate::vmm_start::{Memory, Start, MEMORY_MIB, PMEM_MIB};
use crate::{plot, GIB};

/// Largest device over smallest, for the flush of one dirty page.
pub const SIZE_LIMIT: f64 = 1.2;
/// pmvm's flush over the fastest host-only way to make the same pages durable, for every k
/// from `HOST_MIN_PAGES` on: `persist=adr`...
pub const ADR_LIMIT: f64 = 1.1;
/// ...and `persist=flush`, which must also copy each page into the file.
pub const STRICT_LIMIT: f64 = 1.3;
pub const HOST_MIN_PAGES: u64 = 1;
pub const START_LIMIT_MS: f64 = 8.0;
pub const OVERHEAD_LIMIT_MIB: f64 = 5.0;

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
        let n = self.rounds.iter().filter(|r| r.unmapped).count();
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// One target's verdict line, and for a FAIL what the run itself shows about why.
pub struct Target {
    pub verdict: Verdict,
    pub line: String,
    pub why: Vec<String>,
}

fn verdict(ok: bool) -> Verdict {
    if ok {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

fn over(ratio: f64, limit: f64) -> String {
    format!("over by {:.0}%", (ratio / limit - 1.0) * 100.0)
}

fn bitmap_kib(size: u64) -> u64 {
    size / 4096 / 8 / 1024
}

fn size_target(r: &Results) -> Target {
    let sizes = r.sizes();
    let (Some(&small), Some(&large)) = (sizes.first(), sizes.last()) else {
        return skip("flush of 1 dirty page against device size: no flush cells measured");
    };
    let (Some(a), Some(b)) = (r.cell(small, 1), r.cell(large, 1)) else {
        return skip("flush of 1 dirty page against device size: no 1-page cells measured");
    };
    let ratio = b.pmvm() / a.pmvm();
    let ok = ratio <= SIZE_LIMIT;
    let mut line = format!(
        "{} flush of 1 dirty page: {} device {} µs = {} the {} device's {} µs (limit {SIZE_LIMIT}x",
        tag(verdict(ok)),
        fmt_size(large),
        fmt_us(b.pmvm()),
        fmt_ratio(ratio),
        fmt_size(small),
        fmt_us(a.pmvm()),
    );
    if !ok {
        write!(line, ", {}", over(ratio, SIZE_LIMIT)).unwrap();
    }
    line.push(')');
    let mut why = Vec::new();
    if !ok {
        if let (Some(e0), Some(e1)) = (r.cell(small, 0), r.cell(large, 0)) {
            why.push(format!(
                "With the dirty ring an empty flush (the harvest alone) costs {} µs on {} \
                 against {} µs on {}; the 1-page flushes differ by {} µs. The host-only \
                 submit+fdatasync of 1 page takes {} µs on {} and {} µs on {}, so what grows \
                 with the device here is the host's own writeback, not pmvm's harvest.",
                fmt_us(e1.pmvm()),
                fmt_size(large),
                fmt_us(e0.pmvm()),
                fmt_size(small),
                fmt_us(b.pmvm() - a.pmvm()),
                fmt_us(b.submit()),
                fmt_size(large),
                fmt_us(a.submit()),
                fmt_size(small),
            ));
        }
    }
    if let (false, Some(ba), Some(bb)) = (ok, r.bitmap_cell(small, 1), r.bitmap_cell(large, 1)) {
        why.push(format!(
            "With the slot bitmap instead (`--dirty-tracking bitmap`) the same flush costs {} \
             µs on {} against {} µs on {}, {}: KVM keeps a {} KiB dirty bitmap for {} and a \
             harvest reads all of it (KVM_GET_DIRTY_LOG alone takes {} µs there).",
            fmt_us(bb.pmvm()),
            fmt_size(large),
            fmt_us(ba.pmvm()),
            fmt_size(small),
            fmt_ratio(bb.pmvm() / ba.pmvm()),
            bitmap_kib(large),
            fmt_size(large),
            r.get_log_us(large).map_or("-".into(), fmt_us),
        ));
    }
    Target {
        verdict: verdict(ok),
        line,
        why,
    }
}

/// Per device size: pmvm's flush against the fastest host method at every k, in one model.
fn floor_targets(r: &Results, cells: &[FlushCell], model: &str, limit: f64) -> Vec<Target> {
    let mut out = Vec::new();
    for size in r.sizes() {
        let cells: Vec<&FlushCell> = cells
            .iter()
            .filter(|c| c.size == size && c.pages >= HOST_MIN_PAGES)
            .collect();
        let Some(worst) = cells
            .iter()
            .copied()
            .max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
        else {
            continue;
        };
        let failed: Vec<&FlushCell> = cells
            .iter()
            .copied()
            .filter(|c| c.ratio() > limit)
            .collect();
        let ok = failed.is_empty();
        let top = cells.iter().map(|c| c.pages).max().unwrap_or(0);
        let mut line = format!(
            "{} persist={model}, {} device: flush within {limit}x of the fastest host method \
             at every k from {HOST_MIN_PAGES} to {top}: worst {} at k={} (fastest there: {})",
            tag(verdict(ok)),
            fmt_size(size),
            fmt_ratio(worst.ratio()),
            worst.pages,
            worst.floor().1
        );
        for c in &failed {
            write!(
                line,
                "; k={} {} ({})",
                c.pages,
                fmt_ratio(c.ratio()),
                over(c.ratio(), limit)
            )
            .unwrap();
        }
        let why = failed
            .iter()
            .map(|c| {
                let (floor, name) = c.floor();
                format!(
                    "persist={model}, {} device, k={}: pmvm {} µs, host {name} {} µs: {} µs \
                     more. pmvm's own part (the flush minus its writeback: checks and \
                     harvest) is {} µs, {} of the host's; its writeback took {} µs, {} the \
                     host's fdatasync of the same pages of a file no guest maps ({} µs).",
                    fmt_size(size),
                    c.pages,
                    fmt_us(c.pmvm()),
                    fmt_us(floor),
                    fmt_us(c.pmvm() - floor),
                    fmt_us(c.pmvm_own()),
                    fmt_pct(c.pmvm_own() / floor),
                    fmt_us(c.pmvm_writeback()),
                    fmt_ratio(c.pmvm_writeback() / c.fdatasync()),
                    fmt_us(c.fdatasync())
                )
            })
            .collect();
        out.push(Target {
            verdict: verdict(ok),
            line,
            why,
        });
    }
    out
}

/// What was measured, or the target line saying why nothing was.
fn done<'a, T>(m: &'a Measured<T>, what: &str) -> Result<&'a T, Target> {
    match m {
        Measured::Done(t) => Ok(t),
        Measured::Skipped(why) => Err(skip(&format!("{what}: {why}"))),
        Measured::Failed(why) => Err(Target {
            verdict: Verdict::Fail,
            line: format!("FAIL {what}: {why}"),
            why: Vec::new(),
        }),
    }
}

fn skip(what: &str) -> Target {
    Target {
        verdict: Verdict::Skip,
        line: format!("SKIP {what}"),
        why: Vec::new(),
    }
}

fn vmm_targets(r: &Results) -> Vec<Target> {
    let (starts, memories) = match &r.vmm {
        VmmResults::Measured { starts, memories } => (starts, memories),
        VmmResults::Skipped(why) | VmmResults::Failed(why) => {
            return vec![
                skip(&format!("VMM start to API socket ready: {why}")),
                skip(&format!("VMM memory overhead: {why}")),
            ]
        }
    };
    let cpu = median(&starts.iter().map(|s| s.process_ms).collect::<Vec<_>>());
    let vcpu = median(&starts.iter().map(|s| s.vcpu_ms).collect::<Vec<_>>());
    let ok = cpu <= START_LIMIT_MS;
    let mut line = format!(
        "{} VMM start to API socket ready: {cpu:.2} ms CPU, median of {} (limit \
         {START_LIMIT_MS} ms",
        tag(verdict(ok)),
        starts.len()
    );
    if !ok {
        write!(line, ", {}", over(cpu, START_LIMIT_MS)).unwrap();
    }
    write!(line, "); vCPU threads {vcpu:.2} ms of it").unwrap();
    let start = Target {
        verdict: verdict(ok),
        line,
        why: Vec::new(),
    };

    let mib = |kib: u64| kib as f64 / 1024.0;
    let overheads: Vec<f64> = memories.iter().map(|m| mib(m.overhead_kib())).collect();
    let overhead = median(&overheads);
    let Some(m) = memories
        .iter()
        .min_by(|a, b| {
            (mib(a.overhead_kib()) - overhead)
                .abs()
                .total_cmp(&(mib(b.overhead_kib()) - overhead).abs())
        })
        .cloned()
    else {
        return vec![start, skip("VMM memory overhead: no run measured")];
    };
    let ok = overhead <= OVERHEAD_LIMIT_MIB;
    let mut line = format!(
        "{} VMM memory overhead: {overhead:.2} MiB RSS beyond guest memory (RSS {:.2} MiB, \
         guest touched {:.2} MiB; limit {OVERHEAD_LIMIT_MIB} MiB",
        tag(verdict(ok)),
        mib(m.rss_kib),
        mib(m.guest_kib)
    );
    if !ok {
        write!(line, ", {}", over(overhead, OVERHEAD_LIMIT_MIB)).unwrap();
    }
    line.push(')');
    let mut why = Vec::new();
    if !ok {
        why.push(format!(
            "Largest resident mappings besides guest memory: {}",
            top(&m)
        ));
    }
    vec![
        start,
        Target {
            verdict: verdict(ok),
            line,
            why,
        },
    ]
}

fn tracking_target(r: &Results) -> Target {
    let runs = match done(&r.tracking, "O(dirty) dirty tracking") {
        Ok(runs) => runs,
        Err(target) => return target,
    };
    let mut ok = true;
    let mut parts = Vec::new();
    let mut why = Vec::new();
    for t in runs {
        let exact = t.flushes == 2 && t.second_flush_pages == LATER_PAGES;
        // Default options must never overflow; a forced ring may, but must come back.
        let fine = exact && t.mode != "ring-overflowed" && (t.option != "default" || !t.overflowed);
        ok &= fine;
        let option = match t.option {
            "default" => "default options".to_string(),
            o => format!("--dirty-tracking {o}"),
        };
        parts.push(format!(
            "{option} ({}{}): second flush {} pages ({:.0} s)",
            t.mode,
            if t.overflowed {
                ", overflowed, re-armed"
            } else {
                ", no overflow"
            },
            t.second_flush_pages,
            t.seconds
        ));
        if !fine {
            why.push(format!(
                "{option}: {} flushes, {} pages in all, the second {} pages (want {LATER_PAGES}), \
                 tracking `{}`, overflow warning: {}",
                t.flushes, t.pages_written, t.second_flush_pages, t.mode, t.overflowed
            ));
        }
    }
    Target {
        verdict: verdict(ok),
        line: format!(
            "{} O(dirty) dirty tracking: the probe stores to {DEVICE_PAGES} pages in one loop \
             (twice a vCPU's ring), flushes, stores to {LATER_PAGES} and flushes; {}",
            tag(verdict(ok)),
            parts.join("; ")
        ),
        why,
    }
}

fn strict_memory_target(r: &Results) -> Target {
    let m = match done(&r.strict_memory, "persist=flush memory") {
        Ok(m) => m,
        Err(target) => return target,
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let bounded = m.rss_kib <= m.bound_kib();
    let exact = m.late_pages == 1;
    let intact = m.wrong_bytes == 0;
    let ok = bounded && exact && intact;
    let mut line = format!(
        "{} persist=flush memory: after the guest wrote all of a {DEVICE_MIB} MiB device, \
         flushed and wrote {} page more, VmRSS {:.1} MiB (limit {RAM_MIB} MiB guest RAM + \
         {SLACK_MIB} MiB + the pages since = {:.1} MiB; peak {:.1} MiB); ",
        tag(verdict(ok)),
        m.late_pages,
        mib(m.rss_kib),
        mib(m.bound_kib()),
        mib(m.peak_kib),
    );
    if intact {
        write!(
            line,
            "after a power cut all {DEVICE_MIB} MiB of the file are as last flushed"
        )
        .unwrap();
    } else {
        write!(
            line,
            "after a power cut {} bytes differ from the last flush, the first at {:#x}",
            m.wrong_bytes,
            m.first_wrong.unwrap_or(0)
        )
        .unwrap();
    }
    write!(line, " ({:.0} s)", m.seconds).unwrap();
    let mut why = Vec::new();
    if !bounded {
        why.push(format!(
            "pmvm holds {:.1} MiB more than the bound after the flush: the private copies of \
             the flushed pages were not all dropped.",
            mib(m.rss_kib - m.bound_kib())
        ));
    }
    if !exact {
        why.push(format!(
            "the host flush after the guest's wrote {} pages, not the 1 page written since",
            m.late_pages
        ));
    }
    Target {
        verdict: verdict(ok),
        line,
        why,
    }
}

fn top(m: &Memory) -> String {
    m.top
        .iter()
        .map(|(n, kib)| format!("{n} {kib} KiB"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn tag(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
        Verdict::Skip => "SKIP",
    }
}

pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = vec![size_target(r)];
    t.extend(floor_targets(r, &r.flush, "adr", ADR_LIMIT));
    t.extend(floor_targets(r, &r.strict, "flush", STRICT_LIMIT));
    t.push(tracking_target(r));
    t.push(strict_memory_target(r));
    t.extend(vmm_targets(r));
    t
}

/// A table as rows of cells; the first row is the header.
struct Table(Vec<Vec<String>>);

impl Table {
    fn text(&self) -> String {
        let cols = self.0.first().map_or(0, Vec::len);
        let widths: Vec<usize> = (0..cols)
            .map(|i| {
                self.0
                    .iter()
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.0 {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            writeln!(out, "{}", cells.join("  ")).unwrap();
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = String::new();
        for (i, row) in self.0.iter().enumerate() {
            writeln!(out, "| {} |", row.join(" | ")).unwrap();
            if i == 0 {
                writeln!(out, "|{}", "---|".repeat(row.len())).unwrap();
            }
        }
        out
    }
}

/// The flush cells of one persistence model; `ways`: with the share of rounds that unmapped
/// first (`persist=adr`, the only model with two ways).
fn flush_table(cells: &[FlushCell], ways: bool) -> Table {
    let mut head = vec![
        "device",
        "dirty pages",
        "rounds",
        "pmvm flush µs",
        "its writeback µs",
        "its own µs",
    ];
    if ways {
        head.push("unmapped first");
    }
    head.extend([
        "host fdatasync µs",
        "host submit+fdatasync µs",
        "host msync µs",
        "host fsync µs",
        "fastest host",
        "pmvm / fastest",
    ]);
    let mut rows = vec![head.into_iter().map(String::from).collect::<Vec<_>>()];
    for c in cells {
        let mut row = vec![
            fmt_size(c.size),
            c.pages.to_string(),
            c.rounds.len().to_string(),
            fmt_us(c.pmvm()),
            fmt_us(c.pmvm_writeback()),
            fmt_us(c.pmvm_own()),
        ];
        if ways {
            row.push(fmt_pct(c.unmapped_share()));
        }
        row.extend([
            fmt_us(c.fdatasync()),
            fmt_us(c.submit()),
            fmt_us(c.msync()),
            fmt_us(c.fsync()),
            c.floor().1.to_string(),
            fmt_ratio(c.ratio()),
        ]);
        rows.push(row);
    }
    Table(rows)
}

/// Per device size: empty and 1-page flushes with the dirty ring and with the slot bitmap.
fn tracking_table(r: &Results) -> Table {
    let mut rows = vec![[
        "device",
        "dirty bitmap KiB",
        "KVM_GET_DIRTY_LOG µs",
        "empty flush, bitmap µs",
        "empty flush, ring µs",
        "1 page, bitmap µs",
        "1 page, ring µs",
    ]
    .map(String::from)
    .to_vec()];
    let us = |c: Option<&FlushCell>| c.map_or("-".into(), |c| fmt_us(c.pmvm()));
    for size in r.sizes() {
        rows.push(vec![
            fmt_size(size),
            bitmap_kib(size).to_string(),
            r.get_log_us(size).map_or("-".into(), fmt_us),
            us(r.bitmap_cell(size, 0)),
            us(r.cell(size, 0)),
            us(r.bitmap_cell(size, 1)),
            us(r.cell(size, 1)),
        ]);
    }
    Table(rows)
}

fn stall_table(r: &Results) -> Table {
    let s = &r.stall;
    let added = s.added_us();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let big = median(&s.big_us);
    Table(vec![
        [
            "rounds",
            "A: flush of 4096 pages µs",
            "B alone: 1 page µs",
            "B during A µs",
            "added stall, median µs",
            "added stall, max µs",
            "max / A's flush",
        ]
        .map(String::from)
        .to_vec(),
        vec![
            s.during_us.len().to_string(),
            fmt_us(big),
            fmt_us(median(&s.solo_us)),
            fmt_us(median(&s.during_us)),
            fmt_us(median(&added)),
            fmt_us(max(&added)),
            fmt_ratio(max(&added) / big),
        ],
    ])
}

fn logging_table(r: &Results) -> Table {
    let mut rows = vec![[
        "pages stored to",
        "rounds",
        "unlogged µs",
        "logged µs",
        "unlogged ns/page",
        "logged ns/page",
        "logged / unlogged",
        "same, per VM pair",
    ]
    .map(String::from)
    .to_vec()];
    for c in &r.logging {
        let (logged, unlogged) = (c.logged(), c.unlogged());
        let (l, u) = (median(&logged), median(&unlogged));
        let per_page = |us: f64| format!("{:.0}", us * 1000.0 / c.pages as f64);
        let (lo, hi) = c.pair_ratio_range();
        rows.push(vec![
            c.pages.to_string(),
            format!(
                "{} x {}",
                c.pairs.len(),
                logged.len() / c.pairs.len().max(1)
            ),
            fmt_us(u),
            fmt_us(l),
            per_page(u),
            per_page(l),
            fmt_ratio(l / u),
            format!("{} to {}", fmt_ratio(lo), fmt_ratio(hi)),
        ]);
    }
    Table(rows)
}

fn vmm_table(r: &Results) -> Option<Table> {
    let VmmResults::Measured { starts, memories } = &r.vmm else {
        return None;
    };
    let mut rows = vec![["measure", "runs", "median", "min", "max"]
        .map(String::from)
        .to_vec()];
    let mut add = |name: &str, unit: &str, v: Vec<f64>| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        rows.push(vec![
            format!("{name} ({unit})"),
            v.len().to_string(),
            format!("{:.2}", median(&v)),
            format!("{min:.2}"),
            format!("{max:.2}"),
        ]);
    };
    add(
        "CPU, exec to API socket accepting",
        "ms",
        starts.iter().map(|s| s.process_ms).collect(),
    );
    add(
        "of which vCPU threads",
        "ms",
        starts.iter().map(|s| s.vcpu_ms).collect(),
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    add(
        "VmRSS, probe in `wait`",
        "MiB",
        memories.iter().map(|m| mib(m.rss_kib)).collect(),
    );
    add(
        "guest RAM + NVDIMM resident",
        "MiB",
        memories.iter().map(|m| mib(m.guest_kib)).collect(),
    );
    add(
        "VMM overhead (VmRSS minus guest)",
        "MiB",
        memories.iter().map(|m| mib(m.overhead_kib())).collect(),
    );
    Some(Table(rows))
}

fn vmm_note(r: &Results) -> String {
    match &r.vmm {
        VmmResults::Measured { memories, .. } => memories
            .first()
            .map(|m| format!("largest other resident mappings: {}\n", top(m)))
            .unwrap_or_default(),
        VmmResults::Skipped(why) => format!("VMM start and memory not measured: {why}\n"),
        VmmResults::Failed(why) => format!("VMM start and memory failed: {why}\n"),
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

/// The host's load over the flush cells: other work there shares the CPUs and the disk, and
/// pmvm's flush and the host methods take turns (see "How it is measured") so that it weighs
/// on both alike.
fn load_line(load: &[f64]) -> String {
    match crate::load::range(load) {
        Some((lo, hi)) => {
            format!("host load (1-minute average) over the flush cells: {lo:.1} to {hi:.1}")
        }
        None => "host load: not read".into(),
    }
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

fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "# Benchmarks: the flush path, dirty tracking, VMM start and memory\n"
    )
    .unwrap();
    writeln!(
        w,
        "Generated by `scripts/bench.sh` on {} (the whole run took {:.0} s). Rerun it to \
         refresh this page and its plots; absolute numbers vary between machines, so every \
         target below is a ratio or a budget measured in the same run.\n",
        m.date, r.seconds
    )
    .unwrap();
    writeln!(w, "## Machine\n").unwrap();
    writeln!(w, "- CPU: {} ({} logical CPUs)", m.cpu, m.cpus).unwrap();
    writeln!(w, "- memory: {}", m.memory).unwrap();
    writeln!(w, "- host kernel: {}", m.kernel).unwrap();
    writeln!(w, "- KVM: {}", m.kvm).unwrap();
    writeln!(w, "- scratch files on: {}", m.scratch_fs).unwrap();
    writeln!(w, "- {}\n", load_line(&m.load)).unwrap();

    writeln!(w, "## Targets\n\n```").unwrap();
    let ts = targets(r);
    for t in &ts {
        writeln!(w, "{}", t.line).unwrap();
    }
    writeln!(w, "```\n").unwrap();
    let whys: Vec<&String> = ts.iter().flat_map(|t| &t.why).collect();
    if !whys.is_empty() {
        writeln!(w, "What this run shows about the misses:\n").unwrap();
        for why in whys {
            writeln!(w, "- {why}").unwrap();
        }
        writeln!(w).unwrap();
    }

    writeln!(w, "## Flush latency\n").unwrap();
    writeln!(
        w,
        "Median microseconds per flush. *pmvm flush* is the whole synchronous flush path of one \
         flush-hint exit; *its writeback* is the part of it the device counts in \
         `writeback_ns` (the `fdatasync`; with `persist=flush` also the copies into the file), \
         *its own* the rest, round by round: pmvm's checks and harvest. *unmapped first* is \
         the share of the rounds whose writeback unmapped the pages from the guest before the \
         `fdatasync`, the way the device measured as the cheaper for that many pages \
         (flush-path.md, step 6). The host columns make \
         the same dirty pages of a same-sized file durable without pmvm, each its own way, \
         and the fastest of them is the floor pmvm is judged against. That file is mapped by \
         no guest: writing back a page a guest maps also takes it out of KVM's page tables, \
         which is why *its writeback* can exceed *host fdatasync*.\n\n`persist=adr` (the \
         default: the guest's stores go to the page cache):\n"
    )
    .unwrap();
    out.push_str(&flush_table(&r.flush, true).markdown());
    let w = &mut out;
    writeln!(
        w,
        "\n`persist=flush` (a private mapping: a flush copies each dirty page into the file, \
         then drops the copies it made durable){}:\n",
        match r.strict.iter().map(|c| c.pages).max() {
            Some(top) if top < 65536 => format!(
                ", up to {top} pages: each round the guest copies every page it stores to \
                 afresh, about a millisecond a page on an emulating host, so rounds of 65,536 \
                 would add half an hour to the run"
            ),
            _ => String::new(),
        }
    )
    .unwrap();
    out.push_str(&flush_table(&r.strict, false).markdown());
    let w = &mut out;
    writeln!(
        w,
        "\n![flush latency against dirty pages](bench/flush-vs-pages.svg)\n\n\
         ![flush latency against device size](bench/flush-vs-size.svg)\n"
    )
    .unwrap();

    writeln!(
        w,
        "The dirty ring against the slot bitmap (`--dirty-tracking bitmap`), by device size, \
         with nothing or one page dirty: KVM's dirty bitmap has one bit per 4 KiB page and a \
         bitmap harvest reads all of it; the ring lists the pages written.\n"
    )
    .unwrap();
    out.push_str(&tracking_table(r).markdown());
    let w = &mut out;
    writeln!(w, "\n## Group commit under concurrent flushes\n").unwrap();
    writeln!(
        w,
        "Two threads flush one device as two vCPUs' hint exits would: A writes back {BIG} \
         dirty pages; B dirties one page and flushes a third of a typical A into A's \
         writeback. A flush is satisfied only by a writeback that started after it arrived \
         (A's may have harvested before B's store), so B waits for A's to end, then leads or \
         joins the next. The added stall is B's latency minus B's median alone: at most about \
         the rest of A's writeback.\n"
    )
    .unwrap();
    out.push_str(&stall_table(r).markdown());
    let w = &mut out;
    writeln!(w, "\n## Dirty tracking on guest stores\n").unwrap();
    writeln!(
        w,
        "Median microseconds for one round of guest stores, one 8-byte store per page, into a \
         memslot with KVM dirty logging and into one without; rounds are pairs of VMs (one \
         logged, one not, taking turns to go first) times rounds per VM.\n"
    )
    .unwrap();
    out.push_str(&logging_table(r).markdown());
    let w = &mut out;
    if m.kvm.starts_with("PVM") {
        writeln!(
            w,
            "\nOn this host's PVM the guest's kernel-mode code, this store loop included, is \
             emulated at about 2 million instructions a second, so a store costs microseconds \
             whether its page is logged or not, and logged/unlogged stays within the spread \
             between pairs of VMs (last column), which is this host's noise. What logging adds on hardware KVM, a write-protect fault (or a PML entry) \
             for the first store to each page after every harvest, is hidden behind that here; \
             rerun on a host with hardware KVM to see it."
        )
        .unwrap();
    }

    writeln!(w, "\n## VMM start and memory\n").unwrap();
    if let Some(t) = vmm_table(r) {
        out.push_str(&t.markdown());
        out.push('\n');
    }
    out.push_str(&vmm_note(r));
    let w = &mut out;

    let gib = |b: u64| b / GIB;
    let sizes: Vec<String> = r.sizes().iter().map(|&s| fmt_size(s)).collect();
    writeln!(w, "\n## How it is measured\n").unwrap();
    writeln!(
        w,
        "Everything runs on /dev/kvm in one `cargo bench -p pmvm --bench flush` process; \
         scratch files go to a directory on a disk-backed filesystem (the system temp dir, or \
         the cargo target dir when that is tmpfs).\n"
    )
    .unwrap();
    writeln!(
        w,
        "- **pmvm flush.** For each device size ({}) and dirty-page count, one small VM (the \
         nvdimm tests' `TinyVm`, guest code in 64-bit mode) with an `Nvdimm` of that size on a \
         fresh sparse file (`persist=adr`, and `persist=flush` in its own table; the KVM \
         dirty ring, as pmvm's `auto` picks it where KVM enforces the ring's limit; the \
         bitmap rows with manual dirty-log protect). Each round the guest stores 8 bytes into \
         each of k pages of the device, {STRIDE_PAGES} pages apart (so each is a run of its \
         own, within the first {} MiB the guest maps), then writes 1 to the flush hint. The \
         store exits to the bench, which times `Nvdimm::mmio_write`: harvest of the dirty \
         pages and one `fdatasync` (`persist=flush`: a `pwrite` per run from the private \
         copy, one `fdatasync`, and every 16 MiB or 16 flushes the drop of the copies). Every {MARK_EVERY} pages \
         the loop also stores to a marker address that exits (not timed), so KVM enters the \
         guest as often as a real guest's timer interrupts make it: an emulating host checks \
         a dirty ring's limit only then. With `persist=adr` the first {WARM_UP} rounds are \
         not counted: the first allocates the files' blocks, in the others the device tries \
         both ways of writing back that many pages (`fdatasync` alone, or unmapping the dirty \
         pages first) before it settles on the faster, as a VM does in its first flushes \
         (flush-path.md); with `persist=flush` only the first. Up to \
         {FULL_WARM_UP_PAGES} pages they run as measured rounds do, host methods included, \
         since the host's I/O between two flushes changes which way is cheaper; above, \
         pmvm's flush alone.",
        sizes.join(", "),
        MAPPED_END >> 20
    )
    .unwrap();
    writeln!(
        w,
        "- **Host-only baselines**, in the same exit as pmvm's flush, on a second \
         sparse file of the same size mapped `MAP_SHARED`: the host stores 8 bytes into the \
         same k pages, then makes them durable. *fdatasync*: `fdatasync` of the file, which \
         finds the dirty pages itself. *submit+fdatasync*: `sync_file_range(WRITE)` per run, \
         then one `fdatasync`. *msync*: `msync(MS_SYNC)` of the whole mapping, what \
         Firecracker's virtio-pmem does per flush. *fsync*: `fsync` of the file, what QEMU's \
         and Cloud Hypervisor's virtio-pmem do. The host re-dirties the pages before each \
         method. The order of the five (pmvm's flush and the four) changes from round to \
         round in a balanced design (Williams): each comes first, and right after each other \
         one, equally often. Order matters on a virtual disk: whichever runs first meets a \
         disk that sat idle while the guest ran (tens of microseconds more), and a writeback \
         right after pmvm's runs 1-2% slower, so a host method's time in a round where it \
         ran right after pmvm's flush is left out: that cost is pmvm's. *fastest host* is \
         the method with the lowest median in that row; the targets compare pmvm with it."
    )
    .unwrap();
    // "25 rounds at 0, 1, 16, 256 pages; 15 at 4096 pages; ..."
    let mut groups: Vec<(usize, Vec<u64>)> = Vec::new();
    for c in &r.flush {
        match groups.iter_mut().find(|(n, _)| *n == c.rounds.len()) {
            Some((_, pages)) if !pages.contains(&c.pages) => pages.push(c.pages),
            Some(_) => {}
            None => groups.push((c.rounds.len(), vec![c.pages])),
        }
    }
    let rounds: Vec<String> = groups
        .iter()
        .map(|(n, pages)| {
            let pages: Vec<String> = pages.iter().map(u64::to_string).collect();
            format!("{n} rounds at {} pages", pages.join(", "))
        })
        .collect();
    writeln!(
        w,
        "- **Rounds.** Medians of {} (fewer where one round writes back hundreds of MiB five \
         times; with {} GiB the largest device this keeps the whole run to minutes on 2 \
         cores). The 0-page row is an empty flush: for pmvm the harvest and, with \
         `persist=adr`, an `fdatasync` with nothing to write (a guest flush syncs even then, \
         to report a writeback the host kernel failed on its own; `persist=flush` has no such \
         writeback to report and skips it), for the host methods an `fdatasync`, `msync` or \
         `fsync` with nothing to write.",
        rounds.join("; "),
        r.sizes().last().map_or(0, |&s| gib(s))
    )
    .unwrap();
    writeln!(
        w,
        "- **Dirty tracking.** A VM whose guest stores 8 bytes into each of N pages of a \
         memfd-backed memslot, between two marker exits; timed from the vCPU's resuming after \
         the first marker to the second. Logged: `KVM_MEM_LOG_DIRTY_PAGES`, with the log read \
         and cleared (`KVM_GET_DIRTY_LOG`) at each first marker as a flush would, so each \
         round's first store to a page faults to re-enable logging. Unlogged: the same slot \
         without the flag. One warm-up round each; the guest code is the same loop, so the \
         difference is the tracking."
    )
    .unwrap();
    writeln!(
        w,
        "- **VMM start.** The release `pmvm` with the probe guest running `wait`, \
         `--memory {MEMORY_MIB}M`, one `--pmem` of {PMEM_MIB} MiB on a new sparse file and \
         `--api-sock`. The bench polls `connect()` on the socket every 50 µs; at the first \
         success it reads the child's whole CPU time (all threads, `clock_getcpuclockid`), \
         then kills it. pmvm binds the socket before it starts the vCPU threads, whose share \
         is listed apart."
    )
    .unwrap();
    writeln!(
        w,
        "- **O(dirty) dirty tracking.** The release `pmvm` with the probe guest and a \
         {DEVICE_PAGES}-page device: the probe stores to every page in one loop (twice the \
         16,384 entries of a vCPU's dirty ring, more than an emulating host's KVM stops in \
         time for), flushes, stores to {LATER_PAGES} pages and flushes again; then \
         `GET /v1/pmem/pmem0` (`last_harvest_pages` is the second flush's) and pmvm's stderr \
         (an overflow warning). Once with default options (`auto`), once with \
         `--dirty-tracking ring`, which on an emulating host overflows the ring: the second \
         flush must write {LATER_PAGES} pages either way."
    )
    .unwrap();
    writeln!(
        w,
        "- **persist=flush memory.** The release `pmvm` with the probe guest, `--memory \
         {RAM_MIB}M` and a {DEVICE_MIB} MiB `persist=flush` device on a new file: the probe \
         writes every byte of the device, flushes, writes one page more and parks. Then \
         `VmRSS` (and `VmHWM`, the peak before the flush dropped the private copies) from \
         /proc/PID/status; a host flush (`PUT /v1/pmem/pmem0/flush`), which must write that \
         one page; a power cut (`PUT /v1/vm/power-cut`); and a read of every byte of the file, \
         which must be what the guest last flushed."
    )
    .unwrap();
    writeln!(
        w,
        "- **VMM memory.** The same VM, once the probe prints `waiting`: `VmRSS` from \
         /proc/PID/status minus the resident pages of guest RAM (the {MEMORY_MIB} MiB \
         anonymous mapping) and of the NVDIMM mapping, both from /proc/PID/smaps."
    )
    .unwrap();
    out
}
