//! The flush-log reader (`pmvm log`): any file is a log, up to a reported torn tail, or an
//! error; the epochs it accepts are numbered in order and their pages lie inside the device.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvdimm::flush_log::FlushLog;

fuzz_target!(|data: &[u8]| {
    let Ok(log) = FlushLog::read(data) else {
        return;
    };
    let pages = log.header.device_pages();
    let page_size = u64::from(log.header.page_size);
    let mut buf = vec![0u8; page_size as usize];
    for (i, epoch) in log.epochs.iter().enumerate() {
        assert_eq!(
            log.epoch(i as u64 + 1).map(|e| e as *const _),
            Some(epoch as *const _)
        );
        for (j, &page) in epoch.pages.iter().enumerate() {
            assert!(page < pages, "epoch {} page {page} of {pages}", i + 1);
            assert!(
                j == 0 || epoch.pages[j - 1] < page,
                "pages in increasing order"
            );
            if j < 4 {
                let _ = log.read_page(data, epoch, j, &mut buf);
            }
        }
    }
    assert_eq!(log.last_epoch(), log.epochs.len() as u64);
});
