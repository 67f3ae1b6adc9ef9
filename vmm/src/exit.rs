//! Why the VM stopped, as told by whichever thread saw it first.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nvdimm::lock::lock;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The reason the VM stops. The first one reported wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI S5 written by the guest.
    PowerOff,
    /// i8042 reset or the ACPI reset register: pmvm does not restart the guest.
    Reboot,
    /// `PUT /v1/vm/shutdown`.
    Shutdown,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// Something the guest cannot continue from; the message names it.
    Fatal(String),
    /// Simulated power loss: nothing more is written back, not even at exit.
    PowerCut(PowerCutCause),
    /// A flush failed on an `on-error=exit` device; the message names the fault.
    IoError(String),
}

/// Who cut the power.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerCutCause {
    /// `PUT /v1/vm/power-cut`.
    Api,
    /// `PUT /v1/pmem/{id}/crash`, naming a device.
    ApiDevice,
    /// The guest wrote the test crash port (the probe's `crash` word).
    Guest,
}

impl fmt::Display for PowerCutCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerCutCause::Api => "PUT /v1/vm/power-cut",
            PowerCutCause::ApiDevice => "PUT /v1/pmem/{id}/crash",
            PowerCutCause::Guest => "the guest's write to the test crash port",
        })
    }
}

/// pmvm's exit status after a power cut: not 0, because the guest did not stop cleanly, and
/// apart from 1 (errors, guest failures) and 2 (command-line mistakes).
pub const POWER_CUT_EXIT_CODE: u8 = 3;

/// pmvm's exit status when an `on-error=exit` device's flush failed: the guest never saw it
/// complete, and what it flushed is not all on disk.
pub const IO_ERROR_EXIT_CODE: u8 = 4;

impl ExitReason {
    /// Whether pmvm writes back what the guest left dirty before exiting: when the host
    /// stopped an orderly guest (and only for `persist=adr` devices). A guest that powered off
    /// or rebooted flushed what it meant to; a power cut writes back nothing by definition.
    pub fn writes_back(&self) -> bool {
        matches!(self, ExitReason::Shutdown | ExitReason::Signal(_))
    }

    /// pmvm's exit status: 0 for every orderly stop, 1 when the guest died, 3 after a power
    /// cut.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Fatal(_) => 1,
            ExitReason::PowerCut(_) => POWER_CUT_EXIT_CODE,
            ExitReason::IoError(_) => IO_ERROR_EXIT_CODE,
            _ => 0,
        }
    }
}

/// Carries the first exit reason to the main thread and wakes it through an eventfd.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
    /// Whether the power was cut: vCPUs check it after every exit, without the lock.
    power_cut: AtomicBool,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
            power_cut: AtomicBool::new(false),
        })
    }

    /// Records `reason` unless another came first, and wakes the main thread.
    pub fn request(&self, reason: ExitReason) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            if let ExitReason::PowerCut(_) = reason {
                self.power_cut.store(true, Ordering::Release);
            }
            *r = Some(reason);
        }
        // The eventfd counter cannot overflow from a handful of writes; a failed wake-up
        // would leave the main thread blocked, so report it.
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the main thread to stop the VM: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Whether the VM is stopping because its power was cut.
    pub fn power_cut(&self) -> bool {
        self.power_cut.load(Ordering::Acquire)
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Fatal("late".into()));
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        assert_eq!(ExitReason::Fatal("x".into()).exit_code(), 1);
        assert_eq!(ExitReason::Reboot.exit_code(), 0);
        assert!(ExitReason::Signal(15).writes_back());
        assert!(ExitReason::Shutdown.writes_back());
        assert!(!ExitReason::PowerOff.writes_back());
        assert!(!ExitReason::Fatal("x".into()).writes_back());
        assert!(!ExitReason::IoError("x".into()).writes_back());
        assert_eq!(ExitReason::IoError("x".into()).exit_code(), 4);
        assert!(!s.power_cut());
    }

    #[test]
    fn a_power_cut_writes_nothing_back_and_exits_3() {
        let cut = ExitReason::PowerCut(PowerCutCause::Api);
        assert!(!cut.writes_back());
        assert_eq!(cut.exit_code(), 3);
        let s = ExitSignal::new().unwrap();
        s.request(cut.clone());
        assert!(s.power_cut());
        // A later power cut does not override an earlier reason.
        let s = ExitSignal::new().unwrap();
        s.request(ExitReason::PowerOff);
        s.request(cut);
        assert!(!s.power_cut());
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
    }
}
