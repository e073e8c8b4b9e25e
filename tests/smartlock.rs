//! The smart-lock driver against hw-sim's lock vendor API over real HTTP on loopback:
//! every provider call and state, the driver bringing locks to every target from every
//! start, auth failures, 429 + Retry-After, 503 outages, slow calls, garbled answers, lost
//! replies and unreachable APIs. The simulator runs in-process on port 0; its URL comes
//! from the control API's `GET /devices`, the key from a file in a temp dir.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use unitgate::config::LockApiConfig;
use unitgate::devices::smartlock::{
    ApiKey, CommandError, DriverSettings, LockApiHealth, LockDriver, LockError, LockHandle,
    LockProvider, LockState, LockStatus, LockTarget, ReferenceProvider,
};

const DEV: &str = "locks";
const KEY: &str = "test-key-0123456789";

/// A running simulator with a lock API, and what a client needs to reach it.
struct Site {
    sim: Sim,
    http: reqwest::Client,
    control: String,
    /// The lock API's real URL (with its path prefix).
    url: String,
    key_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Site {
    /// A lock API at `http://127.0.0.1:0/vendor` serving `locks`, with no rate limit unless
    /// `rate` says otherwise.
    async fn start(locks: &[&str], rate: u32) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("lock-api.key");
        // Whitespace around the key: both sides must trim it.
        std::fs::write(&key_file, format!("  {KEY}\n")).expect("key file");
        let toml = format!(
            "[devices.lock_api]\nid = {DEV:?}\nurl = \"http://127.0.0.1:0/vendor\"\n\
             api_key_file = {:?}\nrate_limit_per_s = {rate}\nlocks = {:?}\n",
            key_file.display().to_string(),
            locks
        );
        let site = SiteFile::parse(&toml).expect("site file");
        let sim = Sim::start(&site, Some("127.0.0.1:0")).await.expect("sim");
        let control = sim.control_url();
        let http = reqwest::Client::new();
        let devices: Value = http
            .get(format!("{control}/devices"))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("devices JSON");
        let url = devices
            .as_array()
            .and_then(|l| l.iter().find(|d| d["id"] == DEV))
            .and_then(|d| d["address"]["url"].as_str())
            .expect("lock API url")
            .to_owned();
        assert!(url.ends_with("/vendor") && !url.contains(":0/"), "{url}");
        Site {
            sim,
            http,
            control,
            url,
            key_file,
            _dir: dir,
        }
    }

    fn config(&self) -> LockApiConfig {
        LockApiConfig {
            id: DEV.into(),
            url: self.url.clone(),
            api_key_file: self.key_file.clone(),
            timeout_ms: 5000,
            rate_limit_per_s: None,
            locks: None,
            enabled: true,
        }
    }

    fn provider(&self) -> ReferenceProvider {
        ReferenceProvider::from_config(&self.config()).expect("provider")
    }

    /// A driver on this site, running until the site's test ends.
    fn driver(&self, settings: DriverSettings) -> (LockHandle, watch::Sender<bool>) {
        start_driver(self.provider(), settings)
    }

    /// The lock as the simulator holds it (control API, not the vendor API).
    async fn lock(&self, id: &str) -> LockState {
        self.http
            .get(format!("{}/locks/{id}", self.control))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("lock JSON")
    }

    async fn fault(&self, kind: &str, value: Option<f64>, ms: u64) {
        let r = self
            .http
            .post(format!("{}/faults", self.control))
            .json(&json!({"device": DEV, "kind": kind, "value": value, "duration_ms": ms}))
            .send()
            .await
            .expect("control API");
        assert_eq!(r.status(), 201, "fault {kind} set");
    }

    async fn clear_faults(&self) {
        let r = self
            .http
            .delete(format!("{}/faults?device={DEV}", self.control))
            .send()
            .await
            .expect("control API");
        assert!(r.status().is_success());
    }

    async fn active_faults(&self) -> usize {
        let v: Value = self
            .http
            .get(format!("{}/faults", self.control))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("faults JSON");
        // `GET /faults` lists devices with their faults; count the lock API's.
        let list = v.as_array().cloned().unwrap_or_default();
        list.iter()
            .filter(|d| d["device"] == DEV)
            .map(|d| d["faults"].as_array().map_or(0, Vec::len))
            .sum()
    }

    /// Accepted changes of one lock, from the vendor's activity log.
    async fn activity(&self, lock: &str) -> Vec<String> {
        let v: Value = self
            .http
            .get(format!("{}/v1/activity?lock={lock}", self.url))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("activity")
            .json()
            .await
            .expect("activity JSON");
        v.as_array()
            .expect("list")
            .iter()
            .map(|a| a["action"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Follows `GET /events?device=locks`; returns once the stream is live.
    async fn events(&self) -> Events {
        let mut resp = self
            .http
            .get(format!("{}/events?device={DEV}", self.control))
            .send()
            .await
            .expect("events");
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let (live_tx, live_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut live = Some(live_tx);
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(n) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=n).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if v["kind"] == "subscribed" {
                        if let Some(l) = live.take() {
                            let _ = l.send(());
                        }
                        continue;
                    }
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), live_rx)
            .await
            .expect("subscribed in time")
            .expect("stream live");
        let _ = rx.try_recv();
        Events {
            rx,
            seen: Vec::new(),
        }
    }
}

/// Observations of the lock API, in arrival order.
struct Events {
    rx: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Events {
    /// Waits (up to 10 s) until `done` holds for the observations so far; returns them.
    async fn until(&mut self, what: &str, done: impl Fn(&[Value]) -> bool) -> &[Value] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(v)) => self.seen.push(v),
                Ok(None) => panic!("event stream ended waiting for {what}"),
                Err(_) => panic!("no {what} within 10 s; saw {:#?}", self.seen),
            }
        }
        &self.seen
    }
}

fn start_driver<P: LockProvider>(
    provider: P,
    settings: DriverSettings,
) -> (LockHandle, watch::Sender<bool>) {
    let (driver, handle) = LockDriver::new(DEV, provider, settings);
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(driver.run(shutdown));
    (handle, stop)
}

/// Fast retries for tests: 50 ms doubling to 400 ms, give up after 10 s.
fn quick() -> DriverSettings {
    DriverSettings {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        give_up_after: Duration::from_secs(10),
        ..Default::default()
    }
}

async fn wait_health(
    h: &LockHandle,
    what: &str,
    ok: impl FnMut(&LockApiHealth) -> bool,
) -> LockApiHealth {
    let mut rx = h.health();
    let got = match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(ok)).await {
        Ok(Ok(h)) => Some(h.clone()),
        _ => None,
    };
    got.unwrap_or_else(|| panic!("health never {what}; last {:?}", *rx.borrow()))
}

fn state(id: &str, s: LockStatus, to: Option<&str>) -> LockState {
    LockState {
        id: id.into(),
        state: s,
        assigned_to: to.map(Into::into),
    }
}

fn assigned(t: &str) -> LockTarget {
    LockTarget::Assigned {
        tenant_ref: t.into(),
    }
}

#[tokio::test]
async fn provider_calls_and_states() {
    use LockStatus::*;
    let site = Site::start(&["u1", "u2", "u3"], 0).await;
    let p = site.provider();
    assert!(!format!("{p:?}").contains(KEY), "Debug redacts the key");

    let all = p.list().await.expect("list");
    assert_eq!(
        all,
        vec![
            state("u1", Unassigned, None),
            state("u2", Unassigned, None),
            state("u3", Unassigned, None)
        ]
    );
    assert_eq!(p.get("u1").await, Ok(state("u1", Unassigned, None)));

    // assign, idempotent repeat, another tenant refused
    assert_eq!(
        p.assign("u1", "t1").await,
        Ok(state("u1", Assigned, Some("t1")))
    );
    assert_eq!(
        p.assign("u1", "t1").await,
        Ok(state("u1", Assigned, Some("t1")))
    );
    match p.assign("u1", "t2").await {
        Err(LockError::Refused {
            status: 409, code, ..
        }) => assert_eq!(code, "already_assigned"),
        other => panic!("{other:?}"),
    }
    // overlock keeps the tenant; unassign refused while overlocked
    assert_eq!(
        p.overlock("u1").await,
        Ok(state("u1", Overlocked, Some("t1")))
    );
    assert_eq!(
        p.overlock("u1").await,
        Ok(state("u1", Overlocked, Some("t1")))
    );
    match p.unassign("u1").await {
        Err(LockError::Refused {
            status: 409,
            code,
            message,
        }) => {
            assert_eq!(code, "lock_overlocked");
            assert!(message.contains("remove the overlock"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.assign("u1", "t1").await,
        Ok(state("u1", Overlocked, Some("t1")))
    );
    assert_eq!(
        p.remove_overlock("u1").await,
        Ok(state("u1", Assigned, Some("t1")))
    );
    assert_eq!(
        p.remove_overlock("u1").await,
        Ok(state("u1", Assigned, Some("t1")))
    );
    assert_eq!(p.unassign("u1").await, Ok(state("u1", Unassigned, None)));
    assert_eq!(p.unassign("u1").await, Ok(state("u1", Unassigned, None)));

    // an overlocked lock without a tenant refuses assign, lifts to unassigned
    assert_eq!(p.overlock("u2").await, Ok(state("u2", Overlocked, None)));
    match p.assign("u2", "t1").await {
        Err(LockError::Refused { code, .. }) => assert_eq!(code, "lock_overlocked"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        p.remove_overlock("u2").await,
        Ok(state("u2", Unassigned, None))
    );

    // bad input is refused, unknown locks are not found (ids are one path segment)
    assert!(matches!(
        p.assign("u3", "  ").await,
        Err(LockError::Refused { status: 400, .. })
    ));
    for missing in ["nope", "u1/assign", "..", ""] {
        assert!(
            matches!(p.get(missing).await, Err(LockError::NotFound { .. })),
            "{missing:?}"
        );
    }
    match p.overlock("nope").await {
        Err(LockError::NotFound { code, .. }) => assert_eq!(code, "lock_not_found"),
        other => panic!("{other:?}"),
    }

    // the provider's view is the simulator's
    p.assign("u3", "t3").await.expect("assign");
    assert_eq!(site.lock("u3").await, state("u3", Assigned, Some("t3")));
    assert_eq!(site.lock("u1").await, state("u1", Unassigned, None));

    // without the path prefix every route is unknown: not found, with the route code
    let no_prefix = site.url.trim_end_matches("/vendor");
    let p2 = ReferenceProvider::new(
        no_prefix,
        ApiKey::new(KEY).expect("key"),
        Duration::from_secs(5),
    )
    .expect("provider");
    match p2.list().await {
        Err(LockError::NotFound { code, .. }) => assert_eq!(code, "not_found"),
        other => panic!("{other:?}"),
    }
    site.sim.stop().await;
}

#[tokio::test]
async fn driver_brings_every_start_to_every_target() {
    use LockStatus::*;
    let starts: [(&str, LockStatus, Option<&str>); 4] = [
        ("free", Unassigned, None),
        ("t1", Assigned, Some("t1")),
        ("over-t1", Overlocked, Some("t1")),
        ("over", Overlocked, None),
    ];
    let targets = [
        ("unassigned", LockTarget::Unassigned),
        ("t1", assigned("t1")),
        ("t2", assigned("t2")),
        ("overlocked", LockTarget::Overlocked),
    ];
    let ids: Vec<String> = starts
        .iter()
        .flat_map(|(s, ..)| targets.iter().map(move |(t, _)| format!("{s}.to.{t}")))
        .collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let site = Site::start(&id_refs, 0).await;
    let p = site.provider();

    // Starting states, set through the vendor API.
    for (s, st, to) in &starts {
        for (t, _) in &targets {
            let id = format!("{s}.to.{t}");
            if let Some(tenant) = to {
                p.assign(&id, tenant).await.expect("assign");
            }
            if *st == Overlocked {
                p.overlock(&id).await.expect("overlock");
            }
            assert_eq!(site.lock(&id).await, state(&id, *st, *to));
        }
    }

    // All 16 at once: the driver runs them concurrently (4 calls at a time).
    let (h, _stop) = site.driver(quick());
    let mut jobs = tokio::task::JoinSet::new();
    for (s, _, _) in &starts {
        for (t, target) in &targets {
            let id = format!("{s}.to.{t}");
            let (h, target) = (h.clone(), target.clone());
            jobs.spawn(async move { (id.clone(), h.bring_to(&id, target).await) });
        }
    }
    let mut results = std::collections::HashMap::new();
    while let Some(r) = jobs.join_next().await {
        let (id, r) = r.expect("job");
        results.insert(id, r);
    }

    for (s, _, start_tenant) in &starts {
        for (t, target) in &targets {
            let id = format!("{s}.to.{t}");
            let want = match target {
                LockTarget::Unassigned => state(&id, Unassigned, None),
                LockTarget::Assigned { tenant_ref } => state(&id, Assigned, Some(tenant_ref)),
                // Overlocking keeps whatever tenant the lock had.
                LockTarget::Overlocked => state(&id, Overlocked, *start_tenant),
            };
            assert_eq!(results[&id], Ok(want.clone()), "{id}: driver's answer");
            assert_eq!(site.lock(&id).await, want, "{id}: the simulator's lock");
        }
    }
    // Overlocked to another tenant: lift, unassign, assign, in that order.
    assert_eq!(
        site.activity("over-t1.to.t2").await,
        [
            "assign",
            "overlock",
            "remove_overlock",
            "unassign",
            "assign"
        ]
    );
    // Already there: nothing sent.
    assert_eq!(site.activity("t1.to.t1").await, ["assign"]);

    // Reads through the handle.
    assert_eq!(
        h.read("t1.to.t2").await,
        Ok(state("t1.to.t2", Assigned, Some("t2")))
    );
    assert_eq!(h.read_all().await.expect("list").len(), 16);
    assert!(matches!(
        h.read("nope").await,
        Err(CommandError::Lock(LockError::NotFound { .. }))
    ));
    // A refusal that no plan can get around comes back as refused, e.g. a bad tenant_ref.
    assert!(matches!(
        h.bring_to("free.to.t1", assigned("\u{7}")).await,
        Err(CommandError::Lock(LockError::Refused { status: 400, .. }))
    ));
    assert!(h.health().borrow().online);
    site.sim.stop().await;
}

#[tokio::test]
async fn wrong_key_is_an_auth_error_and_takes_the_driver_offline() {
    let site = Site::start(&["u1"], 0).await;
    let wrong = ReferenceProvider::new(
        &site.url,
        ApiKey::new("not-the-key").expect("key"),
        Duration::from_secs(5),
    )
    .expect("provider");
    match wrong.get("u1").await {
        Err(LockError::Auth {
            status: 401,
            message,
        }) => {
            assert!(message.contains("invalid API key"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    let mut events = site.events().await;
    let (h, _stop) = start_driver(wrong, quick());
    let t0 = Instant::now();
    let r = h.bring_to("u1", assigned("t1")).await;
    assert!(
        matches!(
            r,
            Err(CommandError::Lock(LockError::Auth { status: 401, .. }))
        ),
        "{r:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "not retried: {:?}",
        t0.elapsed()
    );
    let health = wait_health(&h, "offline with the key named", |h| {
        !h.online
            && h.last_error
                .as_deref()
                .is_some_and(|e| e.contains("API key") && e.contains("api_key_file"))
    })
    .await;
    assert!(
        !health
            .last_error
            .unwrap_or_default()
            .contains("not-the-key")
    );
    // Two calls (the start probe, the command's read), each refused once: no hammering.
    let seen = events
        .until("two auth failures", |e| {
            e.iter().filter(|v| v["kind"] == "auth_failed").count() >= 2
        })
        .await
        .to_vec();
    assert!(
        seen.iter()
            .all(|v| v["kind"] != "http_request" || v["data"]["status"] == 401)
    );
    assert_eq!(site.lock("u1").await.state, LockStatus::Unassigned);
    site.sim.stop().await;
}

#[tokio::test]
async fn rate_limit_retry_waits_for_retry_after() {
    let site = Site::start(&["u1", "u2"], 0).await;
    let (h, _stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;
    let mut events = site.events().await;

    // 429 with Retry-After: 1 for the next 200 ms: the first call is refused, the retry
    // must wait a whole second (the quick backoff alone would retry after 25-50 ms).
    site.fault("http429", Some(1.0), 200).await;
    let t0 = Instant::now();
    let (a, b) = tokio::join!(
        h.bring_to("u1", assigned("t1")),
        h.bring_to("u2", LockTarget::Overlocked)
    );
    let took = t0.elapsed();
    assert_eq!(a, Ok(state("u1", LockStatus::Assigned, Some("t1"))));
    assert_eq!(b, Ok(state("u2", LockStatus::Overlocked, None)));
    assert!(took >= Duration::from_secs(1), "waited {took:?}");

    let seen = events
        .until("both changes", |e| {
            e.iter()
                .filter(|v| v["kind"] == "lock_state_changed")
                .count()
                >= 2
        })
        .await;
    let t = |v: &Value| v["t_ns"].as_u64().expect("t_ns");
    let last_429 = seen
        .iter()
        .filter(|v| v["kind"] == "rate_limited")
        .map(t)
        .max()
        .expect("rate limited");
    let first_429 = seen
        .iter()
        .filter(|v| v["kind"] == "rate_limited")
        .map(t)
        .min()
        .expect("rate limited");
    // Every answered request after the 429s came at least Retry-After later, for both
    // locks: the pause is per API key, not per lock.
    let after: Vec<u64> = seen
        .iter()
        .filter(|v| v["kind"] == "http_request" && v["data"]["status"] == 200)
        .map(t)
        .filter(|&x| x > last_429)
        .collect();
    assert!(!after.is_empty());
    for x in after {
        assert!(
            x - first_429 >= 1_000_000_000,
            "a request {} ms after the first 429",
            (x - first_429) / 1_000_000
        );
    }
    assert!(h.health().borrow().online, "rate limiting is not an outage");
    site.sim.stop().await;
}

#[tokio::test]
async fn simulator_rate_limit_is_absorbed() {
    // The vendor's own token bucket (2/s, burst 2) with 4 locks at once (9 calls with the
    // start probe): every command gets through, pacing itself on Retry-After.
    let locks = ["a", "b", "c", "d"];
    let site = Site::start(&locks, 2).await;
    let mut events = site.events().await;
    let (h, _stop) = site.driver(quick());
    let mut jobs = tokio::task::JoinSet::new();
    for l in locks {
        let h = h.clone();
        jobs.spawn(async move { h.bring_to(l, assigned(l)).await });
    }
    while let Some(r) = jobs.join_next().await {
        let r = r.expect("job").expect("assigned despite the rate limit");
        assert_eq!(r.assigned_to.as_deref(), Some(r.id.as_str()));
    }
    for l in locks {
        assert_eq!(site.lock(l).await, state(l, LockStatus::Assigned, Some(l)));
    }
    // Refused calls stay few: after a 429 nothing is sent before Retry-After.
    let seen = events
        .until("four changes", |e| {
            e.iter()
                .filter(|v| v["kind"] == "lock_state_changed")
                .count()
                >= 4
        })
        .await;
    let refused = seen.iter().filter(|v| v["kind"] == "rate_limited").count();
    assert!(
        refused <= 12,
        "{refused} requests refused by the rate limit"
    );
    site.sim.stop().await;
}

#[tokio::test]
async fn outage_503_is_retried_with_backoff_and_converges() {
    let site = Site::start(&["u1"], 0).await;
    let (h, _stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;
    let mut events = site.events().await;

    site.fault("http503", None, 1500).await;
    let t0 = Instant::now();
    let cmd = {
        let h = h.clone();
        tokio::spawn(async move { h.bring_to("u1", assigned("t1")).await })
    };
    let down = wait_health(&h, "offline", |h| !h.online).await;
    assert!(
        down.last_error
            .as_deref()
            .is_some_and(|e| e.contains("503")),
        "{down:?}"
    );
    wait_health(&h, "online again", |h| h.online).await;
    let r = cmd.await.expect("job");
    let took = t0.elapsed();
    assert_eq!(r, Ok(state("u1", LockStatus::Assigned, Some("t1"))));
    assert_eq!(site.lock("u1").await.assigned_to.as_deref(), Some("t1"));
    // Converged soon after the outage: within one capped backoff (400 ms) plus slack.
    assert!(
        took < Duration::from_millis(1500 + 400 + 1000),
        "took {took:?}"
    );

    // Backoff, not a busy loop: 1.5 s of 503s at 50 ms doubling to 400 ms is ~8 tries.
    let seen = events
        .until("the change", |e| {
            e.iter().any(|v| v["kind"] == "lock_state_changed")
        })
        .await;
    let tries = seen
        .iter()
        .filter(|v| v["kind"] == "http_request" && v["data"]["status"] == 503)
        .count();
    assert!(
        (3..=15).contains(&tries),
        "{tries} requests during the outage"
    );
    let health = h.health().borrow().clone();
    assert!(health.online && health.consecutive_failures == 0);
    site.sim.stop().await;
}

#[tokio::test]
async fn slow_call_on_one_lock_does_not_stall_another() {
    let site = Site::start(&["slow", "fast"], 0).await;
    let (h, _stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;

    // Requests arriving in the next 300 ms are answered 2.5 s late.
    site.fault("slow", Some(2500.0), 300).await;
    let t0 = Instant::now();
    let slow = {
        let h = h.clone();
        tokio::spawn(async move { h.bring_to("slow", assigned("t1")).await })
    };
    // The fault ends (only the request already held stays slow).
    let deadline = Instant::now() + Duration::from_secs(5);
    while site.active_faults().await > 0 {
        assert!(Instant::now() < deadline, "fault never ended");
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
    let t1 = Instant::now();
    let fast = h.bring_to("fast", assigned("t2")).await;
    let fast_took = t1.elapsed();
    assert_eq!(fast, Ok(state("fast", LockStatus::Assigned, Some("t2"))));
    assert!(!slow.is_finished(), "the slow lock is still waiting");
    assert!(
        fast_took < Duration::from_millis(1000),
        "fast lock took {fast_took:?}"
    );

    let r = slow.await.expect("job");
    assert_eq!(r, Ok(state("slow", LockStatus::Assigned, Some("t1"))));
    assert!(
        t0.elapsed() >= Duration::from_millis(2500),
        "the slow call really was slow"
    );
    site.sim.stop().await;
}

#[tokio::test]
async fn garbled_answers_are_bad_answers_then_recover() {
    let site = Site::start(&["u1", "u2"], 0).await;
    let p = site.provider();
    site.fault("corrupt", Some(1.0), 60_000).await;
    let r = p.get("u1").await;
    assert!(
        matches!(&r, Err(LockError::BadAnswer { status: 200, .. })),
        "{r:?}"
    );
    // The change is applied even though its answer is garbage.
    assert!(matches!(
        p.assign("u1", "t1").await,
        Err(LockError::BadAnswer { .. })
    ));
    assert_eq!(site.lock("u1").await.assigned_to.as_deref(), Some("t1"));
    site.clear_faults().await;
    assert_eq!(
        p.get("u1").await,
        Ok(state("u1", LockStatus::Assigned, Some("t1")))
    );

    // The driver retries garbled answers and converges once they stop.
    let (h, _stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;
    site.fault("corrupt", Some(1.0), 800).await;
    let r = h.bring_to("u2", LockTarget::Overlocked).await;
    assert_eq!(r, Ok(state("u2", LockStatus::Overlocked, None)));
    assert_eq!(site.activity("u2").await, ["overlock"], "applied once");
    site.sim.stop().await;
}

#[tokio::test]
async fn lost_replies_are_resolved_by_reading_back() {
    let site = Site::start(&["u1"], 0).await;
    let (h, _stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;
    h.bring_to("u1", assigned("t1")).await.expect("assign");
    h.bring_to("u1", LockTarget::Overlocked)
        .await
        .expect("overlock");
    // Every answer is lost for 600 ms (the changes are applied): overlocked → t2 takes
    // three changes; each is applied once, found by reading back.
    site.fault("drop", Some(1.0), 600).await;
    let r = h.bring_to("u1", assigned("t2")).await;
    assert_eq!(r, Ok(state("u1", LockStatus::Assigned, Some("t2"))));
    let log = site.activity("u1").await;
    assert_eq!(log[..2], ["assign", "overlock"]);
    // After the lost replies: lifted, unassigned, assigned; if a lost reply came after the
    // overlock was lifted, the driver put it back (fail closed) and lifted it again.
    assert_eq!(log.last().map(String::as_str), Some("assign"));
    assert_eq!(log.iter().filter(|a| *a == "unassign").count(), 1);
    site.sim.stop().await;
}

#[tokio::test]
async fn newer_command_supersedes_a_retrying_one() {
    let site = Site::start(&["u1"], 0).await;
    let (h, _stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;
    let mut events = site.events().await;
    site.fault("http503", None, 1000).await;
    let first = {
        let h = h.clone();
        tokio::spawn(async move { h.bring_to("u1", assigned("t1")).await })
    };
    // Once the first command has hit the outage, a newer target replaces it.
    events
        .until("a 503", |e| {
            e.iter()
                .any(|v| v["kind"] == "http_request" && v["data"]["status"] == 503)
        })
        .await;
    let second = h.bring_to("u1", LockTarget::Overlocked).await;
    assert_eq!(second, Ok(state("u1", LockStatus::Overlocked, None)));
    assert_eq!(
        first.await.expect("job"),
        Err(CommandError::Superseded { lock: "u1".into() })
    );
    assert_eq!(site.activity("u1").await, ["overlock"]);
    site.sim.stop().await;
}

#[tokio::test]
async fn unreachable_api_fails_fast_as_transient() {
    // A port nobody listens on: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let key = || ApiKey::new(KEY).expect("key");
    let p = ReferenceProvider::new(&format!("http://{closed}"), key(), Duration::from_secs(5))
        .expect("provider");
    let t0 = Instant::now();
    match p.get("u1").await {
        Err(LockError::Transient {
            status: None,
            reason,
            ..
        }) => {
            assert!(reason.contains("cannot connect"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());

    // A listener that never answers: the request timeout (300 ms) ends the wait.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let p = ReferenceProvider::new(
        &format!("http://{silent_addr}"),
        key(),
        Duration::from_millis(300),
    )
    .expect("provider");
    let t0 = Instant::now();
    match p.assign("u1", "t1").await {
        Err(LockError::Transient {
            status: None,
            reason,
            ..
        }) => {
            assert!(reason.contains("300 ms"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // The driver: offline after consecutive failures, gives up at its deadline with the
    // transient error (the reconciler's queue retries later).
    let p = ReferenceProvider::new(&format!("http://{closed}"), key(), Duration::from_secs(5))
        .expect("provider");
    let (h, _stop) = start_driver(
        p,
        DriverSettings {
            give_up_after: Duration::from_millis(800),
            ..quick()
        },
    );
    let t0 = Instant::now();
    let r = h.bring_to("u1", LockTarget::Overlocked).await;
    assert!(
        matches!(r, Err(CommandError::Lock(LockError::Transient { .. }))),
        "{r:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let health = wait_health(&h, "offline", |h| !h.online && h.consecutive_failures >= 3).await;
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect")),
        "{health:?}"
    );
    drop(silent);
}

#[tokio::test]
async fn stopped_driver_answers_stopped() {
    let site = Site::start(&["u1"], 0).await;
    let (h, stop) = site.driver(quick());
    wait_health(&h, "online", |h| h.online).await;
    site.fault("http503", None, 5000).await;
    let cmd = {
        let h = h.clone();
        tokio::spawn(async move { h.bring_to("u1", LockTarget::Overlocked).await })
    };
    wait_health(&h, "offline", |h| !h.online).await;
    let _ = stop.send(true);
    assert_eq!(cmd.await.expect("job"), Err(CommandError::Stopped));
    assert_eq!(h.read("u1").await, Err(CommandError::Stopped));
    site.sim.stop().await;
}
