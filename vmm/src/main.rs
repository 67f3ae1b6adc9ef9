//! pmvm: a small KVM VMM whose NVDIMM makes guest flushes exact, observable and durable.

mod api;
mod boot;
mod cli;
mod control;
mod crash_test;
mod devices;
mod exit;
mod layout;
mod log_cmd;
mod logger;
mod machine;
mod memory;
mod platform;
mod pmem;
mod pmem_format;
mod seccomp;
mod signals;
mod stop_wait;
mod vcpu;
mod vm;
mod x86;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logger::init();
    match cli.command {
        None => run_machine(&cli.machine),
        Some(cmd) => run_client(cmd),
    }
}

fn run_client(cmd: cli::Command) -> ExitCode {
    use api::client::ClientCommand;
    use cli::Command;
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
    match api::client::run_client(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn run_machine(args: &cli::MachineArgs) -> ExitCode {
    let config = match machine::MachineConfig::from_args(args) {
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
    eprintln!("pmvm: {}", api::error_chain(err));
    ExitCode::FAILURE
}
