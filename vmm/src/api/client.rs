//! The client side of the control socket, one request per connection: the `pmvm` client
//! subcommands, the integration tests and the guest suite's harness all talk to pmvm
//! through [`Client`] and read the documents of [`super::types`].

use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::http::parse_response;
pub use super::http::ClientResponse;
use super::types::{FlushReport, PmemInfo, PmemList, VmInfo};

/// Long enough for a pause (which waits for every vCPU) or a large host flush.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to pmvm at {}: no such socket (is pmvm running with --api-sock {}?)", .path.display(), .path.display())]
    NoSocket { path: PathBuf },
    #[error("cannot connect to pmvm at {}: connection refused (stale socket)", .path.display())]
    Refused { path: PathBuf },
    #[error("cannot connect to pmvm at {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer from pmvm at {} within {} s", .path.display(), .secs)]
    Timeout { path: PathBuf, secs: u64 },
    #[error("talking to pmvm at {} failed", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pmvm at {} sent a malformed response: {reason}", .path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("{request} failed with {status}: {message}")]
    Server {
        request: String,
        status: u16,
        message: String,
    },
}

/// A client of the control socket at one path.
#[derive(Clone, Debug)]
pub struct Client {
    sock: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(sock: impl Into<PathBuf>) -> Client {
        Client {
            sock: sock.into(),
            timeout: RESPONSE_TIMEOUT,
        }
    }

    /// How long a request may wait for its response.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// `GET /v1/vm`.
    pub fn vm(&self) -> Result<VmInfo, ClientError> {
        self.get("/v1/vm")
    }

    /// `GET /v1/pmem`.
    pub fn pmem_list(&self) -> Result<PmemList, ClientError> {
        self.get("/v1/pmem")
    }

    /// `GET /v1/pmem/{id}`.
    pub fn pmem(&self, id: &str) -> Result<PmemInfo, ClientError> {
        self.get(&format!("/v1/pmem/{}", encode_segment(id)))
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        Ok(self.call("GET", "/metrics")?.text())
    }

    /// `PUT /v1/pmem/{id}/flush`: a host flush of one device.
    pub fn flush(&self, id: &str) -> Result<FlushReport, ClientError> {
        let path = format!("/v1/pmem/{}/flush", encode_segment(id));
        let resp = self.call("PUT", &path)?;
        self.decode(&path, &resp.body)
    }

    /// `PUT /v1/vm/{verb}`: `pause`, `resume`, `shutdown` or `power-cut`.
    pub fn vm_action(&self, verb: &str) -> Result<(), ClientError> {
        self.call("PUT", &format!("/v1/vm/{verb}")).map(drop)
    }

    /// `PUT /v1/pmem/{id}/crash`: the machine's power cut, asked for through one device.
    pub fn pmem_crash(&self, id: &str) -> Result<(), ClientError> {
        self.call("PUT", &format!("/v1/pmem/{}/crash", encode_segment(id)))
            .map(drop)
    }

    /// `GET path`, decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.call("GET", path)?;
        self.decode(path, &resp.body)
    }

    /// One request whose answer must be 2xx; any other status becomes
    /// [`ClientError::Server`] with the server's message.
    pub fn call(&self, method: &str, path: &str) -> Result<ClientResponse, ClientError> {
        let resp = self.send(method, path, b"")?;
        if (200..300).contains(&resp.status) {
            return Ok(resp);
        }
        let message = resp.error_message().unwrap_or_else(|| {
            let text = resp.text();
            let text = text.trim();
            if text.is_empty() {
                "(no message)".to_string()
            } else {
                text.chars().take(200).collect()
            }
        });
        Err(ClientError::Server {
            request: format!("{method} {path}"),
            status: resp.status,
            message,
        })
    }

    /// One request with `body`, answered with any status.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<ClientResponse, ClientError> {
        let length = if method == "GET" && body.is_empty() {
            String::new()
        } else {
            format!("Content-Length: {}\r\n", body.len())
        };
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n{length}Connection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.exchange(&req)
    }

    /// Sends `raw` bytes, whatever they are, on a fresh connection and reads the response.
    pub fn exchange(&self, raw: &[u8]) -> Result<ClientResponse, ClientError> {
        let mut stream = self.connect()?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| self.io_error(e))?;
        // A server refusing a request (413) answers without reading the rest of it: a failed
        // write still gets its response.
        let written = stream.write_all(raw);
        match self.read_response(&mut stream) {
            Err(_) if written.is_err() => Err(self.io_error(written.unwrap_err())),
            other => other,
        }
    }

    /// Connects to the socket, again if a signal interrupts the call.
    pub fn connect(&self) -> Result<UnixStream, ClientError> {
        let sock = &self.sock;
        loop {
            return match UnixStream::connect(sock) {
                Ok(s) => Ok(s),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => Err(match source.kind() {
                    io::ErrorKind::NotFound => ClientError::NoSocket { path: sock.into() },
                    io::ErrorKind::ConnectionRefused
                        if std::fs::symlink_metadata(sock)
                            .is_ok_and(|m| m.file_type().is_socket()) =>
                    {
                        ClientError::Refused { path: sock.into() }
                    }
                    _ => ClientError::Connect {
                        path: sock.into(),
                        source,
                    },
                }),
            };
        }
    }

    /// Reads one whole response from `stream`: the server closes the connection after it.
    pub fn read_response(&self, stream: &mut UnixStream) -> Result<ClientResponse, ClientError> {
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(|e| self.io_error(e))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The server closes once it has answered, possibly before reading all we sent.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
                Err(e) => return Err(self.io_error(e)),
            }
        }
        match parse_response(&buf, true) {
            Ok(Some(resp)) => Ok(resp),
            Ok(None) => Err(self.malformed("the response is incomplete".into())),
            Err(reason) => Err(self.malformed(reason)),
        }
    }

    /// Waits until the socket answers `GET /v1/vm` with 200, for up to `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let err = match self.call("GET", "/v1/vm") {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(err);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body)
            .map_err(|e| self.malformed(format!("the {path} document does not parse: {e}")))
    }

    fn malformed(&self, reason: String) -> ClientError {
        ClientError::Malformed {
            path: self.sock.clone(),
            reason,
        }
    }

    fn io_error(&self, source: io::Error) -> ClientError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                path: self.sock.clone(),
                secs: self.timeout.as_secs(),
            },
            _ => ClientError::Io {
                path: self.sock.clone(),
                source,
            },
        }
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so any id is one segment.
fn encode_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;

    use super::super::fake::{sample_devices, FakeVmm};
    use super::super::server::ApiServer;
    use super::*;

    #[test]
    fn ids_are_sent_as_one_path_segment() {
        assert_eq!(encode_segment("pmem0"), "pmem0");
        assert_eq!(encode_segment("a b/c?"), "a%20b%2Fc%3F");
    }

    #[test]
    fn missing_socket_gives_one_clear_line() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pmvm.sock");
        let err = Client::new(&sock).vm_action("pause").unwrap_err();
        let p = sock.display();
        assert_eq!(
            err.to_string(),
            format!("cannot connect to pmvm at {p}: no such socket (is pmvm running with --api-sock {p}?)")
        );
    }

    #[test]
    fn stale_socket_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pmvm.sock");
        drop(UnixListener::bind(&sock).unwrap());
        let err = Client::new(&sock).vm().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to pmvm at {}: connection refused (stale socket)",
                sock.display()
            )
        );
    }

    /// A server that answers every connection with `reply`.
    pub(crate) fn canned_server(reply: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pmvm.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(reply);
            }
        });
        (dir, sock)
    }

    #[test]
    fn malformed_server_responses_are_errors_not_panics() {
        let replies: &[&'static [u8]] = &[
            b"",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"devices\":[]}",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{\"de\"",
            b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"devices\":{}}",
            b"HTTP/1.1 200 OK\r\n\r\n\xff\xfe",
        ];
        for reply in replies {
            let (_dir, sock) = canned_server(reply);
            match Client::new(sock).pmem_list() {
                Err(ClientError::Malformed { reason, .. }) => assert!(!reason.is_empty()),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(reply)),
            }
        }
    }

    #[test]
    fn non_json_error_bodies_still_give_a_message() {
        let (_dir, sock) =
            canned_server(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\noops\n");
        let err = Client::new(sock).vm_action("resume").unwrap_err();
        assert_eq!(err.to_string(), "PUT /v1/vm/resume failed with 502: oops");
    }

    #[test]
    fn typed_calls_against_a_real_server() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("pmvm.sock");
        let server = ApiServer::start(&sock, Arc::new(FakeVmm::new())).unwrap();
        let c = Client::new(&sock);
        c.wait_ready(Duration::from_secs(10)).unwrap();
        assert_eq!(c.pmem_list().unwrap().devices, sample_devices());
        assert_eq!(c.pmem("pmem1").unwrap(), sample_devices()[1]);
        assert_eq!(c.flush("pmem0").unwrap().pages, 4);
        let err = c.pmem("x y").unwrap_err();
        assert!(
            matches!(&err, ClientError::Server { status: 404, request, .. } if request == "GET /v1/pmem/x%20y"),
            "{err}"
        );
        let resp = c.send("DELETE", "/v1/vm", b"").unwrap();
        assert_eq!((resp.status, resp.header("allow")), (405, Some("GET")));
        assert!(resp.error_message().is_some_and(|m| !m.is_empty()));
        server.stop();
    }
}
