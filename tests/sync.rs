//! `PUT /v1/sync/snapshot` (the whole replica, applied atomically as a diff) and the cloud
//! upserts of contacts, tenancies and unit types.

mod common;

use common::{ADMIN, Answer, TestGateway, UNITS};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// PINs long enough that they can't turn up by chance in a request id (hex).
const PIN_K1: &str = "8675309421";
const PIN_K2: &str = "5551234987";
const PIN_NEW: &str = "7294016358";

fn unit(id: &str, name: &str, status: &str) -> Value {
    json!({
        "id": id, "name": name, "unit_type": "small", "status": status,
        "width": 5, "length": 10, "height": 8, "door_height": 7, "door_width": 4,
        "door_type": "roll_up", "access_type": "indoor", "standard_rate": 60,
        "walk_thru_order": 1, "zones": ["main-gate"],
    })
}

fn allocation(id: &str, unit_id: &str, tenancy_id: &str, granted: bool) -> Value {
    json!({
        "id": id, "unit_id": unit_id, "tenancy_id": tenancy_id,
        "reserved_at": "2026-02-01T10:00:00Z", "reserved_by": "cloud",
        "granted_access_at": if granted { json!("2026-03-01T09:00:00Z") } else { Value::Null },
        "granted_access_by": if granted { json!("cloud") } else { Value::Null },
    })
}

/// The base snapshot: two unit types, six units in every kind of state, three contacts,
/// three tenancies, three active allocations and one ended one.
fn base() -> Value {
    let mut s6 = unit("s6", "S6", "available");
    s6["lock"] = json!({"kind": "smart_lock", "id": "lock-6"});
    s6["door_sensor"] = json!({"board": "rb1", "input": 6});
    let mut s5 = unit("s5", "S5", "unavailable");
    s5["unit_type"] = json!("large");
    s5["zones"] = json!(["main-gate", "side-gate"]);
    let mut ended = allocation("a0", "s4", "t3", true);
    ended["ended_at"] = json!("2026-02-20T10:00:00Z");
    ended["ended_by"] = json!("cloud");
    json!({
        "unit_types": [{"id": "small", "name": "Small"}, {"id": "large", "name": "Large"}],
        "units": [
            unit("s1", "S1", "occupied"),
            unit("s2", "S2", "reserved"),
            unit("s3", "S3", "overlocked"),
            unit("s4", "S4", "available"),
            s5,
            s6,
        ],
        "contacts": [
            {"id": "k1", "name": "Kim One", "access_code": PIN_K1},
            {"id": "k2", "name": "Kai Two", "access_code": PIN_K2},
            {"id": "k3", "name": "Kit Three"},
        ],
        "tenancies": [
            {"id": "t1", "contact_id": "k1", "start_date": "2026-01-01"},
            {"id": "t2", "contact_id": "k2", "start_date": "2026-04-01"},
            {"id": "t3", "contact_id": "k3", "start_date": "2026-02-01", "end_date": "2026-02-20", "state": "ended"},
        ],
        "allocations": [
            allocation("a1", "s1", "t1", true),
            allocation("a2", "s2", "t2", false),
            allocation("a3", "s3", "t1", true),
            ended,
        ],
    })
}

fn counts(created: u64, updated: u64, deleted: u64, unchanged: u64) -> Value {
    json!({"created": created, "updated": updated, "deleted": deleted, "unchanged": unchanged})
}

async fn put_snapshot(t: &TestGateway, s: &Value) -> Answer {
    t.put("/v1/sync/snapshot", s.clone()).await
}

/// Every unit, keyed by id.
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

fn detail_fields(a: &Answer) -> BTreeSet<String> {
    a.body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details in {:?}", a.body))
        .iter()
        .map(|d| d["field"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// (type, unit_id) of events, sorted.
fn event_keys(evs: &[Value]) -> Vec<(String, String)> {
    let mut v: Vec<_> = evs
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["unit_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

fn assert_gapless(after: i64, events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_i64(), Some(after + 1 + i as i64), "{events:?}");
    }
}

/// Everything a snapshot can touch, as the API shows it.
async fn replica(t: &TestGateway) -> Value {
    let mut out = json!({"units": all_units(t).await});
    for (kind, ids) in [
        ("contacts", ["k1", "k2", "k3", "k4"].as_slice()),
        ("tenancies", ["t1", "t2", "t3", "t4"].as_slice()),
        ("unit_types", ["small", "large", "huge"].as_slice()),
    ] {
        for id in ids {
            let a = t.get(&format!("/v1/{kind}/{id}")).await;
            // An error body carries a fresh request id: keep only its status and code.
            out[kind][id] = if a.status == 200 {
                a.body
            } else {
                json!({"status": a.status, "code": a.code()})
            };
        }
    }
    out
}

/// Tries to give contact `probe` a PIN: whether another contact holds it shows as 409.
async fn pin_taken(t: &TestGateway, pin: &str) -> bool {
    let a = t
        .put(
            "/v1/contacts/probe",
            json!({"name": "Probe", "access_code": pin}),
        )
        .await;
    match a.status {
        409 => {
            assert_eq!(a.code(), "access_code_taken");
            true
        }
        200 | 201 => {
            // Give it back at once.
            let b = t
                .put(
                    "/v1/contacts/probe",
                    json!({"name": "Probe", "access_code": null}),
                )
                .await;
            assert_eq!(b.status, 200, "{:?}", b.body);
            false
        }
        s => panic!("probe: {s} {:?}", a.body),
    }
}

// ---- snapshot ---------------------------------------------------------------------------

#[tokio::test]
async fn snapshot_applies_and_reapplying_it_changes_nothing() {
    let t = TestGateway::start().await;
    let a = put_snapshot(&t, &base()).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["snapshot"],
        json!({
            "unit_types": counts(2, 0, 0, 0),
            "units": counts(6, 0, 0, 0),
            "contacts": counts(3, 0, 0, 0),
            "tenancies": counts(3, 0, 0, 0),
            "allocations": counts(4, 0, 0, 0),
            "events": 6,
        })
    );
    let units = all_units(&t).await;
    let status_of = |id: &str| units[id]["status"].as_str().unwrap().to_owned();
    for (id, status, tenancy, contact) in [
        ("s1", "occupied", json!("t1"), json!("k1")),
        ("s2", "reserved", json!("t2"), json!("k2")),
        ("s3", "overlocked", json!("t1"), json!("k1")),
        ("s4", "available", Value::Null, Value::Null),
        ("s5", "unavailable", Value::Null, Value::Null),
        ("s6", "available", Value::Null, Value::Null),
    ] {
        assert_eq!(status_of(id), status, "{id}");
        assert_eq!(units[id]["current_tenancy_id"], tenancy, "{id}");
        assert_eq!(units[id]["current_tenant_id"], contact, "{id}");
        assert_eq!(units[id]["version"], 1, "{id}");
    }
    assert_eq!(
        units["s6"]["lock"],
        json!({"kind": "smart_lock", "id": "lock-6"})
    );
    assert_eq!(
        units["s6"]["door_sensor"],
        json!({"board": "rb1", "input": 6})
    );
    assert_eq!(units["s5"]["zones"], json!(["main-gate", "side-gate"]));
    assert_eq!(
        units["s5"]["unit_type"],
        json!({"id": "large", "name": "Large"})
    );
    let c = t.get("/v1/contacts/k1").await;
    assert_eq!(c.body["contact"]["has_access_code"], true);
    let c = t.get("/v1/contacts/k3").await;
    assert_eq!(c.body["contact"]["has_access_code"], false);
    let tn = t.get("/v1/tenancies/t3").await;
    assert_eq!(tn.body["tenancy"]["end_date"], "2026-02-20");
    assert_eq!(tn.body["tenancy"]["state"], "ended");
    let evs = t.events_after(0).await;
    assert_gapless(0, &evs);
    assert_eq!(evs.len(), 6);
    for e in &evs {
        assert_eq!(e["type"], "unit.created");
        let id = e["data"]["unit_id"].as_str().unwrap();
        assert_eq!(e["data"]["status"], units[id]["status"], "{id}");
    }

    // The same snapshot again: nothing to do.
    let before = replica(&t).await;
    let seq = t.last_seq().await;
    let a = put_snapshot(&t, &base()).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["snapshot"],
        json!({
            "unit_types": counts(0, 0, 0, 2),
            "units": counts(0, 0, 0, 6),
            "contacts": counts(0, 0, 0, 3),
            "tenancies": counts(0, 0, 0, 3),
            "allocations": counts(0, 0, 0, 4),
            "events": 0,
        })
    );
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    // Not even updated_at moved.
    assert_eq!(replica(&t).await, before);
    // The PINs are held (probing creates a contact, so only now).
    assert!(pin_taken(&t, PIN_K1).await);
    assert!(pin_taken(&t, PIN_K2).await);
    assert!(!pin_taken(&t, PIN_NEW).await);
    t.stop().await;
}

#[tokio::test]
async fn changed_snapshot_applies_exactly_the_diff() {
    let t = TestGateway::start().await;
    let a = put_snapshot(&t, &base()).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let before = all_units(&t).await;
    let seq = t.last_seq().await;

    let mut s = base();
    // s4 renamed; s5 removed; s7 added; k2's PIN changed; a2 ended (so s2 is available).
    s["units"][3]["name"] = json!("S4-renamed");
    let units = s["units"].as_array_mut().unwrap();
    units.remove(4);
    let mut s7 = unit("s7", "S7", "available");
    s7["lock"] = json!({"kind": "relay", "board": "rb1", "coil": 7});
    units.push(s7);
    s["units"][1]["status"] = json!("available");
    s["contacts"][1]["access_code"] = json!(PIN_NEW);
    s["allocations"][1]["ended_at"] = json!("2026-03-09T10:00:00Z");
    s["allocations"][1]["ended_by"] = json!("cloud");

    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["snapshot"],
        json!({
            "unit_types": counts(0, 0, 0, 2),
            "units": counts(1, 2, 1, 3),
            "contacts": counts(0, 1, 0, 2),
            "tenancies": counts(0, 0, 0, 3),
            "allocations": counts(0, 1, 0, 3),
            "events": 4,
        })
    );

    let evs = t.events_after(seq).await;
    assert_gapless(seq, &evs);
    assert_eq!(
        event_keys(&evs),
        [
            ("unit.created".to_owned(), "s7".to_owned()),
            ("unit.deleted".to_owned(), "s5".to_owned()),
            ("unit.updated".to_owned(), "s2".to_owned()),
            ("unit.updated".to_owned(), "s4".to_owned()),
        ]
    );
    let by_unit = |id: &str| {
        evs.iter()
            .find(|e| e["data"]["unit_id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_unit("s4")["data"]["changed"], json!(["name"]));
    assert_eq!(by_unit("s4")["data"]["version"], 2);
    assert_eq!(by_unit("s2")["data"]["changed"], json!(["status"]));
    assert_eq!(by_unit("s2")["data"]["from"], "reserved");
    assert_eq!(by_unit("s2")["data"]["to"], "available");
    assert_eq!(by_unit("s5")["data"]["name"], "S5");
    assert_eq!(by_unit("s7")["data"]["status"], "available");

    let after = all_units(&t).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["s1", "s2", "s3", "s4", "s6", "s7"]
    );
    for id in ["s1", "s3", "s6"] {
        assert_eq!(after[id], before[id], "{id} untouched");
    }
    assert_eq!(after["s4"]["name"], "S4-renamed");
    assert_eq!(after["s4"]["version"], 2);
    assert_eq!(after["s2"]["status"], "available");
    assert_eq!(after["s2"]["current_tenancy_id"], Value::Null);
    assert_eq!(after["s2"]["version"], 2);
    assert_eq!(
        after["s7"]["lock"],
        json!({"kind": "relay", "board": "rb1", "coil": 7})
    );
    assert_eq!(t.get("/v1/units/s5").await.status, 404);
    // The freed name can be used again.
    let a = t
        .patch("/v1/units/s6", json!({"unit": {"name": "S5"}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    // k2 has the new PIN; the old one is free; k1's is still held.
    let k2 = t.get("/v1/contacts/k2").await;
    assert_eq!(k2.body["contact"]["version"], 2);
    assert_eq!(t.get("/v1/contacts/k1").await.body["contact"]["version"], 1);
    assert!(pin_taken(&t, PIN_NEW).await);
    assert!(pin_taken(&t, PIN_K1).await);
    assert!(!pin_taken(&t, PIN_K2).await);
    t.stop().await;
}

#[tokio::test]
async fn snapshot_swaps_unit_names_and_contact_pins() {
    let t = TestGateway::start().await;
    assert_eq!(put_snapshot(&t, &base()).await.status, 200);
    let seq = t.last_seq().await;
    let mut s = base();
    s["units"][0]["name"] = json!("S4");
    s["units"][3]["name"] = json!("S1");
    s["contacts"][0]["access_code"] = json!(PIN_K2);
    s["contacts"][1]["access_code"] = json!(PIN_K1);
    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["snapshot"]["units"], counts(0, 2, 0, 4));
    assert_eq!(a.body["snapshot"]["contacts"], counts(0, 2, 0, 1));
    let units = all_units(&t).await;
    assert_eq!(units["s1"]["name"], "S4");
    assert_eq!(units["s4"]["name"], "S1");
    assert_eq!(units["s1"]["status"], "occupied", "only the name moved");
    let evs = t.events_after(seq).await;
    assert_eq!(
        event_keys(&evs),
        [
            ("unit.updated".to_owned(), "s1".to_owned()),
            ("unit.updated".to_owned(), "s4".to_owned()),
        ]
    );
    // k1 now holds k2's old PIN: setting it again changes nothing (same hash, same version),
    // which it could not if k2 still held it (409).
    let a = t
        .put(
            "/v1/contacts/k1",
            json!({"name": "Kim One", "access_code": PIN_K2}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["contact"]["version"], 2);
    let a = t
        .put(
            "/v1/contacts/k2",
            json!({"name": "Kai Two", "access_code": PIN_K1}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["contact"]["version"], 2);
    t.stop().await;
}

#[tokio::test]
async fn invalid_snapshots_change_nothing() {
    let t = TestGateway::start().await;
    assert_eq!(put_snapshot(&t, &base()).await.status, 200);
    let before = replica(&t).await;
    let seq = t.last_seq().await;

    // Each bad snapshot also carries a harmless change (s6 renamed) that must not land.
    let with_rename = |f: &dyn Fn(&mut Value)| {
        let mut s = base();
        s["units"][5]["name"] = json!("S6-renamed");
        f(&mut s);
        s
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "occupied without an active allocation",
            with_rename(&|s| s["units"][3]["status"] = json!("occupied")),
            "units[3].status",
        ),
        (
            "available with an active allocation",
            with_rename(&|s| s["units"][0]["status"] = json!("available")),
            "units[0].status",
        ),
        (
            "allocation of a unit not in the snapshot",
            with_rename(&|s| {
                s["allocations"]
                    .as_array_mut()
                    .unwrap()
                    .push(allocation("a9", "ghost", "t1", true))
            }),
            "allocations[4].unit_id",
        ),
        (
            "allocation of a tenancy not in the snapshot",
            with_rename(&|s| s["allocations"][0]["tenancy_id"] = json!("t-ghost")),
            "allocations[0].tenancy_id",
        ),
        (
            "two active allocations of one unit",
            with_rename(&|s| {
                s["allocations"]
                    .as_array_mut()
                    .unwrap()
                    .push(allocation("a9", "s1", "t2", true))
            }),
            "allocations[4].unit_id",
        ),
        (
            "two contacts with one PIN",
            with_rename(&|s| s["contacts"][1]["access_code"] = json!(PIN_K1)),
            "contacts[1].access_code",
        ),
        (
            "a bad PIN",
            with_rename(&|s| s["contacts"][2]["access_code"] = json!("12a4")),
            "contacts[2].access_code",
        ),
        (
            "tenancy of a contact not in the snapshot",
            with_rename(&|s| s["tenancies"][0]["contact_id"] = json!("k-ghost")),
            "tenancies[0].contact_id",
        ),
        (
            "unit of a type not in the snapshot",
            with_rename(&|s| s["units"][2]["unit_type"] = json!("huge")),
            "units[2].unit_type",
        ),
        (
            "two units with one name",
            with_rename(&|s| s["units"][1]["name"] = json!("S1")),
            "units[1].name",
        ),
        (
            "a unit without an id",
            with_rename(&|s| {
                s["units"][2].as_object_mut().unwrap().remove("id");
            }),
            "units[2].id",
        ),
        (
            "a unit with a bad width",
            with_rename(&|s| s["units"][4]["width"] = json!(-2)),
            "units[4].width",
        ),
        (
            "no units list",
            with_rename(&|s| {
                s.as_object_mut().unwrap().remove("units");
            }),
            "units",
        ),
        (
            "no allocations list",
            with_rename(&|s| {
                s.as_object_mut().unwrap().remove("allocations");
            }),
            "allocations",
        ),
        (
            "an unknown top-level key",
            with_rename(&|s| s["extras"] = json!([])),
            "extras",
        ),
    ];
    for (what, s, field) in cases {
        let a = put_snapshot(&t, &s).await;
        assert_eq!(a.status, 422, "{what}: {:?}", a.body);
        assert_eq!(a.code(), "validation_error", "{what}");
        assert!(
            detail_fields(&a).contains(field),
            "{what}: expected {field} in {:?}",
            a.body
        );
        let raw = String::from_utf8_lossy(&a.raw);
        for pin in [PIN_K1, "12a4"] {
            assert!(!raw.contains(pin), "{what}: a PIN is echoed: {raw}");
        }
    }
    assert_eq!(replica(&t).await, before, "nothing changed");
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test]
async fn snapshot_needs_admin_scope() {
    let t = TestGateway::start().await;
    let a = t
        .call(
            Method::PUT,
            "/v1/sync/snapshot",
            Some(UNITS),
            Some(&base()),
            &[],
        )
        .await;
    assert_eq!((a.status, a.code()), (403, "forbidden"), "{:?}", a.body);
    assert_eq!(t.get("/v1/units").await.body["units"], json!([]));
    t.stop().await;
}

#[tokio::test]
async fn large_snapshot_is_accepted_but_not_as_bulk_create() {
    let t = TestGateway::start().await;
    let mut s = base();
    let units: Vec<Value> = (0..5000)
        .map(|i| {
            let mut u = unit(&format!("big-{i:05}"), &format!("Big {i:05}"), "available");
            u["combination_lock_number"] = json!(format!("{i:08}"));
            u
        })
        .collect();
    s["units"].as_array_mut().unwrap().extend(units.clone());
    let size = serde_json::to_vec(&s).unwrap().len();
    assert!(size > 1 << 20, "the snapshot is only {size} bytes");
    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["snapshot"]["units"], counts(5006, 0, 0, 0));
    let a = t.get("/v1/units?limit=1").await;
    assert_eq!(a.body["meta"]["pagination"]["total_entries"], 5006);
    assert_eq!(t.last_seq().await, 5006);

    // The same bytes on an ordinary route are over its limit.
    let seq = t.last_seq().await;
    let bulk = json!({"units": units});
    assert!(serde_json::to_vec(&bulk).unwrap().len() > 1 << 20);
    let a = t.post("/v1/units/bulk_create", bulk).await;
    assert_eq!(
        (a.status, a.code()),
        (413, "payload_too_large"),
        "{:?}",
        a.body
    );
    assert_eq!(t.last_seq().await, seq);
    t.stop().await;
}

// ---- upserts ----------------------------------------------------------------------------

#[tokio::test]
async fn contact_upsert_never_reveals_the_access_code() {
    let t = TestGateway::start().await;
    let a = t
        .put(
            "/v1/contacts/p1",
            json!({"name": "Pat One", "access_code": PIN_K1}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        a.body["contact"],
        json!({"id": "p1", "name": "Pat One", "has_access_code": true, "access_hours": null, "version": 1})
    );
    assert!(!String::from_utf8_lossy(&a.raw).contains(PIN_K1));

    // Update: 200, the PIN stays when omitted.
    let a = t.put("/v1/contacts/p1", json!({"name": "Pat Uno"})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["contact"]["name"], "Pat Uno");
    assert_eq!(a.body["contact"]["has_access_code"], true);
    assert_eq!(a.body["contact"]["version"], 2);
    // The same again: 200, no new version.
    let a = t
        .put(
            "/v1/contacts/p1",
            json!({"name": "Pat Uno", "access_code": PIN_K1}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["contact"]["version"], 2);
    assert!(!String::from_utf8_lossy(&a.raw).contains(PIN_K1));
    let g = t.get("/v1/contacts/p1").await;
    assert_eq!(g.status, 200);
    assert!(!String::from_utf8_lossy(&g.raw).contains(PIN_K1));
    assert!(g.body["contact"].get("access_code").is_none());

    // Another contact can't take the PIN, and is not told whose it is.
    let a = t
        .put(
            "/v1/contacts/p2",
            json!({"name": "Sam Two", "access_code": PIN_K1}),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (409, "access_code_taken"),
        "{:?}",
        a.body
    );
    let raw = String::from_utf8_lossy(&a.raw).to_string();
    for secret in [PIN_K1, "p1", "Pat"] {
        assert!(!raw.contains(secret), "{secret:?} revealed in {raw}");
    }
    assert_eq!(t.get("/v1/contacts/p2").await.status, 404, "not created");

    // A bad PIN: 422, not echoed.
    let a = t
        .put(
            "/v1/contacts/p2",
            json!({"name": "Sam Two", "access_code": "12a4"}),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(
        detail_fields(&a),
        BTreeSet::from(["access_code".to_owned()])
    );
    assert!(!String::from_utf8_lossy(&a.raw).contains("12a4"));
    for bad in ["123", "12345678901"] {
        let a = t
            .put(
                "/v1/contacts/p2",
                json!({"name": "Sam Two", "access_code": bad}),
            )
            .await;
        assert_eq!(a.status, 422, "{bad}: {:?}", a.body);
    }
    assert_eq!(t.get("/v1/contacts/p2").await.status, 404);

    // null removes the PIN, which frees it.
    let a = t
        .put(
            "/v1/contacts/p1",
            json!({"name": "Pat Uno", "access_code": null}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["contact"]["has_access_code"], false);
    let a = t
        .put(
            "/v1/contacts/p2",
            json!({"name": "Sam Two", "access_code": PIN_K1}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    // Upserts of people append no unit events.
    assert_eq!(t.last_seq().await, 0);
    t.stop().await;
}

#[tokio::test]
async fn tenancy_upsert_checks_contact_and_dates() {
    let t = TestGateway::start().await;
    let a = t
        .put(
            "/v1/tenancies/tn1",
            json!({"contact_id": "nobody", "start_date": "2026-03-01"}),
        )
        .await;
    assert_eq!((a.status, a.code()), (404, "not_found"), "{:?}", a.body);
    assert_eq!(t.get("/v1/tenancies/tn1").await.status, 404);

    let a = t.put("/v1/contacts/c1", json!({"name": "Chris"})).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let a = t
        .put(
            "/v1/tenancies/tn1",
            json!({"contact_id": "c1", "start_date": "2026-03-10", "end_date": "2026-03-09"}),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(detail_fields(&a), BTreeSet::from(["end_date".to_owned()]));
    let a = t
        .put(
            "/v1/tenancies/tn1",
            json!({"contact_id": "c1", "start_date": "10/03/2026"}),
        )
        .await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(detail_fields(&a), BTreeSet::from(["start_date".to_owned()]));
    assert_eq!(t.get("/v1/tenancies/tn1").await.status, 404);

    let a = t
        .put(
            "/v1/tenancies/tn1",
            json!({"contact_id": "c1", "start_date": "2026-03-10"}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        a.body["tenancy"],
        json!({"id": "tn1", "contact_id": "c1", "start_date": "2026-03-10", "end_date": null,
               "state": "active", "version": 1})
    );
    // Same day in and out is fine.
    let a = t
        .put(
            "/v1/tenancies/tn1",
            json!({"contact_id": "c1", "start_date": "2026-03-10", "end_date": "2026-03-10"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["tenancy"]["end_date"], "2026-03-10");
    assert_eq!(a.body["tenancy"]["version"], 2);
    t.stop().await;
}

#[tokio::test]
async fn unit_type_upsert_creates_then_updates() {
    let t = TestGateway::start().await;
    let a = t
        .put("/v1/unit_types/medium", json!({"name": "Medium"}))
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        a.body["unit_type"],
        json!({"id": "medium", "name": "Medium", "version": 1})
    );
    let a = t
        .put("/v1/unit_types/medium", json!({"name": "Medium 5x10"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["unit_type"],
        json!({"id": "medium", "name": "Medium 5x10", "version": 2})
    );
    let a = t
        .put("/v1/unit_types/medium", json!({"name": "Medium 5x10"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["unit_type"]["version"], 2,
        "no change, no new version"
    );
    let g = t.get("/v1/unit_types/medium").await;
    assert_eq!(g.body["unit_type"]["name"], "Medium 5x10");
    let a = t.put("/v1/unit_types/medium", json!({"name": ""})).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    let a = t.put("/v1/unit_types/bad%20id", json!({"name": "X"})).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    // A unit shows the renamed type.
    let a = t
        .call(
            Method::POST,
            "/v1/units",
            Some(ADMIN),
            Some(&json!({"unit": {
                "name": "M1", "unit_type": "medium", "width": 5, "length": 10, "height": 8,
                "door_height": 7, "door_width": 4, "door_type": "swing", "access_type": "outdoor",
                "standard_rate": 60, "walk_thru_order": 1
            }})),
            &[],
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(
        a.body["units"][0]["unit_type"],
        json!({"id": "medium", "name": "Medium 5x10"})
    );
    t.stop().await;
}

// ---- bindings -----------------------------------------------------------------------------

#[tokio::test]
async fn snapshot_bindings_must_name_declared_devices_and_not_be_shared() {
    let t = TestGateway::start().await;
    assert_eq!(put_snapshot(&t, &base()).await.status, 200);
    let before = replica(&t).await;
    let seq = t.last_seq().await;

    // s6 (units[5]) holds lock-6 and rb1 input 6. Each bad snapshot also renames s1.
    let with_rename = |f: &dyn Fn(&mut Value)| {
        let mut s = base();
        s["units"][0]["name"] = json!("S1-renamed");
        f(&mut s);
        s
    };
    let cases: Vec<(&str, Value, Vec<&str>, &str)> = vec![
        (
            "an unknown board",
            with_rename(&|s| s["units"][3]["door_sensor"] = json!({"board": "rb9", "input": 1})),
            vec!["units[3].door_sensor.board"],
            "configured: rb1, relay-1",
        ),
        (
            "a coil past the board's last",
            with_rename(&|s| {
                s["units"][3]["lock"] = json!({"kind": "relay", "board": "rb1", "coil": 16})
            }),
            vec!["units[3].lock.coil"],
            "has 16 coils",
        ),
        (
            "an input past the board's last",
            with_rename(&|s| s["units"][5]["door_sensor"] = json!({"board": "rb1", "input": 99})),
            vec!["units[5].door_sensor.input"],
            "has 16 inputs",
        ),
        (
            "two units on one smart lock",
            with_rename(&|s| s["units"][3]["lock"] = json!({"kind": "smart_lock", "id": "lock-6"})),
            vec!["units[5].lock"],
            "bound to unit \"s4\" (S4)",
        ),
        (
            "two units on one coil",
            with_rename(&|s| {
                let coil = json!({"kind": "relay", "board": "relay-1", "coil": 5});
                s["units"][1]["lock"] = coil.clone();
                s["units"][4]["lock"] = coil;
            }),
            vec!["units[4].lock"],
            "bound to unit \"s2\" (S2)",
        ),
        (
            "two units on one door sensor, after a unit that does not parse",
            with_rename(&|s| {
                s["units"][4]["width"] = json!(-1);
                s["units"][0]["door_sensor"] = json!({"board": "rb1", "input": 6});
            }),
            vec!["units[4].width", "units[5].door_sensor"],
            "bound to unit \"s1\" (S1-renamed)",
        ),
    ];
    for (what, s, fields, says) in cases {
        let a = put_snapshot(&t, &s).await;
        assert_eq!(
            (a.status, a.code()),
            (422, "validation_error"),
            "{what}: {:?}",
            a.body
        );
        let want: BTreeSet<String> = fields.iter().map(|f| f.to_string()).collect();
        assert_eq!(detail_fields(&a), want, "{what}");
        let last = fields.last().unwrap();
        let message = a.body["error"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["field"] == *last)
            .and_then(|d| d["message"].as_str())
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains(says), "{what}: {message}");
    }
    assert_eq!(replica(&t).await, before, "nothing changed");
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());

    // Units of one snapshot may swap their locks and sensors, and take a disabled board's
    // last coil.
    let mut s = base();
    s["units"][3]["lock"] = json!({"kind": "smart_lock", "id": "lock-6"});
    s["units"][3]["door_sensor"] = json!({"board": "rb1", "input": 6});
    s["units"][5]["lock"] = json!({"kind": "relay", "board": "relay-1", "coil": 15});
    s["units"][5]["door_sensor"] = Value::Null;
    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let units = all_units(&t).await;
    assert_eq!(
        units["s4"]["lock"],
        json!({"kind": "smart_lock", "id": "lock-6"})
    );
    assert_eq!(
        units["s6"]["lock"],
        json!({"kind": "relay", "board": "relay-1", "coil": 15})
    );
    t.stop().await;
}

#[tokio::test]
async fn snapshot_sets_gatelock_and_reapplying_it_changes_nothing() {
    let t = TestGateway::start().await;
    assert_eq!(put_snapshot(&t, &base()).await.status, 200);
    let before = all_units(&t).await;
    assert!(
        before.values().all(|u| u["gatelock"] == false),
        "{before:?}"
    );
    let seq = t.last_seq().await;

    // s1 (occupied) gatelocked; s7 arrives gatelocked.
    let mut s = base();
    s["units"][0]["gatelock"] = json!(true);
    let mut s7 = unit("s7", "S7", "available");
    s7["gatelock"] = json!(true);
    s["units"].as_array_mut().unwrap().push(s7);
    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["snapshot"]["units"], counts(1, 1, 0, 5));
    assert_eq!(a.body["snapshot"]["events"], 2);
    let evs = t.events_after(seq).await;
    assert_gapless(seq, &evs);
    assert_eq!(
        event_keys(&evs),
        [
            ("unit.created".to_owned(), "s7".to_owned()),
            ("unit.updated".to_owned(), "s1".to_owned()),
        ]
    );
    let s1 = evs.iter().find(|e| e["data"]["unit_id"] == "s1").unwrap();
    assert_eq!(s1["data"]["changed"], json!(["gatelock"]));
    assert_eq!(s1["data"]["version"], 2);
    let after = all_units(&t).await;
    assert_eq!(after["s1"]["gatelock"], true);
    assert_eq!(
        after["s1"]["status"], "occupied",
        "the status is not touched"
    );
    assert_eq!(after["s1"]["version"], 2);
    assert_eq!(after["s7"]["gatelock"], true);
    for id in ["s2", "s3", "s4", "s5", "s6"] {
        assert_eq!(after[id], before[id], "{id} untouched");
    }

    // The same snapshot again: nothing to do.
    let replica_before = replica(&t).await;
    let seq = t.last_seq().await;
    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["snapshot"]["units"], counts(0, 0, 0, 7));
    assert_eq!(a.body["snapshot"]["events"], 0);
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    assert_eq!(replica(&t).await, replica_before);

    // Not a boolean: refused, nothing changed.
    let mut bad = s.clone();
    bad["units"][0]["gatelock"] = json!("yes");
    let a = put_snapshot(&t, &bad).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert!(
        detail_fields(&a).iter().any(|f| f.ends_with("gatelock")),
        "{:?}",
        a.body
    );
    assert_eq!(replica(&t).await, replica_before);

    // The snapshot is the whole replica: a unit listed without gatelock has none.
    s["units"][0]
        .as_object_mut()
        .unwrap()
        .remove("gatelock")
        .expect("was set");
    let a = put_snapshot(&t, &s).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["snapshot"]["units"], counts(0, 1, 0, 6));
    let units = all_units(&t).await;
    assert_eq!(units["s1"]["gatelock"], false);
    assert_eq!(units["s1"]["version"], 3);
    assert_eq!(units["s7"]["gatelock"], true);
    t.stop().await;
}
