//! Why a flush failed: the typed outcome every flush it covered shares.

use crate::dirty::DirtyError;
use crate::dirty_source::DirtySourceError;
use crate::flush_log::AppendError;
use crate::writeback::WritebackError;

/// Why a flush did not make its pages durable. Cloneable: one writeback's outcome is shared by
/// every flush it covered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    #[error("harvesting the dirty log failed")]
    Harvest(#[source] DirtyError),
    #[error("harvesting the dirty rings failed")]
    Ring(#[source] DirtySourceError),
    #[error("writing dirty pages back failed")]
    Writeback(#[source] WritebackError),
    #[error("logging the flush failed; the pages stay dirty and nothing was written back")]
    Log(#[source] AppendError),
    #[error("the device has lost power (power cut); nothing is written back any more")]
    PoweredOff,
    /// Fatal ([`FlushError::is_fatal`]): once found, every later flush of the device fails so.
    #[error(
        "backing file {path} shrank to {} while the guest ran (the device needs {size} \
         bytes): what the guest stored past the new end is lost",
        shrunk_len(*.len)
    )]
    Shrunk {
        path: String,
        /// None when the file's length could not be read.
        len: Option<u64>,
        size: u64,
    },
    #[error("cannot make every vCPU leave the guest before the harvest: {0}")]
    Barrier(String),
    #[error("cannot check the backing file's length")]
    Stat(#[source] vmm_sys_util::errno::Error),
    #[error(
        "its backing file was replaced (the path now names another file, or none): flushes \
         would reach a file nobody can open any more; put the original file back at the path"
    )]
    Replaced,
    #[error(
        "its backing file was deleted: nothing written to it can be found again, and resuming \
         cannot fix that; save the guest's data with `cp {copy_from} FILE` before stopping pmvm"
    )]
    Unlinked { copy_from: String },
    #[error(
        "the host could not back a guest store of {len} bytes at offset {offset:#x} (KVM \
         could not map the page: the file system may be full)"
    )]
    UnbackedStore {
        offset: u64,
        len: usize,
        #[source]
        source: Option<vmm_sys_util::errno::Error>,
    },
}

impl FlushError {
    /// Whether no later flush of the device can succeed: the VM must stop rather than wait
    /// for a retry.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FlushError::Shrunk { .. })
    }

    /// The host errno behind the failure, for the `io-error` report (EIO when none is known).
    pub fn errno(&self) -> i32 {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = source {
            if let Some(errno) = e.downcast_ref::<vmm_sys_util::errno::Error>() {
                return errno.errno();
            }
            source = e.source();
        }
        match self {
            FlushError::Replaced | FlushError::Unlinked { .. } => libc::ESTALE,
            FlushError::UnbackedStore { .. } => libc::EFAULT,
            _ => libc::EIO,
        }
    }
}

fn shrunk_len(len: Option<u64>) -> String {
    match len {
        Some(len) => format!("{len} bytes"),
        None => "less than the device".into(),
    }
}
