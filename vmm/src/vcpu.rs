//! vCPU threads: the KVM_RUN loop, exit dispatch, pausing and stopping.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_EXIT_DIRTY_RING_FULL, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use nvdimm::{IoFault, OnError, VcpuId};
use vm_memory::GuestMemoryMmap;

use crate::devices::{lock, Bus, FlushFailure};
use crate::dirty_ring::{DirtyRings, VcpuRingHandle};
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::ThreadFilter;
use crate::signals;
use crate::stop_wait::{join_until, STOP_TIMEOUT};
use crate::x86::paging;

/// Shared by the vCPU threads and whoever pauses, resumes or stops them.
#[derive(Default)]
pub struct VcpuControl {
    stop: AtomicBool,
    state: Mutex<PauseState>,
    changed: Condvar,
    /// The vCPU threads, for kicking them out of KVM_RUN.
    threads: Mutex<Vec<Arc<VcpuSlot>>>,
    /// Fences in force ([`VcpuControl::fence`]): no vCPU enters the guest while non-zero.
    fenced: AtomicU32,
}

/// What others need to know about one vCPU thread to make it leave the guest.
struct VcpuSlot {
    id: VcpuId,
    thread: libc::pthread_t,
    /// Set just before KVM_RUN and cleared once it returns.
    in_guest: AtomicBool,
    /// KVM_RUN returns so far.
    exits: AtomicU64,
    /// Cleared when the thread leaves its loop: it must not be signalled after it is joined.
    alive: AtomicBool,
}

impl VcpuSlot {
    fn kick(&self) {
        if self.alive.load(Ordering::Acquire) {
            // SAFETY: the thread is alive (it clears `alive` before returning, and threads are
            // joined only after they return), so its pthread_t is valid.
            unsafe { libc::pthread_kill(self.thread, signals::vcpu_kick_signal()) };
        }
    }
}

/// How long a harvest waits for the other vCPUs to leave the guest. A kicked vCPU leaves as
/// soon as its thread runs, which on a loaded host can take well over a second; only one that
/// stays this long is stuck.
const HARVEST_BARRIER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest pause between kicks: the first come every 200 µs, then less often.
const KICK_INTERVAL_MAX: Duration = Duration::from_millis(10);

#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    /// Set when a flush failed: every vCPU is held, the one whose flush failed included,
    /// until a retry succeeds.
    io_error: Option<IoFault>,
}

impl VcpuControl {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Holds the calling vCPU while a pause is requested or the VM is in `io-error`.
    fn park_if_paused(&self) {
        let held = |st: &PauseState| st.requested || st.io_error.is_some();
        let mut st = lock(&self.state);
        if !held(&st) {
            return;
        }
        st.parked += 1;
        self.changed.notify_all();
        while held(&st) && !self.stopping() {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= 1;
        self.changed.notify_all();
    }

    /// Puts the VM in `io-error` and kicks every vCPU out of the guest. Returns whether this
    /// call did it (the first fault is the one reported).
    fn enter_io_error(&self, fault: IoFault) -> bool {
        let first = {
            let mut st = lock(&self.state);
            let first = st.io_error.is_none();
            if first {
                st.io_error = Some(fault);
            }
            self.changed.notify_all();
            first
        };
        self.kick_all();
        first
    }

    /// Why the VM is in `io-error`, if it is.
    pub fn io_error(&self) -> Option<IoFault> {
        lock(&self.state).io_error.clone()
    }

    /// Ends `io-error`: the vCPUs run again, the one whose flush failed completing its hint
    /// write. Only once the failed flush's pages are durable.
    pub fn clear_io_error(&self) {
        lock(&self.state).io_error = None;
        self.changed.notify_all();
    }

    /// Makes every vCPU thread that is in KVM_RUN leave it (an EINTR exit).
    fn kick_all(&self) {
        for slot in lock(&self.threads).iter() {
            slot.kick();
        }
    }

    /// Registers the calling thread as vCPU `id`.
    fn register(&self, id: VcpuId) -> Arc<VcpuSlot> {
        let slot = Arc::new(VcpuSlot {
            id,
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            in_guest: AtomicBool::new(false),
            exits: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        lock(&self.threads).push(slot.clone());
        slot
    }

    /// Runs `f` while no vCPU is in the guest, kicking them out and keeping them out until it
    /// returns; the calling thread may be a vCPU's (it is not in the guest). Errs without
    /// running `f` if a vCPU does not leave KVM_RUN within the harvest barrier's timeout.
    pub fn fence(&self, f: &mut dyn FnMut()) -> Result<(), String> {
        // SeqCst pairs with `enter_guest`: either the vCPU sees the fence before KVM_RUN, or
        // this thread sees it in the guest and kicks it out.
        self.fenced.fetch_add(1, Ordering::SeqCst);
        let out = self.wait_out_of_guest();
        if out.is_ok() {
            f();
        }
        {
            // Under the lock, so a vCPU about to wait cannot miss the wake-up.
            let _st = lock(&self.state);
            self.fenced.fetch_sub(1, Ordering::SeqCst);
            self.changed.notify_all();
        }
        out
    }

    fn wait_out_of_guest(&self) -> Result<(), String> {
        kick_until_none(|| {
            lock(&self.threads)
                .iter()
                .filter(|s| s.in_guest.load(Ordering::SeqCst))
                .cloned()
                .collect()
        })
    }

    /// Marks `slot` in the guest, first waiting out any fence.
    fn enter_guest(&self, slot: &VcpuSlot) {
        loop {
            slot.in_guest.store(true, Ordering::SeqCst);
            if self.fenced.load(Ordering::SeqCst) == 0 {
                return;
            }
            slot.in_guest.store(false, Ordering::SeqCst);
            let mut st = lock(&self.state);
            while self.fenced.load(Ordering::SeqCst) > 0 {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// The harvest barrier: returns once every vCPU but `except` that was in the guest when
    /// called has left KVM_RUN at least once, kicking them until they have.
    pub fn sync_exits(&self, except: Option<VcpuId>) -> Result<(), String> {
        let snapshot: Vec<(Arc<VcpuSlot>, u64)> = lock(&self.threads)
            .iter()
            .filter(|s| except != Some(s.id))
            .map(|s| (s.clone(), s.exits.load(Ordering::SeqCst)))
            .collect();
        kick_until_none(|| {
            snapshot
                .iter()
                .filter(|(s, exits)| {
                    s.in_guest.load(Ordering::SeqCst) && s.exits.load(Ordering::SeqCst) == *exits
                })
                .map(|(s, _)| s.clone())
                .collect()
        })
    }
}

/// Kicks the vCPUs `waiting` names until it names none; errs after the harvest barrier's
/// timeout.
fn kick_until_none(waiting: impl Fn() -> Vec<Arc<VcpuSlot>>) -> Result<(), String> {
    let deadline = Instant::now() + HARVEST_BARRIER_TIMEOUT;
    let mut pause = Duration::from_micros(200);
    loop {
        let waiting = waiting();
        let Some(first) = waiting.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(format!(
                "vCPU {} did not leave KVM_RUN within {HARVEST_BARRIER_TIMEOUT:?}",
                first.id
            ));
        }
        // Resent until it lands inside KVM_RUN: one that arrives just before is lost.
        for s in &waiting {
            s.kick();
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(KICK_INTERVAL_MAX);
    }
}

/// One vCPU, ready to run on its own thread.
pub struct Vcpu {
    pub id: VcpuId,
    pub fd: VcpuFd,
    pub bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub control: Arc<VcpuControl>,
    pub mem: GuestMemoryMmap,
    /// The VM's dirty rings and this vCPU's, when pmem pages are tracked by ring.
    pub dirty_ring: Option<(Arc<DirtyRings>, VcpuRingHandle)>,
    /// Installed first thing on the vCPU's thread.
    pub seccomp: ThreadFilter,
    /// `--seccomp-selftest` (vCPU 0 only).
    pub seccomp_selftest: bool,
}

impl Vcpu {
    /// Runs until the VM stops or this vCPU hits something fatal.
    pub fn run(mut self) {
        let slot = self.control.register(self.id);
        self.run_loop(&slot);
        slot.alive.store(false, Ordering::Release);
    }

    fn run_loop(&mut self, slot: &VcpuSlot) {
        if let Err(e) = self.seccomp.apply() {
            self.exit
                .request(ExitReason::Fatal(format!("vCPU {}: {e}", self.id)));
            return;
        }
        if self.seccomp_selftest {
            crate::seccomp::selftest();
        }
        while !self.control.stopping() {
            self.control.park_if_paused();
            if self.control.stopping() {
                break;
            }
            if let Some(reason) = self.run_once(slot) {
                self.exit.request(reason);
                break;
            }
            if let Some((rings, ring)) = &self.dirty_ring {
                if let Err(e) = rings.collect_if_filling(ring) {
                    let what = format!("dirty ring: {}", nvdimm::error_chain(&e));
                    self.exit.request(self.fatal(what));
                    break;
                }
            }
            // Without power nothing runs on: stop at once rather than when the main thread
            // gets round to it.
            if self.exit.power_cut() {
                break;
            }
        }
    }

    /// One KVM_RUN and its exit. Returns why the VM must stop, if it must.
    fn run_once(&mut self, slot: &VcpuSlot) -> Option<ExitReason> {
        let bus = &self.bus;
        let ring_mark = self.dirty_ring.as_ref().map(|(_, ring)| ring.mark());
        self.control.enter_guest(slot);
        let ran = self.fd.run();
        slot.exits.fetch_add(1, Ordering::SeqCst);
        slot.in_guest.store(false, Ordering::SeqCst);
        match ran {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some(failure) = bus.mmio_write(self.id, addr, data) {
                    return self.flush_failed(failure);
                }
            }
            Ok(VcpuExit::Hlt) => std::thread::sleep(Duration::from_millis(1)),
            Ok(VcpuExit::Shutdown) => {
                return Some(self.fatal("triple fault (KVM_EXIT_SHUTDOWN)".into()))
            }
            Ok(VcpuExit::InternalError) => {
                let what = self.internal_error();
                return Some(self.fatal(what));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(self.fatal(format!(
                    "KVM_EXIT_FAIL_ENTRY hardware reason {reason:#x} on host CPU {cpu}"
                )))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                    KVM_SYSTEM_EVENT_CRASH => {
                        self.fatal("guest crash (KVM_SYSTEM_EVENT_CRASH)".into())
                    }
                    k => self.fatal(format!("unknown KVM system event {k}")),
                })
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                // Harvest into the devices' pending pages and re-enter; nothing is written
                // back until a flush.
                if let (Some((rings, ring)), Some(mark)) = (&self.dirty_ring, ring_mark) {
                    if let Err(e) = rings.ring_full(ring, mark) {
                        let what = format!("dirty ring full: {}", nvdimm::error_chain(&e));
                        return Some(self.fatal(what));
                    }
                } else {
                    return Some(self.fatal("dirty ring full without dirty rings".into()));
                }
            }
            Ok(other) => {
                let what = format!("unexpected KVM exit {other:?}");
                return Some(self.fatal(what));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) if e.errno() == libc::EFAULT => {
                // KVM could not map guest memory: a truncated pmem file explains that best.
                if let Some(msg) = self.bus.explain_memory_fault() {
                    return Some(ExitReason::Fatal(msg));
                }
                return Some(self.fatal(format!("KVM_RUN failed: {e}")));
            }
            Err(e) => return Some(self.fatal(format!("KVM_RUN failed: {e}"))),
        }
        None
    }

    /// A guest flush (or a store into pmem) could not be made durable: the write must not
    /// complete, so this vCPU does not re-enter the guest until a retry succeeds (it parks
    /// at the top of its loop), or ever.
    fn flush_failed(&self, failure: FlushFailure) -> Option<ExitReason> {
        let (fault, on_error) = match failure {
            // Nothing more can be made durable: the VM stops, and this write never completes.
            FlushFailure::Fatal(line) => return Some(ExitReason::Fatal(line)),
            // The VM is stopping (a power cut), whose reason came first.
            FlushFailure::Stopping => {
                return Some(ExitReason::Fatal(format!(
                    "vCPU {}: stopped with its flush incomplete",
                    self.id
                )))
            }
            FlushFailure::Fault { fault, on_error } => (fault, on_error),
        };
        match on_error {
            OnError::Exit => Some(ExitReason::IoError(fault.line_for_exit())),
            OnError::Stop => {
                let line = fault.line();
                if self.control.enter_io_error(fault) {
                    eprintln!("pmvm: {line}");
                }
                None
            }
        }
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let name = match internal.suberror {
            1 => " (emulation failure)",
            2 => " (simultaneous exception)",
            3 => " (delivery event)",
            4 => " (unexpected exit reason)",
            _ => "",
        };
        format!(
            "KVM_EXIT_INTERNAL_ERROR suberror {}{name}",
            internal.suberror
        )
    }

    /// Names a fatal exit with the vCPU, RIP and the instruction bytes there.
    fn fatal(&self, what: String) -> ExitReason {
        let mut line = format!("vCPU {}: {what}", self.id);
        if let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            let paging = sregs.cr0 & (1 << 31) != 0;
            let bytes = paging::instruction_bytes(&self.mem, sregs.cr3, paging, regs.rip);
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            line.push_str(&format!(
                " at RIP {:#x}, instruction bytes [{}]",
                regs.rip,
                hex.join(" ")
            ));
        }
        ExitReason::Fatal(line)
    }
}

/// The running vCPU threads.
pub struct VcpuThreads {
    handles: Mutex<Vec<JoinHandle<()>>>,
    control: Arc<VcpuControl>,
}

/// How long pause waits for every vCPU to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
const KICK_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot start vCPU thread {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("{parked} of {total} vCPUs paused within {PAUSE_TIMEOUT:?}")]
    PauseTimeout { parked: usize, total: usize },
}

impl VcpuThreads {
    /// No threads yet: `start` runs them. Pause, resume and stop work before and after.
    pub fn new(control: Arc<VcpuControl>) -> Self {
        VcpuThreads {
            handles: Mutex::new(Vec::new()),
            control,
        }
    }

    /// Starts one thread per vCPU. If one cannot start, those already running keep running
    /// until `stop`.
    pub fn start(&self, vcpus: Vec<Vcpu>) -> Result<(), VcpuError> {
        for v in vcpus {
            let id = v.id;
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || v.run())
                .map_err(|e| VcpuError::Spawn(id, e))?;
            lock(&self.handles).push(h);
        }
        Ok(())
    }

    fn kick_all(&self) {
        self.control.kick_all();
    }

    /// Why the VM is in `io-error`, if it is.
    pub fn io_error(&self) -> Option<IoFault> {
        self.control.io_error()
    }

    /// See [`VcpuControl::clear_io_error`].
    pub fn clear_io_error(&self) {
        self.control.clear_io_error();
    }

    /// Takes every vCPU out of KVM_RUN and holds it. A vCPU in the middle of a guest flush
    /// finishes the flush first.
    pub fn pause(&self) -> Result<(), VcpuError> {
        lock(&self.control.state).requested = true;
        let result = self.wait_parked();
        if result.is_err() {
            self.resume();
        }
        result
    }

    fn wait_parked(&self) -> Result<(), VcpuError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            let live = lock(&self.handles)
                .iter()
                .filter(|h| !h.is_finished())
                .count();
            let parked = lock(&self.control.state).parked;
            if parked >= live {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(VcpuError::PauseTimeout {
                    parked,
                    total: live,
                });
            }
            // Resent until acknowledged: a kick that lands just before KVM_RUN is lost.
            self.kick_all();
            std::thread::sleep(KICK_INTERVAL);
        }
    }

    pub fn resume(&self) {
        let mut st = lock(&self.control.state);
        st.requested = false;
        self.control.changed.notify_all();
    }

    /// Stops and joins every vCPU thread. A vCPU in the middle of a guest flush finishes it,
    /// if it can within [`STOP_TIMEOUT`]; returns the names of the threads that did not (one
    /// blocked in a frozen file system), which are left running, never to re-enter the guest.
    pub fn stop(&self) -> Vec<String> {
        {
            // Under the lock, so a vCPU about to park cannot miss the wake-up.
            let _st = lock(&self.control.state);
            self.control.stop.store(true, Ordering::Release);
            self.control.changed.notify_all();
        }
        let handles: Vec<JoinHandle<()>> = lock(&self.handles).drain(..).collect();
        join_until(handles, Instant::now() + STOP_TIMEOUT, || self.kick_all())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in vCPU thread: "in the guest" while blocked in pause(2), which the kick
    /// signal ends, as it ends KVM_RUN. Returns its slot once it is in.
    fn fake_vcpu(control: &Arc<VcpuControl>, id: VcpuId) -> (Arc<VcpuSlot>, JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let c = control.clone();
        let h = std::thread::spawn(move || {
            let slot = c.register(id);
            slot.in_guest.store(true, Ordering::SeqCst);
            tx.send(slot.clone()).unwrap();
            // SAFETY: pause has no preconditions; it returns when a handled signal arrives.
            unsafe { libc::pause() };
            slot.exits.fetch_add(1, Ordering::SeqCst);
            slot.in_guest.store(false, Ordering::SeqCst);
            slot.alive.store(false, Ordering::Release);
        });
        (rx.recv().unwrap(), h)
    }

    #[test]
    fn the_harvest_barrier_waits_until_every_other_vcpu_left_the_guest() {
        signals::install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        let (flushing, f) = fake_vcpu(&control, 0);
        let (other, o) = fake_vcpu(&control, 1);
        control.sync_exits(Some(0)).unwrap();
        assert_eq!(
            other.exits.load(Ordering::SeqCst),
            1,
            "vCPU 1 was kicked out"
        );
        o.join().unwrap();
        // The flushing vCPU itself is not waited for: it is still "in the guest".
        assert!(flushing.in_guest.load(Ordering::SeqCst));
        assert_eq!(flushing.exits.load(Ordering::SeqCst), 0);
        // A host writeback waits for every vCPU.
        control.sync_exits(None).unwrap();
        assert_eq!(flushing.exits.load(Ordering::SeqCst), 1);
        f.join().unwrap();
        // With nobody in the guest it returns at once.
        control.sync_exits(None).unwrap();
    }

    #[test]
    fn a_fence_keeps_every_vcpu_out_of_the_guest_until_it_ends() {
        signals::install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::default());
        // A stand-in vCPU that enters "the guest" (pause(2)) again after every kick.
        let entries = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (c, e) = (control.clone(), entries.clone());
        let h = std::thread::spawn(move || {
            let slot = c.register(0);
            tx.send(slot.clone()).unwrap();
            while !c.stopping() {
                c.enter_guest(&slot);
                e.fetch_add(1, Ordering::SeqCst);
                // SAFETY: pause has no preconditions; it returns when a handled signal arrives.
                unsafe { libc::pause() };
                slot.in_guest.store(false, Ordering::SeqCst);
            }
            slot.alive.store(false, Ordering::Release);
        });
        let slot = rx.recv().unwrap();
        let wait_for = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while entries.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "the vCPU never entered the guest"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for(1);
        let mut seen = None;
        control
            .fence(&mut || {
                let before = entries.load(Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                slot.kick();
                std::thread::sleep(Duration::from_millis(50));
                seen = Some((
                    slot.in_guest.load(Ordering::SeqCst),
                    entries.load(Ordering::SeqCst) - before,
                    before,
                ));
            })
            .unwrap();
        let (in_guest, entered, before) = seen.expect("the fence ran its closure");
        assert_eq!((in_guest, entered), (false, 0), "under the fence");
        // Released, it enters again.
        wait_for(before + 1);
        control.stop.store(true, Ordering::Release);
        while !h.is_finished() {
            slot.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        h.join().unwrap();
    }
}
