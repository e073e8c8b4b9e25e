//! The control API (DESIGN.md §5): technicians and tests press keys, open doors, read
//! device state, inject faults and stream observations. Errors are
//! `{"error": {"code", "message"}}`.

use crate::fault::FaultKind;
use crate::{Registry, SimError};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

type St = State<Arc<Registry>>;

/// An error answer.
pub struct ControlError(StatusCode, &'static str, String);

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({"error": {"code": self.1, "message": self.2}})),
        )
            .into_response()
    }
}

impl From<SimError> for ControlError {
    fn from(e: SimError) -> Self {
        match e {
            SimError::NotFound(m) => ControlError(StatusCode::NOT_FOUND, "not_found", m),
            SimError::BadRequest(m) => ControlError(StatusCode::BAD_REQUEST, "bad_request", m),
            e => ControlError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            ),
        }
    }
}

fn not_found(kind: &str, id: &str) -> ControlError {
    ControlError(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no {kind} {id:?}"),
    )
}

/// JSON body whose rejection is our error shape.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ControlError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ControlError(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ControlError(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("bad JSON body: {e}"),
            )
        })
    }
}

/// The control API router.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/", get(crate::web::index))
        .route("/app.js", get(crate::web::app_js))
        .route("/style.css", get(crate::web::style_css))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/devices", get(devices))
        .route("/keypads/{id}", get(keypad))
        .route("/keypads/{id}/keys", post(press))
        .route("/relays/{id}", get(relay))
        .route("/relays/{id}/inputs/{n}", post(set_input))
        .route("/locks", get(locks))
        .route("/locks/{id}", get(lock).put(set_lock))
        .route(
            "/faults",
            post(set_fault).delete(clear_faults).get(list_faults),
        )
        .route("/units", get(units))
        .route("/events", get(events))
        .fallback(|| async {
            ControlError(StatusCode::NOT_FOUND, "not_found", "no such route".into())
        })
        .with_state(registry)
}

async fn devices(State(r): St) -> Json<serde_json::Value> {
    let mut out = Vec::new();
    for k in r.keypads.values() {
        out.push(json!({"id": k.id(), "kind": "keypad", "address": k.address(), "faults": r.faults.active(k.id())}));
    }
    for b in r.relays.values() {
        out.push(json!({"id": b.id(), "kind": "relay_board", "address": b.address(), "faults": r.faults.active(b.id())}));
    }
    if let Some(l) = &r.locks {
        out.push(json!({"id": l.id(), "kind": "lock_api", "address": l.address(), "faults": r.faults.active(l.id())}));
    }
    Json(json!(out))
}

async fn keypad(State(r): St, Path(id): Path<String>) -> Result<Response, ControlError> {
    let k = r.keypads.get(&id).ok_or_else(|| not_found("keypad", &id))?;
    Ok(Json(k.state()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    keys: String,
}

async fn press(
    State(r): St,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<Keys>,
) -> Result<Response, ControlError> {
    let k = r.keypads.get(&id).ok_or_else(|| not_found("keypad", &id))?;
    k.press(&b.keys).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"keypad": id, "keys": b.keys})),
    )
        .into_response())
}

async fn relay(State(r): St, Path(id): Path<String>) -> Result<Response, ControlError> {
    let b = r
        .relays
        .get(&id)
        .ok_or_else(|| not_found("relay board", &id))?;
    Ok(Json(b.state()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputState {
    on: bool,
}

async fn set_input(
    State(r): St,
    Path((id, n)): Path<(String, String)>,
    JsonBody(b): JsonBody<InputState>,
) -> Result<Response, ControlError> {
    let board = r
        .relays
        .get(&id)
        .ok_or_else(|| not_found("relay board", &id))?;
    let n: u16 = n.parse().map_err(|_| {
        ControlError(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("input {n:?} is not a number"),
        )
    })?;
    board.set_input(n, b.on)?;
    Ok(Json(board.state()).into_response())
}

async fn locks(State(r): St) -> Result<Response, ControlError> {
    let l = r
        .locks
        .as_ref()
        .ok_or_else(|| not_found("lock API", "locks"))?;
    Ok(Json(l.locks()).into_response())
}

async fn lock(State(r): St, Path(id): Path<String>) -> Result<Response, ControlError> {
    let l = r
        .locks
        .as_ref()
        .ok_or_else(|| not_found("lock API", "locks"))?;
    let lock = l.lock(&id).ok_or_else(|| not_found("lock", &id))?;
    Ok(Json(lock).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManualLock {
    state: crate::locks::Status,
    #[serde(default)]
    assigned_to: Option<String>,
}

/// Changes a lock as if someone did it at the lock: the gateway is not told.
async fn set_lock(
    State(r): St,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<ManualLock>,
) -> Result<Response, ControlError> {
    let l = r
        .locks
        .as_ref()
        .ok_or_else(|| not_found("lock API", "locks"))?;
    let lock = l
        .set_manually(&id, b.state, b.assigned_to)
        .ok_or_else(|| not_found("lock", &id))?;
    Ok(Json(lock).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    device: String,
    kind: FaultKind,
    #[serde(default)]
    value: Option<f64>,
    duration_ms: u64,
}

/// `GET /units`: each `[[units]]` entry with its bindings and their state now:
/// `lock_state` (lock API), `overlock_on` (coil), `door_open` (input); null when unbound.
async fn units(State(r): St) -> Json<serde_json::Value> {
    let out: Vec<_> = r
        .units
        .iter()
        .map(|u| {
            let lock_state = u
                .lock
                .as_ref()
                .and_then(|id| r.locks.as_ref()?.lock(id))
                .map(|l| l.state);
            let overlock_on = u.overlock.as_ref().and_then(|o| {
                let s = r.relays.get(&o.board)?.state();
                s.coils.get(usize::from(o.coil)).copied()
            });
            let door_open = u.door.as_ref().and_then(|d| {
                let s = r.relays.get(&d.board)?.state();
                s.inputs.get(usize::from(d.input)).copied()
            });
            json!({
                "name": u.name,
                "lock": u.lock,
                "overlock": u.overlock,
                "door": u.door,
                "lock_state": lock_state,
                "overlock_on": overlock_on,
                "door_open": door_open,
            })
        })
        .collect();
    Json(json!(out))
}

fn device_exists(r: &Registry, id: &str) -> bool {
    r.keypads.contains_key(id)
        || r.relays.contains_key(id)
        || r.locks.as_ref().is_some_and(|l| l.id() == id)
}

async fn set_fault(
    State(r): St,
    JsonBody(f): JsonBody<FaultRequest>,
) -> Result<Response, ControlError> {
    if !device_exists(&r, &f.device) {
        return Err(not_found("device", &f.device));
    }
    if f.value.is_some_and(|v| !v.is_finite() || v < 0.0) {
        return Err(ControlError(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "value must be a number ≥ 0".into(),
        ));
    }
    if f.duration_ms == 0 || f.duration_ms > 24 * 3600 * 1000 {
        return Err(ControlError(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "duration_ms must be 1 to 86400000".into(),
        ));
    }
    r.faults.set(
        &f.device,
        f.kind,
        f.value,
        Duration::from_millis(f.duration_ms),
    );
    r.bus.emit(
        &f.device,
        "fault_set",
        json!({"kind": f.kind, "value": f.value, "duration_ms": f.duration_ms}),
    );
    Ok((
        StatusCode::CREATED,
        Json(json!({"device": f.device, "faults": r.faults.active(&f.device)})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceFilter {
    device: Option<String>,
}

async fn clear_faults(
    State(r): St,
    Query(q): Query<DeviceFilter>,
) -> Result<Response, ControlError> {
    if let Some(d) = &q.device
        && !device_exists(&r, d)
    {
        return Err(not_found("device", d));
    }
    let n = r.faults.clear(q.device.as_deref());
    r.bus.emit(
        q.device.as_deref().unwrap_or("*"),
        "fault_cleared",
        json!({"cleared": n}),
    );
    Ok(Json(json!({"cleared": n})).into_response())
}

async fn list_faults(State(r): St) -> Json<serde_json::Value> {
    let mut ids: Vec<String> = r.keypads.keys().chain(r.relays.keys()).cloned().collect();
    if let Some(l) = &r.locks {
        ids.push(l.id().to_owned());
    }
    let out: Vec<_> = ids
        .iter()
        .filter_map(|id| {
            let f = r.faults.active(id);
            (!f.is_empty()).then(|| json!({"device": id, "faults": f}))
        })
        .collect();
    Json(json!(out))
}

/// How often an SSE stream sends a comment so proxies and browsers keep it open.
const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// NDJSON stream of observations from now on (`?device=` filters), or Server-Sent Events
/// (`data: <json>`) when the request accepts `text/event-stream`. The first item
/// (`subscribed`) says the subscription is live; the stream ends when the simulator stops.
async fn events(
    State(r): St,
    Query(q): Query<DeviceFilter>,
    headers: axum::http::HeaderMap,
) -> Response {
    let sse = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    let mut rx = r.bus.subscribe();
    let mut shutdown = r.shutdown.clone();
    let (tx, lines) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::convert::Infallible>>(256);
    let line = move |o: &crate::observe::Observation| {
        let json = serde_json::to_vec(o).unwrap_or_default();
        if sse {
            let mut v = b"data: ".to_vec();
            v.extend_from_slice(&json);
            v.extend_from_slice(b"\n\n");
            v
        } else {
            let mut v = json;
            v.push(b'\n');
            v
        }
    };
    let hello = crate::observe::Observation {
        t_ns: crate::observe::monotonic_ns(),
        device: "*".into(),
        kind: "subscribed".into(),
        data: json!({}),
    };
    let _ = tx.try_send(Ok(line(&hello)));
    tokio::spawn(async move {
        let mut keepalive = tokio::time::interval(SSE_KEEPALIVE);
        keepalive.tick().await;
        loop {
            let o = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
                _ = keepalive.tick(), if sse => None,
                o = rx.recv() => Some(o),
            };
            let Some(o) = o else {
                if tx.send(Ok(b": keepalive\n\n".to_vec())).await.is_err() {
                    return;
                }
                continue;
            };
            let o = match o {
                Ok(o) => o,
                // A slow reader lost some observations: say so in the stream.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    crate::observe::Observation {
                        t_ns: crate::observe::monotonic_ns(),
                        device: "*".into(),
                        kind: "lagged".into(),
                        data: json!({"missed": n}),
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if q.device.as_ref().is_some_and(|d| *d != o.device) {
                continue;
            }
            if tx.send(Ok(line(&o))).await.is_err() {
                return;
            }
        }
    });
    (
        [
            (
                header::CONTENT_TYPE,
                if sse {
                    "text/event-stream"
                } else {
                    "application/x-ndjson"
                },
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(lines)),
    )
        .into_response()
}
