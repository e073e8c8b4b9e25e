//! Model test: random sequences of allocation operations against the real server and
//! against a small in-memory model of DESIGN.md §2's table, written here from the contract
//! (it does not use `unitgate::domain`). After every operation the answer, every unit and
//! the new events must agree with the model, and the event log must stay gapless from 1.
//!
//! `PROPTEST_CASES=500 cargo test --test model` runs more cases than the default 24.

mod common;

use common::TestGateway;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

const UNITS: [&str; 4] = ["u1", "u2", "u3", "u4"];
const CONTACTS: [&str; 3] = ["c1", "c2", "c3"];

/// A tenancy of the seeded site, as the model knows it. The site date is 2026-03-10.
struct Tenancy {
    id: &'static str,
    contact: usize,
    started: bool,
    ended: bool,
}

/// `seed`'s tenancies plus `t-c1b`, a started second tenancy of c1.
const TENANCIES: [Tenancy; 5] = [
    Tenancy {
        id: "t-future",
        contact: 0,
        started: false,
        ended: false,
    },
    Tenancy {
        id: "t-started",
        contact: 1,
        started: true,
        ended: false,
    },
    Tenancy {
        id: "t-other",
        contact: 2,
        started: false,
        ended: false,
    },
    Tenancy {
        id: "t-ended",
        contact: 1,
        started: true,
        ended: true,
    },
    Tenancy {
        id: "t-c1b",
        contact: 0,
        started: true,
        ended: false,
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Available,
    Reserved,
    Occupied,
    Overlocked,
    Unavailable,
    Repossessed,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Available => "available",
            Status::Reserved => "reserved",
            Status::Occupied => "occupied",
            Status::Overlocked => "overlocked",
            Status::Unavailable => "unavailable",
            Status::Repossessed => "repossessed",
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Reserve(usize, usize),
    GrantAccess(usize, usize),
    Deallocate(usize),
    Overlock(usize),
    RemoveOverlock(usize),
    SetStatus(usize, Status),
}

impl Op {
    fn request(&self) -> (String, Value) {
        match *self {
            Op::Reserve(u, t) => (
                format!("/v1/units/{}/reserve", UNITS[u]),
                json!({"tenancy_id": TENANCIES[t].id}),
            ),
            Op::GrantAccess(u, t) => (
                format!("/v1/units/{}/grant_access", UNITS[u]),
                json!({"tenancy_id": TENANCIES[t].id}),
            ),
            Op::Deallocate(u) => (format!("/v1/units/{}/deallocate", UNITS[u]), json!({})),
            Op::Overlock(c) => (format!("/v1/contacts/{}/overlock", CONTACTS[c]), json!({})),
            Op::RemoveOverlock(c) => (
                format!("/v1/contacts/{}/remove_overlock", CONTACTS[c]),
                json!({}),
            ),
            Op::SetStatus(u, s) => (
                format!("/v1/units/{}/set_status", UNITS[u]),
                json!({"status": s.name()}),
            ),
        }
    }
}

/// Weighted so that short sequences reach every status: the operator targets and the
/// contact-wide operations come up often enough to overlock and then repossess a unit.
fn op() -> impl Strategy<Value = Op> {
    let unit = 0..UNITS.len();
    let tenancy = 0..TENANCIES.len();
    let contact = 0..CONTACTS.len();
    let target = prop_oneof![
        3 => Just(Status::Unavailable),
        3 => Just(Status::Available),
        4 => Just(Status::Repossessed),
        1 => proptest::sample::select(vec![Status::Reserved, Status::Occupied, Status::Overlocked]),
    ];
    prop_oneof![
        3 => (unit.clone(), tenancy.clone()).prop_map(|(u, t)| Op::Reserve(u, t)),
        4 => (unit.clone(), tenancy).prop_map(|(u, t)| Op::GrantAccess(u, t)),
        2 => unit.clone().prop_map(Op::Deallocate),
        3 => contact.clone().prop_map(Op::Overlock),
        2 => contact.prop_map(Op::RemoveOverlock),
        4 => (unit, target).prop_map(|(u, s)| Op::SetStatus(u, s)),
    ]
}

/// One unit in the model: status, the tenancy of its active allocation, its version.
#[derive(Debug, Clone, PartialEq)]
struct ModelUnit {
    status: Status,
    tenancy: Option<usize>,
    version: i64,
}

/// What the model says an operation does: refused with a code, or these events
/// (`(type, unit)`, in order) and the model updated.
enum Outcome {
    Refused(&'static str),
    Applied(Vec<(&'static str, usize)>),
}

struct Model {
    units: Vec<ModelUnit>,
}

impl Model {
    fn contact_of(&self, u: usize) -> Option<usize> {
        self.units[u].tenancy.map(|t| TENANCIES[t].contact)
    }

    fn set(&mut self, u: usize, status: Status, tenancy: Option<usize>) {
        let unit = &mut self.units[u];
        unit.status = status;
        unit.tenancy = tenancy;
        unit.version += 1;
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        use Status::*;
        match *op {
            Op::Reserve(u, t) => {
                if self.units[u].status != Available {
                    return Outcome::Refused("invalid_transition");
                }
                if TENANCIES[t].started {
                    return Outcome::Refused("tenancy_started");
                }
                self.set(u, Reserved, Some(t));
                Outcome::Applied(vec![("unit.reserved", u)])
            }
            Op::GrantAccess(u, t) => {
                match (self.units[u].status, self.units[u].tenancy) {
                    (Reserved, Some(held)) if held != t => {
                        return Outcome::Refused("tenancy_mismatch");
                    }
                    (Reserved, _) | (Available, _) => {}
                    _ => return Outcome::Refused("invalid_transition"),
                }
                if TENANCIES[t].ended {
                    return Outcome::Refused("tenancy_ended");
                }
                self.set(u, Occupied, Some(t));
                Outcome::Applied(vec![("unit.occupied", u)])
            }
            Op::Deallocate(u) => match self.units[u].status {
                Reserved | Occupied | Overlocked | Repossessed => {
                    self.set(u, Available, None);
                    Outcome::Applied(vec![("unit.deallocated", u), ("unit.available", u)])
                }
                Available | Unavailable => Outcome::Refused("invalid_transition"),
            },
            Op::Overlock(c) => self.contact_wide(c, Occupied, Overlocked, "unit.overlocked"),
            Op::RemoveOverlock(c) => self.contact_wide(c, Overlocked, Occupied, "unit.occupied"),
            Op::SetStatus(u, target) => {
                let from = self.units[u].status;
                let allowed = matches!(
                    (from, target),
                    (Available, Unavailable)
                        | (Unavailable, Available)
                        | (Occupied | Overlocked, Repossessed)
                );
                if !allowed {
                    return Outcome::Refused("invalid_transition");
                }
                let tenancy = self.units[u].tenancy;
                self.set(u, target, tenancy);
                Outcome::Applied(vec![("unit.status_changed", u)])
            }
        }
    }

    /// Every unit of the contact in `from` moves to `to`, in unit name order.
    fn contact_wide(&mut self, c: usize, from: Status, to: Status, kind: &'static str) -> Outcome {
        let hit: Vec<usize> = (0..self.units.len())
            .filter(|&u| self.contact_of(u) == Some(c) && self.units[u].status == from)
            .collect();
        if hit.is_empty() {
            return Outcome::Refused("no_units_in_status");
        }
        for &u in &hit {
            let tenancy = self.units[u].tenancy;
            self.set(u, to, tenancy);
        }
        Outcome::Applied(hit.into_iter().map(|u| (kind, u)).collect())
    }
}

/// Every unit as the server has it, in `UNITS` order.
async fn server_units(t: &TestGateway) -> Result<Vec<Value>, TestCaseError> {
    let a = t.get("/v1/units?limit=200").await;
    prop_assert_eq!(a.status, 200, "{:?}", a.body);
    let units = a.body["units"].as_array().cloned().unwrap_or_default();
    let ids: Vec<&str> = units
        .iter()
        .map(|u| u["id"].as_str().unwrap_or(""))
        .collect();
    prop_assert_eq!(ids, UNITS.to_vec());
    Ok(units)
}

/// Events after `after`, checked to continue the log without a gap.
async fn new_events(t: &TestGateway, after: i64) -> Result<Vec<Value>, TestCaseError> {
    let evs = t.events_after(after).await;
    for (i, e) in evs.iter().enumerate() {
        prop_assert_eq!(e["seq"].as_i64(), Some(after + 1 + i as i64), "gapless");
    }
    Ok(evs)
}

async fn run_case(t: &TestGateway, ops: &[Op]) -> Result<(), TestCaseError> {
    t.seed(UNITS.len()).await;
    let a = t
        .put(
            "/v1/tenancies/t-c1b",
            json!({"contact_id": "c1", "start_date": "2026-02-01"}),
        )
        .await;
    prop_assert_eq!(a.status, 201, "{:?}", a.body);

    let mut model = Model {
        units: server_units(t)
            .await?
            .iter()
            .map(|u| {
                prop_assert_eq!(&u["status"], "available");
                Ok(ModelUnit {
                    status: Status::Available,
                    tenancy: None,
                    version: u["version"].as_i64().unwrap_or(-1),
                })
            })
            .collect::<Result<_, TestCaseError>>()?,
    };
    // The seed's own events: the log starts at 1.
    let mut seq = new_events(t, 0).await?.len() as i64;
    prop_assert!(seq > 0);

    for (step, op) in ops.iter().enumerate() {
        let (path, body) = op.request();
        let a = t.post(&path, body).await;
        let expected = model.apply(op);
        let evs = new_events(t, seq).await?;
        seq += evs.len() as i64;
        let got: Vec<(&str, &str)> = evs
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or(""),
                    e["data"]["unit_id"].as_str().unwrap_or(""),
                )
            })
            .collect();
        match expected {
            Outcome::Refused(code) => {
                prop_assert_eq!(
                    (a.status, a.code()),
                    (409, code),
                    "step {} {:?}: {}",
                    step,
                    op,
                    a.body
                );
                prop_assert!(
                    got.is_empty(),
                    "step {} {:?} refused but wrote {:?}",
                    step,
                    op,
                    got
                );
            }
            Outcome::Applied(want) => {
                prop_assert_eq!(a.status, 200, "step {} {:?}: {}", step, op, a.body);
                let want: Vec<(&str, &str)> = want.iter().map(|&(k, u)| (k, UNITS[u])).collect();
                prop_assert_eq!(&got, &want, "step {} {:?}: events", step, op);
                // Contact-wide operations list exactly the units they changed.
                if matches!(op, Op::Overlock(_) | Op::RemoveOverlock(_)) {
                    let listed: Vec<&str> = a.body["units"]
                        .as_array()
                        .map(|us| us.iter().map(|u| u["id"].as_str().unwrap_or("")).collect())
                        .unwrap_or_default();
                    let changed: Vec<&str> = want.iter().map(|&(_, u)| u).collect();
                    prop_assert_eq!(listed, changed, "step {} {:?}: units", step, op);
                }
            }
        }
        for (u, (have, m)) in server_units(t).await?.iter().zip(&model.units).enumerate() {
            let tenancy = m.tenancy.map(|i| TENANCIES[i].id);
            let contact = m.tenancy.map(|i| CONTACTS[TENANCIES[i].contact]);
            prop_assert_eq!(
                (
                    &have["status"],
                    &have["current_tenancy_id"],
                    &have["current_tenant_id"],
                    &have["version"]
                ),
                (
                    &json!(m.status.name()),
                    &json!(tenancy),
                    &json!(contact),
                    &json!(m.version)
                ),
                "step {} {:?}: unit {}",
                step,
                op,
                UNITS[u]
            );
        }
    }
    Ok(())
}

/// 24 cases by default; `PROPTEST_CASES` overrides (`with_cases` alone would ignore it).
fn config() -> ProptestConfig {
    let mut cfg = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        cfg.cases = 24;
    }
    cfg
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn allocations_follow_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            let t = TestGateway::start().await;
            let result = run_case(&t, &ops).await;
            t.stop().await;
            result
        })?;
    }
}
