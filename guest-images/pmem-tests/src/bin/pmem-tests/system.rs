//! The guest system calls the suite needs around the cases: early mounts and modules when it
//! is init, mkfs and DAX mounts, power-off.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

/// The modules to load, one path per line relative to /lib/modules/<release>, in
/// dependency order. build.sh writes it when the kernel is modular.
const MODULE_LIST: &str = "/lib/modules/pmemtests.load";

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in fixed strings and paths")
}

fn mount(src: &str, target: &str, fstype: &str, data: &str) -> io::Result<()> {
    let (s, t, f, d) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: four NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, d.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// /proc, /sys and /dev, for when the suite itself is init.
pub fn early_mounts() -> Vec<String> {
    let mut problems = Vec::new();
    for (fstype, dir) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let _ = fs::create_dir_all(dir);
        if let Err(e) = mount(fstype, dir, fstype, "") {
            if e.raw_os_error() != Some(libc::EBUSY) {
                problems.push(format!("mount {fstype} on {dir}: {e}"));
            }
        }
    }
    problems
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain bytes; zero is valid.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct it is given.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Loads the modules build.sh listed, when they match the running kernel. Returns what
/// happened, one line per module.
pub fn load_modules() -> Vec<String> {
    let Ok(list) = fs::read_to_string(MODULE_LIST) else {
        return Vec::new();
    };
    let dir = Path::new("/lib/modules").join(kernel_release());
    if !dir.is_dir() {
        return vec![format!(
            "no {} in the image: assuming the kernel has what the suite needs built in",
            dir.display()
        )];
    }
    let mut out = Vec::new();
    for rel in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(rel);
        let res = fs::File::open(&path).and_then(|f| {
            use std::os::fd::AsRawFd;
            let empty = cstr("");
            // SAFETY: finit_module reads the open module file and the NUL-terminated
            // (empty) parameter string.
            let rc =
                unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
        match res {
            Ok(()) => out.push(format!("loaded {rel}")),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => out.push(format!("cannot load {}: {e}", path.display())),
        }
    }
    out
}

fn count(dir: &str, prefix: &str) -> usize {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Waits (at most 10 s) until every NVDIMM region has a pmem block device: region and
/// namespace probing can finish after the modules load. The init script does the same.
pub fn settle_nvdimms() {
    for _ in 0..100 {
        let regions = count("/sys/bus/nd/devices", "region");
        if regions > 0 && count("/sys/class/block", "pmem") >= regions {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Size in bytes of block device `name` (e.g. pmem0).
pub fn block_size(name: &str) -> io::Result<u64> {
    let path = format!("/sys/class/block/{name}/size");
    let sectors: u64 = fs::read_to_string(&path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::other(format!("{path} is not a number")))?;
    Ok(sectors * 512)
}

/// The last lines of a command's output, for an error message.
fn tail(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Makes `fstype` on `dev` with 4 KiB blocks (DAX needs block size = page size), and no
/// lazy initialisation that would write (and flush) in the background during the cases.
pub fn mkfs(fstype: &str, dev: &Path) -> Result<(), String> {
    let (tool, args): (&str, Vec<&str>) = match fstype {
        "ext4" => (
            "mkfs.ext4",
            vec![
                "-F",
                "-q",
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
            ],
        ),
        // Older kernels refuse DAX together with reflink.
        _ => (
            "mkfs.xfs",
            vec!["-f", "-q", "-m", "reflink=0", "-b", "size=4096"],
        ),
    };
    let out = Command::new(tool)
        .args(&args)
        .arg(dev)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {} failed ({}): {}",
            dev.display(),
            out.status,
            tail(&out)
        ))
    }
}

/// Mounts `dev` on `dir` with `-o dax=always`.
pub fn mount_dax(fstype: &str, dev: &Path, dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    mount(
        &dev.to_string_lossy(),
        &dir.to_string_lossy(),
        fstype,
        "dax=always",
    )
    .map_err(|e| {
        format!(
            "mount -t {fstype} -o dax=always {} {}: {e} (the kernel log says why; a raw \
             namespace or a kernel without FS_DAX cannot mount with DAX)",
            dev.display(),
            dir.display()
        )
    })
}

pub fn umount(dir: &Path) -> Result<(), String> {
    let d = cstr(&dir.to_string_lossy());
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(d.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(format!(
            "umount {}: {}",
            dir.display(),
            io::Error::last_os_error()
        ))
    }
}

/// Powers the guest off; only returns if the kernel refuses.
pub fn power_off() {
    // SAFETY: sync and reboot take no pointers; reboot needs CAP_SYS_BOOT, which init has.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}
