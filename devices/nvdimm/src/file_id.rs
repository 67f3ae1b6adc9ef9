//! Which inode a file or path is, its link count and size, read without its timestamps.
//!
//! Reading a file's ctime or mtime (`fstat`, `std::fs::metadata`) makes Linux 6.13 and later
//! (multigrain timestamps) give the file's next change a fresh fine-grained timestamp, and a new
//! timestamp dirties the inode: the next `fdatasync` then writes the inode block as well as the
//! data. Checking the backing file before every flush that way costs one more I/O per flush.
//! `statx` without the time fields leaves the timestamps coarse, and a change within the same
//! clock tick leaves the inode clean.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::backing::FileIdentity;

/// What a flush checks about its backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub identity: FileIdentity,
    pub nlink: u32,
    pub size: u64,
}

const MASK: u32 = libc::STATX_INO | libc::STATX_NLINK | libc::STATX_SIZE;

/// The open file's identity.
pub fn of_file(file: &File) -> io::Result<FileId> {
    statx(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

/// The identity of the file `path` names, following symlinks.
pub fn of_path(path: &Path) -> io::Result<FileId> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    statx(libc::AT_FDCWD, &path, 0)
}

fn statx(dirfd: libc::c_int, path: &CStr, flags: libc::c_int) -> io::Result<FileId> {
    let mut st = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a writable statx buffer
    // of the right size; statx reads nothing else of ours.
    let rc = unsafe {
        libc::statx(
            dirfd,
            path.as_ptr(),
            flags | libc::AT_STATX_SYNC_AS_STAT,
            MASK,
            st.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, and statx filled it in on success.
    let st = unsafe { st.assume_init() };
    if st.stx_mask & MASK != MASK {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "statx did not report the inode number, link count and size",
        ));
    }
    Ok(FileId {
        identity: FileIdentity {
            dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
        },
        nlink: st.stx_nlink,
        size: st.stx_size,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn agrees_with_fstat_and_sees_links_and_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_len(12345).unwrap();
        let meta = file.metadata().unwrap();
        let id = of_file(&file).unwrap();
        assert_eq!(
            (id.identity.dev, id.identity.ino, id.nlink, id.size),
            (meta.dev(), meta.ino(), 1, 12345)
        );
        assert_eq!(of_path(&path).unwrap(), id);

        std::fs::hard_link(&path, dir.path().join("g")).unwrap();
        assert_eq!(of_file(&file).unwrap().nlink, 2);
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(of_path(&link).unwrap().identity, id.identity);

        std::fs::remove_file(dir.path().join("g")).unwrap();
        assert_eq!(of_file(&file).unwrap().nlink, 1);
        std::fs::write(dir.path().join("other"), b"x").unwrap();
        std::fs::rename(dir.path().join("other"), &path).unwrap();
        assert_ne!(of_path(&path).unwrap().identity, id.identity);
        assert_eq!(of_file(&file).unwrap().nlink, 0);
        let err = of_path(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// With multigrain timestamps a write after a stat gets a fine-grained ctime, later than a
    /// clock read taken before the write; a write after `of_file` gets the coarse clock, which
    /// within one tick is not past the ctime already there, so the ctime stays before that
    /// clock read. An attempt that straddles a clock tick sees a new coarse ctime, so the test
    /// wants one clean attempt of several. (Without multigrain timestamps every write's ctime
    /// is coarse, and the test passes trivially.)
    #[test]
    fn reading_it_leaves_the_next_write_coarse_grained() {
        let file = tempfile::tempfile().unwrap();
        let ctime = |file: &File| {
            let m = file.metadata().unwrap();
            (m.ctime(), m.ctime_nsec())
        };
        let untouched = (0..20).any(|_| {
            file.write_all_at(b"a", 0).unwrap();
            ctime(&file); // queried: the next write gets a fine-grained ctime
            file.write_all_at(b"b", 0).unwrap();
            let before = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
            of_file(&file).unwrap();
            file.write_all_at(b"c", 0).unwrap();
            let (s, ns) = ctime(&file);
            (s as u64, ns as u32) < (before.as_secs(), before.subsec_nanos())
        });
        assert!(
            untouched,
            "every write after of_file got a fresh ctime: of_file reads the file's timestamps"
        );
    }
}
