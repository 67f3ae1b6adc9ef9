//! The only place that maps or unmaps memory: a mapping of the backing file, or of pages KVM
//! shares through a vCPU fd (the VMM's dirty rings).
//!
//! Shared (`persist=adr`): the same pages are guest memory (KVM's memslot points here) and the
//! file's page cache, so a guest store dirties the file page directly and writeback never
//! copies. Private (`persist=flush`): a store copies the page on write, the file never sees it,
//! and writeback copies the page into the file with [`Mapping::write_to_file`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

/// Why a mapping or an access through it failed.
#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    #[error("cannot map {len} bytes of the backing file")]
    Map {
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("mapping of 0 bytes requested")]
    Empty,
    #[error("{len} bytes at offset {offset:#x} do not fit in the {size}-byte mapping")]
    OutOfBounds { offset: u64, len: usize, size: u64 },
    #[error("the mapping is read-only")]
    ReadOnly,
    #[error(
        "{len} bytes at offset {offset:#x} lie past the end of the backing file: it was \
         truncated while pmvm ran"
    )]
    Truncated { offset: u64, len: usize },
    #[error("dropping the page-table entries of {len} bytes at offset {offset:#x} failed")]
    Discard {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing {len} bytes at offset {offset:#x} into the backing file failed")]
    FileWrite {
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// Whether guest stores reach the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// MAP_SHARED: stores are the file's page cache.
    Shared,
    /// MAP_PRIVATE: stores go to private copies of the pages; the file is unchanged.
    Private,
}

/// `len` bytes of a file mapped at `ptr`; unmapped on drop.
///
/// Whoever registers the mapping with KVM must remove that memslot before this is dropped.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    sharing: Sharing,
    /// File mappings only: with the VMM's SIGBUS handler, turns a fault past the end of a
    /// truncated file into an error.
    sigbus: Option<crate::sigbus::Registration>,
}

// SAFETY: the mapping is plain shared memory owned by this struct; it hands out no references
// into it but atomics, only volatile byte copies, so using it from several threads is no
// different from the guest's vCPUs writing it concurrently.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: every access through `&self` is a bounds-checked volatile copy or an
// atomic.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` shared, writable if `writable` (the file must then
    /// be open for writing). MAP_NORESERVE: a large sparse image must not need swap reserved.
    pub fn new(file: &File, len: u64, writable: bool) -> Result<Mapping, MmapError> {
        Self::with_sharing(file, len, writable, Sharing::Shared)
    }

    /// Like [`Mapping::new`], shared or private. A private writable mapping still needs the
    /// file open for writing only if [`Mapping::write_to_file`] is to be used.
    pub fn with_sharing(
        file: &File,
        len: u64,
        writable: bool,
        sharing: Sharing,
    ) -> Result<Mapping, MmapError> {
        if len == 0 {
            return Err(MmapError::Empty);
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let flags = match sharing {
            Sharing::Shared => libc::MAP_SHARED,
            Sharing::Private => libc::MAP_PRIVATE,
        };
        let ptr = map_fd(file.as_raw_fd(), len, prot, flags | libc::MAP_NORESERVE, 0)?;
        if sharing == Sharing::Shared && writable {
            page_sized_folios(ptr, len)?;
        }
        Ok(Mapping {
            ptr,
            len: len as usize,
            writable,
            sharing,
            sigbus: Some(crate::sigbus::register(ptr.as_ptr() as usize, len as usize)),
        })
    }

    /// Maps `len` bytes of a vCPU fd from page `page_offset`, shared and writable: memory KVM
    /// and the VMM both update, such as the vCPU's dirty ring (`KVM_DIRTY_LOG_PAGE_OFFSET`).
    pub fn vcpu_pages(
        vcpu_fd: &impl AsRawFd,
        len: u64,
        page_offset: u64,
    ) -> Result<Mapping, MmapError> {
        if len == 0 {
            return Err(MmapError::Empty);
        }
        let offset = page_offset * crate::PAGE_SIZE;
        let ptr = map_fd(
            vcpu_fd.as_raw_fd(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            offset,
        )?;
        Ok(Mapping {
            ptr,
            len: len as usize,
            writable: true,
            sharing: Sharing::Shared,
            sigbus: None,
        })
    }

    /// Host virtual address of the first byte, for KVM's `userspace_addr`.
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The start of `len` bytes at `offset`, if they lie inside the mapping.
    fn range(&self, offset: u64, len: usize) -> Result<*mut u8, MmapError> {
        let out = || MmapError::OutOfBounds {
            offset,
            len,
            size: self.len as u64,
        };
        let start = usize::try_from(offset).map_err(|_| out())?;
        let end = start.checked_add(len).ok_or_else(out)?;
        if end > self.len {
            return Err(out());
        }
        // SAFETY: start + len <= self.len, so the offset stays inside the mapped object.
        Ok(unsafe { self.ptr.as_ptr().add(start) })
    }

    /// SIGBUS faults absorbed so far (see [`crate::sigbus`]).
    fn faults(&self) -> u64 {
        self.sigbus.as_ref().map_or(0, |r| r.faults())
    }

    /// An error if a SIGBUS hit the mapping since `before` (a [`Mapping::faults`] reading).
    fn check_faults(&self, before: u64, offset: u64, len: usize) -> Result<(), MmapError> {
        if self.faults() != before {
            return Err(MmapError::Truncated { offset, len });
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MmapError> {
        let src = self.range(offset, buf.len())?;
        let before = self.faults();
        let _copying = crate::sigbus::Copying::start();
        for (i, byte) in buf.iter_mut().enumerate() {
            // SAFETY: `range` checked that all of src..src+buf.len() is mapped and readable;
            // volatile because the guest may write the same bytes concurrently. Past the end of
            // a truncated file the read faults; the VMM's handler has `sigbus` map zeros and
            // count it.
            *byte = unsafe { std::ptr::read_volatile(src.add(i)) };
        }
        self.check_faults(before, offset, buf.len())
    }

    /// Copies `data` into the mapping at `offset`. Such host writes are not in KVM's dirty log:
    /// callers that need them written back must record them.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), MmapError> {
        if !self.writable {
            return Err(MmapError::ReadOnly);
        }
        let dst = self.range(offset, data.len())?;
        let before = self.faults();
        let _copying = crate::sigbus::Copying::start();
        for (i, byte) in data.iter().enumerate() {
            // SAFETY: `range` checked the bounds and the mapping is PROT_WRITE; volatile because
            // the guest may access the same bytes concurrently.
            unsafe { std::ptr::write_volatile(dst.add(i), *byte) };
        }
        self.check_faults(before, offset, data.len())
    }
}

impl Mapping {
    /// The naturally aligned 32-bit word at `offset`, for memory shared with KVM that both
    /// sides update atomically (a dirty-ring entry's flags).
    pub fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, MmapError> {
        let p = self.range(offset, 4)?;
        if (p as usize) % std::mem::align_of::<AtomicU32>() != 0 {
            return Err(MmapError::OutOfBounds {
                offset,
                len: 4,
                size: self.len as u64,
            });
        }
        // SAFETY: the 4 bytes are inside the mapping, aligned, and stay mapped while `self` is
        // borrowed; AtomicU32 has u32's layout and any bit pattern is valid; the other party
        // (KVM) also accesses the word atomically.
        Ok(unsafe { &*p.cast::<AtomicU32>() })
    }

    /// Drops the private copies of `len` bytes at `offset` (page-aligned) of a private
    /// mapping: the pages read the file again from the next access (MADV_DONTNEED). What the
    /// copies held is lost, so the caller must have written it to the file and must keep every
    /// writer of those pages out meanwhile. Does nothing to a shared mapping.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), MmapError> {
        if self.sharing != Sharing::Private {
            return Ok(());
        }
        self.dont_need(offset, len)
    }

    /// Unmaps `len` bytes at `offset` (page-aligned) of a shared mapping from every page table
    /// (this process's and, through its MMU notifier, KVM's) in one call; the pages stay in the
    /// page cache with their contents and dirty state, and the next access maps them again.
    /// A writeback of pages nobody maps skips taking each out of the page tables one by one.
    /// Does nothing to a private mapping (it would drop the copies).
    pub fn unmap(&self, offset: u64, len: u64) -> Result<(), MmapError> {
        if self.sharing != Sharing::Shared {
            return Ok(());
        }
        self.dont_need(offset, len)
    }

    fn dont_need(&self, offset: u64, len: u64) -> Result<(), MmapError> {
        if len == 0 {
            return Ok(());
        }
        let n = usize::try_from(len).map_err(|_| MmapError::OutOfBounds {
            offset,
            len: usize::MAX,
            size: self.len as u64,
        })?;
        let start = self.range(offset, n)?;
        // SAFETY: `range` checked that start..start+len lies in this mapping, and no Rust
        // reference points into guest memory. On a MAP_SHARED mapping MADV_DONTNEED only drops
        // page-table entries (the data stays in the page cache, dirty bits move to it); on a
        // MAP_PRIVATE one it replaces the private pages with the file's, so `discard`'s caller
        // guarantees no store to these pages is in flight and that the file holds their data.
        let rc = unsafe { libc::madvise(start.cast(), n, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(MmapError::Discard {
                offset,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Copies `len` bytes at `offset` of the mapping to the same offset of `file` with
    /// pwrite, which copies straight out of guest memory. Concurrent guest stores may tear the
    /// copy; callers harvest the dirty log first, so such a page is logged again.
    pub fn write_to_file(&self, file: &File, offset: u64, len: usize) -> Result<(), MmapError> {
        let src = self.range(offset, len)?;
        let mut done = 0usize;
        while done < len {
            // SAFETY: `range` checked that src..src+len lies in the mapping, which stays mapped
            // while `self` is borrowed; the slice is only read (by pwrite, inside the kernel),
            // and the guest writing it concurrently can only change which bytes are copied.
            let chunk = unsafe { std::slice::from_raw_parts(src.add(done), len - done) };
            match file.write_at(chunk, offset + done as u64) {
                Ok(0) => {
                    return Err(MmapError::FileWrite {
                        offset,
                        len,
                        source: io::Error::from(io::ErrorKind::WriteZero),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(MmapError::FileWrite {
                        offset,
                        len,
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// No read-around on faults (MADV_RANDOM), so the page cache holds the pages the guest
/// touches as single-page folios. The host tracks dirtiness per folio: read-around builds
/// larger ones (16 KiB and up), and then one guest store marks, and the next writeback
/// rewrites, neighbouring pages the guest never wrote, and a page flushed long ago reads as
/// dirty again. With single pages the file's dirty pages are exactly the guest's stores.
fn page_sized_folios(ptr: NonNull<u8>, len: u64) -> Result<(), MmapError> {
    // SAFETY: advice on a mapping this module just created, of exactly its length; it changes
    // how faults fill it, never its contents.
    let rc = unsafe { libc::madvise(ptr.as_ptr().cast(), len as usize, libc::MADV_RANDOM) };
    if rc == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    // SAFETY: unmapping the mapping created just before, which nothing else references yet.
    unsafe { libc::munmap(ptr.as_ptr().cast(), len as usize) };
    Err(MmapError::Map { len, source })
}

/// mmap of `len` bytes of `fd` at `offset`, at an address the kernel chooses.
fn map_fd(
    fd: std::os::unix::io::RawFd,
    len: u64,
    prot: libc::c_int,
    flags: libc::c_int,
    offset: u64,
) -> Result<NonNull<u8>, MmapError> {
    let failed = |source| MmapError::Map { len, source };
    let map_len =
        usize::try_from(len).map_err(|_| failed(io::Error::from_raw_os_error(libc::ENOMEM)))?;
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| failed(io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: a fresh mapping at an address the kernel chooses overlaps nothing we own; the
    // descriptor is valid for the call (borrowed by the caller) and the kernel keeps its own
    // reference to the file for the mapping's lifetime.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), map_len, prot, flags, fd, offset) };
    if ptr == libc::MAP_FAILED {
        return Err(failed(io::Error::last_os_error()));
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| failed(io::Error::from_raw_os_error(libc::EFAULT)))
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregistered first, so the handler never sees an address range about to be reused.
        self.sigbus.take();
        // SAFETY: ptr/len are exactly what mmap returned and nothing else unmaps them; owners
        // that lent the range to KVM remove the memslot before dropping the mapping.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::error!(
                "munmap of {} bytes failed: {}",
                self.len,
                io::Error::last_os_error()
            );
        }
    }
}

/// Whether this process's page table maps the page at `addr` (/proc/self/pagemap, bit 63).
#[cfg(test)]
pub(crate) fn page_is_mapped(addr: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let pagemap = File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    pagemap.read_exact_at(&mut entry, addr / 4096 * 8).unwrap();
    u64::from_ne_bytes(entry) >> 63 == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    fn file(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn writes_reach_the_file_and_reads_see_it() {
        let mut f = file(8192);
        let m = Mapping::new(&f, 8192, true).unwrap();
        assert_eq!(m.len(), 8192);
        assert_ne!(m.host_addr(), 0);
        m.write_at(4096 + 10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        m.read_at(4106, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let mut from_file = [0u8; 5];
        f.seek(SeekFrom::Start(4106)).unwrap();
        f.read_exact(&mut from_file).unwrap();
        assert_eq!(
            &from_file, b"hello",
            "MAP_SHARED writes are the file's pages"
        );
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(b"xyz").unwrap();
        m.read_at(0, &mut buf[..3]).unwrap();
        assert_eq!(&buf[..3], b"xyz");
    }

    /// Read-around on the faults of sequential stores would build multi-page folios (it does on
    /// ext4 with Linux 6.18), and then one store would leave its neighbours dirty too.
    #[test]
    fn one_store_dirties_one_page_of_the_file() {
        const PAGES: u64 = 4096;
        let f = file(PAGES * 4096);
        let m = Mapping::new(&f, PAGES * 4096, true).unwrap();
        for p in 0..PAGES {
            m.write_at(p * 4096, &[1]).unwrap();
        }
        f.sync_data().unwrap();
        let mut seen = 0;
        for p in (37..PAGES - 17).step_by(97) {
            m.write_at(p * 4096 + 1, &[7]).unwrap();
            // The host's own writeback may have cleaned the page already, never added one.
            let dirty = crate::cachestat::cachestat(&f, (p - 16) * 4096, 33 * 4096)
                .unwrap()
                .nr_dirty;
            assert!(dirty <= 1, "a store to page {p} left {dirty} pages dirty");
            seen += dirty;
            f.sync_data().unwrap();
        }
        assert!(
            seen > 0,
            "no store was ever seen dirty: cachestat says nothing here"
        );
    }

    #[test]
    fn accesses_are_bounds_checked() {
        let f = file(4096);
        let m = Mapping::new(&f, 4096, true).unwrap();
        let mut buf = [0u8; 8];
        assert!(m.read_at(4088, &mut buf).is_ok());
        assert!(matches!(
            m.read_at(4089, &mut buf),
            Err(MmapError::OutOfBounds {
                offset: 4089,
                len: 8,
                size: 4096
            })
        ));
        assert!(matches!(
            m.write_at(u64::MAX, b"x"),
            Err(MmapError::OutOfBounds { .. })
        ));
        assert!(matches!(
            m.write_at(4096, b"x"),
            Err(MmapError::OutOfBounds { .. })
        ));
        assert!(m.write_at(4096, b"").is_ok());
    }

    #[test]
    fn readonly_mapping_refuses_writes() {
        let f = file(4096);
        let m = Mapping::new(&f, 4096, false).unwrap();
        assert!(!m.writable());
        assert!(matches!(m.write_at(0, b"x"), Err(MmapError::ReadOnly)));
        let mut buf = [1u8; 4];
        m.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn zero_length_and_bad_fd_mode_fail() {
        let f = file(4096);
        assert!(matches!(Mapping::new(&f, 0, true), Err(MmapError::Empty)));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ro");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let ro = File::open(&p).unwrap();
        let err = Mapping::new(&ro, 4096, true).unwrap_err();
        assert!(matches!(err, MmapError::Map { len: 4096, .. }), "{err:?}");
        assert!(Mapping::new(&ro, 4096, false).is_ok());
    }

    #[test]
    fn unmapping_a_shared_range_keeps_its_data_for_the_file_and_the_next_access() {
        let f = file(4 * 4096);
        let m = Mapping::new(&f, 4 * 4096, true).unwrap();
        let page = |p: u64| m.host_addr() + p * 4096;
        m.write_at(4096 + 5, b"kept").unwrap();
        m.write_at(2 * 4096, b"also").unwrap();
        m.write_at(3 * 4096, b"left").unwrap();
        assert!((1..4).all(|p| page_is_mapped(page(p))));
        m.unmap(4096, 2 * 4096).unwrap();
        assert!(
            !page_is_mapped(page(1)) && !page_is_mapped(page(2)),
            "pages 1 and 2 still mapped"
        );
        assert!(page_is_mapped(page(3)), "unmapped past the range");
        f.sync_data().unwrap();
        let mut buf = [0u8; 4];
        for (at, want) in [
            (4096 + 5, b"kept"),
            (2 * 4096, b"also"),
            (3 * 4096, b"left"),
        ] {
            f.read_exact_at(&mut buf, at).unwrap();
            assert_eq!(&buf, want, "the file at {at:#x}");
            m.read_at(at, &mut buf).unwrap();
            assert_eq!(&buf, want, "the mapping at {at:#x}");
        }
        // The next store maps the page again and reaches the file.
        m.write_at(4096 + 5, b"new!").unwrap();
        assert!(page_is_mapped(page(1)));
        f.read_exact_at(&mut buf, 4096 + 5).unwrap();
        assert_eq!(&buf, b"new!");
        assert!(matches!(
            m.unmap(3 * 4096, 2 * 4096),
            Err(MmapError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn unmap_leaves_a_private_mapping_and_discard_a_shared_one_alone() {
        let f = file(4096);
        let private = Mapping::with_sharing(&f, 4096, true, Sharing::Private).unwrap();
        private.write_at(0, b"copy").unwrap();
        private.unmap(0, 4096).unwrap();
        let mut buf = [0u8; 4];
        private.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"copy", "unmap dropped a private copy");
        let shared = Mapping::new(&f, 4096, true).unwrap();
        shared.write_at(0, b"file").unwrap();
        shared.discard(0, 4096).unwrap();
        assert!(
            page_is_mapped(shared.host_addr()),
            "discard unmapped a shared page"
        );
    }

    #[test]
    fn private_writes_stay_private_until_written_to_the_file() {
        let mut f = file(3 * 4096);
        f.write_all_at(b"old", 4096).unwrap();
        let m = Mapping::with_sharing(&f, 3 * 4096, true, Sharing::Private).unwrap();
        assert_eq!(m.sharing(), Sharing::Private);
        let mut buf = [0u8; 3];
        m.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"old", "a private mapping starts as the file");
        m.write_at(4096, b"new").unwrap();
        m.write_at(2 * 4096, b"two").unwrap();
        let mut on_disk = [0u8; 3];
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert_eq!(&on_disk, b"old", "private stores must not reach the file");
        m.write_to_file(&f, 4096, 4096).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert_eq!(&on_disk, b"new");
        f.seek(SeekFrom::Start(2 * 4096)).unwrap();
        f.read_exact(&mut on_disk).unwrap();
        assert_eq!(on_disk, [0; 3], "only the page written out changed");
        assert!(matches!(
            m.write_to_file(&f, 2 * 4096, 4097),
            Err(MmapError::OutOfBounds { .. })
        ));
        let ro = std::fs::File::open("/dev/null").unwrap();
        let err = m.write_to_file(&ro, 0, 4096).unwrap_err();
        assert!(
            matches!(
                err,
                MmapError::FileWrite {
                    offset: 0,
                    len: 4096,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn sparse_terabyte_maps_without_reserving() {
        let f = file(1 << 40);
        let m = Mapping::new(&f, 1 << 40, true).unwrap();
        m.write_at((1 << 40) - 1, &[7]).unwrap();
        let mut b = [0u8];
        m.read_at((1 << 40) - 1, &mut b).unwrap();
        assert_eq!(b, [7]);
    }
}
