//! API representations: what the HTTP and MQTT APIs return. Built from store rows.

use crate::domain::UnitStatus;
use crate::domain::hours::AccessHours;
use crate::domain::unit::{AccessType, DoorSensor, DoorType, LockBinding};
use serde::Serialize;
use utoipa::ToSchema;

/// The unit type embedded in a unit (storEDGE).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitTypeRef {
    /// Unit type id.
    pub id: String,
    /// Unit type name.
    pub name: String,
}

/// A unit with storEDGE field names, plus status, bindings and version.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitView {
    /// Unit id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Same as `standard_rate` (storEDGE).
    pub price: f64,
    /// Description.
    pub description: Option<String>,
    /// Width.
    pub width: f64,
    /// Length.
    pub length: f64,
    /// Height.
    pub height: f64,
    /// Door height.
    pub door_height: f64,
    /// Door width.
    pub door_width: f64,
    /// Door type.
    pub door_type: DoorType,
    /// Access type.
    pub access_type: AccessType,
    /// Floor.
    pub floor: Option<i64>,
    /// Directions.
    pub directions: Option<String>,
    /// `WxLxH`.
    pub size: String,
    /// Width × length.
    pub area: f64,
    /// Standard rate.
    pub standard_rate: f64,
    /// Walk-through order.
    pub walk_thru_order: i64,
    /// Available and rentable.
    pub available_for_move_in: bool,
    /// Rentable.
    pub rentable: bool,
    /// Allocation status.
    pub status: UnitStatus,
    /// Gatelock: the tenant's PIN does not open the gate for this unit (the unit's lock and
    /// overlock are unaffected).
    pub gatelock: bool,
    /// Contact id of the active allocation's tenancy.
    pub current_tenant_id: Option<String>,
    /// Tenancy id of the active allocation.
    pub current_tenancy_id: Option<String>,
    /// Combination lock number.
    pub combination_lock_number: Option<String>,
    /// Overlock lock number.
    pub overlock_lock_number: Option<String>,
    /// Attribute description.
    pub attribute_description: Option<String>,
    /// Rank.
    pub rank: Option<i64>,
    /// Amenity ids.
    pub unit_amenities: Vec<String>,
    /// Tax rate ids.
    pub tax_rates: Vec<String>,
    /// Unit type.
    pub unit_type: UnitTypeRef,
    /// Gate zones.
    pub zones: Vec<String>,
    /// Lock binding.
    pub lock: Option<LockBinding>,
    /// Door sensor.
    pub door_sensor: Option<DoorSensor>,
    /// Increments on every change; the `ETag`.
    pub version: i64,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last changed (RFC 3339).
    pub updated_at: String,
}

/// A unit type.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitTypeView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: i64,
}

/// A contact. The access code is write-only: only whether one is set is shown.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ContactView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Whether an access code is set.
    pub has_access_code: bool,
    /// Contact-specific access hours (within the site's).
    pub access_hours: Option<AccessHours>,
    /// Version.
    pub version: i64,
}

/// A tenancy.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TenancyView {
    /// Id.
    pub id: String,
    /// Contact id.
    pub contact_id: String,
    /// Start date (ISO).
    pub start_date: String,
    /// Move-out date (ISO), if set.
    pub end_date: Option<String>,
    /// State as the cloud names it.
    pub state: String,
    /// Version.
    pub version: i64,
}

/// A unit allocation.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AllocationView {
    /// Id.
    pub id: String,
    /// Unit id.
    pub unit_id: String,
    /// Tenancy id.
    pub tenancy_id: String,
    /// Reserved at.
    pub reserved_at: Option<String>,
    /// Reserved by.
    pub reserved_by: Option<String>,
    /// Access granted at.
    pub granted_access_at: Option<String>,
    /// Access granted by.
    pub granted_access_by: Option<String>,
    /// Ended at.
    pub ended_at: Option<String>,
    /// Ended by.
    pub ended_by: Option<String>,
}

/// storEDGE pagination meta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Pagination {
    /// Current page (1-based).
    pub current_page: u64,
    /// Number of pages.
    pub total_pages: u64,
    /// Page size (`limit`).
    pub per_page: u64,
    /// Number of matching entries.
    pub total_entries: u64,
    /// Previous page, if any.
    pub previous_page: Option<u64>,
    /// Next page, if any.
    pub next_page: Option<u64>,
}

impl Pagination {
    /// Pagination for `limit`/`offset` over `total` entries.
    pub fn new(limit: u64, offset: u64, total: u64) -> Self {
        let limit = limit.max(1);
        let current_page = offset / limit + 1;
        Pagination {
            current_page,
            total_pages: total.div_ceil(limit),
            per_page: limit,
            total_entries: total,
            previous_page: (current_page > 1).then(|| current_page - 1),
            next_page: (offset + limit < total).then(|| current_page + 1),
        }
    }
}

/// `{"meta": {"pagination": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ListMeta {
    /// Pagination.
    pub pagination: Pagination,
}

#[cfg(test)]
mod tests {
    use super::Pagination;

    #[test]
    fn pagination_edges() {
        let p = Pagination::new(10, 0, 0);
        assert_eq!(
            (p.current_page, p.total_pages, p.previous_page, p.next_page),
            (1, 0, None, None)
        );
        let p = Pagination::new(10, 0, 10);
        assert_eq!((p.total_pages, p.next_page), (1, None));
        let p = Pagination::new(10, 10, 21);
        assert_eq!(
            (p.current_page, p.total_pages, p.previous_page, p.next_page),
            (2, 3, Some(1), Some(3))
        );
        let p = Pagination::new(10, 20, 21);
        assert_eq!((p.current_page, p.next_page), (3, None));
        let p = Pagination::new(10, 50, 21);
        assert_eq!(
            (p.current_page, p.previous_page, p.next_page),
            (6, Some(5), None)
        );
    }
}

/// One unit and its allocation (allocation operations).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitResult {
    /// The unit after the change.
    pub unit: UnitView,
    /// Its allocation (the ended one after deallocate), if any.
    pub allocation: Option<AllocationView>,
}

/// One unit (GET, PATCH, PUT).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitEnvelope {
    /// The unit.
    pub unit: UnitView,
}

/// Several units (overlock, remove_overlock, create, bulk).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitsResult {
    /// The units.
    pub units: Vec<UnitView>,
}

/// What `payment_failed` did: the units it overlocked, or why it changed nothing.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PaymentFailedResult {
    /// Whether any unit was overlocked.
    pub overlocked: bool,
    /// Why nothing changed (`auto_overlock is off`, no occupied units).
    pub reason: Option<String>,
    /// The event id given in the request.
    pub event_id: Option<String>,
    /// The units overlocked.
    pub units: Vec<UnitView>,
}

/// A page of units.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitList {
    /// The units.
    pub units: Vec<UnitView>,
    /// Pagination.
    pub meta: ListMeta,
}

/// A unit type (upsert).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct UnitTypeResult {
    /// The unit type.
    pub unit_type: UnitTypeView,
}

/// A contact (upsert, GET).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ContactResult {
    /// The contact.
    pub contact: ContactView,
}

/// A tenancy (upsert, GET).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct TenancyResult {
    /// The tenancy.
    pub tenancy: TenancyView,
}

/// A page of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EventPage {
    /// Events, oldest first.
    pub events: Vec<crate::domain::Event>,
    /// Pass as `after` for the next page.
    pub next_after: i64,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the replica answers.
    pub status: String,
    /// Site id.
    pub site_id: String,
    /// Build version.
    pub version: String,
}
