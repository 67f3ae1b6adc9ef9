//! The typed configuration of one device. The VMM builds it (from its command line); checks
//! that need the file are in `backing`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// One device as the user described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PmemConfig {
    /// Backing file; created sparse if missing and `size` is given.
    pub path: PathBuf,
    /// Bytes exposed to the guest; defaults to the file length.
    pub size: Option<u64>,
    /// Name in the API and logs; defaults to `pmem<index>`.
    pub id: Option<String>,
    /// Map the file read-only: guest writes exit to the VMM and are dropped.
    pub readonly: bool,
    /// Number of flush-hint addresses to advertise; the VMM's default if unset.
    pub hints: Option<u32>,
    /// Which persistence model the device follows.
    pub persist: PersistMode,
    /// `adr` only: write back what the guest dirtied this often, flush or not.
    pub writeback_interval: Option<Duration>,
    /// Append every flush's pages to this flush-epoch log.
    pub flush_log: Option<PathBuf>,
    /// What the VM does when a flush of this device fails.
    pub on_error: OnError,
    /// Leave a file this device creates sparse instead of allocating it (a full file system
    /// then fails guest stores, not the start).
    pub sparse: bool,
}

/// What happens to the VM when a flush cannot be made durable. Either way the flushing vCPU
/// never sees its flush complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnError {
    /// Pause in the `io-error` state; `resume` retries (QEMU's `werror=stop`).
    #[default]
    Stop,
    /// Stop pmvm with its own exit status.
    Exit,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Stop => "stop",
            OnError::Exit => "exit",
        }
    }
}

/// When guest stores reach the backing file. On the wire: `adr` or `flush`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersistMode {
    /// The guest's view is the file's page cache (a shared mapping): every store is in the
    /// file at once, and a flush makes the dirtied pages durable on disk.
    #[default]
    Adr,
    /// The guest's view is a private copy: the file changes only at flushes, which write the
    /// dirtied pages into it. The file is always the durable image as of the last flush.
    Flush,
}

impl PersistMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PersistMode::Adr => "adr",
            PersistMode::Flush => "flush",
        }
    }
}

impl fmt::Display for PersistMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Bounds of `writeback-interval=`, in milliseconds: often enough to matter, rarely enough not
/// to turn the writeback thread into a busy loop.
pub const MIN_WRITEBACK_INTERVAL_MS: u64 = 10;
pub const MAX_WRITEBACK_INTERVAL_MS: u64 = 3_600_000;

impl PmemConfig {
    /// A device backed by `path`, every other option at its default.
    pub fn new(path: impl Into<PathBuf>) -> PmemConfig {
        PmemConfig {
            path: path.into(),
            size: None,
            id: None,
            readonly: false,
            hints: None,
            persist: PersistMode::Adr,
            writeback_interval: None,
            flush_log: None,
            on_error: OnError::Stop,
            sparse: false,
        }
    }

    pub fn with_size(mut self, bytes: u64) -> PmemConfig {
        self.size = Some(bytes);
        self
    }

    pub fn with_id(mut self, id: &str) -> PmemConfig {
        self.id = Some(id.to_string());
        self
    }

    pub fn with_readonly(mut self, readonly: bool) -> PmemConfig {
        self.readonly = readonly;
        self
    }

    pub fn with_hints(mut self, hints: u32) -> PmemConfig {
        self.hints = Some(hints);
        self
    }

    pub fn with_persist(mut self, persist: PersistMode) -> PmemConfig {
        self.persist = persist;
        self
    }

    pub fn with_writeback_interval(mut self, interval: Duration) -> PmemConfig {
        self.writeback_interval = Some(interval);
        self
    }

    pub fn with_sparse(mut self, sparse: bool) -> PmemConfig {
        self.sparse = sparse;
        self
    }

    /// The id, or `pmem<index>` where `index` is the device's position among the devices.
    pub fn id_or_default(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("pmem{index}"))
    }
}
