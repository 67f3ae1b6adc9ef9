//! Attaching a device to a VM: its KVM memslot and the dirty tracking that feeds its pending
//! pages.

use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

use super::Nvdimm;
use crate::dirty::{DirtyLog, DirtyLogMode};
use crate::dirty_source::DirtySource;
use crate::lock::lock;
use crate::mmap::Mapping;
use crate::NvdimmError;

/// The KVM memslot backed by the device's mapping; removing it on drop.
pub(super) struct MemSlot {
    vm: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    /// Keeps the memory KVM points at mapped for as long as the slot exists.
    _mapping: Arc<Mapping>,
}

impl Drop for MemSlot {
    fn drop(&mut self) {
        let remove = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: deleting a slot (size 0) makes KVM drop its reference to our memory; the
        // mapping is still alive here because this struct holds an Arc to it.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(remove) } {
            log::error!("removing memslot {} failed: {e}", self.region.slot);
        }
    }
}

/// Where a device learns which pages the guest wrote.
pub(super) enum Tracker {
    /// The memslot's own bitmap: a harvest costs O(device size).
    Log(DirtyLog),
    /// The VM-wide record (the VMM's per-vCPU dirty rings), which fills the device's pending
    /// set: O(pages written).
    Ring(Arc<dyn DirtySource>),
}

/// What attaching to a VM set up.
pub(super) struct Attachment {
    /// Declared first: dropped (slot removed) before the dirty log's VM reference goes.
    pub(super) memslot: MemSlot,
    /// None for read-only devices, which are not logged.
    pub(super) dirty: Option<Tracker>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Before the slot goes: the rings may re-register a slot they know of.
        if let Some(Tracker::Ring(rings)) = &self.dirty {
            rings.unregister(self.memslot.region.slot);
        }
    }
}

impl Nvdimm {
    /// Registers the pmem range as a KVM memslot: dirty-logged if writable, `KVM_MEM_READONLY`
    /// if not (guest writes then exit as MMIO and never reach the file). Once per device.
    /// Harvests read the slot's dirty bitmap (`NvdimmParams::manual_protect` says how).
    pub fn attach(&self, vm: &Arc<VmFd>) -> Result<(), NvdimmError> {
        self.attach_tracked(vm, None)
    }

    /// Like [`Nvdimm::attach`], on a VM whose dirty ring is on: `source` (the VMM's rings)
    /// feeds this device's pending pages, and harvests cost O(pages written).
    pub fn attach_ring(
        &self,
        vm: &Arc<VmFd>,
        source: Arc<dyn DirtySource>,
    ) -> Result<(), NvdimmError> {
        self.attach_tracked(vm, Some(source))
    }

    fn attach_tracked(
        &self,
        vm: &Arc<VmFd>,
        source: Option<Arc<dyn DirtySource>>,
    ) -> Result<(), NvdimmError> {
        let _serial = lock(&self.attaching);
        if self.attachment.get().is_some() {
            return Err(NvdimmError::AlreadyAttached {
                id: self.id.clone(),
            });
        }
        self.open_flush_log()?;
        let flags = if self.readonly() {
            KVM_MEM_READONLY
        } else {
            KVM_MEM_LOG_DIRTY_PAGES
        };
        let region = kvm_userspace_memory_region {
            slot: self.params.slot,
            flags,
            guest_phys_addr: self.params.guest_base,
            memory_size: self.size(),
            userspace_addr: self.mapping.host_addr(),
        };
        // SAFETY: userspace_addr..+memory_size is our mapping, valid and of that length; the
        // MemSlot built below holds an Arc to it and deletes the slot before releasing it, so
        // KVM never sees the range unmapped. KVM itself rejects a slot overlapping another.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| NvdimmError::Memslot {
            id: self.id.clone(),
            slot: region.slot,
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            source,
        })?;
        let memslot = MemSlot {
            vm: vm.clone(),
            region,
            _mapping: self.mapping.clone(),
        };
        let mode = if self.params.manual_protect {
            DirtyLogMode::ManualProtect
        } else {
            DirtyLogMode::GetClears
        };
        let dirty = (!self.readonly()).then(|| match source {
            Some(source) => {
                source.register(region, self.pending.clone());
                Tracker::Ring(source)
            }
            None => Tracker::Log(DirtyLog::new(
                vm.clone(),
                region.slot,
                region.memory_size,
                mode,
            )),
        });
        let attached = Attachment { memslot, dirty };
        if self.attachment.set(attached).is_err() {
            // Unreachable: `attaching` serialises attach and we checked above.
            log::error!("{}: attached twice", self.id);
        }
        Ok(())
    }
}
