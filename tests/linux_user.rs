//! Linux user space on pmvm: the minimal kernel (guest-images/build-kernel.sh) runs
//! guest-images/linux-init/pmvm-init.c as /init, which checks every system-call path a guest
//! kernel must get right and prints a line per check: registers across a system call, ENOSYS,
//! a signal handler and rt_sigreturn, EINTR, SA_RESTART, fork, vfork, execve, a killed child,
//! a thread joined through futex waits, and memory. Then it powers the guest off.
//!
//! On hosts whose KVM delivers SYSCALL as a page fault (nested PVM), this is the evidence for
//! the kernel patch guest-images/kernel/patches/0003 that runs such system calls.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pmvm_tests::linux::{emulating_host, init_cpio, minimal_kernel_or_skip, EmulatedProfile};
use pmvm_tests::{kvm_or_skip, Pmvm};

/// The checks pmvm-init runs, in order.
const CHECKS: [&str; 11] = [
    "registers",
    "enosys",
    "signal",
    "eintr",
    "restart",
    "fork",
    "vfork",
    "execve",
    "kill",
    "thread-futex",
    "memory",
];

/// Boot to /init takes about 30 s on an emulating host; the checks a few seconds.
const TIMEOUT: Duration = Duration::from_secs(300);

fn boot(kernel: &Path, cpus: u32, test: &str) -> Pmvm {
    let mut cmdline =
        "console=ttyS0 reboot=k panic=1 pci=off rdinit=/init PMVM_INIT=checks".to_string();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        init_cpio().display().to_string(),
        "--memory".into(),
        "256M".into(),
        "--cpus".into(),
        cpus.to_string(),
    ];
    if emulating_host() {
        let profile = EmulatedProfile::load();
        args.extend(profile.pmvm_args);
        cmdline = format!("{cmdline} {}", profile.cmdline);
    }
    args.extend(["--cmdline".into(), cmdline]);
    println!("{test}: pmvm {}", args.join(" "));
    Pmvm::spawn(&PathBuf::from(env!("CARGO_BIN_EXE_pmvm")), &args)
}

/// Every check line must say ok, and pmvm must exit 0 when init powers the guest off.
fn run_checks(cpus: u32) {
    let test = format!("linux user space ({cpus} vCPU)");
    if !kvm_or_skip(&test) {
        return;
    }
    let Some(kernel) = minimal_kernel_or_skip(&test) else {
        return;
    };
    let start = Instant::now();
    let mut vm = boot(&kernel, cpus, &test);
    let done = vm.wait_for("pmvm-init: checks done", TIMEOUT);
    let lines = vm.lines();
    if let Err(e) = done {
        let died = lines
            .iter()
            .find(|l| l.contains(" segfault at ") || l.contains("Kernel panic"));
        panic!(
            "{test}: init never finished its checks ({}): {e}",
            died.map(String::as_str)
                .unwrap_or("no death on the console")
        );
    }
    println!(
        "{test}: checks done after {:.1} s",
        start.elapsed().as_secs_f64()
    );
    for name in CHECKS {
        let ok = format!("pmvm-init: check {name} ok");
        assert!(
            lines.iter().any(|l| l.ends_with(&ok)),
            "{test}: check {name} did not pass:\n{}",
            lines
                .iter()
                .filter(|l| l.contains("pmvm-init"))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let summary = format!("pmvm-init: checks done: {} ok, 0 failed", CHECKS.len());
    assert!(
        lines.iter().any(|l| l.ends_with(&summary)),
        "{test}: expected {summary:?}\n{}",
        vm.transcript()
    );
    let (status, stderr) = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{test}: init powered off, so pmvm exits 0: {stderr}"
    );
}

#[test]
fn every_system_call_path_works_in_guest_user_space() {
    run_checks(1);
}

#[test]
fn user_space_runs_on_two_vcpus() {
    run_checks(2);
}
