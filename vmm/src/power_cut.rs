//! The machine's power switch: the one place a power cut is made, whoever asks for it (the
//! guest's crash port, the API, a device's crash request).

use std::sync::Arc;

use nvdimm::Nvdimm;

use crate::exit::{ExitReason, ExitSignal, PowerCutCause};

/// Cuts the power of every NVDIMM of the machine and stops the VM.
#[derive(Clone)]
pub struct PowerSwitch {
    exit: Arc<ExitSignal>,
    pmem: Vec<Arc<Nvdimm>>,
}

impl PowerSwitch {
    pub fn new(exit: Arc<ExitSignal>, pmem: Vec<Arc<Nvdimm>>) -> PowerSwitch {
        PowerSwitch { exit, pmem }
    }

    /// The stop comes first, so a vCPU whose flush the cut ends never re-enters the guest;
    /// then the devices, so when this returns no writeback runs or will start. What the guest
    /// did not flush is lost (for `persist=flush` devices; see docs/persistence.md). Cutting
    /// again is harmless: the first cause stays the VM's exit reason.
    pub fn cut(&self, cause: PowerCutCause) {
        self.exit.request(ExitReason::PowerCut(cause));
        for d in &self.pmem {
            d.power_cut();
        }
    }
}
