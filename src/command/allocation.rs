//! reserve, grant_access, deallocate, set_status, overlock, remove_overlock.

use super::{Applied, Context, check_by};
use crate::api::error::ApiError;
use crate::domain::UnitStatus;
use crate::domain::allocation::{self as rules, AllocationChange, Transition};
use crate::model::{AllocationView, UnitResult, UnitsResult};
use crate::store::{people, timestamp, units};
use rusqlite::Connection;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

/// Body of reserve and grant_access.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocationBody {
    /// The tenancy to allocate the unit to.
    pub tenancy_id: String,
    /// Who did it (free text, for the record).
    #[serde(default)]
    pub by: Option<String>,
}

/// Body of deallocate, overlock and remove_overlock.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ByBody {
    /// Who did it.
    #[serde(default)]
    pub by: Option<String>,
}

/// Body of set_status.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStatusBody {
    /// `unavailable`, `available` (from unavailable) or `repossessed`.
    pub status: UnitStatus,
    /// Who did it.
    #[serde(default)]
    pub by: Option<String>,
}

/// reserve / grant_access of one unit for a tenancy.
#[derive(Debug, Clone)]
pub struct UnitAllocation {
    /// Unit id (path).
    pub unit_id: String,
    /// Body.
    pub body: AllocationBody,
}

/// deallocate of one unit.
#[derive(Debug, Clone)]
pub struct UnitOnly {
    /// Unit id (path).
    pub unit_id: String,
    /// Body.
    pub body: ByBody,
}

/// set_status of one unit.
#[derive(Debug, Clone)]
pub struct SetStatus {
    /// Unit id (path).
    pub unit_id: String,
    /// Body.
    pub body: SetStatusBody,
}

/// overlock / remove_overlock of every unit of a contact.
#[derive(Debug, Clone)]
pub struct ContactOnly {
    /// Contact id (path).
    pub contact_id: String,
    /// Body.
    pub body: ByBody,
}

fn load_unit(conn: &Connection, ctx: &Context, unit_id: &str) -> Result<units::UnitRow, ApiError> {
    let row = units::get(conn, unit_id)?.ok_or_else(|| ApiError::not_found("unit", unit_id))?;
    ctx.check_version(unit_id, row.record.version)?;
    Ok(row)
}

fn load_tenancy(conn: &Connection, id: &str) -> Result<people::TenancyRecord, ApiError> {
    people::tenancy(conn, id)?.ok_or_else(|| {
        ApiError::not_found("tenancy", id).with_details(vec![crate::domain::FieldError::new(
            "tenancy_id",
            "not found",
        )])
    })
}

/// Writes one accepted transition: status, allocation, events. Returns the allocation touched.
pub fn write_transition(
    conn: &Connection,
    ctx: &Context,
    t: &Transition,
    by: Option<&str>,
) -> Result<Option<AllocationView>, ApiError> {
    units::set_status(conn, &t.unit_id, t.to, ctx.now)?;
    let now = timestamp(ctx.now);
    let by = by.map(str::to_owned);
    let allocation = match &t.allocation {
        AllocationChange::Keep => people::active_allocation(conn, &t.unit_id)?,
        AllocationChange::Create {
            tenancy_id,
            granted,
        } => {
            let a = AllocationView {
                id: format!("alloc_{}", uuid::Uuid::new_v4().simple()),
                unit_id: t.unit_id.clone(),
                tenancy_id: tenancy_id.clone(),
                reserved_at: (!granted).then(|| now.clone()),
                reserved_by: if *granted { None } else { by.clone() },
                granted_access_at: granted.then(|| now.clone()),
                granted_access_by: if *granted { by.clone() } else { None },
                ended_at: None,
                ended_by: None,
            };
            people::put_allocation(conn, &a)?;
            Some(a)
        }
        AllocationChange::Grant | AllocationChange::End => {
            let mut a =
                people::active_allocation(conn, &t.unit_id)?.ok_or_else(ApiError::internal)?;
            if t.allocation == AllocationChange::Grant {
                a.granted_access_at = Some(now.clone());
                a.granted_access_by = by.clone();
            } else {
                a.ended_at = Some(now.clone());
                a.ended_by = by.clone();
            }
            people::put_allocation(conn, &a)?;
            Some(a)
        }
    };
    let tenancy_id = allocation.as_ref().map(|a| a.tenancy_id.clone());
    let contact_id = match &tenancy_id {
        Some(id) => people::tenancy(conn, id)?.map(|t| t.contact_id),
        None => None,
    };
    ctx.refresh_hardware(conn, &t.unit_id)?;
    for kind in &t.events {
        ctx.emit(
            conn,
            *kind,
            json!({
                "unit_id": t.unit_id,
                "from": t.from,
                "to": t.to,
                "allocation_id": allocation.as_ref().map(|a| &a.id),
                "tenancy_id": tenancy_id,
                "contact_id": contact_id,
                "by": by,
            }),
        )?;
    }
    Ok(allocation)
}

fn unit_reply(
    conn: &Connection,
    unit_id: &str,
    allocation: Option<AllocationView>,
) -> Result<Applied, ApiError> {
    let row = units::get(conn, unit_id)?.ok_or_else(ApiError::internal)?;
    Applied::ok(&UnitResult {
        unit: row.view(),
        allocation,
    })
}

impl UnitAllocation {
    /// available → reserved.
    pub fn reserve(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_by(&self.body.by)?;
        let unit = load_unit(conn, ctx, &self.unit_id)?;
        let tenancy = load_tenancy(conn, &self.body.tenancy_id)?;
        let t = rules::reserve(&unit.facts(), &tenancy.facts(), ctx.today())?;
        let a = write_transition(conn, ctx, &t, self.body.by.as_deref())?;
        unit_reply(conn, &self.unit_id, a)
    }

    /// reserved (same tenancy) or available → occupied.
    pub fn grant_access(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_by(&self.body.by)?;
        let unit = load_unit(conn, ctx, &self.unit_id)?;
        let tenancy = load_tenancy(conn, &self.body.tenancy_id)?;
        let t = rules::grant_access(&unit.facts(), &tenancy.facts(), ctx.today())?;
        let a = write_transition(conn, ctx, &t, self.body.by.as_deref())?;
        unit_reply(conn, &self.unit_id, a)
    }
}

impl UnitOnly {
    /// → available; the allocation ends.
    pub fn deallocate(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_by(&self.body.by)?;
        let unit = load_unit(conn, ctx, &self.unit_id)?;
        let t = rules::deallocate(&unit.facts())?;
        let a = write_transition(conn, ctx, &t, self.body.by.as_deref())?;
        unit_reply(conn, &self.unit_id, a)
    }
}

impl SetStatus {
    /// Operator states.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        check_by(&self.body.by)?;
        let unit = load_unit(conn, ctx, &self.unit_id)?;
        let t = rules::set_status(&unit.facts(), self.body.status)?;
        let a = write_transition(conn, ctx, &t, self.body.by.as_deref())?;
        unit_reply(conn, &self.unit_id, a)
    }
}

impl ContactOnly {
    fn contact_wide(
        self,
        conn: &Connection,
        ctx: &Context,
        decide: fn(&str, &[rules::UnitFacts]) -> Result<Vec<Transition>, rules::Refusal>,
    ) -> Result<Applied, ApiError> {
        check_by(&self.body.by)?;
        if people::contact(conn, &self.contact_id)?.is_none() {
            return Err(ApiError::not_found("contact", &self.contact_id));
        }
        let facts: Vec<_> = units::of_contact(conn, &self.contact_id)?
            .iter()
            .map(units::UnitRow::facts)
            .collect();
        let transitions = decide(&self.contact_id, &facts)?;
        let mut views = Vec::with_capacity(transitions.len());
        for t in &transitions {
            write_transition(conn, ctx, t, self.body.by.as_deref())?;
            let row = units::get(conn, &t.unit_id)?.ok_or_else(ApiError::internal)?;
            views.push(row.view());
        }
        Applied::ok(&UnitsResult { units: views })
    }

    /// Every occupied unit of the contact → overlocked.
    pub fn overlock(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        self.contact_wide(conn, ctx, rules::overlock)
    }

    /// Every overlocked unit of the contact → occupied.
    pub fn remove_overlock(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        self.contact_wide(conn, ctx, rules::remove_overlock)
    }
}
