//! The automations of DESIGN.md §2 as commands: move-in on the start date, deallocate after
//! the end date, overlock on `payment.failed`. Each reads the site's settings and re-checks,
//! inside its own transaction, that the state still calls for it: a transition that no
//! longer applies changes nothing and answers `applied: false`, so none ever runs twice.

use super::allocation::write_transition;
use super::{Applied, Context};
use crate::api::error::ApiError;
use crate::domain::allocation::{self as rules, Refusal};
use crate::domain::schedule::{deallocate_at, move_in_at};
use crate::domain::{FieldError, UnitStatus};
use crate::model::PaymentFailedResult;
use crate::store::{people, site, units};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The `by` the automations record on allocations and events.
pub const BY: &str = "automation";

/// One unit's automatic transition for the tenancy holding it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Due {
    /// Unit id.
    pub unit_id: String,
    /// The tenancy of the unit's active allocation when the transition was found due.
    pub tenancy_id: String,
}

/// What an automatic transition did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutomationResult {
    /// Whether the unit changed.
    pub applied: bool,
    /// Why not, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn skipped(reason: impl Into<String>) -> Result<Applied, ApiError> {
    Applied::ok(&AutomationResult {
        applied: false,
        reason: Some(reason.into()),
    })
}

fn applied() -> Result<Applied, ApiError> {
    Applied::ok(&AutomationResult {
        applied: true,
        reason: None,
    })
}

impl Due {
    /// The unit as it is now, if it is still held by this tenancy in one of `statuses`.
    fn held(
        &self,
        conn: &Connection,
        statuses: &[UnitStatus],
    ) -> Result<Option<(units::UnitRow, people::TenancyRecord)>, ApiError> {
        let Some(unit) = units::get(conn, &self.unit_id)? else {
            return Ok(None);
        };
        if !statuses.contains(&unit.record.status)
            || unit.tenancy_id.as_deref() != Some(self.tenancy_id.as_str())
        {
            return Ok(None);
        }
        Ok(people::tenancy(conn, &self.tenancy_id)?.map(|t| (unit, t)))
    }

    /// Auto move-in: reserved → occupied (grant_access by `automation`) once the site-local
    /// move-in time of the tenancy's start date has come.
    pub fn move_in(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let settings = site::automations(conn)?;
        if !settings.auto_occupy {
            return skipped("auto_occupy is off");
        }
        let Some((unit, tenancy)) = self.held(conn, &[UnitStatus::Reserved])? else {
            return skipped("the unit is no longer reserved for this tenancy");
        };
        if move_in_at(tenancy.start_date, settings.auto_occupy_at, ctx.tz) > ctx.now {
            return skipped("the move-in time has not come");
        }
        match rules::grant_access(&unit.facts(), &tenancy.facts(), ctx.today()) {
            Ok(t) => {
                write_transition(conn, ctx, &t, Some(BY))?;
                applied()
            }
            Err(r) => skipped(r.to_string()),
        }
    }

    /// Auto deallocate: the unit of a tenancy whose end date has passed → available.
    pub fn deallocate(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let settings = site::automations(conn)?;
        if !settings.auto_deallocate {
            return skipped("auto_deallocate is off");
        }
        let Some((unit, tenancy)) = self.held(conn, &rules::DEALLOCATABLE)? else {
            return skipped("the unit is no longer allocated to this tenancy");
        };
        match tenancy.end_date {
            Some(end) if deallocate_at(end, ctx.tz) <= ctx.now => {}
            _ => return skipped("the tenancy has not ended"),
        }
        match rules::deallocate(&unit.facts()) {
            Ok(t) => {
                write_transition(conn, ctx, &t, Some(BY))?;
                applied()
            }
            Err(r) => skipped(r.to_string()),
        }
    }
}

/// Body of `payment_failed`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentFailedBody {
    /// The id of the `payment.failed` event at its source, for the record.
    #[serde(default)]
    pub event_id: Option<String>,
}

/// A `payment.failed` event for a contact: auto overlock, when the site has it on.
#[derive(Debug, Clone)]
pub struct PaymentFailed {
    /// Contact id.
    pub contact_id: String,
    /// Body.
    pub body: PaymentFailedBody,
}

impl PaymentFailed {
    /// Overlocks every occupied unit of the contact if `auto_overlock` is on; otherwise, or
    /// when the contact has no occupied unit, changes nothing and says why.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        if self.body.event_id.as_ref().is_some_and(|e| e.len() > 128) {
            return Err(ApiError::validation(vec![FieldError::new(
                "event_id",
                "must be at most 128 characters",
            )]));
        }
        if people::contact(conn, &self.contact_id)?.is_none() {
            return Err(ApiError::not_found("contact", &self.contact_id));
        }
        let nothing = |reason: &str| {
            Applied::ok(&PaymentFailedResult {
                overlocked: false,
                reason: Some(reason.to_owned()),
                event_id: self.body.event_id.clone(),
                units: Vec::new(),
            })
        };
        if !site::automations(conn)?.auto_overlock {
            return nothing("auto_overlock is off");
        }
        let facts: Vec<_> = units::of_contact(conn, &self.contact_id)?
            .iter()
            .map(units::UnitRow::facts)
            .collect();
        let transitions = match rules::overlock(&self.contact_id, &facts) {
            Ok(t) => t,
            Err(Refusal::NoUnitsInStatus { .. }) => {
                return nothing("the contact has no occupied units");
            }
            Err(r) => return Err(r.into()),
        };
        let mut views = Vec::with_capacity(transitions.len());
        for t in &transitions {
            write_transition(conn, ctx, t, Some(BY))?;
            let row = units::get(conn, &t.unit_id)?.ok_or_else(ApiError::internal)?;
            views.push(row.view());
        }
        tracing::info!(
            contact_id = %self.contact_id,
            event_id = ?self.body.event_id,
            units = views.len(),
            "payment failed: units overlocked"
        );
        Applied::ok(&PaymentFailedResult {
            overlocked: true,
            reason: None,
            event_id: self.body.event_id,
            units: views,
        })
    }
}
