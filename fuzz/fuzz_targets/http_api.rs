//! HTTP requests through the real router (auth, extractors, the serde types of every
//! handler, idempotency, the SQLite replica). Input: route byte, flags byte, then
//! `path parameter or query\nbody`. Flags: bit 0 an `Idempotency-Key`, bit 1 an
//! `If-Match`, bit 2 a JSON content type. Checks: never 5xx; an error answer has the
//! contract's error shape; a non-empty success answer is JSON.
#![no_main]

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;
use unitgate_fuzz::{TOKEN, assert_error_shape, site, split_line};

const ROUTES: &[(Method, &str)] = &[
    (Method::POST, "/v1/units/{}/reserve"),
    (Method::POST, "/v1/units/{}/grant_access"),
    (Method::POST, "/v1/units/{}/deallocate"),
    (Method::POST, "/v1/units/{}/set_status"),
    (Method::POST, "/v1/contacts/{}/overlock"),
    (Method::POST, "/v1/contacts/{}/remove_overlock"),
    (Method::POST, "/v1/contacts/{}/payment_failed"),
    (Method::GET, "/v1/units?{}"),
    (Method::POST, "/v1/units"),
    (Method::GET, "/v1/units/available?{}"),
    (Method::GET, "/v1/units/{}"),
    (Method::PATCH, "/v1/units/{}"),
    (Method::PUT, "/v1/units/{}"),
    (Method::PUT, "/v1/units/bulk_update"),
    (Method::POST, "/v1/units/bulk_create"),
    (Method::GET, "/v1/unit_types/{}"),
    (Method::PUT, "/v1/unit_types/{}"),
    (Method::GET, "/v1/contacts/{}"),
    (Method::PUT, "/v1/contacts/{}"),
    (Method::GET, "/v1/tenancies/{}"),
    (Method::PUT, "/v1/tenancies/{}"),
    (Method::PUT, "/v1/sync/snapshot"),
    (Method::GET, "/v1/events?{}"),
    (Method::GET, "/v1/devices"),
    (Method::GET, "/v1/status"),
];

fuzz_target!(|data: &[u8]| {
    let [route, flags, rest @ ..] = data else {
        return;
    };
    let (method, template) = &ROUTES[usize::from(*route) % ROUTES.len()];
    let (param, body) = split_line(rest);
    let Ok(param) = std::str::from_utf8(param) else {
        return;
    };
    let mut b = Request::builder()
        .method(method.clone())
        .uri(template.replace("{}", param))
        .header("authorization", format!("Bearer {TOKEN}"));
    if flags & 1 != 0 {
        b = b.header("idempotency-key", format!("k{}", flags >> 3));
    }
    if flags & 2 != 0 {
        b = b.header("if-match", format!("{}", flags >> 3));
    }
    if flags & 4 != 0 {
        b = b.header("content-type", "application/json");
    }
    let Ok(req) = b.body(Body::from(body.to_vec())) else {
        return; // not a valid URI: hyper would have refused it before the router
    };
    let s = site();
    let (status, answer) = s.rt.block_on(async {
        let res = s.router.clone().oneshot(req).await.expect("infallible");
        let status = res.status().as_u16();
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20)
            .await
            .expect("body");
        (status, bytes)
    });
    assert!(
        status < 500,
        "{method} {template} answered {status}: {answer:?}"
    );
    if status >= 400 {
        let v: serde_json::Value = serde_json::from_slice(&answer)
            .unwrap_or_else(|e| panic!("error answer is not JSON ({e}): {answer:?}"));
        assert_error_shape(&v);
    } else if !answer.is_empty() {
        serde_json::from_slice::<serde_json::Value>(&answer)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {answer:?}"));
    }
});
