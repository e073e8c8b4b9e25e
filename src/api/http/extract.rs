//! Extractors whose every rejection is the contract's error shape.

use super::AppState;
use super::auth::{Authorized, Principal, RequiredScope};
use crate::api::error::ApiError;
use crate::command::validate_idempotency_key;
use crate::domain::FieldError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The request's id (from `X-Request-Id` if sane, else generated).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Marks a response as an error whose body the request-id layer renders.
#[derive(Debug, Clone)]
pub struct ErrorMarker(pub ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut res = status.into_response();
        if self.status == 401 {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        res.extensions_mut().insert(ErrorMarker(self));
        res
    }
}

impl FromRequestParts<AppState> for RequestId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(new_request_id())))
    }
}

/// A fresh request id.
pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::new_v4().simple())
}

/// The authenticated caller.
impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Requests the gateway dispatches to itself (MQTT) carry their caller in an
        // extension, which a client on the wire cannot set.
        if let Some(c) = parts.extensions.get::<super::auth::InternalCaller>() {
            tracing::Span::current().record("token", c.principal().name.as_str());
            return Ok(c.principal().clone());
        }
        let header = match parts.headers.get(header::AUTHORIZATION) {
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::new(401, "unauthorized", "the Authorization header is not ASCII")
            })?),
            None => None,
        };
        let p = state.tokens.authenticate(header)?;
        tracing::Span::current().record("token", p.name.as_str());
        Ok(p)
    }
}

impl<S: RequiredScope> FromRequestParts<AppState> for Authorized<S> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let p = Principal::from_request_parts(parts, state).await?;
        p.require(S::SCOPE)?;
        Ok(Authorized::new(p))
    }
}

/// How long a route lets a client take to send its whole body (a request extension; the
/// innermost layer setting it wins, as with `DefaultBodyLimit`).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline(pub std::time::Duration);

/// The deadline when no layer set one.
const DEFAULT_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the whole body within the route's [`BodyDeadline`] and body limit: 413 at once
/// when `Content-Length` already says it is over the limit (nothing read), 413 when a
/// chunked body grows past it, 408 when the client is too slow, 400 when the body breaks
/// off or is malformed (bad chunk encoding).
pub async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    use axum::RequestExt;
    use axum::body::HttpBody;
    let too_large = || {
        ApiError::new(
            413,
            "payload_too_large",
            "the request body is larger than this route accepts",
        )
    };
    let deadline = req
        .extensions()
        .get::<BodyDeadline>()
        .map_or(DEFAULT_BODY_DEADLINE, |d| d.0);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let req = req.with_limited_body();
    // The limited body's upper bound is min(limit, Content-Length): a declared length above
    // it is over the limit.
    if let (Some(len), Some(upper)) = (declared, req.body().size_hint().upper())
        && len > upper
    {
        return Err(too_large());
    }
    match tokio::time::timeout(deadline, Bytes::from_request(req, state)).await {
        Err(_) => Err(ApiError::new(
            408,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs()
            ),
        )),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(r)) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large()),
        Ok(Err(r)) => Err(ApiError::new(
            400,
            "bad_request",
            format!("cannot read the request body: {r}"),
        )),
    }
}

/// A raw body read by [`read_body`].
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_body(req, state).await.map(RawBody)
    }
}

/// A JSON body: 415 without `Content-Type: application/json`, 413 over the limit, 408 too slow ([`read_body`]), 400 when
/// it does not parse, 422 (naming the field) when it does not fit. An empty body is `{}`.
pub struct JsonBody<T> {
    /// The typed body.
    pub value: T,
    /// The body re-serialized canonically (sorted keys), for idempotency fingerprints;
    /// empty when the request carries no `Idempotency-Key`.
    pub canonical: Vec<u8>,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        // The canonical form only matters for an idempotency fingerprint.
        let keyed = req.headers().contains_key("idempotency-key");
        let json_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| {
                let mime = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        let bytes = read_body(req, state).await?;
        let value: serde_json::Value = if bytes.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            if json_type != Some(true) {
                return Err(ApiError::new(
                    415,
                    "unsupported_media_type",
                    "send the body as Content-Type: application/json",
                ));
            }
            serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::new(
                    400,
                    "malformed_json",
                    format!("the body is not valid JSON: {e}"),
                )
            })?
        };
        // serde would read an array as the struct's fields in order: `["t-1"]` must not reserve.
        if !value.is_object() {
            return Err(ApiError::validation(vec![FieldError::new(
                "body",
                "must be a JSON object",
            )]));
        }
        let canonical = if keyed {
            serde_json::to_vec(&value).unwrap_or_default()
        } else {
            Vec::new()
        };
        let value =
            crate::command::unit::parse_at(value, "").map_err(|e| ApiError::validation(vec![e]))?;
        Ok(JsonBody { value, canonical })
    }
}

/// Query parameters: 400 naming the problem when they do not parse.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<AppState> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(q).map(Query).map_err(|e| {
            ApiError::new(
                400,
                "invalid_parameter",
                format!("bad query parameters: {e}"),
            )
        })
    }
}

/// The envelope headers of a mutating request.
#[derive(Debug, Clone, Default)]
pub struct WriteMeta {
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// `If-Match` as a version.
    pub if_match: Option<i64>,
}

impl WriteMeta {
    /// Reads `Idempotency-Key` and `If-Match` (`3`, `"3"`, `W/"3"` or `*`).
    pub fn from_headers(h: &HeaderMap) -> Result<Self, ApiError> {
        let idempotency_key = match h.get("idempotency-key") {
            Some(v) => {
                let k = v.to_str().unwrap_or("\u{0}").to_owned();
                validate_idempotency_key(&k).map_err(|e| {
                    ApiError::new(400, "invalid_header", e.message.clone()).with_details(vec![e])
                })?;
                Some(k)
            }
            None => None,
        };
        let if_match = match h.get(header::IF_MATCH) {
            Some(v) => {
                let raw = v.to_str().unwrap_or("").trim();
                if raw == "*" {
                    None
                } else {
                    let t = raw.trim_start_matches("W/").trim_matches('"');
                    Some(t.parse::<i64>().map_err(|_| {
                        ApiError::new(
                            400,
                            "invalid_header",
                            "If-Match must be a unit version, e.g. \"3\"",
                        )
                        .with_details(vec![FieldError::new("If-Match", "must be a unit version")])
                    })?)
                }
            }
            None => None,
        };
        Ok(WriteMeta {
            idempotency_key,
            if_match,
        })
    }
}

impl FromRequestParts<AppState> for WriteMeta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        WriteMeta::from_headers(&parts.headers)
    }
}

/// The fingerprint of a request for idempotency: operation, path and canonical body.
pub fn fingerprint(op: &str, path: &str, canonical_body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(op.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.update([0]);
    h.update(canonical_body);
    h.finalize().into()
}
