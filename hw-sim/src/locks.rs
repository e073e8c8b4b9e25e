//! The smart-lock vendor API (DESIGN.md §4 reference provider): an HTTP/1.1 server that
//! behaves like a lock vendor's cloud, at the host:port of `devices.lock_api.url` (port 0
//! works: [`LockApi::address`] reports the real URL). A path in the URL prefixes every route.
//!
//! # Routes
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/locks` | `[{"id", "state", "assigned_to"}]`, in site-file order |
//! | `GET /v1/locks/{id}` | `{"id", "state": "unassigned\|assigned\|overlocked", "assigned_to"}` |
//! | `POST /v1/locks/{id}/assign {"tenant_ref"}` | the lock after the change |
//! | `POST /v1/locks/{id}/unassign`, `/overlock`, `/remove_overlock` | the lock after the change (body ignored) |
//! | `GET /v1/activity[?lock=ID][&since=SEQ][&limit=N]` | accepted changes, oldest first |
//!
//! # Vendor semantics
//!
//! Every change answers 200 with the lock; repeating a change that is already in effect is
//! idempotent (200, nothing logged).
//! - `assign` an unassigned lock: `assigned` to the tenant. Same tenant again: no-op. Another
//!   tenant while assigned: 409 `already_assigned`. An overlocked lock keeps its tenant, so
//!   the same rules hold; an overlocked lock without a tenant refuses: 409 `lock_overlocked`.
//! - `unassign`: `unassigned`, tenant cleared; no-op if unassigned. Refused while overlocked
//!   (409 `lock_overlocked`, "remove the overlock first"), as real vendors do: the overlock
//!   must be lifted on purpose, never as a side effect.
//! - `overlock`: from any state to `overlocked`; the tenant (if any) stays on the lock.
//! - `remove_overlock`: back to `assigned` if the lock still has a tenant, else `unassigned`;
//!   no-op if not overlocked.
//!
//! Errors are `{"error": {"code", "message"}}`: 400 `bad_json` / `invalid_request`,
//! 401 `unauthorized`, 404 `lock_not_found` / `not_found`, 405 `method_not_allowed`,
//! 409 as above, 429 `rate_limited`, 503 `service_unavailable`.
//!
//! # Auth and rate limit
//!
//! `Authorization: Bearer <key>`, compared in constant time. The key is the trimmed content
//! of `api_key_file`; without a file the simulator makes up a key at start and reports it
//! in [`LockApi::address`] (so in the control API's `GET /devices`). A request without the
//! right key never gets past 401. The key has a token bucket of `rate_limit_per_s` requests
//! per second (burst of the same size; 0 = unlimited); an empty bucket answers 429 with
//! `Retry-After` in whole seconds. Refused requests take no token.
//!
//! # Faults (checked on every request, in this order, before auth)
//!
//! - `offline`: the connection is accepted but never answered; when the fault ends (or is
//!   cleared) the connection is closed without an answer. The request is not applied.
//! - `delay`, `slow`: the request is handled `value` ms late (default 1000; both add up).
//! - `http503`: 503, with `Retry-After: value` seconds if a value is given.
//! - `http429`: 429 with `Retry-After: value` seconds (default 1).
//! - `drop` (rate, default 1): the request IS applied, then the connection is closed without
//!   an answer: the lost-reply case a client must resolve by reading the state back.
//! - `corrupt` (rate, default 1): the request is applied, the answer keeps its status but its
//!   body is garbled (cut in half, then bytes that are never valid UTF-8, so never JSON).
//!
//! # Observations
//!
//! `lock_state_changed` `{lock, action, from, to, assigned_to}`; `http_request` `{method,
//! path, status (null: no answer), ms, faults}`; `rate_limited` `{retry_after_s, by: "limit" |
//! "fault"}`; `auth_failed` `{reason}`; `request_held` `{method, path, fault}` when `offline`
//! holds a request; `bad_http` `{peer, error}` when a peer sends something that is not HTTP
//! (the connection is closed, the server keeps serving).

use crate::config::LockApiConfig;
use crate::fault::{FaultKind, Faults};
use crate::observe::{Bus, monotonic_ns};
use crate::{DeviceContext, SimError};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tower::Service;

/// Activity entries kept; older ones are forgotten (the log is for reading back recent changes).
const ACTIVITY_KEPT: usize = 10_000;
/// Longest tenant reference accepted.
const TENANT_REF_MAX: usize = 200;

/// Where a lock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// No tenant; nobody's code opens it.
    Unassigned,
    /// A tenant's code opens it.
    Assigned,
    /// Blocked by the site (non-payment, repossession); keeps its tenant, if any.
    Overlocked,
}

/// One lock, as `GET /v1/locks/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    /// Lock id.
    pub id: String,
    /// `unassigned`, `assigned` or `overlocked`.
    pub state: Status,
    /// Tenant reference while assigned (kept while overlocked).
    pub assigned_to: Option<String>,
}

/// A change a client asks of a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `POST .../assign {"tenant_ref"}`.
    Assign(String),
    /// `POST .../unassign`.
    Unassign,
    /// `POST .../overlock`.
    Overlock,
    /// `POST .../remove_overlock`.
    RemoveOverlock,
    /// Changed at the lock itself (installer, vendor app), not through the API: the
    /// control API's `PUT /locks/{id}`, for drift tests. Always accepted.
    Manual {
        /// The new state.
        state: Status,
        /// The tenant while assigned or overlocked; dropped when `state` is unassigned.
        assigned_to: Option<String>,
    },
}

impl Action {
    /// The route's last segment, also the activity log's `action`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Assign(_) => "assign",
            Action::Unassign => "unassign",
            Action::Overlock => "overlock",
            Action::RemoveOverlock => "remove_overlock",
            Action::Manual { .. } => "manual",
        }
    }
}

/// Why the vendor refuses a change (409).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The lock belongs to this other tenant.
    AlreadyAssigned(String),
    /// The overlock must be removed first.
    Overlocked,
}

impl LockState {
    /// The lock after `action`, or why it is refused. Equal to `self`: already in effect.
    pub fn after(&self, action: &Action) -> Result<LockState, Refusal> {
        let mut next = self.clone();
        match action {
            Action::Assign(tenant) => match (&self.assigned_to, self.state) {
                (Some(current), _) if current == tenant => {}
                (Some(current), _) => return Err(Refusal::AlreadyAssigned(current.clone())),
                (None, Status::Overlocked) => return Err(Refusal::Overlocked),
                (None, _) => {
                    next.state = Status::Assigned;
                    next.assigned_to = Some(tenant.clone());
                }
            },
            Action::Unassign => match self.state {
                Status::Overlocked => return Err(Refusal::Overlocked),
                _ => {
                    next.state = Status::Unassigned;
                    next.assigned_to = None;
                }
            },
            Action::Overlock => next.state = Status::Overlocked,
            Action::Manual { state, assigned_to } => {
                next.state = *state;
                next.assigned_to = match state {
                    Status::Unassigned => None,
                    _ => assigned_to.clone(),
                };
            }
            Action::RemoveOverlock => {
                if self.state == Status::Overlocked {
                    next.state = if self.assigned_to.is_some() {
                        Status::Assigned
                    } else {
                        Status::Unassigned
                    };
                }
            }
        }
        Ok(next)
    }
}

/// One accepted change, as `GET /v1/activity` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityEntry {
    /// Increasing number (for `?since=`).
    pub seq: u64,
    /// Wall-clock time, RFC 3339 UTC.
    pub time: String,
    /// `CLOCK_MONOTONIC` nanoseconds, comparable with observations.
    pub t_ns: u64,
    /// Lock id.
    pub lock: String,
    /// `assign`, `unassign`, `overlock` or `remove_overlock`.
    pub action: String,
    /// The tenant concerned (assigned, unassigned, or still on the lock).
    pub tenant_ref: Option<String>,
    /// State before.
    pub from: Status,
    /// State after.
    pub to: Status,
}

/// Token bucket: `rate` tokens a second, up to `rate` stored.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Locks and their activity log.
struct Site {
    locks: Vec<LockState>,
    index: HashMap<String, usize>,
    activity: VecDeque<ActivityEntry>,
    next_seq: u64,
}

/// State shared by the server, its connections and the control API.
struct Shared {
    id: String,
    url: String,
    key: String,
    key_file: Option<PathBuf>,
    rate: u32,
    bucket: Mutex<TokenBucket>,
    site: Mutex<Site>,
    bus: Bus,
    faults: Faults,
}

/// Locks a mutex even if a panicking holder poisoned it (the data stays consistent: every
/// change is one assignment).
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running lock API. Cheap to clone.
#[derive(Clone)]
pub struct LockApi {
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl LockApi {
    /// Binds the listener and starts serving; every lock starts unassigned.
    pub async fn start(cfg: &LockApiConfig, ctx: &DeviceContext) -> Result<LockApi, SimError> {
        let bad = |m: String| SimError::Config(format!("devices.lock_api: {m}"));
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| bad(format!("url: {e}")))?;
        if url.scheme() != "http" {
            return Err(bad(format!(
                "url: the simulator serves plain http, not {}",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| bad("url: no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let prefix = url.path().trim_end_matches('/').to_owned();

        let (key, key_file) = if cfg.api_key_file.as_os_str().is_empty() {
            let key: String = rand::random::<[u8; 16]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (key, None)
        } else {
            let text = tokio::fs::read_to_string(&cfg.api_key_file)
                .await
                .map_err(SimError::io(format!(
                    "devices.lock_api.api_key_file {}",
                    cfg.api_key_file.display()
                )))?;
            let key = text.trim().to_owned();
            if key.is_empty() {
                return Err(bad(format!(
                    "api_key_file {} is empty",
                    cfg.api_key_file.display()
                )));
            }
            (key, Some(cfg.api_key_file.clone()))
        };

        let mut index = HashMap::new();
        for (i, id) in cfg.locks.iter().enumerate() {
            if index.insert(id.clone(), i).is_some() {
                return Err(bad(format!("locks: {id:?} is listed twice")));
            }
        }
        let locks = cfg
            .locks
            .iter()
            .map(|id| LockState {
                id: id.clone(),
                state: Status::Unassigned,
                assigned_to: None,
            })
            .collect();

        let listener = TcpListener::bind((host.as_str(), port))
            .await
            .map_err(SimError::io(format!("lock API on {host}:{port}")))?;
        let local = listener
            .local_addr()
            .map_err(SimError::io("lock API address"))?;
        let real_url = format!("http://{local}{prefix}");

        let shared = Arc::new(Shared {
            id: cfg.id.clone(),
            url: real_url.clone(),
            key,
            key_file,
            rate: cfg.rate_limit_per_s,
            bucket: Mutex::new(TokenBucket::new(cfg.rate_limit_per_s, Instant::now())),
            site: Mutex::new(Site {
                locks,
                index,
                activity: VecDeque::new(),
                next_seq: 1,
            }),
            bus: ctx.bus.clone(),
            faults: ctx.faults.clone(),
        });
        match &shared.key_file {
            Some(f) => {
                tracing::info!(device = %cfg.id, url = %real_url, key_file = %f.display(), "lock API listening")
            }
            None => {
                tracing::info!(device = %cfg.id, url = %real_url, api_key = %shared.key, "lock API listening (generated key)")
            }
        }

        let (stop_tx, stop) = watch::channel(false);
        let stop_tx = Arc::new(stop_tx);
        // The simulator's shutdown stops this server too.
        let mut sim_shutdown = ctx.shutdown.clone();
        let forward = stop_tx.clone();
        tokio::spawn(async move {
            let _ = sim_shutdown.wait_for(|s| *s).await;
            let _ = forward.send(true);
        });
        let app = router(shared.clone(), &prefix);
        let task = tokio::spawn(serve(listener, shared.clone(), app, stop));
        Ok(LockApi {
            shared,
            stop: stop_tx,
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Where it listens: `{"url", "api_key" (generated keys only), "api_key_file", "locks",
    /// "rate_limit_per_s"}`.
    pub fn address(&self) -> serde_json::Value {
        let s = &self.shared;
        json!({
            "url": s.url,
            "api_key": s.key_file.is_none().then_some(&s.key),
            "api_key_file": s.key_file.as_ref().map(|f| f.display().to_string()),
            "locks": locked(&s.site).locks.len(),
            "rate_limit_per_s": s.rate,
        })
    }

    /// Every lock, in site-file order.
    pub fn locks(&self) -> Vec<LockState> {
        locked(&self.shared.site).locks.clone()
    }

    /// One lock.
    pub fn lock(&self, id: &str) -> Option<LockState> {
        let site = locked(&self.shared.site);
        site.index.get(id).map(|&i| site.locks[i].clone())
    }

    /// Changes a lock at the lock itself, behind any API client's back (a drift for the
    /// gateway's reconciler to find). Shows in the activity log as `manual`.
    pub fn set_manually(
        &self,
        id: &str,
        state: Status,
        assigned_to: Option<String>,
    ) -> Option<LockState> {
        self.shared
            .apply(id, Action::Manual { state, assigned_to })
            .ok()
    }

    /// The activity log (every accepted change still kept), oldest first.
    pub fn activity(&self) -> Vec<ActivityEntry> {
        locked(&self.shared.site).activity.iter().cloned().collect()
    }

    /// Stops the server and closes its connections.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = locked(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Marks a response that must not be sent: the connection closes without an answer.
#[derive(Clone, Copy)]
struct HangUp;

fn hang_up() -> Response {
    let mut r = Response::new(Body::empty());
    r.extensions_mut().insert(HangUp);
    r
}

/// An error answer, `{"error": {"code", "message"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    fn lock_not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "lock_not_found",
            format!("no lock {id:?}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn router(shared: Arc<Shared>, prefix: &str) -> Router {
    let api = Router::new()
        .route("/v1/locks", get(list_locks))
        .route("/v1/locks/{id}", get(get_lock))
        .route("/v1/locks/{id}/assign", post(assign))
        .route(
            "/v1/locks/{id}/unassign",
            post(|s: St, p| change(s, p, Action::Unassign)),
        )
        .route(
            "/v1/locks/{id}/overlock",
            post(|s: St, p| change(s, p, Action::Overlock)),
        )
        .route(
            "/v1/locks/{id}/remove_overlock",
            post(|s: St, p| change(s, p, Action::RemoveOverlock)),
        )
        .route("/v1/activity", get(activity));
    let app = if prefix.is_empty() {
        api
    } else {
        Router::new().nest(prefix, api)
    };
    app.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            front_door,
        ))
        .with_state(shared)
}

/// Accepts connections until stopped; each connection is its own task.
async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(connection(
                    stream,
                    peer,
                    shared.clone(),
                    app.clone(),
                    stop.clone(),
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(device = %shared.id, error = %e, "lock API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves one HTTP/1.1 connection. A response marked [`HangUp`] closes it unanswered.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let hangup = Arc::new(Notify::new());
    let svc = {
        let hangup = hangup.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let mut app = app.clone();
            let hangup = hangup.clone();
            async move {
                let resp = app.call(req).await?;
                if resp.extensions().get::<HangUp>().is_some() {
                    hangup.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => match r {
            Err(e) if e.is_parse() || e.is_parse_too_large() => {
                tracing::warn!(device = %shared.id, %peer, error = %e, "lock API: not HTTP, connection closed");
                shared.bus.emit(&shared.id, "bad_http", json!({"peer": peer.to_string(), "error": e.to_string()}));
            }
            Err(e) => tracing::debug!(device = %shared.id, %peer, error = %e, "lock API connection ended"),
            Ok(()) => {}
        },
        // Dropping the connection closes the socket without an answer.
        _ = hangup.notified() => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

type St = State<Arc<Shared>>;

/// Faults, auth and rate limit in front of every route; reports every request.
async fn front_door(State(s): St, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let mut faults = Vec::new();
    let resp = s.answer(req, next, &mut faults).await;
    let status = resp
        .extensions()
        .get::<HangUp>()
        .is_none()
        .then(|| resp.status().as_u16());
    s.bus.emit(
        &s.id,
        "http_request",
        json!({
            "method": method,
            "path": path,
            "status": status,
            // Microsecond resolution is plenty, and keeps the lines short.
            "ms": (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            "faults": faults,
        }),
    );
    resp
}

impl Shared {
    async fn answer(&self, req: Request, next: Next, faults: &mut Vec<FaultKind>) -> Response {
        let id = self.id.as_str();
        if self.faults.offline(id) {
            faults.push(FaultKind::Offline);
            self.bus.emit(
                id,
                "request_held",
                json!({"method": req.method().as_str(), "path": req.uri().path(), "fault": "offline"}),
            );
            self.wait_out(FaultKind::Offline).await;
            return hang_up();
        }
        let mut late = Duration::ZERO;
        if let Some(d) = self.faults.delay(id) {
            faults.push(FaultKind::Delay);
            late += d;
        }
        if let Some(v) = self.faults.get(id, FaultKind::Slow) {
            faults.push(FaultKind::Slow);
            late += Duration::from_millis(v.unwrap_or(1000.0) as u64);
        }
        if !late.is_zero() {
            tokio::time::sleep(late).await;
        }
        if let Some(v) = self.faults.get(id, FaultKind::Http503) {
            faults.push(FaultKind::Http503);
            let e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the lock service is unavailable",
            );
            return match v {
                Some(v) => e.retry_after(v.ceil() as u64),
                None => e,
            }
            .into_response();
        }
        if let Some(v) = self.faults.get(id, FaultKind::Http429) {
            faults.push(FaultKind::Http429);
            let seconds = v.unwrap_or(1.0).ceil() as u64;
            self.bus.emit(
                id,
                "rate_limited",
                json!({"retry_after_s": seconds, "by": "fault"}),
            );
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests",
            )
            .retry_after(seconds)
            .into_response();
        }
        if let Err(e) = self.authorize(req.headers()) {
            return e.into_response();
        }
        let took = locked(&self.bucket).take(Instant::now());
        if let Err(wait) = took {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            self.bus.emit(
                id,
                "rate_limited",
                json!({"retry_after_s": seconds, "by": "limit"}),
            );
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("over {} requests per second for this key", self.rate),
            )
            .retry_after(seconds)
            .into_response();
        }
        let resp = next.run(req).await;
        if self.faults.drop_now(id) {
            faults.push(FaultKind::Drop);
            return hang_up();
        }
        if self.faults.corrupt_now(id) {
            faults.push(FaultKind::Corrupt);
            return garble(resp).await;
        }
        resp
    }

    /// Returns when the fault is over (expired or cleared), checking every 100 ms at most.
    async fn wait_out(&self, kind: FaultKind) {
        loop {
            let left = self
                .faults
                .active(&self.id)
                .into_iter()
                .find(|f| f.kind == kind)
                .map(|f| f.remaining_ms);
            let Some(left) = left else { return };
            tokio::time::sleep(Duration::from_millis(left.clamp(1, 100))).await;
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let refuse = |reason: &str, message: &str| {
            self.bus
                .emit(&self.id, "auth_failed", json!({"reason": reason}));
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(refuse(
                "missing",
                "missing API key: send Authorization: Bearer <key>",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        let Some(token) = token else {
            return Err(refuse(
                "malformed",
                "malformed Authorization header: send Authorization: Bearer <key>",
            ));
        };
        if bool::from(token.as_bytes().ct_eq(self.key.as_bytes())) {
            Ok(())
        } else {
            Err(refuse("wrong_key", "invalid API key"))
        }
    }

    fn apply(&self, id: &str, action: Action) -> Result<LockState, ApiError> {
        let mut site = locked(&self.site);
        let i = *site
            .index
            .get(id)
            .ok_or_else(|| ApiError::lock_not_found(id))?;
        let before = site.locks[i].clone();
        let after = before.after(&action).map_err(|r| match r {
            Refusal::AlreadyAssigned(t) => ApiError::new(
                StatusCode::CONFLICT,
                "already_assigned",
                format!("lock {id:?} is assigned to {t:?}: unassign it first"),
            ),
            Refusal::Overlocked => ApiError::new(
                StatusCode::CONFLICT,
                "lock_overlocked",
                format!("lock {id:?} is overlocked: remove the overlock first"),
            ),
        })?;
        if after == before {
            return Ok(after);
        }
        site.locks[i] = after.clone();
        let t_ns = monotonic_ns();
        let seq = site.next_seq;
        site.next_seq += 1;
        let tenant_ref = match &action {
            Action::Assign(t) => Some(t.clone()),
            Action::Manual { .. } => after.assigned_to.clone().or(before.assigned_to.clone()),
            _ => before.assigned_to.clone(),
        };
        site.activity.push_back(ActivityEntry {
            seq,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            t_ns,
            lock: id.to_owned(),
            action: action.name().to_owned(),
            tenant_ref,
            from: before.state,
            to: after.state,
        });
        if site.activity.len() > ACTIVITY_KEPT {
            site.activity.pop_front();
        }
        drop(site);
        self.bus.emit(
            &self.id,
            "lock_state_changed",
            json!({
                "lock": id,
                "action": action.name(),
                "from": before.state,
                "to": after.state,
                "assigned_to": after.assigned_to,
            }),
        );
        Ok(after)
    }
}

/// Keeps status and headers, cuts the body in half and appends bytes that are never valid
/// UTF-8, so the answer can never parse as JSON.
async fn garble(resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let mut out = bytes[..bytes.len() / 2].to_vec();
    out.extend_from_slice(&[0xff, 0xfe, 0x00, 0x7e]);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(out))
}

fn lock_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(id)| id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))
}

async fn list_locks(State(s): St) -> axum::Json<Vec<LockState>> {
    axum::Json(locked(&s.site).locks.clone())
}

async fn get_lock(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<LockState>, ApiError> {
    let id = lock_id(p)?;
    let site = locked(&s.site);
    let i = site
        .index
        .get(&id)
        .ok_or_else(|| ApiError::lock_not_found(&id))?;
    Ok(axum::Json(site.locks[*i].clone()))
}

async fn assign(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    body: Bytes,
) -> Result<axum::Json<LockState>, ApiError> {
    #[derive(Deserialize)]
    struct AssignBody {
        tenant_ref: String,
    }
    let id = lock_id(p)?;
    let b: AssignBody = serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("body must be {{\"tenant_ref\": \"...\"}}: {e}"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("body is not JSON: {e}"),
            )
        }
    })?;
    let t = b.tenant_ref.trim();
    if t.is_empty() || t.len() > TENANT_REF_MAX || t.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("tenant_ref must be 1 to {TENANT_REF_MAX} printable characters"),
        ));
    }
    s.apply(&id, Action::Assign(t.to_owned())).map(axum::Json)
}

async fn change(
    State(s): St,
    p: Result<Path<String>, PathRejection>,
    action: Action,
) -> Result<axum::Json<LockState>, ApiError> {
    let id = lock_id(p)?;
    s.apply(&id, action).map(axum::Json)
}

#[derive(Deserialize)]
struct ActivityQuery {
    lock: Option<String>,
    since: Option<u64>,
    limit: Option<usize>,
}

async fn activity(
    State(s): St,
    q: Result<Query<ActivityQuery>, QueryRejection>,
) -> Result<axum::Json<Vec<ActivityEntry>>, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    let site = locked(&s.site);
    if let Some(l) = &q.lock
        && !site.index.contains_key(l)
    {
        return Err(ApiError::lock_not_found(l));
    }
    let out = site
        .activity
        .iter()
        .filter(|a| q.since.is_none_or(|s| a.seq > s))
        .filter(|a| q.lock.as_ref().is_none_or(|l| a.lock == *l))
        .take(q.limit.unwrap_or(usize::MAX))
        .cloned()
        .collect();
    Ok(axum::Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(state: Status, to: Option<&str>) -> LockState {
        LockState {
            id: "u1".into(),
            state,
            assigned_to: to.map(Into::into),
        }
    }

    #[test]
    fn transitions() {
        let a = Action::Assign("t1".into());
        let b = Action::Assign("t2".into());
        let free = lock(Status::Unassigned, None);
        let t1 = lock(Status::Assigned, Some("t1"));
        let over_t1 = lock(Status::Overlocked, Some("t1"));
        let over = lock(Status::Overlocked, None);

        assert_eq!(free.after(&a), Ok(t1.clone()));
        assert_eq!(t1.after(&a), Ok(t1.clone()), "same tenant: idempotent");
        assert_eq!(t1.after(&b), Err(Refusal::AlreadyAssigned("t1".into())));
        assert_eq!(t1.after(&Action::Overlock), Ok(over_t1.clone()));
        assert_eq!(over_t1.after(&Action::Overlock), Ok(over_t1.clone()));
        assert_eq!(over_t1.after(&a), Ok(over_t1.clone()));
        assert_eq!(
            over_t1.after(&b),
            Err(Refusal::AlreadyAssigned("t1".into()))
        );
        assert_eq!(over_t1.after(&Action::Unassign), Err(Refusal::Overlocked));
        assert_eq!(over_t1.after(&Action::RemoveOverlock), Ok(t1.clone()));
        assert_eq!(t1.after(&Action::RemoveOverlock), Ok(t1.clone()));
        assert_eq!(t1.after(&Action::Unassign), Ok(free.clone()));
        assert_eq!(free.after(&Action::Unassign), Ok(free.clone()));
        assert_eq!(free.after(&Action::Overlock), Ok(over.clone()));
        assert_eq!(over.after(&a), Err(Refusal::Overlocked));
        assert_eq!(over.after(&Action::RemoveOverlock), Ok(free));
    }

    #[test]
    fn bucket_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2, t0);
        assert!(b.take(t0).is_ok() && b.take(t0).is_ok());
        let wait = b.take(t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(t0 + Duration::from_millis(499)).is_err());
        assert!(b.take(t0 + Duration::from_millis(1000)).is_ok());
        let mut unlimited = TokenBucket::new(0, t0);
        assert!((0..1000).all(|_| unlimited.take(t0).is_ok()));
    }
}
