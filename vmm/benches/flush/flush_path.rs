//! pmvm's flush path against the host's own writeback, in one VM per (device size, dirty
//! pages) cell: each round the guest dirties the pages and writes the flush hint; at the exit
//! the bench times `Nvdimm::mmio_write` (harvest, writeback, fdatasync) and, for each host-only
//! method, dirties the same pages of its own same-sized host file and times the method on it,
//! the five in a balanced order ([`order`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use nvdimm::lock::lock;
use nvdimm::{enable_manual_protect, Nvdimm, NvdimmParams, PersistMode, PmemConfig};
use pmvm::dirty_ring::{DirtyRings, DEFAULT_RING_ENTRIES};

use crate::common::{Exit, TinyVm};
use crate::error::BenchError;
use crate::guest::{self, page_offset, EXIT_GPA, SLOT_GPA};
use crate::host_sync::HostFile;
use crate::stats::micros;
use crate::tiny_vm_ring::VcpuRing;

/// One round's latencies in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// pmvm: the whole synchronous flush of the hint exit.
    pub pmvm: f64,
    /// The part of it the device counted as its writeback (`writeback_ns`): the fdatasync,
    /// and before it the unmapping of the pages and the start of their I/O or
    /// (`persist=flush`) their copies.
    pub pmvm_writeback: f64,
    /// Whether pmvm's writeback unmapped the pages from the guest first (`writeback_way`).
    pub unmapped: bool,
    /// Whether pmvm's writeback started each run's I/O before the `fdatasync`.
    pub submitted: bool,
    /// The host method ([`FDATASYNC`] to [`FSYNC`]) that ran right after pmvm's flush, if any:
    /// its time is not counted, since a writeback right after pmvm's runs 1-2% slower on this
    /// host, a cost of pmvm's flush that would otherwise lower pmvm's ratio.
    pub after_pmvm: Option<usize>,
    /// Host: fdatasync of the file.
    pub fdatasync: f64,
    /// Host: sync_file_range(WRITE) per run, then fdatasync.
    pub submit: f64,
    /// Host: msync(MS_SYNC) of the whole mapping.
    pub msync: f64,
    /// Host: fsync of the file.
    pub fsync: f64,
}

fn timed(f: impl FnOnce() -> Result<(), BenchError>) -> Result<f64, BenchError> {
    let start = Instant::now();
    f()?;
    Ok(micros(start.elapsed()))
}

/// Round `n` (its order of methods) at one hint exit: pmvm's flush and the host methods on
/// freshly dirtied pages.
fn round(
    dev: &Nvdimm,
    hosts: &[HostFile; HOST_METHODS],
    pages: u64,
    exit: (u64, &[u8]),
    n: u64,
) -> Result<Round, BenchError> {
    let (addr, data) = exit;
    if !(EXIT_GPA..EXIT_GPA + guest::PAGE).contains(&addr) {
        return Err(BenchError::Check(format!(
            "the guest wrote {addr:#x}, outside the flush-hint page at {EXIT_GPA:#x}"
        )));
    }
    let mut pmvm = 0.0;
    let mut pmvm_writeback = 0.0;
    let mut unmapped = false;
    let mut submitted = false;
    let mut host_us = [0.0; HOST_METHODS];
    let order = order(n);
    let after_pmvm = order
        .windows(2)
        .find(|w| w[0] == HOST_METHODS)
        .map(|w| w[1]);
    for (k, method) in order.into_iter().enumerate() {
        if method == HOST_METHODS {
            let before = dev.stats();
            pmvm = timed(|| {
                dev.mmio_write(0, addr - EXIT_GPA, data)
                    .expect("the flush failed");
                Ok(())
            })?;
            let after = dev.stats();
            pmvm_writeback = (after.writeback_ns - before.writeback_ns) as f64 / 1e3;
            unmapped = after.unmapped_writebacks > before.unmapped_writebacks;
            submitted = after.submitted_writebacks > before.submitted_writebacks;
            continue;
        }
        // A value no earlier round stored, so each method has pages to write.
        let host = &hosts[method];
        host.dirty(pages, n * HOST_METHODS as u64 + k as u64)?;
        host_us[method] = timed(|| match method {
            FDATASYNC => host.fdatasync(),
            SUBMIT => host.submit_then_fdatasync(pages),
            MSYNC => host.msync_all(),
            _ => host.fsync(),
        })?;
    }
    let [fdatasync, submit, msync, fsync] = host_us;
    Ok(Round {
        pmvm,
        pmvm_writeback,
        unmapped,
        submitted,
        after_pmvm,
        fdatasync,
        submit,
        msync,
        fsync,
    })
}

/// The order of the five timed methods (the host's four, then pmvm's flush as number 4) in
/// round `n`: a Williams design, whose ten orders put each method first, and right after each
/// other one, equally often. Order matters on this kind of host: the first method meets a disk
/// that sat idle while the guest ran (its first I/O costs tens of microseconds more), and one
/// writeback slows the next by a few percent or not depending on what it was. With a fixed
/// rotation each method always followed the same one, which shifted the four host methods
/// (the same work) apart by up to 2% and lowered the floor, the fastest of them.
fn order(n: u64) -> [usize; HOST_METHODS + 1] {
    const M: usize = HOST_METHODS + 1;
    // 0, 1, M-1, 2, M-2, ...: each difference between neighbours occurs once.
    let mut first = [0; M];
    let (mut lo, mut hi) = (1, M - 1);
    for (i, slot) in first.iter_mut().enumerate().skip(1) {
        if i % 2 == 1 {
            *slot = lo;
            lo += 1;
        } else {
            *slot = hi;
            hi -= 1;
        }
    }
    let row = (n % (2 * M as u64)) as usize;
    let mut out = first.map(|m| (m + row % M) % M);
    // An odd number of methods needs the mirrored orders too.
    if row >= M {
        out.reverse();
    }
    out
}

/// `persist=adr` rounds before the measured ones, not counted: the first allocates the files'
/// blocks, the rest are the writebacks in which the device tries each way of writing back this
/// many pages (`writeback_way`) before it settles, as a VM does in its first flushes (a retry
/// of the settled unmap step may leave the last submit trial to a counted round).
/// `persist=flush` has only the first.
pub const WARM_UP: u64 = 1 + nvdimm::writeback_way::LEARNING_WRITEBACKS;

/// Up to this many pages a warm-up round runs the host methods too, as a measured round does:
/// the device then learns its way under the conditions it is measured in (the host's I/O
/// between two flushes changes which way is cheaper). Above it, where a round takes seconds,
/// pmvm's flush alone.
pub const FULL_WARM_UP_PAGES: u64 = 4096;

/// The host-only methods a round times, by their number in [`order`] and
/// [`Round::after_pmvm`]; pmvm's flush is number [`HOST_METHODS`].
pub const FDATASYNC: usize = 0;
pub const SUBMIT: usize = 1;
pub const MSYNC: usize = 2;
pub const FSYNC: usize = 3;
pub const HOST_METHODS: usize = 4;

/// How long one cell's VM may run: at 65,536 pages each round writes 256 MiB back five times,
/// which takes minutes where the disk is slow.
const RUN_LIMIT: Duration = Duration::from_secs(30 * 60);

/// How the measured VM tracks the guest's stores, as pmvm's `--dirty-tracking`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracking {
    Ring,
    Bitmap,
}

impl Tracking {
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Ring => "ring",
            Tracking::Bitmap => "bitmap",
        }
    }
}

/// One measured configuration of the device.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub tracking: Tracking,
    /// `persist=flush` (a private mapping, pages copied into the file) instead of `adr`.
    pub strict: bool,
}

/// What one cell measured.
pub struct Measured {
    pub rounds: Vec<Round>,
    /// Bitmap only: microseconds of one `KVM_GET_DIRTY_LOG` of the device's slot with nothing
    /// dirty (the bitmap copy-out alone, a part of every harvest), median of `GET_LOG_TIMES`.
    pub get_log_us: Option<f64>,
}

const GET_LOG_TIMES: usize = 9;

/// `rounds` measured rounds (after one warm-up round, which also allocates the files' blocks)
/// of flushing `pages` dirty pages on a sparse device of `size` bytes in `dir`.
pub fn measure(
    kvm: &Kvm,
    dir: &Path,
    size: u64,
    pages: u64,
    rounds: u64,
    setup: Setup,
) -> Result<Measured, BenchError> {
    let tracking = setup.tracking;
    if pages > guest::max_pages() || page_offset(pages) > size {
        return Err(BenchError::Check(format!(
            "{pages} dirty pages {} pages apart do not fit in a {size}-byte device below the \
             guest's mapped {} MiB",
            guest::STRIDE_PAGES,
            guest::MAPPED_END >> 20
        )));
    }
    let mut vm = TinyVm::new(kvm);
    let rings = match tracking {
        Tracking::Ring => Some(Arc::new(
            DirtyRings::enable(vm.vm.clone(), DEFAULT_RING_ENTRIES)
                .map_err(|e| BenchError::Check(format!("enabling the dirty ring: {e}")))?
                .ok_or_else(|| BenchError::Check("this KVM has no dirty ring".into()))?,
        )),
        Tracking::Bitmap => None,
    };
    let manual_protect = rings.is_none() && enable_manual_protect(&vm.vm)?;
    let image = dir.join(format!("pmem-{}M-{pages}.img", size >> 20));
    let persist = if setup.strict {
        PersistMode::Flush
    } else {
        PersistMode::Adr
    };
    let cfg = PmemConfig::new(image)
        .with_size(size >> 20 << 20)
        .with_sparse(true)
        .with_persist(persist);
    let params = NvdimmParams {
        index: 0,
        slot: 1,
        guest_base: SLOT_GPA,
        hint_page: EXIT_GPA,
        default_hints: 1,
        manual_protect,
    };
    let dev = Arc::new(Nvdimm::open(&cfg, params)?);
    // The one vCPU is the thread that flushes, out of the guest for the whole flush: the fence
    // pmvm's VMM gives `persist=flush` devices holds nothing else here.
    dev.set_vcpu_fence(Arc::new(|f: &mut dyn FnMut()| {
        f();
        Ok(())
    }));
    let hosts = host_files(dir, size, pages)?;
    // `persist=flush` takes no way to learn, and there each round costs seconds.
    let warm_up = if setup.strict { 1 } else { WARM_UP };
    let code = guest::dirty_then_flush(pages, rounds + warm_up);
    match &rings {
        Some(rings) => {
            dev.attach_ring(&vm.vm, rings.clone())?;
            vm.boot_with_ring(&code, |vcpu| {
                let handle = rings.add_vcpu(vcpu).expect("mapping the vCPU's dirty ring");
                Box::new(VcpuRing(rings.clone(), handle))
            });
        }
        None => {
            dev.attach(&vm.vm)?;
            vm.boot(&code);
        }
    }

    let results = Arc::new(Mutex::new(Vec::new()));
    let (d, r) = (dev.clone(), results.clone());
    let exits = vm.run_within(RUN_LIMIT, move |exit| {
        if let Exit::MmioWrite(addr, data) = exit {
            if *addr == guest::MARK_GPA {
                return;
            }
            let done = lock(&r).len() as u64;
            let outcome = if done < warm_up && pages > FULL_WARM_UP_PAGES {
                // pmvm's flush alone, not timed.
                d.mmio_write(0, addr - EXIT_GPA, data)
                    .map(|()| None)
                    .map_err(|e| BenchError::Check(format!("a warm-up flush failed: {e}")))
            } else if done < warm_up {
                // As measured rounds run, not counted.
                round(&d, &hosts, pages, (*addr, data), done).map(|_| None)
            } else {
                round(&d, &hosts, pages, (*addr, data), done - warm_up).map(Some)
            };
            lock(&r).push(outcome);
        }
    });
    let want = rounds + warm_up;
    let hint_exits = exits
        .iter()
        .filter(|e| matches!(e, Exit::MmioWrite(a, _) if *a != guest::MARK_GPA))
        .count() as u64;
    if hint_exits != want || exits.last() != Some(&Exit::Hlt) {
        return Err(BenchError::Check(format!(
            "the guest made {hint_exits} flush-hint exits (want {want}) and ended with {:?}",
            exits.last()
        )));
    }
    if dev.dirty_tracking().as_str() != tracking.name() {
        return Err(BenchError::Check(format!(
            "the device's dirty tracking ended as {} (want {})",
            dev.dirty_tracking(),
            tracking.name()
        )));
    }
    let st = dev.stats();
    if st.flushes != want || st.pages_written != want * pages || st.errors != 0 {
        return Err(BenchError::Check(format!(
            "{want} flushes of {pages} pages should write {} pages; the device counted {} \
             flushes, {} pages, {} errors",
            want * pages,
            st.flushes,
            st.pages_written,
            st.errors
        )));
    }
    let outcomes = std::mem::take(&mut *lock(&results));
    let mut measured = Vec::new();
    for outcome in outcomes {
        measured.extend(outcome?);
    }
    if tracking == Tracking::Ring {
        return Ok(Measured {
            rounds: measured,
            get_log_us: None,
        });
    }
    // The guest has halted and the last flush took everything, so these GETs find (and in
    // GET-clears mode consume) nothing.
    let mut get_log = Vec::new();
    for _ in 0..GET_LOG_TIMES {
        let start = Instant::now();
        vm.vm
            .get_dirty_log(dev.slot(), size as usize)
            .map_err(BenchError::kvm("read the device's dirty log"))?;
        get_log.push(micros(start.elapsed()));
    }
    Ok(Measured {
        rounds: measured,
        get_log_us: Some(crate::stats::median(&get_log)),
    })
}

/// One host file per host method, each made durable once a round as pmvm's is: on a virtual
/// disk a file synced again right after its last sync syncs 3-12% faster than one synced once
/// a round (measured at one dirty page), so sharing one file, the four methods would meet a
/// warmer disk than pmvm does and set the floor too low. Each file's pages are written and
/// synced once first, so that no counted round allocates their blocks.
fn host_files(dir: &Path, size: u64, pages: u64) -> Result<[HostFile; HOST_METHODS], BenchError> {
    let create = |name: &str| -> Result<HostFile, BenchError> {
        let path = dir.join(format!("host-{name}-{}M-{pages}.img", size >> 20));
        let host = HostFile::create(&path, size)?;
        host.dirty(pages, u64::MAX)?;
        host.fdatasync()?;
        Ok(host)
    };
    // In the order of FDATASYNC to FSYNC.
    Ok([
        create("fdatasync")?,
        create("submit")?,
        create("msync")?,
        create("fsync")?,
    ])
}

/// Checks that [`order`] is the balanced design it claims to be; `cargo test` runs it (the
/// bench's `main` without `--bench`).
pub fn check_order() -> Result<(), String> {
    const M: usize = HOST_METHODS + 1;
    let mut first = [0; M];
    let mut after = [[0; M]; M];
    for n in 0..2 * M as u64 {
        let o = order(n);
        let mut seen = o;
        seen.sort_unstable();
        if seen != std::array::from_fn(|i| i) {
            return Err(format!("round {n} orders {o:?}, not each method once"));
        }
        first[o[0]] += 1;
        for w in o.windows(2) {
            after[w[0]][w[1]] += 1;
        }
    }
    if first != [2; M] {
        return Err(format!("methods come first {first:?} times in 10 rounds"));
    }
    for (a, row) in after.iter().enumerate() {
        for (b, &count) in row.iter().enumerate() {
            if a != b && count != 2 {
                return Err(format!("method {b} follows {a} {count} times in 10 rounds"));
            }
        }
    }
    Ok(())
}
