//! The control socket against a running probe guest: exact flush counts on two devices, host
//! flushes, pause and resume, shutdown, the client subcommands, the socket's life cycle, bad
//! input and load, and guest and host flushes racing on one device.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pmvm::api::error_chain;
use pmvm_tests::types::{FlushReport, PmemInfo, PmemList, VmInfo, VmState};
use pmvm_tests::{
    auto_dirty_tracking, cachestat, kvm_or_skip, page_cache_or_skip, probe_elf, Client,
    ClientResponse, Pmvm,
};
use serde::de::DeserializeOwned;

const BOOT: Duration = Duration::from_secs(60);
/// How long one exchange with the socket may take before the test calls it hung.
const REPLY: Duration = Duration::from_secs(30);

fn pmvm() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pmvm"))
}

// ---- requests through pmvm's own client ----

/// Sends `raw` bytes, whatever they are, on a fresh connection and reads the response.
fn exchange(sock: &Path, raw: &[u8]) -> Result<ClientResponse, String> {
    Client::new(sock)
        .with_timeout(REPLY)
        .exchange(raw)
        .map_err(|e| error_chain(&e))
}

/// Reads the response to whatever was sent on `stream`.
fn read_reply(sock: &Path, stream: &mut UnixStream) -> Result<ClientResponse, String> {
    Client::new(sock)
        .with_timeout(REPLY)
        .read_response(stream)
        .map_err(|e| error_chain(&e))
}

fn request(sock: &Path, method: &str, path: &str) -> ClientResponse {
    Client::new(sock)
        .with_timeout(REPLY)
        .send(method, path, b"")
        .unwrap_or_else(|e| panic!("{method} {path}: {}", error_chain(&e)))
}

fn get(sock: &Path, path: &str) -> ClientResponse {
    request(sock, "GET", path)
}

fn put(sock: &Path, path: &str) -> ClientResponse {
    request(sock, "PUT", path)
}

/// The body of a 2xx response as the document `T`.
fn doc<T: DeserializeOwned>(r: &ClientResponse) -> T {
    assert!((200..300).contains(&r.status), "{}: {}", r.status, r.text());
    r.json()
        .unwrap_or_else(|e| panic!("not the expected document ({e}): {}", r.text()))
}

/// The message of a JSON error response.
fn error(r: &ClientResponse) -> String {
    r.error_message()
        .unwrap_or_else(|| panic!("no error message in {}", r.text()))
}

/// `GET /v1/pmem/{id}`, checked for 200.
fn pmem(sock: &Path, id: &str) -> PmemInfo {
    doc(&get(sock, &format!("/v1/pmem/{id}")))
}

/// `GET /v1/vm`, checked for 200.
fn vm_state(sock: &Path) -> VmState {
    doc::<VmInfo>(&get(sock, "/v1/vm")).state
}

// ---- running pmvm with the probe and a control socket ----

/// A pmvm serving `sock`, with its pmem files in `dir`.
struct Guest {
    vm: Pmvm,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

/// Arguments for the probe running `words` with one `--pmem` per entry of `pmem` (its
/// options after `path=`; the files are `p0.img`, `p1.img`, ... in `dir`).
fn probe_args(words: &str, dir: &Path, sock: &Path, pmem: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        probe_elf().display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 -- {words}"),
        "--api-sock".into(),
        sock.display().to_string(),
    ];
    for (i, opts) in pmem.iter().enumerate() {
        args.push("--pmem".into());
        args.push(format!("path={}/p{i}.img,{opts}", dir.display()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A fresh directory for a test's socket and pmem files, and the socket's path in it.
fn fresh_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    (dir, sock)
}

/// Starts the probe with pmem devices `pmem` and waits until the socket answers.
fn boot(words: &str, pmem: &[&str]) -> Guest {
    let (dir, sock) = fresh_dir();
    boot_in(dir, sock, words, pmem, &[], false)
}

/// Starts the probe serving `sock`, with its pmem files in `dir` and `extra` pmvm options;
/// with `input`, the test can type at the guest's console.
fn boot_in(
    dir: tempfile::TempDir,
    sock: PathBuf,
    words: &str,
    pmem: &[&str],
    extra: &[&str],
    input: bool,
) -> Guest {
    let args = probe_args(words, dir.path(), &sock, pmem, extra);
    let vm = if input {
        Pmvm::spawn_with_input(&pmvm(), &args)
    } else {
        Pmvm::spawn(&pmvm(), &args)
    };
    let guest = Guest { vm, dir, sock };
    guest.wait_serving();
    guest
}

impl Guest {
    fn wait_serving(&self) {
        let deadline = Instant::now() + BOOT;
        loop {
            if let Ok(r) = exchange(&self.sock, b"GET /v1/vm HTTP/1.1\r\n\r\n") {
                assert_eq!(r.status, 200, "{}", r.text());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never answered\n{}",
                self.sock.display(),
                self.vm.transcript()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("p{i}.img"))
    }

    /// Index of the console's latest `probe: counter` line (0 if none yet).
    fn counter_lines(&self) -> usize {
        self.vm
            .lines()
            .iter()
            .filter(|l| l.starts_with("probe: counter "))
            .count()
    }

    /// Waits for a `probe: counter` line after the `seen`-th one.
    fn wait_counter_after(&self, seen: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.counter_lines() <= seen {
            if Instant::now() >= deadline {
                return Err(format!(
                    "no counter line after {seen} within {timeout:?}\n{}",
                    self.vm.transcript()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Shuts the VM down through the API; pmvm must exit 0 and remove the socket.
    fn shutdown(mut self) -> String {
        let r = put(&self.sock, "/v1/vm/shutdown");
        assert_eq!(r.status, 204, "{}", r.text());
        let (status, stderr) = self.vm.wait_exit(BOOT).unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.vm.transcript());
        assert!(
            !self.sock.exists(),
            "pmvm left {} behind",
            self.sock.display()
        );
        stderr
    }
}

/// Runs `pmvm ARGS` as a client; returns (exit code, stdout, stderr).
fn client(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(pmvm()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read_file_range(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[offset..offset + len].to_vec()
}

// ---- the tests ----

#[test]
fn guest_flushes_on_two_devices_are_counted_exactly_and_host_flush_reports_pages() {
    if !kvm_or_skip("api flush counts") {
        return;
    }
    // pmem0: one flush of one page, then two pages written and left unflushed.
    // pmem1: one flush of two pages, then a second flush that finds nothing.
    let g = boot(
        "write 0 0 0x1000 0x11 flush 0 \
         write 1 0 0x2000 0x22 flush 1 flush 1 \
         write 0 0x3000 0x2000 0x33 counter",
        &["size=64M", "size=64M,hints=2"],
    );
    g.vm.wait_for("probe: counter 0", BOOT).unwrap();

    let list = get(&g.sock, "/v1/pmem");
    assert_eq!(list.status, 200, "{}", list.text());
    assert!(list
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("application/json")));
    let list: PmemList = doc(&list);
    assert_eq!(list.devices.len(), 2, "{list:?}");
    let (d0, d1) = (&list.devices[0], &list.devices[1]);
    assert_eq!(d0.id, "pmem0");
    assert_eq!(d1.id, "pmem1");
    assert_eq!(d0.path, g.file(0).display().to_string());
    assert_eq!(d0.size_bytes, 64 << 20);
    assert_eq!(d0.flush_hint_count, 1);
    assert_eq!(d1.flush_hint_count, 2);
    assert_eq!(d1.flush_hint_addresses.len(), 2);
    assert!(!d0.readonly);

    let s0 = &d0.stats;
    assert_eq!(s0.flushes, 1, "{d0:?}");
    assert_eq!(s0.empty_flushes, 0, "{d0:?}");
    assert_eq!(s0.pages_written, 1, "{d0:?}");
    assert_eq!(s0.bytes_written, 4096, "{d0:?}");
    assert_eq!(s0.host_flushes, 0, "{d0:?}");
    assert_eq!(d0.pending_dirty_pages, Some(2), "{d0:?}");
    let s1 = &d1.stats;
    assert_eq!(s1.flushes, 2, "{d1:?}");
    assert_eq!(s1.empty_flushes, 1, "{d1:?}");
    assert_eq!(s1.pages_written, 2, "{d1:?}");
    assert_eq!(s1.runs, 1, "{d1:?}");
    assert_eq!(s1.host_flushes, 0, "{d1:?}");
    assert_eq!(d1.pending_dirty_pages, Some(0), "{d1:?}");

    // The one-device view is the same document as the list's element.
    assert_eq!(pmem(&g.sock, "pmem1").stats.flushes, 2);

    // In the host's page cache, what the guest flushed is on disk and the rest is dirty.
    let page_cache = page_cache_or_skip("api host flush: page-cache checks", g.dir.path());
    if page_cache {
        let cs = cachestat(&g.file(0), 0, 0x1000).unwrap();
        assert_eq!(
            (cs.nr_dirty, cs.nr_writeback),
            (0, 0),
            "pmem0 page 0: {cs:?}"
        );
        // Only the host flush should clean these, but a sync anywhere on the host (another
        // test, the kernel under dirty-memory pressure) can get there first.
        let cs = cachestat(&g.file(0), 0x3000, 0x2000).unwrap();
        assert!(cs.nr_dirty <= 2, "pmem0 pages 3-4: {cs:?}");
        if cs.nr_dirty < 2 {
            println!(
                "note: the host kernel wrote back {} of pmem0's unflushed pages on its own; \
                 the page-cache check after the host flush proves less this run",
                2 - cs.nr_dirty
            );
        }
        let cs = cachestat(&g.file(1), 0, 0x2000).unwrap();
        assert_eq!(
            (cs.nr_dirty, cs.nr_writeback),
            (0, 0),
            "pmem1 pages 0-1: {cs:?}"
        );
    }

    // A host flush writes back exactly the two pages the guest left dirty.
    let r = put(&g.sock, "/v1/pmem/pmem0/flush");
    assert_eq!(r.status, 200, "{}", r.text());
    let report: FlushReport = doc(&r);
    assert_eq!(report.pages, 2, "{report:?}");
    assert_eq!(report.bytes, 8192, "{report:?}");
    assert_eq!(report.runs, 1, "{report:?}");
    assert_eq!(
        read_file_range(&g.file(0), 0x3000, 0x2000),
        vec![0x33; 0x2000]
    );
    if page_cache {
        let cs = cachestat(&g.file(0), 0, 0).unwrap();
        assert_eq!(
            (cs.nr_dirty, cs.nr_writeback),
            (0, 0),
            "pmem0 after the host flush: {cs:?}"
        );
    }
    let d0 = pmem(&g.sock, "pmem0");
    assert_eq!(
        d0.stats.flushes, 1,
        "host flush counted as a guest one: {d0:?}"
    );
    assert_eq!(d0.stats.host_flushes, 1, "{d0:?}");
    assert_eq!(d0.stats.pages_written, 3, "{d0:?}");
    assert_eq!(d0.pending_dirty_pages, Some(0), "{d0:?}");

    // Nothing is left: the next host flush writes nothing, and is still counted.
    let report: FlushReport = doc(&put(&g.sock, "/v1/pmem/pmem0/flush"));
    assert_eq!(report.pages, 0, "{report:?}");
    let d0 = pmem(&g.sock, "pmem0");
    assert_eq!(d0.stats.host_flushes, 2, "{d0:?}");
    assert_eq!(d0.stats.pages_written, 3, "{d0:?}");
    // The other device was not touched.
    assert_eq!(pmem(&g.sock, "pmem1").stats.host_flushes, 0);

    let r = put(&g.sock, "/v1/pmem/nope/flush");
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(error(&r).contains("\"nope\""), "{}", r.text());

    // Prometheus text carries the same counters, per device.
    let m = get(&g.sock, "/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(
        m.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = m.text();
    for line in [
        "# TYPE pmvm_pmem_flushes_total counter",
        "pmvm_pmem_flushes_total{id=\"pmem0\"} 1",
        "pmvm_pmem_flushes_total{id=\"pmem1\"} 2",
        "pmvm_pmem_host_flushes_total{id=\"pmem0\"} 2",
        "pmvm_pmem_host_flushes_total{id=\"pmem1\"} 0",
        "pmvm_pmem_empty_flushes_total{id=\"pmem1\"} 1",
        "pmvm_pmem_pages_written_total{id=\"pmem0\"} 3",
        "pmvm_pmem_writebacks_total{id=\"pmem0\"} 3",
        "pmvm_pmem_writebacks_total{id=\"pmem1\"} 2",
        "pmvm_pmem_writeback_errors_total{id=\"pmem0\"} 0",
        "pmvm_vm_state{state=\"running\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    // Shutting down writes back once more per writable device, counted as a host flush.
    let stderr = g.shutdown();
    assert!(
        stderr.contains("pmem0: 1 flushes (0 empty) + 3 host flushes, 3 pages"),
        "{stderr}"
    );
    assert!(
        stderr.contains("pmem1: 2 flushes (1 empty) + 1 host flushes, 2 pages"),
        "{stderr}"
    );
}

#[test]
fn pause_holds_the_vcpu_and_resume_releases_it() {
    if !kvm_or_skip("api pause") {
        return;
    }
    // Two vCPUs: the one the probe leaves waiting for a SIPI must pause too.
    let (dir, sock) = fresh_dir();
    let g = boot_in(dir, sock, "counter", &["size=64M"], &["--cpus", "2"], false);
    g.vm.wait_for("probe: counter 2", BOOT).unwrap();

    let r = put(&g.sock, "/v1/vm/pause");
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(vm_state(&g.sock), VmState::Paused);
    // Lines the vCPU wrote before the pause may still be in the pipe.
    std::thread::sleep(Duration::from_millis(300));
    let held = g.counter_lines();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        g.counter_lines(),
        held,
        "the guest ran while paused\n{}",
        g.vm.transcript()
    );

    let again = put(&g.sock, "/v1/vm/pause");
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(error(&again), "cannot pause the VM while it is paused");
    // Reads and host flushes still work while paused.
    assert_eq!(put(&g.sock, "/v1/pmem/pmem0/flush").status, 200);

    let r = put(&g.sock, "/v1/vm/resume");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(vm_state(&g.sock), VmState::Running);
    g.wait_counter_after(held, Duration::from_secs(10)).unwrap();
    g.wait_counter_after(held + 3, Duration::from_secs(10))
        .unwrap();

    let again = put(&g.sock, "/v1/vm/resume");
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(error(&again), "cannot resume the VM while it is running");

    // A paused VM can be shut down.
    assert_eq!(put(&g.sock, "/v1/vm/pause").status, 204);
    g.shutdown();
}

#[test]
fn client_subcommands_drive_a_running_guest() {
    if !kvm_or_skip("api client") {
        return;
    }
    let g = boot(
        "write 0 0 0x1000 0x44 flush 0 write 1 0 0x3000 0x55 counter",
        &["size=64M", "size=64M"],
    );
    g.vm.wait_for("probe: counter 0", BOOT).unwrap();
    let sock = g.sock.to_str().unwrap().to_string();
    let s = ["--api-sock", sock.as_str()];

    let (code, out, err) = client(&["stats", s[0], s[1]]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("VM running, up ") && lines[0].contains("1 vCPU, 512 MiB RAM"),
        "{out}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "FLUSHES", "PAGES", "MiB", "WRITTEN", "P50", "us", "P99", "us", "MAX", "us",
            "PENDING", "TRACKING"
        ],
        "{out}"
    );
    let row0: Vec<&str> = lines[2].split_whitespace().collect();
    let row1: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(row0.len(), 9, "{out}");
    let auto = auto_dirty_tracking();
    assert_eq!(
        (row0[0], row0[1], row0[2], row0[7], row0[8]),
        ("pmem0", "1", "1", "0", auto),
        "{out}"
    );
    assert_eq!(
        (row1[0], row1[1], row1[2], row1[7], row1[8]),
        ("pmem1", "0", "0", "3", auto),
        "{out}"
    );

    let (code, out, err) = client(&["stats", "--json", s[0], s[1]]);
    assert_eq!(code, Some(0), "{err}");
    let list: PmemList = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(list.devices[1].pending_dirty_pages, Some(3), "{list:?}");

    // `flush --id` writes back one device, `flush` all of them.
    let (code, out, err) = client(&["flush", "--id", "pmem1", s[0], s[1]]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("pmem1: wrote 3 pages (12 KiB) in 1 run, "),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    let (code, out, err) = client(&["flush", s[0], s[1]]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("pmem0: wrote 0 pages"), "{out}");
    assert!(lines[1].starts_with("pmem1: wrote 0 pages"), "{out}");
    assert_eq!(pmem(&g.sock, "pmem1").stats.host_flushes, 2);
    assert_eq!(pmem(&g.sock, "pmem0").stats.host_flushes, 1);

    let (code, out, err) = client(&["flush", "--id", "nope", s[0], s[1]]);
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("failed with 404"), "{err}");

    let (code, out, err) = client(&["pause", s[0], s[1]]);
    assert_eq!((code, out.as_str()), (Some(0), "paused\n"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    let held = g.counter_lines();
    let (code, _, err) = client(&["pause", s[0], s[1]]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim_end(),
        "pmvm: PUT /v1/vm/pause failed with 409: cannot pause the VM while it is paused"
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(g.counter_lines(), held, "{}", g.vm.transcript());
    let (code, out, err) = client(&["resume", s[0], s[1]]);
    assert_eq!((code, out.as_str()), (Some(0), "resumed\n"), "{err}");
    g.wait_counter_after(held, Duration::from_secs(10)).unwrap();

    let Guest {
        mut vm,
        dir: _dir,
        sock: path,
    } = g;
    let (code, out, err) = client(&["shutdown", s[0], s[1]]);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "shutdown requested\n"),
        "{err}"
    );
    let (status, _) = vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vm.transcript());
    assert!(!path.exists());

    // The socket is gone now: one clear line and a non-zero exit, for every subcommand.
    for cmd in ["stats", "flush", "pause", "resume", "shutdown"] {
        let (code, out, err) = client(&[cmd, s[0], s[1]]);
        assert_eq!(code, Some(1), "{cmd}: {err}");
        assert!(out.is_empty(), "{cmd}: {out}");
        assert_eq!(
            err,
            format!(
                "pmvm: cannot connect to pmvm at {sock}: no such socket \
                 (is pmvm running with --api-sock {sock}?)\n"
            ),
            "{cmd}"
        );
    }
    // A socket file nobody listens on: the pmvm that made it died.
    drop(UnixListener::bind(&path).unwrap());
    let (code, out, err) = client(&["stats", s[0], s[1]]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err,
        format!("pmvm: cannot connect to pmvm at {sock}: connection refused (stale socket)\n")
    );
}

#[test]
fn socket_is_private_replaces_a_stale_one_and_refuses_a_live_one() {
    if !kvm_or_skip("api socket life cycle") {
        return;
    }
    // A dead pmvm's socket is in the way.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(UnixStream::connect(&sock).is_err());
    let mut g = boot_in(dir, sock.clone(), "counter", &[], &[], false);
    g.vm.wait_for("probe: counter 0", BOOT).unwrap();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Nothing of the private staging directory is left beside it.
    let entries: Vec<_> = std::fs::read_dir(g.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["api.sock"], "{entries:?}");

    // A second pmvm on the same path fails in one line and leaves the first serving.
    let second_args = probe_args("counter", g.dir.path(), &sock, &[], &[]);
    let mut second = Pmvm::spawn(&pmvm(), &second_args);
    let (status, stderr) = second.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(1), "{}", second.transcript());
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [format!(
            "pmvm: --api-sock: another pmvm is serving {:?}",
            sock.display().to_string()
        )]
    );
    assert_eq!(get(&sock, "/v1/vm").status, 200);

    // The directory must exist.
    let missing = g.dir.path().join("missing");
    let bad_sock = missing.join("api.sock");
    let mut third = Pmvm::spawn(
        &pmvm(),
        &probe_args("counter", g.dir.path(), &bad_sock, &[], &[]),
    );
    let (status, stderr) = third.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(1), "{}", third.transcript());
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [format!(
            "pmvm: --api-sock: cannot create the API socket {:?}: directory {:?} does not \
             exist; create it first",
            bad_sock.display().to_string(),
            missing.display().to_string()
        )]
    );
    assert!(!missing.exists());

    // Something that is not a socket is never replaced.
    let plain = g.dir.path().join("notes.txt");
    std::fs::write(&plain, b"keep me").unwrap();
    let mut fourth = Pmvm::spawn(
        &pmvm(),
        &probe_args("counter", g.dir.path(), &plain, &[], &[]),
    );
    let (status, stderr) = fourth.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(1), "{}", fourth.transcript());
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");

    // SIGTERM stops the first cleanly and removes its socket.
    g.vm.signal(libc::SIGTERM);
    let (status, _) = g.vm.wait_exit(BOOT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", g.vm.transcript());
    assert!(!sock.exists(), "socket left behind after SIGTERM");
}

#[test]
fn bad_input_and_load_leave_pmvm_serving() {
    if !kvm_or_skip("api bad input and load") {
        return;
    }
    let g = boot("counter", &["size=64M"]);
    g.vm.wait_for("probe: counter 0", BOOT).unwrap();
    let sock = g.sock.clone();

    // A client that connects and says nothing gets 408 after the server's 5 s timeout; the
    // rest of this test runs meanwhile, so the server must keep serving others.
    let idle = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut stream = Client::new(&sock).connect().unwrap();
            let reply = read_reply(&sock, &mut stream);
            (reply, started.elapsed())
        })
    };

    let raw = |bytes: &[u8]| exchange(&sock, bytes).unwrap();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("malformed request line", b"NONSENSE\r\n\r\n".to_vec(), 400),
        ("no path", b"GET\r\n\r\n".to_vec(), 400),
        ("bad version", b"GET /v1/vm HTTP/7.0\r\n\r\n".to_vec(), 400),
        ("binary junk", b"\x00\x01\x02\xff\r\n\r\n".to_vec(), 400),
        (
            "bad Content-Length",
            b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: lots\r\n\r\n".to_vec(),
            400,
        ),
        (
            "unknown path",
            b"GET /v1/nothing HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        (
            "unknown device",
            b"GET /v1/pmem/pmem9 HTTP/1.1\r\n\r\n".to_vec(),
            404,
        ),
        (
            "unknown method",
            b"BREW /v1/pmem HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        (
            "wrong method",
            b"DELETE /v1/vm HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        (
            "GET on an action",
            b"GET /v1/vm/pause HTTP/1.1\r\n\r\n".to_vec(),
            405,
        ),
        (
            "invalid JSON",
            b"PUT /v1/pmem/pmem0/flush HTTP/1.1\r\nContent-Length: 7\r\n\r\n{flush:".to_vec(),
            400,
        ),
        (
            "chunked body",
            b"PUT /v1/pmem/pmem0/flush HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            411,
        ),
    ];
    for (what, bytes, status) in &cases {
        let r = raw(bytes);
        assert_eq!(r.status, *status, "{what}: {}", r.text());
        assert!(!error(&r).is_empty(), "{what}");
    }
    let r = raw(b"DELETE /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(r.header("Allow"), Some("GET"));
    let r = raw(b"PUT /v1/pmem/pmem0/flush HTTP/1.1\r\nContent-Length: 7\r\n\r\n{flush:");
    assert!(error(&r).starts_with("invalid JSON body"), "{}", r.text());

    // Over 64 KiB of body, sent whole: refused from its Content-Length.
    let big = 64 * 1024 + 1;
    let mut req =
        format!("PUT /v1/pmem/pmem0/flush HTTP/1.1\r\nContent-Length: {big}\r\n\r\n").into_bytes();
    req.resize(req.len() + big, b' ');
    let r = raw(&req);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        error(&r),
        "request body of 65537 bytes exceeds the limit of 65536 bytes"
    );
    // Headers past 8 KiB.
    let mut req = b"GET /v1/vm HTTP/1.1\r\nX-Pad: ".to_vec();
    req.resize(req.len() + 9000, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw(&req).status, 431);
    // None of it was taken as a flush.
    assert_eq!(pmem(&sock, "pmem0").stats.host_flushes, 0);

    // 200 connections open at once, then each sends its request: all are answered.
    let started = Instant::now();
    let mut streams: Vec<UnixStream> = (0..200)
        .map(|i| {
            Client::new(&sock)
                .connect()
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    for s in &mut streams {
        s.write_all(b"GET /v1/pmem HTTP/1.1\r\n\r\n").unwrap();
    }
    for (i, s) in streams.iter_mut().enumerate() {
        let r = read_reply(&sock, s).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(r.status, 200, "connection {i}: {}", r.text());
        assert_eq!(doc::<PmemList>(&r).devices[0].id, "pmem0");
    }
    drop(streams);
    println!(
        "200 concurrent connections answered in {:?}",
        started.elapsed()
    );

    // 10,000 requests one after another.
    let started = Instant::now();
    for i in 0..10_000 {
        let r = exchange(&sock, b"GET /v1/pmem HTTP/1.1\r\n\r\n")
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let took = started.elapsed();
    println!("10000 sequential GET /v1/pmem in {took:?}");
    assert!(
        took < Duration::from_secs(120),
        "10000 requests took {took:?}"
    );

    let (reply, waited) = idle.join().unwrap();
    let reply = reply.unwrap();
    assert_eq!(reply.status, 408, "{}", reply.text());
    assert_eq!(error(&reply), "no complete request within 5.0 s");
    assert!(
        waited >= Duration::from_millis(4900) && waited < Duration::from_secs(30),
        "408 after {waited:?}"
    );

    // Still serving, and the guest still runs.
    let seen = g.counter_lines();
    assert_eq!(vm_state(&sock), VmState::Running);
    g.wait_counter_after(seen, Duration::from_secs(10)).unwrap();
    g.shutdown();
}

#[test]
fn guest_and_host_flushes_racing_on_one_device_are_all_counted() {
    if !kvm_or_skip("api concurrent flushes") {
        return;
    }
    // The guest holds at `readline` until the host's flushes are under way.
    const ROUNDS: u64 = 400;
    let (dir, sock) = fresh_dir();
    let mut g = boot_in(
        dir,
        sock,
        &format!("readline flushes 0 {ROUNDS} mark FLUSHED counter"),
        &["size=64M"],
        &[],
        true,
    );
    g.vm.wait_for("probe: reading", BOOT).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let hammers: Vec<_> = (0..2)
        .map(|_| {
            let (sock, stop, puts) = (g.sock.clone(), stop.clone(), puts.clone());
            std::thread::spawn(move || {
                let mut ok = 0u64;
                let mut caught_pages = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let r = put(&sock, "/v1/pmem/pmem0/flush");
                    assert_eq!(r.status, 200, "{}", r.text());
                    ok += 1;
                    puts.fetch_add(1, Ordering::AcqRel);
                    caught_pages += doc::<FlushReport>(&r).pages;
                }
                (ok, caught_pages)
            })
        })
        .collect();
    // Watches the guest's count move while host flushes run.
    let watcher = {
        let (sock, stop) = (g.sock.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut mid_run = 0u64;
            while !stop.load(Ordering::Acquire) {
                let s = pmem(&sock, "pmem0").stats;
                if s.flushes > 0 && s.flushes < ROUNDS && s.host_flushes > 0 {
                    mid_run += 1;
                }
            }
            mid_run
        })
    };
    while puts.load(Ordering::Acquire) < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    g.vm.send(b"go\n").unwrap();
    let flushed = g.vm.wait_for("probe: MARK FLUSHED", BOOT);
    stop.store(true, Ordering::Release);
    let mut host_ok = 0;
    let mut caught = 0;
    for h in hammers {
        let (ok, pages) = h.join().unwrap();
        host_ok += ok;
        caught += pages;
    }
    let mid_run = watcher.join().unwrap();
    flushed.unwrap();
    g.vm.wait_for(&format!("probe: flushes dev=0 n={ROUNDS} done"), BOOT)
        .unwrap();

    let d = pmem(&g.sock, "pmem0");
    let s = &d.stats;
    assert_eq!(s.flushes, ROUNDS, "{d:?}");
    assert_eq!(s.host_flushes, host_ok, "{d:?}");
    assert_eq!(s.errors, 0, "{d:?}");
    // Each round dirties page 0 once and each writeback writes it at most once; flushes that
    // met in one writeback share it. Hardware KVM may report one store's page again when the
    // host's flush re-protects it while the store is faulting it in (404 page writes for 400
    // rounds under nested SVM), so the bound is the writebacks, not the rounds.
    assert!(
        s.pages_written >= 1 && s.pages_written <= s.writebacks,
        "{d:?}"
    );
    assert!(s.writebacks <= ROUNDS + host_ok, "{d:?}");
    assert!(s.empty_flushes < ROUNDS, "{d:?}");
    // The guest's last flush left nothing behind.
    assert_eq!(d.pending_dirty_pages, Some(0), "{d:?}");
    println!(
        "{ROUNDS} guest flushes, {host_ok} host flushes ({caught} pages caught by the host), \
         {mid_run} snapshots mid-run, {} empty guest flushes",
        s.empty_flushes
    );
    assert!(
        mid_run > 0,
        "no snapshot saw host flushes while the guest was flushing; the race was not exercised"
    );
    // The last round's byte is in the file, and on disk: nothing is left dirty.
    assert_eq!(read_file_range(&g.file(0), 0, 1), [(ROUNDS & 0xff) as u8]);
    if page_cache_or_skip("api concurrent flushes: page-cache check", g.dir.path()) {
        let cs = cachestat(&g.file(0), 0, 0).unwrap();
        assert_eq!((cs.nr_dirty, cs.nr_writeback), (0, 0), "{cs:?}");
    }
    g.shutdown();
}

#[test]
fn pausing_and_resuming_during_guest_flushes_loses_none() {
    if !kvm_or_skip("api pause during flushes") {
        return;
    }
    const ROUNDS: u64 = 300;
    let (dir, sock) = fresh_dir();
    let mut g = boot_in(
        dir,
        sock,
        &format!("readline flushes 0 {ROUNDS} mark FLUSHED counter"),
        &["size=64M"],
        &[],
        true,
    );
    g.vm.wait_for("probe: reading", BOOT).unwrap();
    g.vm.send(b"go\n").unwrap();
    let mut cycles = 0;
    let mut paused_mid_run = 0;
    let deadline = Instant::now() + BOOT;
    while !g.vm.lines().iter().any(|l| l == "probe: MARK FLUSHED") {
        assert!(Instant::now() < deadline, "{}", g.vm.transcript());
        let r = put(&g.sock, "/v1/vm/pause");
        assert_eq!(r.status, 204, "{}", r.text());
        // While paused the count holds still.
        let before = pmem(&g.sock, "pmem0").stats.flushes;
        std::thread::sleep(Duration::from_millis(20));
        let after = pmem(&g.sock, "pmem0").stats.flushes;
        assert_eq!(before, after, "a guest flush ran while paused");
        if before > 0 && before < ROUNDS {
            paused_mid_run += 1;
        }
        let r = put(&g.sock, "/v1/vm/resume");
        assert_eq!(r.status, 204, "{}", r.text());
        cycles += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let d = pmem(&g.sock, "pmem0");
    println!(
        "{cycles} pause/resume cycles, {paused_mid_run} paused mid-run: {:?}",
        d.stats
    );
    assert_eq!(d.stats.flushes, ROUNDS, "{d:?}");
    assert_eq!(d.stats.pages_written, ROUNDS, "{d:?}");
    assert_eq!(d.stats.empty_flushes, 0, "{d:?}");
    assert_eq!(d.pending_dirty_pages, Some(0), "{d:?}");
    assert!(
        paused_mid_run > 0,
        "no pause landed while the guest was flushing"
    );
    g.shutdown();
}
