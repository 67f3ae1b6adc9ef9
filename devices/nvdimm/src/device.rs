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

use std::fmt;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use crate::backing::{Backing, OpenedFile};
use crate::config::{OnError, PersistMode, PmemConfig};
use crate::dirty::{DirtyError, DirtyLog, DirtyLogMode};
use crate::dirty_ring::{DirtyRingError, DirtyRings};
use crate::fault::{errno_name, IoFault};
use crate::flush_log::{self, AppendError, FlushLogWriter};
use crate::group_commit::GroupCommit;
use crate::handler::{self, FlushHintAccess, HINT_WIDTH};
use crate::in_flight::{InFlight, WritebackInProgress};
use crate::lock::lock;
use crate::metrics::NvdimmMetrics;
use crate::mmap::{Mapping, Sharing};
use crate::page_set::{run_pages, PageSet, Run};
use crate::reclaim::{self, VcpuFence};
use crate::stats::{FlushReport, PmemStats, Tracking};
use crate::writeback::{self, WritebackError, Written};
use crate::{error_chain as chain, NvdimmError, VcpuId, MAX_HINTS, PAGE_SIZE};

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

/// Why a flush did not make its pages durable. Cloneable: one writeback's outcome is shared by
/// every flush it covered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    #[error("harvesting the dirty log failed")]
    Harvest(#[source] DirtyError),
    #[error("harvesting the dirty rings failed")]
    Ring(#[source] DirtyRingError),
    #[error("writing dirty pages back failed")]
    Writeback(#[source] WritebackError),
    #[error("logging the flush failed; the pages stay dirty and nothing was written back")]
    Log(#[source] AppendError),
    #[error("the device has lost power (power cut); nothing is written back any more")]
    PoweredOff,
    #[error(
        "its backing file shrank to {len} bytes, below the device's {size}: it was truncated \
         while pmvm ran, and what the guest stored past the new end is lost"
    )]
    Shrunk { len: u64, size: u64 },
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

/// Called before every harvest with the flushing vCPU (None for host and background
/// writebacks): the VMM makes every other vCPU leave `KVM_RUN` once and returns when each has.
/// With PML (Intel) KVM logs a vCPU's stores only when that vCPU exits, so a store another vCPU
/// completed before the flush would otherwise be missing from the harvest.
pub type HarvestBarrier = Arc<dyn Fn(Option<VcpuId>) -> Result<(), String> + Send + Sync>;

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

/// The KVM memslot backed by the device's mapping; removing it on drop.
struct MemSlot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    /// Keeps the memory KVM points at mapped for as long as the slot exists.
    _mapping: Arc<Mapping>,
}

impl Drop for MemSlot {
    fn drop(&mut self) {
        let remove = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: deleting a slot (size 0) makes KVM drop its reference to our memory; the
        // mapping is still alive here because this struct holds an Arc to it.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(remove) } {
            log::error!("removing memslot {} failed: {e}", self.region.slot);
        }
    }
}

/// Where a device learns which pages the guest wrote.
enum Tracker {
    /// The memslot's own bitmap: a harvest costs O(device size).
    Log(DirtyLog),
    /// The VM's per-vCPU dirty rings, which fill the device's pending set: O(pages written).
    Ring(Arc<DirtyRings>),
}

/// What attaching to a VM set up.
struct Attachment {
    /// Declared first: dropped (slot removed) before the dirty log's VM reference goes.
    memslot: MemSlot,
    /// None for read-only devices, which are not logged.
    dirty: Option<Tracker>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Before the slot goes: the rings may re-register a slot they know of.
        if let Some(Tracker::Ring(rings)) = &self.dirty {
            rings.unregister(self.memslot.region.slot);
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
    /// Why the device can no longer make the guest's stores durable (its file shrank); the VMM
    /// stops the VM when it sees this.
    fatal: OnceLock<String>,
    /// The last writeback's failure, until a writeback succeeds: the VM stays in `io-error`.
    fault: Mutex<Option<IoFault>>,
    /// The writeback running now, for whoever asks while it is blocked in the file system.
    in_flight: InFlight,
    /// Set by a failed writeback: the kernel may have marked pages clean that never reached
    /// the disk (Linux does so after a failed writeback), so `adr` writebacks rewrite pages
    /// from the mapping until one succeeds.
    distrust_page_cache: AtomicBool,
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
            fatal: OnceLock::new(),
            fault: Mutex::new(None),
            in_flight: InFlight::default(),
            distrust_page_cache: AtomicBool::new(false),
            unbacked: Mutex::new(Vec::new()),
            barrier: OnceLock::new(),
            fence: OnceLock::new(),
            background_stop: Mutex::new(false),
            background_wake: Condvar::new(),
            mapping: Arc::new(mapping),
            backing,
        })
    }

    /// Registers the pmem range as a KVM memslot: dirty-logged if writable, `KVM_MEM_READONLY`
    /// if not (guest writes then exit as MMIO and never reach the file). Once per device.
    /// Harvests read the slot's dirty bitmap (`NvdimmParams::manual_protect` says how).
    pub fn attach(&self, vm: &Arc<VmFd>) -> Result<(), NvdimmError> {
        self.attach_tracked(vm, None)
    }

    /// Like [`Nvdimm::attach`], on a VM whose dirty ring is on: the rings feed this device's
    /// pending pages, and harvests cost O(pages written).
    pub fn attach_ring(&self, vm: &Arc<VmFd>, rings: &Arc<DirtyRings>) -> Result<(), NvdimmError> {
        self.attach_tracked(vm, Some(rings))
    }

    fn attach_tracked(
        &self,
        vm: &Arc<VmFd>,
        rings: Option<&Arc<DirtyRings>>,
    ) -> Result<(), NvdimmError> {
        let _serial = lock(&self.attaching);
        if self.attachment.get().is_some() {
            return Err(NvdimmError::AlreadyAttached {
                id: self.id.clone(),
            });
        }
        self.open_flush_log()?;
        let flags = if self.readonly() {
            KVM_MEM_READONLY
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        };
        let region = kvm_userspace_memory_region {
            slot: self.params.slot,
            flags,
            guest_phys_addr: self.params.guest_base,
            memory_size: self.size(),
            userspace_addr: self.mapping.host_addr(),
        };
        // SAFETY: userspace_addr..+memory_size is our mapping, valid and of that length; the
        // MemSlot built below holds an Arc to it and deletes the slot before releasing it, so
        // KVM never sees the range unmapped. KVM itself rejects a slot overlapping another.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| NvdimmError::Memslot {
            id: self.id.clone(),
            slot: region.slot,
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            source,
        })?;
        let memslot = MemSlot {
            vm: vm.clone(),
            region,
            _mapping: self.mapping.clone(),
        };
        let mode = if self.params.manual_protect {
            DirtyLogMode::ManualProtect
        } else {
            DirtyLogMode::GetClears
        };
        let dirty = (!self.readonly()).then(|| match rings {
            Some(rings) => {
                rings.register(region, self.pending.clone());
                Tracker::Ring(rings.clone())
            }
            None => Tracker::Log(DirtyLog::new(
                vm.clone(),
                region.slot,
                region.memory_size,
                mode,
            )),
        });
        let attached = Attachment { memslot, dirty };
        if self.attachment.set(attached).is_err() {
            // Unreachable: `attaching` serialises attach and we checked above.
            log::error!("{}: attached twice", self.id);
        }
        Ok(())
    }

    /// Creates the `flush-log=` file, if the device has one and it is not created yet. Attach
    /// does this, so only a VM that runs creates a log (not one built only for its ACPI tables).
    pub fn open_flush_log(&self) -> Result<(), NvdimmError> {
        let Some(path) = &self.flush_log_path else {
            return Ok(());
        };
        let mut log = lock(&self.flush_log);
        if log.is_none() {
            let writer = FlushLogWriter::create(path, self.size()).map_err(|source| {
                NvdimmError::FlushLog {
                    id: self.id.clone(),
                    source,
                }
            })?;
            *log = Some(writer);
        }
        Ok(())
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

    /// The writeback running now, if any; answers at once even if it is blocked in the
    /// file system.
    pub fn writeback_in_progress(&self) -> Option<WritebackInProgress> {
        self.in_flight.get(&self.id)
    }

    /// The fault that keeps this device from acknowledging flushes, if any.
    pub fn io_fault(&self) -> Option<IoFault> {
        lock(&self.fault).clone()
    }

    fn record_fault(&self, e: &FlushError) {
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
                self.metrics.last_harvest_pages.set(run_pages(&runs));
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
                let written = match self.persist {
                    // The page cache's dirty bits can no longer be trusted: rewrite.
                    PersistMode::Adr if self.distrust_page_cache.load(Ordering::Acquire) => {
                        writeback::rewrite(file, &self.mapping, &runs, self.size())
                    }
                    // A guest or host flush syncs even with nothing harvested: a safety net
                    // for any page the log missed, and it reports a writeback the host
                    // kernel failed on its own.
                    PersistMode::Adr => writeback::write_back(
                        file,
                        &runs,
                        self.size(),
                        source != FlushSource::Background,
                    ),
                    PersistMode::Flush => {
                        writeback::copy_back(file, &self.mapping, &runs, self.size())
                            .inspect(|_| self.reclaim_copies(&runs))
                    }
                };
                written.map_err(FlushError::Writeback).map_err(keep_pending)
            });
        self.metrics.writebacks.inc();
        match &result {
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
            }
            Err(e) => {
                self.metrics.errors.inc();
                let shrunk = matches!(
                    e,
                    FlushError::Shrunk { .. } | FlushError::Log(AppendError::ReadPage { .. })
                ) && self.backing_shrunk().is_some();
                if shrunk {
                    // Fatal: the VMM stops the VM and prints this once.
                    let _ = self.fatal.set(self.shrink_message());
                } else if *e != FlushError::PoweredOff {
                    self.record_fault(e);
                    log::debug!("{}: writeback failed: {}", self.id, chain(e));
                }
            }
        }
        result
    }

    /// Fails if the backing file is now shorter than the device (guest stores past its end
    /// cannot be made durable, and host reads there would fault), or if the path no longer
    /// names it (a flush would reach an orphaned inode).
    fn check_backing(&self) -> Result<(), FlushError> {
        use std::os::unix::fs::MetadataExt;
        let open = self
            .backing
            .file()
            .metadata()
            .map_err(|e| FlushError::Stat(io_errno(&e)))?;
        if open.nlink() == 0 {
            return Err(FlushError::Unlinked {
                copy_from: format!(
                    "/proc/{}/fd/{}",
                    std::process::id(),
                    self.backing.file().as_raw_fd()
                ),
            });
        }
        match std::fs::metadata(self.path()) {
            Ok(named) if named.dev() == open.dev() && named.ino() == open.ino() => {}
            _ => return Err(FlushError::Replaced),
        }
        // From the same fstat: two syscalls per flush, not three.
        if open.len() < self.size() {
            return Err(FlushError::Shrunk {
                len: open.len(),
                size: self.size(),
            });
        }
        Ok(())
    }

    /// The file's length if it is shorter than the device (or why it cannot be read).
    fn backing_shrunk(&self) -> Option<Result<u64, vmm_sys_util::errno::Error>> {
        match self.backing.file().metadata() {
            Ok(m) if m.len() < self.size() => Some(Ok(m.len())),
            Ok(_) => None,
            Err(e) => Some(Err(vmm_sys_util::errno::Error::new(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))),
        }
    }

    fn shrink_message(&self) -> String {
        let len = match self.backing_shrunk() {
            Some(Ok(len)) => format!("{len} bytes"),
            _ => "less than the device".into(),
        };
        format!(
            "{}: backing file {} shrank to {len} while the guest ran (the device needs {} \
             bytes); stopping",
            self.id,
            self.path().display(),
            self.size()
        )
    }

    /// Why the VM must stop because of this device, if a writeback found it must: its backing
    /// file was truncated under it.
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.get().cloned()
    }

    /// Like [`Nvdimm::fatal_error`], but checks the file's length now: for a fault the VMM
    /// cannot otherwise explain (KVM failing to map guest memory).
    pub fn check_fatal_now(&self) -> Option<String> {
        if let Some(Ok(_)) = self.backing_shrunk() {
            let _ = self.fatal.set(self.shrink_message());
        }
        self.fatal_error()
    }

    /// Appends the epoch of one writeback to the flush log, if there is one. Empty background
    /// writebacks change nothing on disk and add no epoch.
    fn log_epoch(&self, source: FlushSource, runs: &[Run]) -> Result<(), AppendError> {
        let mut log = lock(&self.flush_log);
        let Some(log) = log.as_mut() else {
            return Ok(());
        };
        let pages: Vec<u64> = runs
            .iter()
            .flat_map(|r| r.first_page..r.first_page + r.pages)
            .filter(|&p| p < self.size() / PAGE_SIZE)
            .collect();
        if pages.is_empty() && source == FlushSource::Background {
            return Ok(());
        }
        // The contents as the guest sees them now: for adr the file's page cache, for flush
        // the private copy about to be written into the file.
        let fill = |page: u64, buf: &mut [u8]| {
            self.mapping
                .read_at(page * PAGE_SIZE, buf)
                .map_err(|_| AppendError::ReadPage {
                    page,
                    source: vmm_sys_util::errno::Error::new(libc::EFAULT),
                })
        };
        log.append(source.log_code(), flush_log::now_ns(), &pages, fill)?;
        self.metrics.log_epochs.inc();
        Ok(())
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

    /// The `writeback-interval=` loop: every interval, a writeback of whatever the guest
    /// dirtied, through the same group commit as flushes. Returns at once without an interval;
    /// otherwise blocks until [`Nvdimm::stop_background_writeback`] or a power cut. Run it on
    /// a thread of its own.
    pub fn run_background_writeback(&self) {
        let Some(interval) = self.writeback_interval else {
            return;
        };
        let mut stop = lock(&self.background_stop);
        loop {
            let deadline = Instant::now() + interval;
            while !*stop {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                stop = self
                    .background_wake
                    .wait_timeout(stop, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if *stop {
                return;
            }
            drop(stop);
            self.background_flush();
            if let Some(msg) = self.fatal_error() {
                // No vCPU or API call may come to stop the VM: say it here.
                log::error!("{msg}");
                return;
            }
            stop = lock(&self.background_stop);
        }
    }

    /// Ends [`Nvdimm::run_background_writeback`]; a round in progress finishes first.
    pub fn stop_background_writeback(&self) {
        *lock(&self.background_stop) = true;
        self.background_wake.notify_all();
    }

    /// One background round, counted apart from flushes.
    fn background_flush(&self) {
        let committed = self
            .commit
            .commit(|| self.write_back_dirty(FlushSource::Background));
        self.metrics.background_flushes.inc();
        if let Err(FlushError::PoweredOff) = committed.outcome {
            self.stop_background_writeback();
        }
    }

    /// Sets the VMM's [`HarvestBarrier`]; once per device.
    pub fn set_harvest_barrier(&self, barrier: HarvestBarrier) {
        if self.barrier.set(barrier).is_err() {
            log::warn!("{}: harvest barrier set twice; the first stays", self.id);
        }
    }

    /// Sets the VMM's [`VcpuFence`]; once per device. Without it `persist=flush` keeps every
    /// private copy (safe, but memory grows with the pages ever written).
    pub fn set_vcpu_fence(&self, fence: VcpuFence) {
        if self.fence.set(fence).is_err() {
            log::warn!("{}: vCPU fence set twice; the first stays", self.id);
        }
    }

    /// After a `persist=flush` writeback of `runs`: adds them to the copies to drop, and drops
    /// the batch once it is large or old enough (see `reclaim`).
    fn reclaim_copies(&self, runs: &[Run]) {
        if self.fence.get().is_none() {
            return;
        }
        let batch = {
            let mut copies = lock(&self.copies);
            let (pages, writebacks) = &mut *copies;
            pages.insert_runs(runs);
            *writebacks += 1;
            if pages.len() < reclaim::BATCH_PAGES && *writebacks < reclaim::BATCH_WRITEBACKS {
                return;
            }
            *writebacks = 0;
            pages.take_runs()
        };
        if !self.drop_private_copies(&batch) {
            // Kept: a later batch tries again.
            lock(&self.copies).0.insert_runs(&batch);
        }
    }

    /// With the vCPUs held, harvests what they wrote since (it stays pending) and drops the
    /// private copies of the pages of `runs` not written since, now equal to the file. A
    /// failure here loses nothing (the copies stay), so it is only reported; false then.
    fn drop_private_copies(&self, runs: &[Run]) -> bool {
        let Some(fence) = self.fence.get() else {
            return false;
        };
        if runs.is_empty() {
            return true;
        }
        let mut outcome = Err("not run".to_string());
        let held = fence(&mut || {
            outcome = self
                .harvest_into_pending()
                .map_err(|e| chain(&e))
                .and_then(|()| {
                    reclaim::drop_clean_copies(
                        &self.mapping,
                        runs,
                        &lock(&self.pending),
                        self.size(),
                    )
                    .map_err(|e| chain(&e))
                });
        });
        match held.and(outcome) {
            Ok(pages) => {
                log::debug!("{}: dropped {pages} private copies", self.id);
                true
            }
            Err(e) => {
                log::warn!(
                    "{}: the private copies of written pages stay in memory: {e}",
                    self.id
                );
                false
            }
        }
    }

    fn before_harvest(&self, source: FlushSource) -> Result<(), FlushError> {
        let Some(barrier) = self.barrier.get() else {
            return Ok(());
        };
        let flushing = match source {
            FlushSource::Vcpu(id) => Some(id),
            FlushSource::Host | FlushSource::Background => None,
        };
        barrier(flushing).map_err(FlushError::Barrier)
    }

    /// Applies the guest stores KVM could not back, through the file (which the `adr` mapping
    /// shares) or the private copy; each applied store's pages become pending.
    fn apply_unbacked(&self) -> Result<(), FlushError> {
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

    /// Takes the pending pages merged with what the guest dirtied (if attached and writable),
    /// in runs. Whatever a failed harvest already took stays pending.
    fn harvest(&self) -> Result<Vec<Run>, FlushError> {
        self.harvest_into_pending()?;
        self.rearm_overflowed_rings();
        Ok(lock(&self.pending).take_runs())
    }

    /// After a dirty-ring overflow (every device page now pending), re-arms exact tracking
    /// with the vCPUs held, so that this writeback is the only whole-device one. Without a
    /// fence, or if re-arming fails, the rings stay untrusted: whole-device writebacks, nothing
    /// lost.
    fn rearm_overflowed_rings(&self) {
        let Some(Tracker::Ring(rings)) = self.attachment.get().and_then(|a| a.dirty.as_ref())
        else {
            return;
        };
        let Some(fence) = self.fence.get().filter(|_| rings.has_overflowed()) else {
            return;
        };
        let mut outcome = Ok(false);
        let held = fence(&mut || outcome = rings.rearm().map_err(|e| chain(&e)));
        if let Err(e) = held.and(outcome) {
            log::warn!(
                "{}: the dirty rings stay untrusted (whole-device writebacks): {e}",
                self.id
            );
        }
    }

    /// Moves what the guest dirtied since the last harvest into the pending set, re-protecting
    /// those pages.
    fn harvest_into_pending(&self) -> Result<(), FlushError> {
        match self.attachment.get().and_then(|a| a.dirty.as_ref()) {
            Some(Tracker::Log(log)) => log
                .harvest_into(&mut lock(&self.pending))
                .map_err(FlushError::Harvest)?,
            // Not under the pending lock: collecting takes it (rings first, then pending).
            Some(Tracker::Ring(rings)) => {
                rings.collect().map_err(FlushError::Ring)?;
            }
            None => {}
        }
        Ok(())
    }

    /// Dirty pages the next flush would write, read without disturbing the guest: exact with
    /// the dirty ring (a read-only walk of the published entries), with manual protect (a GET
    /// without CLEAR) and before attach; None in GET-clears mode, where reading the log would
    /// consume it, and once the rings overflowed.
    pub fn pending_pages(&self) -> Option<u64> {
        let peeked = match self.attachment.get().and_then(|a| a.dirty.as_ref()) {
            Some(Tracker::Log(log)) => log.peek_union(&lock(&self.pending)).map_err(|e| chain(&e)),
            Some(Tracker::Ring(rings)) => Ok(rings.peek(self.params.slot).map(|mut ring| {
                // Rings first, then pending, as collecting locks them; a page collected in
                // between is then in pending and counted once.
                let pending = lock(&self.pending);
                ring.retain(|&p| !pending.contains(p));
                ring.sort_unstable();
                ring.dedup();
                pending.len() + ring.len() as u64
            })),
            None => Ok(Some(lock(&self.pending).len())),
        };
        peeked.unwrap_or_else(|e| {
            log::warn!("{}: cannot peek at the dirty pages: {e}", self.id);
            None
        })
    }

    /// How this device tracks guest writes: "ring", "ring-overflowed" (the rings overflowed
    /// and every writeback covers the whole device), "bitmap", or "none" (read-only or not
    /// attached).
    pub fn dirty_tracking(&self) -> Tracking {
        match self.attachment.get().and_then(|a| a.dirty.as_ref()) {
            Some(Tracker::Log(_)) => Tracking::Bitmap,
            Some(Tracker::Ring(r)) if r.has_overflowed() => Tracking::RingOverflowed,
            Some(Tracker::Ring(_)) => Tracking::Ring,
            None => Tracking::None,
        }
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

fn io_errno(e: &std::io::Error) -> vmm_sys_util::errno::Error {
    vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO))
}

/// FNV-1a, 32-bit.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::BackingError;
    use std::thread;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn params(index: usize) -> NvdimmParams {
        NvdimmParams {
            index,
            slot: 1,
            guest_base: 1 << 32,
            hint_page: 0xd000_0000 + index as u64 * 4096,
            default_hints: 1,
            manual_protect: false,
        }
    }

    fn open(dir: &Path, cfg: PmemConfig, index: usize) -> Result<Nvdimm, NvdimmError> {
        let cfg = PmemConfig {
            path: dir.join("pmem.img"),
            ..cfg
        };
        Nvdimm::open(&cfg, params(index))
    }

    /// A device with the defaults; `open` puts it in its directory.
    fn dev() -> PmemConfig {
        PmemConfig::new("")
    }

    #[test]
    fn nvdimm_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<Nvdimm>();
    }

    #[test]
    fn identity_and_nfit_values() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), dev().with_size(4 << 20).with_hints(3), 2).unwrap();
        assert_eq!(d.id(), "pmem2");
        assert_eq!(d.size(), 4 * MIB);
        assert_eq!(d.guest_base(), 1 << 32);
        assert_eq!(d.handle(), 3);
        assert_eq!(d.hint_page(), 0xd000_2000);
        assert_eq!(
            d.hint_addresses(),
            vec![0xd000_2000, 0xd000_2008, 0xd000_2010]
        );
        assert_eq!(d.path(), dir.path().join("pmem.img"));
        assert!(!d.readonly());
        // FNV-1a 32 reference values: "" is the offset basis, "a" is 0xe40c292c.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(d.serial_number(), fnv1a32(b"pmem2"));
        let again = format!("{d:?}");
        assert!(again.contains("pmem2"), "{again}");
    }

    #[test]
    fn default_hints_come_from_params() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        assert_eq!(d.hint_addresses(), vec![0xd000_0000]);
        drop(d);
        let cfg = PmemConfig::new(dir.path().join("pmem.img"));
        let err = Nvdimm::open(
            &cfg,
            NvdimmParams {
                default_hints: 0,
                ..params(0)
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, NvdimmError::BadHintCount { hints: 0, .. }),
            "{err:?}"
        );
        let err = Nvdimm::open(
            &cfg,
            NvdimmParams {
                guest_base: 0x1001,
                ..params(0)
            },
        )
        .unwrap_err();
        assert!(matches!(err, NvdimmError::Misaligned { .. }), "{err:?}");
    }

    #[test]
    fn created_file_is_removed_unless_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        drop(open(dir.path(), dev().with_size(2 << 20), 0).unwrap());
        assert!(!path.exists(), "an unkept created file survived");
        let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        d.keep_created_file();
        drop(d);
        assert!(path.exists(), "a kept file was removed");
        // A file that existed before is never removed.
        drop(open(dir.path(), dev(), 0).unwrap());
        assert!(path.exists(), "an existing file was removed");
    }

    #[test]
    fn backing_errors_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path(), dev(), 0).unwrap_err();
        assert!(
            matches!(err, NvdimmError::Backing(BackingError::Missing { .. })),
            "{err:?}"
        );
        let first = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        let cfg = PmemConfig::new(dir.path().join("pmem.img"));
        let err = Nvdimm::open_among(&cfg, params(1), &[&first]).unwrap_err();
        assert!(
            err.to_string().contains("pmem1") && err.to_string().contains("pmem0"),
            "{err}"
        );
    }

    #[test]
    fn hint_page_accesses_are_decoded_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), dev().with_size(2 << 20).with_hints(2), 0).unwrap();
        d.mmio_write(0, 0, &1u64.to_le_bytes()).unwrap();
        d.mmio_write(0, 8, &[0xff; 8]).unwrap();
        // Odd widths and offsets inside a hint still flush, and are counted.
        d.mmio_write(0, 0, &[1, 0, 0, 0]).unwrap();
        d.mmio_write(0, 4, &[0; 8]).unwrap();
        d.mmio_write(0, 16, &[0; 8]).unwrap();
        let mut r = [0xaa; 8];
        d.mmio_read(0, &mut r);
        assert_eq!(r, [0; 8]);
        let s = d.stats();
        assert_eq!(s.flushes, 4);
        assert_eq!(s.empty_flushes, 4);
        assert_eq!(s.bad_width_writes, 2);
        assert_eq!(s.outside_writes, 1);
        assert_eq!(s.pages_written, 0);
        assert_eq!(s.latency_us.histogram.iter().sum::<u64>(), 4);
        assert_eq!(s.host_flushes, 0);
    }

    #[test]
    fn host_writes_are_pending_until_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        assert_eq!(d.pending_pages(), Some(0));
        // Spans pages 0 and 1; page 5 separately: two runs.
        d.write_bytes(4090, b"0123456789").unwrap();
        d.write_bytes(5 * PAGE_SIZE, b"x").unwrap();
        assert_eq!(d.pending_pages(), Some(3));
        let report = d.host_flush().unwrap();
        assert_eq!(
            (report.pages, report.bytes, report.runs),
            (3, 3 * PAGE_SIZE, 2)
        );
        assert_eq!(d.pending_pages(), Some(0));
        let s = d.stats();
        assert_eq!(
            (s.host_flushes, s.flushes, s.pages_written, s.runs),
            (1, 0, 3, 2)
        );
        assert_eq!(s.last_harvest_pages, 3);
        assert_eq!(
            s.latency_us.histogram.iter().sum::<u64>(),
            0,
            "host flushes are not guest latency"
        );
        let empty = d.host_flush().unwrap();
        assert_eq!(empty.pages, 0);
        let mut buf = [0u8; 10];
        d.read_bytes(4090, &mut buf).unwrap();
        assert_eq!(&buf, b"0123456789");
        let on_disk = std::fs::read(dir.path().join("pmem.img")).unwrap();
        assert_eq!(&on_disk[4090..4100], b"0123456789");
        assert!(
            d.summary_line()
                .starts_with("pmem0: 0 flushes (0 empty) + 2 host flushes, 3 pages in 2 runs"),
            "{}",
            d.summary_line()
        );
    }

    #[test]
    fn out_of_range_and_readonly_host_writes_fail() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        // Reopened read-only below.
        d.keep_created_file();
        let err = d.write_bytes(2 * MIB - 1, b"ab").unwrap_err();
        assert!(err.to_string().contains("pmem0"), "{err}");
        assert_eq!(d.pending_pages(), Some(0));
        drop(d);
        let ro = open(dir.path(), dev().with_readonly(true), 0).unwrap();
        assert!(ro.readonly());
        assert!(ro.write_bytes(0, b"x").is_err());
        assert_eq!(ro.host_flush().unwrap().pages, 0);
    }

    fn file_bytes(dir: &Path, offset: usize, len: usize) -> Vec<u8> {
        std::fs::read(dir.join("pmem.img")).unwrap()[offset..offset + len].to_vec()
    }

    #[test]
    fn strict_model_changes_the_file_only_at_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = open(
            dir.path(),
            dev().with_size(2 << 20).with_persist(PersistMode::Flush),
            0,
        )
        .unwrap();
        d.keep_created_file();
        assert_eq!(d.persist(), PersistMode::Flush);
        d.write_bytes(0, b"AAAA").unwrap();
        assert_eq!(file_bytes(dir.path(), 0, 4), [0; 4], "no flush yet");
        let mut seen = [0u8; 4];
        d.read_bytes(0, &mut seen).unwrap();
        assert_eq!(&seen, b"AAAA", "the guest sees its own stores");
        assert_eq!(d.host_flush().unwrap().pages, 1);
        assert_eq!(file_bytes(dir.path(), 0, 4), b"AAAA");
        d.write_bytes(PAGE_SIZE, b"BBBB").unwrap();
        d.write_bytes(0, b"aa").unwrap();
        drop(d);
        // Dropping the device without a flush is the power loss: the private copy is gone.
        assert_eq!(file_bytes(dir.path(), 0, 4), b"AAAA");
        assert_eq!(file_bytes(dir.path(), PAGE_SIZE as usize, 4), [0; 4]);
        let d = open(dir.path(), dev().with_persist(PersistMode::Flush), 0).unwrap();
        d.read_bytes(0, &mut seen).unwrap();
        assert_eq!(&seen, b"AAAA", "the reboot sees the last flushed image");
    }

    #[test]
    fn after_a_power_cut_nothing_is_written_back() {
        for persist in [PersistMode::Adr, PersistMode::Flush] {
            let dir = tempfile::tempdir().unwrap();
            let d = open(
                dir.path(),
                dev().with_size(2 << 20).with_persist(persist),
                0,
            )
            .unwrap();
            d.write_bytes(0, b"A").unwrap();
            d.host_flush().unwrap();
            d.write_bytes(PAGE_SIZE, b"B").unwrap();
            d.power_cut();
            assert!(d.lost_power());
            let err = d.host_flush().unwrap_err();
            assert!(
                matches!(
                    err,
                    NvdimmError::Flush {
                        source: FlushError::PoweredOff,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(FlushError::PoweredOff));
            assert_eq!(d.io_fault(), None, "a power cut is no I/O fault");
            let s = d.stats();
            assert_eq!(
                (s.pages_written, s.errors, s.writebacks),
                (1, 0, 1),
                "{persist}"
            );
            assert_eq!(d.pending_pages(), Some(1), "page B is still only in memory");
            let b = file_bytes(dir.path(), PAGE_SIZE as usize, 1)[0];
            // adr: the store is in the host's page cache, which did not lose power.
            assert_eq!(
                b,
                if persist == PersistMode::Adr { b'B' } else { 0 },
                "{persist}"
            );
        }
    }

    #[test]
    fn every_flush_appends_an_epoch_with_its_source_and_pages() {
        use crate::flush_log::{FileSource, FlushLog, SOURCE_HOST};
        for persist in [PersistMode::Adr, PersistMode::Flush] {
            let dir = tempfile::tempdir().unwrap();
            let log_path = dir.path().join("flush.log");
            let cfg = PmemConfig {
                flush_log: Some(log_path.clone()),
                ..dev().with_size(2 << 20).with_persist(persist)
            };
            let d = open(dir.path(), cfg, 0).unwrap();
            assert_eq!(d.flush_log_path(), Some(log_path.as_path()));
            assert!(
                !log_path.exists(),
                "the log is created when the VM needs it"
            );
            d.open_flush_log().unwrap();
            d.open_flush_log().unwrap();
            d.write_bytes(0, &[0xa1; 4096]).unwrap();
            d.host_flush().unwrap();
            d.write_bytes(3 * PAGE_SIZE, &[0xb2; 4096]).unwrap();
            d.write_bytes(PAGE_SIZE, &[0xc3; 10]).unwrap();
            d.mmio_write(5, 0, &[1; 8]).unwrap();
            d.mmio_write(7, 0, &[1; 8]).unwrap();
            assert_eq!(d.stats().log_epochs, 3);
            let src = FileSource::open(&log_path).unwrap();
            let log = FlushLog::read(&src).unwrap();
            assert_eq!(log.tail, None);
            assert_eq!(log.header.device_size, 2 << 20);
            let summary: Vec<(u64, u32, Vec<u64>)> = log
                .epochs
                .iter()
                .map(|e| (e.number, e.source, e.pages.clone()))
                .collect();
            assert_eq!(
                summary,
                vec![
                    (1, SOURCE_HOST, vec![0]),
                    (2, 5, vec![1, 3]),
                    (3, 7, vec![])
                ],
                "{persist}"
            );
            let mut page = vec![0u8; 4096];
            log.read_page(&src, &log.epochs[1], 1, &mut page).unwrap();
            assert!(page.iter().all(|&b| b == 0xb2));
            log.read_page(&src, &log.epochs[1], 0, &mut page).unwrap();
            assert_eq!(
                &page[..11],
                &[0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0]
            );
            drop(d);
            let cfg = PmemConfig {
                flush_log: Some(log_path.clone()),
                ..dev().with_size(2 << 20)
            };
            let err = open(dir.path(), cfg, 0)
                .unwrap()
                .open_flush_log()
                .unwrap_err();
            assert!(matches!(err, NvdimmError::FlushLog { .. }), "{err:?}");
        }
    }

    #[test]
    fn background_writeback_writes_without_flushes_and_stops_cleanly() {
        use crate::flush_log::{FileSource, FlushLog, SOURCE_BACKGROUND};
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("bg.log");
        let d = Arc::new(
            open(
                dir.path(),
                PmemConfig {
                    flush_log: Some(log_path.clone()),
                    ..dev()
                        .with_size(2 << 20)
                        .with_writeback_interval(Duration::from_millis(20))
                },
                0,
            )
            .unwrap(),
        );
        assert_eq!(d.writeback_interval(), Some(Duration::from_millis(20)));
        d.open_flush_log().unwrap();
        let runner = {
            let d = d.clone();
            thread::spawn(move || d.run_background_writeback())
        };
        d.write_bytes(2 * PAGE_SIZE, b"bg").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.stats().background_pages == 0 {
            assert!(
                Instant::now() < deadline,
                "no background writeback within 10 s"
            );
            thread::sleep(Duration::from_millis(5));
        }
        // Several empty rounds pass; they log nothing.
        thread::sleep(Duration::from_millis(100));
        d.stop_background_writeback();
        runner.join().unwrap();
        let s = d.stats();
        assert!(s.background_flushes >= 2, "{s:?}");
        assert_eq!((s.background_pages, s.pages_written, s.flushes), (1, 1, 0));
        assert_eq!(d.pending_pages(), Some(0));
        let log = FlushLog::read(&FileSource::open(&log_path).unwrap()).unwrap();
        let summary: Vec<(u32, Vec<u64>)> = log
            .epochs
            .iter()
            .map(|e| (e.source, e.pages.clone()))
            .collect();
        assert_eq!(summary, vec![(SOURCE_BACKGROUND, vec![2])]);
        // A device without an interval returns at once.
        let plain = open(&dir.path().join("x"), dev(), 0);
        assert!(plain.is_err());
        let other = tempfile::tempdir().unwrap();
        let quick = open(other.path(), dev().with_size(2 << 20), 0).unwrap();
        quick.run_background_writeback();
    }

    #[test]
    fn a_power_cut_ends_the_background_loop() {
        let dir = tempfile::tempdir().unwrap();
        let d = Arc::new(
            open(
                dir.path(),
                dev()
                    .with_size(2 << 20)
                    .with_writeback_interval(Duration::from_secs(3600)),
                0,
            )
            .unwrap(),
        );
        let runner = {
            let d = d.clone();
            thread::spawn(move || d.run_background_writeback())
        };
        d.power_cut();
        runner.join().unwrap();
        assert_eq!(d.stats().background_flushes, 0);
    }

    #[test]
    fn concurrent_flushes_share_writebacks_and_stay_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let d = Arc::new(open(dir.path(), dev().with_size(2 << 20), 0).unwrap());
        let threads = 6;
        let rounds = 40;
        let (done, finished) = std::sync::mpsc::channel();
        for t in 0..threads {
            let (d, done) = (d.clone(), done.clone());
            thread::spawn(move || {
                for r in 0..rounds {
                    let page = (t * rounds + r) as u64;
                    d.write_bytes(page * PAGE_SIZE, &[t as u8 + 1]).unwrap();
                    if r % 2 == 0 {
                        d.host_flush().unwrap();
                    } else {
                        d.mmio_write(0, 0, &[1; 8]).unwrap();
                    }
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..threads {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a flushing thread deadlocked or panicked");
        }
        let s = d.stats();
        let total = (threads * rounds) as u64;
        assert_eq!(s.host_flushes + s.flushes, total);
        assert_eq!(s.flushes, total / 2);
        assert_eq!(
            s.pages_written, total,
            "every page written back exactly once"
        );
        assert!(s.writebacks <= total && s.writebacks >= 1);
        assert_eq!(s.errors, 0);
        assert_eq!(d.pending_pages(), Some(0));
    }

    #[test]
    fn a_replaced_or_deleted_backing_file_is_a_fault_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        let moved = dir.path().join("moved.img");
        let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        d.keep_created_file();
        d.write_bytes(0, b"kept").unwrap();
        std::fs::rename(&path, &moved).unwrap();
        std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(FlushError::Replaced));
        let fault = d.io_fault().expect("a fault");
        assert_eq!(
            (fault.errno_name.as_str(), fault.pages_at_stake),
            ("ESTALE", 1)
        );
        assert!(fault.what.contains("replaced"), "{fault:?}");
        // Back under its name: the retry writes the pending page, and the fault clears.
        std::fs::rename(&moved, &path).unwrap();
        assert_eq!(d.host_flush().unwrap().pages, 1);
        assert_eq!(d.io_fault(), None);
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"kept");
        // Deleted: no retry can succeed, and the error says where the data still is.
        d.write_bytes(0, b"lost").unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = d.mmio_write(0, 0, &[1; 8]).unwrap_err();
        let fd_path = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            d.backing.file().as_raw_fd()
        );
        assert_eq!(
            err,
            FlushError::Unlinked {
                copy_from: fd_path.clone()
            }
        );
        assert!(d.host_flush().is_err());
        assert_eq!(&std::fs::read(&fd_path).unwrap()[..4], b"lost");
    }

    #[test]
    fn a_store_kvm_could_not_back_is_applied_by_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
        d.keep_created_file();
        let e = d.unbacked_store(PAGE_SIZE - 2, b"abcd");
        assert!(
            matches!(e, FlushError::UnbackedStore { len: 4, .. }),
            "{e:?}"
        );
        let fault = d.io_fault().expect("a fault");
        assert_eq!((fault.errno, fault.pages_at_stake), (libc::EFAULT, 2));
        assert_eq!(d.stats().errors, 1);
        let report = d.host_flush().unwrap();
        assert_eq!((report.pages, report.runs), (2, 1));
        assert_eq!(d.io_fault(), None);
        assert_eq!(file_bytes(dir.path(), PAGE_SIZE as usize - 2, 4), b"abcd");
        let mut seen = [0u8; 4];
        d.read_bytes(PAGE_SIZE - 2, &mut seen).unwrap();
        assert_eq!(&seen, b"abcd", "the guest's view has the store");
    }
}
