//! Gate access end to end, with no cloud link at all: PINs typed on hw-sim's OSDP keypads
//! (secure channel over pseudo-terminals) are decided by the gateway from its replica, the
//! gate strike relays on a Modbus TCP board are pulsed for the configured time, and the
//! keypads show the outcome. Also: zones, hours at their edges (site-local, across
//! midnight), every refusal reason, the lockout and its expiry, `*` and the inter-key
//! timeout, and door alarms from unit door sensors and a gate held open.

mod common;

use common::site::{SimSite, keypad, tcp_board, until};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;

const GATES: &str = "gate-relays";
const DOORS: &str = "doors";
const MAIN: &str = "gate-1";
const EAST: &str = "gate-2";
const PULSE_MS: u64 = 1500;
const WITHIN: Duration = Duration::from_secs(5);

fn devices() -> String {
    [
        keypad(MAIN, "main-gate", 1, GATES, 0, Some(0), PULSE_MS),
        keypad(EAST, "east-gate", 2, GATES, 1, Some(1), PULSE_MS),
        tcp_board(GATES, 2, 2, 300, 50),
        tcp_board(DOORS, 8, 8, 300, 50),
    ]
    .concat()
}

/// The site: c2 (PIN 2222) occupies u1 behind the main gate; c3 (PIN 3333) occupies u4
/// behind the east gate; c1 (PIN 1111) has u3 reserved behind the main gate. The site is
/// open 06:00-22:00 every day; the clock stands at Tuesday 2026-03-10 12:00 London.
async fn site(tweak: impl FnOnce(&mut unitgate::config::Config)) -> SimSite {
    let s = SimSite::start_with(&devices(), 30, 6, |cfg| {
        cfg.site.access_hours = unitgate::domain::hours::AccessHours(
            unitgate::domain::hours::WEEKDAYS
                .iter()
                .map(|d| (d.to_string(), "06:00-22:00".to_owned()))
                .collect(),
        );
        cfg.access.gate_held_open_s = 3;
        tweak(cfg);
    })
    .await;
    for (unit, zones, door) in [
        ("u1", json!(["main-gate"]), 1),
        ("u3", json!(["main-gate"]), 3),
        ("u4", json!(["east-gate"]), 4),
        ("u5", json!(["main-gate", "east-gate"]), 5),
    ] {
        let a =
            s.t.patch(
                &format!("/v1/units/{unit}"),
                json!({"unit": {"zones": zones, "door_sensor": {"board": DOORS, "input": door}}}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let a =
        s.t.put(
            "/v1/tenancies/t-c3",
            json!({"contact_id": "c3", "start_date": "2026-03-01", "end_date": null}),
        )
        .await;
    assert!(a.status == 200 || a.status == 201, "{:?}", a.body);
    s.ok(
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    s.ok("/v1/units/u4/grant_access", json!({"tenancy_id": "t-c3"}))
        .await;
    s.ok("/v1/units/u3/reserve", json!({"tenancy_id": "t-future"}))
        .await;
    until("keypads online", Duration::from_secs(10), || async {
        s.device(MAIN).await["online"] == true && s.device(EAST).await["online"] == true
    })
    .await;
    s
}

async fn press(s: &SimSite, keypad: &str, keys: &str) {
    let r = s
        .http
        .post(format!("{}/keypads/{keypad}/keys", s.sim.control_url()))
        .json(&json!({"keys": keys}))
        .send()
        .await
        .expect("press");
    assert_eq!(r.status().as_u16(), 202, "{keypad} {keys}");
}

/// The next access event after `seq`, waiting for it.
async fn decision(s: &SimSite, seq: &mut i64) -> Value {
    let start = Instant::now();
    loop {
        let evs = s.t.events_after(*seq).await;
        if let Some(e) = evs
            .iter()
            .find(|e| e["type"].as_str().is_some_and(|t| t.starts_with("access.")))
        {
            *seq = e["seq"].as_i64().expect("seq");
            return e.clone();
        }
        assert!(start.elapsed() < WITHIN, "no access decision: {evs:?}");
        tokio::time::sleep(common::site::POLL).await; // poll interval
    }
}

/// Types a PIN and returns the decision event and what the keypad shows once the
/// gateway's three feedback commands (LED, buzzer, text) have reached it.
async fn enter(s: &SimSite, seq: &mut i64, keypad: &str, keys: &str) -> (Value, Value) {
    let commands = |k: &Value| k["counters"]["commands"].as_u64().unwrap_or(0);
    let before = commands(&s.control(&format!("/keypads/{keypad}")).await);
    press(s, keypad, keys).await;
    let e = decision(s, seq).await;
    let start = Instant::now();
    loop {
        let k = s.control(&format!("/keypads/{keypad}")).await;
        if commands(&k) >= before + 3 {
            return (e, k);
        }
        assert!(start.elapsed() < WITHIN, "keypad feedback missing: {k}");
        tokio::time::sleep(common::site::POLL).await; // poll interval
    }
}

fn assert_denied(e: &Value, reason: &str) {
    assert_eq!(e["type"], "access.denied", "{e}");
    assert_eq!(e["data"]["reason"], reason, "{e}");
}

#[tokio::test]
async fn a_paying_tenant_gets_in_the_gate_pulses_for_the_configured_time() {
    let s = site(|_| {}).await;
    let mut seq = s.t.last_seq().await;
    let mut seen = s.sim.registry.bus.subscribe();
    let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    assert_eq!(
        e["data"],
        json!({"keypad": MAIN, "zone": "main-gate", "contact_id": "c2", "units": ["u1"]})
    );
    assert!(!e.to_string().contains("2222"), "the PIN is never recorded");
    assert_eq!(k["text"], "Welcome");
    assert_eq!(k["led"], "green", "{k}");
    assert!(k["last_buzzer"].is_object(), "{k}");

    // The strike: on, then off after the pulse, measured on the simulator's clock.
    let mut on_at = None;
    let deadline = Instant::now() + WITHIN;
    let pulse = loop {
        let o = tokio::time::timeout_at(deadline, seen.recv())
            .await
            .expect("strike observed")
            .expect("bus");
        if o.device != GATES || o.kind != "coil_changed" || o.data["coil"] != 0 {
            continue;
        }
        match (o.data["on"].as_bool(), on_at) {
            (Some(true), None) => on_at = Some(o.t_ns),
            (Some(false), Some(t)) => break Duration::from_nanos(o.t_ns - t),
            _ => {}
        }
    };
    println!("gate pulse {pulse:?} (configured {PULSE_MS} ms)");
    assert!(
        pulse >= Duration::from_millis(PULSE_MS) && pulse < Duration::from_millis(PULSE_MS + 400),
        "{pulse:?}"
    );
    let coils = s.coils(GATES).await;
    assert_eq!(coils, [false, false], "the east gate never moved");
    s.stop().await;
}

#[tokio::test]
async fn refusals_give_their_reason_and_leak_nothing() {
    let s = site(|_| {}).await;
    let mut seq = s.t.last_seq().await;

    // A code nobody has, and a tenant at a gate that is not theirs, read the same.
    let (e, k) = enter(&s, &mut seq, MAIN, "9999#").await;
    assert_denied(&e, "invalid_code");
    assert_eq!(e["data"]["contact_id"], Value::Null);
    assert_eq!(k["text"], "Invalid code");
    assert_eq!(k["led"], "red");
    let (e, k) = enter(&s, &mut seq, EAST, "2222#").await;
    assert_denied(&e, "no_access");
    assert_eq!(k["text"], "Invalid code");
    // Reserved is not occupied.
    let (e, k) = enter(&s, &mut seq, MAIN, "1111#").await;
    assert_denied(&e, "no_access");
    assert_eq!(k["text"], "Invalid code");
    // Too short or too long to be a PIN.
    let (e, _) = enter(&s, &mut seq, MAIN, "12#").await;
    assert_denied(&e, "invalid_code");
    // The east tenant at the east gate.
    let (e, _) = enter(&s, &mut seq, EAST, "3333#").await;
    assert_eq!(e["type"], "access.granted", "{e}");

    // Overlocked.
    s.ok("/v1/contacts/c2/overlock", json!({})).await;
    let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_denied(&e, "overlocked");
    assert_eq!(e["data"]["units"], json!(["u1"]));
    assert_eq!(k["text"], "Please see office");
    s.ok("/v1/contacts/c2/remove_overlock", json!({})).await;

    // Hours: 21:59 in, 22:00 out, 06:00 in again (London, GMT in March).
    s.t.clock.set("2026-03-10T21:59:59Z");
    let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    s.t.clock.set("2026-03-10T22:00:00Z");
    let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_denied(&e, "outside_hours");
    assert_eq!(k["text"], "Open 06:00-22:00");
    s.t.clock.set("2026-03-11T06:00:00Z");
    let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    // In summer the same local hours are an hour earlier in UTC.
    s.t.clock.set("2026-07-07T20:59:00Z");
    let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    s.t.clock.set("2026-07-07T21:00:00Z");
    let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_denied(&e, "outside_hours");

    // The contact's own hours run past midnight, within the site's: Tuesday 20:00 until
    // Wednesday 02:00; the site closes at 22:00, so 21:00 in, 23:00 out.
    let a =
        s.t.put(
            "/v1/contacts/c3",
            json!({"name": "c3", "access_hours": {"tuesday": "20:00-02:00"}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    s.t.clock.set("2026-03-10T19:59:00Z");
    let (e, k) = enter(&s, &mut seq, EAST, "3333#").await;
    assert_denied(&e, "outside_hours");
    assert_eq!(k["text"], "Open 20:00-02:00");
    s.t.clock.set("2026-03-10T21:00:00Z");
    let (e, _) = enter(&s, &mut seq, EAST, "3333#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    s.t.clock.set("2026-03-11T01:00:00Z");
    let (e, k) = enter(&s, &mut seq, EAST, "3333#").await;
    assert_denied(&e, "outside_hours");
    assert_eq!(k["text"], "Open 06:00-22:00", "the site is what is closed");

    // Repossessed: refused, and sent to the office.
    s.t.clock.set("2026-03-11T12:00:00Z");
    s.ok("/v1/units/u1/set_status", json!({"status": "repossessed"}))
        .await;
    let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_denied(&e, "repossessed");
    assert_eq!(e["data"]["units"], json!(["u1"]));
    assert_eq!(k["text"], "Please see office");
    s.stop().await;
}

#[tokio::test]
async fn a_site_open_past_midnight_lets_tenants_in_until_it_closes() {
    let s = site(|cfg| {
        cfg.site.access_hours = unitgate::domain::hours::AccessHours(
            [("tuesday", "18:00-02:00"), ("wednesday", "closed")]
                .into_iter()
                .map(|(d, w)| (d.to_owned(), w.to_owned()))
                .collect(),
        );
    })
    .await;
    let mut seq = s.t.last_seq().await;
    for (at, granted) in [
        ("2026-03-10T17:59:00Z", false),
        ("2026-03-10T18:00:00Z", true),
        ("2026-03-11T01:59:00Z", true),
        ("2026-03-11T02:00:00Z", false),
    ] {
        s.t.clock.set(at);
        let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
        assert_eq!(e["type"] == "access.granted", granted, "{at}: {e}");
    }
    let (_, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(k["text"], "Closed today");
    s.stop().await;
}

#[tokio::test]
async fn five_wrong_pins_lock_that_keypad_out_until_it_expires() {
    let s = site(|cfg| cfg.access.lockout_s = 2).await;
    let mut seq = s.t.last_seq().await;
    for n in 1..=5 {
        let (e, _) = enter(&s, &mut seq, MAIN, &format!("99{n}9#")).await;
        assert_denied(&e, "invalid_code");
        assert_eq!(e["data"].get("lockout_s").is_some(), n == 5, "{e}");
    }
    // The right PIN is refused while locked out, and says nothing about itself.
    let locked = Instant::now();
    let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_denied(&e, "lockout");
    assert_eq!(e["data"]["contact_id"], Value::Null);
    assert_eq!(k["text"], "Locked - try later");
    // Another keypad is not locked.
    let (e, _) = enter(&s, &mut seq, EAST, "3333#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    // After the lockout the right PIN works again.
    tokio::time::sleep_until(locked + Duration::from_millis(2100)).await; // the lockout itself
    let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    s.stop().await;
}

#[tokio::test]
async fn star_clears_and_ten_seconds_between_keys_drops_the_entry() {
    let s = site(|_| {}).await;
    let mut seq = s.t.last_seq().await;
    let (e, _) = enter(&s, &mut seq, MAIN, "99*2222#").await;
    assert_eq!(e["type"], "access.granted", "* cleared the 99: {e}");
    let (e, _) = enter(&s, &mut seq, MAIN, "992222#").await;
    assert_denied(&e, "invalid_code");
    // Keys in separate presses join up...
    press(&s, MAIN, "22").await;
    let (e, _) = enter(&s, &mut seq, MAIN, "22#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    // ...unless 10 s pass between them: "22" is dropped and "22" alone is no PIN.
    press(&s, MAIN, "22").await;
    tokio::time::sleep(Duration::from_millis(10_300)).await; // the inter-key timeout itself
    let (e, _) = enter(&s, &mut seq, MAIN, "22#").await;
    assert_denied(&e, "invalid_code");
    s.stop().await;
}

#[tokio::test]
async fn doors_opening_on_units_that_are_not_occupied_and_a_gate_held_open_raise_alarms() {
    let s = site(|_| {}).await;
    let seq = s.t.last_seq().await;
    let set = |board: &'static str, n: u16, on: bool| {
        let s = &s;
        async move {
            let r = s
                .http
                .post(format!("{}/relays/{board}/inputs/{n}", s.sim.control_url()))
                .json(&json!({"on": on}))
                .send()
                .await
                .expect("input");
            assert!(r.status().is_success());
        }
    };
    // u1 is occupied (no alarm), u5 available, u3 reserved (alarms), input 7 is nobody's.
    set(DOORS, 1, true).await;
    set(DOORS, 5, true).await;
    set(DOORS, 3, true).await;
    set(DOORS, 7, true).await;
    let alarms = || async {
        s.t.events_after(seq)
            .await
            .into_iter()
            .filter(|e| e["type"] == "door.alarm")
            .collect::<Vec<_>>()
    };
    until("two door alarms", WITHIN, || async {
        alarms().await.len() >= 2
    })
    .await;
    // Closing and staying open raise nothing more; opening again does.
    set(DOORS, 5, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // several input polls
    let mut got: Vec<(String, String)> = alarms()
        .await
        .iter()
        .map(|e| {
            (
                e["data"]["unit_id"].as_str().unwrap_or("").to_owned(),
                e["data"]["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("u3".to_owned(), "reserved".to_owned()),
            ("u5".to_owned(), "available".to_owned())
        ]
    );
    set(DOORS, 5, true).await;
    until("third door alarm", WITHIN, || async {
        alarms().await.len() == 3
    })
    .await;

    // The east gate held open past gate_held_open_s (3 s): one alarm.
    let opened = Instant::now();
    set(GATES, 1, true).await;
    until("gate held open alarm", Duration::from_secs(6), || async {
        alarms()
            .await
            .iter()
            .any(|e| e["data"]["kind"] == "gate_held_open")
    })
    .await;
    let took = opened.elapsed();
    assert!(took >= Duration::from_secs(3), "{took:?}");
    let a = alarms().await;
    let held = a.last().expect("alarm");
    assert_eq!(held["data"]["keypad"], EAST, "{held}");
    assert_eq!(held["data"]["zone"], "east-gate", "{held}");
    // A normal entry (gate open for the pulse only) raises nothing.
    set(GATES, 1, false).await;
    let n = alarms().await.len();
    let mut seq2 = s.t.last_seq().await;
    let (e, _) = enter(&s, &mut seq2, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted");
    tokio::time::sleep(Duration::from_millis(PULSE_MS + 2000)).await; // past the pulse
    assert_eq!(alarms().await.len(), n);
    s.stop().await;
}

/// Sets a relay board input on the simulator.
async fn set_input(s: &SimSite, board: &str, n: u16, on: bool) {
    let r = s
        .http
        .post(format!("{}/relays/{board}/inputs/{n}", s.sim.control_url()))
        .json(&json!({"on": on}))
        .send()
        .await
        .expect("input");
    assert!(r.status().is_success());
}

/// The units of the `door.alarm` events after `seq`, in log order.
async fn door_alarms(s: &SimSite, seq: i64) -> Vec<String> {
    s.t.events_after(seq)
        .await
        .into_iter()
        .filter(|e| e["type"] == "door.alarm")
        .map(|e| e["data"]["unit_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Guards the re-raise the crash suite found: a door still open after a restart was
/// reported again at every start (the alarmed set lived in memory only).
#[tokio::test]
async fn an_open_door_is_reported_once_across_restarts_and_again_after_it_closes() {
    let mut s = site(|_| {}).await;
    let seq = s.t.last_seq().await;
    set_input(&s, DOORS, 3, true).await; // u3 is reserved
    until("u3's alarm", WITHIN, || async {
        door_alarms(&s, seq).await == ["u3"]
    })
    .await;

    s.t.restart().await;
    // u5's door opening after the restart proves the new controller has read the board
    // (the snapshot with u3's door open comes first on the same channel).
    set_input(&s, DOORS, 5, true).await;
    until(
        "u5's alarm after the restart",
        Duration::from_secs(15),
        || async { door_alarms(&s, seq).await.len() >= 2 },
    )
    .await;
    assert_eq!(
        door_alarms(&s, seq).await,
        ["u3", "u5"],
        "u3's open door reported again"
    );

    // Closed, then opened again: a new alarm.
    set_input(&s, DOORS, 3, false).await;
    let db = s.t.cfg.store.db_path();
    until("u3's alarm cleared in the replica", WITHIN, || async {
        let c =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("replica");
        let open: i64 = c
            .query_row(
                "SELECT count(*) FROM door_alarms WHERE input = 3",
                [],
                |r| r.get(0),
            )
            .expect("door_alarms");
        open == 0
    })
    .await;
    set_input(&s, DOORS, 3, true).await;
    until("u3's second alarm", WITHIN, || async {
        door_alarms(&s, seq).await == ["u3", "u5", "u3"]
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_gatelocked_unit_keeps_the_gate_shut_but_not_the_unit() {
    // Two wrong codes would lock the keypad: a gatelocked tenant's code is not a wrong one.
    let s = site(|cfg| cfg.access.lockout_attempts = 2).await;
    const OVERLOCK_COIL: u16 = 6;
    s.bind(
        "u1",
        json!({"kind": "relay", "board": DOORS, "coil": OVERLOCK_COIL}),
    )
    .await;
    let coil = || async { s.coils(DOORS).await[usize::from(OVERLOCK_COIL)] };
    until("u1's overlock released", WITHIN, || async {
        !coil().await && s.device(DOORS).await["queue_depth"] == 0
    })
    .await;
    let mut seen = s.sim.registry.bus.subscribe();
    let mut seq = s.t.last_seq().await;

    let a =
        s.t.patch("/v1/units/u1", json!({"unit": {"gatelock": true}}))
            .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["gatelock"], true);
    assert_eq!(a.body["unit"]["status"], "occupied");
    assert_eq!(s.device(DOORS).await["queue_depth"], 0, "nothing queued");
    for _ in 0..2 {
        let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
        assert_denied(&e, "gatelocked");
        assert_eq!(e["data"]["contact_id"], "c2", "{e}");
        assert_eq!(e["data"]["units"], json!(["u1"]), "{e}");
        assert!(e["data"].get("lockout_s").is_none(), "{e}");
        assert_eq!(k["text"], "Please see office");
        assert_eq!(k["led"], "red");
    }
    assert!(!coil().await, "the overlock stays off");
    assert_eq!(s.coils(GATES).await, [false, false], "no gate moved");

    // Another occupied unit behind the gate opens it, for that unit only.
    s.ok(
        "/v1/units/u5/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    let (e, _) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    assert_eq!(e["data"]["units"], json!(["u5"]), "{e}");

    // Gatelock lifted: u1 counts again (and the keypad was never locked out).
    let a =
        s.t.patch("/v1/units/u1", json!({"unit": {"gatelock": false}}))
            .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(s.device(DOORS).await["queue_depth"], 0, "nothing queued");
    let (e, k) = enter(&s, &mut seq, MAIN, "2222#").await;
    assert_eq!(e["type"], "access.granted", "{e}");
    assert_eq!(e["data"]["units"], json!(["u1", "u5"]), "{e}");
    assert_eq!(k["text"], "Welcome");

    // The board's queue is ordered: once an overlock lands, anything the gatelock changes
    // had queued would have landed before it. The overlock is the only coil change.
    s.ok("/v1/contacts/c2/overlock", json!({})).await;
    until("u1 overlocked", WITHIN, || async { coil().await }).await;
    let mut changes = Vec::new();
    while let Ok(o) = seen.try_recv() {
        if o.device == DOORS && o.kind == "coil_changed" {
            changes.push((o.data["coil"].as_u64(), o.data["on"].as_bool()));
        }
    }
    assert_eq!(changes, [(Some(u64::from(OVERLOCK_COIL)), Some(true))]);
    s.stop().await;
}
