//! Unit statuses (DESIGN.md §2).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use utoipa::ToSchema;

/// Where a unit is in its allocation lifecycle, plus the two operator states.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum UnitStatus {
    /// Ready to be allocated.
    Available,
    /// Allocated to a tenancy that has not started yet.
    Reserved,
    /// The tenant has access.
    Occupied,
    /// Access restricted, typically for non-payment.
    Overlocked,
    /// Operator state: taken offline (maintenance).
    Unavailable,
    /// Operator state: contents marked for repossession.
    Repossessed,
}

impl UnitStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [UnitStatus; 6] = [
        UnitStatus::Available,
        UnitStatus::Reserved,
        UnitStatus::Occupied,
        UnitStatus::Overlocked,
        UnitStatus::Unavailable,
        UnitStatus::Repossessed,
    ];

    /// The wire name (`"occupied"`).
    pub fn as_str(self) -> &'static str {
        match self {
            UnitStatus::Available => "available",
            UnitStatus::Reserved => "reserved",
            UnitStatus::Occupied => "occupied",
            UnitStatus::Overlocked => "overlocked",
            UnitStatus::Unavailable => "unavailable",
            UnitStatus::Repossessed => "repossessed",
        }
    }

    /// Whether a unit in this status has an active allocation.
    pub fn has_allocation(self) -> bool {
        matches!(
            self,
            UnitStatus::Reserved
                | UnitStatus::Occupied
                | UnitStatus::Overlocked
                | UnitStatus::Repossessed
        )
    }
}

impl fmt::Display for UnitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`UnitStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown unit status {0:?} (expected one of available, reserved, occupied, overlocked, unavailable, repossessed)"
)]
pub struct UnknownStatus(pub String);

impl FromStr for UnitStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UnitStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_status() {
        for st in UnitStatus::ALL {
            assert_eq!(st.as_str().parse::<UnitStatus>(), Ok(st));
            assert_eq!(serde_json::to_string(&st).unwrap(), format!("\"{st}\""));
        }
        assert!("vacant".parse::<UnitStatus>().is_err());
    }
}
