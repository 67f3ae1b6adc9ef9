//! The real pmvm binary: CPU time from exec to the API socket accepting connections, and
//! resident memory beyond what the guest touched, with the probe guest parked in `wait`.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::BenchError;

/// Guest RAM of the measured VMs; its mapping is recognised in smaps by this size.
pub const MEMORY_MIB: u64 = 512;
/// The one NVDIMM the measured VMs have.
pub const PMEM_MIB: u64 = 64;
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);
/// The probe reaches `wait` in seconds on an emulating host.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The binaries to run.
pub struct Pmvm {
    pub bin: PathBuf,
    pub probe: PathBuf,
}

/// CPU time of one start, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    /// The whole process, all threads, when a connect to the socket first succeeded.
    pub process_ms: f64,
    /// Of that, the vCPU threads (thread creation and guest code), which start right after
    /// the socket is bound.
    pub vcpu_ms: f64,
}

/// Resident memory of one running VMM, in KiB.
#[derive(Clone, Debug)]
pub struct Memory {
    pub rss_kib: u64,
    /// Resident pages of guest RAM and of the NVDIMM mapping.
    pub guest_kib: u64,
    /// The largest other mappings: (name, resident KiB).
    pub top: Vec<(String, u64)>,
}

impl Memory {
    pub fn overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_kib)
    }
}

/// A started pmvm, killed and reaped on drop.
pub struct Running {
    child: Child,
    bin: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    /// pmvm with the probe parked in `wait` and one sparse NVDIMM of `PMEM_MIB` named by `tag`.
    fn spawn(p: &Pmvm, dir: &Path, tag: &str, stdout: Stdio) -> Result<Running, BenchError> {
        let image = dir.join(format!("{tag}.img"));
        let _ = std::fs::remove_file(&image);
        let args = [
            "--cmdline".to_string(),
            "console=ttyS0 -- wait".into(),
            "--memory".into(),
            format!("{MEMORY_MIB}M"),
            "--pmem".into(),
            format!("path={},size={PMEM_MIB}M,sparse=on", image.display()),
        ];
        Running::spawn_args(p, &dir.join(format!("{tag}.sock")), &args, stdout)
    }

    /// pmvm with the probe, the API at `sock`, and `args`.
    pub fn spawn_args(
        p: &Pmvm,
        sock: &Path,
        args: &[String],
        stdout: Stdio,
    ) -> Result<Running, BenchError> {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(&p.bin)
            .arg("--kernel")
            .arg(&p.probe)
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BenchError::io(format!("starting {}", p.bin.display())))?;
        Ok(Running {
            child,
            bin: p.bin.clone(),
        })
    }

    /// The console's lines, read on a thread of their own (spawned with `Stdio::piped()`).
    pub fn console(&mut self) -> mpsc::Receiver<String> {
        let stdout = self.child.stdout.take();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            if let Some(out) = stdout {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        });
        rx
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_line(
        &mut self,
        console: &mpsc::Receiver<String>,
        needle: &str,
        what: &'static str,
        timeout: Duration,
    ) -> Result<(), BenchError> {
        let begun = Instant::now();
        loop {
            match console.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => self.check_alive(what)?,
            }
            self.check_alive(what)?;
            if begun.elapsed() > timeout {
                return Err(self.timeout(what, timeout));
            }
        }
    }

    /// Waits up to `timeout` for pmvm to exit; its exit code and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(Option<i32>, String), BenchError> {
        let begun = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(BenchError::io("waiting for pmvm"))?
            {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return Ok((status.code(), stderr));
            }
            if begun.elapsed() > timeout {
                return Err(self.timeout("to exit", timeout));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// If pmvm has exited: an error with its status and stderr.
    pub fn check_alive(&mut self, waiting_for: &'static str) -> Result<(), BenchError> {
        let status = self
            .child
            .try_wait()
            .map_err(BenchError::io("waiting for pmvm"))?;
        let Some(status) = status else {
            return Ok(());
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        Err(BenchError::Pmvm {
            path: self.bin.clone(),
            what: waiting_for,
            detail: format!("exited ({status}) first; stderr: {}", stderr.trim()),
        })
    }

    fn timeout(&self, what: &'static str, after: Duration) -> BenchError {
        BenchError::Pmvm {
            path: self.bin.clone(),
            what,
            detail: format!("not within {} s", after.as_secs()),
        }
    }
}

/// All CPU time of process `pid` so far (every thread, living or exited), in nanoseconds.
fn process_cpu_ns(pid: u32) -> Result<u64, BenchError> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes one clockid_t into `clock`, which lives across it.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if rc != 0 {
        return Err(BenchError::io(format!("clock_getcpuclockid({pid})"))(
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which lives across it.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(BenchError::io(format!("clock_gettime of pid {pid}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// CPU time of the threads of `pid` named `vcpu*`, from their schedstat (ns on CPU first).
fn vcpu_threads_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_start().starts_with("vcpu"))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Starts pmvm `runs` times and reads its CPU time the moment its API socket accepts a
/// connection; each is killed right after.
pub fn start_cpu(p: &Pmvm, dir: &Path, runs: usize) -> Result<Vec<Start>, BenchError> {
    let mut out = Vec::new();
    for i in 0..runs {
        let tag = format!("start{i}");
        let sock = dir.join(format!("{tag}.sock"));
        let mut vmm = Running::spawn(p, dir, &tag, Stdio::null())?;
        let begun = Instant::now();
        loop {
            if UnixStream::connect(&sock).is_ok() {
                let process = process_cpu_ns(vmm.pid())?;
                let vcpu = vcpu_threads_ns(vmm.pid());
                out.push(Start {
                    process_ms: process as f64 / 1e6,
                    vcpu_ms: vcpu as f64 / 1e6,
                });
                break;
            }
            vmm.check_alive("to open its API socket")?;
            if begun.elapsed() > SOCKET_TIMEOUT {
                return Err(vmm.timeout("to open its API socket", SOCKET_TIMEOUT));
            }
            thread::sleep(Duration::from_micros(50));
        }
        drop(vmm);
        let _ = std::fs::remove_file(dir.join(format!("{tag}.img")));
    }
    Ok(out)
}

/// One mapping of /proc/PID/smaps.
struct Mapped {
    name: String,
    size_kib: u64,
    rss_kib: u64,
}

fn smaps(pid: u32) -> Result<Vec<Mapped>, BenchError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(BenchError::io(format!("reading /proc/{pid}/smaps")))?;
    let mut out: Vec<Mapped> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A header: address perms offset dev inode [name].
            let name = fields.nth(4).unwrap_or("[anon]").to_string();
            out.push(Mapped {
                name,
                size_kib: 0,
                rss_kib: 0,
            });
            continue;
        }
        let mut value = || {
            fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match (first, out.last_mut()) {
            ("Size:", Some(m)) => m.size_kib = value(),
            ("Rss:", Some(m)) => m.rss_kib = value(),
            _ => {}
        }
    }
    Ok(out)
}

pub fn status_kib(pid: u32, key: &str) -> Result<u64, BenchError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(BenchError::io(format!("reading /proc/{pid}/status")))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| BenchError::Check(format!("/proc/{pid}/status has no {key}")))
}

/// Starts pmvm, waits for the probe's `waiting` line, and reads its memory.
pub fn memory(p: &Pmvm, dir: &Path, tag: &str) -> Result<Memory, BenchError> {
    let mut vmm = Running::spawn(p, dir, tag, Stdio::piped())?;
    let image = dir.join(format!("{tag}.img"));
    let console = vmm.console();
    vmm.wait_line(
        &console,
        "probe: waiting",
        "to run the probe to `wait`",
        WAIT_TIMEOUT,
    )?;
    // Let threads that were starting settle.
    thread::sleep(Duration::from_millis(200));
    let pid = vmm.pid();
    let rss_kib = status_kib(pid, "VmRSS:")?;
    let maps = smaps(pid)?;
    let image_name = image.display().to_string();
    let is_guest = |m: &Mapped| {
        m.name == image_name || (m.name == "[anon]" && m.size_kib == MEMORY_MIB * 1024)
    };
    let guest_kib = maps.iter().filter(|m| is_guest(m)).map(|m| m.rss_kib).sum();
    let mut top: Vec<(String, u64)> = Vec::new();
    for m in maps.iter().filter(|m| !is_guest(m)) {
        let name = Path::new(&m.name)
            .file_name()
            .map_or(m.name.clone(), |n| n.to_string_lossy().into_owned());
        match top.iter_mut().find(|(n, _)| *n == name) {
            Some((_, kib)) => *kib += m.rss_kib,
            None => top.push((name, m.rss_kib)),
        }
    }
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    top.truncate(5);
    drop(vmm);
    let _ = std::fs::remove_file(&image);
    Ok(Memory {
        rss_kib,
        guest_kib,
        top,
    })
}
