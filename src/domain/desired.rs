//! Desired hardware state as a pure function of the replica (DESIGN.md §4 table):
//!
//! | unit status | PIN at its zones' gates | smart lock | overlock relay coil |
//! |---|---|---|---|
//! | occupied | allowed within access hours | assigned to tenant | off |
//! | overlocked | denied: "Please see office" | overlocked | on |
//! | reserved, available, unavailable | no access | unassigned | on |
//! | repossessed | denied | overlocked | on |
//!
//! A unit's gatelock only closes the gate to its tenant ([`super::access::decide`]): the
//! lock and coil follow the status alone, so a gatelock change queues nothing.

use super::UnitStatus;
use super::unit::{LockBinding, UnitRecord};
use serde::{Deserialize, Serialize};

/// What a smart lock should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LockTarget {
    /// Nobody's lock.
    Unassigned,
    /// The tenant's lock (their code / app opens it).
    Assigned {
        /// The tenant reference given to the vendor (the contact id).
        tenant_ref: String,
    },
    /// Overlocked: nobody gets in.
    Overlocked {
        /// The tenant it stays assigned to, if any.
        tenant_ref: Option<String>,
    },
}

/// What a tenant's PIN does at the gates of a unit's zones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateAccess {
    /// Let in (within access hours).
    Allowed,
    /// Refused with "Please see office".
    SeeOffice,
    /// Refused.
    Denied,
    /// The unit gives no access (its tenant may have another unit that does).
    None,
}

/// A piece of hardware and the state it should be in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A smart lock at the lock API.
    SmartLock {
        /// Lock id.
        lock: String,
        /// Desired state.
        target: LockTarget,
    },
    /// An overlock relay coil.
    Coil {
        /// Relay board id.
        board: String,
        /// Coil number.
        coil: u16,
        /// Energised.
        on: bool,
    },
}

impl Target {
    /// The device that carries it (`board` or the lock API).
    pub fn device<'a>(&'a self, lock_api: &'a str) -> &'a str {
        match self {
            Target::SmartLock { .. } => lock_api,
            Target::Coil { board, .. } => board,
        }
    }

    /// A stable key for the piece of hardware (one target per key): `lock:<id>`, `coil:<n>`.
    pub fn key(&self) -> String {
        match self {
            Target::SmartLock { lock, .. } => format!("lock:{lock}"),
            Target::Coil { coil, .. } => format!("coil:{coil}"),
        }
    }
}

/// The smart lock's state for a unit status; `tenant` is the contact holding the unit.
pub fn lock_target(status: UnitStatus, tenant: Option<&str>) -> LockTarget {
    match status {
        UnitStatus::Occupied => match tenant {
            Some(t) => LockTarget::Assigned {
                tenant_ref: t.to_owned(),
            },
            // An occupied unit always has a tenant; without one, fail closed.
            None => LockTarget::Overlocked { tenant_ref: None },
        },
        UnitStatus::Overlocked | UnitStatus::Repossessed => LockTarget::Overlocked {
            tenant_ref: tenant.map(str::to_owned),
        },
        UnitStatus::Reserved | UnitStatus::Available | UnitStatus::Unavailable => {
            LockTarget::Unassigned
        }
    }
}

/// Whether the overlock relay is energised (locked) for a unit status: only an occupied
/// unit is free of its overlock.
pub fn overlock_coil_on(status: UnitStatus) -> bool {
    status != UnitStatus::Occupied
}

/// What the unit's tenant's PIN does at the gates of the unit's zones.
pub fn gate_access(status: UnitStatus) -> GateAccess {
    match status {
        UnitStatus::Occupied => GateAccess::Allowed,
        UnitStatus::Overlocked => GateAccess::SeeOffice,
        UnitStatus::Repossessed => GateAccess::Denied,
        UnitStatus::Reserved | UnitStatus::Available | UnitStatus::Unavailable => GateAccess::None,
    }
}

/// The hardware target of a unit's lock binding, if it has one.
pub fn unit_target(unit: &UnitRecord, tenant: Option<&str>) -> Option<Target> {
    match unit.bindings.lock.as_ref()? {
        LockBinding::SmartLock { id } => Some(Target::SmartLock {
            lock: id.clone(),
            target: lock_target(unit.status, tenant),
        }),
        LockBinding::Relay { board, coil } => Some(Target::Coil {
            board: board.clone(),
            coil: *coil,
            on: overlock_coil_on(unit.status),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use UnitStatus::*;

    #[test]
    fn the_design_table_row_by_row() {
        let t = Some("c1");
        let assigned = LockTarget::Assigned {
            tenant_ref: "c1".into(),
        };
        let overlocked = LockTarget::Overlocked {
            tenant_ref: Some("c1".into()),
        };
        let rows = [
            (Occupied, GateAccess::Allowed, assigned.clone(), false),
            (Overlocked, GateAccess::SeeOffice, overlocked.clone(), true),
            (Reserved, GateAccess::None, LockTarget::Unassigned, true),
            (Available, GateAccess::None, LockTarget::Unassigned, true),
            (Unavailable, GateAccess::None, LockTarget::Unassigned, true),
            (Repossessed, GateAccess::Denied, overlocked, true),
        ];
        for (status, gate, lock, coil) in rows {
            assert_eq!(gate_access(status), gate, "{status}");
            assert_eq!(lock_target(status, t), lock, "{status}");
            assert_eq!(overlock_coil_on(status), coil, "{status}");
        }
    }

    #[test]
    fn an_occupied_unit_without_a_tenant_fails_closed() {
        assert_eq!(
            lock_target(Occupied, None),
            LockTarget::Overlocked { tenant_ref: None }
        );
    }

    #[test]
    fn targets_follow_the_binding() {
        let mut unit: UnitRecord = UnitRecord {
            id: "u1".into(),
            name: "A1".into(),
            unit_type_id: "small".into(),
            status: Occupied,
            gatelock: false,
            attrs: serde_json::from_value(serde_json::json!({
                "description": null, "width": 1.0, "length": 1.0, "height": 1.0, "door_height": 1.0,
                "door_width": 1.0, "door_type": "none", "access_type": "indoor", "floor": null,
                "directions": null, "standard_rate": 1.0, "walk_thru_order": 0, "rentable": true,
                "combination_lock_number": null, "overlock_lock_number": null,
                "attribute_description": null, "rank": null, "unit_amenities": [], "tax_rates": []
            }))
            .unwrap(),
            bindings: Default::default(),
            version: 1,
        };
        assert_eq!(unit_target(&unit, Some("c1")), None);
        unit.bindings.lock = Some(LockBinding::Relay {
            board: "relay-1".into(),
            coil: 7,
        });
        let t = unit_target(&unit, Some("c1")).unwrap();
        assert_eq!(
            t,
            Target::Coil {
                board: "relay-1".into(),
                coil: 7,
                on: false
            }
        );
        assert_eq!(
            (t.device("locks"), t.key()),
            ("relay-1", "coil:7".to_owned())
        );
        unit.bindings.lock = Some(LockBinding::SmartLock {
            id: "lock-A01".into(),
        });
        unit.status = Available;
        let t = unit_target(&unit, None).unwrap();
        assert_eq!(t.key(), "lock:lock-A01");
        assert_eq!(t.device("locks"), "locks");
    }

    /// Unit `u1` in `status`, locked by `lock`, gatelocked or not.
    fn bound_unit(status: UnitStatus, lock: LockBinding, gatelock: bool) -> UnitRecord {
        UnitRecord {
            id: "u1".into(),
            name: "A1".into(),
            unit_type_id: "small".into(),
            status,
            gatelock,
            attrs: serde_json::from_value(serde_json::json!({
                "description": null, "width": 1.0, "length": 1.0, "height": 1.0, "door_height": 1.0,
                "door_width": 1.0, "door_type": "none", "access_type": "indoor", "floor": null,
                "directions": null, "standard_rate": 1.0, "walk_thru_order": 0, "rentable": true,
                "combination_lock_number": null, "overlock_lock_number": null,
                "attribute_description": null, "rank": null, "unit_amenities": [], "tax_rates": []
            }))
            .unwrap(),
            bindings: crate::domain::unit::Bindings {
                lock: Some(lock),
                ..Default::default()
            },
            version: 1,
        }
    }

    #[test]
    fn gatelock_changes_no_hardware_target() {
        let relay = LockBinding::Relay {
            board: "relay-1".into(),
            coil: 3,
        };
        let smart = LockBinding::SmartLock { id: "lk".into() };
        for status in [
            Occupied,
            Overlocked,
            Reserved,
            Available,
            Unavailable,
            Repossessed,
        ] {
            for lock in [&relay, &smart] {
                let open = unit_target(&bound_unit(status, lock.clone(), false), Some("c1"));
                let locked = unit_target(&bound_unit(status, lock.clone(), true), Some("c1"));
                assert!(open.is_some());
                assert_eq!(locked, open, "{status} {lock:?}");
            }
        }
        // An occupied, gatelocked unit: lock still assigned, overlock still off.
        assert_eq!(
            unit_target(&bound_unit(Occupied, relay, true), Some("c1")),
            Some(Target::Coil {
                board: "relay-1".into(),
                coil: 3,
                on: false
            })
        );
        assert_eq!(
            unit_target(&bound_unit(Occupied, smart, true), Some("c1")),
            Some(Target::SmartLock {
                lock: "lk".into(),
                target: LockTarget::Assigned {
                    tenant_ref: "c1".into()
                }
            })
        );
    }
}
