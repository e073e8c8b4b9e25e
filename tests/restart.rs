//! Durability across restarts: every acknowledged change is still there after the gateway
//! stops and reopens the same SQLite file, the event log is identical and continues without
//! a gap, and idempotency keys still replay their first answer.

mod common;

use common::{ADMIN, Answer, TestGateway};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// PINs long enough that they can't turn up by chance in a request id (hex).
const PIN_1: &str = "4918273650";
const PIN_2: &str = "6029384751";
const PIN_3: &str = "7130495862";

fn unit(id: &str, name: &str, status: &str) -> Value {
    json!({
        "id": id, "name": name, "unit_type": "small", "status": status,
        "width": 5, "length": 10, "height": 8, "door_height": 7, "door_width": 4,
        "door_type": "roll_up", "access_type": "indoor", "standard_rate": 60,
        "walk_thru_order": 1, "zones": ["main-gate"],
    })
}

fn snapshot() -> Value {
    json!({
        "unit_types": [{"id": "small", "name": "Small"}],
        "units": [
            unit("r1", "R1", "occupied"),
            unit("r2", "R2", "available"),
            unit("r3", "R3", "available"),
            unit("r4", "R4", "available"),
        ],
        "contacts": [
            {"id": "rc1", "name": "Robin", "access_code": PIN_1},
            {"id": "rc2", "name": "Riley", "access_code": PIN_2},
        ],
        "tenancies": [
            {"id": "rt1", "contact_id": "rc1", "start_date": "2026-03-01"},
            {"id": "rt2", "contact_id": "rc2", "start_date": "2026-03-20"},
            {"id": "rt3", "contact_id": "rc2", "start_date": "2026-02-01"},
        ],
        "allocations": [{
            "id": "ra1", "unit_id": "r1", "tenancy_id": "rt1",
            "granted_access_at": "2026-03-01T09:00:00Z", "granted_access_by": "cloud",
        }],
    })
}

/// What the gateway acknowledged, as it said it.
#[derive(Default)]
struct Acked {
    units: BTreeMap<String, Value>,
    contacts: BTreeMap<String, Value>,
    tenancies: BTreeMap<String, Value>,
    allocations: BTreeMap<String, Value>,
}

impl Acked {
    /// Takes the unit(s), allocation, contact or tenancy from a successful answer.
    fn take(&mut self, a: &Answer) {
        assert!(
            a.status == 200 || a.status == 201,
            "not acknowledged: {} {:?}",
            a.status,
            a.body
        );
        let b = &a.body;
        let mut units: Vec<&Value> = b["units"]
            .as_array()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        if b["unit"].is_object() {
            units.push(&b["unit"]);
        }
        for u in units {
            self.units
                .insert(u["id"].as_str().unwrap().to_owned(), u.clone());
        }
        if b["allocation"].is_object() {
            let al = &b["allocation"];
            self.allocations
                .insert(al["unit_id"].as_str().unwrap().to_owned(), al.clone());
        }
        if b["contact"].is_object() {
            let c = &b["contact"];
            self.contacts
                .insert(c["id"].as_str().unwrap().to_owned(), c.clone());
        }
        if b["tenancy"].is_object() {
            let tn = &b["tenancy"];
            self.tenancies
                .insert(tn["id"].as_str().unwrap().to_owned(), tn.clone());
        }
    }
}

async fn all_units(t: &TestGateway) -> BTreeMap<String, Value> {
    let a = t.get("/v1/units?limit=200").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["id"].as_str().unwrap().to_owned(), u.clone()))
        .collect()
}

fn assert_gapless(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_i64(), Some(1 + i as i64), "seq {i}: {e:?}");
    }
}

async fn keyed(t: &TestGateway, path: &str, body: &Value, key: &str) -> Answer {
    t.call(
        Method::POST,
        path,
        Some(ADMIN),
        Some(body),
        &[("Idempotency-Key", key)],
    )
    .await
}

/// Everything that must survive: units, contacts, tenancies, the event log.
async fn check_state(t: &TestGateway, acked: &Acked, log: &[Value]) {
    assert_eq!(all_units(t).await, acked.units, "units as acknowledged");
    for (id, c) in &acked.contacts {
        let a = t.get(&format!("/v1/contacts/{id}")).await;
        assert_eq!(a.status, 200, "{id}: {:?}", a.body);
        assert_eq!(&a.body["contact"], c, "{id}");
    }
    for (id, tn) in &acked.tenancies {
        let a = t.get(&format!("/v1/tenancies/{id}")).await;
        assert_eq!(a.status, 200, "{id}: {:?}", a.body);
        assert_eq!(&a.body["tenancy"], tn, "{id}");
    }
    assert_eq!(t.events_after(0).await, log, "the event log is identical");
}

#[tokio::test]
async fn acknowledged_changes_survive_a_restart() {
    let mut t = TestGateway::start().await;
    let mut acked = Acked::default();

    // A snapshot as the starting replica.
    let a = t.put("/v1/sync/snapshot", snapshot()).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    acked.units = all_units(&t).await;
    for id in ["rc1", "rc2"] {
        acked.take(&t.get(&format!("/v1/contacts/{id}")).await);
    }
    for id in ["rt1", "rt2", "rt3"] {
        acked.take(&t.get(&format!("/v1/tenancies/{id}")).await);
    }

    // Upserts.
    for (path, body) in [
        (
            "/v1/contacts/rc3",
            json!({"name": "Rowan", "access_code": PIN_3}),
        ),
        ("/v1/contacts/rc1", json!({"name": "Robin Renamed"})),
        (
            "/v1/tenancies/rt4",
            json!({"contact_id": "rc3", "start_date": "2026-03-05"}),
        ),
        (
            "/v1/tenancies/rt3",
            json!({"contact_id": "rc2", "start_date": "2026-02-01", "end_date": "2026-06-30"}),
        ),
        ("/v1/unit_types/large", json!({"name": "Large"})),
    ] {
        acked.take(&t.put(path, body).await);
    }

    // Creates.
    let mut n = unit("ignored", "N1,N2", "available");
    n.as_object_mut().unwrap().remove("id");
    n.as_object_mut().unwrap().remove("status");
    n["unit_type"] = json!("large");
    acked.take(&t.post("/v1/units", json!({ "unit": n })).await);
    let mut b1 = unit("b1", "B1", "available");
    b1.as_object_mut().unwrap().remove("status");
    b1["lock"] = json!({"kind": "smart_lock", "id": "lock-b1"});
    acked.take(
        &t.post("/v1/units/bulk_create", json!({ "units": [b1] }))
            .await,
    );

    // Allocation operations, one with an Idempotency-Key and one refused with a key.
    let reserve_body = json!({"tenancy_id": "rt2", "by": "desk"});
    let reserved = keyed(&t, "/v1/units/r2/reserve", &reserve_body, "reserve-r2").await;
    acked.take(&reserved);
    assert_eq!(reserved.body["unit"]["status"], "reserved");
    for (path, body) in [
        ("/v1/units/r3/grant_access", json!({"tenancy_id": "rt3"})),
        ("/v1/units/b1/grant_access", json!({"tenancy_id": "rt4"})),
        ("/v1/contacts/rc2/overlock", json!({})),
        ("/v1/contacts/rc2/remove_overlock", json!({})),
        ("/v1/contacts/rc3/overlock", json!({"by": "billing"})),
        ("/v1/units/r1/deallocate", json!({"by": "desk"})),
        ("/v1/units/r4/set_status", json!({"status": "unavailable"})),
    ] {
        acked.take(&t.post(path, body).await);
    }
    let refused_body = json!({"tenancy_id": "rt3"});
    let refused = keyed(&t, "/v1/units/r4/grant_access", &refused_body, "grant-r4").await;
    assert_eq!(refused.status, 409, "{:?}", refused.body);
    acked.take(
        &t.patch(
            "/v1/units/b1",
            json!({"unit": {"zones": ["main-gate", "side-gate"], "floor": 2}}),
        )
        .await,
    );

    // What was acknowledged is what we expect.
    let status: BTreeMap<&str, &str> = acked
        .units
        .iter()
        .map(|(id, u)| (id.as_str(), u["status"].as_str().unwrap()))
        .collect();
    assert_eq!(status["r1"], "available");
    assert_eq!(status["r2"], "reserved");
    assert_eq!(status["r3"], "occupied");
    assert_eq!(status["r4"], "unavailable");
    assert_eq!(status["b1"], "overlocked");
    assert_eq!(acked.units.len(), 7);
    assert_eq!(
        acked.units["r3"]["version"], 4,
        "grant, overlock, remove_overlock"
    );
    assert_eq!(
        acked.units["b1"]["version"], 4,
        "create, grant, overlock, patch"
    );

    let log = t.events_after(0).await;
    assert_gapless(&log);
    // 4 + 2 + 1 created; reserve, 2 grants, overlock, remove_overlock, overlock;
    // deallocate (2); set_status; the patch.
    assert_eq!(log.len(), 17, "{log:?}");
    check_state(&t, &acked, &log).await;

    // ---- restart ----
    t.clock.set("2026-03-10T13:00:00Z");
    t.restart().await;
    check_state(&t, &acked, &log).await;

    // The PINs are still held (the key and the hashes survived).
    for pin in [PIN_1, PIN_2, PIN_3] {
        let a = t
            .put(
                "/v1/contacts/probe",
                json!({"name": "Probe", "access_code": pin}),
            )
            .await;
        assert_eq!(a.code(), "access_code_taken", "{:?}", a.body);
    }

    // Keys used before the restart replay the same bytes and change nothing.
    let again = keyed(&t, "/v1/units/r2/reserve", &reserve_body, "reserve-r2").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.raw, reserved.raw, "same bytes");
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    let again = keyed(&t, "/v1/units/r4/grant_access", &refused_body, "grant-r4").await;
    assert_eq!(again.status, 409);
    assert_eq!(again.raw, refused.raw, "same bytes, request id included");
    // The same key for another request is refused.
    let other = keyed(&t, "/v1/units/r3/deallocate", &json!({}), "reserve-r2").await;
    assert_eq!(
        (other.status, other.code()),
        (422, "idempotency_key_reused"),
        "{:?}",
        other.body
    );
    check_state(&t, &acked, &log).await;

    // The allocations are the ones acknowledged: ending them names the same ids.
    for unit_id in ["r2", "b1"] {
        let before = &acked.allocations[unit_id];
        let a = t
            .post(
                &format!("/v1/units/{unit_id}/deallocate"),
                json!({"by": "after"}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let al = &a.body["allocation"];
        for k in [
            "id",
            "tenancy_id",
            "reserved_at",
            "reserved_by",
            "granted_access_at",
            "granted_access_by",
        ] {
            assert_eq!(al[k], before[k], "{unit_id}: {k}");
        }
        assert_eq!(al["ended_at"], "2026-03-10T13:00:00.000Z");
        assert_eq!(
            a.body["unit"]["version"],
            acked.units[unit_id]["version"].as_i64().unwrap() + 1
        );
        acked.take(&a);
    }
    // r3 is still occupied by rt3.
    assert_eq!(acked.units["r3"]["current_tenancy_id"], "rt3");

    // New events continue the log without a gap.
    let log2 = t.events_after(0).await;
    assert_gapless(&log2);
    assert_eq!(&log2[..log.len()], log.as_slice());
    let new: Vec<_> = log2[log.len()..]
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["data"]["unit_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        new,
        [
            ("unit.deallocated", "r2"),
            ("unit.available", "r2"),
            ("unit.deallocated", "b1"),
            ("unit.available", "b1"),
        ]
    );
    for e in &log2[log.len()..] {
        assert_eq!(e["occurred_at"], "2026-03-10T13:00:00.000Z");
    }

    // And once more: what was written after the first restart survives the second.
    t.restart().await;
    check_state(&t, &acked, &log2).await;
    let a = t
        .post("/v1/units/r2/reserve", json!({"tenancy_id": "rt2"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let log3 = t.events_after(0).await;
    assert_gapless(&log3);
    assert_eq!(log3.len(), log2.len() + 1);
    assert_eq!(log3.last().unwrap()["type"], "unit.reserved");
    t.stop().await;
}

async fn put_snapshot_keyed(t: &TestGateway, key: &str) -> Answer {
    t.call(
        Method::PUT,
        "/v1/sync/snapshot",
        Some(ADMIN),
        Some(&snapshot()),
        &[("Idempotency-Key", key)],
    )
    .await
}

#[tokio::test]
async fn an_idempotent_snapshot_replays_after_restart() {
    let mut t = TestGateway::start().await;
    let first = put_snapshot_keyed(&t, "snap-1").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["snapshot"]["units"]["created"], 4);
    let log = t.events_after(0).await;
    t.restart().await;
    let again = put_snapshot_keyed(&t, "snap-1").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.raw, first.raw);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(t.events_after(0).await, log);
    // Without the key it is applied again: nothing left to change.
    let a = t.put("/v1/sync/snapshot", snapshot()).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["snapshot"]["units"]["unchanged"], 4);
    assert_eq!(t.events_after(0).await, log);
    t.stop().await;
}
