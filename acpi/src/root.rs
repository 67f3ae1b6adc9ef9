//! The RSDP and the XSDT: how the guest finds every other table.

use acpi_tables::{rsdp::Rsdp, xsdt::XSDT, Aml};

use crate::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// A revision-2 RSDP is 36 bytes.
pub(crate) const RSDP_LEN: u64 = 36;

/// The RSDP (revision 2, both checksums) pointing at the XSDT; its 32-bit RSDT pointer is 0.
pub(crate) fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(RSDP_LEN as usize);
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut bytes);
    bytes
}

/// The XSDT listing `tables` (their addresses), in order.
pub(crate) fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &addr in tables {
        xsdt.add_entry(addr);
    }
    let mut bytes = Vec::new();
    xsdt.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{le_u32, le_u64, sum};

    #[test]
    fn rsdp_golden_fields() {
        let r = rsdp(0x1234_5678_9abc_def0);
        assert_eq!(r.len() as u64, RSDP_LEN);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(&r[9..15], b"PMVM  ");
        assert_eq!(r[15], 2, "revision");
        assert_eq!(le_u32(&r, 16), 0, "no RSDT");
        assert_eq!(le_u32(&r, 20), 36, "length");
        assert_eq!(le_u64(&r, 24), 0x1234_5678_9abc_def0, "XSDT address");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
    }

    #[test]
    fn xsdt_lists_entries_in_order() {
        let x = xsdt(&[0xE1000, 0x1_0000_0000, 8]);
        assert_eq!(&x[..4], b"XSDT");
        assert_eq!(le_u32(&x, 4), 36 + 24);
        assert_eq!(x[8], 1, "revision");
        assert_eq!(le_u64(&x, 36), 0xE1000);
        assert_eq!(le_u64(&x, 44), 0x1_0000_0000);
        assert_eq!(le_u64(&x, 52), 8);
        assert_eq!(sum(&x), 0);
    }
}
