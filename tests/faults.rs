//! Fault injection on the flush path, with the probe guest on /dev/kvm: a host fault under a
//! guest flush must never let that flush complete. Each test checks that the guest did not get
//! past its flush while the fault lasted, that the API reports `io-error` with the device and
//! errno, and that `pmvm resume` after the fault clears completes the flush with the data in
//! the file. A frozen file system (`fsfreeze`) must hold the flush without silencing the API
//! or hanging shutdown, and a second pmvm on a path whose file was replaced is refused by the
//! path lock. Full file systems are small loop-mounted ext4 images and I/O errors come from
//! `tests/faultfs` (a FUSE passthrough that fails on command); both need root, and every
//! mount is undone when the test ends, also when it fails. A failing `sync_file_range`, which
//! no file system here returns on command, is injected by strace.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pmvm_tests::types::{IoFault, VmInfo, VmState};
use pmvm_tests::{
    in_ci, kvm_or_skip, page_cache_or_skip, probe_pmem_args, read_direct, repo_root, wait_api,
    Client, Pmvm,
};

const BOOT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
/// How long a guest that must stay stopped is watched for getting past its flush.
const HELD: Duration = Duration::from_millis(1500);
/// pmvm's exit status when an `on-error=exit` device's flush failed.
const IO_ERROR_STATUS: i32 = 4;

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// Boots the probe with WORDS, one --pmem and a control socket; stdin feeds `readline`.
fn boot(dir: &Path, words: &str, pmem: &str) -> (Pmvm, PathBuf) {
    let sock = dir.join("api.sock");
    let vm = Pmvm::spawn_with_input(&pmvm(), &probe_pmem_args(words, pmem, Some(&sock)));
    if let Err(e) = wait_api(&sock, BOOT) {
        panic!("{e}\n{}", vm.transcript());
    }
    (vm, sock)
}

/// Runs `pmvm ARGS`; returns whether it succeeded and its stderr.
fn client(args: &[&str]) -> (bool, String) {
    let out = Command::new(pmvm()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `GET /v1/vm`, which must answer.
fn vm_info(sock: &Path) -> VmInfo {
    Client::new(sock)
        .vm()
        .unwrap_or_else(|e| panic!("GET /v1/vm: {e}"))
}

/// Waits until `GET /v1/vm` says `io-error`; returns the fault it reports.
fn wait_io_error(vm: &Pmvm, sock: &Path, timeout: Duration) -> IoFault {
    let deadline = Instant::now() + timeout;
    loop {
        let doc = vm_info(sock);
        if doc.state == VmState::IoError {
            let why = format!("io-error without a fault: {doc:?}");
            return doc.io_error.expect(&why);
        }
        assert!(
            Instant::now() < deadline,
            "no io-error within {timeout:?}: {doc:?}\n{}",
            vm.transcript()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts the guest never printed `line` (its flush did not complete), watching a while.
fn assert_held(vm: &Pmvm, line: &str) {
    std::thread::sleep(HELD);
    assert!(
        !vm.lines().iter().any(|l| l.contains(line)),
        "the guest got past its flush during the fault\n{}",
        vm.transcript()
    );
}

/// `pmvm resume` succeeds and the guest then completes its flush.
fn resume_and_complete(vm: &Pmvm, sock: &Path, line: &str) {
    let (ok, err) = client(&["resume", "--api-sock", sock.to_str().unwrap()]);
    assert!(ok, "resume failed: {err}\n{}", vm.transcript());
    if let Err(e) = vm.wait_for(line, BOOT) {
        panic!("{e}");
    }
    assert_eq!(vm_info(sock).state, VmState::Running);
    // pmvm says so before it answers the resume; the test's reader may see it a moment later.
    wait_stderr(vm, "io-error cleared", BOOT);
}

/// Whether the test may mount file systems; under CI it must.
fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!in_ci(), "{test}: CI must run the fault tests as root");
    println!("SKIP: {test}: mounting file systems needs root");
    false
}

/// A mounted file system, unmounted (and its FUSE server stopped) on drop.
struct Mount {
    dir: PathBuf,
    server: Option<Child>,
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Lazy, so a file pmvm still holds cannot keep the mount alive past the test.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        if let Some(server) = &mut self.server {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh ext4 of `mib` MiB, loop-mounted at `dir/mnt`.
fn small_ext4(dir: &Path, mib: u64) -> Mount {
    let image = dir.join("fs.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&image));
    let mnt = dir.join("mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt));
    Mount {
        dir: mnt,
        server: None,
    }
}

/// Fills the file system of `dir` until `leave` bytes are free; returns the ballast file.
fn fill_until(dir: &Path, leave: u64) -> PathBuf {
    // SAFETY: a zeroed statvfs is valid for statvfs to fill in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    let free = st.f_bavail * st.f_frsize;
    assert!(free > leave, "only {free} bytes free");
    let ballast = dir.join("ballast");
    run(Command::new("fallocate")
        .args(["-l", &(free - leave).to_string()])
        .arg(&ballast));
    run(&mut Command::new("sync"));
    ballast
}

/// The probe on a 16 MiB sparse device in a 32 MiB ext4 with 4 MiB free. Fields drop in
/// order: pmvm stops before the file system is unmounted.
struct FullExt4 {
    vm: Pmvm,
    sock: PathBuf,
    img: PathBuf,
    ballast: PathBuf,
    _fs: Mount,
    _dir: tempfile::TempDir,
}

impl FullExt4 {
    fn boot(words: &str, pmem_extra: &str) -> FullExt4 {
        let dir = tempfile::tempdir().unwrap();
        let fs = small_ext4(dir.path(), 32);
        let ballast = fill_until(&fs.dir, 4 * MIB);
        let img = fs.dir.join("p.img");
        let pmem = format!("path={},size=16M,sparse=on{pmem_extra}", img.display());
        let (vm, sock) = boot(dir.path(), words, &pmem);
        FullExt4 {
            vm,
            sock,
            img,
            ballast,
            _fs: fs,
            _dir: dir,
        }
    }
}

/// `tests/faultfs` over `under`, mounted at `mnt`.
fn faultfs(under: &Path, mnt: &Path) -> Mount {
    let script = repo_root().join("scripts/build-faultfs.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout.lines().last().unwrap().trim().to_string();
    fs::create_dir_all(mnt).unwrap();
    let server = Command::new(bin)
        .arg(under)
        .arg(mnt)
        .arg("-f")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mount = Mount {
        dir: mnt.to_path_buf(),
        server: Some(server),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mounted = || {
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(1) == mnt.to_str())
    };
    while !mounted() {
        assert!(Instant::now() < deadline, "faultfs did not mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    mount
}

/// The first `len` bytes of `path` all hold `byte`.
fn assert_filled(path: &Path, len: u64, byte: u8) {
    let data = bytes_at(path, 0, len);
    assert!(
        data.iter().all(|&b| b == byte),
        "{} lacks the flushed data",
        path.display()
    );
}

fn bytes_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len as usize];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

#[test]
fn a_replaced_backing_file_stops_the_flush_until_it_is_back() {
    if !kvm_or_skip("replaced file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.img");
    let moved = dir.path().join("moved.img");
    let (mut vm, sock) = boot(
        dir.path(),
        "write 0 0 0x1000 0x11 readline flush 0 mark FLUSHED wait",
        &format!("path={},size=2M", img.display()),
    );
    vm.wait_for("probe: reading", BOOT).unwrap();
    fs::rename(&img, &moved).unwrap();
    fs::write(&img, vec![0u8; 2 << 20]).unwrap();
    vm.send(b"go\n").unwrap();
    let fault = wait_io_error(&vm, &sock, BOOT);
    assert_eq!(fault.device, "pmem0", "{fault:?}");
    assert_eq!(fault.errno_name, "ESTALE", "{fault:?}");
    assert!(fault.what.contains("replaced"), "{fault:?}");
    assert_held(&vm, "MARK FLUSHED");
    let dev = Client::new(&sock).pmem("pmem0").unwrap();
    assert_eq!(
        dev.io_error.as_ref().map(|f| f.device.as_str()),
        Some("pmem0"),
        "{dev:?}"
    );
    // One line on stderr names the device and what to do.
    let t = vm.transcript();
    assert_eq!(t.matches("io-error on pmem0").count(), 1, "{t}");
    assert!(t.contains("pmvm resume"), "{t}");
    // The stats and the metrics say so too.
    let stats = Command::new(pmvm())
        .args(["stats", "--api-sock", sock.to_str().unwrap()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&stats.stdout);
    assert!(table.contains("VM io-error"), "{table}");
    let metrics = Client::new(&sock).metrics().unwrap();
    assert!(
        metrics.contains("pmvm_vm_state{state=\"io-error\"} 1"),
        "{metrics}"
    );
    // Still replaced: the retry fails and the guest stays stopped.
    let (ok, err) = client(&["resume", "--api-sock", sock.to_str().unwrap()]);
    assert!(!ok && err.contains("replaced"), "{err}");
    assert_eq!(vm_info(&sock).state, VmState::IoError);
    assert_held(&vm, "MARK FLUSHED");
    fs::rename(&moved, &img).unwrap();
    resume_and_complete(&vm, &sock, "probe: MARK FLUSHED");
    assert_eq!(bytes_at(&img, 0, 4096), vec![0x11; 4096]);
}

#[test]
fn on_error_exit_stops_pmvm_without_acknowledging() {
    if !kvm_or_skip("on-error=exit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.img");
    let (mut vm, _sock) = boot(
        dir.path(),
        "write 0 0 0x1000 0x22 readline flush 0 mark FLUSHED wait",
        &format!("path={},size=2M,on-error=exit", img.display()),
    );
    vm.wait_for("probe: reading", BOOT).unwrap();
    fs::remove_file(&img).unwrap();
    vm.send(b"go\n").unwrap();
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(IO_ERROR_STATUS), "{stderr}");
    assert!(stderr.contains("io-error on pmem0"), "{stderr}");
    assert!(stderr.contains("deleted"), "{stderr}");
    assert!(
        !vm.lines().iter().any(|l| l.contains("MARK FLUSHED")),
        "{}",
        vm.transcript()
    );
}

#[test]
fn enospc_in_a_flush_holds_the_guest_until_space_returns() {
    if !kvm_or_skip("ENOSPC flush") || !root_or_skip("ENOSPC flush") {
        return;
    }
    // persist=flush: the guest's 12 MiB reach the file only at the flush, which cannot fit.
    let full = FullExt4::boot(
        "write 0 0 0xc00000 0xa5 flush 0 mark FLUSHED wait",
        ",persist=flush",
    );
    let (vm, sock, img) = (&full.vm, &full.sock, &full.img);
    let fault = wait_io_error(vm, sock, BOOT);
    assert_eq!(fault.errno_name, "ENOSPC", "{fault:?}");
    assert!(fault.pages_at_stake >= 1024, "{fault:?}");
    assert_held(vm, "MARK FLUSHED");
    fs::remove_file(&full.ballast).unwrap();
    resume_and_complete(vm, sock, "probe: MARK FLUSHED");
    assert_filled(img, 12 * MIB, 0xa5);
}

#[test]
fn enospc_under_a_guest_store_holds_the_guest_until_space_returns() {
    if !kvm_or_skip("ENOSPC store") || !root_or_skip("ENOSPC store") {
        return;
    }
    // persist=adr on a sparse file: the stores themselves need blocks the file system lacks.
    let full = FullExt4::boot(
        "write 0 0 0xc00000 0xa6 mark WRITTEN flush 0 mark FLUSHED wait",
        "",
    );
    let (vm, sock, img) = (&full.vm, &full.sock, &full.img);
    let fault = wait_io_error(vm, sock, BOOT);
    assert_held(vm, "MARK FLUSHED");
    fs::remove_file(&full.ballast).unwrap();
    // Each retry applies what is pending; the guest may need more than one to get through
    // stores that met the full file system before it was freed.
    let deadline = Instant::now() + BOOT;
    while !vm.lines().iter().any(|l| l.contains("MARK FLUSHED")) {
        assert!(Instant::now() < deadline, "{fault:?}\n{}", vm.transcript());
        if vm_info(sock).state == VmState::IoError {
            let (ok, err) = client(&["resume", "--api-sock", sock.to_str().unwrap()]);
            assert!(ok, "resume failed with space free: {err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_filled(img, 12 * MIB, 0xa6);
}

#[test]
fn a_flush_log_on_a_full_file_system_holds_the_guest() {
    if !kvm_or_skip("full flush log") || !root_or_skip("full flush log") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = small_ext4(dir.path(), 16);
    let ballast = fill_until(&fs.dir, 256 * 1024);
    let img = dir.path().join("l.img");
    let log = fs.dir.join("flush.log");
    // The default seccomp filter: the log's error path must not meet SIGSYS.
    let (vm, sock) = boot(
        dir.path(),
        "write 0 0 0x100000 0x3c flush 0 mark FLUSHED wait",
        &format!("path={},size=2M,flush-log={}", img.display(), log.display()),
    );
    let fault = wait_io_error(&vm, &sock, BOOT);
    assert_eq!(fault.errno_name, "ENOSPC", "{fault:?}");
    assert!(fault.what.contains("flush.log"), "{fault:?}");
    assert_held(&vm, "MARK FLUSHED");
    fs::remove_file(&ballast).unwrap();
    resume_and_complete(&vm, &sock, "probe: MARK FLUSHED");
    let out = Command::new(pmvm())
        .args(["log", "list"])
        .arg(&log)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(listing.contains("256"), "the epoch of 256 pages: {listing}");
    drop(vm);
    drop(fs);
}

/// EIO from the file system under a flush: with `.fail-write` the writeback of the guest's
/// pages fails (and Linux then marks them clean), with `.fail-fsync` the fdatasync does.
fn eio_scenario(control: &str) {
    let dir = tempfile::tempdir().unwrap();
    let under = dir.path().join("under");
    fs::create_dir(&under).unwrap();
    fs::write(under.join("e.img"), vec![0u8; 2 << 20]).unwrap();
    let fs = faultfs(&under, &dir.path().join("mnt"));
    let img = fs.dir.join("e.img");
    let (mut vm, sock) = boot(
        dir.path(),
        "write 0 0 0x4000 0x5c readline flush 0 mark FLUSHED wait",
        &format!("path={}", img.display()),
    );
    vm.wait_for("probe: reading", BOOT).unwrap();
    fs::write(under.join(control), b"").unwrap();
    vm.send(b"go\n").unwrap();
    let fault = wait_io_error(&vm, &sock, BOOT);
    assert_eq!(fault.errno_name, "EIO", "{fault:?}");
    assert_held(&vm, "MARK FLUSHED");
    // The fault is still there: the retry fails and the guest stays stopped.
    let (ok, _) = client(&["resume", "--api-sock", sock.to_str().unwrap()]);
    assert!(!ok, "resume succeeded during the fault");
    assert_held(&vm, "MARK FLUSHED");
    fs::remove_file(under.join(control)).unwrap();
    resume_and_complete(&vm, &sock, "probe: MARK FLUSHED");
    // Read below FUSE: the data must be in the real file, not only in a page cache.
    assert_eq!(
        bytes_at(&under.join("e.img"), 0, 0x4000),
        vec![0x5c; 0x4000],
        "{control}"
    );
    drop(vm);
    drop(fs);
}

#[test]
fn eio_on_writeback_is_retried_from_guest_memory() {
    if !kvm_or_skip("EIO write") || !root_or_skip("EIO write") {
        return;
    }
    eio_scenario(".fail-write");
}

#[test]
fn eio_on_fdatasync_holds_the_guest_until_a_retry_succeeds() {
    if !kvm_or_skip("EIO fsync") || !root_or_skip("EIO fsync") {
        return;
    }
    eio_scenario(".fail-fsync");
}

/// Waits until pmvm's stderr contains `needle`; returns the transcript.
fn wait_stderr(vm: &Pmvm, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let t = vm.transcript();
        if t.split("--- stderr ---")
            .nth(1)
            .is_some_and(|e| e.contains(needle))
        {
            return t;
        }
        assert!(Instant::now() < deadline, "no {needle:?} on stderr\n{t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file system frozen with `fsfreeze`, thawed on drop (before its mount is undone).
struct Frozen(PathBuf);

impl Frozen {
    fn freeze(mnt: &Path) -> Frozen {
        run(Command::new("fsfreeze").arg("-f").arg(mnt));
        Frozen(mnt.to_path_buf())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.0).status();
    }
}

/// How long a `GET /v1/vm` may take while a flush is stuck in a frozen file system: the spec
/// says 1 s, and an answer that does not wait for the file system takes milliseconds; the
/// margin is for a busy host, and a blocked API would not answer until the thaw at all.
const ANSWERED: Duration = Duration::from_secs(3);

/// `GET /v1/vm`, timed; fails if it takes longer than [`ANSWERED`].
fn vm_state_answered(vm: &Pmvm, sock: &Path) -> VmInfo {
    let asked = Instant::now();
    let doc = vm_info(sock);
    let took = asked.elapsed();
    assert!(
        took < ANSWERED,
        "GET /v1/vm took {took:?} with a flush blocked\n{}",
        vm.transcript()
    );
    doc
}

/// The probe on a `persist=flush` device in a small ext4 whose flush copy meets a frozen
/// file system. Fields drop in order: thaw, then pmvm, then the unmount.
struct FrozenFlush {
    frozen: Option<Frozen>,
    vm: Pmvm,
    sock: PathBuf,
    img: PathBuf,
    _fs: Mount,
    _dir: tempfile::TempDir,
}

impl FrozenFlush {
    fn boot() -> FrozenFlush {
        let dir = tempfile::tempdir().unwrap();
        let fs = small_ext4(dir.path(), 32);
        let img = fs.dir.join("z.img");
        let (mut vm, sock) = boot(
            dir.path(),
            "write 0 0 0x4000 0x7e readline flush 0 mark FLUSHED wait",
            &format!("path={},size=2M,persist=flush", img.display()),
        );
        vm.wait_for("probe: reading", BOOT).unwrap();
        let frozen = Some(Frozen::freeze(&fs.dir));
        vm.send(b"go\n").unwrap();
        FrozenFlush {
            frozen,
            vm,
            sock,
            img,
            _fs: fs,
            _dir: dir,
        }
    }

    /// Waits until the API reports pmem0's writeback in progress for at least `min`.
    fn wait_blocked(&self, min: Duration) -> VmInfo {
        let deadline = Instant::now() + BOOT;
        loop {
            let doc = vm_state_answered(&self.vm, &self.sock);
            let blocked = doc
                .writebacks_in_progress
                .first()
                .filter(|w| w.running_ms >= min.as_millis() as u64);
            if blocked.is_some() {
                return doc;
            }
            assert!(
                Instant::now() < deadline,
                "no writeback reported in progress: {doc:?}\n{}",
                self.vm.transcript()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_frozen_file_system_holds_the_flush_and_the_api_still_answers() {
    if !kvm_or_skip("fsfreeze") || !root_or_skip("fsfreeze") {
        return;
    }
    let mut t = FrozenFlush::boot();
    let doc = t.wait_blocked(Duration::from_millis(500));
    assert_eq!(doc.state, VmState::Running, "{doc:?}");
    let w = &doc.writebacks_in_progress[0];
    assert_eq!(w.device, "pmem0", "{doc:?}");
    assert_eq!(w.by, "vCPU 0", "{doc:?}");
    assert_held(&t.vm, "MARK FLUSHED");
    // Every read-only query answers too: the stats table reads the devices.
    let asked = Instant::now();
    let stats = Command::new(pmvm())
        .args(["stats", "--api-sock", t.sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        asked.elapsed() < ANSWERED,
        "pmvm stats took {:?}",
        asked.elapsed()
    );
    let table = String::from_utf8_lossy(&stats.stdout);
    assert!(
        table.contains("blocked") && table.contains("pmem0"),
        "{table}"
    );
    drop(t.frozen.take());
    if let Err(e) = t.vm.wait_for("probe: MARK FLUSHED", BOOT) {
        panic!("{e}");
    }
    assert_eq!(bytes_at(&t.img, 0, 0x4000), vec![0x7e; 0x4000]);
    let doc = vm_state_answered(&t.vm, &t.sock);
    assert_eq!(doc.writebacks_in_progress, [], "{doc:?}");
}

#[test]
fn shutdown_with_a_flush_in_a_frozen_file_system_waits_a_bounded_time() {
    if !kvm_or_skip("fsfreeze shutdown") || !root_or_skip("fsfreeze shutdown") {
        return;
    }
    for by_signal in [false, true] {
        frozen_shutdown(by_signal);
    }
}

/// Stops pmvm (`pmvm shutdown`, or SIGTERM) while its vCPU's flush is blocked in a frozen
/// file system.
fn frozen_shutdown(by_signal: bool) {
    let mut t = FrozenFlush::boot();
    t.wait_blocked(Duration::from_millis(200));
    if by_signal {
        t.vm.signal(libc::SIGTERM);
    } else {
        let (ok, err) = client(&["shutdown", "--api-sock", t.sock.to_str().unwrap()]);
        assert!(ok, "{err}");
    }
    // pmvm gives up on the blocked vCPU after its bounded wait and says what it waited for.
    let said = wait_stderr(&t.vm, "gave up waiting", BOOT);
    assert!(said.contains("vCPU 0") && said.contains("pmem0"), "{said}");
    assert!(
        !t.vm.lines().iter().any(|l| l.contains("MARK FLUSHED")),
        "{said}"
    );
    // The thread stuck in the file system holds the process until the thaw.
    drop(t.frozen.take());
    // Its own status (not a signal: the seccomp filter allowed every step of the stop).
    let (status, stderr) = t.vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(IO_ERROR_STATUS), "{stderr}");
    assert!(
        !t.vm.lines().iter().any(|l| l.contains("MARK FLUSHED")),
        "{}",
        t.vm.transcript()
    );
}

/// A first pmvm on `dir/name`, running.
fn first_on(dir: &Path, name: &str) -> (Pmvm, PathBuf) {
    let img = dir.join(name);
    let (vm, _sock) = boot(
        dir,
        "mark RUNNING wait",
        &format!("path={},size=2M", img.display()),
    );
    vm.wait_for("probe: MARK RUNNING", BOOT).unwrap();
    (vm, img)
}

/// Another pmvm on `img` that marks `mark` and powers off; its status, console and stderr.
fn second_on(img: &Path, mark: &str) -> (Option<i32>, String, String) {
    let out = Command::new(pmvm())
        .args(probe_pmem_args(
            &format!("mark {mark} poweroff"),
            &format!("path={}", img.display()),
            None,
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_second_pmvm_on_a_replaced_path_is_refused_naming_the_first() {
    if !kvm_or_skip("replaced path lock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (first, a) = first_on(dir.path(), "a.img");
    // The first pmvm's inode lock now sits on an orphan: only the path can refuse the second.
    let b = dir.path().join("b.img");
    fs::write(&b, vec![0u8; 2 << 20]).unwrap();
    fs::rename(&b, &a).unwrap();
    let (code, console, stderr) = second_on(&a, "NEVER");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("is in use by pmvm pid {}", first.pid())),
        "{stderr}"
    );
    assert!(stderr.contains(".a.img.pmvm-lock"), "{stderr}");
    assert!(!console.contains("NEVER"), "{console}");
}

#[test]
fn a_lock_left_by_a_killed_pmvm_does_not_block_the_next() {
    if !kvm_or_skip("stale path lock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut first, img) = first_on(dir.path(), "k.img");
    first.signal(libc::SIGKILL);
    first.wait_exit(BOOT).unwrap();
    let lock_file = dir.path().join(".k.img.pmvm-lock");
    assert!(lock_file.exists(), "left behind");
    let (code, console, stderr) = second_on(&img, "NEXT");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(console.contains("MARK NEXT"), "{console}");
    // An orderly exit removes it.
    assert!(!lock_file.exists());
}

/// Waits until every thread of process `pid` is traced by `tracer`.
fn wait_traced(pid: u32, tracer: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let traced = || -> Option<bool> {
        let mut all = true;
        for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let status = fs::read_to_string(task.ok()?.path().join("status")).ok()?;
            let by = status.lines().find_map(|l| l.strip_prefix("TracerPid:"))?;
            all &= by.trim() == tracer.to_string();
        }
        Some(all)
    };
    while traced() != Some(true) {
        assert!(Instant::now() < deadline, "strace did not attach to pmvm");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether strace, which injects the failure, is installed and may attach to pmvm (a sibling,
/// not its child: Yama's ptrace_scope 1 allows that only to root); under CI it must.
fn strace_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let scope = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
    let why = if Command::new("strace").arg("-V").output().is_err() {
        "strace is not installed (scripts/setup.sh installs it)"
    } else if !root && !matches!(scope.trim(), "" | "0") {
        "Yama's ptrace_scope lets only root attach strace to pmvm"
    } else {
        return true;
    };
    assert!(!in_ci(), "{test}: {why}");
    println!("SKIP: {test}: {why}");
    false
}

/// Rounds of `storm` (one page, one flush each): the device tries starting each run's I/O
/// (`sync_file_range`) before the `fdatasync` only once it has learnt whether to unmap, from
/// the 49th writeback of a size on, so the first failing call comes within these.
const SUBMIT_ROUNDS: u64 = 3 * nvdimm::writeback_way::STEP_LEARNING_WRITEBACKS;

/// EIO from the writeback's first step, `sync_file_range(WRITE)`, injected by strace into the
/// first such call: a failure like the `fdatasync`'s, so the guest's flush must not complete.
#[test]
fn eio_on_starting_the_writeback_holds_the_guest_until_a_retry_succeeds() {
    let test = "EIO sync_file_range";
    let dir = tempfile::tempdir().unwrap();
    if !kvm_or_skip(test) || !strace_or_skip(test) || !page_cache_or_skip(test, dir.path()) {
        return;
    }
    let img = dir.path().join("s.img");
    let sock = dir.path().join("api.sock");
    let words = format!("readline storm 0 {SUBMIT_ROUNDS} mark STORMED wait");
    let mut args = probe_pmem_args(
        &words,
        &format!("path={},size=2M", img.display()),
        Some(&sock),
    );
    // strace injects by turning the call into the invalid system call -1, which the seccomp
    // filter would answer by killing pmvm.
    args.extend(["--seccomp".into(), "off".into()]);
    let mut vm = Pmvm::spawn_with_input(&pmvm(), &args);
    if let Err(e) = wait_api(&sock, BOOT) {
        panic!("{e}\n{}", vm.transcript());
    }
    vm.wait_for("probe: reading", BOOT).unwrap();
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=sync_file_range",
        ])
        .args(["-e", "inject=sync_file_range:error=EIO:when=1", "-p"])
        .arg(vm.pid().to_string())
        .spawn()
        .unwrap();
    wait_traced(vm.pid(), strace.id(), BOOT);
    vm.send(b"go\n").unwrap();
    let fault = wait_io_error(&vm, &sock, BOOT);
    assert_eq!(fault.errno_name, "EIO", "{fault:?}");
    assert!(fault.what.contains("starting the writeback"), "{fault:?}");
    assert_eq!(fault.pages_at_stake, 1, "{fault:?}");
    assert_held(&vm, "MARK STORMED");
    // The retry rewrites the page and syncs without the failing step; the storm goes on, and
    // its later writebacks start their I/O first again (the strace failed only one call).
    resume_and_complete(&vm, &sock, "MARK STORMED");
    let stats = Client::new(&sock).pmem("pmem0").unwrap().stats;
    assert!(stats.submitted_writebacks > 0, "{stats:?}");
    assert_eq!(stats.errors, 1, "{stats:?}");
    // From the disk, not the page cache: the last flush left every page clean.
    let on_disk = read_direct(&img, 0, 16 * 4096).unwrap();
    for page in 0..16 {
        let last = (1..=SUBMIT_ROUNDS)
            .filter(|i| i % 16 == page)
            .max()
            .unwrap();
        assert_eq!(on_disk[page as usize * 4096], last as u8, "page {page}");
    }
    let _ = strace.kill();
    let _ = strace.wait();
    drop(vm);
}
