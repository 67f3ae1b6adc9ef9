//! Where each table goes: upward from the area's start, 8-byte aligned, never past its end.

use crate::{AcpiError, Table};

/// Every table starts on this boundary, so 64-bit fields in it are naturally aligned.
pub(crate) const TABLE_ALIGN: u64 = 8;
/// The ACPI RSDP scan looks at 16-byte boundaries only.
const RSDP_ALIGN: u64 = 16;

/// The table area `[next, end)` still free, after checking it against the RSDP.
#[derive(Debug)]
pub(crate) struct Area {
    next: u64,
    end: u64,
}

impl Area {
    /// Checks that the RSDP (`rsdp_len` bytes at `rsdp_addr`) is aligned and outside the
    /// non-empty table area `[start, end)`.
    pub(crate) fn new(
        rsdp_addr: u64,
        rsdp_len: u64,
        start: u64,
        end: u64,
    ) -> Result<Self, AcpiError> {
        if rsdp_addr % RSDP_ALIGN != 0 {
            return Err(AcpiError::RsdpAlign(rsdp_addr));
        }
        let rsdp_end = rsdp_addr
            .checked_add(rsdp_len)
            .ok_or(AcpiError::RsdpOverflow(rsdp_addr))?;
        if start >= end {
            return Err(AcpiError::EmptyArea { start, end });
        }
        if rsdp_addr < end && start < rsdp_end {
            return Err(AcpiError::RsdpOverlap {
                rsdp: rsdp_addr,
                rsdp_end,
                start,
                end,
            });
        }
        Ok(Area { next: start, end })
    }

    /// Places `bytes` at the next aligned address, or fails if they would end past the area.
    pub(crate) fn place(&mut self, signature: [u8; 4], bytes: Vec<u8>) -> Result<Table, AcpiError> {
        let addr = align_up(self.next, TABLE_ALIGN);
        let table_end = addr.and_then(|a| a.checked_add(bytes.len() as u64));
        match (addr, table_end) {
            (Some(addr), Some(table_end)) if table_end <= self.end => {
                self.next = table_end;
                Ok(Table {
                    signature,
                    addr,
                    bytes,
                })
            }
            _ => Err(AcpiError::TablesDoNotFit {
                table: String::from_utf8_lossy(&signature).into_owned(),
                addr: addr.unwrap_or(self.next),
                len: bytes.len(),
                end: self.end,
            }),
        }
    }
}

/// `value` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_upward_aligned_and_stops_at_end() {
        let mut area = Area::new(0x0, 36, 0x41, 0x70).unwrap();
        let a = area.place(*b"AAAA", vec![0; 5]).unwrap();
        assert_eq!((a.addr, a.bytes.len()), (0x48, 5));
        let b = area.place(*b"BBBB", vec![0; 8]).unwrap();
        assert_eq!(b.addr, 0x50);
        let c = area.place(*b"CCCC", vec![0; 0x18]).unwrap();
        assert_eq!(c.addr, 0x58, "ends exactly at the end");
        let err = area.place(*b"DDDD", vec![0; 1]).unwrap_err();
        assert_eq!(
            err,
            AcpiError::TablesDoNotFit {
                table: "DDDD".into(),
                addr: 0x70,
                len: 1,
                end: 0x70
            }
        );
    }

    #[test]
    fn rsdp_must_be_aligned_and_outside_the_area() {
        assert_eq!(
            Area::new(0xE0008, 36, 0xE0040, 0x100000).unwrap_err(),
            AcpiError::RsdpAlign(0xE0008)
        );
        assert!(matches!(
            Area::new(0xE0020, 36, 0xE0040, 0x100000),
            Err(AcpiError::RsdpOverlap { .. })
        ));
        assert!(matches!(
            Area::new(0xF0000, 36, 0xE0040, 0x100000),
            Err(AcpiError::RsdpOverlap { .. })
        ));
        assert!(
            Area::new(0x100000, 36, 0xE0040, 0x100000).is_ok(),
            "just above"
        );
        assert!(
            Area::new(0xE0000, 36, 0xE0024, 0x100000).is_ok(),
            "just below"
        );
        assert_eq!(
            Area::new(u64::MAX - 15, 36, 0, 16).unwrap_err(),
            AcpiError::RsdpOverflow(u64::MAX - 15)
        );
    }

    #[test]
    fn empty_or_reversed_area_is_an_error() {
        assert!(matches!(
            Area::new(0, 36, 0x1000, 0x1000),
            Err(AcpiError::EmptyArea { .. })
        ));
        assert!(matches!(
            Area::new(0, 36, 0x2000, 0x1000),
            Err(AcpiError::EmptyArea { .. })
        ));
    }

    #[test]
    fn placing_near_the_top_of_the_address_space_does_not_overflow() {
        let mut area = Area::new(0, 36, u64::MAX - 3, u64::MAX).unwrap();
        assert!(matches!(
            area.place(*b"XSDT", vec![0; 1]),
            Err(AcpiError::TablesDoNotFit { .. })
        ));
    }
}
