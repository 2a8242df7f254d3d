//! The local HTTP interface: status page (`GET /`), JSON API under `/api/v1`,
//! Prometheus `/metrics`, `/healthz` and `/readyz`.
//!
//! Every request passes the [`guard`] first: its `Host` must name this gateway (DNS
//! rebinding), writes need the bearer token (every request does once the server listens
//! on a non-loopback address), and bodies are size-limited. Errors are JSON
//! `{"error": ..., "field": ...}`. The handlers only read shared handles: the meters'
//! counters, the latest readings (fed from the store's committed broadcast), the
//! upstream sync's status watch, the store (on the blocking pool: series, energy,
//! forecast, top meters, and what the analytics stage stored: clusters, events).
//! [`openapi`] describes every `/api/v1` route.

mod analytics_api;
mod api;
#[cfg(test)]
mod api_tests;
pub mod config;
pub mod guard;
mod ingest_http;
mod latest;
pub mod memory;
mod metrics;
pub mod openapi;
mod page;
mod params;
pub mod server;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, MethodRouter};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::acquire::config::BusConfig;
use crate::acquire::{MeterPlan, MeterStats};
use crate::model::Record;
use crate::service::Liveness;
use crate::status::config::HttpConfig;
use crate::store::Store;
use crate::sync::SyncStatus;

pub use guard::ApiError;
pub use latest::{LatestReadings, RECENT_READINGS};

/// A meter as the status interface shows it.
#[derive(Debug, Clone)]
pub struct MeterSource {
    pub id: String,
    pub manufacturer: String,
    pub model: String,
    pub stats: Arc<MeterStats>,
}

impl MeterSource {
    /// The meters of a plan, in config order.
    pub fn from_plans(plans: &[(BusConfig, Vec<MeterPlan>)]) -> Vec<MeterSource> {
        plans
            .iter()
            .flat_map(|(_, meters)| meters)
            .map(|m| MeterSource {
                id: m.config.id.clone(),
                manufacturer: m.profile.manufacturer.clone(),
                model: m.profile.model.clone(),
                stats: m.stats.clone(),
            })
            .collect()
    }
}

/// What `/readyz` checks: the pipeline's tasks have not ended, and their heartbeats
/// move (the same check that feeds the systemd watchdog).
pub struct Readiness {
    tasks: Vec<(String, AbortHandle)>,
    /// Conditions that must hold, each with what to say while it does not.
    conditions: Vec<(String, watch::Receiver<bool>)>,
    liveness: Mutex<Liveness>,
}

impl Readiness {
    pub fn new(liveness: Liveness) -> Readiness {
        Readiness {
            tasks: Vec::new(),
            conditions: Vec::new(),
            liveness: Mutex::new(liveness),
        }
    }

    /// The agent is not ready while `condition` is false; `why_not` says so.
    pub fn require(&mut self, why_not: impl Into<String>, condition: watch::Receiver<bool>) {
        self.conditions.push((why_not.into(), condition));
    }

    /// Watches a task: the agent is not ready once it has ended.
    pub fn watch_task(&mut self, name: impl Into<String>, task: AbortHandle) {
        self.tasks.push((name.into(), task));
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        if let Some((name, _)) = self.tasks.iter().find(|(_, t)| t.is_finished()) {
            return Err(format!("{name} has stopped"));
        }
        if let Some((why_not, _)) = self.conditions.iter().find(|(_, c)| !*c.borrow()) {
            return Err(why_not.clone());
        }
        self.liveness
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(Instant::now())
    }
}

/// Everything the status interface reads.
pub struct StatusSources {
    pub gateway_id: String,
    pub store: Arc<Store>,
    pub quota_bytes: u64,
    pub meters: Vec<MeterSource>,
    pub readiness: Readiness,
    /// Push ingest (`POST /api/v1/ingest`); `None` answers 503.
    pub ingest: Option<Arc<crate::ingest::Ingestor>>,
    /// The upstream sync's figures; `None` without an `[upstream]` section.
    pub upstream: Option<watch::Receiver<SyncStatus>>,
    /// The embedded broker's counters (refusals, restarts).
    pub broker: Option<Arc<crate::broker::BrokerStats>>,
    /// The analytics stage's figures and recompute path.
    pub analytics: Option<Arc<crate::analytics::AnalyticsShared>>,
}

/// Shared state of the handlers.
pub(crate) struct AppState {
    pub gateway_id: String,
    pub version: &'static str,
    pub started: Instant,
    pub started_ms: i64,
    pub store: Arc<Store>,
    pub quota_bytes: u64,
    pub meters: Vec<MeterSource>,
    pub readiness: Readiness,
    pub upstream: Option<watch::Receiver<SyncStatus>>,
    pub broker: Option<Arc<crate::broker::BrokerStats>>,
    pub analytics: Option<Arc<crate::analytics::AnalyticsShared>>,
    pub latest: Arc<LatestReadings>,
    pub metrics: metrics::Metrics,
    pub shutdown: CancellationToken,
    /// Turns of the store queries (`http.max_heavy_queries`).
    pub heavy: Arc<Semaphore>,
    pub heavy_wait: std::time::Duration,
    /// Largest readings answer in bytes (`http.max_answer`).
    pub max_answer: usize,
    /// Turns of the push-ingest requests (`http.max_ingest_requests`).
    pub ingest_turns: Arc<Semaphore>,
}

/// The running server.
#[derive(Debug)]
pub struct StatusServer {
    /// The address it listens on (the real port when the config said port 0).
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl StatusServer {
    /// Waits until the server has stopped (after `shutdown` was cancelled).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// The local address of a connection; the guard accepts it as a `Host` (it is what a
/// client typed to reach this gateway).
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub local: SocketAddr,
}

/// Binds `config.listen` (or serves `listener`, bound by the caller), starts
/// following `committed` for the latest readings and serves until `shutdown` is
/// cancelled.
pub async fn start(
    config: &HttpConfig,
    listener: Option<std::net::TcpListener>,
    sources: StatusSources,
    committed: broadcast::Receiver<Arc<Vec<Record>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<StatusServer> {
    let listener = match listener {
        Some(listener) => {
            TcpListener::from_std(listener).context("serving the HTTP listener handed over")?
        }
        None => TcpListener::bind(config.listen).await.with_context(|| {
            format!("binding the HTTP server to {} (http.listen)", config.listen)
        })?,
    };
    let local_addr = listener.local_addr()?;
    let latest = Arc::new(LatestReadings::default());
    tokio::spawn(latest::follow(latest.clone(), committed, shutdown.clone()));
    let mut metrics = metrics::Metrics::new(
        sources.store.clone(),
        sources.quota_bytes,
        &sources.meters,
        sources.upstream.clone(),
    );
    if let Some(ingest) = &sources.ingest {
        metrics.register_ingest(ingest.counters.clone());
    }
    if let Some(broker) = &sources.broker {
        metrics.register_broker(broker.clone());
    }
    metrics.register_memory(sources.store.clone(), sources.broker.clone());
    if let Some(analytics) = &sources.analytics {
        metrics.register_analytics(analytics.clone());
    }
    let ingest = sources.ingest;
    let state = Arc::new(AppState {
        gateway_id: sources.gateway_id,
        version: env!("CARGO_PKG_VERSION"),
        started: Instant::now(),
        started_ms: crate::model::now_ms(),
        store: sources.store,
        quota_bytes: sources.quota_bytes,
        meters: sources.meters,
        readiness: sources.readiness,
        upstream: sources.upstream,
        broker: sources.broker,
        analytics: sources.analytics,
        latest,
        metrics,
        shutdown: shutdown.clone(),
        heavy: Arc::new(Semaphore::new(config.max_heavy_queries.max(1))),
        heavy_wait: config.heavy_query_wait.0,
        max_answer: usize::try_from(config.max_answer.0).unwrap_or(usize::MAX),
        ingest_turns: Arc::new(Semaphore::new(config.max_ingest_requests.max(1))),
    });
    let app = router(state, guard::Guard::new(config, local_addr), ingest);
    let limits = server::Limits::new(config);
    let task = tokio::spawn(server::serve(listener, app, limits, shutdown.clone()));
    tracing::info!(listen = %local_addr, "HTTP status interface listening");
    Ok(StatusServer { local_addr, task })
}

/// The `/metrics` text with the ingest and analytics collectors (for tests).
#[cfg(test)]
pub(crate) fn metrics_text(
    store: Arc<Store>,
    ingest: Arc<crate::ingest::IngestCounters>,
    analytics: Arc<crate::analytics::AnalyticsShared>,
) -> String {
    let mut m = metrics::Metrics::new(store, 0, &[], None);
    m.register_ingest(ingest);
    m.register_analytics(analytics);
    m.encode().unwrap_or_default()
}

/// Every route under `/api/v1`. The OpenAPI document describes exactly these (a
/// test holds them to each other).
fn api_routes(
    ingest: Option<Arc<crate::ingest::Ingestor>>,
) -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/api/v1/status", no_params(get(api::status))),
        ("/api/v1/meters", no_params(get(api::meters))),
        ("/api/v1/meters/{id}/readings", get(api::readings)),
        ("/api/v1/meters/{id}/series", get(analytics_api::series)),
        ("/api/v1/meters/{id}/energy", get(analytics_api::energy)),
        ("/api/v1/meters/{id}/forecast", get(analytics_api::forecast)),
        (
            "/api/v1/meters/{id}/intervals/recompute",
            axum::routing::post(analytics_api::recompute),
        ),
        ("/api/v1/top", get(analytics_api::top)),
        ("/api/v1/clusters", get(analytics_api::clusters)),
        ("/api/v1/events", get(analytics_api::events)),
        ("/api/v1/live", no_params(get(api::live))),
        ("/api/v1/ingest", ingest_http::route(ingest)),
        ("/api/v1/openapi.json", no_params(get(openapi::serve))),
    ]
}

/// A route that takes no query parameter: any is refused (400 naming it).
fn no_params(route: MethodRouter<Arc<AppState>>) -> MethodRouter<Arc<AppState>> {
    route.route_layer(axum::middleware::from_fn(params::none))
}

fn router(
    state: Arc<AppState>,
    guard: guard::Guard,
    ingest: Option<Arc<crate::ingest::Ingestor>>,
) -> Router {
    let max_body = guard.max_body;
    let guard = Arc::new(guard);
    let mut router = Router::new()
        .route("/", no_params(get(page::page)))
        .route("/healthz", no_params(get(api::healthz)))
        .route("/readyz", no_params(get(api::readyz)))
        .route("/metrics", no_params(get(metrics::metrics)))
        // The API's front door, with and without the slash a person may type.
        .route("/api/v1", no_params(get(api::index)))
        .route("/api/v1/", no_params(get(api::index)));
    for (path, route) in api_routes(ingest) {
        router = router.route(path, route);
    }
    router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
        // Extractors that read a body stop at the limit; the guard refuses a declared
        // length beyond it before any of the body is read.
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(guard, guard::check))
        .layer(axum::middleware::from_fn(guard::json_errors))
}
