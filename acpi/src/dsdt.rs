//! The DSDT: the legacy devices Linux must enumerate from ACPI under a HW-reduced FADT,
//! `\_S5_` for power-off, and the NVDIMM root device the `nfit` driver binds to.

use acpi_tables::{aml, sdt::Sdt, Aml};

use crate::{NvdimmDesc, PlatformDesc, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Revision 2: integers are 64 bits.
const DSDT_REVISION: u8 = 2;
/// A 16550 UART decodes eight ports.
const COM1_PORTS: u8 = 8;
const I8042_DATA_PORT: u16 = 0x60;
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_IRQ: u32 = 1;

/// The DSDT for `desc`.
pub(crate) fn build(desc: &PlatformDesc) -> Vec<u8> {
    let mut body = Vec::new();
    system_bus(desc).to_aml_bytes(&mut body);
    sleep_state_s5(desc.power.s5_slp_typ).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// `Scope (\_SB) { COM1, PS2_, NVDR }`, as bytes because the children borrow locals.
fn system_bus(desc: &PlatformDesc) -> AmlBytes {
    let mut children = Vec::new();
    com1(desc.com1_port, desc.com1_gsi).to_aml_bytes(&mut children);
    i8042().to_aml_bytes(&mut children);
    if !desc.nvdimms.is_empty() {
        nvdimm_root(&desc.nvdimms).to_aml_bytes(&mut children);
    }
    AmlBytes(aml::Scope::raw("\\_SB_".into(), children))
}

/// Already-encoded AML.
struct AmlBytes(Vec<u8>);

impl Aml for AmlBytes {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// COM1: a 16550 at `port` on `gsi`, which Linux's 8250 PNP driver picks up.
fn com1(port: u16, gsi: u32) -> AmlBytes {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(port, port, 1, COM1_PORTS);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    encode(&aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// The PS/2 keyboard controller, so Linux's i8042 driver finds its ports and IRQ.
fn i8042() -> AmlBytes {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303"));
    let data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let command = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let irq = aml::Interrupt::new(true, true, false, false, I8042_IRQ);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(vec![&data, &command, &irq]),
    );
    encode(&aml::Device::new("PS2_".into(), vec![&hid, &crs]))
}

/// `NVDR` (`ACPI0012`) with one child per NVDIMM whose `_ADR` is its NFIT device handle.
/// No `_DSM` and no label methods: the guest gets label-less namespaces.
fn nvdimm_root(nvdimms: &[NvdimmDesc]) -> AmlBytes {
    let adrs: Vec<aml::Name> = nvdimms
        .iter()
        .map(|d| aml::Name::new("_ADR".into(), &d.handle))
        .collect();
    let children: Vec<aml::Device> = adrs
        .iter()
        .enumerate()
        .map(|(i, adr)| aml::Device::new(nvdimm_name(i).as_str().into(), vec![adr]))
        .collect();
    let hid = aml::Name::new("_HID".into(), &"ACPI0012");
    let mut members: Vec<&dyn Aml> = vec![&hid];
    members.extend(children.iter().map(|c| c as &dyn Aml));
    encode(&aml::Device::new("NVDR".into(), members))
}

/// `NV00`, `NV01`, ... `NVFF`: validation caps the count at 256, so the name is 4 characters.
pub(crate) fn nvdimm_name(index: usize) -> String {
    format!("NV{:02X}", index & 0xFF)
}

/// `Name (\_S5_, Package () { slp_typ, 0, 0, 0 })`: SLP_TYPa for power-off.
fn sleep_state_s5(slp_typ: u8) -> AmlBytes {
    let package = aml::Package::new(vec![&slp_typ, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    encode(&aml::Name::new("\\_S5_".into(), &package))
}

fn encode(obj: &dyn Aml) -> AmlBytes {
    let mut bytes = Vec::new();
    obj.to_aml_bytes(&mut bytes);
    AmlBytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{desc_with_nvdimms, le_u32, sum};

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn header_and_checksum() {
        let b = build(&desc_with_nvdimms(2));
        assert_eq!(&b[..4], b"DSDT");
        assert_eq!(le_u32(&b, 4) as usize, b.len());
        assert_eq!(b[8], 2);
        assert_eq!(sum(&b), 0);
    }

    #[test]
    fn com1_resources_use_the_given_port_and_gsi() {
        let mut desc = desc_with_nvdimms(0);
        desc.com1_port = 0x2F8;
        desc.com1_gsi = 3;
        let b = build(&desc);
        // IO (Decode16, 0x2F8, 0x2F8, 1, 8)
        assert!(contains(
            &b,
            &[0x47, 0x01, 0xF8, 0x02, 0xF8, 0x02, 0x01, 0x08]
        ));
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 3 }
        assert!(contains(&b, &[0x89, 0x06, 0x00, 0x03, 0x01, 3, 0, 0, 0]));
        // _HID EISAID ("PNP0501") = 0x0105D041
        assert!(contains(
            &b,
            &[b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x05, 0x01]
        ));
    }

    #[test]
    fn s5_package_carries_slp_typ() {
        let mut desc = desc_with_nvdimms(0);
        desc.power.s5_slp_typ = 5;
        let b = build(&desc);
        // Name (\_S5_, Package (4) { 5, 0, 0, 0 })
        let s5 = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0A, 0x05, 0x00, 0x00, 0x00,
        ];
        assert!(contains(&b, &s5));
    }

    #[test]
    fn nvdimm_root_only_with_nvdimms() {
        assert!(!contains(&build(&desc_with_nvdimms(0)), b"ACPI0012"));
        let b = build(&desc_with_nvdimms(3));
        assert!(contains(&b, b"NVDR"));
        assert!(contains(&b, b"ACPI0012\0"));
        for (i, name) in ["NV00", "NV01", "NV02"].iter().enumerate() {
            assert!(contains(&b, name.as_bytes()), "{name}");
            // _ADR = handle i+1, encoded as One or BytePrefix.
            let adr: &[u8] = if i == 0 {
                &[0x01]
            } else {
                &[0x0A, i as u8 + 1]
            };
            let mut pattern = b"_ADR".to_vec();
            pattern.extend_from_slice(adr);
            assert!(contains(&b, &pattern), "_ADR of {name}");
        }
        assert!(!contains(&b, b"NV03"));
        assert!(!contains(&b, b"_DSM"));
    }

    #[test]
    fn large_handles_are_dword_adr() {
        let mut desc = desc_with_nvdimms(1);
        desc.nvdimms[0].handle = 0xDEAD_BEEF;
        let b = build(&desc);
        assert!(contains(
            &b,
            &[b'_', b'A', b'D', b'R', 0x0C, 0xEF, 0xBE, 0xAD, 0xDE]
        ));
    }

    #[test]
    fn names_for_all_256_nvdimms_are_four_characters() {
        assert_eq!(nvdimm_name(0), "NV00");
        assert_eq!(nvdimm_name(10), "NV0A");
        assert_eq!(nvdimm_name(255), "NVFF");
        let b = build(&desc_with_nvdimms(256));
        assert!(contains(&b, b"NVFF"));
        assert_eq!(sum(&b), 0);
    }
}
