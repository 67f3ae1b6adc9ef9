//! The NVDIMM's promises, proven with the probe guest on /dev/kvm and the host's page cache:
//! a guest flush makes exactly the dirtied pages durable before the vCPU resumes, and nothing
//! else does; stats count exactly that; several devices stay apart; read-only devices drop
//! writes; wrong-width hint writes are ignored; and every bad `--pmem` is one clear line.
//!
//! Durability is read from the host page cache with cachestat(2): a page the guest wrote is
//! dirty there until someone writes it back, so "0 dirty" right after the guest's flush means
//! pmvm wrote it, and the unflushed control pages staying dirty shows the check can fail.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pmvm_tests::types::PmemInfo;
use pmvm_tests::{
    auto_dirty_tracking, cachestat, kvm_or_skip, page_cache_or_skip, probe_elf, read_direct,
    wait_api, wait_writeback_calm, CacheStat, Client, Pmvm,
};

const BOOT: Duration = Duration::from_secs(60);
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

/// A `--pmem` value for `path` with more options (`opts` starts with a comma, or is empty).
fn pmem_arg(path: &Path, opts: &str) -> String {
    format!("path={}{opts}", path.display())
}

/// A running probe guest with a control socket.
struct Guest {
    vm: Pmvm,
    sock: PathBuf,
}

impl Guest {
    /// Boots the probe running `words` with `pmem` devices and `extra` options, serving the
    /// API at `dir/api.sock`; with `input`, the test can answer the probe's `readline`.
    fn boot(dir: &Path, words: &str, pmem: &[String], extra: &[&str], input: bool) -> Guest {
        let sock = dir.join("api.sock");
        let mut args = probe_args(words, pmem, extra);
        args.extend(["--api-sock".into(), sock.display().to_string()]);
        let vm = if input {
            Pmvm::spawn_with_input(&pmvm(), &args)
        } else {
            Pmvm::spawn(&pmvm(), &args)
        };
        if let Err(e) = wait_api(&sock, BOOT) {
            panic!("{e}\n{}", vm.transcript());
        }
        Guest { vm, sock }
    }

    fn devices(&self) -> Vec<PmemInfo> {
        self.client()
            .pmem_list()
            .unwrap_or_else(|e| panic!("GET /v1/pmem: {e}"))
            .devices
    }

    fn client(&self) -> Client {
        Client::new(&self.sock)
    }

    fn wait_for(&self, needle: &str) {
        self.vm.wait_for(needle, BOOT).unwrap();
    }

    /// Shuts the VM down through the API; returns pmvm's stderr after a 0 exit.
    fn shutdown(mut self) -> String {
        let r = self.client().send("PUT", "/v1/vm/shutdown", b"").unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
        let (status, stderr) = self.vm.wait_exit(BOOT).unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.vm.transcript());
        stderr
    }
}

fn probe_args(words: &str, pmem: &[String], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        probe_elf().display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 -- {words}"),
    ];
    for p in pmem {
        args.extend(["--pmem".into(), p.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs the probe without a socket to the end; returns exit code, console lines and stderr.
fn run_probe(words: &str, pmem: &[String]) -> (Option<i32>, Vec<String>, String) {
    let mut vm = Pmvm::spawn(&pmvm(), &probe_args(words, pmem, &[]));
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    (status.code(), vm.lines(), stderr)
}

fn page_cache(path: &Path, off: u64, len: u64) -> CacheStat {
    cachestat(path, off, len).unwrap_or_else(|e| panic!("cachestat {}: {e}", path.display()))
}

/// How long the host kernel lets a dirty page sit before its own writeback takes it.
fn dirty_expire() -> Duration {
    let centis = std::fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(3000);
    Duration::from_millis(centis * 10)
}

/// One NVDIMM as the probe's `nfit` word printed it: its SPA range, its memdev's flags and the
/// hints of the flush structure with the memdev's handle.
#[derive(Debug, PartialEq, Eq)]
struct NfitDevice {
    handle: u32,
    base: u64,
    len: u64,
    flags: u64,
    hints: Vec<u64>,
}

fn num(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .unwrap_or_else(|_| panic!("{s:?} is not a number"))
}

/// The `key=value` fields of an nfit line, and its bare words after the kind.
fn fields(line: &str) -> (Vec<(&str, &str)>, Vec<&str>) {
    let mut kv = Vec::new();
    let mut bare = Vec::new();
    for word in line.split_whitespace().skip(3) {
        match word.split_once('=') {
            Some(pair) => kv.push(pair),
            None => bare.push(word),
        }
    }
    (kv, bare)
}

fn field(kv: &[(&str, &str)], key: &str, line: &str) -> u64 {
    let (_, v) = kv
        .iter()
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    num(v)
}

/// The persistent-memory devices of the probe's `nfit` output, in NFIT order.
fn nfit_devices(lines: &[String]) -> Vec<NfitDevice> {
    let nfit: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("probe: nfit "))
        .collect();
    let of_kind = |kind: &str| -> Vec<String> {
        nfit.iter()
            .filter(|l| l.starts_with(&format!("{kind} ")))
            .map(|l| format!("probe: nfit {l}"))
            .collect()
    };
    let memdevs = of_kind("memdev");
    let flushes = of_kind("flush");
    let mut out = Vec::new();
    for spa in of_kind("spa").iter().filter(|l| !l.contains("type=other")) {
        let (kv, _) = fields(spa);
        let index = field(&kv, "index", spa);
        let memdev = memdevs
            .iter()
            .find(|m| field(&fields(m).0, "spa", m) == index)
            .unwrap_or_else(|| panic!("no memdev for SPA range {index}: {nfit:?}"));
        let (mkv, _) = fields(memdev);
        let handle = field(&mkv, "handle", memdev);
        let flush = flushes
            .iter()
            .find(|f| field(&fields(f).0, "handle", f) == handle)
            .unwrap_or_else(|| panic!("no flush structure for handle {handle}: {nfit:?}"));
        let (fkv, addrs) = fields(flush);
        let hints: Vec<u64> = addrs.iter().map(|a| num(a)).collect();
        assert_eq!(
            hints.len() as u64,
            field(&fkv, "hints", flush),
            "hint count and addresses disagree: {flush}"
        );
        out.push(NfitDevice {
            handle: handle as u32,
            base: field(&kv, "base", spa),
            len: field(&kv, "len", spa),
            flags: field(&mkv, "flags", memdev),
            hints,
        });
    }
    let count = nfit
        .iter()
        .find_map(|l| l.strip_prefix("devices="))
        .map(num)
        .unwrap_or_else(|| panic!("no `nfit devices=` line: {nfit:?}"));
    assert_eq!(count, out.len() as u64, "{nfit:?}");
    out
}

/// Holds an exclusive flock on a file, as another VMM or tool would.
struct HeldLock(#[allow(dead_code)] File);

fn hold_lock(path: &Path) -> HeldLock {
    let f = File::open(path).unwrap();
    // SAFETY: flock only reads its integer arguments; the descriptor is owned by `f`, which is
    // open for the call (and kept open, holding the lock, by the returned value).
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(
        rc,
        0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    HeldLock(f)
}

// ---- durability, the negative control and the stats ----

#[test]
fn flushed_pages_are_on_disk_and_unflushed_pages_stay_dirty() {
    if !kvm_or_skip("write then flush") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip("write then flush", dir.path()) {
        return;
    }
    with_fresh_control("write then flush", write_then_flush_once);
}

/// Each `--dirty-tracking` mode on its own VM: the same stores, one flush, exactly those pages
/// written back, and the API names the mode in use.
#[test]
fn each_dirty_tracking_mode_writes_back_exactly_the_stored_pages() {
    if !kvm_or_skip("dirty tracking modes") {
        return;
    }
    for mode in ["ring", "bitmap", "auto"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.img");
        let g = Guest::boot(
            dir.path(),
            "write 0 0 0x2000 0xab write 0 0x10000 0x1000 0xcd flush 0 mark FLUSHED \
             write 0 0x20000 0x1000 0xef mark LATE wait",
            &[pmem_arg(&img, ",size=64M")],
            &["--dirty-tracking", mode],
            false,
        );
        g.wait_for("MARK LATE");
        let dev = &g.devices()[0];
        let want = match mode {
            "auto" => auto_dirty_tracking(),
            m => m,
        };
        assert_eq!(dev.dirty_tracking.as_str(), want, "--dirty-tracking {mode}");
        let st = &dev.stats;
        assert_eq!(
            (st.flushes, st.pages_written, st.runs, st.errors),
            (1, 3, 2, 0),
            "--dirty-tracking {mode}: {st:?}"
        );
        assert_eq!(page_cache(&img, 0, 0x11000).nr_dirty, 0, "{mode}: flushed");
        if want == "ring" {
            // The ring can say what is pending without losing it; the next flush takes it.
            assert_eq!(dev.pending_dirty_pages, Some(1), "{mode}");
        }
        let report = g.client().flush("pmem0").unwrap();
        assert_eq!(report.pages, 1, "{mode}: the late page, once");
        g.shutdown();
    }
    let out = std::process::Command::new(pmvm())
        .args(["--kernel", "x", "--dirty-tracking", "sometimes"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("sometimes") && stderr.contains("ring") && stderr.contains("bitmap"),
        "{stderr}"
    );
}

/// A store after a flush leaves exactly its own page dirty in the host page cache, even when
/// the guest first filled the pages around it in order (faults with read-around would put
/// them in multi-page folios, and the host tracks dirtiness per folio: then the flushed
/// neighbours would read as dirty again and be rewritten by the next writeback).
#[test]
fn a_store_after_a_flush_dirties_only_its_own_page() {
    if !kvm_or_skip("one page dirty") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip("one page dirty", dir.path()) {
        return;
    }
    let img = dir.path().join("p.img");
    with_fresh_control("one page dirty", || {
        let g = Guest::boot(
            dir.path(),
            "write 0 0 0x1000000 0x11 flush 0 write 0 0x801000 0x1000 0x22 mark LATE wait",
            &[pmem_arg(&img, ",size=64M")],
            &[],
            false,
        );
        g.wait_for("MARK LATE");
        let late = page_cache(&img, 0x801000, PAGE);
        let around = page_cache(&img, 0, 0x1000000);
        g.shutdown();
        std::fs::remove_file(&img).unwrap();
        // The control: the host's own writeback may have cleaned the late page first.
        if late.nr_dirty != 1 {
            return Err(format!("the late page was clean: {late:?}"));
        }
        assert_eq!(
            around.nr_dirty, 1,
            "a one-page store left {} pages of the first 16 MiB dirty: {around:?}",
            around.nr_dirty
        );
        Ok(())
    });
}

/// A dirty-ring overflow costs one whole-device writeback, then tracking is exact again. The
/// probe stores to every page of a 256 MiB device in one loop, four times what a vCPU's ring
/// holds (an emulating host's KVM lets that overflow the ring, and there the test checks it
/// did), flushes, then stores to three pages and flushes again: the second flush must write
/// those three pages, not the device, and the file must hold every store.
#[test]
fn after_a_dirty_ring_overflow_the_next_flushes_write_only_the_dirtied_pages() {
    if !kvm_or_skip("dirty ring overflow") {
        return;
    }
    const DEV: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    let words = format!(
        "write 0 0 {DEV:#x} 0x5a flush 0 mark WHOLE write 0 0x2000 0x2000 0x77 \
         write 0 0x100000 0x1000 0x66 flush 0 mark AGAIN wait"
    );
    let g = Guest::boot(
        dir.path(),
        &words,
        &[pmem_arg(&img, &format!(",size={DEV}"))],
        &["--dirty-tracking", "ring"],
        false,
    );
    g.vm.wait_for("MARK AGAIN", Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("{e}\n{}", g.vm.transcript()));
    let dev = &g.devices()[0];
    let st = &dev.stats;
    let device_pages = DEV / 4096;
    assert_eq!(dev.dirty_tracking.as_str(), "ring", "{st:?}");
    assert_eq!((st.flushes, st.errors), (2, 0), "{st:?}");
    // The first flush wrote every page (all stored to, or the whole device after an
    // overflow); the second only the three stored to since.
    assert_eq!(st.last_harvest_pages, 3, "{st:?}");
    assert_eq!(st.pages_written, device_pages + 3, "{st:?}");
    let report = g.client().flush("pmem0").unwrap();
    assert_eq!(report.pages, 0, "nothing written since: {report:?}");
    let stderr = g.shutdown();
    let overflowed = stderr.contains("overflowed");
    println!("the dirty ring overflowed: {overflowed}");
    if auto_dirty_tracking() == "bitmap" {
        assert!(
            overflowed,
            "this host's KVM lets a guest overflow the ring, but it did not: {stderr}"
        );
    }
    let image = std::fs::read(&img).unwrap();
    for (page, bytes) in image.chunks(4096).enumerate() {
        let want = match page {
            2 | 3 => 0x77,
            0x100 => 0x66,
            _ => 0x5a,
        };
        assert!(bytes.iter().all(|&b| b == want), "page {page}");
    }
}

/// One boot of the write-then-flush scenario. Err when the control pages were found clean,
/// which host writeback can do behind everyone's back (see `with_fresh_control`).
fn write_then_flush_once() -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let (p0, p1) = (dir.path().join("p0.img"), dir.path().join("p1.img"));
    // pmem0: pages 0 and 5, different bytes, then one flush. pmem1: the same stores, never
    // flushed: the negative control. The probe waits at `readline` so the test can look at the
    // freshly created files before the guest touches them.
    let g = Guest::boot(
        dir.path(),
        "mark CREATED readline \
         write 0 0 0x1000 0xa5 write 0 0x5000 0x1000 0x5a flush 0 \
         write 1 0 0x1000 0xa5 write 1 0x5000 0x1000 0x5a \
         mark FLUSHED wait",
        &[
            pmem_arg(&p0, ",size=64M,sparse=on"),
            pmem_arg(&p1, ",size=64M,sparse=on"),
        ],
        &[],
        true,
    );
    g.wait_for("probe: MARK CREATED");
    for p in [&p0, &p1] {
        let meta = std::fs::metadata(p).unwrap();
        assert_eq!(meta.len(), 64 * MIB, "{}", p.display());
        assert_eq!(meta.blocks(), 0, "{} was not created sparse", p.display());
        assert_eq!(page_cache(p, 0, 0).nr_dirty, 0, "{}", p.display());
    }
    let mut g = g;
    g.vm.send(b"go\n").unwrap();
    g.wait_for("probe: MARK FLUSHED");
    let marked = Instant::now();

    // The control first, while it is fresh: the host's own writeback cleans pages once they
    // have been dirty for dirty_expire_centisecs (30 s by default), or earlier under memory or
    // dirty-ratio pressure. Checked within a second or two of the guest's stores, pages still
    // dirty here are pages nobody wrote back.
    for off in [0, 5 * PAGE] {
        let cs = page_cache(&p1, off, PAGE);
        assert_eq!(cs.nr_cache, 1, "pmem1 page {}: {cs:?}", off / PAGE);
        if cs.nr_dirty != 1 {
            return Err(format!(
                "pmem1 page {} was clean {:?} after the guest's mark (host dirty_expire \
                 {:?}): {cs:?}",
                off / PAGE,
                marked.elapsed(),
                dirty_expire()
            ));
        }
    }
    let dirty = page_cache(&p1, 0, 0).nr_dirty;
    assert!(
        dirty <= 2,
        "pmem1 has {dirty} dirty pages; the guest stored to 2"
    );

    // The flushed pages: in the page cache, clean, nothing in flight, before the vCPU went on.
    for off in [0, 5 * PAGE] {
        let cs = page_cache(&p0, off, PAGE);
        assert_eq!(
            (cs.nr_cache, cs.nr_dirty, cs.nr_writeback),
            (1, 0, 0),
            "pmem0 page {}: {cs:?}",
            off / PAGE
        );
    }
    assert_eq!(
        page_cache(&p0, 0, 0).nr_dirty,
        0,
        "pmem0: nothing dirty anywhere"
    );
    // Read from the disk, not the cache: the bytes are there. (Only clean ranges: O_DIRECT would
    // write dirty pages back first.)
    assert_eq!(
        read_direct(&p0, 0, PAGE as usize).unwrap(),
        vec![0xa5; 4096]
    );
    assert_eq!(
        read_direct(&p0, 5 * PAGE, PAGE as usize).unwrap(),
        vec![0x5a; 4096]
    );
    // Only the two written pages got disk blocks: the rest of the file is still a hole.
    let blocks = std::fs::metadata(&p0).unwrap().blocks() * 512;
    assert!(
        (2 * PAGE..=16 * PAGE).contains(&blocks),
        "pmem0 has {blocks} bytes allocated after writing two pages"
    );

    // The stats: exactly one flush of exactly those two pages, in two runs; nothing on pmem1.
    let devs = g.devices();
    assert_eq!(devs.len(), 2);
    let (d0, d1) = (&devs[0], &devs[1]);
    assert_eq!((d0.id.as_str(), d1.id.as_str()), ("pmem0", "pmem1"));
    assert_eq!(d0.path, p0.display().to_string());
    assert_eq!(d0.size_bytes, 64 * MIB);
    let s0 = &d0.stats;
    assert_eq!(s0.flushes, 1, "{d0:?}");
    assert_eq!(s0.empty_flushes, 0, "{d0:?}");
    assert_eq!(s0.pages_written, 2, "{d0:?}");
    assert_eq!(s0.bytes_written, 2 * PAGE, "{d0:?}");
    assert_eq!(s0.last_harvest_pages, 2, "{d0:?}");
    assert_eq!(s0.runs, 2, "pages 0 and 5 are two runs: {d0:?}");
    assert_eq!(s0.writebacks, 1, "{d0:?}");
    assert_eq!(
        (s0.host_flushes, s0.bad_width_writes, s0.errors),
        (0, 0, 0),
        "{d0:?}"
    );
    assert_eq!(s0.latency_us.histogram.iter().sum::<u64>(), 1, "{d0:?}");
    assert!(s0.latency_us.max > 0, "a durable write takes time: {d0:?}");
    let s1 = &d1.stats;
    assert_eq!(
        (
            s1.flushes,
            s1.pages_written,
            s1.runs,
            s1.writebacks,
            s1.last_harvest_pages
        ),
        (0, 0, 0, 0, 0),
        "{d1:?}"
    );
    // Where the VMM can peek at the dirty log without consuming it, it sees the control pages.
    if let Some(pending) = d1.pending_dirty_pages {
        assert_eq!(pending, 2, "{d1:?}");
        assert_eq!(d0.pending_dirty_pages, Some(0), "{d0:?}");
    }
    // Reading the stats wrote nothing back.
    let dirty = page_cache(&p1, 0, 0).nr_dirty;
    if dirty != 2 {
        return Err(format!(
            "pmem1 had {dirty} dirty pages after GET /v1/pmem, not 2"
        ));
    }

    // Shutting down writes back what the guest left dirty, as one host flush.
    let stderr = g.shutdown();
    assert!(
        stderr.contains("pmem0: 1 flushes (0 empty) + 1 host flushes, 2 pages in 2 runs"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pmem1: 0 flushes (0 empty) + 1 host flushes, 2 pages in 2 runs"),
        "{stderr}"
    );
    assert_eq!(page_cache(&p1, 0, 0).nr_dirty, 0, "pmem1 after shutdown");
    assert_eq!(
        read_direct(&p1, 5 * PAGE, PAGE as usize).unwrap(),
        vec![0x5a; 4096]
    );
    Ok(())
}

/// Runs a scenario whose negative control expects guest-written pages to stay dirty in the host
/// page cache, until the control holds; at most 3 times.
///
/// The host kernel writes dirty pages back on its own: once they are dirty_expire_centisecs old
/// (30 s by default, far longer than the scenarios take), and at once for every file whenever
/// the whole machine has more dirty data than its background threshold (another process
/// writing gigabytes). That can clean a control page within milliseconds, which proves nothing
/// about pmvm. Each attempt starts once the host's dirty level is calm, and only a control found
/// clean every time fails: a pmvm that wrote back unflushed pages would do it every time.
/// Every other assertion of an attempt is checked as usual.
fn with_fresh_control(test: &str, mut attempt: impl FnMut() -> Result<(), String>) {
    let mut failures = Vec::new();
    for n in 1..=3 {
        let host = wait_writeback_calm(Duration::from_secs(30));
        match attempt() {
            Ok(()) => return,
            Err(e) => {
                println!("{test}: attempt {n}: the control was clean: {e} (host: {host})");
                failures.push(format!("attempt {n}: {e}; host before it: {host}"));
            }
        }
    }
    panic!(
        "{test}: pages the guest never flushed were clean in every attempt: pmvm, or something \
         on the host (a sync(2) loop?), wrote them back\n{}",
        failures.join("\n")
    );
}

// ---- several devices ----

#[test]
fn eight_devices_flush_separately_and_the_nfit_places_each() {
    if !kvm_or_skip("eight devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip("eight devices", dir.path()) {
        return;
    }
    const N: u64 = 8;
    let files: Vec<PathBuf> = (0..N)
        .map(|i| dir.path().join(format!("d{i}.img")))
        .collect();
    let pmem: Vec<String> = files.iter().map(|f| pmem_arg(f, ",size=2M")).collect();
    // Device i: page i gets byte 0x10+i, then device i alone is flushed.
    let mut words = String::from("nfit");
    for i in 0..N {
        words += &format!(
            " write {i} {:#x} 0x1000 {:#x} flush {i}",
            i * PAGE,
            0x10 + i
        );
    }
    words += " mark ALL-FLUSHED wait";
    let g = Guest::boot(dir.path(), &words, &pmem, &[], false);
    g.wait_for("probe: MARK ALL-FLUSHED");

    let nfit = nfit_devices(&g.vm.lines());
    assert_eq!(nfit.len(), N as usize, "{nfit:?}");
    let devs = g.devices();
    assert_eq!(devs.len(), N as usize);
    let mut hint_pages = Vec::new();
    for (i, (n, d)) in nfit.iter().zip(&devs).enumerate() {
        assert_eq!(n.handle, i as u32 + 1, "{n:?}");
        assert_eq!(n.len, 2 * MIB, "{n:?}");
        assert_eq!(n.flags, 0, "{n:?}");
        assert_eq!(
            n.base % GIB,
            0,
            "device {i} base is not 1 GiB-aligned: {n:?}"
        );
        assert!(n.base >= 4 * GIB, "device {i} is below 4 GiB: {n:?}");
        if i > 0 {
            assert_eq!(
                n.base,
                nfit[i - 1].base + GIB,
                "2 MiB devices sit 1 GiB apart"
            );
        }
        // The NFIT says what the API says.
        assert_eq!(n.base, d.guest_base, "{d:?}");
        assert_eq!(n.hints, d.flush_hint_addresses, "{d:?}");
        assert_eq!(n.hints.len(), 1, "one vCPU, one default hint: {n:?}");
        hint_pages.push(n.hints[0] / PAGE);

        // Each device counted only its own flush and its own page.
        let s = &d.stats;
        assert_eq!(d.id, format!("pmem{i}"));
        assert_eq!(
            (
                s.flushes,
                s.pages_written,
                s.last_harvest_pages,
                s.runs,
                s.empty_flushes
            ),
            (1, 1, 1, 1, 0),
            "{d:?}"
        );
        let f = &files[i];
        let cs = page_cache(f, 0, 0);
        assert_eq!(
            (cs.nr_dirty, cs.nr_writeback),
            (0, 0),
            "{}: {cs:?}",
            f.display()
        );
        let on_disk = read_direct(f, 0, (2 * MIB) as usize).unwrap();
        for (page, bytes) in on_disk.chunks(PAGE as usize).enumerate() {
            let want = if page == i { 0x10 + i as u8 } else { 0 };
            assert!(
                bytes.iter().all(|&b| b == want),
                "{} page {page} should hold {want:#x}",
                f.display()
            );
        }
    }
    hint_pages.sort();
    hint_pages.dedup();
    assert_eq!(
        hint_pages.len(),
        N as usize,
        "each device has its own hint page"
    );
    let stderr = g.shutdown();
    for i in 0..N {
        assert!(
            stderr.contains(&format!(
                "pmem{i}: 1 flushes (0 empty) + 1 host flushes, 1 pages"
            )),
            "{stderr}"
        );
    }
}

// ---- hints ----

#[test]
fn hint_counts_give_that_many_aligned_hints_in_one_page() {
    if !kvm_or_skip("hints") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pmem: Vec<String> = [",size=2M,hints=4", ",size=2M,hints=16", ",size=2M"]
        .iter()
        .enumerate()
        .map(|(i, o)| pmem_arg(&dir.path().join(format!("h{i}.img")), o))
        .collect();
    // Three vCPUs: the device without hints= gets the default, 3 rounded up to 4.
    let g = Guest::boot(
        dir.path(),
        "nfit write 0 0 8 1 flush 0 mark NFIT wait",
        &pmem,
        &["--cpus", "3"],
        false,
    );
    g.wait_for("probe: MARK NFIT");
    let nfit = nfit_devices(&g.vm.lines());
    let devs = g.devices();
    let counts: Vec<usize> = nfit.iter().map(|n| n.hints.len()).collect();
    assert_eq!(counts, [4, 16, 4], "{nfit:?}");
    for (n, d) in nfit.iter().zip(&devs) {
        let page = n.hints[0] / PAGE;
        for (i, &h) in n.hints.iter().enumerate() {
            assert_eq!(h % 8, 0, "hint {h:#x} is not 8-byte aligned: {n:?}");
            assert_eq!(h / PAGE, page, "hint {h:#x} leaves the page: {n:?}");
            assert_eq!(h, n.hints[0] + 8 * i as u64, "hints are packed: {n:?}");
        }
        assert_eq!(n.hints, d.flush_hint_addresses, "{d:?}");
    }
    // The flush through the first of four hints is a flush like any other.
    let s = &devs[0].stats;
    assert_eq!((s.flushes, s.pages_written), (1, 1), "{:?}", devs[0]);
    g.shutdown();
}

// ---- wrong-width writes ----

#[test]
fn odd_width_hint_writes_flush_and_are_counted() {
    if !kvm_or_skip("odd width") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if !page_cache_or_skip("odd width", dir.path()) {
        return;
    }
    with_fresh_control("odd width", odd_width_once);
}

/// One boot of the odd-width scenario: 4-, 2- and 1-byte hint writes each flush what the
/// guest wrote before them. Err when the unflushed control page was found clean.
fn odd_width_once() -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.img");
    let mut g = Guest::boot(
        dir.path(),
        "write 0 0 0x1000 0x42 mark UNFLUSHED readline flushw 0 4 \
         write 0 0x1000 0x1000 0x43 flushw 0 2 write 0 0x2000 0x1000 0x44 flushw 0 1 \
         mark FLUSHED wait",
        &[pmem_arg(&img, ",size=2M")],
        &[],
        true,
    );
    g.wait_for("probe: MARK UNFLUSHED");
    // The control: before any hint write the page is dirty in the page cache.
    let cs = page_cache(&img, 0, PAGE);
    if cs.nr_dirty != 1 {
        return Err(format!("page 0 was clean before any flush: {cs:?}"));
    }
    g.vm.send(b"go\n").unwrap();
    g.wait_for("probe: MARK FLUSHED");
    let d = &g.devices()[0];
    let s = &d.stats;
    assert_eq!(
        (s.flushes, s.pages_written, s.bad_width_writes),
        (3, 3, 3),
        "{d:?}"
    );
    assert_eq!(
        page_cache(&img, 0, 3 * PAGE).nr_dirty,
        0,
        "after the flushes"
    );
    for (page, byte) in [(0u64, 0x42u8), (1, 0x43), (2, 0x44)] {
        assert_eq!(
            read_direct(&img, page * PAGE, 16).unwrap(),
            vec![byte; 16],
            "page {page}"
        );
    }
    g.shutdown();
    Ok(())
}

// ---- read-only devices and locks ----

/// A 2 MiB image whose page 0 holds 0x77 and the rest a per-page pattern.
fn patterned_image(path: &Path) -> Vec<u8> {
    let bytes: Vec<u8> = (0..2 * MIB)
        .map(|i| if i < PAGE { 0x77 } else { (i / PAGE) as u8 })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn readonly_device_drops_guest_writes_and_is_not_armed() {
    if !kvm_or_skip("readonly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.img");
    let original = patterned_image(&img);
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let ro = pmem_arg(&img, ",readonly=on");
    let g = Guest::boot(
        dir.path(),
        "nfit check 0 0 0x1000 0x77 write 0 0 0x1000 0x00 check 0 0 0x1000 0x77 \
         write 0 0x3000 0x10 0xee check 0 0x3000 0x10 0x03 flush 0 mark RO-DONE wait",
        std::slice::from_ref(&ro),
        &[],
        false,
    );
    g.wait_for("probe: MARK RO-DONE");
    let lines = g.vm.lines();
    // The writes reached pmvm and were dropped: every check still sees the old bytes.
    for want in [
        "probe: write dev=0 off=0x0 len=0x1000 ok",
        "probe: write dev=0 off=0x3000 len=0x10 ok",
        "probe: check dev=0 off=0x3000 len=0x10 ok",
    ] {
        assert!(
            lines.iter().any(|l| l == want),
            "no {want:?}\n{}",
            g.vm.transcript()
        );
    }
    let checks = lines
        .iter()
        .filter(|l| *l == "probe: check dev=0 off=0x0 len=0x1000 ok")
        .count();
    assert_eq!(checks, 2, "{}", g.vm.transcript());
    assert!(
        !lines.iter().any(|l| l.contains("mismatch")),
        "{}",
        g.vm.transcript()
    );
    let nfit = nfit_devices(&lines);
    assert_eq!(nfit[0].flags & 0x8, 0x8, "memdev lacks NOT_ARMED: {nfit:?}");
    let d = &g.devices()[0];
    assert!(d.readonly, "{d:?}");
    let s = &d.stats;
    assert_eq!(
        (s.flushes, s.empty_flushes, s.pages_written),
        (1, 1, 0),
        "{d:?}"
    );
    // The dropped stores are not hint writes of any kind.
    assert_eq!((s.outside_writes, s.bad_width_writes), (0, 0), "{d:?}");

    // While it runs: another read-only pmvm may share the file (both hold LOCK_SH) ...
    let (code, out, stderr) = run_probe("check 0 0 0x1000 0x77 mark SHARED poweroff", &[ro]);
    assert_eq!(code, Some(0), "second read-only pmvm: {stderr}");
    assert!(out.iter().any(|l| l == "probe: MARK SHARED"), "{out:?}");
    // ... but a writable one may not.
    let (code, _, stderr) = run_probe("poweroff", &[pmem_arg(&img, "")]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another pmvm"), "{stderr}");

    g.shutdown();
    // The last reader removed the path lock, under the default seccomp filter.
    assert!(!dir.path().join(".ro.img.pmvm-lock").exists());
    assert!(
        std::fs::read(&img).unwrap() == original,
        "the read-only file changed"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().modified().unwrap(), mtime);
}

#[test]
fn a_running_writable_device_locks_its_file_against_other_pmvms() {
    if !kvm_or_skip("lock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("rw.img");
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let g = Guest::boot(
        dir.path(),
        "mark RUNNING wait",
        &[pmem_arg(&img, ",size=2M")],
        &[],
        false,
    );
    g.wait_for("probe: MARK RUNNING");
    // The same path meets the first pmvm's path lock, which names it; another path to the
    // same file meets the lock on the file itself.
    let by_path = format!("is in use by pmvm pid {}", g.vm.pid());
    let by_inode = "is in use by another process (locked)".to_string();
    for (other, says) in [
        (pmem_arg(&img, ""), &by_path),
        (pmem_arg(&img, ",readonly=on"), &by_path),
        (pmem_arg(&link, ""), &by_inode),
    ] {
        let started = Instant::now();
        let (code, out, stderr) = run_probe("mark NEVER poweroff", std::slice::from_ref(&other));
        assert_eq!(code, Some(1), "--pmem {other}: {stderr}");
        let line = stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "--pmem {other}: {stderr}");
        assert!(
            line.starts_with("pmvm: ") && line.contains(says.as_str()),
            "--pmem {other}: {stderr}"
        );
        assert!(line.contains(other.trim_start_matches("path=").split(',').next().unwrap()));
        assert!(out.is_empty(), "the guest ran: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited for the lock"
        );
    }
    g.shutdown();
    // Released at exit: the next pmvm gets it.
    let (code, _, stderr) = run_probe("poweroff", &[pmem_arg(&link, "")]);
    assert_eq!(code, Some(0), "{stderr}");
}

// ---- bad --pmem arguments ----

/// Runs pmvm with `pmem` devices; it must exit 1 quickly with one `pmvm: ` line holding every
/// part of `expect`. Returns the line.
fn expect_pmem_error(pmem: &[String], expect: &[&str]) -> String {
    let started = Instant::now();
    let mut vm = Pmvm::spawn(&pmvm(), &probe_args("mark BOOTED poweroff", pmem, &[]));
    // A FIFO that pmvm opened for reading would block here forever.
    let (status, stderr) = vm.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(1), "{pmem:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{pmem:?}: not one line:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("pmvm: "), "{pmem:?}: {line}");
    for part in expect {
        assert!(
            line.contains(part),
            "{pmem:?}: expected {part:?} in\n{line}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        vm.lines().is_empty(),
        "{pmem:?}: the guest ran: {:?}",
        vm.lines()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{pmem:?} took {:?}",
        started.elapsed()
    );
    line.to_string()
}

#[test]
fn every_bad_pmem_argument_fails_with_one_clear_line() {
    // Argument checks run before KVM is opened; the file checks need it to get that far.
    let with_files = kvm_or_skip("bad --pmem files");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let new = d.join("new.img");
    let arg = |p: &Path, o: &str| pmem_arg(p, o);

    expect_pmem_error(&["size=2M".into()], &["--pmem has no path=FILE"]);
    expect_pmem_error(
        &[arg(&new, ",size=2M,colour=red")],
        &[
            "unknown key \"colour\"",
            "expected path, size, id, readonly or hints",
        ],
    );
    expect_pmem_error(
        &[arg(&new, ",size=2M,size=4M")],
        &["--pmem gives size= twice"],
    );
    expect_pmem_error(&[arg(&new, ",id=my.dev")], &["id=\"my.dev\" contains '.'"]);
    expect_pmem_error(
        &[
            arg(&d.join("a.img"), ",id=x"),
            arg(&d.join("b.img"), ",id=x"),
        ],
        &["devices #0 and #1 both have id \"x\"; ids must be unique"],
    );
    for bad in ["0", "17"] {
        expect_pmem_error(
            &[arg(&new, &format!(",size=2M,hints={bad}"))],
            &[&format!("hints=\"{bad}\" is not a number between 1 and 16")],
        );
    }
    let seventeen: Vec<String> = (0..17)
        .map(|i| arg(&d.join(format!("f{i}.img")), ",size=2M"))
        .collect();
    expect_pmem_error(
        &seventeen,
        &["17 --pmem devices given; at most 16 are supported"],
    );
    assert!(
        std::fs::read_dir(d).unwrap().next().is_none(),
        "a refused command line created files"
    );
    if !with_files {
        return;
    }

    let missing = d.join("missing.img");
    expect_pmem_error(
        &[arg(&missing, "")],
        &[
            &missing.display().to_string(),
            "does not exist; add size=SIZE",
        ],
    );
    // A device that fails takes along the files pmvm created for the devices before it: a
    // refused command line leaves nothing behind.
    let created = d.join("created.img");
    expect_pmem_error(
        &[arg(&created, ",size=2M"), arg(&missing, "")],
        &["missing.img does not exist"],
    );
    assert!(
        !created.exists(),
        "a failed start left {} behind",
        created.display()
    );
    expect_pmem_error(
        &[arg(&created, ",size=2M"), arg(&created, ",size=2M")],
        &["are the same file"],
    );
    assert!(
        !created.exists(),
        "a failed start left {} behind",
        created.display()
    );
    let small = d.join("pmem.img");
    File::create(&small).unwrap().set_len(GIB).unwrap();
    expect_pmem_error(
        &[arg(&small, ",size=3G")],
        &[&format!(
            "size=3G exceeds file length 1G of {}",
            small.display()
        )],
    );
    expect_pmem_error(
        &[arg(&new, ",size=3M")],
        &[
            "size=3M",
            "not a positive multiple of 2 MiB",
            "try size=2M or size=4M",
        ],
    );
    assert!(!new.exists(), "a refused size created {}", new.display());
    let odd = d.join("odd.img");
    File::create(&odd).unwrap().set_len(3 * MIB).unwrap();
    expect_pmem_error(
        &[arg(&odd, "")],
        &["is 3145728 bytes long", "give size=2M or size=4M"],
    );
    let link = d.join("link.img");
    std::os::unix::fs::symlink(&small, &link).unwrap();
    for second in [&small, &link] {
        expect_pmem_error(
            &[arg(&small, ""), arg(second, "")],
            &[
                &format!("--pmem pmem1: pmem1 ({})", second.display()),
                &format!("pmem0 ({}) are the same file", small.display()),
            ],
        );
    }
    expect_pmem_error(&[arg(d, "")], &["is a directory, not a regular file"]);
    expect_pmem_error(
        &[arg(d, ",size=2M")],
        &["is a directory, not a regular file"],
    );
    let fifo = d.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for opts in ["", ",readonly=on", ",size=2M"] {
        expect_pmem_error(&[arg(&fifo, opts)], &["is a FIFO, not a regular file"]);
    }
    let locked = d.join("locked.img");
    File::create(&locked).unwrap().set_len(2 * MIB).unwrap();
    let held = hold_lock(&locked);
    for opts in ["", ",readonly=on"] {
        expect_pmem_error(
            &[arg(&locked, opts)],
            &[&format!(
                "{} is in use by another process (locked)",
                locked.display()
            )],
        );
    }
    drop(held);
    let (code, _, stderr) = run_probe("poweroff", &[arg(&locked, "")]);
    assert_eq!(code, Some(0), "after the lock was released: {stderr}");
}

/// Truncates `path` to nothing, as another process could while the guest runs.
fn truncate_behind_pmvm(path: &Path) {
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .unwrap_or_else(|e| panic!("truncating {}: {e}", path.display()));
}

/// A backing file truncated by another process while the guest runs: whichever flush finds it,
/// the guest's or the API's, pmvm stops with exit 1 and one line naming the file and its new
/// length, and never dies of SIGBUS.
#[test]
fn a_backing_file_truncated_while_the_guest_runs_stops_pmvm_with_one_line() {
    if !kvm_or_skip("truncated backing file") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    let mut vm = Pmvm::spawn_with_input(
        &pmvm(),
        &probe_args(
            "write 0 0 0x1000 0xab flush 0 readline write 0 0x100000 0x1000 0xcd flush 0 \
             mark SURVIVED poweroff",
            &[pmem_arg(&img, ",size=64M")],
            &[],
        ),
    );
    vm.wait_for("probe: reading", BOOT).unwrap();
    truncate_behind_pmvm(&img);
    vm.send(b"go\n").unwrap();
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    let expect_one_line = |status: std::process::ExitStatus, stderr: &str, what: &str| {
        assert_eq!(status.code(), Some(1), "{what}: {status:?}\n{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("shrank")).collect();
        assert_eq!(lines.len(), 1, "{what}: one line about it\n{stderr}");
        assert!(
            lines[0].starts_with("pmvm: pmem0: backing file ")
                && lines[0].contains(&img.display().to_string())
                && lines[0].contains("shrank to 0 bytes"),
            "{what}: {}",
            lines[0]
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    };
    expect_one_line(status, &stderr, "guest flush");
    assert!(
        !vm.lines().iter().any(|l| l.contains("MARK SURVIVED")),
        "the guest must not run on past the failed flush"
    );

    // The API's flush finds it: a JSON error, then the same stop.
    std::fs::remove_file(&img).unwrap();
    let g = Guest::boot(
        dir.path(),
        "write 0 0 0x1000 0xab mark WROTE wait",
        &[pmem_arg(&img, ",size=64M")],
        &[],
        false,
    );
    g.wait_for("MARK WROTE");
    truncate_behind_pmvm(&img);
    let r = g.client().send("PUT", "/v1/pmem/pmem0/flush", b"").unwrap();
    assert_eq!(r.status, 500, "{}", r.text());
    let error = r.error_message().unwrap_or_default();
    assert!(error.contains("shrank to 0 bytes"), "{}", r.text());
    let mut vm = g.vm;
    let (status, stderr) = vm.wait_exit(BOOT).unwrap();
    expect_one_line(status, &stderr, "API flush");
}
