//! A [`VmmControl`] with two devices and a VM state machine, for the router, server and
//! client tests.

use std::sync::Mutex;

use nvdimm::stats::LatencySummary;

use super::types::{PersistMode, PmemInfo, PmemStats, Tracking, VmInfo, VmState};
use super::{ApiError, FlushReport, VmmControl};

pub struct FakeVmm {
    state: Mutex<(VmState, Vec<PmemInfo>)>,
}

impl FakeVmm {
    pub fn new() -> FakeVmm {
        FakeVmm {
            state: Mutex::new((VmState::Running, sample_devices())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VmState, Vec<PmemInfo>)> {
        nvdimm::lock::lock(&self.state)
    }

    fn transition(&self, action: &'static str, from: VmState, to: VmState) -> Result<(), ApiError> {
        let mut s = self.lock();
        if s.0 != from {
            return Err(ApiError::WrongState { action, state: s.0 });
        }
        s.0 = to;
        Ok(())
    }
}

/// `pmem0`: writable, 1 GiB at 4 GiB, two hints, some history. `pmem1`: read-only, unused.
pub fn sample_devices() -> Vec<PmemInfo> {
    vec![
        PmemInfo {
            id: "pmem0".into(),
            path: "/var/lib/pmvm/pmem0.img".into(),
            size_bytes: 1 << 30,
            guest_base: 0x1_4000_0000,
            flush_hint_count: 2,
            flush_hint_addresses: vec![0xd000_0000, 0xd000_0040],
            readonly: false,
            pending_dirty_pages: Some(7),
            stats: PmemStats {
                flushes: 3,
                pages_written: 300,
                bytes_written: 300 * 4096,
                runs: 5,
                empty_flushes: 1,
                host_flushes: 0,
                bad_width_writes: 0,
                last_harvest_pages: 100,
                latency_us: LatencySummary {
                    p50: 40,
                    p99: 130,
                    max: 130,
                    histogram: vec![0, 0, 0, 0, 0, 1, 1, 1],
                },
                ..Default::default()
            },
            persist: PersistMode::Adr,
            writeback_interval_ms: Some(1000),
            flush_log: Some("/var/lib/pmvm/pmem0.log".into()),
            dirty_tracking: Tracking::Ring,
            io_error: None,
        },
        PmemInfo {
            id: "pmem1".into(),
            path: "/var/lib/pmvm/ro.img".into(),
            size_bytes: 2 << 20,
            guest_base: 0x1_8000_0000,
            flush_hint_count: 1,
            flush_hint_addresses: vec![0xd000_1000],
            readonly: true,
            pending_dirty_pages: None,
            stats: PmemStats::default(),
            persist: PersistMode::Adr,
            writeback_interval_ms: None,
            flush_log: None,
            dirty_tracking: Tracking::None,
            io_error: None,
        },
    ]
}

impl VmmControl for FakeVmm {
    fn vm_info(&self) -> VmInfo {
        VmInfo {
            state: self.lock().0,
            uptime_ms: 61_500,
            vcpus: 2,
            memory_bytes: 512 << 20,
            kernel: "/boot/bzImage".into(),
            cmdline: "console=ttyS0 reboot=k panic=1 pci=off".into(),
            io_error: None,
            writebacks_in_progress: Vec::new(),
        }
    }

    fn pmem_list(&self) -> Vec<PmemInfo> {
        self.lock().1.clone()
    }

    fn pmem_flush(&self, id: &str) -> Result<FlushReport, ApiError> {
        if id == "broken" {
            return Err(ApiError::Failed {
                action: "writeback of broken".into(),
                source: Box::new(std::io::Error::other("Input/output error")),
            });
        }
        let mut s = self.lock();
        let dev =
            s.1.iter_mut()
                .find(|d| d.id == id)
                .ok_or_else(|| ApiError::NoSuchDevice { id: id.to_string() })?;
        dev.stats.host_flushes += 1;
        dev.pending_dirty_pages = dev.pending_dirty_pages.map(|_| 0);
        Ok(FlushReport {
            pages: 4,
            bytes: 4 * 4096,
            runs: 1,
            latency_us: 25,
        })
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.transition("pause", VmState::Running, VmState::Paused)
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.transition("resume", VmState::Paused, VmState::Running)
    }

    fn power_cut(&self) -> Result<(), ApiError> {
        let mut s = self.lock();
        if s.0 == VmState::ShuttingDown {
            return Err(ApiError::WrongState {
                action: "cut the power of",
                state: s.0,
            });
        }
        s.0 = VmState::ShuttingDown;
        Ok(())
    }

    fn pmem_crash(&self, id: &str) -> Result<(), ApiError> {
        if !self.lock().1.iter().any(|d| d.id == id) {
            return Err(ApiError::NoSuchDevice { id: id.to_string() });
        }
        self.power_cut()
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        let mut s = self.lock();
        if s.0 == VmState::ShuttingDown {
            return Err(ApiError::WrongState {
                action: "shut down",
                state: s.0,
            });
        }
        s.0 = VmState::ShuttingDown;
        Ok(())
    }
}
