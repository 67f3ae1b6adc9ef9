//! Makes the dirty pages durable in the backing file.
//!
//! With a shared mapping (`persist=adr`) the guest's stores dirty the file's page cache, so the
//! kernel's own dirty bits already name exactly the pages to write: one `fdatasync` writes them
//! all in a single pass (merging adjacent pages into one I/O) and flushes the device cache.
//! Starting each run's I/O first (`sync_file_range(WRITE)`, which does not wait) and unmapping
//! the runs from the guest first are steps that pay off on some hosts for some numbers of
//! pages and cost on others: `writeback_way` measures which to take. Waiting run by run would
//! serialise the I/O.
//!
//! A private mapping (`persist=flush`) is not the page cache: [`copy_back`] pwrites each run
//! from guest memory into the file instead, and the same single `fdatasync` waits for it. The
//! copy costs about a microsecond a page, so a large writeback starts the disk on what it has
//! copied every [`SUBMIT_EVERY`] bytes (`sync_file_range(WRITE)`, which does not wait) and
//! copies the rest while the disk writes: the copy then hides behind the I/O instead of adding
//! to it (a flush of 4096 scattered pages: 1.36-1.43x the host's fastest way with one
//! `fdatasync` at the end, 1.12-1.20x this way; docs/benchmarks.md). Not in `write_back`: with
//! no copy to hide, starting the disk in pieces only adds submissions.

use std::fs::File;
use std::os::fd::AsRawFd;

use vmm_sys_util::errno;

use crate::mmap::{Mapping, MmapError};
pub use crate::page_set::Run;
pub use crate::writeback_way::Way;
use crate::PAGE_SIZE;

/// What one writeback covered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub pages: u64,
    pub bytes: u64,
    pub runs: u64,
}

/// A writeback that did not complete; the pages must be treated as still dirty.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WritebackError {
    #[error("copying {len} bytes at offset {offset:#x} from guest memory into the file failed")]
    Copy {
        offset: u64,
        len: u64,
        #[source]
        source: errno::Error,
    },
    #[error("starting the writeback of {len} bytes at offset {offset:#x} failed")]
    Submit {
        offset: u64,
        len: u64,
        #[source]
        source: errno::Error,
    },
    #[error("fdatasync of the backing file failed")]
    Sync {
        #[source]
        source: errno::Error,
    },
}

/// Makes the pages of `runs` (in page order) that lie below `size` bytes durable, `file`
/// being shared with `mapping`, which the guest stores into: one `fdatasync`, which writes
/// every page the guest dirtied. Before it, `way` may unmap the dirty spans and start each
/// run's I/O (see `writeback_way`). With no pages it syncs only if `sync_if_empty`.
pub fn write_back(
    file: &File,
    mapping: &Mapping,
    runs: &[Run],
    size: u64,
    way: Way,
    sync_if_empty: bool,
) -> Result<Written, WritebackError> {
    if way.unmap {
        unmap_spans(mapping, runs, size);
    }
    let written = each_run(runs, size, |offset, len| {
        if way.submit {
            submit(file, offset, len)
        } else {
            Ok(())
        }
    })?;
    if written.pages > 0 || sync_if_empty {
        sync(file)?;
    }
    Ok(written)
}

/// Runs this close are unmapped as one span: a call costs about as much as unmapping 10 to
/// 20 pages (2 µs against 0.1-0.2 µs a page, measured on shadow-paging KVM), and the clean
/// pages between the runs are only mapped again at their next access.
pub const UNMAP_GAP_PAGES: u64 = 16;

/// Unmaps the runs below `size` bytes, merged into spans. Only a shortcut for the writeback
/// after it, which is just as durable without: a failure is logged (once), not returned.
fn unmap_spans(mapping: &Mapping, runs: &[Run], size: u64) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let end_page = size / PAGE_SIZE;
    let mut span: Option<(u64, u64)> = None;
    let unmap = |(first, end): (u64, u64)| {
        let end = end.min(end_page);
        if end > first {
            if let Err(e) = mapping.unmap(first * PAGE_SIZE, (end - first) * PAGE_SIZE) {
                WARNED.call_once(|| {
                    log::warn!("writebacks go on without unmapping the dirty pages first: {e}")
                });
            }
        }
    };
    for run in runs {
        let (first, end) = (run.first_page, run.first_page.saturating_add(run.pages));
        span = match span {
            Some((start, last)) if first <= last.saturating_add(UNMAP_GAP_PAGES) => {
                Some((start, end.max(last)))
            }
            Some(done) => {
                unmap(done);
                Some((first, end))
            }
            None => Some((first, end)),
        };
    }
    if let Some(done) = span {
        unmap(done);
    }
}

/// Like [`write_back`], but rewrites each page from `mapping` (a shared mapping of `file`)
/// through a bounce buffer with pwrite, which dirties it again in the page cache. For after a
/// failed writeback: Linux may have marked the pages clean although they never reached the
/// disk, and then `sync_file_range` and `fdatasync` would find nothing to write.
pub fn rewrite(
    file: &File,
    mapping: &Mapping,
    runs: &[Run],
    size: u64,
) -> Result<Written, WritebackError> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 256 * PAGE_SIZE;
    let mut buf = Vec::new();
    let written = each_run(runs, size, |offset, len| {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let at = offset + done;
            let copy_error = |raw: Option<i32>| WritebackError::Copy {
                offset: at,
                len: n,
                source: errno::Error::new(raw.unwrap_or(libc::EIO)),
            };
            buf.resize(n as usize, 0);
            mapping
                .read_at(at, &mut buf)
                .map_err(|_| copy_error(Some(libc::EFAULT)))?;
            file.write_all_at(&buf, at)
                .map_err(|e| copy_error(e.raw_os_error()))?;
            done += n;
        }
        Ok(())
    })?;
    sync(file)?;
    Ok(written)
}

fn sync(file: &File) -> Result<(), WritebackError> {
    file.sync_data().map_err(|e| WritebackError::Sync {
        source: errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
    })
}

/// How much [`copy_back`] copies before it starts the disk on it: enough that a start costs
/// little against the copying, small enough that the disk starts early.
pub const SUBMIT_EVERY: u64 = 64 * PAGE_SIZE;

/// Copies the pages of `runs` (in page order) that lie below `size` bytes from `mapping` into
/// `file` (pwrite, run by run, long runs in pieces), starting the disk on every
/// [`SUBMIT_EVERY`] bytes copied, then waits until all of them are durable. With no pages it
/// does nothing.
pub fn copy_back(
    file: &File,
    mapping: &Mapping,
    runs: &[Run],
    size: u64,
) -> Result<Written, WritebackError> {
    // The file range copied since the disk was last started on it.
    let mut unsubmitted: Option<(u64, u64)> = None;
    let written = each_run(runs, size, |offset, len| {
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let n = (len - done).min(SUBMIT_EVERY);
            copy_piece(file, mapping, at, n)?;
            done += n;
            let (start, copied) = match unsubmitted {
                Some((start, copied)) => (start, copied + n),
                None => (at, n),
            };
            if copied >= SUBMIT_EVERY {
                submit(file, start, at + n - start)?;
                unsubmitted = None;
            } else {
                unsubmitted = Some((start, copied));
            }
        }
        Ok(())
    })?;
    if written.pages > 0 {
        sync(file)?;
    }
    Ok(written)
}

fn copy_piece(file: &File, mapping: &Mapping, offset: u64, len: u64) -> Result<(), WritebackError> {
    let copy_error = |e: MmapError| {
        let raw = match &e {
            MmapError::FileWrite { source, .. } => source.raw_os_error(),
            _ => None,
        };
        WritebackError::Copy {
            offset,
            len,
            source: errno::Error::new(raw.unwrap_or(libc::EIO)),
        }
    };
    let chunk = usize::try_from(len).map_err(|_| copy_error(MmapError::Empty))?;
    mapping
        .write_to_file(file, offset, chunk)
        .map_err(copy_error)
}

/// Starts writing back the dirty pages of `len` bytes at `offset`, without waiting: the
/// `fdatasync` after it waits, and reports errors of the I/O itself.
fn submit(file: &File, offset: u64, len: u64) -> Result<(), WritebackError> {
    // SAFETY: sync_file_range reads only its integer arguments; the fd is `file`'s, open for
    // the whole call.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc != 0 {
        return Err(WritebackError::Submit {
            offset,
            len,
            source: errno::Error::last(),
        });
    }
    Ok(())
}

/// Calls `write(offset, len)` for each run, in order, clipped to `size` bytes; what the calls
/// covered, or the first error.
fn each_run(
    runs: &[Run],
    size: u64,
    mut write: impl FnMut(u64, u64) -> Result<(), WritebackError>,
) -> Result<Written, WritebackError> {
    let mut written = Written::default();
    for run in runs {
        let offset = run.first_page * PAGE_SIZE;
        if offset >= size {
            break;
        }
        let len = (run.pages * PAGE_SIZE).min(size - offset);
        write(offset, len)?;
        written.pages += len / PAGE_SIZE;
        written.bytes += len;
        written.runs += 1;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn bits(bitmap: &[u64]) -> Vec<Run> {
        crate::page_set::runs(bitmap)
    }

    fn shared(pages: u64) -> (File, Mapping) {
        let f = tempfile::tempfile().unwrap();
        f.set_len(pages * PAGE_SIZE).unwrap();
        let m = Mapping::new(&f, pages * PAGE_SIZE, true).unwrap();
        (f, m)
    }

    /// Every way a writeback can go.
    const WAYS: [Way; 4] = [
        Way::SYNC,
        Way {
            unmap: true,
            submit: false,
        },
        Way {
            unmap: false,
            submit: true,
        },
        Way {
            unmap: true,
            submit: true,
        },
    ];

    #[test]
    fn writes_back_exact_pages() {
        let (f, m) = shared(256);
        let w = write_back(
            &f,
            &m,
            &bits(&[0b0110_0001, 1]),
            256 * PAGE_SIZE,
            Way::SYNC,
            false,
        )
        .unwrap();
        assert_eq!(
            w,
            Written {
                pages: 4,
                bytes: 4 * PAGE_SIZE,
                runs: 3
            }
        );
        for way in WAYS {
            assert_eq!(
                write_back(&f, &m, &bits(&[0, 0]), 256 * PAGE_SIZE, way, false).unwrap(),
                Written::default()
            );
        }
    }

    #[test]
    fn every_way_leaves_the_stored_pages_in_the_file_and_none_dirty() {
        let (f, m) = shared(64);
        let pages = [1u64, 2, 9, 30, 63];
        for (round, way) in WAYS.into_iter().enumerate() {
            let value = |p: u64| (round as u64) << 32 | p;
            for p in pages {
                m.write_at(p * PAGE_SIZE + 8, &value(p).to_le_bytes())
                    .unwrap();
            }
            let runs = pages.map(|p| Run {
                first_page: p,
                pages: 1,
            });
            let w = write_back(&f, &m, &runs, 64 * PAGE_SIZE, way, false).unwrap();
            assert_eq!(w.pages, 5, "{way:?}");
            let dirty = crate::cachestat::cachestat(&f, 0, 64 * PAGE_SIZE).unwrap();
            assert_eq!(dirty.nr_dirty, 0, "{way:?} left pages dirty");
            let mut buf = [0u8; 8];
            for p in pages {
                f.read_exact_at(&mut buf, p * PAGE_SIZE + 8).unwrap();
                assert_eq!(u64::from_le_bytes(buf), value(p), "{way:?}: page {p}");
            }
        }
    }

    #[test]
    fn unmapping_first_unmaps_the_dirty_spans_and_writes_every_page() {
        let (f, m) = shared(256);
        let stores = [0u64, 3, 5, 40, 100, 200];
        for p in stores {
            m.write_at(p * PAGE_SIZE + 8, &p.to_le_bytes()).unwrap();
        }
        // Pages 0 and 5 are within UNMAP_GAP_PAGES: one span, 3 inside it; 100 alone; 40 and
        // 200 were stored to but are not in this writeback.
        let runs = [0u64, 5, 100].map(|p| Run {
            first_page: p,
            pages: 1,
        });
        let w = write_back(&f, &m, &runs, 256 * PAGE_SIZE, WAYS[1], false).unwrap();
        assert_eq!((w.pages, w.runs), (3, 3));
        let mapped = |p: u64| crate::mmap::page_is_mapped(m.host_addr() + p * PAGE_SIZE);
        for (p, want) in [
            (0, false),
            (3, false),
            (5, false),
            (100, false),
            (40, true),
            (200, true),
        ] {
            assert_eq!(mapped(p), want, "page {p}");
        }
        let mut buf = [0u8; 8];
        for p in stores {
            f.read_exact_at(&mut buf, p * PAGE_SIZE + 8).unwrap();
            assert_eq!(u64::from_le_bytes(buf), p, "page {p} in the file");
        }
    }

    #[test]
    fn pages_past_the_device_end_are_ignored() {
        let (f, m) = shared(4);
        for way in WAYS {
            let w = write_back(&f, &m, &bits(&[0b11_1000]), 4 * PAGE_SIZE, way, false).unwrap();
            assert_eq!(
                w,
                Written {
                    pages: 1,
                    bytes: PAGE_SIZE,
                    runs: 1
                },
                "{way:?}"
            );
        }
    }

    #[test]
    fn copy_back_of_a_large_writeback_writes_every_page_of_its_pieces() {
        use crate::mmap::Sharing;
        let per_submit = SUBMIT_EVERY / PAGE_SIZE;
        // Scattered pages for three submissions and a bit, then one run of two and a half.
        let pages = 4 * per_submit + 5 * per_submit / 2 + 8;
        let f = tempfile::tempfile().unwrap();
        f.set_len(pages * PAGE_SIZE).unwrap();
        let m = Mapping::with_sharing(&f, pages * PAGE_SIZE, true, Sharing::Private).unwrap();
        for page in 0..pages {
            m.write_at(page * PAGE_SIZE, &[(page % 251) as u8 + 1; 4096])
                .unwrap();
        }
        let scattered = 4 * per_submit;
        let mut runs: Vec<Run> = (0..scattered / 2)
            .map(|i| Run {
                first_page: 2 * i,
                pages: 1,
            })
            .collect();
        runs.push(Run {
            first_page: scattered,
            pages: 5 * per_submit / 2,
        });
        let w = copy_back(&f, &m, &runs, pages * PAGE_SIZE).unwrap();
        assert_eq!(w.pages, scattered / 2 + 5 * per_submit / 2);
        assert_eq!(w.runs, scattered / 2 + 1);
        let mut buf = [0u8; 4096];
        for page in 0..pages {
            let copied = (page < scattered && page % 2 == 0)
                || (scattered..scattered + 5 * per_submit / 2).contains(&page);
            let want = if copied { (page % 251) as u8 + 1 } else { 0 };
            f.read_exact_at(&mut buf, page * PAGE_SIZE).unwrap();
            assert!(buf.iter().all(|&b| b == want), "page {page}");
        }
    }

    #[test]
    fn copy_back_writes_exactly_the_dirty_pages_from_a_private_mapping() {
        use crate::mmap::Sharing;
        let f = tempfile::tempfile().unwrap();
        f.set_len(130 * PAGE_SIZE).unwrap();
        let m = Mapping::with_sharing(&f, 130 * PAGE_SIZE, true, Sharing::Private).unwrap();
        for page in [0u64, 1, 63, 64, 129] {
            m.write_at(page * PAGE_SIZE, &[page as u8 + 1; 4096])
                .unwrap();
        }
        // Pages 0, 63 and 64 are "dirty"; 1 and 129 were written but are not in the bitmap.
        let w = copy_back(&f, &m, &bits(&[1 | 1 << 63, 1, 0]), 130 * PAGE_SIZE).unwrap();
        assert_eq!(
            w,
            Written {
                pages: 3,
                bytes: 3 * PAGE_SIZE,
                runs: 2
            }
        );
        let mut buf = [0u8; 4096];
        for (page, want) in [(0u64, 1u8), (1, 0), (63, 64), (64, 65), (129, 0)] {
            f.read_exact_at(&mut buf, page * PAGE_SIZE).unwrap();
            assert!(buf.iter().all(|&b| b == want), "page {page}");
        }
        assert_eq!(
            copy_back(&f, &m, &bits(&[0, 0, 0]), 130 * PAGE_SIZE).unwrap(),
            Written::default()
        );
        let ro = File::open("/dev/null").unwrap();
        let err = copy_back(&ro, &m, &bits(&[0b10]), 130 * PAGE_SIZE).unwrap_err();
        assert!(
            matches!(
                err,
                WritebackError::Copy {
                    offset: 4096,
                    len: 4096,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
