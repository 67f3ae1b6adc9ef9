use proptest::prelude::*;

use super::*;
use crate::test_util::{desc_with_nvdimms, fix_checksum, LAYOUT};
use crate::PlatformDesc;

fn nfit_of(desc: &PlatformDesc) -> Vec<u8> {
    crate::build(desc, LAYOUT.rsdp, LAYOUT.start, LAYOUT.end)
        .expect("test platform builds")
        .get(*b"NFIT")
        .expect("has an NFIT")
        .bytes
        .clone()
}

fn nfit(n: usize) -> Vec<u8> {
    nfit_of(&desc_with_nvdimms(n))
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Fixes the header length and checksum after an edit, so only the intended check can fail.
fn reseal(b: &mut [u8]) {
    let len = b.len() as u32;
    put_u32(b, 4, len);
    fix_checksum(b);
}

/// Builds an NFIT for `n` NVDIMMs, lets `edit` corrupt it (given the parsed layout), reseals
/// it and returns the checker's verdict.
fn corrupt(n: usize, edit: impl FnOnce(&mut Vec<u8>, &ParsedNfit)) -> NfitCheckError {
    let mut b = nfit(n);
    let parsed = check(&b).expect("builder output is valid");
    edit(&mut b, &parsed);
    reseal(&mut b);
    check(&b).expect_err("corruption must be caught")
}

#[test]
fn builder_output_passes_for_1_2_and_8_devices() {
    for n in [1, 2, 8] {
        let desc = desc_with_nvdimms(n);
        let p = check(&nfit_of(&desc)).unwrap_or_else(|e| panic!("{n} devices: {e}"));
        assert_eq!(p.revision, 1);
        assert_eq!(p.order, [0, 1, 4, 6].repeat(n));
        assert_eq!(p.capabilities, None, "no platform capabilities for now");
        for (i, d) in desc.nvdimms.iter().enumerate() {
            let (spa, m, dcr, f) = (&p.spas[i], &p.memdevs[i], &p.dcrs[i], &p.flushes[i]);
            assert_eq!((spa.base, spa.length), (d.spa_base, d.size));
            assert_eq!(spa.range_index as usize, 2 * i + 1);
            assert_eq!(spa.attributes, 0x8008);
            assert_eq!(m.device_handle, d.handle);
            assert_eq!(m.range_index, spa.range_index);
            assert_eq!(m.region_index, dcr.region_index);
            assert_eq!(dcr.region_index as usize, 2 * i + 2);
            assert_eq!(m.region_size, d.size);
            assert_eq!(m.interleave_ways, 1);
            assert!(!m.not_armed());
            assert_eq!(
                (dcr.vendor_id, dcr.device_id, dcr.revision_id),
                (0x8086, 1, 1)
            );
            assert_eq!(dcr.serial_number, d.serial_number);
            assert_eq!((dcr.format_code, dcr.windows), (0x0301, 0));
            assert_eq!(f.device_handle, d.handle);
            assert_eq!(f.hints, d.flush_hints);
        }
    }
}

#[test]
fn readonly_device_is_not_armed() {
    let mut desc = desc_with_nvdimms(2);
    desc.nvdimms[1].readonly = true;
    let p = check(&nfit_of(&desc)).unwrap();
    assert!(!p.memdevs[0].not_armed());
    assert!(p.memdevs[1].not_armed());
}

#[test]
fn many_hints_pass() {
    let mut desc = desc_with_nvdimms(1);
    desc.nvdimms[0].flush_hints = (0..256).map(|i| 0xD000_0000 + 8 * i).collect();
    let p = check(&nfit_of(&desc)).unwrap();
    assert_eq!(p.flushes[0].hints.len(), 256);
}

#[test]
fn header_checks() {
    let b = nfit(1);
    assert_eq!(check(&b[..39]), Err(NfitCheckError::ShortHeader(39)));
    assert_eq!(check(&[]), Err(NfitCheckError::ShortHeader(0)));

    let mut sig = b.clone();
    sig[0] = b'X';
    fix_checksum(&mut sig);
    assert_eq!(check(&sig), Err(NfitCheckError::Signature(*b"XFIT")));

    let short = &b[..b.len() - 1];
    assert!(matches!(
        check(short),
        Err(NfitCheckError::LengthMismatch { .. })
    ));
    let mut long = b.clone();
    long.push(0);
    assert!(matches!(
        check(&long),
        Err(NfitCheckError::LengthMismatch { .. })
    ));

    let mut sum = b.clone();
    sum[60] ^= 0x10;
    assert!(matches!(check(&sum), Err(NfitCheckError::Checksum(_))));
}

#[test]
fn walk_checks() {
    let e = corrupt(1, |b, _| b.extend_from_slice(&[6, 0]));
    assert!(
        matches!(e, NfitCheckError::TruncatedSubHeader { remaining: 2, .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u16(b, p.spas[0].offset + 2, 0));
    assert!(
        matches!(
            e,
            NfitCheckError::SubLengthTooSmall {
                length: 0,
                ty: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| {
        let f = p.flushes[0].offset;
        let too_long = (b.len() - f + 8) as u16;
        put_u16(b, f + 2, too_long);
    });
    assert!(
        matches!(e, NfitCheckError::SubOverrunsTable { ty: 6, .. }),
        "{e:?}"
    );
}

#[test]
fn unknown_types_are_skipped_like_linux() {
    let mut b = nfit(1);
    b.extend_from_slice(&[3, 0, 8, 0, 0, 0, 0, 0]); // an SMBIOS structure
    reseal(&mut b);
    let p = check(&b).unwrap();
    assert_eq!(p.order, [0, 1, 4, 6, 3]);
}

#[test]
fn spa_length_must_be_56_or_64_with_cookie() {
    let e = corrupt(1, |b, p| put_u16(b, p.spas[0].offset + 2, 64));
    assert!(
        matches!(
            e,
            NfitCheckError::BadLength {
                what: "SPA range",
                length: 64,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u16(b, p.spas[0].offset + 6, 1 << 2));
    assert!(
        matches!(
            e,
            NfitCheckError::BadLength {
                what: "SPA range",
                length: 56,
                ..
            }
        ),
        "{e:?}"
    );
    // A 64-byte SPA with the cookie flag is accepted.
    let mut b = nfit(1);
    let s = check(&b).unwrap().spas[0].offset;
    b.splice(s + 56..s + 56, [0u8; 8]);
    put_u16(&mut b, s + 2, 64);
    put_u16(&mut b, s + 6, 1 << 2);
    reseal(&mut b);
    assert_eq!(check(&b).unwrap().spas[0].flags, 1 << 2);
}

#[test]
fn memdev_length_must_be_48() {
    let e = corrupt(1, |b, p| put_u16(b, p.memdevs[0].offset + 2, 40));
    assert!(
        matches!(
            e,
            NfitCheckError::BadLength {
                what: "region mapping",
                length: 40,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn dcr_length_must_be_80_or_short_form() {
    let e = corrupt(1, |b, p| put_u16(b, p.dcrs[0].offset + 2, 72));
    assert!(
        matches!(
            e,
            NfitCheckError::BadLength {
                what: "control region",
                length: 72,
                ..
            }
        ),
        "{e:?}"
    );
    // The 32-byte short form is accepted without block windows ...
    let mut b = nfit(1);
    let d = check(&b).unwrap().dcrs[0].offset;
    b.drain(d + 32..d + 80);
    put_u16(&mut b, d + 2, 32);
    reseal(&mut b);
    let p = check(&b).unwrap();
    assert_eq!(
        p.dcrs[0].serial_number,
        desc_with_nvdimms(1).nvdimms[0].serial_number
    );
    // ... but not with them.
    put_u16(&mut b, d + 30, 1);
    reseal(&mut b);
    assert!(matches!(
        check(&b),
        Err(NfitCheckError::BadLength {
            what: "control region",
            length: 32,
            ..
        })
    ));
}

#[test]
fn flush_length_must_be_16_plus_8n() {
    let e = corrupt(1, |b, p| put_u16(b, p.flushes[0].offset + 2, 12));
    assert!(
        matches!(
            e,
            NfitCheckError::BadLength {
                what: "flush hint structure",
                length: 12,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u16(b, p.flushes[0].offset + 8, 2));
    assert!(
        matches!(
            e,
            NfitCheckError::BadLength {
                what: "flush hint structure",
                length: 24,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u16(b, p.flushes[0].offset + 8, 0));
    assert!(matches!(e, NfitCheckError::FlushNoHints { .. }), "{e:?}");
}

#[test]
fn spa_checks() {
    let e = corrupt(1, |b, p| put_u16(b, p.spas[0].offset + 4, 0));
    assert!(matches!(e, NfitCheckError::SpaZeroIndex { .. }), "{e:?}");
    let e = corrupt(2, |b, p| put_u16(b, p.spas[1].offset + 4, 1));
    assert!(
        matches!(e, NfitCheckError::SpaDuplicateIndex { index: 1, .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| b[p.spas[0].offset + 16] ^= 1);
    assert!(matches!(e, NfitCheckError::SpaNotPmem { .. }), "{e:?}");
    let e = corrupt(1, |b, p| put_u64(b, p.spas[0].offset + 40, 0));
    assert!(matches!(e, NfitCheckError::SpaEmpty { .. }), "{e:?}");
    let e = corrupt(1, |b, p| {
        put_u64(b, p.spas[0].offset + 32, p.spas[0].base + 4096)
    });
    assert!(matches!(e, NfitCheckError::SpaMisaligned { .. }), "{e:?}");
    let e = corrupt(1, |b, p| {
        put_u64(b, p.spas[0].offset + 40, p.spas[0].length + 4096)
    });
    assert!(matches!(e, NfitCheckError::SpaMisaligned { .. }), "{e:?}");
    let e = corrupt(1, |b, p| {
        put_u64(b, p.spas[0].offset + 32, 0xFFFF_FFFF_FFE0_0000)
    });
    assert!(matches!(e, NfitCheckError::SpaOverflow { .. }), "{e:?}");
    let e = corrupt(2, |b, p| {
        put_u64(b, p.spas[1].offset + 32, p.spas[0].base + (2 << 20))
    });
    assert!(matches!(e, NfitCheckError::SpaOverlap { .. }), "{e:?}");
}

#[test]
fn dcr_index_checks() {
    let e = corrupt(1, |b, p| put_u16(b, p.dcrs[0].offset + 4, 0));
    assert!(matches!(e, NfitCheckError::DcrZeroIndex { .. }), "{e:?}");
    let e = corrupt(2, |b, p| put_u16(b, p.dcrs[1].offset + 4, 2));
    assert!(
        matches!(e, NfitCheckError::DcrDuplicateIndex { index: 2, .. }),
        "{e:?}"
    );
}

#[test]
fn memdev_links_and_alignment() {
    let e = corrupt(1, |b, p| put_u16(b, p.memdevs[0].offset + 12, 99));
    assert!(
        matches!(
            e,
            NfitCheckError::MemdevNoSpa {
                range_index: 99,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u16(b, p.memdevs[0].offset + 12, 0));
    assert!(
        matches!(e, NfitCheckError::MemdevNoSpa { range_index: 0, .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u16(b, p.memdevs[0].offset + 14, 0));
    assert!(matches!(e, NfitCheckError::MemdevZeroDcr { .. }), "{e:?}");
    let e = corrupt(1, |b, p| put_u16(b, p.memdevs[0].offset + 14, 99));
    assert!(
        matches!(
            e,
            NfitCheckError::MemdevNoDcr {
                region_index: 99,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u64(b, p.memdevs[0].offset + 16, 4095));
    assert!(
        matches!(e, NfitCheckError::MemdevMisaligned { .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u64(b, p.memdevs[0].offset + 16, 0));
    assert!(
        matches!(e, NfitCheckError::MemdevMisaligned { .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u64(b, p.memdevs[0].offset + 32, 512));
    assert!(
        matches!(e, NfitCheckError::MemdevMisaligned { .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u64(b, p.memdevs[0].offset + 24, 4096));
    assert!(matches!(e, NfitCheckError::MemdevBeyondSpa { .. }), "{e:?}");
}

#[test]
fn flush_links_and_hint_placement() {
    let e = corrupt(1, |b, p| put_u32(b, p.flushes[0].offset + 4, 0x999));
    assert!(
        matches!(e, NfitCheckError::FlushNoMemdev { handle: 0x999, .. }),
        "{e:?}"
    );
    let e = corrupt(2, |b, p| {
        put_u32(b, p.flushes[1].offset + 4, p.flushes[0].device_handle)
    });
    assert!(
        matches!(e, NfitCheckError::FlushDuplicateHandle { .. }),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u64(b, p.flushes[0].offset + 16, 0xD000_0FFC));
    assert!(
        matches!(
            e,
            NfitCheckError::HintCrossesPage {
                addr: 0xD000_0FFC,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| put_u64(b, p.flushes[0].offset + 16, 0xD000_0004));
    assert!(
        matches!(
            e,
            NfitCheckError::HintMisaligned {
                addr: 0xD000_0004,
                ..
            }
        ),
        "{e:?}"
    );
    let e = corrupt(2, |b, p| {
        put_u64(b, p.flushes[0].offset + 16, p.spas[1].base + 8)
    });
    assert!(
        matches!(e, NfitCheckError::HintInSpa { spa, .. } if spa == p_spa_offset(2, 1)),
        "{e:?}"
    );
    let e = corrupt(1, |b, p| {
        put_u64(
            b,
            p.flushes[0].offset + 16,
            p.spas[0].base + p.spas[0].length - 8,
        )
    });
    assert!(matches!(e, NfitCheckError::HintInSpa { .. }), "{e:?}");
    // The hint right after the range is outside it.
    let mut b = nfit(1);
    let p = check(&b).unwrap();
    put_u64(
        &mut b,
        p.flushes[0].offset + 16,
        p.spas[0].base + p.spas[0].length,
    );
    reseal(&mut b);
    assert!(check(&b).is_ok());
}

fn p_spa_offset(n: usize, i: usize) -> usize {
    check(&nfit(n)).unwrap().spas[i].offset
}

#[test]
fn platform_capabilities_are_masked_and_bounded() {
    use crate::nfit::{build, PersistenceDomain};
    let desc = desc_with_nvdimms(1);
    let mut b = build(&desc.nvdimms, PersistenceDomain::MemoryController);
    let p = check(&b).unwrap();
    assert_eq!(p.order, [0, 1, 4, 6, 7]);
    assert_eq!(
        p.capabilities,
        Some(Capabilities {
            highest_valid: 1,
            capabilities: 0b10
        })
    );
    let caps = b.len() - 16;
    b[caps + 4] = 0; // highest valid bit 0 hides the memory-controller bit
    reseal(&mut b);
    assert_eq!(check(&b).unwrap().capabilities.unwrap().capabilities, 0);
    b[caps + 4] = 31;
    reseal(&mut b);
    assert!(matches!(
        check(&b),
        Err(NfitCheckError::CapabilitiesHighest { highest: 31, .. })
    ));
    put_u16(&mut b, caps + 2, 12);
    b.truncate(b.len() - 4);
    reseal(&mut b);
    assert!(matches!(
        check(&b),
        Err(NfitCheckError::BadLength {
            what: "platform capabilities",
            ..
        })
    ));
}

#[test]
fn errors_name_the_offset_and_value() {
    let e = corrupt(1, |b, p| put_u64(b, p.flushes[0].offset + 16, 0xD000_0004));
    let text = e.to_string();
    assert!(text.contains("0xd0000004"), "{text}");
    assert!(text.contains("8-byte"), "{text}");
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = check(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..400)
    ) {
        let mut b = nfit(1)[..40].to_vec();
        b.extend_from_slice(&body);
        reseal(&mut b);
        let _ = check(&b);
    }

    #[test]
    fn mutated_builder_output_never_panics(
        n in 1usize..4,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)
    ) {
        let mut b = nfit(n);
        for (pos, val) in edits {
            let at = 40 + pos % (b.len() - 40);
            b[at] = val;
        }
        reseal(&mut b);
        let _ = check(&b);
    }
}
