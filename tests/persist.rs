//! The persistence models, proven with the probe guest on /dev/kvm: a power cut (API, SIGKILL
//! or the guest's crash port) leaves a `persist=flush` file exactly as of the last flush while
//! `persist=adr` keeps every store; the flush-epoch log rebuilds every flush point and crash
//! states between two; background writeback cleans pages nobody flushed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pmvm_tests::types::PersistMode;
use pmvm_tests::{
    cachestat, host_dirty_pages, kvm_or_skip, page_cache_or_skip, probe_pmem_args, wait_api,
    wait_writeback_calm, Client, ClientResponse, Pmvm,
};

const BOOT: Duration = Duration::from_secs(60);
const PAGE: usize = 4096;
/// Every device here: small, so images are cheap to compare whole.
const SIZE: usize = 2 << 20;
/// pmvm's exit status after a power cut.
const POWER_CUT_STATUS: i32 = 3;

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// `PUT path` on the control socket, answered with any status.
fn put(sock: &Path, path: &str) -> ClientResponse {
    Client::new(sock)
        .send("PUT", path, b"")
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
}

/// Boots the probe with a control socket and waits until it answers.
fn boot(dir: &Path, words: &str, pmem: &str) -> (Pmvm, PathBuf) {
    let sock = dir.join("api.sock");
    let vm = Pmvm::spawn(&pmvm(), &probe_pmem_args(words, pmem, Some(&sock)));
    if let Err(e) = wait_api(&sock, BOOT) {
        panic!("{e}\n{}", vm.transcript());
    }
    (vm, sock)
}

/// Runs the probe to its end without a socket; returns exit code, console and stderr.
fn run_probe(words: &str, pmem: &str) -> (Option<i32>, Vec<String>, String) {
    let mut vm = Pmvm::spawn(&pmvm(), &probe_pmem_args(words, pmem, None));
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    (status.code(), vm.lines(), stderr)
}

/// Runs `pmvm ARGS` (a client or offline subcommand); returns status, stdout, stderr.
fn pmvm_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(pmvm()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A zero-filled device file, so the test knows the image before the run exactly.
fn zero_image(path: &Path) {
    fs::write(path, vec![0u8; SIZE]).unwrap();
}

/// What the guest writes before the power goes: page 0 = A and flushed, page 1 = B, not.
const A: u8 = 0xa1;
const B: u8 = 0xb2;
const WRITE_A_FLUSH_WRITE_B: &str =
    "nfit write 0 0 0x1000 0xa1 flush 0 write 0 0x1000 0x1000 0xb2 mark UNFLUSHED";

fn page(image: &[u8], n: usize) -> &[u8] {
    &image[n * PAGE..(n + 1) * PAGE]
}

fn assert_page(image: &[u8], n: usize, byte: u8, what: &str) {
    assert!(
        page(image, n).iter().all(|&b| b == byte),
        "{what}: page {n} is not all {byte:#04x}: starts {:02x?}",
        &page(image, n)[..16]
    );
}

/// The strict model after power loss: A is in the file, B is not; the "reboot after power
/// loss" (a new pmvm on the same file) sees the same.
fn assert_only_the_flushed_page_survived(img: &Path) {
    let image = fs::read(img).unwrap();
    assert_page(&image, 0, A, "flushed before the power cut");
    assert_page(&image, 1, 0, "written but never flushed");
    let words = "check 0 0 0x1000 0xa1 check 0 0x1000 0x1000 0 poweroff";
    let pmem = format!("path={},persist=flush", img.display());
    let (code, lines, stderr) = run_probe(words, &pmem);
    assert_eq!(code, Some(0), "{lines:?}\n{stderr}");
    for want in [
        "probe: check dev=0 off=0x0 len=0x1000 ok",
        "probe: check dev=0 off=0x1000 len=0x1000 ok",
    ] {
        assert!(lines.iter().any(|l| l == want), "no {want:?}: {lines:?}");
    }
}

#[test]
fn strict_model_power_cut_through_the_api_keeps_only_flushed_pages() {
    if !kvm_or_skip("strict power cut") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("strict.img");
    let pmem = format!("path={},size=2M,persist=flush", img.display());
    let (mut vm, sock) = boot(dir.path(), &format!("{WRITE_A_FLUSH_WRITE_B} wait"), &pmem);
    vm.wait_for("probe: waiting", BOOT).unwrap();
    // A persist=flush device withdraws the platform's ADR claim: no type-7 structure.
    assert!(
        !vm.lines().iter().any(|l| l.contains("nfit type=7")),
        "{:?}",
        vm.lines()
    );
    let info = Client::new(&sock).pmem("pmem0").unwrap();
    assert_eq!(info.persist, PersistMode::Flush);
    if let Some(pending) = info.pending_dirty_pages {
        assert_eq!(pending, 1, "{info:?}");
    }
    let r = put(&sock, "/v1/vm/power-cut");
    assert_eq!(r.status, 204, "{}", r.text());
    let (st, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(st.code(), Some(POWER_CUT_STATUS), "{}", vm.transcript());
    assert!(
        stderr.contains("pmvm: power cut by PUT /v1/vm/power-cut"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pmem0: 1 flushes (0 empty)") && stderr.contains(" 0 errors"),
        "{stderr}"
    );
    assert_only_the_flushed_page_survived(&img);
}

#[test]
fn strict_model_sigkill_leaves_the_same_file_as_a_power_cut() {
    if !kvm_or_skip("strict SIGKILL") {
        return;
    }
    // SIGTERM is an orderly stop, but a strict device still writes nothing unflushed back.
    for (signal, code) in [(libc::SIGKILL, None), (libc::SIGTERM, Some(0))] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("killed.img");
        let pmem = format!("path={},size=2M,persist=flush", img.display());
        let (mut vm, _sock) = boot(dir.path(), &format!("{WRITE_A_FLUSH_WRITE_B} wait"), &pmem);
        vm.wait_for("probe: waiting", BOOT).unwrap();
        vm.signal(signal);
        let (st, stderr) = vm.wait_exit(BOOT).unwrap();
        assert_eq!(st.code(), code, "signal {signal}: {stderr}");
        assert_only_the_flushed_page_survived(&img);
    }
}

#[test]
fn the_probe_crash_word_ends_the_vm_like_the_api_power_cut() {
    if !kvm_or_skip("probe crash word") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crashed.img");
    let pmem = format!("path={},size=2M,persist=flush", img.display());
    let (code, lines, stderr) = run_probe(&format!("{WRITE_A_FLUSH_WRITE_B} crash"), &pmem);
    assert_eq!(code, Some(POWER_CUT_STATUS), "{lines:?}\n{stderr}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("probe: crash"),
        "{lines:?}"
    );
    assert!(
        stderr.contains("power cut by the guest's write to the test crash port"),
        "{stderr}"
    );
    assert_only_the_flushed_page_survived(&img);
}

#[test]
fn default_model_keeps_unflushed_stores_because_the_page_cache_is_coherent() {
    if !kvm_or_skip("adr power cut") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("adr.img");
    let pmem = format!("path={},size=2M", img.display());
    let (mut vm, sock) = boot(dir.path(), &format!("{WRITE_A_FLUSH_WRITE_B} wait"), &pmem);
    vm.wait_for("probe: waiting", BOOT).unwrap();
    // Every device is adr: the NFIT claims memory-controller persistence.
    vm.wait_for("probe: nfit type=7 len=16", BOOT).unwrap();
    assert_eq!(
        Client::new(&sock).pmem("pmem0").unwrap().persist,
        PersistMode::Adr
    );
    let sock_arg = sock.display().to_string();
    let (code, out, err) = pmvm_cmd(&["power-cut", "--api-sock", &sock_arg, "--id", "pmem0"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "power cut (through pmem0)\n");
    let (st, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(st.code(), Some(POWER_CUT_STATUS), "{stderr}");
    assert!(
        stderr.contains("power cut by PUT /v1/pmem/{id}/crash"),
        "{stderr}"
    );
    // B never was flushed, yet the file has it: the guest stored into the file's page cache,
    // which the (simulated) power loss of the guest does not touch.
    let image = fs::read(&img).unwrap();
    assert_page(&image, 0, A, "flushed");
    assert_page(&image, 1, B, "unflushed but in the host page cache");
    // The power is off: the socket is gone and the client says so.
    let (code, _, err) = pmvm_cmd(&["power-cut", "--api-sock", &sock_arg]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot connect to pmvm"), "{err}");
}

/// Three flushes: A over page 0, B over page 1, C over pages 1..=5 (from 0x1800).
const THREE_FLUSHES: &str = "write 0 0 0x1000 0xa1 flush 0 \
     write 0 0x1000 0x1000 0xb2 flush 0 \
     write 0 0x1800 0x4000 0xc3 flush 0 poweroff";

/// The device image after epoch `n` of [`THREE_FLUSHES`].
fn expected_image(n: u64) -> Vec<u8> {
    let mut image = vec![0u8; SIZE];
    if n >= 1 {
        image[..0x1000].fill(0xa1);
    }
    if n >= 2 {
        image[0x1000..0x2000].fill(0xb2);
    }
    if n >= 3 {
        image[0x1800..0x5800].fill(0xc3);
    }
    image
}

/// Runs [`THREE_FLUSHES`] with a flush log; returns the base image and the log.
fn three_flushes_logged(dir: &Path, persist: &str) -> (PathBuf, PathBuf) {
    let img = dir.join("logged.img");
    let base = dir.join("base.img");
    let log = dir.join("flush.log");
    zero_image(&img);
    fs::copy(&img, &base).unwrap();
    let pmem = format!(
        "path={},persist={persist},flush-log={}",
        img.display(),
        log.display()
    );
    let (code, lines, stderr) = run_probe(THREE_FLUSHES, &pmem);
    assert_eq!(code, Some(0), "{lines:?}\n{stderr}");
    assert_eq!(
        fs::read(&img).unwrap(),
        expected_image(3),
        "the file after the last flush"
    );
    (base, log)
}

fn replay(log: &Path, base: &Path, epoch: u64, out: &Path) -> (Option<i32>, String, String) {
    let epoch = epoch.to_string();
    pmvm_cmd(&[
        "log",
        "replay",
        &log.display().to_string(),
        "--base",
        &base.display().to_string(),
        "--epoch",
        &epoch,
        "--out",
        &out.display().to_string(),
    ])
}

#[test]
fn the_flush_log_replays_every_flush_point_and_survives_a_torn_tail() {
    if !kvm_or_skip("flush log replay") {
        return;
    }
    for persist in ["flush", "adr"] {
        let dir = tempfile::tempdir().unwrap();
        let (base, log) = three_flushes_logged(dir.path(), persist);
        let (code, out, err) = pmvm_cmd(&["log", "list", &log.display().to_string()]);
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("device of 2M, 3 epochs"), "{out}");
        let rows: Vec<Vec<&str>> = out
            .lines()
            .skip(2)
            .map(|l| l.split_whitespace().collect())
            .collect();
        let summary: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[2], r[4])).collect();
        assert_eq!(
            summary,
            vec![
                ("1", "vcpu0", "0"),
                ("2", "vcpu0", "1"),
                ("3", "vcpu0", "1,2,3,4,5")
            ],
            "{out}"
        );
        for epoch in 0..=3 {
            let out_img = dir.path().join(format!("epoch{epoch}.img"));
            let (code, _, err) = replay(&log, &base, epoch, &out_img);
            assert_eq!(code, Some(0), "{err}");
            assert!(
                fs::read(&out_img).unwrap() == expected_image(epoch),
                "{persist}: replay to epoch {epoch} differs from the expected image"
            );
        }

        // Cut the log in the middle of epoch 3: epochs 1 and 2 still replay exactly.
        let bytes = fs::read(&log).unwrap();
        let torn = dir.path().join("torn.log");
        let epoch3_len = 32 + 5 * (8 + PAGE) + 4;
        fs::write(&torn, &bytes[..bytes.len() - epoch3_len / 2]).unwrap();
        for epoch in 1..=2 {
            let out_img = dir.path().join(format!("torn{epoch}.img"));
            let (code, _, err) = replay(&torn, &base, epoch, &out_img);
            assert_eq!(code, Some(0), "{err}");
            assert!(
                err.contains("torn tail: ") && err.contains("epochs 1 to 2 are intact"),
                "{err}"
            );
            assert!(fs::read(&out_img).unwrap() == expected_image(epoch));
        }
        let (code, _, err) = replay(&torn, &base, 3, &dir.path().join("torn3.img"));
        assert_eq!(code, Some(1));
        assert!(err.contains("epoch 3 is not in"), "{err}");
        assert!(err.contains("it holds epochs 1 to 2"), "{err}");
    }
}

#[test]
fn crash_states_differ_only_in_the_next_epochs_pages_and_repeat_per_seed() {
    if !kvm_or_skip("crash states") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, log) = three_flushes_logged(dir.path(), "flush");
    let states = |seed: &str, name: &str| -> Vec<Vec<u8>> {
        let out = dir.path().join(name);
        let (code, text, err) = pmvm_cmd(&[
            "log",
            "crash-states",
            &log.display().to_string(),
            "--base",
            &base.display().to_string(),
            "--epoch",
            "2",
            "--count",
            "6",
            "--seed",
            seed,
            "--out",
            &out.display().to_string(),
        ]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(text.lines().count(), 6, "{text}");
        (0..6)
            .map(|k| fs::read(out.join(format!("crash-{k:03}.img"))).unwrap())
            .collect()
    };
    let (before, after) = (expected_image(2), expected_image(3));
    let next_pages = 1..=5;
    let a = states("7", "a");
    for (k, image) in a.iter().enumerate() {
        for p in 0..SIZE / PAGE {
            let got = page(image, p);
            if next_pages.contains(&p) {
                assert!(
                    got == page(&before, p) || got == page(&after, p),
                    "state {k}: page {p} is neither its epoch-2 nor its epoch-3 contents"
                );
            } else {
                assert!(got == page(&before, p), "state {k}: page {p} changed");
            }
        }
    }
    assert!(a.iter().any(|i| *i != a[0]), "six identical crash states");
    assert!(
        a == states("7", "b"),
        "the same seed must give the same images"
    );
    assert!(
        a != states("8", "c"),
        "another seed gave the same six images"
    );
}

#[test]
fn background_writeback_cleans_unflushed_pages_within_two_intervals() {
    if !kvm_or_skip("background writeback") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip("background writeback", dir.path()) {
        return;
    }
    let img = dir.path().join("bg.img");
    let interval = Duration::from_millis(1000);
    let pmem = format!(
        "path={},size=2M,writeback-interval={}",
        img.display(),
        interval.as_millis()
    );
    let (mut vm, sock) = boot(
        dir.path(),
        "write 0 0x10000 0x2000 0xd4 mark WRITTEN wait",
        &pmem,
    );
    vm.wait_for("probe: MARK WRITTEN", BOOT).unwrap();
    let written = Instant::now();
    let client = Client::new(&sock);
    // The pages are clean within two intervals: pmvm's rounds guarantee it, and the host's
    // own writeback (memory pressure, another process's sync) may only get there first.
    // Scheduling slack on top: the rounds and this polling are not aligned.
    let deadline = written + 2 * interval + Duration::from_millis(500);
    // Whether the host was writing back on its own meanwhile (above its background level).
    let mut host_writeback = false;
    loop {
        let c = cachestat(&img, 0x10000, 0x2000).unwrap();
        host_writeback |= host_dirty_pages().is_some_and(|(dirty, level)| dirty >= level);
        if c.nr_cache == 2 && c.nr_dirty == 0 && c.nr_writeback == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unflushed pages still dirty {:?} after the write: {c:?}",
            written.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let clean_after = written.elapsed();
    // pmvm's rounds find the pages in KVM's dirty log whoever cleaned them in the page cache,
    // so they are counted; a round is counted once its fdatasync returns, a moment after the
    // pages turn clean, later still on a busy host.
    let counted_by = Instant::now() + Duration::from_secs(10);
    let (info, stats) = loop {
        let info = client.pmem("pmem0").unwrap();
        let stats = info.stats.clone();
        if (stats.background_flushes >= 1 && stats.background_pages == 2)
            || Instant::now() >= counted_by
        {
            break (info, stats);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "clean {clean_after:?} after the write; host writeback active: {host_writeback} ({}); \
         {stats:?}",
        wait_writeback_calm(Duration::ZERO)
    );
    assert_eq!(info.writeback_interval_ms, Some(1000));
    assert_eq!((stats.flushes, stats.host_flushes), (0, 0), "{stats:?}");
    assert!(stats.background_flushes >= 1, "{stats:?}");
    // Exactly the guest's two pages, or, only if the host wrote them back first and pmvm's
    // round has not come yet, none.
    assert!(
        stats.background_pages == 2 || (stats.background_pages == 0 && host_writeback),
        "background rounds counted {} of the guest's 2 pages, and the host's writeback was \
         not active: {stats:?}",
        stats.background_pages
    );
    let r = put(&sock, "/v1/vm/shutdown");
    assert_eq!(r.status, 204, "{}", r.text());
    let (st, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(st.code(), Some(0), "{stderr}");
    let image = fs::read(&img).unwrap();
    assert_page(&image, 16, 0xd4, "written back in the background");
}

/// The strict model's memory stays bounded: a flush drops the private copies it made durable,
/// so pmvm's RSS falls back near guest RAM however much the guest wrote, and the pages read the
/// file again. A store after the flush gets a private copy afresh, is logged and written by the
/// next flush; after a power cut every byte of the device is what the guest last flushed.
#[test]
fn strict_model_flush_drops_written_copies_and_loses_no_byte() {
    if !kvm_or_skip("strict model memory") {
        return;
    }
    const DEV: u64 = 256 << 20;
    const RAM_MIB: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.img");
    let pmem = format!("path={},size={DEV},persist=flush", img.display());
    let words =
        format!("write 0 0 {DEV:#x} 0x5a flush 0 write 0 0x3000 0x1000 0x77 mark FLUSHED wait");
    let sock = dir.path().join("api.sock");
    let mut args = probe_pmem_args(&words, &pmem, Some(&sock));
    args.push(format!("--memory={RAM_MIB}M"));
    let mut vm = Pmvm::spawn(&pmvm(), &args);
    vm.wait_for("MARK FLUSHED", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.transcript()));
    let rss = rss_kib(vm.pid());
    println!("pmvm after flushing {} MiB: {rss:?}", DEV >> 20);
    // Guest RAM, 64 MiB of slack, and the one page written since.
    let bound = (RAM_MIB + 64) << 10;
    assert!(
        rss.0 < bound + 4,
        "VmRSS {} KiB after the flush, bound {bound} KiB: {rss:?}",
        rss.0
    );

    // A host flush takes the page written after the guest's flush.
    wait_api(&sock, BOOT).unwrap();
    let report = Client::new(&sock).flush("pmem0").unwrap();
    assert_eq!(report.pages, 1, "{report:?}");
    let r = put(&sock, "/v1/vm/power-cut");
    assert_eq!(r.status, 204, "{}", r.text());
    let (st, stderr) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(st.code(), Some(POWER_CUT_STATUS), "{stderr}");

    use std::io::Read;
    let mut file = fs::File::open(&img).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for at in (0..DEV).step_by(chunk.len()) {
        file.read_exact(&mut chunk).unwrap();
        for (i, &b) in chunk.iter().enumerate() {
            let off = at + i as u64;
            let want = if (0x3000..0x4000).contains(&off) {
                0x77
            } else {
                0x5a
            };
            assert_eq!(b, want, "byte {off:#x} of the device after the power cut");
        }
    }
}

/// (VmRSS, RssAnon, RssFile) of process `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}
