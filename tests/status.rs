//! `GET /v1/status`: its shape, the backlog moving as the uplink delivers, and the backlog
//! policy (issue 7) with a tiny cap: `queue.full` once, access events compacted in place with
//! `seq` kept gapless, allocation events untouched, `queue.ok` after delivery.

#[path = "common/cloud.rs"]
mod cloud;
mod common;

use cloud::FakeCloud;
use common::{READER, TestClock, TestGateway, test_config};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use unitgate::domain::EventType;
use unitgate::store::events;

async fn with_uplink(cloud: &FakeCloud, cap_mib: u64) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.cloud.https_uplink = Some(cloud.uplink_config(dir.path(), "s3cret-0123456789abcdef", 500));
    cfg.cloud.backlog_cap_mib = cap_mib;
    cfg.validate().expect("valid");
    TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await
}

/// Polls `GET /v1/status` until `done` holds.
async fn status_until(t: &TestGateway, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let a = t
            .call(reqwest::Method::GET, "/v1/status", Some(READER), None, &[])
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        if done(&a.body) {
            return a.body;
        }
        assert!(
            Instant::now() < deadline,
            "status never got there: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn status_shape_without_uplinks() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let a = t
        .call(reqwest::Method::GET, "/v1/status", Some(READER), None, &[])
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let mut body = a.body;
    let uptime = body.as_object_mut().and_then(|o| o.remove("uptime_s"));
    assert!(uptime.is_some_and(|u| u.is_u64()), "uptime_s: {body}");
    assert_eq!(
        body,
        json!({
            "site_id": "site-test",
            "version": env!("CARGO_PKG_VERSION"),
            "link": {},
            "backlog": {"events": 0, "oldest_age_s": null},
            // relay-1, rb1 and the lock API are configured but disabled.
            "devices": {"online": 0, "offline": 3},
            "last_seq": t.last_seq().await,
        })
    );
    let a = t
        .call(reqwest::Method::GET, "/v1/status", None, None, &[])
        .await;
    assert_eq!((a.status, a.code()), (401, "unauthorized"));
    let doc = t.get("/openapi.json").await;
    assert!(doc.body["paths"]["/v1/status"]["get"].is_object());
    let hook = &doc.body["paths"]["/v1/webhooks/{source}"]["post"];
    assert!(hook.is_object());
    assert_eq!(
        hook["security"],
        json!([{}]),
        "webhooks take no bearer token"
    );
    t.stop().await;
}

#[tokio::test]
async fn the_backlog_moves_as_the_uplink_delivers() {
    let cloud = FakeCloud::start().await;
    cloud.answer_all(503);
    let t = with_uplink(&cloud, 512).await;
    t.seed(3).await;
    let last = t.last_seq().await;
    let s = status_until(&t, Duration::from_secs(10), |s| {
        s["link"]["https"]["last_error"] == "HTTP 503"
    })
    .await;
    assert_eq!(s["backlog"]["events"], last);
    assert_eq!(s["backlog"]["oldest_age_s"], 0);
    assert_eq!(s["link"]["https"]["connected"], false);
    assert_eq!(s["link"]["https"]["delivered_seq"], 0);
    // 90 s later the oldest undelivered event is 90 s old.
    t.clock.set("2026-03-10T12:01:30Z");
    let s = status_until(&t, Duration::from_secs(5), |_| true).await;
    assert_eq!(s["backlog"]["oldest_age_s"], 90);

    cloud.answer_all(200);
    let s = status_until(&t, Duration::from_secs(40), |s| s["backlog"]["events"] == 0).await;
    assert_eq!(s["backlog"]["oldest_age_s"], Value::Null);
    assert_eq!(s["link"]["https"]["connected"], true);
    assert_eq!(s["link"]["https"]["delivered_seq"], last);
    t.stop().await;
}

#[tokio::test]
async fn over_the_cap_access_events_are_compacted_and_allocation_events_kept() {
    let cloud = FakeCloud::start().await;
    cloud.answer_all(503);
    let t = with_uplink(&cloud, 1).await;
    t.seed(2).await;
    assert_eq!(
        t.post(
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-started"})
        )
        .await
        .status,
        200
    );
    // 6000 access decisions (about 1.8 MiB undelivered; each half under the cap), written as the gate controller
    // writes them, with an allocation change in the middle.
    let store = t.gw.as_ref().unwrap().executor.store().clone();
    let now = "2026-03-10T12:00:00Z".parse().unwrap();
    let write = |from: usize| {
        let store = store.clone();
        async move {
            store
                .write(move |c| {
                    for i in from..from + 3000 {
                        let (kind, data) = if i.is_multiple_of(4) {
                            (EventType::AccessDenied, json!({"keypad": "kp-main", "zone": "main-gate", "contact_id": null, "units": [], "reason": "unknown_code", "note": "x".repeat(80)}))
                        } else {
                            (EventType::AccessGranted, json!({"keypad": format!("kp-{}", i % 2), "zone": "main-gate", "contact_id": "c2", "units": ["u1"], "note": "x".repeat(80)}))
                        };
                        events::append(c, kind, &data, now)?;
                    }
                    Ok::<_, unitgate::store::StoreError>(())
                })
                .await
                .unwrap()
        }
    };
    write(0).await;
    assert_eq!(
        t.post("/v1/contacts/c2/overlock", json!({})).await.status,
        200
    );
    write(3000).await;
    let before = t.events_after(0).await;

    // One queue.full, and a summary.
    let deadline = Instant::now() + Duration::from_secs(20);
    let evs = loop {
        let evs = t.events_after(0).await;
        if evs.iter().any(|e| e["type"] == "access.compacted") {
            // Read again: the pages above may straddle the compaction's commit.
            break t.events_after(0).await;
        }
        assert!(Instant::now() < deadline, "no compaction");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["seq"], i as i64 + 1, "seq stays gapless");
    }
    let full: Vec<_> = evs.iter().filter(|e| e["type"] == "queue.full").collect();
    assert_eq!(full.len(), 1);
    assert!(full[0]["data"]["backlog_bytes"].as_i64().unwrap() > 1 << 20);
    // Every non-access event is byte for byte as it was.
    for b in &before {
        let seq = b["seq"].as_i64().unwrap() as usize;
        let now = &evs[seq - 1];
        assert_eq!(now["id"], b["id"]);
        assert_eq!(now["type"], b["type"]);
        if !b["type"].as_str().unwrap().starts_with("access.") {
            assert_eq!(now, b, "seq {seq} untouched");
        }
    }
    assert!(evs.iter().any(|e| e["type"] == "unit.overlocked"));
    let summary = evs
        .iter()
        .find(|e| e["type"] == "access.compacted")
        .unwrap();
    let n = summary["data"]["count"].as_i64().unwrap();
    assert_eq!(n, 6000 - 1000, "all but the newest 1000 access events");
    let compacted: Vec<_> = evs
        .iter()
        .filter(|e| e["data"]["compacted"] == true)
        .collect();
    assert_eq!(compacted.len() as i64, n);
    assert!(
        compacted
            .iter()
            .all(|e| e["data"]["summary_seq"] == summary["seq"])
    );
    let counts = summary["data"]["counts"].as_array().unwrap();
    let denied: i64 = counts
        .iter()
        .filter(|c| {
            c["type"] == "access.denied"
                && c["keypad"] == "kp-main"
                && c["reason"] == "unknown_code"
        })
        .map(|c| c["count"].as_i64().unwrap())
        .sum();
    let total: i64 = counts.iter().map(|c| c["count"].as_i64().unwrap()).sum();
    assert_eq!(total, n);
    assert!(
        denied > 1000,
        "denials counted per keypad and reason: {denied}"
    );

    // Delivered: the alarm clears once.
    cloud.answer_all(200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let evs = t.events_after(0).await;
        if evs.iter().any(|e| e["type"] == "queue.ok") {
            assert_eq!(evs.iter().filter(|e| e["type"] == "queue.full").count(), 1);
            break;
        }
        assert!(Instant::now() < deadline, "no queue.ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.stop().await;
}
