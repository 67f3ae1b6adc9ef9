//! The dirty-ring flush path on real KVM: several vCPUs write pmem pages, one flushes, and
//! exactly the pages written before the flush reach the file, whichever vCPU wrote them, even
//! when a vCPU's ring fills up, or overflows, on the way; after an overflow, the flush after
//! the whole-device one writes exactly the pages written again.
//!
//! Needs /dev/kvm with KVM_CAP_DIRTY_LOG_RING; without either the test prints `SKIP:` and passes.
//! The rings are pmvm's (VM-wide, in the VMM); the tiny guest is the device crate's test VM.

#[path = "../devices/nvdimm/tests/common/mod.rs"]
mod common;
mod tiny_vm_ring;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{
    device_params, kvm_or_skip, spawn_vcpu_with_ring, Code, Exit, TinyVm, HINT_GPA, PMEM_GPA,
};
use nvdimm::{DirtySource, Nvdimm, PmemConfig, PAGE_SIZE};
use pmvm::dirty_ring::{DirtyRings, RingOverflow};
use tiny_vm_ring::VcpuRing;

/// Who writes what before vCPU 0's flush: (vCPU, first page, pages, value).
type Write = (u64, u64, u64, u64);

struct Scenario {
    pmem_size: u64,
    ring_entries: u32,
    before_flush: [Write; 4],
    /// Written by vCPU 0 after its flush: must not be in the file until the next flush.
    after_flush: (u64, u64, u64),
}

/// Fewer pages per vCPU than a ring holds: tracking must be exact.
const EXACT: Scenario = Scenario {
    pmem_size: 16 << 20,
    ring_entries: 4096,
    before_flush: [
        (1, 0, 1500, 0x1111_1111_1111_1111),
        (2, 2000, 10, 0x2222_2222_2222_2222),
        (3, 3000, 1, 0x3333_3333_3333_3333),
        (0, 3500, 1, 0x4444_4444_4444_4444),
    ],
    after_flush: (3600, 10, 0x5555_5555_5555_5555),
};

/// Ten times more pages on one vCPU than its ring holds, in one loop: KVM must stop it at the
/// ring's limit (hardware), or pmvm must notice the overflow (hosts that enter the guest
/// rarely), lose nothing either way, and be exact again after one whole-device writeback.
const FLOOD: Scenario = Scenario {
    pmem_size: 128 << 20,
    ring_entries: 2048,
    before_flush: [
        (1, 0, 20_000, 0x1111_1111_1111_1111),
        (2, 25_000, 10, 0x2222_2222_2222_2222),
        (3, 30_000, 1, 0x3333_3333_3333_3333),
        (0, 31_000, 1, 0x4444_4444_4444_4444),
    ],
    after_flush: (32_000, 10, 0x5555_5555_5555_5555),
};

fn pmem_config(dir: &Path, size: u64) -> PmemConfig {
    PmemConfig::new(dir.join("pmem.img"))
        .with_size(size)
        .with_persist(nvdimm::config::PersistMode::Flush)
}

fn page_addr(page: u64) -> u64 {
    PMEM_GPA + page * PAGE_SIZE
}

/// The file a flush of `writes` must produce: each page starts with its 8-byte value.
fn expected_file(size: u64, writes: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut bytes = vec![0u8; size as usize];
    for &(first, pages, value) in writes {
        for page in first..first + pages {
            let at = (page * PAGE_SIZE) as usize;
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
    }
    bytes
}

/// Runs a scenario; returns whether the rings overflowed.
fn run(sc: &Scenario) -> Option<bool> {
    let kvm = kvm_or_skip("dirty ring")?;
    let dir = tempfile::tempdir().unwrap();
    let vm = TinyVm::new(&kvm);
    let Some(rings) =
        DirtyRings::enable(vm.vm.clone(), sc.ring_entries).expect("enabling the ring")
    else {
        println!("SKIP: KVM lacks KVM_CAP_DIRTY_LOG_RING");
        return None;
    };
    assert_eq!(rings.entries(), sc.ring_entries);
    let reported = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rings = Arc::new(rings.on_overflow({
        let reported = reported.clone();
        move |overflow| reported.lock().unwrap().push(overflow)
    }));
    // persist=flush: the file changes only by writeback, so its bytes show exactly what a
    // flush wrote.
    let dev = Arc::new(
        Nvdimm::open(&pmem_config(dir.path(), sc.pmem_size), device_params(false)).unwrap(),
    );
    dev.attach_ring(&vm.vm, rings.clone()).unwrap();
    assert_eq!(dev.dirty_tracking(), nvdimm::stats::Tracking::Ring);
    // The VMM's fence holds the other vCPUs out of the guest. Here the only flush from a vCPU
    // comes after vCPUs 1-3 have halted, from vCPU 0's own exit, and the host flushes after
    // every vCPU halted: no vCPU is in the guest whenever the fence runs.
    dev.set_vcpu_fence(Arc::new(|f: &mut dyn FnMut()| {
        f();
        Ok(())
    }));
    vm.setup_ram();
    let path = dir.path().join("pmem.img");

    let mut codes: Vec<Code> = (0..4).map(|_| Code::default()).collect();
    for &(vcpu, first, pages, value) in &sc.before_flush {
        let code = std::mem::take(&mut codes[vcpu as usize]);
        codes[vcpu as usize] = code.write_pages(page_addr(first), pages, value);
    }
    let (late_first, late_pages, late_value) = sc.after_flush;
    codes[0] = std::mem::take(&mut codes[0])
        .flush_hint(HINT_GPA)
        .write_pages(page_addr(late_first), late_pages, late_value);
    let vcpus: Vec<_> = codes
        .into_iter()
        .enumerate()
        .map(|(id, code)| {
            let fd = vm.create_vcpu(id as u64, &code.hlt());
            let handle = rings.add_vcpu(&fd).expect("mapping the vCPU's ring");
            (fd, handle)
        })
        .collect();

    let spawn = |(fd, handle), id: nvdimm::VcpuId| {
        let dev = dev.clone();
        let ring = VcpuRing(rings.clone(), handle);
        spawn_vcpu_with_ring(fd, Some(Box::new(ring)), move |exit| {
            if let Exit::MmioWrite(addr, data) = exit {
                if (HINT_GPA..HINT_GPA + 4096).contains(addr) {
                    dev.mmio_write(id, addr - HINT_GPA, data)
                        .expect("the flush failed");
                }
            }
        })
    };
    // vCPUs 1-3 write concurrently and halt; only then does vCPU 0 write and flush.
    let mut vcpus = vcpus.into_iter();
    let vcpu0 = vcpus.next().unwrap();
    let writers: Vec<_> = vcpus
        .enumerate()
        .map(|(i, v)| spawn(v, i as nvdimm::VcpuId + 1))
        .collect();
    for (i, rx) in writers.iter().enumerate() {
        let exits = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("vCPU {} did not halt", i + 1));
        assert_eq!(exits.last(), Some(&Exit::Hlt), "vCPU {}", i + 1);
    }
    assert!(
        std::fs::read(&path).unwrap() == vec![0u8; sc.pmem_size as usize],
        "nothing reaches a persist=flush file before a flush"
    );

    let exits = spawn(vcpu0, 0)
        .recv_timeout(Duration::from_secs(60))
        .expect("vCPU 0 did not halt");
    assert!(
        exits.contains(&Exit::MmioWrite(HINT_GPA, 1u64.to_le_bytes().to_vec())),
        "{exits:?}"
    );
    let overflowed = rings.overflows() > 0;
    // Each overflow reaches the hook once, with the ring's size.
    let want = RingOverflow {
        entries: sc.ring_entries,
    };
    assert_eq!(
        *reported.lock().unwrap(),
        vec![want; rings.overflows() as usize]
    );
    // Re-armed by the flush, if it overflowed.
    assert!(!rings.overflowed());
    assert_eq!(dev.dirty_tracking(), nvdimm::stats::Tracking::Ring);

    let before: Vec<(u64, u64, u64)> = sc.before_flush.iter().map(|w| (w.1, w.2, w.3)).collect();
    let want_pages: u64 = before.iter().map(|w| w.1).sum();
    let st = dev.stats();
    assert_eq!((st.flushes, st.errors), (1, 0), "{st:?}");
    let file = std::fs::read(&path).unwrap();
    if overflowed {
        // One whole-device writeback: every page written, the rest rewritten unchanged.
        assert_eq!(st.pages_written, sc.pmem_size / PAGE_SIZE);
        let mut all = before.clone();
        all.push(sc.after_flush);
        // It may include vCPU 0's later stores; nothing may be lost.
        let with_late = expected_file(sc.pmem_size, &all);
        let without_late = expected_file(sc.pmem_size, &before);
        assert!(file == with_late || file == without_late, "pages were lost");
    } else {
        assert_eq!(
            st.pages_written, want_pages,
            "every page written before the flush, on any vCPU, and no other"
        );
        assert!(
            file == expected_file(sc.pmem_size, &before),
            "the file must hold exactly the pages written before the flush"
        );
    }
    // The pages vCPU 0 wrote after its flush are pending, and the next flush takes them, and
    // only them: exact tracking, re-armed after an overflow.
    let in_rings = rings.peek(dev.slot()).unwrap().len();
    assert!(in_rings > 0, "the late pages are still in the rings");
    assert_eq!(dev.pending_pages(), Some(late_pages));
    assert_eq!(dev.pending_pages(), Some(late_pages));
    // Reading the count took nothing out of the rings (which would re-protect the pages).
    assert_eq!(rings.peek(dev.slot()).unwrap().len(), in_rings);
    let report = dev.host_flush().unwrap();
    assert_eq!((report.pages, report.runs), (late_pages, 1));
    let mut all = before.clone();
    all.push(sc.after_flush);
    assert!(std::fs::read(&path).unwrap() == expected_file(sc.pmem_size, &all));
    assert_eq!(dev.host_flush().unwrap().pages, 0, "the rings were reset");
    assert_eq!(rings.stray_entries(), 0);
    Some(overflowed)
}

#[test]
fn writes_on_several_vcpus_are_written_back_exactly() {
    if let Some(overflowed) = run(&EXACT) {
        assert!(!overflowed, "1500 pages must fit a 4096-entry ring");
    }
}

#[test]
fn a_flooded_ring_loses_nothing_and_the_vcpu_keeps_running() {
    if let Some(overflowed) = run(&FLOOD) {
        println!("flooded ring overflowed: {overflowed}");
    }
}
