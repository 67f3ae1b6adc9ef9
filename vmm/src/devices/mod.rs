//! The platform devices and the port/MMIO dispatch of vCPU exits.

pub mod mmio;
pub mod power;
pub mod serial;

use std::sync::{Arc, Mutex};

use nvdimm::Nvdimm;

use crate::exit::{ExitSignal, PowerCutCause};
use crate::layout;
pub use crate::pmem::FlushFailure;
use crate::power_cut::PowerSwitch;
use mmio::MmioRanges;

use power::{PowerDevice, I8042};
use serial::SerialDevice;

/// Every device a vCPU exit can reach. Shared by all vCPU threads.
pub struct Bus {
    pub serial: Arc<Mutex<SerialDevice>>,
    i8042: Mutex<I8042>,
    power: PowerDevice,
    mmio: MmioRanges,
    /// The NVDIMMs, to explain a fault of KVM on guest memory.
    pmem: Vec<Arc<Nvdimm>>,
    switch: PowerSwitch,
}

impl Bus {
    /// `mmio` holds the NVDIMMs' ranges (`pmem::add_mmio`).
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        exit: Arc<ExitSignal>,
        mmio: MmioRanges,
        pmem: Vec<Arc<Nvdimm>>,
        switch: PowerSwitch,
    ) -> Self {
        Bus {
            serial,
            i8042: Mutex::new(power::i8042(exit.clone())),
            power: PowerDevice::new(exit),
            mmio,
            pmem,
            switch,
        }
    }

    /// A guest `in`. Ports nobody decodes read as all ones, like an empty ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match port {
            p if (layout::COM1_PORT..layout::COM1_PORT + 8).contains(&p) => {
                *first = lock(&self.serial).read((p - layout::COM1_PORT) as u8);
            }
            layout::I8042_DATA_PORT | layout::I8042_COMMAND_PORT => {
                *first = lock(&self.i8042).read((port - layout::I8042_DATA_PORT) as u8);
            }
            p => {
                if let Some(v) = self.power.read(p) {
                    *first = v;
                }
            }
        }
    }

    /// A guest `out`. Writes to ports nobody decodes are dropped.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match port {
            p if (layout::COM1_PORT..layout::COM1_PORT + 8).contains(&p) => {
                if let Err(e) = lock(&self.serial).write((p - layout::COM1_PORT) as u8, value) {
                    log::warn!("serial: {e:?}");
                }
            }
            layout::I8042_DATA_PORT | layout::I8042_COMMAND_PORT => {
                // The reset trigger cannot fail: it only records the exit reason.
                let _ = lock(&self.i8042).write((port - layout::I8042_DATA_PORT) as u8, value);
            }
            layout::TEST_CRASH_PORT => self.switch.cut(PowerCutCause::Guest),
            p => self.power.write(p, value),
        }
    }
}

impl Bus {
    /// A guest MMIO read outside every memslot. Unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }

    /// A guest MMIO write by vCPU `vcpu` outside every memslot, or into pmem KVM could not
    /// back. `Some` when it is a flush (or a store) that did not become durable: the vCPU must
    /// not complete it.
    pub fn mmio_write(&self, vcpu: nvdimm::VcpuId, addr: u64, data: &[u8]) -> Option<FlushFailure> {
        match self.mmio.write(vcpu, addr, data) {
            Some(outcome) => outcome.err(),
            None => {
                log::debug!("unclaimed MMIO write of {} bytes at {addr:#x}", data.len());
                None
            }
        }
    }

    /// Explains a failure of KVM to reach guest memory, if a truncated pmem backing file
    /// explains it.
    pub fn explain_memory_fault(&self) -> Option<String> {
        crate::pmem::check_lengths(&self.pmem)
    }
}

pub use nvdimm::lock::lock;
