//! The two SVG plots of docs/benchmarks.md, drawn with plotters on log-log axes.

use std::path::Path;

use plotters::prelude::RGBColor;

use crate::error::BenchError;
use crate::report::{FlushCell, Results};
use crate::stats::fmt_size;
use crate::svg::{self, Series};
use crate::GIB;

const PMVM_COLORS: [RGBColor; 3] = [
    RGBColor(200, 30, 30),
    RGBColor(230, 130, 20),
    RGBColor(140, 20, 90),
];
const SUBMIT: RGBColor = RGBColor(20, 90, 200);
const MSYNC: RGBColor = RGBColor(20, 150, 60);
const FSYNC: RGBColor = RGBColor(90, 90, 90);

fn draw(
    path: &Path,
    caption: &str,
    x_desc: &str,
    x_range: (f64, f64),
    series: &[Series],
) -> Result<(), BenchError> {
    svg::draw(path, caption, x_desc, x_range, series).map_err(|detail| BenchError::Plot {
        path: path.to_path_buf(),
        detail,
    })
}

fn by_pages(r: &Results, size: u64, f: fn(&FlushCell) -> f64) -> Vec<(f64, f64)> {
    r.flush
        .iter()
        .filter(|c| c.size == size && c.pages > 0)
        .map(|c| (c.pages as f64, f(c)))
        .collect()
}

fn by_size(r: &Results, pages: u64, f: fn(&FlushCell) -> f64) -> Vec<(f64, f64)> {
    r.flush
        .iter()
        .filter(|c| c.pages == pages)
        .map(|c| ((c.size / GIB) as f64, f(c)))
        .collect()
}

/// pmvm on every device size, and the host methods on the largest.
pub fn latency_vs_pages(r: &Results, path: &Path) -> Result<(), BenchError> {
    let sizes = r.sizes();
    let Some(&largest) = sizes.last() else {
        return Ok(());
    };
    let mut series: Vec<Series> = sizes
        .iter()
        .zip(PMVM_COLORS.iter().cycle())
        .map(|(&s, &c)| {
            (
                format!("pmvm flush, {}", fmt_size(s)),
                c,
                by_pages(r, s, FlushCell::pmvm),
            )
        })
        .collect();
    let l = fmt_size(largest);
    series.push((
        format!("host submit+fdatasync, {l}"),
        SUBMIT,
        by_pages(r, largest, FlushCell::submit),
    ));
    series.push((
        format!("host msync whole mapping, {l}"),
        MSYNC,
        by_pages(r, largest, FlushCell::msync),
    ));
    series.push((
        format!("host fsync, {l}"),
        FSYNC,
        by_pages(r, largest, FlushCell::fsync),
    ));
    let max_pages = r.flush.iter().map(|c| c.pages).max().unwrap_or(1) as f64;
    draw(
        path,
        "Flush latency against dirty pages",
        "dirty pages (4 KiB, one run each)",
        (1.0, max_pages.max(10.0)),
        &series,
    )
}

/// One dirty page (and none) against device size.
pub fn latency_vs_size(r: &Results, path: &Path) -> Result<(), BenchError> {
    let sizes = r.sizes();
    let (Some(&lo), Some(&hi)) = (sizes.first(), sizes.last()) else {
        return Ok(());
    };
    let series: Vec<Series> = vec![
        (
            "pmvm flush, 1 dirty page".into(),
            PMVM_COLORS[0],
            by_size(r, 1, FlushCell::pmvm),
        ),
        (
            "pmvm flush, nothing dirty".into(),
            PMVM_COLORS[1],
            by_size(r, 0, FlushCell::pmvm),
        ),
        (
            "host submit+fdatasync, 1 page".into(),
            SUBMIT,
            by_size(r, 1, FlushCell::submit),
        ),
        (
            "host msync whole mapping, 1 page".into(),
            MSYNC,
            by_size(r, 1, FlushCell::msync),
        ),
        (
            "host fsync, 1 page".into(),
            FSYNC,
            by_size(r, 1, FlushCell::fsync),
        ),
    ];
    draw(
        path,
        "Flush latency against device size",
        "device size (GiB, sparse file)",
        (
            (lo / GIB) as f64,
            ((hi / GIB) as f64).max((lo / GIB) as f64 * 2.0),
        ),
        &series,
    )
}
