//! Inbound webhooks `POST /v1/webhooks/{source}` over real HTTP: the signature is the only
//! authentication; every refusal answers its exact status and code and changes nothing; a
//! replayed id is refused; the actions (auto overlock, overlock removal, deallocation) happen
//! with their events.

mod common;

use common::{TestClock, TestGateway, test_config};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use unitgate::config::WebhookSourceConfig;

const SECRET: &str = "whsec-billing-0123456789abcdef";
const SECRET2: &str = "whsec-billing2-0123456789abcdef";
/// The harness clock (2026-03-10T12:00:00Z) as unix seconds.
const NOW: i64 = 1_773_144_000;

/// Signs independently of the gateway's code: HMAC-SHA256 of "t.body", hex.
fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(format!("{t}.").as_bytes());
    m.update(body);
    format!("t={t},v1={}", hex::encode(m.finalize().into_bytes()))
}

/// A gateway with sources `billing` (records payments) and `billing2` (lifts overlocks),
/// auto overlock on, seeded with 3 units; u1 and u2 occupied by c2 (t-started).
async fn gateway() -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.site.auto_overlock = true;
    for (name, secret, lift) in [("billing", SECRET, false), ("billing2", SECRET2, true)] {
        // A trailing newline, as `echo secret > file` writes it, is not part of the secret.
        let path = dir.path().join(format!("{name}.secret"));
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        cfg.cloud.webhooks.push(WebhookSourceConfig {
            name: name.into(),
            secret_file: path,
            remove_overlock_on_payment: lift,
        });
    }
    cfg.validate().expect("valid");
    let t = TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await;
    t.seed(3).await;
    for u in ["u1", "u2"] {
        let a = t
            .post(
                &format!("/v1/units/{u}/grant_access"),
                json!({"tenancy_id": "t-started"}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    t
}

struct Sent {
    status: u16,
    body: Value,
}

impl Sent {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// POSTs raw bytes with an optional signature header.
async fn post_raw(t: &TestGateway, source: &str, body: &[u8], sig: Option<&str>) -> Sent {
    let mut rb = t
        .client
        .post(format!("{}/v1/webhooks/{source}", t.base))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = sig {
        rb = rb.header("X-Unitgate-Signature", s);
    }
    let res = rb.send().await.unwrap();
    let status = res.status().as_u16();
    let body = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap_or(Value::Null);
    Sent { status, body }
}

/// POSTs `event` signed now with the source's secret.
async fn send(t: &TestGateway, source: &str, secret: &str, event: &Value) -> Sent {
    let body = serde_json::to_vec(event).unwrap();
    post_raw(t, source, &body, Some(&signature(secret, NOW, &body))).await
}

fn event(id: &str, kind: &str, data: Value) -> Value {
    json!({"id": id, "event": kind, "timestamp": "2026-03-10T11:59:58Z", "data": data})
}

#[tokio::test]
async fn payment_failed_overlocks_with_events_and_a_replay_is_refused() {
    let t = gateway().await;
    let before = t.last_seq().await;
    // The reference platform's shape: the contact as data.payment.customer_id.
    let ev = event(
        "evt_pf_1",
        "payment.failed",
        json!({"payment": {"id": "pay_1", "customer_id": "c2", "failure_code": "card_declined"}}),
    );
    let a = send(&t, "billing", SECRET, &ev).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["ignored"], false);
    assert_eq!(a.body["result"]["overlocked"], true);
    assert_eq!(a.body["result"]["event_id"], "evt_pf_1");
    assert_eq!(t.status_of("u1").await, "overlocked");
    assert_eq!(t.status_of("u2").await, "overlocked");
    assert_eq!(t.status_of("u3").await, "available");
    let evs = t.events_after(before).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["unit.overlocked", "unit.overlocked"]);
    assert_eq!(evs[0]["data"]["contact_id"], "c2");

    // The same id again, even re-signed later: 409 replayed, nothing written.
    let seq = t.last_seq().await;
    let a = send(&t, "billing", SECRET, &ev).await;
    assert_eq!((a.status, a.code()), (409, "replayed"), "{:?}", a.body);
    assert_eq!(t.last_seq().await, seq);
    // Ids are per source: billing2 may use the same id (its payment.failed changes nothing
    // more: the units are already overlocked).
    let a = send(&t, "billing2", SECRET2, &ev).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["result"]["overlocked"], false);
    assert_eq!(t.last_seq().await, seq);
    t.stop().await;
}

/// A request that must be refused.
struct Case {
    name: &'static str,
    source: &'static str,
    body: Vec<u8>,
    sig: Option<String>,
    status: u16,
    code: &'static str,
}

impl Case {
    fn new(
        name: &'static str,
        source: &'static str,
        (body, sig): (Vec<u8>, Option<String>),
        status: u16,
        code: &'static str,
    ) -> Self {
        Case {
            name,
            source,
            body,
            sig,
            status,
            code,
        }
    }
}

#[tokio::test]
async fn every_refusal_has_its_status_and_code_and_changes_nothing() {
    let t = gateway().await;
    let seq = t.last_seq().await;
    let ev = event("evt_x", "payment.failed", json!({"contact_id": "c2"}));
    let body = serde_json::to_vec(&ev).unwrap();
    let good = signature(SECRET, NOW, &body);
    let mut tampered = body.clone();
    let n = tampered.len();
    tampered[n - 3] = b'3'; // "c2" -> "c3"
    let big = {
        let mut e = ev.clone();
        e["data"]["pad"] = json!("x".repeat(1 << 20));
        serde_json::to_vec(&e).unwrap()
    };
    // Signed well, with a body of our choosing.
    let signed = |b: &[u8]| (b.to_vec(), Some(signature(SECRET, NOW, b)));
    let with = |sig: Option<String>| (body.clone(), sig);
    let cases: Vec<Case> = vec![
        Case::new(
            "wrong secret",
            "billing",
            with(Some(signature("nope", NOW, &body))),
            401,
            "signature_invalid",
        ),
        Case::new(
            "other source's secret",
            "billing",
            with(Some(signature(SECRET2, NOW, &body))),
            401,
            "signature_invalid",
        ),
        Case::new(
            "tampered body",
            "billing",
            (tampered.clone(), Some(good.clone())),
            401,
            "signature_invalid",
        ),
        Case::new("no header", "billing", with(None), 401, "signature_missing"),
        Case::new(
            "garbage header",
            "billing",
            with(Some("sha256=abc".into())),
            401,
            "signature_invalid",
        ),
        Case::new(
            "stale",
            "billing",
            with(Some(signature(SECRET, NOW - 301, &body))),
            401,
            "signature_expired",
        ),
        Case::new(
            "future",
            "billing",
            with(Some(signature(SECRET, NOW + 301, &body))),
            401,
            "signature_expired",
        ),
        Case::new(
            "unknown source",
            "stripe",
            with(Some(good.clone())),
            404,
            "not_found",
        ),
        Case::new(
            "malformed JSON",
            "billing",
            signed(b"{\"id\": "),
            400,
            "malformed_json",
        ),
        Case::new(
            "no id",
            "billing",
            signed(br#"{"event":"payment.failed","data":{"contact_id":"c2"}}"#),
            422,
            "validation_error",
        ),
        Case::new(
            "no contact",
            "billing",
            signed(br#"{"id":"e9","event":"payment.failed","data":{}}"#),
            422,
            "validation_error",
        ),
        Case::new(
            "unknown contact",
            "billing",
            signed(br#"{"id":"e8","event":"payment.failed","data":{"contact_id":"c404"}}"#),
            404,
            "not_found",
        ),
        Case::new(
            "oversized",
            "billing",
            signed(&big),
            413,
            "payload_too_large",
        ),
    ];
    for Case {
        name,
        source,
        body,
        sig,
        status,
        code,
    } in cases
    {
        let a = post_raw(&t, source, &body, sig.as_deref()).await;
        assert_eq!((a.status, a.code()), (status, code), "{name}: {:?}", a.body);
        assert!(
            a.body["error"]["request_id"].is_string(),
            "{name}: error shape"
        );
        assert_eq!(t.last_seq().await, seq, "{name}: nothing written");
        assert_eq!(t.status_of("u1").await, "occupied", "{name}");
    }
    // A bearer token is no substitute for the signature.
    let a = t
        .call(
            reqwest::Method::POST,
            "/v1/webhooks/billing",
            Some(common::ADMIN),
            Some(&ev),
            &[],
        )
        .await;
    assert_eq!((a.status, a.code()), (401, "signature_missing"));
    // No refusal took the id: the genuine request still applies, once.
    let a = post_raw(&t, "billing", &body, Some(&good)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(t.status_of("u1").await, "overlocked");
    t.stop().await;
}

#[tokio::test]
async fn tenancy_ended_deallocates_its_units() {
    let t = gateway().await;
    let before = t.last_seq().await;
    // An end date still ahead: nothing yet.
    let a = send(
        &t,
        "billing",
        SECRET,
        &event(
            "evt_te_0",
            "tenancy.ended",
            json!({"tenancy_id": "t-started", "end_date": "2026-03-31"}),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["result"]["deallocated"], false);
    assert_eq!(t.status_of("u1").await, "occupied");

    let a = send(
        &t,
        "billing",
        SECRET,
        &event(
            "evt_te_1",
            "tenancy.ended",
            json!({"tenancy_id": "t-started", "end_date": "2026-03-10"}),
        ),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["result"]["deallocated"], true);
    assert_eq!(a.body["result"]["units"].as_array().unwrap().len(), 2);
    assert_eq!(t.status_of("u1").await, "available");
    assert_eq!(t.status_of("u2").await, "available");
    let evs = t.events_after(before).await;
    let kinds: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "unit.deallocated",
            "unit.available",
            "unit.deallocated",
            "unit.available"
        ]
    );
    assert!(evs.iter().all(|e| e["data"]["by"] == "webhook:billing"));

    let a = send(
        &t,
        "billing",
        SECRET,
        &event("evt_te_2", "tenancy.ended", json!({"tenancy_id": "t-nope"})),
    )
    .await;
    assert_eq!((a.status, a.code()), (404, "not_found"));
    t.stop().await;
}

#[tokio::test]
async fn payment_processed_lifts_the_overlock_only_where_configured() {
    let t = gateway().await;
    let a = t.post("/v1/contacts/c2/overlock", json!({})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seq = t.last_seq().await;
    let paid = |id: &str| event(id, "payment.processed", json!({"contact_id": "c2"}));

    // billing records it and changes nothing.
    let a = send(&t, "billing", SECRET, &paid("evt_pp_1")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["result"]["overlock_removed"], false);
    assert_eq!(t.status_of("u1").await, "overlocked");
    assert_eq!(t.last_seq().await, seq);

    // billing2 lifts it, with events naming the source.
    let a = send(&t, "billing2", SECRET2, &paid("evt_pp_2")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["result"]["overlock_removed"], true);
    assert_eq!(t.status_of("u1").await, "occupied");
    assert_eq!(t.status_of("u2").await, "occupied");
    let evs = t.events_after(seq).await;
    assert_eq!(evs.len(), 2);
    assert!(
        evs.iter()
            .all(|e| e["type"] == "unit.occupied" && e["data"]["by"] == "webhook:billing2")
    );

    // Nothing overlocked any more: 200, nothing changes.
    let a = send(&t, "billing2", SECRET2, &paid("evt_pp_3")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["result"]["overlock_removed"], false);
    t.stop().await;
}

#[tokio::test]
async fn unknown_types_are_acknowledged_and_ignored() {
    let t = gateway().await;
    let seq = t.last_seq().await;
    let ev = json!({"id": "evt_b_1", "type": "booking.created", "data": {"booking": {"id": "b1"}}});
    let a = send(&t, "billing", SECRET, &ev).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["ignored"], true);
    assert_eq!(a.body["type"], "booking.created");
    assert_eq!(t.last_seq().await, seq);
    // Recorded: its id is taken.
    let a = send(&t, "billing", SECRET, &ev).await;
    assert_eq!((a.status, a.code()), (409, "replayed"));
    t.stop().await;
}
