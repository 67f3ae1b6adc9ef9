//! The host file behind an NVDIMM: opened, checked and locked before anything is mapped.
//!
//! A missing file is created sparse when a size is given, and removed again if opening the
//! device fails later on. Writable devices take an exclusive `flock`, read-only ones a shared
//! one, so two pmvm processes cannot write one image. Within this process, the same file given
//! twice (by any path: symlinks and hard links included) is caught by comparing st_dev/st_ino.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::PmemConfig;
use crate::files::create_private;
use crate::path_lock::{PathLock, PathLockError};
use crate::size::format_size;
use crate::SIZE_ALIGN;

/// Why a backing file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("{path} does not exist; add size=SIZE to create it (e.g. size=1G)")]
    Missing { path: PathBuf },
    #[error("{path} does not exist, and a readonly=on device cannot create it")]
    MissingReadonly { path: PathBuf },
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}, not a regular file; pmem needs a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is on a read-only filesystem; add readonly=on to use it read-only")]
    ReadOnlyFilesystem { path: PathBuf },
    #[error("no permission to open {path} for writing; add readonly=on or fix its permissions")]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot allocate {size} bytes for {path}: guest stores must not meet a full file \
         system later; free space, or add sparse=on to create it sparse"
    )]
    Allocate {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path} is in use by another process (locked)")]
    Locked { path: PathBuf },
    #[error(
        "{path} is in use by {holder} (its lock file {lock_file} is locked); stop that pmvm \
         first, or give this one another file"
    )]
    PathLocked {
        path: PathBuf,
        lock_file: PathBuf,
        holder: String,
    },
    #[error(
        "cannot lock {lock_file}, which guards {path} against a second pmvm; pmvm needs to \
         create it in the backing file's directory"
    )]
    PathLock {
        path: PathBuf,
        lock_file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{id} ({path}) and {other_id} ({other_path}) are the same file")]
    SameFile {
        id: String,
        path: PathBuf,
        other_id: String,
        other_path: PathBuf,
    },
    #[error("size={size} for {path} is not a positive multiple of 2 MiB; try {suggestion}", size = format_size(*.size))]
    BadSize {
        path: PathBuf,
        size: u64,
        suggestion: String,
    },
    #[error("{path} is {len} bytes long, not a positive multiple of 2 MiB; give {suggestion} or resize the file", len = .len)]
    BadFileLength {
        path: PathBuf,
        len: u64,
        suggestion: String,
    },
    #[error("size={size} exceeds file length {len} of {path}", size = format_size(*.size), len = format_size(*.len))]
    TooShort { path: PathBuf, size: u64, len: u64 },
    #[error("cannot set the length of {path} to {size} bytes")]
    Resize {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
}

/// Which file an open descriptor refers to, whatever path reached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    fn of(meta: &fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// A backing file this process has open for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedFile {
    pub id: String,
    pub path: PathBuf,
    pub identity: FileIdentity,
}

/// The entry in `opened` that is the same file as `identity`, if any.
pub fn find_same_file(identity: FileIdentity, opened: &[OpenedFile]) -> Option<&OpenedFile> {
    opened.iter().find(|o| o.identity == identity)
}

/// Checks a set of opened files pairwise; the error names the first two that are the same file.
pub fn check_distinct(opened: &[OpenedFile]) -> Result<(), BackingError> {
    for (i, file) in opened.iter().enumerate() {
        if let Some(other) = find_same_file(file.identity, &opened[..i]) {
            return Err(same_file_error(file, other));
        }
    }
    Ok(())
}

fn same_file_error(file: &OpenedFile, other: &OpenedFile) -> BackingError {
    BackingError::SameFile {
        id: file.id.clone(),
        path: file.path.clone(),
        other_id: other.id.clone(),
        other_path: other.path.clone(),
    }
}

/// An open, locked, size-checked backing file.
#[derive(Debug)]
pub struct Backing {
    file: File,
    opened: OpenedFile,
    size: u64,
    readonly: bool,
    /// Set while a file we created must be removed if the device does not come up.
    remove_on_drop: bool,
    /// Last, so it is released after the file is closed (and removed, if ours to remove).
    _path_lock: Option<PathLock>,
}

impl Backing {
    /// Opens, checks and locks the backing file of `cfg` for the device named `id`.
    pub fn open(cfg: &PmemConfig, id: &str) -> Result<Backing, BackingError> {
        Self::open_among(cfg, id, &[])
    }

    /// Like `open`, for a device opened after `already_open`: the same file among them is
    /// refused as such, since our own lock on it would otherwise read as another process's.
    pub fn open_among(
        cfg: &PmemConfig,
        id: &str,
        already_open: &[OpenedFile],
    ) -> Result<Backing, BackingError> {
        let path = cfg.path.clone();
        let (file, created) = open_or_create(cfg)?;
        // From here on, a failure must not leave a file we created behind.
        let guard = CreatedFile {
            path: created.then(|| path.clone()),
        };
        let meta = file.metadata().map_err(|source| BackingError::Stat {
            path: path.clone(),
            source,
        })?;
        check_regular(&path, &meta)?;
        let opened = OpenedFile {
            id: id.to_string(),
            path: path.clone(),
            identity: FileIdentity::of(&meta),
        };

        if let Some(other) = find_same_file(opened.identity, already_open) {
            return Err(same_file_error(&opened, other));
        }
        // The path first: the inode's lock alone misses a pmvm whose file was replaced.
        let path_lock = lock_path(&path, cfg.readonly)?;
        lock(&file, &path, cfg.readonly)?;
        let size = if created {
            let size = cfg.size.unwrap_or_default();
            file.set_len(size).map_err(|source| BackingError::Resize {
                path: path.clone(),
                size,
                source,
            })?;
            if !cfg.sparse {
                allocate(&file, &path, size)?;
            }
            size
        } else {
            let size = checked_size(&path, cfg.size, meta.len())?;
            if !cfg.readonly {
                warn_if_holes_do_not_fit(&file, &path, size, &meta);
            }
            size
        };

        Ok(Backing {
            file,
            opened,
            size,
            readonly: cfg.readonly,
            remove_on_drop: guard.disarm(),
            _path_lock: path_lock,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.opened.path
    }

    pub fn id(&self) -> &str {
        &self.opened.id
    }

    /// Bytes the device exposes: the configured size, or the file length.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn identity(&self) -> FileIdentity {
        self.opened.identity
    }

    pub fn opened(&self) -> &OpenedFile {
        &self.opened
    }

    /// Whether opening created the file and it is still to be removed on drop.
    pub fn removes_on_drop(&self) -> bool {
        self.remove_on_drop
    }

    /// The device came up: a file we created is the user's from now on.
    pub fn keep(&mut self) {
        self.remove_on_drop = false;
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        if self.remove_on_drop {
            remove_created(&self.opened.path);
        }
    }
}

/// Removes a file we created unless disarmed.
struct CreatedFile {
    path: Option<PathBuf>,
}

impl CreatedFile {
    /// Hands responsibility on; returns whether there was a created file.
    fn disarm(mut self) -> bool {
        self.path.take().is_some()
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            remove_created(path);
        }
    }
}

fn remove_created(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        log::warn!("cannot remove {} that pmvm created: {e}", path.display());
    }
}

/// Gives a created file its blocks, so a full file system fails the start rather than guest
/// stores. File systems without fallocate keep the file sparse, with a warning.
fn allocate(file: &File, path: &Path, size: u64) -> Result<(), BackingError> {
    let len = libc::off_t::try_from(size).unwrap_or(libc::off_t::MAX);
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`,
    // which outlives the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EOPNOTSUPP) {
        log::warn!(
            "{}: the file system cannot allocate it; it stays sparse, and guest stores can \
             meet a full file system",
            path.display()
        );
        return Ok(());
    }
    Err(BackingError::Allocate {
        path: path.to_path_buf(),
        size,
        source,
    })
}

/// Warns when an existing sparse file's holes are larger than the free space left: guest
/// stores into them would fail, and the VM would stop in `io-error`.
fn warn_if_holes_do_not_fit(file: &File, path: &Path, size: u64, meta: &fs::Metadata) {
    let holes = size.saturating_sub(meta.blocks().saturating_mul(512));
    if holes == 0 {
        return;
    }
    // SAFETY: a zeroed statvfs is a valid value for fstatvfs to fill in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is owned by `file`, and `st` is a valid, writable statvfs.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return;
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if holes > free {
        log::warn!(
            "{}: {} of it are holes but its file system has {} free; guest stores there will \
             stop the VM in io-error once it is full",
            path.display(),
            format_size(holes),
            format_size(free)
        );
    }
}

/// Opens the file, creating it (empty; the caller sets its length) when it is missing and a size
/// is given. Returns whether it was created.
fn open_or_create(cfg: &PmemConfig) -> Result<(File, bool), BackingError> {
    let path = &cfg.path;
    match fs::metadata(path) {
        // Refuse special files before opening them: opening a device can have side effects.
        Ok(meta) => check_regular(path, &meta)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return create(cfg).map(|f| (f, true)),
        Err(source) => {
            return Err(BackingError::Stat {
                path: path.clone(),
                source,
            })
        }
    }
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(!cfg.readonly)
        // Never block on a FIFO swapped in after the check above.
        .custom_flags(libc::O_NONBLOCK);
    match options.open(path) {
        Ok(file) => Ok((file, false)),
        // Lost a race with a concurrent remove: create it as if it had been missing.
        Err(e) if e.kind() == io::ErrorKind::NotFound => create(cfg).map(|f| (f, true)),
        Err(source) => Err(open_error(path, cfg.readonly, source)),
    }
}

fn create(cfg: &PmemConfig) -> Result<File, BackingError> {
    let path = &cfg.path;
    if cfg.readonly {
        return Err(BackingError::MissingReadonly { path: path.clone() });
    }
    let size = cfg
        .size
        .ok_or_else(|| BackingError::Missing { path: path.clone() })?;
    // Check before creating, so a bad size leaves nothing behind.
    if !is_valid_size(size) {
        return Err(BackingError::BadSize {
            path: path.clone(),
            size,
            suggestion: suggest_sizes(size),
        });
    }
    create_private(path).map_err(|source| match open_error(path, false, source) {
        BackingError::Open { path, source } => BackingError::Create { path, source },
        other => other,
    })
}

/// Maps an open(2) failure to the error that tells the user what to change.
fn open_error(path: &Path, readonly: bool, source: io::Error) -> BackingError {
    let path = path.to_path_buf();
    match source.raw_os_error() {
        Some(libc::EROFS) if !readonly => BackingError::ReadOnlyFilesystem { path },
        Some(libc::EACCES | libc::EPERM) if !readonly => {
            BackingError::PermissionDenied { path, source }
        }
        Some(libc::EISDIR) => BackingError::NotRegular {
            path,
            kind: "directory",
        },
        _ => BackingError::Open { path, source },
    }
}

fn check_regular(path: &Path, meta: &fs::Metadata) -> Result<(), BackingError> {
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let kind = if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(BackingError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

/// Takes the lock on the path (see [`crate::path_lock`]). A read-only device in a directory
/// it cannot write goes without: only writers can tear an image.
fn lock_path(path: &Path, readonly: bool) -> Result<Option<PathLock>, BackingError> {
    match PathLock::take(path, !readonly) {
        Ok(l) => Ok(Some(l)),
        Err(PathLockError::Held { lock_file, pid }) => Err(BackingError::PathLocked {
            path: path.to_path_buf(),
            lock_file,
            holder: pid.map_or("another pmvm".into(), |p| format!("pmvm pid {p}")),
        }),
        Err(PathLockError::Io { lock_file, source }) if readonly => {
            log::warn!(
                "{}: no path lock ({}: {source}); only its inode is locked",
                path.display(),
                lock_file.display()
            );
            Ok(None)
        }
        Err(PathLockError::Io { lock_file, source }) => Err(BackingError::PathLock {
            path: path.to_path_buf(),
            lock_file,
            source,
        }),
    }
}

/// How long a held lock is retried: a child that another thread of this process forked holds
/// a copy of every descriptor, and so the lock of a just-closed file, until it execs.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Takes the whole-file advisory lock: exclusive to write, shared to read. A lock another
/// process keeps longer than `LOCK_RETRY` is an error, not a wait.
fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), BackingError> {
    let op = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    let deadline = std::time::Instant::now() + LOCK_RETRY;
    let mut held = try_flock(file, op);
    while matches!(&held, Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
        held = try_flock(file, op);
    }
    match held {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(BackingError::Locked {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(BackingError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn try_flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock only reads its integer arguments; the descriptor is owned by `file`, which
    // outlives the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn is_valid_size(size: u64) -> bool {
    size > 0 && size % SIZE_ALIGN == 0
}

/// The valid sizes nearest to `size`: rounded down (if not zero) and up (if representable).
fn suggest_sizes(size: u64) -> String {
    let down = size / SIZE_ALIGN * SIZE_ALIGN;
    let up = down.checked_add(SIZE_ALIGN);
    let mut options: Vec<String> = Vec::new();
    if down > 0 {
        options.push(format!("size={}", format_size(down)));
    }
    if let Some(up) = up {
        options.push(format!("size={}", format_size(up)));
    }
    options.join(" or ")
}

/// The device size for an existing file of length `len`.
fn checked_size(path: &Path, size: Option<u64>, len: u64) -> Result<u64, BackingError> {
    match size {
        Some(size) if !is_valid_size(size) => Err(BackingError::BadSize {
            path: path.to_path_buf(),
            size,
            suggestion: suggest_sizes(size),
        }),
        Some(size) if size > len => Err(BackingError::TooShort {
            path: path.to_path_buf(),
            size,
            len,
        }),
        Some(size) => Ok(size),
        None if !is_valid_size(len) => Err(BackingError::BadFileLength {
            path: path.to_path_buf(),
            len,
            suggestion: suggest_sizes(len),
        }),
        None => Ok(len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    const MIB: u64 = 1 << 20;

    fn cfg(path: &Path) -> PmemConfig {
        PmemConfig::new(path)
    }

    fn file_of_len(path: &Path, len: u64) {
        File::create(path).unwrap().set_len(len).unwrap();
    }

    #[test]
    fn missing_without_size_says_to_give_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        let err = Backing::open(&cfg(&path), "pmem0").unwrap_err();
        assert!(matches!(err, BackingError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("size="), "{err}");
        let err =
            Backing::open(&cfg(&path).with_size(2 << 20).with_readonly(true), "pmem0").unwrap_err();
        assert!(
            matches!(err, BackingError::MissingReadonly { .. }),
            "{err:?}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn missing_with_size_is_created_allocated_unless_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let allocated = dir.path().join("full.img");
        Backing::open(&cfg(&allocated).with_size(4 << 20), "pmem0")
            .unwrap()
            .keep();
        let blocks = fs::metadata(&allocated).unwrap().blocks() * 512;
        assert!(blocks >= 4 * MIB, "only {blocks} bytes allocated");
        let path = dir.path().join("new.img");
        let mut b =
            Backing::open(&cfg(&path).with_size(64 << 20).with_sparse(true), "pmem0").unwrap();
        assert_eq!(b.size(), 64 * MIB);
        assert!(b.removes_on_drop());
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert_eq!(meta.blocks(), 0, "a created image must be sparse");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        b.keep();
        drop(b);
        assert!(path.exists(), "a kept file stays");
    }

    #[test]
    fn created_file_is_removed_when_device_does_not_come_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.img");
        let b = Backing::open(&cfg(&path).with_size(2 << 20), "pmem0").unwrap();
        drop(b);
        assert!(
            !path.exists(),
            "dropping before keep() removes the created file"
        );
    }

    #[test]
    fn created_file_is_removed_when_a_later_step_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.img");
        // 2^63 bytes is a multiple of 2 MiB but no file can be that long: set_len fails after
        // the file was created.
        let err = Backing::open(&cfg(&path).with_size(8388608 << 40), "pmem0").unwrap_err();
        assert!(matches!(err, BackingError::Resize { .. }), "{err:?}");
        assert!(
            !path.exists(),
            "the file created for the device must be removed"
        );
    }

    #[test]
    fn existing_file_size_defaults_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        file_of_len(&path, 8 * MIB);
        let b = Backing::open(&cfg(&path), "pmem0").unwrap();
        assert_eq!(b.size(), 8 * MIB);
        assert!(!b.removes_on_drop());
        drop(b);
        assert!(path.exists(), "an existing file is never removed");
        let b = Backing::open(&cfg(&path).with_size(4 << 20), "pmem0").unwrap();
        assert_eq!(b.size(), 4 * MIB, "a smaller size maps a prefix");
        drop(b);

        let err = Backing::open(&cfg(&path).with_size(1 << 30), "pmem0").unwrap_err();
        assert!(matches!(err, BackingError::TooShort { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("size=1G exceeds file length 8M of"), "{msg}");
        assert!(msg.contains("pmem.img"), "{msg}");
    }

    #[test]
    fn size_not_a_2m_multiple_suggests_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        let err = Backing::open(&cfg(&path).with_size(3 << 20), "pmem0").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("size=2M or size=4M"), "{msg}");
        assert!(!path.exists(), "a bad size must not create the file");
        let err = Backing::open(&cfg(&path).with_size(1 << 20), "pmem0").unwrap_err();
        assert!(err.to_string().ends_with("try size=2M"), "{err}");
        let err = Backing::open(&cfg(&path).with_size(0), "pmem0").unwrap_err();
        assert!(
            matches!(err, BackingError::BadSize { size: 0, .. }),
            "{err:?}"
        );

        file_of_len(&path, 5 * MIB);
        let err = Backing::open(&cfg(&path), "pmem0").unwrap_err();
        assert!(matches!(err, BackingError::BadFileLength { .. }), "{err:?}");
        assert!(err.to_string().contains("size=4M or size=6M"), "{err}");
        let err = Backing::open(&cfg(&path).with_size(3000 << 10), "pmem0").unwrap_err();
        assert!(err.to_string().contains("size=3000K"), "{err}");
        file_of_len(&path, 0);
        let err = Backing::open(&cfg(&path), "pmem0").unwrap_err();
        assert!(
            matches!(err, BackingError::BadFileLength { len: 0, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn suggestions_at_the_edges() {
        assert_eq!(suggest_sizes(1), "size=2M");
        assert_eq!(suggest_sizes(2 * MIB + 1), "size=2M or size=4M");
        assert_eq!(
            suggest_sizes(u64::MAX),
            format!("size={}", format_size(u64::MAX / SIZE_ALIGN * SIZE_ALIGN))
        );
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for readonly in [false, true] {
            let err = Backing::open(&cfg(dir.path()).with_readonly(readonly), "pmem0").unwrap_err();
            assert!(
                matches!(
                    err,
                    BackingError::NotRegular {
                        kind: "directory",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn fifo_is_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let status = Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(status.success());
        for c in [
            cfg(&path),
            cfg(&path).with_readonly(true),
            cfg(&path).with_size(2 << 20),
        ] {
            let err = Backing::open(&c, "pmem0").unwrap_err();
            assert!(
                matches!(err, BackingError::NotRegular { kind: "FIFO", .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }

    #[test]
    fn character_device_is_refused() {
        let err =
            Backing::open(&cfg(Path::new("/dev/null")).with_readonly(true), "pmem0").unwrap_err();
        assert!(
            matches!(
                err,
                BackingError::NotRegular {
                    kind: "character device",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn lock_held_by_another_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        file_of_len(&path, 2 * MIB);
        let other = File::open(&path).unwrap();
        try_flock(&other, libc::LOCK_EX).unwrap();
        for readonly in [false, true] {
            let err = Backing::open(&cfg(&path).with_readonly(readonly), "pmem0").unwrap_err();
            assert!(matches!(err, BackingError::Locked { .. }), "{err:?}");
            assert!(
                err.to_string()
                    .ends_with("pmem.img is in use by another process (locked)"),
                "{err}"
            );
        }
        drop(other);
        Backing::open(&cfg(&path), "pmem0").unwrap();
    }

    #[test]
    fn readers_share_and_exclude_writers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        file_of_len(&path, 2 * MIB);
        let reader = File::open(&path).unwrap();
        try_flock(&reader, libc::LOCK_SH).unwrap();
        let b = Backing::open(&cfg(&path).with_readonly(true), "pmem0").unwrap();
        assert!(b.readonly());
        let err = Backing::open_among(&cfg(&path), "pmem1", &[b.opened().clone()]).unwrap_err();
        assert!(matches!(err, BackingError::SameFile { .. }), "{err:?}");
        drop(b);
        let err = Backing::open(&cfg(&path), "pmem1").unwrap_err();
        assert!(matches!(err, BackingError::Locked { .. }), "{err:?}");
    }

    #[test]
    fn same_file_twice_via_symlink_and_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        let link = dir.path().join("link.img");
        let hard = dir.path().join("hard.img");
        file_of_len(&path, 2 * MIB);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        fs::hard_link(&path, &hard).unwrap();
        let first = Backing::open(&cfg(&path).with_id("a"), "a").unwrap();
        for other in [&link, &hard] {
            for readonly in [false, true] {
                let c = cfg(other).with_readonly(readonly);
                let err = Backing::open_among(&c, "b", &[first.opened().clone()]).unwrap_err();
                let msg = err.to_string();
                assert!(matches!(err, BackingError::SameFile { .. }), "{err:?}");
                assert!(msg.starts_with("b (") && msg.contains(" and a ("), "{msg}");
                assert!(msg.contains(&other.display().to_string()), "{msg}");
                assert!(msg.contains(&path.display().to_string()), "{msg}");
            }
        }
        drop(first);
        Backing::open(&cfg(&link), "b").unwrap();
    }

    #[test]
    fn check_distinct_names_the_pair() {
        let f = |id: &str, ino| OpenedFile {
            id: id.into(),
            path: format!("/{id}.img").into(),
            identity: FileIdentity { dev: 1, ino },
        };
        assert!(check_distinct(&[f("a", 1), f("b", 2), f("c", 3)]).is_ok());
        let err = check_distinct(&[f("a", 1), f("b", 2), f("c", 1)]).unwrap_err();
        match err {
            BackingError::SameFile { id, other_id, .. } => {
                assert_eq!((id.as_str(), other_id.as_str()), ("c", "a"))
            }
            other => panic!("unexpected {other:?}"),
        }
        let other_dev = OpenedFile {
            identity: FileIdentity { dev: 2, ino: 1 },
            ..f("d", 1)
        };
        assert!(check_distinct(&[f("a", 1), other_dev]).is_ok());
    }

    #[test]
    fn readonly_opens_a_0444_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        file_of_len(&path, 4 * MIB);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();
        let b = Backing::open(&cfg(&path).with_readonly(true), "pmem0").unwrap();
        assert_eq!(b.size(), 4 * MIB);
        assert!(b.readonly());
    }

    #[test]
    fn open_errors_point_at_readonly() {
        let p = Path::new("/x/pmem.img");
        let denied = open_error(p, false, io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(denied, BackingError::PermissionDenied { .. }));
        assert!(denied.to_string().contains("readonly=on"), "{denied}");
        let rofs = open_error(p, false, io::Error::from_raw_os_error(libc::EROFS));
        assert!(matches!(rofs, BackingError::ReadOnlyFilesystem { .. }));
        assert!(rofs.to_string().contains("read-only filesystem"), "{rofs}");
        let ro_denied = open_error(p, true, io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(ro_denied, BackingError::Open { .. }));
    }
}
