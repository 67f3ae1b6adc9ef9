//! Ways a guest stops the machine: the i8042 reset line and the HW-reduced ACPI power device.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::exit::{ExitReason, ExitSignal};
use crate::layout;

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The i8042's CPU-reset line: a guest reboot ends pmvm.
pub struct ResetLine(Arc<ExitSignal>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reboot);
        Ok(())
    }
}

pub type I8042 = I8042Device<ResetLine>;

pub fn i8042(exit: Arc<ExitSignal>) -> I8042 {
    I8042Device::new(ResetLine(exit))
}

/// The FADT's sleep control, sleep status and reset registers, each one I/O port.
pub struct PowerDevice {
    exit: Arc<ExitSignal>,
}

impl PowerDevice {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        PowerDevice { exit }
    }

    /// Returns the value of a port this device owns, or None.
    pub fn read(&self, port: u16) -> Option<u8> {
        match port {
            layout::ACPI_SLEEP_CONTROL_PORT | layout::ACPI_SLEEP_STATUS_PORT => Some(0),
            layout::ACPI_RESET_PORT => Some(0),
            _ => None,
        }
    }

    pub fn write(&self, port: u16, value: u8) {
        match port {
            layout::ACPI_SLEEP_CONTROL_PORT if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == layout::ACPI_S5_SLP_TYP {
                    self.exit.request(ExitReason::PowerOff);
                } else {
                    log::warn!("guest asked for sleep type {slp_typ}, which pmvm does not support");
                }
            }
            layout::ACPI_RESET_PORT if value == layout::ACPI_RESET_VALUE => {
                self.exit.request(ExitReason::Reboot)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_reboots() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = PowerDevice::new(exit.clone());
        dev.write(
            layout::ACPI_SLEEP_CONTROL_PORT,
            layout::ACPI_S5_SLP_TYP << 2,
        );
        assert_eq!(exit.reason(), None, "SLP_EN clear does nothing");
        dev.write(layout::ACPI_SLEEP_CONTROL_PORT, 3 << 2 | SLP_EN);
        assert_eq!(exit.reason(), None, "S3 is not supported");
        dev.write(
            layout::ACPI_SLEEP_CONTROL_PORT,
            layout::ACPI_S5_SLP_TYP << 2 | SLP_EN,
        );
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        PowerDevice::new(exit.clone()).write(layout::ACPI_RESET_PORT, layout::ACPI_RESET_VALUE);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn i8042_reset_reboots() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut kbd = i8042(exit.clone());
        kbd.write(4, 0xfe).unwrap();
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}
