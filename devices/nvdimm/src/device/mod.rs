//! `Nvdimm`: one file-backed persistent-memory device, shared by all vCPU threads and the API.
//!
//! Teardown order: the KVM memslot must be gone before the mapping it points into is unmapped.
//! The memslot owner (`MemSlot`) holds its own `Arc<Mapping>` and the `Arc<VmFd>`, and removes the
//! slot (size 0) in its `Drop` before releasing them; it is also declared before `mapping` in
//! `Nvdimm`, so the slot goes first even when the device is dropped as a whole.
//!
//! Persistence models (`docs/persistence.md`): with `persist=adr` the mapping is the file's page
//! cache and a writeback makes dirtied pages durable in place; with `persist=flush` the mapping
//! is private and a writeback copies dirtied pages into the file. After [`Nvdimm::power_cut`]
//! no writeback starts again, whoever asks.
//!
//! This file holds the device and its flush sequence (`write_back_dirty`); the rest of the
//! device is split by job: `attach` (memslot, dirty tracking), `harvest`, `epochs` (the flush
//! log), `faults` (backing checks, `io-error`, unbacked stores), `copies` (`persist=flush`
//! memory), `background` (`writeback-interval=`), `peek` (state read without disturbing it).

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::backing::{Backing, OpenedFile};
use crate::config::{OnError, PersistMode, PmemConfig};
use crate::fault::IoFault;
use crate::flush_log::{self, FlushLogWriter};
use crate::group_commit::GroupCommit;
use crate::handler::{self, FlushHintAccess, HINT_WIDTH};
use crate::in_flight::InFlight;
use crate::lock::lock;
use crate::metrics::NvdimmMetrics;
use crate::mmap::{Mapping, Sharing};
use crate::page_set::{run_pages, PageSet};
use crate::path_watch::PathWatch;
use crate::reclaim::VcpuFence;
use crate::stats::{FlushReport, PmemStats};
use crate::writeback::{self, Written};
use crate::writeback_way::WayChooser;
use crate::{NvdimmError, VcpuId, MAX_HINTS, PAGE_SIZE};

mod attach;
mod background;
mod copies;
mod epochs;
mod faults;
mod flush_error;
mod harvest;
mod peek;
#[cfg(test)]
mod tests;

use attach::Attachment;
pub use flush_error::FlushError;
pub use harvest::HarvestBarrier;

/// Where the VMM puts a device; everything here comes from the VMM's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvdimmParams {
    /// Position among the devices: names the default id and the NFIT handle.
    pub index: usize,
    /// KVM memslot number for the pmem range.
    pub slot: u32,
    /// Guest-physical address of the pmem range.
    pub guest_base: u64,
    /// Guest-physical address of this device's flush-hint page (in no memslot).
    pub hint_page: u64,
    /// Hints to advertise when the config does not say.
    pub default_hints: u32,
    /// Whether [`crate::dirty::enable_manual_protect`] returned true on the VM.
    pub manual_protect: bool,
}

/// Who asked for a writeback: recorded in the flush-epoch log and the stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushSource {
    /// A guest write to a flush hint, on this vCPU.
    Vcpu(VcpuId),
    /// The API, or the final writeback when the host stops the VM.
    Host,
    /// The `writeback-interval=` thread.
    Background,
}

impl FlushSource {
    /// The `source` field of a flush-log epoch.
    pub fn log_code(self) -> u32 {
        match self {
            // A VcpuId (u8) never reaches the reserved codes near u32::MAX.
            FlushSource::Vcpu(id) => u32::from(id),
            FlushSource::Host => flush_log::SOURCE_HOST,
            FlushSource::Background => flush_log::SOURCE_BACKGROUND,
        }
    }
}

/// A file-backed NVDIMM. `Send + Sync`: share it as `Arc<Nvdimm>`.
pub struct Nvdimm {
    id: String,
    params: NvdimmParams,
    hints: u32,
    attachment: OnceLock<Attachment>,
    attaching: Mutex<()>,
    /// Pages known dirty that no writeback has taken yet: host writes, pages of failed
    /// writebacks, and with the dirty ring every harvested page. Shared with the rings.
    pending: Arc<Mutex<PageSet>>,
    commit: GroupCommit<Result<Written, FlushError>>,
    metrics: NvdimmMetrics,
    persist: PersistMode,
    on_error: OnError,
    writeback_interval: Option<Duration>,
    /// Created by [`Nvdimm::open_flush_log`]; appended to only inside a writeback, which the
    /// group commit serialises.
    flush_log: Mutex<Option<FlushLogWriter>>,
    flush_log_path: Option<std::path::PathBuf>,
    /// Set by [`Nvdimm::power_cut`]: no writeback starts after it.
    power_lost: AtomicBool,
    /// Set when a writeback found the backing file shorter than the device: the stores past
    /// its new end are lost, so every later flush fails with this (and the VMM stops the VM).
    shrunk: OnceLock<FlushError>,
    /// The last writeback's failure, until a writeback succeeds: the VM stays in `io-error`.
    fault: Mutex<Option<IoFault>>,
    /// The writeback running now, for whoever asks while it is blocked in the file system.
    in_flight: InFlight,
    /// Set by a failed writeback: the kernel may have marked pages clean that never reached
    /// the disk (Linux does so after a failed writeback), so `adr` writebacks rewrite pages
    /// from the mapping until one succeeds.
    distrust_page_cache: AtomicBool,
    /// `persist=adr`: which way each writeback goes, from what the earlier ones cost.
    ways: WayChooser,
    /// Tells a flush when the backing path needs checking again.
    path_watch: PathWatch,
    /// Guest stores KVM could not back (offset, bytes): applied by the next writeback.
    unbacked: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Run before every harvest (see [`HarvestBarrier`]).
    barrier: OnceLock<HarvestBarrier>,
    /// Holds the vCPUs while `persist=flush` drops the copies a writeback made durable.
    fence: OnceLock<VcpuFence>,
    /// `persist=flush`: pages written back whose private copies are not dropped yet, and the
    /// writebacks since the last drop (see `reclaim`, on batching).
    copies: Mutex<(PageSet, u64)>,
    /// Set to stop the background writeback loop.
    background_stop: Mutex<bool>,
    background_wake: Condvar,
    mapping: Arc<Mapping>,
    backing: Backing,
}

impl fmt::Debug for Nvdimm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nvdimm")
            .field("id", &self.id)
            .field("path", &self.path())
            .field("size", &self.size())
            .field("params", &self.params)
            .field("hints", &self.hints)
            .field("persist", &self.persist)
            .field("attached", &self.attachment.get().is_some())
            .finish()
    }
}

impl Nvdimm {
    /// Opens, checks, locks and maps the backing file. Touches no KVM state. A backing file
    /// this created is removed again when the device is dropped, until
    /// [`Nvdimm::keep_created_file`], so a VMM whose next device fails leaves nothing behind.
    pub fn open(cfg: &PmemConfig, params: NvdimmParams) -> Result<Nvdimm, NvdimmError> {
        Self::open_among(cfg, params, &[])
    }

    /// Like `open`, for a device opened after `already_open` ones: naming the same file as one
    /// of them is refused as such (see [`Backing::open_among`]).
    pub fn open_among(
        cfg: &PmemConfig,
        params: NvdimmParams,
        already_open: &[&Nvdimm],
    ) -> Result<Nvdimm, NvdimmError> {
        let id = cfg.id_or_default(params.index);
        let hints = cfg.hints.unwrap_or(params.default_hints);
        if hints == 0 || hints > MAX_HINTS {
            return Err(NvdimmError::BadHintCount { id, hints });
        }
        for (what, addr) in [
            ("guest base", params.guest_base),
            ("hint page", params.hint_page),
        ] {
            if addr % PAGE_SIZE != 0 {
                return Err(NvdimmError::Misaligned { id, what, addr });
            }
        }
        let opened: Vec<OpenedFile> = already_open
            .iter()
            .map(|d| d.backing.opened().clone())
            .collect();
        let backing = Backing::open_among(cfg, &id, &opened)?;
        let sharing = match cfg.persist {
            PersistMode::Adr => Sharing::Shared,
            PersistMode::Flush => Sharing::Private,
        };
        let mapping = Mapping::with_sharing(backing.file(), backing.size(), !cfg.readonly, sharing)
            .map_err(|source| NvdimmError::Map {
                id: id.clone(),
                source,
            })?;
        Ok(Nvdimm {
            pending: Arc::new(Mutex::new(PageSet::new(backing.size() / PAGE_SIZE))),
            copies: Mutex::new((
                PageSet::new(match cfg.persist {
                    PersistMode::Flush => backing.size() / PAGE_SIZE,
                    PersistMode::Adr => 0,
                }),
                0,
            )),
            id,
            params,
            hints,
            attachment: OnceLock::new(),
            attaching: Mutex::new(()),
            commit: GroupCommit::new(),
            metrics: NvdimmMetrics::default(),
            persist: cfg.persist,
            on_error: cfg.on_error,
            writeback_interval: cfg.writeback_interval,
            flush_log: Mutex::new(None),
            flush_log_path: cfg.flush_log.clone(),
            power_lost: AtomicBool::new(false),
            shrunk: OnceLock::new(),
            fault: Mutex::new(None),
            in_flight: InFlight::default(),
            distrust_page_cache: AtomicBool::new(false),
            ways: WayChooser::default(),
            // `persist=flush` writes the file itself on every flush: each would find an event.
            path_watch: match cfg.persist {
                PersistMode::Adr => PathWatch::new(backing.path(), backing.file()),
                PersistMode::Flush => PathWatch::unwatched(),
            },
            unbacked: Mutex::new(Vec::new()),
            barrier: OnceLock::new(),
            fence: OnceLock::new(),
            background_stop: Mutex::new(false),
            background_wake: Condvar::new(),
            mapping: Arc::new(mapping),
            backing,
        })
    }

    /// The VMM has all its devices: a backing file [`Nvdimm::open`] created is the user's now.
    pub fn keep_created_file(&mut self) {
        self.backing.keep();
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn path(&self) -> &Path {
        self.backing.path()
    }

    pub fn size(&self) -> u64 {
        self.backing.size()
    }

    pub fn guest_base(&self) -> u64 {
        self.params.guest_base
    }

    pub fn readonly(&self) -> bool {
        self.backing.readonly()
    }

    pub fn persist(&self) -> PersistMode {
        self.persist
    }

    /// What the VM does when a flush of this device fails (`on-error=`).
    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// The `writeback-interval=`, if the device has a background writeback.
    pub fn writeback_interval(&self) -> Option<Duration> {
        self.writeback_interval
    }

    /// The `flush-log=` file, if any.
    pub fn flush_log_path(&self) -> Option<&Path> {
        self.flush_log_path.as_deref()
    }

    pub fn slot(&self) -> u32 {
        self.params.slot
    }

    /// Guest-physical address of this device's hint page.
    pub fn hint_page(&self) -> u64 {
        self.params.hint_page
    }

    /// Guest-physical addresses of the flush hints, for the NFIT.
    pub fn hint_addresses(&self) -> Vec<u64> {
        (0..u64::from(self.hints))
            .map(|i| self.params.hint_page + i * HINT_WIDTH as u64)
            .collect()
    }

    /// NFIT control-region serial number: FNV-1a (32-bit) of the id, never 0, so it is stable
    /// across runs and Linux's namespace labels keep matching.
    pub fn serial_number(&self) -> u32 {
        fnv1a32(self.id.as_bytes()).max(1)
    }

    /// NFIT device handle (also the NVDIMM's `_ADR`): index + 1.
    pub fn handle(&self) -> u32 {
        self.params.index as u32 + 1
    }

    /// A guest write by vCPU `vcpu` to the hint page at `offset`: the synchronous flush path.
    /// Runs on the vCPU thread. `Ok` when the pages are durable (and, with a flush log,
    /// logged); on `Err` the vCPU must not complete the write (never re-enter the guest)
    /// until [`Nvdimm::io_fault`] is cleared by a writeback that succeeds.
    pub fn mmio_write(&self, vcpu: VcpuId, offset: u64, data: &[u8]) -> Result<(), FlushError> {
        match handler::decode_write(offset, data.len(), self.hints) {
            FlushHintAccess::Flush { odd, .. } => {
                if odd {
                    self.metrics.bad_width_writes.inc();
                }
                self.guest_flush(vcpu)
            }
            FlushHintAccess::Outside { offset } => {
                self.metrics.outside_writes.inc();
                log::debug!("{}: ignored write at hint-page offset {offset:#x}", self.id);
                Ok(())
            }
        }
    }

    /// A guest read of the hint page: zeros.
    pub fn mmio_read(&self, _offset: u64, data: &mut [u8]) {
        handler::read(data);
    }

    fn guest_flush(&self, vcpu: VcpuId) -> Result<(), FlushError> {
        let arrived = Instant::now();
        let outcome = self.flush(FlushSource::Vcpu(vcpu));
        self.metrics.flushes.inc();
        self.metrics
            .latency
            .record(arrived.elapsed().as_micros() as u64);
        if written_nothing(&outcome) {
            self.metrics.empty_flushes.inc();
        }
        outcome.map(|_| ())
    }

    /// A flush requested by the host (the API): like a guest flush, but counted as a host flush
    /// and reporting its outcome.
    pub fn host_flush(&self) -> Result<FlushReport, NvdimmError> {
        let arrived = Instant::now();
        let outcome = self.flush(FlushSource::Host);
        self.metrics.host_flushes.inc();
        let latency_us = arrived.elapsed().as_micros() as u64;
        let written = outcome.map_err(|source| NvdimmError::Flush {
            id: self.id.clone(),
            source,
        })?;
        Ok(FlushReport {
            pages: written.pages,
            bytes: written.bytes,
            runs: written.runs,
            latency_us,
        })
    }

    /// Waits for a writeback that started after this call and returns what it wrote.
    fn flush(&self, source: FlushSource) -> Result<Written, FlushError> {
        self.commit.commit(|| self.write_back_dirty(source)).outcome
    }

    /// One writeback: harvest, log, write back, account. Serialised by the group commit.
    fn write_back_dirty(&self, source: FlushSource) -> Result<Written, FlushError> {
        let _running = self.in_flight.start(source);
        if self.power_lost.load(Ordering::Acquire) {
            return Err(FlushError::PoweredOff);
        }
        let result = self
            .check_backing()
            .and_then(|()| self.apply_unbacked())
            .and_then(|()| self.before_harvest(source))
            .and_then(|()| self.harvest())
            .and_then(|runs| {
                let pages = run_pages(&runs);
                self.metrics.last_harvest_pages.set(pages);
                let keep_pending = |e| {
                    // Not durable: keep the pages pending so the next flush retries them.
                    lock(&self.pending).insert_runs(&runs);
                    e
                };
                // Write-ahead: the epoch is durable in the log before the file changes, so a
                // crash in between leaves the log ahead of the file, never behind it.
                self.log_epoch(source, &runs)
                    .map_err(FlushError::Log)
                    .map_err(keep_pending)?;
                let file = self.backing.file();
                let mut way = None;
                let writing = Instant::now();
                let written = match self.persist {
                    // The page cache's dirty bits can no longer be trusted: rewrite.
                    PersistMode::Adr if self.distrust_page_cache.load(Ordering::Acquire) => {
                        writeback::rewrite(file, &self.mapping, &runs, self.size())
                    }
                    // A guest or host flush syncs even with nothing harvested: a safety net
                    // for any page the log missed, and it reports a writeback the host
                    // kernel failed on its own.
                    PersistMode::Adr => {
                        let chosen = *way.insert(self.ways.choose(pages));
                        writeback::write_back(
                            file,
                            &self.mapping,
                            &runs,
                            self.size(),
                            chosen,
                            source != FlushSource::Background,
                        )
                    }
                    PersistMode::Flush => {
                        writeback::copy_back(file, &self.mapping, &runs, self.size())
                            .inspect(|_| self.reclaim_copies(&runs))
                    }
                };
                let took = writing.elapsed();
                self.metrics
                    .writeback_ns
                    .add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
                if let (Some(way), Ok(_)) = (way, &written) {
                    self.ways.record(pages, way, took);
                    if way.unmap {
                        self.metrics.unmapped_writebacks.inc();
                    }
                    if way.submit {
                        self.metrics.submitted_writebacks.inc();
                    }
                }
                written.map_err(FlushError::Writeback).map_err(keep_pending)
            });
        self.metrics.writebacks.inc();
        match result {
            Ok(written) => {
                self.distrust_page_cache.store(false, Ordering::Release);
                if lock(&self.fault).take().is_some() {
                    log::info!("{}: writeback succeeded; the fault is cleared", self.id);
                }
                self.metrics.pages_written.add(written.pages);
                self.metrics.bytes_written.add(written.bytes);
                self.metrics.runs.add(written.runs);
                if source == FlushSource::Background {
                    self.metrics.background_pages.add(written.pages);
                }
                Ok(written)
            }
            Err(e) => Err(self.failed_writeback(e)),
        }
    }

    /// Simulates losing power: no writeback starts from now on, and one already running has
    /// finished when this returns. What is not durable yet stays that way: with `persist=flush`
    /// the file keeps the image of the last flush; with `persist=adr` stores already in the
    /// host page cache stay there (the host did not lose power). Stops the background loop.
    pub fn power_cut(&self) {
        self.power_lost.store(true, Ordering::Release);
        self.stop_background_writeback();
        // Waits out a writeback in progress; the run it leads itself does nothing.
        let _ = self.commit.commit(|| Err(FlushError::PoweredOff));
    }

    /// Whether [`Nvdimm::power_cut`] has run.
    pub fn lost_power(&self) -> bool {
        self.power_lost.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> PmemStats {
        self.metrics.snapshot()
    }

    /// One line for stderr at exit.
    pub fn summary_line(&self) -> String {
        format!("{}: {}", self.id, self.stats().summary())
    }

    /// Copies bytes out of the device (host view, for tests and the API).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), NvdimmError> {
        self.mapping
            .read_at(offset, buf)
            .map_err(|source| NvdimmError::Access {
                id: self.id.clone(),
                source,
            })
    }

    /// Writes bytes into the device from the host. KVM does not log host writes, so the pages
    /// are recorded as pending and the next flush writes them back.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), NvdimmError> {
        self.mapping
            .write_at(offset, data)
            .map_err(|source| NvdimmError::Access {
                id: self.id.clone(),
                source,
            })?;
        self.mark_pending(offset, data.len());
        Ok(())
    }

    /// Records the pages of `len` bytes at `offset` as pending for the next writeback.
    fn mark_pending(&self, offset: u64, len: usize) {
        let first = offset / PAGE_SIZE;
        let mut pending = lock(&self.pending);
        for page in first..first + pages_spanned(offset, len) {
            pending.insert(page);
        }
    }
}

fn written_nothing(outcome: &Result<Written, FlushError>) -> bool {
    matches!(outcome, Ok(w) if w.pages == 0)
}

/// Pages touched by `len` bytes at `offset`.
fn pages_spanned(offset: u64, len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    (offset + len as u64 - 1) / PAGE_SIZE - offset / PAGE_SIZE + 1
}

/// FNV-1a, 32-bit.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
