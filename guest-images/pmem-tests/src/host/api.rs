//! Reading pmvm's NVDIMM counters through its control socket (`GET /v1/pmem`), with pmvm's
//! own client.

use std::path::PathBuf;

use pmvm::api::client::Client;
use pmvm::api::types::{PmemInfo, PmemList};

/// One NVDIMM as the harness needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: String,
    /// The host backing file.
    pub path: PathBuf,
    pub guest_base: u64,
    pub size: u64,
    pub flushes: u64,
    pub pages_written: u64,
    /// Pages in pmvm's dirty log now: stored to since its last flush (None where the log
    /// cannot be read without consuming it).
    pub pending: Option<u64>,
}

impl From<&PmemInfo> for Device {
    fn from(d: &PmemInfo) -> Device {
        Device {
            id: d.id.clone(),
            path: PathBuf::from(&d.path),
            guest_base: d.guest_base,
            size: d.size_bytes,
            flushes: d.stats.flushes,
            pages_written: d.stats.pages_written,
            pending: d.pending_dirty_pages,
        }
    }
}

/// Counters of every device, in guest-physical order (the guest's `dev=<n>`).
pub trait CounterSource {
    fn sample(&mut self) -> Result<Vec<Device>, String>;
}

/// The control socket of a running pmvm.
pub struct ApiCounters {
    pub sock: PathBuf,
}

impl CounterSource for ApiCounters {
    fn sample(&mut self) -> Result<Vec<Device>, String> {
        let list = Client::new(&self.sock)
            .pmem_list()
            .map_err(|e| pmvm::api::error_chain(&e))?;
        Ok(devices(&list))
    }
}

/// The devices of a `GET /v1/pmem` document, sorted by guest base address.
pub fn devices(list: &PmemList) -> Vec<Device> {
    let mut out: Vec<Device> = list.devices.iter().map(Device::from).collect();
    out.sort_by_key(|d| d.guest_base);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"devices":[
      {"id":"xfs","path":"/tmp/b.img","size_bytes":536870912,"guest_base":6442450944,
       "flush_hint_count":1,"flush_hint_addresses":[3489664000],"readonly":false,
       "stats":{"flushes":7,"pages_written":30,"bytes_written":122880,"runs":3,
                "empty_flushes":0,"host_flushes":0,"bad_width_writes":0,
                "last_harvest_pages":2,"latency_us":{"p50":1,"p99":2,"max":3,"histogram":[]}}},
      {"id":"ext4","path":"/tmp/a.img","size_bytes":268435456,"guest_base":5368709120,
       "flush_hint_count":1,"flush_hint_addresses":[3489660928],"readonly":false,
       "stats":{"flushes":2,"pages_written":4,"bytes_written":16384,"runs":1,
                "empty_flushes":0,"host_flushes":0,"bad_width_writes":0,
                "last_harvest_pages":2,"latency_us":{"p50":1,"p99":2,"max":3,"histogram":[]}}}
    ]}"#;

    #[test]
    fn devices_come_back_in_guest_address_order() {
        let list: PmemList = serde_json::from_str(DOC).unwrap();
        let devs = devices(&list);
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].id, "ext4");
        assert_eq!(devs[0].path, PathBuf::from("/tmp/a.img"));
        assert_eq!((devs[0].flushes, devs[0].pages_written), (2, 4));
        assert_eq!(devs[1].id, "xfs");
        assert_eq!(devs[1].size, 512 << 20);
    }

    #[test]
    fn a_missing_socket_names_its_path() {
        let mut api = ApiCounters {
            sock: PathBuf::from("/nonexistent/pmvm.sock"),
        };
        let err = api.sample().unwrap_err();
        assert!(err.contains("/nonexistent/pmvm.sock"), "{err}");
    }

    /// A real server on a real socket: one request, one answer.
    #[test]
    fn sampling_speaks_http_over_the_socket() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut req = [0u8; 512];
            let n = c.read(&mut req).unwrap();
            let req = String::from_utf8_lossy(&req[..n]).to_string();
            write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{DOC}",
                DOC.len()
            )
            .unwrap();
            req
        });
        let devs = ApiCounters { sock }.sample().unwrap();
        assert_eq!(devs.len(), 2);
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /v1/pmem HTTP/1.1\r\n"), "{req}");
    }
}
