//! Test harness: the real gateway on 127.0.0.1:0 with a real SQLite file in a temp dir,
//! driven over real HTTP with reqwest.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod site;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use unitgate::api::http::auth::token_hash_hex;
use unitgate::command::Clock;
use unitgate::config::{Config, TokenConfig};
use unitgate::gateway::Gateway;

/// Token with every scope.
pub const ADMIN: &str = "admin-token-0123456789";
/// Token with `read` only.
pub const READER: &str = "reader-token-0123456789";
/// Token with `allocations:write` only.
pub const ALLOCATOR: &str = "allocator-token-0123456789";
/// Token with `units:write` only.
pub const UNITS: &str = "units-token-0123456789";

/// A settable clock.
#[derive(Clone)]
pub struct TestClock(Arc<Mutex<DateTime<Utc>>>);

impl TestClock {
    /// A clock stopped at `rfc3339`.
    pub fn at(rfc3339: &str) -> Self {
        TestClock(Arc::new(Mutex::new(rfc3339.parse().expect("rfc3339"))))
    }
    /// Moves the clock.
    pub fn set(&self, rfc3339: &str) {
        *self.0.lock().unwrap() = rfc3339.parse().expect("rfc3339");
    }
    /// As the gateway's clock.
    pub fn clock(&self) -> Clock {
        let c = self.0.clone();
        Arc::new(move || *c.lock().unwrap())
    }
}

/// The config every test starts from: site in Europe/London, plain HTTP on port 0, and the
/// devices tests bind units to (relay boards `relay-1` and `rb1`, 16 coils and 16 inputs
/// each; a lock API taking any lock id), declared disabled so that no driver runs: their
/// commands only queue.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut cfg = Config::from_toml(
        r#"
        [site]
        id = "site-test"
        name = "Test Site"
        timezone = "Europe/London"
        [api]
        listen = "127.0.0.1:0"
        plain_http = true
        [[devices.relay_boards]]
        id = "relay-1"
        transport = "tcp"
        address = "127.0.0.1:9"
        coils = 16
        inputs = 16
        enabled = false
        [[devices.relay_boards]]
        id = "rb1"
        transport = "tcp"
        address = "127.0.0.1:9"
        coils = 16
        inputs = 16
        enabled = false
        [devices.lock_api]
        url = "http://127.0.0.1:9"
        enabled = false
        "#,
    )
    .expect("test config");
    cfg.store.data_dir = data_dir.to_owned();
    let token = |name: &str, t: &str, scopes: &[&str]| TokenConfig {
        name: name.into(),
        sha256: token_hash_hex(t),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    };
    cfg.api.tokens = vec![
        token("admin", ADMIN, &["admin"]),
        token("reader", READER, &["read"]),
        token("allocator", ALLOCATOR, &["allocations:write"]),
        token("units", UNITS, &["units:write", "read"]),
    ];
    cfg.validate().expect("valid test config");
    cfg
}

/// An answer: status, headers and the JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl Answer {
    /// The error code of an error answer.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// A running gateway with its data directory.
pub struct TestGateway {
    pub gw: Option<Gateway>,
    pub cfg: Config,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub client: reqwest::Client,
    pub clock: TestClock,
}

impl TestGateway {
    /// Starts a gateway whose clock reads `now`.
    pub async fn start_at(now: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = test_config(dir.path());
        Self::start_with(dir, cfg, TestClock::at(now)).await
    }

    /// Starts a gateway at 2026-03-10 12:00 UTC (a Tuesday; London is on GMT).
    pub async fn start() -> Self {
        Self::start_at("2026-03-10T12:00:00Z").await
    }

    /// Starts with a given config and clock.
    pub async fn start_with(dir: tempfile::TempDir, cfg: Config, clock: TestClock) -> Self {
        let gw = Gateway::start(&cfg, clock.clock())
            .await
            .expect("gateway starts");
        let base = format!("http://{}", gw.addr);
        TestGateway {
            gw: Some(gw),
            cfg,
            dir,
            base,
            client: reqwest::Client::new(),
            clock,
        }
    }

    /// Stops the gateway (drains and closes the store) and starts it again on the same files.
    pub async fn restart(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.stop().await;
        }
        let gw = Gateway::start(&self.cfg, self.clock.clock())
            .await
            .expect("gateway restarts");
        self.base = format!("http://{}", gw.addr);
        self.gw = Some(gw);
    }

    /// Stops the gateway.
    pub async fn stop(mut self) {
        if let Some(gw) = self.gw.take() {
            gw.stop().await;
        }
    }

    /// A request with a token, optional JSON body and extra headers.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut rb = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let res = rb.send().await.expect("request sent");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let raw = res.bytes().await.expect("body").to_vec();
        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            body,
            raw,
        }
    }

    /// GET as admin.
    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, Some(ADMIN), None, &[]).await
    }

    /// POST JSON as admin.
    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(ADMIN), Some(&body), &[])
            .await
    }

    /// PUT JSON as admin.
    pub async fn put(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PUT, path, Some(ADMIN), Some(&body), &[])
            .await
    }

    /// PATCH JSON as admin.
    pub async fn patch(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PATCH, path, Some(ADMIN), Some(&body), &[])
            .await
    }

    /// A unit's status.
    pub async fn status_of(&self, unit_id: &str) -> String {
        let a = self.get(&format!("/v1/units/{unit_id}")).await;
        assert_eq!(a.status, 200, "GET unit {unit_id}: {:?}", a.body);
        a.body["unit"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Every event after `seq`.
    pub async fn events_after(&self, seq: i64) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = seq;
        loop {
            let a = self
                .get(&format!("/v1/events?after={after}&limit=1000"))
                .await;
            assert_eq!(a.status, 200, "{:?}", a.body);
            let evs = a.body["events"].as_array().cloned().unwrap_or_default();
            if evs.is_empty() {
                return out;
            }
            after = a.body["next_after"].as_i64().unwrap();
            out.extend(evs);
        }
    }

    /// Sets the clock to `rfc3339` and waits for an automation pass that saw the new time
    /// (the scheduler sleeps by the real clock; a kick makes it look at once).
    pub async fn automations_at(&self, rfc3339: &str) {
        self.clock.set(rfc3339);
        self.gw
            .as_ref()
            .expect("running")
            .automation
            .run_now()
            .await
            .expect("the automation scheduler runs");
    }

    /// The newest event seq.
    pub async fn last_seq(&self) -> i64 {
        self.events_after(0)
            .await
            .last()
            .map_or(0, |e| e["seq"].as_i64().unwrap())
    }

    /// Seeds unit types, units, contacts and tenancies through the API.
    /// Units: `u1`..`u{n}` of type `small` in zone `main-gate`; contacts `c1`..`c3`;
    /// tenancies: `t-future` (c1, starts 2026-03-20), `t-started` (c2, started 2026-03-01),
    /// `t-other` (c3, starts 2026-04-01), `t-ended` (c2, 2026-01-01 .. 2026-03-01).
    pub async fn seed(&self, n: usize) {
        assert_eq!(
            self.put("/v1/unit_types/small", json!({"name": "Small"}))
                .await
                .status,
            201
        );
        let names: Vec<String> = (1..=n).map(|i| format!("U{i:03}")).collect();
        let mut units = Vec::new();
        for (i, name) in names.iter().enumerate() {
            units.push(json!({
                "id": format!("u{}", i + 1), "name": name, "unit_type": "small",
                "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 4,
                "door_type": "roll_up", "access_type": "indoor", "standard_rate": 50.0,
                "walk_thru_order": i, "zones": ["main-gate"],
            }));
        }
        for chunk in units.chunks(500) {
            let a = self
                .post("/v1/units/bulk_create", json!({ "units": chunk }))
                .await;
            assert_eq!(a.status, 201, "{:?}", a.body);
        }
        for (id, pin) in [("c1", "1111"), ("c2", "2222"), ("c3", "3333")] {
            let a = self
                .put(
                    &format!("/v1/contacts/{id}"),
                    json!({"name": format!("Contact {id}"), "access_code": pin}),
                )
                .await;
            assert_eq!(a.status, 201, "{:?}", a.body);
        }
        for (id, contact, start, end) in [
            ("t-future", "c1", "2026-03-20", None),
            ("t-started", "c2", "2026-03-01", None),
            ("t-other", "c3", "2026-04-01", None),
            ("t-ended", "c2", "2026-01-01", Some("2026-03-01")),
        ] {
            let a = self
                .put(
                    &format!("/v1/tenancies/{id}"),
                    json!({"contact_id": contact, "start_date": start, "end_date": end}),
                )
                .await;
            assert_eq!(a.status, 201, "{:?}", a.body);
        }
    }
}
