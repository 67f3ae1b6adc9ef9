//! The independent NFIT checker the tests use to re-read pmvm's NFIT as Linux's nfit driver
//! would: any bytes are an NFIT or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = acpi::nfit_check::check(data) {
        assert!(data.len() >= 40, "a parsed NFIT has a whole header");
        let _ = format!("{parsed:?}");
    }
});
