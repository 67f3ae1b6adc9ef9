//! Where a file's bytes are on its block device: the FIEMAP ioctl and the arithmetic that
//! turns its extents into one device offset.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xc020_660b;
const HEADER_LEN: usize = 32;
const EXTENT_LEN: usize = 56;
/// Extents asked for at once; the suite's files have one or two.
const MAX_EXTENTS: u32 = 32;

pub const FLAG_LAST: u32 = 0x1;
pub const FLAG_UNKNOWN: u32 = 0x2;
pub const FLAG_DELALLOC: u32 = 0x4;
pub const FLAG_ENCODED: u32 = 0x8;
pub const FLAG_NOT_ALIGNED: u32 = 0x100;
pub const FLAG_DATA_INLINE: u32 = 0x200;
pub const FLAG_UNWRITTEN: u32 = 0x800;

/// Flags that mean the extent's physical address does not hold the file's bytes as written.
const UNPLACED: [(u32, &str); 6] = [
    (FLAG_UNKNOWN, "location unknown"),
    (FLAG_DELALLOC, "delayed allocation (not written yet)"),
    (FLAG_ENCODED, "encoded (compressed or encrypted)"),
    (FLAG_NOT_ALIGNED, "not block-aligned"),
    (FLAG_DATA_INLINE, "inline in metadata"),
    (FLAG_UNWRITTEN, "unwritten (allocated, reads as zeros)"),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FiemapError {
    #[error("FIEMAP failed: {0}")]
    Ioctl(String),
    #[error("FIEMAP answer is {len} bytes, shorter than its {need}-byte header and extents")]
    Short { len: usize, need: usize },
    #[error("bytes {start}..{end} of the file have no extent (a hole)")]
    Hole { start: u64, end: u64 },
    #[error("the extent at file offset {logical} is {why} (flags {flags:#x})")]
    Unplaced {
        logical: u64,
        flags: u32,
        why: &'static str,
    },
    #[error(
        "bytes {start}..{end} are split over extents that are not next to each other on the \
         device (at file offset {at}); the suite reports one device range per case"
    )]
    Fragmented { start: u64, end: u64, at: u64 },
}

/// One mapped range of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    /// Byte offset on the file's block device.
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// The ioctl argument asking for the extents of `start..start+len`.
pub fn request(start: u64, len: u64, count: u32) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN + count as usize * EXTENT_LEN];
    buf[0..8].copy_from_slice(&start.to_ne_bytes());
    buf[8..16].copy_from_slice(&len.to_ne_bytes());
    // fm_flags = 0: no FIEMAP_FLAG_SYNC, which would write back (and on DAX, flush caches).
    buf[24..28].copy_from_slice(&count.to_ne_bytes());
    buf
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// The extents in a FIEMAP answer.
pub fn parse(buf: &[u8]) -> Result<Vec<Extent>, FiemapError> {
    if buf.len() < HEADER_LEN {
        return Err(FiemapError::Short {
            len: buf.len(),
            need: HEADER_LEN,
        });
    }
    let mapped = u32_at(buf, 20) as usize;
    let need = HEADER_LEN + mapped * EXTENT_LEN;
    if buf.len() < need {
        return Err(FiemapError::Short {
            len: buf.len(),
            need,
        });
    }
    Ok((0..mapped)
        .map(|i| {
            let e = &buf[HEADER_LEN + i * EXTENT_LEN..];
            Extent {
                logical: u64_at(e, 0),
                physical: u64_at(e, 8),
                length: u64_at(e, 16),
                flags: u32_at(e, 40),
            }
        })
        .collect())
}

/// Asks the filesystem for the extents of `start..start+len` of `file`.
pub fn extents(file: &File, start: u64, len: u64) -> Result<Vec<Extent>, FiemapError> {
    let mut buf = request(start, len, MAX_EXTENTS);
    // SAFETY: FS_IOC_FIEMAP reads the 32-byte header and writes at most fm_extent_count
    // (MAX_EXTENTS) 56-byte extents after it; `request` sized `buf` for exactly that, and the
    // buffer outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(FiemapError::Ioctl(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    parse(&buf)
}

/// The device offset of file byte `start`, when all of `start..start+len` is one physically
/// contiguous run of written extents.
pub fn locate(extents: &[Extent], start: u64, len: u64) -> Result<u64, FiemapError> {
    let end = start + len;
    let mut pos = start;
    let mut first_phys = None;
    let mut sorted: Vec<&Extent> = extents.iter().collect();
    sorted.sort_by_key(|e| e.logical);
    for e in sorted {
        let e_end = e.logical + e.length;
        if e_end <= pos || pos >= end {
            continue;
        }
        if e.logical > pos {
            return Err(FiemapError::Hole {
                start: pos,
                end: e.logical.min(end),
            });
        }
        if let Some((_, why)) = UNPLACED.iter().find(|(f, _)| e.flags & f != 0) {
            return Err(FiemapError::Unplaced {
                logical: e.logical,
                flags: e.flags,
                why,
            });
        }
        let phys_here = e.physical + (pos - e.logical);
        match first_phys {
            None => first_phys = Some(phys_here),
            Some(p) if p + (pos - start) != phys_here => {
                return Err(FiemapError::Fragmented {
                    start,
                    end,
                    at: pos,
                })
            }
            Some(_) => {}
        }
        pos = e_end.min(end);
    }
    if pos < end {
        return Err(FiemapError::Hole { start: pos, end });
    }
    first_phys.ok_or(FiemapError::Hole { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    /// Builds an answer the way the kernel fills it in.
    fn answer(extents: &[Extent]) -> Vec<u8> {
        let mut buf = request(0, u64::MAX, extents.len() as u32);
        buf[20..24].copy_from_slice(&(extents.len() as u32).to_ne_bytes());
        for (i, e) in extents.iter().enumerate() {
            let o = HEADER_LEN + i * EXTENT_LEN;
            buf[o..o + 8].copy_from_slice(&e.logical.to_ne_bytes());
            buf[o + 8..o + 16].copy_from_slice(&e.physical.to_ne_bytes());
            buf[o + 16..o + 24].copy_from_slice(&e.length.to_ne_bytes());
            buf[o + 40..o + 44].copy_from_slice(&e.flags.to_ne_bytes());
        }
        buf
    }

    #[test]
    fn parses_what_the_kernel_writes() {
        let want = [
            ext(0, 0x10_0000, 4096, 0),
            ext(4096, 0x20_0000, 8192, FLAG_LAST),
        ];
        assert_eq!(parse(&answer(&want)).unwrap(), want);
        assert_eq!(parse(&answer(&[])).unwrap(), vec![]);
    }

    #[test]
    fn short_answers_are_errors_not_panics() {
        assert!(matches!(parse(&[0u8; 10]), Err(FiemapError::Short { .. })));
        let mut buf = answer(&[ext(0, 0, 4096, 0)]);
        buf[20..24].copy_from_slice(&5u32.to_ne_bytes());
        assert_eq!(
            parse(&buf),
            Err(FiemapError::Short {
                len: HEADER_LEN + EXTENT_LEN,
                need: HEADER_LEN + 5 * EXTENT_LEN
            })
        );
    }

    #[test]
    fn locate_follows_contiguous_extents_and_offsets_into_them() {
        let one = [ext(0, 0x40_0000, 16384, FLAG_LAST)];
        assert_eq!(locate(&one, 0, 8192), Ok(0x40_0000));
        assert_eq!(locate(&one, 4096, 8192), Ok(0x40_1000));
        // Two extents that happen to be adjacent on the device too.
        let two = [
            ext(4096, 0x50_1000, 4096, FLAG_LAST),
            ext(0, 0x50_0000, 4096, 0),
        ];
        assert_eq!(locate(&two, 0, 8192), Ok(0x50_0000));
    }

    #[test]
    fn locate_refuses_holes_fragments_and_unwritten_data() {
        let frag = [
            ext(0, 0x10_0000, 4096, 0),
            ext(4096, 0x90_0000, 4096, FLAG_LAST),
        ];
        assert_eq!(
            locate(&frag, 0, 8192),
            Err(FiemapError::Fragmented {
                start: 0,
                end: 8192,
                at: 4096
            })
        );
        assert_eq!(locate(&frag, 4096, 4096), Ok(0x90_0000));
        let hole = [ext(4096, 0x10_0000, 4096, FLAG_LAST)];
        assert_eq!(
            locate(&hole, 0, 8192),
            Err(FiemapError::Hole {
                start: 0,
                end: 4096
            })
        );
        assert_eq!(
            locate(&[ext(0, 0, 4096, 0)], 0, 8192),
            Err(FiemapError::Hole {
                start: 4096,
                end: 8192
            })
        );
        let err = locate(&[ext(0, 0x1000, 8192, FLAG_UNWRITTEN)], 0, 8192).unwrap_err();
        assert!(err.to_string().contains("unwritten"), "{err}");
        let err = locate(&[ext(0, 0, 8192, FLAG_DELALLOC)], 0, 8192).unwrap_err();
        assert!(err.to_string().contains("delayed allocation"), "{err}");
        assert!(locate(&[], 0, 1).is_err());
    }

    /// The real ioctl on a real file: the bytes at the reported device offset are the file's.
    /// Reading the device needs root; without it only the mapping is checked.
    #[test]
    fn fiemap_on_a_real_file_points_at_its_bytes_on_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data = crate::cases::pattern(crate::cases::Case::Fsync, crate::cases::Fs::Ext4, 8192);
        let mut f = File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        let extents = match extents(&f, 0, 8192) {
            Ok(e) => e,
            Err(FiemapError::Ioctl(e)) => {
                println!("SKIP: FIEMAP unsupported in the temporary directory: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(!extents.is_empty());
        let phys = match locate(&extents, 0, 8192) {
            Ok(p) => p,
            Err(e @ FiemapError::Fragmented { .. }) => {
                println!("SKIP: the test file landed in two places: {e}");
                return;
            }
            Err(e) => panic!("{e}: {extents:?}"),
        };
        assert_eq!(phys % 512, 0);
        let dev = block_device_of(&path);
        match dev.and_then(|d| File::open(&d).map_err(|e| format!("{d}: {e}"))) {
            Ok(mut disk) => {
                let mut on_disk = vec![0u8; 8192];
                disk.seek(SeekFrom::Start(phys)).unwrap();
                disk.read_exact(&mut on_disk).unwrap();
                assert!(
                    on_disk == data,
                    "device bytes at {phys:#x} differ from the file"
                );
            }
            Err(why) => println!("SKIP (device read): {why}"),
        }
    }

    /// /dev/NAME of the block device holding `path`, from /sys/dev/block.
    fn block_device_of(path: &std::path::Path) -> Result<String, String> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).map_err(|e| e.to_string())?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let uevent = format!("/sys/dev/block/{major}:{minor}/uevent");
        let text = std::fs::read_to_string(&uevent).map_err(|e| format!("{uevent}: {e}"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("DEVNAME="))
            .map(|n| format!("/dev/{n}"))
            .ok_or_else(|| format!("{uevent} names no device"))
    }
}
