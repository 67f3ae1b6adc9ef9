//! The two SVG plots of docs/benchmarks.md, drawn with plotters on log-log axes.

use std::path::Path;

use plotters::prelude::*;

use crate::error::BenchError;
use crate::report::{FlushCell, Results};
use crate::stats::fmt_size;
use crate::GIB;

type Series = (String, RGBColor, Vec<(f64, f64)>);

const SIZE: (u32, u32) = (860, 520);
const PMVM_COLORS: [RGBColor; 3] = [
    RGBColor(200, 30, 30),
    RGBColor(230, 130, 20),
    RGBColor(140, 20, 90),
];
const SUBMIT: RGBColor = RGBColor(20, 90, 200);
const MSYNC: RGBColor = RGBColor(20, 150, 60);
const FSYNC: RGBColor = RGBColor(90, 90, 90);

/// Powers of ten around `lo..hi`, so both ends sit on a decade.
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    (
        10f64.powf(lo.max(1e-3).log10().floor()),
        10f64.powf(hi.max(1e-3).log10().ceil()),
    )
}

fn draw(
    path: &Path,
    caption: &str,
    x_desc: &str,
    x_range: (f64, f64),
    series: &[Series],
) -> Result<(), BenchError> {
    let fail = |e: &dyn std::fmt::Display| BenchError::Plot {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (y0, y1) = decades(lo, hi);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x_range.0..x_range.1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .max_light_lines(4)
        .x_desc(x_desc)
        .y_desc("median latency (µs)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| fail(&e))?;
    for (name, color, points) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
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
