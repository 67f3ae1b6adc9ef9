//! Reading pmvm's NVDIMM counters through its control socket (`GET /v1/pmem`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach pmvm's control socket {path}: {err}")]
    Connect { path: PathBuf, err: std::io::Error },
    #[error("GET /v1/pmem on {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("GET /v1/pmem answered {status}: {body}")]
    Status { status: String, body: String },
    #[error("GET /v1/pmem returned a document this harness cannot read ({why}): {body}")]
    Document { why: String, body: String },
}

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
        get_pmem(&self.sock).map_err(|e| e.to_string())
    }
}

/// `GET /v1/pmem`, devices sorted by guest base address.
pub fn get_pmem(sock: &Path) -> Result<Vec<Device>, ApiError> {
    let io = |err| ApiError::Io {
        path: sock.to_path_buf(),
        err,
    };
    let mut s = UnixStream::connect(sock).map_err(|err| ApiError::Connect {
        path: sock.to_path_buf(),
        err,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    s.write_all(b"GET /v1/pmem HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    parse_response(&String::from_utf8_lossy(&raw))
}

/// Parses an HTTP response carrying a `PmemList` document.
pub fn parse_response(raw: &str) -> Result<Vec<Device>, ApiError> {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ApiError::Status {
            status,
            body: body.trim().to_string(),
        });
    }
    parse_pmem_list(body)
}

/// Reads the fields the harness uses from a `GET /v1/pmem` document.
pub fn parse_pmem_list(body: &str) -> Result<Vec<Device>, ApiError> {
    let doc_err = |why: String| ApiError::Document {
        why,
        body: body.chars().take(300).collect(),
    };
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|e| doc_err(e.to_string()))?;
    let list = v["devices"]
        .as_array()
        .ok_or_else(|| doc_err("no \"devices\" array".into()))?;
    let mut out = Vec::new();
    for d in list {
        let num = |v: &serde_json::Value, name: &str| {
            v.as_u64()
                .ok_or_else(|| doc_err(format!("{name} is not an unsigned number")))
        };
        let text = |v: &serde_json::Value, name: &str| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| doc_err(format!("{name} is not a string")))
        };
        out.push(Device {
            id: text(&d["id"], "id")?,
            path: PathBuf::from(text(&d["path"], "path")?),
            guest_base: num(&d["guest_base"], "guest_base")?,
            size: num(&d["size_bytes"], "size_bytes")?,
            flushes: num(&d["stats"]["flushes"], "stats.flushes")?,
            pages_written: num(&d["stats"]["pages_written"], "stats.pages_written")?,
        });
    }
    out.sort_by_key(|d| d.guest_base);
    Ok(out)
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
        let raw = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{DOC}");
        let devs = parse_response(&raw).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].id, "ext4");
        assert_eq!(devs[0].path, PathBuf::from("/tmp/a.img"));
        assert_eq!((devs[0].flushes, devs[0].pages_written), (2, 4));
        assert_eq!(devs[1].id, "xfs");
        assert_eq!(devs[1].size, 512 << 20);
    }

    #[test]
    fn errors_quote_the_status_or_the_problem() {
        let err = parse_response("HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"no such path\"}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("404") && err.contains("no such path"), "{err}");
        let err = parse_pmem_list(r#"{"devices":[{"id":"p"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("path is not a string"), "{err}");
        let err = parse_pmem_list("nonsense").unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn a_missing_socket_names_its_path() {
        let err = get_pmem(Path::new("/nonexistent/pmvm.sock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/pmvm.sock"), "{err}");
    }

    /// A real server on a real socket: one request, one answer.
    #[test]
    fn get_pmem_speaks_http_over_the_socket() {
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
        let devs = get_pmem(&sock).unwrap();
        assert_eq!(devs.len(), 2);
        let req = server.join().unwrap();
        assert!(req.starts_with("GET /v1/pmem HTTP/1.1\r\n"), "{req}");
    }
}
