//! Checks a [`PlatformDesc`] before any byte is built, so builders can trust their input.

use crate::{AcpiError, NvdimmDesc, PlatformDesc};

/// The DSDT names NVDIMM children `NV00`..`NVFF`.
pub(crate) const MAX_NVDIMMS: usize = 256;
/// A flush-hint structure's length is a u16; 256 hints is far below that and more than any
/// guest uses (Linux uses a power-of-two subset).
pub(crate) const MAX_FLUSH_HINTS: usize = 256;
/// SPA base and size granularity: Linux fsdax needs 2 MiB-aligned namespaces on x86.
pub(crate) const PMEM_ALIGN: u64 = 2 << 20;
/// Each hint is an 8-byte window the guest writes with one `writeq`.
pub(crate) const HINT_ALIGN: u64 = 8;
/// SLP_TYP is bits 2..=4 of the sleep control register.
const MAX_SLP_TYP: u8 = 7;

pub(crate) fn platform(desc: &PlatformDesc) -> Result<(), AcpiError> {
    if desc.cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    // The MADT override's source is an ISA IRQ byte; 0 and 1 already belong to PIT and i8042.
    if !(2..=15).contains(&desc.com1_gsi) {
        return Err(AcpiError::Com1Gsi(desc.com1_gsi));
    }
    if desc.power.s5_slp_typ > MAX_SLP_TYP {
        return Err(AcpiError::S5SlpTyp(desc.power.s5_slp_typ));
    }
    nvdimms(&desc.nvdimms)
}

fn nvdimms(nvdimms: &[NvdimmDesc]) -> Result<(), AcpiError> {
    if nvdimms.len() > MAX_NVDIMMS {
        return Err(AcpiError::TooManyNvdimms {
            count: nvdimms.len(),
            max: MAX_NVDIMMS,
        });
    }
    for (index, d) in nvdimms.iter().enumerate() {
        one_nvdimm(index, d)?;
        if let Some(first) = nvdimms[..index].iter().position(|p| p.handle == d.handle) {
            return Err(AcpiError::DuplicateHandle {
                first,
                second: index,
                handle: d.handle,
            });
        }
    }
    // Ranges are known not to overflow now.
    for (second, b) in nvdimms.iter().enumerate() {
        for (first, a) in nvdimms[..second].iter().enumerate() {
            let (a_end, b_end) = (a.spa_base + a.size, b.spa_base + b.size);
            if a.spa_base < b_end && b.spa_base < a_end {
                return Err(AcpiError::NvdimmOverlap {
                    first,
                    first_base: a.spa_base,
                    first_end: a_end,
                    second,
                    second_base: b.spa_base,
                    second_end: b_end,
                });
            }
        }
    }
    for (index, d) in nvdimms.iter().enumerate() {
        for &addr in &d.flush_hints {
            // Aligned hints end at most at u64::MAX, so `addr + 8` is computed in u128.
            let hint_end = u128::from(addr) + u128::from(HINT_ALIGN);
            let inside = nvdimms.iter().enumerate().find(|(_, p)| {
                u128::from(p.spa_base) < hint_end
                    && u128::from(addr) < u128::from(p.spa_base + p.size)
            });
            if let Some((other, p)) = inside {
                return Err(AcpiError::HintInPmem {
                    index,
                    handle: d.handle,
                    addr,
                    other,
                    base: p.spa_base,
                    end: p.spa_base + p.size,
                });
            }
        }
    }
    Ok(())
}

fn one_nvdimm(index: usize, d: &NvdimmDesc) -> Result<(), AcpiError> {
    let handle = d.handle;
    if handle == 0 {
        return Err(AcpiError::ZeroHandle { index });
    }
    if d.size == 0 || d.size % PMEM_ALIGN != 0 {
        return Err(AcpiError::NvdimmSize {
            index,
            handle,
            size: d.size,
        });
    }
    if d.spa_base % PMEM_ALIGN != 0 {
        return Err(AcpiError::NvdimmBase {
            index,
            handle,
            base: d.spa_base,
        });
    }
    if d.spa_base.checked_add(d.size).is_none() {
        return Err(AcpiError::NvdimmOverflow {
            index,
            handle,
            base: d.spa_base,
            size: d.size,
        });
    }
    let count = d.flush_hints.len();
    if count == 0 || count > MAX_FLUSH_HINTS {
        return Err(AcpiError::HintCount {
            index,
            handle,
            count,
            max: MAX_FLUSH_HINTS,
        });
    }
    if let Some(&addr) = d.flush_hints.iter().find(|&&a| a % HINT_ALIGN != 0) {
        return Err(AcpiError::HintAlign {
            index,
            handle,
            addr,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::desc_with_nvdimms;

    fn check(edit: impl FnOnce(&mut PlatformDesc)) -> Result<(), AcpiError> {
        let mut desc = desc_with_nvdimms(3);
        edit(&mut desc);
        platform(&desc)
    }

    #[test]
    fn the_test_platform_is_valid() {
        assert_eq!(check(|_| {}), Ok(()));
        assert_eq!(platform(&desc_with_nvdimms(0)), Ok(()));
        assert_eq!(platform(&desc_with_nvdimms(MAX_NVDIMMS)), Ok(()));
    }

    #[test]
    fn zero_cpus() {
        assert_eq!(check(|d| d.cpus = 0), Err(AcpiError::NoCpus));
    }

    #[test]
    fn com1_gsi_must_be_a_free_isa_irq() {
        for gsi in [0, 1, 16, 23, u32::MAX] {
            assert_eq!(check(|d| d.com1_gsi = gsi), Err(AcpiError::Com1Gsi(gsi)));
        }
        for gsi in [2, 3, 4, 15] {
            assert_eq!(check(|d| d.com1_gsi = gsi), Ok(()));
        }
    }

    #[test]
    fn slp_typ_fits_three_bits() {
        assert_eq!(check(|d| d.power.s5_slp_typ = 7), Ok(()));
        assert_eq!(
            check(|d| d.power.s5_slp_typ = 8),
            Err(AcpiError::S5SlpTyp(8))
        );
    }

    #[test]
    fn too_many_nvdimms() {
        let err = platform(&desc_with_nvdimms(MAX_NVDIMMS + 1)).unwrap_err();
        assert_eq!(
            err,
            AcpiError::TooManyNvdimms {
                count: 257,
                max: 256
            }
        );
        assert!(err.to_string().contains("257"), "{err}");
    }

    #[test]
    fn handles_nonzero_and_unique() {
        assert_eq!(
            check(|d| d.nvdimms[1].handle = 0),
            Err(AcpiError::ZeroHandle { index: 1 })
        );
        let h = desc_with_nvdimms(3).nvdimms[0].handle;
        assert_eq!(
            check(|d| d.nvdimms[2].handle = h),
            Err(AcpiError::DuplicateHandle {
                first: 0,
                second: 2,
                handle: h
            })
        );
    }

    #[test]
    fn size_and_base_are_2mib_granular() {
        for size in [0, 4096, (2 << 20) + 4096] {
            assert!(
                matches!(check(|d| d.nvdimms[0].size = size), Err(AcpiError::NvdimmSize { index: 0, size: s, .. }) if s == size),
                "size {size:#x}"
            );
        }
        assert!(matches!(
            check(|d| d.nvdimms[0].spa_base += 4096),
            Err(AcpiError::NvdimmBase { index: 0, .. })
        ));
        let err = check(|d| d.nvdimms[0].size = 12345).unwrap_err();
        assert!(err.to_string().contains("0x3039"), "{err}");
        assert!(err.to_string().contains("2 MiB"), "{err}");
    }

    #[test]
    fn range_must_not_overflow_or_overlap() {
        assert!(matches!(
            check(|d| {
                d.nvdimms[0].spa_base = !(PMEM_ALIGN - 1); // the highest aligned base
                d.nvdimms[0].size = 2 * PMEM_ALIGN;
            }),
            Err(AcpiError::NvdimmOverflow { index: 0, .. })
        ));
        assert!(matches!(
            check(
                |d| d.nvdimms[2].spa_base = d.nvdimms[1].spa_base + d.nvdimms[1].size - PMEM_ALIGN
            ),
            Err(AcpiError::NvdimmOverlap {
                first: 1,
                second: 2,
                ..
            })
        ));
        // Touching ranges are fine.
        assert_eq!(
            check(|d| d.nvdimms[2].spa_base = d.nvdimms[1].spa_base + d.nvdimms[1].size),
            Ok(())
        );
    }

    #[test]
    fn hint_count_between_1_and_256() {
        assert!(matches!(
            check(|d| d.nvdimms[1].flush_hints.clear()),
            Err(AcpiError::HintCount {
                index: 1,
                count: 0,
                ..
            })
        ));
        assert!(matches!(
            check(|d| {
                let h = d.nvdimms[1].flush_hints[0];
                d.nvdimms[1].flush_hints = (0..257).map(|i| h + 8 * (i % 512)).collect();
            }),
            Err(AcpiError::HintCount {
                index: 1,
                count: 257,
                max: 256,
                ..
            })
        ));
        assert_eq!(
            check(|d| {
                let h = d.nvdimms[1].flush_hints[0] & !0xfff;
                d.nvdimms[1].flush_hints = (0..256).map(|i| h + 8 * i).collect();
            }),
            Ok(())
        );
    }

    #[test]
    fn hints_8_byte_aligned_and_outside_pmem() {
        assert!(matches!(
            check(|d| d.nvdimms[2].flush_hints[0] += 4),
            Err(AcpiError::HintAlign { index: 2, .. })
        ));
        let err = check(|d| {
            let inside = d.nvdimms[1].spa_base + 0x1000;
            d.nvdimms[0].flush_hints.push(inside);
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                AcpiError::HintInPmem {
                    index: 0,
                    other: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        // Last 8 bytes of a range are inside; the first 8 after it are not.
        assert!(check(
            |d| d.nvdimms[0].flush_hints[0] = d.nvdimms[0].spa_base + d.nvdimms[0].size - 8
        )
        .is_err());
        assert_eq!(
            check(|d| d.nvdimms[0].flush_hints[0] = d.nvdimms[2].spa_base + d.nvdimms[2].size),
            Ok(())
        );
    }
}
