//! Runs the plan: prepares each target once, runs its cases, reports each one and waits for
//! the host between them, and keeps the tally.

use crate::actions::{self, CaseError, Place};
use crate::cases::{Case, Fs, Tally};
use crate::console::Console;
use crate::protocol::{Ack, Event, Report};

/// A prepared target: where its cases write and where that is in the NVDIMM.
#[derive(Clone, Debug)]
pub struct Target {
    pub place: Place,
    /// NVDIMM index, in --pmem order.
    pub dev: u32,
    /// Offset in the NVDIMM of the first byte of the target's block device.
    pub data_offset: u64,
}

/// Runs `plan`. `prepare` is called once per target, when its first case comes up, and again
/// when a case comes up that already ran on it (a new round starts on a fresh target); if it
/// fails, that target's cases fail with its reason. Returns the tally, or why the suite had
/// to stop (the host stopped answering).
pub fn run_plan(
    plan: &[(Case, Fs)],
    console: &mut Console,
    prepare: &mut dyn FnMut(Fs, &mut Console) -> Result<Target, String>,
) -> Result<Tally, String> {
    let mut tally = Tally::default();
    let mut current: Option<(Fs, Result<Target, String>)> = None;
    let mut ran: Vec<Case> = Vec::new();
    for &(case, fs) in plan {
        if current.as_ref().is_none_or(|(f, _)| *f != fs) || ran.contains(&case) {
            current = Some((fs, prepare(fs, console)));
            ran.clear();
        }
        ran.push(case);
        let target = match &current {
            Some((_, Ok(t))) => t.clone(),
            Some((_, Err(why))) => {
                let why = format!("setting up {fs} failed: {why}");
                console.say(&Event::Fail {
                    case,
                    fs,
                    why: why.clone(),
                });
                tally.fail(case, fs, &why);
                continue;
            }
            None => unreachable!("set just above"),
        };
        run_one(case, fs, &target, console, &mut tally)?;
    }
    Ok(tally)
}

fn run_one(
    case: Case,
    fs: Fs,
    target: &Target,
    console: &mut Console,
    tally: &mut Tally,
) -> Result<(), String> {
    let result = {
        let mut gate = || {
            console.say(&Event::Wait { case, fs });
            match console.wait_ack(Ack::Go)? {
                Ack::Go => Ok(()),
                other => Err(format!(
                    "expected PMEMACK go before {case} {fs}, got {other}"
                )),
            }
        };
        actions::run(case, fs, &target.place, &mut gate).and_then(|w| {
            actions::nvdimm_offset(&w, &target.place, target.data_offset).map(|off| (w, off))
        })
    };
    match result {
        Ok((w, off)) => {
            console.say(&Event::Test(Report {
                case,
                fs,
                dev: target.dev,
                off,
                len: w.len,
                crc32c: w.crc32c,
                sync_us: Some(w.sync_us),
            }));
            match console.wait_ack(Ack::Pass)? {
                Ack::Pass => tally.pass(),
                Ack::Fail(why) => tally.fail(case, fs, &format!("host: {why}")),
                Ack::Go => {
                    return Err(format!(
                        "expected PMEMACK pass or fail after {case} {fs}, got go"
                    ))
                }
            }
        }
        Err(CaseError::Gate(why)) => return Err(why),
        Err(e) if e.is_skip() => {
            console.say(&Event::Skip {
                case,
                fs,
                why: e.to_string(),
            });
            tally.skip();
        }
        Err(e) => {
            console.say(&Event::Fail {
                case,
                fs,
                why: e.to_string(),
            });
            tally.fail(case, fs, &e.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::api::{CounterSource, Device};
    use crate::host::session::Session;
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::path::PathBuf;
    use std::time::Duration;

    fn pipe() -> (OwnedFd, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    /// Counts one flush per sample on every device, like a guest whose every case flushes.
    struct EveryCaseFlushes(Vec<Device>);

    impl CounterSource for EveryCaseFlushes {
        fn sample(&mut self) -> Result<Vec<Device>, String> {
            for d in &mut self.0 {
                d.flushes += 1;
                d.pages_written += 2;
            }
            Ok(self.0.clone())
        }
    }

    /// The guest half and the host half talking over pipes, on a file standing in for the
    /// NVDIMM: every raw case is located, checked in the "backing file" and acknowledged.
    #[test]
    fn guest_and_host_halves_agree_over_a_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("pmem0.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(actions::raw_area_end())
            .unwrap();
        let (ack_r, mut ack_w) = pipe();
        let (line_r, line_w) = pipe();
        let line_w: std::fs::File = line_w;
        let host_backing = backing.clone();
        let host = std::thread::spawn(move || {
            let mut session = Session::new(EveryCaseFlushes(vec![Device {
                id: "pmem0".into(),
                path: host_backing,
                guest_base: 1 << 32,
                size: 64 << 20,
                flushes: 0,
                pages_written: 0,
                pending: None,
            }]));
            let reader = BufReader::new(std::fs::File::from(line_r));
            let mut transcript = Vec::new();
            for line in reader.lines() {
                let line = line.unwrap();
                if let Some(ack) = session.on_line(&line).unwrap() {
                    writeln!(ack_w, "{ack}").unwrap();
                }
                transcript.push(line);
            }
            (session.rows().to_vec(), session.problems(), transcript)
        });
        let mut console = Console::new(Some(ack_r), Box::new(line_w), Duration::from_secs(10));
        let plan: Vec<(Case, Fs)> = crate::cases::plan()
            .into_iter()
            .filter(|(_, f)| *f == Fs::Raw)
            .collect();
        console.say(&Event::Start {
            cases: plan.len() as u32,
        });
        let dev = PathBuf::from(&backing);
        let tally = run_plan(&plan, &mut console, &mut |fs, _| {
            assert_eq!(fs, Fs::Raw);
            Ok(Target {
                place: Place::Raw { dev: dev.clone() },
                dev: 0,
                data_offset: 0,
            })
        })
        .unwrap();
        console.say(&Event::Done {
            passed: tally.passed,
            failed: tally.failed,
            skipped: tally.skipped,
        });
        drop(console);
        let (rows, problems, transcript) = host.join().unwrap();
        assert_eq!(tally.failures, Vec::<String>::new());
        assert_eq!(tally.passed as usize, plan.len());
        assert_eq!(rows.len(), plan.len(), "{transcript:#?}");
        // sync_file_range saw a flush here (the fake counts one per sample): a pass.
        assert!(rows.iter().all(|r| !r.verdict.is_failure()), "{rows:#?}");
        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(
            transcript
                .iter()
                .filter(|l| l.starts_with("PMEMWAIT "))
                .count(),
            plan.len()
        );
    }

    #[test]
    fn a_target_that_cannot_be_prepared_fails_its_cases_once_each() {
        let mut console = Console::new(None, Box::new(std::io::sink()), Duration::from_secs(1));
        let plan = [(Case::Fsync, Fs::Xfs), (Case::Sync, Fs::Xfs)];
        let mut calls = 0;
        let tally = run_plan(&plan, &mut console, &mut |_, _| {
            calls += 1;
            Err("mkfs.xfs: not found".into())
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(tally.failed, 2);
        assert_eq!(
            tally.failures[0],
            "fsync xfs: setting up xfs failed: mkfs.xfs: not found"
        );
    }

    #[test]
    fn each_round_of_a_repeated_plan_gets_a_fresh_target() {
        let mut console = Console::new(None, Box::new(std::io::sink()), Duration::from_secs(1));
        let (f, s) = (Case::Fsync, Case::Sync);
        let plan = [
            (f, Fs::Ext4),
            (s, Fs::Ext4),
            (f, Fs::Ext4),
            (s, Fs::Ext4),
            (f, Fs::Xfs),
        ];
        let mut prepared = Vec::new();
        run_plan(&plan, &mut console, &mut |fs, _| {
            prepared.push(fs);
            Err("no device".into())
        })
        .unwrap();
        assert_eq!(prepared, [Fs::Ext4, Fs::Ext4, Fs::Xfs]);
    }

    #[test]
    fn a_host_that_stops_answering_stops_the_suite() {
        let (ack_r, ack_w) = pipe();
        drop(ack_w);
        let dir = tempfile::tempdir().unwrap();
        let mut console = Console::new(
            Some(ack_r),
            Box::new(std::io::sink()),
            Duration::from_secs(1),
        );
        let place = Place::Dir {
            path: dir.path().to_path_buf(),
            dax: false,
        };
        let err = run_plan(&[(Case::Fsync, Fs::Ext4)], &mut console, &mut |_, _| {
            Ok(Target {
                place: place.clone(),
                dev: 0,
                data_offset: 0,
            })
        })
        .unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }
}
