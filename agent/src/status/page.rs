//! `GET /`: the status page, one self-contained HTML document (inline CSS and script,
//! no external fonts, scripts or CDNs: a gateway is often offline). It loads
//! `/api/v1/status` and `/api/v1/meters`, then follows `/api/v1/live` (server-sent
//! events) and updates in place.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("page.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing on the page comes from elsewhere; say so to the browser.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}
