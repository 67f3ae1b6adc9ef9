//! The control socket: a small HTTP/1.1 JSON API on a Unix socket (`--api-sock PATH`), and
//! the one client of it ([`client::Client`]) that the `pmvm stats|flush|...` subcommands, the
//! integration tests and the guest suite's harness use.
//!
//! The server never touches the VM itself. Each request is parsed on a connection thread and
//! turned into one call on [`VmmControl`], which the VMM implements; only calls whose action
//! needs the vCPUs (pause, a host flush) make them wait.
//!
//! Endpoints (see `docs/api.md`):
//! - `GET /v1/vm`, `GET /v1/pmem`, `GET /v1/pmem/{id}`, `GET /metrics`
//! - `PUT /v1/pmem/{id}/flush`, `PUT /v1/vm/pause`, `PUT /v1/vm/resume`, `PUT /v1/vm/shutdown`
//! - `PUT /v1/vm/power-cut`, `PUT /v1/pmem/{id}/crash` (simulated power loss)

pub mod client;
/// The HTTP framing, public for the fuzz targets.
#[doc(hidden)]
pub mod http;
mod metrics;
mod router;
pub mod server;
pub mod types;

#[cfg(test)]
pub(crate) mod fake;

use types::{FlushReport, PmemInfo, VmInfo, VmState};

/// What the control socket asks of the VMM. Called from connection threads, possibly several
/// at once: implementations synchronise themselves.
pub trait VmmControl: Send + Sync + 'static {
    fn vm_info(&self) -> VmInfo;

    /// Every NVDIMM, in a stable order (by id).
    fn pmem_list(&self) -> Vec<PmemInfo>;

    /// One NVDIMM, or `None` if no device has this id.
    fn pmem_info(&self, id: &str) -> Option<PmemInfo> {
        self.pmem_list().into_iter().find(|d| d.id == id)
    }

    /// Harvests the device's dirty log and writes those pages back to its file, as a guest
    /// flush would, and counts it as a host flush.
    fn pmem_flush(&self, id: &str) -> Result<FlushReport, ApiError>;

    fn pause(&self) -> Result<(), ApiError>;
    fn resume(&self) -> Result<(), ApiError>;
    /// Asks the VM to stop. Returns once the request is accepted; the process exits later.
    fn shutdown(&self) -> Result<(), ApiError>;

    /// Cuts the power: no device writes anything back any more and the vCPUs stop. Returns
    /// once both hold; the process then exits with status 3 without a final writeback.
    fn power_cut(&self) -> Result<(), ApiError>;

    /// The same power cut, asked for through one device (which must exist): a power cut
    /// cannot spare the other devices of the machine.
    fn pmem_crash(&self, id: &str) -> Result<(), ApiError>;
}

/// Why the VMM refused or failed an action. The HTTP status comes from [`ApiError::status_code`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no pmem device with id {id:?} (GET /v1/pmem lists them)")]
    NoSuchDevice { id: String },
    /// The action does not fit the VM's state, e.g. pausing a paused VM.
    #[error("cannot {action} the VM while it is {state}")]
    WrongState {
        action: &'static str,
        state: VmState,
    },
    /// The action was attempted and failed; `source` says why.
    #[error("{action} failed")]
    Failed {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ApiError {
    pub fn status_code(&self) -> u16 {
        match self {
            ApiError::NoSuchDevice { .. } => 404,
            ApiError::WrongState { .. } => 409,
            ApiError::Failed { .. } => 500,
        }
    }
}

/// An error and its causes on one line, "what: why: why", as the CLI prints them.
pub use nvdimm::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_action_reports_its_whole_chain() {
        let err = ApiError::Failed {
            action: "writeback of pmem0".into(),
            source: Box::new(std::io::Error::other("disk full")),
        };
        assert_eq!(error_chain(&err), "writeback of pmem0 failed: disk full");
        assert_eq!(err.status_code(), 500);
    }

    #[test]
    fn wrong_state_names_action_and_state() {
        let err = ApiError::WrongState {
            action: "pause",
            state: VmState::Paused,
        };
        assert_eq!(err.to_string(), "cannot pause the VM while it is paused");
        assert_eq!(err.status_code(), 409);
    }
}
