//! The flush-epoch log (the `flush-log=` setting): one record per flush, holding the pages
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
//!   4  source       4   vCPU id of the flush, 0xFFFFFFFF a host flush, 0xFFFFFFFE a
//!                         background round, 0xFFFFFFFD a guest's own cache-line flush
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
//!
//! This file holds the format (constants, header, record encoding, errors); the reader, the
//! writer and the crash-state sampler of `pmvm log` have a file each.

mod crash_states;
mod reader;
mod writer;

pub use crash_states::{crash_subset, SplitMix64};
pub use reader::{FileSource, FlushLog, LogSource, Tail, TailProblem};
pub use writer::{now_ns, FlushLogWriter};

use std::io;
use std::path::PathBuf;

use vmm_sys_util::errno;

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
/// `source` of the lines a guest wrote back itself (CLWB, CLFLUSHOPT): never written by pmvm,
/// which cannot see them, but by `pmvm crash-test` when the guest reports them.
pub const SOURCE_CACHE_FLUSH: u32 = u32::MAX - 2;
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

#[cfg(test)]
mod tests;
