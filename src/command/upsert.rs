//! Upserts pushed by the cloud: unit types, contacts, tenancies.

use super::{Applied, Context};
use crate::api::error::ApiError;
use crate::domain::hours::AccessHours;
use crate::domain::unit::validate_id;
use crate::domain::{FieldError, Patch, pin};
use crate::model::{ContactResult, TenancyResult, UnitTypeResult};
use crate::store::people;
use chrono::NaiveDate;
use rusqlite::Connection;
use serde::Deserialize;
use utoipa::ToSchema;

/// `PUT /v1/unit_types/{id}` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitTypeBody {
    /// Name, 1 to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
}

/// `PUT /v1/contacts/{id}` body.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    /// Name, 1 to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub name: String,
    /// The PIN (4-10 digits, unique at the site). Write-only: omitted = unchanged, null = removed.
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub access_code: Patch<String>,
    /// Contact access hours (within the site's); omitted = unchanged, null = site hours only.
    #[schema(value_type = Option<AccessHours>)]
    #[serde(default)]
    pub access_hours: Patch<AccessHours>,
}

impl std::fmt::Debug for ContactBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the access code.
        f.debug_struct("ContactBody")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `PUT /v1/tenancies/{id}` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenancyBody {
    /// The tenant.
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    pub contact_id: String,
    /// First day (ISO date).
    pub start_date: NaiveDate,
    /// Move-out date (ISO date), if known.
    #[serde(default)]
    pub end_date: Option<NaiveDate>,
    /// State as the cloud names it (default `active`).
    #[serde(default)]
    pub state: Option<String>,
}

/// Upsert of a unit type.
#[derive(Debug, Clone)]
pub struct UpsertUnitType {
    /// Id (path).
    pub id: String,
    /// Body.
    pub body: UnitTypeBody,
}

/// Upsert of a contact.
#[derive(Debug, Clone)]
pub struct UpsertContact {
    /// Id (path).
    pub id: String,
    /// Body.
    pub body: ContactBody,
}

/// Upsert of a tenancy.
#[derive(Debug, Clone)]
pub struct UpsertTenancy {
    /// Id (path).
    pub id: String,
    /// Body.
    pub body: TenancyBody,
}

fn check_path_id(id: &str) -> Result<(), ApiError> {
    validate_id(id).map_err(|m| ApiError::validation(vec![FieldError::new("id", m)]))
}

fn check_name(errors: &mut Vec<FieldError>, name: &str) {
    if name.trim().is_empty() || name.len() > 200 {
        errors.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
}

fn upserted(created: bool, body: &impl serde::Serialize) -> Result<Applied, ApiError> {
    Applied::with_status(if created { 201 } else { 200 }, body)
}

impl UpsertUnitType {
    /// Creates or renames a unit type.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_path_id(&self.id)?;
        let mut errors = Vec::new();
        check_name(&mut errors, &self.body.name);
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
        let old = people::unit_type(conn, &self.id)?;
        let record = people::UnitTypeRecord {
            id: self.id.clone(),
            name: self.body.name.clone(),
            version: old.as_ref().map_or(1, |o| o.version + 1),
        };
        let changed = old.as_ref().is_none_or(|o| o.name != record.name);
        if changed {
            people::put_unit_type(conn, &record, ctx.now)?;
        }
        let now = people::unit_type(conn, &self.id)?.ok_or_else(ApiError::internal)?;
        upserted(
            old.is_none(),
            &UnitTypeResult {
                unit_type: now.view(),
            },
        )
    }
}

/// Validates contact fields and resolves the new PIN hash (`None` inside = no PIN).
pub fn contact_record(
    ctx: &Context,
    id: &str,
    body: &ContactBody,
    old: Option<&people::ContactRecord>,
) -> Result<people::ContactRecord, Vec<FieldError>> {
    let mut errors = Vec::new();
    check_name(&mut errors, &body.name);
    let pin_hash = match &body.access_code {
        Patch::Absent => old.and_then(|o| o.pin_hash.clone()),
        Patch::Null => None,
        Patch::Value(code) => match pin::validate(code) {
            Ok(()) => Some(ctx.pin_key.hash(code).to_vec()),
            Err(m) => {
                errors.push(FieldError::new("access_code", m));
                None
            }
        },
    };
    let access_hours = match &body.access_hours {
        Patch::Absent => old.and_then(|o| o.access_hours.clone()),
        Patch::Null => None,
        Patch::Value(h) => {
            if let Err(errs) = h.validate() {
                errors.extend(
                    errs.into_iter()
                        .map(|e| FieldError::new(format!("access_hours.{}", e.field), e.message)),
                );
            }
            Some(h.clone())
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(people::ContactRecord {
        id: id.to_owned(),
        name: body.name.clone(),
        pin_hash,
        access_hours,
        version: old.map_or(1, |o| o.version),
    })
}

/// The 409 for a PIN another contact holds. Says nothing about who.
pub fn access_code_taken() -> ApiError {
    ApiError::new(
        409,
        "access_code_taken",
        "this access code is not available; choose another",
    )
    .with_details(vec![FieldError::new("access_code", "is not available")])
}

impl UpsertContact {
    /// Creates or updates a contact; the PIN is hashed, never stored or echoed.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_path_id(&self.id)?;
        let old = people::contact(conn, &self.id)?;
        let mut record = contact_record(ctx, &self.id, &self.body, old.as_ref())
            .map_err(ApiError::validation)?;
        if let Some(hash) = &record.pin_hash
            && people::pin_owner(conn, hash)?.is_some_and(|owner| owner != self.id)
        {
            return Err(access_code_taken());
        }
        let changed = old.as_ref().is_none_or(|o| {
            (&o.name, &o.pin_hash, &o.access_hours)
                != (&record.name, &record.pin_hash, &record.access_hours)
        });
        if changed {
            record.version = old.as_ref().map_or(1, |o| o.version + 1);
            people::put_contact(conn, &record, ctx.now)?;
        }
        let now = people::contact(conn, &self.id)?.ok_or_else(ApiError::internal)?;
        upserted(
            old.is_none(),
            &ContactResult {
                contact: now.view(),
            },
        )
    }
}

/// Validates tenancy fields.
pub fn tenancy_record(
    id: &str,
    body: &TenancyBody,
    version: i64,
) -> Result<people::TenancyRecord, Vec<FieldError>> {
    let mut errors = Vec::new();
    if let Err(m) = validate_id(&body.contact_id) {
        errors.push(FieldError::new("contact_id", m));
    }
    if body.end_date.is_some_and(|end| end < body.start_date) {
        errors.push(FieldError::new("end_date", "must not be before start_date"));
    }
    let state = body.state.clone().unwrap_or_else(|| "active".to_owned());
    if state.is_empty() || state.len() > 64 {
        errors.push(FieldError::new("state", "must be 1 to 64 characters"));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(people::TenancyRecord {
        id: id.to_owned(),
        contact_id: body.contact_id.clone(),
        start_date: body.start_date,
        end_date: body.end_date,
        state,
        version,
    })
}

impl UpsertTenancy {
    /// Creates or updates a tenancy.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_path_id(&self.id)?;
        let old = people::tenancy(conn, &self.id)?;
        let mut record = tenancy_record(&self.id, &self.body, 1).map_err(ApiError::validation)?;
        if people::contact(conn, &record.contact_id)?.is_none() {
            return Err(ApiError::not_found("contact", &record.contact_id)
                .with_details(vec![FieldError::new("contact_id", "not found")]));
        }
        let changed = old.as_ref().is_none_or(|o| {
            (&o.contact_id, o.start_date, o.end_date, &o.state)
                != (
                    &record.contact_id,
                    record.start_date,
                    record.end_date,
                    &record.state,
                )
        });
        if changed {
            record.version = old.as_ref().map_or(1, |o| o.version + 1);
            people::put_tenancy(conn, &record, ctx.now)?;
            // Another tenant holds the tenancy's units now: their locks follow.
            if old
                .as_ref()
                .is_some_and(|o| o.contact_id != record.contact_id)
            {
                for unit in people::active_units_of_tenancy(conn, &self.id)? {
                    ctx.refresh_hardware(conn, &unit)?;
                }
            }
        }
        let now = people::tenancy(conn, &self.id)?.ok_or_else(ApiError::internal)?;
        upserted(
            old.is_none(),
            &TenancyResult {
                tenancy: now.view(),
            },
        )
    }
}
