//! The analytics endpoints: a meter's 15-minute series, its energy and forecast in a
//! window, the top meters by energy, the stored clusters, and the alarm events.
//!
//! Every store read runs on the blocking pool. Nothing is derived per request that
//! the analytics stage already stored: series come from the interval index, clusters
//! are the stored summaries, events the stored recent list.

use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value as Json_};

use super::guard::ApiError;
use super::params::{self, Params};
use super::AppState;
use crate::analytics::{self, events};
use crate::broker::rfc3339_ms;
use crate::derive::{DeriveError, ForecastParams, IntervalFlags};
use crate::model::now_ms;
use crate::query::{self, QueryError, Window};
use crate::store::Store;

type AppRef = State<Arc<AppState>>;
type QueryParams = Result<Query<Vec<(String, String)>>, QueryRejection>;
type MeterPath = Result<Path<String>, PathRejection>;

const DAY_MS: i64 = 86_400_000;
/// Window of the series and energy endpoints without `start`/`end`.
const DEFAULT_PAST_MS: i64 = DAY_MS;
/// Longest series window (a quarter: 8,832 intervals).
pub const MAX_SERIES_DAYS: i64 = 92;
/// Window of a forecast without `start`/`end`.
const DEFAULT_FORECAST_MS: i64 = DAY_MS;
/// Longest forecast window (the forecast's own limit).
pub const MAX_FORECAST_DAYS: i64 = 366;
/// Largest `n` of the top endpoint.
pub const MAX_TOP: usize = 1000;
/// `limit` of the events endpoint when none is given (at most the events kept).
pub const DEFAULT_EVENTS: usize = 50;

/// Runs a store query on the blocking pool.
async fn blocking<T: Send + 'static>(
    query: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(query)
        .await
        .map_err(params::task_failed)?
}

pub(super) fn store_failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("reading the store: {e}"),
    )
}

/// A query's failure as an answer: no data for the meter is a 404 naming it.
fn query_failed(meter: &str, e: QueryError) -> ApiError {
    match e {
        QueryError::NoEnergy(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("meter `{meter}` has no energy data (no reading with an energy or power quantity yet)"),
        )
        .field("id"),
        QueryError::Derive(DeriveError::NoHistory) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("meter `{meter}` has no complete 15-minute interval to forecast from"),
        )
        .field("id"),
        QueryError::Derive(e @ DeriveError::SpanTooLong { .. }) => {
            ApiError::bad_request("end", e.to_string())
        }
        QueryError::Derive(e @ DeriveError::EmptyWindow { .. }) => {
            ApiError::bad_request("start", e.to_string())
        }
        e => store_failed(e),
    }
}

/// Whether `id` is a meter of this gateway: configured, seen since the start, or
/// with readings in the store.
pub(super) fn known_meter(app: &AppState, store: &Store, id: &str) -> Result<bool, ApiError> {
    if app.meters.iter().any(|m| m.id == id) || app.latest.latest(id).is_some() {
        return Ok(true);
    }
    Ok(store
        .meters()
        .map_err(store_failed)?
        .iter()
        .any(|m| m == id))
}

pub(super) fn unknown_meter(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no meter `{id}`")).field("id")
}

/// Checks the meter and runs `query` on the blocking pool.
/// Waits for a turn first (`http.max_heavy_queries`), held until the query ends.
async fn meter_query<T: Send + 'static>(
    app: Arc<AppState>,
    id: String,
    query: impl FnOnce(&Store, &str) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let turn = params::heavy_turn(&app).await?;
    blocking(move || {
        let store = app.store.clone();
        if !known_meter(&app, &store, &id)? {
            return Err(unknown_meter(&id));
        }
        let result = query(&store, &id);
        drop(turn);
        result
    })
    .await
}

fn flags_json(flags: &IntervalFlags) -> Json_ {
    json!({"gap": flags.gap, "reset": flags.reset, "estimated": flags.estimated})
}

fn window_json(window: Window) -> (Json_, Json_) {
    (
        json!(rfc3339_ms(window.start_ms)),
        json!(rfc3339_ms(window.end_ms)),
    )
}

/// `GET /api/v1/meters/{id}/series?start=&end=`
pub async fn series(
    State(app): AppRef,
    path: MeterPath,
    query: QueryParams,
) -> Result<Json<Json_>, ApiError> {
    let id = params::meter_id(path)?;
    let params = Params::new(query, &["start", "end"])?;
    let window = params.past_window(now_ms(), DEFAULT_PAST_MS, MAX_SERIES_DAYS * DAY_MS)?;
    let points = meter_query(app, id.clone(), move |store, id| {
        query::series_15m(store, id, window).map_err(|e| query_failed(id, e))
    })
    .await?;
    let intervals: Vec<Json_> = points
        .iter()
        .map(|p| {
            let iv = &p.interval;
            json!({
                "start": rfc3339_ms(iv.start_ms),
                "end": rfc3339_ms(iv.end_ms()),
                "energy_kwh": iv.energy_kwh,
                "coverage": iv.coverage,
                "samples": iv.samples,
                "min_w": iv.min_w,
                "mean_w": iv.mean_w,
                "max_w": iv.max_w,
                "flags": flags_json(&iv.flags),
                "revision": iv.revision,
                "seq": p.seq,
            })
        })
        .collect();
    let (start, end) = window_json(window);
    Ok(Json(json!({
        "meter": id,
        "quantity": points.first().map(|p| p.quantity.as_str()),
        "start": start,
        "end": end,
        "count": intervals.len(),
        "intervals": intervals,
    })))
}

/// `GET /api/v1/meters/{id}/energy?start=&end=`
pub async fn energy(
    State(app): AppRef,
    path: MeterPath,
    query: QueryParams,
) -> Result<Json<Json_>, ApiError> {
    let id = params::meter_id(path)?;
    let params = Params::new(query, &["start", "end"])?;
    let window = params.past_window(now_ms(), DEFAULT_PAST_MS, i64::MAX)?;
    let (energy, quantity) = meter_query(app, id.clone(), move |store, id| {
        let energy = query::energy(store, id, window).map_err(|e| query_failed(id, e))?;
        let info = query::energy_info(store, id).map_err(|e| query_failed(id, e))?;
        Ok((energy, info.quantity))
    })
    .await?;
    let (start, end) = window_json(window);
    Ok(Json(json!({
        "meter": id,
        "quantity": quantity,
        "start": start,
        "end": end,
        "energy_kwh": energy.energy_kwh,
        "coverage": energy.coverage,
        "flags": flags_json(&energy.flags),
    })))
}

/// `GET /api/v1/top?start=&end=&n=`
pub async fn top(State(app): AppRef, query: QueryParams) -> Result<Json<Json_>, ApiError> {
    let params = Params::new(query, &["start", "end", "n"])?;
    let window = params.open_window()?;
    let n = params.number("n", 1..=MAX_TOP, query::DEFAULT_TOP)?;
    let store = app.store.clone();
    let turn = params::heavy_turn(&app).await?;
    let top = blocking(move || {
        let top = query::top_meters(&store, window, n).map_err(store_failed);
        drop(turn);
        top
    })
    .await?;
    let (start, end) = window_json(window);
    Ok(Json(json!({
        "start": start,
        "end": end,
        "n": n,
        "meters": top
            .iter()
            .map(|m| json!({"meter": m.meter, "energy_kwh": m.energy_kwh}))
            .collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/meters/{id}/forecast?start=&end=`
pub async fn forecast(
    State(app): AppRef,
    path: MeterPath,
    query: QueryParams,
) -> Result<Json<Json_>, ApiError> {
    let id = params::meter_id(path)?;
    let params = Params::new(query, &["start", "end"])?;
    let window = params.future_window(now_ms(), DEFAULT_FORECAST_MS, MAX_FORECAST_DAYS * DAY_MS)?;
    let f = meter_query(app, id.clone(), move |store, id| {
        query::forecast(store, id, window, &ForecastParams::default())
            .map_err(|e| query_failed(id, e))
    })
    .await?;
    let (start, end) = window_json(window);
    Ok(Json(json!({
        "meter": id,
        "start": start,
        "end": end,
        "total_kwh": f.total_kwh,
        "trend_kwh_per_day": f.trend_kwh_per_day,
        "complete_days": f.complete_days,
        "backtest": f.backtest.map(|b| json!({
            "day_start": rfc3339_ms(b.day_start_ms),
            "intervals": b.intervals,
            "mape_pct": b.mape_pct,
            "wape_pct": b.wape_pct,
        })),
        "intervals": f.intervals.iter().map(|i| json!({
            "start": rfc3339_ms(i.start_ms),
            "energy_kwh": i.energy_kwh,
            "fraction": i.fraction,
        })).collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/clusters`: the stored summaries, never recomputed here.
pub async fn clusters(State(app): AppRef, query: QueryParams) -> Result<Json<Json_>, ApiError> {
    Params::new(query, &[])?;
    let store = app.store.clone();
    let summaries = blocking(move || query::clusters(&store).map_err(store_failed)).await?;
    let list: Vec<Json_> = summaries
        .iter()
        .map(|c| {
            let mut doc = serde_json::to_value(c).unwrap_or_default();
            if let Some(map) = doc.as_object_mut() {
                // RFC 3339 in place of the stored milliseconds.
                for (ms_key, key) in [
                    ("computed_ms", "computed"),
                    ("first_ms", "first"),
                    ("last_ms", "last"),
                ] {
                    let ts = map.remove(ms_key).and_then(|v| v.as_i64()).map(rfc3339_ms);
                    map.insert(key.into(), json!(ts));
                }
            }
            doc
        })
        .collect();
    Ok(Json(json!({ "clusters": list })))
}

/// `GET /api/v1/events?limit=`: recent alarm events, newest first, and the alarms
/// raised now.
pub async fn events(State(app): AppRef, query: QueryParams) -> Result<Json<Json_>, ApiError> {
    let params = Params::new(query, &["limit"])?;
    let limit = params.number("limit", 1..=events::RECENT_EVENTS, DEFAULT_EVENTS)?;
    let store = app.store.clone();
    let (log, active) = blocking(move || {
        let log = events::event_log(&store).map_err(store_failed)?;
        let active = events::active_alarms(&store, &log).map_err(store_failed)?;
        Ok((log, active))
    })
    .await?;
    let gateway = app.gateway_id.as_str();
    let event_doc = |e: &events::StoredEvent| analytics::event_json(gateway, e.seq, &e.event);
    let recent: Vec<Json_> = log.newest(limit).iter().map(event_doc).collect();
    let active: Vec<Json_> = active
        .iter()
        .map(|a| {
            json!({
                "rule": a.rule,
                "meter": a.meter,
                "warnings": a.warnings,
                "since": a.raised.as_ref().map(|e| rfc3339_ms(e.event.ts_ms)),
                "event": a.raised.as_ref().map(event_doc),
            })
        })
        .collect();
    Ok(Json(json!({
        "active": active,
        "count": recent.len(),
        "kept": events::RECENT_EVENTS,
        "events": recent,
    })))
}

/// `POST /api/v1/meters/{id}/intervals/recompute?start=&end=`: rebuilds the closed
/// 15-minute intervals of a meter in the window from its stored readings and stores
/// (and publishes) a new revision of each one whose figures changed. The window is
/// at most `analytics.max_recompute` long.
pub async fn recompute(
    State(app): AppRef,
    path: MeterPath,
    query: QueryParams,
) -> Result<Json<Json_>, ApiError> {
    let id = params::meter_id(path)?;
    let params = Params::new(query, &["start", "end"])?;
    let Some(analytics) = app.analytics.clone() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the analytics stage is not running",
        ));
    };
    let start = params
        .time("start")?
        .ok_or_else(|| ApiError::bad_request("start", "start is required"))?;
    let end = params
        .time("end")?
        .ok_or_else(|| ApiError::bad_request("end", "end is required"))?;
    if start >= end {
        return Err(ApiError::bad_request(
            "start",
            "start must be before end (the window is [start, end))",
        ));
    }
    let max = analytics.max_recompute_ms();
    if end - start > max {
        return Err(ApiError::bad_request(
            "end",
            format!(
                "the window may span at most {} minutes (analytics.max_recompute)",
                max / 60_000
            ),
        ));
    }
    match analytics.recompute(&id, start, end).await {
        Ok(outcome) => Ok(Json(json!({
            "meter": outcome.meter,
            "start": rfc3339_ms(outcome.start_ms),
            "end": rfc3339_ms(outcome.end_ms),
            "intervals": outcome.intervals,
            "revised": outcome.revised,
        }))),
        Err(e @ analytics::RecomputeError::UnknownMeter(_)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, e.to_string()).field("id"))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            e.to_string(),
        )),
    }
}
