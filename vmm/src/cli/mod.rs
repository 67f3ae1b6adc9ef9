//! Command-line interface: the machine options and the subcommands, and [`main`], which runs
//! what the command line asks for.

pub mod client;
mod config;
pub mod pmem_option;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::machine::DirtyTracking;
use crate::seccomp::SeccompMode;
use crate::{crash_test, log_cmd, logger, platform, pmem, pmem_format, vm};
use client::ClientCommand;

/// The `pmvm` command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init();
    // Process-wide, before any device maps its backing file.
    if let Err(e) = crate::sigbus::install() {
        log::warn!("cannot handle SIGBUS ({e}): a truncated backing file will end pmvm");
    }
    match cli.command {
        None => run_machine(&cli.machine),
        Some(cmd) => run_subcommand(cmd),
    }
}

fn run_subcommand(cmd: Command) -> ExitCode {
    let cmd = match cmd {
        Command::Stats { sock, json, watch } => ClientCommand::Stats {
            sock: sock.api_sock,
            json,
            watch,
        },
        Command::Flush { sock, id } => ClientCommand::Flush {
            sock: sock.api_sock,
            id,
        },
        Command::Pause { sock } => ClientCommand::Pause {
            sock: sock.api_sock,
        },
        Command::Resume { sock } => ClientCommand::Resume {
            sock: sock.api_sock,
        },
        Command::Shutdown { sock } => ClientCommand::Shutdown {
            sock: sock.api_sock,
        },
        Command::PowerCut { sock, id } => ClientCommand::PowerCut {
            sock: sock.api_sock,
            id,
        },
        Command::Pmem(args) => return pmem_format::run(args),
        Command::Log(args) => return log_cmd::run(&args),
        Command::CrashTest(args) => return crash_test::run(*args),
    };
    match client::run_client(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn run_machine(args: &MachineArgs) -> ExitCode {
    let config = match config::machine_config(args) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    if let Some(dir) = &args.dump_acpi {
        // The devices' sizes shape the tables; files created to learn them do not outlive this.
        let devices = match pmem::open_transient(&config.pmem, config.memory, config.cpus, false) {
            Ok(d) => d,
            Err(e) => return fail(&e),
        };
        let desc = platform::describe(&config, pmem::nfit_descs(&devices));
        return match platform::dump_acpi(&desc, dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let opts = vm::RunOptions {
        kvm_device: args.kvm_device.clone(),
        api_sock: args.api_sock.clone(),
    };
    match vm::run(&config, &opts) {
        Ok(code) => ExitCode::from(code),
        Err(e) => fail(&e),
    }
}

/// Prints an error and its causes on one line, the way users read it: "what: why: why".
fn fail(err: &dyn std::error::Error) -> ExitCode {
    eprintln!("pmvm: {}", crate::api::error_chain(err));
    ExitCode::FAILURE
}

/// pmvm boots a Linux guest (or the in-tree probe guest) on KVM with emulated NVDIMMs whose
/// flushes are exact: every guest flush writes back exactly the pages the guest dirtied to the
/// backing file before the vCPU resumes.
#[derive(Debug, Parser)]
#[command(
    name = "pmvm",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        pmvm --kernel bzImage --initrd guest.cpio --memory 1G --cpus 2\n  \
        pmvm --kernel guest-images/out/probe.elf --cmdline 'console=ttyS0 -- acpi poweroff'\n  \
        pmvm --dump-acpi /tmp/acpi --cpus 4   (then: iasl -d /tmp/acpi/*.dat)"
)]
pub struct Cli {
    #[command(flatten)]
    pub machine: MachineArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options that describe the virtual machine.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// Guest kernel: a Linux bzImage (64-bit entry) or an ELF vmlinux, such as the probe guest.
    #[arg(long, value_name = "PATH", required_unless_present = "dump_acpi")]
    pub kernel: Option<PathBuf>,

    /// Initramfs loaded into guest RAM below 4 GiB.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM, in bytes or with a K, M or G suffix. At least 64M.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Hide (-NAME) or show (+NAME) CPU features in the guest's CPUID, by their
    /// /proc/cpuinfo names, e.g. `-popcnt,-smap,-fsgsbase`.
    #[arg(
        long,
        value_name = "-NAME,+NAME,...",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub cpu_features: String,

    /// The CPU vendor the guest sees: intel, amd, or host (KVM's).
    #[arg(long, value_name = "intel|amd|host", default_value = "host")]
    pub cpu_vendor: String,

    /// Where the guest's serial console goes: `stdio`, or `file=PATH`.
    #[arg(long, value_name = "stdio|file=PATH", default_value = "stdio")]
    pub serial: String,

    /// An emulated NVDIMM backed by FILE; repeat for more devices (up to 16).
    /// `size` (K/M/G suffix, multiple of 2M) defaults to the file length; a missing FILE is
    /// created sparse when `size` is given. `id` names it in the API (default pmemN).
    /// `readonly=on` maps it read-only. `hints` is the number of flush-hint addresses
    /// (default: vCPUs rounded up to a power of two, at most 16).
    /// `persist=adr` (default): guest stores reach the file's page cache at once, flushes make
    /// them durable. `persist=flush`: the file changes only at guest flushes (strict model).
    /// `writeback-interval=MS` (adr only) also writes back every MS milliseconds.
    /// `flush-log=PATH` appends every flush's pages to a new log (see `pmvm log`).
    #[arg(
        long,
        value_name = "path=FILE[,size=SIZE][,id=NAME][,readonly=on][,hints=N][,persist=adr|flush][,writeback-interval=MS][,flush-log=PATH]",
        verbatim_doc_comment
    )]
    pub pmem: Vec<String>,

    /// How pmvm learns which pmem pages the guest wrote. `ring`: KVM's per-vCPU dirty ring,
    /// so a flush costs O(pages written). `bitmap`: the memslot's dirty bitmap, so a flush
    /// costs O(device size). `auto`: ring where KVM offers it and
    /// stops vCPUs at the ring's limit, else bitmap.
    #[arg(long, value_enum, value_name = "auto|ring|bitmap", default_value_t = DirtyTracking::Auto)]
    pub dirty_tracking: DirtyTracking,

    /// The seccomp filter each pmvm thread (vCPU, API, writeback, event loop) runs under once
    /// the VM is built. `kill` (default): a system call outside the thread's list kills pmvm.
    /// `log`: it is allowed and the kernel logs it (see dmesg), to find what a new path needs.
    /// `off`: no filter.
    #[arg(long, value_enum, value_name = "kill|log|off", default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,

    /// Test only: vCPU 0 makes one system call no thread is allowed, right after installing
    /// its filter, to show the filter works.
    #[arg(long, hide = true)]
    pub seccomp_selftest: bool,

    /// Write every ACPI table the guest would get to DIR/<SIGNATURE>.dat (DIR is created if
    /// missing) and exit without running a guest. Decode them with `iasl -d DIR/*.dat`.
    #[arg(long, value_name = "DIR")]
    pub dump_acpi: Option<PathBuf>,

    /// Serve the control socket (HTTP/JSON) at PATH: flush statistics, host flushes, pause,
    /// resume and shutdown. Read it with `pmvm stats --api-sock PATH` or curl --unix-socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// The KVM device to open.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/dev/kvm",
        hide_short_help = true
    )]
    pub kvm_device: PathBuf,
}

/// The default command line of a Linux guest on pmvm's platform.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// The control socket of a running pmvm.
#[derive(Debug, Args)]
pub struct SockArg {
    /// The running pmvm's --api-sock.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
}

/// Subcommands talk to a running pmvm through its control socket.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print each NVDIMM's flush statistics: flushes, pages and MiB written, latency, and
    /// dirty pages not yet flushed.
    Stats {
        #[command(flatten)]
        sock: SockArg,
        /// Print the raw JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
    },
    /// Write back every dirty page now (a host-initiated flush, counted apart from the guest's).
    Flush {
        #[command(flatten)]
        sock: SockArg,
        /// Only this device (default: every device).
        #[arg(long, value_name = "NAME")]
        id: Option<String>,
    },
    /// Stop every vCPU until `pmvm resume`.
    Pause {
        #[command(flatten)]
        sock: SockArg,
    },
    /// Let paused vCPUs run again.
    Resume {
        #[command(flatten)]
        sock: SockArg,
    },
    /// Stop the VM; pmvm exits 0.
    Shutdown {
        #[command(flatten)]
        sock: SockArg,
    },
    /// Simulate power loss: stop the vCPUs at once and write nothing more back. A persist=flush
    /// device's file keeps the image of its last flush. pmvm exits 3.
    PowerCut {
        #[command(flatten)]
        sock: SockArg,
        /// Ask through this device (`PUT /v1/pmem/{id}/crash`); the whole machine loses power.
        #[arg(long, value_name = "NAME")]
        id: Option<String>,
    },
    /// Read a flush-epoch log (`--pmem ...,flush-log=PATH`): list its epochs, rebuild the image
    /// as of any flush, or build crash states between two flushes.
    Log(crate::log_cmd::LogArgs),
    /// Format or inspect an NVDIMM backing file offline (`pmvm pmem format|info`).
    Pmem(crate::pmem_format::PmemArgs),
    /// Crash-consistency test: run a workload in a Linux guest on a DAX filesystem, then check
    /// every crash state between its flushes with the filesystem's checker and against each
    /// `DURABLE` claim the guest made (docs/crash-test.md).
    CrashTest(Box<crate::crash_test::CrashTestArgs>),
}
