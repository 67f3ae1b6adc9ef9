//! The JSON documents of the control socket. The server writes them, the `pmvm` client
//! subcommands and the integration tests read them: one definition for all three.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use nvdimm::config::PersistMode;
pub use nvdimm::stats::{FlushReport, PmemStats, Tracking};
pub use nvdimm::{IoFault, WritebackInProgress};

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// A flush failed: the vCPUs are held and no flush is acknowledged until `resume`
    /// retries it successfully (`io_error` in [`VmInfo`] says why).
    #[serde(rename = "io-error")]
    IoError,
    /// A shutdown was requested or the guest powered off; the process is about to exit.
    ShuttingDown,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::IoError => "io-error",
            VmState::ShuttingDown => "shutting_down",
        })
    }
}

/// `GET /v1/vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
    /// Milliseconds since the VM was created.
    pub uptime_ms: u64,
    pub vcpus: u32,
    /// Guest RAM, not counting NVDIMMs.
    pub memory_bytes: u64,
    /// The kernel image as given on the command line.
    pub kernel: String,
    pub cmdline: String,
    /// Why the VM is in `io-error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_error: Option<IoFault>,
    /// Writebacks running now; one running for seconds is blocked in the file system.
    #[serde(default)]
    pub writebacks_in_progress: Vec<WritebackInProgress>,
}

/// One NVDIMM: `GET /v1/pmem/{id}`, and an element of `GET /v1/pmem`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemInfo {
    pub id: String,
    /// The host backing file.
    pub path: String,
    pub size_bytes: u64,
    /// Guest-physical address of the first byte of the device.
    pub guest_base: u64,
    /// Number of Flush Hint Addresses the NFIT advertises for the device.
    pub flush_hint_count: u32,
    /// Their guest-physical addresses.
    pub flush_hint_addresses: Vec<u64>,
    pub readonly: bool,
    /// Pages dirtied since the last writeback, when the VMM can tell without harvesting
    /// (harvesting would clear the dirty log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_dirty_pages: Option<u64>,
    pub stats: PmemStats,
    /// The persistence model, `adr` or `flush` (docs/persistence.md).
    #[serde(default)]
    pub persist: PersistMode,
    /// The background writeback period, for `writeback-interval=` devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback_interval_ms: Option<u64>,
    /// The flush-epoch log, for `flush-log=` devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_log: Option<String>,
    /// How pmvm learns which pages the guest wrote.
    #[serde(default)]
    pub dirty_tracking: Tracking,
    /// The failure that keeps the device from acknowledging flushes, until a retry succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_error: Option<IoFault>,
}

/// `GET /v1/pmem`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemList {
    pub devices: Vec<PmemInfo>,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_uses_snake_case_on_the_wire_and_in_display() {
        for (state, text) in [
            (VmState::Running, "running"),
            (VmState::Paused, "paused"),
            (VmState::IoError, "io-error"),
            (VmState::ShuttingDown, "shutting_down"),
        ] {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{text}\"")
            );
            assert_eq!(state.to_string(), text);
        }
    }

    #[test]
    fn pending_dirty_pages_is_omitted_when_unknown_and_read_back_as_none() {
        let info = PmemInfo {
            id: "pmem0".into(),
            path: "/tmp/p".into(),
            size_bytes: 1 << 30,
            guest_base: 1 << 32,
            flush_hint_count: 1,
            flush_hint_addresses: vec![0xd000_0000],
            readonly: false,
            pending_dirty_pages: None,
            stats: PmemStats::default(),
            persist: PersistMode::Adr,
            writeback_interval_ms: None,
            flush_log: None,
            dirty_tracking: Tracking::Bitmap,
            io_error: None,
        };
        let json = serde_json::to_value(&info).unwrap();
        assert!(json.get("pending_dirty_pages").is_none());
        assert!(json.get("flush_log").is_none() && json.get("writeback_interval_ms").is_none());
        assert_eq!(json["persist"], "adr");
        assert_eq!(json["stats"]["background_flushes"], 0);
        assert_eq!(json["stats"]["latency_us"]["p99"], 0);
        let back: PmemInfo = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, info);
        // A document from a pmvm before persistence models still reads.
        let mut old = json;
        old.as_object_mut().unwrap().remove("persist");
        for key in ["background_flushes", "background_pages", "log_epochs"] {
            old["stats"].as_object_mut().unwrap().remove(key);
        }
        assert_eq!(serde_json::from_value::<PmemInfo>(old).unwrap(), info);
    }
}
