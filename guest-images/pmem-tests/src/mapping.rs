//! A shared file mapping, the suite's only raw-pointer code: mmap, stores, msync, and the
//! cache-line write-back that MAP_SYNC users rely on.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// How to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// MAP_SHARED: stores reach the file through the page cache (or DAX).
    Shared,
    /// MAP_SHARED_VALIDATE | MAP_SYNC: the filesystem guarantees that once a store's cache
    /// line is written back, the data and the metadata to find it are durable.
    Sync,
}

/// `len` bytes of a file mapped read-write at `offset`; unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    pub fn new(file: &File, offset: u64, len: usize, kind: MapKind) -> io::Result<Mapping> {
        let flags = match kind {
            MapKind::Shared => libc::MAP_SHARED,
            MapKind::Sync => libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
        };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) cannot alias any Rust
        // object; the fd is valid for the call; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Stores `data` at the start of the mapping.
    pub fn store(&mut self, data: &[u8]) {
        let n = data.len().min(self.len);
        // SAFETY: `ptr..ptr+len` is our live, writable mapping and `n <= len`; `data` is a
        // separate Rust slice, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr, n) };
    }

    /// Writes one byte per page so every page is faulted in before the timed part of a case.
    pub fn touch_pages(&mut self) {
        for off in (0..self.len).step_by(4096) {
            // SAFETY: `off < len`, inside our live, writable mapping.
            unsafe {
                let p = self.ptr.add(off);
                p.write_volatile(p.read_volatile());
            }
        }
    }

    /// msync(2) of the whole mapping with `flags` (MS_SYNC or MS_ASYNC).
    pub fn msync(&self, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: msync only reads the range, which is our live mapping.
        let rc = unsafe { libc::msync(self.ptr.cast(), self.len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Writes every cache line of the mapping back with the best instruction the CPU has
    /// (clwb, else clflushopt, else clflush), then fences: the MAP_SYNC way to persist.
    /// Returns the instruction used.
    pub fn write_back_cache_lines(&self) -> &'static str {
        let insn = cache_line_writeback();
        for off in (0..self.len).step_by(64) {
            // SAFETY: `off < len` so the line is inside our live mapping; these instructions
            // only write the line back (clflush/clflushopt also evict it) and change no data.
            unsafe {
                let p = self.ptr.add(off);
                match insn {
                    "clwb" => std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack)),
                    "clflushopt" => {
                        std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack))
                    }
                    _ => std::arch::asm!("clflush [{0}]", in(reg) p, options(nostack)),
                }
            }
        }
        // SAFETY: sfence has no operands and only orders stores.
        unsafe { std::arch::asm!("sfence", options(nostack, preserves_flags)) };
        insn
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mmap returned; no reference into it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Which cache-line write-back instruction the CPU offers (CPUID leaf 7, EBX bits 24 and 23).
pub fn cache_line_writeback() -> &'static str {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.ebx & (1 << 24) != 0 {
        "clwb"
    } else if leaf7.ebx & (1 << 23) != 0 {
        "clflushopt"
    } else {
        "clflush"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    #[test]
    fn stores_reach_the_file_and_msync_and_cache_writeback_succeed() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(3 * 4096).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut m = Mapping::new(&f, 4096, 8192, MapKind::Shared).unwrap();
        m.touch_pages();
        m.store(&data);
        assert!(["clwb", "clflushopt", "clflush"].contains(&m.write_back_cache_lines()));
        m.msync(libc::MS_ASYNC).unwrap();
        m.msync(libc::MS_SYNC).unwrap();
        drop(m);
        let mut back = vec![0u8; 8192];
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn map_sync_is_refused_where_there_is_no_dax() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let err = Mapping::new(&f, 0, 4096, MapKind::Sync)
            .err()
            .expect("no DAX here");
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP), "{err}");
    }
}
