//! Lets a flush skip re-reading which file the backing path names when nothing that could
//! change it has happened since the last check.
//!
//! Every flush must learn whether the backing file was replaced or deleted under its name
//! (`device::faults`). A `statx` of the path walks each component of it: 5-6 µs inside a flush
//! on an emulating host, 4% of a one-page flush. An inotify watch on the file, its directory
//! and every directory above queues an event, before the renaming or deleting call returns,
//! for each change that could make the path name another file (or shrink this one); a flush
//! then asks only whether an event is queued (`FIONREAD`, no path walk), and checks in full
//! when one is or when the last check failed.
//!
//! Not watched, so checked in full every time: `persist=flush` devices (whose flushes write
//! the file, each an event), a path through a symlink (its target can change with no event
//! on the path), and files on file systems where another machine or a
//! user-space server can change them unseen (only ext4, xfs, btrfs, f2fs and tmpfs are
//! trusted). A mount over a directory of the path queues no event either: a flush would miss
//! it until the next event.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use crate::lock::lock;

/// On the file: written to or truncated, its links or attributes changed, moved or deleted.
const FILE_EVENTS: u32 =
    libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_MOVE_SELF | libc::IN_DELETE_SELF;
/// On its directory: any name added, removed or renamed, or the directory itself moved.
const DIR_EVENTS: u32 = libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVE_SELF
    | libc::IN_DELETE_SELF;
/// On each directory above: moved or deleted (a directory on the path is never empty, so no
/// rename can replace it in place).
const ABOVE_EVENTS: u32 = libc::IN_MOVE_SELF | libc::IN_DELETE_SELF;

/// File systems whose every change goes through this kernel, which queues the events.
const LOCAL_FS: [libc::c_long; 5] = [
    libc::EXT4_SUPER_MAGIC,
    libc::XFS_SUPER_MAGIC,
    libc::BTRFS_SUPER_MAGIC,
    libc::F2FS_SUPER_MAGIC,
    libc::TMPFS_MAGIC,
];

/// The watch on one backing path.
#[derive(Debug)]
pub struct PathWatch {
    /// Held across a check, so two checks never interleave their draining and verdicts.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// None where the path is not watched (see the module comment), or no longer: once the
    /// file or a directory of the path moved, the watches are on inodes the path may no
    /// longer go through. Then every check runs.
    inotify: Option<OwnedFd>,
    /// The last check passed, and every event since it began is still queued.
    trusted: bool,
}

impl PathWatch {
    /// Watches `path`, the backing file `file` was opened from; unwatched if the path goes
    /// through a symlink, lies on an untrusted file system or inotify is out of instances or
    /// watches.
    pub fn new(path: &Path, file: &File) -> PathWatch {
        PathWatch::with(watch(path, file))
    }

    /// A path every check runs for.
    pub fn unwatched() -> PathWatch {
        PathWatch::with(None)
    }

    fn with(inotify: Option<OwnedFd>) -> PathWatch {
        PathWatch {
            state: Mutex::new(State {
                inotify,
                trusted: false,
            }),
        }
    }

    /// Whether a check can be skipped: the path is watched.
    pub fn watched(&self) -> bool {
        lock(&self.state).inotify.is_some()
    }

    /// Runs `check` unless it passed before and nothing happened since.
    pub fn check<E>(&self, check: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut state = lock(&self.state);
        if let Some(fd) = &state.inotify {
            if state.trusted && queued(fd) == Some(0) {
                return Ok(());
            }
            // Emptied before the check, so that what happens during it stays queued.
            state.trusted = drain(fd) == Drained::Entries;
            if !state.trusted {
                state.inotify = None;
            }
        }
        let checked = check();
        state.trusted &= checked.is_ok();
        checked
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// Names added or removed beside the file, or the file changed: the check tells.
    Entries,
    /// The file or a directory of the path moved or went, a watch was lost, the queue
    /// overflowed or could not be read: the watches no longer cover the path.
    Moved,
}

fn watch(path: &Path, file: &File) -> Option<OwnedFd> {
    let absolute = std::path::absolute(path).ok()?;
    if std::fs::canonicalize(&absolute).ok()? != absolute || !on_local_fs(file) {
        return None;
    }
    // SAFETY: takes no pointers; the result is checked.
    let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a descriptor inotify_init1 just returned, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Through the descriptor: the open file itself, whatever the path names by now.
    let open = format!("/proc/self/fd/{}", file.as_raw_fd());
    add_watch(&fd, Path::new(&open), FILE_EVENTS)?;
    let mut above = absolute.ancestors().skip(1);
    add_watch(&fd, above.next()?, DIR_EVENTS)?;
    for dir in above {
        add_watch(&fd, dir, ABOVE_EVENTS)?;
    }
    Some(fd)
}

fn on_local_fs(file: &File) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is a writable statfs buffer of the right size.
    if unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: zero-initialised, and fstatfs filled it in on success.
    let kind = unsafe { st.assume_init() }.f_type;
    LOCAL_FS.contains(&kind)
}

fn add_watch(fd: &OwnedFd, path: &Path, mask: u32) -> Option<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let rc = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    (rc >= 0).then_some(())
}

/// Bytes of events queued, None if it cannot be told.
fn queued(fd: &OwnedFd) -> Option<libc::c_int> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points to `n`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    (rc == 0).then_some(n)
}

/// Reads every queued event.
fn drain(fd: &OwnedFd) -> Drained {
    const LOST: u32 = libc::IN_MOVE_SELF
        | libc::IN_DELETE_SELF
        | libc::IN_IGNORED
        | libc::IN_UNMOUNT
        | libc::IN_Q_OVERFLOW;
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    // Room for the longest event (a header and a 255-byte name) many times over.
    let mut buf = [0u8; 4096];
    let mut drained = Drained::Entries;
    loop {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            let empty =
                n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN);
            return if empty { drained } else { Drained::Moved };
        }
        // Whole events only, each a header (wd, mask, cookie, len) and `len` bytes of name.
        let mut at = 0;
        while at + HEADER <= n as usize {
            let field = |i: usize| {
                u32::from_ne_bytes(
                    buf[at + 4 * i..at + 4 * i + 4]
                        .try_into()
                        .unwrap_or_default(),
                )
            };
            if field(1) & LOST != 0 {
                drained = Drained::Moved;
            }
            at += HEADER + field(3) as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// Counts the checks `w` runs, each passing as `pass` says.
    fn checks(w: &PathWatch, pass: bool, times: usize) -> usize {
        let ran = Cell::new(0);
        for _ in 0..times {
            let _ = w.check(|| {
                ran.set(ran.get() + 1);
                if pass {
                    Ok(())
                } else {
                    Err(())
                }
            });
        }
        ran.get()
    }

    fn file_in(dir: &Path) -> (std::path::PathBuf, File) {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("pmem.img");
        let file = File::create(&path).unwrap();
        (path, file)
    }

    fn watched(path: &Path, file: &File) -> PathWatch {
        let w = PathWatch::new(path, file);
        assert!(w.watched(), "{} on a local file system", path.display());
        w
    }

    #[test]
    fn a_check_that_passed_runs_again_only_after_a_change_on_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = file_in(&dir.path().join("a/b"));
        let w = watched(&path, &file);
        assert_eq!(checks(&w, true, 3), 1, "first check, then nothing changed");
        std::fs::write(dir.path().join("a/b/other"), b"x").unwrap();
        assert_eq!(checks(&w, true, 3), 1, "a name added beside the file");
        file.set_len(4096).unwrap();
        assert_eq!(checks(&w, true, 2), 1, "truncated");
        // A directory above moved (and a new tree in its place would not be watched): from
        // now on every check runs.
        std::fs::rename(dir.path().join("a"), dir.path().join("z")).unwrap();
        assert_eq!(checks(&w, true, 3), 3);
        assert!(!w.watched());
    }

    #[test]
    fn the_file_or_its_directory_moving_ends_the_watch() {
        for moved in ["pmem.img", ""] {
            let dir = tempfile::tempdir().unwrap();
            let (path, file) = file_in(&dir.path().join("d"));
            let w = watched(&path, &file);
            assert_eq!(checks(&w, true, 2), 1);
            let from = dir.path().join("d").join(moved);
            std::fs::rename(&from, from.with_extension("old")).unwrap();
            assert_eq!(checks(&w, true, 2), 2, "{moved:?} moved");
            assert!(!w.watched());
        }
    }

    #[test]
    fn a_failed_check_runs_again_with_no_new_event() {
        let dir = tempfile::tempdir().unwrap();
        let (path, file) = file_in(dir.path());
        let w = watched(&path, &file);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(checks(&w, false, 3), 3);
        assert_eq!(checks(&w, true, 3), 1);
    }

    #[test]
    fn a_path_through_a_symlink_is_checked_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let (_, file) = file_in(&dir.path().join("real"));
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let w = PathWatch::new(&dir.path().join("link/pmem.img"), &file);
        assert!(!w.watched());
        assert_eq!(checks(&w, true, 3), 3);
    }
}
