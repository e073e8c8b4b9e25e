//! The technician page: its assets and security headers, the SSE form of `/events`,
//! `GET /units`, per-device fault clearing, and `[[units]]` validation.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use reqwest::Method;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const SITE: &str = r#"
    [[devices.relay_boards]]
    id = "relay-1"
    transport = "tcp"
    address = "127.0.0.1:0"
    coils = 4
    inputs = 4

    [devices.lock_api]
    url = "http://127.0.0.1:0"
    locks = ["lock-A01"]

    [[units]]
    name = "u-A01"
    lock = "lock-A01"

    [[units]]
    name = "u-B01"
    overlock = { board = "relay-1", coil = 2 }
    door = { board = "relay-1", input = 1 }
"#;

async fn site() -> Sim {
    let site = SiteFile::parse(SITE).expect("site");
    site.validate().expect("valid site");
    Sim::start(&site, Some("127.0.0.1:0"))
        .await
        .expect("sim starts")
}

async fn call(sim: &Sim, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut rb = reqwest::Client::new().request(method, format!("{}{path}", sim.control_url()));
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let res = rb.send().await.expect("request");
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_security_headers() {
    let sim = site().await;
    for (path, ctype, needle) in [
        ("/", "text/html", "<script src=\"/app.js\""),
        ("/app.js", "text/javascript", "EventSource(\"/events\")"),
        ("/style.css", "text/css", "focus-visible"),
    ] {
        let res = reqwest::get(format!("{}{path}", sim.control_url()))
            .await
            .expect("get");
        assert_eq!(res.status(), 200, "{path}");
        let h = |n: &str| {
            res.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            h("content-type").starts_with(ctype),
            "{path}: {}",
            h("content-type")
        );
        assert_eq!(h("content-security-policy"), "default-src 'self'", "{path}");
        assert_eq!(h("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(h("referrer-policy"), "no-referrer", "{path}");
        let body = res.text().await.expect("body");
        assert!(body.contains(needle), "{path} lacks {needle}");
    }
    // CSP forbids inline script and style: the page must carry none.
    let html = reqwest::get(format!("{}/", sim.control_url()))
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert!(!html.contains("<script>") && !html.contains("<style") && !html.contains("style="));
    sim.stop().await;
}

#[tokio::test]
async fn events_are_server_sent_events_when_asked_and_ndjson_otherwise() {
    let sim = site().await;
    let mut res = reqwest::Client::new()
        .get(format!("{}/events?device=relay-1", sim.control_url()))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("events");
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut buf = String::new();
    let mut frames: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pressed = false;
    loop {
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let data = frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data frame: {frame:?}"));
            frames.push(serde_json::from_str(data.trim_end()).expect("JSON data"));
        }
        if frames.iter().any(|f| f["kind"] == "input_changed") {
            break;
        }
        if frames.first().is_some_and(|f| f["kind"] == "subscribed") && !pressed {
            pressed = true;
            let (s, _) = call(
                &sim,
                Method::POST,
                "/relays/relay-1/inputs/1",
                Some(json!({"on": true})),
            )
            .await;
            assert_eq!(s, 200);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, res.chunk())
            .await
            .expect("an observation in time")
            .expect("stream")
            .expect("stream open");
        buf.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    assert_eq!(frames[0]["kind"], "subscribed");
    let seen = frames
        .iter()
        .find(|f| f["kind"] == "input_changed")
        .expect("input_changed");
    assert_eq!(seen["device"], "relay-1");
    // Without the Accept header the stream stays NDJSON.
    let plain = reqwest::get(format!("{}/events", sim.control_url()))
        .await
        .expect("events");
    assert_eq!(
        plain
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    sim.stop().await;
}

fn unit<'a>(units: &'a Value, name: &str) -> &'a Value {
    units
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == name))
        .unwrap_or_else(|| panic!("no unit {name} in {units}"))
}

#[tokio::test]
async fn units_reflect_doors_overlock_coils_and_lock_states() {
    let sim = site().await;
    let (s, units) = call(&sim, Method::GET, "/units", None).await;
    assert_eq!(s, 200);
    assert_eq!(unit(&units, "u-B01")["door_open"], false);
    assert_eq!(unit(&units, "u-B01")["overlock_on"], false);
    assert_eq!(unit(&units, "u-A01")["lock_state"], "unassigned");
    assert_eq!(unit(&units, "u-A01")["door_open"], Value::Null);

    let (s, _) = call(
        &sim,
        Method::POST,
        "/relays/relay-1/inputs/1",
        Some(json!({"on": true})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &sim,
        Method::PUT,
        "/locks/lock-A01",
        Some(json!({"state": "overlocked"})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, units) = call(&sim, Method::GET, "/units", None).await;
    assert_eq!(unit(&units, "u-B01")["door_open"], true);
    assert_eq!(unit(&units, "u-A01")["lock_state"], "overlocked");
    sim.stop().await;
}

#[tokio::test]
async fn faults_clear_per_device() {
    let sim = site().await;
    for dev in ["relay-1", "locks"] {
        let (s, _) = call(
            &sim,
            Method::POST,
            "/faults",
            Some(json!({"device": dev, "kind": "offline", "duration_ms": 60_000})),
        )
        .await;
        assert_eq!(s, 201, "{dev}");
    }
    let (s, b) = call(&sim, Method::DELETE, "/faults?device=relay-1", None).await;
    assert_eq!((s, b), (200, json!({"cleared": 1})));
    let (_, left) = call(&sim, Method::GET, "/faults", None).await;
    let devs: Vec<_> = left
        .as_array()
        .expect("list")
        .iter()
        .map(|f| f["device"].clone())
        .collect();
    assert_eq!(devs, [json!("locks")]);
    sim.stop().await;
}

#[test]
fn units_naming_unknown_devices_are_refused_at_load() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("sim.toml");
    let bad = format!(
        "{SITE}\n[[units]]\nname = \"u-X\"\nlock = \"lock-Z99\"\noverlock = {{ board = \"relay-9\", coil = 0 }}\ndoor = {{ board = \"relay-1\", input = 4 }}\n"
    );
    std::fs::write(&path, bad).expect("write");
    let err = SiteFile::load(&path).expect_err("refused").to_string();
    for needle in [
        "units[2].lock: \"lock-Z99\" is not in devices.lock_api.locks",
        "units[2].overlock.board: no relay board \"relay-9\"",
        "units[2].door.input: board \"relay-1\" has 4 inputs",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from {err}");
    }
}
