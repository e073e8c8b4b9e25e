//! The HTTPS event uplink against a fake cloud (a real axum server): batches in seq order
//! with signatures verified independently; failures retried without loss and without
//! duplicates beyond the retried batch; the cursor survives a restart; Retry-After honoured;
//! a refusing endpoint is not hammered.

#[path = "common/cloud.rs"]
mod cloud;
mod common;

use cloud::{FakeCloud, Received, verify};
use common::{TestClock, TestGateway, test_config};
use serde_json::json;
use std::time::Duration;

const SECRET: &str = "uplink-secret-0123456789abcdef";
const NOW: i64 = 1_773_144_000;

async fn gateway(cloud: &FakeCloud, batch: u32) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.cloud.https_uplink = Some(cloud.uplink_config(dir.path(), SECRET, batch));
    cfg.validate().expect("valid");
    TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await
}

/// Some history: 4 units created, two granted, one overlocked.
async fn make_events(t: &TestGateway) -> i64 {
    t.seed(4).await;
    for u in ["u1", "u2"] {
        let a = t
            .post(
                &format!("/v1/units/{u}/grant_access"),
                json!({"tenancy_id": "t-started"}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    assert_eq!(
        t.post("/v1/contacts/c2/overlock", json!({})).await.status,
        200
    );
    t.last_seq().await
}

/// Checks every request: signed correctly at the gateway's time, for this site, and each
/// one starting right after the last acknowledged seq (so only a failed batch repeats).
/// Returns the acknowledged seqs in order.
fn check_requests(received: &[Received], batch: usize) -> Vec<i64> {
    let mut acked = Vec::new();
    for r in received {
        let t = verify(SECRET, r.signature.as_deref().expect("signed"), &r.body);
        assert!((t - NOW).abs() <= 300, "t = {t}");
        let body = r.json();
        assert_eq!(body["site_id"], "site-test");
        let seqs = r.seqs();
        assert!(
            !seqs.is_empty() && seqs.len() <= batch,
            "batch of {}",
            seqs.len()
        );
        let expected_first = acked.last().copied().unwrap_or(0) + 1;
        assert_eq!(
            seqs[0], expected_first,
            "starts after the last acknowledged seq"
        );
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "in seq order: {seqs:?}"
        );
        for e in body["events"].as_array().unwrap() {
            assert!(e["id"].is_string() && e["type"].is_string() && e["occurred_at"].is_string());
        }
        if (200..300).contains(&r.answered) {
            acked.extend(seqs);
        }
    }
    acked
}

#[tokio::test]
async fn batches_arrive_in_order_signed_and_each_event_once() {
    let cloud = FakeCloud::start().await;
    let t = gateway(&cloud, 3).await;
    let last = make_events(&t).await;
    assert!(last > 6, "enough for several batches: {last}");
    let received = cloud.wait_delivered(last, Duration::from_secs(20)).await;
    let acked = check_requests(&received, 3);
    assert_eq!(acked, (1..=last).collect::<Vec<_>>());
    assert!(
        received.iter().all(|r| r.answered == 200),
        "no retries were needed"
    );
    t.stop().await;
}

#[tokio::test]
async fn failures_are_retried_without_loss_and_the_cursor_survives_a_restart() {
    let cloud = FakeCloud::start().await;
    cloud.answer_next(&[(503, None), (503, None), (500, None)]);
    let mut t = gateway(&cloud, 3).await;
    let last = make_events(&t).await;
    let received = cloud.wait_delivered(last, Duration::from_secs(30)).await;
    let acked = check_requests(&received, 3);
    assert_eq!(
        acked,
        (1..=last).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    let failed: Vec<_> = received.iter().filter(|r| r.answered != 200).collect();
    assert_eq!(failed.len(), 3);
    assert!(
        failed.iter().all(|r| r.seqs() == failed[0].seqs()),
        "only the failed batch was repeated"
    );

    // The link shows the recovery; the backlog is empty.
    let s = t.get("/v1/status").await;
    assert_eq!(s.body["link"]["https"]["connected"], true, "{:?}", s.body);
    assert_eq!(s.body["link"]["https"]["delivered_seq"], last);
    assert_eq!(s.body["link"]["https"]["last_error"], "HTTP 500");

    // Restart: the cursor was stored, so only new events go out.
    let before = cloud.received().len();
    t.restart().await;
    assert_eq!(
        t.post("/v1/contacts/c2/remove_overlock", json!({}))
            .await
            .status,
        200
    );
    let newest = t.last_seq().await;
    let received = cloud.wait_delivered(newest, Duration::from_secs(20)).await;
    let after_restart = &received[before..];
    assert!(!after_restart.is_empty());
    assert_eq!(
        after_restart[0].seqs()[0],
        last + 1,
        "no redelivery after a restart"
    );
    let acked = check_requests(&received, 3);
    assert_eq!(acked, (1..=newest).collect::<Vec<_>>());
    t.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let cloud = FakeCloud::start().await;
    cloud.answer_next(&[(429, Some("2"))]);
    let t = gateway(&cloud, 100).await;
    let last = make_events(&t).await;
    let received = cloud.wait_delivered(last, Duration::from_secs(20)).await;
    assert_eq!(received[0].answered, 429);
    let gap = received[1].at - received[0].at;
    // Without Retry-After the first retry comes after 125-250 ms.
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert!(gap < Duration::from_secs(4), "retried after {gap:?}");
    t.stop().await;
}

#[tokio::test]
async fn a_refusing_endpoint_is_not_hammered() {
    let cloud = FakeCloud::start().await;
    cloud.answer_next(&[(401, None)]);
    let t = gateway(&cloud, 100).await;
    t.seed(1).await;
    // Wait for the refusal to show, then give a misbehaving loop time to spin.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = t.get("/v1/status").await;
        if s.body["link"]["https"]["last_error"] == "HTTP 401" {
            assert_eq!(s.body["link"]["https"]["connected"], false);
            assert!(s.body["backlog"]["events"].as_i64().unwrap() > 0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", s.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cloud.received().len(),
        1,
        "a 4xx backs off for at least 15 s"
    );
    t.stop().await;
}
