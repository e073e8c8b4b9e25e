//! The automations of DESIGN.md §2 with a controllable clock: auto move-in at
//! `auto_occupy_at` site-local time (two zones, both DST transitions, a time in the skipped
//! and in the repeated hour), catch-up after downtime, never twice (across restarts, and
//! when the same transition is run concurrently), auto deallocate after the end date, each
//! switched off, and auto overlock on `payment.failed`.

mod common;

use common::TestGateway;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;
use unitgate::command::automation::{AutomationResult, Due};
use unitgate::command::{Command, Envelope};
use unitgate::domain::desired::Target;
use unitgate::model::AllocationView;
use unitgate::store::{outbox, people};

/// A gateway in `tz` whose move-in time is `at`, clock at 2026-03-01T12:00Z (so tenancies
/// starting from 2 March can be reserved), seeded with 3 units, `extra` applied to the config.
async fn gateway(
    tz: &str,
    at: &str,
    extra: impl FnOnce(&mut unitgate::config::Config),
) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = common::test_config(dir.path());
    cfg.site.timezone = tz.into();
    cfg.site.auto_occupy_at = at.into();
    extra(&mut cfg);
    cfg.validate().expect("valid config");
    let t = TestGateway::start_with(dir, cfg, common::TestClock::at("2026-03-01T12:00:00Z")).await;
    t.seed(3).await;
    t
}

async fn tenancy(t: &TestGateway, id: &str, contact: &str, start: &str, end: Option<&str>) {
    let a = t
        .put(
            &format!("/v1/tenancies/{id}"),
            json!({"contact_id": contact, "start_date": start, "end_date": end}),
        )
        .await;
    assert!(a.status == 200 || a.status == 201, "{:?}", a.body);
}

async fn op(t: &TestGateway, unit: &str, op: &str, tenancy: &str) {
    let a = t
        .post(
            &format!("/v1/units/{unit}/{op}"),
            json!({"tenancy_id": tenancy}),
        )
        .await;
    assert_eq!(a.status, 200, "{op} {unit}: {:?}", a.body);
}

/// Binds a unit's lock to coil `n` of the (declared, not driven) relay board `relay-1`.
async fn bind_coil(t: &TestGateway, unit: &str, n: u16) {
    let a = t
        .patch(
            &format!("/v1/units/{unit}"),
            json!({"unit": {"lock": {"kind": "relay", "board": "relay-1", "coil": n}}}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

/// The overlock coil `n` of `relay-1` as the outbox wants it.
async fn coil_on(t: &TestGateway, n: u16) -> bool {
    let store = t.gw.as_ref().expect("running").executor.store().clone();
    let targets = store
        .read(|c| outbox::targets(c, "relay-1"))
        .await
        .expect("targets");
    targets
        .into_iter()
        .find_map(|(d, _)| match d {
            Target::Coil { coil, on, .. } if coil == n => Some(on),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no desired state for coil {n}"))
}

async fn allocation(t: &TestGateway, unit: &str) -> Option<AllocationView> {
    let store = t.gw.as_ref().expect("running").executor.store().clone();
    let unit = unit.to_owned();
    store
        .read(move |c| people::active_allocation(c, &unit))
        .await
        .expect("allocation")
}

/// Every event, checking that `seq` runs 1, 2, 3, ... without a gap.
async fn all_events(t: &TestGateway) -> Vec<Value> {
    let events = t.events_after(0).await;
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let want: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, want, "seq is gapless");
    events
}

/// `(type, unit_id)` of the events after `seq`.
async fn kinds_after(t: &TestGateway, seq: i64) -> Vec<(String, String)> {
    t.events_after(seq)
        .await
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["data"]["unit_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pair(kind: &str, unit: &str) -> (String, String) {
    (kind.to_owned(), unit.to_owned())
}

/// Polls until `status` or the deadline.
async fn wait_for_status(t: &TestGateway, unit: &str, status: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if t.status_of(unit).await == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{unit} never became {status} (is {})",
            t.status_of(unit).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A move-in case: in `tz` with `auto_occupy_at = at`, a unit reserved for a tenancy that
/// starts on `start` is still reserved at `before` and occupied at `due` (one second later),
/// with exactly one `unit.occupied` event by `automation` and the overlock coil released.
async fn assert_moves_in(tz: &str, at: &str, start: &str, before: &str, due: &str) {
    let t = gateway(tz, at, |_| {}).await;
    tenancy(&t, "t-move", "c1", start, None).await;
    bind_coil(&t, "u1", 3).await;
    op(&t, "u1", "reserve", "t-move").await;
    assert!(coil_on(&t, 3).await, "a reserved unit keeps its overlock");
    let seq = t.last_seq().await;

    t.automations_at(before).await;
    assert_eq!(
        t.status_of("u1").await,
        "reserved",
        "{tz} {at}: at {before}"
    );
    assert_eq!(kinds_after(&t, seq).await, [], "{tz} {at}: at {before}");

    t.automations_at(due).await;
    assert_eq!(t.status_of("u1").await, "occupied", "{tz} {at}: at {due}");
    let events = t.events_after(seq).await;
    assert_eq!(events.len(), 1, "{tz} {at}: {events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "unit.occupied");
    assert_eq!(e["occurred_at"], due.replace("Z", ".000Z"));
    assert_eq!(
        e["data"],
        json!({"unit_id": "u1", "from": "reserved", "to": "occupied", "tenancy_id": "t-move",
               "contact_id": "c1", "by": "automation",
               "allocation_id": e["data"]["allocation_id"]})
    );
    let a = allocation(&t, "u1").await.expect("active allocation");
    assert_eq!(a.tenancy_id, "t-move");
    assert_eq!(a.granted_access_by.as_deref(), Some("automation"));
    assert!(
        !coil_on(&t, 3).await,
        "the occupied unit's overlock is released"
    );
    all_events(&t).await;
    t.stop().await;
}

// ---- move-in at 06:00 local, two zones (and Sydney, a UTC day earlier) --------------------

#[tokio::test]
async fn moves_in_at_six_local_in_london_winter_and_summer() {
    assert_moves_in(
        "Europe/London",
        "06:00",
        "2026-03-20",
        "2026-03-20T05:59:59Z",
        "2026-03-20T06:00:00Z",
    )
    .await;
    assert_moves_in(
        "Europe/London",
        "06:00",
        "2026-07-01",
        "2026-07-01T04:59:59Z",
        "2026-07-01T05:00:00Z",
    )
    .await;
}

#[tokio::test]
async fn moves_in_at_six_local_in_new_york_and_sydney() {
    assert_moves_in(
        "America/New_York",
        "06:00",
        "2026-03-20",
        "2026-03-20T09:59:59Z",
        "2026-03-20T10:00:00Z",
    )
    .await;
    // 06:00 AEDT on the 20th is 19:00Z on the 19th.
    assert_moves_in(
        "Australia/Sydney",
        "06:00",
        "2026-03-20",
        "2026-03-19T18:59:59Z",
        "2026-03-19T19:00:00Z",
    )
    .await;
}

#[tokio::test]
async fn moves_in_at_six_local_on_the_days_the_clocks_change() {
    // London: forward on 29 March (06:00 BST = 05:00Z), back on 25 October (06:00 GMT).
    assert_moves_in(
        "Europe/London",
        "06:00",
        "2026-03-29",
        "2026-03-29T04:59:59Z",
        "2026-03-29T05:00:00Z",
    )
    .await;
    assert_moves_in(
        "Europe/London",
        "06:00",
        "2026-10-25",
        "2026-10-25T05:59:59Z",
        "2026-10-25T06:00:00Z",
    )
    .await;
    // New York: forward on 8 March (06:00 EDT = 10:00Z), back on 1 November (06:00 EST = 11:00Z).
    assert_moves_in(
        "America/New_York",
        "06:00",
        "2026-03-08",
        "2026-03-08T09:59:59Z",
        "2026-03-08T10:00:00Z",
    )
    .await;
    assert_moves_in(
        "America/New_York",
        "06:00",
        "2026-11-01",
        "2026-11-01T10:59:59Z",
        "2026-11-01T11:00:00Z",
    )
    .await;
}

#[tokio::test]
async fn a_move_in_time_in_the_skipped_hour_runs_at_the_first_valid_instant() {
    // London skips 01:00-02:00 on 29 March: 01:30 never happens; the first instant after
    // it is the change itself, 01:00Z (02:00 BST).
    assert_moves_in(
        "Europe/London",
        "01:30",
        "2026-03-29",
        "2026-03-29T00:59:59Z",
        "2026-03-29T01:00:00Z",
    )
    .await;
    // New York skips 02:00-03:00 on 8 March: 02:30 runs at 07:00Z (03:00 EDT).
    assert_moves_in(
        "America/New_York",
        "02:30",
        "2026-03-08",
        "2026-03-08T06:59:59Z",
        "2026-03-08T07:00:00Z",
    )
    .await;
}

/// In the repeated hour the move-in runs at the first 01:30 and not again at the second.
async fn assert_once_in_repeated_hour(
    tz: &str,
    start: &str,
    before: &str,
    first: &str,
    second: &str,
) {
    let mut t = gateway(tz, "01:30", |_| {}).await;
    tenancy(&t, "t-move", "c1", start, None).await;
    op(&t, "u1", "reserve", "t-move").await;
    let seq = t.last_seq().await;
    t.automations_at(before).await;
    assert_eq!(t.status_of("u1").await, "reserved", "{tz} at {before}");
    t.automations_at(first).await;
    assert_eq!(t.status_of("u1").await, "occupied", "{tz} at {first}");
    let after_first = t.events_after(seq).await;
    assert_eq!(after_first.len(), 1, "{after_first:?}");
    assert_eq!(after_first[0]["type"], "unit.occupied");
    assert_eq!(after_first[0]["occurred_at"], first.replace("Z", ".000Z"));

    // The second 01:30, in the running gateway and after a restart.
    t.automations_at(second).await;
    t.restart().await;
    t.automations_at(second).await;
    assert_eq!(t.events_after(seq).await, after_first, "{tz}: once only");
    assert_eq!(t.status_of("u1").await, "occupied");
    all_events(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn a_move_in_time_in_the_repeated_hour_runs_once_at_its_first_occurrence() {
    // London repeats 01:00-02:00 on 25 October: 01:30 BST = 00:30Z, then 01:30 GMT = 01:30Z.
    assert_once_in_repeated_hour(
        "Europe/London",
        "2026-10-25",
        "2026-10-25T00:29:59Z",
        "2026-10-25T00:30:00Z",
        "2026-10-25T01:30:00Z",
    )
    .await;
    // New York repeats 01:00-02:00 on 1 November: 01:30 EDT = 05:30Z, then 01:30 EST = 06:30Z.
    assert_once_in_repeated_hour(
        "America/New_York",
        "2026-11-01",
        "2026-11-01T05:29:59Z",
        "2026-11-01T05:30:00Z",
        "2026-11-01T06:30:00Z",
    )
    .await;
}

// ---- catch-up and restarts ------------------------------------------------------------

#[tokio::test]
async fn a_gateway_down_over_six_catches_up_on_start_once() {
    let mut t = gateway("Europe/London", "06:00", |_| {}).await;
    bind_coil(&t, "u1", 5).await;
    op(&t, "u1", "reserve", "t-future").await;
    op(&t, "u2", "reserve", "t-other").await;
    t.automations_at("2026-03-20T05:30:00Z").await;
    assert_eq!(t.status_of("u1").await, "reserved");
    let seq = t.last_seq().await;

    // Down from 05:30 to 09:00 on the start date: nobody kicks the new gateway.
    t.gw.take().expect("running").stop().await;
    t.clock.set("2026-03-20T09:00:00Z");
    t.restart().await;
    wait_for_status(&t, "u1", "occupied").await;
    let caught_up = t.events_after(seq).await;
    assert_eq!(
        kinds_after(&t, seq).await,
        [pair("unit.occupied", "u1")],
        "{caught_up:?}"
    );
    assert_eq!(caught_up[0]["data"]["by"], "automation");
    assert_eq!(caught_up[0]["occurred_at"], "2026-03-20T09:00:00.000Z");
    assert!(!coil_on(&t, 5).await);
    // t-other starts on 1 April: still reserved.
    assert_eq!(t.status_of("u2").await, "reserved");

    // Restarted again, later the same day and the next: nothing more.
    for now in ["2026-03-20T10:00:00Z", "2026-03-21T07:00:00Z"] {
        t.restart().await;
        t.automations_at(now).await;
        assert_eq!(t.events_after(seq).await, caught_up, "restart at {now}");
    }
    assert_eq!(t.status_of("u1").await, "occupied");
    assert_eq!(t.status_of("u2").await, "reserved");
    all_events(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn the_same_transition_run_twice_at_once_changes_the_unit_once() {
    let t = gateway("Europe/London", "06:00", |_| {}).await;
    op(&t, "u1", "reserve", "t-future").await;
    let seq = t.last_seq().await;
    // Past 06:00 on the start date, but the scheduler has not been asked to look yet.
    t.clock.set("2026-03-20T06:00:00Z");
    let ex = t.gw.as_ref().expect("running").executor.clone();
    let run = |ex: unitgate::command::Executor, command: Command| async move {
        let reply = ex
            .execute(Envelope {
                command,
                idempotency_key: None,
                fingerprint: [0; 32],
                if_match: None,
                request_id: "test".into(),
            })
            .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        serde_json::from_slice::<AutomationResult>(&reply.body).expect("result")
    };
    let due = Due {
        unit_id: "u1".into(),
        tenancy_id: "t-future".into(),
    };
    let (a, b) = tokio::join!(
        run(ex.clone(), Command::AutoMoveIn(due.clone())),
        run(ex.clone(), Command::AutoMoveIn(due.clone())),
    );
    assert_eq!(
        [a.applied, b.applied].iter().filter(|x| **x).count(),
        1,
        "{a:?} {b:?}"
    );
    // Neither a move-in for another tenancy nor a deallocate of a running tenancy applies.
    let other = Due {
        unit_id: "u1".into(),
        tenancy_id: "t-other".into(),
    };
    assert!(!run(ex.clone(), Command::AutoMoveIn(other)).await.applied);
    assert!(!run(ex.clone(), Command::AutoDeallocate(due)).await.applied);
    t.automations_at("2026-03-20T06:00:01Z").await;
    assert_eq!(kinds_after(&t, seq).await, [pair("unit.occupied", "u1")]);
    all_events(&t).await;
    t.stop().await;
}

// ---- auto deallocate --------------------------------------------------------------------

#[tokio::test]
async fn units_are_deallocated_once_the_end_date_has_passed() {
    let mut t = gateway("Europe/London", "06:00", |_| {}).await;
    // c2's running tenancy ends on 15 March.
    tenancy(&t, "t-started", "c2", "2026-03-01", Some("2026-03-15")).await;
    bind_coil(&t, "u1", 6).await;
    op(&t, "u1", "grant_access", "t-started").await;
    op(&t, "u2", "grant_access", "t-started").await;
    op(&t, "u3", "reserve", "t-other").await;
    assert!(!coil_on(&t, 6).await);
    let seq = t.last_seq().await;

    // The end date itself is the tenancy's last day.
    t.automations_at("2026-03-15T23:59:59Z").await;
    for u in ["u1", "u2"] {
        assert_eq!(t.status_of(u).await, "occupied", "{u} on the end date");
    }
    assert_eq!(kinds_after(&t, seq).await, []);

    t.automations_at("2026-03-16T00:00:00Z").await;
    for u in ["u1", "u2"] {
        assert_eq!(t.status_of(u).await, "available", "{u} after the end date");
        assert_eq!(allocation(&t, u).await, None);
    }
    assert_eq!(t.status_of("u3").await, "reserved", "another tenancy");
    let events = t.events_after(seq).await;
    assert_eq!(
        kinds_after(&t, seq).await,
        [
            pair("unit.deallocated", "u1"),
            pair("unit.available", "u1"),
            pair("unit.deallocated", "u2"),
            pair("unit.available", "u2"),
        ]
    );
    for e in &events {
        assert_eq!(e["data"]["by"], "automation", "{e}");
        assert_eq!(e["data"]["tenancy_id"], "t-started", "{e}");
        assert_eq!(e["occurred_at"], "2026-03-16T00:00:00.000Z");
    }
    assert!(coil_on(&t, 6).await, "a free unit is overlocked again");

    t.restart().await;
    t.automations_at("2026-03-17T00:00:00Z").await;
    assert_eq!(
        t.events_after(seq).await,
        events,
        "not again after a restart"
    );
    all_events(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn a_commit_that_makes_a_transition_due_wakes_the_scheduler() {
    let t = gateway("Europe/London", "06:00", |_| {}).await;
    op(&t, "u1", "grant_access", "t-started").await;
    t.automations_at("2026-03-10T12:00:00Z").await;
    let seq = t.last_seq().await;
    // The cloud records a move-out date that has already passed: no kick, no clock change;
    // the scheduler (asleep for up to a minute) is woken by the commit.
    tenancy(&t, "t-started", "c2", "2026-03-01", Some("2026-03-08")).await;
    wait_for_status(&t, "u1", "available").await;
    assert_eq!(
        kinds_after(&t, seq).await,
        [pair("unit.deallocated", "u1"), pair("unit.available", "u1")]
    );
    t.stop().await;
}

#[tokio::test]
async fn a_reservation_whose_tenancy_ended_unmoved_is_freed_not_moved_in() {
    let t = gateway("Europe/London", "06:00", |_| {}).await;
    op(&t, "u1", "reserve", "t-future").await;
    // The move-out date moves before anything ran: start 20 March, end 21 March.
    tenancy(&t, "t-future", "c1", "2026-03-20", Some("2026-03-21")).await;
    let seq = t.last_seq().await;
    // The gateway was not asked to look until the 23rd (e.g. the clock was wrong).
    t.automations_at("2026-03-23T12:00:00Z").await;
    assert_eq!(t.status_of("u1").await, "available");
    assert_eq!(
        kinds_after(&t, seq).await,
        [pair("unit.deallocated", "u1"), pair("unit.available", "u1")]
    );
    t.stop().await;
}

// ---- switched off -------------------------------------------------------------------------

#[tokio::test]
async fn automations_switched_off_change_nothing() {
    let mut t = gateway("Europe/London", "06:00", |c| {
        c.site.auto_occupy = false;
        c.site.auto_deallocate = false;
        c.site.auto_overlock = false;
    })
    .await;
    tenancy(&t, "t-started", "c2", "2026-03-01", Some("2026-03-15")).await;
    op(&t, "u1", "reserve", "t-future").await;
    op(&t, "u2", "grant_access", "t-started").await;
    let seq = t.last_seq().await;

    t.automations_at("2026-03-25T12:00:00Z").await;
    t.restart().await;
    t.automations_at("2026-03-26T12:00:00Z").await;
    assert_eq!(t.status_of("u1").await, "reserved");
    assert_eq!(t.status_of("u2").await, "occupied");

    let a = t
        .post(
            "/v1/contacts/c2/payment_failed",
            json!({"event_id": "evt_1"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"overlocked": false, "reason": "auto_overlock is off", "event_id": "evt_1", "units": []})
    );
    assert_eq!(t.status_of("u2").await, "occupied");
    assert_eq!(kinds_after(&t, seq).await, []);
    t.stop().await;
}

#[tokio::test]
async fn each_automation_switches_off_alone() {
    // Move-in off, deallocate on.
    let t = gateway("Europe/London", "06:00", |c| c.site.auto_occupy = false).await;
    tenancy(&t, "t-started", "c2", "2026-03-01", Some("2026-03-15")).await;
    op(&t, "u1", "reserve", "t-future").await;
    op(&t, "u2", "grant_access", "t-started").await;
    t.automations_at("2026-03-20T12:00:00Z").await;
    assert_eq!(t.status_of("u1").await, "reserved");
    assert_eq!(t.status_of("u2").await, "available");
    t.stop().await;

    // Deallocate off, move-in on.
    let t = gateway("Europe/London", "06:00", |c| c.site.auto_deallocate = false).await;
    tenancy(&t, "t-started", "c2", "2026-03-01", Some("2026-03-15")).await;
    op(&t, "u1", "reserve", "t-future").await;
    op(&t, "u2", "grant_access", "t-started").await;
    t.automations_at("2026-03-20T12:00:00Z").await;
    assert_eq!(t.status_of("u1").await, "occupied");
    assert_eq!(t.status_of("u2").await, "occupied");
    t.stop().await;
}

// ---- auto overlock on payment.failed ------------------------------------------------------

#[tokio::test]
async fn payment_failed_overlocks_the_contacts_occupied_units_when_on() {
    let t = gateway("Europe/London", "06:00", |c| c.site.auto_overlock = true).await;
    bind_coil(&t, "u2", 7).await;
    op(&t, "u1", "grant_access", "t-started").await;
    op(&t, "u2", "grant_access", "t-started").await;
    op(&t, "u3", "reserve", "t-future").await;
    assert!(!coil_on(&t, 7).await);
    let seq = t.last_seq().await;

    let a = t
        .call(
            reqwest::Method::POST,
            "/v1/contacts/c2/payment_failed",
            Some(common::ALLOCATOR),
            Some(&json!({"event_id": "evt_42"})),
            &[("Idempotency-Key", "pf-1")],
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["overlocked"], true);
    assert_eq!(a.body["reason"], Value::Null);
    assert_eq!(a.body["event_id"], "evt_42");
    let ids: Vec<&str> = a.body["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["u1", "u2"]);
    for u in ["u1", "u2"] {
        assert_eq!(t.status_of(u).await, "overlocked");
    }
    assert_eq!(
        t.status_of("u3").await,
        "reserved",
        "another contact's unit"
    );
    assert!(coil_on(&t, 7).await, "the overlock relay is energised");
    let events = t.events_after(seq).await;
    assert_eq!(
        kinds_after(&t, seq).await,
        [pair("unit.overlocked", "u1"), pair("unit.overlocked", "u2")]
    );
    for e in &events {
        assert_eq!(e["data"]["by"], "automation");
        assert_eq!(e["data"]["contact_id"], "c2");
        assert_eq!(e["data"]["from"], "occupied");
    }

    // The same request again: the stored answer, nothing changes.
    let again = t
        .call(
            reqwest::Method::POST,
            "/v1/contacts/c2/payment_failed",
            Some(common::ALLOCATOR),
            Some(&json!({"event_id": "evt_42"})),
            &[("Idempotency-Key", "pf-1")],
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(again.body, a.body);

    // A second failure finds no occupied unit: nothing to do, not an error.
    let a = t.post("/v1/contacts/c2/payment_failed", json!({})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        a.body,
        json!({"overlocked": false, "reason": "the contact has no occupied units", "event_id": null, "units": []})
    );
    assert_eq!(t.events_after(seq).await, events);

    // Unknown contact; a reader may not do it.
    assert_eq!(
        t.post("/v1/contacts/nobody/payment_failed", json!({}))
            .await
            .status,
        404
    );
    let a = t
        .call(
            reqwest::Method::POST,
            "/v1/contacts/c2/payment_failed",
            Some(common::READER),
            Some(&json!({})),
            &[],
        )
        .await;
    assert_eq!(a.status, 403);
    all_events(&t).await;
    t.stop().await;
}

#[tokio::test]
async fn a_store_read_of_the_site_settings_matches_the_config() {
    // The commands read the settings from the site row the config wrote at start.
    let t = gateway("America/New_York", "07:15", |c| {
        c.site.auto_deallocate = false;
        c.site.auto_overlock = true;
    })
    .await;
    let store = t.gw.as_ref().expect("running").executor.store().clone();
    let a = store
        .read(unitgate::store::site::automations)
        .await
        .expect("settings");
    assert!(a.auto_occupy && !a.auto_deallocate && a.auto_overlock);
    assert_eq!(a.auto_occupy_at.to_string(), "07:15:00");
    t.stop().await;
}
