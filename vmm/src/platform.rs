//! The machine as ACPI describes it: turns a `MachineConfig` into a `PlatformDesc` and tables.

use std::path::{Path, PathBuf};

use acpi::{AcpiTables, PlatformDesc, PowerDesc};

use crate::layout;
use crate::machine::MachineConfig;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("cannot build the ACPI tables")]
    Acpi(#[source] acpi::AcpiError),
    #[error("--dump-acpi {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("--dump-acpi {path}: cannot create the directory")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--dump-acpi: cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The platform pmvm builds for `config`.
pub fn describe(config: &MachineConfig, nvdimms: Vec<acpi::NvdimmDesc>) -> PlatformDesc {
    PlatformDesc {
        cpus: config.cpus,
        ioapic_addr: layout::IOAPIC_START as u32,
        lapic_addr: layout::LAPIC_START as u32,
        com1_port: layout::COM1_PORT,
        com1_gsi: layout::COM1_GSI,
        power: PowerDesc {
            sleep_control_port: layout::ACPI_SLEEP_CONTROL_PORT,
            sleep_status_port: layout::ACPI_SLEEP_STATUS_PORT,
            reset_port: layout::ACPI_RESET_PORT,
            reset_value: layout::ACPI_RESET_VALUE,
            s5_slp_typ: layout::ACPI_S5_SLP_TYP,
        },
        nvdimms,
        persistence: crate::pmem::persistence_domain(&config.pmem),
    }
}

/// Every table the guest gets, placed at pmvm's ACPI addresses.
pub fn tables(desc: &PlatformDesc) -> Result<AcpiTables, PlatformError> {
    acpi::build(
        desc,
        layout::RSDP_START,
        layout::ACPI_TABLES_START,
        layout::ACPI_TABLES_END,
    )
    .map_err(PlatformError::Acpi)
}

/// Writes every table to `dir/<SIGNATURE>.dat` and returns the files written.
pub fn dump_acpi(desc: &PlatformDesc, dir: &Path) -> Result<Vec<PathBuf>, PlatformError> {
    // Like mkdir -p: a missing directory is made, a file in the way is an error.
    if std::fs::symlink_metadata(dir).is_err() {
        std::fs::create_dir_all(dir).map_err(|source| PlatformError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if !dir.is_dir() {
        return Err(PlatformError::NotADirectory(dir.to_path_buf()));
    }
    let tables = tables(desc)?;
    let mut written = Vec::new();
    for t in tables.iter() {
        let path = dir.join(AcpiTables::file_name(t));
        std::fs::write(&path, &t.bytes).map_err(|source| PlatformError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}
