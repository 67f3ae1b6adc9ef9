//! Why the VM stopped, as told by whichever thread saw it first.

use std::sync::Mutex;

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
}

impl ExitReason {
    /// Whether pmvm writes back what the guest left dirty before exiting: when the host
    /// stopped an orderly guest. A guest that powered off or rebooted flushed what it meant to.
    pub fn writes_back(&self) -> bool {
        matches!(self, ExitReason::Shutdown | ExitReason::Signal(_))
    }

    /// pmvm's exit status: 0 for every orderly stop, 1 when the guest died.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Fatal(_) => 1,
            _ => 0,
        }
    }
}

/// Carries the first exit reason to the main thread and wakes it through an eventfd.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another came first, and wakes the main thread.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        // The eventfd counter cannot overflow from a handful of writes; a failed wake-up
        // would leave the main thread blocked, so report it.
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the main thread to stop the VM: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
    }
}
