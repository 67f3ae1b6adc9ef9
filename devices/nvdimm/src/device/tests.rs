use super::*;
use crate::backing::BackingError;
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn params(index: usize) -> NvdimmParams {
    NvdimmParams {
        index,
        slot: 1,
        guest_base: 1 << 32,
        hint_page: 0xd000_0000 + index as u64 * 4096,
        default_hints: 1,
        manual_protect: false,
    }
}

fn open(dir: &Path, cfg: PmemConfig, index: usize) -> Result<Nvdimm, NvdimmError> {
    let cfg = PmemConfig {
        path: dir.join("pmem.img"),
        ..cfg
    };
    Nvdimm::open(&cfg, params(index))
}

/// A device with the defaults; `open` puts it in its directory.
fn dev() -> PmemConfig {
    PmemConfig::new("")
}

#[test]
fn nvdimm_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Nvdimm>();
}

#[test]
fn identity_and_nfit_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path(), dev().with_size(4 << 20).with_hints(3), 2).unwrap();
    assert_eq!(d.id(), "pmem2");
    assert_eq!(d.size(), 4 * MIB);
    assert_eq!(d.guest_base(), 1 << 32);
    assert_eq!(d.handle(), 3);
    assert_eq!(d.hint_page(), 0xd000_2000);
    assert_eq!(
        d.hint_addresses(),
        vec![0xd000_2000, 0xd000_2008, 0xd000_2010]
    );
    assert_eq!(d.path(), dir.path().join("pmem.img"));
    assert!(!d.readonly());
    // FNV-1a 32 reference values: "" is the offset basis, "a" is 0xe40c292c.
    assert_eq!(fnv1a32(b""), 0x811c_9dc5);
    assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
    assert_eq!(d.serial_number(), fnv1a32(b"pmem2"));
    let again = format!("{d:?}");
    assert!(again.contains("pmem2"), "{again}");
}

#[test]
fn default_hints_come_from_params() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    assert_eq!(d.hint_addresses(), vec![0xd000_0000]);
    drop(d);
    let cfg = PmemConfig::new(dir.path().join("pmem.img"));
    let err = Nvdimm::open(
        &cfg,
        NvdimmParams {
            default_hints: 0,
            ..params(0)
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, NvdimmError::BadHintCount { hints: 0, .. }),
        "{err:?}"
    );
    let err = Nvdimm::open(
        &cfg,
        NvdimmParams {
            guest_base: 0x1001,
            ..params(0)
        },
    )
    .unwrap_err();
    assert!(matches!(err, NvdimmError::Misaligned { .. }), "{err:?}");
}

#[test]
fn created_file_is_removed_unless_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pmem.img");
    drop(open(dir.path(), dev().with_size(2 << 20), 0).unwrap());
    assert!(!path.exists(), "an unkept created file survived");
    let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    d.keep_created_file();
    drop(d);
    assert!(path.exists(), "a kept file was removed");
    // A file that existed before is never removed.
    drop(open(dir.path(), dev(), 0).unwrap());
    assert!(path.exists(), "an existing file was removed");
}

#[test]
fn backing_errors_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let err = open(dir.path(), dev(), 0).unwrap_err();
    assert!(
        matches!(err, NvdimmError::Backing(BackingError::Missing { .. })),
        "{err:?}"
    );
    let first = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    let cfg = PmemConfig::new(dir.path().join("pmem.img"));
    let err = Nvdimm::open_among(&cfg, params(1), &[&first]).unwrap_err();
    assert!(
        err.to_string().contains("pmem1") && err.to_string().contains("pmem0"),
        "{err}"
    );
}

#[test]
fn hint_page_accesses_are_decoded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path(), dev().with_size(2 << 20).with_hints(2), 0).unwrap();
    d.mmio_write(0, 0, &1u64.to_le_bytes()).unwrap();
    d.mmio_write(0, 8, &[0xff; 8]).unwrap();
    // Odd widths and offsets inside a hint still flush, and are counted.
    d.mmio_write(0, 0, &[1, 0, 0, 0]).unwrap();
    d.mmio_write(0, 4, &[0; 8]).unwrap();
    d.mmio_write(0, 16, &[0; 8]).unwrap();
    let mut r = [0xaa; 8];
    d.mmio_read(0, &mut r);
    assert_eq!(r, [0; 8]);
    let s = d.stats();
    assert_eq!(s.flushes, 4);
    assert_eq!(s.empty_flushes, 4);
    assert_eq!(s.bad_width_writes, 2);
    assert_eq!(s.outside_writes, 1);
    assert_eq!(s.pages_written, 0);
    assert_eq!(s.latency_us.histogram.iter().sum::<u64>(), 4);
    assert_eq!(s.host_flushes, 0);
}

#[test]
fn host_writes_are_pending_until_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    assert_eq!(d.pending_pages(), Some(0));
    // Spans pages 0 and 1; page 5 separately: two runs.
    d.write_bytes(4090, b"0123456789").unwrap();
    d.write_bytes(5 * PAGE_SIZE, b"x").unwrap();
    assert_eq!(d.pending_pages(), Some(3));
    let report = d.host_flush().unwrap();
    assert_eq!(
        (report.pages, report.bytes, report.runs),
        (3, 3 * PAGE_SIZE, 2)
    );
    assert_eq!(d.pending_pages(), Some(0));
    let s = d.stats();
    assert_eq!(
        (s.host_flushes, s.flushes, s.pages_written, s.runs),
        (1, 0, 3, 2)
    );
    assert_eq!(s.last_harvest_pages, 3);
    assert_eq!(
        s.latency_us.histogram.iter().sum::<u64>(),
        0,
        "host flushes are not guest latency"
    );
    let empty = d.host_flush().unwrap();
    assert_eq!(empty.pages, 0);
    let mut buf = [0u8; 10];
    d.read_bytes(4090, &mut buf).unwrap();
    assert_eq!(&buf, b"0123456789");
    let on_disk = std::fs::read(dir.path().join("pmem.img")).unwrap();
    assert_eq!(&on_disk[4090..4100], b"0123456789");
    assert!(
        d.summary_line()
            .starts_with("pmem0: 0 flushes (0 empty) + 2 host flushes, 3 pages in 2 runs"),
        "{}",
        d.summary_line()
    );
}

#[test]
fn writeback_time_is_counted_inside_the_flush_and_only_for_writebacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    assert_eq!(d.stats().writeback_ns, 0);
    d.write_bytes(3 * PAGE_SIZE, b"x").unwrap();
    let start = Instant::now();
    assert_eq!(d.host_flush().unwrap().pages, 1);
    let whole = u64::try_from(start.elapsed().as_nanos()).unwrap();
    let spent = d.stats().writeback_ns;
    assert!(
        spent > 0 && spent <= whole,
        "{spent} ns of writeback in a flush of {whole} ns"
    );
    // Powered off, a flush writes nothing back and adds no time.
    d.power_cut();
    assert!(d.host_flush().is_err());
    assert_eq!(d.stats().writeback_ns, spent);
}

#[test]
fn out_of_range_and_readonly_host_writes_fail() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    // Reopened read-only below.
    d.keep_created_file();
    let err = d.write_bytes(2 * MIB - 1, b"ab").unwrap_err();
    assert!(err.to_string().contains("pmem0"), "{err}");
    assert_eq!(d.pending_pages(), Some(0));
    drop(d);
    let ro = open(dir.path(), dev().with_readonly(true), 0).unwrap();
    assert!(ro.readonly());
    assert!(ro.write_bytes(0, b"x").is_err());
    assert_eq!(ro.host_flush().unwrap().pages, 0);
}

fn file_bytes(dir: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(dir.join("pmem.img")).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn strict_model_changes_the_file_only_at_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = open(
        dir.path(),
        dev().with_size(2 << 20).with_persist(PersistMode::Flush),
        0,
    )
    .unwrap();
    d.keep_created_file();
    assert_eq!(d.persist(), PersistMode::Flush);
    d.write_bytes(0, b"AAAA").unwrap();
    assert_eq!(file_bytes(dir.path(), 0, 4), [0; 4], "no flush yet");
    let mut seen = [0u8; 4];
    d.read_bytes(0, &mut seen).unwrap();
    assert_eq!(&seen, b"AAAA", "the guest sees its own stores");
    assert_eq!(d.host_flush().unwrap().pages, 1);
    assert_eq!(file_bytes(dir.path(), 0, 4), b"AAAA");
    d.write_bytes(PAGE_SIZE, b"BBBB").unwrap();
    d.write_bytes(0, b"aa").unwrap();
    drop(d);
    // Dropping the device without a flush is the power loss: the private copy is gone.
    assert_eq!(file_bytes(dir.path(), 0, 4), b"AAAA");
    assert_eq!(file_bytes(dir.path(), PAGE_SIZE as usize, 4), [0; 4]);
    let d = open(dir.path(), dev().with_persist(PersistMode::Flush), 0).unwrap();
    d.read_bytes(0, &mut seen).unwrap();
    assert_eq!(&seen, b"AAAA", "the reboot sees the last flushed image");
}

#[test]
fn after_a_power_cut_nothing_is_written_back() {
    for persist in [PersistMode::Adr, PersistMode::Flush] {
        let dir = tempfile::tempdir().unwrap();
        let d = open(
            dir.path(),
            dev().with_size(2 << 20).with_persist(persist),
            0,
        )
        .unwrap();
        d.write_bytes(0, b"A").unwrap();
        d.host_flush().unwrap();
        d.write_bytes(PAGE_SIZE, b"B").unwrap();
        d.power_cut();
        assert!(d.lost_power());
        let err = d.host_flush().unwrap_err();
        assert!(
            matches!(
                err,
                NvdimmError::Flush {
                    source: FlushError::PoweredOff,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(FlushError::PoweredOff));
        assert_eq!(d.io_fault(), None, "a power cut is no I/O fault");
        let s = d.stats();
        assert_eq!(
            (s.pages_written, s.errors, s.writebacks),
            (1, 0, 1),
            "{persist}"
        );
        assert_eq!(d.pending_pages(), Some(1), "page B is still only in memory");
        let b = file_bytes(dir.path(), PAGE_SIZE as usize, 1)[0];
        // adr: the store is in the host's page cache, which did not lose power.
        assert_eq!(
            b,
            if persist == PersistMode::Adr { b'B' } else { 0 },
            "{persist}"
        );
    }
}

#[test]
fn every_flush_appends_an_epoch_with_its_source_and_pages() {
    use crate::flush_log::{FileSource, FlushLog, SOURCE_HOST};
    for persist in [PersistMode::Adr, PersistMode::Flush] {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("flush.log");
        let cfg = PmemConfig {
            flush_log: Some(log_path.clone()),
            ..dev().with_size(2 << 20).with_persist(persist)
        };
        let d = open(dir.path(), cfg, 0).unwrap();
        assert_eq!(d.flush_log_path(), Some(log_path.as_path()));
        assert!(
            !log_path.exists(),
            "the log is created when the VM needs it"
        );
        d.open_flush_log().unwrap();
        d.open_flush_log().unwrap();
        d.write_bytes(0, &[0xa1; 4096]).unwrap();
        d.host_flush().unwrap();
        d.write_bytes(3 * PAGE_SIZE, &[0xb2; 4096]).unwrap();
        d.write_bytes(PAGE_SIZE, &[0xc3; 10]).unwrap();
        d.mmio_write(5, 0, &[1; 8]).unwrap();
        d.mmio_write(7, 0, &[1; 8]).unwrap();
        assert_eq!(d.stats().log_epochs, 3);
        let src = FileSource::open(&log_path).unwrap();
        let log = FlushLog::read(&src).unwrap();
        assert_eq!(log.tail, None);
        assert_eq!(log.header.device_size, 2 << 20);
        let summary: Vec<(u64, u32, Vec<u64>)> = log
            .epochs
            .iter()
            .map(|e| (e.number, e.source, e.pages.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, SOURCE_HOST, vec![0]),
                (2, 5, vec![1, 3]),
                (3, 7, vec![])
            ],
            "{persist}"
        );
        let mut page = vec![0u8; 4096];
        log.read_page(&src, &log.epochs[1], 1, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xb2));
        log.read_page(&src, &log.epochs[1], 0, &mut page).unwrap();
        assert_eq!(
            &page[..11],
            &[0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0xc3, 0]
        );
        drop(d);
        let cfg = PmemConfig {
            flush_log: Some(log_path.clone()),
            ..dev().with_size(2 << 20)
        };
        let err = open(dir.path(), cfg, 0)
            .unwrap()
            .open_flush_log()
            .unwrap_err();
        assert!(matches!(err, NvdimmError::FlushLog { .. }), "{err:?}");
    }
}

#[test]
fn background_writeback_writes_without_flushes_and_stops_cleanly() {
    use crate::flush_log::{FileSource, FlushLog, SOURCE_BACKGROUND};
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("bg.log");
    let d = Arc::new(
        open(
            dir.path(),
            PmemConfig {
                flush_log: Some(log_path.clone()),
                ..dev()
                    .with_size(2 << 20)
                    .with_writeback_interval(Duration::from_millis(20))
            },
            0,
        )
        .unwrap(),
    );
    assert_eq!(d.writeback_interval(), Some(Duration::from_millis(20)));
    d.open_flush_log().unwrap();
    let runner = {
        let d = d.clone();
        thread::spawn(move || d.run_background_writeback())
    };
    d.write_bytes(2 * PAGE_SIZE, b"bg").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.stats().background_pages == 0 {
        assert!(
            Instant::now() < deadline,
            "no background writeback within 10 s"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // Several empty rounds pass; they log nothing.
    thread::sleep(Duration::from_millis(100));
    d.stop_background_writeback();
    assert_eq!(runner.join().unwrap(), Ok(()));
    let s = d.stats();
    assert!(s.background_flushes >= 2, "{s:?}");
    assert_eq!((s.background_pages, s.pages_written, s.flushes), (1, 1, 0));
    assert_eq!(d.pending_pages(), Some(0));
    let log = FlushLog::read(&FileSource::open(&log_path).unwrap()).unwrap();
    let summary: Vec<(u32, Vec<u64>)> = log
        .epochs
        .iter()
        .map(|e| (e.source, e.pages.clone()))
        .collect();
    assert_eq!(summary, vec![(SOURCE_BACKGROUND, vec![2])]);
    // A device without an interval returns at once.
    let plain = open(&dir.path().join("x"), dev(), 0);
    assert!(plain.is_err());
    let other = tempfile::tempdir().unwrap();
    let quick = open(other.path(), dev().with_size(2 << 20), 0).unwrap();
    assert_eq!(quick.run_background_writeback(), Ok(()));
}

#[test]
fn a_power_cut_ends_the_background_loop() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(
        open(
            dir.path(),
            dev()
                .with_size(2 << 20)
                .with_writeback_interval(Duration::from_secs(3600)),
            0,
        )
        .unwrap(),
    );
    let runner = {
        let d = d.clone();
        thread::spawn(move || d.run_background_writeback())
    };
    d.power_cut();
    assert_eq!(runner.join().unwrap(), Ok(()));
    assert_eq!(d.stats().background_flushes, 0);
}

#[test]
fn a_shrunk_backing_file_ends_the_background_loop_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pmem.img");
    let d = open(
        dir.path(),
        dev()
            .with_size(2 << 20)
            .with_writeback_interval(Duration::from_millis(5)),
        0,
    )
    .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(0))
        .unwrap();
    let err = d.run_background_writeback().unwrap_err();
    assert!(err.is_fatal(), "{err}");
    assert!(err.to_string().contains("shrank to 0 bytes"), "{err}");
    assert_eq!(d.stats().background_flushes, 1);
}

#[test]
fn concurrent_flushes_share_writebacks_and_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let d = Arc::new(open(dir.path(), dev().with_size(2 << 20), 0).unwrap());
    let threads = 6;
    let rounds = 40;
    let (done, finished) = std::sync::mpsc::channel();
    for t in 0..threads {
        let (d, done) = (d.clone(), done.clone());
        thread::spawn(move || {
            for r in 0..rounds {
                let page = (t * rounds + r) as u64;
                d.write_bytes(page * PAGE_SIZE, &[t as u8 + 1]).unwrap();
                if r % 2 == 0 {
                    d.host_flush().unwrap();
                } else {
                    d.mmio_write(0, 0, &[1; 8]).unwrap();
                }
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..threads {
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a flushing thread deadlocked or panicked");
    }
    let s = d.stats();
    let total = (threads * rounds) as u64;
    assert_eq!(s.host_flushes + s.flushes, total);
    assert_eq!(s.flushes, total / 2);
    assert_eq!(
        s.pages_written, total,
        "every page written back exactly once"
    );
    assert!(s.writebacks <= total && s.writebacks >= 1);
    assert_eq!(s.errors, 0);
    assert_eq!(d.pending_pages(), Some(0));
}

#[test]
fn a_replaced_or_deleted_backing_file_is_a_fault_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pmem.img");
    let moved = dir.path().join("moved.img");
    let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    d.keep_created_file();
    d.write_bytes(0, b"kept").unwrap();
    std::fs::rename(&path, &moved).unwrap();
    std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
    assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(FlushError::Replaced));
    let fault = d.io_fault().expect("a fault");
    assert_eq!(
        (fault.errno_name.as_str(), fault.pages_at_stake),
        ("ESTALE", 1)
    );
    assert!(fault.what.contains("replaced"), "{fault:?}");
    // Back under its name: the retry writes the pending page, and the fault clears.
    std::fs::rename(&moved, &path).unwrap();
    assert_eq!(d.host_flush().unwrap().pages, 1);
    assert_eq!(d.io_fault(), None);
    assert_eq!(&std::fs::read(&path).unwrap()[..4], b"kept");
    // Deleted: no retry can succeed, and the error says where the data still is.
    d.write_bytes(0, b"lost").unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = d.mmio_write(0, 0, &[1; 8]).unwrap_err();
    let fd_path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        d.backing.file().as_raw_fd()
    );
    assert_eq!(
        err,
        FlushError::Unlinked {
            copy_from: fd_path.clone()
        }
    );
    assert!(d.host_flush().is_err());
    assert_eq!(&std::fs::read(&fd_path).unwrap()[..4], b"lost");
}

#[test]
fn a_backing_file_replaced_through_a_directory_above_it_is_a_fault() {
    // The flush skips its statx of the path while the path's watch saw nothing: each way of
    // putting another file under the name must still be seen, the watch's inodes moved away.
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    let old = dir.path().join("old");
    std::fs::create_dir(&sub).unwrap();
    let mut d = open(&sub, dev().with_size(2 << 20), 0).unwrap();
    d.keep_created_file();
    assert!(
        d.path_watch.watched(),
        "a plain path on a local file system"
    );
    for _ in 0..3 {
        d.write_bytes(0, b"kept").unwrap();
        d.mmio_write(0, 0, &[1; 8]).unwrap();
    }
    // The directory moved, the same file linked under a new one of the old name: the path
    // names the file again, but through a directory nothing watches.
    std::fs::rename(&sub, &old).unwrap();
    std::fs::create_dir(&sub).unwrap();
    std::fs::hard_link(old.join("pmem.img"), sub.join("pmem.img")).unwrap();
    d.write_bytes(0, b"more").unwrap();
    d.mmio_write(0, 0, &[1; 8]).unwrap();
    // Then that directory moved too, and a new file put under the name: neither touches an
    // inode the watch was set on.
    std::fs::rename(&sub, dir.path().join("moved")).unwrap();
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("pmem.img"), vec![0u8; 2 << 20]).unwrap();
    d.write_bytes(0, b"lost").unwrap();
    assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(FlushError::Replaced));
}

#[test]
fn a_shrunk_backing_file_fails_every_later_flush_even_once_regrown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pmem.img");
    let d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    assert_eq!(d.check_length(), Ok(()));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(4096).unwrap();
    let shrunk = FlushError::Shrunk {
        path: path.display().to_string(),
        len: Some(4096),
        size: 2 << 20,
    };
    assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(shrunk.clone()));
    assert!(shrunk.is_fatal() && !FlushError::Replaced.is_fatal());
    let says = format!("backing file {} shrank to 4096 bytes", path.display());
    assert!(shrunk.to_string().starts_with(&says), "{shrunk}");
    assert_eq!(
        d.io_fault(),
        None,
        "fatal, not an io-error a retry could clear"
    );
    // Grown back: what the guest stored past 4 KiB is gone all the same.
    file.set_len(2 << 20).unwrap();
    assert_eq!(d.mmio_write(0, 0, &[1; 8]), Err(shrunk.clone()));
    assert!(
        matches!(d.host_flush(), Err(NvdimmError::Flush { ref source, .. }) if *source == shrunk)
    );
    assert_eq!(d.check_length(), Err(shrunk));
    assert_eq!(d.stats().errors, 3);
}

#[test]
fn a_store_kvm_could_not_back_is_applied_by_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = open(dir.path(), dev().with_size(2 << 20), 0).unwrap();
    d.keep_created_file();
    let e = d.unbacked_store(PAGE_SIZE - 2, b"abcd");
    assert!(
        matches!(e, FlushError::UnbackedStore { len: 4, .. }),
        "{e:?}"
    );
    let fault = d.io_fault().expect("a fault");
    assert_eq!((fault.errno, fault.pages_at_stake), (libc::EFAULT, 2));
    assert_eq!(d.stats().errors, 1);
    let report = d.host_flush().unwrap();
    assert_eq!((report.pages, report.runs), (2, 1));
    assert_eq!(d.io_fault(), None);
    assert_eq!(file_bytes(dir.path(), PAGE_SIZE as usize - 2, 4), b"abcd");
    let mut seen = [0u8; 4];
    d.read_bytes(PAGE_SIZE - 2, &mut seen).unwrap();
    assert_eq!(&seen, b"abcd", "the guest's view has the store");
}
