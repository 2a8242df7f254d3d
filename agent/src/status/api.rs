//! The JSON endpoints, `/healthz`, `/readyz` and the live event stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value as Json_};

use super::analytics_api::{known_meter, store_failed, unknown_meter};
use super::guard::ApiError;
use super::params::{self, Params};
use super::AppState;
use crate::acquire::MeterStatsSnapshot;
use crate::broker::rfc3339_ms;
use crate::model::{now_ms, Reading, Value};
use crate::query::{self, Window};
use crate::sync::SyncStatus;

type AppRef = State<Arc<AppState>>;

/// Longest window `GET .../readings` accepts.
const MAX_READINGS_WINDOW_MS: i64 = 366 * 86_400_000;
/// Readings answered per request unless `limit` says otherwise, and the most it may say.
const DEFAULT_READINGS_LIMIT: usize = 10_000;
const MAX_READINGS_LIMIT: usize = 100_000;
/// The store is read in slices of this length, so a long window never holds more
/// than one slice plus the answer in memory.
const READ_SLICE_MS: i64 = 15 * 60_000;
/// Window of `GET .../readings` without `start`.
const DEFAULT_WINDOW_MS: i64 = 3_600_000;
/// How often the live stream sends the status document.
const LIVE_STATUS_EVERY: Duration = Duration::from_secs(5);

pub async fn healthz() -> Json<Json_> {
    Json(json!({"status": "alive"}))
}

pub async fn readyz(State(app): AppRef) -> Response {
    if app.shutdown.is_cancelled() {
        return ready_answer(Err("shutting down".into()));
    }
    ready_answer(app.readiness.check())
}

fn ready_answer(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => Json(json!({"ready": true})).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "error": why})),
        )
            .into_response(),
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; GET /api/v1 lists them, /api/v1/openapi.json describes them",
    )
    .field("path")
}

/// `GET /api/v1`: where to start. Names the OpenAPI document and lists every
/// endpoint it describes, with its methods and summary, plus the routes outside
/// `/api/v1`.
pub async fn index(State(app): AppRef) -> Json<Json_> {
    let doc = super::openapi::document();
    let endpoints: Vec<Json_> = doc["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(path, item)| {
            let ops = item.as_object().into_iter().flatten();
            json!({
                "path": path,
                "methods": ops.clone().map(|(m, _)| m.to_uppercase()).collect::<Vec<_>>(),
                "summary": ops
                    .filter_map(|(_, op)| op["summary"].as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        })
        .collect();
    Json(json!({
        "service": "edge-agent",
        "version": app.version,
        "gateway": app.gateway_id,
        "openapi": "/api/v1/openapi.json",
        "endpoints": endpoints,
        "other": [
            {"path": "/", "summary": "Status page (HTML)"},
            {"path": "/healthz", "summary": "Liveness"},
            {"path": "/readyz", "summary": "Readiness (503 with the reason when not ready)"},
            {"path": "/metrics", "summary": "Prometheus metrics"},
        ],
    }))
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here").field("method")
}

fn ts(ms: Option<i64>) -> Json_ {
    ms.map_or(Json_::Null, |ms| Json_::String(rfc3339_ms(ms)))
}

fn meter_status(s: &MeterStatsSnapshot) -> Json_ {
    let failures = s.timeouts + s.exceptions + s.transport_errors + s.decode_errors;
    let polls = s.successes + failures;
    json!({
        "id": s.meter,
        "state": s.state,
        "polls": polls,
        "success_rate": (polls > 0).then(|| s.successes as f64 / polls as f64),
        "last_poll": ts(s.last_poll_ms),
        "last_success": ts(s.last_success_ms),
        "latency_ms": s.last_latency_ms,
        "successes": s.successes,
        "timeouts": s.timeouts,
        "exceptions": s.exceptions,
        "transport_errors": s.transport_errors,
        "decode_errors": s.decode_errors,
        "invalid_values": s.invalid_values,
        "consecutive_failures": s.consecutive_failures,
        "last_error": s.last_error,
        "last_error_at": ts(s.last_error_ms),
        "next_retry": ts(s.next_retry_ms),
    })
}

/// The embedded broker's counters since the start.
fn broker_status(b: &crate::broker::BrokerStats) -> Json_ {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "restarts": b.restarts.load(Relaxed),
        "failures": b.failures.load(Relaxed),
        "panics": b.panics(),
        "refused_publishes": b.refused_publishes.load(Relaxed),
        "refused_client_ids": b.refused_client_ids.load(Relaxed),
    })
}

fn upstream_status(s: &SyncStatus) -> Json_ {
    json!({
        "state": s.state.as_str(),
        "cursor": s.cursor,
        "last_seq": s.last_seq,
        "backlog": s.backlog,
        "oldest_unacked_age_s": s.oldest_unacked_age_ms.map(|ms| ms as f64 / 1000.0),
        "drain_rate": s.drain_rate,
        "delivered": s.delivered,
        "dropped": s.dropped,
        "inflight_batches": s.inflight_batches,
        "connects": s.connects,
        "resent": s.resent,
        "bad_commands": s.bad_commands,
        "manifests": s.manifests,
        "cursor_writes": s.cursor_writes,
        "last_error": s.last_error,
    })
}

/// The status document (also sent on the live stream).
pub(crate) async fn status_document(app: &Arc<AppState>) -> Json_ {
    let store = app.store.clone();
    // Store::stats walks the store's directory: off the runtime threads.
    let stats = tokio::task::spawn_blocking(move || store.stats())
        .await
        .unwrap_or_default();
    let ready = app.readiness.check();
    json!({
        "gateway": app.gateway_id,
        "version": app.version,
        "now": rfc3339_ms(now_ms()),
        "started": rfc3339_ms(app.started_ms),
        "uptime_s": app.started.elapsed().as_secs(),
        "ready": ready.is_ok(),
        "not_ready_because": ready.err(),
        "store": {
            "records": stats.records,
            "first_seq": stats.first_seq,
            "last_seq": stats.last_seq,
            "quarantined": stats.quarantined,
            "disk_bytes": stats.disk_bytes,
            "quota_bytes": app.quota_bytes,
            "live_bytes": stats.live_bytes,
            "dropped": stats.dropped,
            "write_blocked": stats.write_blocked,
            "write_failed": stats.write_failed,
            "held": stats.held,
            "held_dropped": stats.held_dropped,
            "free_bytes": stats.free_bytes,
            "journal": stats.journal,
        },
        "upstream": app.upstream.as_ref().map(|u| upstream_status(&u.borrow())),
        "broker": app.broker.as_ref().map(|b| broker_status(b)),
        "memory": super::memory::MemoryFigures::read(&app.store, stats.held, app.broker.as_deref()).json(),
        "analytics": app.analytics.as_ref().map(|a| json!({
            "held_samples": a.held_samples.load(std::sync::atomic::Ordering::Relaxed),
            "state_bytes": a.state_bytes.load(std::sync::atomic::Ordering::Relaxed),
            "too_late_for_intervals": a.too_late.load(std::sync::atomic::Ordering::Relaxed),
        })),
        "meters": app.meters.iter().map(|m| meter_status(&m.stats.snapshot())).collect::<Vec<_>>(),
    })
}

pub async fn status(State(app): AppRef) -> Json<Json_> {
    Json(status_document(&app).await)
}

fn value_json(v: &Value) -> Json_ {
    let mut out = json!({
        "quantity": v.quantity,
        "unit": v.unit,
        "kind": v.kind,
        "value": v.number_json(),
    });
    if let Some(why) = &v.invalid {
        out["invalid"] = json!(why);
    }
    out
}

fn reading_json(seq: u64, r: &Reading) -> Json_ {
    json!({
        "ts": rfc3339_ms(r.ts_ms),
        "seq": seq,
        "values": r.values.iter().map(value_json).collect::<Vec<_>>(),
    })
}

/// One meter's entry in `GET /api/v1/meters`.
fn meter_document(app: &AppState, id: &str) -> Json_ {
    let source = app.meters.iter().find(|m| m.id == id);
    let latest = app.latest.latest(id);
    let recent: Vec<Json_> = app
        .latest
        .recent(id)
        .iter()
        .map(|(_, r)| {
            let values: serde_json::Map<String, Json_> = r
                .values
                .iter()
                .map(|v| (v.quantity.clone(), v.number_json()))
                .collect();
            json!({"ts": rfc3339_ms(r.ts_ms), "values": values})
        })
        .collect();
    // A discovered device (SunSpec) names itself; otherwise the profile does.
    let identity = source.and_then(|m| m.stats.identity());
    let manufacturer = match &identity {
        Some(i) => Some(i.manufacturer.as_str()),
        None => source.map(|m| m.manufacturer.as_str()),
    };
    let model = match &identity {
        Some(i) => Some(i.model.as_str()),
        None => source.map(|m| m.model.as_str()),
    };
    json!({
        "id": id,
        "manufacturer": manufacturer,
        "model": model,
        "serial": identity.as_ref().map(|i| i.serial.as_str()),
        "polled": source.is_some(),
        "state": source.map(|m| m.stats.state()),
        "latest": latest.map(|(seq, r)| reading_json(seq, &r)),
        "recent": recent,
    })
}

/// Configured meters in config order, then pushed meters seen since the start.
fn meter_ids(app: &AppState) -> Vec<String> {
    let mut ids: Vec<String> = app.meters.iter().map(|m| m.id.clone()).collect();
    for id in app.latest.meter_ids() {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

pub(crate) fn meters_document(app: &AppState) -> Json_ {
    let meters: Vec<Json_> = meter_ids(app)
        .iter()
        .map(|id| meter_document(app, id))
        .collect();
    json!({ "meters": meters })
}

pub async fn meters(State(app): AppRef) -> Json<Json_> {
    Json(meters_document(&app))
}

pub async fn readings(
    State(app): AppRef,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = params::meter_id(path)?;
    let params = Params::new(query, &["start", "end", "limit"])?;
    let window = params.past_window(now_ms(), DEFAULT_WINDOW_MS, MAX_READINGS_WINDOW_MS)?;
    let limit = params.number("limit", 1..=MAX_READINGS_LIMIT, DEFAULT_READINGS_LIMIT)?;
    let turn = params::heavy_turn(&app).await?;
    let body = tokio::task::spawn_blocking(move || {
        let answer = readings_answer(&app, &id, window, limit);
        drop(turn);
        answer
    })
    .await
    .map_err(params::task_failed)??;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The readings answer, written as JSON straight into its bytes: the readings of at
/// most one store slice are in memory besides it, and it stops (with `truncated` and
/// `next_start`) at `limit` readings or `app.max_answer` bytes.
fn readings_answer(
    app: &AppState,
    id: &str,
    window: Window,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let store = &app.store;
    if !known_meter(app, store, id)? {
        return Err(unknown_meter(id));
    }
    let json = |v: &Json_| serde_json::to_vec(v).unwrap_or_default();
    let mut out = Vec::new();
    out.extend_from_slice(b"{\"meter\":");
    out.extend(json(&json!(id)));
    out.extend_from_slice(b",\"start\":");
    out.extend(json(&json!(rfc3339_ms(window.start_ms))));
    out.extend_from_slice(b",\"end\":");
    out.extend(json(&json!(rfc3339_ms(window.end_ms))));
    out.extend_from_slice(b",\"readings\":[");
    // Room for the tail after the last reading.
    let budget = app.max_answer.saturating_sub(256);
    let mut count = 0usize;
    let mut next = None;
    let mut from = window.start_ms;
    'slices: while from < window.end_ms {
        let to = from.saturating_add(READ_SLICE_MS).min(window.end_ms);
        let slice = query::readings(store, id, Window::new(from, to)).map_err(store_failed)?;
        for point in slice {
            let before = out.len();
            if count > 0 {
                out.push(b',');
            }
            let reading = json!({
                "ts": rfc3339_ms(point.ts_ms),
                "seq": point.seq,
                "values": point.values.iter().map(value_json).collect::<Vec<_>>(),
            });
            out.extend(json(&reading));
            // The first reading always goes out, so an answer always moves on.
            if count == limit || (count > 0 && out.len() > budget) {
                out.truncate(before);
                next = Some(point.ts_ms);
                break 'slices;
            }
            count += 1;
        }
        from = to;
    }
    out.extend_from_slice(b"],\"count\":");
    out.extend(json(&json!(count)));
    out.extend_from_slice(b",\"truncated\":");
    out.extend(json(&json!(next.is_some())));
    // Ask again from here for the rest.
    out.extend_from_slice(b",\"next_start\":");
    out.extend(json(&next.map_or(Json_::Null, |ms| json!(rfc3339_ms(ms)))));
    out.push(b'}');
    Ok(out)
}

/// Server-sent events: `meters` (the meters document) whenever a reading was stored,
/// at most once a second, and `status` every few seconds.
pub async fn live(
    State(app): AppRef,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let changes = app.latest.subscribe();
    let state = (app, changes, None::<tokio::time::Instant>, true);
    let stream = futures_util::stream::unfold(
        state,
        |(app, mut changes, mut last_status, first)| async move {
            let status_due =
                last_status.map_or(tokio::time::Instant::now(), |t| t + LIVE_STATUS_EVERY);
            if !first {
                tokio::select! {
                    _ = app.shutdown.cancelled() => return None,
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        // Several commits within a second go out as one update.
                        tokio::time::sleep(Duration::from_millis(1000)).await;
                        changes.borrow_and_update();
                    }
                    _ = tokio::time::sleep_until(status_due) => {
                        last_status = Some(tokio::time::Instant::now());
                        let event = Event::default().event("status").json_data(status_document(&app).await);
                        return Some((Ok(event.unwrap_or_default()), (app, changes, last_status, false)));
                    }
                }
            } else {
                changes.borrow_and_update();
            }
            let event = Event::default()
                .event("meters")
                .json_data(meters_document(&app));
            Some((
                Ok(event.unwrap_or_default()),
                (app, changes, last_status, false),
            ))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
