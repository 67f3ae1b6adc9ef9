//! The guest's own cache-line flushes. A MAP_SYNC program makes its stores durable with
//! CLWB/CLFLUSHOPT/CLFLUSH and SFENCE, none of which exits to the VMM, so the workload reports
//! them on the console: `CLFLUSH <phys> <len> crc32c=<hex>`. While the guest waits for the
//! answer, crash-test reads exactly those lines from guest memory (pmvm's mapping of the
//! backing file) and later adds them to the states' log as an epoch of their own, placed after
//! the flushes the log held when the line was read: from then on those lines, and only they,
//! are durable.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nvdimm::flush_log::{AppendError, FileSource, FlushLog, FlushLogWriter, SOURCE_CACHE_FLUSH};
use serde::{Deserialize, Serialize};

use super::states::LINE;

const PAGE: u64 = 4096;
/// The most one line may flush: a guest cannot make the host allocate more.
const MAX_LEN: u64 = 1 << 20;

/// A parsed `CLFLUSH` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub phys: u64,
    pub len: u64,
    pub crc32c: u32,
}

/// Parses `CLFLUSH <phys> <len> crc32c=<hex>`: other lines are `Ok(None)`, a malformed one an
/// error naming what is wrong.
pub fn parse(line: &str) -> Result<Option<Request>, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("CLFLUSH") {
        return Ok(None);
    }
    let bad = |why: &str| Err(format!("malformed cache flush {line:?}: {why}"));
    let number = |w: Option<&str>| -> Option<u64> {
        let w = w?;
        match w.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => w.parse().ok(),
        }
    };
    let (Some(phys), Some(len)) = (number(words.next()), number(words.next())) else {
        return bad("expected a physical address and a length");
    };
    let crc32c = match super::claims::last_crc(words) {
        Ok(crc) => crc,
        Err(why) => return bad(why),
    };
    let line_len = LINE as u64;
    if phys % line_len != 0 || len % line_len != 0 || len == 0 || len > MAX_LEN {
        return bad("the range must be whole 64-byte lines, at most 1 MiB");
    }
    Ok(Some(Request { phys, len, crc32c }))
}

/// Lines made durable by one `CLFLUSH`, as read from guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFlush {
    /// Flushes the log held when the line was read: the epoch goes after them.
    pub after: u64,
    /// Device offset of the first line.
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub time_ns: u64,
}

/// One cache flush as run.json keeps it: its epoch in the states' log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushRecord {
    pub epoch: u64,
    pub offset: u64,
    pub len: u64,
    pub workload: String,
}

/// The NVDIMM as the guest sees it: where it sits in guest-physical memory and where pmvm
/// maps its backing file.
pub struct GuestMemory {
    pub pid: u32,
    /// The backing file, as /proc/PID/maps names it.
    pub image: PathBuf,
    pub base: u64,
    pub size: u64,
}

impl GuestMemory {
    /// Reads the lines of `req` from guest memory; they must have the checksum the guest
    /// computed, or the address was not translated right. Returns their device offset.
    pub fn read(&self, req: &Request) -> Result<(u64, Vec<u8>), String> {
        let offset = req
            .phys
            .checked_sub(self.base)
            .filter(|o| o + req.len <= self.size)
            .ok_or_else(|| {
                format!(
                    "{:#x}+{} is not inside the NVDIMM at {:#x} ({} bytes)",
                    req.phys, req.len, self.base, self.size
                )
            })?;
        let maps_path = format!("/proc/{}/maps", self.pid);
        let maps = std::fs::read_to_string(&maps_path)
            .map_err(|e| format!("cannot read {maps_path}: {e}"))?;
        let addr = host_address(&maps, &self.image, offset, req.len).ok_or_else(|| {
            format!(
                "pmvm (pid {}) has no mapping of {} covering offset {offset:#x}",
                self.pid,
                self.image.display()
            )
        })?;
        let mut bytes = vec![0u8; req.len as usize];
        read_process(self.pid, addr, &mut bytes)
            .map_err(|e| format!("cannot read pmvm's guest memory at {addr:#x}: {e}"))?;
        let crc = crc32c::crc32c(&bytes);
        if crc != req.crc32c {
            return Err(format!(
                "the lines at device offset {offset:#x} have crc32c {crc:08x} in guest memory, \
                 not the guest's {:08x}: the physical address does not name the stored lines",
                req.crc32c
            ));
        }
        Ok((offset, bytes))
    }
}

/// The host address of `len` bytes at `offset` of `file` in a /proc/PID/maps text.
fn host_address(maps: &str, file: &Path, offset: u64, len: u64) -> Option<u64> {
    let file = file.to_str()?;
    maps.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || f[5..].join(" ") != file || !f[1].starts_with("rw") {
            return None;
        }
        let (start, end) = f[0].split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let map_offset = u64::from_str_radix(f[2], 16).ok()?;
        let at = offset.checked_sub(map_offset)?;
        (at + len <= end - start).then_some(start + at)
    })
}

fn read_process(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers `buf`, which is valid for writes of its length for the
    // whole call; the remote one is only read, in the other process, by the kernel.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize != buf.len() => {
            Err(io::Error::other(format!("read {n} of {} bytes", buf.len())))
        }
        _ => Ok(()),
    }
}

/// Writes `out`: the epochs of `log` with each cache flush inserted after the epoch it
/// followed. A cache flush's epoch holds its pages as they were durable then, with only the
/// flushed lines replaced. Returns the epoch number each cache flush got.
pub fn merge(
    src: &FileSource,
    log: &FlushLog,
    base: &File,
    flushes: &[CacheFlush],
    out: &Path,
) -> io::Result<Vec<u64>> {
    let mut writer =
        FlushLogWriter::create(out, log.header.device_size).map_err(io::Error::other)?;
    // The durable contents of every page a cache flush touches, kept current epoch by epoch.
    let mut durable: HashMap<u64, Vec<u8>> = HashMap::new();
    for f in flushes {
        for page in f.offset / PAGE..(f.offset + f.bytes.len() as u64).div_ceil(PAGE) {
            if let std::collections::hash_map::Entry::Vacant(v) = durable.entry(page) {
                let mut buf = vec![0u8; PAGE as usize];
                base.read_exact_at(&mut buf, page * PAGE)?;
                v.insert(buf);
            }
        }
    }
    let append_err = |e: AppendError| io::Error::other(e.to_string());
    let mut numbers = Vec::with_capacity(flushes.len());
    let mut pending = flushes.iter().peekable();
    for k in 0..=log.last_epoch() {
        if let Some(epoch) = log.epoch(k) {
            let mut read_err = None;
            writer
                .append(epoch.source, epoch.time_ns, &epoch.pages, |page, buf| {
                    let i = epoch.pages.binary_search(&page).unwrap_or(0);
                    log.read_page(src, epoch, i, buf).map_err(|e| {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        read_err = Some(e);
                        AppendError::ReadPage {
                            page,
                            source: vmm_sys_util::errno::Error::new(errno),
                        }
                    })?;
                    if let Some(d) = durable.get_mut(&page) {
                        d.copy_from_slice(buf);
                    }
                    Ok(())
                })
                .map_err(|e| read_err.take().unwrap_or_else(|| append_err(e)))?;
        }
        while let Some(f) = pending.next_if(|f| f.after <= k || k == log.last_epoch()) {
            let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for (i, chunk) in f.bytes.chunks(LINE).enumerate() {
                let at = f.offset + (i * LINE) as u64;
                let page = pages
                    .entry(at / PAGE)
                    .or_insert_with(|| durable[&(at / PAGE)].clone());
                let o = (at % PAGE) as usize;
                page[o..o + chunk.len()].copy_from_slice(chunk);
            }
            let list: Vec<u64> = pages.keys().copied().collect();
            let n = writer
                .append(SOURCE_CACHE_FLUSH, f.time_ns, &list, |page, buf| {
                    buf.copy_from_slice(&pages[&page]);
                    Ok(())
                })
                .map_err(append_err)?;
            for (page, bytes) in pages {
                durable.insert(page, bytes);
            }
            numbers.push(n);
        }
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cache_flush_lines_and_rejects_malformed_ones() {
        assert_eq!(parse("DURABLE /a size=1 crc32c=0"), Ok(None));
        assert_eq!(
            parse("CLFLUSH 0x140203000 4096 crc32c=0000abcd"),
            Ok(Some(Request {
                phys: 0x1_4020_3000,
                len: 4096,
                crc32c: 0xabcd
            }))
        );
        for bad in [
            "CLFLUSH",
            "CLFLUSH 0x1000",
            "CLFLUSH 0x1000 64",
            "CLFLUSH 0x1010 64 crc32c=0",
            "CLFLUSH 0x1000 65 crc32c=0",
            "CLFLUSH 0x1000 0 crc32c=0",
            "CLFLUSH 0x1000 4294967296 crc32c=0",
            "CLFLUSH 0x1000 64 crc32c=0 more",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_the_host_address_of_a_file_offset() {
        let maps = "\
7f0000000000-7f0000001000 r--p 00000000 08:01 12 /x/image.img
7f1000000000-7f1004000000 rw-p 00000000 08:01 12 /x/image.img
7f2000000000-7f2000002000 rw-p 00002000 08:01 13 /x/other file.img
";
        let img = Path::new("/x/image.img");
        assert_eq!(host_address(maps, img, 0x3000, 64), Some(0x7f10_0000_3000));
        assert_eq!(host_address(maps, img, 0x4000000, 64), None);
        assert_eq!(
            host_address(maps, Path::new("/x/other file.img"), 0x2040, 64),
            Some(0x7f20_0000_0040)
        );
        assert_eq!(
            host_address(maps, Path::new("/x/other file.img"), 0, 64),
            None
        );
    }

    #[test]
    fn reads_lines_from_a_process_and_checks_their_checksum() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(4 * PAGE).unwrap();
        let path = std::fs::canonicalize(file.path()).unwrap();
        let m = nvdimm::mmap::Mapping::with_sharing(
            file.as_file(),
            4 * PAGE,
            true,
            nvdimm::mmap::Sharing::Private,
        )
        .unwrap();
        m.write_at(PAGE + 128, &[7u8; 64]).unwrap();
        let mem = GuestMemory {
            pid: std::process::id(),
            image: path,
            base: 1 << 32,
            size: 4 * PAGE,
        };
        let crc = crc32c::crc32c(&[7u8; 64]);
        let req = |phys, crc32c| Request {
            phys,
            len: 64,
            crc32c,
        };
        let (offset, bytes) = mem.read(&req((1 << 32) + PAGE + 128, crc)).unwrap();
        assert_eq!((offset, bytes), (PAGE + 128, vec![7u8; 64]));
        let wrong = mem.read(&req((1 << 32) + PAGE, crc)).unwrap_err();
        assert!(wrong.contains("does not name the stored lines"), "{wrong}");
        let outside = mem.read(&req((1 << 32) + 4 * PAGE, crc)).unwrap_err();
        assert!(outside.contains("not inside the NVDIMM"), "{outside}");
        drop(m);
    }

    #[test]
    fn merge_inserts_cache_flushes_as_epochs_of_their_lines_only() {
        use nvdimm::flush_log::SOURCE_HOST;
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base");
        std::fs::write(&base_path, vec![1u8; 2 * PAGE as usize]).unwrap();
        let log_path = dir.path().join("log");
        let mut w = FlushLogWriter::create(&log_path, 2 * PAGE).unwrap();
        w.append(0, 10, &[0], |_, buf| {
            buf.fill(2);
            Ok(())
        })
        .unwrap();
        w.append(SOURCE_HOST, 20, &[1], |_, buf| {
            buf.fill(3);
            Ok(())
        })
        .unwrap();
        drop(w);
        let src = FileSource::open(&log_path).unwrap();
        let log = FlushLog::read(&src).unwrap();
        let flush = |after, offset, byte| CacheFlush {
            after,
            offset,
            bytes: vec![byte; 128],
            time_ns: 5,
        };
        // After epoch 1: two lines of page 1 (still the base's 1s) become 9s; after epoch 2,
        // the last two lines of page 0 and first two of page 1 become 8s.
        let flushes = [flush(1, PAGE + 64, 9), flush(2, PAGE - 64, 8)];
        let out = dir.path().join("merged");
        let base = File::open(&base_path).unwrap();
        assert_eq!(
            merge(&src, &log, &base, &flushes, &out).unwrap(),
            vec![2, 4]
        );
        let msrc = FileSource::open(&out).unwrap();
        let merged = FlushLog::read(&msrc).unwrap();
        let sources: Vec<(u32, Vec<u64>)> = merged
            .epochs
            .iter()
            .map(|e| (e.source, e.pages.clone()))
            .collect();
        assert_eq!(
            sources,
            vec![
                (0, vec![0]),
                (SOURCE_CACHE_FLUSH, vec![1]),
                (SOURCE_HOST, vec![1]),
                (SOURCE_CACHE_FLUSH, vec![0, 1]),
            ]
        );
        let page = |e: u64, i: usize| {
            let mut buf = vec![0u8; PAGE as usize];
            merged
                .read_page(&msrc, merged.epoch(e).unwrap(), i, &mut buf)
                .unwrap();
            buf
        };
        let p = page(2, 0);
        assert!(p[..64].iter().all(|&b| b == 1) && p[64..192].iter().all(|&b| b == 9));
        assert!(p[192..].iter().all(|&b| b == 1));
        let (p0, p1) = (page(4, 0), page(4, 1));
        assert!(p0[..4032].iter().all(|&b| b == 2) && p0[4032..].iter().all(|&b| b == 8));
        assert!(p1[..64].iter().all(|&b| b == 8) && p1[64..].iter().all(|&b| b == 3));
    }
}
