//! COM1: vm-superio's 16550A, its interrupt through an irqfd, and host input with
//! backpressure, so no byte typed at the console is dropped when the guest's FIFO is full.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::lock;

/// Raises the serial interrupt by writing the eventfd KVM routes to the IRQ line.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the input side that the guest drained its receive FIFO.
pub struct InputReady(pub EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Best effort: a missed wake-up only delays input until the next keystroke.
        let _ = self.0.write(1);
    }
}

pub type SerialDevice = Serial<IrqLine, InputReady, Box<dyn Write + Send>>;

/// Builds COM1 writing to `out`. Returns the device and the eventfd that signals room in its
/// receive FIFO.
pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<(SerialDevice, EventFd)> {
    let ready = EventFd::new(EFD_NONBLOCK)?;
    let dev = Serial::with_events(IrqLine(irq), InputReady(ready.try_clone()?), out);
    Ok((dev, ready))
}

const INPUT: u32 = 0;
const READY: u32 = 1;

/// Feeds host input (a terminal or a pipe) to COM1. Bytes that do not fit in the guest's
/// FIFO wait here, and the input is not read again until the guest has drained them.
pub struct SerialInput<R: Read + AsRawFd> {
    serial: Arc<Mutex<SerialDevice>>,
    input: R,
    ready: EventFd,
    pending: VecDeque<u8>,
    reading: bool,
    eof: bool,
}

impl<R: Read + AsRawFd> SerialInput<R> {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: R, ready: EventFd) -> Self {
        SerialInput {
            serial,
            input,
            ready,
            pending: VecDeque::new(),
            reading: true,
            eof: false,
        }
    }

    /// Moves as many pending bytes as fit into the guest's FIFO.
    fn push_pending(&mut self) {
        let mut serial = lock(&self.serial);
        let room = serial.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..room).collect();
        if let Err(e) = serial.enqueue_raw_bytes(&chunk) {
            log::warn!("serial input: {e:?}");
        }
    }

    fn input_events(&self) -> Events {
        Events::with_data(&self.input, INPUT, EventSet::IN)
    }
}

impl<R: Read + AsRawFd> MutEventSubscriber for SerialInput<R> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(self.input_events()) {
            log::warn!("serial input disabled: {e:?}");
            self.reading = false;
        }
        if let Err(e) = ops.add(Events::with_data(&self.ready, READY, EventSet::IN)) {
            log::warn!("serial input backpressure disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            INPUT => {
                let mut buf = [0u8; 64];
                match self.input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        // End of input: the guest keeps running without a console input.
                        let _ = ops.remove(self.input_events());
                        self.reading = false;
                        self.eof = true;
                        return;
                    }
                    Ok(n) => self.pending.extend(&buf[..n]),
                }
            }
            _ => {
                let _ = self.ready.read();
            }
        }
        self.push_pending();
        let full = !self.pending.is_empty();
        if full && self.reading {
            let _ = ops.remove(self.input_events());
            self.reading = false;
        } else if !full && !self.reading && !self.eof {
            self.reading = ops.add(self.input_events()).is_ok();
        }
    }
}
