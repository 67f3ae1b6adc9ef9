//! The flush path on real KVM: a guest writes pmem pages and a flush hint; pmvm's device must
//! write back exactly those pages before the vCPU resumes.
//!
//! Needs /dev/kvm; without it each test prints `SKIP: no /dev/kvm` and passes.

mod common;

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{kvm_or_skip, Code, Exit, TinyVm, HINT_GPA, PMEM_GPA};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use nvdimm::cachestat::cachestat;
use nvdimm::mmap::Mapping;
use nvdimm::{enable_manual_protect, Nvdimm, NvdimmParams, PmemConfig, PAGE_SIZE};

const PMEM_SIZE: u64 = 2 << 20;
/// The two pages the guest dirties: not adjacent, so two runs.
const PAGE_A: u64 = 0;
const PAGE_B: u64 = 5;
const VALUE_A: u64 = 0x1122_3344_5566_7788;
const VALUE_B: u64 = 0x99aa_bbcc_ddee_ff00;

fn pmem_config(dir: &Path, cfg: PmemConfig) -> PmemConfig {
    PmemConfig {
        path: dir.join("pmem.img"),
        ..cfg
    }
}

/// A device with the defaults; `pmem_config` puts it in its directory.
fn dev() -> PmemConfig {
    PmemConfig::new("")
}

fn params(manual_protect: bool) -> NvdimmParams {
    common::device_params(manual_protect)
}

/// Guest code: one 8-byte store into each of the two pages, optionally a flush, then hlt.
fn writer(flush: bool) -> Code {
    let code = Code::default()
        .write_u64(PMEM_GPA + PAGE_A * PAGE_SIZE + 8, VALUE_A)
        .write_u64(PMEM_GPA + PAGE_B * PAGE_SIZE + 16, VALUE_B);
    let code = if flush {
        code.flush_hint(HINT_GPA)
    } else {
        code
    };
    code.hlt()
}

/// A VM with the device attached and the guest ready to run.
struct Setup {
    vm: TinyVm,
    dev: Arc<Nvdimm>,
    file: File,
    manual: bool,
}

fn setup(
    kvm: &kvm_ioctls::Kvm,
    dir: &Path,
    want_manual: bool,
    cfg: PmemConfig,
    code: &Code,
) -> Option<Setup> {
    let mut vm = TinyVm::new(kvm);
    let manual = want_manual && enable_manual_protect(&vm.vm).expect("enabling manual protect");
    if want_manual && !manual {
        println!("SKIP: KVM lacks MANUAL_DIRTY_LOG_PROTECT2");
        return None;
    }
    let dev = Arc::new(Nvdimm::open(&pmem_config(dir, cfg), params(manual)).unwrap());
    dev.attach(&vm.vm).unwrap();
    vm.boot(code);
    let file = File::open(dir.join("pmem.img")).unwrap();
    Some(Setup {
        vm,
        dev,
        file,
        manual,
    })
}

fn dirty_pages(file: &File, page: u64) -> u64 {
    cachestat(file, page * PAGE_SIZE, PAGE_SIZE)
        .expect("cachestat(2) (Linux 6.5+)")
        .nr_dirty
}

fn put_u64(bytes: &mut [u8], offset: u64, value: u64) {
    let o = offset as usize;
    bytes[o..o + 8].copy_from_slice(&value.to_le_bytes());
}

/// What the host saw at the moment of the hint exit, before the vCPU resumed.
#[derive(Debug, Default)]
struct AtFlush {
    dirty_before: Option<(u64, u64)>,
    dirty_after: Option<(u64, u64)>,
    flushes_after: u64,
}

fn guest_flush_writes_back_exactly_the_dirty_pages(want_manual: bool) {
    let Some(kvm) = kvm_or_skip("guest flush") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(mut s) = setup(
        &kvm,
        dir.path(),
        want_manual,
        dev().with_size(2 << 20),
        &writer(true),
    ) else {
        return;
    };
    let seen = Arc::new(Mutex::new(AtFlush::default()));
    let (dev, file, seen2) = (s.dev.clone(), s.file.try_clone().unwrap(), seen.clone());
    let exits = s.vm.run(move |exit| {
        if let Exit::MmioWrite(addr, data) = exit {
            if (HINT_GPA..HINT_GPA + 4096).contains(addr) {
                let mut seen = seen2.lock().unwrap();
                seen.dirty_before = Some((dirty_pages(&file, PAGE_A), dirty_pages(&file, PAGE_B)));
                // The synchronous flush path: returns only once the pages are durable.
                dev.mmio_write(0, addr - HINT_GPA, data)
                    .expect("the flush failed");
                seen.dirty_after = Some((dirty_pages(&file, PAGE_A), dirty_pages(&file, PAGE_B)));
                seen.flushes_after = dev.stats().flushes;
            }
        }
    });
    assert_eq!(
        exits,
        vec![
            Exit::MmioWrite(HINT_GPA, 1u64.to_le_bytes().to_vec()),
            Exit::Hlt
        ],
        "pmem stores must not exit; the hint write must"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.dirty_before,
        Some((1, 1)),
        "guest stores dirty the file's page cache"
    );
    assert_eq!(
        seen.dirty_after,
        Some((0, 0)),
        "durable before the vCPU resumes"
    );
    assert_eq!(seen.flushes_after, 1);

    let st = s.dev.stats();
    assert_eq!(st.flushes, 1);
    assert_eq!(st.pages_written, 2);
    assert_eq!(st.bytes_written, 2 * PAGE_SIZE);
    assert_eq!(st.runs, 2, "pages {PAGE_A} and {PAGE_B} are not adjacent");
    assert_eq!(st.writebacks, 1);
    assert_eq!(st.last_harvest_pages, 2);
    assert_eq!((st.empty_flushes, st.errors, st.host_flushes), (0, 0, 0));
    assert_eq!(st.latency_us.histogram.iter().sum::<u64>(), 1);

    let bytes = std::fs::read(dir.path().join("pmem.img")).unwrap();
    let mut expected = vec![0u8; PMEM_SIZE as usize];
    put_u64(&mut expected, PAGE_A * PAGE_SIZE + 8, VALUE_A);
    put_u64(&mut expected, PAGE_B * PAGE_SIZE + 16, VALUE_B);
    assert!(
        bytes == expected,
        "the file must hold the guest's two stores and nothing else"
    );
    let whole = cachestat(&s.file, 0, PMEM_SIZE).unwrap();
    assert_eq!(whole.nr_dirty, 0);

    let expected_pending = if s.manual { Some(0) } else { None };
    assert_eq!(s.dev.pending_pages(), expected_pending);
    println!("{}", s.dev.summary_line());
}

/// Rounds of stores and flushes, enough for the device to take every way of writeback
/// (`writeback_way`) and then settle.
const ROUNDS: u64 = nvdimm::writeback_way::LEARNING_WRITEBACKS + 4;

/// Whichever way a writeback takes, including unmapping the pages from the guest first, the
/// guest's stores after it are logged and written back by the next flush.
fn every_round_of_stores_is_written_back_whichever_way(want_manual: bool) {
    let Some(kvm) = kvm_or_skip("rounds of flushes") else {
        return;
    };
    let value = |round: u64, page: u64| (round + 1) << 32 | page;
    let mut code = Code::default();
    for round in 0..ROUNDS {
        for page in [PAGE_A, PAGE_B] {
            code = code.write_u64(PMEM_GPA + page * PAGE_SIZE + 8, value(round, page));
        }
        code = code.flush_hint(HINT_GPA);
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mut s) = setup(
        &kvm,
        dir.path(),
        want_manual,
        dev().with_size(PMEM_SIZE),
        &code.hlt(),
    ) else {
        return;
    };
    let (dev, file) = (s.dev.clone(), s.file.try_clone().unwrap());
    let rounds = Arc::new(Mutex::new(Vec::new()));
    let seen = rounds.clone();
    s.vm.run(move |exit| {
        if let Exit::MmioWrite(addr, data) = exit {
            dev.mmio_write(0, addr - HINT_GPA, data)
                .expect("the flush failed");
            let mut buf = [0u8; 8];
            let in_file = [PAGE_A, PAGE_B].map(|page| {
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, page * PAGE_SIZE + 8)
                    .unwrap();
                u64::from_le_bytes(buf)
            });
            let st = dev.stats();
            seen.lock().unwrap().push((in_file, st.last_harvest_pages));
        }
    });
    let rounds = rounds.lock().unwrap();
    assert_eq!(rounds.len() as u64, ROUNDS);
    for (round, (in_file, harvested)) in rounds.iter().enumerate() {
        let round = round as u64;
        assert_eq!(
            (*in_file, *harvested),
            ([value(round, PAGE_A), value(round, PAGE_B)], 2),
            "round {round}: the file and the harvest after the flush"
        );
    }
    let st = s.dev.stats();
    assert_eq!((st.flushes, st.pages_written), (ROUNDS, 2 * ROUNDS));
    // Each step is taken in half the writebacks that learn it, whatever it settles on.
    let half = nvdimm::writeback_way::STEP_LEARNING_WRITEBACKS / 2;
    assert!(
        st.unmapped_writebacks >= half && st.submitted_writebacks >= half,
        "of {ROUNDS} writebacks {} unmapped the pages first and {} started their I/O first",
        st.unmapped_writebacks,
        st.submitted_writebacks
    );
    assert_eq!(cachestat(&s.file, 0, PMEM_SIZE).unwrap().nr_dirty, 0);
}

#[test]
fn every_round_is_written_back_whichever_way_with_manual_protect() {
    every_round_of_stores_is_written_back_whichever_way(true);
}

#[test]
fn every_round_is_written_back_whichever_way_with_get_clearing_the_log() {
    every_round_of_stores_is_written_back_whichever_way(false);
}

#[test]
fn guest_flush_with_manual_protect() {
    guest_flush_writes_back_exactly_the_dirty_pages(true);
}

#[test]
fn guest_flush_with_get_clearing_the_log() {
    guest_flush_writes_back_exactly_the_dirty_pages(false);
}

/// Negative control: the same stores without a flush leave the pages dirty in the page cache;
/// a host flush then writes exactly them.
fn without_flush_pages_stay_dirty(want_manual: bool) {
    let Some(kvm) = kvm_or_skip("no flush") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(mut s) = setup(
        &kvm,
        dir.path(),
        want_manual,
        dev().with_size(2 << 20),
        &writer(false),
    ) else {
        return;
    };
    let exits = s.vm.run(|_| {});
    assert_eq!(exits, vec![Exit::Hlt]);
    assert_eq!(dirty_pages(&s.file, PAGE_A), 1);
    assert_eq!(dirty_pages(&s.file, PAGE_B), 1);
    let st = s.dev.stats();
    assert_eq!((st.flushes, st.pages_written, st.writebacks), (0, 0, 0));
    if s.manual {
        assert_eq!(
            s.dev.pending_pages(),
            Some(2),
            "peeking must see both pages"
        );
        assert_eq!(s.dev.pending_pages(), Some(2), "and must not consume them");
    } else {
        assert_eq!(s.dev.pending_pages(), None);
    }

    let report = s.dev.host_flush().unwrap();
    assert_eq!((report.pages, report.runs), (2, 2));
    assert_eq!(dirty_pages(&s.file, PAGE_A), 0);
    assert_eq!(dirty_pages(&s.file, PAGE_B), 0);
    let st = s.dev.stats();
    assert_eq!((st.host_flushes, st.flushes, st.pages_written), (1, 0, 2));
    assert_eq!(
        s.dev.host_flush().unwrap().pages,
        0,
        "the harvest re-armed the log"
    );
}

#[test]
fn without_flush_pages_stay_dirty_manual_protect() {
    without_flush_pages_stay_dirty(true);
}

#[test]
fn without_flush_pages_stay_dirty_get_clears() {
    without_flush_pages_stay_dirty(false);
}

#[test]
fn readonly_device_traps_guest_writes_and_keeps_the_file() {
    let Some(kvm) = kvm_or_skip("readonly") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pmem.img");
    let original: Vec<u8> = (0..PMEM_SIZE).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &original).unwrap();
    let code = Code::default()
        .write_u64(PMEM_GPA + 8, VALUE_A)
        .flush_hint(HINT_GPA)
        .hlt();
    let Some(mut s) = setup(&kvm, dir.path(), false, dev().with_readonly(true), &code) else {
        return;
    };
    assert!(s.dev.readonly());
    let dev = s.dev.clone();
    let exits = s.vm.run(move |exit| {
        if let Exit::MmioWrite(addr, data) = exit {
            if (HINT_GPA..HINT_GPA + 4096).contains(addr) {
                dev.mmio_write(0, addr - HINT_GPA, data)
                    .expect("the flush failed");
            }
        }
    });
    assert_eq!(
        exits,
        vec![
            Exit::MmioWrite(PMEM_GPA + 8, VALUE_A.to_le_bytes().to_vec()),
            Exit::MmioWrite(HINT_GPA, 1u64.to_le_bytes().to_vec()),
            Exit::Hlt
        ],
        "a store to a read-only slot is an MMIO exit"
    );
    assert_eq!(std::fs::read(&path).unwrap(), original, "file unchanged");
    let mut through_mapping = [0u8; 16];
    s.dev.read_bytes(0, &mut through_mapping).unwrap();
    assert_eq!(&through_mapping[..], &original[..16]);
    let st = s.dev.stats();
    assert_eq!((st.flushes, st.empty_flushes, st.pages_written), (1, 1, 0));
    assert_eq!(s.dev.pending_pages(), Some(0));
}

#[test]
fn attaching_twice_is_refused() {
    let Some(kvm) = kvm_or_skip("attach twice") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vm = TinyVm::new(&kvm);
    let dev = Nvdimm::open(
        &pmem_config(dir.path(), dev().with_size(2 << 20)),
        params(false),
    )
    .unwrap();
    dev.attach(&vm.vm).unwrap();
    let err = dev.attach(&vm.vm).unwrap_err();
    assert!(err.to_string().contains("already attached"), "{err}");
}

/// A second device over the same guest range is refused while the first is attached (naming
/// the device, slot and address), and accepted once the first is dropped: Drop deletes the slot.
#[test]
fn overlapping_memslot_is_refused_until_the_device_is_dropped() {
    let Some(kvm) = kvm_or_skip("memslot removal") else {
        return;
    };
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vm = TinyVm::new(&kvm);
    let a = Nvdimm::open(
        &pmem_config(dir_a.path(), dev().with_size(2 << 20)),
        params(false),
    )
    .unwrap();
    a.attach(&vm.vm).unwrap();
    let b_params = NvdimmParams {
        index: 1,
        slot: 2,
        ..params(false)
    };
    let b = Nvdimm::open(
        &pmem_config(dir_b.path(), dev().with_size(2 << 20)),
        b_params,
    )
    .unwrap();
    let err = b.attach(&vm.vm).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("pmem1") && msg.contains("slot 2") && msg.contains("0x200000"),
        "{msg}"
    );
    drop(a);
    b.attach(&vm.vm).unwrap();
}

/// A flush that fails must not fail the guest: it is logged and counted, and the pages it took
/// stay pending for the next flush. Provoked by deleting the device's memslot behind its back,
/// so KVM_GET_DIRTY_LOG fails with ENOENT, then putting a slot back so the retry can succeed.
#[test]
fn failed_flush_is_counted_and_its_pages_retried() {
    let Some(kvm) = kvm_or_skip("flush error") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vm = TinyVm::new(&kvm);
    let path = dir.path().join("pmem.img");
    let dev = Nvdimm::open(
        &pmem_config(dir.path(), dev().with_size(2 << 20)),
        params(false),
    )
    .unwrap();
    dev.attach(&vm.vm).unwrap();
    dev.write_bytes(7 * PAGE_SIZE, b"pending").unwrap();
    let file = File::open(&path).unwrap();

    let mut region = kvm_userspace_memory_region {
        slot: 1,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: PMEM_GPA,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a zero-size region deletes slot 1; KVM then holds no reference to any memory.
    unsafe { vm.vm.set_user_memory_region(region) }.unwrap();

    // The guest's flush fails: the vCPU must not complete it, and the device is in fault.
    assert!(dev.mmio_write(0, 0, &1u64.to_le_bytes()).is_err());
    let fault = dev.io_fault().expect("a failed flush leaves a fault");
    assert!(fault.what.contains("KVM_GET_DIRTY_LOG"), "{fault:?}");
    let st = dev.stats();
    assert_eq!(
        (st.flushes, st.errors, st.pages_written),
        (1, 1, 0),
        "{st:?}"
    );
    let err = dev.host_flush().unwrap_err();
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain = format!("{chain}: {s}");
        source = s.source();
    }
    assert!(chain.starts_with("pmem0: flush failed"), "{chain}");
    assert!(
        chain.contains("KVM_GET_DIRTY_LOG of memslot 1 failed"),
        "{chain}"
    );
    assert_eq!(dirty_pages(&file, 7), 1, "not written back");

    // Put a logged slot back over the same file so the next harvest works.
    let mapping = Mapping::new(
        &OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap(),
        PMEM_SIZE,
        true,
    )
    .unwrap();
    region.memory_size = PMEM_SIZE;
    region.userspace_addr = mapping.host_addr();
    // SAFETY: `mapping` covers PMEM_SIZE bytes and outlives the slot: the device deletes slot 1
    // when `dev` is dropped explicitly at the end of this test, before `mapping` goes.
    unsafe { vm.vm.set_user_memory_region(region) }.unwrap();
    let report = dev.host_flush().expect("the retry succeeds");
    assert_eq!(
        (report.pages, report.runs),
        (1, 1),
        "the pending page was kept"
    );
    assert_eq!(dirty_pages(&file, 7), 0);
    assert_eq!(dev.stats().errors, 2);
    assert_eq!(dev.io_fault(), None, "a durable retry clears the fault");
    drop(dev);
}

/// Group commit: many threads flushing one device at once. Each flush must cover the stores its
/// thread made before calling it, counts must add up, and nothing may deadlock.
#[test]
fn concurrent_host_and_guest_flushes() {
    let Some(kvm) = kvm_or_skip("group commit") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut vm = TinyVm::new(&kvm);
    let manual = enable_manual_protect(&vm.vm).unwrap();
    let dev = Arc::new(
        Nvdimm::open(
            &pmem_config(dir.path(), dev().with_size(2 << 20)),
            params(manual),
        )
        .unwrap(),
    );
    dev.attach(&vm.vm).unwrap();
    vm.boot(&writer(false));
    let file = File::open(dir.path().join("pmem.img")).unwrap();
    // Guest pages dirty in KVM's log, to be picked up by whichever flush runs first.
    assert_eq!(vm.run(|_| {}), vec![Exit::Hlt]);

    const THREADS: u64 = 8;
    const ROUNDS: u64 = 25;
    let (tx, rx) = mpsc::channel();
    for t in 0..THREADS {
        let (dev, file, tx) = (dev.clone(), file.try_clone().unwrap(), tx.clone());
        thread::spawn(move || {
            for r in 0..ROUNDS {
                // Pages 64.. are this thread's own, one per round.
                let page = 64 + t * ROUNDS + r;
                dev.write_bytes(page * PAGE_SIZE, &[t as u8 + 1]).unwrap();
                if r % 2 == 0 {
                    dev.host_flush().unwrap();
                } else {
                    dev.mmio_write(0, 0, &[1; 8]).expect("the flush failed");
                }
                assert_eq!(
                    dirty_pages(&file, page),
                    0,
                    "thread {t} round {r}: flush returned early"
                );
            }
            tx.send(()).unwrap();
        });
    }
    for _ in 0..THREADS {
        rx.recv_timeout(Duration::from_secs(120))
            .expect("a flushing thread is stuck or failed");
    }
    let st = dev.stats();
    let total = THREADS * ROUNDS;
    assert_eq!(st.flushes + st.host_flushes, total);
    assert_eq!(st.host_flushes, THREADS * ROUNDS.div_ceil(2));
    assert_eq!(
        st.pages_written,
        total + 2,
        "each host page once, plus the guest's two"
    );
    assert!(st.writebacks >= 1 && st.writebacks <= total, "{st:?}");
    assert_eq!(st.errors, 0);
    assert_eq!(cachestat(&file, 0, PMEM_SIZE).unwrap().nr_dirty, 0);
    if manual {
        assert_eq!(dev.pending_pages(), Some(0));
    }
    println!("{} writebacks served {total} flushes", st.writebacks);
}
