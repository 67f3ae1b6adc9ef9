//! Flushes stay O(dirty) under a guest that dirties more pages in one go than a vCPU's dirty
//! ring holds: the real pmvm with the probe stores to every page of a device (twice the ring)
//! in one loop, flushes, stores to three pages and flushes again. With default options the
//! second flush must write those three pages, and pmvm must not warn of an overflow; with
//! `--dirty-tracking ring` the ring may overflow (it does on an emulating host), and then the
//! second flush must still write only those three pages.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::error::BenchError;
use crate::strict_memory::api;
use crate::vmm_start::{Pmvm, Running};

/// Pages the probe stores to before its first flush: twice a 16,384-entry ring.
pub const DEVICE_PAGES: u64 = 32768;
/// Pages it stores to between its two flushes.
pub const LATER_PAGES: u64 = 3;
const RUN_TIMEOUT: Duration = Duration::from_secs(1200);

/// What one VM showed.
pub struct Tracked {
    /// `--dirty-tracking` given, or "default".
    pub option: &'static str,
    /// `dirty_tracking` from the API after both flushes.
    pub mode: String,
    pub flushes: u64,
    /// Pages the second flush wrote.
    pub second_flush_pages: u64,
    pub pages_written: u64,
    /// pmvm warned that the ring overflowed.
    pub overflowed: bool,
    pub seconds: f64,
}

/// A number field of the flat `"stats"` object in `body`.
fn stat(body: &str, key: &str) -> Option<u64> {
    let at = body.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = body[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn text(body: &str, key: &str) -> Option<String> {
    let at = body.find(&format!("\"{key}\":\""))? + key.len() + 4;
    body[at..].split('"').next().map(str::to_string)
}

pub fn measure(p: &Pmvm, dir: &Path, option: &'static str) -> Result<Tracked, BenchError> {
    let tag = format!("tracking-{option}");
    let image = dir.join(format!("{tag}.img"));
    let sock = dir.join(format!("{tag}.sock"));
    let _ = std::fs::remove_file(&image);
    let device = DEVICE_PAGES * 4096;
    let mut args = vec![
        "--cmdline".to_string(),
        format!(
            "console=ttyS0 -- write 0 0 {device:#x} 0x5a flush 0 write 0 0x2000 {:#x} 0x77 \
             flush 0 mark AGAIN wait",
            LATER_PAGES * 4096
        ),
        "--memory".into(),
        "128M".into(),
        "--pmem".into(),
        format!("path={},size={device}", image.display()),
    ];
    if option != "default" {
        args.extend(["--dirty-tracking".into(), option.into()]);
    }
    let begun = Instant::now();
    let mut vmm = Running::spawn_args(p, &sock, &args, Stdio::piped())?;
    let console = vmm.console();
    vmm.wait_line(
        &console,
        "MARK AGAIN",
        "to dirty a device twice a ring's size and flush twice",
        RUN_TIMEOUT,
    )?;
    let (status, body) = api(&sock, "GET", "/v1/pmem/pmem0")?;
    if status != 200 {
        return Err(BenchError::Check(format!(
            "GET /v1/pmem/pmem0 answered {status}: {body}"
        )));
    }
    let field = |key: &str| {
        stat(&body, key).ok_or_else(|| BenchError::Check(format!("no {key} in {body}")))
    };
    let flushes = field("flushes")?;
    let second_flush_pages = field("last_harvest_pages")?;
    let pages_written = field("pages_written")?;
    let mode = text(&body, "dirty_tracking").unwrap_or_default();
    let (status, body) = api(&sock, "PUT", "/v1/vm/shutdown")?;
    if status != 204 {
        return Err(BenchError::Check(format!(
            "the shutdown answered {status}: {body}"
        )));
    }
    let (_, stderr) = vmm.wait_exit(Duration::from_secs(60))?;
    let _ = std::fs::remove_file(&image);
    Ok(Tracked {
        option,
        mode,
        flushes,
        second_flush_pages,
        pages_written,
        overflowed: stderr.contains("overflowed"),
        seconds: begun.elapsed().as_secs_f64(),
    })
}
