//! Every allocation transition of DESIGN.md §2 reaches the simulated hardware in exactly
//! the state of the §4 table, over the real transports: a Modbus RTU relay board on a
//! pseudo-terminal, the smart-lock API over HTTP, and an OSDP keypad (secure channel) on a
//! pseudo-terminal. One site file describes the hardware for both hw-sim and the gateway.
//!
//! The expected hardware is computed here, independently of the gateway, from the units'
//! statuses and tenants as the API reports them; after every step the whole board and
//! every lock must match it (unbound coils included), not just the unit that changed.

mod common;

use common::site::{POLL, SimSite, until};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

const BOARD: &str = "rtu-1";
const LOCKS: &str = "locks";
const KEYPAD: &str = "gate-1";
const SCBK: &str = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b";
const COILS: usize = 8;
/// Units bound to smart locks (`lock-1`..) and to overlock coils (1..) of the RTU board.
const LOCK_UNITS: [&str; 3] = ["u1", "u2", "u3"];
const COIL_UNITS: [&str; 3] = ["u4", "u5", "u6"];
const WITHIN: Duration = Duration::from_secs(5);

/// The tenant each tenancy of `TestGateway::seed` belongs to.
fn contact_of(tenancy: &str) -> &'static str {
    match tenancy {
        "t-future" => "c1",
        "t-started" | "t-ended" => "c2",
        "t-other" => "c3",
        other => panic!("unknown tenancy {other}"),
    }
}

/// What the hardware should show: each lock's (state, tenant) and every coil.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hardware {
    locks: BTreeMap<String, (String, Option<String>)>,
    coils: Vec<bool>,
}

/// DESIGN.md §4, written out again: lock and overlock coil per unit status.
fn expected(units: &BTreeMap<String, (String, Option<String>)>) -> Hardware {
    let mut locks = BTreeMap::new();
    let mut coils = vec![false; COILS];
    for (i, u) in LOCK_UNITS.iter().enumerate() {
        let (status, tenant) = &units[*u];
        let lock = match status.as_str() {
            "occupied" => ("assigned".to_owned(), tenant.clone()),
            // An overlocked lock keeps its tenant; a repossessed one may keep it too.
            "overlocked" | "repossessed" => ("overlocked".to_owned(), None),
            _ => ("unassigned".to_owned(), None),
        };
        locks.insert(format!("lock-{}", i + 1), lock);
    }
    for (i, u) in COIL_UNITS.iter().enumerate() {
        let (status, _) = &units[*u];
        coils[i + 1] = status != "occupied";
    }
    Hardware { locks, coils }
}

/// The site's hardware: a keypad and an RTU board on pseudo-terminals, and the lock API.
fn devices() -> String {
    format!(
        r#"
[[devices.keypads]]
id = "{KEYPAD}"
zone = "main-gate"
port = "{{wires}}/{KEYPAD}"
baud = 115200
address = 1
scbk = "{SCBK}"
gate = {{ board = "{BOARD}", coil = 0 }}

[[devices.relay_boards]]
id = "{BOARD}"
transport = "rtu"
port = "{{wires}}/{BOARD}"
baud = 19200
unit_id = 7
coils = {COILS}
inputs = 8
timeout_ms = 300
poll_ms = 200

[devices.lock_api]
id = "{LOCKS}"
url = "http://127.0.0.1:0"
api_key_file = "{{wires}}/lock-api.key"
locks = ["lock-1", "lock-2", "lock-3"]
"#
    )
}

struct Site {
    s: SimSite,
    /// Each unit's tenant while allocated, as the steps made it.
    tenants: BTreeMap<String, Option<String>>,
}

impl std::ops::Deref for Site {
    type Target = SimSite;
    fn deref(&self) -> &SimSite {
        &self.s
    }
}

impl Site {
    async fn start() -> Site {
        let s = SimSite::start(&devices(), 30, 6).await;
        for (i, u) in LOCK_UNITS.iter().enumerate() {
            s.bind(
                u,
                json!({"kind": "smart_lock", "id": format!("lock-{}", i + 1)}),
            )
            .await;
        }
        for (i, u) in COIL_UNITS.iter().enumerate() {
            s.bind(u, json!({"kind": "relay", "board": BOARD, "coil": i + 1}))
                .await;
        }
        let tenants = LOCK_UNITS
            .iter()
            .chain(COIL_UNITS.iter())
            .map(|u| (u.to_string(), None))
            .collect();
        Site { s, tenants }
    }

    /// What hw-sim shows now.
    async fn actual(&self) -> Hardware {
        let coils = self.coils(BOARD).await;
        let mut locks = BTreeMap::new();
        for l in self.control("/locks").await.as_array().expect("locks") {
            let state = l["state"].as_str().expect("state").to_owned();
            // The §4 table says "overlocked"; whom the vendor keeps on it is its business.
            let tenant = match state.as_str() {
                "assigned" => l["assigned_to"].as_str().map(str::to_owned),
                _ => None,
            };
            locks.insert(l["id"].as_str().expect("id").to_owned(), (state, tenant));
        }
        Hardware { locks, coils }
    }

    /// Every bound unit's status (from the API) and tenant (from the steps).
    async fn units(&self) -> BTreeMap<String, (String, Option<String>)> {
        let mut out = BTreeMap::new();
        for (u, tenant) in &self.tenants {
            out.insert(u.clone(), (self.t.status_of(u).await, tenant.clone()));
        }
        out
    }

    /// Runs one operation, which must succeed, and records whom it allocated units to.
    async fn step(&mut self, path: &str, body: Value) {
        let a = self.t.post(path, body.clone()).await;
        assert_eq!(a.status, 200, "{path}: {:?}", a.body);
        let parts: Vec<&str> = path.split('/').collect();
        if let ["", "v1", "units", unit, action] = parts[..] {
            match action {
                "reserve" | "grant_access" => {
                    let t = body["tenancy_id"].as_str().expect("tenancy");
                    self.tenants
                        .insert(unit.to_owned(), Some(contact_of(t).to_owned()));
                }
                "deallocate" => {
                    self.tenants.insert(unit.to_owned(), None);
                }
                _ => {}
            }
        }
    }

    /// Waits until the hardware matches the §4 table for the units' statuses now.
    async fn converges(&self, what: &str) -> Duration {
        let units = self.units().await;
        let want = expected(&units);
        let start = Instant::now();
        loop {
            let got = self.actual().await;
            if got == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < WITHIN,
                "{what}: hardware did not reach the §4 state within {WITHIN:?}\nunits {units:?}\nwant {want:?}\ngot  {got:?}"
            );
            tokio::time::sleep(POLL).await; // poll interval, not a wait for the outcome
        }
    }
}

#[tokio::test]
async fn every_transition_reaches_exactly_the_table_state_on_rtu_and_the_lock_api() {
    let mut s = Site::start().await;
    let took = s.converges("all units available").await;
    println!("start: available units' coils on, locks unassigned in {took:?}");
    let pair = |a: &'static str, b: &'static str| [a, b];
    let (lk1, cl1) = ("u1", "u4");
    let (lk2, cl2) = ("u2", "u5");
    let (lk3, cl3) = ("u3", "u6");

    // reserve: available → reserved (t-future starts on the 20th).
    for u in pair(lk1, cl1) {
        s.step(
            &format!("/v1/units/{u}/reserve"),
            json!({"tenancy_id": "t-future"}),
        )
        .await;
    }
    s.converges("reserve").await;
    // grant_access: reserved → occupied (same tenancy).
    for u in pair(lk1, cl1) {
        s.step(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-future"}),
        )
        .await;
    }
    s.converges("grant_access from reserved").await;
    // grant_access: available → occupied in one step.
    for u in pair(lk2, cl2) {
        s.step(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    }
    s.converges("grant_access from available").await;
    // overlock / remove_overlock of c2: only c2's units, c1's stay as they are.
    s.step("/v1/contacts/c2/overlock", json!({})).await;
    s.converges("overlock").await;
    s.step("/v1/contacts/c2/remove_overlock", json!({})).await;
    s.converges("remove_overlock").await;
    // deallocate from overlocked, occupied and reserved.
    s.step("/v1/contacts/c2/overlock", json!({})).await;
    s.converges("overlock again").await;
    for u in pair(lk2, cl2) {
        s.step(&format!("/v1/units/{u}/deallocate"), json!({}))
            .await;
    }
    s.converges("deallocate overlocked").await;
    for u in pair(lk1, cl1) {
        s.step(&format!("/v1/units/{u}/deallocate"), json!({}))
            .await;
    }
    s.converges("deallocate occupied").await;
    for u in pair(lk1, cl1) {
        s.step(
            &format!("/v1/units/{u}/reserve"),
            json!({"tenancy_id": "t-future"}),
        )
        .await;
    }
    s.converges("reserve again").await;
    for u in pair(lk1, cl1) {
        s.step(&format!("/v1/units/{u}/deallocate"), json!({}))
            .await;
    }
    s.converges("deallocate reserved").await;
    // Operator states: available ⇄ unavailable.
    for u in pair(lk3, cl3) {
        s.step(
            &format!("/v1/units/{u}/set_status"),
            json!({"status": "unavailable"}),
        )
        .await;
    }
    s.converges("unavailable").await;
    for u in pair(lk3, cl3) {
        s.step(
            &format!("/v1/units/{u}/set_status"),
            json!({"status": "available"}),
        )
        .await;
    }
    s.converges("available again").await;
    // repossessed from occupied, then deallocated.
    for u in pair(lk3, cl3) {
        s.step(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    }
    s.converges("occupied before repossession").await;
    for u in pair(lk3, cl3) {
        s.step(
            &format!("/v1/units/{u}/set_status"),
            json!({"status": "repossessed"}),
        )
        .await;
    }
    s.converges("repossessed from occupied").await;
    for u in pair(lk3, cl3) {
        s.step(&format!("/v1/units/{u}/deallocate"), json!({}))
            .await;
    }
    s.converges("deallocate repossessed").await;
    // repossessed from overlocked.
    for u in pair(lk3, cl3) {
        s.step(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    }
    s.step("/v1/contacts/c2/overlock", json!({})).await;
    s.converges("overlocked before repossession").await;
    for u in pair(lk3, cl3) {
        s.step(
            &format!("/v1/units/{u}/set_status"),
            json!({"status": "repossessed"}),
        )
        .await;
    }
    let took = s.converges("repossessed from overlocked").await;
    println!("last step converged in {took:?}");

    // Every status the table names was visited, on a lock and on a coil alike.
    let a = s.t.get("/v1/events?limit=500").await;
    let types: std::collections::BTreeSet<&str> = a.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    for t in [
        "unit.reserved",
        "unit.occupied",
        "unit.overlocked",
        "unit.deallocated",
        "unit.available",
        "unit.status_changed",
    ] {
        assert!(types.contains(t), "{t} in {types:?}");
    }
    for d in [BOARD, LOCKS] {
        let dev = s.device(d).await;
        assert_eq!(dev["queue_depth"], 0, "{dev}");
        assert_eq!(dev["online"], true, "{dev}");
    }
    s.s.stop().await;
}

#[tokio::test]
async fn overlocking_a_contact_with_three_units_changes_exactly_those_three() {
    let mut s = Site::start().await;
    // c2 holds two lock units and one coil unit; c1 holds one of each (untouched).
    for u in ["u1", "u2", "u4"] {
        s.step(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    }
    for u in ["u3", "u5"] {
        s.step(
            &format!("/v1/units/{u}/reserve"),
            json!({"tenancy_id": "t-future"}),
        )
        .await;
        s.step(
            &format!("/v1/units/{u}/grant_access"),
            json!({"tenancy_id": "t-future"}),
        )
        .await;
    }
    s.converges("five occupied units").await;
    until("queues drained", WITHIN, || async {
        s.device(BOARD).await["queue_depth"] == 0 && s.device(LOCKS).await["queue_depth"] == 0
    })
    .await;
    let before = s.actual().await;

    let mut seen = s.sim.registry.bus.subscribe();
    let a = s.t.post("/v1/contacts/c2/overlock", json!({})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let mut units: Vec<&str> = a.body["units"]
        .as_array()
        .expect("units")
        .iter()
        .filter_map(|u| u["id"].as_str())
        .collect();
    units.sort_unstable();
    assert_eq!(units, ["u1", "u2", "u4"]);
    s.converges("overlock of c2").await;
    let after = s.actual().await;

    let changed_locks: Vec<&String> = after
        .locks
        .iter()
        .filter(|(id, l)| before.locks[*id] != **l)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(changed_locks, ["lock-1", "lock-2"]);
    let changed_coils: Vec<usize> = (0..COILS)
        .filter(|&i| before.coils[i] != after.coils[i])
        .collect();
    assert_eq!(changed_coils, [1]);
    assert!(after.coils[1], "u4's overlock coil on");

    // And the devices saw exactly three changes: no stray writes to the others.
    let mut changes = Vec::new();
    while let Ok(o) = seen.try_recv() {
        match o.kind.as_str() {
            "coil_changed" => changes.push(format!("{}:{}", o.device, o.data["coil"])),
            "lock_state_changed" => changes.push(format!("{}:{}", o.device, o.data["lock"])),
            _ => {}
        }
    }
    changes.sort();
    assert_eq!(
        changes,
        // Sorted: "locks:..." before "rtu-1:...".
        [
            format!("{LOCKS}:\"lock-1\""),
            format!("{LOCKS}:\"lock-2\""),
            format!("{BOARD}:1"),
        ]
    );
    s.s.stop().await;
}

#[tokio::test]
async fn the_keypad_comes_online_over_a_secure_serial_line_and_its_outage_is_recorded() {
    let s = Site::start().await;
    let took = until("keypad online", Duration::from_secs(10), || async {
        s.device(KEYPAD).await["online"] == true
    })
    .await;
    println!("keypad online (secure channel over a pty) {took:?} after start");
    let d = s.device(KEYPAD).await;
    assert_eq!(d["kind"], "keypad");
    assert_eq!(d["zone"], "main-gate");
    let k = s.control(&format!("/keypads/{KEYPAD}")).await;
    assert_eq!(k["secure"], true, "{k}");

    let seq = s.t.last_seq().await;
    let r = s
        .http
        .post(format!("{}/faults", s.sim.control_url()))
        .json(&json!({"device": KEYPAD, "kind": "offline", "duration_ms": 4000}))
        .send()
        .await
        .expect("POST /faults");
    assert!(r.status().is_success());
    until(
        "keypad reported offline",
        Duration::from_secs(10),
        || async { s.device(KEYPAD).await["online"] == false },
    )
    .await;
    until("keypad back online", Duration::from_secs(20), || async {
        s.device(KEYPAD).await["online"] == true
    })
    .await;
    let evs = s.t.events_after(seq).await;
    let kinds: Vec<(&str, &str)> = evs
        .iter()
        .filter(|e| e["data"]["device"] == KEYPAD)
        .map(|e| {
            (
                e["type"].as_str().unwrap_or(""),
                e["data"]["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("device.offline", "keypad"), ("device.online", "keypad")]
    );
    // The other devices never noticed.
    assert_eq!(s.device(BOARD).await["online"], true);
    assert_eq!(s.device(LOCKS).await["online"], true);
    s.s.stop().await;
}
