//! Event types of the site event log (DESIGN.md §2).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The type of an event in the log. The wire name is `as_str()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    /// `unit.reserved`
    #[serde(rename = "unit.reserved")]
    UnitReserved,
    /// `unit.occupied`
    #[serde(rename = "unit.occupied")]
    UnitOccupied,
    /// `unit.overlocked`
    #[serde(rename = "unit.overlocked")]
    UnitOverlocked,
    /// `unit.deallocated`
    #[serde(rename = "unit.deallocated")]
    UnitDeallocated,
    /// `unit.available`
    #[serde(rename = "unit.available")]
    UnitAvailable,
    /// `unit.status_changed` (operator states).
    #[serde(rename = "unit.status_changed")]
    UnitStatusChanged,
    /// `unit.created`: a unit was added (API or snapshot).
    #[serde(rename = "unit.created")]
    UnitCreated,
    /// `unit.updated`: a unit's fields or bindings changed (API or snapshot).
    #[serde(rename = "unit.updated")]
    UnitUpdated,
    /// `unit.deleted`: a snapshot no longer holds the unit.
    #[serde(rename = "unit.deleted")]
    UnitDeleted,
    /// `access.granted`
    #[serde(rename = "access.granted")]
    AccessGranted,
    /// `access.denied`
    #[serde(rename = "access.denied")]
    AccessDenied,
    /// `door.alarm`
    #[serde(rename = "door.alarm")]
    DoorAlarm,
    /// `device.offline`
    #[serde(rename = "device.offline")]
    DeviceOffline,
    /// `device.online`
    #[serde(rename = "device.online")]
    DeviceOnline,
    /// `queue.full`: the undelivered backlog passed `cloud.backlog_cap_mib` (an alarm).
    #[serde(rename = "queue.full")]
    QueueFull,
    /// `queue.ok`: the backlog is back under the cap after a `queue.full`.
    #[serde(rename = "queue.ok")]
    QueueOk,
    /// `access.compacted`: counts of undelivered access events compacted in place.
    #[serde(rename = "access.compacted")]
    AccessCompacted,
}

impl EventType {
    /// The wire name, e.g. `"unit.reserved"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::UnitReserved => "unit.reserved",
            EventType::UnitOccupied => "unit.occupied",
            EventType::UnitOverlocked => "unit.overlocked",
            EventType::UnitDeallocated => "unit.deallocated",
            EventType::UnitAvailable => "unit.available",
            EventType::UnitStatusChanged => "unit.status_changed",
            EventType::UnitCreated => "unit.created",
            EventType::UnitUpdated => "unit.updated",
            EventType::UnitDeleted => "unit.deleted",
            EventType::AccessGranted => "access.granted",
            EventType::AccessDenied => "access.denied",
            EventType::DoorAlarm => "door.alarm",
            EventType::DeviceOffline => "device.offline",
            EventType::DeviceOnline => "device.online",
            EventType::QueueFull => "queue.full",
            EventType::QueueOk => "queue.ok",
            EventType::AccessCompacted => "access.compacted",
        }
    }
}

/// One entry of the event log, as the API and the uplinks carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Position in the site's log: gapless and increasing.
    pub seq: i64,
    /// Globally unique event id.
    pub id: String,
    /// Event type, e.g. `unit.reserved`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it happened (RFC 3339, UTC).
    pub occurred_at: String,
    /// The site the event belongs to.
    pub site_id: String,
    /// Type-specific fields.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}
