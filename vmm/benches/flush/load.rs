//! The host's load while a benchmark runs: other work shares the CPUs and the disk, so each
//! page of results says how busy the host was. Shared by the flush and guest-side benchmarks.

/// The host's 1-minute load average, from /proc/loadavg.
pub fn average() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The lowest and highest of `samples`, if any.
pub fn range(samples: &[f64]) -> Option<(f64, f64)> {
    let first = *samples.first()?;
    Some(
        samples
            .iter()
            .fold((first, first), |(lo, hi), &x| (lo.min(x), hi.max(x))),
    )
}
