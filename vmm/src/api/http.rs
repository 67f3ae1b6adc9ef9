//! HTTP/1.1 framing over a Unix stream, parsed with `httparse`: reading one request with
//! limits and a deadline (server), writing one response, and parsing one response (client).
//!
//! One request per connection: every response says `Connection: close`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use serde::Serialize;

use super::types::ErrorBody;

/// Largest request body accepted; bigger ones get 413 before their body is read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest request line plus headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
/// Largest response body the client accepts, so a confused server cannot exhaust its memory.
pub const MAX_RESPONSE_BODY_BYTES: usize = 16 << 20;

/// One parsed request. The path keeps no query string.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Why no request could be read. All but `Closed` and `Io` are answered with [`Self::status`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed before a request was sent")]
    Closed,
    #[error("no complete request within {secs:.1} s")]
    Timeout { secs: f64 },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request line and headers exceed {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("request body of {len} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")]
    BodyTooLarge { len: usize },
    #[error("Transfer-Encoding is not supported; send the body with a Content-Length")]
    LengthRequired,
    #[error("reading the request failed")]
    Io(#[source] io::Error),
}

impl ReadError {
    /// The status to answer with, or `None` when nobody is left to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Timeout { .. } => Some(408),
            ReadError::Malformed(_) => Some(400),
            ReadError::HeadTooLarge => Some(431),
            ReadError::BodyTooLarge { .. } => Some(413),
            ReadError::LengthRequired => Some(411),
        }
    }
}

/// Reads one request, giving up at `deadline` (counted from accept, so a client trickling
/// bytes cannot hold a connection thread longer than one that sends nothing).
pub fn read_request(
    stream: &mut UnixStream,
    started: Instant,
    deadline: Instant,
) -> Result<Request, ReadError> {
    let timeout = || ReadError::Timeout {
        secs: deadline.saturating_duration_since(started).as_secs_f64(),
    };
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, body_len) = loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(&buf)? {
                break head;
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(ReadError::HeadTooLarge);
            }
        }
        match read_until(stream, &mut chunk, deadline).map_err(|e| io_error(e, timeout))? {
            0 if buf.is_empty() => return Err(ReadError::Closed),
            0 => return Err(ReadError::Malformed("connection closed mid-request".into())),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut body = buf.split_off(head_len);
    while body.len() < body_len {
        let want = (body_len - body.len()).min(chunk.len());
        match read_until(stream, &mut chunk[..want], deadline).map_err(|e| io_error(e, timeout))? {
            0 => {
                return Err(ReadError::Malformed(format!(
                    "connection closed after {} of {body_len} body bytes",
                    body.len()
                )))
            }
            n => body.extend_from_slice(&chunk[..n]),
        }
    }
    // Pipelined bytes after the body are dropped: the connection closes after this request.
    body.truncate(body_len);
    Ok(Request { method, path, body })
}

type Head = (usize, String, String, usize);

/// `Ok(None)` while the head is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    let mut body_len: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::LengthRequired);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(h.value).ok_or_else(|| {
                ReadError::Malformed(format!(
                    "Content-Length {:?} is not a decimal number",
                    String::from_utf8_lossy(h.value)
                ))
            })?;
            if body_len.is_some_and(|prev| prev != len) {
                return Err(ReadError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            body_len = Some(len);
        }
    }
    let body_len = body_len.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Err(ReadError::BodyTooLarge { len: body_len });
    }
    // Complete requests always carry a method and a path.
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target
        .split_once('?')
        .map_or(target, |(p, _)| p)
        .to_string();
    Ok(Some((head_len, method, path, body_len)))
}

/// Content-Length is 1*DIGIT; `usize::from_str` would also take a leading `+`. Values that
/// overflow saturate, so they are reported as too large rather than malformed.
fn parse_content_length(value: &[u8]) -> Option<usize> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0usize, |acc, d| {
        acc.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

/// One `read` that returns `TimedOut` once `deadline` has passed.
fn read_until(stream: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn io_error(e: io::Error, timeout: impl Fn() -> ReadError) -> ReadError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timeout(),
        _ => ReadError::Io(e),
    }
}

/// A response before framing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Methods the path accepts, sent as `Allow` with a 405.
    pub allow: Option<&'static str>,
}

pub const JSON: &str = "application/json";
/// The Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Response {
    pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: JSON,
                body,
                allow: None,
            },
            Err(e) => Response::error(500, &format!("encoding the response failed: {e}")),
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        let body = ErrorBody {
            error: message.to_string(),
        };
        // A struct of one string always serializes.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        Response {
            status,
            content_type: JSON,
            body,
            allow: None,
        }
    }

    pub fn no_content() -> Response {
        Response {
            status: 204,
            content_type: JSON,
            body: Vec::new(),
            allow: None,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
            allow: None,
        }
    }

    pub fn with_allow(mut self, allow: &'static str) -> Response {
        self.allow = Some(allow);
        self
    }

    /// The bytes on the wire. A 204 carries neither body nor Content-Length (RFC 9110 8.6).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut out = head.into_bytes();
        if self.status != 204 {
            out.extend_from_slice(&self.body);
        }
        out
    }

    pub fn write_to(&self, stream: &mut impl Write) -> io::Result<()> {
        stream.write_all(&self.to_bytes())?;
        stream.flush()
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A response as the client sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    /// Header names and values, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as the JSON document `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The message of an error response's JSON body ([`ErrorBody`]), if it has one.
    pub fn error_message(&self) -> Option<String> {
        serde_json::from_slice::<ErrorBody>(&self.body)
            .ok()
            .map(|b| b.error)
    }
}

/// Parses a response from the bytes received so far. `Ok(None)` means more bytes are needed;
/// at end of stream (`eof`) a response without Content-Length ends where the bytes end.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<ClientResponse>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if eof => {
            return Err(if buf.is_empty() {
                "the connection closed without a response".to_string()
            } else {
                format!(
                    "the response ended inside its headers after {} bytes",
                    buf.len()
                )
            })
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
            return Err(format!("response headers exceed {MAX_HEAD_BYTES} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = resp.code.unwrap_or_default();
    let mut body_len = None;
    let mut headers = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        headers.push((
            h.name.to_string(),
            String::from_utf8_lossy(h.value).trim().to_string(),
        ));
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(h.value)
                .ok_or_else(|| "malformed response: bad Content-Length".to_string())?;
            body_len = Some(len);
        }
    }
    let rest = &buf[head_len..];
    let body = if status == 204 || (100..200).contains(&status) {
        Vec::new()
    } else if let Some(len) = body_len {
        if len > MAX_RESPONSE_BODY_BYTES {
            return Err(format!(
                "response body of {len} bytes exceeds the client's limit of {MAX_RESPONSE_BODY_BYTES}"
            ));
        }
        if rest.len() < len {
            if eof {
                return Err(format!(
                    "the response ended after {} of {len} body bytes",
                    rest.len()
                ));
            }
            return Ok(None);
        }
        if eof && rest.len() > len {
            return Err(format!(
                "{} bytes follow the {len}-byte body the response announced",
                rest.len() - len
            ));
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(ClientResponse {
        status,
        headers,
        body,
    }))
}

#[cfg(test)]
mod tests {
    use std::thread;
    use std::time::Duration;

    use super::*;

    fn read_from(bytes: &[u8], timeout_ms: u64) -> Result<Request, ReadError> {
        let (mut server, mut client) = UnixStream::pair().unwrap();
        client.write_all(bytes).unwrap();
        drop(client);
        let started = Instant::now();
        read_request(
            &mut server,
            started,
            started + Duration::from_millis(timeout_ms),
        )
    }

    #[test]
    fn reads_request_with_body_and_strips_query() {
        let req = read_from(
            b"PUT /v1/pmem/a/flush?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            1000,
        )
        .unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/v1/pmem/a/flush");
        assert_eq!(req.body, b"{}");
    }

    #[test]
    fn body_arriving_in_pieces_is_assembled() {
        let (mut server, mut client) = UnixStream::pair().unwrap();
        let writer = thread::spawn(move || {
            client
                .write_all(b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Len")
                .unwrap();
            thread::sleep(Duration::from_millis(20));
            client.write_all(b"gth: 5\r\n\r\n{").unwrap();
            thread::sleep(Duration::from_millis(20));
            client.write_all(b" }  ").unwrap();
            client
        });
        let now = Instant::now();
        let req = read_request(&mut server, now, now + Duration::from_secs(5)).unwrap();
        assert_eq!(req.body, b"{ }  ");
        drop(writer.join().unwrap());
    }

    #[test]
    fn bad_requests_map_to_their_status() {
        let cases: &[(&[u8], u16)] = &[
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /v1/vm HTTP/9.9\r\n\r\n", 400),
            (b"GET /v1/vm HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
            (
                b"GET /v1/vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (
                b"PUT /v1/vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                411,
            ),
            (
                b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
                413,
            ),
            (
                b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
        ];
        for (bytes, status) in cases {
            let err = read_from(bytes, 1000).unwrap_err();
            assert_eq!(
                err.status(),
                Some(*status),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn body_of_exactly_the_limit_is_accepted() {
        let mut bytes =
            format!("PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n")
                .into_bytes();
        bytes.extend(std::iter::repeat_n(b' ', MAX_BODY_BYTES));
        let (mut server, mut client) = UnixStream::pair().unwrap();
        let writer = thread::spawn(move || client.write_all(&bytes).map(|_| client));
        let now = Instant::now();
        let req = read_request(&mut server, now, now + Duration::from_secs(5)).unwrap();
        assert_eq!(req.body.len(), MAX_BODY_BYTES);
        drop(writer.join().unwrap());
    }

    #[test]
    fn oversized_head_is_431() {
        let mut bytes = b"GET /v1/vm HTTP/1.1\r\nX-Pad: ".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(read_from(&bytes, 1000).unwrap_err().status(), Some(431));
        let mut many = b"GET /v1/vm HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(read_from(&many, 1000).unwrap_err().status(), Some(431));
    }

    #[test]
    fn silence_then_close_is_not_answered_but_partial_then_close_is_400() {
        assert!(matches!(read_from(b"", 1000), Err(ReadError::Closed)));
        assert_eq!(
            read_from(b"GET /v1/vm HT", 1000).unwrap_err().status(),
            Some(400)
        );
        let short_body = b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}";
        assert_eq!(read_from(short_body, 1000).unwrap_err().status(), Some(400));
    }

    #[test]
    fn a_client_that_sends_nothing_times_out_with_408() {
        let (mut server, _client) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let err = read_request(&mut server, now, now + Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.status(), Some(408));
        assert!(err.to_string().contains("within 0.1 s"), "{err}");
        assert!(now.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn response_framing() {
        let r = Response::error(405, "only GET").with_allow("GET");
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"only GET\"}"));
        let text = String::from_utf8(Response::no_content().to_bytes()).unwrap();
        assert_eq!(text, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }

    #[test]
    fn client_parses_what_the_server_writes() {
        let r = Response::json(200, &serde_json::json!({"a": 1}));
        let bytes = r.to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_response(&bytes[..cut], false),
                Ok(None),
                "cut at {cut}"
            );
        }
        let parsed = parse_response(&bytes, false).unwrap().unwrap();
        assert_eq!(parsed.status, 200);
        assert_eq!(parsed.body, b"{\"a\":1}");
        let parsed = parse_response(&Response::no_content().to_bytes(), false).unwrap();
        assert_eq!(
            parsed,
            Some(ClientResponse {
                status: 204,
                headers: vec![("Connection".into(), "close".into())],
                body: vec![]
            })
        );
    }

    #[test]
    fn client_rejects_malformed_or_truncated_responses_without_panicking() {
        let bad: &[(&[u8], bool)] = &[
            (b"", true),
            (b"HTTP/1.1 200 OK\r\nContent-Le", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nabc", true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            (b"SMTP ready\r\n\r\n", false),
            (b"HTTP/1.1 2000 OK\r\n\r\n", false),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
                false,
            ),
        ];
        for (bytes, eof) in bad {
            assert!(
                parse_response(bytes, *eof).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bytes)
            );
        }
        let until_eof = parse_response(b"HTTP/1.0 200 OK\r\n\r\nhello", true).unwrap();
        assert_eq!(until_eof.unwrap().body, b"hello");
    }
}
