//! Route handlers: authenticate, parse into a [`Command`] or run a read, render. The
//! OpenAPI document is generated from these annotations.

use super::auth::{Authorized, needs};
use super::extract::{JsonBody, Query, RequestId, WriteMeta, fingerprint};
use super::status_detail::{self, AccessDecision, Detail, StatusQuery};
use super::{AppState, Limits};
use crate::api::error::{ApiError, ErrorBody};
use crate::command::allocation::{
    AllocationBody, ByBody, ContactOnly, SetStatus, SetStatusBody, UnitAllocation, UnitOnly,
};
use crate::command::automation::{PaymentFailed, PaymentFailedBody};
use crate::command::snapshot::{Snapshot, SnapshotReply};
use crate::command::unit::{
    BulkBody, BulkCreate, BulkUpdate, CreateUnits, UnitPatchBody, UpdateUnit,
};
use crate::command::upsert::{
    ContactBody, TenancyBody, UnitTypeBody, UpsertContact, UpsertTenancy, UpsertUnitType,
};
use crate::command::{Command, Envelope, Reply};
use crate::domain::UnitStatus;
use crate::model::{
    ContactResult, EventPage, Health, ListMeta, Pagination, PaymentFailedResult, TenancyResult,
    UnitEnvelope, UnitList, UnitResult, UnitTypeResult, UnitsResult,
};
use crate::store::{StoreError, events, people, units};
use axum::Json;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::OnceLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Error answers every authenticated route may give.
#[derive(utoipa::IntoResponses)]
#[allow(
    dead_code,
    reason = "documentation only: the variants describe the error statuses"
)]
pub enum Errors {
    /// Malformed request (bad JSON, bad header or parameter); bulk: invalid items with `error_hash`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Missing or invalid bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The token lacks the scope.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Unknown id or route.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Wrong method for the route.
    #[response(status = 405)]
    MethodNotAllowed(ErrorBody),
    /// Refused transition, version mismatch, access code taken, a lock or door sensor bound
    /// to another unit (`lock_in_use`, `door_sensor_in_use`).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Body over the limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Body not JSON.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// JSON that does not fit; Idempotency-Key reused for another request.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// Internal error.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// Shutting down.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "unitgate", description = "Per-site gateway API: unit allocations, units, sync, events."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// When this process first built its API: the base of `uptime_s` in `GET /v1/status`.
static STARTED: OnceLock<std::time::Instant> = OnceLock::new();

/// Every route, with its OpenAPI description.
pub fn api(limits: Limits) -> OpenApiRouter<AppState> {
    STARTED.get_or_init(std::time::Instant::now);
    let snapshot = OpenApiRouter::new()
        .routes(routes!(put_snapshot))
        .layer(DefaultBodyLimit::max(limits.max_snapshot_bytes))
        .layer(axum::Extension(super::extract::BodyDeadline(
            limits.snapshot_timeout,
        )));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(reserve))
        .routes(routes!(grant_access))
        .routes(routes!(deallocate))
        .routes(routes!(set_status))
        .routes(routes!(overlock))
        .routes(routes!(remove_overlock))
        .routes(routes!(payment_failed))
        .routes(routes!(list_units, create_units))
        .routes(routes!(available_units))
        .routes(routes!(get_unit, patch_unit, put_unit))
        .routes(routes!(bulk_update))
        .routes(routes!(bulk_create))
        .routes(routes!(get_unit_type, put_unit_type))
        .routes(routes!(get_contact, put_contact))
        .routes(routes!(get_tenancy, put_tenancy))
        .routes(routes!(list_events))
        .routes(routes!(list_devices))
        .routes(routes!(status))
        .routes(routes!(webhook))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
        // Prometheus text, not JSON: kept out of the OpenAPI document.
        .route("/metrics", axum::routing::get(metrics))
        // The browser page over `/v1/status` and `/v1/devices`: HTML, not in the document.
        .merge(super::status_page::routes())
        .merge(snapshot)
}

/// The OpenAPI document, generated once.
pub fn openapi_document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let limits = Limits {
            max_body_bytes: 1,
            max_snapshot_bytes: 1,
            body_timeout: std::time::Duration::from_secs(1),
            snapshot_timeout: std::time::Duration::from_secs(1),
        };
        api(limits)
            .into_openapi()
            .to_pretty_json()
            .unwrap_or_default()
    })
}

fn reply_response(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, reply.body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if reply.replayed {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

async fn run<S>(
    s: &AppState,
    caller: &Authorized<S>,
    command: Command,
    ids: &str,
    meta: WriteMeta,
    rid: RequestId,
    canonical: &[u8],
) -> Response {
    let env = Envelope {
        fingerprint: fingerprint(command.name(), ids, canonical),
        command,
        // Keys are per caller, so two clients choosing the same key never collide (a key
        // has no spaces, so "<token name> <key>" is unambiguous).
        idempotency_key: meta
            .idempotency_key
            .map(|k| format!("{} {k}", caller.0.name)),
        if_match: meta.if_match,
        request_id: rid.0,
    };
    reply_response(s.executor.execute(env).await)
}

async fn read<T, F>(s: &AppState, f: F) -> Result<T, ApiError>
where
    F: FnOnce(&rusqlite::Connection) -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    s.executor.store().read(f).await
}

// ---- allocation operations -------------------------------------------------------------

/// Reserve an available unit for a tenancy that starts after today (site date).
#[utoipa::path(post, path = "/v1/units/{unit_id}/reserve", tag = "allocations",
    params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = AllocationBody,
    responses((status = 200, body = UnitResult), Errors))]
async fn reserve(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(unit_id): Path<String>,
    body: JsonBody<AllocationBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::Reserve(UnitAllocation {
        unit_id: unit_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &unit_id, meta, rid, &body.canonical).await)
}

/// Grant access: reserved (same tenancy) → occupied, or available → occupied in one step.
#[utoipa::path(post, path = "/v1/units/{unit_id}/grant_access", tag = "allocations",
    params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = AllocationBody,
    responses((status = 200, body = UnitResult), Errors))]
async fn grant_access(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(unit_id): Path<String>,
    body: JsonBody<AllocationBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::GrantAccess(UnitAllocation {
        unit_id: unit_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &unit_id, meta, rid, &body.canonical).await)
}

/// Deallocate: the allocation ends and the unit is available (`unit.deallocated` + `unit.available`).
#[utoipa::path(post, path = "/v1/units/{unit_id}/deallocate", tag = "allocations",
    params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body(content = ByBody, description = "Optional"),
    responses((status = 200, body = UnitResult), Errors))]
async fn deallocate(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(unit_id): Path<String>,
    body: JsonBody<ByBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::Deallocate(UnitOnly {
        unit_id: unit_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &unit_id, meta, rid, &body.canonical).await)
}

/// Operator states: available ↔ unavailable, occupied/overlocked → repossessed.
#[utoipa::path(post, path = "/v1/units/{unit_id}/set_status", tag = "allocations",
    params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = SetStatusBody,
    responses((status = 200, body = UnitResult), Errors))]
async fn set_status(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(unit_id): Path<String>,
    body: JsonBody<SetStatusBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::SetStatus(SetStatus {
        unit_id: unit_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &unit_id, meta, rid, &body.canonical).await)
}

/// Overlock every occupied unit of the contact.
#[utoipa::path(post, path = "/v1/contacts/{contact_id}/overlock", tag = "allocations",
    params(("contact_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body(content = ByBody, description = "Optional"),
    responses((status = 200, body = UnitsResult), Errors))]
async fn overlock(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(contact_id): Path<String>,
    body: JsonBody<ByBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::Overlock(ContactOnly {
        contact_id: contact_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &contact_id, meta, rid, &body.canonical).await)
}

/// Remove the overlock from every overlocked unit of the contact.
#[utoipa::path(post, path = "/v1/contacts/{contact_id}/remove_overlock", tag = "allocations",
    params(("contact_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body(content = ByBody, description = "Optional"),
    responses((status = 200, body = UnitsResult), Errors))]
async fn remove_overlock(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(contact_id): Path<String>,
    body: JsonBody<ByBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::RemoveOverlock(ContactOnly {
        contact_id: contact_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &contact_id, meta, rid, &body.canonical).await)
}

/// A `payment.failed` event for the contact: with the site's `auto_overlock` on, every
/// occupied unit of the contact is overlocked; otherwise nothing changes and the answer says why.
#[utoipa::path(post, path = "/v1/contacts/{contact_id}/payment_failed", tag = "allocations",
    params(("contact_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body(content = PaymentFailedBody, description = "Optional"),
    responses((status = 200, body = PaymentFailedResult), Errors))]
async fn payment_failed(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(contact_id): Path<String>,
    body: JsonBody<PaymentFailedBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::PaymentFailed(PaymentFailed {
        contact_id: contact_id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &contact_id, meta, rid, &body.canonical).await)
}

// ---- units ------------------------------------------------------------------------------

/// `Idempotency-Key` and `If-Match` headers of mutating routes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "documentation only: read by WriteMeta")]
struct WriteHeaders {
    /// A repeat with the same key returns the first response and changes nothing.
    #[param(
        rename = "Idempotency-Key",
        value_type = String,
        required = false,
        pattern = "^[!-~]{1,255}$"
    )]
    idempotency_key: Option<String>,
    /// Unit writes: the expected unit version (409 on mismatch): `3`, `"3"`, `W/"3"` or `*`.
    #[param(
        rename = "If-Match",
        value_type = String,
        required = false,
        pattern = r#"^(\*|(W/)?"?[0-9]{1,18}"?)$"#
    )]
    if_match: Option<String>,
}

/// Filters and page of `GET /v1/units`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UnitQuery {
    /// Status, or several comma-separated.
    #[param(
        pattern = "^((available|reserved|occupied|overlocked|unavailable|repossessed)(,(available|reserved|occupied|overlocked|unavailable|repossessed))*)?$"
    )]
    pub status: Option<String>,
    /// Unit type id.
    pub unit_type_id: Option<String>,
    /// Units whose zones include this zone.
    pub zone: Option<String>,
    /// Page size, 1 to 200 (default 100).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// Entries to skip (default 0; at most 2^53 - 1, the largest integer every JSON client
    /// reads exactly).
    #[param(maximum = 9_007_199_254_740_991.0)]
    pub offset: Option<u64>,
}

/// Largest page of units.
pub const MAX_LIMIT: u32 = 200;

/// Largest `offset` of a units page (2^53 - 1, as documented).
const MAX_OFFSET: u64 = (1 << 53) - 1;

impl UnitQuery {
    fn filter(self, rentable_only: bool) -> Result<units::UnitFilter, ApiError> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::new(
                400,
                "invalid_parameter",
                format!("limit must be 1 to {MAX_LIMIT}"),
            ));
        }
        let offset = self.offset.unwrap_or(0);
        if offset > MAX_OFFSET {
            return Err(ApiError::new(
                400,
                "invalid_parameter",
                "offset is too large",
            ));
        }
        let statuses = match self.status.as_deref() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|s| s.trim().parse::<UnitStatus>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::new(400, "invalid_parameter", format!("status: {e}")))?,
        };
        Ok(units::UnitFilter {
            statuses,
            unit_type_id: self.unit_type_id.filter(|s| !s.is_empty()),
            zone: self.zone.filter(|s| !s.is_empty()),
            rentable_only,
            limit,
            offset,
        })
    }
}

async fn unit_page(s: &AppState, filter: units::UnitFilter) -> Result<Response, ApiError> {
    let (limit, offset) = (filter.limit as u64, filter.offset);
    let (rows, total) = read(s, move |c| Ok(units::list(c, &filter)?)).await?;
    Ok(Json(UnitList {
        units: rows.iter().map(units::UnitRow::view).collect(),
        meta: ListMeta {
            pagination: Pagination::new(limit, offset, total),
        },
    })
    .into_response())
}

/// List units, ordered by name, with storEDGE pagination meta.
#[utoipa::path(get, path = "/v1/units", tag = "units", params(UnitQuery),
    responses((status = 200, body = UnitList), Errors))]
async fn list_units(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Query(q): Query<UnitQuery>,
) -> Result<Response, ApiError> {
    unit_page(&s, q.filter(false)?).await
}

/// Units available for move-in (status `available` and rentable).
#[utoipa::path(get, path = "/v1/units/available", tag = "units", params(UnitQuery),
    responses((status = 200, body = UnitList), Errors))]
async fn available_units(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Query(mut q): Query<UnitQuery>,
) -> Result<Response, ApiError> {
    // A status given here is still checked as on /v1/units (schemathesis found it was
    // silently ignored), then replaced.
    UnitQuery {
        status: q.status.take(),
        ..UnitQuery::default()
    }
    .filter(true)?;
    q.status = Some("available".into());
    unit_page(&s, q.filter(true)?).await
}

/// One unit; `ETag` is its version.
#[utoipa::path(get, path = "/v1/units/{unit_id}", tag = "units", params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, body = UnitEnvelope, headers(("ETag" = String))), Errors))]
async fn get_unit(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Path(unit_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = unit_id.clone();
    let row = read(&s, move |c| Ok(units::get(c, &id)?)).await?;
    let row = row.ok_or_else(|| ApiError::not_found("unit", &unit_id))?;
    let mut res = Json(UnitEnvelope { unit: row.view() }).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", row.record.version)) {
        res.headers_mut().insert(header::ETAG, v);
    }
    Ok(res)
}

async fn update_unit(
    s: AppState,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    unit_id: String,
    body: JsonBody<UnitPatchBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::UpdateUnit(UpdateUnit {
        unit_id: unit_id.clone(),
        patch: body.value.unit,
    });
    Ok(run(&s, &p, cmd, &unit_id, meta, rid, &body.canonical).await)
}

/// Update a unit: omitted fields unchanged; a `null` array unchanged, `[]` cleared.
#[utoipa::path(patch, path = "/v1/units/{unit_id}", tag = "units",
    params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = UnitPatchBody,
    responses((status = 200, body = UnitEnvelope), Errors))]
async fn patch_unit(
    State(s): State<AppState>,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(unit_id): Path<String>,
    body: JsonBody<UnitPatchBody>,
) -> Result<Response, ApiError> {
    update_unit(s, p, rid, meta, unit_id, body).await
}

/// Same as PATCH (storEDGE).
#[utoipa::path(put, path = "/v1/units/{unit_id}", tag = "units",
    params(("unit_id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = UnitPatchBody,
    responses((status = 200, body = UnitEnvelope), Errors))]
async fn put_unit(
    State(s): State<AppState>,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(unit_id): Path<String>,
    body: JsonBody<UnitPatchBody>,
) -> Result<Response, ApiError> {
    update_unit(s, p, rid, meta, unit_id, body).await
}

/// Create units; a comma-separated `name` creates one unit per name. New units start available.
#[utoipa::path(post, path = "/v1/units", tag = "units", params(WriteHeaders), request_body = CreateUnits,
    responses((status = 201, body = UnitsResult), Errors))]
async fn create_units(
    State(s): State<AppState>,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    body: JsonBody<CreateUnits>,
) -> Result<Response, ApiError> {
    Ok(run(
        &s,
        &p,
        Command::CreateUnits(body.value),
        "",
        meta,
        rid,
        &body.canonical,
    )
    .await)
}

/// Create several units, each with its own fields; all or nothing (`error_hash` on 400).
#[utoipa::path(post, path = "/v1/units/bulk_create", tag = "units", params(WriteHeaders), request_body = BulkBody,
    responses((status = 201, body = UnitsResult), Errors))]
async fn bulk_create(
    State(s): State<AppState>,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    body: JsonBody<BulkBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::BulkCreateUnits(BulkCreate::parse(body.value)?);
    Ok(run(&s, &p, cmd, "", meta, rid, &body.canonical).await)
}

/// Update several units by id; all or nothing (`error_hash` on 400 and 404).
#[utoipa::path(put, path = "/v1/units/bulk_update", tag = "units", params(WriteHeaders), request_body = BulkBody,
    responses((status = 200, body = UnitsResult), Errors))]
async fn bulk_update(
    State(s): State<AppState>,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    body: JsonBody<BulkBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::BulkUpdateUnits(BulkUpdate::parse(body.value)?);
    Ok(run(&s, &p, cmd, "", meta, rid, &body.canonical).await)
}

// ---- upserts from the cloud -------------------------------------------------------------

/// A unit type.
#[utoipa::path(get, path = "/v1/unit_types/{id}", tag = "sync", params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, body = UnitTypeResult), Errors))]
async fn get_unit_type(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = id.clone();
    let t = read(&s, move |c| Ok(people::unit_type(c, &key)?)).await?;
    let t = t.ok_or_else(|| ApiError::not_found("unit type", &id))?;
    Ok(Json(UnitTypeResult {
        unit_type: t.view(),
    })
    .into_response())
}

/// Create (201) or update (200) a unit type.
#[utoipa::path(put, path = "/v1/unit_types/{id}", tag = "sync",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = UnitTypeBody,
    responses((status = 200, body = UnitTypeResult), (status = 201, body = UnitTypeResult), Errors))]
async fn put_unit_type(
    State(s): State<AppState>,
    p: Authorized<needs::UnitsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(id): Path<String>,
    body: JsonBody<UnitTypeBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::UpsertUnitType(UpsertUnitType {
        id: id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &id, meta, rid, &body.canonical).await)
}

/// A contact (the access code is never returned).
#[utoipa::path(get, path = "/v1/contacts/{id}", tag = "sync", params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, body = ContactResult), Errors))]
async fn get_contact(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = id.clone();
    let c = read(&s, move |c| Ok(people::contact(c, &key)?)).await?;
    let c = c.ok_or_else(|| ApiError::not_found("contact", &id))?;
    Ok(Json(ContactResult { contact: c.view() }).into_response())
}

/// Create (201) or update (200) a contact. `access_code` is write-only and unique (409 `access_code_taken`).
#[utoipa::path(put, path = "/v1/contacts/{id}", tag = "sync",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = ContactBody,
    responses((status = 200, body = ContactResult), (status = 201, body = ContactResult), Errors))]
async fn put_contact(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(id): Path<String>,
    body: JsonBody<ContactBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::UpsertContact(UpsertContact {
        id: id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &id, meta, rid, &body.canonical).await)
}

/// A tenancy.
#[utoipa::path(get, path = "/v1/tenancies/{id}", tag = "sync", params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, body = TenancyResult), Errors))]
async fn get_tenancy(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = id.clone();
    let t = read(&s, move |c| Ok(people::tenancy(c, &key)?)).await?;
    let t = t.ok_or_else(|| ApiError::not_found("tenancy", &id))?;
    Ok(Json(TenancyResult { tenancy: t.view() }).into_response())
}

/// Create (201) or update (200) a tenancy.
#[utoipa::path(put, path = "/v1/tenancies/{id}", tag = "sync",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_.:-]{1,128}$"), WriteHeaders), request_body = TenancyBody,
    responses((status = 200, body = TenancyResult), (status = 201, body = TenancyResult), Errors))]
async fn put_tenancy(
    State(s): State<AppState>,
    p: Authorized<needs::AllocationsWrite>,
    rid: RequestId,
    meta: WriteMeta,
    Path(id): Path<String>,
    body: JsonBody<TenancyBody>,
) -> Result<Response, ApiError> {
    let cmd = Command::UpsertTenancy(UpsertTenancy {
        id: id.clone(),
        body: body.value,
    });
    Ok(run(&s, &p, cmd, &id, meta, rid, &body.canonical).await)
}

/// Replace the whole replica, applied atomically as a diff: unchanged rows are not touched
/// and produce no events. Every list is required.
#[utoipa::path(put, path = "/v1/sync/snapshot", tag = "sync", params(WriteHeaders), request_body = Snapshot,
    responses((status = 200, body = SnapshotReply), Errors))]
async fn put_snapshot(
    State(s): State<AppState>,
    p: Authorized<needs::Admin>,
    rid: RequestId,
    meta: WriteMeta,
    body: JsonBody<Snapshot>,
) -> Result<Response, ApiError> {
    let cmd = Command::Snapshot(Box::new(body.value));
    Ok(run(&s, &p, cmd, "", meta, rid, &body.canonical).await)
}

// ---- events, health, document -----------------------------------------------------------

/// Page of `GET /v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Return events with `seq` greater than this (default 0).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// The event log, oldest first.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventQuery),
    responses((status = 200, body = EventPage), Errors))]
async fn list_events(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Query(q): Query<EventQuery>,
) -> Result<Response, ApiError> {
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    if after < 0 || !(1..=1000).contains(&limit) {
        return Err(ApiError::new(
            400,
            "invalid_parameter",
            "after must be ≥ 0 and limit 1 to 1000",
        ));
    }
    let site = s.executor.site_id().to_owned();
    let evs = read(&s, move |c| Ok(events::list(c, &site, after, limit)?)).await?;
    let next_after = evs.last().map_or(after, |e| e.seq);
    Ok(Json(EventPage {
        events: evs,
        next_after,
    })
    .into_response())
}

/// One device with its health and hardware queue (DESIGN.md §4).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceInfo {
    /// Device id.
    pub id: String,
    /// `relay_board`, `lock_api` or `keypad`.
    pub kind: crate::reconcile::DeviceKind,
    /// The zone a keypad guards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Whether it answers (keypads: always false until their driver is wired).
    pub online: bool,
    /// Targets waiting for delivery.
    pub queue_depth: u64,
    /// The latest device or delivery failure.
    pub last_error: Option<String>,
}

/// The configured devices, their health and pending hardware commands.
#[utoipa::path(get, path = "/v1/devices", tag = "operations",
    responses((status = 200, body = Vec<DeviceInfo>), Errors))]
async fn list_devices(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
) -> Result<Response, ApiError> {
    let entries = s.devices.list();
    let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
    let depths = read(&s, move |c| {
        ids.iter()
            .map(|id| Ok(crate::store::outbox::depth(c, id)?))
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await?;
    let list: Vec<DeviceInfo> = entries
        .into_iter()
        .zip(depths)
        .map(|(e, (queue_depth, queue_error))| DeviceInfo {
            id: e.id,
            kind: e.kind,
            zone: e.zone,
            online: e.online,
            queue_depth,
            last_error: e.last_error.or(queue_error),
        })
        .collect();
    Ok(Json(list).into_response())
}

/// Prometheus / OpenMetrics text of the gateway's metrics (scope `read`).
async fn metrics(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
) -> Result<Response, ApiError> {
    let scrape = crate::metrics::Scrape {
        executor: s.executor.clone(),
        devices: s.devices.clone(),
        links: s.links.clone(),
    };
    let text = scrape.text().await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Liveness and readiness: 200 when the replica answers. No token needed.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, body = Health), (status = 503, body = ErrorBody)))]
async fn healthz(State(s): State<AppState>) -> Result<Response, ApiError> {
    read(&s, |c| {
        c.query_row("SELECT 1", [], |_| Ok(()))
            .map_err(StoreError::from)?;
        Ok(())
    })
    .await
    .map_err(|_| ApiError::new(503, "unavailable", "the replica does not answer"))?;
    Ok(Json(Health {
        status: "ok".into(),
        site_id: s.executor.site_id().to_owned(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .into_response())
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json"), Errors))]
async fn openapi_json(_: Authorized<needs::Read>) -> Result<Response, ApiError> {
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response())
}

// ---- cloud: status and webhooks ---------------------------------------------------------

/// Devices answering and not.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct DeviceCounts {
    /// Devices answering.
    pub online: usize,
    /// Devices not answering (or disabled).
    pub offline: usize,
}

/// `GET /v1/status`: the site, its cloud links, the undelivered backlog and device health.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct SiteStatus {
    /// Site id.
    pub site_id: String,
    /// The gateway's version.
    pub version: String,
    /// Each configured cloud link (`mqtt`, `https`) by name.
    pub link: std::collections::BTreeMap<String, crate::cloud::LinkStatus>,
    /// Events not yet acknowledged by every configured uplink (0 without uplinks).
    pub backlog: crate::cloud::backlog::Backlog,
    /// Device health counts.
    pub devices: DeviceCounts,
    /// The newest event's `seq` (0 before the first).
    pub last_seq: i64,
    /// Seconds since the gateway process started serving.
    pub uptime_s: u64,
    /// With `detail=full`: the newest access decisions (at most 50), newest first; no PIN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_decisions: Option<Vec<AccessDecision>>,
    /// With `detail=full`: how many units have each status (every status, 0 included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub units_by_status: Option<std::collections::BTreeMap<String, u64>>,
}

/// Link and hardware health, and how much the cloud has not received yet; with
/// `detail=full` also the newest access decisions and the unit counts per status (what the
/// `/status` page and `unitgate status` show).
#[utoipa::path(get, path = "/v1/status", tag = "operations", params(StatusQuery),
    responses((status = 200, body = SiteStatus), Errors))]
async fn status(
    State(s): State<AppState>,
    _: Authorized<needs::Read>,
    Query(q): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    let link = s.links.list();
    let uplinks: Vec<String> = link.keys().cloned().collect();
    let now = s.executor.now();
    let full = q.detail == Some(Detail::Full);
    let (backlog, last_seq, detail) = read(&s, move |c| {
        let backlog = crate::cloud::backlog::backlog(c, &uplinks, now)?;
        let last_seq = events::last_seq(c)?;
        let detail = if full {
            Some((
                status_detail::recent_access(c, last_seq, status_detail::ACCESS_DECISIONS)?,
                status_detail::units_by_status(c)?,
            ))
        } else {
            None
        };
        Ok((backlog, last_seq, detail))
    })
    .await?;
    let (access_decisions, units_by_status) = detail.unzip();
    let devices = s.devices.list();
    let online = devices.iter().filter(|d| d.online).count();
    Ok(Json(SiteStatus {
        site_id: s.executor.site_id().to_owned(),
        version: env!("CARGO_PKG_VERSION").into(),
        link,
        backlog,
        devices: DeviceCounts {
            online,
            offline: devices.len() - online,
        },
        last_seq,
        uptime_s: STARTED.get().map_or(0, |t| t.elapsed().as_secs()),
        access_decisions,
        units_by_status,
    })
    .into_response())
}

/// Error answers of the webhook route.
#[derive(utoipa::IntoResponses)]
#[allow(
    dead_code,
    reason = "documentation only: the variants describe the error statuses"
)]
pub enum WebhookErrors {
    /// The body is not JSON (`malformed_json`).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `signature_missing`, `signature_invalid` (malformed or not matching), or
    /// `signature_expired` (timestamp more than 5 minutes from the gateway's clock).
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// Unknown source, or the event names an unknown contact or tenancy.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `replayed`: this source sent this event id before.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// Body over the limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The JSON lacks `id`, `event`/`type`, or a field its type needs.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// Internal error.
    #[response(status = 500)]
    Internal(ErrorBody),
}

/// A signed event from a configured source (`payment.failed`, `payment.processed`,
/// `tenancy.ended`; other types are acknowledged with `ignored: true`). No bearer token: the
/// `X-Unitgate-Signature` (HMAC-SHA256 of `"t.body"` with the source's secret) is the
/// authentication.
#[utoipa::path(post, path = "/v1/webhooks/{source}", tag = "cloud", security(()),
    params(("source" = String, Path, description = "A configured webhook source"),
        ("X-Unitgate-Signature" = String, Header, description = "t=<unix>,v1=<hex HMAC-SHA256 of \"t.body\">")),
    request_body = crate::cloud::webhooks::WebhookEvent,
    responses((status = 200, body = crate::cloud::webhooks::WebhookResult), WebhookErrors))]
async fn webhook(
    State(s): State<AppState>,
    rid: RequestId,
    Path(source): Path<String>,
    headers: axum::http::HeaderMap,
    body: Result<super::extract::RawBody, ApiError>,
) -> Result<Response, ApiError> {
    let Some(src) = s.webhooks.get(&source) else {
        return Err(ApiError::new(
            404,
            "not_found",
            format!("no webhook source {source:?} is configured"),
        ));
    };
    let body = body?.0;
    let sig = headers
        .get(crate::cloud::webhooks::SIGNATURE_HEADER)
        .map(|v| v.to_str().unwrap_or(""));
    if let Err(e) = src.verify(sig, &body, s.executor.now().timestamp()) {
        tracing::warn!(source = %source, reason = %e, "webhook refused");
        return Err(e.into());
    }
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let event: crate::cloud::webhooks::WebhookEvent =
        serde_json::from_value(value).map_err(|e| {
            ApiError::validation(vec![crate::domain::FieldError::new("body", e.to_string())])
        })?;
    let env = Envelope {
        fingerprint: fingerprint("webhook", &source, &body),
        command: Command::Webhook(crate::cloud::webhooks::Inbound {
            source: source.clone(),
            remove_overlock_on_payment: src.remove_overlock_on_payment,
            event,
        }),
        idempotency_key: None,
        if_match: None,
        request_id: rid.0,
    };
    Ok(reply_response(s.executor.execute(env).await))
}
