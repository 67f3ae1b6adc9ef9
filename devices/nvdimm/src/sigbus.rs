//! SIGBUS on a pmem mapping: its backing file was truncated by another process while pmvm ran.
//!
//! Touching a page of a file mapping past the file's end raises SIGBUS, which would kill pmvm
//! without a word. pmvm's own reads and writes of a device mapping register the mapping here;
//! the handler maps a zero page over a faulting page of a registered mapping, so the access
//! completes, and counts the fault, so the caller can see that its bytes are not the file's
//! and report the truncation instead. Only a fault during such a copy ([`Copying`], on the
//! faulting thread) is absorbed: any other SIGBUS (a memory error, a fault elsewhere) keeps
//! its default action and stops pmvm, rather than handing the guest zeros.
//!
//! The registry is process-wide because a signal handler has no other way to find it: a fixed
//! array of atomics, read by the handler without locks or allocation.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

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
static INSTALL: Once = Once::new();

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

/// Registers `len` bytes at `start` (a file mapping) and installs the handler on first use.
/// With every slot taken the mapping goes unprotected (a SIGBUS there stays fatal); that needs
/// more than four times the device limit of live mappings.
pub fn register(start: usize, len: usize) -> Registration {
    INSTALL.call_once(install);
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

fn install() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler has the
    // SA_SIGINFO signature and only calls async-signal-safe functions (mmap, sigaction).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            log::warn!(
                "cannot handle SIGBUS ({}): a truncated backing file will end pmvm",
                std::io::Error::last_os_error()
            );
        }
    }
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGBUS si_addr is
    // the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let copying = COPYING.try_with(Cell::get).unwrap_or(false);
    for slot in SLOTS_IN_USE.iter().filter(|_| copying) {
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
        if mapped != libc::MAP_FAILED {
            slot.faults.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not a registered mapping (or the page could not be replaced): the default action, which
    // the access will meet again when this returns.
    // SAFETY: restoring SIG_DFL with a zeroed sigaction is async-signal-safe and valid.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use crate::mmap::{Mapping, MmapError};

    #[test]
    fn a_truncated_file_faults_into_an_error_not_a_dead_process() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * 4096).unwrap();
        let m = Mapping::new(&f, 4 * 4096, true).unwrap();
        m.write_at(3 * 4096, b"before").unwrap();
        f.set_len(4096).unwrap();
        let mut buf = [1u8; 6];
        let err = m.read_at(3 * 4096, &mut buf).unwrap_err();
        assert!(
            matches!(err, MmapError::Truncated { offset: 12288, .. }),
            "{err:?}"
        );
        assert_eq!(buf, [0; 6], "the zero page stood in for the lost one");
        // Still inside the file: a normal read.
        m.read_at(0, &mut buf).unwrap();
        let err = m.write_at(2 * 4096, b"x").unwrap_err();
        assert!(matches!(err, MmapError::Truncated { .. }), "{err:?}");
    }

    /// Run in a child process: a plain access past the end of a truncated registered
    /// mapping, outside pmvm's copies, must not be absorbed.
    #[test]
    fn a_sigbus_outside_pmvms_copies_keeps_its_default_action() {
        const CHILD: &str = "PMVM_SIGBUS_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let f = tempfile::tempfile().unwrap();
            f.set_len(2 * 4096).unwrap();
            let m = Mapping::new(&f, 2 * 4096, true).unwrap();
            m.write_at(0, b"x").unwrap();
            f.set_len(0).unwrap();
            // SAFETY: inside the mapping; the access faults, which is what is tested.
            let byte = unsafe { std::ptr::read_volatile((m.host_addr() + 4096) as *const u8) };
            println!("survived, read {byte}");
            std::process::exit(0);
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigbus::tests::a_sigbus_outside_pmvms_copies_keeps_its_default_action",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }
}
