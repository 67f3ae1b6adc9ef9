//! What keeps a device from acknowledging flushes: the backing file checked before each
//! writeback, the `io-error` fault a failed writeback records, guest stores KVM could not back,
//! and the fatal case of a truncated file ([`FlushError::Shrunk`], returned by every flush
//! once found).

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::{pages_spanned, FlushError, Nvdimm};
use crate::config::PersistMode;
use crate::error_chain as chain;
use crate::fault::{errno_name, IoFault};
use crate::file_id;
use crate::flush_log::AppendError;
use crate::lock::lock;

impl Nvdimm {
    /// A guest store into the device's range that reached pmvm as an MMIO exit: KVM could
    /// not back the page (a full file system, an I/O error on the page fault). The store is
    /// kept and applied by the next writeback; until one succeeds the device is in fault, and
    /// the vCPU must not re-enter the guest.
    pub fn unbacked_store(&self, offset: u64, data: &[u8]) -> FlushError {
        lock(&self.unbacked).push((offset, data.to_vec()));
        self.metrics.errors.inc();
        let e = FlushError::UnbackedStore {
            offset,
            len: data.len(),
            source: None,
        };
        self.record_fault(&e);
        e
    }

    /// The fault that keeps this device from acknowledging flushes, if any.
    pub fn io_fault(&self) -> Option<IoFault> {
        lock(&self.fault).clone()
    }

    pub(super) fn record_fault(&self, e: &FlushError) {
        if self.persist == PersistMode::Adr {
            self.distrust_page_cache.store(true, Ordering::Release);
        }
        let errno = e.errno();
        let stake = lock(&self.pending).len()
            + lock(&self.unbacked)
                .iter()
                .map(|(off, d)| pages_spanned(*off, d.len()))
                .sum::<u64>();
        *lock(&self.fault) = Some(IoFault {
            device: self.id.clone(),
            path: self.path().display().to_string(),
            errno,
            errno_name: errno_name(errno),
            what: chain(e),
            pages_at_stake: stake,
        });
    }

    /// Fails if the backing file is now shorter than the device or ever was (guest stores past
    /// its end cannot be made durable, and host reads there would fault), or if the path no
    /// longer names it (a flush would reach an orphaned inode).
    pub(super) fn check_backing(&self) -> Result<(), FlushError> {
        if let Some(shrunk) = self.shrunk.get() {
            return Err(shrunk.clone());
        }
        // Skipped while nothing on the path changed (`path_watch`).
        self.path_watch.check(|| self.check_path())
    }

    /// Whether the path still names the open file, and at full length.
    fn check_path(&self) -> Result<(), FlushError> {
        // Not fstat: see `file_id` (a flush would write the inode too). One statx of the path
        // while it still names the open file, whose identity never changes.
        match file_id::of_path(self.path()) {
            Ok(named) if named.identity == self.backing.identity() => {
                if named.size < self.size() {
                    return Err(self.shrunk_error(Some(named.size)));
                }
                Ok(())
            }
            // The path names another file or none: the open file was deleted or replaced.
            _ => {
                let open = file_id::of_file(self.backing.file())
                    .map_err(|e| FlushError::Stat(io_errno(&e)))?;
                if open.nlink == 0 {
                    return Err(FlushError::Unlinked {
                        copy_from: format!(
                            "/proc/{}/fd/{}",
                            std::process::id(),
                            self.backing.file().as_raw_fd()
                        ),
                    });
                }
                Err(FlushError::Replaced)
            }
        }
    }

    /// The file's length if it is shorter than the device (or why it cannot be read).
    pub(super) fn backing_shrunk(&self) -> Option<Result<u64, vmm_sys_util::errno::Error>> {
        match file_id::of_file(self.backing.file()) {
            Ok(id) if id.size < self.size() => Some(Ok(id.size)),
            Ok(_) => None,
            Err(e) => Some(Err(vmm_sys_util::errno::Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))),
        }
    }

    /// The error `e` stands for if it means the backing file shrank: a page the flush log
    /// could not read counts when the file is shorter than the device now.
    fn shrunk_by(&self, e: &FlushError) -> Option<FlushError> {
        match e {
            FlushError::Shrunk { .. } => Some(e.clone()),
            FlushError::Log(AppendError::ReadPage { .. }) => {
                self.backing_shrunk().map(|len| self.shrunk_error(len.ok()))
            }
            _ => None,
        }
    }

    fn shrunk_error(&self, len: Option<u64>) -> FlushError {
        FlushError::Shrunk {
            path: self.path().display().to_string(),
            len,
            size: self.size(),
        }
    }

    /// Counts a failed writeback and returns what the flushes it covered fail with: the first
    /// shrink found, for good (no later flush can succeed); otherwise `e`, recorded as the
    /// device's fault until a writeback succeeds.
    pub(super) fn failed_writeback(&self, e: FlushError) -> FlushError {
        self.metrics.errors.inc();
        if let Some(shrunk) = self.shrunk_by(&e) {
            return self.shrunk.get_or_init(|| shrunk).clone();
        }
        if e != FlushError::PoweredOff {
            self.record_fault(&e);
            log::debug!("{}: writeback failed: {}", self.id, chain(&e));
        }
        e
    }

    /// Fails with [`FlushError::Shrunk`] if a writeback found the backing file shorter than the
    /// device, or it is now: for a fault the VMM cannot otherwise explain (KVM failing to map
    /// guest memory, or to back a store).
    pub fn check_length(&self) -> Result<(), FlushError> {
        if let Some(Ok(len)) = self.backing_shrunk() {
            let _ = self.shrunk.set(self.shrunk_error(Some(len)));
        }
        self.shrunk.get().map_or(Ok(()), |e| Err(e.clone()))
    }

    /// Applies the guest stores KVM could not back, through the file (which the `adr` mapping
    /// shares) or the private copy; each applied store's pages become pending.
    pub(super) fn apply_unbacked(&self) -> Result<(), FlushError> {
        use std::os::unix::fs::FileExt;
        let mut stores = lock(&self.unbacked);
        while let Some((offset, data)) = stores.first() {
            let failed = |source| FlushError::UnbackedStore {
                offset: *offset,
                len: data.len(),
                source: Some(source),
            };
            match self.persist {
                PersistMode::Adr => self
                    .backing
                    .file()
                    .write_all_at(data, *offset)
                    .map_err(|e| failed(io_errno(&e)))?,
                PersistMode::Flush => self
                    .mapping
                    .write_at(*offset, data)
                    .map_err(|_| failed(vmm_sys_util::errno::Error::new(libc::EFAULT)))?,
            }
            self.mark_pending(*offset, data.len());
            stores.remove(0);
        }
        Ok(())
    }
}

fn io_errno(e: &std::io::Error) -> vmm_sys_util::errno::Error {
    vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO))
}
