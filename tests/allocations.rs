//! DESIGN.md §2's allocation table over real HTTP: every allowed transition with its reply,
//! the unit afterwards and the events it appends; every refused one answers 409 with the
//! rule's code and changes nothing (no status, no version, no event).

mod common;

use common::{Answer, TestGateway};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The harness clock's default time, as the gateway writes timestamps.
const NOW: &str = "2026-03-10T12:00:00.000Z";

/// Every unit's `(status, version, current_tenancy_id, current_tenant_id)` by id.
type UnitStates = BTreeMap<String, (String, i64, Value, Value)>;

async fn unit_states(t: &TestGateway) -> UnitStates {
    let a = t.get("/v1/units?limit=200").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| {
            (
                u["id"].as_str().expect("id").to_owned(),
                (
                    u["status"].as_str().expect("status").to_owned(),
                    u["version"].as_i64().expect("version"),
                    u["current_tenancy_id"].clone(),
                    u["current_tenant_id"].clone(),
                ),
            )
        })
        .collect()
}

/// `GET /v1/units/{id}`'s unit.
async fn unit(t: &TestGateway, id: &str) -> Value {
    let a = t.get(&format!("/v1/units/{id}")).await;
    assert_eq!(a.status, 200, "GET {id}: {:?}", a.body);
    assert_eq!(
        a.header("etag").as_deref(),
        Some(format!("\"{}\"", a.body["unit"]["version"]).as_str()),
        "ETag is the version"
    );
    a.body["unit"].clone()
}

/// The events after `after`, asserting their seqs run on from `after + 1` without a gap.
async fn new_events(t: &TestGateway, after: i64) -> Vec<Value> {
    let evs = t.events_after(after).await;
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(
            e["seq"].as_i64(),
            Some(after + 1 + i as i64),
            "seq gapless: {evs:#?}"
        );
    }
    evs
}

/// The whole log is gapless from 1.
async fn assert_log_gapless(t: &TestGateway) {
    let evs = new_events(t, 0).await;
    assert!(!evs.is_empty());
}

fn types(evs: &[Value]) -> Vec<&str> {
    evs.iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect()
}

/// What an allocation event must say.
struct Expect<'a> {
    kind: &'a str,
    unit: &'a str,
    from: &'a str,
    to: &'a str,
    tenancy: Option<&'a str>,
    contact: Option<&'a str>,
    at: &'a str,
}

fn assert_event(e: &Value, x: &Expect<'_>) {
    let d = &e["data"];
    assert_eq!(e["type"], x.kind, "{e:#}");
    assert_eq!(e["site_id"], "site-test", "{e:#}");
    assert_eq!(e["occurred_at"], x.at, "{e:#}");
    assert!(e["id"].as_str().is_some_and(|s| !s.is_empty()), "{e:#}");
    assert_eq!(d["unit_id"], x.unit, "{e:#}");
    assert_eq!(d["from"], x.from, "{e:#}");
    assert_eq!(d["to"], x.to, "{e:#}");
    assert_eq!(d["tenancy_id"], json!(x.tenancy), "{e:#}");
    assert_eq!(d["contact_id"], json!(x.contact), "{e:#}");
}

/// POSTs and asserts 200, returning the body.
async fn ok(t: &TestGateway, path: &str, body: Value) -> Value {
    let a = t.post(path, body).await;
    assert_eq!(a.status, 200, "POST {path}: {:#}", a.body);
    a.body
}

/// POSTs a request that must be refused with `status`/`code` and change nothing at all.
async fn refused(t: &TestGateway, path: &str, body: Value, status: u16, code: &str) -> Answer {
    let before = unit_states(t).await;
    let seq = t.last_seq().await;
    let a = t.post(path, body.clone()).await;
    assert_eq!(
        (a.status, a.code()),
        (status, code),
        "POST {path} {body}: {:#}",
        a.body
    );
    let msg = a.body["error"]["message"].as_str().unwrap_or("");
    assert!(!msg.is_empty(), "an error message: {:#}", a.body);
    assert!(
        a.body["error"]["request_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{:#}",
        a.body
    );
    assert_eq!(
        unit_states(t).await,
        before,
        "POST {path} {body} changed a unit"
    );
    assert_eq!(
        t.events_after(seq).await,
        Vec::<Value>::new(),
        "POST {path} {body} appended events"
    );
    a
}

async fn put_contact(t: &TestGateway, id: &str, pin: &str) {
    let a = t
        .put(
            &format!("/v1/contacts/{id}"),
            json!({"name": format!("Contact {id}"), "access_code": pin}),
        )
        .await;
    assert_eq!(a.status, 201, "{:#}", a.body);
}

async fn put_tenancy(t: &TestGateway, id: &str, contact: &str, start: &str) {
    let a = t
        .put(
            &format!("/v1/tenancies/{id}"),
            json!({"contact_id": contact, "start_date": start}),
        )
        .await;
    assert_eq!(a.status, 201, "{:#}", a.body);
}

/// `seed(n)` plus contacts `c4`, `c5` with started tenancies `t-c4`, `t-c5`.
async fn site(n: usize) -> TestGateway {
    let t = TestGateway::start().await;
    t.seed(n).await;
    put_contact(&t, "c4", "4444").await;
    put_contact(&t, "c5", "5555").await;
    put_tenancy(&t, "t-c4", "c4", "2026-03-01").await;
    put_tenancy(&t, "t-c5", "c5", "2026-03-01").await;
    t
}

/// A site with one unit in every status, each held by its own contact:
/// u1 available, u2 reserved (t-future/c1), u3 occupied (t-started/c2),
/// u4 overlocked (t-c4/c4), u5 unavailable, u6 repossessed (t-c5/c5). c3 holds nothing.
async fn every_status_site() -> TestGateway {
    let t = site(6).await;
    ok(
        &t,
        "/v1/units/u2/reserve",
        json!({"tenancy_id": "t-future"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u3/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u4/grant_access",
        json!({"tenancy_id": "t-c4"}),
    )
    .await;
    ok(&t, "/v1/contacts/c4/overlock", json!({})).await;
    ok(
        &t,
        "/v1/units/u5/set_status",
        json!({"status": "unavailable"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u6/grant_access",
        json!({"tenancy_id": "t-c5"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u6/set_status",
        json!({"status": "repossessed"}),
    )
    .await;
    let states = unit_states(&t).await;
    let status: Vec<&str> = states.values().map(|s| s.0.as_str()).collect();
    assert_eq!(
        status,
        [
            "available",
            "reserved",
            "occupied",
            "overlocked",
            "unavailable",
            "repossessed"
        ]
    );
    t
}

// ---- allowed transitions --------------------------------------------------------------

#[tokio::test]
async fn reserve_then_grant_access_keeps_one_allocation() {
    let t = site(2).await;
    let seq = t.last_seq().await;
    let v0 = unit(&t, "u1").await["version"].as_i64().unwrap();

    let r = ok(
        &t,
        "/v1/units/u1/reserve",
        json!({"tenancy_id": "t-future", "by": "alice"}),
    )
    .await;
    assert_eq!(r["unit"]["id"], "u1");
    assert_eq!(r["unit"]["status"], "reserved");
    assert_eq!(r["unit"]["current_tenancy_id"], "t-future");
    assert_eq!(r["unit"]["current_tenant_id"], "c1");
    assert_eq!(r["unit"]["available_for_move_in"], false);
    assert_eq!(r["unit"]["version"], v0 + 1);
    let a = &r["allocation"];
    let alloc_id = a["id"].as_str().expect("allocation id").to_owned();
    assert!(!alloc_id.is_empty());
    assert_eq!(a["unit_id"], "u1");
    assert_eq!(a["tenancy_id"], "t-future");
    assert_eq!(a["reserved_at"], NOW);
    assert_eq!(a["reserved_by"], "alice");
    assert_eq!(a["granted_access_at"], Value::Null);
    assert_eq!(a["granted_access_by"], Value::Null);
    assert_eq!(a["ended_at"], Value::Null);
    assert_eq!(a["ended_by"], Value::Null);
    assert_eq!(unit(&t, "u1").await, r["unit"], "GET agrees with the reply");
    assert_eq!(unit(&t, "u2").await["status"], "available");

    let evs = new_events(&t, seq).await;
    assert_eq!(types(&evs), ["unit.reserved"]);
    assert_event(
        &evs[0],
        &Expect {
            kind: "unit.reserved",
            unit: "u1",
            from: "available",
            to: "reserved",
            tenancy: Some("t-future"),
            contact: Some("c1"),
            at: NOW,
        },
    );
    assert_eq!(evs[0]["data"]["allocation_id"], alloc_id.as_str());
    assert_eq!(evs[0]["data"]["by"], "alice");

    // Days later, still before the start date: access is granted on the same allocation.
    t.clock.set("2026-03-15T09:30:00Z");
    let later = "2026-03-15T09:30:00.000Z";
    let seq = t.last_seq().await;
    let g = ok(
        &t,
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-future", "by": "bob"}),
    )
    .await;
    assert_eq!(g["unit"]["status"], "occupied");
    assert_eq!(g["unit"]["current_tenancy_id"], "t-future");
    assert_eq!(g["unit"]["current_tenant_id"], "c1");
    assert_eq!(g["unit"]["version"], v0 + 2);
    let a = &g["allocation"];
    assert_eq!(
        a["id"],
        alloc_id.as_str(),
        "the reservation becomes the tenancy"
    );
    assert_eq!(a["tenancy_id"], "t-future");
    assert_eq!(a["reserved_at"], NOW);
    assert_eq!(a["reserved_by"], "alice");
    assert_eq!(a["granted_access_at"], later);
    assert_eq!(a["granted_access_by"], "bob");
    assert_eq!(a["ended_at"], Value::Null);
    assert_eq!(unit(&t, "u1").await, g["unit"]);

    let evs = new_events(&t, seq).await;
    assert_eq!(types(&evs), ["unit.occupied"]);
    assert_event(
        &evs[0],
        &Expect {
            kind: "unit.occupied",
            unit: "u1",
            from: "reserved",
            to: "occupied",
            tenancy: Some("t-future"),
            contact: Some("c1"),
            at: later,
        },
    );
    assert_eq!(evs[0]["data"]["allocation_id"], alloc_id.as_str());
    assert_log_gapless(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn grant_access_on_an_available_unit_allocates_in_one_step() {
    let t = site(2).await;
    let seq = t.last_seq().await;
    let v0 = unit(&t, "u2").await["version"].as_i64().unwrap();
    let g = ok(
        &t,
        "/v1/units/u2/grant_access",
        json!({"tenancy_id": "t-started", "by": "carol"}),
    )
    .await;
    assert_eq!(g["unit"]["status"], "occupied");
    assert_eq!(g["unit"]["current_tenancy_id"], "t-started");
    assert_eq!(g["unit"]["current_tenant_id"], "c2");
    assert_eq!(g["unit"]["version"], v0 + 1);
    let a = &g["allocation"];
    assert!(a["id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(a["unit_id"], "u2");
    assert_eq!(a["tenancy_id"], "t-started");
    assert_eq!(a["reserved_at"], Value::Null, "never reserved");
    assert_eq!(a["reserved_by"], Value::Null);
    assert_eq!(a["granted_access_at"], NOW);
    assert_eq!(a["granted_access_by"], "carol");
    assert_eq!(a["ended_at"], Value::Null);
    assert_eq!(unit(&t, "u2").await, g["unit"]);
    assert_eq!(unit(&t, "u1").await["status"], "available");

    let evs = new_events(&t, seq).await;
    assert_eq!(types(&evs), ["unit.occupied"]);
    assert_event(
        &evs[0],
        &Expect {
            kind: "unit.occupied",
            unit: "u2",
            from: "available",
            to: "occupied",
            tenancy: Some("t-started"),
            contact: Some("c2"),
            at: NOW,
        },
    );
    assert_eq!(evs[0]["data"]["allocation_id"], a["id"]);

    // A tenancy that has not started may also move straight in.
    let g = ok(
        &t,
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-other"}),
    )
    .await;
    assert_eq!(g["unit"]["status"], "occupied");
    assert_eq!(g["allocation"]["granted_access_by"], Value::Null);
    assert_ne!(g["allocation"]["id"], a["id"]);
    assert_log_gapless(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn overlock_and_remove_overlock_apply_to_every_unit_of_the_contact() {
    let t = site(8).await;
    // c1 holds u1, u2 (t-future) and u3 (t-c1b, a second tenancy) occupied and u4 reserved;
    // c2 holds u5 occupied; u6 (c1) becomes repossessed.
    put_tenancy(&t, "t-c1b", "c1", "2026-02-01").await;
    for (u, ten) in [("u1", "t-future"), ("u2", "t-future"), ("u3", "t-c1b")] {
        ok(
            &t,
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": ten}),
        )
        .await;
    }
    ok(
        &t,
        "/v1/units/u4/reserve",
        json!({"tenancy_id": "t-future"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u5/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u6/grant_access",
        json!({"tenancy_id": "t-c1b"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u6/set_status",
        json!({"status": "repossessed"}),
    )
    .await;
    let before = unit_states(&t).await;
    let seq = t.last_seq().await;

    let o = ok(&t, "/v1/contacts/c1/overlock", json!({"by": "billing"})).await;
    let listed: Vec<(&str, &str)> = o["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| (u["id"].as_str().unwrap(), u["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [
            ("u1", "overlocked"),
            ("u2", "overlocked"),
            ("u3", "overlocked")
        ],
        "exactly the changed units"
    );
    for u in o["units"].as_array().unwrap() {
        let id = u["id"].as_str().unwrap();
        assert_eq!(u["version"], before[id].1 + 1, "{id}");
        assert_eq!(u["current_tenant_id"], "c1", "{id}");
        assert_eq!(&unit(&t, id).await, u, "GET {id} agrees");
    }
    let after = unit_states(&t).await;
    for id in ["u4", "u5", "u6", "u7", "u8"] {
        assert_eq!(after[id], before[id], "{id} untouched");
    }
    assert_eq!(after["u4"].0, "reserved");
    assert_eq!(after["u5"].0, "occupied");
    assert_eq!(after["u6"].0, "repossessed");

    let evs = new_events(&t, seq).await;
    assert_eq!(
        types(&evs),
        ["unit.overlocked", "unit.overlocked", "unit.overlocked"]
    );
    for (e, (u, ten)) in evs
        .iter()
        .zip([("u1", "t-future"), ("u2", "t-future"), ("u3", "t-c1b")])
    {
        assert_event(
            e,
            &Expect {
                kind: "unit.overlocked",
                unit: u,
                from: "occupied",
                to: "overlocked",
                tenancy: Some(ten),
                contact: Some("c1"),
                at: NOW,
            },
        );
        assert_eq!(e["data"]["by"], "billing");
    }

    // Nothing occupied is left: a second overlock is refused.
    refused(
        &t,
        "/v1/contacts/c1/overlock",
        json!({}),
        409,
        "no_units_in_status",
    )
    .await;

    // One more unit moves in; overlock now changes only that one.
    ok(
        &t,
        "/v1/units/u7/grant_access",
        json!({"tenancy_id": "t-c1b"}),
    )
    .await;
    let seq = t.last_seq().await;
    let o = ok(&t, "/v1/contacts/c1/overlock", json!({})).await;
    assert_eq!(
        o["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["u7"]
    );
    assert_eq!(types(&new_events(&t, seq).await), ["unit.overlocked"]);

    // remove_overlock lifts all four, leaving the reserved, repossessed and c2's units alone.
    let before = unit_states(&t).await;
    let seq = t.last_seq().await;
    let r = ok(&t, "/v1/contacts/c1/remove_overlock", json!({})).await;
    let listed: Vec<(&str, &str)> = r["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["id"].as_str().unwrap(), u["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [
            ("u1", "occupied"),
            ("u2", "occupied"),
            ("u3", "occupied"),
            ("u7", "occupied")
        ]
    );
    let after = unit_states(&t).await;
    for id in ["u4", "u5", "u6", "u8"] {
        assert_eq!(after[id], before[id], "{id} untouched");
    }
    for id in ["u1", "u2", "u3", "u7"] {
        assert_eq!(after[id].0, "occupied");
        assert_eq!(after[id].1, before[id].1 + 1, "{id} version");
    }
    let evs = new_events(&t, seq).await;
    assert_eq!(types(&evs), ["unit.occupied"; 4]);
    for (e, (u, ten)) in evs.iter().zip([
        ("u1", "t-future"),
        ("u2", "t-future"),
        ("u3", "t-c1b"),
        ("u7", "t-c1b"),
    ]) {
        assert_event(
            e,
            &Expect {
                kind: "unit.occupied",
                unit: u,
                from: "overlocked",
                to: "occupied",
                tenancy: Some(ten),
                contact: Some("c1"),
                at: NOW,
            },
        );
    }
    refused(
        &t,
        "/v1/contacts/c1/remove_overlock",
        json!({}),
        409,
        "no_units_in_status",
    )
    .await;

    // c2's unit is still occupied and can be overlocked on its own.
    let o = ok(&t, "/v1/contacts/c2/overlock", json!({})).await;
    assert_eq!(o["units"].as_array().unwrap().len(), 1);
    assert_eq!(o["units"][0]["id"], "u5");
    assert_eq!(unit(&t, "u1").await["status"], "occupied");
    assert_log_gapless(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn deallocate_from_every_allocated_status() {
    let t = site(4).await;
    // u1 reserved (c1), u2 occupied (c2), u3 overlocked (c4), u4 repossessed (c5).
    ok(
        &t,
        "/v1/units/u1/reserve",
        json!({"tenancy_id": "t-future"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u2/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u3/grant_access",
        json!({"tenancy_id": "t-c4"}),
    )
    .await;
    ok(&t, "/v1/contacts/c4/overlock", json!({})).await;
    ok(
        &t,
        "/v1/units/u4/grant_access",
        json!({"tenancy_id": "t-c5"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u4/set_status",
        json!({"status": "repossessed"}),
    )
    .await;

    t.clock.set("2026-03-12T16:45:00Z");
    let at = "2026-03-12T16:45:00.000Z";
    for (u, from, ten, contact) in [
        ("u1", "reserved", "t-future", "c1"),
        ("u2", "occupied", "t-started", "c2"),
        ("u3", "overlocked", "t-c4", "c4"),
        ("u4", "repossessed", "t-c5", "c5"),
    ] {
        let before = unit(&t, u).await;
        assert_eq!(before["status"], from);
        assert_eq!(before["current_tenancy_id"], ten);
        let others_before = unit_states(&t).await;
        let seq = t.last_seq().await;

        let d = ok(
            &t,
            &format!("/v1/units/{u}/deallocate"),
            json!({"by": "dora"}),
        )
        .await;
        assert_eq!(d["unit"]["status"], "available", "{u}");
        assert_eq!(d["unit"]["current_tenancy_id"], Value::Null, "{u}");
        assert_eq!(d["unit"]["current_tenant_id"], Value::Null, "{u}");
        assert_eq!(
            d["unit"]["version"],
            before["version"].as_i64().unwrap() + 1
        );
        let a = &d["allocation"];
        assert_eq!(a["tenancy_id"], ten, "{u}: the ended allocation");
        assert_eq!(a["unit_id"], u);
        assert_eq!(a["ended_at"], at, "{u}");
        assert_eq!(a["ended_by"], "dora", "{u}");
        if from == "reserved" {
            assert_eq!(a["reserved_at"], NOW);
            assert_eq!(a["granted_access_at"], Value::Null);
        } else {
            assert_eq!(a["granted_access_at"], NOW, "{u}");
        }
        assert_eq!(unit(&t, u).await, d["unit"], "{u}: GET agrees");
        let mut others_after = unit_states(&t).await;
        let mut others_before = others_before;
        others_after.remove(u);
        others_before.remove(u);
        assert_eq!(
            others_after, others_before,
            "deallocating {u} touched another unit"
        );

        let evs = new_events(&t, seq).await;
        assert_eq!(types(&evs), ["unit.deallocated", "unit.available"], "{u}");
        for e in &evs {
            assert_event(
                e,
                &Expect {
                    kind: e["type"].as_str().unwrap(),
                    unit: u,
                    from,
                    to: "available",
                    tenancy: Some(ten),
                    contact: Some(contact),
                    at,
                },
            );
            assert_eq!(e["data"]["allocation_id"], a["id"]);
            assert_eq!(e["data"]["by"], "dora");
        }

        // Deallocated twice is refused; the unit is free for another tenancy.
        refused(
            &t,
            &format!("/v1/units/{u}/deallocate"),
            json!({}),
            409,
            "invalid_transition",
        )
        .await;
        let seq = t.last_seq().await;
        let r = ok(
            &t,
            &format!("/v1/units/{u}/reserve"),
            json!({"tenancy_id": "t-other"}),
        )
        .await;
        assert_eq!(r["unit"]["status"], "reserved");
        assert_eq!(r["unit"]["current_tenancy_id"], "t-other");
        assert_eq!(r["unit"]["current_tenant_id"], "c3");
        assert_ne!(r["allocation"]["id"], a["id"], "a new allocation");
        assert_eq!(r["allocation"]["ended_at"], Value::Null);
        assert_eq!(r["allocation"]["reserved_at"], at);
        let evs = new_events(&t, seq).await;
        assert_eq!(types(&evs), ["unit.reserved"]);
        assert_eq!(evs[0]["data"]["contact_id"], "c3");
    }
    assert_log_gapless(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn deallocate_without_a_body() {
    let t = site(1).await;
    ok(
        &t,
        "/v1/units/u1/reserve",
        json!({"tenancy_id": "t-future"}),
    )
    .await;
    let a = t
        .call(
            reqwest::Method::POST,
            "/v1/units/u1/deallocate",
            Some(common::ADMIN),
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, 200, "{:#}", a.body);
    assert_eq!(a.body["unit"]["status"], "available");
    assert_eq!(a.body["allocation"]["ended_at"], NOW);
    assert_eq!(a.body["allocation"]["ended_by"], Value::Null);
    t.stop().await;
}

#[tokio::test]
async fn operator_states() {
    let t = site(3).await;
    ok(
        &t,
        "/v1/units/u2/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    ok(
        &t,
        "/v1/units/u3/grant_access",
        json!({"tenancy_id": "t-c4"}),
    )
    .await;
    ok(&t, "/v1/contacts/c4/overlock", json!({})).await;

    for (u, from, to, ten, contact) in [
        ("u1", "available", "unavailable", None, None),
        ("u1", "unavailable", "available", None, None),
        (
            "u2",
            "occupied",
            "repossessed",
            Some("t-started"),
            Some("c2"),
        ),
        ("u3", "overlocked", "repossessed", Some("t-c4"), Some("c4")),
    ] {
        let before = unit(&t, u).await;
        assert_eq!(before["status"], from);
        let seq = t.last_seq().await;
        let r = ok(
            &t,
            &format!("/v1/units/{u}/set_status"),
            json!({"status": to, "by": "ops"}),
        )
        .await;
        assert_eq!(r["unit"]["status"], to, "{u} {from}->{to}");
        assert_eq!(
            r["unit"]["version"],
            before["version"].as_i64().unwrap() + 1
        );
        assert_eq!(
            r["unit"]["current_tenancy_id"],
            json!(ten),
            "allocation kept"
        );
        assert_eq!(r["unit"]["current_tenant_id"], json!(contact));
        match ten {
            Some(ten) => {
                assert_eq!(r["allocation"]["tenancy_id"], ten);
                assert_eq!(r["allocation"]["ended_at"], Value::Null);
                assert_eq!(r["allocation"]["granted_access_at"], NOW);
            }
            None => assert_eq!(r["allocation"], Value::Null),
        }
        assert_eq!(unit(&t, u).await, r["unit"]);
        let evs = new_events(&t, seq).await;
        assert_eq!(types(&evs), ["unit.status_changed"]);
        assert_event(
            &evs[0],
            &Expect {
                kind: "unit.status_changed",
                unit: u,
                from,
                to,
                tenancy: ten,
                contact,
                at: NOW,
            },
        );
        assert_eq!(evs[0]["data"]["by"], "ops");
    }
    assert_eq!(unit(&t, "u1").await["available_for_move_in"], true);
    assert_log_gapless(&t).await;
    t.stop().await;
}

// ---- refused transitions ----------------------------------------------------------------

#[tokio::test]
async fn every_refused_transition_changes_nothing() {
    let t = every_status_site().await;
    let start = unit_states(&t).await;
    let unit_op = |u: &str, op: &str| format!("/v1/units/{u}/{op}");
    let ten = |id: &str| json!({"tenancy_id": id});
    let st = |s: &str| json!({"status": s});
    let mut cases: Vec<(String, Value, &str)> = Vec::new();

    // reserve: only from available.
    for u in ["u2", "u3", "u4", "u5", "u6"] {
        cases.push((unit_op(u, "reserve"), ten("t-other"), "invalid_transition"));
    }
    cases.push((
        unit_op("u2", "reserve"),
        ten("t-future"),
        "invalid_transition",
    ));
    // reserve needs a tenancy that has not started.
    cases.push((
        unit_op("u1", "reserve"),
        ten("t-started"),
        "tenancy_started",
    ));
    cases.push((unit_op("u1", "reserve"), ten("t-ended"), "tenancy_started"));
    cases.push((unit_op("u1", "reserve"), ten("t-c4"), "tenancy_started"));

    // grant_access: from available, or reserved for the same tenancy.
    cases.push((
        unit_op("u2", "grant_access"),
        ten("t-other"),
        "tenancy_mismatch",
    ));
    cases.push((
        unit_op("u2", "grant_access"),
        ten("t-started"),
        "tenancy_mismatch",
    ));
    for (u, own) in [("u3", "t-started"), ("u4", "t-c4"), ("u6", "t-c5")] {
        cases.push((unit_op(u, "grant_access"), ten(own), "invalid_transition"));
        cases.push((
            unit_op(u, "grant_access"),
            ten("t-other"),
            "invalid_transition",
        ));
    }
    cases.push((
        unit_op("u5", "grant_access"),
        ten("t-other"),
        "invalid_transition",
    ));
    cases.push((
        unit_op("u1", "grant_access"),
        ten("t-ended"),
        "tenancy_ended",
    ));

    // deallocate: only what is allocated.
    for u in ["u1", "u5"] {
        cases.push((unit_op(u, "deallocate"), json!({}), "invalid_transition"));
    }

    // set_status: unavailable from available only; available from unavailable only;
    // repossessed from occupied or overlocked only; nothing else is an operator state.
    for u in ["u2", "u3", "u4", "u5", "u6"] {
        cases.push((
            unit_op(u, "set_status"),
            st("unavailable"),
            "invalid_transition",
        ));
    }
    for u in ["u1", "u2", "u3", "u4", "u6"] {
        cases.push((
            unit_op(u, "set_status"),
            st("available"),
            "invalid_transition",
        ));
    }
    for u in ["u1", "u2", "u5", "u6"] {
        cases.push((
            unit_op(u, "set_status"),
            st("repossessed"),
            "invalid_transition",
        ));
    }
    for target in ["reserved", "occupied", "overlocked"] {
        for u in ["u1", "u2", "u3", "u4", "u5", "u6"] {
            cases.push((unit_op(u, "set_status"), st(target), "invalid_transition"));
        }
    }

    // overlock / remove_overlock: the contact needs a unit in the source status.
    for c in ["c1", "c3", "c4", "c5"] {
        cases.push((
            format!("/v1/contacts/{c}/overlock"),
            json!({}),
            "no_units_in_status",
        ));
    }
    for c in ["c1", "c2", "c3", "c5"] {
        cases.push((
            format!("/v1/contacts/{c}/remove_overlock"),
            json!({}),
            "no_units_in_status",
        ));
    }

    for (path, body, code) in &cases {
        refused(&t, path, body.clone(), 409, code).await;
    }
    assert_eq!(unit_states(&t).await, start);
    assert_log_gapless(&t).await;

    // The allowed ones still work from here: the refusals left no trace behind.
    ok(&t, "/v1/units/u2/grant_access", ten("t-future")).await;
    ok(&t, "/v1/units/u1/reserve", ten("t-other")).await;
    t.stop().await;
}

#[tokio::test]
async fn refusals_name_the_rule() {
    let t = every_status_site().await;
    let a = refused(
        &t,
        "/v1/units/u3/reserve",
        json!({"tenancy_id": "t-other"}),
        409,
        "invalid_transition",
    )
    .await;
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("u3") && msg.contains("occupied"), "{msg}");
    let a = refused(
        &t,
        "/v1/units/u2/grant_access",
        json!({"tenancy_id": "t-other"}),
        409,
        "tenancy_mismatch",
    )
    .await;
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("t-future") && msg.contains("t-other"), "{msg}");
    t.stop().await;
}

#[tokio::test]
async fn unknown_ids_are_404_and_change_nothing() {
    let t = every_status_site().await;
    for (path, body) in [
        ("/v1/units/nope/reserve", json!({"tenancy_id": "t-future"})),
        (
            "/v1/units/nope/grant_access",
            json!({"tenancy_id": "t-started"}),
        ),
        ("/v1/units/nope/deallocate", json!({})),
        (
            "/v1/units/nope/set_status",
            json!({"status": "unavailable"}),
        ),
        ("/v1/units/u1/reserve", json!({"tenancy_id": "t-nope"})),
        ("/v1/units/u1/grant_access", json!({"tenancy_id": "t-nope"})),
        ("/v1/units/u2/grant_access", json!({"tenancy_id": "t-nope"})),
        ("/v1/contacts/c-nope/overlock", json!({})),
        ("/v1/contacts/c-nope/remove_overlock", json!({})),
    ] {
        refused(&t, path, body, 404, "not_found").await;
    }
    t.stop().await;
}

#[tokio::test]
async fn set_status_to_an_unknown_status_is_422() {
    let t = every_status_site().await;
    for u in ["u1", "u3"] {
        for body in [
            json!({"status": "vacant"}),
            json!({"status": ""}),
            json!({"status": 3}),
            json!({}),
        ] {
            let a = refused(
                &t,
                &format!("/v1/units/{u}/set_status"),
                body.clone(),
                422,
                "validation_error",
            )
            .await;
            assert_eq!(a.body["error"]["details"][0]["field"], "status", "{body}");
        }
    }
    t.stop().await;
}

// ---- the site-local date ---------------------------------------------------------------

#[tokio::test]
async fn reserve_uses_the_site_local_date() {
    // 23:30 UTC on 19 July is 00:30 BST on 20 July in London.
    let t = TestGateway::start_at("2026-07-19T23:30:00Z").await;
    t.seed(4).await;
    put_tenancy(&t, "t-0720", "c1", "2026-07-20").await;
    put_tenancy(&t, "t-0721", "c3", "2026-07-21").await;

    let a = refused(
        &t,
        "/v1/units/u1/reserve",
        json!({"tenancy_id": "t-0720"}),
        409,
        "tenancy_started",
    )
    .await;
    let msg = a.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("2026-07-20"), "names the site date: {msg}");
    let r = ok(&t, "/v1/units/u1/reserve", json!({"tenancy_id": "t-0721"})).await;
    assert_eq!(r["unit"]["status"], "reserved");
    assert_eq!(r["allocation"]["reserved_at"], "2026-07-19T23:30:00.000Z");

    // The last second of 19 July in London (22:59:59 UTC): the tenancy has not started.
    t.clock.set("2026-07-19T22:59:59Z");
    let r = ok(&t, "/v1/units/u2/reserve", json!({"tenancy_id": "t-0720"})).await;
    assert_eq!(r["unit"]["status"], "reserved");
    assert_eq!(r["unit"]["current_tenancy_id"], "t-0720");

    // Midnight in London (23:00 UTC): it has.
    t.clock.set("2026-07-19T23:00:00Z");
    refused(
        &t,
        "/v1/units/u3/reserve",
        json!({"tenancy_id": "t-0720"}),
        409,
        "tenancy_started",
    )
    .await;
    // grant_access has no start rule: the started tenancy moves in directly.
    let g = ok(
        &t,
        "/v1/units/u3/grant_access",
        json!({"tenancy_id": "t-0720"}),
    )
    .await;
    assert_eq!(g["unit"]["status"], "occupied");
    assert_log_gapless(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn grant_access_on_a_reservation_whose_tenancy_ended_is_refused() {
    // Automations off: the clock jumps past the start and end dates and only the request acts.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = common::test_config(dir.path());
    cfg.site.auto_occupy = false;
    cfg.site.auto_deallocate = false;
    let t = TestGateway::start_with(dir, cfg, common::TestClock::at("2026-03-10T12:00:00Z")).await;
    t.seed(1).await;
    let a = t
        .put(
            "/v1/tenancies/t-short",
            json!({"contact_id": "c3", "start_date": "2026-03-20", "end_date": "2026-03-25"}),
        )
        .await;
    assert_eq!(a.status, 201, "{:#}", a.body);
    ok(&t, "/v1/units/u1/reserve", json!({"tenancy_id": "t-short"})).await;

    // The end date itself is still a tenancy day; the day after it is not.
    t.clock.set("2026-03-26T00:30:00Z");
    refused(
        &t,
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-short"}),
        409,
        "tenancy_ended",
    )
    .await;
    t.clock.set("2026-03-25T23:30:00Z");
    let g = ok(
        &t,
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-short"}),
    )
    .await;
    assert_eq!(g["unit"]["status"], "occupied");
    t.stop().await;
}
