//! Keeps `persist=flush` memory bounded: after a writeback, the private copies of the pages it
//! made durable are dropped, so they read the (now equal) file again and stop counting in
//! pmvm's memory. Without this every page the guest ever wrote stays a private copy.
//!
//! A store that lands on a page between its pwrite and the drop would be lost, so the device
//! drops pages only while every vCPU is out of the guest (the VMM's [`VcpuFence`]), and only
//! those not written since the harvest: it harvests again inside the fence, and a page in the
//! pending set afterwards keeps its copy for the next flush.

use std::sync::Arc;

use crate::mmap::{Mapping, MmapError};
use crate::page_set::{PageSet, Run};
use crate::PAGE_SIZE;

/// Runs the closure while no vCPU is in the guest and none can enter it; errs (without
/// running it) if some vCPU would not leave in time.
pub type VcpuFence = Arc<dyn Fn(&mut dyn FnMut()) -> Result<(), String> + Send + Sync>;

/// Drops the private copies of the pages of `written` below `size` bytes that `pending` does
/// not hold. Returns the pages dropped. The caller holds the fence and has harvested into
/// `pending`.
pub fn drop_clean_copies(
    mapping: &Mapping,
    written: &[Run],
    pending: &PageSet,
    size: u64,
) -> Result<u64, MmapError> {
    let end_page = size / PAGE_SIZE;
    let mut dropped = 0;
    for run in written {
        let end = (run.first_page + run.pages).min(end_page);
        let mut page = run.first_page;
        while page < end {
            if pending.contains(page) {
                page += 1;
                continue;
            }
            let first = page;
            while page < end && !pending.contains(page) {
                page += 1;
            }
            mapping.discard(first * PAGE_SIZE, (page - first) * PAGE_SIZE)?;
            dropped += page - first;
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Sharing;
    use std::io::Write;

    #[test]
    fn drops_written_copies_and_keeps_the_pending_ones() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 8 * 4096]).unwrap();
        let m = Mapping::with_sharing(&f, 8 * PAGE_SIZE, true, Sharing::Private).unwrap();
        for page in 0..8u64 {
            m.write_at(page * PAGE_SIZE, &[page as u8 + 1]).unwrap();
        }
        let mut pending = PageSet::new(8);
        pending.insert(2);
        let written = [
            Run {
                first_page: 1,
                pages: 3,
            },
            Run {
                first_page: 6,
                pages: 4,
            },
        ];
        // Pages 1, 3, 6 and 7 are dropped (8 and 9 lie past the device); 2 is pending.
        assert_eq!(
            drop_clean_copies(&m, &written, &pending, 8 * PAGE_SIZE).unwrap(),
            4
        );
        let byte = |page: u64| {
            let mut b = [0u8];
            m.read_at(page * PAGE_SIZE, &mut b).unwrap();
            b[0]
        };
        let now: Vec<u8> = (0..8).map(byte).collect();
        assert_eq!(now, [1, 0, 3, 0, 5, 6, 0, 0], "dropped pages read the file");
    }
}
