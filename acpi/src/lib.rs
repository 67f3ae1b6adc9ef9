//! Every ACPI table pmvm gives a guest, built as pure functions from a [`PlatformDesc`] to bytes.
//!
//! Nothing here knows about KVM or guest memory: the VMM copies [`AcpiTables`] into the guest,
//! and `pmvm --dump-acpi` writes the same bytes to files.
//!
//! # Placement
//!
//! [`build`] puts the RSDP at `rsdp_addr` (16-byte aligned, outside the table area) and lays the
//! other tables out upward from `tables_start`, each 8-byte aligned, in this order:
//!
//! | table | why it is here |
//! |---|---|
//! | DSDT | first: the FADT needs its address (`X_DSDT`) |
//! | FACP | the FADT: HW-reduced, reset and sleep registers |
//! | APIC | the MADT: local APICs, the IOAPIC, interrupt source overrides |
//! | NFIT | only when there is at least one NVDIMM |
//! | XSDT | last: it lists FACP, APIC and NFIT, so their addresses must be known |
//!
//! The RSDP points at the XSDT. If the tables do not end at or below `tables_end`,
//! [`build`] fails with [`AcpiError::TablesDoNotFit`] instead of writing past the area.
//!
//! [`nfit_check`] is an independent checker of NFIT bytes, written from what the Linux `nfit`
//! driver accepts; it shares nothing with the builder.

mod dsdt;
mod error;
mod fadt;
mod madt;
mod nfit;
pub mod nfit_check;
mod placement;
mod root;
mod validate;

#[cfg(test)]
mod iasl_tests;
#[cfg(test)]
mod test_util;

pub use error::AcpiError;

/// OEM ID in every table header and the RSDP.
pub const OEM_ID: [u8; 6] = *b"PMVM  ";
/// OEM table ID in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"PMVMACPI";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// What the guest's platform looks like, as far as ACPI describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformDesc {
    /// Number of vCPUs; their local APIC ids are `0..cpus`.
    pub cpus: u8,
    /// Guest-physical address of the IOAPIC (24 pins, GSI base 0).
    pub ioapic_addr: u32,
    /// Guest-physical address of the local APICs.
    pub lapic_addr: u32,
    /// COM1's I/O port base.
    pub com1_port: u16,
    /// COM1's ISA IRQ, which is also its GSI (2..=15).
    pub com1_gsi: u32,
    /// The HW-reduced power device: FADT sleep control/status and reset registers (I/O ports).
    pub power: PowerDesc,
    /// The NVDIMMs, in NFIT device-handle order.
    pub nvdimms: Vec<NvdimmDesc>,
    /// What the NFIT claims about where stores become persistent. Platform-wide: one claim
    /// covers every NVDIMM.
    pub persistence: PersistenceDomain,
}

/// The persistence domain the NFIT advertises, as a Platform Capabilities (type 7) structure.
/// Linux shows it as a region's `persistence_domain`; PMDK reads it. CPU-cache persistence
/// (eADR) is never claimed: it would make Linux and PMDK skip cache flushes, and pmvm only
/// persists what a flush-hint write tells it to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PersistenceDomain {
    /// No type-7 structure: stores are persistent only once flushed.
    #[default]
    NotReported,
    /// A type-7 structure with "memory controller flush" only: stores that left the CPU
    /// caches survive power loss (ADR).
    MemoryController,
}

/// Ports of the HW-reduced ACPI power device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerDesc {
    /// FADT SLEEP_CONTROL_REG: the guest writes `(SLP_TYP << 2) | SLP_EN (1 << 5)` here.
    pub sleep_control_port: u16,
    /// FADT SLEEP_STATUS_REG.
    pub sleep_status_port: u16,
    /// FADT RESET_REG.
    pub reset_port: u16,
    /// FADT RESET_VALUE, written to `reset_port` to reboot.
    pub reset_value: u8,
    /// SLP_TYP reported by `\_S5_` (3 bits: 0..=7).
    pub s5_slp_typ: u8,
}

/// One NVDIMM as the NFIT and the DSDT describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvdimmDesc {
    /// NFIT device handle, equal to the DSDT child's `_ADR`. Non-zero and unique.
    pub handle: u32,
    /// Guest-physical base of the persistent-memory range (2 MiB aligned).
    pub spa_base: u64,
    /// Length of the range (a non-zero multiple of 2 MiB).
    pub size: u64,
    /// Flush-hint addresses: 8-byte aligned, outside RAM, pmem and memslots.
    pub flush_hints: Vec<u64>,
    /// Reported as "not armed": the guest treats it as read-only.
    pub readonly: bool,
    /// Serial number in the control region, stable for a given device id.
    pub serial_number: u32,
}

/// One table and the guest-physical address it belongs at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The table signature; the RSDP's is `*b"RSDP"` (its bytes start with `RSD PTR `).
    pub signature: [u8; 4],
    /// Guest-physical address of the first byte.
    pub addr: u64,
    /// The table, checksums included.
    pub bytes: Vec<u8>,
}

/// Every table for one platform: the RSDP and the tables it leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// The RSDP, pointing at the XSDT.
    pub rsdp: Table,
    /// In address order: DSDT, FACP, APIC, NFIT (if any NVDIMM), XSDT.
    pub tables: Vec<Table>,
}

impl AcpiTables {
    /// The RSDP first, then every other table in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Table> {
        std::iter::once(&self.rsdp).chain(self.tables.iter())
    }

    /// The table with this signature, if present.
    pub fn get(&self, signature: [u8; 4]) -> Option<&Table> {
        self.iter().find(|t| t.signature == signature)
    }

    /// The file name `--dump-acpi` uses: `"RSDP.dat"`, `"FACP.dat"`, ...
    ///
    /// Bytes that are not ASCII letters or digits become `_`, so the name never holds a path
    /// separator.
    pub fn file_name(t: &Table) -> String {
        let sig: String = t
            .signature
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b)
                } else {
                    '_'
                }
            })
            .collect();
        format!("{sig}.dat")
    }
}

/// Builds every table for `desc`, the RSDP at `rsdp_addr` and the others placed upward from
/// `tables_start`, all ending at or below `tables_end`.
///
/// Fails without panicking if `desc` is invalid or the tables do not fit.
pub fn build(
    desc: &PlatformDesc,
    rsdp_addr: u64,
    tables_start: u64,
    tables_end: u64,
) -> Result<AcpiTables, AcpiError> {
    validate::platform(desc)?;
    let mut area = placement::Area::new(rsdp_addr, root::RSDP_LEN, tables_start, tables_end)?;

    let dsdt = area.place(*b"DSDT", dsdt::build(desc))?;
    let facp = area.place(*b"FACP", fadt::build(&desc.power, dsdt.addr))?;
    let apic = area.place(*b"APIC", madt::build(desc))?;
    let nfit = if desc.nvdimms.is_empty() {
        None
    } else {
        let bytes = nfit::build(&desc.nvdimms, desc.persistence);
        Some(area.place(*b"NFIT", bytes)?)
    };

    let mut listed = vec![facp.addr, apic.addr];
    listed.extend(nfit.as_ref().map(|t| t.addr));
    let xsdt = area.place(*b"XSDT", root::xsdt(&listed))?;
    let rsdp = Table {
        signature: *b"RSDP",
        addr: rsdp_addr,
        bytes: root::rsdp(xsdt.addr),
    };

    let mut tables = vec![dsdt, facp, apic];
    tables.extend(nfit);
    tables.push(xsdt);
    Ok(AcpiTables { rsdp, tables })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_util::{desc_with_nvdimms, le_u32, le_u64, sum, LAYOUT};

    fn build_default(nvdimms: usize) -> AcpiTables {
        build(
            &desc_with_nvdimms(nvdimms),
            LAYOUT.rsdp,
            LAYOUT.start,
            LAYOUT.end,
        )
        .expect("the default platform builds")
    }

    #[test]
    fn tables_come_in_documented_order_and_addresses_ascend_aligned() {
        let t = build_default(2);
        let sigs: Vec<&[u8; 4]> = t.iter().map(|t| &t.signature).collect();
        assert_eq!(
            sigs,
            [b"RSDP", b"DSDT", b"FACP", b"APIC", b"NFIT", b"XSDT"],
            "signature order"
        );
        assert_eq!(t.rsdp.addr, LAYOUT.rsdp);
        assert_eq!(t.tables[0].addr, LAYOUT.start);
        let mut prev_end = LAYOUT.start;
        for table in &t.tables {
            assert_eq!(table.addr % 8, 0, "{:?} aligned", table.signature);
            assert!(table.addr >= prev_end, "{:?} overlaps", table.signature);
            prev_end = table.addr + table.bytes.len() as u64;
        }
        assert!(prev_end <= LAYOUT.end);
    }

    #[test]
    fn the_nfit_carries_the_persistence_domain_asked_for() {
        let mut desc = desc_with_nvdimms(2);
        let caps = |desc: &PlatformDesc| {
            let t = build(desc, LAYOUT.rsdp, LAYOUT.start, LAYOUT.end).unwrap();
            nfit_check::check(&t.get(*b"NFIT").unwrap().bytes)
                .unwrap()
                .capabilities
        };
        assert_eq!(caps(&desc), None, "NotReported: no type-7 structure");
        desc.persistence = PersistenceDomain::MemoryController;
        assert_eq!(
            caps(&desc),
            Some(nfit_check::Capabilities {
                highest_valid: 1,
                capabilities: 0b10
            })
        );
    }

    #[test]
    fn no_nvdimm_means_no_nfit_in_tables_or_xsdt() {
        let t = build_default(0);
        assert!(t.get(*b"NFIT").is_none());
        let xsdt = t.get(*b"XSDT").unwrap();
        assert_eq!(xsdt.bytes.len(), 36 + 2 * 8);
    }

    #[test]
    fn every_table_checksums_to_zero_and_length_matches_header() {
        for n in [0, 1, 2, 8] {
            let t = build_default(n);
            for table in &t.tables {
                assert_eq!(sum(&table.bytes), 0, "{:?} checksum", table.signature);
                assert_eq!(&table.bytes[..4], &table.signature);
                assert_eq!(
                    le_u32(&table.bytes, 4) as usize,
                    table.bytes.len(),
                    "{:?} length",
                    table.signature
                );
                assert_eq!(&table.bytes[10..16], &OEM_ID);
                assert_eq!(&table.bytes[16..24], &OEM_TABLE_ID);
            }
            let rsdp = &t.rsdp.bytes;
            assert_eq!(rsdp.len(), 36);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
            assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
            assert_eq!(rsdp[15], 2, "RSDP revision");
            assert_eq!(le_u32(rsdp, 20), 36, "RSDP length");
            assert_eq!(&rsdp[9..15], &OEM_ID);
        }
    }

    #[test]
    fn rsdp_points_at_xsdt_and_xsdt_lists_facp_apic_nfit() {
        let t = build_default(1);
        let xsdt = t.get(*b"XSDT").unwrap();
        assert_eq!(le_u64(&t.rsdp.bytes, 24), xsdt.addr);
        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|off| le_u64(&xsdt.bytes, off))
            .collect();
        let expect: Vec<u64> = [*b"FACP", *b"APIC", *b"NFIT"]
            .iter()
            .map(|s| t.get(*s).unwrap().addr)
            .collect();
        assert_eq!(entries, expect);
    }

    #[test]
    fn fadt_x_dsdt_points_at_dsdt() {
        let t = build_default(1);
        let facp = t.get(*b"FACP").unwrap();
        assert_eq!(le_u64(&facp.bytes, 140), t.get(*b"DSDT").unwrap().addr);
        assert_eq!(le_u32(&facp.bytes, 40), 0, "32-bit DSDT pointer unused");
    }

    #[test]
    fn file_names_are_signature_dot_dat_and_safe() {
        let t = build_default(1);
        let names: Vec<String> = t.iter().map(AcpiTables::file_name).collect();
        assert_eq!(
            names,
            ["RSDP.dat", "DSDT.dat", "FACP.dat", "APIC.dat", "NFIT.dat", "XSDT.dat"]
        );
        let odd = Table {
            signature: *b"a/.\0",
            addr: 0,
            bytes: vec![],
        };
        assert_eq!(AcpiTables::file_name(&odd), "a___.dat");
    }

    #[test]
    fn tables_that_do_not_fit_are_an_error_naming_the_table() {
        let desc = desc_with_nvdimms(8);
        let full = build(&desc, LAYOUT.rsdp, LAYOUT.start, LAYOUT.end).unwrap();
        let xsdt = full.get(*b"XSDT").unwrap();
        let exact_end = xsdt.addr + xsdt.bytes.len() as u64;
        assert!(build(&desc, LAYOUT.rsdp, LAYOUT.start, exact_end).is_ok());
        let err = build(&desc, LAYOUT.rsdp, LAYOUT.start, exact_end - 1).unwrap_err();
        assert!(
            matches!(&err, AcpiError::TablesDoNotFit { table, .. } if table == "XSDT"),
            "{err:?}"
        );
        assert!(err.to_string().contains("XSDT"), "{err}");
        let err = build(&desc, LAYOUT.rsdp, LAYOUT.start, LAYOUT.start + 64).unwrap_err();
        assert!(
            matches!(&err, AcpiError::TablesDoNotFit { table, .. } if table == "DSDT"),
            "{err:?}"
        );
    }

    #[test]
    fn unaligned_tables_start_is_rounded_up() {
        let t = build(&desc_with_nvdimms(1), 0xE0000, 0xE0043, 0x100000).unwrap();
        assert_eq!(t.tables[0].addr, 0xE0048);
    }

    #[test]
    fn same_input_same_bytes() {
        assert_eq!(build_default(3), build_default(3));
    }

    /// NVDIMMs laid out like pmvm's, each with a ~1 in 3 chance of one fault.
    fn arb_nvdimms() -> impl Strategy<Value = Vec<NvdimmDesc>> {
        let one = (
            0u8..30,
            0u64..4,
            proptest::collection::vec(0u64..512, 0..3),
            any::<bool>(),
        );
        proptest::collection::vec(one, 0..6).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (fault, grow, extra_hints, readonly))| {
                    let mut d = test_util::nvdimm(i);
                    d.size += grow << 21;
                    d.readonly = readonly;
                    let page = d.flush_hints[0];
                    d.flush_hints
                        .extend(extra_hints.iter().map(|k| page + 8 * k));
                    match fault {
                        0 => d.handle = 0,
                        1 => d.handle = 1,
                        2 => d.spa_base += 4096,
                        3 => d.size = 0,
                        4 => d.size += 4096,
                        5 => d.flush_hints.clear(),
                        6 => d.flush_hints.push(page + 4),
                        7 => d.flush_hints.push(d.spa_base),
                        8 => d.spa_base = test_util::spa_base(0),
                        9 => d.spa_base = u64::MAX - (2 << 20) + 1,
                        _ => {}
                    }
                    d
                })
                .collect()
        })
    }

    proptest! {
        /// Whatever `build` accepts, the independent NFIT checker accepts too; nothing panics.
        #[test]
        fn build_never_panics_and_its_nfit_always_checks(
            cpus in any::<u8>(),
            com1_gsi in prop_oneof![9 => Just(4u32), 1 => any::<u32>()],
            s5 in prop_oneof![9 => 0u8..8, 1 => any::<u8>()],
            nvdimms in arb_nvdimms(),
            rsdp in prop_oneof![9 => Just(LAYOUT.rsdp), 1 => any::<u64>()],
            start in prop_oneof![9 => Just(LAYOUT.start), 1 => any::<u64>()],
            len in prop_oneof![9 => Just(LAYOUT.end - LAYOUT.start), 1 => 0u64..0x1000],
        ) {
            let mut desc = desc_with_nvdimms(0);
            desc.cpus = cpus;
            desc.com1_gsi = com1_gsi;
            desc.power.s5_slp_typ = s5;
            desc.nvdimms = nvdimms;
            if let Ok(t) = build(&desc, rsdp, start, start.saturating_add(len)) {
                for table in &t.tables {
                    prop_assert_eq!(sum(&table.bytes), 0);
                }
                if let Some(nfit) = t.get(*b"NFIT") {
                    let parsed = nfit_check::check(&nfit.bytes);
                    prop_assert!(parsed.is_ok(), "{:?} for {:?}", parsed, desc.nvdimms);
                }
            }
        }
    }
}
