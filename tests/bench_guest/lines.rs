//! The console lines of guest-images/linux-init/guest-bench.c, and the summaries made of them.

/// One line the guest benchmark printed.
#[derive(Debug, PartialEq)]
pub enum Event {
    Start {
        dax: bool,
        reps: u32,
        max_pages: u32,
    },
    Ready {
        series: String,
        k: u32,
    },
    Done {
        series: String,
        k: u32,
        us: Vec<u64>,
    },
    AllDone,
    Fail(String),
}

const PREFIX: &str = "guest-bench: ";

fn field<'a>(words: &[&'a str], key: &str, line: &str) -> Result<&'a str, String> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .ok_or_else(|| format!("no {key}= in guest line {line:?}"))
}

fn num<T: std::str::FromStr>(words: &[&str], key: &str, line: &str) -> Result<T, String> {
    let v = field(words, key, line)?;
    v.parse()
        .map_err(|_| format!("{key}={v:?} is not a number in guest line {line:?}"))
}

/// The event of a console line: `None` for lines that are not the benchmark's (the kernel's
/// own messages, which can share the line's start when they interleave, are skipped).
pub fn parse(line: &str) -> Option<Result<Event, String>> {
    let at = line.find(PREFIX)?;
    let rest = line[at + PREFIX.len()..].trim();
    let words: Vec<&str> = rest.split_whitespace().collect();
    let series = || {
        words
            .get(1)
            .map(|s| s.to_string())
            .ok_or_else(|| format!("no series in guest line {line:?}"))
    };
    let event = match words.first().copied() {
        Some("start") => (|| {
            Ok(Event::Start {
                dax: field(&words, "dax", line)? == "1",
                reps: num(&words, "reps", line)?,
                max_pages: num(&words, "max_pages", line)?,
            })
        })(),
        Some("ready") => (|| {
            Ok(Event::Ready {
                series: series()?,
                k: num(&words, "k", line)?,
            })
        })(),
        Some("done") => (|| {
            let list = field(&words, "us", line)?;
            let us = list
                .split(',')
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("sample {v:?} is not a number in {line:?}"))
                })
                .collect::<Result<Vec<u64>, String>>()?;
            Ok(Event::Done {
                series: series()?,
                k: num(&words, "k", line)?,
                us,
            })
        })(),
        Some("all") if words.get(1) == Some(&"done") => Ok(Event::AllDone),
        Some("FAIL") => Ok(Event::Fail(rest["FAIL".len()..].trim().to_string())),
        _ => Err(format!("unknown guest-bench line {line:?}")),
    };
    Some(event)
}

/// Median and 99th percentile (nearest rank) of samples; with fewer than 100 samples the
/// 99th percentile is the largest.
pub fn median_p99(samples: &[u64]) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2] as f64
    } else {
        (s[n / 2 - 1] + s[n / 2]) as f64 / 2.0
    };
    let rank = (n * 99).div_ceil(100).max(1);
    Some((median, s[rank - 1] as f64))
}

/// The median of the flush latencies that arrived between two samples of pmvm's histogram
/// (`latency_us.histogram[i]` counts flushes of 2^i to 2^(i+1) µs): the lower and upper
/// bound of the bucket holding the median flush.
pub fn histogram_median(before: &[u64], after: &[u64]) -> Option<(u64, u64)> {
    let delta: Vec<u64> = after
        .iter()
        .enumerate()
        .map(|(i, a)| a.saturating_sub(before.get(i).copied().unwrap_or(0)))
        .collect();
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let mut seen = 0;
    for (i, d) in delta.iter().enumerate() {
        seen += d;
        if seen * 2 >= total {
            let lo = if i == 0 { 0 } else { 1u64 << i };
            return Some((lo, (1u64 << (i + 1)) - 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_line() {
        assert_eq!(
            parse("guest-bench: start dax=1 reps=12 max_pages=4096"),
            Some(Ok(Event::Start {
                dax: true,
                reps: 12,
                max_pages: 4096
            }))
        );
        assert_eq!(
            parse("guest-bench: ready msync k=64"),
            Some(Ok(Event::Ready {
                series: "msync".into(),
                k: 64
            }))
        );
        assert_eq!(
            parse("guest-bench: done write-fsync k=1 us=812,790,1203"),
            Some(Ok(Event::Done {
                series: "write-fsync".into(),
                k: 1,
                us: vec![812, 790, 1203]
            }))
        );
        assert_eq!(parse("guest-bench: all done"), Some(Ok(Event::AllDone)));
        assert_eq!(
            parse("guest-bench: FAIL msync: Input/output error"),
            Some(Ok(Event::Fail("msync: Input/output error".into())))
        );
    }

    #[test]
    fn skips_other_lines_and_finds_the_prefix_after_kernel_text() {
        assert_eq!(
            parse("[    1.234] EXT4-fs (pmem0): mounted filesystem"),
            None
        );
        assert_eq!(
            parse("[ 9.1] randomguest-bench: ready fdatasync k=0\r"),
            Some(Ok(Event::Ready {
                series: "fdatasync".into(),
                k: 0
            }))
        );
    }

    #[test]
    fn malformed_lines_are_errors_that_quote_the_line() {
        for bad in [
            "guest-bench: done msync k=4 us=12,x,5",
            "guest-bench: done msync k=4",
            "guest-bench: ready msync k=four",
            "guest-bench: ready",
            "guest-bench: start dax=1 reps=2",
            "guest-bench: hello",
        ] {
            let err = parse(bad).unwrap().unwrap_err();
            assert!(
                err.contains(bad.trim_start_matches("guest-bench: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn median_and_p99() {
        assert_eq!(median_p99(&[]), None);
        assert_eq!(median_p99(&[5]), Some((5.0, 5.0)));
        assert_eq!(median_p99(&[9, 1, 5]), Some((5.0, 9.0)));
        assert_eq!(median_p99(&[4, 1, 3, 2]), Some((2.5, 4.0)));
        let hundred: Vec<u64> = (1..=100).collect();
        assert_eq!(median_p99(&hundred), Some((50.5, 99.0)));
    }

    #[test]
    fn histogram_median_takes_the_bucket_of_the_middle_flush() {
        let before = [0, 0, 3, 0, 0];
        // New flushes: one in 4..7 µs, three in 16..31 µs.
        let after = [0, 0, 4, 0, 3];
        assert_eq!(histogram_median(&before, &after), Some((16, 31)));
        assert_eq!(histogram_median(&before, &before), None);
        assert_eq!(histogram_median(&[], &[2]), Some((0, 1)));
    }
}
