//! The HTTP server's connections: hyper's HTTP/1 server under the axum router, with
//! the limits a hostile client on the LAN runs into.
//!
//! - Every connection is in one phase: *idle* (no request under way: before the
//!   first, between keep-alive requests), *head* (the first byte of a request has
//!   come, its head not yet whole) or *busy* (a request is being answered). An idle
//!   connection is closed after `http.idle_timeout`, a head after
//!   `http.header_timeout` from its first byte, a busy one after `http.idle_timeout`
//!   without any byte moving either way (a client that stops reading its answer).
//! - A request body must arrive within `http.body_timeout` of the end of its head:
//!   then 408 (JSON) and the connection closes.
//! - At most `http.max_connections` are open. A new connection beyond it closes the
//!   idle (or head) connection that has been so the longest: a flood of idle
//!   connections only ever pushes out its own oldest, and a client that sends its
//!   request at once is served. When every connection is busy, the new one gets 503
//!   and is closed.
//! - hyper answers a request it cannot parse (400, 414, 431) itself, with an empty
//!   body. Those are the only answer heads written beyond the requests handed to the
//!   router; they are replaced on the way out by the same status with a JSON body naming what
//!   is at fault (the request line, a header by name, `headers` or `path`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::guard::ApiError;
use super::ConnInfo;
use crate::status::config::HttpConfig;

/// hyper's read buffer per connection: a request head longer than this is refused
/// (431). Paths and queries are at most 8 KiB and headers at most 100, so this leaves
/// room, and `max_connections` of them stay small (256 x 64 KiB = 16 MiB).
const READ_BUFFER: usize = 64 * 1024;
/// Bytes of a request head kept to name the fault when hyper refuses it.
const HEAD_KEPT: usize = 8 * 1024;
/// Longest the server waits for open connections to finish after a shutdown.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors): the listener is not polled
/// in a tight loop while nothing can be accepted.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// The limits of [`serve`], from `[http]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn new(config: &HttpConfig) -> Limits {
        Limits {
            header_timeout: config.header_timeout.0,
            body_timeout: config.body_timeout.0,
            idle_timeout: config.idle_timeout.0,
            max_connections: config.max_connections.max(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Head,
    Busy,
}

#[derive(Debug)]
struct ClockState {
    phase: Phase,
    /// When the phase began.
    since: Instant,
    /// When a byte last moved either way.
    progress: Instant,
    /// Requests being answered (more than one only while a pipelined request's
    /// answer waits for the previous one's end).
    inflight: u32,
    /// Requests handed to the router so far.
    started: u64,
}

/// One connection's phase and the means to close it.
#[derive(Debug)]
struct Conn {
    id: u64,
    state: Mutex<ClockState>,
    /// Woken when the phase changes (the deadline may have moved closer).
    changed: Notify,
    /// Cancelled to close the connection (evicted for a newer one).
    evict: CancellationToken,
}

impl Conn {
    fn new(id: u64) -> Conn {
        let now = Instant::now();
        Conn {
            id,
            state: Mutex::new(ClockState {
                phase: Phase::Idle,
                since: now,
                progress: now,
                inflight: 0,
                started: 0,
            }),
            changed: Notify::new(),
            evict: CancellationToken::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClockState> {
        // The state stays consistent even if a holder panicked: plain assignments.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// `n` bytes were read; returns the phase they belong to.
    fn on_read(&self, n: usize) -> Phase {
        let now = Instant::now();
        let mut s = self.lock();
        if n > 0 {
            s.progress = now;
            if s.phase == Phase::Idle {
                s.phase = Phase::Head;
                s.since = now;
                drop(s);
                self.changed.notify_one();
                return Phase::Head;
            }
        }
        s.phase
    }

    fn started(&self) -> u64 {
        self.lock().started
    }

    fn on_write(&self) {
        self.lock().progress = Instant::now();
    }

    fn request_started(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.inflight += 1;
        s.started += 1;
        s.phase = Phase::Busy;
        s.since = now;
        s.progress = now;
        drop(s);
        self.changed.notify_one();
    }

    fn request_done(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        s.inflight = s.inflight.saturating_sub(1);
        if s.inflight == 0 {
            s.phase = Phase::Idle;
            s.since = now;
            s.progress = now;
        }
        drop(s);
        self.changed.notify_one();
    }

    /// When the connection is to be closed unless something happens first.
    fn deadline(&self, limits: &Limits) -> Instant {
        let s = self.lock();
        match s.phase {
            Phase::Idle => s.since + limits.idle_timeout,
            Phase::Head => s.since + limits.header_timeout,
            Phase::Busy => s.progress + limits.idle_timeout,
        }
    }
}

/// The open connections, for the cap.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // Inserts and removes only: consistent even after a panic elsewhere.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection, closing the one idle the longest when the cap is
    /// reached; `None` when every open connection is busy.
    fn admit(&self, max: usize) -> Option<Arc<Conn>> {
        let mut conns = self.lock();
        if conns.len() >= max {
            let victim = conns
                .values()
                .filter_map(|c| {
                    let s = c.lock();
                    (s.phase != Phase::Busy).then_some((s.since, c.id))
                })
                .min()
                .map(|(_, id)| id)?;
            if let Some(old) = conns.remove(&victim) {
                old.evict.cancel();
            }
        }
        let conn = Arc::new(Conn::new(self.next_id.fetch_add(1, Ordering::Relaxed)));
        conns.insert(conn.id, conn.clone());
        Some(conn)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish
/// (up to [`DRAIN_LIMIT`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(Registry::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own header timeout would also cut idle keep-alive connections at the
    // header timeout; the phases above time connections instead.
    builder
        .keep_alive(true)
        .max_headers(100)
        .max_buf_size(READ_BUFFER);
    let builder = Arc::new(builder);
    let mut tasks = JoinSet::new();
    let mut refused_logged: Option<Instant> = None;
    let lingering = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE and the like: nothing can be accepted for a moment.
                if refused_logged.map_or(true, |t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(error = %e, "HTTP server cannot accept connections");
                    refused_logged = Some(Instant::now());
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let Some(conn) = registry.admit(limits.max_connections) else {
            tracing::debug!("HTTP connection refused: every connection is busy");
            refuse_busy(stream, &lingering);
            continue;
        };
        let registry = registry.clone();
        let router = router.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let id = conn.id;
            serve_connection(stream, conn, router, &builder, limits, shutdown).await;
            registry.remove(id);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
}

/// Refused connections whose request is being drained at most at once; beyond it a
/// refused connection is dropped at once.
const MAX_LINGERING: usize = 32;
/// How long a refused connection's request is drained, so that closing it does not
/// reset the connection before the client reads the 503.
const LINGER: Duration = Duration::from_millis(500);

/// Answers 503 on a connection that is not served, without parsing its request.
fn refuse_busy(mut stream: TcpStream, lingering: &Arc<std::sync::atomic::AtomicUsize>) {
    let body = serde_json::json!({
        "error": "the server has no free connection; retry shortly",
        "field": "connection",
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        lingering.fetch_sub(1, Ordering::Relaxed);
        // Best effort: a fresh socket's send buffer takes it whole.
        let _ = stream.try_write(answer.as_bytes());
        return;
    }
    let lingering = lingering.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = tokio::time::timeout(LINGER, async {
            stream.write_all(answer.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), io::Error>(())
        })
        .await;
        lingering.fetch_sub(1, Ordering::Relaxed);
    });
}

async fn serve_connection(
    stream: TcpStream,
    conn: Arc<Conn>,
    router: Router,
    builder: &hyper::server::conn::http1::Builder,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Watched::new(stream, conn.clone()));
    let service_conn = conn.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let conn = service_conn.clone();
        let router = router.clone();
        answer(request, conn, router, local, limits.body_timeout)
    });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let deadline = conn.deadline(&limits);
        let changed = conn.changed.notified();
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = conn.evict.cancelled() => return,
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {
                if conn.deadline(&limits) <= Instant::now() {
                    tracing::debug!(phase = ?conn.phase(), "HTTP connection timed out");
                    return;
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// Marks the end of a request when dropped (its answer sent, or abandoned).
struct Done(Arc<Conn>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

fn answer(
    request: Request<Incoming>,
    conn: Arc<Conn>,
    mut router: Router,
    local: SocketAddr,
    body_timeout: Duration,
) -> impl Future<Output = Result<Response<TrackedBody>, Infallible>> {
    conn.request_started();
    let done = Done(conn);
    let timed_out = Arc::new(AtomicBool::new(false));
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(ConnectInfo(ConnInfo { local }));
    let body = TimedBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(body_timeout)),
        timed_out: timed_out.clone(),
    };
    let request = Request::from_parts(parts, Body::new(body));
    async move {
        let response = match tower_service::Service::call(&mut router, request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let response = if timed_out.load(Ordering::Relaxed) {
            body_too_slow(body_timeout)
        } else {
            response
        };
        Ok(response.map(|body| TrackedBody {
            inner: body,
            _done: done,
        }))
    }
}

fn body_too_slow(limit: Duration) -> Response<Body> {
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!(
            "the request body did not arrive within http.body_timeout ({})",
            humantime::format_duration(limit)
        ),
    )
    .field("body")
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request body that fails once its deadline passes.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timed_out: Arc<AtomicBool>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.timed_out.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err("the request body took too long".into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body that marks the request done when hyper drops it.
pub struct TrackedBody {
    inner: Body,
    _done: Done,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, watched: reads and writes move the connection's clock, and hyper's own
/// error answers are replaced by JSON ones.
struct Watched {
    io: TcpStream,
    conn: Arc<Conn>,
    /// The start of the request head being read (while no request is under way).
    head: Vec<u8>,
    /// A replacement answer still to be written.
    pending: Vec<u8>,
    /// hyper's answer was replaced: whatever else it writes is dropped.
    replaced: bool,
    /// Answer heads written for requests the router was handed.
    answered: u64,
}

impl Watched {
    fn new(io: TcpStream, conn: Arc<Conn>) -> Watched {
        Watched {
            io,
            conn,
            head: Vec::new(),
            pending: Vec::new(),
            replaced: false,
            answered: 0,
        }
    }

    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.conn.on_write();
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let fresh = &buf.filled()[before..];
        let phase = self.conn.on_read(fresh.len());
        if phase == Phase::Busy {
            self.head.clear();
        } else {
            let room = HEAD_KEPT.saturating_sub(self.head.len());
            let fresh = &fresh[..fresh.len().min(room)];
            self.head.extend_from_slice(fresh);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replaced {
            ready!(self.write_pending(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        if buf.starts_with(b"HTTP/1.") {
            let status = buf
                .get(9..12)
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<u16>().ok())
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            if status.is_informational() {
                // 100 Continue, for a request under way.
            } else if self.answered < self.conn.started() {
                self.answered += 1;
            } else {
                // An answer head for no request the router saw: hyper answers a
                // request it could not parse.
                self.pending = parse_error_answer(status, &self.head);
                self.replaced = true;
                ready!(self.write_pending(cx))?;
                return Poll::Ready(Ok(buf.len()));
            }
        }
        let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
        self.conn.on_write();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.write_pending(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.write_pending(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The JSON answer in place of hyper's empty one for a request it could not parse.
pub fn parse_error_answer(status: StatusCode, head: &[u8]) -> Vec<u8> {
    let (field, error) = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers".to_string(),
            "the request head is too large (too many headers, or too many bytes)".to_string(),
        ),
        StatusCode::URI_TOO_LONG => ("path".to_string(), "the request target is too long".into()),
        _ => fault_in(head),
    };
    let body = serde_json::json!({ "error": error, "field": field }).to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes()
}

fn is_token(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c))
}

/// Which part of a request head hyper refused: the request line, a header (by name),
/// or `headers` when it cannot be told.
pub fn fault_in(head: &[u8]) -> (String, String) {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    // Leading empty lines are allowed before a request line.
    let request_line = lines.by_ref().find(|l| !l.is_empty()).unwrap_or_default();
    let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
    let line_ok = parts.len() == 3
        && is_token(parts[0])
        && parts[1].iter().all(|c| c.is_ascii_graphic())
        && (parts[2] == b"HTTP/1.1" || parts[2] == b"HTTP/1.0");
    if !line_ok {
        return (
            "request line".into(),
            "the request line does not parse (METHOD target HTTP/1.1)".into(),
        );
    }
    let mut lengths: Vec<&[u8]> = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return ("headers".into(), "a header line without `:`".into());
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if !is_token(name) {
            return (
                "headers".into(),
                format!(
                    "a header name is not valid: `{}`",
                    String::from_utf8_lossy(name).escape_debug()
                ),
            );
        }
        let name_text = String::from_utf8_lossy(name).into_owned();
        if value.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f) {
            return (
                name_text,
                "the header's value has control characters".into(),
            );
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths.push(value);
        }
    }
    let bad_length = lengths
        .iter()
        .any(|v| v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 19)
        || lengths.windows(2).any(|w| w[0] != w[1]);
    if bad_length {
        return (
            "Content-Length".into(),
            "Content-Length is not one decimal number".into(),
        );
    }
    ("headers".into(), "the request headers do not parse".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_in_a_refused_head_is_named() {
        let field = |head: &str| fault_in(head.as_bytes()).0;
        assert_eq!(
            field("GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n"),
            "Content-Length"
        );
        assert_eq!(
            field("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            "Content-Length"
        );
        assert_eq!(field("GET / HTTP/1.1\r\nX-Bad: a\x01b\r\n\r\n"), "X-Bad");
        assert_eq!(field("GET / HTTP/1.1\r\nBad Name: a\r\n\r\n"), "headers");
        assert_eq!(field("GET /\r\n\r\n"), "request line");
        assert_eq!(field("G(T / HTTP/1.1\r\n\r\n"), "request line");
        let answer = parse_error_answer(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, b"");
        let text = String::from_utf8(answer).expect("UTF-8");
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        let body = text.split("\r\n\r\n").nth(1).expect("body");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(json["field"], "headers");
    }
}
