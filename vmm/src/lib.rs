//! pmvm: a small KVM VMM whose NVDIMM makes guest flushes exact, observable and durable.
//!
//! The `pmvm` binary is [`main`]; the control socket's documents and client ([`api::types`],
//! [`api::client`]) are public for the tests and tools that talk to a running pmvm, and the
//! VM's KVM dirty rings ([`dirty_ring`]) for the tests and the flush benchmark that drive KVM
//! directly.

pub mod api;
mod boot;
pub mod cli;
mod control;
mod crash_test;
mod devices;
pub mod dirty_ring;
mod exit;
mod layout;
mod logger;
mod machine;
mod memory;
mod platform;
mod pmem;
mod power_cut;
mod seccomp;
mod sigbus;
mod signals;
mod stop_wait;
mod tools;
mod vcpu;
mod vm;
mod x86;

use std::process::ExitCode;

use tools::{log as log_cmd, pmem_format};

/// The device crate, for the tools that share its helpers (cachestat, the statistics).
pub use nvdimm;

/// The `pmvm` command: parses the command line and runs the machine or the subcommand.
pub fn main() -> ExitCode {
    cli::main()
}
