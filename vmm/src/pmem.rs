//! The NVDIMMs of a machine: where they go in guest-physical space, and how vCPU exits and
//! ACPI reach them.

use std::sync::Arc;

use nvdimm::config::{PersistMode, PmemConfig};
use nvdimm::{FlushError, IoFault, Nvdimm, NvdimmError, NvdimmParams, OnError, VcpuId};

use crate::devices::mmio::{MmioDevice, MmioOverlap, MmioRanges};
use crate::layout;
use crate::memory;

/// Memslots 0 and 1 hold RAM; NVDIMM `i` uses slot `FIRST_SLOT + i`.
const FIRST_SLOT: u32 = 2;

/// The default number of flush hints: the vCPU count rounded up to a power of two, so that
/// Linux (which uses only a power of two of them) can give every CPU its own.
pub fn default_hints(cpus: u8) -> u32 {
    u32::from(cpus)
        .next_power_of_two()
        .clamp(1, nvdimm::MAX_HINTS)
}

/// Where the first NVDIMM goes: 1 GiB-aligned, above RAM and above 4 GiB.
pub(crate) fn first_base(ram_size: u64) -> u64 {
    memory::ram_top(ram_size).next_multiple_of(layout::NVDIMM_ALIGN)
}

/// Where the NVDIMM after one at `base` of `size` bytes goes.
fn base_after(base: u64, size: u64) -> u64 {
    (base + size).next_multiple_of(layout::NVDIMM_ALIGN)
}

/// Why one `--pmem` device could not be opened; the chain says what to change.
#[derive(Debug, thiserror::Error)]
#[error("--pmem {id}")]
pub struct OpenError {
    id: String,
    #[source]
    source: NvdimmError,
}

/// Opens every `--pmem` device: files checked, locked and mapped, not yet in the VM.
pub fn open_all(
    configs: &[PmemConfig],
    ram_size: u64,
    cpus: u8,
    manual_protect: bool,
) -> Result<Vec<Arc<Nvdimm>>, OpenError> {
    let devices = open_transient(configs, ram_size, cpus, manual_protect)?;
    // Until here an error dropped the devices opened so far, and with them the files they
    // created: a refused command line leaves nothing behind. Now the files are the user's.
    Ok(devices
        .into_iter()
        .map(|mut d| {
            d.keep_created_file();
            Arc::new(d)
        })
        .collect())
}

/// Opens every `--pmem` device like [`open_all`], but a backing file this creates is removed
/// again when the devices are dropped: for `--dump-acpi`, which runs no guest.
pub fn open_transient(
    configs: &[PmemConfig],
    ram_size: u64,
    cpus: u8,
    manual_protect: bool,
) -> Result<Vec<Nvdimm>, OpenError> {
    let mut devices: Vec<Nvdimm> = Vec::new();
    let mut next = first_base(ram_size);
    for (index, cfg) in configs.iter().enumerate() {
        let params = NvdimmParams {
            index,
            slot: FIRST_SLOT + index as u32,
            guest_base: next,
            hint_page: layout::FLUSH_HINT_START + index as u64 * layout::FLUSH_HINT_PAGE_SIZE,
            default_hints: default_hints(cpus),
            manual_protect,
        };
        let opened: Vec<&Nvdimm> = devices.iter().collect();
        let dev = Nvdimm::open_among(cfg, params, &opened).map_err(|source| OpenError {
            id: cfg.id_or_default(index),
            source,
        })?;
        next = base_after(next, dev.size());
        devices.push(dev);
    }
    Ok(devices)
}

/// How the NFIT and DSDT describe `devices`.
pub fn nfit_descs<'a>(devices: impl IntoIterator<Item = &'a Nvdimm>) -> Vec<acpi::NvdimmDesc> {
    devices
        .into_iter()
        .map(|d| acpi::NvdimmDesc {
            handle: d.handle(),
            spa_base: d.guest_base(),
            size: d.size(),
            flush_hints: d.hint_addresses(),
            readonly: d.readonly(),
            serial_number: d.serial_number(),
        })
        .collect()
}

/// The persistence domain the NFIT advertises for a set of devices. The claim is platform-wide,
/// so it must hold for every device: memory-controller flush (ADR) when every device follows
/// `persist=adr`, whose stores reach the file as soon as they leave the CPU; nothing as soon as
/// one device is `persist=flush`, where only a flush makes stores durable. Read-only devices
/// persist nothing and cannot take `persist=`, so they never change the claim.
pub fn persistence_domain(configs: &[PmemConfig]) -> acpi::PersistenceDomain {
    if configs.iter().any(|c| c.persist == PersistMode::Flush) {
        acpi::PersistenceDomain::NotReported
    } else {
        acpi::PersistenceDomain::MemoryController
    }
}

/// Places each device's flush-hint page and pmem range on the MMIO bus.
pub fn add_mmio(ranges: &mut MmioRanges, devices: &[Arc<Nvdimm>]) -> Result<(), MmioOverlap> {
    for d in devices {
        let hints = Arc::new(HintPage(d.clone()));
        ranges.insert(d.hint_page(), layout::FLUSH_HINT_PAGE_SIZE, hints)?;
        ranges.insert(d.guest_base(), d.size(), Arc::new(PmemRange(d.clone())))?;
    }
    Ok(())
}

/// Why the VM must stop for a device whose backing file is now shorter than the device,
/// looking at every file's length now.
pub fn check_lengths(devices: &[Arc<Nvdimm>]) -> Option<String> {
    devices
        .iter()
        .find_map(|d| d.check_length().err().and_then(|e| stop_line(d, &e)))
}

/// A device's flush-hint page (in no memslot, so every access exits): a write is a flush,
/// which runs to completion here, on the vCPU thread, before the vCPU re-enters the guest.
struct HintPage(Arc<Nvdimm>);

impl MmioDevice for HintPage {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.mmio_read(offset, data);
    }

    fn write(&self, vcpu: VcpuId, offset: u64, data: &[u8]) -> Result<(), FlushFailure> {
        let dev = &self.0;
        dev.mmio_write(vcpu, offset, data)
            .map_err(|e| FlushFailure::of(dev, &e))
    }
}

/// A device's pmem range, all memslot: it exits here only for stores KVM refused, to a
/// read-only device (dropped) or to a page KVM could not back. Reads read as all ones, as
/// unclaimed addresses do.
struct PmemRange(Arc<Nvdimm>);

impl MmioDevice for PmemRange {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&self, _vcpu: VcpuId, offset: u64, data: &[u8]) -> Result<(), FlushFailure> {
        let dev = &self.0;
        if dev.readonly() {
            log::debug!(
                "dropped a guest write to read-only {} at offset {offset:#x}",
                dev.id()
            );
            return Ok(());
        }
        // A truncated file cannot be fixed by a retry: stop.
        dev.check_length().map_err(|e| FlushFailure::of(dev, &e))?;
        // Otherwise (a full file system, say) the store is not lost: the device keeps it for
        // the retry, and the vCPU waits.
        let e = dev.unbacked_store(offset, data);
        Err(FlushFailure::of(dev, &e))
    }
}

/// The line pmvm stops with when `e`, from a flush of `dev`, means no flush of it can
/// succeed again (its backing file shrank); None for a failure a retry may clear.
pub fn stop_line(dev: &Nvdimm, e: &FlushError) -> Option<String> {
    e.is_fatal().then(|| format!("{}: {e}; stopping", dev.id()))
}

/// A guest write that did not become durable, and what the VM does about it. In every case
/// the vCPU does not complete the write.
#[derive(Debug, PartialEq, Eq)]
pub enum FlushFailure {
    /// No flush of the device can succeed again: the VM stops with this line.
    Fatal(String),
    /// The VM is stopping (a power cut): nothing to retry.
    Stopping,
    /// The device is in fault until a retry succeeds; `on_error` says whether the VM waits.
    Fault { fault: IoFault, on_error: OnError },
}

impl FlushFailure {
    fn of(dev: &Nvdimm, e: &FlushError) -> Self {
        if let Some(line) = stop_line(dev, e) {
            return FlushFailure::Fatal(line);
        }
        match (e, dev.io_fault()) {
            (FlushError::PoweredOff, _) | (_, None) => FlushFailure::Stopping,
            (_, Some(fault)) => FlushFailure::Fault {
                fault,
                on_error: dev.on_error(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_hints_round_up_to_a_power_of_two() {
        assert_eq!(default_hints(1), 1);
        assert_eq!(default_hints(2), 2);
        assert_eq!(default_hints(3), 4);
        assert_eq!(default_hints(9), 16);
        assert_eq!(default_hints(200), 16);
    }

    #[test]
    fn a_failed_set_removes_the_files_it_created_and_a_good_one_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let created = dir.path().join("created.img");
        let good = PmemConfig::new(&created).with_size(2 << 20);
        let missing = PmemConfig::new(dir.path().join("missing.img"));
        let err = open_all(&[good.clone(), missing], 512 << 20, 1, false).unwrap_err();
        let err = nvdimm::error_chain(&err);
        assert!(err.starts_with("--pmem pmem1: "), "{err}");
        assert!(err.contains("missing.img"), "{err}");
        assert!(!created.exists(), "the failed set left its created file");
        let devices = open_all(&[good], 512 << 20, 1, false).unwrap();
        assert_eq!(devices[0].guest_base(), 1 << 32);
        drop(devices);
        assert!(created.exists(), "a device set that opened lost its file");
    }

    #[test]
    fn a_flush_that_finds_the_file_shrunk_stops_the_vm_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.img");
        let devices = open_all(
            &[PmemConfig::new(&path).with_size(2 << 20)],
            512 << 20,
            1,
            false,
        )
        .unwrap();
        let mut bus = MmioRanges::default();
        add_mmio(&mut bus, &devices).unwrap();
        let hint = layout::FLUSH_HINT_START;
        assert_eq!(bus.write(0, hint, &[1; 8]), Some(Ok(())));
        assert_eq!(check_lengths(&devices), None);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(0))
            .unwrap();
        let Some(Err(FlushFailure::Fatal(line))) = bus.write(0, hint, &[1; 8]) else {
            panic!("a shrunk file must stop the VM");
        };
        let says = format!("pmem0: backing file {} shrank to 0 bytes", path.display());
        assert!(
            line.starts_with(&says) && line.ends_with("; stopping"),
            "{line}"
        );
        assert_eq!(check_lengths(&devices), Some(line.clone()));
        // A store KVM could not back finds it too.
        let store = devices[0].guest_base() + 0x1000;
        assert_eq!(
            bus.write(0, store, &[1; 8]),
            Some(Err(FlushFailure::Fatal(line)))
        );
    }

    #[test]
    fn hint_pages_and_pmem_ranges_are_bus_ranges_of_their_device() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = |name: &str| PmemConfig::new(dir.path().join(name)).with_size(2 << 20);
        std::fs::write(dir.path().join("b.img"), vec![0u8; 2 << 20]).unwrap();
        let devices = open_all(
            &[cfg("a.img"), cfg("b.img").with_readonly(true)],
            512 << 20,
            1,
            false,
        )
        .unwrap();
        let mut bus = MmioRanges::default();
        add_mmio(&mut bus, &devices).unwrap();
        let second_hint = layout::FLUSH_HINT_START + layout::FLUSH_HINT_PAGE_SIZE;
        assert_eq!(bus.write(0, second_hint, &[1; 8]), Some(Ok(())));
        assert_eq!(
            (devices[0].stats().flushes, devices[1].stats().flushes),
            (0, 1)
        );
        let mut word = [0x5a; 8];
        assert!(bus.read(second_hint, &mut word));
        assert_eq!(word, [0; 8], "hint pages read as zeros");
        // A store into the read-only range is dropped; its reads are all ones.
        let ro = devices[1].guest_base();
        assert_eq!(bus.write(0, ro + 8, &[1; 8]), Some(Ok(())));
        assert!(bus.read(ro, &mut word));
        assert_eq!(word, [0xff; 8]);
        assert_eq!(
            bus.write(0, second_hint + layout::FLUSH_HINT_PAGE_SIZE, &[1]),
            None
        );
        // Placing the same devices twice overlaps.
        assert!(add_mmio(&mut bus, &devices).is_err());
    }

    #[test]
    fn one_strict_device_withdraws_the_adr_claim() {
        use acpi::PersistenceDomain::{MemoryController, NotReported};
        let cfg = PmemConfig::new;
        assert_eq!(persistence_domain(&[]), MemoryController);
        assert_eq!(
            persistence_domain(&[cfg("a"), cfg("b").with_readonly(true)]),
            MemoryController
        );
        assert_eq!(
            persistence_domain(&[cfg("a"), cfg("b").with_persist(PersistMode::Flush)]),
            NotReported
        );
    }

    #[test]
    fn placement_is_gib_aligned_above_ram_and_4g() {
        assert_eq!(first_base(512 << 20), 1 << 32);
        assert_eq!(base_after(1 << 32, 2 << 20), 5 << 30);
        assert_eq!(base_after(1 << 32, 1 << 30), 5 << 30);
        // 3 GiB low + 2 GiB high: RAM tops out at 6 GiB.
        assert_eq!(first_base(5 << 30), 6 << 30);
        assert_eq!(first_base((5 << 30) + 4096), 7 << 30);
    }
}
