//! The allocation state machine (DESIGN.md §2): pure decisions, no I/O.
//!
//! Each function takes the facts it needs and returns either the [`Transition`]s to
//! write or a [`Refusal`] that says precisely why nothing changes.

use super::event::EventType;
use super::status::UnitStatus;
use chrono::NaiveDate;

/// What the state machine needs to know about one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFacts {
    /// Unit id.
    pub id: String,
    /// Current status.
    pub status: UnitStatus,
    /// The tenancy of the unit's active allocation, if any.
    pub tenancy_id: Option<String>,
}

/// What the state machine needs to know about a tenancy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenancyFacts {
    /// Tenancy id.
    pub id: String,
    /// First day of the tenancy.
    pub start_date: NaiveDate,
    /// Move-out date, if set.
    pub end_date: Option<NaiveDate>,
}

/// An allocation operation, as named in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `reserve(unit, tenancy)`.
    Reserve,
    /// `grant_access(unit, tenancy)`.
    GrantAccess,
    /// `overlock(contact)`.
    Overlock,
    /// `remove_overlock(contact)`.
    RemoveOverlock,
    /// `deallocate(unit)`.
    Deallocate,
    /// `set_status(unit, status)` for the operator states.
    SetStatus(UnitStatus),
}

impl Action {
    /// The operation name used in the API and in refusals.
    pub fn name(self) -> &'static str {
        match self {
            Action::Reserve => "reserve",
            Action::GrantAccess => "grant_access",
            Action::Overlock => "overlock",
            Action::RemoveOverlock => "remove_overlock",
            Action::Deallocate => "deallocate",
            Action::SetStatus(_) => "set_status",
        }
    }
}

/// What happens to the unit's allocation record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationChange {
    /// Nothing.
    Keep,
    /// A new allocation for this tenancy; `granted` when access is granted in the same step.
    Create {
        /// The tenancy the unit is allocated to.
        tenancy_id: String,
        /// Access granted at once (grant_access on an available unit).
        granted: bool,
    },
    /// The existing reservation now has access.
    Grant,
    /// The allocation ends.
    End,
}

/// One accepted change of one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Unit id.
    pub unit_id: String,
    /// Status before.
    pub from: UnitStatus,
    /// Status after.
    pub to: UnitStatus,
    /// What happens to the allocation.
    pub allocation: AllocationChange,
    /// Events to append, in order.
    pub events: Vec<EventType>,
}

/// Why an operation was refused. Every refusal maps to HTTP 409 and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The unit's status does not allow the action.
    #[error("cannot {} unit {unit_id}: it is {from}{}", .action.name(), allowed_hint(*.action))]
    InvalidTransition {
        /// The refused action.
        action: Action,
        /// Unit id.
        unit_id: String,
        /// Its current status.
        from: UnitStatus,
    },
    /// reserve needs a tenancy that starts after today (site local date).
    #[error(
        "cannot reserve unit {unit_id}: tenancy {tenancy_id} started on {start_date} (site date today is {today}); use grant_access instead"
    )]
    TenancyStarted {
        /// Unit id.
        unit_id: String,
        /// Tenancy id.
        tenancy_id: String,
        /// Its start date.
        start_date: NaiveDate,
        /// Today at the site.
        today: NaiveDate,
    },
    /// The tenancy's end date has passed.
    #[error("cannot {} unit {unit_id}: tenancy {tenancy_id} ended on {end_date}", .action.name())]
    TenancyEnded {
        /// The refused action.
        action: Action,
        /// Unit id.
        unit_id: String,
        /// Tenancy id.
        tenancy_id: String,
        /// Its end date.
        end_date: NaiveDate,
    },
    /// grant_access on a unit reserved for another tenancy.
    #[error(
        "cannot grant access to unit {unit_id} for tenancy {requested}: it is reserved for tenancy {reserved_for}"
    )]
    TenancyMismatch {
        /// Unit id.
        unit_id: String,
        /// The tenancy holding the reservation.
        reserved_for: String,
        /// The tenancy in the request.
        requested: String,
    },
    /// overlock / remove_overlock found no unit of the contact in the needed status.
    #[error("cannot {} for contact {contact_id}: the contact has no {needed} units", .action.name())]
    NoUnitsInStatus {
        /// The refused action.
        action: Action,
        /// Contact id.
        contact_id: String,
        /// The status the action applies to.
        needed: UnitStatus,
    },
    /// set_status to a status that is not an operator state target.
    #[error(
        "set_status cannot set {target}: use the allocation operations (set_status takes unavailable, available or repossessed)"
    )]
    NotAnOperatorStatus {
        /// The requested status.
        target: UnitStatus,
    },
}

fn allowed_hint(action: Action) -> String {
    let from: &[UnitStatus] = match action {
        Action::Reserve => &[UnitStatus::Available],
        Action::GrantAccess => &[UnitStatus::Available, UnitStatus::Reserved],
        Action::Overlock => &[UnitStatus::Occupied],
        Action::RemoveOverlock => &[UnitStatus::Overlocked],
        Action::Deallocate => &DEALLOCATABLE,
        Action::SetStatus(t) => set_status_sources(t),
    };
    let names: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let verb = match action {
        Action::SetStatus(t) => format!(" (set_status {t} needs"),
        _ => " (it needs".to_owned(),
    };
    format!("{verb} {})", names.join(" or "))
}

impl Refusal {
    /// The stable error code for the API error shape.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InvalidTransition { .. } => "invalid_transition",
            Refusal::TenancyStarted { .. } => "tenancy_started",
            Refusal::TenancyEnded { .. } => "tenancy_ended",
            Refusal::TenancyMismatch { .. } => "tenancy_mismatch",
            Refusal::NoUnitsInStatus { .. } => "no_units_in_status",
            Refusal::NotAnOperatorStatus { .. } => "invalid_transition",
        }
    }
}

/// The statuses `deallocate` takes a unit from.
pub const DEALLOCATABLE: [UnitStatus; 4] = [
    UnitStatus::Reserved,
    UnitStatus::Occupied,
    UnitStatus::Overlocked,
    UnitStatus::Repossessed,
];

fn set_status_sources(target: UnitStatus) -> &'static [UnitStatus] {
    match target {
        UnitStatus::Unavailable => &[UnitStatus::Available],
        UnitStatus::Available => &[UnitStatus::Unavailable],
        UnitStatus::Repossessed => &[UnitStatus::Occupied, UnitStatus::Overlocked],
        _ => &[],
    }
}

fn refuse(action: Action, unit: &UnitFacts) -> Refusal {
    Refusal::InvalidTransition {
        action,
        unit_id: unit.id.clone(),
        from: unit.status,
    }
}

fn ended(
    action: Action,
    unit: &UnitFacts,
    tenancy: &TenancyFacts,
    today: NaiveDate,
) -> Option<Refusal> {
    match tenancy.end_date {
        Some(end) if end < today => Some(Refusal::TenancyEnded {
            action,
            unit_id: unit.id.clone(),
            tenancy_id: tenancy.id.clone(),
            end_date: end,
        }),
        _ => None,
    }
}

/// `reserve`: available → reserved, for a tenancy that starts strictly after `today`.
pub fn reserve(
    unit: &UnitFacts,
    tenancy: &TenancyFacts,
    today: NaiveDate,
) -> Result<Transition, Refusal> {
    if unit.status != UnitStatus::Available {
        return Err(refuse(Action::Reserve, unit));
    }
    if tenancy.start_date <= today {
        return Err(Refusal::TenancyStarted {
            unit_id: unit.id.clone(),
            tenancy_id: tenancy.id.clone(),
            start_date: tenancy.start_date,
            today,
        });
    }
    Ok(Transition {
        unit_id: unit.id.clone(),
        from: unit.status,
        to: UnitStatus::Reserved,
        allocation: AllocationChange::Create {
            tenancy_id: tenancy.id.clone(),
            granted: false,
        },
        events: vec![EventType::UnitReserved],
    })
}

/// `grant_access`: reserved (same tenancy) → occupied, or available → occupied in one step.
pub fn grant_access(
    unit: &UnitFacts,
    tenancy: &TenancyFacts,
    today: NaiveDate,
) -> Result<Transition, Refusal> {
    let allocation = match unit.status {
        UnitStatus::Reserved => match &unit.tenancy_id {
            Some(t) if *t == tenancy.id => AllocationChange::Grant,
            other => {
                return Err(Refusal::TenancyMismatch {
                    unit_id: unit.id.clone(),
                    reserved_for: other.clone().unwrap_or_default(),
                    requested: tenancy.id.clone(),
                });
            }
        },
        UnitStatus::Available => AllocationChange::Create {
            tenancy_id: tenancy.id.clone(),
            granted: true,
        },
        _ => return Err(refuse(Action::GrantAccess, unit)),
    };
    if let Some(r) = ended(Action::GrantAccess, unit, tenancy, today) {
        return Err(r);
    }
    Ok(Transition {
        unit_id: unit.id.clone(),
        from: unit.status,
        to: UnitStatus::Occupied,
        allocation,
        events: vec![EventType::UnitOccupied],
    })
}

/// `deallocate`: reserved, occupied, overlocked or repossessed → available; the allocation ends.
pub fn deallocate(unit: &UnitFacts) -> Result<Transition, Refusal> {
    if !DEALLOCATABLE.contains(&unit.status) {
        return Err(refuse(Action::Deallocate, unit));
    }
    Ok(Transition {
        unit_id: unit.id.clone(),
        from: unit.status,
        to: UnitStatus::Available,
        allocation: AllocationChange::End,
        events: vec![EventType::UnitDeallocated, EventType::UnitAvailable],
    })
}

/// `set_status` for the operator states.
pub fn set_status(unit: &UnitFacts, target: UnitStatus) -> Result<Transition, Refusal> {
    let sources = set_status_sources(target);
    if sources.is_empty() {
        return Err(Refusal::NotAnOperatorStatus { target });
    }
    if !sources.contains(&unit.status) {
        return Err(refuse(Action::SetStatus(target), unit));
    }
    Ok(Transition {
        unit_id: unit.id.clone(),
        from: unit.status,
        to: target,
        allocation: AllocationChange::Keep,
        events: vec![EventType::UnitStatusChanged],
    })
}

fn contact_wide(
    action: Action,
    contact_id: &str,
    units: &[UnitFacts],
    from: UnitStatus,
    to: UnitStatus,
    event: EventType,
) -> Result<Vec<Transition>, Refusal> {
    let changes: Vec<Transition> = units
        .iter()
        .filter(|u| u.status == from)
        .map(|u| Transition {
            unit_id: u.id.clone(),
            from,
            to,
            allocation: AllocationChange::Keep,
            events: vec![event],
        })
        .collect();
    if changes.is_empty() {
        return Err(Refusal::NoUnitsInStatus {
            action,
            contact_id: contact_id.to_owned(),
            needed: from,
        });
    }
    Ok(changes)
}

/// `overlock`: every occupied unit of the contact → overlocked. `units` are the contact's
/// allocated units; those in other statuses are left alone.
pub fn overlock(contact_id: &str, units: &[UnitFacts]) -> Result<Vec<Transition>, Refusal> {
    contact_wide(
        Action::Overlock,
        contact_id,
        units,
        UnitStatus::Occupied,
        UnitStatus::Overlocked,
        EventType::UnitOverlocked,
    )
}

/// `remove_overlock`: every overlocked unit of the contact → occupied.
pub fn remove_overlock(contact_id: &str, units: &[UnitFacts]) -> Result<Vec<Transition>, Refusal> {
    contact_wide(
        Action::RemoveOverlock,
        contact_id,
        units,
        UnitStatus::Overlocked,
        UnitStatus::Occupied,
        EventType::UnitOccupied,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use UnitStatus::*;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }
    fn unit(status: UnitStatus, tenancy: Option<&str>) -> UnitFacts {
        UnitFacts {
            id: "u1".into(),
            status,
            tenancy_id: tenancy.map(Into::into),
        }
    }
    fn tenancy(start: &str, end: Option<&str>) -> TenancyFacts {
        TenancyFacts {
            id: "t1".into(),
            start_date: day(start),
            end_date: end.map(day),
        }
    }
    const TODAY: &str = "2026-03-10";

    #[test]
    fn reserve_needs_available_and_future_start() {
        let t = reserve(
            &unit(Available, None),
            &tenancy("2026-03-11", None),
            day(TODAY),
        )
        .unwrap();
        assert_eq!((t.from, t.to), (Available, Reserved));
        assert_eq!(t.events, vec![EventType::UnitReserved]);
        let err = reserve(&unit(Available, None), &tenancy(TODAY, None), day(TODAY)).unwrap_err();
        assert_eq!(err.code(), "tenancy_started");
        for st in [Reserved, Occupied, Overlocked, Unavailable, Repossessed] {
            let err =
                reserve(&unit(st, None), &tenancy("2027-01-01", None), day(TODAY)).unwrap_err();
            assert_eq!(err.code(), "invalid_transition", "{st}");
        }
    }

    #[test]
    fn grant_access_paths() {
        let t = grant_access(
            &unit(Reserved, Some("t1")),
            &tenancy("2026-04-01", None),
            day(TODAY),
        )
        .unwrap();
        assert_eq!(t.allocation, AllocationChange::Grant);
        let t = grant_access(
            &unit(Available, None),
            &tenancy("2026-01-01", None),
            day(TODAY),
        )
        .unwrap();
        assert!(matches!(
            t.allocation,
            AllocationChange::Create { granted: true, .. }
        ));
        let err = grant_access(
            &unit(Reserved, Some("t2")),
            &tenancy("2026-04-01", None),
            day(TODAY),
        )
        .unwrap_err();
        assert_eq!(err.code(), "tenancy_mismatch");
        let err = grant_access(
            &unit(Available, None),
            &tenancy("2026-01-01", Some("2026-03-09")),
            day(TODAY),
        )
        .unwrap_err();
        assert_eq!(err.code(), "tenancy_ended");
        // The end date itself is still a tenancy day.
        assert!(
            grant_access(
                &unit(Available, None),
                &tenancy("2026-01-01", Some(TODAY)),
                day(TODAY)
            )
            .is_ok()
        );
        for st in [Occupied, Overlocked, Unavailable, Repossessed] {
            assert_eq!(
                grant_access(
                    &unit(st, Some("t1")),
                    &tenancy("2026-01-01", None),
                    day(TODAY)
                )
                .unwrap_err()
                .code(),
                "invalid_transition"
            );
        }
    }

    #[test]
    fn deallocate_from_allocated_states_only() {
        for st in [Reserved, Occupied, Overlocked, Repossessed] {
            let t = deallocate(&unit(st, Some("t1"))).unwrap();
            assert_eq!(t.to, Available);
            assert_eq!(
                t.events,
                vec![EventType::UnitDeallocated, EventType::UnitAvailable]
            );
        }
        for st in [Available, Unavailable] {
            assert!(deallocate(&unit(st, None)).is_err());
        }
    }

    #[test]
    fn operator_states() {
        assert_eq!(
            set_status(&unit(Available, None), Unavailable).unwrap().to,
            Unavailable
        );
        assert_eq!(
            set_status(&unit(Unavailable, None), Available).unwrap().to,
            Available
        );
        assert_eq!(
            set_status(&unit(Occupied, Some("t1")), Repossessed)
                .unwrap()
                .to,
            Repossessed
        );
        assert_eq!(
            set_status(&unit(Overlocked, Some("t1")), Repossessed)
                .unwrap()
                .to,
            Repossessed
        );
        assert!(set_status(&unit(Reserved, Some("t1")), Unavailable).is_err());
        assert!(set_status(&unit(Available, None), Available).is_err());
        assert!(set_status(&unit(Reserved, Some("t1")), Repossessed).is_err());
        for target in [Reserved, Occupied, Overlocked] {
            assert!(matches!(
                set_status(&unit(Available, None), target),
                Err(Refusal::NotAnOperatorStatus { .. })
            ));
        }
    }

    #[test]
    fn overlock_touches_only_occupied_units() {
        let units = vec![
            UnitFacts {
                id: "a".into(),
                status: Occupied,
                tenancy_id: Some("t1".into()),
            },
            UnitFacts {
                id: "b".into(),
                status: Reserved,
                tenancy_id: Some("t2".into()),
            },
            UnitFacts {
                id: "c".into(),
                status: Occupied,
                tenancy_id: Some("t2".into()),
            },
        ];
        let ts = overlock("c1", &units).unwrap();
        assert_eq!(
            ts.iter().map(|t| t.unit_id.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(
            remove_overlock("c1", &units).unwrap_err().code(),
            "no_units_in_status"
        );
    }

    #[test]
    fn refusal_messages_name_the_rule() {
        let msg = reserve(
            &unit(Occupied, Some("t1")),
            &tenancy("2027-01-01", None),
            day(TODAY),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            msg,
            "cannot reserve unit u1: it is occupied (it needs available)"
        );
    }
}
