//! The host-only baselines: a sparse file of the device's size mapped MAP_SHARED, whose pages
//! the host dirties itself and then makes durable each way the host offers; the fastest of
//! them is the floor pmvm's flush is judged against.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use nvdimm::mmap::Mapping;

use crate::error::BenchError;
use crate::guest::{page_offset, PAGE};

/// A sparse file and its shared mapping; the file is removed on drop.
pub struct HostFile {
    map: Mapping,
    file: File,
    path: PathBuf,
}

impl HostFile {
    pub fn create(path: &Path, size: u64) -> Result<HostFile, BenchError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(BenchError::io(format!("creating {}", path.display())))?;
        let host = |file: File| -> Result<HostFile, BenchError> {
            file.set_len(size).map_err(BenchError::io(format!(
                "making {} {size} bytes long",
                path.display()
            )))?;
            let map = Mapping::new(&file, size, true)
                .map_err(BenchError::mmap(format!("mapping {}", path.display())))?;
            Ok(HostFile {
                map,
                file,
                path: path.to_path_buf(),
            })
        };
        host(file).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }

    /// Stores `stamp` into the first 8 bytes of each of the `pages` benchmark pages (the same
    /// pages the guest dirties on the device).
    pub fn dirty(&self, pages: u64, stamp: u64) -> Result<(), BenchError> {
        for i in 0..pages {
            self.map
                .write_at(page_offset(i), &stamp.to_le_bytes())
                .map_err(BenchError::mmap("dirtying a host page"))?;
        }
        Ok(())
    }

    /// `fdatasync` of the file alone: the kernel finds the dirty pages itself.
    pub fn fdatasync(&self) -> Result<(), BenchError> {
        self.file.sync_data().map_err(self.failed("fdatasync"))
    }

    /// `sync_file_range(WRITE)` of each dirty run (each page is one, see
    /// `STRIDE_PAGES`), an asynchronous submit, then one `fdatasync` to wait for all of it.
    pub fn submit_then_fdatasync(&self, pages: u64) -> Result<(), BenchError> {
        let fd = self.file.as_raw_fd();
        for i in 0..pages {
            let offset = page_offset(i);
            // SAFETY: sync_file_range only reads its integer arguments; `fd` is owned by
            // `self.file`, open for the whole call.
            let rc = unsafe {
                libc::sync_file_range(
                    fd,
                    offset as libc::off64_t,
                    PAGE as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if rc != 0 {
                return Err(self.failed("sync_file_range")(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        self.fdatasync()
    }

    /// What Firecracker's virtio-pmem does per flush: `msync(MS_SYNC)` of the whole mapping.
    pub fn msync_all(&self) -> Result<(), BenchError> {
        // SAFETY: the range is exactly `self.map`, mapped for its whole length while `self`
        // lives; msync neither unmaps nor changes it.
        let rc = unsafe {
            libc::msync(
                self.map.host_addr() as *mut libc::c_void,
                self.map.len() as usize,
                libc::MS_SYNC,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(self.failed("msync")(std::io::Error::last_os_error()))
        }
    }

    /// What QEMU's and Cloud Hypervisor's virtio-pmem do per flush: `fsync` of the file.
    pub fn fsync(&self) -> Result<(), BenchError> {
        self.file.sync_all().map_err(self.failed("fsync"))
    }

    /// The error of `call` on the file. Formatted only on failure: the methods are timed, and
    /// formatting the message every call made the host's ways a microsecond slower.
    fn failed(&self, call: &'static str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
        move |source| BenchError::io(format!("{call} of {}", self.path.display()))(source)
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
