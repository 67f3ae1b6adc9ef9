//! Keeps `persist=flush` memory bounded: after writebacks, the private copies of the pages they
//! made durable are dropped, so they read the (now equal) file again and stop counting in
//! pmvm's memory. Without this every page the guest ever wrote stays a private copy.
//!
//! A store that lands on a page between its pwrite and the drop would be lost, so the device
//! drops pages only while every vCPU is out of the guest (the VMM's [`VcpuFence`]), and only
//! those not written since the harvest: it harvests again inside the fence, and a page in the
//! pending set afterwards keeps its copy for the next flush.
//!
//! Dropping costs a fence, a harvest and an `madvise` per range, so the device batches it:
//! copies written back wait until there are [`BATCH_PAGES`] of them or [`BATCH_WRITEBACKS`]
//! writebacks have passed, which bounds what they hold to `BATCH_PAGES` pages beyond the pages
//! dirtied since. Ranges a few clean pages apart are dropped in one call: every private copy
//! not pending equals the file (it was written back and not stored to since), and a page never
//! copied just maps the file again, so dropping the pages between two ranges loses nothing.

use std::sync::Arc;

use crate::mmap::{Mapping, MmapError};
use crate::page_set::{PageSet, Run};
use crate::PAGE_SIZE;

/// Runs the closure while no vCPU is in the guest and none can enter it; errs (without
/// running it) if some vCPU would not leave in time.
pub type VcpuFence = Arc<dyn Fn(&mut dyn FnMut()) -> Result<(), String> + Send + Sync>;

/// Copies written back wait for a drop until there are this many (16 MiB)...
pub const BATCH_PAGES: u64 = 4096;
/// ...or this many writebacks have passed since the last drop.
pub const BATCH_WRITEBACKS: u64 = 16;
/// Two ranges to drop this close (in pages not to drop between them) go in one call.
const MERGE_GAP_PAGES: u64 = 16;

/// Drops the private copies of the pages of `written` (in page order) below `size` bytes that
/// `pending` does not hold, and of non-pending pages at most `MERGE_GAP_PAGES` between two of
/// them. Returns the pages of `written` dropped. The caller holds the fence and has harvested
/// into `pending`.
pub fn drop_clean_copies(
    mapping: &Mapping,
    written: &[Run],
    pending: &PageSet,
    size: u64,
) -> Result<u64, MmapError> {
    let end_page = size / PAGE_SIZE;
    let mut dropped = 0;
    let discard =
        |(first, end): (u64, u64)| mapping.discard(first * PAGE_SIZE, (end - first) * PAGE_SIZE);
    // The range being gathered: [first, end).
    let mut range: Option<(u64, u64)> = None;
    for run in written {
        let end = (run.first_page + run.pages).min(end_page);
        let mut page = run.first_page;
        while page < end {
            if pending.contains(page) {
                range.take().map(discard).transpose()?;
                page += 1;
                continue;
            }
            let first = page;
            while page < end && !pending.contains(page) {
                page += 1;
            }
            dropped += page - first;
            range = match range {
                Some((start, last))
                    if first - last <= MERGE_GAP_PAGES
                        && (last..first).all(|p| !pending.contains(p)) =>
                {
                    Some((start, page))
                }
                other => {
                    other.map(discard).transpose()?;
                    Some((first, page))
                }
            };
        }
    }
    range.map(discard).transpose()?;
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
        f.write_all(&[0u8; 40 * 4096]).unwrap();
        let m = Mapping::with_sharing(&f, 40 * PAGE_SIZE, true, Sharing::Private).unwrap();
        // Copies of every page but 4, 5 and 9..40 (never stored to: they map the file).
        for page in (0..9u64).filter(|p| !(4..6).contains(p)) {
            m.write_at(page * PAGE_SIZE, &[page as u8 + 1]).unwrap();
        }
        m.write_at(39 * PAGE_SIZE, &[40]).unwrap();
        let mut pending = PageSet::new(40);
        pending.insert(2);
        pending.insert(8);
        let run = |first_page, pages| Run { first_page, pages };
        // 2 and 8 are pending; 38 and 39 lie too far from 7 to go in one call with it; 40 and
        // 41 lie past the device.
        let written = [run(1, 3), run(6, 3), run(38, 4)];
        assert_eq!(
            drop_clean_copies(&m, &written, &pending, 40 * PAGE_SIZE).unwrap(),
            6
        );
        let byte = |page: u64| {
            let mut b = [0u8];
            m.read_at(page * PAGE_SIZE, &mut b).unwrap();
            b[0]
        };
        let now: Vec<u8> = (0..10).chain(38..40).map(byte).collect();
        // Pages 3..8 went in one call (4 and 5 map the file either way); 0 was not written.
        assert_eq!(
            now,
            [1, 0, 3, 0, 0, 0, 0, 0, 9, 0, 0, 0],
            "dropped pages read the file"
        );
    }
}
