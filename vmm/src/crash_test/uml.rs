//! Replaying an xfs log without mounting in the host kernel: a user-mode Linux (Debian's
//! `user-mode-linux`, Linux 6.1, an ordinary host process) loop-mounts each crash state and
//! unmounts it, so the kernel's own log recovery brings the image to what a mount after the
//! crash would see. One instance per checking thread serves every state of that thread.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// The user-mode kernel Debian's `user-mode-linux` package installs.
pub const UML: &str = "linux.uml";
/// Where that package keeps its modules (the loop driver is one).
const MODULES: &str = "/usr/lib/uml/modules";
/// A mount that takes longer is treated as hung.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// The instance's /init: it mounts the worker's scratch directory through hostfs, then for
/// each file name read from the console mounts that file (log recovery) and unmounts it.
const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
stty -echo 2>/dev/null
insmod "$PMVM_LOOP" 2>/dev/null
if ! mount -t hostfs -o "$PMVM_SCRATCH" none /mnt; then
  echo "REPLAY-FAIL - cannot mount $PMVM_SCRATCH through hostfs"
fi
mount -t devtmpfs dev /dev
mkdir -p /mnt/uml-mnt
echo REPLAY-READY
while read -r name; do
  dmesg -c >/dev/null
  if mount -n -t xfs -o loop "/mnt/$name" /mnt/uml-mnt 2>/mnt/uml-err; then
    umount -n /mnt/uml-mnt && sync && echo "REPLAY-OK $name" || echo "REPLAY-FAIL $name umount failed"
  else
    echo "REPLAY-FAIL $name $(cat /mnt/uml-err; dmesg | grep -i xfs | grep -v -e 'Mounting V' -e 'Starting recovery' -e 'First 128 bytes' -e 'Unmount and run' | tail -n 4) " | tr '\n' ' '
    echo
  fi
done
echo o > /proc/sysrq-trigger
sleep 10
"#;

/// What a mount after the crash did with the state.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Mounted (log replayed) and cleanly unmounted.
    Mounted,
    /// The kernel refused it, or crashed or hung on it; the reason.
    Refused(String),
}

/// One running instance.
pub struct Replayer {
    dir: PathBuf,
    child: Child,
    /// Closing it ends the instance's loop: it powers off and takes its helpers with it.
    input: Option<ChildStdin>,
    lines: Receiver<String>,
    /// It crashed or hung: drop it and start another.
    pub dead: bool,
}

/// The loop driver module of the installed user-mode kernel.
fn loop_module() -> io::Result<PathBuf> {
    for entry in fs::read_dir(MODULES)? {
        let p = entry?.path().join("kernel/drivers/block/loop.ko");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(io::Error::other(format!(
        "no loop.ko under {MODULES}: reinstall user-mode-linux"
    )))
}

impl Replayer {
    /// Starts an instance that serves files in `dir`.
    pub fn start(dir: &Path) -> io::Result<Replayer> {
        let dir = fs::canonicalize(dir)?;
        let init = dir.join("uml-init.sh");
        fs::write(&init, INIT)?;
        fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let mut child = Command::new(UML)
            .arg("mem=96M")
            .arg("root=/dev/root")
            .arg("rootfstype=hostfs")
            .arg("rootflags=/")
            .arg("ro")
            .arg("quiet")
            // The host's /dev stays visible until /init has started: scratch is often /dev/shm.
            .arg("devtmpfs.mount=0")
            .arg("con=null")
            .arg("con0=fd:0,fd:1")
            .arg(format!("init={}", init.display()))
            .arg(format!("PMVM_SCRATCH={}", dir.display()))
            .arg(format!("PMVM_LOOP={}", loop_module()?.display()))
            // Its memory file and the mconsole socket go here, not into $HOME.
            .env("TMPDIR", &dir)
            .env("HOME", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: the fallback kill reaches its helper processes too.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start {UML} (install user-mode-linux): {e}"),
                )
            })?;
        let (Some(input), Some(out)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(io::Error::other("the user-mode kernel's pipes are missing"));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("REPLAY-") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        let r = Replayer {
            dir,
            child,
            input: Some(input),
            lines,
            dead: false,
        };
        match r.lines.recv_timeout(MOUNT_TIMEOUT) {
            Ok(l) if l == "REPLAY-READY" => Ok(r),
            Ok(l) => Err(io::Error::other(format!("the user-mode kernel: {l}"))),
            Err(_) => Err(io::Error::other(format!(
                "{UML} did not start within {} s",
                MOUNT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Mounts and unmounts `file` (in this instance's directory), replaying its log.
    /// An instance that crashed or hung on it is marked `dead`.
    pub fn replay(&mut self, file: &Path) -> io::Result<Replay> {
        let name = file
            .strip_prefix(&self.dir)
            .ok()
            .and_then(Path::to_str)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "{} is not in {}",
                    file.display(),
                    self.dir.display()
                ))
            })?
            .to_string();
        let Some(input) = self.input.as_mut() else {
            return Err(io::Error::other("the user-mode kernel was shut down"));
        };
        writeln!(input, "{name}")?;
        input.flush()?;
        match self.lines.recv_timeout(MOUNT_TIMEOUT) {
            Ok(l) if l == format!("REPLAY-OK {name}") => Ok(Replay::Mounted),
            Ok(l) => Ok(Replay::Refused(
                l.trim_start_matches("REPLAY-FAIL ")
                    .trim_start_matches(&name)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            )),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.dead = true;
                Ok(Replay::Refused(format!(
                    "the mount did not finish within {} s",
                    MOUNT_TIMEOUT.as_secs()
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.dead = true;
                Ok(Replay::Refused(
                    "mounting it crashed the kernel (user-mode Linux exited)".into(),
                ))
            }
        }
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        drop(self.input.take());
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: signals only the process group this instance leads; the child is not yet
        // reaped, so its id (the group's) cannot have been reused.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}
