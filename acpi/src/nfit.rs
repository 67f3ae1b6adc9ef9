//! The NFIT: per NVDIMM an SPA range, a region mapping, a control region and flush hints.
//!
//! acpi_tables has no NFIT type, so the table is an `Sdt` (36-byte header plus 4 reserved
//! bytes) with these packed sub-structures appended. Field names follow the ACPI spec.

use acpi_tables::sdt::Sdt;
use zerocopy::{
    byteorder::{LE, U16, U32, U64},
    Immutable, IntoBytes,
};

use crate::{NvdimmDesc, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

const NFIT_REVISION: u8 = 1;
/// SDT header plus 4 reserved bytes.
const NFIT_HEADER_LEN: u32 = 40;

const TYPE_SPA_RANGE: u16 = 0;
const TYPE_REGION_MAPPING: u16 = 1;
const TYPE_CONTROL_REGION: u16 = 4;
const TYPE_FLUSH_HINT: u16 = 6;
const TYPE_PLATFORM_CAPABILITIES: u16 = 7;

/// Persistent-memory range type GUID 66F0D379-B4F3-4074-AC43-0D3318B78CDB, in EFI byte order.
pub(crate) const PMEM_GUID: [u8; 16] = [
    0x79, 0xD3, 0xF0, 0x66, 0xF3, 0xB4, 0x74, 0x40, 0xAC, 0x43, 0x0D, 0x33, 0x18, 0xB7, 0x8C, 0xDB,
];
/// EFI_MEMORY_WB | EFI_MEMORY_NV.
const EFI_MEMORY_WB_NV: u64 = 0x8008;
/// Region mapping flags bit 3: the device will not persist writes, so Linux makes it read-only.
const NOT_ARMED: u16 = 1 << 3;
const DCR_VENDOR_ID: u16 = 0x8086;
const DCR_DEVICE_ID: u16 = 1;
const DCR_REVISION_ID: u16 = 1;
/// Byte-addressable persistent memory, not energy backed (JEDEC format interface code).
const DCR_FORMAT_CODE: u16 = 0x0301;
/// Platform capabilities bit 1: the memory controller's buffers are flushed on power loss.
const CAP_MEMORY_CONTROLLER_FLUSH: u32 = 1 << 1;

pub(crate) use crate::PersistenceDomain;

/// Type 0: System Physical Address Range.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct SpaRange {
    r#type: U16<LE>,
    length: U16<LE>,
    range_index: U16<LE>,
    flags: U16<LE>,
    reserved: U32<LE>,
    proximity_domain: U32<LE>,
    range_type_guid: [u8; 16],
    base: U64<LE>,
    size: U64<LE>,
    memory_mapping_attributes: U64<LE>,
}
const _: () = assert!(size_of::<SpaRange>() == 56);

/// Type 1: NVDIMM Region Mapping ("memdev").
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct RegionMapping {
    r#type: U16<LE>,
    length: U16<LE>,
    device_handle: U32<LE>,
    physical_id: U16<LE>,
    region_id: U16<LE>,
    range_index: U16<LE>,
    control_region_index: U16<LE>,
    region_size: U64<LE>,
    region_offset: U64<LE>,
    dimm_physical_address: U64<LE>,
    interleave_index: U16<LE>,
    interleave_ways: U16<LE>,
    flags: U16<LE>,
    reserved: U16<LE>,
}
const _: () = assert!(size_of::<RegionMapping>() == 48);

/// Type 4: NVDIMM Control Region, full form with no block-control windows.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct ControlRegion {
    r#type: U16<LE>,
    length: U16<LE>,
    control_region_index: U16<LE>,
    vendor_id: U16<LE>,
    device_id: U16<LE>,
    revision_id: U16<LE>,
    subsystem_vendor_id: U16<LE>,
    subsystem_device_id: U16<LE>,
    subsystem_revision_id: U16<LE>,
    valid_fields: u8,
    manufacturing_location: u8,
    manufacturing_date: U16<LE>,
    reserved0: U16<LE>,
    serial_number: U32<LE>,
    format_interface_code: U16<LE>,
    block_control_windows: U16<LE>,
    window_size: U64<LE>,
    command_offset: U64<LE>,
    command_size: U64<LE>,
    status_offset: U64<LE>,
    status_size: U64<LE>,
    flags: U16<LE>,
    reserved1: [u8; 6],
}
const _: () = assert!(size_of::<ControlRegion>() == 80);

/// Type 6: Flush Hint Address, fixed part; `hint_count` u64 addresses follow.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct FlushHintHeader {
    r#type: U16<LE>,
    length: U16<LE>,
    device_handle: U32<LE>,
    hint_count: U16<LE>,
    reserved: [u8; 6],
}
const _: () = assert!(size_of::<FlushHintHeader>() == 16);

/// Type 7: Platform Capabilities.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct PlatformCapabilities {
    r#type: U16<LE>,
    length: U16<LE>,
    highest_valid_capability: u8,
    reserved0: [u8; 3],
    capabilities: U32<LE>,
    reserved1: U32<LE>,
}
const _: () = assert!(size_of::<PlatformCapabilities>() == 16);

/// NFIT indices start at 1 (0 means "none"); NVDIMM `i` has SPA range `2i+1` and control
/// region `2i+2`. Validation caps NVDIMMs at 256, so both fit a u16.
fn range_index(i: usize) -> u16 {
    (2 * i + 1) as u16
}

fn control_region_index(i: usize) -> u16 {
    (2 * i + 2) as u16
}

fn size_u16<T>() -> U16<LE> {
    (size_of::<T>() as u16).into()
}

/// The NFIT for `nvdimms`, which validation has already checked.
pub(crate) fn build(nvdimms: &[NvdimmDesc], persistence: PersistenceDomain) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, d) in nvdimms.iter().enumerate() {
        append_nvdimm(&mut body, i, d);
    }
    if persistence == PersistenceDomain::MemoryController {
        let caps = PlatformCapabilities {
            r#type: TYPE_PLATFORM_CAPABILITIES.into(),
            length: size_u16::<PlatformCapabilities>(),
            highest_valid_capability: 1,
            reserved0: [0; 3],
            capabilities: CAP_MEMORY_CONTROLLER_FLUSH.into(),
            reserved1: 0.into(),
        };
        body.extend_from_slice(caps.as_bytes());
    }
    let mut nfit = Sdt::new(
        *b"NFIT",
        NFIT_HEADER_LEN,
        NFIT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    nfit.append_slice(&body);
    nfit.as_slice().to_vec()
}

/// SPA range, region mapping, control region and flush hints of NVDIMM `i`.
fn append_nvdimm(out: &mut Vec<u8>, i: usize, d: &NvdimmDesc) {
    let spa = SpaRange {
        r#type: TYPE_SPA_RANGE.into(),
        length: size_u16::<SpaRange>(),
        range_index: range_index(i).into(),
        // No proximity domain (there is no SRAT) and no location cookie.
        flags: 0.into(),
        reserved: 0.into(),
        proximity_domain: 0.into(),
        range_type_guid: PMEM_GUID,
        base: d.spa_base.into(),
        size: d.size.into(),
        memory_mapping_attributes: EFI_MEMORY_WB_NV.into(),
    };
    let mapping = RegionMapping {
        r#type: TYPE_REGION_MAPPING.into(),
        length: size_u16::<RegionMapping>(),
        device_handle: d.handle.into(),
        physical_id: 0.into(),
        region_id: 0.into(),
        range_index: range_index(i).into(),
        control_region_index: control_region_index(i).into(),
        region_size: d.size.into(),
        region_offset: 0.into(),
        dimm_physical_address: 0.into(),
        interleave_index: 0.into(),
        interleave_ways: 1.into(),
        flags: (if d.readonly { NOT_ARMED } else { 0 }).into(),
        reserved: 0.into(),
    };
    let control = ControlRegion {
        r#type: TYPE_CONTROL_REGION.into(),
        length: size_u16::<ControlRegion>(),
        control_region_index: control_region_index(i).into(),
        vendor_id: DCR_VENDOR_ID.into(),
        device_id: DCR_DEVICE_ID.into(),
        revision_id: DCR_REVISION_ID.into(),
        subsystem_vendor_id: 0.into(),
        subsystem_device_id: 0.into(),
        subsystem_revision_id: 0.into(),
        valid_fields: 0,
        manufacturing_location: 0,
        manufacturing_date: 0.into(),
        reserved0: 0.into(),
        serial_number: d.serial_number.into(),
        format_interface_code: DCR_FORMAT_CODE.into(),
        block_control_windows: 0.into(),
        window_size: 0.into(),
        command_offset: 0.into(),
        command_size: 0.into(),
        status_offset: 0.into(),
        status_size: 0.into(),
        flags: 0.into(),
        reserved1: [0; 6],
    };
    // Validation caps hints at 256, so count and length fit a u16.
    let hints = d.flush_hints.len();
    let flush = FlushHintHeader {
        r#type: TYPE_FLUSH_HINT.into(),
        length: ((size_of::<FlushHintHeader>() + 8 * hints) as u16).into(),
        device_handle: d.handle.into(),
        hint_count: (hints as u16).into(),
        reserved: [0; 6],
    };
    out.extend_from_slice(spa.as_bytes());
    out.extend_from_slice(mapping.as_bytes());
    out.extend_from_slice(control.as_bytes());
    out.extend_from_slice(flush.as_bytes());
    for &hint in &d.flush_hints {
        out.extend_from_slice(&hint.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc_with_nvdimms, le_u16, le_u32, le_u64, sum};

    fn one() -> (NvdimmDesc, Vec<u8>) {
        let mut d = desc_with_nvdimms(1).nvdimms.remove(0);
        d.handle = 0x0102_0304;
        d.spa_base = 0x1_4000_0000;
        d.size = 0x800_0000;
        d.flush_hints = vec![0xD000_0000, 0xD000_0040];
        d.serial_number = 0xCAFE_F00D;
        let bytes = build(std::slice::from_ref(&d), PersistenceDomain::NotReported);
        (d, bytes)
    }

    #[test]
    fn header() {
        let (_, b) = one();
        assert_eq!(&b[..4], b"NFIT");
        assert_eq!(b[8], 1, "revision");
        assert_eq!(le_u32(&b, 4) as usize, b.len());
        assert_eq!(le_u32(&b, 36), 0, "reserved");
        assert_eq!(b.len(), 40 + 56 + 48 + 80 + 16 + 2 * 8);
        assert_eq!(sum(&b), 0);
    }

    #[test]
    fn spa_range_golden() {
        let (_, b) = one();
        let s = 40;
        assert_eq!(le_u16(&b, s), 0, "type");
        assert_eq!(le_u16(&b, s + 2), 56, "length");
        assert_eq!(le_u16(&b, s + 4), 1, "range index");
        assert_eq!(le_u16(&b, s + 6), 0, "flags");
        assert_eq!(&b[s + 16..s + 32], &PMEM_GUID);
        assert_eq!(le_u64(&b, s + 32), 0x1_4000_0000);
        assert_eq!(le_u64(&b, s + 40), 0x800_0000);
        assert_eq!(le_u64(&b, s + 48), 0x8008);
    }

    #[test]
    fn region_mapping_golden() {
        let (_, b) = one();
        let m = 40 + 56;
        assert_eq!(le_u16(&b, m), 1);
        assert_eq!(le_u16(&b, m + 2), 48);
        assert_eq!(le_u32(&b, m + 4), 0x0102_0304, "device handle");
        assert_eq!(le_u16(&b, m + 12), 1, "range index");
        assert_eq!(le_u16(&b, m + 14), 2, "control region index");
        assert_eq!(le_u64(&b, m + 16), 0x800_0000, "region size");
        assert_eq!(le_u64(&b, m + 24), 0, "region offset");
        assert_eq!(le_u64(&b, m + 32), 0, "DPA");
        assert_eq!(le_u16(&b, m + 42), 1, "interleave ways");
        assert_eq!(le_u16(&b, m + 44), 0, "flags");
    }

    #[test]
    fn control_region_golden() {
        let (_, b) = one();
        let c = 40 + 56 + 48;
        assert_eq!(le_u16(&b, c), 4);
        assert_eq!(le_u16(&b, c + 2), 80);
        assert_eq!(le_u16(&b, c + 4), 2, "region index");
        assert_eq!(le_u16(&b, c + 6), 0x8086);
        assert_eq!(le_u16(&b, c + 8), 1, "device id");
        assert_eq!(le_u16(&b, c + 10), 1, "revision id");
        assert_eq!(le_u32(&b, c + 24), 0xCAFE_F00D, "serial");
        assert_eq!(le_u16(&b, c + 28), 0x0301, "format code");
        assert_eq!(le_u16(&b, c + 30), 0, "no block windows");
    }

    #[test]
    fn flush_hint_golden() {
        let (_, b) = one();
        let f = 40 + 56 + 48 + 80;
        assert_eq!(le_u16(&b, f), 6);
        assert_eq!(le_u16(&b, f + 2), 16 + 16);
        assert_eq!(le_u32(&b, f + 4), 0x0102_0304);
        assert_eq!(le_u16(&b, f + 8), 2);
        assert_eq!(le_u64(&b, f + 16), 0xD000_0000);
        assert_eq!(le_u64(&b, f + 24), 0xD000_0040);
    }

    #[test]
    fn readonly_sets_not_armed() {
        let mut d = one().0;
        d.readonly = true;
        let b = build(&[d], PersistenceDomain::NotReported);
        assert_eq!(le_u16(&b, 40 + 56 + 44), 1 << 3);
    }

    #[test]
    fn indices_follow_2i_plus_1_and_2i_plus_2() {
        let desc = desc_with_nvdimms(3);
        let b = build(&desc.nvdimms, PersistenceDomain::NotReported);
        let mut off = 40;
        for i in 0..3u16 {
            assert_eq!(le_u16(&b, off + 4), 2 * i + 1, "SPA {i}");
            off += 56;
            assert_eq!(le_u16(&b, off + 12), 2 * i + 1, "memdev {i} range");
            assert_eq!(le_u16(&b, off + 14), 2 * i + 2, "memdev {i} region");
            off += 48;
            assert_eq!(le_u16(&b, off + 4), 2 * i + 2, "DCR {i}");
            off += 80;
            off += usize::from(le_u16(&b, off + 2));
        }
        assert_eq!(off, b.len());
    }

    #[test]
    fn memory_controller_persistence_appends_type_7() {
        let (d, plain) = one();
        let b = build(&[d], PersistenceDomain::MemoryController);
        assert_eq!(b.len(), plain.len() + 16);
        let p = plain.len();
        assert_eq!(le_u16(&b, p), 7);
        assert_eq!(le_u16(&b, p + 2), 16);
        assert_eq!(b[p + 4], 1, "highest valid capability");
        assert_eq!(le_u32(&b, p + 8), 0b10, "memory controller flush only");
        assert_eq!(sum(&b), 0);
    }
}
