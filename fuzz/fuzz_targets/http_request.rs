//! The control socket's request reader: any bytes a client sends, in one write, get a request
//! or an error with a status, within the limits, and never a panic. The response parser the
//! client uses gets the same bytes.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use pmvm::api::http::{parse_response, read_request, MAX_BODY_BYTES, MAX_HEAD_BYTES};

fuzz_target!(|data: &[u8]| {
    let (mut client, mut server) = UnixStream::pair().expect("a socket pair");
    // A Unix socket buffers far more than libFuzzer's inputs (4 KiB by default).
    client.write_all(data).expect("buffering the request");
    drop(client);
    let started = Instant::now();
    match read_request(&mut server, started, started + Duration::from_secs(5)) {
        Ok(req) => {
            assert!(req.body.len() <= MAX_BODY_BYTES);
            assert!(!req.method.is_empty());
            assert!(!req.path.contains('?'), "the query string is cut off");
            assert!(data.len() >= req.body.len());
        }
        Err(e) => {
            // Everything but a closed or failed connection is answered with a status.
            if let Some(status) = e.status() {
                assert!((400..600).contains(&status), "{e:?} -> {status}");
            }
            let _ = MAX_HEAD_BYTES;
        }
    }
    let _ = parse_response(data, true);
    let _ = parse_response(data, false);
});
