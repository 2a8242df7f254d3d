//! `POST /api/v1/ingest`: push ingest over HTTP.
//!
//! The body is JSON (`Content-Type: application/json`: one series `{meter, unit,
//! kind, points: [{ts, value}]}` or an array of them) or CSV (`text/csv`: lines
//! `meter,timestamp,quantity,value[,unit]`); see [`crate::ingest::wire`] for both.
//! The guard has already required the token (a write) and limited the body size.
//!
//! - 200 `{"stored", "skipped", "corrected", "too_late_for_intervals", "readings",
//!   "first_seq", "last_seq", "points", "series"}` only once the batch is durable; its
//!   readings are then queryable. `too_late_for_intervals` counts stored points older
//!   than `analytics.retention` behind their meter's newest sample: no interval changes
//!   for them (docs/intervals.md says how to recompute).
//! - A point whose meter, quantity and timestamp hold a different value refuses the
//!   batch with 409 (same body as a 422, `reason` `conflict`, each problem naming the
//!   point's value field, the stored and the offered value), unless the series says
//!   `"correct": true` or the request has `?correct=true` (any point may then
//!   replace a stored value: CSV bodies use this). The same value again is skipped.
//! - `?dry_run=true`: parse and check only; 200 `{"dry_run": true, "stored": 0,
//!   "points", "readings", "series": [...]}` with the parsed series (RFC 3339
//!   timestamps), nothing stored.
//!   At most [`MAX_ECHO_POINTS`] points are echoed; `series_truncated` says whether
//!   some were left out.
//! - A rejected batch stores nothing: 400 when the body cannot be read as JSON/CSV,
//!   422 when it can but has bad parts; `{"error", "field", "reason", "problems":
//!   [{"field", "series", "point", "line", "ts", "reason"}], "problems_total",
//!   "truncated"}` lists the first [`crate::ingest::MAX_PROBLEMS`] problems and
//!   counts all. A push for a polled meter (one without `accept_push = true`) is
//!   refused with 422, naming `series[N].meter` (`line[N].meter` for CSV).
//! - 415 for another content type, 503 (with `Retry-After: 30`) when the store cannot
//!   take the batch: a full disk is refused at once, nothing of the batch stored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Json;
use serde_json::json;

use super::guard::ApiError;
use super::params::Params;
use super::AppState;
use crate::ingest::wire::{
    check_csv, check_json, series_json_limited, Checked, Rejection, MAX_ECHO_POINTS,
};
use crate::ingest::{Correct, IngestError, Ingestor, RejectReason, Transport};
use crate::model::now_ms;

/// `Retry-After` of a 503 from the store (a full disk, a failed store).
const RETRY_AFTER_SECONDS: &str = "30";

/// The route's handler, with the agent's ingest service (`None`: answers 503).
pub fn route(ingestor: Option<Arc<Ingestor>>) -> MethodRouter<Arc<AppState>> {
    post(
        move |State(app): State<Arc<AppState>>,
              query: Result<Query<Vec<(String, String)>>, QueryRejection>,
              headers: HeaderMap,
              request: axum::extract::Request| {
            let ingestor = ingestor.clone();
            async move {
                // Unknown and repeated parameters are refused like everywhere else.
                let flags = Params::new(query, &["dry_run", "correct"])
                    .and_then(|p| Ok((p.flag("dry_run")?, p.flag("correct")?)));
                let (dry_run, correct) = match flags {
                    Ok(flags) => flags,
                    Err(e) => return e.into_response(),
                };
                // The body is read only with a turn: at most `http.max_ingest_requests`
                // bodies (of up to `http.max_body`) are in memory at once.
                let turn = match ingest_turn(&app).await {
                    Ok(turn) => turn,
                    Err(e) => return e.into_response(),
                };
                let body = match Bytes::from_request(request, &app).await {
                    Ok(body) => body,
                    Err(rejection) => return rejection.into_response(),
                };
                let answer = ingest(app, ingestor, dry_run, correct, headers, body).await;
                drop(turn);
                answer
            }
        },
    )
}

/// A turn to read and handle a push-ingest body: waits up to
/// `http.heavy_query_wait`, then 503 with `Retry-After`.
async fn ingest_turn(app: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    match tokio::time::timeout(app.heavy_wait, app.ingest_turns.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many ingest requests at once (http.max_ingest_requests); retry shortly",
        )
        .field("body")
        .retry_after(1)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
}

fn format_of(headers: &HeaderMap) -> Result<Format, ApiError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Format::Json),
        "text/csv" => Ok(Format::Csv),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type `{value}` is not accepted; use application/json or text/csv"),
        )
        .field("Content-Type")),
    }
}

async fn ingest(
    app: Arc<AppState>,
    ingestor: Option<Arc<Ingestor>>,
    dry_run: bool,
    correct: bool,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(ingestor) = ingestor else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "push ingest is not available",
        )
        .into_response();
    };
    // Dry runs store nothing and count nothing.
    let count = |reason| {
        if !dry_run {
            ingestor.reject(Transport::Http, reason)
        }
    };
    let format = match format_of(&headers) {
        Ok(f) => f,
        Err(e) => {
            count(RejectReason::ContentType);
            return e.into_response();
        }
    };
    let now = now_ms();
    let checked = match format {
        Format::Json => check_json(&body, None, now, &ingestor.limits),
        Format::Csv => check_csv(&body, now, &ingestor.limits),
    }
    .and_then(|checked| ingestor.check_meters(&checked).map(|()| checked));
    drop(body);
    let mut checked: Checked = match checked {
        Ok(c) => c,
        Err(rejection) => {
            count(rejection.reason);
            return rejected(&rejection);
        }
    };
    let points = checked.points();
    let series = checked.series.len();
    if dry_run {
        let (echo, shown) = series_json_limited(&checked.series, MAX_ECHO_POINTS);
        return Json(json!({
            "dry_run": true,
            "stored": 0,
            "points": points,
            "readings": checked.readings.len(),
            "series": echo,
            "series_truncated": shown < points,
        }))
        .into_response();
    }
    let corrections = if correct {
        Correct::All
    } else {
        checked.correct.clone()
    };
    let result = ingestor
        .store_with(
            Transport::Http,
            std::mem::take(&mut checked.readings),
            &corrections,
        )
        .await;
    match result {
        Ok((outcome, records)) => {
            // The status view learns of the readings before the answer, so a pushed
            // meter is known to `GET /api/v1/meters/{id}/readings` right after it.
            app.latest.add(&records);
            Json(json!({
                "stored": outcome.stored,
                "skipped": outcome.skipped,
                "corrected": outcome.corrected,
                "too_late_for_intervals": outcome.too_late_for_intervals,
                "readings": outcome.readings,
                "first_seq": outcome.first_seq,
                "last_seq": outcome.last_seq,
                "points": points,
                "series": series,
            }))
            .into_response()
        }
        Err(IngestError::Conflict(conflicts)) => rejected(&checked.conflicts(&conflicts)),
        Err(e) => {
            let mut response = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                .field("body")
                .into_response();
            // Nothing of the batch was stored (a full disk is refused up front): the
            // device should push it again, not at once.
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
            response
        }
    }
}

fn rejected(rejection: &Rejection) -> Response {
    let status = match rejection.reason {
        RejectReason::Syntax => StatusCode::BAD_REQUEST,
        RejectReason::Conflict => StatusCode::CONFLICT,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let field = rejection
        .problems
        .first()
        .map_or("body", |p| p.field.as_str());
    (
        status,
        Json(json!({
            "error": rejection.summary(),
            "field": field,
            "reason": rejection.reason.as_str(),
            "problems": rejection.problems,
            "problems_total": rejection.problems_total,
            "truncated": rejection.truncated(),
        })),
    )
        .into_response()
}
