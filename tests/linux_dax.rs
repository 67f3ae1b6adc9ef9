//! The minimal Linux kernel (guest-images/build-kernel.sh) boots on pmvm from an NVDIMM that
//! `pmvm pmem format` laid out as an fsdax namespace holding ext4, and mounts it as a DAX root.
//!
//! On the serial console, in order: the ACPI table list with the NFIT, the nfit driver bound,
//! the namespace probed, the fsdax pfn device found, pmem0 attached through it, ext4 mounted as
//! the root with `rootflags=dax` (which fails on a device without DAX, as the raw control below
//! shows), and init started. From the host, through the API and cachestat(2): the mount made the
//! guest flush, pmvm wrote the dirtied pages back, and the file's page cache is clean after.
//!
//! Where the host emulates guest kernel code (nested PVM, see docs/linux-guest.md) user space
//! cannot run, so the test ends at "Run /init" and says so with a SKIP line for that stage.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pmvm_tests::{
    api_get_json, api_request, cachestat, in_ci, kvm_or_skip, page_cache_or_skip, repo_root,
    wait_api, Pmvm,
};

/// The whole boot, banner to init, may take this long on an emulating host shared with
/// another test (measured: about 45 s alone).
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// pmvm options for hosts whose KVM emulates guest kernel code: hide what it cannot run.
const CPU_ARGS: [&str; 4] = [
    "--cpu-vendor",
    "intel",
    "--cpu-features=-cx16,-popcnt,-smap,-fsgsbase",
    "--memory=128M",
];

/// The kernel command line: the CPU profile, the DAX root, and libnvdimm's probe messages
/// (debug level, so `loglevel=8` to see them) switched on. No `panic=1`: when init dies the guest stays up, so the host can
/// still read its statistics.
fn cmdline(extra: &str) -> String {
    format!(
        "console=ttyS0 earlyprintk=serial mitigations=off noxsave \
         clearcpuid=cx16,popcnt,smap,fsgsbase reboot=k pci=off loglevel=8 \
         dyndbg=\"func nvdimm_bus_probe +p; func nd_pfn_probe +p\" {extra}"
    )
}

/// Builds (or finds in the cache) the minimal kernel once per test process.
fn kernel() -> &'static Result<PathBuf, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let script = repo_root().join("guest-images/build-kernel.sh");
        let start = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in stderr.lines() {
            println!("{line}");
        }
        if !out.status.success() {
            let last = stderr.lines().last().unwrap_or("no message").to_string();
            return Err(format!("build-kernel.sh failed: {last}"));
        }
        let path = PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .trim(),
        );
        if !path.is_file() {
            return Err(format!("build-kernel.sh printed {path:?}, not a file"));
        }
        println!(
            "kernel ready after {:.1} s: {}",
            start.elapsed().as_secs_f64(),
            path.display()
        );
        Ok(path)
    })
}

/// The kernel, or None after printing why the test cannot run (a failure under CI).
fn kernel_or_skip(test: &str) -> Option<PathBuf> {
    match kernel() {
        Ok(p) => Some(p.clone()),
        Err(why) if in_ci() => panic!("{test}: the minimal kernel is required under CI: {why}"),
        Err(why) => {
            println!("SKIP: {test}: kernel build: {why}");
            None
        }
    }
}

/// A static x86-64 ELF that writes one line to the console and then waits in pause(2)
/// forever, so the guest stays up for the host to inspect. Hand-assembled: no compiler needed.
fn init_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const CODE_OFF: u64 = 64 + 56;
    let msg = b"pmvm-init: user space runs\n";
    let mut code = vec![
        0xb8,
        1,
        0,
        0,
        0, // mov eax, 1 (write)
        0xbf,
        1,
        0,
        0,
        0, // mov edi, 1 (stdout: /dev/console)
        0x48,
        0x8d,
        0x35,
        16,
        0,
        0,
        0, // lea rsi, [rip + 16] (msg)
        0xba,
        msg.len() as u8,
        0,
        0,
        0, // mov edx, len
        0x0f,
        0x05, // syscall
        0xb8,
        34,
        0,
        0,
        0, // again: mov eax, 34 (pause)
        0x0f,
        0x05, // syscall
        0xeb,
        0xf7, // jmp again
    ];
    code.extend_from_slice(msg);
    let total = CODE_OFF + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + CODE_OFF).to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, BASE, BASE, total, total, 0x1000u64] {
        elf.extend_from_slice(&v.to_le_bytes()); // offset vaddr paddr filesz memsz align
    }
    assert_eq!(elf.len() as u64, CODE_OFF);
    elf.extend_from_slice(&code);
    elf
}

/// A root directory for the guest: /init and an empty /dev for devtmpfs.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("dev")).unwrap();
    let init = root.join("init");
    fs::write(&init, init_elf()).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    root
}

fn pmem_format(img: &Path, mode: &str, root: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_pmvm"))
        .args(["pmem", "format"])
        .arg(img)
        .args(["--size", "64M", "--mode", mode, "--ext4-from"])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pmvm pmem format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
}

fn mkfs_or_skip(test: &str) -> bool {
    if ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: mkfs.ext4 (e2fsprogs) is required under CI"
    );
    println!("SKIP: {test}: mkfs.ext4 not installed (e2fsprogs)");
    false
}

/// The kernel's own timestamp of a console line, `[   32.110842] ...`.
fn kernel_time(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split(']').next()?.trim().parse().ok()
}

/// Waits for each console line in order, printing the wall time to each; on a timeout, fails
/// naming the last milestone reached.
struct Milestones<'a> {
    vm: &'a Pmvm,
    /// Which boot, for the printed lines.
    tag: &'static str,
    start: Instant,
    deadline: Instant,
    next_line: usize,
    reached: Vec<(&'static str, f64)>,
}

impl<'a> Milestones<'a> {
    fn new(vm: &'a Pmvm, tag: &'static str, start: Instant) -> Self {
        Milestones {
            vm,
            tag,
            start,
            deadline: start + BOOT_TIMEOUT,
            next_line: 0,
            reached: Vec::new(),
        }
    }

    fn reach(&mut self, name: &'static str, needle: &str) -> String {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.vm.wait_for_from(self.next_line, needle, left) {
            Ok((i, line)) => {
                let wall = self.start.elapsed().as_secs_f64();
                let kt = kernel_time(&line)
                    .map(|t| format!("kernel {t:8.3} s"))
                    .unwrap_or_default();
                println!(
                    "milestone [{}] {name:<34} wall {wall:7.2} s  {kt}",
                    self.tag
                );
                self.next_line = i + 1;
                self.reached.push((name, wall));
                line
            }
            Err(e) => {
                let last = self
                    .reached
                    .last()
                    .map(|(n, t)| format!("{n:?} after {t:.1} s"))
                    .unwrap_or_else(|| "none".into());
                panic!(
                    "milestone {name:?} ({needle:?}) not reached within {:?}; last milestone \
                     reached: {last}\n{e}",
                    BOOT_TIMEOUT
                );
            }
        }
    }
}

/// Waits for our init's line (Ok) or for the kernel to report init's death (Err, that line).
fn user_space_outcome(vm: &Pmvm, from: usize, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        for line in vm.lines().into_iter().skip(from) {
            if line.contains("pmvm-init: user space runs") {
                return Ok(line);
            }
            if [
                "segfault",
                "Kernel panic",
                "Requested init",
                "Failed to execute",
            ]
            .iter()
            .any(|w| line.contains(w))
            {
                return Err(line);
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no word from init within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pmem_stats(sock: &Path) -> serde_json::Value {
    let doc = api_get_json(sock, "/v1/pmem");
    doc["devices"][0]["stats"].clone()
}

fn stat(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Polls the device's statistics until no flush or writeback happened for `quiet`.
fn settled_stats(sock: &Path, quiet: Duration, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    let mut last = pmem_stats(sock);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = pmem_stats(sock);
        let key = |v: &serde_json::Value| (stat(v, "flushes"), stat(v, "writebacks"));
        if key(&now) != key(&last) {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet || Instant::now() >= deadline {
            return now;
        }
    }
}

/// Boots `vmlinux` with the CI CPU profile, one NVDIMM and `cmd`; with `sock`, also the
/// control socket, waited for until it answers.
fn boot(vmlinux: &Path, pmem: &str, sock: Option<&Path>, cmd: &str) -> Pmvm {
    let mut args: Vec<&str> = vec!["--kernel", vmlinux.to_str().unwrap()];
    args.extend(CPU_ARGS);
    args.extend(["--pmem", pmem, "--cmdline", cmd]);
    if let Some(sock) = sock {
        args.extend(["--api-sock", sock.to_str().unwrap()]);
    }
    let vm = Pmvm::spawn(&PathBuf::from(env!("CARGO_BIN_EXE_pmvm")), &args);
    if let Some(sock) = sock {
        wait_api(sock, Duration::from_secs(30)).unwrap();
    }
    vm
}

#[test]
fn minimal_kernel_mounts_an_fsdax_ext4_root_and_its_flushes_reach_the_file() {
    let test = "linux dax root";
    if !kvm_or_skip(test) || !mkfs_or_skip(test) {
        return;
    }
    let Some(vmlinux) = kernel_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip(test, dir.path()) {
        return;
    }
    let root = rootfs(dir.path());
    let img = dir.path().join("root.img");
    pmem_format(&img, "fsdax", &root);
    let sock = dir.path().join("api.sock");

    let start = Instant::now();
    let pmem = format!("path={}", img.display());
    let cmd = cmdline("root=/dev/pmem0 rootflags=dax rw init=/init");
    let mut vm = boot(&vmlinux, &pmem, Some(&sock), &cmd);

    let mut m = Milestones::new(&vm, "fsdax", start);
    m.reach("kernel banner", "Linux version 6.1");
    m.reach("ACPI table list: NFIT", "ACPI: NFIT 0x");
    m.reach("nfit driver bound to ACPI0012", "nfit ACPI0012:00: ");
    m.reach("region0 probed", "END: nd_region.probe(region0) = 0");
    m.reach(
        "nd_pmem probes namespace0.0",
        "START: nd_pmem.probe(namespace0.0)",
    );
    // The info block was accepted: a pfn device (after the idle seed pfn0.0) claims the
    // namespace, and nd_pmem attaches pmem0 through it.
    let found = m.reach("fsdax pfn device found", "nd_pmem namespace0.0: pfn: pfn0.");
    let pfn = found
        .rsplit("pfn: ")
        .next()
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    m.reach(
        "pmem0 attached in fsdax mode",
        &format!("END: nd_pmem.probe({pfn}) = 0"),
    );
    let before_mount = pmem_stats(&sock);
    m.reach(
        "ext4 mounted on pmem0",
        "EXT4-fs (pmem0): mounted filesystem",
    );
    m.reach(
        "root mounted (rootflags=dax)",
        "VFS: Mounted root (ext4 filesystem)",
    );
    m.reach("init started", "Run /init as init process");

    let lines = vm.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("DAX unsupported") || l.contains("dax disabled")),
        "the kernel refused DAX\n{}",
        vm.transcript()
    );

    // Host view: the mount flushed, pmvm wrote back what the guest dirtied, nothing is left
    // dirty in the host page cache once the flushes have settled.
    let after = settled_stats(&sock, Duration::from_secs(3), Duration::from_secs(60));
    println!("pmem0 stats before the mount: {before_mount}");
    println!("pmem0 stats after the mount:  {after}");
    assert!(
        stat(&after, "flushes") > stat(&before_mount, "flushes"),
        "the mount issued no flush: before {before_mount}, after {after}"
    );
    assert!(
        stat(&after, "pages_written") > 0,
        "no page written back: {after}"
    );
    assert_eq!(stat(&after, "errors"), 0, "{after}");
    let cs = cachestat(&img, 0, 0).unwrap();
    let recheck = pmem_stats(&sock);
    println!("cachestat of the backing file: {cs:?}");
    assert!(
        cs.nr_cache > 0,
        "the guest's pages are not in the host page cache: {cs:?}"
    );
    if stat(&recheck, "flushes") == stat(&after, "flushes") {
        assert_eq!(
            cs.nr_dirty, 0,
            "pages the guest flushed are still dirty in the host page cache: {cs:?}, {recheck}"
        );
    } else {
        println!("the guest flushed again while cachestat ran; the clean check is not conclusive");
    }

    // User space: runs on hardware KVM (our init prints a line), dies on an emulating host.
    match user_space_outcome(&vm, m.next_line, Duration::from_secs(60)) {
        Ok(_) => println!(
            "milestone [fsdax] {:<34} wall {:7.2} s",
            "user space ran /init",
            start.elapsed().as_secs_f64()
        ),
        Err(why) => println!(
            "SKIP: {test}: user space: reached \"Run /init\" but init did not run here: {why}"
        ),
    }

    let (status, body) = api_request(&sock, "PUT", "/v1/vm/shutdown").unwrap();
    assert_eq!(status, 204, "shutdown: {body}");
    let (exit, stderr) = vm.wait_exit(Duration::from_secs(60)).unwrap();
    println!(
        "pmvm exited {exit:?}: {}",
        stderr
            .lines()
            .filter(|l| l.contains("pmem0:"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// The control: the same root on a raw namespace (no info block) cannot be mounted with
/// `rootflags=dax`, so the DAX mount above is evidence of DAX and not of a lenient kernel.
#[test]
fn a_raw_namespace_refuses_the_dax_root() {
    let test = "linux dax control (raw namespace)";
    if !kvm_or_skip(test) || !mkfs_or_skip(test) {
        return;
    }
    let Some(vmlinux) = kernel_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("raw.img");
    pmem_format(&img, "raw", &root);

    let start = Instant::now();
    let pmem = format!("path={}", img.display());
    let cmd = cmdline("root=/dev/pmem0 rootflags=dax rw init=/init");
    let vm = boot(&vmlinux, &pmem, None, &cmd);
    let mut m = Milestones::new(&vm, "raw control", start);
    m.reach(
        "nd_pmem probes namespace0.0",
        "START: nd_pmem.probe(namespace0.0)",
    );
    m.reach("no pfn device", "nd_pmem namespace0.0: pfn: <none>");
    m.reach("pmem0 attached raw", "END: nd_pmem.probe(namespace0.0) = 0");
    m.reach(
        "ext4 refuses DAX",
        "EXT4-fs (pmem0): DAX unsupported by block device",
    );
    let lines = vm.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("VFS: Mounted root") || l.contains("nd_pmem.probe(pfn0.1) = 0")),
        "a raw namespace was used as fsdax\n{}",
        vm.transcript()
    );
}

/// The strict model (`persist=flush`): the file changes only at the guest's flushes, so a power
/// cut right after the mount leaves it as of the mount's last flush. A second boot must mount it
/// again with a consistent ext4 journal.
#[test]
fn strict_model_power_cut_after_the_mount_leaves_a_root_that_mounts_again() {
    let test = "linux dax power cut";
    if !kvm_or_skip(test) || !mkfs_or_skip(test) {
        return;
    }
    let Some(vmlinux) = kernel_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("root.img");
    pmem_format(&img, "fsdax", &root);
    let pmem = format!("path={},persist=flush", img.display());
    let cmd = cmdline("root=/dev/pmem0 rootflags=dax rw init=/init");

    for (n, tag) in [(1, "power cut, boot 1"), (2, "power cut, boot 2")] {
        let sock = dir.path().join(format!("api{n}.sock"));
        let start = Instant::now();
        let mut vm = boot(&vmlinux, &pmem, Some(&sock), &cmd);
        let mut m = Milestones::new(&vm, tag, start);
        m.reach(
            "ext4 mounted on pmem0",
            "EXT4-fs (pmem0): mounted filesystem",
        );
        m.reach(
            "root mounted (rootflags=dax)",
            "VFS: Mounted root (ext4 filesystem)",
        );
        let problems: Vec<String> = vm
            .lines()
            .into_iter()
            .filter(|l| {
                l.contains("EXT4-fs error")
                    || l.contains("EXT4-fs warning")
                    || l.contains("JBD2: Invalid")
                    || l.contains("corrupt")
            })
            .collect();
        assert!(
            problems.is_empty(),
            "boot {n}: ext4 complained: {problems:#?}\n{}",
            vm.transcript()
        );
        if n == 1 {
            // Right after the mount: whatever the guest has not flushed is lost.
            let (status, body) = api_request(&sock, "PUT", "/v1/vm/power-cut").unwrap();
            assert_eq!(status, 204, "power cut: {body}");
            let (exit, stderr) = vm.wait_exit(Duration::from_secs(60)).unwrap();
            assert_eq!(exit.code(), Some(3), "a power cut exits 3: {stderr}");
        } else {
            m.reach("init started", "Run /init as init process");
            let (status, body) = api_request(&sock, "PUT", "/v1/vm/shutdown").unwrap();
            assert_eq!(status, 204, "shutdown: {body}");
            vm.wait_exit(Duration::from_secs(60)).unwrap();
        }
    }
}
