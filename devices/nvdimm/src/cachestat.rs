//! What the host page cache holds of a file range, from cachestat(2) (Linux 6.5+): the tests
//! and the guest suite read durability from it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The kernel's `struct cachestat`: page-cache state of a file range, in pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStat {
    pub nr_cache: u64,
    pub nr_dirty: u64,
    pub nr_writeback: u64,
    pub nr_evicted: u64,
    pub nr_recently_evicted: u64,
}

/// The kernel's `struct cachestat_range`: `len` 0 means "to the end of the file".
#[repr(C)]
struct CacheStatRange {
    off: u64,
    len: u64,
}

/// x86-64 syscall number of cachestat; libc has no wrapper.
const SYS_CACHESTAT: libc::c_long = 451;

/// Which pages of `len` bytes at `off` of `file` are cached, dirty (written but not yet on
/// disk) or under writeback.
pub fn cachestat(file: &File, off: u64, len: u64) -> io::Result<CacheStat> {
    let range = CacheStatRange { off, len };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat` into `stat`; both are
    // #[repr(C)] with the kernel's layout and live across the call; the descriptor is owned by
    // `file`, open for the call; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CacheStatRange,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    if rc == 0 {
        return Ok(stat);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOSYS) {
        return Err(io::Error::new(
            e.kind(),
            "cachestat(2) is not available: the host kernel must be Linux 6.5 or newer",
        ));
    }
    Err(e)
}
