//! API fuzz: a real agent (in process, real HTTP on loopback, real store with
//! derived intervals, events and clusters) answers well over a thousand generated
//! requests, valid and malformed mixed: random and unknown meter ids, bad, reversed
//! and huge windows, non-numeric counts, odd percent-encodings, unknown paths under
//! /api/v1, wrong methods with and without the token, bad Host headers and
//! oversized query strings; and the edges every endpoint shares: unknown and repeated
//! parameters (also where none is taken), two `Host` headers, absolute-form targets,
//! heads hyper refuses (a bad `Content-Length`, too many headers, control characters)
//! and requests that never end (a head or a body stopping half-way: cut off by the
//! header and body timeouts).
//!
//! Holds: no answer is a 5xx; every 4xx is JSON with a non-empty `error` and the
//! `field` it is about; every 2xx of a JSON endpoint parses; requests valid by
//! construction get a 2xx, and the malformed ones a 4xx. The seed is printed
//! (`API_FUZZ_SEED` replays one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::broker::rfc3339_ms;
use edge_agent::config::{AlarmRule, Config};
use edge_agent::ingest::{self, Point, Series};
use edge_agent::model::{now_ms, Kind};
use edge_agent::store::{Store, StoreWriter};
use edge_agent::{Hooks, StartHook};
use edge_agent_tests::{free_port, http_get, loopback, poll_until, wait_ready};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fuzz-token-0123456789";
const REQUESTS: usize = 1_500;
const WORKERS: usize = 4;
const MIN: i64 = 60_000;
const DAY: i64 = 1_440 * MIN;
/// Meters with data: `hist` (three days of power, alarms, clusters) and `counter`
/// (a day of a cumulative register).
const METERS: [&str; 2] = ["hist", "counter"];

/// What a generated request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Expect {
    /// 2xx.
    Ok,
    /// This 4xx.
    Status(u16),
    /// Some 4xx.
    ClientError,
    /// A 408 naming the body, or the connection closed without an answer (a request
    /// that never ends).
    CutOff,
}

/// A request that never ends: the head stops half-way, or the body does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partial {
    Head,
    Body,
}

#[derive(Debug, Clone)]
struct Case {
    kind: &'static str,
    method: String,
    target: String,
    /// `None`: no Host header at all.
    host: Option<String>,
    token: bool,
    /// Raw header lines added as they are (a second Host, a bad Content-Length).
    extra: Vec<String>,
    partial: Option<Partial>,
    expect: Expect,
}

struct Gen {
    rng: StdRng,
    addr: SocketAddr,
    /// The stored history: [start, end).
    history: (i64, i64),
}

impl Gen {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.gen_range(0..items.len())]
    }

    /// A time inside or around the history.
    fn time_ms(&mut self) -> i64 {
        let (a, b) = self.history;
        self.rng.gen_range(a - DAY..b + DAY)
    }

    /// `ms` in one of the RFC 3339 forms the API accepts, query-encoded.
    fn time_text(&mut self, ms: i64) -> String {
        let base = rfc3339_ms(ms); // 2024-01-02T03:04:05.678Z
        match self.rng.gen_range(0..5) {
            0 => base,
            1 => base.replace('T', "t").replace('Z', "z"),
            // A space between date and time, form-encoded as `+` or `%20`.
            2 => base.replacen('T', "+", 1),
            3 => base.replacen('T', "%20", 1),
            // The same instant at +00:00, the `+` percent-encoded.
            _ => base.replace('Z', "%2B00:00"),
        }
    }

    /// Characters a URI may carry; with `escapes`, also random `%XX` bytes (which
    /// may not decode to UTF-8).
    fn garbage(&mut self, escapes: bool) -> String {
        let len = self.rng.gen_range(0..24);
        let alphabet: &[u8] = if escapes {
            b"abcXYZ019-_.~!$&'()*,;=:@%+"
        } else {
            b"abcXYZ019-_.~!$&'()*,;=:@+"
        };
        (0..len)
            .map(|_| {
                let c = self.pick(alphabet) as char;
                if c == '%' {
                    format!("%{:02X}", self.rng.gen::<u8>())
                } else {
                    c.to_string()
                }
            })
            .collect()
    }

    fn bad_time(&mut self) -> String {
        let ms = self.time_ms();
        let good = rfc3339_ms(ms);
        match self.rng.gen_range(0..10) {
            0 => self.garbage(true),
            1 => "yesterday".into(),
            2 => "2024-02-30T00:00:00Z".into(),
            3 => "2023-06-30T23:59:60Z".into(),
            4 => good.replace('Z', ""),
            // The offset's `+` unencoded: a space once decoded.
            5 => good.replace('Z', "+01:00"),
            6 => "9999-12-31T23:59:59-23:59".into(),
            7 => "1969-12-31T23:59:59.999Z".into(),
            8 => ms.to_string(),
            // Trailing junk; the `~` keeps it from being empty (garbage may be).
            _ => format!("{good}~{}", self.garbage(true)),
        }
    }

    fn bad_number(&mut self) -> String {
        self.pick(&[
            "",
            "0",
            "-1",
            "abc",
            "3.5",
            "1e3",
            "99999999999999999999999",
            "%00",
            "%FF",
            "0x10",
            "+3",
            " 3",
            "100001",
            "NaN",
        ])
        .replace(' ', "%20")
    }

    fn meter(&mut self) -> String {
        self.pick(&METERS).to_string()
    }

    fn unknown_meter(&mut self) -> String {
        match self.rng.gen_range(0..6) {
            0 => format!("m{}", self.rng.gen::<u32>()),
            1 => "HIST".into(),
            2 => "hist%00".into(),
            3 => "%E2%98%83".into(),
            4 => "a%2Fb".into(),
            _ => format!("x{}", self.garbage(false)),
        }
    }

    /// A path under /api/v1/meters/{id}/ with an endpoint that takes a window.
    fn window_endpoint(&mut self) -> &'static str {
        self.pick(&["series", "energy", "forecast", "readings"])
    }

    fn case(&mut self, kind: &'static str, target: String, expect: Expect) -> Case {
        Case {
            kind,
            method: "GET".into(),
            target,
            host: Some(self.addr.to_string()),
            token: false,
            extra: Vec::new(),
            partial: None,
            expect,
        }
    }

    /// Edges every endpoint shares: repeated and unknown parameters (also where none
    /// is taken), two `Host` headers, absolute-form targets, heads hyper refuses, and
    /// requests that never end.
    fn edge(&mut self) -> Case {
        const ALL: [&str; 13] = [
            "/",
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/status",
            "/api/v1/meters",
            "/api/v1/live",
            "/api/v1/openapi.json",
            "/api/v1/clusters",
            "/api/v1/events",
            "/api/v1/top",
            "/api/v1/meters/hist/series",
            "/api/v1/meters/counter/readings",
        ];
        let path = self.pick(&ALL);
        match self.rng.gen_range(0..9) {
            0 => {
                let name = self.pick(&["bogus", "x", "dry_run", "START", "%62ogus"]);
                let value = self.garbage(false);
                self.case(
                    "unknown parameter anywhere",
                    format!("{path}?{name}=1{value}"),
                    Expect::Status(400),
                )
            }
            1 => {
                let (path, name, value) = self.pick(&[
                    ("/api/v1/top", "n", "2"),
                    ("/api/v1/events", "limit", "3"),
                    (
                        "/api/v1/meters/hist/series",
                        "start",
                        "2024-01-01T00:00:00Z",
                    ),
                    ("/api/v1/meters/hist/readings", "limit", "5"),
                    (
                        "/api/v1/meters/counter/energy",
                        "end",
                        "2024-01-01T00:00:00Z",
                    ),
                ]);
                let other = if self.rng.gen_bool(0.5) { value } else { "1" };
                self.case(
                    "repeated parameter",
                    format!("{path}?{name}={value}&{name}={other}"),
                    Expect::Status(400),
                )
            }
            2 => {
                let second = self.pick(&["evil.example", "localhost", "127.0.0.1"]);
                let mut case = self.case("two hosts", path.to_string(), Expect::Status(421));
                case.extra.push(format!("Host: {second}"));
                case
            }
            3 => {
                let (host, expect) = if self.rng.gen_bool(0.5) {
                    (self.addr.to_string(), Expect::Ok)
                } else {
                    let evil = self.pick(&["evil.example", "10.0.0.1:80", "localhost.evil"]);
                    (evil.to_string(), Expect::Status(421))
                };
                let path = self.pick(&["/api/v1/status", "/healthz", "/api/v1/meters"]);
                self.case("absolute target", format!("http://{host}{path}"), expect)
            }
            4 => {
                let value = self.pick(&["abc", "-1", "1 2", "0x10", "99999999999999999999999"]);
                let mut case =
                    self.case("bad content-length", path.to_string(), Expect::Status(400));
                case.extra.push(format!("Content-Length: {value}"));
                case
            }
            5 => {
                let n = self.rng.gen_range(101..300);
                let mut case = self.case("many headers", path.to_string(), Expect::Status(431));
                case.extra = (0..n).map(|i| format!("X-F{i}: {i}")).collect();
                case
            }
            6 => {
                let c = self.pick(&['\u{1}', '\u{7f}', '\u{0}']);
                let mut case =
                    self.case("control character", path.to_string(), Expect::Status(400));
                case.extra.push(format!("X-Ctl: a{c}b"));
                case
            }
            7 => {
                let mut case = self.case("partial head", path.to_string(), Expect::CutOff);
                case.partial = Some(Partial::Head);
                case
            }
            _ => {
                let mut case =
                    self.case("partial body", "/api/v1/ingest".to_string(), Expect::CutOff);
                case.method = "POST".into();
                case.token = true;
                case.partial = Some(Partial::Body);
                case
            }
        }
    }

    fn valid(&mut self) -> Case {
        let (a, b) = self.history;
        match self.rng.gen_range(0..9) {
            0 => {
                let path = self.pick(&[
                    "/api/v1/status",
                    "/api/v1/meters",
                    "/api/v1/clusters",
                    "/api/v1/openapi.json",
                    "/api/v1/live",
                    "/healthz",
                    "/metrics",
                ]);
                self.case("valid", path.to_string(), Expect::Ok)
            }
            1 => {
                let n = self.rng.gen_range(1..=1000);
                let mut q = format!("n={n}");
                if self.rng.gen_bool(0.5) {
                    let start = self.time_ms();
                    let end = start + self.rng.gen_range(1..3 * DAY);
                    q = format!(
                        "{q}&start={}&end={}",
                        self.time_text(start),
                        self.time_text(end)
                    );
                }
                self.case("valid", format!("/api/v1/top?{q}"), Expect::Ok)
            }
            2 => {
                let limit = self.rng.gen_range(1..=200);
                self.case("valid", format!("/api/v1/events?limit={limit}"), Expect::Ok)
            }
            // Windows inside the history (forecasts only for `hist`, which has them).
            _ => {
                let endpoint = self.window_endpoint();
                let meter = if endpoint == "forecast" {
                    "hist".to_string()
                } else {
                    self.meter()
                };
                let start = self.rng.gen_range(a..b - MIN);
                // Readings answer every stored point: keep their windows short.
                let span = if endpoint == "readings" {
                    DAY / 4
                } else {
                    20 * DAY
                };
                let end = self.rng.gen_range(start + 1..=b.min(start + span));
                let q = match self.rng.gen_range(0..4) {
                    0 => String::new(),
                    1 => format!("?start={}", self.time_text(start)),
                    2 => format!("?end={}", self.time_text(end)),
                    _ => format!(
                        "?start={}&end={}",
                        self.time_text(start),
                        self.time_text(end)
                    ),
                };
                // `start` alone may lie after the default end of a forecast
                // (start + 1 day) but never after `now` for the others.
                self.case(
                    "valid",
                    format!("/api/v1/meters/{meter}/{endpoint}{q}"),
                    Expect::Ok,
                )
            }
        }
    }

    fn malformed(&mut self) -> Case {
        let meter = self.meter();
        let endpoint = self.window_endpoint();
        match self.rng.gen_range(0..13) {
            0 => {
                let id = self.unknown_meter();
                self.case(
                    "unknown meter",
                    format!("/api/v1/meters/{id}/{endpoint}"),
                    Expect::Status(404),
                )
            }
            1 => {
                let (name, other) = if self.rng.gen_bool(0.5) {
                    ("start", "end")
                } else {
                    ("end", "start")
                };
                let bad = self.bad_time();
                let good = rfc3339_ms(self.time_ms());
                self.case(
                    "bad time",
                    format!("/api/v1/meters/{meter}/{endpoint}?{name}={bad}&{other}={good}"),
                    Expect::Status(400),
                )
            }
            2 => {
                // Reversed or empty.
                let end = self.time_ms();
                let start = end + self.rng.gen_range(0..5 * DAY);
                let q = format!("start={}&end={}", rfc3339_ms(start), rfc3339_ms(end));
                let path = if self.rng.gen_bool(0.8) {
                    format!("/api/v1/meters/{meter}/{endpoint}?{q}")
                } else {
                    format!("/api/v1/top?{q}")
                };
                self.case("reversed window", path, Expect::Status(400))
            }
            3 => {
                // Longer than the endpoint allows (energy and top take any length).
                let endpoint = self.pick(&["series", "forecast", "readings"]);
                let start = self.rng.gen_range(0..4_000_000_000_000i64);
                let end = start + self.rng.gen_range(367 * DAY..200_000 * DAY);
                let q = format!(
                    "start={}&end={}",
                    rfc3339_ms(start),
                    rfc3339_ms(end.min(253_402_300_799_999))
                );
                self.case(
                    "huge window",
                    format!("/api/v1/meters/{meter}/{endpoint}?{q}"),
                    Expect::Status(400),
                )
            }
            4 => {
                let (path, name) = self.pick(&[
                    ("/api/v1/top", "n"),
                    ("/api/v1/events", "limit"),
                    ("/api/v1/meters/hist/readings", "limit"),
                ]);
                let bad = self.bad_number();
                self.case(
                    "bad number",
                    format!("{path}?{name}={bad}"),
                    Expect::Status(400),
                )
            }
            5 => {
                let name = self.pick(&["colour", "START", "n", "limit", "%00", "a%3Db"]);
                let path = self.pick(&[
                    "/api/v1/clusters",
                    "/api/v1/meters/hist/series",
                    "/api/v1/meters/counter/energy",
                    "/api/v1/meters/hist/forecast",
                    "/api/v1/top?n=2",
                    "/api/v1/events?limit=2",
                ]);
                let sep = if path.contains('?') { '&' } else { '?' };
                // `n`/`limit` where already given or unknown: repeated or unknown.
                self.case(
                    "unknown parameter",
                    format!("{path}{sep}{name}=1"),
                    Expect::Status(400),
                )
            }
            6 => {
                let tail = self.pick(&[
                    "nothing",
                    "meters/hist",
                    "meters/hist/",
                    "meters/hist/series/extra",
                    "METERS",
                    "meters//series",
                    "meters/hist/../series",
                    "top/",
                    "ingest/x",
                    "%2e%2e/status",
                    "openapi.yaml",
                ]);
                let extra = self.garbage(true);
                let path = if self.rng.gen_bool(0.5) {
                    format!("/api/v1/{tail}")
                } else {
                    format!("/api/v1/{tail}{extra}")
                };
                self.case("unknown path", path, Expect::ClientError)
            }
            7 => {
                let method = self.pick(&["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"]);
                let path = self.pick(&[
                    "/api/v1/status",
                    "/api/v1/top",
                    "/api/v1/meters/hist/series",
                    "/api/v1/events",
                    "/api/v1/openapi.json",
                ]);
                let token = self.rng.gen_bool(0.5);
                let mut case = self.case(
                    "wrong method",
                    path.to_string(),
                    Expect::Status(if token { 405 } else { 401 }),
                );
                case.method = method.to_string();
                case.token = token;
                case
            }
            8 => {
                let host = self.pick(&[
                    "evil.example",
                    "evil.example:80",
                    "127.0.0.1.nip.io",
                    "10.0.0.1",
                    "localhost.evil",
                    "[::1",
                    "",
                    "gw:abc",
                ]);
                let target = self.valid().target;
                let mut case = self.case("bad host", target, Expect::Status(421));
                case.host = if self.rng.gen_bool(0.1) {
                    None
                } else {
                    Some(host.to_string())
                };
                case
            }
            9 => {
                // Oversized query strings: 414 before any parsing.
                let size = self.rng.gen_range(9 * 1024..48 * 1024);
                let q: String = std::iter::repeat("start=2024-01-01T00:00:00Z&")
                    .flat_map(|s| s.chars())
                    .take(size)
                    .collect();
                self.case(
                    "oversized query",
                    format!("/api/v1/meters/hist/series?{q}"),
                    Expect::Status(414),
                )
            }
            10 => {
                // Odd encodings of a valid request's parameters: double-encoded,
                // encoded names, NUL and invalid UTF-8 in values.
                let time = rfc3339_ms(self.time_ms());
                let q = match self.rng.gen_range(0..4) {
                    0 => format!("start={}", time.replace(':', "%253A")),
                    1 => format!("st%61rt={}", time.replace('T', "%00")),
                    2 => format!("start={time}%FF"),
                    _ => format!("%73tart={}", time.replace('-', "%E2%88%92")),
                };
                self.case(
                    "odd encoding",
                    format!("/api/v1/meters/{meter}/{endpoint}?{q}"),
                    Expect::Status(400),
                )
            }
            11 => {
                // A bad path segment: invalid UTF-8 once decoded.
                let tail = self.garbage(true);
                self.case(
                    "bad path segment",
                    format!("/api/v1/meters/%C3%28{tail}/{endpoint}"),
                    Expect::Status(400),
                )
            }
            _ => {
                let n = self.rng.gen_range(1..=1000);
                let q = format!("n={n}&n={n}");
                self.case(
                    "repeated parameter",
                    format!("/api/v1/top?{q}"),
                    Expect::Status(400),
                )
            }
        }
    }

    fn next(&mut self) -> Case {
        let roll = self.rng.gen_range(0..100);
        if roll < 30 {
            self.valid()
        } else if roll < 80 {
            self.malformed()
        } else {
            self.edge()
        }
    }
}

struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// Sends `case` over its own connection; reads the head only for an event stream.
/// A partial request is left unfinished; closed without an answer, it is status 0.
async fn send(addr: SocketAddr, case: &Case) -> std::io::Result<Answer> {
    let mut head = format!(
        "{} {} HTTP/1.1\r\nConnection: close\r\n",
        case.method, case.target
    );
    if let Some(host) = &case.host {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    if case.token {
        head.push_str(&format!("Authorization: Bearer {TOKEN}\r\n"));
    }
    for line in &case.extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    let declares_length = case
        .extra
        .iter()
        .any(|l| l.to_ascii_lowercase().starts_with("content-length"));
    match case.partial {
        Some(Partial::Head) => {
            // The head stops in the middle of a header line.
            head.push_str("X-Unfinished: ");
        }
        Some(Partial::Body) => {
            head.push_str("Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{");
        }
        None => {
            if case.method != "GET" && case.method != "HEAD" && !declares_length {
                head.push_str("Content-Length: 0\r\n");
            }
            head.push_str("\r\n");
        }
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(head.as_bytes()).await?;
    if case.partial.is_some() {
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        if raw.is_empty() {
            return Ok(Answer {
                status: 0,
                content_type: String::new(),
                body: Vec::new(),
            });
        }
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("partial answer"))?;
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let content_type = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        return Ok(Answer {
            status,
            content_type,
            body: raw[end + 4..].to_vec(),
        });
    }
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let n = stream.read(&mut buf).await?;
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "closed without an answer: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        }
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split("\r\n")
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let header = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let content_type = header("content-type").unwrap_or_default();
    let mut body = raw[end + 4..].to_vec();
    if content_type.starts_with("text/event-stream") {
        return Ok(Answer {
            status,
            content_type,
            body: Vec::new(),
        });
    }
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body).ok_or_else(|| std::io::Error::other("bad chunked body"))?;
    }
    Ok(Answer {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = rest.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line]).ok()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(line + 2..line + 2 + size)?);
        rest = rest.get(line + 4 + size..)?;
    }
}

/// What is wrong with `answer` to `case`, if anything.
fn check(case: &Case, answer: &Answer) -> Option<String> {
    let status = answer.status;
    if status >= 500 {
        return Some(format!("server error {status}"));
    }
    let is_json = answer.content_type.starts_with("application/json");
    let json: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
    if (400..500).contains(&status) {
        if !is_json {
            return Some(format!(
                "{status} is not JSON but {:?}",
                answer.content_type
            ));
        }
        let Some(json) = &json else {
            return Some(format!("{status} body does not parse"));
        };
        let non_empty = |v: &serde_json::Value| v.as_str().is_some_and(|s| !s.is_empty());
        if !non_empty(&json["error"]) {
            return Some(format!("{status} without `error`: {json}"));
        }
        if !non_empty(&json["field"]) {
            return Some(format!("{status} does not name a field: {json}"));
        }
    }
    if (200..300).contains(&status) && is_json && json.is_none() {
        return Some(format!("{status} JSON does not parse"));
    }
    let fits = match case.expect {
        Expect::Ok => (200..300).contains(&status),
        Expect::Status(s) => status == s,
        Expect::ClientError => (400..500).contains(&status),
        Expect::CutOff => status == 0 || status == 408,
    };
    (!fits).then(|| {
        format!(
            "expected {:?}, got {status}: {}",
            case.expect,
            String::from_utf8_lossy(&answer.body)
        )
    })
}

/// This process's resident memory (the agent runs in it).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn level_w(minute: i64) -> f64 {
    match (minute / 60) % 24 {
        0..=5 => 200.0,
        17..=19 => 4000.0,
        _ => 1500.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_never_get_a_server_error() {
    let began = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let http_port = free_port();
    let mut config = Config::from_toml(&format!(
        "gateway_id = \"fuzz-gw\"\n[store]\npath = \"{}\"\nflush_interval = \"20ms\"\n\
[mqtt]\nlisten = \"127.0.0.1:{}\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\ntoken = \"{TOKEN}\"\n\
header_timeout = \"500ms\"\nbody_timeout = \"500ms\"\nheavy_query_wait = \"10s\"\n\
[analytics]\ncluster_every = 500\n",
        dir.path().join("store").display(),
        free_port(),
    ))
    .expect("config");
    config.alarms.push(AlarmRule {
        id: Some("peak".into()),
        // `hist` only pushes its readings, so it is not among the configured meters.
        meter: "hist".into(),
        quantity: "power".into(),
        above: Some(3000.0),
        below: None,
        count: 2,
        pushed: true,
    });
    config.validate().expect("valid config");

    // Three days of power for `hist` (an evening peak raises and clears an alarm
    // each day) and a day of a cumulative register for `counter`, ending now.
    let end = now_ms() / MIN * MIN;
    let start = end - 3 * DAY;
    let hook: StartHook = Box::new(move |store: Arc<Store>, writer: StoreWriter| {
        Box::pin(async move {
            let points = |from: i64, f: &dyn Fn(i64) -> f64| -> Vec<Point> {
                (from / MIN..end / MIN)
                    .map(|m| Point::new(m * MIN, f(m)))
                    .collect()
            };
            let hist = Series {
                meter: "hist".into(),
                unit: "W".into(),
                kind: Kind::Power,
                points: points(start, &level_w),
            };
            let first = (end - DAY) / MIN;
            let counter = Series {
                meter: "counter".into(),
                unit: "kWh".into(),
                kind: Kind::EnergyTotal,
                points: points(end - DAY, &|m| 1000.0 + (m - first) as f64 * 0.02),
            };
            for series in [hist, counter] {
                ingest::ingest(&writer, &store, series, now_ms()).await?;
            }
            Ok(())
        })
    });
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run_with(
        config,
        shutdown.clone(),
        Hooks {
            before_polling: Some(hook),
            ..Hooks::default()
        },
    ));
    let addr = loopback(http_port);
    assert_eq!(wait_ready(addr, Duration::from_secs(15)).await.status, 200);
    // Wait until analytics has derived the history: intervals, clusters, events.
    let window = format!("start={}&end={}", rfc3339_ms(start), rfc3339_ms(end));
    let (series, clusters, events, derived) = poll_until(Duration::from_secs(30), || async {
        let series = http_get(addr, &format!("/api/v1/meters/hist/series?{window}"))
            .await
            .json();
        let clusters = http_get(addr, "/api/v1/clusters").await.json();
        let events = http_get(addr, "/api/v1/events").await.json();
        let derived = series["count"].as_u64() >= Some(3 * 96 - 2)
            && clusters["clusters"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
            && events["count"].as_u64() >= Some(4);
        ((series, clusters, events, derived), derived)
    })
    .await;
    assert!(
        derived,
        "history not derived: {} intervals, clusters {}, {} events",
        series["count"], clusters["clusters"], events["count"]
    );
    println!(
        "history derived: {} intervals, {} clusters, {} events",
        series["count"],
        clusters["clusters"].as_array().map_or(0, Vec::len),
        events["count"]
    );
    let prepared = began.elapsed();

    let seed: u64 = std::env::var("API_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("API fuzz seed {seed} (API_FUZZ_SEED={seed} replays it)");
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(seed),
        addr,
        history: (start, end),
    };
    let cases: Vec<Case> = (0..REQUESTS).map(|_| gen.next()).collect();
    let rss_before = rss_kib();
    let cases = Arc::new(cases);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let cases = cases.clone();
        workers.spawn(async move {
            let mut out = Vec::new();
            for case in cases.iter().skip(w).step_by(WORKERS) {
                let answer = tokio::time::timeout(Duration::from_secs(10), send(addr, case)).await;
                out.push((case.clone(), answer));
            }
            out
        });
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<&'static str, BTreeMap<u16, usize>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut answered = 0;
    while let Some(done) = workers.join_next().await {
        for (case, answer) in done.expect("worker") {
            let problem = match answer {
                Err(_) => Some("no answer within 10 s".to_string()),
                Ok(Err(e)) => Some(format!("transport: {e}")),
                Ok(Ok(answer)) => {
                    answered += 1;
                    *by_status.entry(answer.status).or_default() += 1;
                    *by_kind
                        .entry(case.kind)
                        .or_default()
                        .entry(answer.status)
                        .or_default() += 1;
                    check(&case, &answer)
                }
            };
            if let Some(problem) = problem {
                failures.push(format!(
                    "{} {} (host {:?}, token {}) [{}]: {problem}",
                    case.method,
                    case.target.chars().take(200).collect::<String>(),
                    case.host,
                    case.token,
                    case.kind
                ));
            }
        }
    }
    println!(
        "{answered} of {REQUESTS} requests answered in {:.1} s (setup {:.1} s)",
        (began.elapsed() - prepared).as_secs_f64(),
        prepared.as_secs_f64()
    );
    let rss_after = rss_kib();
    println!(
        "process RSS {rss_before} KiB before the requests, {rss_after} KiB after (+{} KiB)",
        rss_after.saturating_sub(rss_before)
    );
    println!("by status: {by_status:?}");
    for (kind, statuses) in &by_kind {
        println!("  {kind}: {statuses:?}");
    }
    for f in failures.iter().take(20) {
        println!("FAIL {f}");
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .expect("agent stops")
        .expect("agent task")
        .expect("agent ran cleanly");

    assert!(
        failures.is_empty(),
        "{} of {REQUESTS} requests failed (seed {seed})",
        failures.len()
    );
    assert_eq!(answered, REQUESTS);
    // Memory stays bounded: no request keeps anything after its answer.
    assert!(
        rss_after.saturating_sub(rss_before) < 64 * 1024,
        "the process grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(by_status.range(500..).count(), 0);
    // Both halves were exercised.
    assert!(by_status.range(200..300).map(|(_, n)| n).sum::<usize>() >= REQUESTS / 5);
    assert!(by_status.range(400..500).map(|(_, n)| n).sum::<usize>() >= REQUESTS / 2);
}
