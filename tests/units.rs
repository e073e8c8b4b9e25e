//! The units API (storEDGE shapes, DESIGN.md §3): listing and pagination, one unit,
//! PATCH/PUT, create (comma-separated names), bulk_create and bulk_update.

mod common;

use common::{ADMIN, Answer, TestGateway};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// A complete create input for a unit of type `small`.
fn new_unit(name: &str) -> Value {
    json!({
        "name": name, "unit_type": "small",
        "width": 5, "length": 10, "height": 8, "door_height": 7, "door_width": 4,
        "door_type": "roll_up", "access_type": "indoor", "standard_rate": 75.5,
        "walk_thru_order": 1, "zones": ["main-gate"],
    })
}

/// The `details[].field` of an error answer, as a set.
fn detail_fields(a: &Answer) -> BTreeSet<String> {
    a.body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details in {:?}", a.body))
        .iter()
        .map(|d| d["field"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The unit as `GET /v1/units/{id}` shows it.
async fn unit(t: &TestGateway, id: &str) -> Value {
    let a = t.get(&format!("/v1/units/{id}")).await;
    assert_eq!(a.status, 200, "GET {id}: {:?}", a.body);
    a.body["unit"].clone()
}

/// Names of the units of a list answer, in order.
fn names(a: &Answer) -> Vec<String> {
    a.body["units"]
        .as_array()
        .unwrap_or_else(|| panic!("no units in {:?}", a.body))
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Ids of the units of a list answer, as a set.
fn ids(a: &Answer) -> BTreeSet<String> {
    a.body["units"]
        .as_array()
        .unwrap_or_else(|| panic!("no units in {:?}", a.body))
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts `events` have consecutive seqs starting right after `after`.
fn assert_gapless(after: i64, events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"].as_i64(), Some(after + 1 + i as i64), "{events:?}");
    }
}

fn pagination(a: &Answer) -> Value {
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["meta"]["pagination"].clone()
}

// ---- GET /v1/units ----------------------------------------------------------------------

#[tokio::test]
async fn list_paginates_with_storedge_meta() {
    let t = TestGateway::start().await;
    t.seed(25).await;

    let a = t.get("/v1/units").await;
    assert_eq!(
        pagination(&a),
        json!({"current_page": 1, "total_pages": 1, "per_page": 100, "total_entries": 25,
               "previous_page": null, "next_page": null})
    );
    let all: Vec<String> = (1..=25).map(|i| format!("U{i:03}")).collect();
    assert_eq!(names(&a), all, "ordered by name");

    let a = t.get("/v1/units?limit=10").await;
    assert_eq!(
        pagination(&a),
        json!({"current_page": 1, "total_pages": 3, "per_page": 10, "total_entries": 25,
               "previous_page": null, "next_page": 2})
    );
    assert_eq!(names(&a), all[0..10]);

    let a = t.get("/v1/units?limit=10&offset=10").await;
    assert_eq!(
        pagination(&a),
        json!({"current_page": 2, "total_pages": 3, "per_page": 10, "total_entries": 25,
               "previous_page": 1, "next_page": 3})
    );
    assert_eq!(names(&a), all[10..20]);

    // The last page is partial.
    let a = t.get("/v1/units?limit=10&offset=20").await;
    assert_eq!(
        pagination(&a),
        json!({"current_page": 3, "total_pages": 3, "per_page": 10, "total_entries": 25,
               "previous_page": 2, "next_page": null})
    );
    assert_eq!(names(&a), all[20..25]);

    // Past the end: no units, a previous page, no next page.
    let a = t.get("/v1/units?limit=10&offset=100").await;
    let p = pagination(&a);
    assert_eq!(a.body["units"], json!([]));
    assert_eq!(p["total_entries"], 25);
    assert_eq!(p["total_pages"], 3);
    assert_eq!(p["current_page"], 11);
    assert_eq!(p["previous_page"], 10);
    assert_eq!(p["next_page"], Value::Null);

    // An offset that is not a page boundary still returns the right slice.
    let a = t.get("/v1/units?limit=10&offset=5").await;
    assert_eq!(names(&a), all[5..15]);

    // The largest page.
    let a = t.get("/v1/units?limit=200").await;
    assert_eq!(pagination(&a)["per_page"], 200);
    assert_eq!(names(&a).len(), 25);
    t.stop().await;
}

#[tokio::test]
async fn list_refuses_bad_parameters() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    for q in [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=abc",
        "offset=-5",
        "offset=x",
        "colour=red",
        "status=vacant",
        "status=available,bogus",
    ] {
        let a = t.get(&format!("/v1/units?{q}")).await;
        assert_eq!(a.status, 400, "{q}: {:?}", a.body);
        assert_eq!(a.code(), "invalid_parameter", "{q}: {:?}", a.body);
        assert!(
            a.body["error"]["request_id"].as_str().is_some(),
            "{q}: {:?}",
            a.body
        );
    }
    // The available route checks its parameters the same way.
    let a = t.get("/v1/units/available?limit=0").await;
    assert_eq!((a.status, a.code()), (400, "invalid_parameter"));
    let a = t.get("/v1/units/available?colour=red").await;
    assert_eq!((a.status, a.code()), (400, "invalid_parameter"));
    t.stop().await;
}

#[tokio::test]
async fn list_filters_by_status_type_and_zone() {
    let t = TestGateway::start().await;
    t.seed(6).await;
    // u1 reserved, u2 occupied, u3 unavailable, u4 of type large in zone side-gate,
    // u5 available but not rentable, u6 plain available.
    let a = t
        .post("/v1/units/u1/reserve", json!({"tenancy_id": "t-future"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .post(
            "/v1/units/u2/grant_access",
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .post("/v1/units/u3/set_status", json!({"status": "unavailable"}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .put("/v1/unit_types/large", json!({"name": "Large"}))
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let a = t
        .patch(
            "/v1/units/u4",
            json!({"unit": {"unit_type": "large", "zones": ["side-gate"]}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .patch("/v1/units/u5", json!({"unit": {"rentable": false}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    let a = t.get("/v1/units?status=reserved").await;
    assert_eq!(ids(&a), set(&["u1"]));
    assert_eq!(pagination(&a)["total_entries"], 1);
    let a = t.get("/v1/units?status=reserved,occupied").await;
    assert_eq!(ids(&a), set(&["u1", "u2"]));
    assert_eq!(pagination(&a)["total_entries"], 2);
    let a = t.get("/v1/units?status=available").await;
    assert_eq!(ids(&a), set(&["u4", "u5", "u6"]));
    let a = t.get("/v1/units?status=overlocked").await;
    assert_eq!(ids(&a), set(&[]));
    assert_eq!(pagination(&a)["total_entries"], 0);
    assert_eq!(pagination(&a)["total_pages"], 0);

    let a = t.get("/v1/units?unit_type_id=large").await;
    assert_eq!(ids(&a), set(&["u4"]));
    assert_eq!(a.body["units"][0]["unit_type"]["name"], "Large");
    let a = t.get("/v1/units?unit_type_id=small").await;
    assert_eq!(pagination(&a)["total_entries"], 5);
    let a = t.get("/v1/units?unit_type_id=nope").await;
    assert_eq!(ids(&a), set(&[]));

    let a = t.get("/v1/units?zone=side-gate").await;
    assert_eq!(ids(&a), set(&["u4"]));
    let a = t.get("/v1/units?zone=main-gate").await;
    assert_eq!(ids(&a), set(&["u1", "u2", "u3", "u5", "u6"]));
    let a = t.get("/v1/units?zone=main-gate&status=available").await;
    assert_eq!(ids(&a), set(&["u5", "u6"]));
    let a = t
        .get("/v1/units?zone=main-gate&status=available&limit=1")
        .await;
    assert_eq!(names(&a), ["U005"]);
    assert_eq!(pagination(&a)["total_entries"], 2);
    assert_eq!(pagination(&a)["next_page"], 2);

    // Available for move-in: available and rentable only.
    let a = t.get("/v1/units/available").await;
    assert_eq!(ids(&a), set(&["u4", "u6"]));
    assert_eq!(pagination(&a)["total_entries"], 2);
    for u in a.body["units"].as_array().unwrap() {
        assert_eq!(u["status"], "available");
        assert_eq!(u["rentable"], true);
        assert_eq!(u["available_for_move_in"], true);
    }
    let a = t.get("/v1/units/available?zone=side-gate").await;
    assert_eq!(ids(&a), set(&["u4"]));
    t.stop().await;
}

// ---- GET /v1/units/{id} -----------------------------------------------------------------

#[tokio::test]
async fn get_unit_has_version_etag_and_404() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let a = t.get("/v1/units/u1").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let u = &a.body["unit"];
    assert_eq!(u["id"], "u1");
    assert_eq!(u["name"], "U001");
    assert_eq!(u["status"], "available");
    assert_eq!(u["unit_type"], json!({"id": "small", "name": "Small"}));
    assert_eq!(u["size"], "5x5x8");
    assert_eq!(u["area"], 25.0);
    assert_eq!(u["version"], 1);
    assert_eq!(a.header("etag").as_deref(), Some("\"1\""));

    let a = t.patch("/v1/units/u1", json!({"unit": {"width": 6}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t.get("/v1/units/u1").await;
    assert_eq!(a.body["unit"]["version"], 2);
    assert_eq!(a.header("etag").as_deref(), Some("\"2\""));

    let a = t.get("/v1/units/nope").await;
    assert_eq!((a.status, a.code()), (404, "not_found"), "{:?}", a.body);
    t.stop().await;
}

// ---- PATCH / PUT ------------------------------------------------------------------------

#[tokio::test]
async fn patch_changes_only_given_fields_and_logs_one_event() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let before = unit(&t, "u1").await;
    let seq = t.last_seq().await;

    let a = t
        .patch("/v1/units/u1", json!({"unit": {"width": 6, "floor": 2}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let after = a.body["unit"].clone();
    assert_eq!(after, unit(&t, "u1").await, "the answer is the stored unit");
    assert_eq!(after["width"], 6.0);
    assert_eq!(after["floor"], 2);
    assert_eq!(after["size"], "6x5x8");
    assert_eq!(after["version"], 2);
    // Everything else is as it was.
    for k in [
        "name",
        "length",
        "height",
        "door_height",
        "door_width",
        "door_type",
        "access_type",
        "standard_rate",
        "walk_thru_order",
        "rentable",
        "zones",
        "lock",
        "door_sensor",
        "unit_amenities",
        "status",
        "unit_type",
        "created_at",
    ] {
        assert_eq!(after[k], before[k], "{k} changed");
    }
    let evs = t.events_after(seq).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_gapless(seq, &evs);
    assert_eq!(evs[0]["type"], "unit.updated");
    assert_eq!(evs[0]["data"]["unit_id"], "u1");
    assert_eq!(evs[0]["data"]["changed"], json!(["attributes"]));
    assert_eq!(evs[0]["data"]["version"], 2);

    // The other unit was not touched.
    assert_eq!(unit(&t, "u2").await["version"], 1);

    // PUT behaves the same: omitted fields unchanged.
    let seq = t.last_seq().await;
    let a = t
        .put("/v1/units/u1", json!({"unit": {"name": "U001-renamed"}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["name"], "U001-renamed");
    assert_eq!(a.body["unit"]["width"], 6.0);
    assert_eq!(a.body["unit"]["floor"], 2);
    assert_eq!(a.body["unit"]["zones"], json!(["main-gate"]));
    assert_eq!(a.body["unit"]["version"], 3);
    let evs = t.events_after(seq).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["type"], "unit.updated");
    assert_eq!(evs[0]["data"]["changed"], json!(["name"]));
    assert_eq!(evs[0]["data"]["version"], 3);
    t.stop().await;
}

#[tokio::test]
async fn patch_null_arrays_keep_and_empty_arrays_clear() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"zones": ["main-gate", "side-gate"], "unit_amenities": ["climate", "alarm"]}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 2);

    // null: unchanged, so nothing to write, no new version, no event.
    let seq = t.last_seq().await;
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"zones": null, "unit_amenities": null}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["zones"], json!(["main-gate", "side-gate"]));
    assert_eq!(
        a.body["unit"]["unit_amenities"],
        json!(["climate", "alarm"])
    );
    assert_eq!(a.body["unit"]["version"], 2);
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());

    // []: cleared.
    let a = t.put("/v1/units/u1", json!({"unit": {"zones": []}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["zones"], json!([]));
    assert_eq!(
        a.body["unit"]["unit_amenities"],
        json!(["climate", "alarm"])
    );
    assert_eq!(a.body["unit"]["version"], 3);
    let a = t
        .patch("/v1/units/u1", json!({"unit": {"unit_amenities": []}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["unit_amenities"], json!([]));
    assert_eq!(a.body["unit"]["version"], 4);
    let evs = t.events_after(seq).await;
    let changed: Vec<_> = evs.iter().map(|e| e["data"]["changed"].clone()).collect();
    assert_eq!(changed, [json!(["zones"]), json!(["attributes"])]);
    assert_gapless(seq, &evs);

    let u = unit(&t, "u1").await;
    assert_eq!(u["zones"], json!([]));
    assert_eq!(u["unit_amenities"], json!([]));
    t.stop().await;
}

#[tokio::test]
async fn patch_null_clears_scalars_and_bindings() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {
                "floor": 3,
                "combination_lock_number": "4711",
                "lock": {"kind": "smart_lock", "id": "lock-7"},
                "door_sensor": {"board": "rb1", "input": 3},
            }}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let u = &a.body["unit"];
    assert_eq!(u["floor"], 3);
    assert_eq!(u["combination_lock_number"], "4711");
    assert_eq!(u["lock"], json!({"kind": "smart_lock", "id": "lock-7"}));
    assert_eq!(u["door_sensor"], json!({"board": "rb1", "input": 3}));
    assert_eq!(u["version"], 2);

    let seq = t.last_seq().await;
    // The other binding kind replaces the first.
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"lock": {"kind": "relay", "board": "rb1", "coil": 4}}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["unit"]["lock"],
        json!({"kind": "relay", "board": "rb1", "coil": 4})
    );
    assert_eq!(a.body["unit"]["floor"], 3, "omitted: unchanged");
    assert_eq!(a.body["unit"]["version"], 3);

    // null clears an optional scalar and each binding.
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"floor": null, "lock": null, "door_sensor": null}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let u = &a.body["unit"];
    assert_eq!(u["floor"], Value::Null);
    assert_eq!(u["lock"], Value::Null);
    assert_eq!(u["door_sensor"], Value::Null);
    assert_eq!(u["combination_lock_number"], "4711", "omitted: unchanged");
    assert_eq!(u["version"], 4);
    assert_eq!(&unit(&t, "u1").await, u);

    let evs = t.events_after(seq).await;
    assert_gapless(seq, &evs);
    let changed: Vec<_> = evs.iter().map(|e| e["data"]["changed"].clone()).collect();
    assert_eq!(
        changed,
        [
            json!(["lock"]),
            json!(["attributes", "lock", "door_sensor"])
        ]
    );
    t.stop().await;
}

#[tokio::test]
async fn noop_patch_keeps_version_and_logs_nothing() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = unit(&t, "u1").await;
    let seq = t.last_seq().await;
    for body in [
        json!({"unit": {}}),
        json!({"unit": {"width": 5, "name": "U001", "zones": ["main-gate"]}}),
        json!({"unit": {"floor": null, "lock": null, "zones": null}}),
    ] {
        let a = t.patch("/v1/units/u1", body.clone()).await;
        assert_eq!(a.status, 200, "{body}: {:?}", a.body);
        assert_eq!(a.body["unit"], before, "{body}");
    }
    let a = t
        .put("/v1/units/u1", json!({"unit": {"door_type": "roll_up"}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"], before);
    assert_eq!(unit(&t, "u1").await, before, "not even updated_at moved");
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test]
async fn patch_refuses_status_unknown_fields_and_bad_values() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let before = unit(&t, "u1").await;
    let seq = t.last_seq().await;

    // Status changes only through the allocation operations.
    let a = t
        .patch("/v1/units/u1", json!({"unit": {"status": "occupied"}}))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(
        detail_fields(&a),
        BTreeSet::from(["unit.status".to_owned()])
    );

    for (body, field) in [
        (json!({"unit": {"colour": "red"}}), "unit.colour"),
        (json!({"unit": {"width": -1}}), "unit.width"),
        (json!({"unit": {"width": 0}}), "unit.width"),
        (json!({"unit": {"width": "wide"}}), "unit.width"),
        (json!({"unit": {"door_type": "trapdoor"}}), "unit.door_type"),
        (
            json!({"unit": {"access_type": "sideways"}}),
            "unit.access_type",
        ),
        (json!({"unit": {"standard_rate": -5}}), "unit.standard_rate"),
        (
            json!({"unit": {"walk_thru_order": -1}}),
            "unit.walk_thru_order",
        ),
        (json!({"unit": {"name": "  "}}), "unit.name"),
        (json!({"unit": {"name": "A,B"}}), "unit.name"),
        (json!({"unit": {"zones": ["bad zone"]}}), "unit.zones[0]"),
        (
            json!({"unit": {"lock": {"kind": "relay", "board": "b1"}}}),
            "unit.lock.coil",
        ),
        (
            json!({"unit": {"lock": {"kind": "padlock"}}}),
            "unit.lock.kind",
        ),
        (
            json!({"unit": {"door_sensor": {"board": "rb1"}}}),
            "unit.door_sensor.input",
        ),
        (json!({"unit": {"floor": 1.5}}), "unit.floor"),
        (json!({"unit": {"unit_type": "nope"}}), "unit.unit_type"),
        (json!({"unit": {"id": "u2"}}), "unit.id"),
    ] {
        let a = t.patch("/v1/units/u1", body.clone()).await;
        assert_eq!(a.status, 422, "{body}: {:?}", a.body);
        assert_eq!(a.code(), "validation_error", "{body}");
        assert!(
            detail_fields(&a).contains(field),
            "{body}: expected {field} in {:?}",
            a.body
        );
    }
    // Several bad values: every one is named.
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"width": -1, "height": 0, "zones": ["ok", "not ok"]}}),
        )
        .await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(
        detail_fields(&a),
        ["unit.width", "unit.height", "unit.zones[1]"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    // A name another unit holds.
    let a = t
        .patch("/v1/units/u1", json!({"unit": {"name": "U002"}}))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(detail_fields(&a), BTreeSet::from(["unit.name".to_owned()]));
    // Not JSON at all.
    let a = t
        .client
        .patch(format!("{}/v1/units/u1", t.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 400);
    // Unknown unit.
    let a = t
        .patch("/v1/units/nope", json!({"unit": {"width": 6}}))
        .await;
    assert_eq!((a.status, a.code()), (404, "not_found"));

    assert_eq!(unit(&t, "u1").await, before, "nothing changed");
    assert_eq!(unit(&t, "u2").await["name"], "U002");
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test]
async fn if_match_guards_unit_writes() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let patch = |v: &'static str, body: Value| {
        let t = &t;
        async move {
            t.call(
                Method::PATCH,
                "/v1/units/u1",
                Some(ADMIN),
                Some(&body),
                &[("If-Match", v)],
            )
            .await
        }
    };
    let a = patch("\"1\"", json!({"unit": {"width": 6}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 2);

    // A stale version: 409 and nothing changed.
    let before = unit(&t, "u1").await;
    let seq = t.last_seq().await;
    let a = patch("\"1\"", json!({"unit": {"width": 9}})).await;
    assert_eq!(
        (a.status, a.code()),
        (409, "version_mismatch"),
        "{:?}",
        a.body
    );
    let a = patch("7", json!({"unit": {"width": 9}})).await;
    assert_eq!(
        (a.status, a.code()),
        (409, "version_mismatch"),
        "{:?}",
        a.body
    );
    assert_eq!(unit(&t, "u1").await, before);
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());

    // The current version in its three spellings, and `*`.
    let a = patch("2", json!({"unit": {"width": 7}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 3);
    let a = patch("W/\"3\"", json!({"unit": {"width": 8}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 4);
    let a = patch("*", json!({"unit": {"width": 9}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 5);
    assert_eq!(a.body["unit"]["width"], 9.0);

    // The ETag of GET is what If-Match takes.
    let g = t.get("/v1/units/u1").await;
    let etag = g.header("etag").unwrap();
    let a = t
        .call(
            Method::PUT,
            "/v1/units/u1",
            Some(ADMIN),
            Some(&json!({"unit": {"width": 10}})),
            &[("If-Match", etag.as_str())],
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 6);

    // Garbage: 400, nothing changed.
    let before = unit(&t, "u1").await;
    for garbage in ["abc", "\"v1\"", ""] {
        let a = patch(garbage, json!({"unit": {"width": 11}})).await;
        assert_eq!(a.status, 400, "{garbage:?}: {:?}", a.body);
        assert_eq!(a.code(), "invalid_header", "{garbage:?}");
    }
    assert_eq!(unit(&t, "u1").await, before);
    t.stop().await;
}

// ---- POST /v1/units ---------------------------------------------------------------------

#[tokio::test]
async fn create_with_comma_separated_names_makes_many() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let seq = t.last_seq().await;
    let mut body = new_unit("X1, X2 ,X3");
    body["floor"] = json!(1);
    let a = t.post("/v1/units", json!({ "unit": body })).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let units = a.body["units"].as_array().unwrap();
    assert_eq!(names(&a), ["X1", "X2", "X3"]);
    let mut seen = BTreeSet::new();
    for u in units {
        assert_eq!(u["status"], "available");
        assert_eq!(u["version"], 1);
        assert_eq!(u["floor"], 1);
        assert_eq!(u["width"], 5.0);
        assert_eq!(u["standard_rate"], 75.5);
        assert_eq!(u["price"], 75.5);
        assert_eq!(u["zones"], json!(["main-gate"]));
        assert_eq!(u["unit_type"], json!({"id": "small", "name": "Small"}));
        assert_eq!(u["available_for_move_in"], true);
        let id = u["id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "ids are distinct");
        assert_eq!(&unit(&t, &id).await, u, "stored as answered");
    }
    let evs = t.events_after(seq).await;
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert_gapless(seq, &evs);
    for (e, u) in evs.iter().zip(units) {
        assert_eq!(e["type"], "unit.created");
        assert_eq!(e["data"]["unit_id"], u["id"]);
        assert_eq!(e["data"]["name"], u["name"]);
        assert_eq!(e["data"]["status"], "available");
    }
    let a = t.get("/v1/units").await;
    assert_eq!(pagination(&a)["total_entries"], 4);

    // One name with an id.
    let mut body = new_unit("Y1");
    body["id"] = json!("y-1");
    let a = t.post("/v1/units", json!({ "unit": body })).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body["units"][0]["id"], "y-1");
    t.stop().await;
}

#[tokio::test]
async fn create_refuses_incomplete_and_conflicting_units() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let seq = t.last_seq().await;

    // Every missing required field is named.
    let a = t.post("/v1/units", json!({"unit": {"name": "Z1"}})).await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    let want: BTreeSet<String> = [
        "unit_type",
        "width",
        "length",
        "height",
        "door_height",
        "door_width",
        "door_type",
        "access_type",
        "standard_rate",
        "walk_thru_order",
    ]
    .iter()
    .map(|f| format!("unit.{f}"))
    .collect();
    assert_eq!(detail_fields(&a), want);
    let a = t.post("/v1/units", json!({"unit": {}})).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    let mut with_name = want.clone();
    with_name.insert("unit.name".into());
    assert_eq!(detail_fields(&a), with_name);

    // Unknown unit type.
    let mut body = new_unit("Z1");
    body["unit_type"] = json!("huge");
    let a = t.post("/v1/units", json!({ "unit": body })).await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(
        detail_fields(&a),
        BTreeSet::from(["unit.unit_type".to_owned()])
    );

    // A new unit can't choose its status.
    let mut body = new_unit("Z1");
    body["status"] = json!("occupied");
    let a = t.post("/v1/units", json!({ "unit": body })).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(
        detail_fields(&a),
        BTreeSet::from(["unit.status".to_owned()])
    );

    // A taken name, even as one of several: nothing is created.
    let a = t
        .post("/v1/units", json!({"unit": new_unit("Z1,U001,Z2")}))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(detail_fields(&a), BTreeSet::from(["unit.name".to_owned()]));
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("U001"),
        "{:?}",
        a.body
    );
    // The same name twice in one request.
    let a = t
        .post("/v1/units", json!({"unit": new_unit("Z1,Z1")}))
        .await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(detail_fields(&a), BTreeSet::from(["unit.name".to_owned()]));
    // An id that exists.
    let mut body = new_unit("Z1");
    body["id"] = json!("u1");
    let a = t.post("/v1/units", json!({ "unit": body })).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(detail_fields(&a), BTreeSet::from(["unit.id".to_owned()]));

    let a = t.get("/v1/units").await;
    assert_eq!(names(&a), ["U001"], "nothing was created");
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

// ---- bulk_create ------------------------------------------------------------------------

/// Asserts every entry of an `error_hash` has exactly the keys `id`, `name`, `message`.
fn assert_hash_entries(hash: &Value) {
    let obj = hash
        .as_object()
        .unwrap_or_else(|| panic!("error_hash {hash:?}"));
    assert!(!obj.is_empty());
    for (field, entries) in obj {
        for e in entries
            .as_array()
            .unwrap_or_else(|| panic!("{field}: {entries:?}"))
        {
            let keys: BTreeSet<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, BTreeSet::from(["id", "name", "message"]), "{e:?}");
            assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{e:?}"
            );
        }
    }
}

#[tokio::test]
async fn bulk_create_is_all_or_nothing_with_error_hash() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let seq = t.last_seq().await;

    let mut bad_width = new_unit("B2");
    bad_width["id"] = json!("b-2");
    bad_width["width"] = json!(-1);
    let taken = new_unit("U001");
    let mut wrong_type = new_unit("B4");
    wrong_type["height"] = json!("tall");
    let a = t
        .post(
            "/v1/units/bulk_create",
            json!({"units": [new_unit("B1"), bad_width, taken, new_unit("B5")]}),
        )
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(a.code(), "invalid_parameters");
    let hash = &a.body["error"]["error_hash"];
    assert_hash_entries(hash);
    assert_eq!(
        hash["width"],
        json!([{"id": "b-2", "name": "B2", "message": "must be a number greater than 0"}])
    );
    assert_eq!(hash["name"][0]["name"], "U001");
    assert_eq!(hash["name"][0]["id"], Value::Null);
    assert_eq!(
        hash.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["name", "width"]
    );

    // A type error is reported the same way (found while parsing).
    let a = t
        .post(
            "/v1/units/bulk_create",
            json!({"units": [new_unit("B1"), wrong_type]}),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (400, "invalid_parameters"),
        "{:?}",
        a.body
    );
    let hash = &a.body["error"]["error_hash"];
    assert_hash_entries(hash);
    assert_eq!(hash["height"][0]["name"], "B4");

    // Missing fields, and two items with the same name.
    let a = t
        .post(
            "/v1/units/bulk_create",
            json!({"units": [new_unit("B1"), {"name": "B6"}, new_unit("B1")]}),
        )
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    let hash = &a.body["error"]["error_hash"];
    assert_hash_entries(hash);
    assert_eq!(hash["width"][0]["name"], "B6");
    assert_eq!(hash["unit_type"][0]["name"], "B6");
    assert_eq!(hash["name"][0]["name"], "B1");

    // Nothing of any batch was created, no event appended.
    let a = t.get("/v1/units").await;
    assert_eq!(names(&a), ["U001"]);
    assert_eq!(t.get("/v1/units/b-2").await.status, 404);
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());

    // An empty batch.
    let a = t.post("/v1/units/bulk_create", json!({"units": []})).await;
    assert_eq!(a.status, 422, "{:?}", a.body);

    // A valid batch: each unit its own fields.
    let mut b2 = new_unit("B2");
    b2["id"] = json!("b-2");
    b2["door_type"] = json!("swing");
    b2["access_type"] = json!("outdoor");
    b2["zones"] = json!(["side-gate"]);
    let a = t
        .post(
            "/v1/units/bulk_create",
            json!({"units": [new_unit("B1"), b2]}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(names(&a), ["B1", "B2"]);
    let b = unit(&t, "b-2").await;
    assert_eq!(b["door_type"], "swing");
    assert_eq!(b["access_type"], "outdoor");
    assert_eq!(b["zones"], json!(["side-gate"]));
    assert_eq!(b["status"], "available");
    let evs = t.events_after(seq).await;
    assert_gapless(seq, &evs);
    let types: Vec<_> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["unit.created", "unit.created"]);
    t.stop().await;
}

// ---- bulk_update ------------------------------------------------------------------------

#[tokio::test]
async fn bulk_update_unknown_id_is_404_and_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    let before = t.get("/v1/units").await.body;
    let seq = t.last_seq().await;
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "width": 9}, {"id": "ghost", "width": 9}]}),
        )
        .await;
    assert_eq!((a.status, a.code()), (404, "not_found"), "{:?}", a.body);
    assert_eq!(
        a.body["error"]["error_hash"],
        json!({"id": [{"id": "ghost", "name": null, "message": "not found"}]})
    );
    assert_eq!(t.get("/v1/units").await.body, before);
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test]
async fn bulk_update_with_one_invalid_item_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    let before = t.get("/v1/units").await.body;
    let seq = t.last_seq().await;

    let cases = [
        (
            json!({"units": [{"id": "u1", "width": 9}, {"id": "u2", "width": -3}]}),
            json!({"width": [{"id": "u2", "name": "U002", "message": "must be a number greater than 0"}]}),
        ),
        (
            json!({"units": [{"id": "u1", "width": 9}, {"id": "u2", "name": "U003"}]}),
            json!({"name": [{"id": "u2", "name": "U003", "message": "has already been taken"}]}),
        ),
        (
            json!({"units": [{"id": "u1", "width": 9}, {"width": 4, "name": "U002"}]}),
            json!({"id": [{"id": null, "name": "U002", "message": "is required"}]}),
        ),
        (
            json!({"units": [{"id": "u1", "width": 9}, {"id": "u1", "length": 9}]}),
            json!({"id": [{"id": "u1", "name": null, "message": "is given twice"}]}),
        ),
    ];
    for (body, want) in cases {
        let a = t.put("/v1/units/bulk_update", body.clone()).await;
        assert_eq!(a.status, 400, "{body}: {:?}", a.body);
        assert_eq!(a.code(), "invalid_parameters", "{body}");
        assert_eq!(a.body["error"]["error_hash"], want, "{body}");
    }
    // Unknown fields and status are refused per item too.
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "width": 9}, {"id": "u2", "status": "occupied"}]}),
        )
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    let hash = &a.body["error"]["error_hash"];
    assert_hash_entries(hash);
    assert_eq!(hash["status"][0]["id"], "u2");

    assert_eq!(t.get("/v1/units").await.body, before, "nothing changed");
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test]
async fn bulk_update_applies_different_changes_to_several_units() {
    let t = TestGateway::start().await;
    t.seed(4).await;
    let u4 = unit(&t, "u4").await;
    let seq = t.last_seq().await;
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [
                {"id": "u1", "width": 7},
                {"id": "u2", "zones": [], "lock": {"kind": "smart_lock", "id": "lk-2"}},
                {"id": "u3", "name": "Renamed-3", "zones": null},
                {"id": "u4", "width": 5},
            ]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let units = a.body["units"].as_array().unwrap();
    assert_eq!(units.len(), 4);
    assert_eq!(units[0]["width"], 7.0);
    assert_eq!(units[0]["version"], 2);
    assert_eq!(units[1]["zones"], json!([]));
    assert_eq!(
        units[1]["lock"],
        json!({"kind": "smart_lock", "id": "lk-2"})
    );
    assert_eq!(units[1]["version"], 2);
    assert_eq!(units[2]["name"], "Renamed-3");
    assert_eq!(units[2]["zones"], json!(["main-gate"]));
    assert_eq!(units[2]["version"], 2);
    // u4 was asked for what it already had: untouched.
    assert_eq!(units[3], u4);
    for u in units {
        assert_eq!(&unit(&t, u["id"].as_str().unwrap()).await, u);
    }
    let evs = t.events_after(seq).await;
    assert_gapless(seq, &evs);
    let got: Vec<_> = evs
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["data"]["unit_id"].as_str().unwrap().to_owned(),
                e["data"]["changed"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("unit.updated".into(), "u1".into(), json!(["attributes"])),
            ("unit.updated".into(), "u2".into(), json!(["zones", "lock"])),
            ("unit.updated".into(), "u3".into(), json!(["name"])),
        ]
    );
    t.stop().await;
}

#[tokio::test]
async fn bulk_update_swaps_names() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    let seq = t.last_seq().await;
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "name": "U002"}, {"id": "u2", "name": "U001"}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(unit(&t, "u1").await["name"], "U002");
    assert_eq!(unit(&t, "u2").await["name"], "U001");
    assert_eq!(unit(&t, "u1").await["version"], 2);
    assert_eq!(unit(&t, "u2").await["version"], 2);
    let evs = t.events_after(seq).await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert!(evs.iter().all(|e| e["data"]["changed"] == json!(["name"])));

    // A rotation through three units works too.
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [
                {"id": "u1", "name": "U003"}, {"id": "u2", "name": "U002"}, {"id": "u3", "name": "U001"}
            ]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t.get("/v1/units").await;
    let order: Vec<_> = a.body["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["u3", "u2", "u1"], "ordered by the new names");

    // Taking a name from a unit outside the batch is still refused.
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "name": "U002"}]}),
        )
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(a.body["error"]["error_hash"]["name"][0]["id"], "u1");
    t.stop().await;
}

#[tokio::test]
async fn unit_writes_need_units_scope() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let a = t
        .call(
            Method::PATCH,
            "/v1/units/u1",
            Some(common::READER),
            Some(&json!({"unit": {"width": 6}})),
            &[],
        )
        .await;
    assert_eq!((a.status, a.code()), (403, "forbidden"), "{:?}", a.body);
    let a = t
        .call(
            Method::PATCH,
            "/v1/units/u1",
            Some(common::UNITS),
            Some(&json!({"unit": {"width": 6}})),
            &[],
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t.call(Method::GET, "/v1/units", None, None, &[]).await;
    assert_eq!(a.status, 401, "{:?}", a.body);
    t.stop().await;
}

// ---- bindings against the declared devices ----------------------------------------------

/// The detail of an error answer for `field`.
fn detail<'a>(a: &'a Answer, field: &str) -> &'a str {
    a.body["error"]["details"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["field"] == field))
        .and_then(|d| d["message"].as_str())
        .unwrap_or_else(|| panic!("no detail {field} in {:?}", a.body))
}

/// The test site plus a gate keypad whose strike is relay-1 coil 0 and whose position
/// sensor is relay-1 input 0, and a lock API that lists its locks. Everything disabled.
async fn site_with_gate_and_lock_list() -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = common::test_config(dir.path());
    let gate = unitgate::config::Config::from_toml(
        r#"
        [[devices.keypads]]
        id = "gate-1"
        zone = "main-gate"
        tcp = "127.0.0.1:9"
        install_mode = true
        gate = { board = "relay-1", coil = 0 }
        gate_sensor = { board = "relay-1", input = 0 }
        enabled = false
        "#,
    )
    .expect("keypad parses");
    cfg.devices.keypads = gate.devices.keypads;
    if let Some(l) = cfg.devices.lock_api.as_mut() {
        l.locks = Some(vec!["lk-1".into(), "lk-2".into()]);
    }
    cfg.validate().expect("valid config");
    TestGateway::start_with(dir, cfg, common::TestClock::at("2026-03-10T12:00:00Z")).await
}

#[tokio::test]
async fn bindings_must_name_declared_devices() {
    let t = site_with_gate_and_lock_list().await;
    t.seed(2).await;
    let before = unit(&t, "u1").await;
    let seq = t.last_seq().await;
    let relay =
        |board: &str, coil: u16| json!({"lock": {"kind": "relay", "board": board, "coil": coil}});
    let sensor = |board: &str, input: u16| json!({"door_sensor": {"board": board, "input": input}});
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            relay("relay-9", 1),
            "lock.board",
            "configured: rb1, relay-1",
        ),
        (relay("relay-1", 16), "lock.coil", "has 16 coils"),
        (
            relay("relay-1", 0),
            "lock.coil",
            "gate strike of keypad \"gate-1\"",
        ),
        (
            json!({"lock": {"kind": "smart_lock", "id": "lk-3"}}),
            "lock.id",
            "lk-3",
        ),
        (sensor("rb9", 1), "door_sensor.board", "rb9"),
        (sensor("rb1", 16), "door_sensor.input", "has 16 inputs"),
        (
            sensor("relay-1", 0),
            "door_sensor.input",
            "gate position sensor of keypad \"gate-1\"",
        ),
    ];
    for (binding, field, says) in &cases {
        // PATCH.
        let a = t.patch("/v1/units/u1", json!({ "unit": binding })).await;
        assert_eq!(
            (a.status, a.code()),
            (422, "validation_error"),
            "{binding}: {:?}",
            a.body
        );
        assert_eq!(
            detail_fields(&a),
            BTreeSet::from([format!("unit.{field}")]),
            "{binding}"
        );
        assert!(
            detail(&a, &format!("unit.{field}")).contains(says),
            "{binding}: {:?}",
            a.body
        );
        // Create.
        let mut new = new_unit("N1");
        for (k, v) in binding.as_object().unwrap() {
            new[k] = v.clone();
        }
        let a = t.post("/v1/units", json!({ "unit": new })).await;
        assert_eq!(
            (a.status, a.code()),
            (422, "validation_error"),
            "{binding}: {:?}",
            a.body
        );
        assert_eq!(
            detail_fields(&a),
            BTreeSet::from([format!("unit.{field}")]),
            "{binding}"
        );
        // bulk_update: the other unit's harmless change does not land either.
        let mut item = binding.clone();
        item["id"] = json!("u1");
        let a = t
            .put(
                "/v1/units/bulk_update",
                json!({"units": [{"id": "u2", "width": 9}, item]}),
            )
            .await;
        assert_eq!(
            (a.status, a.code()),
            (400, "invalid_parameters"),
            "{binding}: {:?}",
            a.body
        );
        let key = field.split('.').next().unwrap();
        let hash = a.body["error"]["error_hash"].as_object().unwrap();
        assert_eq!(hash.keys().collect::<Vec<_>>(), [key], "{binding}");
        assert_eq!(hash[key][0]["id"], "u1");
        assert!(
            hash[key][0]["message"].as_str().unwrap().contains(says),
            "{binding}"
        );
    }
    assert_eq!(
        unit(&t, "u1").await,
        before,
        "version and bindings unchanged"
    );
    assert_eq!(unit(&t, "u2").await["width"], 5.0);
    assert_eq!(
        t.get("/v1/units").await.body["units"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());

    // Declared devices are accepted, though disabled: coil 15 is the last, coil 1 no strike.
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"lock": {"kind": "relay", "board": "relay-1", "coil": 15},
                            "door_sensor": {"board": "relay-1", "input": 1}}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["version"], 2);
    let a = t
        .patch(
            "/v1/units/u2",
            json!({"unit": {"lock": {"kind": "smart_lock", "id": "lk-2"}}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    t.stop().await;
}

#[tokio::test]
async fn a_smart_lock_needs_a_lock_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = common::test_config(dir.path());
    cfg.devices.lock_api = None;
    let t = TestGateway::start_with(dir, cfg, common::TestClock::at("2026-03-10T12:00:00Z")).await;
    t.seed(1).await;
    let before = unit(&t, "u1").await;
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"lock": {"kind": "smart_lock", "id": "lk-1"}}}),
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
        BTreeSet::from(["unit.lock.kind".to_owned()])
    );
    assert!(
        detail(&a, "unit.lock.kind").contains("none is configured"),
        "{:?}",
        a.body
    );
    assert_eq!(unit(&t, "u1").await, before);
    t.stop().await;
}

#[tokio::test]
async fn a_lock_or_door_sensor_belongs_to_one_unit() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    let lk1 = json!({"kind": "smart_lock", "id": "lk-1"});
    let coil3 = json!({"kind": "relay", "board": "relay-1", "coil": 3});
    let input2 = json!({"board": "rb1", "input": 2});
    let a = t
        .patch(
            "/v1/units/u1",
            json!({"unit": {"lock": lk1, "door_sensor": input2}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .patch("/v1/units/u3", json!({"unit": {"lock": coil3}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let u2 = unit(&t, "u2").await;
    let seq = t.last_seq().await;

    // PATCH another unit onto them: 409, naming the holder.
    for (body, code, field, holder) in [
        (
            json!({"lock": lk1}),
            "lock_in_use",
            "unit.lock",
            "\"u1\" (U001)",
        ),
        (
            json!({"lock": coil3}),
            "lock_in_use",
            "unit.lock",
            "\"u3\" (U003)",
        ),
        (
            json!({"door_sensor": input2}),
            "door_sensor_in_use",
            "unit.door_sensor",
            "\"u1\" (U001)",
        ),
    ] {
        let a = t.patch("/v1/units/u2", json!({ "unit": body })).await;
        assert_eq!((a.status, a.code()), (409, code), "{body}: {:?}", a.body);
        assert_eq!(
            detail_fields(&a),
            BTreeSet::from([field.to_owned()]),
            "{body}"
        );
        assert!(detail(&a, field).contains(holder), "{body}: {:?}", a.body);
    }
    // Create onto them: 409 too, and nothing created.
    let mut new = new_unit("N1");
    new["lock"] = coil3.clone();
    let a = t.post("/v1/units", json!({ "unit": new })).await;
    assert_eq!((a.status, a.code()), (409, "lock_in_use"), "{:?}", a.body);
    assert!(detail(&a, "unit.lock").contains("\"u3\""), "{:?}", a.body);
    // Several names can't share one lock.
    let mut new = new_unit("N1,N2");
    new["lock"] = json!({"kind": "smart_lock", "id": "lk-9"});
    let a = t.post("/v1/units", json!({ "unit": new })).await;
    assert_eq!(
        (a.status, a.code()),
        (422, "validation_error"),
        "{:?}",
        a.body
    );
    assert_eq!(detail_fields(&a), BTreeSet::from(["unit.lock".to_owned()]));
    // bulk_create: in error_hash.
    let mut new = new_unit("N1");
    new["door_sensor"] = input2.clone();
    let a = t
        .post("/v1/units/bulk_create", json!({"units": [new]}))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (400, "invalid_parameters"),
        "{:?}",
        a.body
    );
    assert!(
        a.body["error"]["error_hash"]["door_sensor"][0]["message"]
            .as_str()
            .unwrap()
            .contains("\"u1\""),
        "{:?}",
        a.body
    );
    // bulk_update: against the replica, and two units of one request on one new lock.
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u2", "lock": lk1}]}),
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (400, "invalid_parameters"),
        "{:?}",
        a.body
    );
    let entry = &a.body["error"]["error_hash"]["lock"][0];
    assert_eq!(entry["id"], "u2");
    assert!(
        entry["message"].as_str().unwrap().contains("\"u1\""),
        "{entry}"
    );
    let lk9 = json!({"kind": "smart_lock", "id": "lk-9"});
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u2", "lock": lk9}, {"id": "u3", "lock": lk9}]}),
        )
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    let entries = a.body["error"]["error_hash"]["lock"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["id"], "u3");
    assert!(entries[0]["message"].as_str().unwrap().contains("\"u2\""));

    assert_eq!(unit(&t, "u2").await, u2, "version and bindings unchanged");
    assert_eq!(unit(&t, "u3").await["lock"], coil3);
    assert_eq!(
        t.get("/v1/units").await.body["units"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());

    // Within one request units may swap locks; a freed lock may be taken.
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "lock": coil3}, {"id": "u3", "lock": lk1}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .patch("/v1/units/u1", json!({"unit": {"door_sensor": null}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = t
        .patch("/v1/units/u2", json!({"unit": {"door_sensor": input2}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // A unit keeps its own binding through other changes.
    let a = t
        .patch(
            "/v1/units/u2",
            json!({"unit": {"door_sensor": input2, "width": 6}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    t.stop().await;
}

// ---- gatelock ---------------------------------------------------------------------------

/// `(type, unit_id, changed, version)` of each event after `seq`.
async fn updates_after(t: &TestGateway, seq: i64) -> Vec<(String, String, Value, Value)> {
    t.events_after(seq)
        .await
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["data"]["unit_id"].as_str().unwrap_or_default().to_owned(),
                e["data"]["changed"].clone(),
                e["data"]["version"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn gatelock_is_set_and_cleared_like_any_unit_field() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let before = unit(&t, "u1").await;
    assert_eq!(before["gatelock"], false, "off by default: {before}");

    // PATCH sets it: a unit update of its own, nothing else moves.
    let seq = t.last_seq().await;
    let a = t
        .patch("/v1/units/u1", json!({"unit": {"gatelock": true}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let after = unit(&t, "u1").await;
    assert_eq!(a.body["unit"], after, "the answer is the stored unit");
    assert_eq!(after["gatelock"], true);
    assert_eq!(after["version"], 2);
    for (k, v) in before.as_object().unwrap() {
        if !["gatelock", "version", "updated_at"].contains(&k.as_str()) {
            assert_eq!(&after[k], v, "{k} changed");
        }
    }
    assert_eq!(
        updates_after(&t, seq).await,
        [(
            "unit.updated".into(),
            "u1".into(),
            json!(["gatelock"]),
            json!(2)
        )]
    );
    assert_eq!(unit(&t, "u2").await["gatelock"], false);

    // Omitted or null: unchanged; the same value again: no update at all.
    let seq = t.last_seq().await;
    for body in [
        json!({"unit": {"gatelock": true}}),
        json!({"unit": {"gatelock": null}}),
        json!({"unit": {}}),
    ] {
        let a = t.patch("/v1/units/u1", body.clone()).await;
        assert_eq!(a.status, 200, "{body}: {:?}", a.body);
        assert_eq!(a.body["unit"], after, "{body}");
    }
    let a = t.patch("/v1/units/u1", json!({"unit": {"width": 6}})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body["unit"]["gatelock"], true,
        "kept through other changes"
    );
    assert_eq!(a.body["unit"]["version"], 3);
    assert_eq!(
        updates_after(&t, seq).await,
        [(
            "unit.updated".into(),
            "u1".into(),
            json!(["attributes"]),
            json!(3)
        )]
    );

    // PUT clears it.
    let a = t
        .put("/v1/units/u1", json!({"unit": {"gatelock": false}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(unit(&t, "u1").await["gatelock"], false);
    assert_eq!(unit(&t, "u1").await["version"], 4);

    // bulk_update: set on one, leave the other as it is.
    let seq = t.last_seq().await;
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "gatelock": true}, {"id": "u2", "width": 7}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["units"][0]["gatelock"], true);
    assert_eq!(a.body["units"][1]["gatelock"], false);
    assert_eq!(unit(&t, "u1").await["gatelock"], true);
    assert_eq!(unit(&t, "u2").await["gatelock"], false);
    assert_eq!(
        updates_after(&t, seq).await,
        [
            (
                "unit.updated".into(),
                "u1".into(),
                json!(["gatelock"]),
                json!(5)
            ),
            (
                "unit.updated".into(),
                "u2".into(),
                json!(["attributes"]),
                json!(2)
            ),
        ]
    );
    // ...and clears it.
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "gatelock": false}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(unit(&t, "u1").await["gatelock"], false);

    // Create: given, or off by default; every comma-separated unit gets it.
    let mut body = new_unit("G1,G2");
    body["gatelock"] = json!(true);
    let a = t.post("/v1/units", json!({ "unit": body })).await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    for u in a.body["units"].as_array().unwrap() {
        assert_eq!(u["gatelock"], true, "{u}");
        assert_eq!(&unit(&t, u["id"].as_str().unwrap()).await, u);
    }
    let mut g4 = new_unit("G4");
    g4["id"] = json!("g-4");
    g4["gatelock"] = json!(true);
    let a = t
        .post(
            "/v1/units/bulk_create",
            json!({"units": [new_unit("G3"), g4]}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    assert_eq!(a.body["units"][0]["gatelock"], false);
    assert_eq!(a.body["units"][1]["gatelock"], true);
    assert_eq!(unit(&t, "g-4").await["gatelock"], true);
    t.stop().await;
}

#[tokio::test]
async fn gatelock_must_be_a_boolean() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let a = t
        .patch("/v1/units/u2", json!({"unit": {"gatelock": true}}))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let before = t.get("/v1/units").await.body;
    let seq = t.last_seq().await;

    for bad in [json!("yes"), json!(1), json!([true])] {
        let a = t
            .patch("/v1/units/u1", json!({"unit": {"gatelock": bad}}))
            .await;
        assert_eq!(
            (a.status, a.code()),
            (422, "validation_error"),
            "{bad}: {:?}",
            a.body
        );
        assert_eq!(
            detail_fields(&a),
            BTreeSet::from(["unit.gatelock".to_owned()]),
            "{bad}"
        );
        // Clearing u2's with a bad value leaves it set.
        let a = t
            .put("/v1/units/u2", json!({"unit": {"gatelock": bad}}))
            .await;
        assert_eq!(a.status, 422, "{bad}: {:?}", a.body);
    }
    let mut body = new_unit("G1");
    body["gatelock"] = json!("yes");
    let a = t.post("/v1/units", json!({ "unit": body.clone() })).await;
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert!(detail_fields(&a).contains("unit.gatelock"), "{:?}", a.body);
    let a = t
        .post("/v1/units/bulk_create", json!({"units": [body]}))
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(a.body["error"]["error_hash"]["gatelock"][0]["name"], "G1");
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "gatelock": true}, {"id": "u2", "gatelock": "yes"}]}),
        )
        .await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(
        a.body["error"]["error_hash"]["gatelock"][0]["id"], "u2",
        "{:?}",
        a.body
    );

    // Nothing changed: u1 still open, u2 still gatelocked, no event.
    assert_eq!(t.get("/v1/units").await.body, before);
    assert_eq!(unit(&t, "u1").await["gatelock"], false);
    assert_eq!(unit(&t, "u2").await["gatelock"], true);
    assert_eq!(t.events_after(seq).await, Vec::<Value>::new());
    t.stop().await;
}

#[tokio::test]
async fn gatelock_is_in_the_openapi_document() {
    let t = TestGateway::start().await;
    let a = t.get("/openapi.json").await;
    assert_eq!(a.status, 200);
    let schemas = &a.body["components"]["schemas"];
    for schema in ["UnitView", "UnitInput", "UnitPatch"] {
        let p = &schemas[schema]["properties"]["gatelock"];
        assert!(p.to_string().contains("boolean"), "{schema}: {p}");
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{schema}: {p}"
        );
    }
    let required = schemas["UnitView"]["required"].as_array().unwrap();
    assert!(required.contains(&json!("gatelock")), "always in unit JSON");
    t.stop().await;
}
