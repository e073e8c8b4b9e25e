//! A fake cloud for the HTTPS uplink: a real axum server on 127.0.0.1:0 that records every
//! request (time, signature header, body) and answers from a script (then 200).
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use unitgate::config::HttpsUplinkConfig;

/// One request the cloud received.
#[derive(Debug, Clone)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// `X-Unitgate-Signature`.
    pub signature: Option<String>,
    /// The raw body.
    pub body: Bytes,
    /// The status answered.
    pub answered: u16,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the uplink sends JSON")
    }
    /// The seqs of the batch.
    pub fn seqs(&self) -> Vec<i64> {
        self.json()["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["seq"].as_i64().expect("seq"))
            .collect()
    }
}

#[derive(Default)]
struct Inner {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<(u16, Option<String>)>>,
    default: Mutex<Option<u16>>,
}

/// The running fake cloud.
#[derive(Clone)]
pub struct FakeCloud {
    /// Where to POST.
    pub url: String,
    inner: Arc<Inner>,
}

async fn receive(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let (status, retry_after) = s
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((s.default.lock().unwrap().unwrap_or(200), None));
    s.received.lock().unwrap().push(Received {
        at: Instant::now(),
        signature: headers
            .get("x-unitgate-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        answered: status,
    });
    let mut res = StatusCode::from_u16(status).unwrap().into_response();
    if let Some(r) = retry_after {
        res.headers_mut().insert("retry-after", r.parse().unwrap());
    }
    res
}

impl FakeCloud {
    /// Starts the server.
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = axum::Router::new()
            .route("/events", axum::routing::post(receive))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeCloud {
            url: format!("http://{addr}/events"),
            inner,
        }
    }

    /// Queues answers for the next requests (status, Retry-After).
    pub fn answer_next(&self, answers: &[(u16, Option<&str>)]) {
        let mut s = self.inner.script.lock().unwrap();
        for (status, ra) in answers {
            s.push_back((*status, ra.map(str::to_owned)));
        }
    }

    /// Answers `status` to every unscripted request from now on.
    pub fn answer_all(&self, status: u16) {
        *self.inner.default.lock().unwrap() = Some(status);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    /// Waits (polling, with a deadline) until a 2xx-answered batch holds `seq`.
    pub async fn wait_delivered(&self, seq: i64, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let r = self.received();
            if r.iter()
                .any(|x| (200..300).contains(&x.answered) && x.seqs().contains(&seq))
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "seq {seq} not delivered within {within:?}; received {} requests",
                r.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The uplink config for this cloud, its secret written under `dir`.
    pub fn uplink_config(
        &self,
        dir: &std::path::Path,
        secret: &str,
        batch: u32,
    ) -> HttpsUplinkConfig {
        let path = dir.join("uplink.secret");
        std::fs::write(&path, secret).unwrap();
        HttpsUplinkConfig {
            url: self.url.clone(),
            secret_file: path,
            batch,
            timeout_ms: 5000,
        }
    }
}

/// Verifies `X-Unitgate-Signature` independently of the gateway: returns `t`.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> i64 {
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("malformed signature header {header:?}"));
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(format!("{t}.").as_bytes());
    m.update(body);
    m.verify_slice(&hex::decode(v1).expect("hex"))
        .expect("the signature verifies");
    t.parse().expect("t is unix seconds")
}
