//! The flush benchmark: pmvm's synchronous flush path against the host's own ways of making
//! the same dirty pages durable, the cost of dirty tracking on guest stores, and the VMM's
//! start CPU and memory. Every figure it judges is a ratio or a budget measured in one run.
//!
//! `cargo bench -p pmvm --bench flush -- [--quick] [--write-docs] [--pmvm PATH]
//! [--probe PATH]`; `scripts/bench.sh` builds pmvm and the probe and regenerates
//! docs/benchmarks.md and docs/bench/*.svg. Needs /dev/kvm.

#[path = "../../../devices/nvdimm/tests/common/mod.rs"]
mod common;
mod error;
mod flush_path;
mod guest;
mod host_sync;
mod load;
mod logging;
mod machine;
mod plot;
mod report;
// Shared with the guest benchmark, which splices its section in and runs the tests.
#[allow(dead_code)]
mod sections;
mod stall;
mod stats;
mod strict_memory;
mod svg;
#[path = "../../../tests/tiny_vm_ring.rs"]
mod tiny_vm_ring;
mod tracking;
mod vmm_start;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use error::BenchError;
use flush_path::{Setup, Tracking};
use machine::Machine;
use nvdimm::error_chain as chain;
use report::{FlushCell, LoggingCell, Measured, Results, VmmResults};
use strict_memory::StrictMemory;
use vmm_start::Pmvm;

const GIB: u64 = 1 << 30;
const LOGGING_PAIRS: usize = 5;

fn strict_max_pages() -> u64 {
    if pmvm::dirty_ring::ring_limit_unenforced().is_some() {
        4096
    } else {
        65536
    }
}

/// What one run measures, and how often.
struct Plan {
    sizes: Vec<u64>,
    pages: Vec<u64>,
    /// `persist=flush` cells stop here: each round the guest copies every page it stores to
    /// afresh, which on an emulating host (PVM) takes about a millisecond a page, so rounds of
    /// 65,536 pages would add half an hour to the run.
    strict_max_pages: u64,
    logging_pages: Vec<u64>,
    start_runs: usize,
    memory_runs: usize,
    quick: bool,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            sizes: vec![GIB, 16 * GIB, 64 * GIB],
            pages: vec![0, 1, 16, 64, 256, 4096, 65536],
            strict_max_pages: strict_max_pages(),
            logging_pages: vec![256, 4096, 65536],
            start_runs: 11,
            memory_runs: 3,
            quick: false,
        }
    }

    /// A smoke run of a minute: fewer cells and rounds.
    fn quick() -> Plan {
        Plan {
            sizes: vec![GIB, 64 * GIB],
            pages: vec![0, 1, 16, 256, 4096],
            strict_max_pages: strict_max_pages(),
            logging_pages: vec![4096],
            start_runs: 3,
            memory_runs: 1,
            quick: true,
        }
    }

    /// Measured rounds of a flush cell: fewer where one round writes back hundreds of MiB
    /// (five times: pmvm and four host methods) or the guest copies thousands of pages
    /// (`persist=flush`); more where a flush takes a millisecond or less, as there one I/O that
    /// waits behind the host's own moves a median of 49 by more than the 10% a target allows
    /// (the host's four methods, the same work, spread by up to 25% within one row). The
    /// fewest are whole cycles of the ten orders of methods (`flush_path::order`): in 9
    /// rounds of 65,536 pages the host's methods, the same work, spread by 28%.
    fn flush_rounds(&self, pages: u64) -> u64 {
        match (self.quick, pages) {
            (true, p) if p <= 256 => 5,
            (true, _) => 3,
            (false, p) if p <= 16 => 401,
            (false, p) if p <= 256 => 201,
            (false, p) if p <= 4096 => 30,
            (false, _) => 20,
        }
    }

    /// Rounds per VM of a dirty-tracking cell; `LOGGING_PAIRS` logged and unlogged VMs take
    /// turns, so drift of the host hits both alike.
    fn logging_rounds(&self, pages: u64) -> u64 {
        match (self.quick, pages) {
            (true, _) => 5,
            (false, p) if p <= 4096 => 15,
            (false, _) => 5,
        }
    }
}

struct Args {
    quick: bool,
    write_docs: bool,
    pmvm: Option<PathBuf>,
    probe: Option<PathBuf>,
}

const USAGE: &str = "usage: cargo bench -p pmvm --bench flush -- [--quick] \
                     [--write-docs] [--pmvm PATH] [--probe PATH]";

/// Parses the arguments; None when not run by `cargo bench` (which passes `--bench`), so
/// `cargo test` (which runs this bench, `test = true`) does not spend minutes on it.
fn parse_args() -> Result<Option<Args>, BenchError> {
    // Not `cargo bench`: ignore what `cargo test` passes (`--test-threads=2` and the like).
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(None);
    }
    let mut args = Args {
        quick: false,
        write_docs: false,
        pmvm: std::env::var_os("PMVM_BIN").map(PathBuf::from),
        probe: std::env::var_os("PMVM_PROBE").map(PathBuf::from),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut path = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| BenchError::Usage(format!("{name} needs a path; {USAGE}")))
        };
        match a.as_str() {
            "--bench" => {}
            "--quick" => args.quick = true,
            "--write-docs" => args.write_docs = true,
            "--pmvm" => args.pmvm = Some(path("--pmvm")?),
            "--probe" => args.probe = Some(path("--probe")?),
            other => {
                return Err(BenchError::Usage(format!(
                    "unknown argument {other:?}; {USAGE}"
                )))
            }
        }
    }
    if args.quick && args.write_docs {
        return Err(BenchError::Usage(
            "--quick results are too thin for the docs: drop --quick or --write-docs".into(),
        ));
    }
    Ok(Some(args))
}

fn measure_vmm(args: &Args, plan: &Plan, dir: &std::path::Path) -> VmmResults {
    let (Some(bin), Some(probe)) = (args.pmvm.clone(), args.probe.clone()) else {
        return VmmResults::Skipped(
            "no --pmvm/--probe given (scripts/bench.sh passes both)".into(),
        );
    };
    for p in [&bin, &probe] {
        if !p.is_file() {
            return VmmResults::Skipped(format!("{} does not exist", p.display()));
        }
    }
    let pmvm = Pmvm { bin, probe };
    let run = || -> Result<VmmResults, BenchError> {
        eprintln!("bench: pmvm start CPU, {} runs", plan.start_runs);
        let starts = vmm_start::start_cpu(&pmvm, dir, plan.start_runs)?;
        let mut memories = Vec::new();
        for i in 0..plan.memory_runs {
            eprintln!("bench: pmvm memory, run {}", i + 1);
            memories.push(vmm_start::memory(&pmvm, dir, &format!("mem{i}"))?);
        }
        Ok(VmmResults::Measured { starts, memories })
    };
    run().unwrap_or_else(|e| VmmResults::Failed(chain(&e)))
}

/// Item of its own: `persist=flush` memory after filling a 1 GiB device, and its bytes after
/// a power cut.
fn measure_strict_memory(args: &Args, dir: &std::path::Path) -> Measured<StrictMemory> {
    let (Some(bin), Some(probe)) = (args.pmvm.clone(), args.probe.clone()) else {
        return Measured::Skipped("no --pmvm/--probe given (scripts/bench.sh passes both)".into());
    };
    eprintln!(
        "bench: persist=flush memory, {} MiB device filled by the probe",
        strict_memory::DEVICE_MIB
    );
    match strict_memory::measure(&Pmvm { bin, probe }, dir) {
        Ok(m) => Measured::Done(m),
        Err(e) => Measured::Failed(chain(&e)),
    }
}

/// O(dirty) tracking with the real pmvm, with default options and with the ring forced.
fn measure_tracking(args: &Args, dir: &std::path::Path) -> Measured<Vec<tracking::Tracked>> {
    let (Some(bin), Some(probe)) = (args.pmvm.clone(), args.probe.clone()) else {
        return Measured::Skipped("no --pmvm/--probe given (scripts/bench.sh passes both)".into());
    };
    let pmvm = Pmvm { bin, probe };
    let mut out = Vec::new();
    for option in ["default", "ring"] {
        eprintln!(
            "bench: dirty tracking ({option}), {} pages in one loop, then {}",
            tracking::DEVICE_PAGES,
            tracking::LATER_PAGES
        );
        match tracking::measure(&pmvm, dir, option) {
            Ok(t) => out.push(t),
            Err(e) => return Measured::Failed(chain(&e)),
        }
    }
    Measured::Done(out)
}

fn run(args: &Args) -> Result<(), BenchError> {
    let plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let Some(kvm) = common::kvm_or_skip("flush benchmark") else {
        return Err(BenchError::Check(
            "the flush benchmark needs /dev/kvm (guest stores must go through KVM's dirty log)"
                .into(),
        ));
    };
    let scratch = machine::scratch_dir()?;
    let dir = scratch.path();
    let mut machine = Machine::probe(dir);
    eprintln!(
        "bench: scratch files in {} ({})",
        dir.display(),
        machine.scratch_fs
    );
    let began = Instant::now();

    let mut flush = Vec::new();
    let mut strict = Vec::new();
    let mut bitmap = Vec::new();
    for &size in &plan.sizes {
        // persist=adr and persist=flush with the dirty ring at every k; the slot bitmap beside
        // them, where its O(device size) harvest shows: nothing or one page dirty.
        let strict_pages: Vec<u64> = plan
            .pages
            .iter()
            .copied()
            .filter(|&p| p <= plan.strict_max_pages)
            .collect();
        let setups = [
            (Tracking::Ring, false, &plan.pages[..]),
            (Tracking::Ring, true, &strict_pages[..]),
            (Tracking::Bitmap, false, &[0, 1][..]),
        ];
        for (tracking, strict_model, pages_list) in setups {
            for &pages in pages_list {
                let rounds = plan.flush_rounds(pages);
                eprintln!(
                    "bench: flush, {} device, persist={}, {} tracking, {pages} dirty pages, \
                     {rounds} rounds",
                    stats::fmt_size(size),
                    if strict_model { "flush" } else { "adr" },
                    tracking.name()
                );
                machine.load.extend(load::average());
                let setup = Setup {
                    tracking,
                    strict: strict_model,
                };
                let m = flush_path::measure(&kvm, dir, size, pages, rounds, setup)?;
                let cell = FlushCell {
                    size,
                    pages,
                    rounds: m.rounds,
                    get_log_us: m.get_log_us,
                };
                match (tracking, strict_model) {
                    (Tracking::Bitmap, _) => bitmap.push(cell),
                    (Tracking::Ring, true) => strict.push(cell),
                    (Tracking::Ring, false) => flush.push(cell),
                }
            }
        }
    }
    let mut logging = Vec::new();
    for &pages in &plan.logging_pages {
        let rounds = plan.logging_rounds(pages);
        eprintln!("bench: dirty tracking, {pages} pages, {LOGGING_PAIRS} x {rounds} rounds each");
        let mut cell = LoggingCell {
            pages,
            pairs: Vec::new(),
        };
        for pair in 0..LOGGING_PAIRS {
            // Alternate which goes first, so neither always runs on a warmer host.
            let first = pair % 2 == 0;
            let a = logging::measure(&kvm, pages, rounds, first)?;
            let b = logging::measure(&kvm, pages, rounds, !first)?;
            let (logged, unlogged) = if first { (a, b) } else { (b, a) };
            cell.pairs.push((logged, unlogged));
        }
        logging.push(cell);
    }
    let stall_rounds = if plan.quick { 5 } else { 25 };
    eprintln!(
        "bench: group commit, a 1-page flush during a {}-page writeback, {stall_rounds} rounds",
        stall::BIG
    );
    let stall = stall::measure(dir, stall_rounds)?;
    let vmm = measure_vmm(args, &plan, dir);
    let tracking = if plan.quick {
        Measured::Skipped("not in a --quick run".into())
    } else {
        measure_tracking(args, dir)
    };
    let strict_memory = if plan.quick {
        Measured::Skipped("not in a --quick run (it fills a 1 GiB device)".into())
    } else {
        measure_strict_memory(args, dir)
    };
    let results = Results {
        tracking,
        strict_memory,
        stall,
        machine,
        flush,
        strict,
        bitmap,
        logging,
        vmm,
        seconds: began.elapsed().as_secs_f64(),
    };
    print!("{}", report::text(&results));
    if args.write_docs {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs");
        report::write_docs(&results, &docs)?;
        eprintln!("bench: wrote {}", docs.join("benchmarks.md").display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            // `cargo test`: check the bench's own design, then say how to run it.
            if let Err(e) = flush_path::check_order() {
                eprintln!("bench: the order of the methods is unbalanced: {e}");
                return ExitCode::FAILURE;
            }
            println!("flush benchmark: run it with `cargo bench` or scripts/bench.sh");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench: {}", chain(&e));
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        // A missed target is a result, not a failure of the bench: the output says by how much.
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
