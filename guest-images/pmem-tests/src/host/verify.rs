//! The three checks behind every verdict: a flush reached pmvm during the case, the backing
//! file holds the reported bytes, and the host page cache holds them clean.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::cases::Expect;
use crate::protocol::Report;
use crc32c::crc32c;

pub use pmvm::nvdimm::cachestat::{cachestat, CacheStat};

/// Reads `len` bytes at `off` of `path` and compares their CRC-32C with `want`.
pub fn check_data(path: &Path, off: u64, len: u64, want: u32) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    if off.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!(
            "off={off} len={len} ends beyond {} ({size} bytes)",
            path.display()
        ));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)
        .map_err(|e| format!("cannot read {} at {off}: {e}", path.display()))?;
    let got = crc32c(&buf);
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "the backing file holds crc32c={got:08x} at off={off} len={len}, the guest wrote \
             {want:08x}"
        ))
    }
}

/// What the host concluded about one case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A flush reached pmvm, the data is in the file and its pages are clean.
    Pass,
    /// The data is in the file and, as documented for this case, no flush reached the host.
    NoFlush(String),
    /// A host check failed.
    Fail(String),
    /// The guest could not run the case.
    GuestFail(String),
    Skip(String),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::NoFlush(_) => "no flush reached the host",
            Verdict::Fail(_) => "FAIL",
            Verdict::GuestFail(_) => "FAIL (guest)",
            Verdict::Skip(_) => "skip",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Verdict::Pass => "",
            Verdict::NoFlush(s) | Verdict::Fail(s) | Verdict::GuestFail(s) | Verdict::Skip(s) => s,
        }
    }

    pub fn is_failure(&self) -> bool {
        matches!(self, Verdict::Fail(_) | Verdict::GuestFail(_))
    }
}

/// Everything the host measured for one report.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// Guest flushes pmvm counted on the report's device during the case.
    pub flushes: u64,
    /// Pages pmvm wrote back on that device during the case.
    pub pages: u64,
    pub data: Result<(), String>,
    /// Taken before the data was read.
    pub cache: Result<CacheStat, String>,
    /// Pages of the device in pmvm's dirty log when the case reported.
    pub pending: Option<u64>,
}

/// Gathers the evidence for `report` from its device's backing file.
pub fn gather(
    report: &Report,
    backing: &Path,
    flushes: u64,
    pages: u64,
    pending: Option<u64>,
) -> Evidence {
    let cache = File::open(backing)
        .and_then(|f| cachestat(&f, report.off, report.len))
        .map_err(|e| format!("cachestat of {}: {e}", backing.display()));
    let data = check_data(backing, report.off, report.len, report.crc32c);
    Evidence {
        flushes,
        pages,
        data,
        cache,
        pending,
    }
}

/// The verdict for a case that expected `expect`, given the evidence.
pub fn judge(expect: Expect, ev: &Evidence) -> Verdict {
    let mut problems = Vec::new();
    if let Err(e) = &ev.data {
        problems.push(e.clone());
    }
    match expect {
        Expect::Flush => {
            if ev.flushes == 0 {
                problems.push("no flush reached the host during the case".to_string());
            }
            match &ev.cache {
                Ok(c) if c.nr_dirty + c.nr_writeback > 0 => {
                    let log = match ev.pending {
                        Some(0) => {
                            " and none in pmvm's dirty log: a flush left them unwritten".to_string()
                        }
                        Some(n) => format!(
                            " (pmvm's dirty log holds {n} pages of the device the guest stored \
                             to after its last flush; a host folio shared with one dirties the \
                             range too)"
                        ),
                        None => String::new(),
                    };
                    problems.push(format!(
                        "{} dirty and {} writeback pages of the range in the host page cache{log}",
                        c.nr_dirty, c.nr_writeback,
                    ))
                }
                Ok(_) => {}
                Err(e) => problems.push(e.clone()),
            }
            if problems.is_empty() {
                Verdict::Pass
            } else {
                Verdict::Fail(problems.join("; "))
            }
        }
        Expect::NoFlush(why) => {
            if !problems.is_empty() {
                return Verdict::Fail(problems.join("; "));
            }
            if ev.flushes == 0 {
                // The data is in the file (checked above), but nothing made it durable: say
                // how much of it only the host page cache holds.
                let dirty = match &ev.cache {
                    Ok(c) if c.nr_dirty + c.nr_writeback > 0 => format!(
                        "NOT durable on the host: {} pages still dirty in its page cache",
                        c.nr_dirty + c.nr_writeback
                    ),
                    Ok(_) => "on the host's disk only through its own writeback".to_string(),
                    Err(e) => e.clone(),
                };
                Verdict::NoFlush(format!("documented: {why}; {dirty}"))
            } else {
                // The kernel flushed anyway (a journal commit in the window): still durable.
                Verdict::Pass
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cases::{Case, Fs};
    use std::io::Write;

    fn clean() -> Result<CacheStat, String> {
        Ok(CacheStat {
            nr_cache: 2,
            ..CacheStat::default()
        })
    }

    fn ev(flushes: u64, data: Result<(), String>, cache: Result<CacheStat, String>) -> Evidence {
        Evidence {
            flushes,
            pages: 2,
            data,
            cache,
            pending: None,
        }
    }

    #[test]
    fn a_flush_case_passes_only_with_a_flush_the_data_and_clean_pages() {
        assert_eq!(judge(Expect::Flush, &ev(1, Ok(()), clean())), Verdict::Pass);
        let v = judge(Expect::Flush, &ev(0, Ok(()), clean()));
        assert_eq!(
            v,
            Verdict::Fail("no flush reached the host during the case".into())
        );
        let dirty = Ok(CacheStat {
            nr_cache: 2,
            nr_dirty: 2,
            ..CacheStat::default()
        });
        let v = judge(Expect::Flush, &ev(3, Ok(()), dirty.clone()));
        assert!(v.detail().contains("2 dirty"), "{v:?}");
        // pmvm's dirty log tells a flush that missed pages from stores made after it.
        for (pending, says) in [
            (Some(0), "a flush left them unwritten"),
            (Some(11), "stored to after its last flush"),
        ] {
            let v = judge(
                Expect::Flush,
                &Evidence {
                    pending,
                    ..ev(3, Ok(()), dirty.clone())
                },
            );
            assert!(v.is_failure() && v.detail().contains(says), "{v:?}");
        }
        let v = judge(Expect::Flush, &ev(3, Err("crc differs".into()), clean()));
        assert_eq!(v, Verdict::Fail("crc differs".into()));
        let v = judge(
            Expect::Flush,
            &ev(3, Ok(()), Err("cachestat: ENOSYS".into())),
        );
        assert!(
            v.is_failure(),
            "an unverifiable page cache is no pass: {v:?}"
        );
    }

    #[test]
    fn map_sync_without_a_flush_is_reported_as_documented_not_failed() {
        let Expect::NoFlush(_) = Case::MapSync.expect() else {
            panic!("MAP_SYNC expects no flush");
        };
        let dirty = Ok(CacheStat {
            nr_cache: 2,
            nr_dirty: 2,
            ..CacheStat::default()
        });
        let v = judge(Case::MapSync.expect(), &ev(0, Ok(()), dirty));
        assert_eq!(v.label(), "no flush reached the host");
        assert!(v.detail().contains("clwb"), "{v:?}");
        assert!(
            v.detail()
                .contains("NOT durable on the host: 2 pages still dirty"),
            "{v:?}"
        );
        assert!(!v.is_failure());
        // The data must still be there.
        let v = judge(
            Case::MapSync.expect(),
            &ev(0, Err("crc differs".into()), clean()),
        );
        assert!(v.is_failure());
        assert_eq!(
            judge(Case::MapSync.expect(), &ev(1, Ok(()), clean())),
            Verdict::Pass
        );
    }

    fn report(off: u64, len: u64, crc: u32) -> Report {
        Report {
            case: Case::Fsync,
            fs: Fs::Raw,
            dev: 0,
            off,
            len,
            crc32c: crc,
            sync_us: None,
        }
    }

    #[test]
    fn data_checks_on_a_real_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem0.img");
        let data = crate::cases::pattern(Case::Fsync, Fs::Raw, 8192);
        let f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&data, 0x1_0000).unwrap();
        let crc = crc32c(&data);
        assert_eq!(check_data(&path, 0x1_0000, 8192, crc), Ok(()));
        let err = check_data(&path, 0x1_1000, 8192, crc).unwrap_err();
        assert!(err.contains(&format!("guest wrote {crc:08x}")), "{err}");
        let err = check_data(&path, (1 << 20) - 4096, 8192, crc).unwrap_err();
        assert!(err.contains("ends beyond"), "{err}");
        assert!(check_data(&dir.path().join("gone"), 0, 1, 0)
            .unwrap_err()
            .contains("cannot open"));
        let ev = gather(&report(0x1_0000, 8192, crc), &path, 1, 2, None);
        assert_eq!(ev.data, Ok(()));
    }

    /// The real syscall: freshly written pages are dirty, and clean after fdatasync.
    #[test]
    fn cachestat_sees_dirty_pages_become_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&[0xa5u8; 8192]).unwrap();
        let before = match cachestat(&f, 0, 8192) {
            Ok(c) => c,
            Err(e) => {
                println!("SKIP: {e}");
                return;
            }
        };
        assert_eq!(before.nr_cache, 2, "{before:?}");
        assert!(before.nr_dirty + before.nr_writeback > 0, "{before:?}");
        f.sync_data().unwrap();
        let after = cachestat(&f, 0, 8192).unwrap();
        assert_eq!(
            (after.nr_cache, after.nr_dirty, after.nr_writeback),
            (2, 0, 0)
        );
        let ev = gather(&report(0, 8192, crc32c(&[0xa5u8; 8192])), &path, 1, 2, None);
        assert_eq!(judge(Expect::Flush, &ev), Verdict::Pass);
    }
}
