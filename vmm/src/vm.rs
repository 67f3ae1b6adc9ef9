//! Building the KVM machine and running it until it stops.

use std::fs::File;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::terminal::Terminal;

use std::time::Instant;

use crate::api::server::{ApiServer, ServerError, ServerOptions};
use crate::boot::{self, BootError};
use crate::control::MachineControl;
use crate::devices::mmio::{MmioOverlap, MmioRanges};
use crate::devices::{serial, Bus};
use crate::dirty_ring::{self, DirtyRings, DEFAULT_RING_ENTRIES};
use crate::exit::{ExitReason, ExitSignal};
use crate::layout;
use crate::machine::{DirtyTracking, MachineConfig, SerialTarget};
use crate::memory;
use crate::platform::{self, PlatformError};
use crate::pmem;
use crate::power_cut::PowerSwitch;
use crate::seccomp::{Filters, SeccompError, ThreadFilter};
use crate::signals::{self, StopSignals};
use crate::stop_wait::{self, STOP_TIMEOUT};
use crate::vcpu::{Vcpu, VcpuControl, VcpuError, VcpuThreads};
use crate::x86::{cpuid, regs, regs::RegsError};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: no such device; is KVM enabled on this host (kvm_intel or kvm_amd loaded)?")]
    NoKvm { path: PathBuf },
    #[error("cannot open {path}: permission denied; add your user to the group owning it (usually `kvm`) or run as root")]
    KvmDenied { path: PathBuf },
    #[error("cannot open {path}")]
    KvmOpen {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not the expected 12")]
    KvmVersion(i32),
    #[error("KVM on this host lacks {0}, which pmvm needs")]
    KvmCap(&'static str),
    #[error("--cpus {wanted}: KVM on this host allows at most {max} vCPUs")]
    TooManyCpus { wanted: u8, max: usize },
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {size} bytes of guest RAM")]
    GuestMemory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot place the NVDIMMs on the MMIO bus")]
    Mmio(#[source] MmioOverlap),
    #[error("cannot write the ACPI tables into guest memory")]
    AcpiWrite(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot set up vCPU {0}")]
    Regs(u8, #[source] RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("--serial file={path}: cannot create")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up {what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no --kernel given")]
    NoKernel,
    #[error(transparent)]
    PmemOpen(crate::pmem::OpenError),
    #[error(transparent)]
    Pmem(nvdimm::NvdimmError),
    #[error("cannot set up dirty logging for --pmem")]
    DirtyLog(#[source] nvdimm::dirty::DirtyError),
    #[error("cannot set up the KVM dirty ring for --pmem")]
    DirtyRing(#[source] dirty_ring::DirtyRingError),
    #[error(
        "--dirty-tracking ring: this KVM does not offer KVM_CAP_DIRTY_LOG_RING; use \
         --dirty-tracking bitmap (or auto)"
    )]
    NoDirtyRing,
    #[error("--api-sock")]
    Api(#[source] ServerError),
    #[error(transparent)]
    Seccomp(SeccompError),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

/// How this VM learns which pmem pages the guest wrote.
enum Tracking {
    Ring(Arc<DirtyRings>),
    Bitmap { manual_protect: bool },
}

/// Picks and turns on the dirty tracking of `--dirty-tracking`. Runs before any memslot or
/// vCPU exists: KVM takes the ring only before vCPUs, manual protect only before logged slots.
fn choose_tracking(vm: &Arc<VmFd>, config: &MachineConfig) -> Result<Tracking, VmError> {
    let logged = config.pmem.iter().any(|p| !p.readonly);
    if !logged {
        return Ok(Tracking::Bitmap {
            manual_protect: false,
        });
    }
    let ring_unsafe = dirty_ring::ring_limit_unenforced();
    let want_ring = match (config.dirty_tracking, ring_unsafe) {
        (DirtyTracking::Bitmap, _) => false,
        (DirtyTracking::Ring, Some(why)) => {
            log::warn!("--dirty-tracking ring: {why}; a guest may overflow the ring");
            true
        }
        (DirtyTracking::Ring, None) => true,
        (DirtyTracking::Auto, Some(why)) => {
            log::info!("pmem dirty tracking: not the KVM dirty ring: {why}");
            false
        }
        (DirtyTracking::Auto, None) => true,
    };
    if want_ring {
        match DirtyRings::enable(vm.clone(), DEFAULT_RING_ENTRIES).map_err(VmError::DirtyRing)? {
            Some(rings) => {
                let rings = rings.on_overflow(|overflow| {
                    log::warn!("{overflow}; --dirty-tracking bitmap avoids this on this host")
                });
                log::info!(
                    "pmem dirty tracking: KVM dirty ring, {} entries per vCPU",
                    rings.entries()
                );
                return Ok(Tracking::Ring(Arc::new(rings)));
            }
            None if config.dirty_tracking == DirtyTracking::Ring => {
                return Err(VmError::NoDirtyRing)
            }
            None => {}
        }
    }
    let manual_protect = nvdimm::enable_manual_protect(vm).map_err(VmError::DirtyLog)?;
    log::info!("pmem dirty tracking: memslot bitmap (manual protect: {manual_protect})");
    Ok(Tracking::Bitmap { manual_protect })
}

/// Opens the KVM device, mapping the usual failures to advice.
pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::NoKvm {
            path: path.to_path_buf(),
        }
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm {
            path: path.to_path_buf(),
        },
        libc::EACCES | libc::EPERM => VmError::KvmDenied {
            path: path.to_path_buf(),
        },
        _ => VmError::KvmOpen {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::KvmVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM with its TSS, in-kernel irqchip and PIT, in the order KVM requires.
fn create_vm(kvm: &Kvm, cpus: u8) -> Result<VmFd, VmError> {
    let max = kvm.get_max_vcpus();
    if usize::from(cpus) > max {
        return Err(VmError::TooManyCpus { wanted: cpus, max });
    }
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    Ok(vm)
}

fn create_guest_memory(vm: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&memory::ram_ranges(size))
        .map_err(|source| VmError::GuestMemory { size, source })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::KvmCap("host addresses for guest RAM"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
        // the caller keeps alive until the VM is dropped (it is moved into the vCPUs and
        // `Machine`, both dropped before the VmFd's last reference).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("register guest RAM"))?;
    }
    Ok(mem)
}

fn serial_output(target: &SerialTarget) -> Result<Box<dyn std::io::Write + Send>, VmError> {
    Ok(match target {
        SerialTarget::Stdio => Box::new(std::io::stdout()),
        SerialTarget::File(path) => {
            Box::new(File::create(path).map_err(|source| VmError::SerialFile {
                path: path.clone(),
                source,
            })?)
        }
    })
}

/// Wakes the main loop for a stop request or a stop signal.
struct StopWatcher {
    exit: Arc<ExitSignal>,
    signals: StopSignals,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let evt = Events::new(self.exit.eventfd(), EventSet::IN);
        let sig = Events::new(&self.signals, EventSet::IN);
        if let Err(e) = ops.add(evt).and_then(|_| ops.add(sig)) {
            log::error!("cannot watch for stop requests: {e:?}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit.eventfd().as_raw_fd() {
            let _ = self.exit.eventfd().read();
        } else if let Some(sig) = self.signals.read() {
            self.exit.request(ExitReason::Signal(sig));
        }
    }
}

use std::os::fd::{AsFd, AsRawFd};

/// Restores the terminal's canonical mode when the VM ends.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        (stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok()).then_some(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Stdin as the serial port's input, when it can be one: a terminal, a pipe or a socket
/// (epoll refuses regular files and /dev/null). The type comes from fstat on the descriptor
/// itself, not from /proc/self/fd/0, which is missing wherever /proc is not mounted (a chroot,
/// a small container): there the guest would silently never see its input.
fn serial_input() -> Option<File> {
    use std::os::unix::fs::FileTypeExt;
    let stdin = std::io::stdin();
    // A File on a duplicate of fd 0, not std's Stdin: Stdin buffers, and bytes in its buffer
    // would never wake epoll again.
    let input = File::from(stdin.as_fd().try_clone_to_owned().ok()?);
    let kind = input.metadata().ok()?.file_type();
    (stdin.is_terminal() || kind.is_fifo() || kind.is_socket()).then_some(input)
}

/// Builds the machine from `config`, runs it, and returns pmvm's exit status.
pub fn run(config: &MachineConfig, opts: &RunOptions) -> Result<u8, VmError> {
    build(config, opts)?.run()
}

/// A machine built and ready: devices attached, guest loaded, vCPUs created, the control
/// socket serving; no vCPU has run yet.
pub struct Machine {
    exit: Arc<ExitSignal>,
    power: PowerSwitch,
    pmem: Vec<Arc<nvdimm::Nvdimm>>,
    vcpus: Vec<Vcpu>,
    threads: Arc<VcpuThreads>,
    events: EventManager<Box<dyn MutEventSubscriber + Send>>,
    raw_terminal: Option<RawTerminal>,
    api: Option<ApiServer>,
    filters: Filters,
    /// Kept until the machine is torn down, as the vCPUs and devices were built on them.
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    bus: Arc<Bus>,
}

/// Builds the machine `config` describes; nothing runs until [`Machine::run`].
pub fn build(config: &MachineConfig, opts: &RunOptions) -> Result<Machine, VmError> {
    let (kernel, format) = config.kernel.clone().ok_or(VmError::NoKernel)?;
    let stop_signals = StopSignals::install().map_err(host_err("signal handling"))?;
    signals::install_kick_handler().map_err(host_err("the vCPU kick signal"))?;

    let filters = Filters::build(config.seccomp).map_err(VmError::Seccomp)?;
    let kvm = open_kvm(&opts.kvm_device)?;
    let vm = Arc::new(create_vm(&kvm, config.cpus)?);
    let mem = create_guest_memory(&vm, config.memory)?;

    let tracking = choose_tracking(&vm, config)?;
    let manual_protect = matches!(
        tracking,
        Tracking::Bitmap {
            manual_protect: true
        }
    );
    let pmem_devices = pmem::open_all(&config.pmem, config.memory, config.cpus, manual_protect)
        .map_err(VmError::PmemOpen)?;
    for d in &pmem_devices {
        match &tracking {
            Tracking::Ring(rings) => d.attach_ring(&vm, rings.clone()),
            Tracking::Bitmap { .. } => d.attach(&vm),
        }
        .map_err(VmError::Pmem)?;
    }

    let desc = platform::describe(config, pmem::nfit_descs(pmem_devices.iter().map(|d| &**d)));
    let tables = platform::tables(&desc)?;
    for t in tables.iter() {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(VmError::AcpiWrite)?;
    }
    regs::write_boot_tables(&mem).map_err(|e| VmError::Regs(0, e))?;
    let entry = boot::load(
        &mem,
        config.memory,
        &kernel,
        format,
        config.initrd.as_deref(),
        &config.cmdline,
    )?;

    let exit = Arc::new(ExitSignal::new().map_err(host_err("the exit event"))?);
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host_err("the serial interrupt"))?;
    vm.register_irqfd(&serial_irq, layout::COM1_GSI)
        .map_err(kvm_err("route the serial interrupt"))?;
    let (serial_dev, serial_ready) = serial::new(serial_irq, serial_output(&config.serial)?)
        .map_err(host_err("the serial port"))?;
    let serial_dev = Arc::new(Mutex::new(serial_dev));
    let power = PowerSwitch::new(exit.clone(), pmem_devices.clone());
    let mut mmio = MmioRanges::default();
    pmem::add_mmio(&mut mmio, &pmem_devices).map_err(VmError::Mmio)?;
    let bus = Arc::new(Bus::new(
        serial_dev.clone(),
        exit.clone(),
        mmio,
        pmem_devices.clone(),
        power.clone(),
    ));

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report its supported CPUID"))?;
    let control = Arc::new(VcpuControl::default());
    for d in &pmem_devices {
        let barrier = control.clone();
        d.set_harvest_barrier(Arc::new(move |except| barrier.sync_exits(except)));
        let fence = control.clone();
        d.set_vcpu_fence(Arc::new(move |f| fence.fence(f)));
    }
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::patch(&mut cpuid, id, config.cpus);
        config.cpu_model.apply(&mut cpuid);
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err("set the vCPU's CPUID"))?;
        let setup = || -> Result<(), RegsError> {
            regs::setup_msrs(&fd)?;
            regs::setup_long_mode(&fd, entry.0)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)
        };
        setup().map_err(|e| VmError::Regs(id, e))?;
        let dirty_ring = match &tracking {
            Tracking::Ring(rings) => Some((
                rings.clone(),
                rings.add_vcpu(&fd).map_err(VmError::DirtyRing)?,
            )),
            Tracking::Bitmap { .. } => None,
        };
        vcpus.push(Vcpu {
            id,
            fd,
            bus: bus.clone(),
            exit: exit.clone(),
            control: control.clone(),
            mem: mem.clone(),
            dirty_ring,
            seccomp: filters.vcpu.clone(),
            seccomp_selftest: config.seccomp_selftest && id == 0,
        });
    }

    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(|e| host_err("the event loop")(std::io::Error::other(format!("{e:?}"))))?;
    em.add_subscriber(Box::new(StopWatcher {
        exit: exit.clone(),
        signals: stop_signals,
    }));
    let raw_terminal = RawTerminal::enter();
    if let Some(input) = serial_input() {
        em.add_subscriber(Box::new(serial::SerialInput::new(
            serial_dev,
            input,
            serial_ready,
        )));
    }

    // The socket is bound before any vCPU runs: a bad --api-sock never lets the guest start.
    let threads = Arc::new(VcpuThreads::new(control));
    let api = match &opts.api_sock {
        Some(path) => {
            let ctl = Arc::new(MachineControl {
                started: Instant::now(),
                vcpus: u32::from(config.cpus),
                memory: config.memory,
                kernel: kernel.display().to_string(),
                cmdline: config.cmdline.clone(),
                pmem: pmem_devices.clone(),
                threads: threads.clone(),
                exit: exit.clone(),
                power: power.clone(),
                paused: Mutex::new(false),
                paused_flag: Default::default(),
            });
            let options = ServerOptions {
                seccomp: Some(filters.api.clone()),
                ..ServerOptions::default()
            };
            match ApiServer::start_with(path, ctl, options) {
                Ok(server) => Some(server),
                Err(e) => return Err(VmError::Api(e)),
            }
        }
        None => None,
    };
    Ok(Machine {
        exit,
        power,
        pmem: pmem_devices,
        vcpus,
        threads,
        events: em,
        raw_terminal,
        api,
        filters,
        kvm,
        vm,
        mem,
        bus,
    })
}

impl Machine {
    /// Runs the vCPUs until the VM stops, tears the machine down and returns pmvm's exit
    /// status.
    pub fn run(self) -> Result<u8, VmError> {
        let Machine {
            exit,
            power,
            pmem: pmem_devices,
            vcpus,
            threads,
            events: mut em,
            raw_terminal,
            api,
            filters,
            kvm: _kvm,
            vm: _vm,
            mem: _mem,
            bus: _bus,
        } = self;
        let background = start_background_writeback(&pmem_devices, &filters.writeback)?;
        if let Err(e) = threads.start(vcpus) {
            threads.stop();
            stop_background_writeback(&pmem_devices, background, Instant::now() + STOP_TIMEOUT);
            return Err(e.into());
        }
        // Last: every other thread is running under its own filter, and what the main thread
        // does from here on (the event loop, teardown) needs no setup syscalls.
        if let Err(e) = filters.main.apply() {
            exit.request(ExitReason::Fatal(e.to_string()));
        }

        while exit.reason().is_none() {
            if let Err(e) = em.run() {
                log::error!("event loop: {e:?}");
            }
        }
        if let Some(server) = api {
            server.stop();
        }
        let stopping = Instant::now();
        let mut stuck = threads.stop();
        stuck.extend(stop_background_writeback(
            &pmem_devices,
            background,
            stopping + STOP_TIMEOUT,
        ));
        drop(raw_terminal);
        if !stuck.is_empty() {
            // A flush blocked in the file system: it was never acknowledged, and a final
            // writeback would block the same way.
            eprintln!("pmvm: {}", stop_wait::stuck_line(&stuck, &pmem_devices));
            let reason = exit.reason().unwrap_or(ExitReason::Shutdown);
            return Ok(match reason {
                ExitReason::PowerCut(_) => reason.exit_code(),
                _ => crate::exit::IO_ERROR_EXIT_CODE,
            });
        }

        let reason = exit.reason().unwrap_or(ExitReason::Shutdown);
        match &reason {
            ExitReason::Fatal(msg) | ExitReason::IoError(msg) => eprintln!("pmvm: {msg}"),
            ExitReason::PowerCut(cause) => {
                // Already done by whoever cut the power; repeated for any device added since.
                power.cut(*cause);
                eprintln!("pmvm: power cut by {cause}: nothing unflushed was written back");
            }
            _ => {}
        }
        if reason.writes_back() {
            final_writeback(&pmem_devices);
        }
        for d in &pmem_devices {
            eprintln!("pmvm: {}", d.summary_line());
        }
        Ok(reason.exit_code())
    }
}

/// Starts the `writeback-interval=` thread of every device that has one.
fn start_background_writeback(
    devices: &[Arc<nvdimm::Nvdimm>],
    filter: &ThreadFilter,
) -> Result<Vec<std::thread::JoinHandle<()>>, VmError> {
    let mut handles = Vec::new();
    for d in devices.iter().filter(|d| d.writeback_interval().is_some()) {
        let dev = d.clone();
        let filter = filter.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("wb-{}", d.id()))
            .spawn(move || match filter.apply() {
                Ok(()) => {
                    if let Err(e) = dev.run_background_writeback() {
                        // No vCPU or API call may come to stop the VM: say it here.
                        let line = crate::pmem::stop_line(&dev, &e);
                        log::error!("{}", line.unwrap_or_else(|| nvdimm::error_chain(&e)));
                    }
                }
                Err(e) => log::error!("{}: {e}; no background writeback", dev.id()),
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                stop_background_writeback(devices, handles, Instant::now() + STOP_TIMEOUT);
                return Err(host_err("a background writeback thread")(e));
            }
        }
    }
    Ok(handles)
}

/// Stops the background writeback threads; a round in progress finishes first, if it does
/// by `deadline`. Returns the names of the threads that did not stop.
fn stop_background_writeback(
    devices: &[Arc<nvdimm::Nvdimm>],
    handles: Vec<std::thread::JoinHandle<()>>,
    deadline: Instant,
) -> Vec<String> {
    for d in devices {
        d.stop_background_writeback();
    }
    stop_wait::join_until(handles, deadline, || {})
}

/// Makes what the guest left unflushed durable, when the host (not the guest) stopped the VM.
/// Not for `persist=flush` devices: their file changes only at flushes, so what the guest did
/// not flush is dropped, as a power cut would.
fn final_writeback(devices: &[Arc<nvdimm::Nvdimm>]) {
    for d in devices
        .iter()
        .filter(|d| !d.readonly() && d.persist() == nvdimm::PersistMode::Adr)
    {
        if let Err(e) = d.host_flush() {
            log::error!("final writeback: {}", crate::api::error_chain(&e));
        }
    }
}

/// Options of a run that are not part of the machine.
pub struct RunOptions {
    pub kvm_device: PathBuf,
    pub api_sock: Option<PathBuf>,
}
