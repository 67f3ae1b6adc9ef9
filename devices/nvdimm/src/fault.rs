//! A device's I/O fault: why it cannot acknowledge a flush until a retry makes its pages
//! durable. Recorded by the writeback that failed and cleared by the next one that succeeds;
//! the VMM pauses the VM in the `io-error` state while a device has one.

use serde::{Deserialize, Serialize};

/// What went wrong, for the API, the stats and the one stderr line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoFault {
    /// The device's id.
    pub device: String,
    /// The backing file.
    pub path: String,
    /// The host errno (0 when the fault has none, e.g. a replaced file).
    pub errno: i32,
    /// Its symbolic name, e.g. `ENOSPC`.
    pub errno_name: String,
    /// What failed, as one line (the error and its causes).
    pub what: String,
    /// Pages the guest wrote that are not durable yet.
    pub pages_at_stake: u64,
}

impl IoFault {
    /// The stderr line, naming what the user can do.
    pub fn line(&self) -> String {
        self.with_outcome("the VM is paused: fix the cause, then `pmvm resume` retries")
    }

    /// The same, for `on-error=exit`: pmvm stops instead of pausing.
    pub fn line_for_exit(&self) -> String {
        self.with_outcome("on-error=exit: pmvm stops without acknowledging the flush")
    }

    fn with_outcome(&self, outcome: &str) -> String {
        format!(
            "io-error on {} ({}): {} [{}]; {} pages not durable; {outcome}",
            self.device, self.path, self.what, self.errno_name, self.pages_at_stake
        )
    }
}

/// The symbolic name of the errnos a flush can meet, or `errno N`.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        0 => "none",
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EROFS => "EROFS",
        libc::EFAULT => "EFAULT",
        libc::ENOENT => "ENOENT",
        libc::ESTALE => "ESTALE",
        libc::EBADF => "EBADF",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOTCONN => "ENOTCONN",
        libc::EFBIG => "EFBIG",
        libc::ENOMEM => "ENOMEM",
        libc::EXDEV => "EXDEV",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_device_errno_and_pages() {
        let f = IoFault {
            device: "pmem0".into(),
            path: "/x/img".into(),
            errno: libc::ENOSPC,
            errno_name: errno_name(libc::ENOSPC),
            what: "fdatasync failed".into(),
            pages_at_stake: 7,
        };
        let line = f.line();
        for part in ["pmem0", "/x/img", "ENOSPC", "7 pages", "pmvm resume"] {
            assert!(line.contains(part), "{line}");
        }
        assert_eq!(errno_name(12345), "errno 12345");
    }
}
