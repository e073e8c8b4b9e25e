//! The `/status` browser page and the data it reads: the shell, script and style sheet are
//! served without a token and without site data, with a strict CSP; `GET /v1/status?detail=full`
//! (with `GET /v1/devices`) needs the token like `/v1/status` and lists the newest 50 access
//! decisions newest first (never a PIN) and unit counts per status matching `GET /v1/units`;
//! real keypad decisions and a device taken offline in hw-sim show up in it.

mod common;

use common::site::{SimSite, keypad, tcp_board, until};
use common::{ADMIN, ALLOCATOR, READER, TestGateway};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;
use unitgate::domain::EventType;
use unitgate::store::events;

const CSP: &str = "default-src 'self'; frame-ancestors 'none'";

fn assert_page_headers(a: &common::Answer, content_type: &str) {
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-type").as_deref(), Some(content_type));
    assert_eq!(a.header("content-security-policy").as_deref(), Some(CSP));
    assert_eq!(
        a.header("x-content-type-options").as_deref(),
        Some("nosniff")
    );
    assert_eq!(a.header("referrer-policy").as_deref(), Some("no-referrer"));
    assert_eq!(a.header("cache-control").as_deref(), Some("no-store"));
}

#[tokio::test]
async fn the_page_is_served_without_a_token_and_holds_no_site_data() {
    let t = TestGateway::start().await;
    t.seed(3).await;
    let page = t.call(Method::GET, "/status", None, None, &[]).await;
    assert_page_headers(&page, "text/html; charset=utf-8");
    let html = String::from_utf8(page.raw).unwrap();
    for want in [
        r#"<form id="login""#,
        r#"<label for="token">Access token</label>"#,
        r#"<input id="token" name="token" type="password""#,
        r#"<button type="submit">Show status</button>"#,
        r#"data-role="login-error""#,
        r#"<main id="main" data-loaded="false">"#,
        r#"<script src="/status/app.js" defer></script>"#,
        r#"<link rel="stylesheet" href="/status/style.css">"#,
        r#"aria-live="polite""#,
        // Without the script, a submitted form must not carry the token in a URL.
        r#"method="post""#,
    ] {
        assert!(html.contains(want), "{want:?} not in the page");
    }
    for site_data in ["site-test", "Test Site", "U001", "c1", "main-gate"] {
        assert!(!html.contains(site_data), "{site_data:?} in the page");
    }
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "nothing inline"
    );

    let js = t.call(Method::GET, "/status/app.js", None, None, &[]).await;
    assert_page_headers(&js, "text/javascript; charset=utf-8");
    let js = String::from_utf8(js.raw).unwrap();
    for want in [
        "/v1/status?detail=full",
        "/v1/devices",
        "sessionStorage",
        "\"Authorization\": \"Bearer \"",
    ] {
        assert!(js.contains(want), "{want:?} not in app.js");
    }
    for never in [
        "localStorage",
        "innerHTML",
        "?token",
        "&token",
        "location.search",
    ] {
        assert!(!js.contains(never), "{never:?} in app.js");
    }
    let css = t
        .call(Method::GET, "/status/style.css", None, None, &[])
        .await;
    assert_page_headers(&css, "text/css; charset=utf-8");
    assert!(String::from_utf8(css.raw).unwrap().contains("@media"));

    // The script-less form post is refused in the error shape (and reads no token).
    let a = t
        .call(Method::POST, "/status", None, Some(&json!({})), &[])
        .await;
    assert_eq!((a.status, a.code()), (405, "method_not_allowed"));
    // The page is not part of the API document.
    let doc = t.get("/openapi.json").await;
    assert!(doc.body["paths"]["/status"].is_null());
    t.stop().await;
}

/// Writes `n` access decisions as the gate controller writes them: granted on even `i`.
async fn decisions(t: &TestGateway, n: usize) {
    let store = t.gw.as_ref().unwrap().executor.store().clone();
    let now = "2026-03-10T12:00:00Z".parse().unwrap();
    store
        .write(move |c| {
            for i in 0..n {
                let (kind, data) = if i % 2 == 0 {
                    (EventType::AccessGranted, json!({"keypad": "kp-main", "zone": "main-gate", "contact_id": "c2", "units": ["u1"]}))
                } else {
                    (EventType::AccessDenied, json!({"keypad": format!("kp-{i}"), "zone": "east-gate", "contact_id": null, "units": [], "reason": "invalid_code"}))
                };
                events::append(c, kind, &data, now)?;
            }
            Ok::<_, unitgate::store::StoreError>(())
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_page_data_needs_the_token_and_lists_decisions_and_units() {
    let t = TestGateway::start().await;
    t.seed(6).await;
    for (path, body) in [
        (
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-started"}),
        ),
        ("/v1/units/u2/reserve", json!({"tenancy_id": "t-future"})),
        ("/v1/units/u3/set_status", json!({"status": "unavailable"})),
    ] {
        assert_eq!(t.post(path, body).await.status, 200, "{path}");
    }
    decisions(&t, 30).await;
    // Something else after some of the decisions: it is not a decision.
    assert_eq!(
        t.post("/v1/contacts/c2/overlock", json!({})).await.status,
        200
    );
    decisions(&t, 31).await;

    const FULL: &str = "/v1/status?detail=full";
    for (token, status, code) in [
        (None, 401, "unauthorized"),
        (Some("not-a-token"), 401, "unauthorized"),
        (Some(ALLOCATOR), 403, "forbidden"),
    ] {
        let a = t.call(Method::GET, FULL, token, None, &[]).await;
        assert_eq!(
            (a.status, a.code()),
            (status, code),
            "{token:?}: {}",
            a.body
        );
        assert!(
            a.body["error"]["request_id"].is_string(),
            "error shape: {}",
            a.body
        );
        assert!(a.body.get("site_id").is_none());
    }
    let a = t.call(Method::GET, FULL, Some(READER), None, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let s = a.body;
    assert_eq!(s["site_id"], "site-test");

    // The newest 50 decisions, newest first, as recorded.
    let all = t.events_after(0).await;
    let mut want: Vec<&Value> = all
        .iter()
        .filter(|e| e["type"] == "access.granted" || e["type"] == "access.denied")
        .collect();
    assert_eq!(want.len(), 61);
    want.reverse();
    let got = s["access_decisions"].as_array().expect("access_decisions");
    assert_eq!(got.len(), 50);
    for (g, e) in got.iter().zip(&want) {
        assert_eq!(g["seq"], e["seq"]);
        assert_eq!(g["occurred_at"], e["occurred_at"]);
        assert_eq!(g["granted"], e["type"] == "access.granted");
        assert_eq!(g["keypad"], e["data"]["keypad"]);
        assert_eq!(g["zone"], e["data"]["zone"]);
        assert_eq!(g["contact_id"], e["data"]["contact_id"]);
        assert_eq!(g["units"], e["data"]["units"]);
        let reason = &e["data"]["reason"];
        assert_eq!(
            &g["reason"],
            if reason.is_null() {
                &Value::Null
            } else {
                reason
            }
        );
    }
    assert_eq!(
        got[0]["seq"], s["last_seq"],
        "the newest event is a decision"
    );

    // Unit counts per status: every status named, each matching GET /v1/units.
    let counts = s["units_by_status"].as_object().expect("units_by_status");
    assert_eq!(counts.len(), 6, "{counts:?}");
    let mut total = 0;
    for (status, n) in counts {
        let a = t.get(&format!("/v1/units?status={status}")).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            &a.body["meta"]["pagination"]["total_entries"], n,
            "{status}"
        );
        total += n.as_u64().unwrap();
    }
    assert_eq!(total, 6);
    assert_eq!(
        (counts["overlocked"].as_u64(), counts["available"].as_u64()),
        (Some(1), Some(3))
    );

    // The plain read keeps the DESIGN shape; a bad detail is a 400 in the error shape.
    let plain = t.get("/v1/status").await;
    assert!(
        plain.body.get("access_decisions").is_none(),
        "{}",
        plain.body
    );
    assert!(
        plain.body.get("units_by_status").is_none(),
        "{}",
        plain.body
    );
    let a = t.get("/v1/status?detail=everything").await;
    assert_eq!(
        (a.status, a.code()),
        (400, "invalid_parameter"),
        "{}",
        a.body
    );

    // Documented with the other routes.
    let doc = t.get("/openapi.json").await;
    let params = &doc.body["paths"]["/v1/status"]["get"]["parameters"];
    assert!(
        params
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "detail")),
        "{params}"
    );
    let props = &doc.body["components"]["schemas"]["SiteStatus"]["properties"];
    assert!(props["access_decisions"].is_object(), "{props}");
    assert!(props["units_by_status"].is_object(), "{props}");
    t.stop().await;
}

const GATES: &str = "gate-relays";
const KEYPAD: &str = "gate-1";

fn sim_devices() -> String {
    [
        keypad(KEYPAD, "main-gate", 1, GATES, 0, None, 200),
        tcp_board(GATES, 2, 2, 200, 50),
    ]
    .concat()
}

async fn full_status(s: &SimSite) -> (Value, String) {
    let a =
        s.t.call(
            Method::GET,
            "/v1/status?detail=full",
            Some(READER),
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    (a.body, String::from_utf8(a.raw).unwrap())
}

#[tokio::test]
async fn keypad_decisions_and_a_device_going_offline_show_up_without_the_pin() {
    let s = SimSite::start(&sim_devices(), 30, 3).await;
    s.ok(
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t-started"}),
    )
    .await;
    until("keypad online", Duration::from_secs(10), || async {
        s.device(KEYPAD).await["online"] == true && s.device(GATES).await["online"] == true
    })
    .await;
    let press = |keys: &'static str| {
        let http = s.http.clone();
        let url = format!("{}/keypads/{KEYPAD}/keys", s.sim.control_url());
        async move {
            let r = http
                .post(url)
                .json(&json!({ "keys": keys }))
                .send()
                .await
                .expect("press");
            assert_eq!(r.status().as_u16(), 202, "{keys}");
        }
    };
    press("2222#").await;
    until("granted listed", Duration::from_secs(5), || async {
        full_status(&s).await.0["access_decisions"]
            .as_array()
            .is_some_and(|l| l.len() == 1)
    })
    .await;
    press("9876#").await;
    until("denied listed", Duration::from_secs(5), || async {
        full_status(&s).await.0["access_decisions"]
            .as_array()
            .is_some_and(|l| l.len() == 2)
    })
    .await;
    let (st, raw) = full_status(&s).await;
    let list = st["access_decisions"].as_array().unwrap();
    assert_eq!(list[0]["granted"], false, "newest first: {list:?}");
    assert_eq!(list[0]["reason"], "invalid_code");
    assert_eq!(list[0]["keypad"], KEYPAD);
    assert_eq!(list[1]["granted"], true);
    assert_eq!(list[1]["zone"], "main-gate");
    assert_eq!(list[1]["units"], json!(["u1"]));
    assert!(list[0]["seq"].as_i64() > list[1]["seq"].as_i64());
    let devices = s.t.get("/v1/devices").await;
    for pin in ["2222", "9876"] {
        assert!(!raw.contains(pin), "PIN {pin} in {raw}");
        assert!(!String::from_utf8_lossy(&devices.raw).contains(pin));
    }
    assert_eq!(st["units_by_status"]["occupied"], 1);
    assert_eq!(st["devices"], json!({"online": 2, "offline": 0}));

    // The relay board taken offline in hw-sim: offline in both reads the page makes.
    s.fault(GATES, "offline", None, 30_000).await;
    until("board offline", Duration::from_secs(5), || async {
        s.device(GATES).await["online"] == false
    })
    .await;
    let (st, _) = full_status(&s).await;
    assert_eq!(st["devices"], json!({"online": 1, "offline": 1}));
    assert_eq!(s.device(KEYPAD).await["online"], true);
    let a =
        s.t.call(Method::GET, "/v1/devices", Some(ADMIN), None, &[])
            .await;
    let board = a
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == GATES)
        .cloned();
    assert_eq!(board.map(|b| b["online"].clone()), Some(json!(false)));
    s.stop().await;
}
