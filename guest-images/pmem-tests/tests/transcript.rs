//! A real console transcript of the suite (Debian's cloud kernel with two NVDIMMs, recorded
//! under QEMU, which has no flush hints) replayed through the host's half: every line parses,
//! the stage is read correctly, and the verdicts follow from the bytes in the backing files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use pmem_tests::cases::{pattern, Case};
use pmem_tests::host::api::{CounterSource, Device};
use pmem_tests::host::session::Session;
use pmem_tests::host::stages::Stage;
use pmem_tests::protocol::{Ack, Event};

const TRANSCRIPT: &str = include_str!("data/qemu-tcg-transcript.txt");

fn lines() -> Vec<&'static str> {
    TRANSCRIPT.lines().collect()
}

#[test]
fn every_line_of_a_real_run_parses_and_the_run_is_complete() {
    let mut tests = 0;
    for line in lines() {
        match Event::find(line) {
            Ok(Some(Event::Test(_))) => tests += 1,
            Ok(_) => {}
            Err(e) => panic!("{line:?}: {e}"),
        }
    }
    assert_eq!(tests, 40);
    assert_eq!(Stage::reached(&lines()), Stage::SuiteDone);
}

/// Counters like pmvm's: every sample finds one more flush and the file written back.
struct Writeback(Vec<Device>);

impl CounterSource for Writeback {
    fn sample(&mut self) -> Result<Vec<Device>, String> {
        for d in &mut self.0 {
            d.flushes += 1;
            File::open(&d.path)
                .and_then(|f| f.sync_data())
                .map_err(|e| e.to_string())?;
        }
        Ok(self.0.clone())
    }
}

#[test]
fn replayed_against_rebuilt_backing_files_the_verdicts_follow_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("pmem{i}.img")))
        .collect();
    let files: Vec<File> = paths
        .iter()
        .zip([256u64 << 20, 512 << 20])
        .map(|(p, size)| {
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(p)
                .unwrap();
            f.set_len(size).unwrap();
            f
        })
        .collect();
    // Put back what the guest wrote where it said it did. fio's bytes are unknown: those
    // ranges stay zero, and the host must notice.
    for line in lines() {
        if let Ok(Some(Event::Test(r))) = Event::find(line) {
            let data = match r.case {
                Case::XfsIoMapSync => vec![0x5a; r.len as usize],
                c if c.tool().is_some() => continue,
                c => pattern(c, r.fs, r.len as usize),
            };
            files[r.dev as usize].write_all_at(&data, r.off).unwrap();
        }
    }
    let devices = paths
        .iter()
        .enumerate()
        .map(|(i, p)| Device {
            id: format!("pmem{i}"),
            path: p.clone(),
            guest_base: (i as u64 + 4) << 30,
            size: 0,
            flushes: 0,
            pages_written: 0,
            pending: None,
        })
        .collect();
    let mut session = Session::new(Writeback(devices));
    let mut acks = Vec::new();
    for line in lines() {
        if let Some(ack) = session.on_line(line).unwrap() {
            acks.push((line, ack));
        }
    }
    let fails: Vec<&str> = acks
        .iter()
        .filter(|(_, a)| matches!(a, Ack::Fail(_)))
        .map(|(l, _)| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        fails,
        ["fio_mmap_msync", "fio_psync_fdatasync", "fio_dsync"].repeat(2),
        "only fio's ranges, left zero, fail"
    );
    for r in session.rows().iter().filter(|r| r.verdict.is_failure()) {
        assert!(
            r.verdict
                .detail()
                .contains("the backing file holds crc32c="),
            "{r:?}"
        );
    }
    assert_eq!(session.rows().len(), 40);
    assert_eq!(session.summary(), Some((40, 0, 0)));
    // The guest's own summary (40 passed) disagrees with this host's: reported.
    assert_eq!(session.problems().len(), 1, "{:?}", session.problems());
}
