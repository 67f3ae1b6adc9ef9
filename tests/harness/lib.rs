//! Helpers shared by pmvm's integration tests: run the `pmvm` binary with a guest, read its
//! serial console line by line, and fail with the whole log when something is missing.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
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
