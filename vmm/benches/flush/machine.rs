//! Where the bench runs: the facts printed with the results, and a scratch directory on a
//! real disk (never tmpfs, whose "writeback" costs nothing).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::BenchError;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The filesystem type of `path`, by name where known.
pub fn fs_type(path: &Path) -> Result<(i64, String), BenchError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| BenchError::Check(format!("{} contains a NUL byte", path.display())))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs reads the NUL-terminated `c` and writes one statfs into `st`; both live
    // across the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BenchError::io(format!("statfs of {}", path.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    let magic = st.f_type as i64;
    let name = match magic {
        0xEF53 => "ext4".to_string(),
        0x5846_5342 => "xfs".to_string(),
        0x9123_683E => "btrfs".to_string(),
        0x794C_7630 => "overlayfs".to_string(),
        TMPFS_MAGIC => "tmpfs".to_string(),
        RAMFS_MAGIC => "ramfs".to_string(),
        other => format!("fs magic {other:#x}"),
    };
    Ok((magic, name))
}

/// A scratch directory on a disk-backed filesystem: under the system temp dir unless that is
/// tmpfs or ramfs, else under the cargo target dir the bench was built in.
pub fn scratch_dir() -> Result<tempfile::TempDir, BenchError> {
    let tmp = std::env::temp_dir();
    let (magic, _) = fs_type(&tmp)?;
    let base = if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
        // The bench runs as target/<profile>/deps/flush-HASH.
        let exe = std::env::current_exe().map_err(BenchError::io("finding the bench binary"))?;
        let target = exe
            .ancestors()
            .nth(3)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = target.join("bench-tmp");
        std::fs::create_dir_all(&dir)
            .map_err(BenchError::io(format!("creating {}", dir.display())))?;
        dir
    } else {
        tmp
    };
    tempfile::Builder::new()
        .prefix("pmvm-bench-")
        .tempdir_in(&base)
        .map_err(BenchError::io(format!(
            "creating a scratch dir in {}",
            base.display()
        )))
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The host facts that go with the numbers.
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
    pub kernel: String,
    pub kvm: String,
    pub scratch_fs: String,
    pub date: String,
    /// The host's 1-minute load average before each flush cell: others' work shares the disk.
    pub load: Vec<f64>,
}

impl Machine {
    pub fn probe(scratch: &Path) -> Machine {
        let cpu = first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
        let memory = first_line_with("/proc/meminfo", "MemTotal")
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or("?".into(), |kib| {
                format!("{:.1} GiB", kib as f64 / 1048576.0)
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("?".into(), |s| s.trim().to_string());
        let module = |m: &str| Path::new("/sys/module").join(m).exists();
        let kvm = if module("kvm_pvm") {
            "PVM (kvm_pvm: shadow paging, guest kernel code emulated)"
        } else if module("kvm_intel") {
            "hardware KVM (kvm_intel)"
        } else if module("kvm_amd") {
            "hardware KVM (kvm_amd)"
        } else {
            "unknown"
        }
        .to_string();
        let scratch_fs = fs_type(scratch).map_or("?".into(), |(_, n)| n);
        Machine {
            cpu,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory,
            kernel,
            kvm,
            scratch_fs,
            date: today(),
            load: Vec::new(),
        }
    }
}

/// Today's UTC date as YYYY-MM-DD (days-to-civil, proleptic Gregorian).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
