//! The HTTP API (axum): routes, auth, the error shape on every failure, and the server
//! (hyper, with header, body and connection limits against slow or hostile clients).

pub mod auth;
pub mod extract;
pub mod routes;
pub mod status_detail;
pub mod status_page;
pub mod tls;

use crate::api::error::ApiError;
use crate::command::Executor;
use auth::Tokens;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use extract::{ErrorMarker, RequestId, new_request_id};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

/// The shared state behind [`AppState`].
pub struct AppInner {
    /// Runs commands.
    pub executor: Executor,
    /// Configured tokens.
    pub tokens: Tokens,
    /// Devices and their health (`GET /v1/devices`).
    pub devices: crate::reconcile::DeviceRegistry,
    /// The cloud links' state (`GET /v1/status`).
    pub links: crate::cloud::Links,
    /// Inbound webhook sources (`POST /v1/webhooks/{source}`).
    pub webhooks: crate::cloud::webhooks::Webhooks,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// Body limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Every route but the snapshot.
    pub max_body_bytes: usize,
    /// The snapshot.
    pub max_snapshot_bytes: usize,
    /// Time to receive a whole body, every route but the snapshot (408 after).
    pub body_timeout: Duration,
    /// Time to receive the whole snapshot body.
    pub snapshot_timeout: Duration,
}

/// Builds the router with its middleware (no devices).
pub fn router(executor: Executor, tokens: Tokens, limits: Limits) -> Router {
    router_with_devices(executor, tokens, limits, Default::default())
}

/// Builds the router with its middleware, showing `devices` at `GET /v1/devices`.
pub fn router_with_devices(
    executor: Executor,
    tokens: Tokens,
    limits: Limits,
    devices: crate::reconcile::DeviceRegistry,
) -> Router {
    router_with_cloud(executor, tokens, limits, devices, Cloud::default())
}

/// The cloud side the router shows and serves: link states and webhook sources.
#[derive(Debug, Clone, Default)]
pub struct Cloud {
    /// Link states for `GET /v1/status` (their names are the uplink cursors counted as backlog).
    pub links: crate::cloud::Links,
    /// Sources of `POST /v1/webhooks/{source}`.
    pub webhooks: crate::cloud::webhooks::Webhooks,
}

/// Builds the router with devices and the cloud links.
pub fn router_with_cloud(
    executor: Executor,
    tokens: Tokens,
    limits: Limits,
    devices: crate::reconcile::DeviceRegistry,
    cloud: Cloud,
) -> Router {
    let state = AppState(Arc::new(AppInner {
        executor,
        tokens,
        devices,
        links: cloud.links,
        webhooks: cloud.webhooks,
    }));
    let (api, _) = routes::api(limits).split_for_parts();
    api.fallback(|| async { ApiError::new(404, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                405,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::Extension(extract::BodyDeadline(limits.body_timeout)))
        .layer(axum::middleware::from_fn(envelope))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            tracing::error!("a request handler panicked");
            ApiError::internal().into_response()
        }))
        .with_state(state)
}

fn sane_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| s.to_owned())
}

fn generic_error(status: StatusCode) -> ApiError {
    let (code, message) = match status.as_u16() {
        400 => ("bad_request", "the request is malformed"),
        404 => ("not_found", "not found"),
        405 => ("method_not_allowed", "this route does not take that method"),
        408 => ("request_timeout", "the request took too long"),
        413 => ("payload_too_large", "the request body is too large"),
        415 => (
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ),
        422 => ("validation_error", "the request does not fit the schema"),
        429 => ("rate_limited", "too many requests"),
        503 => ("unavailable", "the gateway cannot serve this now; retry"),
        s if s < 500 => ("bad_request", "the request was refused"),
        _ => (
            "internal_error",
            "internal error; the request was not applied",
        ),
    };
    ApiError::new(status.as_u16(), code, message)
}

/// Request id in and out, a span per request, and the error shape on every failure,
/// including the ones axum produces itself.
async fn envelope(mut req: Request, next: Next) -> Response {
    let rid = req
        .headers()
        .get("x-request-id")
        .and_then(sane_request_id)
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(rid.clone()));
    let span = tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %rid, token = tracing::field::Empty);
    let started = std::time::Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    let marker = res.extensions_mut().remove::<ErrorMarker>();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let error = match marker {
        Some(ErrorMarker(e)) => Some(e),
        None if res.status().as_u16() >= 400 && !is_json => Some(generic_error(res.status())),
        None => None,
    };
    if let Some(e) = error {
        let headers = std::mem::take(res.headers_mut());
        let status = res.status();
        res = (status, e.body(&rid)).into_response();
        for (k, v) in headers.iter() {
            if k != header::CONTENT_LENGTH && k != header::CONTENT_TYPE {
                res.headers_mut().insert(k, v.clone());
            }
        }
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        res.headers_mut().insert("x-request-id", v);
    }
    span.in_scope(|| {
        tracing::debug!(
            status = res.status().as_u16(),
            ms = started.elapsed().as_millis() as u64,
            "request"
        )
    });
    res
}

/// How [`serve_with`] treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a client has to send its first request's headers, from accepting the
    /// connection (a silent or trickling client is closed: slowloris).
    pub header_read_timeout: Duration,
    /// Time an HTTP/1.1 keep-alive connection may wait for its next request's headers,
    /// from the end of the previous request. Longer than `header_read_timeout`, so a
    /// pooled client connection is not cut while the client is about to reuse it (hyper
    /// times the idle wait and the next headers as one).
    pub keep_alive_idle: Duration,
    /// Connections served at once; further ones wait in the kernel's listen backlog.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_idle: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// Serves `router` on `listener` (TCP, or [`tls::TlsListener`]) until `shutdown` resolves,
/// then drains in-flight requests; with the default [`ServeOptions`].
pub async fn serve<L>(
    listener: L,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    serve_with(listener, router, ServeOptions::default(), shutdown).await
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, closes
/// connections that have not sent a request yet, lets in-flight requests finish and
/// returns once every connection has ended. Dropping the future drops every connection.
///
/// Unlike `axum::serve`, a client cannot hold a connection without sending a request:
/// headers must arrive within [`ServeOptions::header_read_timeout`] (slowloris).
pub async fn serve_with<L>(
    mut listener: L,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (io, peer) = tokio::select! {
            _ = &mut shutdown => break,
            c = listener.accept() => c,
        };
        connections.spawn(serve_connection(
            io,
            format!("{peer:?}"),
            router.clone(),
            options,
            stop_rx.clone(),
            permit,
        ));
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection, HTTP/1.1 or HTTP/2, until it ends, times out before its first request,
/// or the server stops.
async fn serve_connection<I>(
    io: I,
    peer: String,
    router: Router,
    options: ServeOptions,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let requested = requested.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            requested.store(true, Ordering::Relaxed);
            router.clone().oneshot(req.map(axum::body::Body::new))
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.keep_alive_idle.max(options.header_read_timeout));
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    // hyper times out HTTP/1 headers once it knows the protocol; this also covers the bytes
    // before that (the HTTP/2 preface sniffing) and HTTP/2's first request.
    let header_read_timeout = options.header_read_timeout;
    let first = tokio::time::sleep(header_read_timeout);
    let mut first = std::pin::pin!(first);
    let (mut stopping, mut first_done) = (false, false);
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            // (A guard is only looked at when the select starts: check again when it fires.)
            _ = &mut first, if !first_done => {
                first_done = true;
                if requested.load(Ordering::Relaxed) {
                    continue;
                }
                tracing::debug!(
                    %peer,
                    timeout_s = header_read_timeout.as_secs_f32(),
                    "no request headers in time; connection closed"
                );
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                if !requested.load(Ordering::Relaxed) {
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
