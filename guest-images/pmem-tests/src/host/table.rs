//! The results table: case x filesystem, flushes, pages, latency, verdict.

use crate::host::session::Row;

fn latency(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 10_000 => format!("{us} µs"),
        Some(us) if us < 10_000_000 => format!("{:.1} ms", us as f64 / 1000.0),
        Some(us) => format!("{:.1} s", us as f64 / 1e6),
    }
}

fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".into(), |n| n.to_string())
}

/// A Markdown table, one row per case, with the reason next to anything but a plain pass.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| case | fs | flushes | pages | sync latency | verdict |\n\
         |---|---|---:|---:|---:|---|\n",
    );
    for r in rows {
        let detail = r.verdict.detail().replace('|', "\\|");
        let verdict = if detail.is_empty() {
            r.verdict.label().to_string()
        } else {
            format!("{}: {detail}", r.verdict.label())
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.case,
            r.fs,
            count(r.flushes),
            count(r.pages),
            latency(r.sync_us),
            verdict
        ));
    }
    let failed = rows.iter().filter(|r| r.verdict.is_failure()).count();
    let skipped = rows
        .iter()
        .filter(|r| matches!(r.verdict, crate::host::verify::Verdict::Skip(_)))
        .count();
    out.push_str(&format!(
        "\n{} passed, {failed} failed, {skipped} skipped\n",
        rows.len() - failed - skipped
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::{Case, Fs};
    use crate::host::verify::Verdict;

    fn row(case: Case, fs: Fs, verdict: Verdict, sync_us: Option<u64>) -> Row {
        Row {
            case,
            fs,
            flushes: Some(2),
            pages: Some(3),
            sync_us,
            verdict,
        }
    }

    #[test]
    fn rows_render_with_units_reasons_and_a_total() {
        let rows = [
            row(Case::Fsync, Fs::Ext4, Verdict::Pass, Some(154)),
            row(
                Case::MapSync,
                Fs::Xfs,
                Verdict::NoFlush("documented".into()),
                Some(12_345),
            ),
            row(
                Case::Sync,
                Fs::Xfs,
                Verdict::Fail("a | b".into()),
                Some(12_000_000),
            ),
            Row {
                flushes: None,
                pages: None,
                ..row(
                    Case::FioDsync,
                    Fs::Ext4,
                    Verdict::Skip("no fio".into()),
                    None,
                )
            },
        ];
        let t = render(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "| case | fs | flushes | pages | sync latency | verdict |"
        );
        assert_eq!(lines[2], "| fsync | ext4 | 2 | 3 | 154 µs | pass |");
        assert_eq!(
            lines[3],
            "| map_sync | xfs | 2 | 3 | 12.3 ms | no flush reached the host: documented |"
        );
        assert_eq!(lines[4], "| sync | xfs | 2 | 3 | 12.0 s | FAIL: a \\| b |");
        assert_eq!(lines[5], "| fio_dsync | ext4 | - | - | - | skip: no fio |");
        assert_eq!(lines.last().unwrap(), &"2 passed, 1 failed, 1 skipped");
    }
}
