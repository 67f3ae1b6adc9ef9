//! What a device needs from a VM-wide record of guest stores: the VMM's KVM dirty rings, whose
//! entries name a memslot, so one record feeds every device of the VM and a harvest for one
//! device moves the pages of all of them. The rings themselves (per vCPU, enabled before any
//! vCPU exists, overflow and re-arming) are the VMM's; a device only registers its slot and
//! asks for what the guest wrote.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use vmm_sys_util::errno;

use crate::page_set::PageSet;

/// A VM-wide record of the pages the guest wrote, shared by every device of the VM.
///
/// Lock order: the source first, then a device's pending set. A device never calls into the
/// source while it holds its pending lock.
pub trait DirtySource: Send + Sync {
    /// Routes the pages of the dirty-logged memslot `region` into `pending` from now on. The
    /// device calls [`DirtySource::unregister`] before it deletes the slot or unmaps its memory
    /// (the source may set the region again to re-arm it).
    fn register(&self, region: kvm_userspace_memory_region, pending: Arc<Mutex<PageSet>>);

    /// Stops routing the pages of memslot `slot`.
    fn unregister(&self, slot: u32);

    /// Moves every page recorded so far, of every registered slot, into its device's pending
    /// set and write-protects those pages again. Returns once they are protected, so a
    /// writeback that starts after it loses no store. Every collector is serialised until
    /// that point: one that finds nothing knows pages another took are already pending.
    fn collect(&self) -> Result<(), DirtySourceError>;

    /// The pages of `slot` recorded and not collected yet, without collecting them (a stats
    /// read must not re-protect the guest's pages). None while the record is untrusted.
    fn peek(&self, slot: u32) -> Option<Vec<u64>>;

    /// Whether the record overflowed and is untrusted: collects then mark whole devices
    /// pending (nothing lost, every writeback covers the whole device) until a re-arm.
    fn overflowed(&self) -> bool;

    /// After an overflow, and only while no vCPU is in the guest or can enter it: marks every
    /// registered page pending and makes the record exact again from the next writeback on.
    /// Returns whether there was anything to re-arm; on an error it stays untrusted.
    fn rearm(&self) -> Result<bool, DirtySourceError>;
}

/// A [`DirtySource`] operation failed: what failed, and the host's errno if one is known (it
/// reaches the `io-error` report).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct DirtySourceError {
    pub what: String,
    #[source]
    pub errno: Option<errno::Error>,
}
