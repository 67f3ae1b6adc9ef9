//! The guest's end of the serial conversation: whole lines out, acknowledgements in.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::protocol::{Ack, Event};

/// Lines to the host and, when acknowledgements are on, answers from it.
pub struct Console {
    input: Option<OwnedFd>,
    out: Box<dyn Write + Send>,
    timeout: Duration,
    buf: Vec<u8>,
}

impl Console {
    /// `input` is where acknowledgements arrive (None: run without waiting for a host).
    pub fn new(input: Option<OwnedFd>, out: Box<dyn Write + Send>, timeout: Duration) -> Console {
        Console {
            input,
            out,
            timeout,
            buf: Vec::new(),
        }
    }

    /// The serial console: stdin with echo off (the host's answers must not come back as
    /// console output), stdout for lines.
    pub fn serial(ack: bool, timeout: Duration) -> io::Result<Console> {
        let input = if ack {
            let fd = io::stdin().as_fd().try_clone_to_owned()?;
            echo_off(&fd);
            Some(fd)
        } else {
            None
        };
        Ok(Console::new(input, Box::new(io::stdout()), timeout))
    }

    pub fn acks(&self) -> bool {
        self.input.is_some()
    }

    /// Prints `event` as one line in one write, so kernel messages cannot split it.
    pub fn say(&mut self, event: &Event) {
        self.say_text(&event.to_string());
    }

    pub fn say_text(&mut self, text: &str) {
        let line = format!("{text}\n");
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }

    /// Waits for the next `PMEMACK` line, skipping anything else on the input. Without
    /// acknowledgements, answers `assume` at once.
    pub fn wait_ack(&mut self, assume: Ack) -> Result<Ack, String> {
        let Some(fd) = self.input.as_ref().map(|f| f.as_raw_fd()) else {
            return Ok(assume);
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            while let Some(end) = self.buf.iter().position(|&b| b == b'\n' || b == b'\r') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if let Ok(ack) = line.trim().parse::<Ack>() {
                    return Ok(ack);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no acknowledgement from the host within {} s (is a harness answering on \
                     the serial console? boot with pmemtests.ack=0 to run without one)",
                    self.timeout.as_secs()
                ));
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd that lives across the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll on the console: {e}"));
            }
            if n == 0 {
                continue;
            }
            let mut chunk = [0u8; 256];
            // SAFETY: reads at most 256 bytes into `chunk`, which outlives the call.
            let got = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            match got {
                0 => return Err("the console input was closed before an acknowledgement".into()),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(format!("reading the console: {e}"));
                    }
                }
                n => self.buf.extend_from_slice(&chunk[..n as usize]),
            }
        }
    }
}

/// Turns terminal echo off when `fd` is a terminal; leaves line editing on.
fn echo_off(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: termios is plain integers; zero is a valid starting value for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios into `t`; on failure (not a tty) we stop.
    if unsafe { libc::tcgetattr(raw, &mut t) } != 0 {
        return;
    }
    t.c_lflag &= !(libc::ECHO | libc::ECHONL);
    t.c_iflag |= libc::ICRNL;
    // SAFETY: tcsetattr reads the termios we just filled.
    unsafe { libc::tcsetattr(raw, libc::TCSANOW, &t) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::{Arc, Mutex};

    /// A pipe: (read end, write end).
    fn pipe() -> (OwnedFd, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn acks_are_found_among_noise_and_split_reads() {
        let (r, mut w) = pipe();
        let mut c = Console::new(Some(r), Box::new(Sink::default()), Duration::from_secs(5));
        w.write_all(b"garbage\r\nPMEMACK go\nPMEMACK fa").unwrap();
        assert_eq!(c.wait_ack(Ack::Pass).unwrap(), Ack::Go);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.write_all(b"il crc differs\n").unwrap();
            w
        });
        assert_eq!(
            c.wait_ack(Ack::Pass).unwrap(),
            Ack::Fail("crc differs".into())
        );
        drop(writer.join().unwrap());
        let err = c.wait_ack(Ack::Pass).unwrap_err();
        assert!(err.contains("closed"), "{err}");
    }

    #[test]
    fn silence_times_out_with_advice() {
        let (r, _w) = pipe();
        let mut c = Console::new(
            Some(r),
            Box::new(Sink::default()),
            Duration::from_millis(100),
        );
        let err = c.wait_ack(Ack::Go).unwrap_err();
        assert!(
            err.contains("within 0 s") && err.contains("pmemtests.ack=0"),
            "{err}"
        );
    }

    #[test]
    fn without_input_the_assumed_answer_comes_back_and_lines_are_whole() {
        let sink = Sink::default();
        let mut c = Console::new(None, Box::new(sink.clone()), Duration::from_secs(1));
        assert!(!c.acks());
        assert_eq!(c.wait_ack(Ack::Pass).unwrap(), Ack::Pass);
        c.say(&Event::Start { cases: 3 });
        c.say_text("PMEMSUITE info x");
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            "PMEMSUITE start cases=3\nPMEMSUITE info x\n"
        );
    }
}
