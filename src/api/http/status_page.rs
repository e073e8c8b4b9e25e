//! The read-only status page a technician opens in a browser at `/status`: a static shell
//! with its script and style sheet, embedded in the binary (no build step, nothing fetched
//! from elsewhere). The shell holds no site data, so it needs no token; the script asks
//! for one, keeps it in `sessionStorage` and reads `GET /v1/status?detail=full` and
//! `GET /v1/devices` with it, like `unitgate status` does over the control socket.

use super::AppState;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa_axum::router::OpenApiRouter;

/// The page's HTML shell.
pub const INDEX_HTML: &str = include_str!("status_page/index.html");
/// The page's script.
pub const APP_JS: &str = include_str!("status_page/app.js");
/// The page's style sheet.
pub const STYLE_CSS: &str = include_str!("status_page/style.css");

/// The policy every page file is served with: only this origin's own files, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; frame-ancestors 'none'";

/// `/status`, `/status/app.js` and `/status/style.css` (HTML, not JSON: kept out of the
/// OpenAPI document).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .route(
            "/status",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/status/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/status/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    (headers, body).into_response()
}
