//! `pmvm pmem format` and `pmvm pmem info`: prepare and inspect NVDIMM backing files offline.
//!
//! `format --mode fsdax` writes the fsdax info block ([`nvdimm::pfn`]) at offset 4 KiB, so a
//! label-less Linux guest finds the namespace in fsdax mode at boot, and optionally an ext4
//! filesystem (block size 4096, as DAX requires) built from a directory into the data area.
//! `format --mode raw` leaves no info block, so the guest sees a raw namespace; an ext4
//! filesystem then starts at offset 0.
//!
//! Formatting discards the file's previous contents: every byte the format does not write
//! reads as zero afterwards. Every check runs, and the ext4 image is built in a temporary file,
//! before the backing file is touched, so a refused format changes nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use nvdimm::pfn::{
    InfoKind, PfnError, PfnInfoBlock, PfnLayout, INFO_BLOCK_OFFSET, INFO_BLOCK_SIZE, PAGE_SIZE,
};
use nvdimm::{format_size, parse_size, SizeError, SIZE_ALIGN};

/// `pmvm pmem ...`.
#[derive(Debug, Args)]
pub struct PmemArgs {
    #[command(subcommand)]
    pub command: PmemCommand,
}

/// Offline operations on NVDIMM backing files (never on a file a running pmvm holds).
#[derive(Debug, Subcommand)]
pub enum PmemCommand {
    /// Lay out a backing file for a label-less Linux guest: an fsdax info block (the guest
    /// finds /dev/pmem0 in fsdax mode at boot) or a raw namespace, optionally with an ext4
    /// filesystem built from a directory. Discards the file's previous contents.
    #[command(after_help = "Example:\n  \
        pmvm pmem format root.img --size 256M --mode fsdax --ext4-from rootfs/\n  \
        pmvm --kernel vmlinux --pmem path=root.img \\\n    \
        --cmdline 'console=ttyS0 root=/dev/pmem0 rootflags=dax rw'")]
    Format(FormatArgs),
    /// Print what a backing file holds: the info block's fields and checksum, whether Linux
    /// would accept it, and the filesystem found at the data offset.
    Info {
        /// The backing file.
        file: PathBuf,
    },
}

/// How the guest sees the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// An fsdax (pfn) info block with the memmap in the device: DAX works.
    Fsdax,
    /// No info block: a plain block device without DAX.
    Raw,
}

#[derive(Debug, Args)]
pub struct FormatArgs {
    /// The backing file; created when missing.
    pub file: PathBuf,
    /// Device size (K/M/G suffix, a multiple of 2M). Default: the file's current length.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// fsdax: info block for a DAX-capable namespace; raw: none.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Build an ext4 filesystem (4K blocks) holding DIR's files in the data area.
    #[arg(long, value_name = "DIR")]
    pub ext4_from: Option<PathBuf>,
    /// fsdax mapping alignment: 4K, 2M or 1G.
    #[arg(long, value_name = "SIZE", default_value = "2M")]
    pub align: String,
    /// Overwrite a file that already holds a filesystem or an info block.
    #[arg(long)]
    pub force: bool,
}

/// Why a format or info was refused or failed. Nothing was changed in any case except
/// [`FormatError::Write`].
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("--size {value:?} is not a size")]
    BadSize {
        value: String,
        #[source]
        source: SizeError,
    },
    #[error("--align {value:?} is not a size")]
    BadAlign {
        value: String,
        #[source]
        source: SizeError,
    },
    #[error("{} does not exist; give --size to create it", .path.display())]
    NoSize { path: PathBuf },
    #[error("--size {size} is not a positive multiple of 2 MiB; try {suggestion}", size = format_size(*.size))]
    SizeMisaligned { size: u64, suggestion: String },
    #[error("{} is {len} bytes long, not a positive multiple of 2 MiB; give --size (e.g. --size {suggestion})", .path.display())]
    FileLenMisaligned {
        path: PathBuf,
        len: u64,
        suggestion: String,
    },
    #[error("cannot lay out {}", .path.display())]
    Layout {
        path: PathBuf,
        #[source]
        source: PfnError,
    },
    #[error("{} is not a regular file", .path.display())]
    NotAFile { path: PathBuf },
    #[error("{} is read-only (mode {mode:o}); make it writable (chmod u+w) to format it", .path.display())]
    ReadOnlyFile { path: PathBuf, mode: u32 },
    #[error("{} is on a read-only filesystem", .path.display())]
    ReadOnlyFs { path: PathBuf },
    #[error("cannot open {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is in use by another process (a running pmvm?); stop it first", .path.display())]
    Locked { path: PathBuf },
    #[error("{} already holds {what}; add --force to overwrite it", .path.display())]
    Occupied { path: PathBuf, what: String },
    #[error("{} is {len} bytes long; formatting it to {size} bytes would cut it short; add --force to do so", .path.display())]
    WouldShrink { path: PathBuf, len: u64, size: u64 },
    #[error("--ext4-from {} is not a directory", .dir.display())]
    NotADirectory { dir: PathBuf },
    #[error("mkfs.ext4 was not found; install e2fsprogs")]
    NoMkfs,
    #[error("the files of {} (about {need}) do not fit in an ext4 filesystem of {have} (the data area); give a larger --size: mkfs.ext4 said: {detail}", .dir.display(), need = format_size_approx(*.need), have = format_size(*.have))]
    Ext4DoesNotFit {
        dir: PathBuf,
        need: u64,
        have: u64,
        detail: String,
    },
    #[error("mkfs.ext4 failed: {detail}")]
    Mkfs { detail: String },
    #[error("cannot create a temporary ext4 image in {}", .dir.display())]
    TempImage {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {} failed; its contents are now undefined: format it again", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn format_size_approx(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{}M", bytes.div_ceil(1 << 20))
    } else {
        format!("{}K", bytes.div_ceil(1 << 10))
    }
}

/// Runs a `pmvm pmem` subcommand, printing its result on stdout or its error on stderr.
pub fn run(args: PmemArgs) -> ExitCode {
    let result = match args.command {
        PmemCommand::Format(f) => format(&f).map(|done| println!("{done}")),
        PmemCommand::Info { file } => info(&file).map(|text| print!("{text}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmvm: {}", crate::api::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// What a format decided, before anything is written.
struct Plan {
    size: u64,
    /// The info block and the data offset, for fsdax.
    pfn: Option<(PfnLayout, PfnInfoBlock)>,
    /// Where the data (and any filesystem) starts, and how long it is.
    data_offset: u64,
    data_size: u64,
}

fn plan(args: &FormatArgs, existing_len: Option<u64>) -> Result<Plan, FormatError> {
    let size = match &args.size {
        Some(value) => parse_size(value).map_err(|source| FormatError::BadSize {
            value: value.clone(),
            source,
        })?,
        None => existing_len.ok_or_else(|| FormatError::NoSize {
            path: args.file.clone(),
        })?,
    };
    if size == 0 || size % SIZE_ALIGN != 0 {
        let suggestion = format_size(size.div_ceil(SIZE_ALIGN).max(1) * SIZE_ALIGN);
        return Err(match args.size {
            Some(_) => FormatError::SizeMisaligned { size, suggestion },
            None => FormatError::FileLenMisaligned {
                path: args.file.clone(),
                len: size,
                suggestion,
            },
        });
    }
    let align = parse_size(&args.align).map_err(|source| FormatError::BadAlign {
        value: args.align.clone(),
        source,
    })?;
    match args.mode {
        Mode::Fsdax => {
            let layout = PfnLayout::pmem(size, align).map_err(|source| FormatError::Layout {
                path: args.file.clone(),
                source,
            })?;
            let block = PfnInfoBlock::fsdax(&layout, random_uuid());
            Ok(Plan {
                size,
                pfn: Some((layout, block)),
                data_offset: layout.dataoff,
                data_size: layout.data_size(),
            })
        }
        Mode::Raw => Ok(Plan {
            size,
            pfn: None,
            data_offset: 0,
            data_size: size,
        }),
    }
}

/// Formats `args.file`; returns the one-line summary to print.
pub fn format(args: &FormatArgs) -> Result<String, FormatError> {
    let path = &args.file;
    let existing = open_existing(path)?;
    let existing_len = existing.as_ref().map(|(_, len)| *len);
    let plan = plan(args, existing_len)?;
    if let Some(dir) = &args.ext4_from {
        if !dir.is_dir() {
            return Err(FormatError::NotADirectory { dir: dir.clone() });
        }
    }
    if let Some((file, len)) = &existing {
        if !args.force {
            if let Some(what) = occupant(file, *len, path)? {
                return Err(FormatError::Occupied {
                    path: path.clone(),
                    what,
                });
            }
            if *len > plan.size {
                return Err(FormatError::WouldShrink {
                    path: path.clone(),
                    len: *len,
                    size: plan.size,
                });
            }
        }
    }
    let image = match &args.ext4_from {
        Some(dir) => Some(build_ext4(dir, plan.data_size)?),
        None => None,
    };

    // From here on the file changes.
    let file = match existing {
        Some((file, _)) => file,
        None => create_new(path)?,
    };
    let write_err = |source| FormatError::Write {
        path: path.clone(),
        source,
    };
    file.set_len(0).map_err(write_err)?;
    file.set_len(plan.size).map_err(write_err)?;
    if let Some((_, block)) = &plan.pfn {
        file.write_all_at(&block.encode(), INFO_BLOCK_OFFSET)
            .map_err(write_err)?;
    }
    if let Some(image) = &image {
        copy_sparse(image.file(), &file, plan.data_offset).map_err(write_err)?;
    }
    file.sync_all().map_err(write_err)?;

    let mut summary = format!(
        "{}: {} bytes ({})",
        path.display(),
        plan.size,
        format_size(plan.size)
    );
    match &plan.pfn {
        Some((layout, block)) => summary.push_str(&format!(
            ", fsdax: info block at {INFO_BLOCK_OFFSET:#x}, uuid {}, memmap in the device, \
             data at {:#x} ({} pages, {}), align {}",
            uuid_string(&{ block.uuid }),
            layout.dataoff,
            layout.npfns,
            format_size(layout.data_size()),
            format_size(layout.align),
        )),
        None => summary.push_str(", raw: no info block"),
    }
    if let Some(dir) = &args.ext4_from {
        summary.push_str(&format!(
            ", ext4 from {} at {:#x}",
            dir.display(),
            plan.data_offset
        ));
    }
    Ok(summary)
}

/// Opens an existing backing file for writing, checking it can be formatted; None if missing.
fn open_existing(path: &Path) -> Result<Option<(File, u64)>, FormatError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(FormatError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(FormatError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    // Root may write a mode 0444 file; a format should not.
    if meta.permissions().readonly() {
        return Err(FormatError::ReadOnlyFile {
            path: path.to_path_buf(),
            mode: meta.permissions().mode() & 0o7777,
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| open_error(path, source))?;
    lock(&file, path)?;
    Ok(Some((file, meta.len())))
}

fn create_new(path: &Path) -> Result<File, FormatError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| open_error(path, source))?;
    lock(&file, path)?;
    Ok(file)
}

fn open_error(path: &Path, source: io::Error) -> FormatError {
    match source.raw_os_error() {
        Some(libc::EROFS) => FormatError::ReadOnlyFs {
            path: path.to_path_buf(),
        },
        Some(libc::EACCES) | Some(libc::EPERM) => FormatError::ReadOnlyFile {
            path: path.to_path_buf(),
            mode: fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0),
        },
        _ => FormatError::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// Takes the lock a running pmvm holds on its backing files, so a format never pulls a file
/// from under a guest.
fn lock(file: &File, path: &Path) -> Result<(), FormatError> {
    // SAFETY: flock only reads its integer arguments; the descriptor is owned by `file`, which
    // outlives the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(FormatError::Locked {
            path: path.to_path_buf(),
        })
    } else {
        Err(FormatError::Open {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Reads up to `len` bytes at `offset`; short at the end of the file.
fn read_at(file: &File, offset: u64, len: usize, path: &Path) -> Result<Vec<u8>, FormatError> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(FormatError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// A filesystem found in a file.
#[derive(Debug, PartialEq, Eq)]
pub struct Filesystem {
    pub kind: &'static str,
    pub offset: u64,
    /// ext4 only: block size, blocks and volume label.
    pub ext4: Option<Ext4Summary>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Ext4Summary {
    pub block_size: u64,
    pub blocks: u64,
    pub label: String,
}

/// ext2/3/4 superblock: at 1024 bytes into the filesystem, magic 0xEF53 at offset 0x38.
const EXT4_SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xef53;

/// Recognises the ext4 superblock (`sb` is the 1 KiB at filesystem offset 1024).
pub fn parse_ext4_superblock(sb: &[u8]) -> Option<Ext4Summary> {
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap_or_default());
    if sb.len() < 0x160 || u16::from_le_bytes([sb[0x38], sb[0x39]]) != EXT4_MAGIC {
        return None;
    }
    let log_block = u32_at(0x18);
    let block_size = 1024u64.checked_shl(log_block.min(16))?;
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let hi = if incompat_64bit { u32_at(0x150) } else { 0 };
    let blocks = (u64::from(hi) << 32) | u64::from(u32_at(0x04));
    let label = String::from_utf8_lossy(&sb[0x78..0x88])
        .trim_end_matches('\0')
        .to_string();
    Some(Ext4Summary {
        block_size,
        blocks,
        label,
    })
}

/// Finds a filesystem starting at `offset` of the file.
fn filesystem_at(file: &File, offset: u64, path: &Path) -> Result<Option<Filesystem>, FormatError> {
    let head = read_at(file, offset, 2048, path)?;
    if head.len() >= 4 && &head[..4] == b"XFSB" {
        return Ok(Some(Filesystem {
            kind: "xfs",
            offset,
            ext4: None,
        }));
    }
    let sb = head
        .get(EXT4_SUPERBLOCK_OFFSET as usize..)
        .unwrap_or_default();
    Ok(parse_ext4_superblock(sb).map(|summary| Filesystem {
        kind: "ext4",
        offset,
        ext4: Some(summary),
    }))
}

/// The info block at 4 KiB, if the file has one of any kind.
fn info_block_at(
    file: &File,
    path: &Path,
) -> Result<Option<(InfoKind, [u8; INFO_BLOCK_SIZE])>, FormatError> {
    let bytes = read_at(file, INFO_BLOCK_OFFSET, INFO_BLOCK_SIZE, path)?;
    let Ok(block) = <[u8; INFO_BLOCK_SIZE]>::try_from(bytes.as_slice()) else {
        return Ok(None);
    };
    Ok(InfoKind::of(&block).map(|kind| (kind, block)))
}

/// Describes what a format would destroy: an info block or a filesystem; None if neither.
fn occupant(file: &File, len: u64, path: &Path) -> Result<Option<String>, FormatError> {
    if let Some((kind, block)) = info_block_at(file, path)? {
        let mut what = format!("an {} info block", kind.mode_name());
        if kind == InfoKind::Pfn {
            let dataoff = PfnInfoBlock::decode(&block).dataoff;
            if dataoff < len {
                if let Some(fs) = filesystem_at(file, dataoff, path)? {
                    what.push_str(&format!(
                        " and an {} filesystem at {:#x}",
                        fs.kind, fs.offset
                    ));
                }
            }
        }
        return Ok(Some(what));
    }
    Ok(filesystem_at(file, 0, path)?.map(|fs| format!("an {} filesystem", fs.kind)))
}

/// Prints what a backing file holds.
pub fn info(path: &Path) -> Result<String, FormatError> {
    let file = File::open(path).map_err(|source| FormatError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| FormatError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut out = format!(
        "file:           {} ({len} bytes, {})\n",
        path.display(),
        format_size(len)
    );
    let mut fs_offset = 0;
    match info_block_at(&file, path)? {
        Some((InfoKind::Pfn, bytes)) => {
            let b = PfnInfoBlock::decode(&bytes);
            let checksum = if b.checksum_ok() { "ok" } else { "BAD" };
            let mode = match b.mode {
                1 => "ram (memmap in guest RAM)".to_string(),
                2 => "pmem (memmap in the device)".to_string(),
                other => format!("{other} (unknown)"),
            };
            let parent = if b.parent_uuid == [0; 16] {
                "null (label-less namespace)".to_string()
            } else {
                uuid_string(&{ b.parent_uuid })
            };
            out.push_str(&format!(
                "info block:     fsdax (NVDIMM_PFN_INFO) at {INFO_BLOCK_OFFSET:#x}, version {}.{}\n\
                 checksum:       {:#018x} {checksum}\n\
                 uuid:           {}\n\
                 parent uuid:    {parent}\n\
                 flags:          {:#x}\n\
                 mode:           {mode}\n\
                 dataoff:        {:#x} ({})\n\
                 npfns:          {} ({} of data)\n\
                 align:          {}\n\
                 start_pad:      {:#x}\n\
                 end_trunc:      {:#x}\n\
                 page_size:      {}\n\
                 page_struct:    {}\n",
                { b.version_major },
                { b.version_minor },
                { b.checksum },
                uuid_string(&{ b.uuid }),
                { b.flags },
                { b.dataoff },
                format_size(b.dataoff),
                { b.npfns },
                format_size(b.npfns.saturating_mul(PAGE_SIZE)),
                format_size(u64::from(b.align)),
                { b.start_pad },
                { b.end_trunc },
                { b.page_size },
                { b.page_struct_size },
            ));
            match b.check(len) {
                Ok(()) => out.push_str("linux:          accepts it as fsdax\n"),
                Err(e) => out.push_str(&format!("linux:          refuses it: {e}\n")),
            }
            fs_offset = b.dataoff;
        }
        Some((kind, _)) => out.push_str(&format!(
            "info block:     {} at {INFO_BLOCK_OFFSET:#x} (not decoded)\n",
            kind.mode_name()
        )),
        None => out.push_str("info block:     none (the guest sees a raw namespace)\n"),
    }
    let fs = if fs_offset < len {
        filesystem_at(&file, fs_offset, path)?
    } else {
        None
    };
    match fs {
        Some(Filesystem { ext4: Some(e), .. }) => out.push_str(&format!(
            "filesystem:     ext4 at {fs_offset:#x}, block size {}, {} blocks ({}), label {:?}{}\n",
            e.block_size,
            e.blocks,
            format_size(e.blocks.saturating_mul(e.block_size)),
            e.label,
            if e.block_size == PAGE_SIZE {
                ""
            } else {
                " (not DAX-capable: block size is not 4096)"
            },
        )),
        Some(fs) => out.push_str(&format!("filesystem:     {} at {fs_offset:#x}\n", fs.kind)),
        None => out.push_str(&format!("filesystem:     none found at {fs_offset:#x}\n")),
    }
    Ok(out)
}

/// A temporary file removed when dropped.
struct TempImage {
    path: PathBuf,
    file: File,
}

impl TempImage {
    fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Builds an ext4 filesystem of exactly `size` bytes holding `dir`'s files, in a temporary file.
fn build_ext4(dir: &Path, size: u64) -> Result<TempImage, FormatError> {
    let tmp_dir = std::env::temp_dir();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let path = tmp_dir.join(format!("pmvm-ext4-{}-{nanos}.img", std::process::id()));
    let temp_err = |source| FormatError::TempImage {
        dir: tmp_dir.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(temp_err)?;
    let image = TempImage { path, file };
    image.file.set_len(size).map_err(temp_err)?;
    // 4 KiB blocks: DAX needs block size == page size, and mke2fs picks 1 KiB for small
    // filesystems. 256-byte inodes keep timestamps past 2038.
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-I", "256", "-L", "pmvm", "-d"])
        .arg(dir)
        .arg(&image.path)
        .env("PATH", mkfs_path())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => FormatError::NoMkfs,
            _ => FormatError::Mkfs {
                detail: e.to_string(),
            },
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail = stderr
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("no message")
            .to_string();
        let need = tree_size(dir);
        let full = [
            "Could not allocate",
            "No space left",
            "too small",
            "not enough space",
        ];
        if full.iter().any(|f| stderr.contains(f)) || need >= size {
            return Err(FormatError::Ext4DoesNotFit {
                dir: dir.to_path_buf(),
                need,
                have: size,
                detail,
            });
        }
        return Err(FormatError::Mkfs { detail });
    }
    Ok(image)
}

/// mkfs.ext4 lives in /sbin on Debian, which a user's PATH may lack.
fn mkfs_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/sbin:/sbin")
}

/// Bytes the files under `dir` take in 4 KiB blocks, plus a block per entry.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        total += PAGE_SIZE;
        match entry.metadata() {
            Ok(m) if m.is_dir() => total += tree_size(&entry.path()),
            Ok(m) => total += m.len().div_ceil(PAGE_SIZE) * PAGE_SIZE,
            Err(_) => {}
        }
    }
    total
}

/// Copies `src` into `dst` at `offset`, skipping holes (the destination already reads zero).
pub(crate) fn copy_sparse(src: &File, dst: &File, offset: u64) -> io::Result<()> {
    let len = src.metadata()?.len();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let Some(data) = seek(src, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(len);
        let mut at = data;
        while at < hole {
            let want = ((hole - at) as usize).min(buf.len());
            let n = src.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the ext4 image shrank while being copied",
                ));
            }
            dst.write_all_at(&buf[..n], offset + at)?;
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// lseek with SEEK_DATA or SEEK_HOLE; None past the last data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: lseek only reads its integer arguments; the descriptor is owned by `file`, which
    // outlives the call. Only this thread uses the file's offset (reads use pread).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// A random (version 4) uuid for a new pfn device.
fn random_uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut uuid))
        .is_err()
    {
        // Uniqueness is all the kernel needs; time and pid give it without /dev/urandom.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        uuid.copy_from_slice(&(nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes());
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

/// The usual 8-4-4-4-12 form, bytes in order (as Linux prints uuid_t).
fn uuid_string(u: &[u8; 16]) -> String {
    let hex: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_version_4_and_printed_in_byte_order() {
        let u = random_uuid();
        assert_eq!(u[6] >> 4, 4);
        assert_eq!(u[8] >> 6, 0b10);
        assert_ne!(random_uuid(), u);
        let fixed = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(uuid_string(&fixed), "00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn ext4_superblock_fields() {
        let mut sb = vec![0u8; 1024];
        assert_eq!(parse_ext4_superblock(&sb), None);
        sb[0x38..0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&15872u32.to_le_bytes());
        sb[0x78..0x7c].copy_from_slice(b"root");
        assert_eq!(
            parse_ext4_superblock(&sb),
            Some(Ext4Summary {
                block_size: 4096,
                blocks: 15872,
                label: "root".into()
            })
        );
        // 64bit feature: blocks_count_hi counts.
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(
            parse_ext4_superblock(&sb).unwrap().blocks,
            (1 << 32) + 15872
        );
        assert_eq!(parse_ext4_superblock(&sb[..0x100]), None, "too short");
    }

    fn args(file: &Path, size: &str, mode: Mode) -> FormatArgs {
        FormatArgs {
            file: file.to_path_buf(),
            size: Some(size.to_string()),
            mode,
            ext4_from: None,
            align: "2M".into(),
            force: false,
        }
    }

    #[test]
    fn fsdax_format_writes_a_block_the_kernel_checks_accept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        format(&args(&path, "64M", Mode::Fsdax)).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 64 << 20);
        assert!(bytes[..4096].iter().all(|&b| b == 0));
        let block = PfnInfoBlock::decode(bytes[4096..8192].try_into().unwrap());
        assert_eq!(block.check(64 << 20), Ok(()));
        assert_eq!({ block.dataoff }, 2 << 20);
        assert!(bytes[8192..].iter().all(|&b| b == 0));
        let text = info(&path).unwrap();
        assert!(text.contains("checksum:       0x"), "{text}");
        assert!(text.contains(" ok\n"), "{text}");
        assert!(
            text.contains("linux:          accepts it as fsdax"),
            "{text}"
        );
        assert!(
            text.contains("filesystem:     none found at 0x200000"),
            "{text}"
        );
    }

    #[test]
    fn refuses_to_format_over_an_info_block_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        format(&args(&path, "64M", Mode::Fsdax)).unwrap();
        let before = fs::read(&path).unwrap();
        let err = format(&args(&path, "64M", Mode::Raw)).unwrap_err();
        assert!(matches!(err, FormatError::Occupied { .. }), "{err:?}");
        assert!(err.to_string().contains("an fsdax info block"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        let mut forced = args(&path, "64M", Mode::Raw);
        forced.force = true;
        format(&forced).unwrap();
        assert!(fs::read(&path).unwrap().iter().all(|&b| b == 0));
        assert!(info(&path).unwrap().contains("info block:     none"));
    }

    #[test]
    fn a_corrupted_block_is_reported_bad() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        format(&args(&path, "64M", Mode::Fsdax)).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 4096 + 100).unwrap();
        let text = info(&path).unwrap();
        assert!(text.contains(" BAD\n"), "{text}");
        assert!(
            text.contains("linux:          refuses it: checksum"),
            "{text}"
        );
    }
}
