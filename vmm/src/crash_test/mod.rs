//! `pmvm crash-test`: run a workload in a Linux guest on a DAX filesystem under the strict
//! persistence model, then check every crash state the flush-epoch log allows against the
//! filesystem's checker and the guest's durability claims. docs/crash-test.md has the model.

mod cache_flush;
mod check;
mod claims;
mod guest;
mod report;
mod states;
mod uml;
mod xfs;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use nvdimm::flush_log::{FileSource, FlushLog};
use serde::{Deserialize, Serialize};

use claims::Claim;
use states::{StateId, Subset};

/// Exit status when violations were found (errors exit 2).
const EXIT_VIOLATIONS: u8 = 1;
const EXIT_ERROR: u8 = 2;

/// The workloads of the guest program, in the order `all` runs them.
pub const WORKLOADS: [&str; 8] = [
    "create",
    "append",
    "rename",
    "mmap",
    "mapsync",
    "truncate",
    "nosync",
    "nomapsync",
];
/// The negative controls: workloads whose claims are false, which `all` leaves out.
pub const CONTROLS: [&str; 2] = ["nosync", "nomapsync"];

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Exit status: 0 no violation, 1 violations found, 2 the test could not run.\n\n\
        Examples:\n  \
        pmvm crash-test --kernel vmlinux --workload create,append,rename --dir ct\n  \
        pmvm crash-test check ct --states-per-epoch 256 --seed 7\n  \
        pmvm crash-test rebuild ct --epoch 52 --subset mask:0 --out state.img"
)]
pub struct CrashTestArgs {
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub opts: CheckOpts,
    #[command(subcommand)]
    pub command: Option<CrashTestCommand>,
}

/// Booting the guest.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel (vmlinux or bzImage) with fsdax and the --fs filesystem built in.
    #[arg(long, value_name = "PATH", required = true)]
    pub kernel: Option<PathBuf>,
    /// Workloads to run, in order, comma-separated: create, append, rename, mmap, mapsync,
    /// truncate; the negative controls nosync (claims durability without syncing) and
    /// nomapsync (mapsync's stores and cache flushes without MAP_SYNC); or `all` (all but the
    /// controls).
    #[arg(long, value_name = "A,B,...", default_value = "all")]
    pub workload: String,
    /// The filesystem the NVDIMM holds.
    #[arg(long, value_enum, default_value_t = Fs::Ext4)]
    pub fs: Fs,
    /// Directory for the run (created; must be empty): base.img, image.img, flush.log,
    /// epochs.log (with the guest's cache flushes), console.log, run.json. Kept, so `check`
    /// and `rebuild` can use it.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// NVDIMM size (a multiple of 2M).
    #[arg(long, value_name = "SIZE", default_value = "64M")]
    pub size: String,
    /// Guest RAM.
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    pub memory: String,
    /// The guest program run as /init (guest-images/build-init.sh builds it as
    /// guest-images/out/pmvm-crash-workload). Default: that file in the source tree pmvm was
    /// built in.
    #[arg(long, value_name = "PATH")]
    pub guest_program: Option<PathBuf>,
    /// An extra pmvm machine option for the guest, e.g. --vm-arg=--cpu-vendor=intel; repeat.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub vm_arg: Vec<String>,
    /// Words added to the kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub append: String,
    /// Seconds the guest may take, boot included.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub timeout: u64,
}

/// How many states to check and how.
#[derive(Debug, Args)]
pub struct CheckOpts {
    /// At most this many states per epoch; an epoch with fewer possible states gets all.
    #[arg(long, value_name = "K", default_value_t = 16)]
    pub states_per_epoch: u32,
    /// Bytes the device writes atomically: 64 (a cache line, as persistent memory does) up
    /// to 4096 (whole blocks, as a BTT namespace or many disks do).
    #[arg(long, value_name = "BYTES", default_value_t = states::LINE)]
    pub atomic_unit: usize,
    /// Seed of the sampled states: the same seed checks the same states.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Checking threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Where checking threads keep their copies of the image (default /dev/shm, else the run
    /// directory).
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CrashTestCommand {
    /// Check the crash states of an earlier run again (other seed, more states) without booting.
    Check {
        /// The run's --dir.
        dir: PathBuf,
        #[command(flatten)]
        opts: CheckOpts,
    },
    /// Write the whole NVDIMM image of one crash state, as a violation names it, for inspection
    /// (e.g. `debugfs` on its data area, or as a pmvm --pmem backing file).
    Rebuild {
        /// The run's --dir.
        dir: PathBuf,
        /// The flush epoch the crash came after.
        #[arg(long, value_name = "N")]
        epoch: u64,
        /// The state's lines of the next epoch: mask:<hex> or seed:<hex>.
        #[arg(long, value_name = "S")]
        subset: String,
        /// The --atomic-unit the state was checked with.
        #[arg(long, value_name = "BYTES", default_value_t = states::LINE)]
        atomic_unit: usize,
        /// The image to write; must not exist.
        #[arg(long, value_name = "IMG")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum Fs {
    /// ext4 (checked with e2fsck, read with debugfs).
    Ext4,
    /// xfs (log replayed by a user-mode Linux mount, checked with xfs_repair -n, read with
    /// xfs_db); needs xfsprogs and user-mode-linux.
    Xfs,
}

/// What a run leaves in DIR/run.json.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunMeta {
    pub fs: Fs,
    pub workloads: String,
    pub data_offset: u64,
    pub claims: Vec<Claim>,
    /// The guest's own cache flushes, each an epoch of DIR/epochs.log.
    #[serde(default)]
    pub cache_flushes: Vec<cache_flush::FlushRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum CrashTestError {
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("cannot lay out the NVDIMM: {0}")]
    Format(String),
    #[error("the guest run failed: {0}")]
    Guest(String),
    #[error("checking the crash states failed: {0}")]
    Check(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CrashTestError {
    let what = what.into();
    move |source| CrashTestError::Io { what, source }
}

/// Runs `pmvm crash-test ...`.
pub fn run(args: CrashTestArgs) -> ExitCode {
    let result = match &args.command {
        None => run_and_check(&args.run, &args.opts),
        Some(CrashTestCommand::Check { dir, opts }) => check_dir(dir, opts),
        Some(CrashTestCommand::Rebuild {
            dir,
            epoch,
            subset,
            atomic_unit,
            out,
        }) => rebuild(dir, *epoch, subset, *atomic_unit, out).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_VIOLATIONS),
        Err(e) => {
            eprintln!("pmvm crash-test: {}", crate::api::error_chain(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The workload list as the guest takes it.
fn workload_list(text: &str) -> Result<String, CrashTestError> {
    let mut names = Vec::new();
    for w in text.split(',').map(str::trim) {
        match w {
            "all" => names.extend(WORKLOADS.iter().filter(|n| !CONTROLS.contains(n))),
            w if WORKLOADS.contains(&w) => {
                names.push(WORKLOADS.iter().find(|&&n| n == w).unwrap_or(&""))
            }
            w => {
                return Err(CrashTestError::Usage(format!(
                    "--workload: {w:?} is not a workload; choose from {} or all",
                    WORKLOADS.join(", ")
                )))
            }
        }
    }
    Ok(names
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(","))
}

/// The guest program beside the source tree this pmvm was built in (target/<profile>/pmvm).
fn default_guest_program() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe
        .parent()?
        .parent()?
        .parent()?
        .join("guest-images/out/pmvm-crash-workload");
    p.is_file().then_some(p)
}

fn require_tools(fs: Fs) -> Result<(), CrashTestError> {
    let tools: &[(&str, &str)] = match fs {
        Fs::Ext4 => &[("e2fsck", "e2fsprogs"), ("debugfs", "e2fsprogs")],
        Fs::Xfs => &[
            ("mkfs.xfs", "xfsprogs"),
            ("xfs_repair", "xfsprogs"),
            ("xfs_db", "xfsprogs"),
            (uml::UML, "user-mode-linux"),
        ],
    };
    for (t, package) in tools {
        // The user-mode kernel boots on unknown options; --version only prints.
        let probe = if *t == uml::UML { "--version" } else { "-V" };
        let found = Command::new(t).arg(probe).output().is_ok();
        if !found {
            return Err(CrashTestError::Usage(format!(
                "{t} is needed to check {fs:?} crash states: install {package} \
                 (apt-get install {package}, or scripts/setup.sh)"
            )));
        }
    }
    Ok(())
}

use std::process::Command;

fn run_and_check(run: &RunArgs, opts: &CheckOpts) -> Result<bool, CrashTestError> {
    let kernel = run
        .kernel
        .as_deref()
        .ok_or_else(|| CrashTestError::Usage("--kernel is required".into()))?;
    if !kernel.is_file() {
        return Err(CrashTestError::Usage(format!(
            "--kernel {}: no such file",
            kernel.display()
        )));
    }
    let workloads = workload_list(&run.workload)?;
    let program = match &run.guest_program {
        Some(p) => p.clone(),
        None => default_guest_program().ok_or_else(|| {
            CrashTestError::Usage(
                "no guest program: build it with guest-images/build-init.sh, or give \
                 --guest-program PATH"
                    .into(),
            )
        })?,
    };
    require_tools(run.fs)?;
    let dir = match &run.dir {
        Some(d) => d.clone(),
        None => PathBuf::from(format!("crash-test-{}", std::process::id())),
    };
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    if fs::read_dir(&dir)
        .map_err(io_err(format!("read {}", dir.display())))?
        .next()
        .is_some()
    {
        return Err(CrashTestError::Usage(format!(
            "--dir {} is not empty; crash-test never overwrites a run: remove it or pick another",
            dir.display()
        )));
    }
    let guest = guest::GuestRun {
        pmvm: std::env::current_exe().map_err(io_err("find the pmvm executable"))?,
        kernel,
        program: &program,
        workloads: &workloads,
        size: &run.size,
        memory: &run.memory,
        vm_args: &run.vm_arg,
        append: &run.append,
        timeout: Duration::from_secs(run.timeout),
    };
    let data_offset = guest::prepare(&dir, &guest, run.fs)?;
    eprintln!(
        "crash-test: booting {} with workloads {workloads} on {:?} (run directory {})",
        kernel.display(),
        run.fs,
        dir.display()
    );
    let start = Instant::now();
    let reported = guest::boot(&dir, &guest, run.fs)?;
    eprintln!(
        "crash-test: the guest ran in {:.1} s, made {} claims and flushed cache lines {} times",
        start.elapsed().as_secs_f64(),
        reported.claims.len(),
        reported.cache_flushes.len()
    );
    let meta = RunMeta {
        fs: run.fs,
        workloads,
        data_offset,
        claims: reported.claims,
        cache_flushes: add_cache_flushes(&dir, &reported.cache_flushes)?,
    };
    guest::save_meta(&dir, &meta)?;
    check_run(&dir, &meta, opts)
}

fn load_meta(dir: &Path) -> Result<RunMeta, CrashTestError> {
    let path = dir.join("run.json");
    let text = fs::read_to_string(&path).map_err(io_err(format!(
        "read {} (is {} a crash-test run?)",
        path.display(),
        dir.display()
    )))?;
    serde_json::from_str(&text).map_err(|e| CrashTestError::Io {
        what: format!("parse {}", path.display()),
        source: io::Error::other(e),
    })
}

fn check_dir(dir: &Path, opts: &CheckOpts) -> Result<bool, CrashTestError> {
    let meta = load_meta(dir)?;
    require_tools(meta.fs)?;
    check_run(dir, &meta, opts)
}

/// The guest's flush log plus an epoch for each of its cache flushes, as DIR/epochs.log
/// (written only when there were any: the states' log is then flush.log itself).
fn add_cache_flushes(
    dir: &Path,
    flushes: &[(cache_flush::CacheFlush, String)],
) -> Result<Vec<cache_flush::FlushRecord>, CrashTestError> {
    if flushes.is_empty() {
        return Ok(Vec::new());
    }
    let path = dir.join(EPOCHS_LOG);
    let (src, log) = read_log(&dir.join(FLUSH_LOG))?;
    let base_path = dir.join("base.img");
    let base = File::open(&base_path).map_err(io_err(format!("open {}", base_path.display())))?;
    let only: Vec<cache_flush::CacheFlush> = flushes.iter().map(|(f, _)| f.clone()).collect();
    let numbers = cache_flush::merge(&src, &log, &base, &only, &path)
        .map_err(io_err(format!("write {}", path.display())))?;
    Ok(flushes
        .iter()
        .zip(numbers)
        .map(|((f, workload), epoch)| cache_flush::FlushRecord {
            epoch,
            offset: f.offset,
            len: f.bytes.len() as u64,
            workload: workload.clone(),
        })
        .collect())
}

/// pmvm's flush-epoch log of the run.
const FLUSH_LOG: &str = "flush.log";
/// The same with the guest's cache flushes as epochs of their own.
const EPOCHS_LOG: &str = "epochs.log";

/// The log whose epochs the states are built from.
fn open_log(dir: &Path) -> Result<(FileSource, FlushLog), CrashTestError> {
    let merged = dir.join(EPOCHS_LOG);
    read_log(&if merged.exists() {
        merged
    } else {
        dir.join(FLUSH_LOG)
    })
}

fn read_log(path: &Path) -> Result<(FileSource, FlushLog), CrashTestError> {
    let src = FileSource::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let log = FlushLog::read(&src).map_err(|e| CrashTestError::Io {
        what: format!("read {}", path.display()),
        source: io::Error::other(e.to_string()),
    })?;
    Ok((src, log))
}

fn check_run(dir: &Path, meta: &RunMeta, opts: &CheckOpts) -> Result<bool, CrashTestError> {
    let (src, log) = open_log(dir)?;
    let base_path = dir.join("base.img");
    let base = File::open(&base_path).map_err(io_err(format!("open {}", base_path.display())))?;
    check_unit(opts.atomic_unit)?;
    let plan = states::plan(&src, &log, &base, meta.data_offset, opts.atomic_unit)
        .map_err(io_err("diff the flush log's epochs"))?;
    let states = states::enumerate(&plan, opts.states_per_epoch, opts.seed);

    let scratch_root = match &opts.scratch {
        Some(s) => s.clone(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => dir.to_path_buf(),
    };
    let scratch = scratch_root.join(format!("pmvm-crash-test.{}", std::process::id()));
    fs::create_dir_all(&scratch).map_err(io_err(format!("create {}", scratch.display())))?;
    let data_base = scratch.join("data-base.img");
    let device_size = log.header.device_size;
    let data_len = device_size.saturating_sub(meta.data_offset);
    extract_data(&base, meta.data_offset, data_len, &data_base)
        .map_err(io_err(format!("write {}", data_base.display())))?;

    let jobs = opts
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "crash-test: checking {} crash states of {} epochs ({} per epoch at most, seed {}) on {jobs} threads",
        states.len(),
        plan.last_epoch(),
        opts.states_per_epoch,
        opts.seed
    );
    let ext4 = check::Ext4;
    let xfs = xfs::Xfs::default();
    let checker: &dyn check::FsChecker = match meta.fs {
        Fs::Ext4 => &ext4,
        Fs::Xfs => &xfs,
    };
    let ctx = check::Context {
        src: &src,
        log: &log,
        plan: &plan,
        claims: &meta.claims,
        checker,
        data_base: &data_base,
        data_len,
    };
    let start = Instant::now();
    let total = states.len();
    let results = check::check_all(&ctx, &states, jobs, &scratch, &mut |done, bad| {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "crash-test: {done}/{total} states, {:.1} states/s, {bad} violations",
            done as f64 / secs.max(1e-9)
        );
    });
    let _ = fs::remove_dir_all(&scratch);
    let results = results?;
    let secs = start.elapsed().as_secs_f64();
    let summary = report::Summary::new(meta, &results, secs, opts.atomic_unit);
    print!(
        "{}",
        report::render(dir, meta, &plan, opts, &summary, &results, report::SHOWN)
    );
    let full = report::render(dir, meta, &plan, opts, &summary, &results, usize::MAX);
    let _ = fs::write(dir.join("report.txt"), full);
    let _ = fs::write(dir.join("summary.json"), summary.json().to_string());
    Ok(summary.violations == 0)
}

fn check_unit(unit: usize) -> Result<(), CrashTestError> {
    if states::valid_unit(unit) {
        return Ok(());
    }
    Err(CrashTestError::Usage(format!(
        "--atomic-unit {unit}: use a power of two from 64 (a cache line) to 4096 (a page)"
    )))
}

/// Writes the data area of `base` to a new sparse file.
fn extract_data(base: &File, offset: u64, len: u64, out: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let dst = File::create(out)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        base.read_exact_at(&mut buf[..n], offset + at)?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], at)?;
        }
        at += n as u64;
    }
    Ok(())
}

fn rebuild(
    dir: &Path,
    epoch: u64,
    subset: &str,
    unit: usize,
    out: &Path,
) -> Result<(), CrashTestError> {
    check_unit(unit)?;
    let subset =
        Subset::parse(subset).map_err(|e| CrashTestError::Usage(format!("--subset {e}")))?;
    let meta = load_meta(dir)?;
    let (src, log) = open_log(dir)?;
    if epoch > log.last_epoch() {
        return Err(CrashTestError::Usage(format!(
            "--epoch {epoch}: the run's flush log holds epochs 0 to {}",
            log.last_epoch()
        )));
    }
    let base_path = dir.join("base.img");
    let base = File::open(&base_path).map_err(io_err(format!("open {}", base_path.display())))?;
    let plan = states::plan(&src, &log, &base, meta.data_offset, unit)
        .map_err(io_err("diff the flush log's epochs"))?;
    crate::log_cmd::replay(&src, &log, &base_path, epoch, out).map_err(|e| CrashTestError::Io {
        what: format!("write {}", out.display()),
        source: io::Error::other(crate::api::error_chain(&e)),
    })?;
    let image = fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(io_err(format!("open {}", out.display())))?;
    let state = StateId { epoch, subset };
    let kept = states::apply_lines(&plan, state, &image, meta.data_offset)
        .map_err(io_err(format!("write {}", out.display())))?;
    image
        .sync_all()
        .map_err(io_err(format!("sync {}", out.display())))?;
    println!(
        "{}: the image as of epoch {epoch} plus {kept} of the {} lines epoch {} changed ({subset}); \
         its filesystem starts at {:#x}",
        out.display(),
        plan.next_lines(epoch).len(),
        epoch + 1,
        meta.data_offset
    );
    Ok(())
}
