//! The device's side of the flush-epoch log: creating the file, and one epoch per writeback.

use super::{FlushSource, Nvdimm};
use crate::flush_log::{self, AppendError, FlushLogWriter};
use crate::lock::lock;
use crate::page_set::Run;
use crate::{NvdimmError, PAGE_SIZE};

impl Nvdimm {
    /// Creates the `flush-log=` file, if the device has one and it is not created yet. Attach
    /// does this, so only a VM that runs creates a log (not one built only for its ACPI tables).
    pub fn open_flush_log(&self) -> Result<(), NvdimmError> {
        let Some(path) = &self.flush_log_path else {
            return Ok(());
        };
        let mut log = lock(&self.flush_log);
        if log.is_none() {
            let writer = FlushLogWriter::create(path, self.size()).map_err(|source| {
                NvdimmError::FlushLog {
                    id: self.id.clone(),
                    source,
                }
            })?;
            *log = Some(writer);
        }
        Ok(())
    }

    /// Appends the epoch of one writeback to the flush log, if there is one. Empty background
    /// writebacks change nothing on disk and add no epoch.
    pub(super) fn log_epoch(&self, source: FlushSource, runs: &[Run]) -> Result<(), AppendError> {
        let mut log = lock(&self.flush_log);
        let Some(log) = log.as_mut() else {
            return Ok(());
        };
        let pages: Vec<u64> = runs
            .iter()
            .flat_map(|r| r.first_page..r.first_page + r.pages)
            .filter(|&p| p < self.size() / PAGE_SIZE)
            .collect();
        if pages.is_empty() && source == FlushSource::Background {
            return Ok(());
        }
        // The contents as the guest sees them now: for adr the file's page cache, for flush
        // the private copy about to be written into the file.
        let fill = |page: u64, buf: &mut [u8]| {
            self.mapping
                .read_at(page * PAGE_SIZE, buf)
                .map_err(|_| AppendError::ReadPage {
                    page,
                    source: vmm_sys_util::errno::Error::new(libc::EFAULT),
                })
        };
        log.append(source.log_code(), flush_log::now_ns(), &pages, fill)?;
        self.metrics.log_epochs.inc();
        Ok(())
    }
}
