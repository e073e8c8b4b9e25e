//! End to end: the gateway with its reconcilers against hw-sim's relay board (Modbus TCP)
//! and lock API, observed through the simulator's control API. Every wait polls with a
//! deadline.

mod common;

use common::site::{SimSite, until};
use serde_json::{Value, json};
use std::time::Duration;

const BOARD: &str = "relay-1";
const LOCKS: &str = "locks";

/// hw-sim with one Modbus TCP relay board and a lock API serving lock-1..lock-3; the
/// gateway drives both (the same `[devices]` text for each side).
fn devices() -> String {
    format!(
        r#"
[[devices.relay_boards]]
id = "{BOARD}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 8
inputs = 8
timeout_ms = 200
poll_ms = 100

[devices.lock_api]
id = "{LOCKS}"
url = "http://127.0.0.1:0/vendor"
api_key_file = "{{wires}}/lock-api.key"
locks = ["lock-1", "lock-2", "lock-3"]
"#
    )
}

/// The site, with the shorthands these tests use.
struct Site(SimSite);

impl std::ops::Deref for Site {
    type Target = SimSite;
    fn deref(&self) -> &SimSite {
        &self.0
    }
}

impl std::ops::DerefMut for Site {
    fn deref_mut(&mut self) -> &mut SimSite {
        &mut self.0
    }
}

impl Site {
    /// The site with units u1..u6 seeded, reading back every `reconcile_s`.
    async fn start(reconcile_s: u64) -> Site {
        Site(SimSite::start(&devices(), reconcile_s, 6).await)
    }

    async fn coils(&self) -> Vec<bool> {
        self.0.coils(BOARD).await
    }

    async fn fault(&self, device: &str, kind: &str, ms: u64) {
        self.0.fault(device, kind, None, ms).await;
    }

    async fn ok(&self, path: &str, body: Value) {
        self.0.ok(path, body).await;
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

#[tokio::test]
async fn smart_locks_follow_grant_overlock_and_deallocate() {
    let s = Site::start(30).await;
    s.bind("u1", json!({"kind": "smart_lock", "id": "lock-1"}))
        .await;
    s.ok(
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    let took = until("lock-1 assigned to c2", Duration::from_secs(5), || async {
        s.lock("lock-1").await == ("assigned".into(), Some("c2".into()))
    })
    .await;
    println!("grant_access → lock assigned in {took:?}");

    s.ok("/v1/contacts/c2/overlock", json!({})).await;
    until("lock-1 overlocked", Duration::from_secs(5), || async {
        s.lock("lock-1").await.0 == "overlocked"
    })
    .await;

    s.ok("/v1/units/u1/deallocate", json!({})).await;
    let took = until("lock-1 unassigned", Duration::from_secs(5), || async {
        s.lock("lock-1").await == ("unassigned".into(), None)
    })
    .await;
    println!("deallocate of an overlocked unit → lock unassigned in {took:?}");
    assert_eq!(s.lock("lock-2").await, ("unassigned".into(), None));

    until("lock queue drained", Duration::from_secs(5), || async {
        let d = s.device(LOCKS).await;
        d["queue_depth"] == 0 && d["online"] == true
    })
    .await;
    let d = s.device(LOCKS).await;
    assert_eq!(d["kind"], "lock_api");
    s.stop().await;
}

#[tokio::test]
async fn overlock_switches_exactly_the_contacts_coils_and_deallocate_locks_the_unit() {
    let s = Site::start(30).await;
    for n in 1..=5u16 {
        s.bind(
            &format!("u{n}"),
            json!({"kind": "relay", "board": BOARD, "coil": n}),
        )
        .await;
    }
    // u1-u3 to c2, u4 to c3: their overlocks lift; u5 stays available (coil on).
    for u in ["u1", "u2", "u3"] {
        s.ok(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    }
    let a =
        s.t.put(
            "/v1/tenancies/t-c3",
            json!({"contact_id": "c3", "start_date": "2026-03-01"}),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    s.ok("/v1/units/u4/grant_access", json!({"tenancy_id": "t-c3"}))
        .await;
    let before = vec![false, false, false, false, false, true, false, false];
    until("coils after grants", Duration::from_secs(5), || async {
        s.coils().await == before
    })
    .await;

    s.ok("/v1/contacts/c2/overlock", json!({})).await;
    let after = vec![false, true, true, true, false, true, false, false];
    let took = until(
        "exactly c2's three coils on",
        Duration::from_secs(5),
        || async { s.coils().await == after },
    )
    .await;
    println!("overlock of 3 relay-bound units → coils on in {took:?}");

    s.ok("/v1/units/u4/deallocate", json!({})).await;
    until("u4's coil on", Duration::from_secs(5), || async {
        s.coils().await[4]
    })
    .await;
    until("relay queue drained", Duration::from_secs(5), || async {
        let d = s.device(BOARD).await;
        d["queue_depth"] == 0 && d["online"] == true
    })
    .await;
    assert_eq!(s.device(BOARD).await["kind"], "relay_board");
    s.stop().await;
}

#[tokio::test]
async fn a_coil_flipped_behind_the_gateways_back_is_restored_within_one_period() {
    use tokio_modbus::client::Writer;
    let s = Site::start(1).await;
    s.bind("u1", json!({"kind": "relay", "board": BOARD, "coil": 3}))
        .await;
    s.ok(
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    s.bind("u2", json!({"kind": "relay", "board": BOARD, "coil": 2}))
        .await;
    until("coil 2 on, coil 3 off", Duration::from_secs(5), || async {
        let c = s.coils().await;
        c[2] && !c[3]
    })
    .await;

    let addr = s.t.cfg.devices.relay_boards[0]
        .address
        .parse()
        .expect("address");
    let mut ctx = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(1))
        .await
        .expect("bare client connects");
    ctx.write_single_coil(3, true)
        .await
        .expect("transport")
        .expect("no exception");
    ctx.write_single_coil(2, false)
        .await
        .expect("transport")
        .expect("no exception");
    let c = s.coils().await;
    assert!(c[3] && !c[2], "the flips took: {c:?}");
    let took = until(
        "drift corrected within one period (1 s)",
        Duration::from_millis(1500),
        || async {
            let c = s.coils().await;
            c[2] && !c[3]
        },
    )
    .await;
    println!("drift corrected in {took:?} (reconcile_s = 1)");
    s.stop().await;
}

#[tokio::test]
async fn commands_queued_to_an_offline_board_survive_a_restart_and_land_once() {
    let mut s = Site::start(30).await;
    for n in 1..=3u16 {
        s.bind(
            &format!("u{n}"),
            json!({"kind": "relay", "board": BOARD, "coil": n}),
        )
        .await;
    }
    s.ok(
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    until(
        "coil 1 off (u1 occupied)",
        Duration::from_secs(5),
        || async { s.coils().await[1..=3] == [false, true, true] },
    )
    .await;
    let mut seen = s.sim.registry.bus.subscribe();

    // The board goes silent; changes pile up in the durable queue.
    s.fault(BOARD, "offline", 120_000).await;
    until("board seen offline", Duration::from_secs(5), || async {
        s.device(BOARD).await["online"] == false
    })
    .await;
    s.ok("/v1/contacts/c2/overlock", json!({})).await; // u1: coil on ...
    s.ok("/v1/contacts/c2/remove_overlock", json!({})).await; // ... and off again: nothing to send
    s.ok(
        "/v1/units/u2/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await; // u2: coil off
    assert_eq!(
        s.device(BOARD).await["queue_depth"],
        1,
        "coalesced to one command"
    );

    // The gateway dies with the command queued; it comes back on the same files.
    s.t.restart().await;
    assert_eq!(
        s.device(BOARD).await["queue_depth"],
        1,
        "the queue survived the restart"
    );

    let cleared = s
        .http
        .delete(format!("{}/faults?device={BOARD}", s.sim.control_url()))
        .send()
        .await
        .expect("DELETE /faults");
    assert!(cleared.status().is_success());
    until(
        "coil 2 off after recovery",
        Duration::from_secs(15),
        || async { s.coils().await[1..=3] == [false, false, true] },
    )
    .await;
    until("queue drained", Duration::from_secs(5), || async {
        s.device(BOARD).await["queue_depth"] == 0
    })
    .await;
    // Each coil moved exactly as often as its state changed: u1's superseded pair never
    // reached the board, u2's command landed once.
    let mut changes = Vec::new();
    while let Ok(o) = seen.try_recv() {
        if o.device == BOARD && o.kind == "coil_changed" {
            changes.push((
                o.data["coil"].as_u64().unwrap_or(99),
                o.data["on"].as_bool(),
            ));
        }
    }
    assert_eq!(changes, vec![(2, Some(false))]);
    s.stop().await;
}

#[tokio::test]
async fn a_lock_changed_at_the_lock_itself_is_restored_within_one_period() {
    let s = Site::start(1).await;
    s.bind("u1", json!({"kind": "smart_lock", "id": "lock-1"}))
        .await;
    s.bind("u2", json!({"kind": "smart_lock", "id": "lock-2"}))
        .await;
    s.ok(
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    let settled = || async {
        s.lock("lock-1").await == ("assigned".into(), Some("c2".into()))
            && s.lock("lock-2").await == ("unassigned".into(), None)
    };
    until(
        "lock-1 assigned, lock-2 free",
        Duration::from_secs(5),
        settled,
    )
    .await;
    until("queue drained", Duration::from_secs(5), || async {
        s.device(LOCKS).await["queue_depth"] == 0
    })
    .await;

    // Someone clears lock-1 and gives lock-2 to a stranger, at the locks themselves.
    let set = |id: &str, body: Value| {
        s.http
            .put(format!("{}/locks/{id}", s.sim.control_url()))
            .json(&body)
            .send()
    };
    let r = set("lock-1", json!({"state": "unassigned"}))
        .await
        .expect("PUT");
    assert!(r.status().is_success(), "{}", r.status());
    let r = set(
        "lock-2",
        json!({"state": "assigned", "assigned_to": "stranger"}),
    )
    .await
    .expect("PUT");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(s.lock("lock-1").await, ("unassigned".into(), None));
    let took = until(
        "lock drift corrected within one period (1 s)",
        Duration::from_millis(2000),
        settled,
    )
    .await;
    println!("lock drift corrected in {took:?} (reconcile_s = 1)");
    s.stop().await;
}
