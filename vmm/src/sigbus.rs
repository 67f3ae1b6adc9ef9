//! The process's SIGBUS handler. A signal's disposition belongs to the process, so the VMM
//! installs it once, at start, before any device maps its backing file. What a fault means
//! for a device mapping (a backing file truncated under pmvm's own copy) only the device crate
//! knows: [`nvdimm::sigbus::absorb`] decides, and any fault it does not absorb (a memory error,
//! a fault outside pmvm's copies) gets the default action, which stops pmvm rather than handing
//! the guest zeros.

use std::io;
use std::sync::Once;

static INSTALL: Once = Once::new();

/// Installs the handler (once per process; later calls do nothing).
pub fn install() -> io::Result<()> {
    let mut outcome = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler has
        // the SA_SIGINFO signature and only calls async-signal-safe code (`absorb`: atomics
        // and mmap; sigaction).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            outcome = Err(io::Error::last_os_error());
        }
    });
    outcome
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGBUS si_addr is
    // the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    if nvdimm::sigbus::absorb(addr) {
        return;
    }
    // Not pmvm's to absorb: the default action, which the access meets again when this
    // returns.
    // SAFETY: restoring SIG_DFL with a zeroed sigaction is async-signal-safe and valid.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use nvdimm::mmap::{Mapping, MmapError};

    #[test]
    fn a_truncated_file_faults_into_an_error_not_a_dead_process() {
        super::install().unwrap();
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
            super::install().unwrap();
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
