//! Webhooks: the `X-Unitgate-Signature` header check (`webhooks::verify`) on any header and
//! body, then the body through `POST /v1/webhooks/{source}` of the real router, signed by
//! the harness so the fuzzer reaches the event parsing and the actions. Input:
//! `header\nbody`. Checks: a fuzzed header never verifies (the fuzzer has no secret); a
//! real signature verifies within the tolerance and not outside it, survives extra
//! schemes beside it, and breaks when the body changes; the route answers 200 with a
//! `WebhookResult` or the contract's error shape, never 5xx.
#![no_main]

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use unitgate::cloud::webhooks::{SIGNATURE_HEADER, SignatureError, TOLERANCE_S, sign, verify};
use unitgate_fuzz::{WEBHOOK_SECRET, WEBHOOK_SOURCE, assert_error_shape, site, split_line};

fuzz_target!(|data: &[u8]| {
    let (header, body) = split_line(data);
    let header = String::from_utf8_lossy(header);
    let now = 1_750_000_000;
    if verify(Some(&header), body, WEBHOOK_SECRET, now).is_ok() {
        panic!("a forged signature verified: {header:?}");
    }
    let t = now - (body.len() as i64 % (2 * TOLERANCE_S + 1)) + TOLERANCE_S;
    let good = sign(WEBHOOK_SECRET, t, body);
    assert_eq!(verify(Some(&good), body, WEBHOOK_SECRET, now), Ok(()));
    let rotated = format!("v0=abc, {good} ,v1=00ff");
    assert_eq!(verify(Some(&rotated), body, WEBHOOK_SECRET, now), Ok(()));
    assert!(matches!(
        verify(Some(&good), body, WEBHOOK_SECRET, t + TOLERANCE_S + 1),
        Err(SignatureError::Expired(_))
    ));
    let mut bent = body.to_vec();
    bent.push(b' ');
    assert_eq!(
        verify(Some(&good), &bent, WEBHOOK_SECRET, now),
        Err(SignatureError::Mismatch)
    );

    // The whole route, signed at the gateway's clock.
    let s = site();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let req = Request::post(format!("/v1/webhooks/{WEBHOOK_SOURCE}"))
        .header(SIGNATURE_HEADER, sign(WEBHOOK_SECRET, now, body))
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let (status, answer) = s.rt.block_on(async {
        let res = s.router.clone().oneshot(req).await.expect("infallible");
        let status = res.status().as_u16();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, bytes)
    });
    assert!(status < 500, "webhook answered {status}: {answer:?}");
    let v: serde_json::Value = serde_json::from_slice(&answer).expect("JSON answer");
    if status == 200 {
        let r: unitgate::cloud::webhooks::WebhookResult =
            serde_json::from_value(v).expect("a WebhookResult");
        assert!(!r.id.is_empty());
    } else {
        assert_error_shape(&v);
    }
});
