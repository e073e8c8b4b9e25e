//! MQTT commands run through the HTTP router in-process, so both transports share one
//! code path (auth, parsing, idempotency, errors): `cmd/{operation}` with
//! `{"request_id", ...}` becomes the matching `http::Request` (path ids taken from the
//! payload, `request_id` as `Idempotency-Key`), dispatched with an [`InternalCaller`] that
//! no client on the wire can set. The answer becomes `{"request_id", "ok", "result"|"error"}`.

use super::mqtt_chunks::{Added, Assembler, Chunk, ReplyTo};
use super::signing::{CloudClients, SignatureError};
use crate::api::error::ApiError;
use crate::api::http::auth::{InternalCaller, Scope};
use crate::domain::FieldError;
use crate::store::Store;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, header};
use serde_json::{Map, Value};
use std::sync::Arc;
use tower::ServiceExt;

/// A command as it arrived from the broker.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The topic, `unitgate/v1/{site}/cmd/{operation}`.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// MQTT 5 response topic, if the sender gave one.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data, echoed on the reply.
    pub correlation: Option<Bytes>,
}

/// A message for the broker (QoS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retained.
    pub retain: bool,
    /// MQTT 5 correlation data (replies on a response topic).
    pub correlation: Option<Bytes>,
}

/// A chunked snapshot still incomplete this long after its first chunk is dropped.
pub const CHUNK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The total size limit of a chunked snapshot unless [`Dispatcher::with_max_snapshot`] set one.
const DEFAULT_MAX_SNAPSHOT: usize = 16 << 20;

/// Names a received command on the link: the connection it arrived on and its arrival
/// number, so its acknowledgement is sent in order and never on another connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Receipt {
    /// The connection's number.
    pub conn: u64,
    /// The arrival number.
    pub idx: u64,
}

/// What handling a command gave: the reply to send, if any, and the received commands that
/// may be acknowledged once it is handed over.
#[derive(Debug)]
pub struct Done {
    /// The reply.
    pub reply: Option<Outbound>,
    /// The commands it completes.
    pub receipts: Vec<Receipt>,
}

impl Done {
    /// No reply; `receipt` is done.
    pub fn nothing(receipt: Receipt) -> Self {
        Done {
            reply: None,
            receipts: vec![receipt],
        }
    }
}

/// How a route is reached for an operation.
struct Route {
    method: Method,
    /// Path template; `{}` is replaced by the id.
    path: &'static str,
    /// The payload field holding the path id, if any.
    id: Option<&'static str>,
}

const fn route(method: Method, path: &'static str, id: Option<&'static str>) -> Route {
    Route { method, path, id }
}

/// The route of each operation (DESIGN.md §3).
fn route_of(operation: &str) -> Option<Route> {
    const UNIT: Option<&str> = Some("unit_id");
    const CONTACT: Option<&str> = Some("contact_id");
    const ID: Option<&str> = Some("id");
    Some(match operation {
        "reserve" => route(Method::POST, "/v1/units/{}/reserve", UNIT),
        "grant_access" => route(Method::POST, "/v1/units/{}/grant_access", UNIT),
        "deallocate" => route(Method::POST, "/v1/units/{}/deallocate", UNIT),
        "set_status" => route(Method::POST, "/v1/units/{}/set_status", UNIT),
        "overlock" => route(Method::POST, "/v1/contacts/{}/overlock", CONTACT),
        "remove_overlock" => route(Method::POST, "/v1/contacts/{}/remove_overlock", CONTACT),
        "payment_failed" => route(Method::POST, "/v1/contacts/{}/payment_failed", CONTACT),
        "upsert_contact" => route(Method::PUT, "/v1/contacts/{}", ID),
        "upsert_tenancy" => route(Method::PUT, "/v1/tenancies/{}", ID),
        "upsert_unit_type" => route(Method::PUT, "/v1/unit_types/{}", ID),
        "create_units" => route(Method::POST, "/v1/units", None),
        "bulk_create_units" => route(Method::POST, "/v1/units/bulk_create", None),
        "update_unit" => route(Method::PATCH, "/v1/units/{}", UNIT),
        "bulk_update_units" => route(Method::PUT, "/v1/units/bulk_update", None),
        "snapshot" => route(Method::PUT, "/v1/sync/snapshot", None),
        "get_unit" => route(Method::GET, "/v1/units/{}", UNIT),
        "list_units" => route(Method::GET, "/v1/units", None),
        "list_available_units" => route(Method::GET, "/v1/units/available", None),
        "events" => route(Method::GET, "/v1/events", None),
        "devices" => route(Method::GET, "/v1/devices", None),
        "status" => route(Method::GET, "/v1/status", None),
        _ => return None,
    })
}

/// Every operation the command topics accept.
pub const OPERATIONS: &[&str] = &[
    "reserve",
    "grant_access",
    "deallocate",
    "set_status",
    "overlock",
    "remove_overlock",
    "payment_failed",
    "upsert_contact",
    "upsert_tenancy",
    "upsert_unit_type",
    "create_units",
    "bulk_create_units",
    "update_unit",
    "bulk_update_units",
    "snapshot",
    "get_unit",
    "list_units",
    "list_available_units",
    "events",
    "devices",
    "status",
];

/// Percent-encodes a path segment (everything but RFC 3986 unreserved characters).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `s` can be a topic level: no wildcards, no separators, not empty.
fn topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.contains(['/', '+', '#', '\0'])
        && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Turns MQTT commands into router calls and their answers into replies.
#[derive(Clone)]
pub struct Dispatcher {
    router: Router,
    site_id: String,
    store: Store,
    clients: Option<Arc<CloudClients>>,
    max_payload: usize,
    chunks: Arc<Assembler>,
}

impl Dispatcher {
    /// A dispatcher for `site_id` calling `router`; `clients` = `Some` for signed commands.
    pub fn new(
        router: Router,
        site_id: &str,
        store: Store,
        clients: Option<Arc<CloudClients>>,
        max_payload: usize,
    ) -> Self {
        Dispatcher {
            router,
            site_id: site_id.to_owned(),
            store,
            clients,
            max_payload,
            chunks: Arc::new(Assembler::new(DEFAULT_MAX_SNAPSHOT, CHUNK_TIMEOUT)),
        }
    }

    /// Chunked snapshots are refused above `bytes` in total (`api.max_snapshot_bytes`).
    pub fn with_max_snapshot(mut self, bytes: usize) -> Self {
        self.chunks = Arc::new(Assembler::new(bytes, CHUNK_TIMEOUT));
        self
    }

    /// The reply topic of a request id (MQTT 3.1.1, or MQTT 5 without a response topic).
    pub fn reply_topic(&self, request_id: &str) -> String {
        format!("unitgate/v1/{}/reply/{request_id}", self.site_id)
    }

    /// Runs one command received as `receipt`: its reply (none when it cannot be answered:
    /// no reply address, logged) and the receipts it completes (none while a chunked
    /// snapshot is still being assembled; all of its chunks once it ran).
    pub async fn handle(&self, cmd: Inbound, receipt: Receipt) -> Done {
        let prefix = format!("unitgate/v1/{}/cmd/", self.site_id);
        let operation = cmd.topic.strip_prefix(&prefix).unwrap_or("").to_owned();
        // The request id is looked for before anything is judged, so even a refused
        // command is answered where the sender listens. An unsigned command sent to a
        // gateway that wants signed ones is answered by its own request id too (refused).
        let parsed: Option<Value> = serde_json::from_slice(&cmd.payload).ok();
        let request = match (&self.clients, &parsed) {
            (Some(_), Some(v)) => v.get("request").or(Some(v)),
            (None, Some(v)) => Some(v),
            _ => None,
        };
        let request_id = request
            .and_then(|r| r.get("request_id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let to = ReplyTo::of(&cmd, "");
        let outcome = match self.authenticate(&operation, &cmd.payload, parsed).await {
            Err(e) => Err(e),
            Ok((request, caller)) => {
                if operation == "snapshot"
                    && let Some(chunk) = Chunk::parse(&request)
                {
                    return match chunk {
                        Ok(c) => self.chunk(c, &cmd, &caller, receipt).await,
                        Err(e) => Done {
                            reply: self.reply(&to, request_id, &operation, Err(e)),
                            receipts: vec![receipt],
                        },
                    };
                }
                self.execute(&operation, request, &caller).await
            }
        };
        Done {
            reply: self.reply(&to, request_id, &operation, outcome),
            receipts: vec![receipt],
        }
    }

    /// Adds a chunk of a snapshot; runs the snapshot when it was the last one.
    async fn chunk(&self, c: Chunk, cmd: &Inbound, caller: &str, receipt: Receipt) -> Done {
        let rid = c.request_id.clone();
        match self.chunks.add(
            c,
            receipt,
            ReplyTo::of(cmd, caller),
            std::time::Instant::now(),
        ) {
            Added::Stored => Done {
                reply: None,
                receipts: Vec::new(),
            },
            Added::Ignored => Done::nothing(receipt),
            Added::Refused { error, receipts } => Done {
                reply: self.reply(&ReplyTo::of(cmd, caller), Some(rid), "snapshot", Err(error)),
                receipts,
            },
            Added::Complete {
                body,
                reply_to,
                receipts,
            } => {
                let outcome = match serde_json::from_str::<Value>(&body) {
                    Ok(Value::Object(mut m)) => {
                        m.insert("request_id".into(), Value::String(rid.clone()));
                        self.execute("snapshot", Value::Object(m), &reply_to.caller)
                            .await
                    }
                    Ok(_) => Err(ApiError::validation(vec![FieldError::new(
                        "data",
                        "the joined chunks must be a JSON object",
                    )])),
                    Err(_) => Err(ApiError::new(
                        400,
                        "malformed_json",
                        "the joined chunks are not valid JSON",
                    )),
                };
                Done {
                    reply: self.reply(&reply_to, Some(rid), "snapshot", outcome),
                    receipts,
                }
            }
        }
    }

    /// Gives up on chunked snapshots incomplete for longer than the timeout: their chunks
    /// are done, and the sender is told (unless the snapshot already ran).
    pub fn expire_chunks(&self) -> Vec<Done> {
        self.chunks
            .expire(std::time::Instant::now())
            .into_iter()
            .map(|x| {
                tracing::warn!(request_id = %x.request_id, got = x.got.0, of = x.got.1, "chunked MQTT snapshot incomplete: dropped");
                let reply = x.reply_to.and_then(|to| {
                    let e = ApiError::new(
                        400,
                        "bad_request",
                        format!(
                            "only {} of {} chunks arrived in time; send the snapshot again",
                            x.got.0, x.got.1
                        ),
                    );
                    self.reply(&to, Some(x.request_id.clone()), "snapshot", Err(e))
                });
                Done {
                    reply,
                    receipts: x.receipts,
                }
            })
            .collect()
    }

    /// The reply to a command sent to `to`, or `None` when there is nowhere to send it.
    fn reply(
        &self,
        to: &ReplyTo,
        request_id: Option<String>,
        operation: &str,
        outcome: Result<(u16, Value), ApiError>,
    ) -> Option<Outbound> {
        let (status, body) = match outcome {
            Ok(answer) => answer,
            Err(e) => {
                let rid = request_id
                    .clone()
                    .unwrap_or_else(crate::api::http::extract::new_request_id);
                let body = serde_json::from_slice(&e.body(&rid)).unwrap_or(Value::Null);
                (e.status, body)
            }
        };
        let rid = request_id;
        let reply_rid = rid.clone().unwrap_or_default();
        let reply = if status < 300 {
            serde_json::json!({"request_id": reply_rid, "ok": true, "result": body})
        } else {
            let error = body.get("error").cloned().unwrap_or(Value::Null);
            serde_json::json!({"request_id": reply_rid, "ok": false, "error": error})
        };
        let topic = match (&to.response_topic, &rid) {
            (Some(t), _) if !t.is_empty() && !t.contains(['+', '#']) => t.clone(),
            (_, Some(r)) if topic_safe(r) => self.reply_topic(r),
            _ => {
                tracing::warn!(
                    topic = %to.topic,
                    status,
                    "MQTT command without a usable request_id or response topic: not answered"
                );
                return None;
            }
        };
        if status >= 300 {
            tracing::debug!(%operation, status, request_id = %reply_rid, "MQTT command refused");
        }
        Some(Outbound {
            topic,
            payload: Bytes::from(serde_json::to_vec(&reply).unwrap_or_default()),
            retain: false,
            correlation: to.correlation.clone(),
        })
    }

    /// Checks a command's size, parse and (signed commands) signature and nonce: the request
    /// object and who sent it.
    async fn authenticate(
        &self,
        operation: &str,
        payload: &[u8],
        parsed: Option<Value>,
    ) -> Result<(Value, String), ApiError> {
        if payload.len() > self.max_payload {
            return Err(ApiError::new(
                413,
                "payload_too_large",
                format!(
                    "the command is {} bytes; at most {} are accepted (send a large snapshot in chunks)",
                    payload.len(),
                    self.max_payload
                ),
            ));
        }
        let Some(parsed) = parsed else {
            return Err(ApiError::new(
                400,
                "malformed_json",
                "the payload is not valid JSON",
            ));
        };
        Ok(match &self.clients {
            Some(clients) => {
                let v = clients.verify(operation, payload).map_err(|e| match e {
                    SignatureError::Malformed(m) => ApiError::new(400, "bad_request", m),
                    SignatureError::Unauthorized => {
                        ApiError::new(401, "unauthorized", e.to_string())
                    }
                    SignatureError::Forbidden { .. } => {
                        ApiError::new(403, "forbidden", e.to_string())
                    }
                })?;
                let (client, nonce) = (v.client_id.clone(), v.nonce);
                let request: Value = serde_json::from_str(v.request.get())
                    .map_err(|_| ApiError::new(400, "malformed_json", "bad request object"))?;
                let fresh = self
                    .store
                    .write(move |c| crate::store::cloud::take_nonce(c, &client, nonce))
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "cannot record a command nonce");
                        ApiError::new(503, "unavailable", "cannot record the nonce; retry")
                    })?;
                if !fresh {
                    return Err(ApiError::new(
                        409,
                        "replayed",
                        "the nonce was used before or is too old for this client: replay refused",
                    ));
                }
                (request, format!("mqtt:{}", v.client_id))
            }
            None => (parsed, "mqtt".to_owned()),
        })
    }

    /// Runs a checked request through the router: the answer's status and JSON body.
    async fn execute(
        &self,
        operation: &str,
        request: Value,
        caller: &str,
    ) -> Result<(u16, Value), ApiError> {
        let Value::Object(mut body) = request else {
            return Err(ApiError::validation(vec![FieldError::new(
                "body",
                "must be a JSON object",
            )]));
        };
        let request_id = match body.remove("request_id") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(ApiError::validation(vec![FieldError::new(
                    "request_id",
                    "is required: a non-empty string",
                )]));
            }
        };
        let route = route_of(operation).ok_or_else(|| {
            // The topic's tail is the sender's: echo a bounded part of it, so the refusal
            // itself always fits in a packet.
            let shown: String = operation.chars().take(64).collect();
            let more = if shown.len() < operation.len() {
                "…"
            } else {
                ""
            };
            ApiError::new(
                404,
                "unknown_operation",
                format!("no operation {shown:?}{more}; see DESIGN.md §3"),
            )
        })?;
        let req = build_request(&route, &mut body, &request_id, caller)?;
        let res = self
            .router
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(|never| match never {});
        let status = res.status().as_u16();
        // The router already bounds what it returns; the cap only guards memory.
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20)
            .await
            .map_err(|_| ApiError::internal())?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, body))
    }
}

/// The HTTP request of an operation.
fn build_request(
    route: &Route,
    body: &mut Map<String, Value>,
    request_id: &str,
    caller: &str,
) -> Result<Request<Body>, ApiError> {
    let mut path = route.path.to_owned();
    if let Some(field) = route.id {
        let id = match body.remove(field) {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(ApiError::validation(vec![FieldError::new(
                    field,
                    "is required: a non-empty string",
                )]));
            }
        };
        path = path.replace("{}", &encode_segment(&id));
    }
    let if_match = body.remove("if_match");
    let mut b = Request::builder()
        .method(route.method.clone())
        .header("x-request-id", request_id);
    let payload = if route.method == Method::GET {
        let mut pairs = Vec::new();
        for (k, v) in body.iter() {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Null => continue,
                _ => {
                    return Err(ApiError::validation(vec![FieldError::new(
                        k,
                        "must be a string, number or boolean",
                    )]));
                }
            };
            pairs.push((k.clone(), v));
        }
        if !pairs.is_empty() {
            let q = serde_urlencoded::to_string(&pairs).map_err(|_| ApiError::internal())?;
            path = format!("{path}?{q}");
        }
        Body::empty()
    } else {
        b = b
            .header("idempotency-key", request_id)
            .header(header::CONTENT_TYPE, "application/json");
        match if_match {
            Some(Value::Number(n)) => b = b.header(header::IF_MATCH, n.to_string()),
            Some(Value::String(s)) => b = b.header(header::IF_MATCH, s),
            _ => {}
        }
        Body::from(serde_json::to_vec(body).map_err(|_| ApiError::internal())?)
    };
    let mut req = b
        .uri(path)
        .body(payload)
        .map_err(|e| ApiError::new(400, "bad_request", format!("cannot build the request: {e}")))?;
    req.extensions_mut()
        .insert(InternalCaller::new(caller, vec![Scope::Admin]));
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_a_route() {
        for op in OPERATIONS {
            assert!(route_of(op).is_some(), "{op}");
        }
        assert!(route_of("drop_tables").is_none());
    }

    #[test]
    fn ids_are_encoded_into_one_path_segment() {
        let r = route_of("get_unit").expect("route");
        let mut body = serde_json::json!({"unit_id": "a/b?c", "x": 1})
            .as_object()
            .cloned()
            .expect("object");
        let req = build_request(&r, &mut body, "r1", "mqtt").expect("request");
        assert_eq!(req.uri().path(), "/v1/units/a%2Fb%3Fc");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert!(req.extensions().get::<InternalCaller>().is_some());
    }

    #[test]
    fn reply_topics_refuse_wildcards() {
        assert!(topic_safe("req-1"));
        for bad in ["", "a/b", "a+", "#", "a b"] {
            assert!(!topic_safe(bad), "{bad:?}");
        }
    }
}
