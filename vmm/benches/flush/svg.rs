//! One log-log line plot of median latencies as an SVG, with plotters: the flush benchmark's
//! plots and the guest benchmark's (tests/bench_guest) are drawn by it.

use std::path::Path;

use plotters::prelude::*;

/// A named line: its colour and its (x, y) points.
pub type Series = (String, RGBColor, Vec<(f64, f64)>);

/// Powers of ten around `lo..hi`, so both ends sit on a decade.
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    (
        10f64.powf(lo.max(1e-3).log10().floor()),
        10f64.powf(hi.max(1e-3).log10().ceil()),
    )
}

/// Draws `series` against `x_desc` over `x_range`, y in median µs; the error is plotters' own
/// message.
pub fn draw(
    path: &Path,
    caption: &str,
    x_desc: &str,
    x_range: (f64, f64),
    series: &[Series],
) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| e.to_string();
    let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (y0, y1) = decades(lo, hi);
    let root = SVGBackend::new(path, (860, 520)).into_drawing_area();
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
