//! The HTTP interface end to end: the real status server (`status::start`: the
//! connection loop with its timeouts, hyper, the guard, the router and every handler)
//! over a real store with a little data, spoken to over loopback.
//!
//! The first input byte picks how the rest becomes a request:
//! - `0`: the bytes as they are (a head without its blank line gets 20 ms for an
//!   answer to what came so far);
//! - `1`: the bytes, ended with a blank line when they hold none;
//! - `2`: a valid request line and `Host`, then the bytes as header lines and a
//!   blank line;
//! - `3`: a request built from the bytes: method, one of the routes (a meter id or a
//!   path tail from the input), query, header lines, token, `Host`, body with its
//!   length.
//!
//! Each request goes on a fresh connection; the first answer is read (its head only
//! for an event stream) and the connection dropped. Holds: no panic anywhere in the
//! server (libFuzzer's panic hook aborts the process); no status of 500 or more except
//! a 503 with `Retry-After`; every 4xx carries a JSON body with a non-empty `error`;
//! and afterwards `GET /healthz` still answers 200.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use edge_agent::analytics::{Analytics, AnalyticsSettings};
use edge_agent::config::{ByteSize, HttpConfig, HumanDuration, StoreConfig};
use edge_agent::derive::{ClusterCount, TrackerParams};
use edge_agent::ingest::{self, Point, Series};
use edge_agent::model::{now_ms, Kind, Payload, Reading, Value};
use edge_agent::service::Liveness;
use edge_agent::status::{self, Readiness, StatusSources};
use edge_agent::store::{start_writer, Store};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fuzz-token-0123456789";
/// Longest one input's exchange may take.
const DEADLINE: Duration = Duration::from_secs(1);
/// How long an answer is waited for when the request's head has no end (the server
/// answers at once when the bytes so far are wrong, else waits for more): the
/// header timeout itself is not waited for on every such input.
const OPEN_HEAD_WAIT: Duration = Duration::from_millis(20);
/// How long `/healthz` may take after an input.
const HEALTH_DEADLINE: Duration = Duration::from_secs(5);
/// Meters with data.
const METERS: [&str; 2] = ["power", "energy"];
const MIN: i64 = 60_000;

struct Harness {
    rt: Runtime,
    addr: SocketAddr,
    /// Keeps the server running for the life of the process.
    _stop: CancellationToken,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let stop = CancellationToken::new();
        let addr = rt.block_on(start_server(stop.clone()));
        Harness {
            rt,
            addr,
            _stop: stop,
        }
    })
}

/// A small store with two meters' data, its analytics derived, and the status server
/// on a loopback port with short timeouts (so that a stalled request costs little).
async fn start_server(stop: CancellationToken) -> SocketAddr {
    // One store per process; the directory stays behind (it is small).
    let dir = std::env::temp_dir().join(format!("edge-agent-fuzz-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store_config = StoreConfig {
        path: dir.join("store"),
        cache_capacity: ByteSize(4 << 20),
        quota: ByteSize(64 << 20),
        min_free_space: ByteSize(0),
        ..StoreConfig::default()
    };
    let store = Arc::new(Store::open(&store_config).expect("store opens"));
    let (tx, _) = broadcast::channel(256);
    let analytics_rx = tx.subscribe();
    let status_rx = tx.subscribe();
    let (writer, _writer_task) = start_writer(store.clone(), Duration::from_millis(2), 1000, tx);
    let settings = AnalyticsSettings {
        gateway: "fuzz-gw".into(),
        tracker: TrackerParams::default(),
        spacing_ms: Default::default(),
        energy_quantity: Default::default(),
        rules: Vec::new(),
        cluster_every: 1_000_000,
        clusters: ClusterCount::Fixed(2),
        persist_every: Duration::from_secs(60),
        max_recompute_ms: 24 * 3_600_000,
    };
    let analytics = Analytics::start(
        store.clone(),
        writer.clone(),
        analytics_rx,
        None,
        None,
        settings,
    );
    let now = now_ms();
    let start = now - 6 * 60 * MIN;
    let energy = Series {
        meter: METERS[1].into(),
        unit: "kWh".into(),
        kind: Kind::EnergyDelta,
        points: (0..24)
            .map(|i| Point::new(start + i * 15 * MIN, 1.0 + (i % 4) as f64))
            .collect(),
    };
    ingest::ingest(&writer, &store, energy, now)
        .await
        .expect("energy stored");
    let readings = (0..120)
        .map(|i| {
            Payload::Reading(Reading {
                meter: METERS[0].into(),
                ts_ms: start + i * MIN,
                values: vec![Value {
                    quantity: "power".into(),
                    unit: "W".into(),
                    kind: Kind::Power,
                    value: Some(1000.0 + (i % 7) as f64 * 100.0),
                    invalid: None,
                }],
            })
        })
        .collect();
    writer
        .submit_batch(readings)
        .await
        .expect("readings stored");
    analytics.stop().await;

    let http = HttpConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        token: Some(TOKEN.into()),
        max_body: ByteSize(64 << 10),
        header_timeout: HumanDuration(Duration::from_millis(100)),
        body_timeout: HumanDuration(Duration::from_millis(100)),
        idle_timeout: HumanDuration(Duration::from_millis(500)),
        max_connections: 64,
        heavy_query_wait: HumanDuration(Duration::from_millis(200)),
        ..HttpConfig::default()
    };
    let ingestor = ingest::Ingestor::new(store.clone(), writer, Default::default());
    let sources = StatusSources {
        gateway_id: "fuzz-gw".into(),
        store,
        quota_bytes: 64 << 20,
        meters: Vec::new(),
        readiness: Readiness::new(Liveness::new()),
        upstream: None,
        ingest: Some(ingestor),
        broker: None,
        analytics: None,
    };
    let server = status::start(&http, sources, status_rx, stop)
        .await
        .expect("server starts");
    let addr = server.local_addr;
    assert!(addr.ip().is_loopback());
    // The server runs until the process ends.
    std::mem::forget(server);
    addr
}

/// Reads bytes off the input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// Up to the next 0 byte (dropped) or the end.
    fn part(&mut self) -> &'a [u8] {
        match self.0.iter().position(|b| *b == 0) {
            Some(i) => {
                let (part, rest) = self.0.split_at(i);
                self.0 = &rest[1..];
                part
            }
            None => std::mem::take(&mut self.0),
        }
    }
}

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "get", "CONNECT",
];

const ROUTES: [&str; 18] = [
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/v1/status",
    "/api/v1/meters",
    "/api/v1/meters/{id}/readings",
    "/api/v1/meters/{id}/series",
    "/api/v1/meters/{id}/energy",
    "/api/v1/meters/{id}/forecast",
    "/api/v1/top",
    "/api/v1/clusters",
    "/api/v1/events",
    "/api/v1/live",
    "/api/v1/ingest",
    "/api/v1/openapi.json",
    "/api/v1/",
    "",
];

/// The request for `data`, and its method (the first request's, for raw bytes).
fn build(data: &[u8], addr: SocketAddr) -> (Vec<u8>, Vec<u8>) {
    let mut input = Input(data);
    let mode = input.byte() % 4;
    let rest = input.0;
    match mode {
        0 => (rest.to_vec(), raw_method(rest)),
        1 => {
            let mut request = rest.to_vec();
            if !contains(rest, b"\r\n\r\n") {
                request.extend_from_slice(b"\r\n\r\n");
            }
            (request, raw_method(rest))
        }
        2 => {
            let mut request =
                format!("GET /api/v1/status HTTP/1.1\r\nHost: {addr}\r\n").into_bytes();
            request.extend_from_slice(rest);
            request.extend_from_slice(b"\r\n\r\n");
            (request, b"GET".to_vec())
        }
        _ => structured(&mut input, addr),
    }
}

fn structured(input: &mut Input<'_>, addr: SocketAddr) -> (Vec<u8>, Vec<u8>) {
    let method = METHODS[usize::from(input.byte()) % METHODS.len()];
    let route = ROUTES[usize::from(input.byte()) % ROUTES.len()];
    let flags = input.byte();
    let meter = match flags & 3 {
        0 => METERS[0].as_bytes(),
        1 => METERS[1].as_bytes(),
        _ => input.part(),
    };
    let mut target = Vec::new();
    match route.split_once("{id}") {
        Some((head, tail)) => {
            target.extend_from_slice(head.as_bytes());
            target.extend_from_slice(meter);
            target.extend_from_slice(tail.as_bytes());
        }
        None => {
            target.extend_from_slice(route.as_bytes());
            if route.is_empty() || route.ends_with("v1/") {
                target.extend_from_slice(input.part());
            }
        }
    }
    let query = input.part();
    if !query.is_empty() {
        target.push(b'?');
        target.extend_from_slice(query);
    }
    let headers = input.part();
    let body = input.0;

    let mut request = Vec::new();
    request.extend_from_slice(method.as_bytes());
    request.push(b' ');
    request.extend_from_slice(&target);
    request.extend_from_slice(b" HTTP/1.1\r\nConnection: close\r\n");
    match (flags >> 2) & 3 {
        0 | 1 => request.extend_from_slice(format!("Host: {addr}\r\n").as_bytes()),
        2 => request.extend_from_slice(b"Host: localhost\r\n"),
        _ => {}
    }
    if flags & 0x10 != 0 {
        request.extend_from_slice(format!("Authorization: Bearer {TOKEN}\r\n").as_bytes());
    }
    match (flags >> 5) & 3 {
        0 => request.extend_from_slice(b"Content-Type: application/json\r\n"),
        1 => request.extend_from_slice(b"Content-Type: text/csv\r\n"),
        _ => {}
    }
    for line in headers.split(|b| *b == b'\n') {
        if !line.is_empty() {
            request.extend_from_slice(line);
            request.extend_from_slice(b"\r\n");
        }
    }
    if flags & 0x80 == 0 || !body.is_empty() {
        request.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body);
    (request, method.as_bytes().to_vec())
}

/// The method of the first request in `raw` (empty lines before it are skipped, as
/// the server does).
fn raw_method(raw: &[u8]) -> Vec<u8> {
    let start = raw
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(raw.len());
    let raw = &raw[start..];
    let end = raw.iter().position(|b| *b == b' ').unwrap_or(raw.len());
    raw[..end].to_vec()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct Answer {
    status: u16,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    /// `None`: no body to check (a HEAD answer, an event stream, 1xx/204/304, or
    /// one that did not end in time).
    body: Option<Vec<u8>>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` on a new connection and reads the first final answer; `None`
/// when the connection closed (or the deadline passed) before a whole head came.
async fn exchange(addr: SocketAddr, request: &[u8], head_only: bool) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the server");
    let _ = stream.set_nodelay(true);
    // The server may answer and close before taking all of it (a refused head).
    if stream.write_all(request).await.is_err() {
        return read_answer(&mut stream, head_only).await;
    }
    read_answer(&mut stream, head_only).await
}

async fn read_answer(stream: &mut TcpStream, head_only: bool) -> Option<Answer> {
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // The head.
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        raw.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        if (100..200).contains(&status) && status != 101 {
            // An interim answer (100 Continue): the final one follows.
            continue;
        }
        let mut answer = Answer {
            status,
            headers,
            body: None,
        };
        let event_stream = answer
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if head_only || event_stream || status < 200 || status == 204 || status == 304 {
            return Some(answer);
        }
        let chunked = answer
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = answer
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok());
        loop {
            let done = if chunked {
                dechunk(&raw).is_some()
            } else if let Some(length) = length {
                raw.len() >= length
            } else {
                false
            };
            if done {
                break;
            }
            match stream.read(&mut buf).await {
                Ok(0) if length.is_none() && !chunked => break,
                // Cut off: nothing to check in the body.
                Ok(0) | Err(_) => return Some(answer),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        let body = if chunked {
            dechunk(&raw).expect("checked above")
        } else if let Some(length) = length {
            raw[..length].to_vec()
        } else {
            raw
        };
        answer.body = Some(body);
        return Some(answer);
    }
}

/// The body of a whole chunked message in `rest`; `None` while it is not whole.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line]).ok()?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(line + 2..line + 2 + size)?);
        rest = rest.get(line + 4 + size..)?;
    }
}

fn check(answer: &Answer, request: &[u8]) {
    let status = answer.status;
    let shown = || String::from_utf8_lossy(&request[..request.len().min(512)]).into_owned();
    if status >= 500 {
        assert!(
            status == 503 && answer.header("retry-after").is_some(),
            "server error {status} (headers {:?}, body {:?}) for {:?}",
            answer.headers,
            answer.body.as_deref().map(String::from_utf8_lossy),
            shown()
        );
    }
    if (400..500).contains(&status) {
        let Some(body) = &answer.body else {
            return;
        };
        let content_type = answer.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{status} answer is {content_type:?}, not JSON, for {:?}",
            shown()
        );
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{status} body does not parse ({e}): {:?} for {:?}",
                String::from_utf8_lossy(body),
                shown()
            )
        });
        assert!(
            json["error"].as_str().is_some_and(|s| !s.is_empty()),
            "{status} without `error`: {json} for {:?}",
            shown()
        );
    }
}

async fn healthy(addr: SocketAddr) {
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let answer = tokio::time::timeout(HEALTH_DEADLINE, exchange(addr, request.as_bytes(), false))
        .await
        .expect("/healthz answers in time");
    let status = answer.map(|a| a.status);
    assert_eq!(status, Some(200), "/healthz after the input");
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    let addr = harness.addr;
    let (request, method) = build(data, addr);
    let head_only = method == b"HEAD";
    let deadline = if contains(&request, b"\r\n\r\n") || contains(&request, b"\n\n") {
        DEADLINE
    } else {
        OPEN_HEAD_WAIT
    };
    harness.rt.block_on(async {
        if let Ok(Some(answer)) =
            tokio::time::timeout(deadline, exchange(addr, &request, head_only)).await
        {
            check(&answer, &request);
        }
        healthy(addr).await;
    });
});
