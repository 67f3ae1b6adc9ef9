//! The suite's options, read from the guest's kernel command line (`pmemtests.*`).

use std::time::Duration;

use crate::cases::{Case, Fs};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Wait for the host's acknowledgement after each report (`pmemtests.ack=0|1`).
    pub ack: bool,
    /// How long to wait for one (`pmemtests.timeout=SECS`).
    pub timeout: Duration,
    /// Only these cases (`pmemtests.cases=fsync,msync`).
    pub cases: Option<Vec<Case>>,
    /// Only these targets (`pmemtests.fs=raw,ext4`).
    pub fs: Option<Vec<Fs>>,
    /// Only list the NVDIMMs, then power off (`pmemtests.preflight=1`).
    pub preflight: bool,
    /// Rounds of each target's cases, each on a fresh file system (`pmemtests.repeat=N`): for
    /// a failure that shows up once in many runs, without a boot per run.
    pub repeat: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ack: true,
            timeout: Duration::from_secs(600),
            cases: None,
            fs: None,
            preflight: false,
            repeat: 1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("{key}={value}: expected {expected}")]
    Bad {
        key: String,
        value: String,
        expected: String,
    },
}

fn bad(key: &str, value: &str, expected: impl Into<String>) -> OptionsError {
    OptionsError::Bad {
        key: key.to_string(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn flag(key: &str, v: &str) -> Result<bool, OptionsError> {
    match v {
        "1" | "on" | "yes" => Ok(true),
        "0" | "off" | "no" => Ok(false),
        _ => Err(bad(key, v, "0 or 1")),
    }
}

impl Options {
    /// Reads the `pmemtests.` words of a kernel command line; other words are ignored.
    pub fn parse(cmdline: &str) -> Result<Options, OptionsError> {
        let mut o = Options::default();
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("pmemtests.") else {
                continue;
            };
            let (k, v) = rest.split_once('=').unwrap_or((rest, "1"));
            let key = format!("pmemtests.{k}");
            match k {
                "ack" => o.ack = flag(&key, v)?,
                "preflight" => o.preflight = flag(&key, v)?,
                "shell" => {} // the init script's
                "timeout" => {
                    let secs: u64 = v
                        .parse()
                        .ok()
                        .filter(|s| (1..=86_400).contains(s))
                        .ok_or_else(|| bad(&key, v, "seconds between 1 and 86400"))?;
                    o.timeout = Duration::from_secs(secs);
                }
                "repeat" => {
                    o.repeat = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| bad(&key, v, "rounds between 1 and 100"))?;
                }
                "cases" => {
                    let list = v
                        .split(',')
                        .map(|n| Case::from_name(n).ok_or(n))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|n| {
                            let known: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
                            bad(&key, n, format!("case names from: {}", known.join(",")))
                        })?;
                    o.cases = Some(list);
                }
                "fs" => {
                    let list = v
                        .split(',')
                        .map(|n| Fs::from_name(n).ok_or(n))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|n| bad(&key, n, "raw, ext4 and/or xfs"))?;
                    o.fs = Some(list);
                }
                _ => {
                    return Err(bad(
                        &key,
                        v,
                        "a known option: ack, timeout, cases, fs, repeat, preflight, shell",
                    ))
                }
            }
        }
        Ok(o)
    }

    /// The plan, filtered by `cases` and `fs`, each target's cases `repeat` times in a row.
    pub fn plan(&self) -> Vec<(Case, Fs)> {
        let chosen: Vec<(Case, Fs)> = crate::cases::plan()
            .into_iter()
            .filter(|(c, f)| {
                self.cases.as_ref().is_none_or(|l| l.contains(c))
                    && self.fs.as_ref().is_none_or(|l| l.contains(f))
            })
            .collect();
        let mut plan = Vec::with_capacity(chosen.len() * self.repeat as usize);
        for fs in Fs::ALL {
            let round: Vec<(Case, Fs)> = chosen.iter().copied().filter(|p| p.1 == fs).collect();
            for _ in 0..self.repeat {
                plan.extend_from_slice(&round);
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let o = Options::parse("console=ttyS0 reboot=k panic=1").unwrap();
        assert_eq!(o, Options::default());
        assert_eq!(o.plan().len(), 40);
        let o = Options::parse(
            "console=ttyS0 pmemtests.ack=0 pmemtests.timeout=30 pmemtests.cases=fsync,map_sync pmemtests.fs=xfs",
        )
        .unwrap();
        assert!(!o.ack);
        assert_eq!(o.timeout, Duration::from_secs(30));
        assert_eq!(
            o.plan(),
            vec![(Case::Fsync, Fs::Xfs), (Case::MapSync, Fs::Xfs)]
        );
        assert!(Options::parse("pmemtests.preflight").unwrap().preflight);
    }

    #[test]
    fn repeat_runs_each_targets_cases_in_rounds() {
        let o =
            Options::parse("pmemtests.cases=fsync,msync pmemtests.fs=ext4,xfs pmemtests.repeat=2")
                .unwrap();
        let (f, m) = (Case::Fsync, Case::Msync);
        assert_eq!(
            o.plan(),
            vec![
                (f, Fs::Ext4),
                (m, Fs::Ext4),
                (f, Fs::Ext4),
                (m, Fs::Ext4),
                (f, Fs::Xfs),
                (m, Fs::Xfs),
                (f, Fs::Xfs),
                (m, Fs::Xfs),
            ]
        );
        assert_eq!(Options::default().plan().len() * 3, {
            let o = Options::parse("pmemtests.repeat=3").unwrap();
            o.plan().len()
        });
    }

    #[test]
    fn bad_values_name_the_option_and_what_it_takes() {
        for (line, want) in [
            (
                "pmemtests.ack=maybe",
                "pmemtests.ack=maybe: expected 0 or 1",
            ),
            (
                "pmemtests.repeat=0",
                "pmemtests.repeat=0: expected rounds between 1 and 100",
            ),
            (
                "pmemtests.timeout=0",
                "pmemtests.timeout=0: expected seconds between 1 and 86400",
            ),
            (
                "pmemtests.cases=fsync,fsnc",
                "pmemtests.cases=fsnc: expected case names from: fsync,",
            ),
            (
                "pmemtests.fs=btrfs",
                "pmemtests.fs=btrfs: expected raw, ext4 and/or xfs",
            ),
            (
                "pmemtests.colour=red",
                "pmemtests.colour=red: expected a known option",
            ),
        ] {
            let err = Options::parse(line).unwrap_err().to_string();
            assert!(err.starts_with(want), "{line}: {err}");
        }
    }
}
