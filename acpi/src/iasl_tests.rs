//! Cross-checks the tables with ACPICA's disassembler, `iasl -d` (package `acpica-tools`).
//!
//! The RSDP is not passed to iasl: its binary-file loader accepts only tables whose signature is
//! a valid 4-character name, which "RSD PTR " is not. The RSDP's checksums, length and XSDT
//! pointer are checked by the unit tests in `lib.rs` and `root.rs`.

use std::path::Path;
use std::process::Command;

use crate::test_util::{desc_with_nvdimms, LAYOUT};
use crate::{build, AcpiTables, PlatformDesc, Table};

/// Words iasl uses for problems, in its log or in the `.dsl` it writes.
const COMPLAINTS: [&str; 5] = ["error", "warning", "invalid", "incorrect", "should be"];

/// Whether iasl can run; panics under CI when it cannot, since CI must run these tests.
fn iasl_or_skip() -> bool {
    let found = Command::new("iasl").arg("-v").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "iasl not found but CI is set: install acpica-tools (apt-get install -y acpica-tools)"
        );
        println!("SKIP: iasl not installed");
    }
    found
}

/// One field line of an iasl data-table disassembly: `[0F0h 0240   8]  Hint Address : 00..`.
#[derive(Debug)]
struct Field {
    offset: usize,
    name: String,
    value: String,
}

struct Disassembly {
    dsl: String,
    fields: Vec<Field>,
}

impl Disassembly {
    /// Values of every field called `name`, in table order.
    fn values(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|f| f.name == name)
            .map(|f| f.value.as_str())
            .collect()
    }

    /// The value of the field named `name` at byte `offset`.
    fn at(&self, offset: usize, name: &str) -> &str {
        self.fields
            .iter()
            .find(|f| f.offset == offset && f.name == name)
            .map(|f| f.value.as_str())
            .unwrap_or_else(|| panic!("no field {name:?} at {offset}:\n{}", self.dsl))
    }
}

fn parse_fields(dsl: &str) -> Vec<Field> {
    dsl.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix('[')?;
            let (prefix, rest) = rest.split_once(']')?;
            let offset = prefix.split_whitespace().nth(1)?.parse().ok()?;
            let (name, value) = rest.split_once(" : ")?;
            Some(Field {
                offset,
                name: name.trim().to_string(),
                value: value.trim().to_string(),
            })
        })
        .collect()
}

/// Writes `table` as `<SIG>.dat` in `dir`, disassembles it and asserts iasl found nothing wrong.
fn disassemble(dir: &Path, table: &Table) -> Disassembly {
    let dat = AcpiTables::file_name(table);
    std::fs::write(dir.join(&dat), &table.bytes).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(dir)
        .output()
        .expect("run iasl");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {dat} failed:\n{log}");
    let dsl_path = dir.join(dat.replace(".dat", ".dsl"));
    let dsl = std::fs::read_to_string(&dsl_path)
        .unwrap_or_else(|e| panic!("{}: {e}\n{log}", dsl_path.display()));
    for word in COMPLAINTS {
        assert!(
            !log.to_lowercase().contains(word),
            "iasl complained ({word}) about {dat}:\n{log}"
        );
        assert!(
            !dsl.to_lowercase().contains(word),
            "{dat} disassembly mentions {word:?}:\n{dsl}"
        );
    }
    Disassembly {
        fields: parse_fields(&dsl),
        dsl,
    }
}

fn platform(nvdimms: usize) -> PlatformDesc {
    let mut desc = desc_with_nvdimms(nvdimms);
    desc.cpus = 3;
    for (i, d) in desc.nvdimms.iter_mut().enumerate() {
        // Word-sized handles, so the DSDT shows `_ADR` as 0x01NN.
        d.handle = 0x100 + i as u32;
        d.readonly = i % 3 == 1;
        if i == 0 {
            d.flush_hints = vec![d.flush_hints[0], d.flush_hints[0] + 0x40];
        }
    }
    desc
}

/// Disassembles every table of `desc`, checking each against what the builder was asked for.
fn check_platform(desc: &PlatformDesc) {
    let tables = build(desc, LAYOUT.rsdp, LAYOUT.start, LAYOUT.end).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = |sig: &[u8; 4]| tables.get(*sig).map(|t| format!("{:016X}", t.addr));

    for table in &tables.tables {
        let d = disassemble(dir.path(), table);
        if &table.signature != b"DSDT" {
            // AML tables disassemble to ASL; the others to field lines.
            let sig = std::str::from_utf8(&table.signature).unwrap();
            assert_eq!(d.at(0, "Signature").get(1..5), Some(sig));
            assert_eq!(d.at(10, "Oem ID"), "\"PMVM  \"");
        }
        match &table.signature {
            b"DSDT" => check_dsdt(&d, desc),
            b"FACP" => check_fadt(&d, desc, &addr(b"DSDT").unwrap()),
            b"APIC" => check_madt(&d, desc),
            b"NFIT" => check_nfit(&d, desc),
            b"XSDT" => {
                let listed: Vec<String> = d
                    .fields
                    .iter()
                    .filter(|f| f.name.starts_with("ACPI Table Address"))
                    .map(|f| f.value.clone())
                    .collect();
                let expect: Vec<String> = [b"FACP", b"APIC", b"NFIT"]
                    .iter()
                    .filter_map(|s| addr(s))
                    .collect();
                assert_eq!(listed, expect);
            }
            other => panic!("unexpected table {other:?}"),
        }
    }
}

fn check_dsdt(d: &Disassembly, desc: &PlatformDesc) {
    let dsl = &d.dsl;
    for needle in [
        "DefinitionBlock (\"\", \"DSDT\", 2, \"PMVM  \", \"PMVMACPI\", 0x00000001)",
        "Device (COM1)",
        "EisaId (\"PNP0501\")",
        "Name (_UID, Zero)",
        "0x03F8,             // Range Minimum",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
        "0x00000004,",
        "Device (PS2)",
        "EisaId (\"PNP0303\")",
        "0x0060,             // Range Minimum",
        "0x0064,             // Range Minimum",
        "0x00000001,",
        "Name (\\_S5, Package (0x04)",
        "0x05, ",
    ] {
        assert!(dsl.contains(needle), "DSDT lacks {needle:?}:\n{dsl}");
    }
    assert_eq!(dsl.contains("\"ACPI0012\""), !desc.nvdimms.is_empty());
    for (i, nv) in desc.nvdimms.iter().enumerate() {
        let device = format!("Device (NV{i:02X})");
        let adr = format!("Name (_ADR, 0x{:04X})", nv.handle);
        let at = dsl
            .find(&device)
            .unwrap_or_else(|| panic!("no {device}:\n{dsl}"));
        assert!(dsl[at..].contains(&adr), "{device} lacks {adr}");
    }
    assert!(!dsl.contains("_DSM"));
}

fn check_fadt(d: &Disassembly, desc: &PlatformDesc, dsdt: &str) {
    let p = &desc.power;
    assert_eq!(d.at(140, "DSDT Address"), dsdt);
    assert_eq!(d.at(112, "Flags (decoded below)"), "00100430");
    assert_eq!(d.at(109, "Boot Flags (decoded below)"), "0006");
    for (gas, port) in [
        (116, p.reset_port),
        (244, p.sleep_control_port),
        (256, p.sleep_status_port),
    ] {
        assert_eq!(d.at(gas, "Space ID"), "01 [SystemIO]");
        assert_eq!(d.at(gas + 1, "Bit Width"), "08");
        assert_eq!(d.at(gas + 4, "Address"), format!("{port:016X}"));
    }
    assert_eq!(
        d.at(128, "Value to cause reset"),
        format!("{:02X}", p.reset_value)
    );
    let hw_reduced = d
        .dsl
        .lines()
        .any(|l| l.trim() == "Hardware Reduced (V5) : 1");
    assert!(hw_reduced, "{}", d.dsl);
}

fn check_madt(d: &Disassembly, desc: &PlatformDesc) {
    assert_eq!(d.at(40, "Flags (decoded below)"), "00000001");
    let ids: Vec<String> = (0..desc.cpus).map(|i| format!("{i:02X}")).collect();
    assert_eq!(d.values("Local Apic ID"), ids);
    assert_eq!(d.values("I/O Apic ID"), ["00"]);
    assert_eq!(d.values("Address"), [format!("{:08X}", desc.ioapic_addr)]);
    assert_eq!(
        d.values("Source"),
        ["00".to_string(), format!("{:02X}", desc.com1_gsi)]
    );
    assert_eq!(
        d.values("Interrupt"),
        [
            "00000000".to_string(),
            "00000000".to_string(),
            format!("{:08X}", desc.com1_gsi)
        ],
        "IOAPIC GSI base, then the two overrides"
    );
}

fn check_nfit(d: &Disassembly, desc: &PlatformDesc) {
    let n = desc.nvdimms.len();
    let kinds = [
        "0000 [System Physical Address Range]",
        "0001 [Memory Range Map]",
        "0004 [NVDIMM Control Region]",
        "0006 [Flush Hint Address]",
    ];
    let mut want = kinds.repeat(n);
    if desc.persistence == crate::PersistenceDomain::MemoryController {
        want.push("0007 [Platform Capabilities]");
        assert_eq!(d.values("Highest Capability"), vec!["01"]);
        assert_eq!(d.values("Capabilities (decoded below)"), vec!["00000002"]);
    }
    assert_eq!(d.values("Subtable Type"), want);
    let fmt = |f: &dyn Fn(&crate::NvdimmDesc) -> Vec<String>| -> Vec<String> {
        desc.nvdimms.iter().flat_map(f).collect()
    };
    assert_eq!(
        d.values("Address Range Base"),
        fmt(&|nv| vec![format!("{:016X}", nv.spa_base)])
    );
    assert_eq!(
        d.values("Address Range Length"),
        fmt(&|nv| vec![format!("{:016X}", nv.size)])
    );
    assert_eq!(
        d.values("Region Size"),
        fmt(&|nv| vec![format!("{:016X}", nv.size)])
    );
    assert_eq!(
        d.values("Region Type GUID"),
        vec!["66F0D379-B4F3-4074-AC43-0D3318B78CDB"; n]
    );
    assert_eq!(
        d.values("Hint Address"),
        fmt(&|nv| nv.flush_hints.iter().map(|h| format!("{h:016X}")).collect())
    );
    assert_eq!(
        d.values("Hint Count"),
        fmt(&|nv| vec![format!("{:04X}", nv.flush_hints.len())])
    );
    // Each handle appears in the region mapping and in the flush hint structure.
    assert_eq!(
        d.values("Device Handle"),
        fmt(&|nv| vec![format!("{:08X}", nv.handle); 2])
    );
    assert_eq!(
        d.values("Serial Number"),
        fmt(&|nv| vec![format!("{:08X}", nv.serial_number)])
    );
    let armed: Vec<String> = d
        .dsl
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Device not armed : "))
        .map(str::to_string)
        .collect();
    assert_eq!(
        armed,
        fmt(&|nv| vec![if nv.readonly { "1" } else { "0" }.to_string()])
    );
    let indices: Vec<String> = (0..n)
        .flat_map(|i| vec![format!("{:04X}", 2 * i + 1); 2])
        .collect();
    assert_eq!(d.values("Range Index"), indices, "SPA then region mapping");
}

#[test]
fn iasl_accepts_every_table_without_nvdimms() {
    if iasl_or_skip() {
        check_platform(&platform(0));
    }
}

#[test]
fn iasl_accepts_every_table_with_one_nvdimm() {
    if iasl_or_skip() {
        check_platform(&platform(1));
    }
}

#[test]
fn iasl_accepts_every_table_with_eight_nvdimms() {
    if iasl_or_skip() {
        check_platform(&platform(8));
    }
}

#[test]
fn iasl_decodes_the_memory_controller_persistence_domain() {
    if iasl_or_skip() {
        let mut desc = platform(2);
        desc.persistence = crate::PersistenceDomain::MemoryController;
        check_platform(&desc);
    }
}

#[test]
fn iasl_reports_a_corrupted_checksum() {
    // The complaint detection above is only worth something if iasl really complains.
    if !iasl_or_skip() {
        return;
    }
    let tables = build(&platform(1), LAYOUT.rsdp, LAYOUT.start, LAYOUT.end).unwrap();
    let mut nfit = tables.get(*b"NFIT").unwrap().clone();
    nfit.bytes[9] = nfit.bytes[9].wrapping_add(1);
    let dir = tempfile::tempdir().unwrap();
    let result = std::panic::catch_unwind(|| disassemble(dir.path(), &nfit));
    assert!(result.is_err(), "a bad checksum must fail the check");
}
