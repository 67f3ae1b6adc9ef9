//! Checking crash states on the host, without mounting them: each worker keeps the data area
//! as of some epoch in a file of its own, copies it for a state, adds the state's lines, and
//! runs the filesystem's checker and reader on the copy.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use nvdimm::flush_log::{FileSource, FlushLog};

use super::claims::{self, Claim};
use super::states::{self, Plan, StateId};
use super::CrashTestError;

/// What checking one state found.
#[derive(Debug)]
pub struct StateResult {
    pub state: StateId,
    pub fsck_clean: bool,
    /// The checker's complaint when not clean.
    pub fsck_detail: String,
    /// The filesystem could not even be opened: its claims were not checked.
    pub unreadable: bool,
    /// Claims checked in this state.
    pub claims_checked: Vec<usize>,
    /// (claim index, why) for each claim the state breaks.
    pub broken: Vec<(usize, String)>,
}

/// A filesystem's host-side tools.
pub trait FsChecker: Sync {
    /// Brings a crash state to what a mount would see (journal replay) and checks it
    /// read-only.
    fn fsck(&self, image: &Path, scratch: &Path) -> io::Result<Fsck>;
    /// The contents of each path (None: absent), read without mounting.
    fn read_files(
        &self,
        image: &Path,
        paths: &[&str],
        scratch: &Path,
    ) -> io::Result<Vec<Option<Vec<u8>>>>;
}

/// A checker's verdict on one state.
#[derive(Debug, PartialEq, Eq)]
pub enum Fsck {
    Clean,
    /// Inconsistent, but readable: its files can still be checked.
    Errors(String),
    /// Not a filesystem a mount would accept (e.g. a torn superblock).
    Unreadable(String),
}

/// ext4: e2fsck replays the journal (as a mount would), then `e2fsck -fn`; debugfs reads files.
pub struct Ext4;

pub(super) fn run_tool(cmd: &mut Command) -> io::Result<(i32, String)> {
    let out = cmd.stdin(Stdio::null()).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

/// The first lines of a tool's output that are not `noise`: what it says is wrong.
pub(super) fn complaints_except(text: &str, noise: impl Fn(&str) -> bool) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !noise(l))
        .take(6)
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The lines of e2fsck's or debugfs's output that say what is wrong.
fn complaints(text: &str) -> String {
    complaints_except(text, |l| {
        ["Pass ", "e2fsck ", "debugfs "]
            .iter()
            .any(|p| l.starts_with(p))
            || l.contains("skipping journal recovery")
    })
}

impl FsChecker for Ext4 {
    fn fsck(&self, image: &Path, scratch: &Path) -> io::Result<Fsck> {
        let conf = scratch.join("e2fsck.conf");
        if !conf.exists() {
            // The guest's clock is not the host's: times in the future are no corruption.
            fs::write(&conf, "[options]\n\tbroken_system_clock = 1\n")?;
        }
        let (code, text) = run_tool(
            Command::new("e2fsck")
                .env("E2FSCK_CONFIG", &conf)
                .args(["-y", "-E", "journal_only"])
                .arg(image),
        )?;
        if code >= 4 {
            return Ok(Fsck::Unreadable(format!(
                "journal replay failed (e2fsck exit {code}): {}",
                complaints(&text)
            )));
        }
        let (code, text) = run_tool(
            Command::new("e2fsck")
                .env("E2FSCK_CONFIG", &conf)
                .arg("-fn")
                .arg(image),
        )?;
        match code {
            0 => Ok(Fsck::Clean),
            8.. | ..0 => Err(io::Error::other(format!(
                "e2fsck -fn could not check {} (exit {code}): {}",
                image.display(),
                complaints(&text)
            ))),
            _ => Ok(Fsck::Errors(format!(
                "e2fsck -fn exit {code}: {}",
                complaints(&text)
            ))),
        }
    }

    fn read_files(
        &self,
        image: &Path,
        paths: &[&str],
        scratch: &Path,
    ) -> io::Result<Vec<Option<Vec<u8>>>> {
        let out_dir = scratch.join("files");
        let _ = fs::remove_dir_all(&out_dir);
        fs::create_dir_all(&out_dir)?;
        let mut script = String::new();
        for (i, p) in paths.iter().enumerate() {
            script.push_str(&format!(
                "dump \"{p}\" \"{}\"\n",
                out_dir.join(i.to_string()).display()
            ));
        }
        let cmds = scratch.join("debugfs.cmds");
        fs::write(&cmds, script)?;
        let (code, text) = run_tool(Command::new("debugfs").arg("-f").arg(&cmds).arg(image))?;
        if code != 0 {
            return Err(io::Error::other(format!(
                "debugfs could not read {} (exit {code}): {}",
                image.display(),
                complaints(&text)
            )));
        }
        (0..paths.len())
            .map(|i| match fs::read(out_dir.join(i.to_string())) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            })
            .collect()
    }
}

/// Copies `src` into `dst` (emptied first), keeping holes.
fn copy_image(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(0)?;
    dst.set_len(len)?;
    crate::pmem_format::copy_sparse(src, dst, 0)
}

fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// One checking thread's files and the epoch its image is at.
struct Worker<'a> {
    ctx: &'a Context<'a>,
    scratch: PathBuf,
    epoch_image: File,
    epoch: u64,
    state_path: PathBuf,
    state_image: File,
}

/// What every worker shares.
pub struct Context<'a> {
    pub src: &'a FileSource,
    pub log: &'a FlushLog,
    pub plan: &'a Plan,
    pub claims: &'a [Claim],
    pub checker: &'a dyn FsChecker,
    /// The data area of the base image, sparse.
    pub data_base: &'a Path,
    pub data_len: u64,
}

impl<'a> Worker<'a> {
    fn new(ctx: &'a Context<'a>, scratch: PathBuf) -> io::Result<Worker<'a>> {
        fs::create_dir_all(&scratch)?;
        let epoch_image = open_rw(&scratch.join("epoch.img"))?;
        copy_image(&File::open(ctx.data_base)?, &epoch_image, ctx.data_len)?;
        let state_path = scratch.join("state.img");
        let state_image = open_rw(&state_path)?;
        Ok(Worker {
            ctx,
            scratch,
            epoch_image,
            epoch: 0,
            state_path,
            state_image,
        })
    }

    /// Applies whole epochs up to `to` (states come in epoch order).
    fn advance(&mut self, to: u64) -> io::Result<()> {
        let first_page = self.ctx.plan.data_offset / 4096;
        let mut buf = vec![0u8; 4096];
        while self.epoch < to {
            self.epoch += 1;
            let Some(epoch) = self.ctx.log.epoch(self.epoch) else {
                return Err(io::Error::other(format!(
                    "epoch {} is not in the log",
                    self.epoch
                )));
            };
            for (i, &page) in epoch.pages.iter().enumerate() {
                if page >= first_page {
                    self.ctx.log.read_page(self.ctx.src, epoch, i, &mut buf)?;
                    let at = page * 4096 - self.ctx.plan.data_offset;
                    self.epoch_image.write_all_at(&buf, at)?;
                }
            }
        }
        Ok(())
    }

    fn check(&mut self, state: StateId) -> io::Result<StateResult> {
        self.advance(state.epoch)?;
        copy_image(&self.epoch_image, &self.state_image, self.ctx.data_len)?;
        states::apply_lines(self.ctx.plan, state, &self.state_image, 0)?;
        let fsck = self.ctx.checker.fsck(&self.state_path, &self.scratch)?;
        let unreadable = matches!(fsck, Fsck::Unreadable(_));
        let mut expect = claims::expectations(self.ctx.claims, state.epoch);
        if unreadable {
            expect.clear();
        }
        let paths: Vec<&str> = expect.iter().map(|e| e.path).collect();
        let files = if paths.is_empty() {
            Vec::new()
        } else {
            self.ctx
                .checker
                .read_files(&self.state_path, &paths, &self.scratch)?
        };
        let index = |c: &Claim| {
            self.ctx
                .claims
                .iter()
                .position(|x| std::ptr::eq(x, c))
                .unwrap_or(0)
        };
        let mut result = StateResult {
            state,
            fsck_clean: fsck == Fsck::Clean,
            unreadable,
            fsck_detail: match fsck {
                Fsck::Clean => String::new(),
                Fsck::Errors(why) | Fsck::Unreadable(why) => why,
            },
            claims_checked: Vec::new(),
            broken: Vec::new(),
        };
        for (e, contents) in expect.iter().zip(&files) {
            let contents = contents.as_deref();
            result.claims_checked.push(index(e.durable));
            let ok = claims::satisfies(e.durable, contents)
                || e.alternatives
                    .iter()
                    .any(|a| claims::satisfies(a, contents));
            if !ok {
                result.broken.push((
                    index(e.durable),
                    claims::describe_failure(e.durable, contents),
                ));
            }
        }
        Ok(result)
    }
}

/// Checks every state on `jobs` threads, calling `progress` about every two seconds with
/// (states done, violations so far); returns the results in state order.
pub fn check_all(
    ctx: &Context<'_>,
    states: &[StateId],
    jobs: usize,
    scratch: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<StateResult>, CrashTestError> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let (tx, rx) = mpsc::channel::<(usize, StateResult)>();
    let mut results: Vec<Option<StateResult>> = states.iter().map(|_| None).collect();
    std::thread::scope(|s| {
        for w in 0..jobs.max(1) {
            let tx = tx.clone();
            let (next, failure) = (&next, &failure);
            let dir = scratch.join(format!("worker{w}"));
            s.spawn(move || {
                let fail = |e: io::Error| {
                    let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                    f.get_or_insert_with(|| e.to_string());
                };
                let mut worker = match Worker::new(ctx, dir) {
                    Ok(w) => w,
                    Err(e) => return fail(e),
                };
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&state) = states.get(i) else { return };
                    match worker.check(state) {
                        Ok(r) => {
                            if tx.send((i, r)).is_err() {
                                return;
                            }
                        }
                        Err(e) => return fail(e),
                    }
                }
            });
        }
        drop(tx);
        let (mut done, mut bad) = (0, 0);
        let mut last = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok((i, r)) => {
                    done += 1;
                    bad += r.broken.len() + usize::from(!r.fsck_clean);
                    results[i] = Some(r);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last.elapsed() >= Duration::from_secs(2) {
                progress(done, bad);
                last = Instant::now();
            }
        }
    });
    if let Some(why) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(CrashTestError::Check(why));
    }
    let missing = results.iter().filter(|r| r.is_none()).count();
    if missing > 0 {
        return Err(CrashTestError::Check(format!(
            "{missing} states were not checked"
        )));
    }
    Ok(results.into_iter().flatten().collect())
}
