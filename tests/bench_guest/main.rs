//! The guest-side flush benchmark (scripts/bench-guest.sh runs it): the minimal kernel on a DAX
//! ext4 root runs guest-images/linux-init/guest-bench.c on pmvm, QEMU `nvdimm` and QEMU
//! `virtio-pmem-pci`, one after the other in one run. For each series it records what the
//! guest timed, pmvm's own flush counters around it, and how many pages of the backing file
//! are still dirty in the host page cache right after the guest's last sync returned.
//!
//! Usage: bench-guest --pmvm PMVM --qemu QEMU --kernel VMLINUX --init GUEST_BENCH_ELF
//!        [--reps N] [--max-pages K] [--append KERNEL_OPTIONS] [--nested]
//!        [--write-docs DOCS_DIR]
//! `--nested` writes the section of a run inside scripts/test-nested.sh's L1 instead of this
//! host's; `--append` adds options to every machine's kernel command line.
//! Errors end it with one line naming the step that failed.

mod lines;
mod report;
// The host's load, read and summed up as the flush benchmark does.
#[path = "../../vmm/benches/flush/load.rs"]
mod load;
// Shared with the flush benchmark, which keeps this section when it rewrites the page.
#[allow(dead_code)]
#[path = "../../vmm/benches/flush/sections.rs"]
mod sections;
// The flush benchmark's plot drawer: both benchmarks' SVGs look alike.
#[path = "../../vmm/benches/flush/svg.rs"]
mod svg;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lines::Event;
use pmvm_tests::{cachestat, Pmvm};
use vm::{Boot, Machine};

/// Each series may take this long on an emulating host.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// The boot, to the benchmark's first line: about 3 minutes on a loaded emulating host, and
/// over 4 for QEMU's nvdimm, whose kernel spent 160 s between the I/O schedulers and the UART.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// One series as one machine ran it.
pub struct Row {
    pub series: String,
    pub k: u32,
    pub us: Vec<u64>,
    /// Pages of the backing file dirty in the host page cache right after the last sync.
    pub dirty: u64,
    /// pmvm only: its flushes, pages written and the median flush's histogram bucket.
    pub host: Option<HostPart>,
}

pub struct HostPart {
    pub flushes: u64,
    pub pages: u64,
    pub bucket: Option<(u64, u64)>,
}

/// The whole run, beside the machines' rows.
pub struct Summary {
    /// Machines that did not finish, with the first line of why.
    pub missing: Vec<(Machine, String)>,
    pub seconds: f64,
    /// The host's 1-minute load average before and after each machine.
    pub load: Vec<f64>,
    /// Kernel options added to every machine's command line.
    pub append: String,
}

pub struct Run {
    pub machine: Machine,
    /// How QEMU ran the guest (`kvm` or `tcg`); pmvm always uses KVM.
    pub accel: String,
    pub rows: Vec<Row>,
    pub seconds: f64,
    /// The repetitions and largest k the guest ran with (it caps what it was asked for).
    pub sizes: (u32, u32),
}

struct Args {
    pmvm: PathBuf,
    qemu: PathBuf,
    kernel: PathBuf,
    init: PathBuf,
    reps: u32,
    max_pages: u32,
    append: String,
    nested: bool,
    docs: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = std::env::args().skip(1);
    let (mut pmvm, mut qemu, mut kernel, mut init, mut docs) = (None, None, None, None, None);
    let (mut reps, mut max_pages) = (8, 4096);
    let (mut append, mut nested) = (String::new(), false);
    while let Some(flag) = a.next() {
        let mut val = || a.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pmvm" => pmvm = Some(PathBuf::from(val()?)),
            "--qemu" => qemu = Some(PathBuf::from(val()?)),
            "--kernel" => kernel = Some(PathBuf::from(val()?)),
            "--init" => init = Some(PathBuf::from(val()?)),
            "--write-docs" => docs = Some(PathBuf::from(val()?)),
            "--append" => append = val()?,
            "--nested" => nested = true,
            "--reps" => reps = val()?.parse().map_err(|_| "--reps takes a number")?,
            "--max-pages" => {
                max_pages = val()?.parse().map_err(|_| "--max-pages takes a number")?
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    let need = |v: Option<PathBuf>, f: &str| v.ok_or_else(|| format!("{f} is required"));
    Ok(Args {
        pmvm: need(pmvm, "--pmvm")?,
        qemu: need(qemu, "--qemu")?,
        kernel: need(kernel, "--kernel")?,
        init: need(init, "--init")?,
        reps,
        max_pages,
        append,
        nested,
        docs,
    })
}

/// An fsdax image whose ext4 holds the benchmark as /init.
fn make_image(pmvm: &Path, init: &Path, dir: &Path) -> Result<PathBuf, String> {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("dev")).map_err(|e| format!("{}: {e}", root.display()))?;
    std::fs::copy(init, root.join("init")).map_err(|e| format!("{}: {e}", init.display()))?;
    let img = dir.join("base.img");
    let out = Command::new(pmvm)
        .args(["pmem", "format"])
        .arg(&img)
        .args(["--size", "64M", "--mode", "fsdax", "--ext4-from"])
        .arg(&root)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", pmvm.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("pmvm pmem format: {}", err.trim()));
    }
    Ok(img)
}

/// The next benchmark line from index `from` on; fails when the machine exits or stays
/// silent for STEP_TIMEOUT, with the end of its console.
fn next_line(
    vm: &mut Pmvm,
    from: usize,
    machine: Machine,
    timeout: Duration,
) -> Result<(usize, String), String> {
    let deadline = Instant::now() + timeout;
    let tail = |vm: &Pmvm| {
        let t = vm.transcript();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    loop {
        if let Ok(found) = vm.wait_for_from(from, "guest-bench: ", Duration::from_secs(2)) {
            return Ok(found);
        }
        if let Ok((status, _)) = vm.wait_exit(Duration::ZERO) {
            return Err(format!(
                "{} exited ({status}) before the guest benchmark finished; last output:\n{}",
                machine.name(),
                tail(vm)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{}: no line from the guest benchmark within {timeout:?}; last output:\n{}",
                machine.name(),
                tail(vm)
            ));
        }
    }
}

/// Why a machine's run ended early, and whether its kernel had started (if not, QEMU may not
/// take this host's KVM, and TCG is worth a try).
struct Failure {
    why: String,
    booted: bool,
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure { why, booted: true }
    }
}

/// Runs the benchmark on one machine, answering the guest at each of its pauses.
fn run_one(machine: Machine, boot: &Boot, accel: &str) -> Result<Run, Failure> {
    let start = Instant::now();
    let mut vm = vm::start(machine, boot, accel).map_err(|why| Failure { why, booted: false })?;
    let mut rows = Vec::new();
    let mut next = 0;
    let mut before = None;
    let mut sizes = (0, 0);
    loop {
        let timeout = if next == 0 {
            BOOT_TIMEOUT
        } else {
            STEP_TIMEOUT
        };
        let (i, line) = next_line(&mut vm, next, machine, timeout).map_err(|e| Failure {
            booted: vm.lines().iter().any(|l| l.contains("Linux version")),
            why: e,
        })?;
        next = i + 1;
        let Some(event) = lines::parse(&line) else {
            continue;
        };
        match event.map_err(|e| format!("{}: {e}", machine.name()))? {
            Event::Start {
                dax,
                reps,
                max_pages,
            } => {
                if !dax {
                    return Err(format!("{}: the guest's file is not DAX", machine.name()).into());
                }
                sizes = (reps, max_pages);
            }
            Event::Ready { .. } => {
                vm::host_fdatasync(boot.image)?;
                before = match machine {
                    Machine::Pmvm => Some(vm::pmvm_stats(boot.sock)?),
                    _ => None,
                };
            }
            Event::Done { series, k, us } => {
                // First the page cache, as close to the guest's last sync as the host gets.
                let cs = cachestat(boot.image, 0, 0)
                    .map_err(|e| format!("cachestat {}: {e}", boot.image.display()))?;
                let host = match (&before, machine) {
                    (Some((f0, p0, h0)), Machine::Pmvm) => {
                        let (f1, p1, h1) = vm::pmvm_stats(boot.sock)?;
                        Some(HostPart {
                            flushes: f1 - f0,
                            pages: p1 - p0,
                            bucket: lines::histogram_median(h0, &h1),
                        })
                    }
                    _ => None,
                };
                println!(
                    "bench-guest: {} {series} k={k}: {:?} µs, host-dirty {}",
                    machine.name(),
                    lines::median_p99(&us),
                    cs.nr_dirty
                );
                rows.push(Row {
                    series,
                    k,
                    us,
                    dirty: cs.nr_dirty,
                    host,
                });
            }
            Event::AllDone => {
                vm.send(b"g")
                    .map_err(|e| format!("{}: console: {e}", machine.name()))?;
                let _ = vm.wait_exit(Duration::from_secs(120));
                return Ok(Run {
                    machine,
                    accel: accel.to_string(),
                    rows,
                    seconds: start.elapsed().as_secs_f64(),
                    sizes,
                });
            }
            Event::Fail(why) => {
                return Err(format!("{}: the guest benchmark failed: {why}", machine.name()).into())
            }
        }
        vm.send(b"g")
            .map_err(|e| format!("{}: console: {e}", machine.name()))?;
    }
}

/// QEMU under KVM if this host's KVM takes it, else under TCG.
fn run_qemu(machine: Machine, boot: &Boot) -> Result<Run, String> {
    match run_one(machine, boot, "kvm") {
        Ok(r) => Ok(r),
        Err(f) if !f.booted => {
            println!(
                "bench-guest: {} did not start its kernel under KVM, rerunning under TCG: {}",
                machine.name(),
                f.why
            );
            run_one(machine, boot, "tcg").map_err(|f| f.why)
        }
        Err(f) => Err(f.why),
    }
}

fn main_inner() -> Result<(), String> {
    let args = parse_args()?;
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let base = make_image(&args.pmvm, &args.init, dir.path())?;
    let bench_env = format!(
        "{} PMVM_BENCH_REPS={} PMVM_BENCH_MAX_PAGES={}",
        args.append, args.reps, args.max_pages
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut missing = Vec::new();
    let mut load = Vec::new();
    for machine in [Machine::Pmvm, Machine::QemuNvdimm, Machine::QemuVirtioPmem] {
        let image = vm::copy_image(&base, dir.path(), machine)?;
        let sock = dir.path().join("api.sock");
        let boot = Boot {
            pmvm: &args.pmvm,
            qemu: &args.qemu,
            kernel: &args.kernel,
            image: &image,
            sock: &sock,
            bench_env: &bench_env,
        };
        println!("bench-guest: running on {}", machine.name());
        load.extend(load::average());
        let run = match machine {
            Machine::Pmvm => run_one(machine, &boot, "kvm").map_err(|f| f.why)?,
            _ => match run_qemu(machine, &boot) {
                Ok(run) => run,
                // pmvm's figures stand without it; the report says which machine is missing.
                Err(why) => {
                    load.extend(load::average());
                    println!("bench-guest: {why}");
                    missing.push((machine, why.lines().next().unwrap_or("").to_string()));
                    continue;
                }
            },
        };
        load.extend(load::average());
        println!(
            "bench-guest: {} done in {:.0} s",
            machine.name(),
            run.seconds
        );
        runs.push(run);
        let _ = std::fs::remove_file(&image);
    }
    let summary = Summary {
        missing,
        seconds: started.elapsed().as_secs_f64(),
        load,
        append: args.append.trim().to_string(),
    };
    let section = if args.nested {
        &report::NESTED
    } else {
        &report::HOST
    };
    print!("{}", report::markdown(&runs, &summary, section));
    if let Some(docs) = &args.docs {
        report::write_docs(&runs, &summary, section, docs)?;
    }
    Ok(())
}

fn main() {
    // The harness panics where a test would fail; here that is one line like any error.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        eprintln!("bench-guest: error: {}", msg.lines().next().unwrap_or(msg));
    }));
    if let Err(e) = main_inner() {
        eprintln!("bench-guest: error: {e}");
        std::process::exit(1);
    }
}
