//! The minimal Linux kernel (guest-images/build-kernel.sh) boots on pmvm from an NVDIMM that
//! `pmvm pmem format` laid out as an fsdax namespace holding ext4, and mounts it as a DAX root.
//!
//! On the serial console, in order: the ACPI table list with the NFIT, the nfit driver bound,
//! the namespace probed, the fsdax pfn device found, pmem0 attached through it, ext4 mounted as
//! the root with `rootflags=dax` (which fails on a device without DAX, as the raw control below
//! shows), and init started. From the host, through the API and cachestat(2): the mount made the
//! guest flush, pmvm wrote the dirtied pages back, and the file's page cache is clean after.
//!
//! Then user space: /init (guest-images/linux-init/pmvm-init.c) writes /proof.bin in the DAX
//! root, fsyncs it and its directory and powers the guest off; after pmvm exits, the host finds
//! the file's blocks with debugfs and checks its bytes in the backing file at the data offset.
//! On a host whose KVM emulates guest kernel code (nested PVM) this needs the minimal kernel's
//! system-call patch and the CPU profile of guest-images/suite-emulated.conf.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pmvm_tests::linux::{
    check_proof_in_backing_file, emulating_host, init_elf, minimal_kernel_or_skip, wait_proof,
    EmulatedProfile, PROOF_BYTES,
};
use pmvm_tests::{
    cachestat, in_ci, kvm_or_skip, page_cache_or_skip,
    types::{PmemStats, Tracking},
    wait_api, Client, Pmvm,
};

/// The whole boot, banner to init, may take this long on an emulating host shared with
/// another test (measured: about 45 s alone).
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// The kernel command line: the DAX root, init's mode, and libnvdimm's probe messages (debug
/// level, so `loglevel=8` to see them) switched on; on an emulating host, its CPU profile. No
/// `panic=1`: when init dies the guest stays up, so the host can still read its statistics.
fn cmdline(init_mode: &str, extra: &str) -> String {
    let profile = if emulating_host() {
        EmulatedProfile::load().cmdline
    } else {
        String::new()
    };
    format!(
        "console=ttyS0 earlyprintk=serial {profile} reboot=k pci=off loglevel=8 \
         dyndbg=\"func nvdimm_bus_probe +p; func nd_pfn_probe +p\" \
         PMVM_INIT={init_mode} PMVM_PROOF_BYTES={PROOF_BYTES} {extra}"
    )
}

/// A root directory for the guest: /init and an empty /dev for devtmpfs.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("dev")).unwrap();
    let init = root.join("init");
    fs::copy(init_elf(), &init).unwrap();
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    root
}

/// Formats `img` with an ext4 holding `root`; returns where the filesystem starts in the file.
fn pmem_format(img: &Path, mode: &str, root: &Path) -> u64 {
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
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!("{summary}");
    let at = summary
        .rsplit(" at 0x")
        .next()
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no filesystem offset in {summary:?}"));
    at
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

fn pmem_stats(sock: &Path) -> PmemStats {
    Client::new(sock).pmem("pmem0").unwrap().stats
}

/// Polls the device's statistics until no flush or writeback happened for `quiet`.
fn settled_stats(sock: &Path, quiet: Duration, timeout: Duration) -> PmemStats {
    let deadline = Instant::now() + timeout;
    let mut last = pmem_stats(sock);
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = pmem_stats(sock);
        let key = |v: &PmemStats| (v.flushes, v.writebacks);
        if key(&now) != key(&last) {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet || Instant::now() >= deadline {
            return now;
        }
    }
}

/// Boots `vmlinux` (with the emulating host's CPU profile there), one NVDIMM and `cmd`; with `sock`, also the
/// control socket, waited for until it answers.
fn boot(vmlinux: &Path, pmem: &str, sock: Option<&Path>, cmd: &str) -> Pmvm {
    let mut args: Vec<String> = vec!["--kernel".into(), vmlinux.display().to_string()];
    if emulating_host() {
        args.extend(EmulatedProfile::load().pmvm_args);
    }
    args.extend(["--memory=128M", "--pmem", pmem, "--cmdline", cmd].map(String::from));
    if let Some(sock) = sock {
        args.extend(["--api-sock".into(), sock.display().to_string()]);
    }
    // With input: /init started with PMVM_WAIT_HOST=1 waits for a line from the host.
    let vm = Pmvm::spawn_with_input(&PathBuf::from(env!("CARGO_BIN_EXE_pmvm")), &args);
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
    let Some(vmlinux) = minimal_kernel_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip(test, dir.path()) {
        return;
    }
    let root = rootfs(dir.path());
    let img = dir.path().join("root.img");
    let fs_offset = pmem_format(&img, "fsdax", &root);
    let sock = dir.path().join("api.sock");

    let start = Instant::now();
    let pmem = format!("path={}", img.display());
    // /init waits for the host's checks below before it writes its proof and powers off.
    let cmd = cmdline(
        "dax-fsync",
        "root=/dev/pmem0 rootflags=dax rw init=/init PMVM_WAIT_HOST=1",
    );
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
    println!("pmem0 stats before the mount: {before_mount:?}");
    println!("pmem0 stats after the mount:  {after:?}");
    assert!(
        after.flushes > before_mount.flushes,
        "the mount issued no flush: before {before_mount:?}, after {after:?}"
    );
    assert!(after.pages_written > 0, "no page written back: {after:?}");
    assert_eq!(after.errors, 0, "{after:?}");
    // Default tracking stays exact under a real kernel: a flush writes what the guest dirtied,
    // not the device (an overflowed dirty ring would write every page on every flush).
    let tracking = Client::new(&sock).pmem("pmem0").unwrap().dirty_tracking;
    let device_pages = std::fs::metadata(&img).unwrap().len() / 4096;
    let per_flush = after.pages_written / after.writebacks.max(1);
    println!(
        "tracking {tracking}: {per_flush} pages per writeback of a {device_pages}-page device"
    );
    assert_ne!(tracking, Tracking::RingOverflowed, "{after:?}");
    assert!(
        per_flush * 16 < device_pages,
        "{per_flush} pages per writeback of a {device_pages}-page device: {after:?}"
    );
    let cs = cachestat(&img, 0, 0).unwrap();
    let recheck = pmem_stats(&sock);
    println!("cachestat of the backing file: {cs:?}");
    assert!(
        cs.nr_cache > 0,
        "the guest's pages are not in the host page cache: {cs:?}"
    );
    if recheck.flushes == after.flushes {
        assert_eq!(
            cs.nr_dirty, 0,
            "pages the guest flushed are still dirty in the host page cache: {cs:?}, {recheck:?}"
        );
    } else {
        println!("the guest flushed again while cachestat ran; the clean check is not conclusive");
    }

    // User space: /init writes and fsyncs its proof in the DAX root and powers off.
    m.reach(
        "/init waits for the host",
        "pmvm-init: waiting for the host",
    );
    let from = m.next_line;
    vm.send(b"go\n").unwrap();
    wait_proof(&vm, from);
    println!(
        "milestone [fsdax] {:<34} wall {:7.2} s",
        "/init wrote and fsynced its proof",
        start.elapsed().as_secs_f64()
    );
    let (exit, stderr) = vm.wait_exit(Duration::from_secs(120)).unwrap();
    assert_eq!(exit.code(), Some(0), "init powered off: {stderr}");
    assert!(!stderr.contains("overflowed"), "{stderr}");
    check_proof_in_backing_file(&img, fs_offset, "/proof.bin");
}

/// The control: the same root on a raw namespace (no info block) cannot be mounted with
/// `rootflags=dax`, so the DAX mount above is evidence of DAX and not of a lenient kernel.
#[test]
fn a_raw_namespace_refuses_the_dax_root() {
    let test = "linux dax control (raw namespace)";
    if !kvm_or_skip(test) || !mkfs_or_skip(test) {
        return;
    }
    let Some(vmlinux) = minimal_kernel_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("raw.img");
    pmem_format(&img, "raw", &root);

    let start = Instant::now();
    let pmem = format!("path={}", img.display());
    let cmd = cmdline("pause", "root=/dev/pmem0 rootflags=dax rw init=/init");
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
    let Some(vmlinux) = minimal_kernel_or_skip(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let img = dir.path().join("root.img");
    let fs_offset = pmem_format(&img, "fsdax", &root);
    let pmem = format!("path={},persist=flush", img.display());

    // Boot 1's init only waits, so the proof of boot 2 cannot come from boot 1.
    for (n, tag, mode) in [
        (1, "power cut, boot 1", "pause"),
        (2, "power cut, boot 2", "dax-fsync"),
    ] {
        let sock = dir.path().join(format!("api{n}.sock"));
        let start = Instant::now();
        let cmd = cmdline(mode, "root=/dev/pmem0 rootflags=dax rw init=/init");
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
            Client::new(&sock).vm_action("power-cut").unwrap();
            let (exit, stderr) = vm.wait_exit(Duration::from_secs(60)).unwrap();
            assert_eq!(exit.code(), Some(3), "a power cut exits 3: {stderr}");
        } else {
            // The strict model writes nothing back when the guest powers off, so the proof
            // can reach the file only through the flushes of init's fsync.
            m.reach("init started", "Run /init as init process");
            wait_proof(&vm, m.next_line);
            let (exit, stderr) = vm.wait_exit(Duration::from_secs(120)).unwrap();
            assert_eq!(exit.code(), Some(0), "init powered off: {stderr}");
            check_proof_in_backing_file(&img, fs_offset, "/proof.bin");
        }
    }
}
