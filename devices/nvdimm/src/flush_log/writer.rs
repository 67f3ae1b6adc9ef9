//! Appending epochs to a new flush-epoch log, each durable before the flush completes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::*;
use crate::files::create_private;

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
