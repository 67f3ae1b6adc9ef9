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
