//! The rings' memory as KVM lays it out: entries, their flags, and walking a ring in push
//! order.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

use kvm_bindings::{kvm_dirty_gfn, KVMIO};
use nvdimm::mmap::Mapping;
use nvdimm::page_set::PageSet;
use vmm_sys_util::ioctl_io_nr;

use super::Sink;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `flags` of a ring entry: KVM published it (linux/kvm.h KVM_DIRTY_GFN_F_DIRTY)...
pub(super) const KVM_DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// ...and the VMM harvested it (KVM_DIRTY_GFN_F_RESET).
pub(super) const KVM_DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// Bytes of one ring entry (`struct kvm_dirty_gfn`).
pub(super) const ENTRY_BYTES: u64 = std::mem::size_of::<kvm_dirty_gfn>() as u64;

/// One vCPU's ring and how many entries KVM has freed in it: where KVM frees next, and, while
/// the ring is trusted and aligned, where the next unharvested entry is. Read without the lock
/// by the vCPU before each `KVM_RUN` ([`VcpuRingHandle::mark`]).
pub(super) struct VcpuRing {
    pub(super) map: Arc<Mapping>,
    pub(super) freed: Arc<AtomicU64>,
    /// Re-armed and no entry published since: where KVM pushes next is unknown (module
    /// comment, "Re-arming").
    pub(super) unaligned: bool,
    /// Re-armed once: KVM may count whole rings of entries from the overflow beyond `freed`.
    pub(super) phantom: bool,
}

/// Walks one ring in push order from entry `start` while entries are published, at most
/// `limit`, routes each page to its sink and marks the entry harvested; returns how many it
/// walked. Leaves `freed` alone: KVM's reset count moves it.
pub(super) fn walk_ring(
    ring: &VcpuRing,
    start: u64,
    limit: u64,
    sinks: &[Sink],
    stray: &mut u64,
) -> u64 {
    let size = ring.map.len() / ENTRY_BYTES;
    let mut walked = 0;
    // The pending set of the last entry's slot stays locked while the entries after it name
    // the same slot, as most do: one lock per run of them rather than one per page.
    let mut held: Option<(u32, MutexGuard<'_, PageSet>)> = None;
    while walked < limit {
        let Some((flags, slot, page)) = published(ring, start + walked, size) else {
            break;
        };
        if held.as_ref().is_none_or(|(s, _)| *s != slot) {
            // Released first: never two devices' sets at once.
            drop(held.take());
            held = sinks.iter().find(|s| s.region.slot == slot).map(|s| {
                let set = s.pending.lock().unwrap_or_else(|e| e.into_inner());
                (slot, set)
            });
        }
        let routed = held.as_mut().is_some_and(|(_, set)| set.insert(page));
        if !routed {
            *stray += 1;
            log::warn!("dirty ring entry for slot {slot:#x} page {page} has no device");
        }
        flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
        walked += 1;
    }
    walked
}

/// Marks the entry at position `index` harvested, whatever it holds.
pub(super) fn mark_harvested(ring: &VcpuRing, index: u64, size: u64) {
    if let Ok(flags) = ring.map.atomic_u32((index % size) * ENTRY_BYTES) {
        flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
    }
}

/// Where the published entries of a re-armed ring start.
pub(super) enum RunStart {
    None,
    /// This many entries after `freed`.
    At(u64),
    /// Every entry is published: the ring overflowed again.
    Everywhere,
}

/// Finds the one run of published entries in a re-armed ring (KVM pushes in order, so they
/// are contiguous): the published entry whose predecessor is not, counted from `start`.
pub(super) fn first_published(ring: &VcpuRing, start: u64, size: u64) -> RunStart {
    let is_published = |index: u64| published(ring, index, size).is_some();
    let mut any = false;
    for k in 0..size {
        if is_published(start + k) {
            any = true;
            if !is_published(start + k + size - 1) {
                return RunStart::At(k);
            }
        }
    }
    if any {
        RunStart::Everywhere
    } else {
        RunStart::None
    }
}

/// The entry at position `index` of `ring` if KVM has published it: its flags word, slot and
/// page.
pub(super) fn published(ring: &VcpuRing, index: u64, size: u64) -> Option<(&AtomicU32, u32, u64)> {
    let at = (index % size) * ENTRY_BYTES;
    let flags = ring.map.atomic_u32(at).ok()?;
    if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
        return None;
    }
    let mut raw = [0u8; ENTRY_BYTES as usize];
    ring.map.read_at(at, &mut raw).ok()?;
    // struct kvm_dirty_gfn { u32 flags; u32 slot; u64 offset; }, native endian. The upper 16
    // bits of `slot` are the address space; pmvm uses only 0.
    let slot = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&raw[8..16]);
    Some((flags, slot, u64::from_ne_bytes(offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_constants_match_the_kernel() {
        assert_eq!(ENTRY_BYTES, 16);
        // _IO(KVMIO, 0xc7)
        assert_eq!(KVM_RESET_DIRTY_RINGS(), 0xaec7);
        assert_eq!((KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET), (1, 2));
        assert_eq!(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET, 64);
    }

    fn sink(slot: u32, pages: u64) -> Sink {
        Sink {
            region: kvm_bindings::kvm_userspace_memory_region {
                slot,
                ..Default::default()
            },
            pending: Arc::new(std::sync::Mutex::new(PageSet::new(pages))),
        }
    }

    #[test]
    fn a_walk_routes_each_entry_to_its_slots_set_and_marks_it_harvested() {
        let file = tempfile::tempfile().unwrap();
        let size = 16;
        file.set_len(size * ENTRY_BYTES).unwrap();
        let map = Mapping::new(&file, size * ENTRY_BYTES, true).unwrap();
        // Slots alternate in runs, one entry names no device, and the walk stops at the first
        // entry KVM has not published.
        let entries = [
            (1, 3),
            (1, 4),
            (2, 3),
            (1, 5),
            (2, 7),
            (2, 8),
            (9, 1),
            (1, 6),
        ];
        for (i, &(slot, page)) in entries.iter().enumerate() {
            let mut raw = [0u8; ENTRY_BYTES as usize];
            raw[..4].copy_from_slice(&KVM_DIRTY_GFN_F_DIRTY.to_ne_bytes());
            raw[4..8].copy_from_slice(&u32::to_ne_bytes(slot));
            raw[8..].copy_from_slice(&u64::to_ne_bytes(page));
            map.write_at(i as u64 * ENTRY_BYTES, &raw).unwrap();
        }
        let ring = VcpuRing {
            map: Arc::new(map),
            freed: Arc::new(AtomicU64::new(0)),
            unaligned: false,
            phantom: false,
        };
        let sinks = [sink(1, 64), sink(2, 64)];
        let mut stray = 0;
        assert_eq!(walk_ring(&ring, 0, size, &sinks, &mut stray), 8);
        assert_eq!(stray, 1);
        let pages = |s: &Sink| {
            let set = s.pending.lock().unwrap();
            (0..64).filter(|&p| set.contains(p)).collect::<Vec<_>>()
        };
        assert_eq!(pages(&sinks[0]), [3, 4, 5, 6]);
        assert_eq!(pages(&sinks[1]), [3, 7, 8]);
        for i in 0..size {
            let flags = ring
                .map
                .atomic_u32(i * ENTRY_BYTES)
                .unwrap()
                .load(Ordering::Acquire);
            let want = if i < 8 { KVM_DIRTY_GFN_F_RESET } else { 0 };
            assert_eq!(flags, want, "entry {i}");
        }
    }
}
