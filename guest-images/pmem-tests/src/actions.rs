//! How each case writes its data and makes it durable, and where the data then lives.
//!
//! A case prepares (creates its file, writes or maps), calls `gate` (the guest prints
//! PMEMWAIT and waits for the host to read the flush counters), then runs its timed sync
//! step. The same code runs on the host in unit tests, on files without DAX.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::cases::{pattern, Case, Fs};
use crate::fiemap;
use crate::mapping::{MapKind, Mapping};
use crc32c::crc32c;

/// `STATX_ATTR_DAX`: the file's data is accessed directly, bypassing the page cache.
const STATX_ATTR_DAX: u64 = 0x0020_0000;
/// Raw cases write here on the block device: past the first MiB, one 64 KiB slot per case.
const RAW_AREA: u64 = 1 << 20;
const RAW_SLOT: u64 = 64 * 1024;

/// Where a case writes.
#[derive(Clone, Debug)]
pub enum Place {
    /// A directory on a mounted filesystem; `dax` requires every file to be DAX.
    Dir { path: PathBuf, dax: bool },
    /// A block device (or, in tests, a file standing in for one).
    Raw { dev: PathBuf },
}

/// What a case wrote and how long its sync step took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    /// Offset of the data in `path`.
    pub file_off: u64,
    pub len: u64,
    pub crc32c: u32,
    pub sync_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{step} {path}: {err}")]
    Io {
        step: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("{path} is not DAX (statx attributes {attributes:#x}): the filesystem is not mounted with dax or the device has no fsdax namespace")]
    NotDax { path: PathBuf, attributes: u64 },
    #[error("{tool} is not in the image (looked in {searched})")]
    ToolMissing {
        tool: &'static str,
        searched: &'static str,
    },
    #[error("{tool} failed ({status}): {output}")]
    Tool {
        tool: &'static str,
        status: String,
        output: String,
    },
    #[error("{path} holds other bytes than {tool} wrote: {detail}")]
    Content {
        tool: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{case} does not apply to {fs}")]
    NotApplicable { case: Case, fs: Fs },
    #[error("cannot find the data on the device: {0}")]
    Locate(#[from] fiemap::FiemapError),
    /// The host conversation broke; the suite cannot go on.
    #[error("{0}")]
    Gate(String),
}

impl CaseError {
    /// A missing tool is a skip, not a failure.
    pub fn is_skip(&self) -> bool {
        matches!(self, CaseError::ToolMissing { .. })
    }
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CaseError + 'a {
    move |err| CaseError::Io {
        step,
        path: path.to_path_buf(),
        err,
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The byte offset a raw case uses on the block device.
pub fn raw_offset(case: Case) -> u64 {
    let slot = Case::ALL.iter().position(|c| *c == case).unwrap_or(0) as u64;
    RAW_AREA + slot * RAW_SLOT
}

/// The end of the area raw cases write: the device must be at least this large.
pub fn raw_area_end() -> u64 {
    RAW_AREA + Case::ALL.len() as u64 * RAW_SLOT
}

/// Runs `case` on `fs` at `place`. `gate` is called once, right before the timed sync step.
pub fn run(
    case: Case,
    fs: Fs,
    place: &Place,
    gate: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Written, CaseError> {
    if !case.applies_to(fs) {
        return Err(CaseError::NotApplicable { case, fs });
    }
    if let Some(tool) = case.tool() {
        let Place::Dir { path, dax } = place else {
            return Err(CaseError::NotApplicable { case, fs });
        };
        return run_tool(case, tool, path, *dax, gate);
    }
    let len = case.data_len();
    let data = pattern(case, fs, len);
    let (path, off, dax) = match place {
        Place::Dir { path, dax } => (path.join(format!("{case}.dat")), 0, *dax),
        Place::Raw { dev } => (dev.clone(), raw_offset(case), false),
    };
    let raw = matches!(place, Place::Raw { .. });
    let open = |extra: libc::c_int| -> Result<File, CaseError> {
        let mut o = OpenOptions::new();
        o.read(true).write(true).custom_flags(extra);
        if !raw {
            o.create(true).truncate(true);
        }
        let f = o.open(&path).map_err(io_err("open", &path))?;
        if dax {
            require_dax(&path)?;
        }
        Ok(f)
    };
    let mut gate = || gate().map_err(CaseError::Gate);
    let timed = |start: Instant| start.elapsed().as_micros() as u64;

    let sync_us = match case {
        Case::Fsync | Case::Fdatasync | Case::SyncFileRange | Case::Syncfs | Case::Sync => {
            let f = open(0)?;
            f.write_all_at(&data, off).map_err(io_err("write", &path))?;
            gate()?;
            let t = Instant::now();
            let fd = f.as_raw_fd();
            let (step, rc) = match case {
                Case::Fsync => ("fsync", f.sync_all().map(|_| 0)),
                Case::Fdatasync => ("fdatasync", f.sync_data().map(|_| 0)),
                Case::SyncFileRange => (
                    "sync_file_range",
                    // SAFETY: plain syscall on an open fd; no memory is passed.
                    check(unsafe {
                        libc::sync_file_range(
                            fd,
                            off as libc::off64_t,
                            len as libc::off64_t,
                            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                                | libc::SYNC_FILE_RANGE_WRITE
                                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                        )
                    })
                    .map(|_| 0),
                ),
                // SAFETY: plain syscall on an open fd.
                Case::Syncfs => ("syncfs", check(unsafe { libc::syncfs(fd) }).map(|_| 0)),
                _ => {
                    // SAFETY: sync(2) takes no arguments and cannot fail.
                    unsafe { libc::sync() };
                    ("sync", Ok(0))
                }
            };
            rc.map_err(io_err(step, &path))?;
            timed(t)
        }
        Case::OSync | Case::ODsync => {
            let flag = if case == Case::OSync {
                libc::O_SYNC
            } else {
                libc::O_DSYNC
            };
            let f = open(flag)?;
            gate()?;
            let t = Instant::now();
            f.write_all_at(&data, off)
                .map_err(io_err("pwrite", &path))?;
            timed(t)
        }
        Case::Msync | Case::MsyncAsyncFsync => {
            let f = open(0)?;
            if !raw {
                f.set_len(len as u64).map_err(io_err("ftruncate", &path))?;
            }
            let mut m =
                Mapping::new(&f, off, len, MapKind::Shared).map_err(io_err("mmap", &path))?;
            m.store(&data);
            gate()?;
            let t = Instant::now();
            if case == Case::Msync {
                m.msync(libc::MS_SYNC)
                    .map_err(io_err("msync(MS_SYNC)", &path))?;
            } else {
                m.msync(libc::MS_ASYNC)
                    .map_err(io_err("msync(MS_ASYNC)", &path))?;
                f.sync_all().map_err(io_err("fsync", &path))?;
            }
            timed(t)
        }
        Case::MapSync => {
            // Allocate and persist the blocks first, and fault the pages in, so the timed
            // stores need no filesystem metadata (a MAP_SYNC write fault on a hole would
            // sync metadata, which flushes).
            let f = open(0)?;
            f.write_all_at(&vec![0u8; len], off)
                .map_err(io_err("write", &path))?;
            f.sync_all().map_err(io_err("fsync", &path))?;
            let mut m = Mapping::new(&f, off, len, MapKind::Sync)
                .map_err(io_err("mmap(MAP_SYNC)", &path))?;
            m.touch_pages();
            gate()?;
            let t = Instant::now();
            m.store(&data);
            m.write_back_cache_lines();
            timed(t)
        }
        Case::FallocateFsync => {
            let f = open(0)?;
            gate()?;
            let t = Instant::now();
            // SAFETY: plain syscall on an open fd.
            check(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as libc::off_t) })
                .map_err(io_err("fallocate", &path))?;
            f.write_all_at(&data, off).map_err(io_err("write", &path))?;
            f.sync_all().map_err(io_err("fsync", &path))?;
            timed(t)
        }
        Case::RenameDirFsync => {
            let Place::Dir { path: dir, .. } = place else {
                return Err(CaseError::NotApplicable { case, fs });
            };
            let tmp = dir.join(format!("{case}.tmp"));
            let f = File::create(&tmp).map_err(io_err("create", &tmp))?;
            f.write_all_at(&data, 0).map_err(io_err("write", &tmp))?;
            drop(f);
            let d = File::open(dir).map_err(io_err("open", dir))?;
            gate()?;
            let t = Instant::now();
            std::fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
            d.sync_all()
                .map_err(io_err("fsync of the directory", dir))?;
            let us = timed(t);
            if dax {
                require_dax(&path)?;
            }
            us
        }
        Case::ODirect => {
            let f = open(libc::O_DIRECT)?;
            let mut buf = AlignedBuf::new(len);
            buf.as_mut().copy_from_slice(&data);
            gate()?;
            let t = Instant::now();
            f.write_all_at(buf.as_mut(), off)
                .map_err(io_err("pwrite(O_DIRECT)", &path))?;
            f.sync_data().map_err(io_err("fdatasync", &path))?;
            timed(t)
        }
        _ => return Err(CaseError::NotApplicable { case, fs }),
    };
    Ok(Written {
        path,
        file_off: off,
        len: len as u64,
        crc32c: crc32c(&data),
        sync_us,
    })
}

fn require_dax(path: &Path) -> Result<(), CaseError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("statx", path)(io::Error::other(e)))?;
    // SAFETY: statx is all-integer plain data, for which zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statx that outlives the call.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            0,
            libc::STATX_BASIC_STATS,
            &mut st,
        )
    };
    check(rc).map_err(io_err("statx", path))?;
    if st.stx_attributes_mask & STATX_ATTR_DAX != 0 && st.stx_attributes & STATX_ATTR_DAX != 0 {
        Ok(())
    } else {
        Err(CaseError::NotDax {
            path: path.to_path_buf(),
            attributes: st.stx_attributes,
        })
    }
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, zero-initialised allocation of `layout.size()` bytes owned
        // by self, and the borrow of self keeps it unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Directories searched for the third-party tools, in order.
const TOOL_DIRS: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn find_tool(tool: &'static str) -> Result<PathBuf, CaseError> {
    TOOL_DIRS
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
        .ok_or(CaseError::ToolMissing {
            tool,
            searched: TOOL_DIRS,
        })
}

/// The command line of a third-party check writing `file`.
pub fn tool_args(case: Case, file: &Path) -> Vec<String> {
    let len = case.data_len();
    let f = file.display();
    match case {
        Case::XfsIoMapSync => vec![
            "-f".into(),
            "-c".into(),
            format!("truncate {len}"),
            // Allocated up front in one extent: page faults of a DAX mapping would allocate
            // block by block, and xfs can scatter them, but the case reports one device range.
            "-c".into(),
            format!("falloc 0 {len}"),
            "-c".into(),
            format!("mmap -S -rw 0 {len}"),
            "-c".into(),
            format!("mwrite -S 0x{XFS_IO_SEED:02x} 0 {len}"),
            "-c".into(),
            format!("msync -s 0 {len}"),
            "-c".into(),
            "munmap".into(),
            f.to_string(),
        ],
        _ => {
            let engine = match case {
                Case::FioMmapMsync => ["--ioengine=mmap", "--fsync=1"],
                Case::FioPsyncFdatasync => ["--ioengine=psync", "--fdatasync=1"],
                _ => ["--ioengine=psync", "--sync=dsync"],
            };
            let mut args = vec![
                format!("--name={case}"),
                format!("--filename={f}"),
                format!("--size={len}"),
                "--bs=4k".into(),
                "--rw=write".into(),
                "--verify=crc32c".into(),
                "--do_verify=1".into(),
                "--verify_fatal=1".into(),
                // Threads, not processes: no SysV shared memory needed in the guest.
                "--thread".into(),
                "--output-format=terse".into(),
            ];
            args.extend(engine.iter().map(|s| s.to_string()));
            args
        }
    }
}

/// The byte xfs_io's mwrite stores.
const XFS_IO_SEED: u8 = 0x5a;

fn run_tool(
    case: Case,
    tool: &'static str,
    dir: &Path,
    dax: bool,
    gate: &mut dyn FnMut() -> Result<(), String>,
) -> Result<Written, CaseError> {
    let bin = find_tool(tool)?;
    let file = dir.join(format!("{case}.dat"));
    let args = tool_args(case, &file);
    gate().map_err(CaseError::Gate)?;
    let t = Instant::now();
    let out = Command::new(&bin)
        .args(&args)
        .current_dir(dir)
        .output()
        .map_err(io_err("run", &bin))?;
    let sync_us = t.elapsed().as_micros() as u64;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // xfs_io reports a failed command on stderr but may still exit 0.
    if !out.status.success() || (tool == "xfs_io" && !stderr.is_empty()) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = stdout.lines().chain(stderr.lines()).rev().take(6).collect();
        return Err(CaseError::Tool {
            tool,
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    if dax {
        require_dax(&file)?;
    }
    let len = case.data_len();
    let mut data = vec![0u8; len];
    File::open(&file)
        .and_then(|f| f.read_exact_at(&mut data, 0))
        .map_err(io_err("read back", &file))?;
    if case == Case::XfsIoMapSync {
        if let Some(i) = data.iter().position(|&b| b != XFS_IO_SEED) {
            return Err(CaseError::Content {
                tool,
                path: file,
                detail: format!(
                    "byte {i} is {:#04x}, mwrite stored {XFS_IO_SEED:#04x}",
                    data[i]
                ),
            });
        }
    }
    Ok(Written {
        path: file,
        file_off: 0,
        len: len as u64,
        crc32c: crc32c(&data),
        sync_us,
    })
}

/// Byte offset of the written data in the NVDIMM whose block device starts at
/// `data_offset` of the device.
pub fn nvdimm_offset(w: &Written, place: &Place, data_offset: u64) -> Result<u64, CaseError> {
    let on_block = match place {
        Place::Raw { .. } => w.file_off,
        Place::Dir { .. } => {
            let f = File::open(&w.path).map_err(io_err("open", &w.path))?;
            let extents = fiemap::extents(&f, w.file_off, w.len)?;
            fiemap::locate(&extents, w.file_off, w.len)?
        }
    };
    Ok(data_offset + on_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reports' `crc32c=` is CRC-32C (Castagnoli), as the host's check computes it.
    #[test]
    fn checksum_is_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    fn no_gate() -> impl FnMut() -> Result<(), String> {
        || Ok(())
    }

    fn read_at(path: &Path, off: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut v, off)
            .unwrap();
        v
    }

    /// Every filesystem case on a plain (non-DAX) directory: the file holds the pattern
    /// whose checksum the case reports, and the gate ran exactly once.
    #[test]
    fn filesystem_cases_write_what_they_report() {
        let dir = tempfile::tempdir().unwrap();
        let place = Place::Dir {
            path: dir.path().to_path_buf(),
            dax: false,
        };
        for case in Case::ALL.into_iter().filter(|c| c.tool().is_none()) {
            if !case.applies_to(Fs::Ext4) {
                continue;
            }
            let mut gates = 0;
            let mut gate = || {
                gates += 1;
                Ok(())
            };
            let res = run(case, Fs::Ext4, &place, &mut gate);
            if case == Case::MapSync {
                // Without DAX the kernel refuses MAP_SYNC, before the gate.
                let err = res.unwrap_err().to_string();
                assert!(err.contains("mmap(MAP_SYNC)"), "{err}");
                assert_eq!(gates, 0);
                continue;
            }
            let w = res.unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(gates, 1, "{case}");
            let want = pattern(case, Fs::Ext4, case.data_len());
            assert_eq!(w.crc32c, crc32c(&want), "{case}");
            assert_eq!(read_at(&w.path, w.file_off, w.len), want, "{case}");
            assert_eq!(w.path, dir.path().join(format!("{case}.dat")));
        }
        // The temporary file of the rename case is gone.
        assert!(!dir.path().join("rename_dirfsync.tmp").exists());
    }

    /// The raw cases on a file standing in for the block device: each lands in its own slot.
    #[test]
    fn raw_cases_write_their_own_slots() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("fake-pmem");
        File::create(&dev).unwrap().set_len(raw_area_end()).unwrap();
        let place = Place::Raw { dev: dev.clone() };
        let mut seen = Vec::new();
        for case in Case::ALL.into_iter().filter(|c| c.applies_to(Fs::Raw)) {
            let w = run(case, Fs::Raw, &place, &mut no_gate()).unwrap_or_else(|e| {
                panic!("{case}: {e}");
            });
            assert_eq!(w.file_off, raw_offset(case));
            assert_eq!(
                nvdimm_offset(&w, &place, 0x20_0000).unwrap(),
                0x20_0000 + w.file_off
            );
            seen.push(w);
        }
        for w in &seen {
            let data = read_at(&dev, w.file_off, w.len);
            assert_eq!(crc32c(&data), w.crc32c, "{}", w.path.display());
        }
    }

    #[test]
    fn a_failing_gate_stops_the_case_before_its_sync_step() {
        let dir = tempfile::tempdir().unwrap();
        let place = Place::Dir {
            path: dir.path().to_path_buf(),
            dax: false,
        };
        let mut gate = || Err("no acknowledgement from the host".to_string());
        let err = run(Case::RenameDirFsync, Fs::Xfs, &place, &mut gate).unwrap_err();
        assert!(matches!(err, CaseError::Gate(_)), "{err}");
        // Not renamed: the sync step never ran.
        assert!(dir.path().join("rename_dirfsync.tmp").exists());
    }

    #[test]
    fn dax_is_required_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let place = Place::Dir {
            path: dir.path().to_path_buf(),
            dax: true,
        };
        let err = run(Case::Fsync, Fs::Ext4, &place, &mut no_gate()).unwrap_err();
        assert!(err.to_string().contains("is not DAX"), "{err}");
    }

    #[test]
    fn inapplicable_pairs_and_missing_tools_are_reported() {
        let place = Place::Raw {
            dev: PathBuf::from("/nonexistent"),
        };
        let err = run(Case::MapSync, Fs::Raw, &place, &mut no_gate()).unwrap_err();
        assert_eq!(err.to_string(), "map_sync does not apply to raw");
        let err = find_tool("no-such-tool-pmem").unwrap_err();
        assert!(err.is_skip());
        assert!(err.to_string().contains("not in the image"), "{err}");
    }

    #[test]
    fn tool_command_lines_ask_for_the_documented_checks() {
        let f = Path::new("/mnt/xfs/x.dat");
        let mmap = tool_args(Case::FioMmapMsync, f).join(" ");
        for want in [
            "--ioengine=mmap",
            "--fsync=1",
            "--verify=crc32c",
            "--size=65536",
        ] {
            assert!(mmap.contains(want), "{mmap}");
        }
        let psync = tool_args(Case::FioPsyncFdatasync, f).join(" ");
        assert!(psync.contains("--ioengine=psync") && psync.contains("--fdatasync=1"));
        let dsync = tool_args(Case::FioDsync, f).join(" ");
        assert!(dsync.contains("--sync=dsync"), "{dsync}");
        let xfs_io = tool_args(Case::XfsIoMapSync, f);
        assert!(
            xfs_io.contains(&"mmap -S -rw 0 65536".to_string())
                && xfs_io.contains(&"falloc 0 65536".to_string()),
            "{xfs_io:?}"
        );
        assert!(
            xfs_io.contains(&"msync -s 0 65536".to_string()),
            "{xfs_io:?}"
        );
        assert_eq!(xfs_io.last().unwrap(), "/mnt/xfs/x.dat");
    }

    #[test]
    fn nvdimm_offset_of_a_real_file_adds_the_namespace_data_offset() {
        let dir = tempfile::tempdir().unwrap();
        let place = Place::Dir {
            path: dir.path().to_path_buf(),
            dax: false,
        };
        let w = run(Case::Fsync, Fs::Ext4, &place, &mut no_gate()).unwrap();
        match nvdimm_offset(&w, &place, 0x40_0000) {
            Ok(off) => {
                let f = File::open(&w.path).unwrap();
                let ext = fiemap::extents(&f, 0, w.len).unwrap();
                assert_eq!(off, 0x40_0000 + fiemap::locate(&ext, 0, w.len).unwrap());
            }
            Err(CaseError::Locate(e)) => println!("SKIP: no FIEMAP here: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
