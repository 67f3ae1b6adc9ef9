//! The flush-epoch log (`--pmem ...,flush-log=PATH`): one record per flush, holding the pages
//! that flush made durable and their contents, so any flush point can be rebuilt later.
//!
//! Format, version 1 (all integers little-endian; `docs/persistence.md` has the same table):
//!
//! ```text
//! file header, 32 bytes
//!   0  magic        8   "PMVMFLOG"
//!   8  version      4   1
//!  12  page_size    4   4096
//!  16  device_size  8   bytes of the device the log belongs to
//!  24  reserved     4   0
//!  28  crc32c       4   of bytes 0..28
//! epoch record, repeated
//!   0  magic        4   "EPOC"
//!   4  source       4   vCPU id of the flush, or 0xFFFFFFFF for a host flush
//!   8  epoch        8   1 for the first record, then +1 each
//!  16  time_ns      8   wall-clock time of the flush, ns since 1970-01-01 UTC
//!  24  page_count   4   n
//!  28  head_crc32c  4   of bytes 0..28, so n is trusted before anything is read by it
//!  32  pages        8n  page numbers, strictly increasing, below device_size / page_size
//!  ..  contents     n * page_size, in the same order
//!  ..  crc32c       4   of the whole record up to here
//! ```
//!
//! A writer appends a record and fdatasyncs it before the flush completes. A crash can leave a
//! torn record at the end: the reader stops at the first record that is incomplete or fails a
//! check, keeps every epoch before it, and reports the rest as the [`Tail`].
//!
//! The reader never panics and never allocates more than the input could hold, whatever the
//! bytes: counts are checked against what remains before they size anything.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use vmm_sys_util::errno;

use crate::files::create_private;

pub const MAGIC: [u8; 8] = *b"PMVMFLOG";
pub const VERSION: u32 = 1;
pub const EPOCH_MAGIC: [u8; 4] = *b"EPOC";
pub const HEADER_LEN: u64 = 32;
pub const EPOCH_HEAD_LEN: u64 = 32;
/// The only page size version 1 knows.
pub const LOG_PAGE_SIZE: u32 = 4096;
/// `source` of a flush the host asked for (the API, or the final writeback at exit).
pub const SOURCE_HOST: u32 = u32::MAX;
/// `source` of a `writeback-interval=` round: not a flush point, but the file did change.
pub const SOURCE_BACKGROUND: u32 = u32::MAX - 1;
/// Bytes read at a time while checksumming a record.
const CHUNK: usize = 1 << 20;

/// Why a log could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum FlushLogError {
    #[error("{path} already exists; a flush log is never appended to across runs: move it away or pick another flush-log=")]
    Exists { path: PathBuf },
    #[error("cannot create flush log {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the flush log")]
    Read(#[source] io::Error),
    #[error("not a pmvm flush log: {reason}")]
    NotALog { reason: String },
    #[error("flush log version {found} is not supported; this pmvm reads version {VERSION}")]
    UnsupportedVersion { found: u32 },
    #[error(
        "flush log page size {found} is not supported; version {VERSION} uses {LOG_PAGE_SIZE}"
    )]
    UnsupportedPageSize { found: u32 },
}

/// Why appending an epoch failed. Cloneable: one writeback's outcome is shared by every flush
/// it covered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("reading page {page} of guest memory for the flush log failed")]
    ReadPage {
        page: u64,
        #[source]
        source: errno::Error,
    },
    #[error("page {page} is past the device's {pages} pages")]
    PageOutOfRange { page: u64, pages: u64 },
    #[error("appending epoch {epoch} to {path} failed")]
    Write {
        epoch: u64,
        path: PathBuf,
        #[source]
        source: errno::Error,
    },
    #[error("fdatasync of {path} after epoch {epoch} failed")]
    Sync {
        epoch: u64,
        path: PathBuf,
        #[source]
        source: errno::Error,
    },
    #[error("{path} is unusable after an earlier append failed and could not be undone")]
    Broken { path: PathBuf },
}

fn errno_of(e: &io::Error) -> errno::Error {
    errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    pub version: u32,
    pub page_size: u32,
    pub device_size: u64,
}

impl LogHeader {
    pub fn device_pages(&self) -> u64 {
        self.device_size / u64::from(self.page_size)
    }

    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.page_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.device_size.to_le_bytes());
        let crc = crc32c::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// One epoch as the reader found it. Page contents stay in the log; read them with
/// [`FlushLog::read_page`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Epoch {
    pub number: u64,
    pub source: u32,
    pub time_ns: u64,
    /// Page numbers, strictly increasing.
    pub pages: Vec<u64>,
    /// Offset of the record in the log.
    pub offset: u64,
}

impl Epoch {
    /// Where the contents of the `i`-th page start.
    fn data_offset(&self, i: usize, page_size: u64) -> u64 {
        self.offset + EPOCH_HEAD_LEN + 8 * self.pages.len() as u64 + i as u64 * page_size
    }

    /// Bytes the whole record takes.
    pub fn record_len(&self, page_size: u64) -> u64 {
        record_len(self.pages.len() as u64, page_size)
    }
}

fn record_len(pages: u64, page_size: u64) -> u64 {
    EPOCH_HEAD_LEN + pages * (8 + page_size) + 4
}

/// Why the reader stopped before the end of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TailProblem {
    /// The record needs more bytes than the file has: a torn append.
    Incomplete {
        needed: u64,
        available: u64,
    },
    BadMagic,
    HeadChecksum,
    /// The record claims more pages than the device has.
    TooManyPages {
        count: u64,
        pages: u64,
    },
    WrongEpochNumber {
        expected: u64,
        found: u64,
    },
    PagesNotIncreasing {
        index: usize,
    },
    PageOutOfRange {
        page: u64,
        pages: u64,
    },
    Checksum,
}

impl std::fmt::Display for TailProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TailProblem::Incomplete { needed, available } => write!(
                f,
                "the record needs {needed} bytes but only {available} remain (torn append)"
            ),
            TailProblem::BadMagic => write!(f, "no epoch record magic"),
            TailProblem::HeadChecksum => write!(f, "the record head fails its checksum"),
            TailProblem::TooManyPages { count, pages } => {
                write!(
                    f,
                    "the record claims {count} pages of a {pages}-page device"
                )
            }
            TailProblem::WrongEpochNumber { expected, found } => {
                write!(f, "epoch {found} where epoch {expected} was due")
            }
            TailProblem::PagesNotIncreasing { index } => {
                write!(f, "page number {index} is not above the one before it")
            }
            TailProblem::PageOutOfRange { page, pages } => {
                write!(f, "page {page} is past the device's {pages} pages")
            }
            TailProblem::Checksum => write!(f, "the record fails its checksum (torn append)"),
        }
    }
}

/// What follows the last good epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tail {
    /// Where the first bad record starts.
    pub offset: u64,
    /// Bytes from there to the end of the file, all ignored.
    pub bytes: u64,
    pub problem: TailProblem,
}

impl std::fmt::Display for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "torn tail: {} bytes at offset {} ignored: {}",
            self.bytes, self.offset, self.problem
        )
    }
}

/// Random access to log bytes: a file, or memory in tests.
pub trait LogSource {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; the caller stays within `len()`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl LogSource for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A log file opened for reading; its length is taken once, at open.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl LogSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// The valid part of a log: its header, every good epoch in order, and what was ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushLog {
    pub header: LogHeader,
    pub epochs: Vec<Epoch>,
    pub tail: Option<Tail>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl FlushLog {
    /// Reads the header and every good epoch of `src`.
    pub fn read(src: &(impl LogSource + ?Sized)) -> Result<FlushLog, FlushLogError> {
        let header = read_header(src)?;
        let mut epochs: Vec<Epoch> = Vec::new();
        let mut offset = HEADER_LEN;
        let mut tail = None;
        while offset < src.len() {
            match read_epoch(src, &header, offset, epochs.len() as u64 + 1)? {
                Ok(epoch) => {
                    offset += epoch.record_len(u64::from(header.page_size));
                    epochs.push(epoch);
                }
                Err(problem) => {
                    tail = Some(Tail {
                        offset,
                        bytes: src.len() - offset,
                        problem,
                    });
                    break;
                }
            }
        }
        Ok(FlushLog {
            header,
            epochs,
            tail,
        })
    }

    /// The epoch numbered `number`, if the log has it.
    pub fn epoch(&self, number: u64) -> Option<&Epoch> {
        let index = usize::try_from(number.checked_sub(1)?).ok()?;
        self.epochs.get(index)
    }

    /// The last good epoch's number; 0 for a log without epochs.
    pub fn last_epoch(&self) -> u64 {
        self.epochs.len() as u64
    }

    /// Reads the contents of the `i`-th page of `epoch` into `buf` (one page long).
    pub fn read_page(
        &self,
        src: &(impl LogSource + ?Sized),
        epoch: &Epoch,
        i: usize,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let page_size = u64::from(self.header.page_size);
        if i >= epoch.pages.len() || buf.len() as u64 != page_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "page index {i} of an epoch with {} pages, buffer of {} bytes",
                    epoch.pages.len(),
                    buf.len()
                ),
            ));
        }
        src.read_exact_at(buf, epoch.data_offset(i, page_size))
    }
}

fn read_header(src: &(impl LogSource + ?Sized)) -> Result<LogHeader, FlushLogError> {
    if src.len() < HEADER_LEN {
        return Err(FlushLogError::NotALog {
            reason: format!(
                "{} bytes long, shorter than the {HEADER_LEN}-byte header",
                src.len()
            ),
        });
    }
    let mut b = [0u8; HEADER_LEN as usize];
    src.read_exact_at(&mut b, 0).map_err(FlushLogError::Read)?;
    if b[0..8] != MAGIC {
        return Err(FlushLogError::NotALog {
            reason: "no PMVMFLOG magic at its start".into(),
        });
    }
    if crc32c::crc32c(&b[..28]) != le_u32(&b, 28) {
        return Err(FlushLogError::NotALog {
            reason: "the file header fails its checksum".into(),
        });
    }
    let header = LogHeader {
        version: le_u32(&b, 8),
        page_size: le_u32(&b, 12),
        device_size: le_u64(&b, 16),
    };
    if header.version != VERSION {
        return Err(FlushLogError::UnsupportedVersion {
            found: header.version,
        });
    }
    if header.page_size != LOG_PAGE_SIZE {
        return Err(FlushLogError::UnsupportedPageSize {
            found: header.page_size,
        });
    }
    Ok(header)
}

/// The record at `offset`: `Ok(Ok(epoch))`, `Ok(Err(problem))` for a bad record, or `Err` for
/// an I/O error reading bytes the source said it had.
fn read_epoch(
    src: &(impl LogSource + ?Sized),
    header: &LogHeader,
    offset: u64,
    expected: u64,
) -> Result<Result<Epoch, TailProblem>, FlushLogError> {
    let available = src.len() - offset;
    if available < EPOCH_HEAD_LEN {
        return Ok(Err(TailProblem::Incomplete {
            needed: EPOCH_HEAD_LEN,
            available,
        }));
    }
    let mut head = [0u8; EPOCH_HEAD_LEN as usize];
    src.read_exact_at(&mut head, offset)
        .map_err(FlushLogError::Read)?;
    if head[0..4] != EPOCH_MAGIC {
        return Ok(Err(TailProblem::BadMagic));
    }
    if crc32c::crc32c(&head[..28]) != le_u32(&head, 28) {
        return Ok(Err(TailProblem::HeadChecksum));
    }
    let number = le_u64(&head, 8);
    if number != expected {
        return Ok(Err(TailProblem::WrongEpochNumber {
            expected,
            found: number,
        }));
    }
    let count = u64::from(le_u32(&head, 24));
    let device_pages = header.device_pages();
    if count > device_pages {
        return Ok(Err(TailProblem::TooManyPages {
            count,
            pages: device_pages,
        }));
    }
    let page_size = u64::from(header.page_size);
    // count <= device pages < 2^52 and page_size = 4096: no overflow.
    let needed = record_len(count, page_size);
    if needed > available {
        return Ok(Err(TailProblem::Incomplete { needed, available }));
    }
    // Now `needed` bytes are known to exist, so buffers sized from `count` are bounded by the
    // input's length.
    let mut crc = crc32c::crc32c(&head);
    let mut list = vec![0u8; 8 * count as usize];
    src.read_exact_at(&mut list, offset + EPOCH_HEAD_LEN)
        .map_err(FlushLogError::Read)?;
    crc = crc32c::crc32c_append(crc, &list);
    let pages: Vec<u64> = list.chunks_exact(8).map(|c| le_u64(c, 0)).collect();
    for (i, &page) in pages.iter().enumerate() {
        if page >= device_pages {
            return Ok(Err(TailProblem::PageOutOfRange {
                page,
                pages: device_pages,
            }));
        }
        if i > 0 && page <= pages[i - 1] {
            return Ok(Err(TailProblem::PagesNotIncreasing { index: i }));
        }
    }
    let data_start = offset + EPOCH_HEAD_LEN + 8 * count;
    let data_len = count * page_size;
    let mut buf = vec![0u8; CHUNK.min(data_len as usize)];
    let mut done = 0u64;
    while done < data_len {
        let n = (data_len - done).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut buf[..n], data_start + done)
            .map_err(FlushLogError::Read)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n as u64;
    }
    let mut stored = [0u8; 4];
    src.read_exact_at(&mut stored, data_start + data_len)
        .map_err(FlushLogError::Read)?;
    if crc != u32::from_le_bytes(stored) {
        return Ok(Err(TailProblem::Checksum));
    }
    Ok(Ok(Epoch {
        number,
        source: le_u32(&head, 4),
        time_ns: le_u64(&head, 16),
        pages,
        offset,
    }))
}

/// Encodes one epoch record. `fill(page, buf)` supplies each page's contents.
pub fn encode_epoch(
    number: u64,
    source: u32,
    time_ns: u64,
    pages: &[u64],
    page_size: usize,
    mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), AppendError>,
) -> Result<Vec<u8>, AppendError> {
    let n = pages.len();
    let mut rec = vec![0u8; record_len(n as u64, page_size as u64) as usize];
    rec[0..4].copy_from_slice(&EPOCH_MAGIC);
    rec[4..8].copy_from_slice(&source.to_le_bytes());
    rec[8..16].copy_from_slice(&number.to_le_bytes());
    rec[16..24].copy_from_slice(&time_ns.to_le_bytes());
    rec[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    let head_crc = crc32c::crc32c(&rec[..28]);
    rec[28..32].copy_from_slice(&head_crc.to_le_bytes());
    let list_start = EPOCH_HEAD_LEN as usize;
    let data_start = list_start + 8 * n;
    for (i, &page) in pages.iter().enumerate() {
        rec[list_start + 8 * i..list_start + 8 * i + 8].copy_from_slice(&page.to_le_bytes());
        let at = data_start + i * page_size;
        fill(page, &mut rec[at..at + page_size])?;
    }
    let body_end = rec.len() - 4;
    let crc = crc32c::crc32c(&rec[..body_end]);
    rec[body_end..].copy_from_slice(&crc.to_le_bytes());
    Ok(rec)
}

/// Nanoseconds since 1970-01-01 UTC, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Appends epochs to a new log file, each durable before `append` returns.
#[derive(Debug)]
pub struct FlushLogWriter {
    file: File,
    path: PathBuf,
    header: LogHeader,
    /// Number of the next epoch.
    next: u64,
    /// End of the last complete record.
    end: u64,
    broken: bool,
}

impl FlushLogWriter {
    /// Creates `path` (which must not exist) with the header for a device of `device_size`
    /// bytes, durable before this returns.
    pub fn create(path: &Path, device_size: u64) -> Result<FlushLogWriter, FlushLogError> {
        let file = create_private(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                FlushLogError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                FlushLogError::Create {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let header = LogHeader {
            version: VERSION,
            page_size: LOG_PAGE_SIZE,
            device_size,
        };
        let created = file
            .write_all_at(&header.encode(), 0)
            .and_then(|()| file.sync_all());
        if let Err(source) = created {
            let _ = std::fs::remove_file(path);
            return Err(FlushLogError::Create {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(FlushLogWriter {
            file,
            path: path.to_path_buf(),
            header,
            next: 1,
            end: HEADER_LEN,
            broken: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Epochs appended so far.
    pub fn epochs(&self) -> u64 {
        self.next - 1
    }

    /// Appends the next epoch: `pages` strictly increasing, `fill(page, buf)` supplying their
    /// contents. Durable (fdatasync) before it returns the epoch's number. A failed append is
    /// cut off again, so the log stays readable and the next append reuses the number.
    pub fn append(
        &mut self,
        source: u32,
        time_ns: u64,
        pages: &[u64],
        fill: impl FnMut(u64, &mut [u8]) -> Result<(), AppendError>,
    ) -> Result<u64, AppendError> {
        if self.broken {
            return Err(AppendError::Broken {
                path: self.path.clone(),
            });
        }
        let device_pages = self.header.device_pages();
        if let Some(&page) = pages.iter().find(|&&p| p >= device_pages) {
            return Err(AppendError::PageOutOfRange {
                page,
                pages: device_pages,
            });
        }
        let epoch = self.next;
        let rec = encode_epoch(
            epoch,
            source,
            time_ns,
            pages,
            self.header.page_size as usize,
            fill,
        )?;
        let written = self
            .file
            .write_all_at(&rec, self.end)
            .map_err(|e| AppendError::Write {
                epoch,
                path: self.path.clone(),
                source: errno_of(&e),
            })
            .and_then(|()| {
                self.file.sync_data().map_err(|e| AppendError::Sync {
                    epoch,
                    path: self.path.clone(),
                    source: errno_of(&e),
                })
            });
        if let Err(e) = written {
            if self.file.set_len(self.end).is_err() {
                self.broken = true;
            }
            return Err(e);
        }
        self.end += rec.len() as u64;
        self.next += 1;
        Ok(epoch)
    }
}

/// splitmix64: a tiny, well-mixed PRNG, so crash states need no extra crate and the same seed
/// gives the same images on every machine.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The pages of `next` (the epoch after the crash point) that crash state `index` of the
/// series for `seed` keeps: each page independently with probability 1/2.
pub fn crash_subset(next: &[u64], seed: u64, index: u64) -> Vec<u64> {
    // Mix the index in through the generator, so neighbouring seeds and indices diverge.
    let mut rng = SplitMix64::new(seed ^ SplitMix64::new(index).next_u64());
    next.iter()
        .copied()
        .filter(|_| rng.next_u64() >> 63 == 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PAGE: usize = LOG_PAGE_SIZE as usize;

    /// A log in memory with epochs of (pages, fill byte per page = page as u8 + epoch).
    fn build(device_pages: u64, epochs: &[Vec<u64>]) -> Vec<u8> {
        let header = LogHeader {
            version: VERSION,
            page_size: LOG_PAGE_SIZE,
            device_size: device_pages * PAGE as u64,
        };
        let mut out = header.encode().to_vec();
        for (i, pages) in epochs.iter().enumerate() {
            let number = i as u64 + 1;
            let rec = encode_epoch(number, i as u32, 1000 + number, pages, PAGE, |p, buf| {
                buf.fill((p as u8).wrapping_add(number as u8));
                Ok(())
            })
            .unwrap();
            out.extend_from_slice(&rec);
        }
        out
    }

    #[test]
    fn round_trip_in_memory() {
        let bytes = build(16, &[vec![0, 3], vec![], vec![15]]);
        let log = FlushLog::read(bytes.as_slice()).unwrap();
        assert_eq!(log.header.device_size, 16 * PAGE as u64);
        assert_eq!(log.tail, None);
        assert_eq!(log.last_epoch(), 3);
        let e1 = log.epoch(1).unwrap();
        assert_eq!((e1.number, e1.source, e1.time_ns), (1, 0, 1001));
        assert_eq!(e1.pages, vec![0, 3]);
        assert_eq!(log.epoch(2).unwrap().pages, Vec::<u64>::new());
        assert_eq!(log.epoch(3).unwrap().pages, vec![15]);
        assert!(log.epoch(0).is_none() && log.epoch(4).is_none());
        let mut buf = vec![0u8; PAGE];
        log.read_page(bytes.as_slice(), e1, 1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 4));
        log.read_page(bytes.as_slice(), log.epoch(3).unwrap(), 0, &mut buf)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 18));
        assert!(log.read_page(bytes.as_slice(), e1, 2, &mut buf).is_err());
        assert!(log
            .read_page(bytes.as_slice(), e1, 0, &mut buf[..10])
            .is_err());
    }

    #[test]
    fn writer_appends_durable_epochs_and_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flush.log");
        let mut w = FlushLogWriter::create(&path, 8 * PAGE as u64).unwrap();
        assert_eq!(w.path(), path);
        let fill = |p: u64, buf: &mut [u8]| {
            buf.fill(p as u8 + 0x10);
            Ok(())
        };
        assert_eq!(w.append(2, 5, &[1, 2], fill).unwrap(), 1);
        assert_eq!(w.append(SOURCE_HOST, 6, &[], fill).unwrap(), 2);
        let err = w.append(0, 7, &[8], fill).unwrap_err();
        assert_eq!(err, AppendError::PageOutOfRange { page: 8, pages: 8 });
        let err = w
            .append(0, 7, &[3], |page, _| {
                Err(AppendError::ReadPage {
                    page,
                    source: errno::Error::new(libc::EFAULT),
                })
            })
            .unwrap_err();
        assert!(matches!(err, AppendError::ReadPage { page: 3, .. }));
        assert_eq!(w.append(1, 8, &[7], fill).unwrap(), 3);
        assert_eq!(w.epochs(), 3);
        let src = FileSource::open(&path).unwrap();
        let log = FlushLog::read(&src).unwrap();
        assert_eq!(log.tail, None);
        let got: Vec<(u64, u32, u64, Vec<u64>)> = log
            .epochs
            .iter()
            .map(|e| (e.number, e.source, e.time_ns, e.pages.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 2, 5, vec![1, 2]),
                (2, SOURCE_HOST, 6, vec![]),
                (3, 1, 8, vec![7])
            ]
        );
        let mut buf = vec![0u8; PAGE];
        log.read_page(&src, &log.epochs[2], 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x17));
        drop(w);
        let err = FlushLogWriter::create(&path, 8 * PAGE as u64).unwrap_err();
        assert!(matches!(err, FlushLogError::Exists { .. }), "{err:?}");
        assert!(err.to_string().contains("flush.log"), "{err}");
        let err = FlushLogWriter::create(&dir.path().join("no/such/dir"), 4096).unwrap_err();
        assert!(matches!(err, FlushLogError::Create { .. }), "{err:?}");
    }

    #[test]
    fn truncation_mid_epoch_keeps_the_earlier_epochs_and_names_the_tail() {
        let bytes = build(8, &[vec![0], vec![1, 2], vec![3]]);
        let full = FlushLog::read(bytes.as_slice()).unwrap();
        let third = full.epochs[2].offset;
        for cut in [
            third + 1,
            third + 31,
            third + 32,
            third + 100,
            bytes.len() as u64 - 1,
        ] {
            let log = FlushLog::read(&bytes[..cut as usize]).unwrap();
            assert_eq!(log.epochs, full.epochs[..2], "cut at {cut}");
            let tail = log.tail.unwrap();
            assert_eq!((tail.offset, tail.bytes), (third, cut - third));
            assert!(
                matches!(tail.problem, TailProblem::Incomplete { .. }),
                "{tail}"
            );
            assert!(tail.to_string().starts_with("torn tail: "), "{tail}");
        }
        // Cut exactly between records: no tail at all.
        let log = FlushLog::read(&bytes[..third as usize]).unwrap();
        assert_eq!((log.epochs.len(), log.tail), (2, None));
    }

    #[test]
    fn corrupt_records_end_the_log_with_the_reason() {
        let bytes = build(8, &[vec![0], vec![1]]);
        let second = FlushLog::read(bytes.as_slice()).unwrap().epochs[1].offset as usize;
        let flip = |at: usize| {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            FlushLog::read(b.as_slice()).unwrap()
        };
        assert_eq!(flip(second).tail.unwrap().problem, TailProblem::BadMagic);
        assert_eq!(
            flip(second + 9).tail.unwrap().problem,
            TailProblem::HeadChecksum
        );
        let data = second + 32 + 8 + 5;
        assert_eq!(flip(data).tail.unwrap().problem, TailProblem::Checksum);
        assert_eq!(flip(data).epochs.len(), 1);
        // Zeros where a record should be (a file extended but never written).
        let mut zeros = bytes.clone();
        zeros.extend_from_slice(&[0; 100]);
        let log = FlushLog::read(zeros.as_slice()).unwrap();
        assert_eq!(log.epochs.len(), 2);
        assert_eq!(log.tail.unwrap().problem, TailProblem::BadMagic);
    }

    #[test]
    fn records_that_break_the_rules_are_rejected_even_with_good_checksums() {
        let header = LogHeader {
            version: VERSION,
            page_size: LOG_PAGE_SIZE,
            device_size: 4 * PAGE as u64,
        };
        let with = |number: u64, pages: &[u64]| {
            let mut b = header.encode().to_vec();
            b.extend(encode_epoch(number, 0, 0, pages, PAGE, |_, _| Ok(())).unwrap());
            FlushLog::read(b.as_slice())
                .unwrap()
                .tail
                .map(|t| t.problem)
        };
        assert_eq!(with(1, &[0, 3]), None);
        assert_eq!(
            with(2, &[0]),
            Some(TailProblem::WrongEpochNumber {
                expected: 1,
                found: 2
            })
        );
        assert_eq!(
            with(1, &[2, 2]),
            Some(TailProblem::PagesNotIncreasing { index: 1 })
        );
        assert_eq!(
            with(1, &[4]),
            Some(TailProblem::PageOutOfRange { page: 4, pages: 4 })
        );
        assert_eq!(
            with(1, &[0, 1, 2, 3, 4]),
            Some(TailProblem::TooManyPages { count: 5, pages: 4 })
        );
    }

    #[test]
    fn bad_headers_are_errors_that_say_why() {
        let good = build(4, &[]);
        assert!(FlushLog::read(good.as_slice()).is_ok());
        let err = FlushLog::read(&good[..31]).unwrap_err();
        assert!(err.to_string().contains("shorter than"), "{err}");
        let mut b = good.clone();
        b[0] = b'X';
        assert!(FlushLog::read(b.as_slice())
            .unwrap_err()
            .to_string()
            .contains("PMVMFLOG"));
        let mut b = good.clone();
        b[20] ^= 1;
        assert!(FlushLog::read(b.as_slice())
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let reheader = |version: u32, page_size: u32| {
            let h = LogHeader {
                version,
                page_size,
                device_size: 4096,
            };
            FlushLog::read(h.encode().as_slice()).unwrap_err()
        };
        assert!(matches!(
            reheader(2, 4096),
            FlushLogError::UnsupportedVersion { found: 2 }
        ));
        assert!(matches!(
            reheader(1, 512),
            FlushLogError::UnsupportedPageSize { found: 512 }
        ));
    }

    #[test]
    fn splitmix64_matches_its_reference_and_subsets_are_deterministic() {
        // Reference outputs of splitmix64 seeded with 1234567.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        let pages: Vec<u64> = (0..64).collect();
        let a = crash_subset(&pages, 7, 0);
        assert_eq!(a, crash_subset(&pages, 7, 0));
        assert_ne!(a, crash_subset(&pages, 7, 1));
        assert_ne!(a, crash_subset(&pages, 8, 0));
        assert!(a.iter().all(|p| pages.contains(p)));
        assert!((16..=48).contains(&a.len()), "{} of 64 kept", a.len());
        assert!(crash_subset(&[], 1, 1).is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = FlushLog::read(bytes.as_slice());
        }

        #[test]
        fn arbitrary_records_after_a_good_header_never_panic(
            device_pages in 0u64..64,
            body in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let header = LogHeader { version: VERSION, page_size: LOG_PAGE_SIZE, device_size: device_pages * 4096 };
            let mut b = header.encode().to_vec();
            b.extend_from_slice(&body);
            let log = FlushLog::read(b.as_slice()).unwrap();
            prop_assert!(log.epochs.is_empty() || log.tail.is_some() || b.len() as u64 == HEADER_LEN);
        }

        #[test]
        fn damage_keeps_a_prefix_of_the_epochs(
            epochs in proptest::collection::vec(
                proptest::collection::btree_set(0u64..6, 0..4).prop_map(|s| s.into_iter().collect::<Vec<_>>()),
                0..5,
            ),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            flip_bit in 0u8..8,
            do_flip in any::<bool>(),
        ) {
            let bytes = build(6, &epochs);
            let full = FlushLog::read(bytes.as_slice()).unwrap();
            prop_assert_eq!(full.epochs.len(), epochs.len());
            let mut damaged = bytes[..cut.index(bytes.len() + 1).max(HEADER_LEN as usize)].to_vec();
            if do_flip && damaged.len() > HEADER_LEN as usize {
                let at = HEADER_LEN as usize + flip.index(damaged.len() - HEADER_LEN as usize);
                damaged[at] ^= 1 << flip_bit;
            }
            let log = FlushLog::read(damaged.as_slice()).unwrap();
            prop_assert!(log.epochs.len() <= full.epochs.len());
            prop_assert_eq!(&log.epochs[..], &full.epochs[..log.epochs.len()]);
            let end = log.epochs.last().map_or(HEADER_LEN, |e| e.offset + e.record_len(4096));
            match &log.tail {
                None => prop_assert_eq!(end, damaged.len() as u64),
                Some(t) => {
                    prop_assert_eq!(t.offset, end);
                    prop_assert_eq!(t.offset + t.bytes, damaged.len() as u64);
                }
            }
        }
    }
}
