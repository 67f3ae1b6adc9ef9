//! The `--pmem` option parser: any string is a config or an error, and an accepted config
//! keeps the limits the parser promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvdimm::{PersistMode, MAX_HINTS, MAX_ID_LEN};
use pmvm::cli::pmem_option;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = pmem_option::parse(text) else {
        return;
    };
    assert!(!cfg.path.as_os_str().is_empty(), "{text:?}");
    // Sizes are checked against SIZE_ALIGN when the file is opened, not here.
    if let Some(hints) = cfg.hints {
        assert!((1..=MAX_HINTS).contains(&hints), "{text:?}");
    }
    if let Some(id) = &cfg.id {
        assert!(!id.is_empty() && id.len() <= MAX_ID_LEN, "{text:?}");
    }
    if cfg.writeback_interval.is_some() {
        assert_eq!(cfg.persist, PersistMode::Adr, "{text:?}");
    }
    if cfg.readonly {
        assert!(
            cfg.flush_log.is_none() && cfg.writeback_interval.is_none(),
            "{text:?}"
        );
    }
});
