//! What dirty tracking costs guest stores: the same store loop into a memslot with
//! `KVM_MEM_LOG_DIRTY_PAGES` and into one without, timed from the vCPU's resuming after a
//! marker exit to the next marker. Between rounds the logged slot's log is read and cleared
//! (GET clears it here), as a flush does, so every round's first store to each page faults
//! again. The memory is a memfd: no host writeback runs under the stores.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use nvdimm::lock::lock;
use nvdimm::mmap::Mapping;

use crate::common::{Exit, TinyVm};
use crate::error::BenchError;
use crate::guest::{self, page_offset, SLOT_GPA};
use crate::stats::micros;

const SLOT: u32 = 1;
const ALIGN: u64 = 2 << 20;

/// The measured memslot; deleted from the VM before its memory is unmapped.
struct Slot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    _map: Mapping,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let remove = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: deleting the slot drops KVM's reference to `_map`, which is still mapped:
        // fields drop after this body runs.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(remove) } {
            eprintln!("bench: removing memslot {} failed: {e}", self.region.slot);
        }
    }
}

fn memfd(len: u64) -> Result<File, BenchError> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create reads only it.
    let fd = unsafe { libc::memfd_create(c"pmvm-bench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BenchError::io("memfd_create")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)
        .map_err(BenchError::io(format!("sizing a memfd to {len} bytes")))?;
    Ok(file)
}

#[derive(Default)]
struct Marks {
    exits: u64,
    resumed: Option<Instant>,
    times: Vec<f64>,
    logged_pages: Vec<u64>,
    error: Option<String>,
}

/// Microseconds each measured round of stores to `pages` pages took, logged or not; one
/// warm-up round (which faults the pages in) comes first and is not counted.
pub fn measure(kvm: &Kvm, pages: u64, rounds: u64, logged: bool) -> Result<Vec<f64>, BenchError> {
    if pages == 0 || pages > guest::max_pages() {
        return Err(BenchError::Check(format!(
            "{pages} pages: the dirty-tracking bench needs 1 to {} pages",
            guest::max_pages()
        )));
    }
    let len = page_offset(pages).div_ceil(ALIGN) * ALIGN;
    let file = memfd(len)?;
    let map = Mapping::new(&file, len, true).map_err(BenchError::mmap("mapping the memfd"))?;
    let mut vm = TinyVm::new(kvm);
    let region = kvm_userspace_memory_region {
        slot: SLOT,
        flags: if logged { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: SLOT_GPA,
        memory_size: len,
        userspace_addr: map.host_addr(),
    };
    // SAFETY: the range is `map`, mapped for `len` bytes; `Slot` owns it and deletes the
    // memslot before unmapping it.
    unsafe { vm.vm.set_user_memory_region(region) }
        .map_err(BenchError::kvm("add the dirty-tracking memslot"))?;
    let _slot = Slot {
        vm: vm.vm.clone(),
        region,
        _map: map,
    };
    vm.boot(&guest::marked_stores(pages, rounds + 1));

    let marks = Arc::new(Mutex::new(Marks::default()));
    let (m, kvm_vm) = (marks.clone(), vm.vm.clone());
    let exits = vm.run(move |exit| {
        let Exit::MmioWrite(..) = exit else {
            return;
        };
        let now = Instant::now();
        let mut m = lock(&m);
        m.exits += 1;
        if m.exits % 2 == 0 {
            if let Some(resumed) = m.resumed.take() {
                m.times.push(micros(now - resumed));
            }
            return;
        }
        if logged {
            match kvm_vm.get_dirty_log(SLOT, len as usize) {
                Ok(bits) => {
                    let n = bits.iter().map(|w| u64::from(w.count_ones())).sum();
                    m.logged_pages.push(n);
                }
                Err(e) => m.error = Some(format!("KVM_GET_DIRTY_LOG failed: {e}")),
            }
        }
        m.resumed = Some(Instant::now());
    });
    let m = std::mem::take(&mut *lock(&marks));
    if let Some(e) = m.error {
        return Err(BenchError::Check(e));
    }
    let want = 2 * (rounds + 1);
    if m.exits != want || exits.last() != Some(&Exit::Hlt) {
        return Err(BenchError::Check(format!(
            "the marker guest made {} exits (want {want}) and ended with {:?}",
            m.exits,
            exits.last()
        )));
    }
    // The log read at round i's first marker holds round i-1's stores: all the pages.
    if logged && m.logged_pages.iter().skip(1).any(|&n| n != pages) {
        return Err(BenchError::Check(format!(
            "the dirty log saw {:?} pages per round; the guest stored to {pages}",
            m.logged_pages
        )));
    }
    Ok(m.times.into_iter().skip(1).collect())
}
