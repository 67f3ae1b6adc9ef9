//! The end of a crash test: totals, one row per workload, and each violation with the
//! command that rebuilds its image.

use std::path::Path;

use super::check::StateResult;
use super::states::Plan;
use super::{CheckOpts, RunMeta};

/// Violations printed on the terminal; report.txt in the run directory has all of them.
pub const SHOWN: usize = 20;

#[derive(Debug, Default)]
pub struct Summary {
    pub states: usize,
    pub fsck_clean: usize,
    pub claims_checked: usize,
    /// States the filesystem checker rejected.
    pub fsck_violations: usize,
    /// Claims broken in states whose filesystem could be read.
    pub claim_violations: usize,
    pub violations: usize,
    pub atomic_unit: usize,
    pub states_per_sec: f64,
    /// (workload, claims made, claim checks, violations), in the order the guest ran them.
    pub workloads: Vec<(String, usize, usize, usize)>,
}

impl Summary {
    pub fn new(meta: &RunMeta, results: &[StateResult], secs: f64, atomic_unit: usize) -> Summary {
        let mut s = Summary {
            states: results.len(),
            atomic_unit,
            states_per_sec: results.len() as f64 / secs.max(1e-9),
            ..Summary::default()
        };
        let row = |rows: &mut Vec<(String, usize, usize, usize)>, name: &str| match rows
            .iter()
            .position(|r| r.0 == name)
        {
            Some(i) => i,
            None => {
                rows.push((name.to_string(), 0, 0, 0));
                rows.len() - 1
            }
        };
        for c in &meta.claims {
            let i = row(&mut s.workloads, &c.workload);
            s.workloads[i].1 += 1;
        }
        for r in results {
            s.fsck_clean += usize::from(r.fsck_clean);
            s.fsck_violations += usize::from(!r.fsck_clean);
            s.claim_violations += r.broken.len();
            s.claims_checked += r.claims_checked.len();
            for &c in &r.claims_checked {
                let i = row(&mut s.workloads, &meta.claims[c].workload);
                s.workloads[i].2 += 1;
            }
            for (c, _) in &r.broken {
                let i = row(&mut s.workloads, &meta.claims[*c].workload);
                s.workloads[i].3 += 1;
            }
        }
        s.violations = s.fsck_violations + s.claim_violations;
        s
    }

    /// The totals and rows as DIR/summary.json holds them, for scripts and tests.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "states": self.states,
            "fsck_clean": self.fsck_clean,
            "fsck_violations": self.fsck_violations,
            "claims_checked": self.claims_checked,
            "claim_violations": self.claim_violations,
            "violations": self.violations,
            "states_per_sec": self.states_per_sec,
            "atomic_unit": self.atomic_unit,
            "workloads": self.workloads.iter().map(|(name, claims, checks, bad)| serde_json::json!({
                "name": name, "claims": claims, "claim_checks": checks, "violations": bad,
            })).collect::<Vec<_>>(),
        })
    }
}

fn rebuild_cmd(dir: &Path, r: &StateResult, unit: usize) -> String {
    let unit = if unit == super::states::LINE {
        String::new()
    } else {
        format!(" --atomic-unit {unit}")
    };
    format!(
        "pmvm crash-test rebuild {} --epoch {} --subset {}{unit} --out crash-{}-{}.img",
        dir.display(),
        r.state.epoch,
        r.state.subset,
        r.state.epoch,
        r.state.subset.to_string().replace(':', "-")
    )
}

/// The report; at most `limit` violations are spelled out.
pub fn render(
    dir: &Path,
    meta: &RunMeta,
    plan: &Plan,
    opts: &CheckOpts,
    s: &Summary,
    results: &[StateResult],
    limit: usize,
) -> String {
    let mut t = format!(
        "\ncrash-test: {:?}, workloads {}, {} epochs, {} states ({} per epoch at most, seed {}, \
         atomic unit {} bytes)\n\n",
        meta.fs,
        meta.workloads,
        plan.last_epoch(),
        s.states,
        opts.states_per_epoch,
        opts.seed,
        opts.atomic_unit
    );
    t.push_str("WORKLOAD    CLAIMS  CLAIM CHECKS  VIOLATIONS\n");
    for (name, claims, checks, bad) in &s.workloads {
        t.push_str(&format!(
            "{name:<10}  {claims:>6}  {checks:>12}  {bad:>10}\n"
        ));
    }
    t.push_str(&format!(
        "\nSTATES CHECKED  FSCK-CLEAN  CLAIMS CHECKED  VIOLATIONS (FSCK + CLAIMS)  STATES/S\n\
         {:>14}  {:>10}  {:>14}  {:>10} ({} + {}){:>pad$}  {:>8.1}\n",
        s.states,
        s.fsck_clean,
        s.claims_checked,
        s.violations,
        s.fsck_violations,
        s.claim_violations,
        "",
        s.states_per_sec,
        pad =
            12usize.saturating_sub(format!("{} + {}", s.fsck_violations, s.claim_violations).len())
    ));
    let mut shown = 0;
    for r in results {
        let mut items: Vec<String> = Vec::new();
        if !r.fsck_clean {
            let skipped = if r.unreadable {
                " (claims not checked)"
            } else {
                ""
            };
            items.push(format!("filesystem check{skipped}: {}", r.fsck_detail));
        }
        for (c, why) in &r.broken {
            let claim = &meta.claims[*c];
            items.push(format!(
                "{}: {:?} (claimed at epoch {}): {why}",
                claim.workload, claim.line, claim.epoch
            ));
        }
        for item in items {
            if shown == 0 {
                t.push_str("\nVIOLATIONS\n");
            }
            shown += 1;
            if shown <= limit {
                t.push_str(&format!(
                    "epoch {} state {}: {item}\n  rebuild: {}\n",
                    r.state.epoch,
                    r.state.subset,
                    rebuild_cmd(dir, r, s.atomic_unit)
                ));
            }
        }
    }
    if shown > limit {
        t.push_str(&format!(
            "... and {} more in {}\n",
            shown - limit,
            dir.join("report.txt").display()
        ));
    }
    t.push_str(&if s.violations == 0 {
        "\nverdict: no violations\n".to_string()
    } else {
        format!("\nverdict: {} violations\n", s.violations)
    });
    t
}
