//! The core machine, proven with the probe guest on /dev/kvm: boot path, ACPI walk, serial,
//! power-off, fatal exits, signals, and the command line's bad-input table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pmvm_tests::{kvm_or_skip, probe_elf, Pmvm};

const BOOT: Duration = Duration::from_secs(60);

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// Runs the probe with `words` (after the kernel-style options) and `extra` pmvm options.
fn probe(words: &str, extra: &[&str]) -> Pmvm {
    let cmdline = format!("console=ttyS0 -- {words}");
    let kernel = probe_elf();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--cmdline".into(),
        cmdline,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Pmvm::spawn(&pmvm(), &args)
}

#[test]
fn acpi_walk_finds_every_table_with_good_checksums() {
    if !kvm_or_skip("acpi walk") {
        return;
    }
    let mut vm = probe("acpi poweroff", &["--cpus", "2"]);
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    let lines = vm.lines();
    for sig in ["RSDP", "XSDT", "FACP", "APIC", "DSDT"] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("probe: table {sig} ")))
            .unwrap_or_else(|| panic!("no table line for {sig}\n{}", vm.transcript()));
        assert!(line.ends_with("checksum=ok"), "{line}");
    }
    assert!(
        !lines.iter().any(|l| l.contains("checksum=BAD")),
        "{}",
        vm.transcript()
    );
    assert!(stderr.is_empty(), "pmvm printed on stderr: {stderr}");
}

#[test]
fn mark_and_poweroff_exit_zero() {
    if !kvm_or_skip("mark") {
        return;
    }
    let mut vm = probe("mark HELLO-PMVM poweroff", &[]);
    vm.wait_for("probe: MARK HELLO-PMVM", BOOT).unwrap();
    let (status, _) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
}

#[test]
fn i8042_reset_ends_pmvm_with_zero() {
    if !kvm_or_skip("i8042 reset") {
        return;
    }
    let mut vm = probe("reboot mark NEVER", &[]);
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    assert!(vm.lines().iter().any(|l| l == "probe: reboot"));
    assert!(!vm.lines().iter().any(|l| l.contains("NEVER")));
    assert!(!stderr.contains("pmvm: vCPU"), "{stderr}");
}

/// pmvm with the probe reading two lines from its console, stdin a pipe; `wrap` is a command
/// (and its arguments) that pmvm runs under, or empty.
fn readline_probe(wrap: &[&str]) -> Pmvm {
    let mut args: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
    let bin = if args.is_empty() {
        pmvm()
    } else {
        args.push(pmvm().display().to_string());
        PathBuf::from(args.remove(0))
    };
    args.extend([
        "--kernel".to_string(),
        probe_elf().display().to_string(),
        "--cmdline".into(),
        "console=ttyS0 -- readline readline poweroff".into(),
    ]);
    Pmvm::spawn_with_input(&bin, &args)
}

/// Types two lines at the probe's `readline readline` and checks both arrive whole.
fn both_lines_arrive(mut vm: Pmvm) {
    vm.wait_for("probe: reading", BOOT).unwrap();
    // More than the 16550's 64-byte FIFO at once: pmvm must hold the rest, not drop it.
    let long: String = (0..100)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    vm.send(format!("hello pmvm\n{long}\n").as_bytes()).unwrap();
    vm.wait_for("probe: read hello pmvm", BOOT).unwrap();
    vm.wait_for(&format!("probe: read {long}"), BOOT).unwrap();
    let (status, _) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
}

#[test]
fn stdin_reaches_the_guest_serial_port() {
    if !kvm_or_skip("serial input") {
        return;
    }
    both_lines_arrive(readline_probe(&[]));
}

/// pmvm must tell a pipe on stdin by the descriptor itself: where /proc is not mounted (a
/// chroot, a small container) a check through /proc/self/fd/0 fails and the guest never sees
/// its input. Runs pmvm in a private mount namespace with an empty /proc.
#[test]
fn stdin_reaches_the_guest_without_proc() {
    if !kvm_or_skip("serial input without /proc") {
        return;
    }
    let unshare = ["/usr/bin/unshare", "/bin/unshare"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    // SAFETY: geteuid only reads the process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let Some(unshare) = unshare.filter(|_| root) else {
        let why = "needs root and unshare(1) to hide /proc in a mount namespace";
        assert!(!pmvm_tests::in_ci(), "serial input without /proc: {why}");
        println!("SKIP: serial input without /proc: {why}");
        return;
    };
    let hide_proc = "mount -t tmpfs none /proc && exec \"$@\"";
    both_lines_arrive(readline_probe(&[
        unshare, "--mount", "sh", "-c", hide_proc, "sh",
    ]));
}

#[test]
fn serial_can_go_to_a_file() {
    if !kvm_or_skip("serial file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut vm = probe(
        "mark TO-FILE poweroff",
        &["--serial", &format!("file={}", log.display())],
    );
    let (status, _) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("probe: MARK TO-FILE"), "{text}");
    assert!(vm.lines().iter().all(|l| !l.contains("TO-FILE")));
}

#[test]
fn unknown_word_is_reported_and_powers_off() {
    if !kvm_or_skip("unknown word") {
        return;
    }
    let mut vm = probe("frobnicate mark NEVER", &[]);
    let (status, _) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    let lines = vm.lines();
    assert!(lines
        .iter()
        .any(|l| l == "probe: error unknown word frobnicate"));
    assert!(!lines.iter().any(|l| l.contains("NEVER")));
}

/// The one line pmvm prints when the guest died.
fn fatal_line(stderr: &str) -> &str {
    let mut fatal = stderr.lines().filter(|l| l.starts_with("pmvm: vCPU "));
    let line = fatal.next().unwrap_or_default();
    assert!(
        fatal.next().is_none(),
        "more than one fatal line:\n{stderr}"
    );
    line
}

#[test]
fn triple_fault_exits_one_naming_the_exit() {
    if !kvm_or_skip("triple fault") {
        return;
    }
    let mut vm = probe("triplefault", &[]);
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(1), "{}", vm.transcript());
    let line = stderr.lines().last().unwrap_or_default();
    assert!(
        line.contains("vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)"),
        "{stderr}"
    );
    assert!(line.contains("RIP 0x"), "{stderr}");
    assert!(line.contains("instruction bytes ["), "{stderr}");
}

#[test]
fn emulation_failure_exits_one_with_instruction_bytes() {
    if !kvm_or_skip("emulation failure") {
        return;
    }
    let mut vm = probe("emufail poweroff", &[]);
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    if vm
        .lines()
        .iter()
        .any(|l| l.starts_with("probe: emufail survived"))
    {
        // Hardware KVM runs cmpxchg16b natively: nothing to report, and the guest powers off.
        println!("SKIP: emulation failure: this host's KVM ran cmpxchg16b natively");
        assert_eq!(status.code(), Some(0), "{}", vm.transcript());
        return;
    }
    assert_eq!(status.code(), Some(1), "{}", vm.transcript());
    let line = fatal_line(&stderr);
    assert!(
        line.contains("KVM_EXIT_INTERNAL_ERROR suberror 1 (emulation failure)"),
        "{stderr}"
    );
    // lock cmpxchg16b: f0 48 0f c7 /1 (REX.W may be combined with other REX bits).
    assert!(line.contains("[f0 4"), "{stderr}");
    assert!(line.contains(" 0f c7 "), "{stderr}");
}

#[test]
fn sigterm_stops_cleanly() {
    if !kvm_or_skip("sigterm") {
        return;
    }
    let mut vm = probe("mark READY wait", &[]);
    vm.wait_for("probe: waiting", BOOT).unwrap();
    vm.signal(libc::SIGTERM);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sigterm_writes_back_what_the_guest_left_dirty() {
    if !kvm_or_skip("sigterm writeback") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("pmem0.img");
    let pmem = format!("path={},size=2M", img.display());
    let mut vm = probe("write 0 0x3000 0x1000 0x5a wait", &["--pmem", &pmem]);
    vm.wait_for("probe: waiting", BOOT).unwrap();
    vm.signal(libc::SIGTERM);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    // No guest flush, one host flush of the one page the guest wrote.
    assert!(
        stderr.contains("pmem0: 0 flushes (0 empty) + 1 host flushes, 1 pages in 1 runs"),
        "{stderr}"
    );
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[0x3000..0x4000].iter().all(|&b| b == 0x5a));
}

#[test]
fn sighup_is_ignored() {
    if !kvm_or_skip("sighup") {
        return;
    }
    let mut vm = probe("wait", &[]);
    vm.wait_for("probe: waiting", BOOT).unwrap();
    vm.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        vm.wait_exit(Duration::from_millis(10)).is_err(),
        "SIGHUP stopped pmvm"
    );
    vm.signal(libc::SIGINT);
    let (status, _) = vm.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Runs pmvm to completion with `args`; it must fail with one line containing `expect`.
fn expect_error(args: &[&str], expect: &str) {
    let mut vm = Pmvm::spawn(&pmvm(), args);
    let (status, stderr) = vm.wait_exit(Duration::from_secs(30)).unwrap();
    assert_ne!(status.code(), Some(0), "{args:?} succeeded");
    assert!(
        status.code().is_some(),
        "{args:?} died of a signal: {stderr}"
    );
    assert!(
        stderr.contains(expect),
        "{args:?}: expected {expect:?} in stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
    // clap's own usage errors add a usage hint; pmvm's errors are exactly one line.
    if stderr.starts_with("pmvm: ") {
        assert_eq!(lines, 1, "{args:?}: more than one line:\n{stderr}");
    }
}

#[test]
fn bad_command_lines_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"this is no kernel").unwrap();
    let probe = probe_elf();
    let probe = probe.to_str().unwrap();
    let missing = dir.path().join("missing").display().to_string();
    let junk = junk.to_str().unwrap();
    let a_file = junk;
    let d = dir.path().to_str().unwrap();

    expect_error(&["--kernel", &missing], "--kernel");
    expect_error(&["--kernel", &missing], "No such file");
    expect_error(&["--kernel", junk], "not a Linux bzImage or ELF kernel");
    expect_error(&["--kernel", d], "--kernel");
    expect_error(&["--kernel", probe, "--memory", "0"], "at least 64M");
    expect_error(&["--kernel", probe, "--memory", "63M"], "at least 64M");
    expect_error(
        &["--kernel", probe, "--memory", "lots"],
        "--memory \"lots\": size \"lots\"",
    );
    expect_error(
        &["--kernel", probe, "--memory", "64T"],
        "exceeds the host's RAM",
    );
    expect_error(&["--kernel", probe, "--cpus", "0"], "at least one vCPU");
    expect_error(&["--kernel", probe, "--cpus", "300"], "at most 254 vCPUs");
    expect_error(
        &["--kernel", probe, "--serial", "tcp:1"],
        "expected `stdio` or `file=PATH`",
    );
    expect_error(
        &["--kernel", probe, "--kvm-device", &missing],
        "no such device",
    );
    expect_error(&["--dump-acpi", a_file], "not a directory");
    expect_error(
        &["--dump-acpi", &format!("{a_file}/acpi")],
        "cannot create the directory",
    );
    expect_error(&["--kernel", probe, "--initrd", &missing], "--initrd");
}

#[test]
fn kvm_permission_denied_is_explained() {
    if !kvm_or_skip("kvm permission") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/setpriv").exists() {
        println!("SKIP: kvm permission: needs root and setpriv to drop to an unprivileged user");
        return;
    }
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o006 != 0 {
        println!("SKIP: kvm permission: /dev/kvm is open to everyone here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("probe.elf");
    std::fs::copy(probe_elf(), &kernel).unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bin = dir.path().join("pmvm");
    std::fs::copy(pmvm(), &bin).unwrap();
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--kernel")
        .arg(&kernel)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert!(stderr.contains("kvm"), "{stderr}");
}

#[test]
fn bad_api_socket_stops_pmvm_before_the_guest_runs() {
    if !kvm_or_skip("bad api socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("no-such-dir/pmvm.sock");
    let mut vm = probe("mark RAN poweroff", &["--api-sock", sock.to_str().unwrap()]);
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(1), "{}", vm.transcript());
    assert!(stderr.starts_with("pmvm: --api-sock"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(vm.lines().is_empty(), "the guest ran: {}", vm.transcript());
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    if !kvm_or_skip("initrd size") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.cpio");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(100 << 20).unwrap();
    let probe = probe_elf();
    expect_error(
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--memory",
            "64M",
            "--initrd",
            big.to_str().unwrap(),
        ],
        "raise --memory",
    );
}

/// Runs `pmvm ARGS --dump-acpi DIR`, which must succeed.
fn dump_acpi(args: &[String], dir: &Path) {
    let out = std::process::Command::new(pmvm())
        .args(args)
        .arg("--dump-acpi")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--dump-acpi` with `--pmem` describes the device (its size shapes the NFIT) but runs no
/// guest, so a backing file it had to create to know that is gone afterwards; an existing one
/// is left as it was.
#[test]
fn dump_acpi_with_pmem_leaves_no_created_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (new, old) = (dir.path().join("new.img"), dir.path().join("old.img"));
    std::fs::write(&old, vec![7u8; 2 << 20]).unwrap();
    dump_acpi(
        &[
            "--pmem".into(),
            format!("path={},size=4M", new.display()),
            "--pmem".into(),
            format!("path={}", old.display()),
        ],
        dir.path(),
    );
    let nfit = std::fs::read(dir.path().join("NFIT.dat")).expect("an NFIT with two devices");
    assert_eq!(&nfit[..4], b"NFIT");
    assert!(!new.exists(), "--dump-acpi left {} behind", new.display());
    assert_eq!(std::fs::read(&old).unwrap(), vec![7u8; 2 << 20]);
}

/// A directory that does not exist yet is made, with its parents, as `mkdir -p` would.
#[test]
fn dump_acpi_creates_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("new").join("acpi");
    dump_acpi(&[], &out);
    assert!(out.is_dir(), "{} was not created", out.display());
    let dsdt = std::fs::read(out.join("DSDT.dat")).expect("the tables are in it");
    assert_eq!(&dsdt[..4], b"DSDT");
}

#[test]
fn dump_acpi_writes_every_table() {
    let dir = tempfile::tempdir().unwrap();
    dump_acpi(&["--cpus".into(), "3".into()], dir.path());
    for sig in ["RSDP", "XSDT", "FACP", "APIC", "DSDT"] {
        let f = dir.path().join(format!("{sig}.dat"));
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let sum = bytes
            .iter()
            .take(if sig == "RSDP" { 20 } else { bytes.len() })
            .fold(0u8, |a, b| a.wrapping_add(*b));
        assert_eq!(sum, 0, "{sig} checksum");
        if sig != "RSDP" {
            assert_eq!(&bytes[..4], sig.as_bytes());
        }
    }
}
