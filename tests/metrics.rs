//! `GET /metrics`: Prometheus / OpenMetrics text behind a `read` token. A fresh gateway
//! shows every metric at zero; on a simulated site (hw-sim keypad over a pty with the
//! secure channel, Modbus TCP boards) the counters move by exactly the commands and PINs
//! given, a board taken offline in hw-sim shows `device_up 0` and its queue grows. The
//! optional plain listener (`[metrics] listen`) serves the same text without a token.

mod common;

use common::site::{SimSite, keypad, tcp_board, until};
use common::{ADMIN, READER, TestGateway};
use reqwest::Method;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const GATE: &str = "gate-1";
const GATES: &str = "gate-relays";
const DOORS: &str = "doors";
const WITHIN: Duration = Duration::from_secs(5);

/// One sample per series: `name{k="v",...}` (labels sorted) to its value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let key = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, labels)) => {
                let mut pairs: Vec<&str> = labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .collect();
                pairs.sort();
                format!("{name}{{{}}}", pairs.join(","))
            }
        };
        out.insert(key, value);
    }
    out
}

/// The key of a series as [`parse`] writes it.
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    pairs.sort();
    if pairs.is_empty() {
        return name.to_owned();
    }
    format!("{name}{{{}}}", pairs.join(","))
}

async fn scrape(t: &TestGateway) -> BTreeMap<String, f64> {
    let a = t
        .call(Method::GET, "/metrics", Some(READER), None, &[])
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let ct = a.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "content type {ct}"
    );
    let text = String::from_utf8(a.raw).expect("UTF-8");
    assert!(text.ends_with("# EOF\n"), "{text}");
    parse(&text)
}

fn value(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let k = key(name, labels);
    *m.get(&k)
        .unwrap_or_else(|| panic!("{k} missing from {:#?}", m.keys().collect::<Vec<_>>()))
}

fn commands(m: &BTreeMap<String, f64>, op: &str, outcome: &str) -> f64 {
    value(
        m,
        "unitgate_commands_total",
        &[("op", op), ("outcome", outcome)],
    )
}

#[tokio::test]
async fn a_fresh_gateway_shows_every_metric_at_zero_and_wants_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = common::test_config(dir.path());
    // An MQTT link to a closed port: the link metrics are there, disconnected.
    cfg.cloud.mqtt = Some(
        serde_json::from_value(json!({"url": "mqtt://127.0.0.1:1", "protocol": "v3.1.1"}))
            .expect("mqtt config"),
    );
    cfg.metrics.listen = "127.0.0.1:0".into();
    let t = TestGateway::start_with(dir, cfg, common::TestClock::at("2026-03-10T12:00:00Z")).await;

    // The plain listener: the same text without a token, and nothing else.
    let plain =
        t.gw.as_ref()
            .and_then(|g| g.metrics_addr)
            .expect("metrics listener");
    let res = t
        .client
        .get(format!("http://{plain}/metrics"))
        .send()
        .await
        .expect("plain scrape");
    assert_eq!(res.status().as_u16(), 200);
    let text = res.text().await.expect("text");
    assert!(text.contains("unitgate_commands_total{"), "{text}");
    let res = t
        .client
        .get(format!("http://{plain}/v1/units"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("other path");
    assert_eq!(res.status().as_u16(), 404);

    let a = t.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(a.status, 401, "{:?}", a.body);
    let a = t
        .call(Method::GET, "/metrics", Some("wrong"), None, &[])
        .await;
    assert_eq!(a.status, 401, "{:?}", a.body);

    let m = scrape(&t).await;
    for op in unitgate::metrics::OPERATIONS {
        for outcome in unitgate::metrics::OUTCOMES {
            assert_eq!(commands(&m, op, outcome), 0.0, "{op} {outcome}");
        }
        let n = value(&m, "unitgate_command_duration_seconds_count", &[("op", op)]);
        assert_eq!(n, 0.0, "{op}");
    }
    for board in ["relay-1", "rb1"] {
        let labels = [("device", board), ("kind", "relay_board")];
        assert_eq!(value(&m, "unitgate_device_up", &labels), 0.0);
        assert_eq!(value(&m, "unitgate_device_queue_depth", &labels), 0.0);
    }
    let lock = [("device", "locks"), ("kind", "lock_api")];
    assert_eq!(value(&m, "unitgate_device_up", &lock), 0.0);
    let mqtt = [("link", "mqtt")];
    assert_eq!(value(&m, "unitgate_link_connected", &mqtt), 0.0);
    assert_eq!(value(&m, "unitgate_uplink_backlog_events", &mqtt), 0.0);
    assert_eq!(
        value(&m, "unitgate_uplink_backlog_oldest_age_seconds", &mqtt),
        0.0
    );
    let started = value(&m, "unitgate_process_start_time_seconds", &[]);
    assert!(started > 1.7e9, "start time {started}");
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(value(&m, "unitgate_build_info", &version), 1.0);
    t.stop().await;
}

fn devices() -> String {
    [
        keypad(GATE, "main-gate", 1, GATES, 0, None, 500),
        tcp_board(GATES, 2, 2, 300, 50),
        tcp_board(DOORS, 8, 8, 200, 50),
    ]
    .concat()
}

async fn press(s: &SimSite, keys: &str) {
    let r = s
        .http
        .post(format!("{}/keypads/{GATE}/keys", s.sim.control_url()))
        .json(&json!({ "keys": keys }))
        .send()
        .await
        .expect("press");
    assert_eq!(r.status().as_u16(), 202, "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_was_done_and_an_offline_board_shows() {
    let s = SimSite::start(&devices(), 30, 4).await;
    s.bind("u2", json!({"kind": "relay", "board": DOORS, "coil": 2}))
        .await;
    until("devices online", Duration::from_secs(10), || async {
        s.device(GATE).await["online"] == true
            && s.device(DOORS).await["online"] == true
            && s.device(DOORS).await["queue_depth"] == 0
    })
    .await;
    let before = scrape(&s.t).await;
    let gate = [("device", GATE), ("kind", "keypad")];
    assert_eq!(value(&before, "unitgate_device_up", &gate), 1.0);
    let doors = [("device", DOORS), ("kind", "relay_board")];
    assert_eq!(value(&before, "unitgate_device_up", &doors), 1.0);

    // The doors board goes silent: its metric says so.
    s.fault(DOORS, "offline", None, 30_000).await;
    until("doors down in /metrics", WITHIN, || async {
        value(&scrape(&s.t).await, "unitgate_device_up", &doors) == 0.0
    })
    .await;

    // Two grants (one for a unit on the silent board), one refused reserve, one replay.
    let grant = json!({"tenancy_id": "t-started"});
    let key = [("Idempotency-Key", "metrics-grant-u1")];
    for _ in 0..2 {
        let a =
            s.t.call(
                Method::POST,
                "/v1/units/u1/grant_access",
                Some(ADMIN),
                Some(&grant),
                &key,
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    s.ok("/v1/units/u2/grant_access", grant.clone()).await;
    let a =
        s.t.post("/v1/units/u1/reserve", json!({"tenancy_id": "t-future"}))
            .await;
    assert_eq!(a.status, 409, "{:?}", a.body);

    // c2 (PIN 2222) occupies u1 behind the main gate; 9999 is nobody's.
    press(&s, "2222#").await;
    press(&s, "9999#").await;
    let decisions = |m: &BTreeMap<String, f64>, reason: &str| {
        value(
            m,
            "unitgate_keypad_decisions_total",
            &[("keypad", GATE), ("reason", reason)],
        )
    };
    until("two keypad decisions", WITHIN, || async {
        let m = scrape(&s.t).await;
        decisions(&m, "granted") + decisions(&m, "invalid_code") == 2.0
    })
    .await;

    let after = scrape(&s.t).await;
    let moved =
        |op: &str, outcome: &str| commands(&after, op, outcome) - commands(&before, op, outcome);
    assert_eq!(moved("grant_access", "ok"), 2.0);
    assert_eq!(moved("grant_access", "replayed"), 1.0);
    assert_eq!(moved("reserve", "rejected"), 1.0);
    assert_eq!(moved("reserve", "ok"), 0.0);
    assert_eq!(moved("deallocate", "ok"), 0.0);
    let count = |m: &BTreeMap<String, f64>| {
        value(
            m,
            "unitgate_command_duration_seconds_count",
            &[("op", "grant_access")],
        )
    };
    assert_eq!(count(&after) - count(&before), 3.0);
    assert_eq!(decisions(&after, "granted"), 1.0);
    assert_eq!(decisions(&after, "invalid_code"), 1.0);
    assert_eq!(decisions(&after, "lockout"), 0.0);
    assert_eq!(value(&after, "unitgate_device_up", &doors), 0.0);
    assert!(
        value(&after, "unitgate_device_queue_depth", &doors) >= 1.0,
        "the grant's coil waits for the silent board"
    );
    assert_eq!(value(&after, "unitgate_device_up", &gate), 1.0);
    s.stop().await;
}
