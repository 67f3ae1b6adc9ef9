//! From the command line's machine options to the machine to build: each option checked,
//! with messages that name the option.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::pmem_option::{self, PmemOptionError, PmemSetError};
use super::MachineArgs;
use crate::layout;
use crate::machine::{KernelFormat, MachineConfig, SerialTarget, MAX_CPUS, MIN_MEMORY};
use crate::x86::cpu_model::{CpuModel, CpuModelError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--memory {value:?}: {reason}")]
    Memory { value: String, reason: String },
    #[error("--cpus 0: a machine needs at least one vCPU")]
    ZeroCpus,
    #[error("--cpus {0}: pmvm supports at most {MAX_CPUS} vCPUs")]
    TooManyCpus(u32),
    #[error("--serial {0:?}: expected `stdio` or `file=PATH`")]
    Serial(String),
    #[error("--kernel {path}: cannot open")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--kernel {0}: not a Linux bzImage or ELF kernel (no ELF magic, no \"HdrS\" boot header)"
    )]
    KernelFormat(PathBuf),
    #[error("--initrd {path}: cannot open")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("in --pmem {value:?}")]
    Pmem {
        value: String,
        #[source]
        source: PmemOptionError,
    },
    #[error(transparent)]
    PmemSet(#[from] PmemSetError),
    #[error(transparent)]
    CpuModel(#[from] CpuModelError),
    #[error("--cmdline is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
}

/// The machine `args` describe, checked as far as it can be without KVM.
pub fn machine_config(args: &MachineArgs) -> Result<MachineConfig, ConfigError> {
    {
        let memory = parse_memory(&args.memory)?;
        let cpus = match args.cpus {
            0 => return Err(ConfigError::ZeroCpus),
            n if n > MAX_CPUS => return Err(ConfigError::TooManyCpus(n)),
            n => n as u8,
        };
        let serial = parse_serial(&args.serial)?;
        if args.cmdline.len() >= layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong {
                len: args.cmdline.len(),
                max: layout::CMDLINE_MAX_SIZE - 1,
            });
        }
        // --dump-acpi needs no kernel; a given kernel is still checked.
        let kernel = match &args.kernel {
            Some(p) => Some((p.clone(), kernel_format(p)?)),
            None => None,
        };
        if let Some(p) = &args.initrd {
            File::open(p).map_err(|source| ConfigError::InitrdOpen {
                path: p.clone(),
                source,
            })?;
        }
        let pmem = args
            .pmem
            .iter()
            .map(|v| {
                pmem_option::parse(v).map_err(|source| ConfigError::Pmem {
                    value: v.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        pmem_option::validate_set(&pmem)?;
        let cpu_model = CpuModel::parse(&args.cpu_features, &args.cpu_vendor)?;
        Ok(MachineConfig {
            kernel,
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
            memory,
            cpus,
            serial,
            pmem,
            cpu_model,
            dirty_tracking: args.dirty_tracking,
            seccomp: args.seccomp,
            seccomp_selftest: args.seccomp_selftest,
        })
    }
}

fn parse_memory(value: &str) -> Result<u64, ConfigError> {
    let err = |reason: String| ConfigError::Memory {
        value: value.to_string(),
        reason,
    };
    let bytes = nvdimm::size::parse_size(value).map_err(|e| err(e.to_string()))?;
    if bytes < MIN_MEMORY {
        return Err(err(format!("a guest needs at least {}M", MIN_MEMORY >> 20)));
    }
    if bytes % 4096 != 0 {
        return Err(err("must be a multiple of 4K".into()));
    }
    let host = host_memory();
    if bytes > host {
        return Err(err(format!("exceeds the host's RAM of {}M", host >> 20)));
    }
    Ok(bytes)
}

/// Total RAM of the host, in bytes.
fn host_memory() -> u64 {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64).saturating_mul(info.mem_unit as u64)
}

fn parse_serial(value: &str) -> Result<SerialTarget, ConfigError> {
    match value {
        "stdio" => Ok(SerialTarget::Stdio),
        v => match v.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialTarget::File(PathBuf::from(p))),
            _ => Err(ConfigError::Serial(v.to_string())),
        },
    }
}

/// Tells a bzImage from an ELF by their magic numbers, before any KVM work starts.
fn kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let open_err = |source| ConfigError::KernelOpen {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    // The setup header's "HdrS" signature sits at 0x202.
    let mut hdrs = [0u8; 4];
    if f.seek(SeekFrom::Start(0x202)).is_ok() && f.read_exact(&mut hdrs).is_ok() && hdrs == *b"HdrS"
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(ConfigError::KernelFormat(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits_are_enforced() {
        assert!(matches!(parse_memory("0"), Err(ConfigError::Memory { .. })));
        assert!(matches!(
            parse_memory("63M"),
            Err(ConfigError::Memory { .. })
        ));
        assert!(parse_memory("64M").is_ok());
        let err = parse_memory("4096T").unwrap_err().to_string();
        assert!(err.contains("exceeds the host's RAM"), "{err}");
    }

    #[test]
    fn serial_targets() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialTarget::Stdio);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialTarget::File("/tmp/x".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp").is_err());
    }

    #[test]
    fn kernel_format_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("k.elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01").unwrap();
        assert_eq!(kernel_format(&elf).unwrap(), KernelFormat::Elf);
        let bz = dir.path().join("bz");
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&bz, &img).unwrap();
        assert_eq!(kernel_format(&bz).unwrap(), KernelFormat::BzImage);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(matches!(
            kernel_format(&junk),
            Err(ConfigError::KernelFormat(_))
        ));
        assert!(matches!(
            kernel_format(&dir.path().join("missing")),
            Err(ConfigError::KernelOpen { .. })
        ));
    }
}
