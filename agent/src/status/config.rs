//! The status server's config section, `[http]`, with its validation.
//!
//! The root [`crate::config::Config`] composes it; this module uses only the config
//! leaf ([`crate::config::units`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::{err, ByteSize, ConfigError, HumanDuration};

/// The local HTTP interface (status page, JSON API, metrics).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Bearer token: required for every write, and for everything when `listen` is not
    /// a loopback address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Host names accepted in the `Host` header besides localhost and the address the
    /// request came in on (requests for other names are refused: DNS rebinding).
    pub hostnames: Vec<String>,
    /// Largest request body accepted.
    pub max_body: ByteSize,
    /// Longest a client may take to send a request's line and headers, from its
    /// first byte.
    pub header_timeout: HumanDuration,
    /// Longest a client may take to send a request's body, from the end of its head.
    pub body_timeout: HumanDuration,
    /// A connection without a request under way (before the first, between
    /// keep-alive requests), or whose answer the client stops reading, is closed after
    /// this long.
    pub idle_timeout: HumanDuration,
    /// Open HTTP connections at most; a new one beyond it closes the connection idle
    /// the longest (or is closed itself when every one is busy).
    pub max_connections: usize,
    /// Store queries (readings, series, energy, forecast, top) running at once at
    /// most; others wait up to `heavy_query_wait`, then get 503 with `Retry-After`.
    pub max_heavy_queries: usize,
    /// How long a store query waits for its turn before it is refused.
    pub heavy_query_wait: HumanDuration,
    /// Largest answer of `GET .../readings`: a longer one stops early with
    /// `truncated` and `next_start`.
    pub max_answer: ByteSize,
    /// Push-ingest requests (`POST /api/v1/ingest`) whose bodies are read and parsed
    /// at once; others wait up to `heavy_query_wait` before their body is read, then
    /// get 503 with `Retry-After`.
    pub max_ingest_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            hostnames: Vec::new(),
            max_body: ByteSize(1 << 20),
            header_timeout: HumanDuration(Duration::from_secs(10)),
            body_timeout: HumanDuration(Duration::from_secs(30)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_connections: 256,
            max_heavy_queries: 2,
            heavy_query_wait: HumanDuration(Duration::from_secs(2)),
            max_answer: ByteSize(4 << 20),
            max_ingest_requests: 4,
        }
    }
}

impl HttpConfig {
    /// Checks the section's token, host names and limits.
    pub fn validate(&self, errors: &mut Vec<ConfigError>) {
        let http = self;
        match &http.token {
            None if !http.listen.ip().is_loopback() => errors.push(err(
                "http.listen",
                format!(
                    "{} is not a loopback address and no http.token is configured: anyone on the network could read and write; set a token or listen on 127.0.0.1",
                    http.listen
                ),
            )),
            Some(t) if t.len() < 16 || t.chars().any(|c| !c.is_ascii_graphic()) => errors.push(
                err("http.token", "must be at least 16 printable ASCII characters without spaces"),
            ),
            _ => {}
        }
        for (i, name) in http.hostnames.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                errors.push(err(
                    format!("http.hostnames[{i}]"),
                    format!("`{name}` is not a host name (letters, digits, `-`, `.`; no port)"),
                ));
            }
        }
        if http.max_body.0 < 1024 || http.max_body.0 > (256 << 20) {
            errors.push(err("http.max_body", "must be between 1KiB and 256MiB"));
        }
        for (key, value, max) in [
            ("http.header_timeout", http.header_timeout.0, 3600),
            ("http.body_timeout", http.body_timeout.0, 3600),
            ("http.idle_timeout", http.idle_timeout.0, 86_400),
            ("http.heavy_query_wait", http.heavy_query_wait.0, 60),
        ] {
            let ok = value >= Duration::from_millis(10) && value <= Duration::from_secs(max);
            if !ok {
                errors.push(err(key, format!("must be between 10ms and {max}s")));
            }
        }
        if !(1..=65_536).contains(&http.max_connections) {
            errors.push(err("http.max_connections", "must be between 1 and 65536"));
        }
        if !(1..=64).contains(&http.max_heavy_queries) {
            errors.push(err("http.max_heavy_queries", "must be between 1 and 64"));
        }
        if !(1..=64).contains(&http.max_ingest_requests) {
            errors.push(err("http.max_ingest_requests", "must be between 1 and 64"));
        }
        if http.max_answer.0 < (64 << 10) || http.max_answer.0 > (256 << 20) {
            errors.push(err("http.max_answer", "must be between 64KiB and 256MiB"));
        }
    }
}
