//! The tables of the results, as text for stdout and as markdown for the docs.

use std::fmt::Write as _;

use super::targets::{bitmap_kib, top};
use super::{FlushCell, Results, VmmResults};
use crate::stats::{fmt_pct, fmt_ratio, fmt_size, fmt_us, median};

/// A table as rows of cells; the first row is the header.
pub(super) struct Table(Vec<Vec<String>>);

impl Table {
    pub(super) fn text(&self) -> String {
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

    pub(super) fn markdown(&self) -> String {
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

/// The flush cells of one persistence model; `ways`: with the shares of rounds that unmapped
/// and submitted first (`persist=adr`, the only model with steps to choose).
pub(super) fn flush_table(cells: &[FlushCell], ways: bool) -> Table {
    let mut head = vec![
        "device",
        "dirty pages",
        "rounds",
        "pmvm flush µs",
        "its writeback µs",
        "its own µs",
    ];
    if ways {
        head.extend(["unmapped first", "submitted first"]);
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
            row.extend([fmt_pct(c.unmapped_share()), fmt_pct(c.submitted_share())]);
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
pub(super) fn tracking_table(r: &Results) -> Table {
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

pub(super) fn stall_table(r: &Results) -> Table {
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

pub(super) fn logging_table(r: &Results) -> Table {
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

pub(super) fn vmm_table(r: &Results) -> Option<Table> {
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

pub(super) fn vmm_note(r: &Results) -> String {
    match &r.vmm {
        VmmResults::Measured { memories, .. } => memories
            .first()
            .map(|m| format!("largest other resident mappings: {}\n", top(m)))
            .unwrap_or_default(),
        VmmResults::Skipped(why) => format!("VMM start and memory not measured: {why}\n"),
        VmmResults::Failed(why) => format!("VMM start and memory failed: {why}\n"),
    }
}
