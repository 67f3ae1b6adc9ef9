//! A lock keyed by the backing file's path, beside it: `DIR/.NAME.pmvm-lock`.
//!
//! The `flock` on the backing file itself sits on its inode, so once that file is replaced by
//! a rename, a second pmvm would find the new file unlocked. This lock names the path instead.
//! It is an `flock` too, so the kernel drops it when its holder dies: a lock file left by a
//! crash is stale, never blocking. The holder writes its pid into the file for the refusal
//! message and removes the file when it closes the device, while still holding the lock; a
//! locker therefore checks, once locked, that the path still names the file it locked, and
//! starts again if not.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// How often a lock file removed under us is tried again; each retry means its holder closed.
const ATTEMPTS: usize = 8;

/// The held lock; released (and its file removed, if exclusive) on drop.
#[derive(Debug)]
pub struct PathLock {
    file: File,
    path: PathBuf,
    exclusive: bool,
}

/// Why the path lock was not taken.
#[derive(Debug)]
pub enum PathLockError {
    /// Another process holds it; its pid if it wrote one and still runs.
    Held {
        lock_file: PathBuf,
        pid: Option<u32>,
    },
    /// The lock file cannot be created or locked (e.g. a read-only directory).
    Io {
        lock_file: PathBuf,
        source: io::Error,
    },
}

/// The lock file for `backing`.
pub fn lock_file_for(backing: &Path) -> PathBuf {
    let name = backing.file_name().unwrap_or_default().to_string_lossy();
    backing.with_file_name(format!(".{name}.pmvm-lock"))
}

impl PathLock {
    /// Takes the lock on `backing`'s path without waiting: exclusive to write, shared to read.
    pub fn take(backing: &Path, exclusive: bool) -> Result<PathLock, PathLockError> {
        let path = lock_file_for(backing);
        let io_err = |path: &Path, source| PathLockError::Io {
            lock_file: path.to_path_buf(),
            source,
        };
        for _ in 0..ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| io_err(&path, e))?;
            let op = if exclusive {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // SAFETY: flock only reads its integer arguments; `file` owns the descriptor and
            // outlives the call.
            if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(PathLockError::Held {
                        pid: live_pid(&path),
                        lock_file: path,
                    });
                }
                return Err(io_err(&path, e));
            }
            if !still_named(&file, &path) {
                // Its holder removed it between our open and our lock: take the new one.
                continue;
            }
            let mut lock = PathLock {
                file,
                path,
                exclusive,
            };
            if exclusive {
                lock.write_pid().map_err(|e| io_err(&lock.path, e))?;
            }
            return Ok(lock);
        }
        Err(io_err(
            &path,
            io::Error::other("its lock file kept being replaced while we locked it"),
        ))
    }

    fn write_pid(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file
            .write_all(format!("{}\n", std::process::id()).as_bytes())
    }

    pub fn lock_file(&self) -> &Path {
        &self.path
    }
}

impl Drop for PathLock {
    fn drop(&mut self) {
        // Removed only by a holder that knows nobody else holds it: a reader that can take
        // it exclusively is the last. A locker that opened it just before sees it unlinked
        // and starts again.
        // SAFETY: flock only reads its integer arguments; `self.file` owns the descriptor.
        let last = self.exclusive
            || unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if last && still_named(&self.file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn still_named(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// The pid in the lock file, if that process still exists (a reader holding the lock leaves
/// a crashed writer's pid in place).
fn live_pid(path: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid_and_the_file_goes_at_close() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        let first = PathLock::take(&img, true).unwrap();
        assert_eq!(first.lock_file(), dir.path().join(".a.img.pmvm-lock"));
        match PathLock::take(&img, true) {
            Err(PathLockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            PathLock::take(&img, false),
            Err(PathLockError::Held { .. })
        ));
        drop(first);
        assert!(!lock_file_for(&img).exists());
        PathLock::take(&img, true).unwrap();
    }

    #[test]
    fn readers_share_it_and_a_stale_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("b.img");
        // A crashed holder's file: its flock went with it.
        fs::write(lock_file_for(&img), "999999999\n").unwrap();
        let r1 = PathLock::take(&img, false).unwrap();
        let r2 = PathLock::take(&img, false).unwrap();
        match PathLock::take(&img, true) {
            // The dead pid is not named.
            Err(PathLockError::Held { pid, .. }) => assert_eq!(pid, None),
            other => panic!("{other:?}"),
        }
        drop(r1);
        assert!(lock_file_for(&img).exists(), "r2 still holds it");
        drop(r2);
        assert!(!lock_file_for(&img).exists(), "the last reader removes it");
        PathLock::take(&img, true).unwrap();
    }
}
