//! `edge-agent verify --serve`: the verifier as a long-running fleet service. It
//! follows the gateways (of its shard), keeps their state in its store, asks for
//! resends within the global rate, and answers on HTTP:
//!
//! - `GET /metrics`: Prometheus text, per gateway (label `gateway`): missing
//!   records, last seq, last manifest ok, age of the newest record, since when
//!   incomplete; and the verifier's own totals.
//! - `GET /gateways?after=GW&limit=N&incomplete=true`: the gateways in id order, a
//!   page at a time (at most [`MAX_PAGE`]), with `next` for the following page.
//! - `GET /gateways/{gw}`: one gateway's report (JSON), 404 when not followed.
//!
//! The HTTP server is the agent's own connection loop (`status::server`): connections
//! are capped and idle ones closed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Report, Shared, Verifier, VerifyOptions};
use crate::status::guard::ApiError;
use crate::status::server::{self, Limits};

/// Gateways listed per page at most.
pub const MAX_PAGE: usize = 1000;
/// Gateways per page without `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// How often the service logs a one-line summary.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// The HTTP limits of `--serve`.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A running service.
pub struct Serving {
    pub addr: SocketAddr,
    pub verifier: Verifier,
    http: tokio::task::JoinHandle<()>,
    stop_http: CancellationToken,
}

impl Serving {
    /// Stops serving, saves the state and disconnects.
    pub async fn stop(self) -> Report {
        self.stop_http.cancel();
        let _ = self.http.await;
        self.verifier.stop().await
    }
}

/// Opens the verifier (and its store) and serves HTTP on `listener`.
pub async fn start(
    options: VerifyOptions,
    listener: TcpListener,
    limits: HttpLimits,
) -> anyhow::Result<Serving> {
    let addr = listener.local_addr()?;
    let verifier = Verifier::open(options)?;
    let stop_http = CancellationToken::new();
    let http = tokio::spawn(server::serve(
        listener,
        router(verifier.shared.clone()),
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: limits.idle_timeout,
            max_connections: limits.max_connections.max(1),
        },
        stop_http.clone(),
    ));
    let shared = verifier.shared.clone();
    let stop_summary = stop_http.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(SUMMARY_EVERY);
        every.tick().await;
        loop {
            tokio::select! {
                _ = stop_summary.cancelled() => return,
                _ = every.tick() => {}
            }
            let (gateways, incomplete, missing, resends) = {
                let t = shared.tracker();
                let mut incomplete = 0u64;
                let mut missing = 0u64;
                for (gw, g) in t.iter_from(None) {
                    let m = super::tracker::span_len(&t.gaps(gw, g));
                    missing += m;
                    incomplete += u64::from(m > 0);
                }
                (t.len(), incomplete, missing, t.resend_total)
            };
            tracing::info!(target: "edge_agent::verify", gateways, incomplete, missing, resend_requests = resends, connected = shared.connected(), "verify: summary");
        }
    });
    Ok(Serving {
        addr,
        verifier,
        http,
        stop_http,
    })
}

/// `verify --serve` until SIGTERM or SIGINT.
pub async fn run_until_signal(
    options: VerifyOptions,
    listen: SocketAddr,
    limits: HttpLimits,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
    let serving = start(options, listener, limits).await?;
    tracing::info!(target: "edge_agent::verify", addr = %serving.addr, "verify: serving /metrics, /gateways");
    wait_for_signal().await;
    let report = serving.stop().await;
    tracing::info!(target: "edge_agent::verify", gateways = report.gateways.len(), missing = report.missing_total(), "verify: stopped, state saved");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/gateways", get(list))
        .route("/gateways/{gw}", get(one))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint: /metrics, /gateways, /gateways/{gw}",
            )
            .field("path")
        })
        .with_state(shared)
}

/// A label value in the Prometheus text format.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The per-gateway series: name, help, type.
const SERIES: [(&str, &str, &str); 8] = [
    ("edge_verify_missing_records", "Seqs neither received nor declared dropped, up to the highest known.", "gauge"),
    ("edge_verify_last_seq", "Highest seq received.", "gauge"),
    ("edge_verify_received_records", "Distinct seqs received.", "gauge"),
    ("edge_verify_duplicates_total", "Records received more than once, unasked.", "counter"),
    ("edge_verify_last_manifest_ok", "1 when the last checked manifest matched what arrived, 0 when not (absent before the first).", "gauge"),
    ("edge_verify_manifests_failed_total", "Manifests that did not match what arrived.", "counter"),
    ("edge_verify_newest_record_age_seconds", "Seconds since the newest record arrived (absent before the first).", "gauge"),
    ("edge_verify_incomplete_since_timestamp_seconds", "Unix time since when records are missing (absent while complete).", "gauge"),
];

pub fn metrics_text(shared: &Shared) -> String {
    let now_ms = crate::model::now_ms();
    let t = shared.tracker();
    let mut rows: Vec<[Option<f64>; 8]> = Vec::with_capacity(t.len());
    let mut names = Vec::with_capacity(t.len());
    for (gw, g) in t.iter_from(None) {
        let r = t.gateway_report(gw, g, now_ms);
        names.push(label(gw));
        rows.push([
            Some(r.missing_count as f64),
            Some(r.last_seq as f64),
            Some(r.received as f64),
            Some(r.duplicates as f64),
            r.last_manifest_ok.map(|ok| if ok { 1.0 } else { 0.0 }),
            Some(r.manifests_failed_total as f64),
            r.newest_record_age_s,
            r.incomplete_since_ms.map(|ms| ms as f64 / 1000.0),
        ]);
    }
    let mut out = String::with_capacity(64 + rows.len() * 8 * 64);
    let totals = [
        (
            "edge_verify_gateways",
            "Gateways followed.",
            "gauge",
            t.len() as f64,
        ),
        (
            "edge_verify_gateways_refused_total",
            "Messages of gateways beyond --max-gateways, ignored.",
            "counter",
            t.refused as f64,
        ),
        (
            "edge_verify_resend_requests_total",
            "Resend requests sent.",
            "counter",
            t.resend_total as f64,
        ),
        (
            "edge_verify_resend_rate_limited_total",
            "Resend rounds that had more to ask than --resend-rate allowed.",
            "counter",
            t.rate_limited_rounds as f64,
        ),
    ];
    drop(t);
    for (name, help, kind, value) in totals {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let connected = if shared.connected() { 1 } else { 0 };
    let _ = writeln!(
        out,
        "# HELP edge_verify_connected 1 while connected to the upstream broker.\n# TYPE edge_verify_connected gauge\nedge_verify_connected {connected}"
    );
    for (i, (name, help, kind)) in SERIES.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (gw, row) in names.iter().zip(&rows) {
            if let Some(v) = row[i] {
                let _ = writeln!(out, "{name}{{gateway=\"{gw}\"}} {v}");
            }
        }
    }
    out
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = tokio::task::spawn_blocking(move || metrics_text(&shared))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// One line of `GET /gateways`.
#[derive(Debug, Serialize)]
struct Summary {
    gateway: String,
    received: u64,
    last_seq: u64,
    missing: u64,
    last_manifest_ok: Option<bool>,
    newest_record_age_s: Option<f64>,
    incomplete_since_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
struct Page {
    /// Gateways followed.
    total: usize,
    gateways: Vec<Summary>,
    /// `after` for the next page; absent on the last.
    next: Option<String>,
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let mut limit = DEFAULT_PAGE;
    let mut incomplete_only = false;
    let mut after = None;
    for (key, value) in &query {
        match key.as_str() {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                _ => {
                    return ApiError::bad_request("limit", format!("must be 1..={MAX_PAGE}"))
                        .into_response()
                }
            },
            "incomplete" => match value.as_str() {
                "true" => incomplete_only = true,
                "false" => incomplete_only = false,
                _ => {
                    return ApiError::bad_request("incomplete", "must be true or false")
                        .into_response()
                }
            },
            "after" => after = Some(value.clone()),
            other => {
                return ApiError::bad_request(other, "unknown parameter (after, limit, incomplete)")
                    .into_response()
            }
        }
    }
    let now_ms = crate::model::now_ms();
    let t = shared.tracker();
    let mut page = Page {
        total: t.len(),
        gateways: Vec::new(),
        next: None,
    };
    for (gw, g) in t.iter_from(after.as_deref()) {
        if page.gateways.len() == limit {
            page.next = page.gateways.last().map(|s| s.gateway.clone());
            break;
        }
        let gaps = t.gaps(gw, g);
        let missing = super::tracker::span_len(&gaps);
        if incomplete_only && missing == 0 && g.undecoded.is_empty() {
            continue;
        }
        page.gateways.push(Summary {
            gateway: gw.clone(),
            received: g.received_count,
            last_seq: g.max_seen,
            missing,
            last_manifest_ok: g.last_manifest_ok,
            newest_record_age_s: (g.newest_record_ms > 0)
                .then(|| (now_ms - g.newest_record_ms).max(0) as f64 / 1000.0),
            incomplete_since_ms: g.incomplete_since_ms,
        });
    }
    drop(t);
    Json(page).into_response()
}

async fn one(State(shared): State<Arc<Shared>>, Path(gw): Path<String>) -> Response {
    let t = shared.tracker();
    match t.get(&gw) {
        Some(g) => {
            let report = t.gateway_report(&gw, g, crate::model::now_ms());
            drop(t);
            Json(report).into_response()
        }
        None => {
            drop(t);
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("gateway `{gw}` is not followed by this verifier"),
            )
            .field("gw")
            .into_response()
        }
    }
}
