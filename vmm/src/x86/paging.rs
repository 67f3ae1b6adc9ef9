//! Guest virtual to physical translation, to show the instruction a dead vCPU stopped at.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates `va` through 4-level page tables rooted at `cr3`. `None` when unmapped or the
/// tables are not in RAM.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
    let mut table = cr3 & ADDR_MASK;
    // Levels: PML4 (bits 47:39), PDPT (38:30), PD (29:21), PT (20:12).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        let huge = (level == 1 || level == 2) && entry & PAGE_SIZE_BIT != 0;
        if huge || level == 3 {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Up to 15 bytes at `va`, stopping at the end of its page.
pub fn instruction_bytes(mem: &GuestMemoryMmap, cr3: u64, paging: bool, va: u64) -> Vec<u8> {
    let pa = if paging {
        translate(mem, cr3, va)
    } else {
        Some(va)
    };
    let Some(pa) = pa else {
        return Vec::new();
    };
    let len = (15u64).min(0x1000 - (pa & 0xfff)) as usize;
    let mut buf = vec![0u8; len];
    match mem.read_slice(&mut buf, GuestAddress(pa)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_2m_and_4k_mappings() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[0] 2 MiB page at 0x200000,
        // PD[1] -> PT 0x4000 whose entry 5 maps 0x205000 -> 0x7000.
        mem.write_obj(0x2000u64 | 3, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x3000u64 | 3, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x20_0000u64 | 0x83, GuestAddress(0x3000))
            .unwrap();
        mem.write_obj(0x4000u64 | 3, GuestAddress(0x3008)).unwrap();
        mem.write_obj(0x7000u64 | 3, GuestAddress(0x4000 + 5 * 8))
            .unwrap();
        assert_eq!(translate(&mem, 0x1000, 0x1234), Some(0x20_1234));
        assert_eq!(translate(&mem, 0x1000, 0x20_5010), Some(0x7010));
        assert_eq!(translate(&mem, 0x1000, 0x20_6000), None);
        mem.write_slice(&[0xf0, 0x48, 0x0f], GuestAddress(0x7010))
            .unwrap();
        assert_eq!(
            instruction_bytes(&mem, 0x1000, true, 0x20_5010)[..3],
            [0xf0, 0x48, 0x0f]
        );
        assert_eq!(
            instruction_bytes(&mem, 0x1000, true, 0x20_6000),
            Vec::<u8>::new()
        );
    }
}
