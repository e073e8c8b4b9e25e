//! The control API itself: bad input gets a clear JSON error and the simulator keeps
//! running; faults list, expire and clear; the event stream is live from its first line
//! and its timestamps measure latency.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use hw_sim::observe::monotonic_ns;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn site() -> Sim {
    let site = SiteFile::parse(
        r#"
        [[devices.relay_boards]]
        id = "relay-1"
        transport = "tcp"
        address = "127.0.0.1:0"
        coils = 4
        inputs = 4
        "#,
    )
    .expect("site");
    Sim::start(&site, Some("127.0.0.1:0"))
        .await
        .expect("sim starts")
}

async fn call(sim: &Sim, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut rb = reqwest::Client::new().request(method, format!("{}{path}", sim.control_url()));
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let res = rb.send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    use reqwest::Method;
    let sim = site().await;
    let cases: &[(Method, &str, Option<&str>, u16, &str)] = &[
        (Method::GET, "/relays/nope", None, 404, "not_found"),
        (Method::GET, "/keypads/relay-1", None, 404, "not_found"),
        (
            Method::POST,
            "/relays/nope/inputs/0",
            Some(r#"{"on": true}"#),
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/relays/relay-1/inputs/99",
            Some(r#"{"on": true}"#),
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/relays/relay-1/inputs/x",
            Some(r#"{"on": true}"#),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/relays/relay-1/inputs/0",
            Some(r#"{"on": "yes"}"#),
            400,
            "bad_json",
        ),
        (
            Method::POST,
            "/relays/relay-1/inputs/0",
            Some("{not json"),
            400,
            "bad_json",
        ),
        (
            Method::POST,
            "/relays/relay-1/inputs/0",
            Some(r#"{"on": true, "x": 1}"#),
            400,
            "bad_json",
        ),
        (
            Method::POST,
            "/faults",
            Some(r#"{"device": "ghost", "kind": "offline", "duration_ms": 10}"#),
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/faults",
            Some(r#"{"device": "relay-1", "kind": "meltdown", "duration_ms": 10}"#),
            400,
            "bad_json",
        ),
        (
            Method::POST,
            "/faults",
            Some(r#"{"device": "relay-1", "kind": "delay", "duration_ms": 0}"#),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/faults",
            Some(r#"{"device": "relay-1", "kind": "drop", "value": -1, "duration_ms": 10}"#),
            400,
            "bad_request",
        ),
        (
            Method::DELETE,
            "/faults?device=ghost",
            None,
            404,
            "not_found",
        ),
        (Method::GET, "/locks", None, 404, "not_found"),
        (Method::GET, "/no/such/route", None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let (s, b) = call(&sim, method.clone(), path, *body).await;
        assert_eq!(s, *status, "{method} {path} {body:?}: {b}");
        assert_eq!(b["error"]["code"], *code, "{method} {path}: {b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{b}"
        );
    }
    let (s, state) = call(&sim, Method::GET, "/relays/relay-1", None).await;
    assert_eq!(s, 200);
    assert_eq!(
        state,
        json!({"coils": [false, false, false, false], "inputs": [false, false, false, false]})
    );
    let (_, faults) = call(&sim, Method::GET, "/faults", None).await;
    assert_eq!(faults, json!([]));
    sim.stop().await;
}

#[tokio::test]
async fn faults_are_listed_expire_and_clear() {
    use reqwest::Method;
    let sim = site().await;
    let set = r#"{"device": "relay-1", "kind": "delay", "value": 50, "duration_ms": 300}"#;
    let set_at = Instant::now();
    let (s, b) = call(&sim, Method::POST, "/faults", Some(set)).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["faults"][0]["kind"], "delay");
    let (_, devices) = call(&sim, Method::GET, "/devices", None).await;
    assert_eq!(devices[0]["faults"][0]["value"], 50.0);
    // It expires on its own.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, faults) = call(&sim, Method::GET, "/faults", None).await;
        if faults == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "fault never expired: {faults}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(set_at.elapsed() >= Duration::from_millis(300));
    // And can be cleared early.
    let long = r#"{"device": "relay-1", "kind": "offline", "duration_ms": 60000}"#;
    assert_eq!(call(&sim, Method::POST, "/faults", Some(long)).await.0, 201);
    let (s, b) = call(&sim, Method::DELETE, "/faults?device=relay-1", None).await;
    assert_eq!((s, b), (200, json!({"cleared": 1})));
    assert_eq!(call(&sim, Method::GET, "/faults", None).await.1, json!([]));
    sim.stop().await;
}

#[tokio::test]
async fn event_stream_is_live_from_its_first_line_and_measures_latency() {
    let sim = site().await;
    let mut res = reqwest::Client::new()
        .get(format!("{}/events?device=relay-1", sim.control_url()))
        .send()
        .await
        .expect("events");
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let mut buf = Vec::new();
    let mut lines: Vec<Value> = Vec::new();
    let mut next_line = async |lines: &mut Vec<Value>| loop {
        if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            lines.push(serde_json::from_slice(&line).expect("NDJSON line"));
            return;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), res.chunk())
            .await
            .expect("a line within 5 s")
            .expect("stream")
            .expect("stream open");
        buf.extend_from_slice(&chunk);
    };
    next_line(&mut lines).await;
    assert_eq!(lines[0]["kind"], "subscribed");
    let before = monotonic_ns();
    let (s, _) = call(
        &sim,
        reqwest::Method::POST,
        "/relays/relay-1/inputs/2",
        Some(r#"{"on": true}"#),
    )
    .await;
    assert_eq!(s, 200);
    let after = monotonic_ns();
    next_line(&mut lines).await;
    let o = &lines[1];
    assert_eq!(
        (o["device"].as_str(), o["kind"].as_str()),
        (Some("relay-1"), Some("input_changed"))
    );
    assert_eq!(o["data"], json!({"input": 2, "on": true}));
    let t = o["t_ns"].as_u64().expect("t_ns");
    assert!(
        before <= t && t <= after,
        "observation stamped {t}, request between {before} and {after}"
    );
    assert!(t >= lines[0]["t_ns"].as_u64().unwrap(), "monotonic");
    sim.stop().await;
}
