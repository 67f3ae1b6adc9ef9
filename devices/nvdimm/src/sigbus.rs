//! SIGBUS on a pmem mapping: its backing file was truncated by another process while pmvm ran.
//!
//! Touching a page of a file mapping past the file's end raises SIGBUS, which would kill pmvm
//! without a word. pmvm's own reads and writes of a device mapping register the mapping here.
//! The process's SIGBUS handler, which the VMM installs (a signal's disposition belongs to the
//! process, not to a device), asks [`absorb`] about each fault: a fault in a registered mapping
//! during one of the device's copies ([`Copying`], on the faulting thread) gets a zero page
//! mapped over the faulting page, so the access completes, and is counted, so the caller can see
//! that its bytes are not the file's and report the truncation instead. Any other SIGBUS (a
//! memory error, a fault elsewhere) is the handler's to treat: pmvm's keeps the default action
//! and stops, rather than handing the guest zeros. Without a handler a truncated file ends the
//! process as it would any program.
//!
//! The registry is process-wide because a signal handler has no other way to find it: a fixed
//! array of atomics, read by [`absorb`] without locks or allocation.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::PAGE_SIZE;

/// Mappings that can be registered at once: every device's, with room to spare for tests.
const SLOTS: usize = 4 * crate::MAX_DEVICES;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

static SLOTS_IN_USE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Serialises registration (not the handler, which only reads).
static REGISTER: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread is inside one of pmvm's own copies to or from a pmem mapping.
    /// Const-initialised with no destructor, so the handler reads it without allocating.
    static COPYING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as copying to or from a registered mapping until dropped.
pub struct Copying(());

impl Copying {
    pub fn start() -> Copying {
        COPYING.with(|c| c.set(true));
        Copying(())
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        COPYING.with(|c| c.set(false));
    }
}

/// A mapping registered with the handler; unregistered on drop.
#[derive(Debug)]
pub struct Registration {
    index: Option<usize>,
}

impl Registration {
    /// SIGBUS faults absorbed in this mapping so far.
    pub fn faults(&self) -> u64 {
        self.index
            .map_or(0, |i| SLOTS_IN_USE[i].faults.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            let _guard = crate::lock::lock(&REGISTER);
            SLOTS_IN_USE[i].len.store(0, Ordering::Release);
            SLOTS_IN_USE[i].start.store(0, Ordering::Release);
        }
    }
}

/// Registers `len` bytes at `start` (a file mapping). With every slot taken the mapping goes
/// unprotected (a SIGBUS there stays fatal); that needs more than four times the device limit
/// of live mappings.
pub fn register(start: usize, len: usize) -> Registration {
    let _guard = crate::lock::lock(&REGISTER);
    for (i, slot) in SLOTS_IN_USE.iter().enumerate() {
        if slot.len.load(Ordering::Acquire) == 0 {
            slot.faults.store(0, Ordering::Release);
            slot.start.store(start, Ordering::Release);
            slot.len.store(len, Ordering::Release);
            return Registration { index: Some(i) };
        }
    }
    log::warn!("more than {SLOTS} pmem mappings: a truncated backing file will end pmvm");
    Registration { index: None }
}

/// For the process's SIGBUS handler, with the faulting address: if the calling thread is in
/// one of the device's copies and `addr` lies in a registered mapping, maps a private zero page
/// over the faulting page, counts the fault and returns true (the access then completes).
/// False for any other fault, which the handler must not absorb. Async-signal-safe: atomics,
/// a const thread-local and `mmap` only.
pub fn absorb(addr: usize) -> bool {
    if !COPYING.try_with(Cell::get).unwrap_or(false) {
        return false;
    }
    for slot in SLOTS_IN_USE.iter() {
        let len = slot.len.load(Ordering::Acquire);
        let start = slot.start.load(Ordering::Acquire);
        if len == 0 || addr < start || addr - start >= len {
            continue;
        }
        let page = addr & !(PAGE_SIZE as usize - 1);
        // SAFETY: the page lies inside a live mapping pmvm registered (its owner unregisters
        // before unmapping), so replacing it with a private zero page touches nothing else.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        slot.faults.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    false
}
