//! What the suite tests: every case, where it applies, what the host should see, and the
//! order the guest runs them in.

use std::fmt;

/// Where a case writes: the raw block device or a DAX-mounted filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fs {
    Raw,
    Ext4,
    Xfs,
}

impl Fs {
    pub const ALL: [Fs; 3] = [Fs::Raw, Fs::Ext4, Fs::Xfs];

    pub fn name(self) -> &'static str {
        match self {
            Fs::Raw => "raw",
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    pub fn from_name(name: &str) -> Option<Fs> {
        Fs::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The NVDIMM (in --pmem order) the target lives on: the raw cases run on the first
    /// device before ext4 is made on it; xfs has the second.
    pub fn device(self) -> usize {
        match self {
            Fs::Raw | Fs::Ext4 => 0,
            Fs::Xfs => 1,
        }
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One way of making data durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Case {
    /// write, then fsync.
    Fsync,
    /// write, then fdatasync.
    Fdatasync,
    /// pwrite on a file opened O_SYNC.
    OSync,
    /// pwrite on a file opened O_DSYNC.
    ODsync,
    /// Stores through a shared mapping, then msync(MS_SYNC).
    Msync,
    /// Stores, msync(MS_ASYNC), then fsync.
    MsyncAsyncFsync,
    /// Stores through a MAP_SYNC mapping made durable with clwb and sfence only.
    MapSync,
    /// write, then sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER).
    SyncFileRange,
    /// write, then syncfs on the file.
    Syncfs,
    /// write, then sync().
    Sync,
    /// fallocate, write into the allocated range, fsync.
    FallocateFsync,
    /// Write a temporary file, rename it into place, fsync the directory.
    RenameDirFsync,
    /// O_DIRECT pwrite on the raw device, then fdatasync.
    ODirect,
    /// fio, ioengine=mmap with msync after every write, verify=crc32c.
    FioMmapMsync,
    /// fio, ioengine=psync with fdatasync after every write, verify=crc32c.
    FioPsyncFdatasync,
    /// fio, ioengine=psync with sync=dsync (O_DSYNC), verify=crc32c.
    FioDsync,
    /// xfs_io: MAP_SYNC mmap, mwrite, msync -s.
    XfsIoMapSync,
}

/// What the host must see for a case to pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// At least one flush-hint write reached pmvm during the case, and the pages are clean.
    Flush,
    /// By documented semantics no flush need reach the host; the data must still be there.
    NoFlush(&'static str),
}

impl Case {
    pub const ALL: [Case; 17] = [
        Case::Fsync,
        Case::Fdatasync,
        Case::OSync,
        Case::ODsync,
        Case::Msync,
        Case::MsyncAsyncFsync,
        Case::MapSync,
        Case::SyncFileRange,
        Case::Syncfs,
        Case::Sync,
        Case::FallocateFsync,
        Case::RenameDirFsync,
        Case::ODirect,
        Case::FioMmapMsync,
        Case::FioPsyncFdatasync,
        Case::FioDsync,
        Case::XfsIoMapSync,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::Fsync => "fsync",
            Case::Fdatasync => "fdatasync",
            Case::OSync => "o_sync",
            Case::ODsync => "o_dsync",
            Case::Msync => "msync",
            Case::MsyncAsyncFsync => "msync_async_fsync",
            Case::MapSync => "map_sync",
            Case::SyncFileRange => "sync_file_range",
            Case::Syncfs => "syncfs",
            Case::Sync => "sync",
            Case::FallocateFsync => "fallocate_fsync",
            Case::RenameDirFsync => "rename_dirfsync",
            Case::ODirect => "o_direct",
            Case::FioMmapMsync => "fio_mmap_msync",
            Case::FioPsyncFdatasync => "fio_psync_fdatasync",
            Case::FioDsync => "fio_dsync",
            Case::XfsIoMapSync => "xfs_io_map_sync",
        }
    }

    pub fn from_name(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether the case makes sense on `fs`. MAP_SYNC, syncfs, fallocate and rename need a
    /// filesystem; a raw device's sync() has no filesystem to flush; O_DIRECT is the raw
    /// device's own path (DAX filesystems ignore it).
    pub fn applies_to(self, fs: Fs) -> bool {
        match self {
            Case::MapSync
            | Case::Syncfs
            | Case::Sync
            | Case::FallocateFsync
            | Case::RenameDirFsync
            | Case::FioMmapMsync
            | Case::FioPsyncFdatasync
            | Case::FioDsync
            | Case::XfsIoMapSync => fs != Fs::Raw,
            Case::ODirect => fs == Fs::Raw,
            _ => true,
        }
    }

    /// Third-party tools rather than the suite's own system calls.
    pub fn tool(self) -> Option<&'static str> {
        match self {
            Case::FioMmapMsync | Case::FioPsyncFdatasync | Case::FioDsync => Some("fio"),
            Case::XfsIoMapSync => Some("xfs_io"),
            _ => None,
        }
    }

    pub fn expect(self) -> Expect {
        match self {
            Case::MapSync => Expect::NoFlush(
                "MAP_SYNC data is made durable by clwb+sfence in the guest, which no VMM can trap",
            ),
            Case::SyncFileRange => Expect::NoFlush(
                "sync_file_range(2) writes pages back but flushes no write cache (its man page: \
                 no data integrity)",
            ),
            _ => Expect::Flush,
        }
    }

    /// Bytes of data the case writes. The suite's own cases write two pages, enough to see
    /// a run of pages on the host and small enough for slow guests.
    pub fn data_len(self) -> usize {
        match self.tool() {
            Some(_) => 64 * 1024,
            None => 2 * 4096,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every (case, target) pair in the order the guest runs them: the raw device first (before
/// a filesystem is made on it), then ext4, then xfs.
pub fn plan() -> Vec<(Case, Fs)> {
    Fs::ALL
        .into_iter()
        .flat_map(|fs| {
            Case::ALL
                .into_iter()
                .filter(move |c| c.applies_to(fs))
                .map(move |c| (c, fs))
        })
        .collect()
}

/// The bytes a case writes: deterministic, different for every (case, target), and never a
/// run of zeros that a fresh NVDIMM would already hold.
pub fn pattern(case: Case, fs: Fs, len: usize) -> Vec<u8> {
    let mut seed = crc32c::crc32c(format!("{case}/{fs}").as_bytes()) as u64;
    seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Tallies what happened, for the summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    /// `case fs: why` for each failure.
    pub failures: Vec<String>,
}

impl Tally {
    pub fn pass(&mut self) {
        self.passed += 1;
    }

    pub fn fail(&mut self, case: Case, fs: Fs, why: &str) {
        self.failed += 1;
        self.failures.push(format!("{case} {fs}: {why}"));
    }

    pub fn skip(&mut self) {
        self.skipped += 1;
    }

    pub fn total(&self) -> u32 {
        self.passed + self.failed + self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_single_words_that_round_trip() {
        let mut seen = HashSet::new();
        for c in Case::ALL {
            assert!(seen.insert(c.name()), "duplicate {}", c.name());
            assert!(!c.name().contains(char::is_whitespace));
            assert_eq!(Case::from_name(c.name()), Some(c));
        }
        for fs in Fs::ALL {
            assert_eq!(Fs::from_name(fs.name()), Some(fs));
        }
        assert_eq!(Case::from_name("FSYNC"), None);
    }

    #[test]
    fn the_plan_runs_every_case_on_each_target() {
        let plan = plan();
        let on = |fs| -> Vec<Case> {
            plan.iter()
                .filter(|(_, f)| *f == fs)
                .map(|(c, _)| *c)
                .collect()
        };
        for fs in [Fs::Ext4, Fs::Xfs] {
            let cases = on(fs);
            assert_eq!(cases.len(), 16, "{fs}: {cases:?}");
            assert!(!cases.contains(&Case::ODirect));
        }
        let raw = on(Fs::Raw);
        assert_eq!(
            raw,
            vec![
                Case::Fsync,
                Case::Fdatasync,
                Case::OSync,
                Case::ODsync,
                Case::Msync,
                Case::MsyncAsyncFsync,
                Case::SyncFileRange,
                Case::ODirect
            ]
        );
        assert_eq!(plan.len(), 40);
        // Raw first: ext4 is made on the same device afterwards.
        let first_ext4 = plan.iter().position(|(_, f)| *f == Fs::Ext4).unwrap();
        assert!(plan[..first_ext4].iter().all(|(_, f)| *f == Fs::Raw));
        assert_eq!(Fs::Raw.device(), Fs::Ext4.device());
        assert_ne!(Fs::Ext4.device(), Fs::Xfs.device());
    }

    #[test]
    fn only_map_sync_and_sync_file_range_expect_no_flush() {
        let no_flush: Vec<Case> = Case::ALL
            .into_iter()
            .filter(|c| matches!(c.expect(), Expect::NoFlush(_)))
            .collect();
        assert_eq!(no_flush, vec![Case::MapSync, Case::SyncFileRange]);
    }

    #[test]
    fn patterns_are_deterministic_distinct_and_not_zero() {
        let a = pattern(Case::Fsync, Fs::Ext4, 8192);
        assert_eq!(a, pattern(Case::Fsync, Fs::Ext4, 8192));
        assert_ne!(a, pattern(Case::Fsync, Fs::Xfs, 8192));
        assert_ne!(a, pattern(Case::Fdatasync, Fs::Ext4, 8192));
        assert_eq!(a.len(), 8192);
        assert_eq!(pattern(Case::Sync, Fs::Xfs, 13).len(), 13);
        for chunk in a.chunks(64) {
            assert!(chunk.iter().any(|&b| b != 0));
        }
    }

    #[test]
    fn tally_counts_and_remembers_failures() {
        let mut t = Tally::default();
        t.pass();
        t.skip();
        t.fail(Case::Sync, Fs::Xfs, "sync: EIO");
        assert_eq!((t.passed, t.failed, t.skipped, t.total()), (1, 1, 1, 3));
        assert_eq!(t.failures, vec!["sync xfs: sync: EIO".to_string()]);
    }
}
