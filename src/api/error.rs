//! The contract's error shape, shared by HTTP and MQTT:
//! `{"error": {"code", "message", "details", "request_id", "error_hash"?}}`.

use crate::domain::FieldError;
use crate::domain::allocation::Refusal;
use crate::store::StoreError;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// One unit's problem in a bulk request (storEDGE `error_hash` entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BulkItemError {
    /// Unit id, if known.
    pub id: Option<String>,
    /// Unit name, if known.
    pub name: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// An error answer: status code plus the body fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable machine-readable code.
    pub code: Cow<'static, str>,
    /// Human-readable message.
    pub message: String,
    /// Field problems.
    pub details: Vec<FieldError>,
    /// Per-field unit problems of bulk endpoints.
    pub error_hash: Option<BTreeMap<String, Vec<BulkItemError>>>,
}

/// The `error` object of the error shape.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// Stable code, e.g. `invalid_transition`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Field problems.
    pub details: Vec<FieldError>,
    /// Id of the request (also in `X-Request-Id`).
    pub request_id: String,
    /// Bulk endpoints: `{"<field>": [{"id", "name", "message"}]}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_hash: Option<BTreeMap<String, Vec<BulkItemError>>>,
}

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(
        status: u16,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            details: Vec::new(),
            error_hash: None,
        }
    }

    /// Adds field details.
    pub fn with_details(mut self, details: Vec<FieldError>) -> Self {
        self.details = details;
        self
    }

    /// 404 for an unknown id.
    pub fn not_found(kind: &str, id: &str) -> Self {
        ApiError::new(404, "not_found", format!("{kind} {id:?} not found"))
    }

    /// 422: the request is well-formed JSON but its values are not acceptable.
    pub fn validation(details: Vec<FieldError>) -> Self {
        let message = match details.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            _ => format!("the request has {} invalid fields", details.len()),
        };
        ApiError::new(422, "validation_error", message).with_details(details)
    }

    /// 400 from a bulk endpoint, with `error_hash`.
    pub fn bulk(status: u16, error_hash: BTreeMap<String, Vec<BulkItemError>>) -> Self {
        let n: usize = error_hash.values().map(Vec::len).sum();
        let (code, message) = if status == 404 {
            (
                "not_found",
                format!("{n} unit(s) not found; nothing was changed"),
            )
        } else {
            (
                "invalid_parameters",
                format!("{n} problem(s) in the request; nothing was changed"),
            )
        };
        ApiError {
            error_hash: Some(error_hash),
            ..ApiError::new(status, code, message)
        }
    }

    /// 500 without leaking internals.
    pub fn internal() -> Self {
        ApiError::new(
            500,
            "internal_error",
            "internal error; the request was not applied",
        )
    }

    /// The full body as bytes.
    pub fn body(&self, request_id: &str) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorObject {
                code: self.code.to_string(),
                message: self.message.clone(),
                details: self.details.clone(),
                request_id: request_id.to_owned(),
                error_hash: self.error_hash.clone(),
            },
        };
        serde_json::to_vec(&body)
            .unwrap_or_else(|_| b"{\"error\":{\"code\":\"internal_error\"}}".to_vec())
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError::new(409, r.code(), r.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => {
                ApiError::new(503, "unavailable", "the gateway is shutting down; retry")
            }
            e => {
                tracing::error!(error = %e, "store error");
                ApiError::internal()
            }
        }
    }
}
