//! The guest run of a crash test: lay out the NVDIMM, boot the kernel with the workload program
//! as /init under the strict persistence model, and stamp each claim line with the flush epoch.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nvdimm::flush_log::{FileSource, FlushLog};
use nvdimm::pfn::{PfnInfoBlock, INFO_BLOCK_OFFSET, INFO_BLOCK_SIZE};

use super::cache_flush::{self, CacheFlush, GuestMemory};
use super::claims::{self, Claim};
use super::{CrashTestError, Fs, RunMeta};
use crate::pmem_format::{self, FormatArgs, Mode};

/// What the guest program prints when every workload finished.
const ALL_DONE: &str = "crash-workload: all done";

/// Everything the guest run needs.
pub struct GuestRun<'a> {
    pub pmvm: PathBuf,
    pub kernel: &'a Path,
    pub program: &'a Path,
    pub workloads: &'a str,
    pub size: &'a str,
    pub memory: &'a str,
    pub vm_args: &'a [String],
    pub append: &'a str,
    pub timeout: Duration,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CrashTestError {
    let what = what.into();
    move |source| CrashTestError::Io { what, source }
}

/// Formats DIR/image.img with a filesystem holding the workload program as /init, keeps a copy
/// as DIR/base.img, and returns where the filesystem starts.
pub fn prepare(dir: &Path, run: &GuestRun<'_>, fs: Fs) -> Result<u64, CrashTestError> {
    let root = dir.join("root");
    for sub in ["dev", "proc"] {
        fs::create_dir_all(root.join(sub)).map_err(io_err(format!("create {}", root.display())))?;
    }
    let init = root.join("init");
    fs::copy(run.program, &init).map_err(io_err(format!(
        "copy the guest program {} into the root",
        run.program.display()
    )))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))
        .map_err(io_err("make /init executable"))?;
    let image = dir.join("image.img");
    pmem_format::format(&FormatArgs {
        file: image.clone(),
        size: Some(run.size.to_string()),
        mode: Mode::Fsdax,
        ext4_from: (fs == Fs::Ext4).then(|| root.clone()),
        align: "2M".into(),
        force: false,
    })
    .map_err(|e| CrashTestError::Format(crate::api::error_chain(&e)))?;
    let offset = data_offset(&image)?;
    if fs == Fs::Xfs {
        super::xfs::format_data_area(&image, offset, &init, dir)?;
    }
    fs::copy(&image, dir.join("base.img")).map_err(io_err("keep the base image"))?;
    Ok(offset)
}

/// The data offset of the fsdax namespace in `image`, from its info block.
pub fn data_offset(image: &Path) -> Result<u64, CrashTestError> {
    let file = File::open(image).map_err(io_err(format!("open {}", image.display())))?;
    let size = file.metadata().map_err(io_err("stat the image"))?.len();
    let mut raw = [0u8; INFO_BLOCK_SIZE];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, INFO_BLOCK_OFFSET).map_err(
        io_err(format!("read the info block of {}", image.display())),
    )?;
    let block = PfnInfoBlock::decode(&raw);
    block.check(size).map_err(|e| {
        CrashTestError::Format(format!("{}: not an fsdax namespace: {e}", image.display()))
    })?;
    Ok(block.dataoff)
}

/// Epochs in the flush log so far (0 before the first flush creates records).
fn epochs_now(log: &Path) -> Result<u64, CrashTestError> {
    let src = match FileSource::open(log) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(format!("open {}", log.display()))(e)),
    };
    FlushLog::read(&src)
        .map(|l| l.last_epoch())
        .map_err(|e| CrashTestError::Io {
            what: format!("read {}", log.display()),
            source: io::Error::other(e.to_string()),
        })
}

/// What the guest reported: its claims, and the cache lines it wrote back itself (with the
/// workload that did), in console order.
pub struct Reported {
    pub claims: Vec<Claim>,
    pub cache_flushes: Vec<(CacheFlush, String)>,
}

/// Where the guest will see the NVDIMM and which file pmvm maps for it (its pid still 0).
fn guest_memory(dir: &Path, run: &GuestRun<'_>) -> Result<GuestMemory, CrashTestError> {
    let image = fs::canonicalize(dir.join("image.img")).map_err(io_err("find image.img"))?;
    let size = fs::metadata(&image)
        .map_err(io_err("stat image.img"))?
        .len();
    let ram = nvdimm::parse_size(run.memory)
        .map_err(|e| CrashTestError::Usage(format!("--memory {}: {e}", run.memory)))?;
    Ok(GuestMemory {
        pid: 0,
        image,
        base: crate::pmem::first_base(ram),
        size,
    })
}

/// Boots the guest and collects what it reports; the backing file and the log are left in
/// `dir`.
pub fn boot(dir: &Path, run: &GuestRun<'_>, fs: Fs) -> Result<Reported, CrashTestError> {
    let log = dir.join("flush.log");
    let fstype = match fs {
        Fs::Ext4 => "ext4",
        Fs::Xfs => "xfs",
    };
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 pci=off root=/dev/pmem0 rootfstype={fstype} \
         rootflags=dax rw init=/init PMVM_WORKLOADS={} {}",
        run.workloads, run.append
    );
    let pmem = format!(
        "path={},persist=flush,flush-log={}",
        dir.join("image.img").display(),
        log.display()
    );
    let mut memory = guest_memory(dir, run)?;
    let stderr = File::create(dir.join("pmvm.log")).map_err(io_err("create pmvm.log"))?;
    let mut child = Command::new(&run.pmvm)
        .arg("--kernel")
        .arg(run.kernel)
        .args(run.vm_args)
        .args([
            "--memory",
            run.memory,
            "--pmem",
            &pmem,
            "--cmdline",
            &cmdline,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(io_err(format!("start {}", run.pmvm.display())))?;
    let (Some(mut ack), Some(out)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(CrashTestError::Guest(
            "the guest's console pipes are missing".into(),
        ));
    };

    // A guest that hangs is stopped after the timeout; the console then ends.
    let (done, watchdog) = mpsc::channel::<()>();
    memory.pid = child.id();
    let pid = child.id() as libc::pid_t;
    let timeout = run.timeout;
    let timer = std::thread::spawn(move || {
        if watchdog.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill only sends a signal to our own child, which is not reaped before
            // this thread is joined.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });

    let mut console =
        File::create(dir.join("console.log")).map_err(io_err("create console.log"))?;
    let mut claims = Vec::new();
    let mut cache_flushes: Vec<(CacheFlush, String)> = Vec::new();
    let mut problems = Vec::new();
    let mut workload = String::from("-");
    let mut tail: Vec<String> = Vec::new();
    let mut all_done = false;
    let start = Instant::now();
    for line in BufReader::new(out).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end().to_string();
        let _ = writeln!(console, "{line}");
        if let Some(rest) = line.strip_prefix("crash-workload: ") {
            eprintln!(
                "crash-test: [{:6.1} s] guest: {rest}",
                start.elapsed().as_secs_f64()
            );
            if let Some(name) = rest.strip_suffix(" start") {
                workload = name.to_string();
            }
            if rest.contains("FAIL") {
                problems.push(line.clone());
            }
        }
        all_done |= line == ALL_DONE;
        // Each cache flush is an epoch of its own, after the flushes the log holds now.
        let answer = match claims::parse(&line) {
            Ok(None) => match cache_flush::parse(&line) {
                Ok(None) => false,
                Ok(Some(req)) => {
                    let after = epochs_now(&log)?;
                    match memory.read(&req) {
                        Ok((offset, bytes)) => cache_flushes.push((
                            CacheFlush {
                                after,
                                offset,
                                bytes,
                                time_ns: nvdimm::flush_log::now_ns(),
                            },
                            workload.clone(),
                        )),
                        Err(why) => problems.push(format!("{line}: {why}")),
                    }
                    true
                }
                Err(why) => {
                    problems.push(why);
                    true
                }
            },
            Ok(Some(claim)) => {
                claims.push(Claim {
                    epoch: epochs_now(&log)? + cache_flushes.len() as u64,
                    workload: workload.clone(),
                    ..claim
                });
                true
            }
            Err(why) => {
                problems.push(why);
                true
            }
        };
        if answer {
            // The guest waits for this byte before its next operation.
            let _ = ack.write_all(b"k").and_then(|()| ack.flush());
        }
        tail.push(line);
        if tail.len() > 12 {
            tail.remove(0);
        }
    }
    drop(ack);
    // The console closes when pmvm exits; stop the timer before reaping, so it can never
    // signal a process id that was reused.
    let _ = done.send(());
    let timed_out = timer.join().unwrap_or(false);
    let status = child.wait().map_err(io_err("wait for pmvm"))?;
    if timed_out {
        problems.push(format!(
            "the guest did not finish within {} s (--timeout)",
            run.timeout.as_secs()
        ));
    } else if !status.success() {
        problems.push(format!(
            "pmvm exited with {status}; see {}",
            dir.join("pmvm.log").display()
        ));
    }
    if !all_done && problems.is_empty() {
        problems.push(format!("the guest never printed {ALL_DONE:?}"));
    }
    if !problems.is_empty() {
        return Err(CrashTestError::Guest(format!(
            "{}\nlast console lines ({}):\n  {}",
            problems.join("; "),
            dir.join("console.log").display(),
            tail.join("\n  ")
        )));
    }
    Ok(Reported {
        claims,
        cache_flushes,
    })
}

/// Saves what `check` and `rebuild` need to read the run again.
pub fn save_meta(dir: &Path, meta: &RunMeta) -> Result<(), CrashTestError> {
    let text = serde_json::to_string_pretty(meta).map_err(|e| CrashTestError::Io {
        what: "encode run.json".into(),
        source: io::Error::other(e),
    })?;
    fs::write(dir.join("run.json"), text).map_err(io_err("write run.json"))
}
