//! What the control socket may do to a running machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nvdimm::{Nvdimm, NvdimmError};

use crate::api::types::{FlushReport, PmemInfo, VmInfo, VmState};
use crate::api::{ApiError, VmmControl};
use crate::devices::lock;
use crate::exit::{ExitReason, ExitSignal, PowerCutCause};
use crate::power_cut::PowerSwitch;
use crate::vcpu::VcpuThreads;

/// The running machine as the API sees it.
pub struct MachineControl {
    pub started: Instant,
    pub vcpus: u32,
    pub memory: u64,
    pub kernel: String,
    pub cmdline: String,
    pub pmem: Vec<Arc<Nvdimm>>,
    pub threads: Arc<VcpuThreads>,
    pub exit: Arc<ExitSignal>,
    pub power: PowerSwitch,
    /// Held across a pause or resume, so the two never interleave.
    pub paused: Mutex<bool>,
    /// The same value, readable without waiting for a pause or resume in progress: a state
    /// query must answer while a vCPU is stuck in the file system.
    pub paused_flag: AtomicBool,
}

impl MachineControl {
    fn state(&self) -> VmState {
        if self.exit.reason().is_some() {
            VmState::ShuttingDown
        } else if self.threads.io_error().is_some() {
            VmState::IoError
        } else if self.paused_flag.load(Ordering::Acquire) {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn device(&self, id: &str) -> Result<&Arc<Nvdimm>, ApiError> {
        self.pmem
            .iter()
            .find(|d| d.id() == id)
            .ok_or_else(|| ApiError::NoSuchDevice { id: id.to_string() })
    }

    fn refuse_if_stopping(&self, action: &'static str) -> Result<(), ApiError> {
        match self.state() {
            VmState::ShuttingDown => Err(ApiError::WrongState {
                action,
                state: VmState::ShuttingDown,
            }),
            _ => Ok(()),
        }
    }
}

/// The API's view of one NVDIMM.
pub fn pmem_info(d: &Nvdimm) -> PmemInfo {
    let hints = d.hint_addresses();
    PmemInfo {
        id: d.id().to_string(),
        path: d.path().display().to_string(),
        size_bytes: d.size(),
        guest_base: d.guest_base(),
        flush_hint_count: hints.len() as u32,
        flush_hint_addresses: hints,
        readonly: d.readonly(),
        pending_dirty_pages: d.pending_pages(),
        stats: d.stats(),
        persist: d.persist(),
        writeback_interval_ms: d.writeback_interval().map(|i| i.as_millis() as u64),
        flush_log: d.flush_log_path().map(|p| p.display().to_string()),
        dirty_tracking: d.dirty_tracking(),
        io_error: d.io_fault(),
    }
}

impl VmmControl for MachineControl {
    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: self.state(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            vcpus: self.vcpus,
            memory_bytes: self.memory,
            kernel: self.kernel.clone(),
            cmdline: self.cmdline.clone(),
            io_error: self.threads.io_error(),
            writebacks_in_progress: self
                .pmem
                .iter()
                .filter_map(|d| d.writeback_in_progress())
                .collect(),
        }
    }

    fn pmem_list(&self) -> Vec<PmemInfo> {
        let mut list: Vec<PmemInfo> = self.pmem.iter().map(|d| pmem_info(d)).collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    fn pmem_info(&self, id: &str) -> Option<PmemInfo> {
        self.device(id).ok().map(|d| pmem_info(d))
    }

    fn pmem_flush(&self, id: &str) -> Result<FlushReport, ApiError> {
        let dev = self.device(id)?;
        let report = dev.host_flush();
        if let Err(NvdimmError::Flush { source, .. }) = &report {
            if let Some(line) = crate::pmem::stop_line(dev, source) {
                self.exit.request(ExitReason::Fatal(line));
            }
        }
        report.map_err(|e| ApiError::Failed {
            action: format!("flushing {id}"),
            source: Box::new(e),
        })
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.refuse_if_stopping("pause")?;
        let mut paused = lock(&self.paused);
        if *paused {
            return Err(ApiError::WrongState {
                action: "pause",
                state: VmState::Paused,
            });
        }
        self.threads.pause().map_err(|e| ApiError::Failed {
            action: "pausing the vCPUs".into(),
            source: Box::new(e),
        })?;
        *paused = true;
        self.paused_flag.store(true, Ordering::Release);
        Ok(())
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.refuse_if_stopping("resume")?;
        let mut paused = lock(&self.paused);
        if self.threads.io_error().is_some() {
            return self.retry_io_error();
        }
        if !*paused {
            return Err(ApiError::WrongState {
                action: "resume",
                state: VmState::Running,
            });
        }
        self.threads.resume();
        *paused = false;
        self.paused_flag.store(false, Ordering::Release);
        Ok(())
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.refuse_if_stopping("shut down")?;
        self.exit.request(ExitReason::Shutdown);
        Ok(())
    }

    fn power_cut(&self) -> Result<(), ApiError> {
        self.cut(PowerCutCause::Api)
    }

    fn pmem_crash(&self, id: &str) -> Result<(), ApiError> {
        self.device(id)?;
        self.cut(PowerCutCause::ApiDevice)
    }
}

impl MachineControl {
    /// The machine's power cut, then the vCPUs stopped, so the guest stops storing. All are
    /// done when the client gets its answer.
    fn cut(&self, cause: PowerCutCause) -> Result<(), ApiError> {
        self.refuse_if_stopping("cut the power of")?;
        self.power.cut(cause);
        self.threads.stop();
        Ok(())
    }

    /// `resume` in `io-error`: a writeback of every device in fault, which rewrites its pages
    /// from guest memory; the vCPUs run again only if every one is durable.
    fn retry_io_error(&self) -> Result<(), ApiError> {
        let mut pages = 0;
        for d in self.pmem.iter().filter(|d| d.io_fault().is_some()) {
            let report = d.host_flush().map_err(|e| ApiError::Failed {
                action: format!("retrying the writeback of {}", d.id()),
                source: Box::new(e),
            })?;
            pages += report.pages;
        }
        self.threads.clear_io_error();
        eprintln!("pmvm: io-error cleared: the retry made {pages} pages durable; resuming");
        Ok(())
    }
}
