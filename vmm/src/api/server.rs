//! The socket: created 0600 where `--api-sock` says, an accept thread, and one short-lived
//! thread per connection, at most [`ServerOptions::max_connections`] at once.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::http::{read_request, Response};
use super::router::route;
use super::VmmControl;

/// `sun_path` holds 108 bytes including the terminating NUL.
const SOCKET_PATH_MAX: usize = 107;
/// Room for the VMM's flush path, which runs on the connection thread.
const CONNECTION_STACK_BYTES: usize = 1 << 20;
/// How long stopping waits for requests already being acted on to be answered, so that a
/// shutdown's own 204 is written before the process exits.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// A connection that has not sent a whole request this long after it was accepted gets
    /// 408 and is closed.
    pub request_timeout: Duration,
    /// Connections handled at once; the next ones get 503 until one finishes.
    pub max_connections: usize,
    /// Installed by the accept thread first; connection threads inherit it.
    pub seccomp: Option<crate::seccomp::ThreadFilter>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            request_timeout: Duration::from_secs(5),
            max_connections: 256,
            seccomp: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot create the API socket {path:?}: directory {dir:?} does not exist; create it first"
    )]
    NoParentDir { path: PathBuf, dir: PathBuf },
    #[error(
        "API socket path {path:?} is {len} bytes; a Unix socket path is at most {SOCKET_PATH_MAX}"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("another pmvm is serving {path:?}")]
    AlreadyServing { path: PathBuf },
    #[error("{path:?} exists and is not a socket; refusing to replace it with the API socket")]
    NotASocket { path: PathBuf },
    #[error("cannot {step} the API socket {path:?}")]
    Socket {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the API server thread")]
    Thread(#[source] io::Error),
}

/// A running control socket. [`ApiServer::stop`] or dropping it stops accepting, waits (up to
/// [`DRAIN_TIMEOUT`]) for requests already read to be answered, and removes the socket file
/// (unless another process has replaced it since). Connections still sending a request are
/// abandoned.
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket we created, so we never remove someone else's.
    identity: (u64, u64),
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Requests read whole and not yet answered.
    busy: Arc<AtomicUsize>,
}

impl ApiServer {
    /// With the default options (no seccomp filter): for tests.
    #[cfg(test)]
    pub fn start(path: &Path, ctl: Arc<dyn VmmControl>) -> Result<ApiServer, ServerError> {
        ApiServer::start_with(path, ctl, ServerOptions::default())
    }

    pub fn start_with(
        path: &Path,
        ctl: Arc<dyn VmmControl>,
        options: ServerOptions,
    ) -> Result<ApiServer, ServerError> {
        let listener = create_socket(path)?;
        let sock_err = |step| {
            move |source| ServerError::Socket {
                step,
                path: path.into(),
                source,
            }
        };
        let cleanup = |e| {
            let _ = fs::remove_file(path);
            e
        };
        let meta = fs::symlink_metadata(path)
            .map_err(sock_err("inspect"))
            .map_err(cleanup)?;
        let identity = (meta.dev(), meta.ino());
        listener
            .set_nonblocking(true)
            .map_err(sock_err("configure"))
            .map_err(cleanup)?;
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(ServerError::Thread)
            .map_err(cleanup)?;
        let stop_for_thread = stop
            .try_clone()
            .map_err(ServerError::Thread)
            .map_err(cleanup)?;
        let busy = Arc::new(AtomicUsize::new(0));
        let busy_for_thread = Arc::clone(&busy);
        let thread = thread::Builder::new()
            .name("pmvm-api".into())
            .spawn(move || accept_loop(listener, stop_for_thread, ctl, options, busy_for_thread))
            .map_err(ServerError::Thread)
            .map_err(cleanup)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            identity,
            stop,
            thread: Some(thread),
            busy,
        })
    }

    /// Stops accepting, waits for the accept thread and removes the socket.
    pub fn stop(mut self) {
        self.stop_and_remove();
    }

    fn stop_and_remove(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::warn!("api: cannot signal the accept thread to stop: {e}");
        } else if thread.join().is_err() {
            log::warn!("api: the accept thread panicked");
        }
        self.drain();
        let ours =
            fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!("api: cannot remove {:?}: {e}", self.path);
            }
        }
    }

    /// Waits until every request read so far has been answered, or [`DRAIN_TIMEOUT`].
    fn drain(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.busy.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                log::warn!(
                    "api: stopping with {} requests unanswered after {DRAIN_TIMEOUT:?}",
                    self.busy.load(Ordering::Acquire)
                );
                return;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_and_remove();
    }
}

/// Checks the path, clears a stale socket and binds a listener whose file is 0600 from the
/// moment it appears at `path`.
fn create_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let len = path.as_os_str().len();
    if len == 0 || len > SOCKET_PATH_MAX {
        return Err(ServerError::PathTooLong {
            path: path.into(),
            len,
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(ServerError::NoParentDir {
            path: path.into(),
            dir: dir.into(),
        });
    }
    let sock_err = |step| {
        move |source| ServerError::Socket {
            step,
            path: path.into(),
            source,
        }
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServerError::NotASocket { path: path.into() })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::AlreadyServing { path: path.into() }),
            // Nobody listens: a previous pmvm died without cleaning up.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!("api: replacing stale socket {path:?}");
            }
            Err(e) => return Err(sock_err("probe the existing")(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err("inspect")(e)),
    }
    bind_private(path, dir).map_err(sock_err("create"))
}

/// Binds in a fresh 0700 directory beside `path`, makes the socket 0600 there and renames
/// it into place, so no one can connect while it still has umask permissions. If that
/// staging path would not fit in `sun_path`, binds in place and narrows the mode at once.
fn bind_private(path: &Path, dir: &Path) -> io::Result<UnixListener> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let staging =
        |attempt: u32| dir.join(format!(".pmvm-{}-{nanos:x}-{attempt}", std::process::id()));
    if staging(u32::MAX).join("s").as_os_str().len() > SOCKET_PATH_MAX {
        remove_stale(path)?;
        let listener = UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        return Ok(listener);
    }
    // mkdir is the uniqueness check: a name taken (by another thread or process) is skipped.
    let mut attempt = 0;
    let staging_dir = loop {
        let candidate = staging(attempt);
        match fs::DirBuilder::new().mode(0o700).create(&candidate) {
            Ok(()) => break candidate,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 64 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let staged = staging_dir.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&staging_dir);
    result
}

fn remove_stale(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn accept_loop(
    listener: UnixListener,
    stop: EventFd,
    ctl: Arc<dyn VmmControl>,
    options: ServerOptions,
    busy: Arc<AtomicUsize>,
) {
    if let Some(filter) = &options.seccomp {
        if let Err(e) = filter.apply() {
            // Without its filter the thread does not serve: the socket stays unanswered.
            log::error!("api: {e}; not serving the control socket");
            return;
        }
    }
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two initialised pollfd and the count passed is its
        // length; both descriptors are owned by this function and open for the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("api: poll failed, the control socket stops serving: {e}");
                return;
            }
            continue;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => dispatch(stream, &ctl, &options, &active, &busy),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Typically EMFILE: back off rather than spin on a readable listener.
                    log::warn!("api: accept failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
}

/// Holds one unit of a shared count (active connections, or requests being answered) and
/// gives it back when dropped.
struct CountSlot(Arc<AtomicUsize>);

impl CountSlot {
    fn take(count: &Arc<AtomicUsize>) -> CountSlot {
        count.fetch_add(1, Ordering::AcqRel);
        CountSlot(Arc::clone(count))
    }
}

impl Drop for CountSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn dispatch(
    stream: UnixStream,
    ctl: &Arc<dyn VmmControl>,
    options: &ServerOptions,
    active: &Arc<AtomicUsize>,
    busy: &Arc<AtomicUsize>,
) {
    // Only this thread increments, so the check cannot race with another increment.
    if active.load(Ordering::Acquire) >= options.max_connections {
        let msg = format!(
            "{} connections are being served; retry later",
            options.max_connections
        );
        refuse(stream, &msg);
        return;
    }
    let slot = CountSlot::take(active);
    let spare = stream.try_clone();
    let ctl = Arc::clone(ctl);
    let busy = Arc::clone(busy);
    let timeout = options.request_timeout;
    let spawned = thread::Builder::new()
        .name("pmvm-api-conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || {
            let _slot = slot;
            serve_connection(stream, ctl.as_ref(), timeout, &busy);
        });
    if let Err(e) = spawned {
        log::warn!("api: cannot start a connection thread: {e}");
        if let Ok(stream) = spare {
            refuse(
                stream,
                "the server cannot start a thread for this connection; retry later",
            );
        }
    }
}

fn refuse(mut stream: UnixStream, msg: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = Response::error(503, msg).write_to(&mut stream);
}

fn serve_connection(
    mut stream: UnixStream,
    ctl: &dyn VmmControl,
    timeout: Duration,
    busy: &Arc<AtomicUsize>,
) {
    let started = Instant::now();
    if stream.set_nonblocking(false).is_err() || stream.set_write_timeout(Some(timeout)).is_err() {
        return;
    }
    // Held until the response is written: a shutdown must not end the process before its own
    // 204 is out.
    let mut answering = None;
    let response = match read_request(&mut stream, started, started + timeout) {
        Ok(req) => {
            answering = Some(CountSlot::take(busy));
            route(ctl, &req.method, &req.path, &req.body)
        }
        Err(e) => match e.status() {
            Some(status) => Response::error(status, &e.to_string()),
            None => {
                log::debug!("api: {}", super::error_chain(&e));
                return;
            }
        },
    };
    if let Err(e) = response.write_to(&mut stream) {
        log::debug!("api: writing the response failed: {e}");
    }
    drop(answering);
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::client::{Client, ClientResponse};
    use super::super::fake::FakeVmm;
    use super::super::types::{PmemInfo, PmemList, VmInfo};
    use super::super::{ApiError, FlushReport};
    use super::*;

    fn start(path: &Path, options: ServerOptions) -> ApiServer {
        ApiServer::start_with(path, Arc::new(FakeVmm::new()), options).unwrap()
    }

    /// Long enough that a loaded machine never turns a prompt request into a 408.
    fn quick() -> ServerOptions {
        ServerOptions {
            request_timeout: Duration::from_secs(5),
            max_connections: 256,
            seccomp: None,
        }
    }

    fn client(path: &Path) -> Client {
        Client::new(path).with_timeout(Duration::from_secs(10))
    }

    /// Reads the response to whatever was sent on `stream`.
    fn read_response(stream: &mut UnixStream) -> ClientResponse {
        client(Path::new("test")).read_response(stream).unwrap()
    }

    /// Sends `raw` on a fresh connection; the server may answer and close before taking all
    /// of an oversized request.
    fn exchange(path: &Path, raw: &[u8]) -> ClientResponse {
        client(path).exchange(raw).unwrap()
    }

    fn error_of(r: &ClientResponse) -> String {
        r.error_message().unwrap()
    }

    #[test]
    fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _server = start(&path, quick());

        let r = exchange(&path, b"NONSENSE\r\n\r\n");
        assert_eq!(r.status, 400);
        assert!(
            error_of(&r).starts_with("malformed request"),
            "{}",
            error_of(&r)
        );

        let r = exchange(&path, b"GET /v1/nothing HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 404);

        let r = exchange(&path, b"DELETE /v1/pmem HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 405);
        assert_eq!(r.header("Allow"), Some("GET"), "{r:?}");

        let big = 70_000;
        let mut req =
            format!("PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: {big}\r\n\r\n").into_bytes();
        req.extend(std::iter::repeat_n(b'{', big));
        let r = exchange(&path, &req);
        assert_eq!(r.status, 413);
        assert!(
            error_of(&r).contains("70000 bytes exceeds the limit of 65536"),
            "{}",
            error_of(&r)
        );

        let r = exchange(
            &path,
            b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x}",
        );
        assert_eq!(r.status, 400);
        assert!(
            error_of(&r).starts_with("invalid JSON body"),
            "{}",
            error_of(&r)
        );

        let r = exchange(
            &path,
            b"PUT /v1/vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        );
        assert_eq!(r.status, 411);

        let r = exchange(&path, b"GET /v1/vm HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("Connection"), Some("close"));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
    }

    #[test]
    fn an_idle_client_gets_408_while_others_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let timeout = Duration::from_millis(300);
        let options = ServerOptions {
            request_timeout: timeout,
            ..quick()
        };
        let _server = start(&path, options);
        let started = Instant::now();
        let mut idle = UnixStream::connect(&path).unwrap();
        let r = exchange(&path, b"GET /v1/pmem HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 200);
        let r = read_response(&mut idle);
        assert_eq!(r.status, 408);
        assert!(
            error_of(&r).contains("no complete request within 0.3 s"),
            "{}",
            error_of(&r)
        );
        assert!(started.elapsed() >= timeout);
        // A client that trickles an incomplete request is cut off at the same deadline.
        let mut slow = UnixStream::connect(&path).unwrap();
        slow.write_all(b"GET /v1/vm HTTP/1.1\r\n").unwrap();
        assert_eq!(read_response(&mut slow).status, 408);
        let r = exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 200);
    }

    #[test]
    fn two_hundred_simultaneous_connections_all_get_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _server = start(
            &path,
            ServerOptions {
                request_timeout: Duration::from_secs(20),
                ..quick()
            },
        );
        let mut streams: Vec<UnixStream> = (0..200)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        for s in &mut streams {
            s.write_all(b"GET /v1/vm HTTP/1.1\r\n\r\n").unwrap();
        }
        for s in &mut streams {
            assert_eq!(read_response(s).status, 200);
        }
    }

    #[test]
    fn connections_beyond_the_cap_get_503_until_a_slot_frees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let options = ServerOptions {
            request_timeout: Duration::from_secs(20),
            max_connections: 2,
            seccomp: None,
        };
        let _server = start(&path, options);
        let a = UnixStream::connect(&path).unwrap();
        let b = UnixStream::connect(&path).unwrap();
        let r = exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 503);
        assert!(error_of(&r).contains("2 connections"), "{}", error_of(&r));
        drop(a);
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n");
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "slots never freed");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn ten_thousand_sequential_requests_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _server = start(&path, quick());
        for i in 0..10_000 {
            let r = exchange(&path, b"GET /v1/pmem HTTP/1.1\r\n\r\n");
            assert_eq!(r.status, 200, "request {i}");
            if i % 2500 == 0 {
                let list: PmemList = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(list.devices.len(), 2);
            }
        }
    }

    /// A VMM whose pause takes a while, to catch a server that stops before answering.
    struct SlowPause {
        inner: FakeVmm,
        started: std::sync::mpsc::Sender<()>,
        finished: std::sync::atomic::AtomicBool,
    }

    impl VmmControl for SlowPause {
        fn vm_info(&self) -> VmInfo {
            self.inner.vm_info()
        }
        fn pmem_list(&self) -> Vec<PmemInfo> {
            self.inner.pmem_list()
        }
        fn pmem_flush(&self, id: &str) -> Result<FlushReport, ApiError> {
            self.inner.pmem_flush(id)
        }
        fn pause(&self) -> Result<(), ApiError> {
            let _ = self.started.send(());
            thread::sleep(Duration::from_millis(300));
            self.finished.store(true, Ordering::Release);
            self.inner.pause()
        }
        fn resume(&self) -> Result<(), ApiError> {
            self.inner.resume()
        }
        fn shutdown(&self) -> Result<(), ApiError> {
            self.inner.shutdown()
        }
        fn power_cut(&self) -> Result<(), ApiError> {
            self.inner.power_cut()
        }
        fn pmem_crash(&self, id: &str) -> Result<(), ApiError> {
            self.inner.pmem_crash(id)
        }
    }

    #[test]
    fn stop_answers_requests_already_read_before_returning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (tx, rx) = std::sync::mpsc::channel();
        let vmm = Arc::new(SlowPause {
            inner: FakeVmm::new(),
            started: tx,
            finished: std::sync::atomic::AtomicBool::new(false),
        });
        let server = ApiServer::start_with(&path, vmm.clone(), quick()).unwrap();
        let client = {
            let path = path.clone();
            thread::spawn(move || exchange(&path, b"PUT /v1/vm/pause HTTP/1.1\r\n\r\n"))
        };
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // Like the VMM after a shutdown request: stop, then the process would exit.
        server.stop();
        assert!(
            vmm.finished.load(Ordering::Acquire),
            "stop returned while a request was still being acted on"
        );
        assert_eq!(client.join().unwrap().status, 204);
    }

    #[test]
    fn stop_does_not_wait_for_clients_still_sending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let options = ServerOptions {
            request_timeout: Duration::from_secs(20),
            ..quick()
        };
        let server = start(&path, options);
        let _idle = UnixStream::connect(&path).unwrap();
        let mut partial = UnixStream::connect(&path).unwrap();
        partial.write_all(b"GET /v1/vm HTTP/1.1\r\n").unwrap();
        // Let the server accept both.
        assert_eq!(exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n").status, 200);
        let started = Instant::now();
        server.stop();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "stop waited {:?} for idle clients",
            started.elapsed()
        );
    }

    #[test]
    fn socket_is_private_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = start(&path, quick());
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // No staging directory is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        server.stop();
    }

    #[test]
    fn a_path_too_long_to_stage_is_bound_in_place_still_0600() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().as_os_str().len() + 1;
        let name = "s".repeat(SOCKET_PATH_MAX - base);
        let path = dir.path().join(name);
        assert_eq!(path.as_os_str().len(), SOCKET_PATH_MAX);
        let server = start(&path, quick());
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n").status, 200);
        server.stop();
        assert!(!path.exists());
        let longer = dir.path().join("s".repeat(SOCKET_PATH_MAX + 1 - base));
        let err = ApiServer::start(&longer, Arc::new(FakeVmm::new()))
            .err()
            .unwrap();
        assert!(
            matches!(err, ServerError::PathTooLong { len: 108, .. }),
            "{err}"
        );
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let _server = start(&path, quick());
        assert_eq!(exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n").status, 200);
    }

    #[test]
    fn live_socket_is_refused_and_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _first = start(&path, quick());
        let err = ApiServer::start(&path, Arc::new(FakeVmm::new()))
            .err()
            .unwrap();
        assert_eq!(err.to_string(), format!("another pmvm is serving {path:?}"));
        assert_eq!(exchange(&path, b"GET /v1/vm HTTP/1.1\r\n\r\n").status, 200);
    }

    #[test]
    fn a_regular_file_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        fs::write(&path, b"keep me").unwrap();
        let err = ApiServer::start(&path, Arc::new(FakeVmm::new()))
            .err()
            .unwrap();
        assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn missing_parent_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/api.sock");
        let err = ApiServer::start(&path, Arc::new(FakeVmm::new()))
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, ServerError::NoParentDir { .. }), "{msg}");
        assert!(
            msg.contains("no/such/dir\" does not exist; create it first"),
            "{msg}"
        );
    }

    #[test]
    fn socket_is_removed_on_stop_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = start(&path, quick());
        server.stop();
        assert!(!path.exists());
        let err = UnixStream::connect(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        {
            let _server = start(&path, quick());
            assert!(path.exists());
        }
        assert!(!path.exists());
    }

    #[test]
    fn stop_leaves_a_socket_that_replaced_ours_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = start(&path, quick());
        fs::remove_file(&path).unwrap();
        let _other = UnixListener::bind(&path).unwrap();
        server.stop();
        assert!(path.exists());
    }
}
