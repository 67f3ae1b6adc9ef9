//! The only place that reads or clears the KVM dirty log of a pmem memslot.
//!
//! Two modes, fixed when the device is attached:
//! - **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): `KVM_GET_DIRTY_LOG` only reads,
//!   and `KVM_CLEAR_DIRTY_LOG` clears and write-protects exactly the pages we pass. A harvest is
//!   GET then CLEAR of the returned bits; pages dirtied in between stay logged for the next one.
//!   The log can also be peeked (GET alone) for the stats table.
//! - **GET clears**: `KVM_GET_DIRTY_LOG` reads, clears and write-protects in one call, so the
//!   log cannot be peeked without losing pages.
//!
//! Either way the caller must write the pages back *after* the harvest returns: a store that
//! lands after the page was re-protected is logged again, one before it is in the page cache.

use std::sync::Arc;

use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::page_set::PageSet;
use crate::PAGE_SIZE;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// A dirty-log ioctl failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DirtyError {
    #[error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) failed")]
    EnableManualProtect {
        #[source]
        source: errno::Error,
    },
    #[error("KVM_GET_DIRTY_LOG of memslot {slot} failed")]
    Get {
        slot: u32,
        #[source]
        source: errno::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG of memslot {slot} (pages {first_page}..+{num_pages}) failed")]
    Clear {
        slot: u32,
        first_page: u64,
        num_pages: u32,
        #[source]
        source: errno::Error,
    },
}

/// How the dirty log of a slot is harvested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    ManualProtect,
    GetClears,
}

/// Turns on manual dirty-log protection for the whole VM if KVM supports it, and says whether it
/// is on. Call it before creating any logged memslot. Only `MANUAL_PROTECT_ENABLE` is set, not
/// `INITIALLY_SET`, so the first GET reports exactly the pages written since the slot was made.
pub fn enable_manual_protect(vm: &VmFd) -> Result<bool, DirtyError> {
    let supported = vm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    // The check returns the flags KVM accepts for this cap; 0 means unsupported.
    if supported <= 0 || supported as u64 & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
        return Ok(false);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into();
    vm.enable_cap(&cap)
        .map_err(|source| DirtyError::EnableManualProtect { source })?;
    Ok(true)
}

/// Words in the bitmap of a slot of `size` bytes.
pub fn bitmap_words(size: u64) -> usize {
    (size / PAGE_SIZE).div_ceil(64) as usize
}

/// The dirty log of one memslot.
#[derive(Debug)]
pub struct DirtyLog {
    vm: Arc<VmFd>,
    slot: u32,
    size: u64,
    mode: DirtyLogMode,
    /// The bitmap KVM fills, allocated once: a flush allocates nothing of the device's size.
    buffer: Mutex<Vec<u64>>,
}

impl DirtyLog {
    /// `size` is the slot's size in bytes. The slot must have `KVM_MEM_LOG_DIRTY_PAGES`, and
    /// `ManualProtect` requires [`enable_manual_protect`] to have returned true on this VM.
    pub fn new(vm: Arc<VmFd>, slot: u32, size: u64, mode: DirtyLogMode) -> Self {
        DirtyLog {
            vm,
            slot,
            size,
            mode,
            buffer: Mutex::new(vec![0; bitmap_words(size)]),
        }
    }

    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// Adds the pages written since the last harvest to `set` (sized for the slot); they are
    /// write-protected and logged afresh. If clearing fails, `set` still holds them, so they
    /// stay pending. Concurrent harvests of one slot must be serialised by the caller.
    pub fn harvest_into(&self, set: &mut PageSet) -> Result<(), DirtyError> {
        let logged = self.get()?;
        set.or_bitmap(&logged);
        if self.mode == DirtyLogMode::ManualProtect {
            // Exactly the bits GET returned: pages dirtied since stay logged for the next one.
            self.clear(&logged)?;
        }
        Ok(())
    }

    /// How many pages of the union of `set` and the log a harvest would take now, without
    /// clearing anything. None in `GetClears` mode, where reading the log consumes it.
    pub fn peek_union(&self, set: &PageSet) -> Result<Option<u64>, DirtyError> {
        match self.mode {
            DirtyLogMode::ManualProtect => Ok(Some(set.union_len(&self.get()?))),
            DirtyLogMode::GetClears => Ok(None),
        }
    }

    /// KVM_GET_DIRTY_LOG into the reused buffer, returned locked.
    fn get(&self) -> Result<MutexGuard<'_, Vec<u64>>, DirtyError> {
        let mut buffer = crate::lock::lock(&self.buffer);
        let log = kvm_dirty_log {
            slot: self.slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: buffer.as_mut_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: the VM fd is valid (owned by `self.vm`); `log` points at `buffer`, which holds
        // bitmap_words(size) u64 words, exactly what KVM writes for a slot of `size` bytes, and
        // stays locked and alive across the call.
        let rc = unsafe { ioctl_with_ref(self.vm.as_ref(), KVM_GET_DIRTY_LOG(), &log) };
        if rc != 0 {
            return Err(DirtyError::Get {
                slot: self.slot,
                source: errno::Error::last(),
            });
        }
        Ok(buffer)
    }

    /// Clears exactly the bits set in `bitmap`, in one call spanning the words that have any.
    fn clear(&self, bitmap: &[u64]) -> Result<(), DirtyError> {
        let Some(first_word) = bitmap.iter().position(|&w| w != 0) else {
            return Ok(());
        };
        let last_word = bitmap.iter().rposition(|&w| w != 0).unwrap_or(first_word);
        let slot_pages = self.size / PAGE_SIZE;
        // KVM wants first_page and num_pages in multiples of 64 unless the range reaches the
        // slot's end: whole words satisfy that.
        let first_page = first_word as u64 * 64;
        let end_page = ((last_word as u64 + 1) * 64).min(slot_pages);
        let num_pages = (end_page - first_page) as u32;
        let words = &bitmap[first_word..=last_word];
        let clear = kvm_clear_dirty_log {
            slot: self.slot,
            num_pages,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: the VM fd is valid (owned by `self.vm`); `clear` points at `words`, which holds
        // ceil(num_pages / 64) u64 words and outlives the call; KVM only reads the bitmap.
        let rc = unsafe { ioctl_with_ref(self.vm.as_ref(), KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc != 0 {
            return Err(DirtyError::Clear {
                slot: self.slot,
                first_page,
                num_pages,
                source: errno::Error::last(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_sizes() {
        assert_eq!(bitmap_words(2 << 20), 8);
        assert_eq!(bitmap_words(64 * PAGE_SIZE), 1);
        assert_eq!(bitmap_words(65 * PAGE_SIZE), 2);
    }

    #[test]
    fn clear_ioctl_number_matches_the_kernel() {
        // _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log): 24-byte argument.
        assert_eq!(std::mem::size_of::<kvm_clear_dirty_log>(), 24);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
        // _IOW(KVMIO, 0x42, struct kvm_dirty_log): 16-byte argument.
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
    }
}
