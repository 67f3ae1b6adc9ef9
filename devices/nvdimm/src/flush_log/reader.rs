//! Reading a flush-epoch log: every good epoch in order, and what follows them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::*;

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
