//! Checks every request passes before a handler sees it, and the JSON error shape.
//!
//! - `Host` must be `localhost`, an IP literal equal to the address the request came in
//!   on (or the bind address), or a configured host name. A DNS-rebinding page in a
//!   browser reaches the gateway under the attacker's host name, which is refused (421).
//! - Writes (any method but GET/HEAD) need `Authorization: Bearer <token>` when a token
//!   is configured, and have none to be accepted without one on a public address.
//!   Once the server listens on a non-loopback address every request needs the token.
//!   Reads also accept it as HTTP Basic credentials (any user name), so a browser can
//!   open the page; writes do not, because a browser would attach cached Basic
//!   credentials to a cross-site form post.
//! - A body whose declared length is over the limit is refused (413) before any of it
//!   is read; a body without a length is cut off at the limit by the extractors.
//! - Two `Host` headers are refused (421), and so is an absolute-form target
//!   (`GET http://host/...`) whose host is not this gateway.
//! - A path and query longer than [`MAX_URI_BYTES`] is refused (414): no endpoint
//!   needs one, and parsing it would only cost memory.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::ConnInfo;
use crate::status::config::HttpConfig;

/// Longest path plus query string accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// A JSON error answer: `{"error": "...", "field": "..."}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: String,
    /// The request parameter, header or path segment at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header.
    #[serde(skip)]
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn bad_request(field: &str, error: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, error).field(field)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(&self)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The configured rules, resolved once.
#[derive(Debug, Clone)]
pub struct Guard {
    token: Option<String>,
    hostnames: Vec<String>,
    bind_ip: IpAddr,
    /// Every request needs the token (non-loopback listen address).
    token_for_reads: bool,
    pub max_body: usize,
}

impl Guard {
    pub fn new(config: &HttpConfig, bound: SocketAddr) -> Guard {
        Guard {
            token: config.token.clone(),
            hostnames: config
                .hostnames
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            bind_ip: bound.ip(),
            token_for_reads: !bound.ip().is_loopback(),
            max_body: usize::try_from(config.max_body.0).unwrap_or(usize::MAX),
        }
    }

    /// Whether `host` (the `Host` header's value) names this gateway for a request
    /// that arrived on `local`.
    pub fn host_allowed(&self, host: &str, local: IpAddr) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return ip == local || ip == self.bind_ip;
        }
        self.hostnames.contains(&name)
    }

    /// Whether the request carries the token (always true without a token).
    fn authorized(&self, method: &Method, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let Some(value) = authorization.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return constant_time_eq(credentials.as_bytes(), token.as_bytes());
        }
        if scheme.eq_ignore_ascii_case("basic") && is_read(method) {
            return base64_decode(credentials)
                .and_then(|raw| {
                    let colon = raw.iter().position(|&b| b == b':')?;
                    Some(constant_time_eq(&raw[colon + 1..], token.as_bytes()))
                })
                .unwrap_or(false);
        }
        false
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// The host part of a `Host` header value, lower-cased, without the port; `None` when
/// it is not a plausible host.
pub fn host_name(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        let end = rest.find(']')?;
        let after = &rest[end + 1..];
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        &host[..end + 2]
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            Some(_) => return None,
            None => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Standard base64 (with or without padding); `None` when malformed.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The middleware applying the [`Guard`].
pub async fn check(
    State(guard): State<Arc<Guard>>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(refused) = check_host(&guard, &request, conn.local.ip()) {
        return refused.into_response();
    }
    let needs_token =
        guard.token.is_some() && (guard.token_for_reads || !is_read(request.method()));
    if needs_token
        && !guard.authorized(
            request.method(),
            request.headers().get(header::AUTHORIZATION),
        )
    {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid token is required: Authorization: Bearer <http.token>",
        )
        .field("Authorization")
        .into_response();
        let challenge = if is_read(request.method()) {
            "Basic realm=\"edge-agent\", Bearer"
        } else {
            "Bearer"
        };
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
        return response;
    }
    if let Some(pq) = request.uri().path_and_query() {
        if pq.as_str().len() > MAX_URI_BYTES {
            let field = if pq.path().len() > MAX_URI_BYTES {
                "path"
            } else {
                "query"
            };
            return ApiError::new(
                StatusCode::URI_TOO_LONG,
                format!(
                    "the path and query are {} bytes; at most {MAX_URI_BYTES} are accepted",
                    pq.as_str().len()
                ),
            )
            .field(field)
            .into_response();
        }
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > guard.max_body as u64) {
        return too_large(guard.max_body);
    }
    next.run(request).await
}

fn misdirected(error: String) -> ApiError {
    ApiError::new(StatusCode::MISDIRECTED_REQUEST, error).field("Host")
}

/// The request names this gateway: exactly one `Host` header (or none with an
/// absolute-form target), naming it, and an absolute-form target naming it too.
fn check_host(guard: &Guard, request: &Request, local: IpAddr) -> Result<(), ApiError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(misdirected(
            "the request has more than one Host header".into(),
        ));
    }
    let header_host = match first {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| misdirected("the Host header is not a plain host name".into()))?,
        ),
        None => None,
    };
    let authority = request.uri().authority().map(|a| a.as_str());
    if header_host.is_none() && authority.is_none() {
        return Err(misdirected("the Host header is missing".into()));
    }
    for host in header_host.into_iter().chain(authority) {
        if !guard.host_allowed(host, local) {
            return Err(misdirected(format!(
                "host `{host}` is not this gateway; use its address, localhost or a configured http.hostnames entry"
            )));
        }
    }
    Ok(())
}

fn too_large(max: usize) -> Response {
    let mut response = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than http.max_body ({max} bytes)"),
    )
    .field("body")
    .into_response();
    // The rest of the body is not read: the connection cannot be reused.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Turns every error answer that is not JSON yet (axum's extractor rejections, an
/// unknown route or method) into the JSON error shape, keeping its status.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Rejection texts are short; anything longer is cut.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    // A body that does not arrive whole (bad chunked framing, too large, cut off) is
    // the body's fault; anything else axum refuses, the request's.
    let field = if status == StatusCode::PAYLOAD_TOO_LARGE || error.contains("body") {
        "body"
    } else {
        "request"
    };
    let field = Some(field.to_string());
    let mut fixed = ApiError {
        status,
        error,
        field,
        retry_after: None,
    }
    .into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}
