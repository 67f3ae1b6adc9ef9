//! The host's side of the conversation: one call per console line, an acknowledgement back
//! when the guest waits for one, and a row per case.

use crate::cases::{Case, Fs};
use crate::host::api::{CounterSource, Device};
use crate::host::verify::{gather, judge, Verdict};
use crate::protocol::{Ack, Event, ProtocolError};

/// One line of the results table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub case: Case,
    pub fs: Fs,
    pub flushes: Option<u64>,
    pub pages: Option<u64>,
    /// The sync call's duration in the guest.
    pub sync_us: Option<u64>,
    pub verdict: Verdict,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("a suite line does not parse: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{line:?} arrived {when}")]
    Unexpected { line: String, when: String },
    #[error("cannot read pmvm's flush counters: {0}")]
    Counters(String),
    #[error("{line:?} names dev={dev}, but pmvm has {count} NVDIMMs")]
    NoDevice {
        line: String,
        dev: u32,
        count: usize,
    },
}

struct Pending {
    case: Case,
    fs: Fs,
    before: Vec<Device>,
}

/// Where the suite is.
pub struct Session<C> {
    counters: C,
    rows: Vec<Row>,
    pending: Option<Pending>,
    planned: Option<u32>,
    done: Option<(u32, u32, u32)>,
    abort: Option<String>,
    last: Option<(Case, Fs)>,
    info: Vec<String>,
}

impl<C: CounterSource> Session<C> {
    pub fn new(counters: C) -> Self {
        Session {
            counters,
            rows: Vec::new(),
            pending: None,
            planned: None,
            done: None,
            abort: None,
            last: None,
            info: Vec::new(),
        }
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn info(&self) -> &[String] {
        &self.info
    }

    /// The number of cases the guest announced, once it started.
    pub fn planned(&self) -> Option<u32> {
        self.planned
    }

    /// The guest's own summary, once it printed it.
    pub fn summary(&self) -> Option<(u32, u32, u32)> {
        self.done
    }

    pub fn aborted(&self) -> Option<&str> {
        self.abort.as_deref()
    }

    pub fn finished(&self) -> bool {
        self.done.is_some() || self.abort.is_some()
    }

    /// Where the guest was, for a report when it stops answering or dies.
    pub fn position(&self) -> String {
        match (&self.pending, self.last) {
            (Some(p), _) => format!("in case {} {} (its sync step was running)", p.case, p.fs),
            (None, Some((c, fs))) => format!("after case {c} {fs}, before the next one"),
            (None, None) if self.planned.is_some() => "in setup, before the first case".into(),
            (None, None) => "before the suite started".into(),
        }
    }

    fn sample(&mut self) -> Result<Vec<Device>, SessionError> {
        self.counters.sample().map_err(SessionError::Counters)
    }

    fn unexpected(&self, line: &str) -> SessionError {
        SessionError::Unexpected {
            line: line.to_string(),
            when: match &self.pending {
                Some(p) => format!("while case {} {} was running", p.case, p.fs),
                None => "without a PMEMWAIT for that case first".into(),
            },
        }
    }

    fn push(&mut self, case: Case, fs: Fs, verdict: Verdict) {
        self.rows.push(Row {
            case,
            fs,
            flushes: None,
            pages: None,
            sync_us: None,
            verdict,
        });
        self.last = Some((case, fs));
    }

    /// Handles one console line. Returns the acknowledgement to send, if the guest waits.
    pub fn on_line(&mut self, line: &str) -> Result<Option<Ack>, SessionError> {
        let Some(event) = Event::find(line)? else {
            return Ok(None);
        };
        match event {
            Event::Start { cases } => {
                self.planned = Some(cases);
                Ok(None)
            }
            Event::Info(text) => {
                self.info.push(text);
                Ok(None)
            }
            Event::Wait { case, fs } => {
                if self.pending.is_some() {
                    return Err(self.unexpected(line));
                }
                let before = self.sample()?;
                self.pending = Some(Pending { case, fs, before });
                Ok(Some(Ack::Go))
            }
            Event::Test(report) => {
                let pending = match self.pending.take() {
                    Some(p) if p.case == report.case && p.fs == report.fs => p,
                    other => {
                        self.pending = other;
                        return Err(self.unexpected(line));
                    }
                };
                let after = self.sample()?;
                let dev = report.dev as usize;
                let (Some(a), Some(b)) = (after.get(dev), pending.before.get(dev)) else {
                    return Err(SessionError::NoDevice {
                        line: line.to_string(),
                        dev: report.dev,
                        count: after.len(),
                    });
                };
                let flushes = a.flushes.saturating_sub(b.flushes);
                let pages = a.pages_written.saturating_sub(b.pages_written);
                let evidence = gather(&report, &a.path, flushes, pages, a.pending);
                let verdict = judge(report.case.expect(), &evidence);
                let ack = if verdict.is_failure() {
                    Ack::Fail(verdict.detail().chars().take(200).collect())
                } else {
                    Ack::Pass
                };
                self.rows.push(Row {
                    case: report.case,
                    fs: report.fs,
                    flushes: Some(flushes),
                    pages: Some(pages),
                    sync_us: report.sync_us,
                    verdict,
                });
                self.last = Some((report.case, report.fs));
                Ok(Some(ack))
            }
            Event::Fail { case, fs, why } => {
                self.pending = None;
                self.push(case, fs, Verdict::GuestFail(why));
                Ok(None)
            }
            Event::Skip { case, fs, why } => {
                self.pending = None;
                self.push(case, fs, Verdict::Skip(why));
                Ok(None)
            }
            Event::Done {
                passed,
                failed,
                skipped,
            } => {
                self.done = Some((passed, failed, skipped));
                Ok(None)
            }
            Event::Abort(why) => {
                self.abort = Some(why);
                Ok(None)
            }
        }
    }

    /// Problems with the run as a whole: an abort, cases missing from the plan, or a guest
    /// summary that disagrees with the host's rows.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = &self.abort {
            out.push(format!("the suite aborted: {why}"));
        }
        if let Some(n) = self.planned {
            if (self.rows.len() as u32) < n {
                out.push(format!("{} of {n} planned cases reported", self.rows.len()));
            }
        }
        if let Some((p, f, s)) = self.done {
            let failed = self.rows.iter().filter(|r| r.verdict.is_failure()).count() as u32;
            if p + f + s != self.rows.len() as u32 || f != failed {
                out.push(format!(
                    "the guest counted {p} passed, {f} failed, {s} skipped; the host saw {} \
                     cases, {failed} failed",
                    self.rows.len()
                ));
            }
        } else if self.abort.is_none() {
            out.push(format!(
                "no summary line: the guest stopped {}",
                self.position()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::pattern;
    use crc32c::crc32c;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};

    /// Counters that advance by a script: each sample adds the next step's flushes to dev 0.
    struct Scripted {
        devices: Vec<Device>,
        steps: Vec<u64>,
    }

    impl CounterSource for Scripted {
        fn sample(&mut self) -> Result<Vec<Device>, String> {
            let add = if self.steps.is_empty() {
                0
            } else {
                self.steps.remove(0)
            };
            self.devices[0].flushes += add;
            self.devices[0].pages_written += 2 * add;
            Ok(self.devices.clone())
        }
    }

    fn device(path: &Path, base: u64) -> Device {
        Device {
            id: format!("pmem{base}"),
            path: path.to_path_buf(),
            guest_base: base,
            size: 64 << 20,
            flushes: 10,
            pages_written: 100,
            pending: None,
        }
    }

    /// A backing file that holds `case`'s raw pattern at `off`, written and synced.
    fn backing(dir: &Path, case: Case, off: u64) -> (PathBuf, u32) {
        let path = dir.join("pmem0.img");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let data = pattern(case, Fs::Raw, 8192);
        f.write_all_at(&data, off).unwrap();
        f.sync_all().unwrap();
        (path, crc32c(&data))
    }

    #[test]
    fn a_canned_transcript_gives_acks_and_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (path, crc) = backing(dir.path(), Case::Fsync, 0x20_0000);
        let (_, crc2) = backing(dir.path(), Case::MapSync, 0x30_0000);
        let counters = Scripted {
            devices: vec![device(&path, 1 << 32), device(&path, 2 << 32)],
            // wait, test (1 flush); wait, test (0 flushes); wait, test (0 flushes)
            steps: vec![0, 1, 0, 0, 0, 0],
        };
        let mut s = Session::new(counters);
        let transcript = [
            "[    3.1] Run /init as init process".to_string(),
            "PMEMSUITE start cases=4".to_string(),
            "PMEMSUITE info nvdimm dev=0 region0 pmem0 fsdax data_offset=0x200000".to_string(),
            "PMEMWAIT fsync raw".to_string(),
            format!("PMEMTEST fsync raw dev=0 off=2097152 len=8192 crc32c={crc:08x} sync_us=80"),
            "PMEMWAIT map_sync ext4".to_string(),
            format!("[    9.9] EXT4-fs (pmem0): something PMEMTEST map_sync ext4 dev=0 off=3145728 len=8192 crc32c={crc2:08x}"),
            "PMEMWAIT fdatasync raw".to_string(),
            format!("PMEMTEST fdatasync raw dev=0 off=2097152 len=8192 crc32c={crc:08x}"),
            "PMEMSKIP fio_dsync xfs fio is not in the image".to_string(),
            "PMEMSUITE done: 2 passed, 1 failed, 1 skipped".to_string(),
        ];
        let acks: Vec<Option<Ack>> = transcript.iter().map(|l| s.on_line(l).unwrap()).collect();
        assert_eq!(acks[3], Some(Ack::Go));
        assert_eq!(acks[4], Some(Ack::Pass));
        assert_eq!(acks[5], Some(Ack::Go));
        assert_eq!(
            acks[6],
            Some(Ack::Pass),
            "map_sync without a flush is no failure"
        );
        match &acks[8] {
            Some(Ack::Fail(why)) => assert!(why.contains("no flush reached"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(acks
            .iter()
            .enumerate()
            .all(|(i, a)| a.is_none() || [3, 4, 5, 6, 7, 8].contains(&i)));
        let rows = s.rows();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            (rows[0].flushes, rows[0].pages, rows[0].sync_us),
            (Some(1), Some(2), Some(80))
        );
        assert_eq!(rows[0].verdict, Verdict::Pass);
        assert_eq!(rows[1].verdict.label(), "no flush reached the host");
        assert!(rows[2].verdict.is_failure());
        assert_eq!(
            rows[3].verdict,
            Verdict::Skip("fio is not in the image".into())
        );
        assert_eq!(s.planned(), Some(4));
        assert_eq!(s.info().len(), 1);
        assert!(s.finished());
        assert_eq!(s.problems(), Vec::<String>::new());
    }

    #[test]
    fn a_bad_line_is_an_error_that_quotes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let mut s = Session::new(Scripted {
            devices: vec![device(&path, 1)],
            steps: vec![],
        });
        let err = s
            .on_line("PMEMTEST fsync ext4 dev=0 off=zz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not parse"), "{err}");
        assert!(err.contains("off=zz"), "{err}");
    }

    #[test]
    fn out_of_order_lines_and_unknown_devices_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let mut s = Session::new(Scripted {
            devices: vec![device(&path, 1)],
            steps: vec![],
        });
        let err = s
            .on_line("PMEMTEST fsync ext4 dev=0 off=0 len=1 crc32c=0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("without a PMEMWAIT"), "{err}");
        s.on_line("PMEMWAIT fsync ext4").unwrap();
        let err = s.on_line("PMEMWAIT sync ext4").unwrap_err().to_string();
        assert!(err.contains("while case fsync ext4 was running"), "{err}");
        let err = s
            .on_line("PMEMTEST fsync ext4 dev=3 off=0 len=1 crc32c=0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("dev=3, but pmvm has 1 NVDIMMs"), "{err}");
    }

    #[test]
    fn a_guest_that_dies_mid_case_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let mut s = Session::new(Scripted {
            devices: vec![device(&path, 1)],
            steps: vec![],
        });
        assert_eq!(s.position(), "before the suite started");
        s.on_line("PMEMSUITE start cases=40").unwrap();
        assert_eq!(s.position(), "in setup, before the first case");
        s.on_line("PMEMFAIL fsync raw open /dev/pmem0: No such device")
            .unwrap();
        assert_eq!(s.position(), "after case fsync raw, before the next one");
        s.on_line("PMEMWAIT msync ext4").unwrap();
        assert_eq!(
            s.position(),
            "in case msync ext4 (its sync step was running)"
        );
        let problems = s.problems();
        assert!(
            problems.iter().any(|p| p.contains("1 of 40 planned")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("no summary line: the guest stopped in case msync ext4")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_summary_that_disagrees_with_the_host_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let mut s = Session::new(Scripted {
            devices: vec![device(&path, 1)],
            steps: vec![],
        });
        s.on_line("PMEMSKIP fio_dsync xfs no fio").unwrap();
        s.on_line("PMEMSUITE done: 5 passed, 0 failed, 0 skipped")
            .unwrap();
        assert_eq!(s.problems().len(), 1, "{:?}", s.problems());
        let mut s2 = Session::new(Scripted {
            devices: vec![],
            steps: vec![],
        });
        s2.on_line("PMEMSUITE abort no NVDIMM region").unwrap();
        assert!(s2.finished());
        assert_eq!(
            s2.problems(),
            vec!["the suite aborted: no NVDIMM region".to_string()]
        );
    }
}
