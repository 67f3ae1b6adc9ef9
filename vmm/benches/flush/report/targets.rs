//! The targets: their limits, and the PASS/FAIL line of each with what a FAIL shows.

use std::fmt::Write as _;

use super::{FlushCell, Measured, Results, VmmResults};
use crate::stats::{fmt_pct, fmt_ratio, fmt_size, fmt_us, median};
use crate::strict_memory::{DEVICE_MIB, RAM_MIB, SLACK_MIB};
use crate::tracking::{DEVICE_PAGES, LATER_PAGES};
use crate::vmm_start::Memory;

/// Largest device over smallest, for the flush of one dirty page, each over the fastest host
/// method on a same-sized file in the same rounds: the two cells run minutes apart, and
/// between them the host's own 1-page sync changed by 0.38x in one run and 1.36x in another.
pub const SIZE_LIMIT: f64 = 1.2;
/// pmvm's flush over the fastest host-only way to make the same pages durable, for every k
/// from `HOST_MIN_PAGES` on: `persist=adr`...
pub const ADR_LIMIT: f64 = 1.1;
/// ...and `persist=flush`, which must also copy each page into the file.
pub const STRICT_LIMIT: f64 = 1.3;
pub const HOST_MIN_PAGES: u64 = 1;
pub const START_LIMIT_MS: f64 = 8.0;
pub const OVERHEAD_LIMIT_MIB: f64 = 5.0;

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

pub(super) fn bitmap_kib(size: u64) -> u64 {
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
    let ratio = b.ratio() / a.ratio();
    let ok = ratio <= SIZE_LIMIT;
    let mut line = format!(
        "{} flush of 1 dirty page against device size: over the fastest host method on a \
         same-sized file, {} on the {} device ({} µs) and {} on the {} device ({} µs): {} \
         (limit {SIZE_LIMIT}x",
        tag(verdict(ok)),
        fmt_ratio(b.ratio()),
        fmt_size(large),
        fmt_us(b.pmvm()),
        fmt_ratio(a.ratio()),
        fmt_size(small),
        fmt_us(a.pmvm()),
        fmt_ratio(ratio),
    );
    if !ok {
        write!(line, ", {}", over(ratio, SIZE_LIMIT)).unwrap();
    }
    line.push(')');
    let mut why = Vec::new();
    if !ok {
        why.push(format!(
            "pmvm's own part of the 1-page flush (its checks and the harvest) is {} µs on {} \
             against {} µs on {}; the rest is its writeback.",
            fmt_us(b.pmvm_own()),
            fmt_size(large),
            fmt_us(a.pmvm_own()),
            fmt_size(small),
        ));
        if let (Some(ba), Some(bb)) = (r.bitmap_cell(small, 1), r.bitmap_cell(large, 1)) {
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

pub(super) fn top(m: &Memory) -> String {
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
