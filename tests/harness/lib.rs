//! Helpers shared by pmvm's integration tests: run the `pmvm` binary with a guest, read its
//! serial console line by line, and fail with the whole log when something is missing.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod linux;

/// The control socket's client and documents, as pmvm itself defines them.
pub use pmvm::api::client::{Client, ClientResponse};
pub use pmvm::api::types;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/harness is two levels down")
        .to_path_buf()
}

/// True when CI runs the tests: then nothing may be skipped for a missing tool or device.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Whether /dev/kvm can be opened. Tests that need it print `SKIP: <reason>` and return when
/// it cannot, except under CI, where a missing /dev/kvm is a failure.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if in_ci() => panic!("{test}: /dev/kvm is required under CI: {e}"),
        Err(e) => {
            println!("SKIP: {test}: /dev/kvm unavailable: {e}");
            false
        }
    }
}

/// The tracking `--dirty-tracking auto` picks on this host, on KVM with the dirty ring: the
/// slot bitmap where the ring's limit is not enforced (PVM), else the ring.
pub fn auto_dirty_tracking() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "bitmap"
    } else {
        "ring"
    }
}

/// Builds the probe guest once per test process and returns the path of probe.elf.
pub fn probe_elf() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let script = repo_root().join("guest-images/build-probe.sh");
            let out = Command::new("bash")
                .arg(&script)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} failed:\n{}{}",
                script.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
            assert!(
                path.is_file(),
                "build-probe.sh printed {path:?}, not a file"
            );
            path
        })
        .clone()
}

/// Output of a running process, collected by a reader thread.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl Log {
    fn collect<R: Read + Send + 'static>(self: &Arc<Self>, r: R) -> std::thread::JoinHandle<()> {
        let log = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        log.lines.lock().unwrap().push(line);
                        log.grew.notify_all();
                    }
                }
            }
        })
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// The arguments that boot the probe with WORDS, one `--pmem` and, if given, a control socket.
pub fn probe_pmem_args(words: &str, pmem: &str, sock: Option<&Path>) -> Vec<String> {
    let mut args = vec![
        "--kernel".to_string(),
        probe_elf().display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 -- {words}"),
        "--pmem".into(),
        pmem.to_string(),
    ];
    if let Some(sock) = sock {
        args.extend(["--api-sock".into(), sock.display().to_string()]);
    }
    args
}

/// A running pmvm. Dropping it kills the process; if the test is failing, the console and
/// stderr are printed so the failure can be read without rerunning.
pub struct Pmvm {
    child: Child,
    /// The guest's console input, when started with `spawn_with_input`.
    stdin: Option<std::process::ChildStdin>,
    stdout: Arc<Log>,
    stderr: Arc<Log>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Pmvm {
    /// Starts `bin` with `args`; stdin is /dev/null.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S]) -> Pmvm {
        Self::start(bin, args, false)
    }

    /// Starts `bin` with `args` and a pipe on stdin, which pmvm feeds to the guest's serial
    /// port: write to it with `send`.
    pub fn spawn_with_input<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S]) -> Pmvm {
        Self::start(bin, args, true)
    }

    /// Types `bytes` at the guest's console.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("pmvm was started without an input pipe"))?;
        stdin.write_all(bytes)?;
        stdin.flush()
    }

    fn start<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S], input: bool) -> Pmvm {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(if input { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = Arc::new(Log::default());
        let stderr = Arc::new(Log::default());
        let readers = vec![
            stdout.collect(child.stdout.take().expect("piped stdout")),
            stderr.collect(child.stderr.take().expect("piped stderr")),
        ];
        Pmvm {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            readers,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.wait_for_from(0, needle, timeout).map(|(_, l)| l)
    }

    /// Like `wait_for`, looking only at lines from index `start` on; returns the line's index.
    pub fn wait_for_from(
        &self,
        start: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<(usize, String), String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.stdout.lines.lock().unwrap();
        loop {
            if let Some((i, l)) = lines
                .iter()
                .enumerate()
                .skip(start)
                .find(|(_, l)| l.contains(needle))
            {
                return Ok((i, l.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                return Err(format!(
                    "no console line containing {needle:?} within {timeout:?}\n{}",
                    self.transcript()
                ));
            }
            lines = self
                .stdout
                .grew
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Console lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.lines.lock().unwrap().clone()
    }

    /// Waits for pmvm to exit; kills it after `timeout`. Returns its status and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, String), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                self.status = Some(st);
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Ok((st, self.stderr.text()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "pmvm still running after {timeout:?}\n{}",
                    self.transcript()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to pmvm.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill() only sends a signal to our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Console and stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- console ---\n{}\n--- stderr ---\n{}\n---",
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

impl Drop for Pmvm {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.transcript());
        }
    }
}

pub use pmvm::nvdimm::cachestat::CacheStat;

/// What the host page cache holds of `len` bytes at `off` of `path`: which pages are cached,
/// dirty (written but not yet on disk) or under writeback.
pub fn cachestat(path: &Path, off: u64, len: u64) -> std::io::Result<CacheStat> {
    pmvm::nvdimm::cachestat::cachestat(&std::fs::File::open(path)?, off, len)
}

/// Whether the page cache of files in `dir` says anything about durability: cachestat(2) must
/// exist, and `dir` must not be on tmpfs, whose pages never go to a disk. Tests that need it
/// print `SKIP: <reason>` and return when it does not, except under CI, where that fails.
pub fn page_cache_or_skip(test: &str, dir: &Path) -> bool {
    let why = match page_cache_problem(dir) {
        None => return true,
        Some(why) => why,
    };
    if in_ci() {
        panic!("{test}: {why}");
    }
    println!("SKIP: {test}: {why}");
    false
}

fn page_cache_problem(dir: &Path) -> Option<String> {
    use std::os::unix::io::AsRawFd;
    let probe = dir.join(".cachestat-probe");
    let result = std::fs::write(&probe, [0u8; 4096]).and_then(|()| {
        let file = std::fs::File::open(&probe)?;
        // SAFETY: fstatfs writes only into the zeroed struct it is given, which outlives the call.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `file` is open for the call and `fs` is a valid, writable statfs.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((fs.f_type == libc::TMPFS_MAGIC, cachestat(&probe, 0, 0)))
    });
    let _ = std::fs::remove_file(&probe);
    match result {
        Err(e) => Some(format!(
            "cannot test the page cache in {}: {e}",
            dir.display()
        )),
        Ok((true, _)) => Some(format!(
            "{} is on tmpfs: no disk behind the page cache",
            dir.display()
        )),
        Ok((false, Err(e))) => Some(format!(
            "cachestat(2) is unavailable (needs Linux 6.5): {e}"
        )),
        Ok((false, Ok(_))) => None,
    }
}

/// Reads `len` bytes at `off` of `path` with O_DIRECT, from the disk rather than the page cache.
/// Careful: the kernel first writes back dirty cached pages of the range, so read only ranges
/// already known to be clean, or the read itself does the flush it should be checking.
pub fn read_direct(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const ALIGN: usize = 4096;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // O_DIRECT wants the buffer, offset and length aligned to the logical block size; 4 KiB
    // covers every common device.
    let aligned_len = len.div_ceil(ALIGN) * ALIGN;
    let mut raw = vec![0u8; aligned_len + ALIGN];
    let start = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[start..start + aligned_len];
    file.read_exact_at(buf, off)?;
    Ok(buf[..len].to_vec())
}

/// Waits until the control socket at `sock` answers `GET /v1/vm`.
pub fn wait_api(sock: &Path, timeout: Duration) -> Result<(), String> {
    Client::new(sock).wait_ready(timeout).map_err(|e| {
        format!(
            "{} never answered within {timeout:?}: {}",
            sock.display(),
            pmvm::api::error_chain(&e)
        )
    })
}

/// The host's dirty page cache, from /proc/vmstat: pages dirty or under writeback, and the
/// level at which the kernel starts background writeback of every file.
pub fn host_dirty_pages() -> Option<(u64, u64)> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
    let get = |key: &str| {
        vmstat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    Some((
        get("nr_dirty")? + get("nr_writeback")?,
        get("nr_dirty_background_threshold")?,
    ))
}

/// Waits up to `timeout` until the host has no background writeback to do (dirty pages below
/// the background threshold), so a page a test leaves dirty stays dirty for a while.
/// Returns the state it ended in, for messages.
pub fn wait_writeback_calm(timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let Some((dirty, threshold)) = host_dirty_pages() else {
            return "unknown (no /proc/vmstat)".into();
        };
        let state = format!("{dirty} pages dirty, background writeback from {threshold}");
        if dirty < threshold || Instant::now() >= deadline {
            return state;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
