//! The HTTP envelope against the real server: bearer auth and scopes, the error shape on
//! every failure (with `request_id` = `X-Request-Id`), body limits and parsing,
//! `Idempotency-Key` replays, `/openapi.json` and `/v1/events` paging.

mod common;

use common::{ADMIN, ALLOCATOR, Answer, READER, TestGateway, UNITS};
use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---- helpers ----------------------------------------------------------------------------

const JSON: &[u8] = b"application/json";
const MIB: usize = 1 << 20;

/// Sends raw bytes: headers as bytes (so invalid values can be sent), body as given.
async fn send(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &[u8])],
    body: Option<Vec<u8>>,
) -> Answer {
    let mut rb = client.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        let value = HeaderValue::from_bytes(v).expect("header value");
        rb = rb.header(name, value);
    }
    if let Some(b) = body {
        rb = rb.body(b);
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

/// Sends on the test gateway.
async fn req(
    t: &TestGateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &[u8])],
    body: Option<Vec<u8>>,
) -> Answer {
    send(&t.client, &t.base, method, path, token, headers, body).await
}

/// A JSON request with extra headers (Content-Type is set).
async fn json_req(
    t: &TestGateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &Value,
    extra: &[(&str, &[u8])],
) -> Answer {
    let mut headers: Vec<(&str, &[u8])> = vec![("content-type", JSON)];
    headers.extend_from_slice(extra);
    let bytes = serde_json::to_vec(body).expect("json");
    req(t, method, path, token, &headers, Some(bytes)).await
}

/// A POST as admin with an `Idempotency-Key`.
async fn post_key(t: &TestGateway, path: &str, body: &Value, key: &str) -> Answer {
    json_req(
        t,
        Method::POST,
        path,
        Some(ADMIN),
        body,
        &[("idempotency-key", key.as_bytes())],
    )
    .await
}

/// Asserts the contract's error shape with this status and code, and returns the `error` object.
#[track_caller]
fn assert_error(a: &Answer, status: u16, code: &str) -> Value {
    let raw = String::from_utf8_lossy(&a.raw);
    assert_eq!(a.status, status, "status; body: {raw}");
    assert!(
        a.header("content-type")
            .is_some_and(|ct| ct.starts_with("application/json")),
        "error content-type {:?}; body: {raw}",
        a.header("content-type")
    );
    let top = a
        .body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not a JSON object: {raw}"));
    assert_eq!(
        top.keys().collect::<Vec<_>>(),
        vec!["error"],
        "only `error` at the top: {raw}"
    );
    let e = &a.body["error"];
    let keys: BTreeSet<&str> = e
        .as_object()
        .expect("error object")
        .keys()
        .map(String::as_str)
        .collect();
    for k in ["code", "message", "details", "request_id"] {
        assert!(keys.contains(k), "error lacks {k}: {raw}");
    }
    assert!(
        keys.iter()
            .all(|k| ["code", "message", "details", "request_id", "error_hash"].contains(k)),
        "unexpected keys in error: {raw}"
    );
    assert_eq!(e["code"], code, "code; body: {raw}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message: {raw}"
    );
    for d in e["details"].as_array().expect("details is an array") {
        assert!(d["field"].is_string(), "detail field: {raw}");
        assert!(d["message"].is_string(), "detail message: {raw}");
    }
    let rid = e["request_id"].as_str().expect("request_id is a string");
    assert!(!rid.is_empty(), "request_id: {raw}");
    assert_eq!(
        a.header("x-request-id").as_deref(),
        Some(rid),
        "request_id equals the X-Request-Id header"
    );
    if status == 401 {
        assert_eq!(a.header("www-authenticate").as_deref(), Some("Bearer"));
    }
    e.clone()
}

/// The `field`s named in an error's details.
fn fields(e: &Value) -> Vec<String> {
    e["details"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .filter_map(|d| d["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Everything observable: units, the seeded people, and the whole event log.
async fn replica(t: &TestGateway) -> Value {
    let units = t.get("/v1/units?limit=200").await;
    assert_eq!(units.status, 200, "{:?}", units.body);
    let mut people = Vec::new();
    for p in [
        "/v1/unit_types/small",
        "/v1/contacts/c1",
        "/v1/contacts/c2",
        "/v1/contacts/c3",
        "/v1/tenancies/t-future",
        "/v1/tenancies/t-started",
        "/v1/tenancies/t-other",
        "/v1/tenancies/t-ended",
    ] {
        let a = t.get(p).await;
        people.push(json!({"path": p, "status": a.status, "body": a.body}));
    }
    json!({"units": units.body, "people": people, "events": t.events_after(0).await})
}

/// Events of one type after `seq`.
async fn events_of(t: &TestGateway, after: i64, kind: &str) -> Vec<Value> {
    t.events_after(after)
        .await
        .into_iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

/// A minimal HTTP/1.1 exchange over a raw socket (chunked bodies, bytes reqwest won't send).
/// Returns the status and the body; the server is told to close after answering.
async fn raw_exchange(t: &TestGateway, head: &str, body: Vec<u8>) -> (u16, Vec<u8>, String) {
    let addr = t.base.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let mut request = head.as_bytes().to_vec();
    request.extend_from_slice(&body);
    // The server may answer before reading everything: write on the side, ignore write errors.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        let _ = wr.flush().await;
        wr
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let _ = writer.await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head:?}"));
    (status, body.as_bytes().to_vec(), head.to_ascii_lowercase())
}

/// Encodes `body` as HTTP/1.1 chunks.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// `{"by":"xxx…"}` of exactly `len` bytes.
fn by_body_of_len(len: usize) -> Vec<u8> {
    let overhead = br#"{"by":""}"#.len();
    let mut b = br#"{"by":""#.to_vec();
    b.extend(std::iter::repeat_n(b'x', len - overhead));
    b.extend_from_slice(br#""}"#);
    assert_eq!(b.len(), len);
    b
}

// ---- auth -------------------------------------------------------------------------------

#[tokio::test]
async fn missing_token_is_401_with_bearer_challenge_and_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let before = replica(&t).await;

    let a = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        None,
        &json!({"tenancy_id": "t-future"}),
        &[],
    )
    .await;
    let e = assert_error(&a, 401, "unauthorized");
    assert!(e["request_id"].as_str().unwrap().starts_with("req_"), "{e}");

    // Auth comes before the body: a broken body without a token is still a 401.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        None,
        &[("content-type", JSON)],
        Some(b"{not json".to_vec()),
    )
    .await;
    assert_error(&a, 401, "unauthorized");

    // Reads need a token too.
    for path in ["/v1/units", "/v1/units/u1", "/v1/events", "/v1/contacts/c1"] {
        let a = req(&t, Method::GET, path, None, &[], None).await;
        assert_error(&a, 401, "unauthorized");
    }
    assert_eq!(replica(&t).await, before);
    assert_eq!(t.status_of("u1").await, "available");
    t.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_401_and_change_nothing() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let before = replica(&t).await;
    let basic = format!("Basic {ADMIN}");
    let no_scheme = ADMIN.to_owned();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("wrong token", b"Bearer not-a-configured-token".to_vec()),
        ("Basic with the admin token", basic.into_bytes()),
        ("token without scheme", no_scheme.into_bytes()),
        ("Bearer without token", b"Bearer".to_vec()),
        ("Bearer with empty token", b"Bearer ".to_vec()),
        ("Digest", b"Digest username=\"admin\"".to_vec()),
        ("non-ASCII token", b"Bearer \xff\xfe-token".to_vec()),
        (
            "admin token with a suffix",
            format!("Bearer {ADMIN}x").into_bytes(),
        ),
        (
            "admin token truncated",
            format!("Bearer {}", &ADMIN[..ADMIN.len() - 1]).into_bytes(),
        ),
    ];
    for (what, auth) in &cases {
        let a = req(
            &t,
            Method::POST,
            "/v1/units/u1/reserve",
            None,
            &[("authorization", auth), ("content-type", JSON)],
            Some(br#"{"tenancy_id":"t-future"}"#.to_vec()),
        )
        .await;
        assert_eq!(a.status, 401, "{what}: {:?}", a.body);
        assert_error(&a, 401, "unauthorized");
    }
    assert_eq!(replica(&t).await, before);

    // The scheme is case-insensitive (RFC 7235): the same request with "bearer" works.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        None,
        &[
            ("authorization", format!("bearer {ADMIN}").as_bytes()),
            ("content-type", JSON),
        ],
        Some(br#"{"tenancy_id":"t-future"}"#.to_vec()),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(t.status_of("u1").await, "reserved");
    t.stop().await;
}

#[tokio::test]
async fn scopes_are_enforced_and_a_refusal_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let before = replica(&t).await;
    let empty_snapshot =
        json!({"unit_types": [], "units": [], "contacts": [], "tenancies": [], "allocations": []});
    let cases: Vec<(&str, &str, Method, &str, Value)> = vec![
        (
            "READER reserve",
            READER,
            Method::POST,
            "/v1/units/u1/reserve",
            json!({"tenancy_id": "t-future"}),
        ),
        (
            "READER grant_access",
            READER,
            Method::POST,
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-started"}),
        ),
        (
            "READER set_status",
            READER,
            Method::POST,
            "/v1/units/u1/set_status",
            json!({"status": "unavailable"}),
        ),
        (
            "READER PATCH unit",
            READER,
            Method::PATCH,
            "/v1/units/u1",
            json!({"unit": {"name": "Renamed"}}),
        ),
        (
            "READER PUT contact",
            READER,
            Method::PUT,
            "/v1/contacts/c1",
            json!({"name": "Renamed"}),
        ),
        (
            "ALLOCATOR PATCH unit",
            ALLOCATOR,
            Method::PATCH,
            "/v1/units/u1",
            json!({"unit": {"name": "Renamed"}}),
        ),
        (
            "ALLOCATOR PUT unit",
            ALLOCATOR,
            Method::PUT,
            "/v1/units/u1",
            json!({"unit": {"name": "Renamed"}}),
        ),
        (
            "ALLOCATOR PUT unit type",
            ALLOCATOR,
            Method::PUT,
            "/v1/unit_types/small",
            json!({"name": "Renamed"}),
        ),
        (
            "ALLOCATOR bulk_update",
            ALLOCATOR,
            Method::PUT,
            "/v1/units/bulk_update",
            json!({"units": [{"id": "u1", "name": "Renamed"}]}),
        ),
        (
            "UNITS reserve",
            UNITS,
            Method::POST,
            "/v1/units/u1/reserve",
            json!({"tenancy_id": "t-future"}),
        ),
        (
            "UNITS deallocate",
            UNITS,
            Method::POST,
            "/v1/units/u1/deallocate",
            json!({}),
        ),
        (
            "UNITS PUT tenancy",
            UNITS,
            Method::PUT,
            "/v1/tenancies/t-future",
            json!({"contact_id": "c2", "start_date": "2026-05-01"}),
        ),
        (
            "UNITS snapshot",
            UNITS,
            Method::PUT,
            "/v1/sync/snapshot",
            empty_snapshot.clone(),
        ),
        (
            "ALLOCATOR snapshot",
            ALLOCATOR,
            Method::PUT,
            "/v1/sync/snapshot",
            empty_snapshot.clone(),
        ),
        (
            "READER snapshot",
            READER,
            Method::PUT,
            "/v1/sync/snapshot",
            empty_snapshot.clone(),
        ),
    ];
    for (what, token, method, path, body) in &cases {
        let a = json_req(&t, method.clone(), path, Some(token), body, &[]).await;
        assert_eq!(a.status, 403, "{what}: {:?}", a.body);
        assert_error(&a, 403, "forbidden");
    }
    // Had any of them gone through (the empty snapshot would wipe everything), this differs.
    assert_eq!(replica(&t).await, before);

    // Controls: the right scope does work.
    let a = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ALLOCATOR),
        &json!({"tenancy_id": "t-future"}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = json_req(
        &t,
        Method::PATCH,
        "/v1/units/u2",
        Some(UNITS),
        &json!({"unit": {"name": "Renamed"}}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["name"], "Renamed");
    t.stop().await;
}

#[tokio::test]
async fn every_get_works_with_the_read_scope() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let gets = [
        "/v1/units",
        "/v1/units?status=available&limit=1",
        "/v1/units/available",
        "/v1/units/u1",
        "/v1/unit_types/small",
        "/v1/contacts/c1",
        "/v1/tenancies/t-future",
        "/v1/events",
        "/v1/events?after=1&limit=1",
        "/openapi.json",
        "/healthz",
    ];
    for path in gets {
        let a = req(&t, Method::GET, path, Some(READER), &[], None).await;
        assert_eq!(a.status, 200, "READER GET {path}: {:?}", a.body);
        assert!(a.body.is_object(), "GET {path} answers a JSON object");
    }
    // Scopes are not implied: a write-only token cannot read.
    let a = req(&t, Method::GET, "/v1/units", Some(ALLOCATOR), &[], None).await;
    assert_error(&a, 403, "forbidden");
    // The PIN is write-only, also for readers.
    let a = req(&t, Method::GET, "/v1/contacts/c1", Some(READER), &[], None).await;
    assert!(
        !String::from_utf8_lossy(&a.raw).contains("1111"),
        "{:?}",
        a.body
    );
    assert!(a.body["contact"].get("access_code").is_none());
    t.stop().await;
}

#[tokio::test]
async fn healthz_is_open_and_openapi_needs_a_token() {
    let t = TestGateway::start().await;
    let a = req(&t, Method::GET, "/healthz", None, &[], None).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["status"], "ok");
    assert_eq!(a.body["site_id"], "site-test");
    // A wrong token does not break the open route either.
    let a = req(&t, Method::GET, "/healthz", Some("nonsense"), &[], None).await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    let a = req(&t, Method::GET, "/openapi.json", None, &[], None).await;
    assert_error(&a, 401, "unauthorized");
    let a = req(
        &t,
        Method::GET,
        "/openapi.json",
        Some("nonsense"),
        &[],
        None,
    )
    .await;
    assert_error(&a, 401, "unauthorized");
    t.stop().await;
}

// ---- errors -----------------------------------------------------------------------------

#[tokio::test]
async fn unknown_route_is_404() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    for (method, path) in [
        (Method::GET, "/v1/nope"),
        (Method::GET, "/"),
        (Method::GET, "/v2/units"),
        (Method::GET, "/v1/units/"),
        (Method::GET, "//v1/units"),
        (Method::POST, "/v1/units/u1/reserve/extra"),
        (Method::POST, "/v1/units/u1/explode"),
        (Method::DELETE, "/v1/nothing/here"),
    ] {
        let a = req(&t, method.clone(), path, Some(ADMIN), &[], None).await;
        assert_eq!(a.status, 404, "{method} {path}: {:?}", a.body);
        assert_error(&a, 404, "not_found");
    }
    // An unknown id on a known route is also 404 not_found, with the shape.
    let a = t.get("/v1/units/u999").await;
    assert_error(&a, 404, "not_found");
    let a = t
        .post("/v1/units/u999/reserve", json!({"tenancy_id": "t-future"}))
        .await;
    assert_error(&a, 404, "not_found");
    t.stop().await;
}

#[tokio::test]
async fn wrong_method_on_a_known_route_is_405() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = replica(&t).await;
    for (method, path, allow) in [
        (Method::DELETE, "/v1/units/u1", "GET,HEAD,PATCH,PUT"),
        (Method::GET, "/v1/units/u1/reserve", "POST"),
        (Method::PUT, "/v1/units/u1/reserve", "POST"),
        (Method::GET, "/v1/units/u1/deallocate", "POST"),
        (Method::POST, "/v1/events", "GET,HEAD"),
        (Method::DELETE, "/v1/units", "GET,HEAD,POST"),
        (Method::GET, "/v1/sync/snapshot", "PUT"),
        (Method::POST, "/healthz", "GET,HEAD"),
        (Method::PATCH, "/v1/contacts/c1", "GET,HEAD,PUT"),
    ] {
        let a = req(&t, method.clone(), path, Some(ADMIN), &[], None).await;
        assert_eq!(a.status, 405, "{method} {path}: {:?}", a.body);
        assert_error(&a, 405, "method_not_allowed");
        let got: BTreeSet<String> = a
            .header("allow")
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_owned())
            .collect();
        let want: BTreeSet<String> = allow.split(',').map(str::to_owned).collect();
        assert_eq!(got, want, "Allow of {method} {path}");
    }
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

#[tokio::test]
async fn body_over_the_limit_is_413_and_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    assert_eq!(
        t.post("/v1/units/u1/reserve", json!({"tenancy_id": "t-future"}))
            .await
            .status,
        200
    );
    let before = replica(&t).await;

    // One byte over 1 MiB, with Content-Length.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/deallocate",
        Some(ADMIN),
        &[("content-type", JSON)],
        Some(by_body_of_len(MIB + 1)),
    )
    .await;
    assert_error(&a, 413, "payload_too_large");

    // Exactly 1 MiB is read and parsed (then refused for the overlong `by`).
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/deallocate",
        Some(ADMIN),
        &[("content-type", JSON)],
        Some(by_body_of_len(MIB)),
    )
    .await;
    let e = assert_error(&a, 422, "validation_error");
    assert_eq!(fields(&e), vec!["by"]);

    // Over the limit without Content-Length (chunked): still 413, still the error shape.
    let body = chunked(&by_body_of_len(MIB + 64 * 1024));
    let head = format!(
        "POST /v1/units/u1/deallocate HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nX-Request-Id: chunky-1\r\n\
         Connection: close\r\n\r\n"
    );
    let (status, raw, head) = raw_exchange(&t, &head, body).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&raw));
    assert!(head.contains("content-type: application/json"), "{head}");
    let v: Value = serde_json::from_slice(&raw).expect("JSON error body");
    assert_eq!(v["error"]["code"], "payload_too_large");
    assert_eq!(v["error"]["request_id"], "chunky-1");

    assert_eq!(replica(&t).await, before);
    assert_eq!(t.status_of("u1").await, "reserved");

    // The snapshot route has its own, larger limit: 1.5 MiB there is parsed, not refused by size.
    let mut big = b"{\"unit_types\": ".to_vec();
    big.extend(std::iter::repeat_n(b' ', MIB + MIB / 2));
    big.extend_from_slice(b"5");
    let a = req(
        &t,
        Method::PUT,
        "/v1/sync/snapshot",
        Some(ADMIN),
        &[("content-type", JSON)],
        Some(big),
    )
    .await;
    assert_error(&a, 400, "malformed_json");
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

#[tokio::test]
async fn body_needs_a_json_content_type() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    let before = replica(&t).await;
    let body = br#"{"tenancy_id":"t-future"}"#.to_vec();
    let bad: [&[u8]; 5] = [
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"application/jsonx",
        b"multipart/form-data; boundary=x",
        b"json",
    ];
    for ct in bad {
        let a = req(
            &t,
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            &[("content-type", ct)],
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            a.status,
            415,
            "{}: {:?}",
            String::from_utf8_lossy(ct),
            a.body
        );
        assert_error(&a, 415, "unsupported_media_type");
    }
    // No Content-Type at all, with a body.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &[],
        Some(body.clone()),
    )
    .await;
    assert_error(&a, 415, "unsupported_media_type");
    assert_eq!(replica(&t).await, before);

    // Parameters and case do not matter; `+json` types are JSON.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &[("content-type", b"Application/JSON; charset=utf-8")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u2/reserve",
        Some(ADMIN),
        &[("content-type", b"application/merge-patch+json")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    // An empty body needs no Content-Type: deallocate's body is optional.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/deallocate",
        Some(ADMIN),
        &[],
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["status"], "available");
    // ... but reserve's is not: an empty body is `{}`, missing `tenancy_id`.
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u3/reserve",
        Some(ADMIN),
        &[],
        None,
    )
    .await;
    let e = assert_error(&a, 422, "validation_error");
    assert_eq!(fields(&e), vec!["tenancy_id"]);
    t.stop().await;
}

#[tokio::test]
async fn malformed_json_and_garbage_are_400() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = replica(&t).await;
    let mut deep = "[".repeat(10_000);
    deep.push_str(&"]".repeat(10_000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", br#"{"tenancy_id": "#.to_vec()),
        (
            "trailing garbage",
            br#"{"tenancy_id":"t-future"} x"#.to_vec(),
        ),
        ("two documents", br#"{"tenancy_id":"t-future"}{}"#.to_vec()),
        ("single quotes", b"{'tenancy_id':'t-future'}".to_vec()),
        ("trailing comma", br#"{"tenancy_id":"t-future",}"#.to_vec()),
        ("bare word", b"reserve".to_vec()),
        ("binary garbage", vec![0x00, 0x01, 0x02, 0xff, 0xfe, 0x80]),
        (
            "invalid UTF-8 in a string",
            b"{\"tenancy_id\":\"t-\xff\xfe\"}".to_vec(),
        ),
        ("UTF-16 BOM", b"\xff\xfe{\x00}\x00".to_vec()),
        (
            "a lone surrogate escape",
            br#"{"tenancy_id":"\ud800"}"#.to_vec(),
        ),
        ("number out of range", br#"{"tenancy_id":1e999}"#.to_vec()),
        ("nested 10000 deep", deep.into_bytes()),
    ];
    for (what, body) in cases {
        let a = req(
            &t,
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            &[("content-type", JSON)],
            Some(body),
        )
        .await;
        assert_eq!(a.status, 400, "{what}: {:?}", a.body);
        assert_error(&a, 400, "malformed_json");
    }
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

#[tokio::test]
async fn json_that_does_not_fit_is_422_naming_the_field() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = replica(&t).await;
    let cases: Vec<(&str, Method, &str, Value, &str)> = vec![
        (
            "wrong type",
            Method::POST,
            "/v1/units/u1/reserve",
            json!({"tenancy_id": 5}),
            "tenancy_id",
        ),
        (
            "null for a required string",
            Method::POST,
            "/v1/units/u1/reserve",
            json!({"tenancy_id": null}),
            "tenancy_id",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/units/u1/reserve",
            json!({"tenancy_id": "t-future", "colour": "red"}),
            "colour",
        ),
        (
            "missing field",
            Method::POST,
            "/v1/units/u1/reserve",
            json!({"by": "ops"}),
            "tenancy_id",
        ),
        (
            "wrong type of an optional field",
            Method::POST,
            "/v1/units/u1/deallocate",
            json!({"by": 7}),
            "by",
        ),
        (
            "unknown enum value",
            Method::POST,
            "/v1/units/u1/set_status",
            json!({"status": "sold"}),
            "status",
        ),
        (
            "nested wrong type",
            Method::PATCH,
            "/v1/units/u1",
            json!({"unit": {"width": "wide"}}),
            "unit.width",
        ),
        (
            "nested unknown field",
            Method::PATCH,
            "/v1/units/u1",
            json!({"unit": {"colour": "red"}}),
            "unit.colour",
        ),
        (
            "missing wrapper",
            Method::PATCH,
            "/v1/units/u1",
            json!({"name": "X"}),
            "name",
        ),
        (
            "bad date",
            Method::PUT,
            "/v1/tenancies/t-new",
            json!({"contact_id": "c1", "start_date": "2026-13-45"}),
            "start_date",
        ),
        // serde reads an array as a struct's fields in order: without the object check,
        // `["t-future"]` reserved the unit.
        (
            "an array in place of the object",
            Method::POST,
            "/v1/units/u1/reserve",
            json!(["t-future"]),
            "body",
        ),
        (
            "an array in place of the set_status object",
            Method::POST,
            "/v1/units/u1/set_status",
            json!(["unavailable"]),
            "body",
        ),
        (
            "a string body",
            Method::POST,
            "/v1/units/u1/deallocate",
            json!("ops"),
            "body",
        ),
        (
            "a null body",
            Method::POST,
            "/v1/units/u1/deallocate",
            json!(null),
            "body",
        ),
        (
            "snapshot without a list",
            Method::PUT,
            "/v1/sync/snapshot",
            json!({"unit_types": [], "units": [], "contacts": [], "tenancies": []}),
            "allocations",
        ),
    ];
    for (what, method, path, body, field) in cases {
        let a = json_req(&t, method, path, Some(ADMIN), &body, &[]).await;
        assert_eq!(a.status, 422, "{what}: {:?}", a.body);
        let e = assert_error(&a, 422, "validation_error");
        assert_eq!(fields(&e), vec![field], "{what}: {e}");
    }
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

/// Guards a bug: serde reads a JSON array as a struct's fields in order, so
/// `{"unit": ["u1", "Renamed"]}` used to rename u1 and `{"units": [["u1", "Renamed"]]}` to
/// bulk-update it. Arrays are now refused wherever the API takes no array.
#[tokio::test]
async fn nested_arrays_are_not_read_as_structs() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = replica(&t).await;
    let a = t
        .patch("/v1/units/u1", json!({"unit": ["u1", "Renamed"]}))
        .await;
    let e = assert_error(&a, 422, "validation_error");
    assert_eq!(fields(&e), vec!["unit"]);
    let a = t
        .put(
            "/v1/units/bulk_update",
            json!({"units": [["u1", "Renamed"]]}),
        )
        .await;
    let e = assert_error(&a, 422, "validation_error");
    assert_eq!(fields(&e), vec!["units[0]"]);
    let a = t
        .put("/v1/sync/snapshot", json!({"unit_types": [["small", "S"]], "units": [], "contacts": [], "tenancies": [], "allocations": []}))
        .await;
    let e = assert_error(&a, 422, "validation_error");
    assert_eq!(fields(&e), vec!["unit_types[0]"]);
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

#[tokio::test]
async fn request_id_is_echoed_or_replaced() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let is_generated = |rid: &str| {
        rid.strip_prefix("req_")
            .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    };

    // A sane id comes back in the header and in the error body.
    let a = req(
        &t,
        Method::GET,
        "/v1/units/u999",
        Some(ADMIN),
        &[("x-request-id", b"abc-123")],
        None,
    )
    .await;
    let e = assert_error(&a, 404, "not_found");
    assert_eq!(e["request_id"], "abc-123");
    // ... on success too, and on errors raised before any handler (auth, routing, body).
    let a = req(
        &t,
        Method::GET,
        "/v1/units/u1",
        Some(READER),
        &[("x-request-id", b"ok.id:7_x")],
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-request-id").as_deref(), Some("ok.id:7_x"));
    let a = req(
        &t,
        Method::GET,
        "/v1/units",
        None,
        &[("x-request-id", b"abc-123")],
        None,
    )
    .await;
    assert_eq!(
        assert_error(&a, 401, "unauthorized")["request_id"],
        "abc-123"
    );
    let a = req(
        &t,
        Method::GET,
        "/v1/nope",
        Some(ADMIN),
        &[("x-request-id", b"abc-123")],
        None,
    )
    .await;
    assert_eq!(assert_error(&a, 404, "not_found")["request_id"], "abc-123");
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &[("x-request-id", b"abc-123"), ("content-type", JSON)],
        Some(b"{".to_vec()),
    )
    .await;
    assert_eq!(
        assert_error(&a, 400, "malformed_json")["request_id"],
        "abc-123"
    );
    // A 64-character id is still accepted.
    let max = "a".repeat(64);
    let a = req(
        &t,
        Method::GET,
        "/v1/units/u999",
        Some(ADMIN),
        &[("x-request-id", max.as_bytes())],
        None,
    )
    .await;
    assert_eq!(assert_error(&a, 404, "not_found")["request_id"], max);

    // Bad ids are replaced by a generated `req_<32 hex>`, in header and body alike.
    let too_long = "a".repeat(65);
    let bad: [&[u8]; 7] = [
        too_long.as_bytes(),
        b"has space",
        b"",
        b"semi;colon",
        b"quote\"d",
        b"\xff\xfe",
        b"new\tline",
    ];
    let mut seen = HashSet::new();
    for v in bad {
        let a = req(
            &t,
            Method::GET,
            "/v1/units/u999",
            Some(ADMIN),
            &[("x-request-id", v)],
            None,
        )
        .await;
        let e = assert_error(&a, 404, "not_found");
        let rid = e["request_id"].as_str().unwrap();
        assert!(
            is_generated(rid),
            "{:?} → {rid}",
            String::from_utf8_lossy(v)
        );
        assert!(seen.insert(rid.to_owned()), "generated ids are unique");
    }
    // Without one, every answer still gets an id.
    let a = t.get("/v1/units/u1").await;
    assert!(is_generated(&a.header("x-request-id").unwrap()));
    t.stop().await;
}

#[tokio::test]
async fn never_5xx_and_always_the_error_shape() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let long_id = "u".repeat(10_000);
    let long_path = format!("/v1/units/{long_id}");
    let long_reserve = format!("/v1/units/{long_id}/reserve");
    let json_ct: &[(&str, &[u8])] = &[("content-type", JSON)];
    type Case<'a> = (
        Method,
        &'a str,
        Option<&'a str>,
        &'a [(&'a str, &'a [u8])],
        Option<&'a [u8]>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/v1/units/%00",
            Some(ADMIN),
            &[],
            None,
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/units/%FF",
            Some(ADMIN),
            &[],
            None,
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/units/%FF/reserve",
            Some(ADMIN),
            json_ct,
            Some(br#"{"tenancy_id":"t-future"}"#),
            400,
            "bad_request",
        ),
        (
            Method::GET,
            &long_path,
            Some(ADMIN),
            &[],
            None,
            404,
            "not_found",
        ),
        (
            Method::POST,
            &long_reserve,
            Some(ADMIN),
            json_ct,
            Some(br#"{"tenancy_id":"t-future"}"#),
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/units/%E2%9C%93",
            Some(ADMIN),
            &[],
            None,
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/units?limit=0",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units?limit=201",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units?limit=%",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units?offset=-1",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units?status=sold",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units?colour=red",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units/available?limit=abc",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::GET,
            "/v1/units?limit=99999999999999999999",
            Some(ADMIN),
            &[],
            None,
            400,
            "invalid_parameter",
        ),
        (
            Method::OPTIONS,
            "/v1/units",
            Some(ADMIN),
            &[],
            None,
            405,
            "method_not_allowed",
        ),
        (
            Method::POST,
            "/v1/units",
            Some(ADMIN),
            json_ct,
            Some(br#"{"unit": {}}"#),
            422,
            "validation_error",
        ),
        (
            Method::PUT,
            "/v1/units/bulk_update",
            Some(ADMIN),
            json_ct,
            Some(br#"{"units": "u1"}"#),
            422,
            "validation_error",
        ),
        (
            Method::PUT,
            "/v1/sync/snapshot",
            Some(ADMIN),
            json_ct,
            Some(b"{}"),
            422,
            "validation_error",
        ),
        (
            Method::PUT,
            "/v1/contacts/c9",
            Some(ADMIN),
            json_ct,
            Some(br#"{"name": 5}"#),
            422,
            "validation_error",
        ),
        (
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            &[("content-type", JSON), ("if-match", b"not-a-version")],
            Some(br#"{"tenancy_id":"t-future"}"#),
            400,
            "invalid_header",
        ),
        (
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            &[("content-type", b"\xff\xfe")],
            Some(br#"{"tenancy_id":"t-future"}"#),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            json_ct,
            Some(br#"{"tenancy_id":"t-future\u0000"}"#),
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            json_ct,
            Some(br#"{"tenancy_id":"t-started"}"#),
            409,
            "tenancy_started",
        ),
        (
            Method::POST,
            "/v1/units/u1/grant_access",
            Some(ADMIN),
            json_ct,
            Some(br#"{"tenancy_id":"t-ended"}"#),
            409,
            "tenancy_ended",
        ),
        (
            Method::POST,
            "/v1/units/u2/deallocate",
            Some(ADMIN),
            json_ct,
            Some(b"{}"),
            409,
            "invalid_transition",
        ),
    ];
    for (method, path, token, headers, body, status, code) in cases {
        let shown = &path[..path.len().min(60)];
        let a = req(
            &t,
            method.clone(),
            path,
            token,
            headers,
            body.map(<[u8]>::to_vec),
        )
        .await;
        assert!(
            a.status < 500,
            "{method} {shown}: {} {:?}",
            a.status,
            a.body
        );
        assert_eq!(a.status, status, "{method} {shown}: {:?}", a.body);
        assert_error(&a, status, code);
    }
    // Nothing above applied.
    assert_eq!(t.status_of("u1").await, "available");
    assert_eq!(t.status_of("u2").await, "available");
    t.stop().await;
}

// ---- idempotency ------------------------------------------------------------------------

#[tokio::test]
async fn replay_returns_the_stored_bytes_and_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let seq0 = t.last_seq().await;
    let body = json!({"tenancy_id": "t-future", "by": "ops"});
    let first = post_key(&t, "/v1/units/u1/reserve", &body, "key-reserve-1").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_eq!(first.body["unit"]["status"], "reserved");
    let reserved = events_of(&t, seq0, "unit.reserved").await;
    assert_eq!(reserved.len(), 1);
    let after_first = replica(&t).await;

    for _ in 0..3 {
        let again = post_key(&t, "/v1/units/u1/reserve", &body, "key-reserve-1").await;
        assert_eq!(again.status, first.status);
        assert_eq!(again.raw, first.raw, "replayed byte for byte");
        assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
        assert!(
            again
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/json"))
        );
    }
    assert_eq!(replica(&t).await, after_first, "a replay changes nothing");

    // Even after the unit moved on, the replay answers the first response and does not
    // reserve it again.
    let d = t.post("/v1/units/u1/deallocate", json!({})).await;
    assert_eq!(d.status, 200, "{:?}", d.body);
    let moved_on = replica(&t).await;
    let again = post_key(&t, "/v1/units/u1/reserve", &body, "key-reserve-1").await;
    assert_eq!(again.raw, first.raw);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(replica(&t).await, moved_on);
    assert_eq!(t.status_of("u1").await, "available");
    t.stop().await;
}

#[tokio::test]
async fn replay_keeps_201_and_creates_nothing_more() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let unit = json!({"unit": {
        "name": "B1,B2", "unit_type": "small", "width": 5, "length": 5, "height": 8,
        "door_height": 7, "door_width": 4, "door_type": "roll_up", "access_type": "indoor",
        "standard_rate": 40.0, "walk_thru_order": 9
    }});
    let first = post_key(&t, "/v1/units", &unit, "create-b").await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    assert_eq!(first.body["units"].as_array().unwrap().len(), 2);
    let after_first = replica(&t).await;
    let again = post_key(&t, "/v1/units", &unit, "create-b").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.raw, first.raw);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(replica(&t).await, after_first);
    let all = t.get("/v1/units?limit=200").await;
    assert_eq!(all.body["meta"]["pagination"]["total_entries"], 3);
    t.stop().await;
}

#[tokio::test]
async fn replay_after_restart() {
    let mut t = TestGateway::start().await;
    t.seed(1).await;
    let body = json!({"tenancy_id": "t-future"});
    let first = post_key(&t, "/v1/units/u1/reserve", &body, "durable-key").await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    t.restart().await;
    let before = replica(&t).await;
    let again = post_key(&t, "/v1/units/u1/reserve", &body, "durable-key").await;
    assert_eq!(again.raw, first.raw);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

#[tokio::test]
async fn same_key_for_another_request_is_422_and_changes_nothing() {
    let t = TestGateway::start().await;
    t.seed(2).await;
    let first = post_key(
        &t,
        "/v1/units/u1/reserve",
        &json!({"tenancy_id": "t-future"}),
        "K1",
    )
    .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let before = replica(&t).await;

    let other_body = post_key(
        &t,
        "/v1/units/u1/reserve",
        &json!({"tenancy_id": "t-other"}),
        "K1",
    )
    .await;
    assert_error(&other_body, 422, "idempotency_key_reused");
    assert_eq!(other_body.header("idempotent-replayed"), None);

    let extra_field = post_key(
        &t,
        "/v1/units/u1/reserve",
        &json!({"tenancy_id": "t-future", "by": "someone"}),
        "K1",
    )
    .await;
    assert_error(&extra_field, 422, "idempotency_key_reused");

    let other_unit = post_key(
        &t,
        "/v1/units/u2/reserve",
        &json!({"tenancy_id": "t-future"}),
        "K1",
    )
    .await;
    assert_error(&other_unit, 422, "idempotency_key_reused");

    let other_op = post_key(
        &t,
        "/v1/units/u1/grant_access",
        &json!({"tenancy_id": "t-future"}),
        "K1",
    )
    .await;
    assert_error(&other_op, 422, "idempotency_key_reused");

    let other_route = json_req(
        &t,
        Method::PUT,
        "/v1/contacts/c1",
        Some(ADMIN),
        &json!({"name": "X"}),
        &[("idempotency-key", b"K1")],
    )
    .await;
    assert_error(&other_route, 422, "idempotency_key_reused");

    assert_eq!(replica(&t).await, before);
    assert_eq!(t.status_of("u2").await, "available");
    assert_eq!(t.status_of("u1").await, "reserved");
    // The key still replays its own request.
    let again = post_key(
        &t,
        "/v1/units/u1/reserve",
        &json!({"tenancy_id": "t-future"}),
        "K1",
    )
    .await;
    assert_eq!(again.raw, first.raw);
    t.stop().await;
}

#[tokio::test]
async fn a_retry_serialized_differently_still_replays() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let first = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &[("content-type", JSON), ("idempotency-key", b"K-order")],
        Some(br#"{"tenancy_id":"t-future","by":"ops"}"#.to_vec()),
    )
    .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let before = replica(&t).await;
    let again = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &[("content-type", JSON), ("idempotency-key", b"K-order")],
        Some(b"{ \"by\" : \"ops\",\n  \"tenancy_id\" : \"t-future\" }".to_vec()),
    )
    .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.raw, first.raw);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_eq!(replica(&t).await, before);
    t.stop().await;
}

#[tokio::test]
async fn a_refusal_replays_even_when_the_op_would_now_succeed() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    assert_eq!(
        t.post("/v1/units/u1/reserve", json!({"tenancy_id": "t-future"}))
            .await
            .status,
        200
    );
    let body = json!({"tenancy_id": "t-other"});
    let refused = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &body,
        &[
            ("idempotency-key", b"K-409"),
            ("x-request-id", b"first-try"),
        ],
    )
    .await;
    let e = assert_error(&refused, 409, "invalid_transition");
    assert_eq!(e["request_id"], "first-try");

    // The unit becomes available: the same reserve would now succeed...
    let d = t.post("/v1/units/u1/deallocate", json!({})).await;
    assert_eq!(d.status, 200, "{:?}", d.body);
    let before = replica(&t).await;

    // ... but the key answers the stored refusal, byte for byte, and applies nothing.
    // (Retrying with the same X-Request-Id keeps header and body request_id equal.)
    let again = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &body,
        &[
            ("idempotency-key", b"K-409"),
            ("x-request-id", b"first-try"),
        ],
    )
    .await;
    assert_eq!(again.status, 409);
    assert_eq!(again.raw, refused.raw);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));
    assert_error(&again, 409, "invalid_transition");
    // A retry with another request id still gets the stored bytes (the first request's id).
    let third = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &body,
        &[("idempotency-key", b"K-409")],
    )
    .await;
    assert_eq!(third.status, 409);
    assert_eq!(third.raw, refused.raw);
    assert_eq!(third.body["error"]["request_id"], "first-try");

    assert_eq!(replica(&t).await, before);
    assert_eq!(t.status_of("u1").await, "available");

    // A fresh key does apply it.
    let fresh = post_key(&t, "/v1/units/u1/reserve", &body, "K-409-new").await;
    assert_eq!(fresh.status, 200, "{:?}", fresh.body);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_requests_apply_once() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let seq0 = t.last_seq().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let client = t.client.clone();
        let base = t.base.clone();
        tasks.spawn(async move {
            send(
                &client,
                &base,
                Method::POST,
                "/v1/units/u1/grant_access",
                Some(ADMIN),
                &[("content-type", JSON), ("idempotency-key", b"K-race")],
                Some(br#"{"tenancy_id":"t-started"}"#.to_vec()),
            )
            .await
        });
    }
    let answers: Vec<Answer> = tasks.join_all().await;
    assert_eq!(answers.len(), 32);
    let first = &answers[0];
    assert_eq!(first.status, 200, "{:?}", first.body);
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.raw, first.raw, "every answer is the same bytes");
    }
    let fresh = answers
        .iter()
        .filter(|a| a.header("idempotent-replayed").is_none())
        .count();
    assert_eq!(fresh, 1, "exactly one request applied, the rest replayed");
    let events = t.events_after(seq0).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["unit.occupied"], "one set of events");
    assert_eq!(events[0]["data"]["unit_id"], "u1");
    assert_eq!(t.status_of("u1").await, "occupied");
    t.stop().await;
}

#[tokio::test]
async fn invalid_idempotency_keys_are_400_and_change_nothing() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = replica(&t).await;
    let too_long = "k".repeat(256);
    let bad: [&[u8]; 6] = [
        b"",
        too_long.as_bytes(),
        b"has space",
        b"tab\there",
        b"\xff\xfe",
        b"caf\xc3\xa9",
    ];
    for key in bad {
        let a = req(
            &t,
            Method::POST,
            "/v1/units/u1/reserve",
            Some(ADMIN),
            &[("content-type", JSON), ("idempotency-key", key)],
            Some(br#"{"tenancy_id":"t-future"}"#.to_vec()),
        )
        .await;
        assert_eq!(
            a.status,
            400,
            "{:?}: {:?}",
            String::from_utf8_lossy(key),
            a.body
        );
        let e = assert_error(&a, 400, "invalid_header");
        assert_eq!(fields(&e), vec!["Idempotency-Key"]);
    }
    // Control characters other than tab cannot be sent through reqwest: use a raw socket.
    let body = br#"{"tenancy_id":"t-future"}"#.to_vec();
    let head = format!(
        "POST /v1/units/u1/reserve HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nIdempotency-Key: ctl\x01key\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let (status, _, _) = raw_exchange(&t, &head, body).await;
    // hyper refuses the header line itself (400, empty body) before the app sees it.
    assert_eq!(status, 400);
    assert_eq!(replica(&t).await, before);
    // 255 visible characters is fine.
    let max = "k".repeat(255);
    let a = post_key(
        &t,
        "/v1/units/u1/reserve",
        &json!({"tenancy_id": "t-future"}),
        &max,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    t.stop().await;
}

#[tokio::test]
async fn requests_refused_before_running_do_not_use_up_the_key() {
    let t = TestGateway::start().await;
    t.seed(1).await;
    let before = replica(&t).await;
    let good = json!({"tenancy_id": "t-future"});
    let key: &[(&str, &[u8])] = &[("idempotency-key", b"K-early")];
    let a = json_req(&t, Method::POST, "/v1/units/u1/reserve", None, &good, key).await;
    assert_error(&a, 401, "unauthorized");
    let a = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(READER),
        &good,
        key,
    )
    .await;
    assert_error(&a, 403, "forbidden");
    let a = json_req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &json!({"tenancy": "t-future"}),
        key,
    )
    .await;
    assert_error(&a, 422, "validation_error");
    let a = req(
        &t,
        Method::POST,
        "/v1/units/u1/reserve",
        Some(ADMIN),
        &[("content-type", JSON), ("idempotency-key", b"K-early")],
        Some(b"{".to_vec()),
    )
    .await;
    assert_error(&a, 400, "malformed_json");
    assert_eq!(replica(&t).await, before);

    // The key was never stored: the first real request runs and is not a replay.
    let a = post_key(&t, "/v1/units/u1/reserve", &good, "K-early").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.header("idempotent-replayed"), None);
    assert_eq!(t.status_of("u1").await, "reserved");
    t.stop().await;
}

// ---- /openapi.json ----------------------------------------------------------------------

#[tokio::test]
async fn openapi_document_describes_the_api() {
    let t = TestGateway::start().await;
    let a = req(&t, Method::GET, "/openapi.json", Some(READER), &[], None).await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
    );
    let doc: Value = serde_json::from_slice(&a.raw).expect("the document is JSON");
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let want: &[(&str, &[&str])] = &[
        ("/v1/units/{unit_id}/reserve", &["post"]),
        ("/v1/units/{unit_id}/grant_access", &["post"]),
        ("/v1/units/{unit_id}/deallocate", &["post"]),
        ("/v1/units/{unit_id}/set_status", &["post"]),
        ("/v1/contacts/{contact_id}/overlock", &["post"]),
        ("/v1/contacts/{contact_id}/remove_overlock", &["post"]),
        ("/v1/units", &["get", "post"]),
        ("/v1/units/available", &["get"]),
        ("/v1/units/{unit_id}", &["get", "patch", "put"]),
        ("/v1/units/bulk_update", &["put"]),
        ("/v1/units/bulk_create", &["post"]),
        ("/v1/unit_types/{id}", &["get", "put"]),
        ("/v1/contacts/{id}", &["get", "put"]),
        ("/v1/tenancies/{id}", &["get", "put"]),
        ("/v1/sync/snapshot", &["put"]),
        ("/v1/events", &["get"]),
        ("/healthz", &["get"]),
        ("/openapi.json", &["get"]),
    ];
    let paths = doc["paths"].as_object().expect("paths");
    let verbs = [
        "get", "put", "post", "delete", "patch", "options", "head", "trace",
    ];
    for (path, methods) in want {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing from the document"));
        let got: BTreeSet<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .filter(|k| verbs.contains(k))
            .collect();
        let want: BTreeSet<&str> = methods.iter().copied().collect();
        assert_eq!(got, want, "methods of {path}");
        // Each operation documents its success and, behind a token, its errors.
        for m in *methods {
            let op = &item[*m];
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{m} {path} has a 2xx"
            );
            if *path != "/healthz" {
                for status in ["400", "401", "403", "404", "422", "500"] {
                    let r = &responses
                        .get(status)
                        .unwrap_or_else(|| panic!("{m} {path} documents {status}"));
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{m} {path} {status}"
                    );
                }
            }
        }
    }
    // Path parameters are declared.
    let reserve_params = doc["paths"]["/v1/units/{unit_id}/reserve"]["post"]["parameters"]
        .as_array()
        .expect("parameters");
    assert!(
        reserve_params
            .iter()
            .any(|p| p["name"] == "unit_id" && p["in"] == "path"),
        "{reserve_params:?}"
    );
    assert!(
        reserve_params
            .iter()
            .any(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
    );

    // Bearer security, required globally, waived for /healthz.
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes");
    let (bearer_name, _) = schemes
        .iter()
        .find(|(_, s)| s["type"] == "http" && s["scheme"].as_str() == Some("bearer"))
        .expect("an http bearer scheme");
    assert!(
        doc["security"]
            .as_array()
            .expect("global security")
            .iter()
            .any(|r| r.get(bearer_name).is_some()),
        "{}",
        doc["security"]
    );
    let health_security = &doc["paths"]["/healthz"]["get"]["security"];
    assert!(
        health_security.as_array().is_some_and(|rs| rs
            .iter()
            .all(|r| r.as_object().is_some_and(|o| o.is_empty()))),
        "/healthz needs no token: {health_security}"
    );

    // The error schema: {"error": {code, message, details, request_id}}.
    let schemas = &doc["components"]["schemas"];
    let body = &schemas["ErrorBody"];
    assert_eq!(body["required"], json!(["error"]));
    let obj_ref = body["properties"]["error"]["$ref"]
        .as_str()
        .expect("error is a $ref");
    let obj = &schemas[obj_ref.trim_start_matches("#/components/schemas/")];
    let required: BTreeSet<&str> = obj["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for k in ["code", "message", "details", "request_id"] {
        assert!(required.contains(k), "ErrorObject requires {k}");
        assert!(obj["properties"].get(k).is_some(), "ErrorObject has {k}");
    }
    assert_eq!(obj["properties"]["details"]["type"], "array");
    t.stop().await;
}

// ---- /v1/events -------------------------------------------------------------------------

#[tokio::test]
async fn events_page_oldest_first_with_next_after() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    // seed: three unit.created. Then four allocation events at a later time.
    t.clock.set("2026-03-11T09:30:15Z");
    assert_eq!(
        t.post(
            "/v1/units/u1/reserve",
            json!({"tenancy_id": "t-future", "by": "ops"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.post(
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-future"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        t.post("/v1/units/u1/deallocate", json!({})).await.status,
        200
    );

    let all = t.get("/v1/events?limit=1000").await;
    assert_eq!(all.status, 200);
    let events = all.body["events"].as_array().unwrap().clone();
    assert_eq!(all.body["next_after"], 7);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        vec![
            "unit.created",
            "unit.created",
            "unit.created",
            "unit.reserved",
            "unit.occupied",
            "unit.deallocated",
            "unit.available"
        ]
    );
    let mut ids = HashSet::new();
    for (i, e) in events.iter().enumerate() {
        let keys: BTreeSet<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["seq", "id", "type", "occurred_at", "site_id", "data"]),
            "{e}"
        );
        assert_eq!(e["seq"], i as i64 + 1, "gapless, oldest first");
        assert!(
            ids.insert(e["id"].as_str().unwrap().to_owned()),
            "unique id"
        );
        assert_eq!(e["site_id"], "site-test");
        assert!(e["data"].is_object());
        let at = e["occurred_at"].as_str().unwrap();
        let parsed = chrono::DateTime::parse_from_rfc3339(at).expect("RFC 3339");
        assert_eq!(parsed.offset().local_minus_utc(), 0, "UTC: {at}");
        assert!(at.ends_with('Z'), "UTC with Z: {at}");
    }
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(events[i]["occurred_at"].as_str().unwrap())
            .unwrap()
            .to_utc()
    };
    assert_eq!(
        at(0),
        "2026-03-10T12:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
    assert_eq!(
        at(3),
        "2026-03-11T09:30:15Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
    let reserved = &events[3]["data"];
    assert_eq!(reserved["unit_id"], "u1");
    assert_eq!(reserved["tenancy_id"], "t-future");
    assert_eq!(reserved["contact_id"], "c1");
    assert_eq!(reserved["from"], "available");
    assert_eq!(reserved["to"], "reserved");
    assert_eq!(reserved["by"], "ops");

    // Paging by 3: [1,2,3] [4,5,6] [7] then empty, each `next_after` the last seq.
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let p = t.get(&format!("/v1/events?after={after}&limit=3")).await;
        assert_eq!(p.status, 200, "{:?}", p.body);
        let seqs: Vec<i64> = p.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_i64().unwrap())
            .collect();
        let next = p.body["next_after"].as_i64().unwrap();
        if seqs.is_empty() {
            assert_eq!(next, after, "an empty page keeps the cursor");
            break;
        }
        assert_eq!(next, *seqs.last().unwrap());
        pages.push(seqs);
        after = next;
    }
    assert_eq!(pages, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
    // The same page twice is the same page.
    let p1 = t.get("/v1/events?after=2&limit=2").await;
    let p2 = t.get("/v1/events?after=2&limit=2").await;
    assert_eq!(p1.raw, p2.raw);
    assert_eq!(p1.body["events"][0]["seq"], 3);
    // After the end: empty, cursor unchanged.
    let p = t.get("/v1/events?after=100").await;
    assert_eq!(p.body["events"], json!([]));
    assert_eq!(p.body["next_after"], 100);
    t.stop().await;
}

#[tokio::test]
async fn events_default_limit_and_bounds() {
    let t = TestGateway::start().await;
    t.seed(105).await;
    let a = t.get("/v1/events").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body["events"].as_array().unwrap().len(),
        100,
        "default 100"
    );
    assert_eq!(a.body["next_after"], 100);
    let a = t.get("/v1/events?limit=1000").await;
    assert_eq!(a.body["events"].as_array().unwrap().len(), 105);
    let a = t.get("/v1/events?limit=1").await;
    assert_eq!(a.body["events"].as_array().unwrap().len(), 1);
    for q in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=abc",
        "after=-1",
        "after=abc",
        "after=1.5",
        "since=3",
    ] {
        let a = t.get(&format!("/v1/events?{q}")).await;
        assert_eq!(a.status, 400, "{q}: {:?}", a.body);
        assert_error(&a, 400, "invalid_parameter");
    }
    t.stop().await;
}
