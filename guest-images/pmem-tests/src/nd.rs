//! The guest's NVDIMMs as libnvdimm shows them in sysfs, and turning a label-less raw
//! namespace into an fsdax one with the same sysfs writes `ndctl create-namespace -m fsdax`
//! makes.
//!
//! Every path is under a root (`/sys` in the guest) so the steps can be tested on a fake tree.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NdError {
    #[error("no NVDIMM region under {dir}: is the nfit driver loaded (CONFIG_ACPI_NFIT) and does the VMM give the guest an NFIT?")]
    NoRegions { dir: PathBuf },
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path} holds {value:?}, not a {kind}")]
    Parse {
        path: PathBuf,
        value: String,
        kind: &'static str,
    },
    #[error("cannot write {value:?} to {path}: {err}")]
    Write {
        path: PathBuf,
        value: String,
        err: std::io::Error,
    },
    #[error(
        "region {region} has no namespace{index}.0: the kernel found no usable namespace in it"
    )]
    NoNamespace { region: String, index: String },
    #[error("{device} has no block device under {dir}: is nd_pmem loaded (CONFIG_BLK_DEV_PMEM)?")]
    NoBlock { device: String, dir: PathBuf },
    #[error("{pfn} did not bind to nd_pmem after the fsdax setup; the kernel log says why (look for \"nd_pmem\" or \"misaligned\")")]
    BindFailed { pfn: String },
}

/// One NVDIMM region: a device as pmvm gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// `region0`, ...
    pub name: String,
    /// Guest-physical base address.
    pub base: u64,
    pub size: u64,
}

/// A region's block device, ready for I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pmem {
    /// Position in ascending base-address order, which is pmvm's `--pmem` order.
    pub index: u32,
    pub region: Region,
    /// `pmem0`, ...
    pub block: String,
    /// The namespace or pfn device that owns the block device.
    pub holder: String,
    pub fsdax: bool,
    /// Byte offset in the NVDIMM of the block device's first byte.
    pub data_offset: u64,
}

impl Pmem {
    pub fn dev_path(&self) -> PathBuf {
        Path::new("/dev").join(&self.block)
    }
}

/// libnvdimm's sysfs, rooted at `root` (normally `/sys`).
pub struct Nd {
    root: PathBuf,
}

impl Nd {
    pub fn new(root: impl Into<PathBuf>) -> Nd {
        Nd { root: root.into() }
    }

    fn devices(&self) -> PathBuf {
        self.root.join("bus/nd/devices")
    }

    fn attr(&self, device: &str, name: &str) -> PathBuf {
        self.devices().join(device).join(name)
    }

    fn read(&self, path: &Path) -> Result<String, NdError> {
        fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|err| NdError::Read {
                path: path.to_path_buf(),
                err,
            })
    }

    fn number(&self, path: &Path) -> Result<u64, NdError> {
        let v = self.read(path)?;
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        };
        parsed.ok_or(NdError::Parse {
            path: path.to_path_buf(),
            value: v,
            kind: "number",
        })
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), NdError> {
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(|err| NdError::Write {
                path: path.to_path_buf(),
                value: value.to_string(),
                err,
            })
    }

    /// Device names under the bus with `prefix`, sorted.
    fn names(&self, dir: &Path, prefix: &str) -> Result<Vec<String>, NdError> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(NdError::Read {
                    path: dir.to_path_buf(),
                    err,
                })
            }
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every writable region, in ascending address order. Read-only ones (a `readonly=on`
    /// NVDIMM, such as the one the tools come on) are not the suite's to format.
    pub fn regions(&self) -> Result<Vec<Region>, NdError> {
        let mut regions = Vec::new();
        for name in self.names(&self.devices(), "region")? {
            let ro = self.attr(&name, "read_only");
            if ro.exists() && self.number(&ro)? == 1 {
                continue;
            }
            regions.push(Region {
                base: self.number(&self.attr(&name, "resource"))?,
                size: self.number(&self.attr(&name, "size"))?,
                name,
            });
        }
        if regions.is_empty() {
            return Err(NdError::NoRegions {
                dir: self.devices(),
            });
        }
        regions.sort_by_key(|r| r.base);
        Ok(regions)
    }

    fn bound(&self, device: &str) -> bool {
        self.attr(device, "driver").exists()
    }

    fn block_of(&self, device: &str) -> Result<String, NdError> {
        let dir = self.attr(device, "block");
        self.names(&dir, "pmem")?
            .into_iter()
            .next()
            .ok_or(NdError::NoBlock {
                device: device.to_string(),
                dir,
            })
    }

    /// The region's label-less namespace, `namespaceN.0`.
    fn namespace_of(&self, region: &Region) -> Result<String, NdError> {
        let index = region.name.trim_start_matches("region").to_string();
        let ns = format!("namespace{index}.0");
        if self.devices().join(&ns).exists() {
            Ok(ns)
        } else {
            Err(NdError::NoNamespace {
                region: region.name.clone(),
                index,
            })
        }
    }

    /// The pfn device of `region` already bound to `ns` (an info block found at boot, or a
    /// setup done earlier).
    fn active_pfn(&self, region: &Region, ns: &str) -> Result<Option<String>, NdError> {
        let index = region.name.trim_start_matches("region");
        for pfn in self.names(&self.devices(), &format!("pfn{index}."))? {
            let claimed = fs::read_to_string(self.attr(&pfn, "namespace")).unwrap_or_default();
            if claimed.trim() == ns && self.bound(&pfn) {
                return Ok(Some(pfn));
            }
        }
        Ok(None)
    }

    /// Makes the region's namespace fsdax unless it already is, and returns its block device.
    /// `uuid` names the new pfn device.
    pub fn ensure_fsdax(&self, index: u32, region: &Region, uuid: &str) -> Result<Pmem, NdError> {
        let ns = self.namespace_of(region)?;
        let pfn = match self.active_pfn(region, &ns)? {
            Some(pfn) => pfn,
            None => {
                let driver = self.root.join("bus/nd/drivers/nd_pmem");
                if self.bound(&ns) {
                    self.write(&driver.join("unbind"), &ns)?;
                }
                let pfn = self.read(&self.attr(&region.name, "pfn_seed"))?;
                self.write(&self.attr(&pfn, "uuid"), uuid)?;
                // Keep the page structs in the NVDIMM, not in guest RAM.
                self.write(&self.attr(&pfn, "mode"), "pmem")?;
                let aligns =
                    fs::read_to_string(self.attr(&pfn, "supported_alignments")).unwrap_or_default();
                if aligns.split_whitespace().any(|a| a == "2097152") {
                    self.write(&self.attr(&pfn, "align"), "2097152")?;
                }
                self.write(&self.attr(&pfn, "namespace"), &ns)?;
                self.write(&driver.join("bind"), &pfn)?;
                if !self.bound(&pfn) {
                    return Err(NdError::BindFailed { pfn });
                }
                pfn
            }
        };
        let start = self.number(&self.attr(&pfn, "resource"))?;
        Ok(Pmem {
            index,
            region: region.clone(),
            block: self.block_of(&pfn)?,
            holder: pfn,
            fsdax: true,
            data_offset: start.saturating_sub(region.base),
        })
    }
}

/// A random (version 4) UUID from the kernel's generator.
pub fn random_uuid() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: getrandom writes at most `len - filled` bytes at `ptr + filled`, inside `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().add(filled).cast(), b.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake libnvdimm tree: regions with label-less namespaces, a pfn seed, nd_pmem.
    struct Fake {
        dir: tempfile::TempDir,
    }

    impl Fake {
        fn new(regions: &[(u64, u64)]) -> Fake {
            let dir = tempfile::tempdir().unwrap();
            let f = Fake { dir };
            fs::create_dir_all(f.root().join("bus/nd/drivers/nd_pmem")).unwrap();
            f.file("bus/nd/drivers/nd_pmem/bind", "");
            f.file("bus/nd/drivers/nd_pmem/unbind", "");
            for (i, (base, size)) in regions.iter().enumerate() {
                let r = format!("region{i}");
                f.file(
                    &format!("bus/nd/devices/{r}/resource"),
                    &format!("{base:#x}\n"),
                );
                f.file(&format!("bus/nd/devices/{r}/size"), &format!("{size}\n"));
                f.file(
                    &format!("bus/nd/devices/{r}/pfn_seed"),
                    &format!("pfn{i}.0\n"),
                );
                let ns = format!("bus/nd/devices/namespace{i}.0");
                f.file(&format!("{ns}/resource"), &format!("{base:#x}\n"));
                f.dir(&format!("{ns}/driver"));
                f.dir(&format!("{ns}/block/pmem{i}"));
                let pfn = format!("bus/nd/devices/pfn{i}.0");
                for a in ["uuid", "mode", "align", "namespace"] {
                    f.file(&format!("{pfn}/{a}"), "");
                }
                f.file(
                    &format!("{pfn}/supported_alignments"),
                    "4096 2097152 1073741824\n",
                );
            }
            f
        }

        fn root(&self) -> PathBuf {
            self.dir.path().to_path_buf()
        }

        fn file(&self, rel: &str, text: &str) {
            let p = self.root().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }

        fn dir(&self, rel: &str) {
            fs::create_dir_all(self.root().join(rel)).unwrap();
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.root().join(rel)).unwrap()
        }

        /// What the kernel does when nd_pmem binds pfnN.0.
        fn kernel_binds_pfn(&self, i: usize, data_start: u64) {
            let pfn = format!("bus/nd/devices/pfn{i}.0");
            self.dir(&format!("{pfn}/driver"));
            self.dir(&format!("{pfn}/block/pmem{i}"));
            self.file(&format!("{pfn}/resource"), &format!("{data_start:#x}\n"));
        }
    }

    #[test]
    fn read_only_regions_are_left_alone() {
        let fake = Fake::new(&[(0x1_0000_0000, 256 << 20), (0x1_4000_0000, 128 << 20)]);
        fake.file("bus/nd/devices/region0/read_only", "0\n");
        fake.file("bus/nd/devices/region1/read_only", "1\n");
        let regions = Nd::new(fake.root()).regions().unwrap();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].name, "region0");
    }

    #[test]
    fn regions_are_listed_in_address_order() {
        let fake = Fake::new(&[(0x1_8000_0000, 512 << 20), (0x1_4000_0000, 256 << 20)]);
        let regions = Nd::new(fake.root()).regions().unwrap();
        assert_eq!(
            regions,
            vec![
                Region {
                    name: "region1".into(),
                    base: 0x1_4000_0000,
                    size: 256 << 20
                },
                Region {
                    name: "region0".into(),
                    base: 0x1_8000_0000,
                    size: 512 << 20
                },
            ]
        );
    }

    #[test]
    fn no_regions_is_an_error_that_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let err = Nd::new(dir.path()).regions().unwrap_err().to_string();
        assert!(err.contains("nfit driver"), "{err}");
        assert!(err.contains("bus/nd/devices"), "{err}");
    }

    #[test]
    fn fsdax_setup_writes_what_ndctl_writes_in_order() {
        let fake = Fake::new(&[(0x1_4000_0000, 256 << 20)]);
        // The fake kernel's answer to the bind, prepared up front.
        fake.kernel_binds_pfn(0, 0x1_4040_0000);
        let nd = Nd::new(fake.root());
        let region = &nd.regions().unwrap()[0];
        let uuid = "6f1c0e36-31b5-4bd4-9e56-4f4c2a1c1f7e";
        let pmem = nd.ensure_fsdax(0, region, uuid).unwrap();
        assert_eq!(fake.read("bus/nd/drivers/nd_pmem/unbind"), "namespace0.0");
        assert_eq!(fake.read("bus/nd/devices/pfn0.0/uuid"), uuid);
        assert_eq!(fake.read("bus/nd/devices/pfn0.0/mode"), "pmem");
        assert_eq!(fake.read("bus/nd/devices/pfn0.0/align"), "2097152");
        assert_eq!(fake.read("bus/nd/devices/pfn0.0/namespace"), "namespace0.0");
        assert_eq!(fake.read("bus/nd/drivers/nd_pmem/bind"), "pfn0.0");
        assert_eq!(pmem.block, "pmem0");
        assert_eq!(pmem.holder, "pfn0.0");
        assert_eq!(pmem.data_offset, 0x40_0000);
        assert_eq!(pmem.dev_path(), PathBuf::from("/dev/pmem0"));
    }

    #[test]
    fn an_existing_fsdax_namespace_is_reused_without_writes() {
        let fake = Fake::new(&[(0x1_4000_0000, 256 << 20)]);
        fake.kernel_binds_pfn(0, 0x1_4020_0000);
        fake.file("bus/nd/devices/pfn0.0/namespace", "namespace0.0\n");
        let nd = Nd::new(fake.root());
        let region = &nd.regions().unwrap()[0];
        let pmem = nd.ensure_fsdax(0, region, "unused").unwrap();
        assert_eq!(pmem.data_offset, 0x20_0000);
        assert_eq!(fake.read("bus/nd/drivers/nd_pmem/bind"), "");
        assert_eq!(fake.read("bus/nd/drivers/nd_pmem/unbind"), "");
        assert_eq!(fake.read("bus/nd/devices/pfn0.0/uuid"), "");
    }

    #[test]
    fn a_pfn_that_does_not_bind_is_reported_with_where_to_look() {
        let fake = Fake::new(&[(0x1_4000_0000, 256 << 20)]);
        let nd = Nd::new(fake.root());
        let region = &nd.regions().unwrap()[0];
        let err = nd.ensure_fsdax(0, region, "u").unwrap_err().to_string();
        assert!(err.contains("pfn0.0 did not bind"), "{err}");
    }

    #[test]
    fn a_region_without_namespace_is_named() {
        let fake = Fake::new(&[(0x1_4000_0000, 256 << 20)]);
        fs::remove_dir_all(fake.root().join("bus/nd/devices/namespace0.0")).unwrap();
        let nd = Nd::new(fake.root());
        let region = &nd.regions().unwrap()[0];
        let err = nd.ensure_fsdax(0, region, "u").unwrap_err().to_string();
        assert!(err.contains("region0 has no namespace0.0"), "{err}");
    }

    #[test]
    fn random_uuids_are_version_4_and_differ() {
        let a = random_uuid().unwrap();
        let b = random_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }
}
