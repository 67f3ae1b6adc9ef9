//! `persist=flush` memory stays bounded: the real pmvm with the probe writes every byte of a
//! 1 GiB device (each page a private copy until it is flushed), flushes, writes one page more,
//! and parks; pmvm's RSS then must be within `SLACK_MIB` of guest RAM plus the pages written
//! since the flush. A host flush takes that page, a power cut ends the VM, and every byte of the
//! file must be what the guest last flushed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::error::BenchError;
use crate::vmm_start::{status_kib, Pmvm, Running};

/// The device the guest fills.
pub const DEVICE_MIB: u64 = 1024;
/// Guest RAM of the VM.
pub const RAM_MIB: u64 = 128;
/// What pmvm may hold beyond guest RAM and the pages dirtied since the last flush.
pub const SLACK_MIB: u64 = 64;
/// The one page the guest writes after its flush, and its byte; the rest of the device is
/// `FILL`.
const LATE_PAGE: u64 = 3;
const LATE: u8 = 0x77;
const FILL: u8 = 0x5a;
/// pmvm's exit status after a power cut.
const POWER_CUT_STATUS: i32 = 3;
/// Filling 1 GiB from the probe's emulated kernel-mode loop takes minutes on a nested host.
const FILL_TIMEOUT: Duration = Duration::from_secs(3600);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one run measured.
pub struct StrictMemory {
    /// VmRSS once the guest has flushed the whole device and written one page more.
    pub rss_kib: u64,
    /// VmHWM then: the peak, before the flush dropped the copies.
    pub peak_kib: u64,
    /// Pages the host flush after it wrote (the page written since the guest's flush).
    pub late_pages: u64,
    /// Bytes of the file not what the guest last flushed, after the power cut.
    pub wrong_bytes: u64,
    /// The first of them, if any.
    pub first_wrong: Option<u64>,
    /// Fill, flush and check, in seconds.
    pub seconds: f64,
}

impl StrictMemory {
    /// RSS bound: guest RAM, the slack, and the one page dirtied since the flush.
    pub fn bound_kib(&self) -> u64 {
        (RAM_MIB + SLACK_MIB) * 1024 + self.late_pages * 4
    }
}

/// An HTTP request with no body on the API socket: the status and the body.
pub fn api(sock: &Path, method: &str, path: &str) -> Result<(u16, String), BenchError> {
    let what = format!("{method} {path} on {}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(BenchError::io(what.clone()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(BenchError::io(what.clone()))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: \
         close\r\n\r\n"
    )
    .map_err(BenchError::io(what.clone()))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(BenchError::io(what.clone()))?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| BenchError::Check(format!("{what}: no HTTP status in {reply:?}")))?;
    let body = reply
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Compares the file with the image the guest last flushed; (wrong bytes, first wrong offset).
fn check_file(path: &Path) -> Result<(u64, Option<u64>), BenchError> {
    let mut file =
        std::fs::File::open(path).map_err(BenchError::io(format!("opening {}", path.display())))?;
    let mut chunk = vec![0u8; 1 << 20];
    let (mut wrong, mut first) = (0, None);
    for at in (0..DEVICE_MIB << 20).step_by(chunk.len()) {
        file.read_exact(&mut chunk)
            .map_err(BenchError::io(format!("reading {}", path.display())))?;
        for (i, &b) in chunk.iter().enumerate() {
            let off = at + i as u64;
            let want = if off / 4096 == LATE_PAGE { LATE } else { FILL };
            if b != want {
                wrong += 1;
                first.get_or_insert(off);
            }
        }
    }
    Ok((wrong, first))
}

pub fn measure(p: &Pmvm, dir: &Path) -> Result<StrictMemory, BenchError> {
    let image = dir.join("strict.img");
    let sock = dir.join("strict.sock");
    let _ = std::fs::remove_file(&image);
    let device = DEVICE_MIB << 20;
    let words = format!(
        "console=ttyS0 -- write 0 0 {device:#x} {FILL:#x} flush 0 write 0 {:#x} 0x1000 \
         {LATE:#x} mark FLUSHED wait",
        LATE_PAGE * 4096
    );
    let args = [
        "--cmdline".to_string(),
        words,
        "--memory".into(),
        format!("{RAM_MIB}M"),
        "--pmem".into(),
        format!("path={},size={DEVICE_MIB}M,persist=flush", image.display()),
    ];
    let begun = Instant::now();
    let mut vmm = Running::spawn_args(p, &sock, &args, Stdio::piped())?;
    let console = vmm.console();
    vmm.wait_line(
        &console,
        "MARK FLUSHED",
        "to fill, flush and write one page of a persist=flush device",
        FILL_TIMEOUT,
    )?;
    let pid = vmm.pid();
    let rss_kib = status_kib(pid, "VmRSS:")?;
    let peak_kib = status_kib(pid, "VmHWM:")?;

    let (status, body) = api(&sock, "PUT", "/v1/pmem/pmem0/flush")?;
    if status != 200 {
        return Err(BenchError::Check(format!(
            "the host flush answered {status}: {body}"
        )));
    }
    let late_pages = body
        .split_once("\"pages\":")
        .and_then(|(_, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .ok_or_else(|| BenchError::Check(format!("no page count in the host flush's {body}")))?;
    let (status, body) = api(&sock, "PUT", "/v1/vm/power-cut")?;
    if status != 204 {
        return Err(BenchError::Check(format!(
            "the power cut answered {status}: {body}"
        )));
    }
    let (code, stderr) = vmm.wait_exit(EXIT_TIMEOUT)?;
    if code != Some(POWER_CUT_STATUS) {
        return Err(BenchError::Check(format!(
            "pmvm exited with {code:?} after the power cut, not {POWER_CUT_STATUS}: {stderr}"
        )));
    }
    let (wrong_bytes, first_wrong) = check_file(&image)?;
    let _ = std::fs::remove_file(&image);
    Ok(StrictMemory {
        rss_kib,
        peak_kib,
        late_pages,
        wrong_bytes,
        first_wrong,
        seconds: begun.elapsed().as_secs_f64(),
    })
}
