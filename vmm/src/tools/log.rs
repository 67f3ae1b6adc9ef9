//! `pmvm log list|replay|crash-states`: read a flush-epoch log (`--pmem ...,flush-log=PATH`)
//! offline. The format and its reader are `nvdimm::flush_log`; this is the file handling.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use nvdimm::flush_log::{
    crash_subset, FileSource, FlushLog, FlushLogError, SOURCE_BACKGROUND, SOURCE_CACHE_FLUSH,
    SOURCE_HOST,
};
use nvdimm::format_size;

/// `pmvm log ...`.
#[derive(Debug, Args)]
pub struct LogArgs {
    #[command(subcommand)]
    pub command: LogCommand,
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// List the epochs: number, time (UTC), who flushed, and the pages it made durable.
    List {
        /// The flush log.
        log: PathBuf,
    },
    /// Build the durable image as of epoch N: BASE (the backing file as it was when pmvm
    /// started) with epochs 1..=N applied. Epoch 0 is BASE itself.
    Replay {
        log: PathBuf,
        /// The backing file's contents before the logged run.
        #[arg(long, value_name = "IMG")]
        base: PathBuf,
        #[arg(long, value_name = "N")]
        epoch: u64,
        /// The image to write; must not exist yet.
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
    /// Build K images a power cut between epoch N and N+1 could leave behind: each is the
    /// epoch-N image plus a pseudo-random subset of the pages of epoch N+1, the same for the
    /// same seed. Writes DIR/crash-000.img, ...
    CrashStates {
        log: PathBuf,
        #[arg(long, value_name = "IMG")]
        base: PathBuf,
        #[arg(long, value_name = "N")]
        epoch: u64,
        #[arg(long, value_name = "K")]
        count: u32,
        #[arg(long, value_name = "S", default_value_t = 0)]
        seed: u64,
        /// Directory for the images (created if missing); the images must not exist yet.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Most crash-state images one command writes.
pub const MAX_CRASH_STATES: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LogCmdError {
    #[error("cannot open flush log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}")]
    Read {
        path: PathBuf,
        #[source]
        source: FlushLogError,
    },
    #[error("epoch {epoch} is not in {path}: it holds epochs 1 to {last}")]
    NoSuchEpoch {
        path: PathBuf,
        epoch: u64,
        last: u64,
    },
    #[error(
        "crash states after epoch {epoch} need epoch {next}, but {path} holds epochs 1 to {last}"
    )]
    NoNextEpoch {
        path: PathBuf,
        epoch: u64,
        next: u64,
        last: u64,
    },
    #[error("cannot read page {page} of epoch {epoch} from the flush log")]
    ReadPage {
        epoch: u64,
        page: u64,
        #[source]
        source: io::Error,
    },
    #[error("--count {count} is not between 1 and {MAX_CRASH_STATES}")]
    BadCount { count: u32 },
    #[error("cannot read the base image {path}")]
    Base {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the base image {path} is {len} bytes, shorter than the {size}-byte device the log belongs to", size = format_size(*.size))]
    BaseTooShort { path: PathBuf, len: u64, size: u64 },
    #[error("{path} already exists; pmvm log never overwrites: remove it or choose another --out")]
    OutExists { path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Runs one `pmvm log` subcommand, printing to stdout; warnings (a torn tail) go to stderr.
pub fn run(args: &LogArgs) -> ExitCode {
    let mut out = io::stdout().lock();
    match run_to(&args.command, &mut out, &mut io::stderr().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmvm: {}", crate::api::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_to(
    cmd: &LogCommand,
    out: &mut dyn io::Write,
    warn: &mut dyn io::Write,
) -> Result<(), LogCmdError> {
    let (path, src, log) = match cmd {
        LogCommand::List { log }
        | LogCommand::Replay { log, .. }
        | LogCommand::CrashStates { log, .. } => {
            let (src, parsed) = open_log(log)?;
            (log, src, parsed)
        }
    };
    if let Some(tail) = &log.tail {
        // Not an error: a crash during an append leaves one; every epoch before it is whole.
        let _ = writeln!(
            warn,
            "pmvm: warning: {}: {tail}; epochs 1 to {} are intact",
            path.display(),
            log.last_epoch()
        );
    }
    let write_err = |e| LogCmdError::Write {
        path: "standard output".into(),
        source: e,
    };
    match cmd {
        LogCommand::List { .. } => out
            .write_all(list_text(path, &log).as_bytes())
            .map_err(write_err),
        LogCommand::Replay {
            base,
            epoch,
            out: o,
            ..
        } => {
            check_epoch(path, &log, *epoch)?;
            let pages = replay(&src, &log, base, *epoch, o)?;
            writeln!(
                out,
                "{}: the image as of epoch {epoch} ({pages} pages from {epoch} epochs over {})",
                o.display(),
                base.display()
            )
            .map_err(write_err)
        }
        LogCommand::CrashStates {
            base,
            epoch,
            count,
            seed,
            out: dir,
            ..
        } => {
            if !(1..=MAX_CRASH_STATES).contains(count) {
                return Err(LogCmdError::BadCount { count: *count });
            }
            let next = epoch.saturating_add(1);
            check_epoch(path, &log, *epoch)?;
            let Some(next_epoch) = log.epoch(next) else {
                return Err(LogCmdError::NoNextEpoch {
                    path: path.clone(),
                    epoch: *epoch,
                    next,
                    last: log.last_epoch(),
                });
            };
            let written = crash_states(&src, &log, base, *epoch, next_epoch, *count, *seed, dir)?;
            for (image, kept) in written {
                writeln!(
                    out,
                    "{}: epoch {epoch} + {} of {} pages of epoch {next}: {}",
                    image.display(),
                    kept.len(),
                    next_epoch.pages.len(),
                    page_list(&kept)
                )
                .map_err(write_err)?;
            }
            Ok(())
        }
    }
}

fn open_log(path: &Path) -> Result<(FileSource, FlushLog), LogCmdError> {
    let src = FileSource::open(path).map_err(|source| LogCmdError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let log = FlushLog::read(&src).map_err(|source| LogCmdError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((src, log))
}

fn check_epoch(path: &Path, log: &FlushLog, epoch: u64) -> Result<(), LogCmdError> {
    if epoch > log.last_epoch() {
        return Err(LogCmdError::NoSuchEpoch {
            path: path.to_path_buf(),
            epoch,
            last: log.last_epoch(),
        });
    }
    Ok(())
}

/// Who flushed, for the listing.
fn source_name(source: u32) -> String {
    match source {
        SOURCE_HOST => "host".into(),
        SOURCE_BACKGROUND => "background".into(),
        SOURCE_CACHE_FLUSH => "cache-flush".into(),
        vcpu => format!("vcpu{vcpu}"),
    }
}

fn page_list(pages: &[u64]) -> String {
    if pages.is_empty() {
        return "-".into();
    }
    pages
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The `log list` text: a summary line, then one row per epoch.
fn list_text(path: &Path, log: &FlushLog) -> String {
    let mut text = format!(
        "{}: flush log version {}, device of {}, {} epochs\n",
        path.display(),
        log.header.version,
        format_size(log.header.device_size),
        log.epochs.len()
    );
    if log.epochs.is_empty() {
        return text;
    }
    text.push_str("EPOCH  TIME (UTC)                      SOURCE      PAGES  PAGE NUMBERS\n");
    for e in &log.epochs {
        text.push_str(&format!(
            "{:<5}  {:<30}  {:<10}  {:>5}  {}\n",
            e.number,
            utc(e.time_ns),
            source_name(e.source),
            e.pages.len(),
            page_list(&e.pages)
        ));
    }
    text
}

/// `2026-11-23T21:44:00.123456789Z` from nanoseconds since the Unix epoch.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn create_new(path: &Path) -> Result<File, LogCmdError> {
    nvdimm::files::create_private(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            LogCmdError::OutExists {
                path: path.to_path_buf(),
            }
        } else {
            LogCmdError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Copies `base` into a new file at `out`, leaving holes where `base` reads as zeros.
fn copy_base(base: &Path, size: u64, out: &Path) -> Result<File, LogCmdError> {
    let base_err = |source| LogCmdError::Base {
        path: base.to_path_buf(),
        source,
    };
    let src = File::open(base).map_err(base_err)?;
    let len = src.metadata().map_err(base_err)?.len();
    if len < size {
        return Err(LogCmdError::BaseTooShort {
            path: base.to_path_buf(),
            len,
            size,
        });
    }
    let dst = create_new(out)?;
    let write_err = |source| LogCmdError::Write {
        path: out.to_path_buf(),
        source,
    };
    dst.set_len(len).map_err(write_err)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], at).map_err(base_err)?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at).map_err(write_err)?;
        }
        at += n as u64;
    }
    Ok(dst)
}

/// Writes the pages of `epoch` (all of them, or those in `only`) into `dst`.
fn apply(
    src: &FileSource,
    log: &FlushLog,
    epoch: &nvdimm::flush_log::Epoch,
    only: Option<&[u64]>,
    dst: &File,
    out: &Path,
) -> Result<u64, LogCmdError> {
    let page_size = u64::from(log.header.page_size);
    let mut buf = vec![0u8; page_size as usize];
    let mut applied = 0;
    for (i, &page) in epoch.pages.iter().enumerate() {
        if only.is_some_and(|keep| keep.binary_search(&page).is_err()) {
            continue;
        }
        log.read_page(src, epoch, i, &mut buf)
            .map_err(|source| LogCmdError::ReadPage {
                epoch: epoch.number,
                page,
                source,
            })?;
        dst.write_all_at(&buf, page * page_size)
            .map_err(|source| LogCmdError::Write {
                path: out.to_path_buf(),
                source,
            })?;
        applied += 1;
    }
    Ok(applied)
}

pub(crate) fn replay(
    src: &FileSource,
    log: &FlushLog,
    base: &Path,
    upto: u64,
    out: &Path,
) -> Result<u64, LogCmdError> {
    let dst = copy_base(base, log.header.device_size, out)?;
    let mut pages = 0;
    for e in log.epochs.iter().take(upto as usize) {
        pages += apply(src, log, e, None, &dst, out)?;
    }
    dst.sync_all().map_err(|source| LogCmdError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(pages)
}

#[allow(clippy::too_many_arguments)]
fn crash_states(
    src: &FileSource,
    log: &FlushLog,
    base: &Path,
    epoch: u64,
    next: &nvdimm::flush_log::Epoch,
    count: u32,
    seed: u64,
    dir: &Path,
) -> Result<Vec<(PathBuf, Vec<u64>)>, LogCmdError> {
    fs::create_dir_all(dir).map_err(|source| LogCmdError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for k in 0..count {
        let image = dir.join(format!("crash-{k:03}.img"));
        let kept = crash_subset(&next.pages, seed, u64::from(k));
        let dst = copy_base(base, log.header.device_size, &image)?;
        for e in log.epochs.iter().take(epoch as usize) {
            apply(src, log, e, None, &dst, &image)?;
        }
        apply(src, log, next, Some(&kept), &dst, &image)?;
        dst.sync_all().map_err(|source| LogCmdError::Write {
            path: image.clone(),
            source,
        })?;
        written.push((image, kept));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;
    use nvdimm::flush_log::FlushLogWriter;

    const PAGE: usize = 4096;

    /// A 16-page device: base has page i filled with i; epochs write (page, byte) pairs.
    fn setup(epochs: &[&[(u64, u8)]]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let mut bytes = vec![0u8; 16 * PAGE];
        for (i, page) in bytes.chunks_mut(PAGE).enumerate() {
            page.fill(i as u8);
        }
        fs::write(&base, &bytes).unwrap();
        let log = dir.path().join("flush.log");
        let mut w = FlushLogWriter::create(&log, 16 * PAGE as u64).unwrap();
        for (n, writes) in epochs.iter().enumerate() {
            let pages: Vec<u64> = writes.iter().map(|(p, _)| *p).collect();
            let time = 1_763_934_240_000_000_000 + n as u64;
            w.append(n as u32, time, &pages, |page, buf| {
                let (_, byte) = writes.iter().find(|(p, _)| *p == page).unwrap();
                buf.fill(*byte);
                Ok(())
            })
            .unwrap();
        }
        (dir, base, log)
    }

    fn run_cmd(cmd: LogCommand) -> (Result<(), LogCmdError>, String, String) {
        let (mut out, mut warn) = (Vec::new(), Vec::new());
        let r = run_to(&cmd, &mut out, &mut warn);
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(warn).unwrap(),
        )
    }

    fn page_bytes(path: &Path) -> Vec<u8> {
        fs::read(path)
            .unwrap()
            .chunks(PAGE)
            .map(|p| {
                assert!(p.iter().all(|&b| b == p[0]), "page not uniform");
                p[0]
            })
            .collect()
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            utc(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            utc(1_763_934_240_500_000_000),
            "2025-11-23T21:44:00.500000000Z"
        );
    }

    #[test]
    fn list_shows_every_epoch_and_warns_of_a_torn_tail() {
        let (_dir, _base, log) = setup(&[&[(0, 0xaa)], &[(1, 0xbb), (3, 0xcc)], &[]]);
        let (r, out, warn) = run_cmd(LogCommand::List { log: log.clone() });
        r.unwrap();
        assert_eq!(warn, "");
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].ends_with("flush log version 1, device of 64K, 3 epochs"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("1      2025-11-23T21:44:00.000000000Z  vcpu0           1  0"),
            "{out}"
        );
        assert!(lines[3].contains("vcpu1           2  1,3"), "{out}");
        assert!(lines[4].ends_with("0  -"), "{out}");
        let len = fs::metadata(&log).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(len - 10)
            .unwrap();
        let (r, out, warn) = run_cmd(LogCommand::List { log });
        r.unwrap();
        assert!(out.contains(", 2 epochs"), "{out}");
        assert!(
            warn.contains("torn tail: ") && warn.contains("epochs 1 to 2 are intact"),
            "{warn}"
        );
    }

    #[test]
    fn replay_builds_each_flush_point() {
        let (dir, base, log) = setup(&[&[(0, 0xaa)], &[(0, 0xab), (5, 0xbb)], &[(15, 0xcc)]]);
        let mut want: Vec<u8> = (0..16).collect();
        for (epoch, writes) in [
            (0u64, &[][..]),
            (1, &[(0usize, 0xaau8)][..]),
            (2, &[(0, 0xab), (5, 0xbb)][..]),
            (3, &[(15, 0xcc)][..]),
        ] {
            for &(p, b) in writes {
                want[p] = b;
            }
            let out = dir.path().join(format!("e{epoch}.img"));
            let (r, text, _) = run_cmd(LogCommand::Replay {
                log: log.clone(),
                base: base.clone(),
                epoch,
                out: out.clone(),
            });
            r.unwrap();
            assert!(text.contains(&format!("as of epoch {epoch}")), "{text}");
            assert_eq!(page_bytes(&out), want, "epoch {epoch}");
        }
        let (r, _, _) = run_cmd(LogCommand::Replay {
            log: log.clone(),
            base: base.clone(),
            epoch: 4,
            out: dir.path().join("e4.img"),
        });
        assert_eq!(
            r.unwrap_err().to_string(),
            format!(
                "epoch 4 is not in {}: it holds epochs 1 to 3",
                log.display()
            )
        );
        let (r, _, _) = run_cmd(LogCommand::Replay {
            log: log.clone(),
            base: base.clone(),
            epoch: 1,
            out: dir.path().join("e1.img"),
        });
        assert!(matches!(r, Err(LogCmdError::OutExists { .. })));
        let short = dir.path().join("short.img");
        fs::write(&short, [0u8; 4096]).unwrap();
        let (r, _, _) = run_cmd(LogCommand::Replay {
            log,
            base: short,
            epoch: 1,
            out: dir.path().join("x.img"),
        });
        assert!(matches!(
            r,
            Err(LogCmdError::BaseTooShort { len: 4096, .. })
        ));
    }

    #[test]
    fn crash_states_differ_only_in_the_next_epochs_pages_and_repeat_per_seed() {
        let next: Vec<(u64, u8)> = (2..12).map(|p| (p, 0xe0 + p as u8)).collect();
        let (dir, base, log) = setup(&[&[(0, 0xaa)], &next]);
        let states = |seed: u64, name: &str| {
            let out = dir.path().join(name);
            let (r, text, _) = run_cmd(LogCommand::CrashStates {
                log: log.clone(),
                base: base.clone(),
                epoch: 1,
                count: 6,
                seed,
                out: out.clone(),
            });
            r.unwrap();
            assert_eq!(text.lines().count(), 6, "{text}");
            (0..6)
                .map(|k| page_bytes(&out.join(format!("crash-{k:03}.img"))))
                .collect::<Vec<_>>()
        };
        let a = states(42, "a");
        let mut epoch1: Vec<u8> = (0..16).collect();
        epoch1[0] = 0xaa;
        for image in &a {
            for (p, &b) in image.iter().enumerate() {
                if (2..12).contains(&p) {
                    assert!(b == epoch1[p] || b == 0xe0 + p as u8, "page {p}");
                } else {
                    assert_eq!(b, epoch1[p], "page {p} is outside epoch 2");
                }
            }
        }
        assert!(a.windows(2).any(|w| w[0] != w[1]), "all six states equal");
        assert_eq!(a, states(42, "b"), "same seed, same images");
        assert_ne!(a, states(43, "c"), "another seed, other images");
        let (r, _, _) = run_cmd(LogCommand::CrashStates {
            log: log.clone(),
            base: base.clone(),
            epoch: 2,
            count: 1,
            seed: 0,
            out: dir.path().join("d"),
        });
        assert_eq!(
            r.unwrap_err().to_string(),
            format!(
                "crash states after epoch 2 need epoch 3, but {} holds epochs 1 to 2",
                log.display()
            )
        );
        let (r, _, _) = run_cmd(LogCommand::CrashStates {
            log,
            base,
            epoch: 0,
            count: 0,
            seed: 0,
            out: dir.path().join("e"),
        });
        assert!(matches!(r, Err(LogCmdError::BadCount { count: 0 })));
    }

    #[test]
    fn not_a_log_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk");
        fs::write(&p, b"hello, this is not a flush log at all!").unwrap();
        let (r, _, _) = run_cmd(LogCommand::List { log: p.clone() });
        let msg = crate::api::error_chain(&r.unwrap_err());
        assert_eq!(
            msg,
            format!(
                "{}: not a pmvm flush log: no PMVMFLOG magic at its start",
                p.display()
            )
        );
        let (r, _, _) = run_cmd(LogCommand::List {
            log: dir.path().join("missing"),
        });
        assert!(matches!(r, Err(LogCmdError::Open { .. })));
    }
}
