//! Guest RAM: where it lives and how the e820 map describes it.

use vm_memory::GuestAddress;

use crate::layout;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// RAM regions for `size` bytes: below the 32-bit MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(layout::HIGH_RAM_START), (size - low) as usize));
    }
    ranges
}

/// End of RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(layout::MMIO_GAP_START)
}

/// First guest-physical address above all RAM and above 4 GiB.
pub fn ram_top(size: u64) -> u64 {
    let above = size.saturating_sub(layout::MMIO_GAP_START);
    layout::HIGH_RAM_START + above
}

/// The e820 map: RAM below the EBDA, the BIOS area reserved (it holds the ACPI tables), RAM
/// from 1 MiB, and RAM above 4 GiB. NVDIMMs and flush hints are deliberately absent: the NFIT
/// describes them.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: layout::HIMEM_START,
            size: low_ram_end(size) - layout::HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if size > layout::MMIO_GAP_START {
        map.push(E820Entry {
            addr: layout::HIGH_RAM_START,
            size: size - layout::MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(ram_top(512 << 20), 1 << 32);
        let map = e820_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr + map[2].size, 512 << 20);
    }

    #[test]
    fn large_guest_splits_around_the_gap() {
        let size = 5u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(r[0], (GuestAddress(0), layout::MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[1].1 as u64, size - layout::MMIO_GAP_START);
        assert_eq!(ram_top(size), (1 << 32) + size - layout::MMIO_GAP_START);
        let map = e820_map(size);
        assert_eq!(
            map.iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum::<u64>(),
            size - (layout::HIMEM_START - layout::EBDA_START)
        );
        // Nothing in the map touches the flush-hint page.
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= layout::FLUSH_HINT_START
                    || e.addr >= layout::MMIO_GAP_END)
        );
    }
}
