//! The pure domain core: statuses, the allocation state machine, desired hardware state,
//! unit records and their validation, access hours, PIN hashing. No I/O, no async, no SQL.

pub mod access;
pub mod allocation;
pub mod catalog;
pub mod desired;
pub mod event;
pub mod hours;
pub mod patch;
pub mod pin;
pub mod schedule;
pub mod status;
pub mod unit;

pub use event::{Event, EventType};
pub use patch::Patch;
pub use status::UnitStatus;

use serde::Serialize;
use utoipa::ToSchema;

/// A problem with one field of a request, as in the error shape's `details`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// The field, as a path (`unit.width`, `units[2].name`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}
