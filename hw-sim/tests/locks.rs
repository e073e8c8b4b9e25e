//! The smart-lock vendor API, driven with reqwest over real HTTP: every route and
//! transition, auth, rate limit, every fault kind, bad input and the activity log. The
//! simulator runs in-process on port 0; its URL and key come from the control API.

use hw_sim::Sim;
use hw_sim::config::{Devices, LockApiConfig, SimConfig, SiteFile};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEV: &str = "locks";

fn site(url: &str, rate: u32, key_file: Option<PathBuf>) -> SiteFile {
    SiteFile {
        sim: SimConfig::default(),
        devices: Devices {
            lock_api: Some(LockApiConfig {
                id: DEV.into(),
                url: url.into(),
                api_key_file: key_file.unwrap_or_default(),
                rate_limit_per_s: rate,
                locks: vec!["u1".into(), "u2".into(), "u3".into()],
                timeout_ms: None,
                enabled: None,
            }),
            ..Default::default()
        },
        units: Vec::new(),
    }
}

/// A running simulator and what a client needs to call its lock API.
struct Vendor {
    sim: Sim,
    http: Client,
    /// Control API base URL.
    control: String,
    /// Lock API base URL.
    url: String,
    key: String,
}

impl Vendor {
    async fn start(rate: u32) -> Vendor {
        Self::start_site(site("http://127.0.0.1:0", rate, None)).await
    }

    async fn start_site(site: SiteFile) -> Vendor {
        let sim = Sim::start(&site, Some("127.0.0.1:0")).await.expect("start");
        let control = sim.control_url();
        let http = Client::new();
        let devices: Value = http
            .get(format!("{control}/devices"))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("devices JSON");
        let d = devices
            .as_array()
            .and_then(|l| l.iter().find(|d| d["id"] == DEV))
            .expect("lock API listed")
            .clone();
        let url = d["address"]["url"].as_str().expect("url").to_owned();
        assert!(!url.ends_with(":0"), "real port reported: {url}");
        let key = d["address"]["api_key"].as_str().unwrap_or("").to_owned();
        Vendor {
            sim,
            http,
            control,
            url,
            key,
        }
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(10))
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("answer");
        let status = resp.status();
        let v = resp.json().await.expect("JSON body");
        (status, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(Method::POST, path, body).await
    }

    async fn fault(&self, kind: &str, value: Option<f64>, ms: u64) {
        let r = self
            .http
            .post(format!("{}/faults", self.control))
            .json(&json!({"device": DEV, "kind": kind, "value": value, "duration_ms": ms}))
            .send()
            .await
            .expect("control API");
        assert_eq!(r.status(), StatusCode::CREATED, "fault {kind} set");
    }

    /// Polls (every 50 ms, up to 5 s) until `ok` holds for a `GET /v1/locks/u3`.
    async fn until_get(&self, what: &str, ok: impl Fn(&reqwest::Response, Duration) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = Instant::now();
            let r = self
                .req(Method::GET, "/v1/locks/u3")
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(r) = r
                && ok(&r, t.elapsed())
            {
                return;
            }
            assert!(Instant::now() < deadline, "still not {what} after 5 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the lock API answers normally again (the fault ran out).
    async fn until_normal(&self) {
        self.until_get("answering 200 quickly", |r, took| {
            r.status() == StatusCode::OK && took < Duration::from_millis(150)
        })
        .await;
    }

    async fn events(&self) -> Events {
        Events::open(&self.http, &self.control).await
    }
}

/// The control API's NDJSON observation stream.
struct Events {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Events {
    /// Subscribes; returns once the stream is live.
    async fn open(http: &Client, control: &str) -> Events {
        let resp = http
            .get(format!("{control}/events?device={DEV}"))
            .send()
            .await
            .expect("events");
        let mut ev = Events {
            resp,
            buf: Vec::new(),
        };
        ev.wait_for("subscribed", |o| o["kind"] == "subscribed")
            .await;
        ev
    }

    /// The next observation matching `pred`, within 5 s.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let v: Value = serde_json::from_slice(&line).expect("NDJSON line");
                if pred(&v) {
                    return v;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no {what} observation within 5 s"))
                .expect("stream")
                .expect("stream open");
            self.buf.extend_from_slice(&chunk);
        }
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn every_route_and_state_transition() {
    let v = Vendor::start(1000).await;
    let mut ev = v.events().await;

    let (s, list) = v.get("/v1/locks").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        list,
        json!([
            {"id": "u1", "state": "unassigned", "assigned_to": null},
            {"id": "u2", "state": "unassigned", "assigned_to": null},
            {"id": "u3", "state": "unassigned", "assigned_to": null},
        ])
    );
    let (s, one) = v.get("/v1/locks/u2").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        one,
        json!({"id": "u2", "state": "unassigned", "assigned_to": null})
    );

    let lock =
        |state: &str, to: Option<&str>| json!({"id": "u1", "state": state, "assigned_to": to});
    let assign = |t: &str| Some(json!({"tenant_ref": t}));
    let steps: Vec<(&str, Option<Value>, StatusCode, Value)> = vec![
        (
            "assign",
            assign("t1"),
            StatusCode::OK,
            lock("assigned", Some("t1")),
        ),
        (
            "assign",
            assign("t1"),
            StatusCode::OK,
            lock("assigned", Some("t1")),
        ),
        (
            "assign",
            assign("t2"),
            StatusCode::CONFLICT,
            json!("already_assigned"),
        ),
        (
            "overlock",
            None,
            StatusCode::OK,
            lock("overlocked", Some("t1")),
        ),
        (
            "overlock",
            None,
            StatusCode::OK,
            lock("overlocked", Some("t1")),
        ),
        (
            "assign",
            assign("t1"),
            StatusCode::OK,
            lock("overlocked", Some("t1")),
        ),
        (
            "assign",
            assign("t2"),
            StatusCode::CONFLICT,
            json!("already_assigned"),
        ),
        (
            "unassign",
            None,
            StatusCode::CONFLICT,
            json!("lock_overlocked"),
        ),
        (
            "remove_overlock",
            None,
            StatusCode::OK,
            lock("assigned", Some("t1")),
        ),
        (
            "remove_overlock",
            None,
            StatusCode::OK,
            lock("assigned", Some("t1")),
        ),
        ("unassign", None, StatusCode::OK, lock("unassigned", None)),
        ("unassign", None, StatusCode::OK, lock("unassigned", None)),
        ("overlock", None, StatusCode::OK, lock("overlocked", None)),
        (
            "assign",
            assign("t3"),
            StatusCode::CONFLICT,
            json!("lock_overlocked"),
        ),
        (
            "remove_overlock",
            None,
            StatusCode::OK,
            lock("unassigned", None),
        ),
    ];
    for (i, (action, body, status, want)) in steps.into_iter().enumerate() {
        let (s, got) = v.post(&format!("/v1/locks/u1/{action}"), body).await;
        assert_eq!(s, status, "step {i} {action}: {got}");
        if status == StatusCode::OK {
            assert_eq!(got, want, "step {i} {action}");
            let (_, read_back) = v.get("/v1/locks/u1").await;
            assert_eq!(read_back, want, "step {i}: GET agrees");
        } else {
            assert_eq!(code(&got), want, "step {i} {action}: {got}");
            assert!(
                got["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    }

    // Every real change was observed, in order, and nothing for the no-ops.
    let want = [
        ("assign", "unassigned", "assigned"),
        ("overlock", "assigned", "overlocked"),
        ("remove_overlock", "overlocked", "assigned"),
        ("unassign", "assigned", "unassigned"),
        ("overlock", "unassigned", "overlocked"),
        ("remove_overlock", "overlocked", "unassigned"),
    ];
    for (action, from, to) in want {
        let o = ev
            .wait_for("lock_state_changed", |o| o["kind"] == "lock_state_changed")
            .await;
        assert_eq!(o["device"], DEV);
        assert_eq!(
            (
                o["data"]["lock"].as_str(),
                o["data"]["action"].as_str(),
                o["data"]["from"].as_str(),
                o["data"]["to"].as_str()
            ),
            (Some("u1"), Some(action), Some(from), Some(to)),
            "{o}"
        );
    }
    // The first change named the tenant.
    let (_, log) = v.get("/v1/activity?limit=1").await;
    assert_eq!(log[0]["tenant_ref"], "t1");

    // The control API reads the same state.
    v.post("/v1/locks/u3/assign", assign("t9")).await;
    let c: Value = v
        .http
        .get(format!("{}/locks/u3", v.control))
        .send()
        .await
        .expect("control")
        .json()
        .await
        .expect("json");
    assert_eq!(
        c,
        json!({"id": "u3", "state": "assigned", "assigned_to": "t9"})
    );
    let all: Value = v
        .http
        .get(format!("{}/locks", v.control))
        .send()
        .await
        .expect("control")
        .json()
        .await
        .expect("json");
    assert_eq!(all.as_array().map(Vec::len), Some(3));

    // Every request is observed too.
    let o = ev
        .wait_for("http_request", |o| {
            o["kind"] == "http_request" && o["data"]["path"] == "/v1/locks/u3/assign"
        })
        .await;
    assert_eq!(o["data"]["method"], "POST");
    assert_eq!(o["data"]["status"], 200);
    v.sim.stop().await;
}

#[tokio::test]
async fn activity_log_lists_accepted_changes() {
    let v = Vendor::start(1000).await;
    let assign = |t: &str| Some(json!({"tenant_ref": t}));
    v.post("/v1/locks/u1/assign", assign("t1")).await;
    v.post("/v1/locks/u1/assign", assign("t1")).await; // no-op: not logged
    v.post("/v1/locks/u2/assign", assign("t2")).await;
    v.post("/v1/locks/u1/assign", assign("tX")).await; // refused: not logged
    v.post("/v1/locks/u2/overlock", None).await;
    v.post("/v1/locks/u1/unassign", None).await;

    let (s, log) = v.get("/v1/activity").await;
    assert_eq!(s, StatusCode::OK);
    let got: Vec<(u64, &str, &str, &str, &str, &str)> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap_or(0),
                e["lock"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
                e["tenant_ref"].as_str().unwrap_or("-"),
                e["from"].as_str().unwrap_or(""),
                e["to"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "u1", "assign", "t1", "unassigned", "assigned"),
            (2, "u2", "assign", "t2", "unassigned", "assigned"),
            (3, "u2", "overlock", "t2", "assigned", "overlocked"),
            (4, "u1", "unassign", "t1", "assigned", "unassigned"),
        ]
    );
    for e in log.as_array().expect("array") {
        let t = e["time"].as_str().expect("time");
        assert!(
            t.len() == 24 && t.ends_with('Z') && t.contains('T'),
            "RFC 3339: {t}"
        );
        assert!(e["t_ns"].as_u64().is_some_and(|t| t > 0));
    }

    let (_, u2) = v.get("/v1/activity?lock=u2").await;
    assert_eq!(u2.as_array().map(Vec::len), Some(2));
    let (_, since) = v.get("/v1/activity?since=2&limit=1").await;
    assert_eq!(since.as_array().map(Vec::len), Some(1));
    assert_eq!(since[0]["seq"], 3);
    let (s, e) = v.get("/v1/activity?lock=nope").await;
    assert_eq!((s, code(&e)), (StatusCode::NOT_FOUND, "lock_not_found"));
    let (s, e) = v.get("/v1/activity?since=yesterday").await;
    assert_eq!((s, code(&e)), (StatusCode::BAD_REQUEST, "invalid_request"));
    v.sim.stop().await;
}

#[tokio::test]
async fn a_change_at_the_lock_itself_is_seen_by_the_api_and_logged_as_manual() {
    let v = Vendor::start(1000).await;
    v.post("/v1/locks/u1/assign", Some(json!({"tenant_ref": "t1"})))
        .await;
    let put = |path: &str, body: &str| {
        v.http
            .put(format!("{}{path}", v.control))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    // Someone clears the lock at the lock itself: the vendor API now shows it free.
    let r = put("/locks/u1", r#"{"state": "unassigned"}"#)
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::OK);
    let (_, u1) = v.get("/v1/locks/u1").await;
    assert_eq!(
        u1,
        json!({"id": "u1", "state": "unassigned", "assigned_to": null})
    );
    let r = put(
        "/locks/u2",
        r#"{"state": "overlocked", "assigned_to": "t9"}"#,
    )
    .await
    .expect("PUT");
    assert_eq!(r.status(), StatusCode::OK);
    let (_, u2) = v.get("/v1/locks/u2").await;
    assert_eq!(
        u2,
        json!({"id": "u2", "state": "overlocked", "assigned_to": "t9"})
    );
    let (_, log) = v.get("/v1/activity").await;
    let actions: Vec<(&str, &str, &str)> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["lock"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
                e["to"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("u1", "assign", "assigned"),
            ("u1", "manual", "unassigned"),
            ("u2", "manual", "overlocked"),
        ]
    );
    // Bad input changes nothing.
    for (path, body, status) in [
        ("/locks/nope", r#"{"state": "unassigned"}"#, 404),
        ("/locks/u2", r#"{"state": "open"}"#, 400),
        ("/locks/u2", r#"{"state": "assigned", "x": 1}"#, 400),
        ("/locks/u2", "{", 400),
    ] {
        let r = put(path, body).await.expect("PUT");
        assert_eq!(r.status().as_u16(), status, "{path} {body}");
    }
    let (_, again) = v.get("/v1/locks/u2").await;
    assert_eq!(again, u2);
    v.sim.stop().await;
}

#[tokio::test]
async fn requests_without_the_key_are_refused() {
    let v = Vendor::start(1000).await;
    assert_eq!(
        v.key.len(),
        32,
        "a generated key is reported by the control API"
    );
    let mut ev = v.events().await;
    let url = format!("{}/v1/locks", v.url);
    let cases = [
        ("no header", None),
        ("wrong key", Some(format!("Bearer {}x", v.key))),
        ("empty key", Some("Bearer ".to_owned())),
        ("basic scheme", Some(format!("Basic {}", v.key))),
    ];
    for (what, header) in cases {
        let mut r = v.http.get(&url);
        if let Some(h) = header {
            r = r.header("authorization", h);
        }
        let resp = r.send().await.expect("answer");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|h| h.to_str().ok()),
            Some("Bearer")
        );
        let body: Value = resp.json().await.expect("JSON");
        assert_eq!(code(&body), "unauthorized", "{what}");
    }
    // A change without the key is not applied.
    let r = v
        .http
        .post(format!("{}/v1/locks/u1/assign", v.url))
        .json(&json!({"tenant_ref": "thief"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (_, u1) = v.get("/v1/locks/u1").await;
    assert_eq!(u1["state"], "unassigned");
    // Unknown routes do not leak past auth either.
    let r = v
        .http
        .get(format!("{}/v1/nope", v.url))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let o = ev
        .wait_for("auth_failed", |o| o["kind"] == "auth_failed")
        .await;
    assert_eq!(o["data"]["reason"], "missing");
    let o = ev
        .wait_for("auth_failed", |o| o["kind"] == "auth_failed")
        .await;
    assert_eq!(o["data"]["reason"], "wrong_key");
    v.sim.stop().await;
}

#[tokio::test]
async fn api_key_comes_from_the_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("lock-api.key");
    std::fs::write(&file, "  s3cret-key-from-file\n").expect("write key");
    let mut v = Vendor::start_site(site("http://127.0.0.1:0", 1000, Some(file.clone()))).await;
    assert_eq!(v.key, "", "a key from a file is not shown");
    v.key = "s3cret-key-from-file".into();
    let (s, _) = v.get("/v1/locks").await;
    assert_eq!(s, StatusCode::OK, "trimmed key accepted");
    v.key = "  s3cret-key-from-file".into();
    let r = v
        .req(Method::GET, "/v1/locks")
        .send()
        .await
        .expect("answer");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "surrounding blanks of the header are ignored"
    );
    v.key = "s3cret-key-from-fil".into();
    let r = v
        .req(Method::GET, "/v1/locks")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "prefix of the key");
    v.sim.stop().await;

    std::fs::write(&file, "\n").expect("write key");
    let e = Sim::start(
        &site("http://127.0.0.1:0", 10, Some(file)),
        Some("127.0.0.1:0"),
    )
    .await
    .err()
    .expect("empty key file refused");
    assert!(e.to_string().contains("empty"), "{e}");
    let e = Sim::start(
        &site("http://127.0.0.1:0", 10, Some(dir.path().join("missing"))),
        Some("127.0.0.1:0"),
    )
    .await
    .err()
    .expect("missing key file refused");
    assert!(e.to_string().contains("api_key_file"), "{e}");
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_then_recovers() {
    let v = Vendor::start(5).await;
    let mut ev = v.events().await;
    let mut ok = 0;
    let limited = loop {
        let r = v
            .req(Method::GET, "/v1/locks")
            .send()
            .await
            .expect("answer");
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            break r;
        }
        assert_eq!(r.status(), StatusCode::OK);
        ok += 1;
        assert!(ok <= 10, "no 429 after {ok} requests at 5/s");
    };
    assert!(ok >= 5, "the burst of 5 is allowed, got {ok}");
    let retry: u64 = limited
        .headers()
        .get("retry-after")
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.parse().ok())
        .expect("Retry-After in seconds");
    assert_eq!(retry, 1);
    let body: Value = limited.json().await.expect("JSON");
    assert_eq!(code(&body), "rate_limited");
    let o = ev
        .wait_for("rate_limited", |o| o["kind"] == "rate_limited")
        .await;
    assert_eq!(o["data"]["by"], "limit");

    // A refused request takes no token: the bucket refills and requests pass again.
    let refused_at = Instant::now();
    v.until_get("200 after the limit", |r, _| r.status() == StatusCode::OK)
        .await;
    assert!(refused_at.elapsed() <= Duration::from_secs(retry) + Duration::from_millis(500));
    v.sim.stop().await;
}

#[tokio::test]
async fn fault_offline_never_answers_and_closes_when_it_ends() {
    let v = Vendor::start(1000).await;
    let mut ev = v.events().await;
    v.fault("offline", None, 800).await;
    let t = Instant::now();
    let pending = tokio::spawn({
        let r = v
            .req(Method::POST, "/v1/locks/u1/assign")
            .json(&json!({"tenant_ref": "t1"}));
        async move { r.send().await }
    });
    let e = v
        .req(Method::GET, "/v1/locks")
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .expect_err("no answer while offline");
    assert!(e.is_timeout(), "{e}");
    let e = pending
        .await
        .expect("task")
        .expect_err("closed, never answered");
    assert!(!e.is_timeout() && e.status().is_none(), "{e:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "held until the fault ended"
    );
    let o = ev
        .wait_for("unanswered request", |o| {
            o["kind"] == "http_request" && o["data"]["faults"] == json!(["offline"])
        })
        .await;
    assert_eq!(o["data"]["status"], Value::Null);
    v.until_normal().await;
    let (_, u1) = v.get("/v1/locks/u1").await;
    assert_eq!(
        u1["state"], "unassigned",
        "a request sent while offline is not applied"
    );

    // Clearing the fault releases waiting requests at once.
    v.fault("offline", None, 60_000).await;
    let pending = tokio::spawn({
        let r = v.req(Method::GET, "/v1/locks");
        async move { r.send().await }
    });
    ev.wait_for("held request", |o| o["kind"] == "request_held")
        .await;
    let cleared = v
        .http
        .delete(format!("{}/faults?device={DEV}", v.control))
        .send()
        .await
        .expect("control");
    assert_eq!(cleared.status(), StatusCode::OK);
    let t = Instant::now();
    let e = pending
        .await
        .expect("task")
        .expect_err("closed, never answered");
    assert!(!e.is_timeout() && e.status().is_none(), "{e:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "released by the clear"
    );
    v.until_normal().await;
    v.sim.stop().await;
}

#[tokio::test]
async fn fault_http429_answers_retry_after_then_clears() {
    let v = Vendor::start(1000).await;
    v.fault("http429", Some(7.0), 500).await;
    let r = v
        .req(Method::GET, "/v1/locks")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        r.headers().get("retry-after").and_then(|h| h.to_str().ok()),
        Some("7")
    );
    let body: Value = r.json().await.expect("JSON");
    assert_eq!(code(&body), "rate_limited");
    v.until_normal().await;

    v.fault("http429", None, 500).await;
    let r = v
        .req(Method::GET, "/v1/locks")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        r.headers().get("retry-after").and_then(|h| h.to_str().ok()),
        Some("1")
    );
    v.until_normal().await;
    v.sim.stop().await;
}

#[tokio::test]
async fn fault_http503_answers_503_then_clears() {
    let v = Vendor::start(1000).await;
    v.fault("http503", None, 500).await;
    let (s, body) = v.post("/v1/locks/u1/overlock", None).await;
    assert_eq!(
        (s, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
    );
    v.until_normal().await;
    let (_, u1) = v.get("/v1/locks/u1").await;
    assert_eq!(u1["state"], "unassigned", "a 503 request is not applied");
    v.sim.stop().await;
}

#[tokio::test]
async fn fault_slow_and_delay_answer_late_then_clear() {
    let v = Vendor::start(1000).await;
    for kind in ["slow", "delay"] {
        v.fault(kind, Some(300.0), 1500).await;
        let t = Instant::now();
        let (s, _) = v.get("/v1/locks/u1").await;
        assert_eq!(s, StatusCode::OK, "{kind}: late, but answered");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{kind}: {:?}",
            t.elapsed()
        );
        v.until_normal().await;
    }
    v.sim.stop().await;
}

#[tokio::test]
async fn fault_drop_applies_the_change_and_closes_unanswered() {
    let v = Vendor::start(1000).await;
    v.fault("drop", Some(1.0), 500).await;
    let e = v
        .req(Method::POST, "/v1/locks/u1/assign")
        .json(&json!({"tenant_ref": "t1"}))
        .send()
        .await
        .expect_err("no answer");
    assert!(!e.is_timeout() && e.status().is_none(), "{e:?}");
    v.until_normal().await;
    let (_, u1) = v.get("/v1/locks/u1").await;
    assert_eq!(
        u1["state"], "assigned",
        "the change was applied, only the reply was lost"
    );
    v.sim.stop().await;
}

#[tokio::test]
async fn fault_corrupt_garbles_the_body_then_clears() {
    let v = Vendor::start(1000).await;
    v.fault("corrupt", None, 500).await;
    let r = v
        .req(Method::GET, "/v1/locks")
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.bytes().await.expect("body");
    assert!(
        serde_json::from_slice::<Value>(&body).is_err(),
        "garbled: {body:?}"
    );
    assert!(body.contains(&0xff));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = v
            .req(Method::GET, "/v1/locks")
            .send()
            .await
            .expect("answer");
        let body = r.bytes().await.expect("body");
        if serde_json::from_slice::<Value>(&body).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "still garbled after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v.sim.stop().await;
}

#[tokio::test]
async fn bad_input_gets_json_errors() {
    let v = Vendor::start(1000).await;
    let raw = |path: &str, body: &'static str| {
        v.req(Method::POST, path)
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "broken JSON",
            raw("/v1/locks/u1/assign", "{\"tenant_ref\":"),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            "no body",
            raw("/v1/locks/u1/assign", ""),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            "no tenant_ref",
            raw("/v1/locks/u1/assign", "{}"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "number tenant",
            raw("/v1/locks/u1/assign", "{\"tenant_ref\":5}"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "empty tenant",
            raw("/v1/locks/u1/assign", "{\"tenant_ref\":\" \"}"),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "unknown lock",
            v.req(Method::GET, "/v1/locks/nope"),
            StatusCode::NOT_FOUND,
            "lock_not_found",
        ),
        (
            "unknown lock change",
            v.req(Method::POST, "/v1/locks/nope/overlock"),
            StatusCode::NOT_FOUND,
            "lock_not_found",
        ),
        (
            "unknown route",
            v.req(Method::GET, "/v2/locks"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "unknown action",
            v.req(Method::POST, "/v1/locks/u1/explode"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "wrong method",
            v.req(Method::DELETE, "/v1/locks/u1"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (what, req, status, want) in cases {
        let r = req.send().await.expect("answer");
        assert_eq!(r.status(), status, "{what}");
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        assert_eq!(code(&body), want, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let (_, u1) = v.get("/v1/locks/u1").await;
    assert_eq!(u1["state"], "unassigned");

    // Bytes that are not HTTP: observed, that connection closes, the server keeps serving.
    let mut ev = v.events().await;
    let addr = v.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"\x00\xff\x13garbage \x7f\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("read");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
        "{answer:?}"
    );
    let o = ev.wait_for("bad_http", |o| o["kind"] == "bad_http").await;
    assert!(o["data"]["error"].as_str().is_some_and(|e| !e.is_empty()));
    let (s, _) = v.get("/v1/locks").await;
    assert_eq!(s, StatusCode::OK);
    v.sim.stop().await;
}

#[tokio::test]
async fn a_path_in_the_url_prefixes_every_route() {
    let v = Vendor::start_site(site("http://127.0.0.1:0/vendor/api/", 1000, None)).await;
    assert!(v.url.ends_with("/vendor/api"), "{}", v.url);
    let (s, list) = v.get("/v1/locks").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(3));
    let root = v.url.trim_end_matches("/vendor/api").to_owned();
    let r = v
        .http
        .get(format!("{root}/v1/locks"))
        .bearer_auth(&v.key)
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    v.sim.stop().await;
}

#[tokio::test]
async fn stop_closes_the_port() {
    let v = Vendor::start(1000).await;
    let addr = v.url.trim_start_matches("http://").to_owned();
    v.sim.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
