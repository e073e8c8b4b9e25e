//! The durable hardware queue: every status change writes the desired state of the unit's
//! lock or overlock coil in the same transaction (DESIGN.md §4 table), superseded commands
//! coalesce, binding changes free the old hardware, and an unchanged snapshot queues nothing.

mod common;

use common::TestGateway;
use serde_json::{Value, json};
use unitgate::domain::desired::{LockTarget, Target};
use unitgate::store::{StoreError, outbox};

async fn targets(t: &TestGateway, device: &str) -> Vec<(Target, Option<Target>)> {
    let device = device.to_owned();
    let store = t.gw.as_ref().expect("running").executor.store().clone();
    store
        .read(move |c| outbox::targets(c, &device))
        .await
        .expect("targets")
}

async fn desired(t: &TestGateway, device: &str, key: &str) -> Target {
    targets(t, device)
        .await
        .into_iter()
        .map(|(d, _)| d)
        .find(|d| d.key() == key)
        .unwrap_or_else(|| panic!("no target {key} on {device}"))
}

async fn pending(t: &TestGateway, device: &str) -> u64 {
    let device = device.to_owned();
    let store = t.gw.as_ref().expect("running").executor.store().clone();
    store
        .read(move |c| outbox::depth(c, &device))
        .await
        .expect("depth")
        .0
}

/// Marks every target of a device as delivered (what a driver does after the device confirms).
async fn deliver_all(t: &TestGateway, device: &str) {
    let device = device.to_owned();
    let store = t.gw.as_ref().expect("running").executor.store().clone();
    store
        .write(move |c| -> Result<(), StoreError> {
            for (d, _) in outbox::targets(c, &device)? {
                outbox::set_applied(c, &device, &d)?;
            }
            Ok(())
        })
        .await
        .expect("deliver");
}

fn lock(id: &str, target: LockTarget) -> Target {
    Target::SmartLock {
        lock: id.into(),
        target,
    }
}

fn assigned(c: &str) -> LockTarget {
    LockTarget::Assigned {
        tenant_ref: c.into(),
    }
}

fn coil(n: u16, on: bool) -> Target {
    Target::Coil {
        board: "relay-1".into(),
        coil: n,
        on,
    }
}

async fn bind(t: &TestGateway, unit: &str, binding: Value) {
    let a = t
        .patch(
            &format!("/v1/units/{unit}"),
            json!({"unit": {"lock": binding}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

#[tokio::test]
async fn every_transition_queues_the_design_table_state() {
    let t = TestGateway::start().await;
    t.seed(4).await;
    bind(&t, "u1", json!({"kind": "smart_lock", "id": "lock-1"})).await;
    bind(
        &t,
        "u2",
        json!({"kind": "relay", "board": "relay-1", "coil": 2}),
    )
    .await;
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock("lock-1", LockTarget::Unassigned)
    );
    assert_eq!(desired(&t, "relay-1", "coil:2").await, coil(2, true));

    // c2's tenancy has started: grant access to both units.
    for u in ["u1", "u2"] {
        let a = t
            .post(
                &format!("/v1/units/{u}/grant_access"),
                json!({"tenancy_id": "t-started"}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock("lock-1", assigned("c2"))
    );
    assert_eq!(desired(&t, "relay-1", "coil:2").await, coil(2, false));

    assert_eq!(
        t.post("/v1/contacts/c2/overlock", json!({})).await.status,
        200
    );
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock(
            "lock-1",
            LockTarget::Overlocked {
                tenant_ref: Some("c2".into())
            }
        )
    );
    assert_eq!(desired(&t, "relay-1", "coil:2").await, coil(2, true));

    assert_eq!(
        t.post("/v1/units/u1/set_status", json!({"status": "repossessed"}))
            .await
            .status,
        200
    );
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock(
            "lock-1",
            LockTarget::Overlocked {
                tenant_ref: Some("c2".into())
            }
        )
    );
    assert_eq!(
        t.post("/v1/units/u1/deallocate", json!({})).await.status,
        200
    );
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock("lock-1", LockTarget::Unassigned)
    );

    // A refused transition queues nothing new.
    let before = targets(&t, "relay-1").await;
    assert_eq!(
        t.post("/v1/units/u2/reserve", json!({"tenancy_id": "t-future"}))
            .await
            .status,
        409
    );
    assert_eq!(targets(&t, "relay-1").await, before);
    t.stop().await;
}

#[tokio::test]
async fn overlock_of_a_contact_with_three_units_changes_exactly_three_coils() {
    let t = TestGateway::start().await;
    t.seed(5).await;
    for n in 1..=5u16 {
        bind(
            &t,
            &format!("u{n}"),
            json!({"kind": "relay", "board": "relay-1", "coil": n}),
        )
        .await;
    }
    for u in ["u1", "u2", "u3"] {
        assert_eq!(
            t.post(
                &format!("/v1/units/{u}/grant_access"),
                json!({"tenancy_id": "t-started"})
            )
            .await
            .status,
            200
        );
    }
    // Another contact's occupied unit must not move.
    let a = t
        .put(
            "/v1/tenancies/t-c3",
            json!({"contact_id": "c3", "start_date": "2026-03-01"}),
        )
        .await;
    assert_eq!(a.status, 201);
    assert_eq!(
        t.post("/v1/units/u4/grant_access", json!({"tenancy_id": "t-c3"}))
            .await
            .status,
        200
    );
    deliver_all(&t, "relay-1").await;
    assert_eq!(pending(&t, "relay-1").await, 0);

    assert_eq!(
        t.post("/v1/contacts/c2/overlock", json!({})).await.status,
        200
    );
    let pending_now: Vec<Target> = targets(&t, "relay-1")
        .await
        .into_iter()
        .filter(|(d, a)| Some(d) != a.as_ref())
        .map(|(d, _)| d)
        .collect();
    assert_eq!(
        pending_now,
        vec![coil(1, true), coil(2, true), coil(3, true)]
    );
    assert_eq!(desired(&t, "relay-1", "coil:4").await, coil(4, false));
    t.stop().await;
}

#[tokio::test]
async fn superseded_commands_coalesce_to_nothing() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    bind(&t, "u1", json!({"kind": "smart_lock", "id": "lock-1"})).await;
    deliver_all(&t, "locks").await;
    // Assign then unassign before any delivery: nothing left to send.
    assert_eq!(
        t.post(
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-started"})
        )
        .await
        .status,
        200
    );
    assert_eq!(pending(&t, "locks").await, 1);
    assert_eq!(
        t.post("/v1/units/u1/deallocate", json!({})).await.status,
        200
    );
    assert_eq!(pending(&t, "locks").await, 0);
    t.stop().await;
}

#[tokio::test]
async fn a_binding_change_frees_the_old_lock_and_survives_a_restart() {
    let mut t = TestGateway::start().await;
    t.seed(1).await;
    bind(&t, "u1", json!({"kind": "smart_lock", "id": "lock-1"})).await;
    assert_eq!(
        t.post(
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-started"})
        )
        .await
        .status,
        200
    );
    deliver_all(&t, "locks").await;
    bind(&t, "u1", json!({"kind": "smart_lock", "id": "lock-2"})).await;
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock("lock-1", LockTarget::Unassigned)
    );
    assert_eq!(
        desired(&t, "locks", "lock:lock-2").await,
        lock("lock-2", assigned("c2"))
    );
    assert_eq!(pending(&t, "locks").await, 2);
    t.restart().await;
    assert_eq!(pending(&t, "locks").await, 2, "the queue is on disk");
    t.stop().await;
}

#[tokio::test]
async fn an_unchanged_snapshot_queues_nothing_and_a_removed_unit_frees_its_lock() {
    let t = TestGateway::start().await;
    let unit = |id: &str, name: &str, lock: &str, status: &str| {
        json!({"id": id, "name": name, "unit_type": "small", "width": 5, "length": 5, "height": 8,
               "door_height": 7, "door_width": 4, "door_type": "roll_up", "access_type": "indoor",
               "standard_rate": 50, "walk_thru_order": 1, "status": status,
               "lock": {"kind": "smart_lock", "id": lock}})
    };
    let snapshot = |units: Value, allocations: Value| {
        json!({"unit_types": [{"id": "small", "name": "Small"}], "units": units,
               "contacts": [{"id": "c1", "name": "C1", "access_code": "1234"}],
               "tenancies": [{"id": "t1", "contact_id": "c1", "start_date": "2026-01-01"}],
               "allocations": allocations})
    };
    let full = snapshot(
        json!([
            unit("u1", "A1", "lock-1", "occupied"),
            unit("u2", "A2", "lock-2", "available")
        ]),
        json!([{"id": "a1", "unit_id": "u1", "tenancy_id": "t1"}]),
    );
    assert_eq!(t.put("/v1/sync/snapshot", full.clone()).await.status, 200);
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock("lock-1", assigned("c1"))
    );
    let before = targets(&t, "locks").await;
    assert_eq!(t.put("/v1/sync/snapshot", full).await.status, 200);
    assert_eq!(targets(&t, "locks").await, before, "no-op snapshot");

    let smaller = snapshot(json!([unit("u2", "A2", "lock-2", "available")]), json!([]));
    assert_eq!(t.put("/v1/sync/snapshot", smaller).await.status, 200);
    assert_eq!(
        desired(&t, "locks", "lock:lock-1").await,
        lock("lock-1", LockTarget::Unassigned)
    );
    t.stop().await;
}
