//! xfs for crash-test: the namespace's data area formatted on the host with mkfs.xfs, and the
//! checker: log replay by a user-mode Linux mount ([`super::uml`]), then `xfs_repair -n`;
//! files read through `xfs_db` (size and block map) and the image itself.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::check::{complaints_except, run_tool, FsChecker, Fsck};
use super::uml::{Replay, Replayer};
use super::CrashTestError;

/// Writes an xfs holding `init` as /init (and an empty /dev and /proc) into the data area of the fsdax
/// namespace `image`, which starts at `offset`.
pub fn format_data_area(
    image: &Path,
    offset: u64,
    init: &Path,
    dir: &Path,
) -> Result<(), CrashTestError> {
    let fail = |what: String| move |e: io::Error| CrashTestError::Format(format!("{what}: {e}"));
    let img = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(fail(format!("open {}", image.display())))?;
    let len = img
        .metadata()
        .map_err(fail(format!("stat {}", image.display())))?
        .len()
        .saturating_sub(offset);
    let proto = dir.join("xfs.proto");
    let init = fs::canonicalize(init).map_err(fail(format!("find {}", init.display())))?;
    // mkfs.xfs's prototype file: boot image, sizes, root mode, entries, ends.
    let text = format!(
        "/dev/null\n0 0\nd--755 0 0\ninit ---755 0 0 {}\ndev d--755 0 0\n$\nproc d--755 0 0\n$\n$\n",
        init.display()
    );
    fs::write(&proto, text).map_err(fail(format!("write {}", proto.display())))?;
    let area = dir.join("xfs-data.img");
    File::create(&area)
        .and_then(|f| f.set_len(len))
        .map_err(fail(format!("create {}", area.display())))?;
    // reflink is not allowed with DAX; 4K blocks so every block can be mapped. The fstests
    // variables lift mkfs.xfs's 300 MB minimum: small namespaces keep crash states cheap, and
    // the kernel mounts them.
    let (code, text) = run_tool(
        Command::new("mkfs.xfs")
            .env("TEST_DIR", "/nonexistent")
            .env("TEST_DEV", "/nonexistent")
            .env("QA_CHECK_FS", "1")
            .args(["-q", "-f", "-m", "reflink=0", "-b", "size=4096", "-p"])
            .arg(&proto)
            .arg(&area),
    )
    .map_err(fail("run mkfs.xfs (install xfsprogs)".into()))?;
    if code != 0 {
        return Err(CrashTestError::Format(format!(
            "mkfs.xfs failed (exit {code}): {}",
            text.trim()
        )));
    }
    let src = File::open(&area).map_err(fail(format!("open {}", area.display())))?;
    crate::pmem_format::copy_sparse(&src, &img, offset)
        .map_err(fail(format!("write {}", image.display())))?;
    img.sync_all()
        .map_err(fail(format!("sync {}", image.display())))?;
    let _ = fs::remove_file(&area);
    let _ = fs::remove_file(&proto);
    Ok(())
}

/// xfs: a user-mode Linux mount replays the log (as the mount after a crash would), then
/// `xfs_repair -n`; `xfs_db` finds each file's size and blocks.
#[derive(Default)]
pub struct Xfs {
    /// One user-mode kernel per checking thread, by the thread's scratch directory.
    replayers: Mutex<HashMap<PathBuf, Replayer>>,
}

/// The lines of xfs_repair's output that say what is wrong.
fn complaints(text: &str) -> String {
    complaints_except(text, |l| {
        ["Phase ", "- ", "No modify flag set", "Note - "]
            .iter()
            .any(|p| l.starts_with(p))
    })
}

impl Xfs {
    fn replay(&self, image: &Path, scratch: &Path) -> io::Result<Replay> {
        let key = scratch.to_path_buf();
        // Each thread has its own scratch directory, so it only ever waits for itself here.
        let mut map = self.replayers.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) {
            map.insert(key.clone(), Replayer::start(scratch)?);
        }
        let Some(r) = map.get_mut(&key) else {
            return Err(io::Error::other("lost the user-mode kernel"));
        };
        let result = r.replay(image);
        if r.dead {
            map.remove(&key);
        }
        result
    }
}

impl FsChecker for Xfs {
    fn fsck(&self, image: &Path, scratch: &Path) -> io::Result<Fsck> {
        if let Replay::Refused(why) = self.replay(image, scratch)? {
            return Ok(Fsck::Unreadable(format!(
                "Linux 6.1 (user-mode) does not mount it: {why}"
            )));
        }
        let (code, text) = run_tool(Command::new("xfs_repair").args(["-n", "-f"]).arg(image))?;
        match code {
            0 => Ok(Fsck::Clean),
            1 => Ok(Fsck::Errors(format!(
                "xfs_repair -n exit 1: {}",
                complaints(&text)
            ))),
            _ => Err(io::Error::other(format!(
                "xfs_repair -n could not check {} (exit {code}): {}",
                image.display(),
                complaints(&text)
            ))),
        }
    }

    fn read_files(
        &self,
        image: &Path,
        paths: &[&str],
        _scratch: &Path,
    ) -> io::Result<Vec<Option<Vec<u8>>>> {
        let mut cmd = Command::new("xfs_db");
        cmd.arg("-r")
            .args(["-c", "sb 0", "-c", "print blocksize agblocks"]);
        for (i, p) in paths.iter().enumerate() {
            // `sb 0` first: a path that does not resolve leaves no inode to print.
            cmd.args(["-c", &format!("echo @@ {i}"), "-c", "sb 0"])
                // xfs_db takes the rest of the line as the path, quotes included.
                .args(["-c", &format!("path {p}")])
                .args(["-c", "print core.size", "-c", "bmap"]);
        }
        let out = cmd.arg(image).stdin(std::process::Stdio::null()).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let geometry = Geometry::parse(&text).ok_or_else(|| {
            io::Error::other(format!(
                "xfs_db could not read the superblock of {}: {}",
                image.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        let file = File::open(image)?;
        let mut sections: Vec<&str> = text.split("@@ ").skip(1).collect();
        sections.resize(paths.len(), "");
        sections
            .iter()
            .map(|s| read_file(&file, &geometry, s))
            .collect()
    }
}

/// What is needed to turn a block map into byte offsets.
struct Geometry {
    blocksize: u64,
    agblocks: u64,
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.trim().strip_prefix("= "))
        .and_then(|v| v.trim().parse().ok())
}

impl Geometry {
    fn parse(text: &str) -> Option<Geometry> {
        let head = text.split("@@ ").next()?;
        Some(Geometry {
            blocksize: field(head, "blocksize")?,
            agblocks: field(head, "agblocks")?,
        })
    }
}

/// One extent of `bmap`: "data offset 0 startblock 24 (0/24) count 3 flag 0".
struct Extent {
    offset: u64,
    agno: u64,
    agbno: u64,
    count: u64,
    unwritten: bool,
}

fn parse_extent(line: &str) -> Option<Extent> {
    let w: Vec<&str> = line.split_whitespace().collect();
    if w.len() != 10 || w[0] != "data" || w[1] != "offset" {
        return None;
    }
    let (agno, agbno) = w[5]
        .trim_matches(|c| c == '(' || c == ')')
        .split_once('/')?;
    Some(Extent {
        offset: w[2].parse().ok()?,
        agno: agno.parse().ok()?,
        agbno: agbno.parse().ok()?,
        count: w[7].parse().ok()?,
        unwritten: w[9] != "0",
    })
}

/// A file's bytes from its section of xfs_db's output; None when the path did not resolve.
fn read_file(image: &File, g: &Geometry, section: &str) -> io::Result<Option<Vec<u8>>> {
    let Some(size) = field(section, "core.size") else {
        return Ok(None);
    };
    // A size past the device is corruption, not a file to allocate: it is read as empty,
    // which no claim accepts.
    let device = image.metadata()?.len();
    if size > device {
        return Ok(Some(Vec::new()));
    }
    let mut bytes = vec![0u8; size as usize];
    for e in section.lines().filter_map(parse_extent) {
        if e.unwritten {
            continue; // reads as zeroes
        }
        for b in 0..e.count {
            let at = (e.offset + b) * g.blocksize;
            if at >= size {
                break;
            }
            let n = (size - at).min(g.blocksize) as usize;
            let disk = ((e.agno * g.agblocks) + e.agbno + b) * g.blocksize;
            let dst = &mut bytes[at as usize..at as usize + n];
            // A block past the device (corruption) reads as zeroes.
            if disk + n as u64 <= device {
                image.read_exact_at(dst, disk)?;
            }
        }
    }
    Ok(Some(bytes))
}
