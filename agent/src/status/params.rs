//! Query parameters and path segments of the JSON API: parsed once, unknown or
//! repeated names refused, every error naming the parameter at fault.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::OwnedSemaphorePermit;

use super::guard::ApiError;
use crate::derive::INTERVAL_MS;
use crate::ingest::parse_rfc3339_ms;
use crate::query::Window;

/// Earliest time a parameter may name: 1970-01-01T00:00:00Z (nothing is stored
/// before the epoch).
pub const MIN_TIME_MS: i64 = 0;
/// Latest time a parameter may name: 9999-12-31T23:59:59.999Z (the last instant
/// RFC 3339 can write).
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// Everything stored: the window of a query without `start` and `end`.
pub fn everything() -> Window {
    Window::new(MIN_TIME_MS, MAX_TIME_MS)
}

/// The `{id}` segment of a path.
pub fn meter_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request("id", format!("bad meter id in the path: {e}")))
}

/// A request's query parameters.
#[derive(Debug)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// The parameters of a request to an endpoint that knows `known`.
    pub fn new(
        query: Result<Query<Vec<(String, String)>>, QueryRejection>,
        known: &[&str],
    ) -> Result<Params, ApiError> {
        let Query(pairs) = query.map_err(|e| {
            ApiError::bad_request("query", format!("the query string does not parse: {e}"))
        })?;
        for (i, (name, _)) in pairs.iter().enumerate() {
            if name.is_empty() {
                return Err(ApiError::bad_request(
                    "query",
                    "a parameter without a name (`=value`)",
                ));
            }
            if !known.contains(&name.as_str()) {
                let known = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                return Err(ApiError::bad_request(
                    name,
                    format!("unknown parameter `{name}` (known: {known})"),
                ));
            }
            if pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(ApiError::bad_request(
                    name,
                    format!("parameter `{name}` is given more than once"),
                ));
            }
        }
        Ok(Params { pairs })
    }

    /// `true` or `false`, `false` when absent.
    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(ApiError::bad_request(
                name,
                format!("`{other}` is not true or false"),
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An RFC 3339 time between [`MIN_TIME_MS`] and [`MAX_TIME_MS`].
    pub fn time(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(None);
        };
        let ms = parse_rfc3339_ms(text).map_err(|why| ApiError::bad_request(name, why))?;
        if !(MIN_TIME_MS..=MAX_TIME_MS).contains(&ms) {
            return Err(ApiError::bad_request(
                name,
                format!("`{text}` is outside 1970-01-01T00:00:00Z .. 9999-12-31T23:59:59.999Z"),
            ));
        }
        Ok(Some(ms))
    }

    /// A whole number in `range`, `default` when absent.
    pub fn number(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<usize>,
        default: usize,
    ) -> Result<usize, ApiError> {
        let Some(text) = self.get(name) else {
            return Ok(default);
        };
        match text.parse::<usize>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(
                name,
                format!(
                    "`{text}` is not a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    /// `[start, end)` looking back: `end` defaults to `now`, `start` to `span_ms`
    /// before `end`. At most `max_span_ms` long.
    pub fn past_window(
        &self,
        now: i64,
        span_ms: i64,
        max_span_ms: i64,
    ) -> Result<Window, ApiError> {
        let end = self
            .time("end")?
            .unwrap_or(now.clamp(MIN_TIME_MS, MAX_TIME_MS));
        let start = self
            .time("start")?
            .unwrap_or(end.saturating_sub(span_ms).max(MIN_TIME_MS));
        checked(Window::new(start, end), max_span_ms)
    }

    /// `[start, end)` looking ahead: `start` defaults to the 15-minute interval that
    /// holds `now` (or `span_ms` before a given `end`), `end` to `span_ms` after
    /// `start`. At most `max_span_ms` long.
    pub fn future_window(
        &self,
        now: i64,
        span_ms: i64,
        max_span_ms: i64,
    ) -> Result<Window, ApiError> {
        let given_end = self.time("end")?;
        let start = match (self.time("start")?, given_end) {
            (Some(start), _) => start,
            (None, Some(end)) => end.saturating_sub(span_ms).max(MIN_TIME_MS),
            (None, None) => {
                now.clamp(MIN_TIME_MS, MAX_TIME_MS).div_euclid(INTERVAL_MS) * INTERVAL_MS
            }
        };
        let end = given_end.unwrap_or(start.saturating_add(span_ms).min(MAX_TIME_MS));
        checked(Window::new(start, end), max_span_ms)
    }

    /// `[start, end)` with either end open: everything stored by default.
    pub fn open_window(&self) -> Result<Window, ApiError> {
        let all = everything();
        let start = self.time("start")?.unwrap_or(all.start_ms);
        let end = self.time("end")?.unwrap_or(all.end_ms);
        checked(Window::new(start, end), i64::MAX)
    }
}

fn checked(window: Window, max_span_ms: i64) -> Result<Window, ApiError> {
    if window.start_ms >= window.end_ms {
        return Err(ApiError::bad_request(
            "start",
            "start must be before end (the window is [start, end))",
        ));
    }
    if window.end_ms - window.start_ms > max_span_ms {
        return Err(ApiError::bad_request(
            "end",
            format!(
                "the window may span at most {} days",
                max_span_ms / 86_400_000
            ),
        ));
    }
    Ok(window)
}

/// Turns a failed blocking task into a JSON 500 (a panic in a query is a bug; the
/// client still gets JSON).
pub fn task_failed(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("the query failed: {e}"),
    )
}

/// Middleware of the endpoints that take no query parameter: any is refused (400
/// naming it), like the unknown parameters of the others.
pub async fn none(request: Request, next: Next) -> Response {
    if request.uri().query().is_some() {
        let query = Query::<Vec<(String, String)>>::try_from_uri(request.uri());
        if let Err(e) = Params::new(query, &[]) {
            return e.into_response();
        }
    }
    next.run(request).await
}

/// A turn for a store query (`http.max_heavy_queries` run at once): waits up to
/// `http.heavy_query_wait`, then 503 with `Retry-After`. Hold the permit until the
/// query's work is done.
pub async fn heavy_turn(app: &super::AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    match tokio::time::timeout(app.heavy_wait, app.heavy.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many store queries at once (http.max_heavy_queries); retry shortly",
        )
        .field("query")
        .retry_after(1)),
    }
}
