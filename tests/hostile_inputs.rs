//! Hostile and broken input against the real gateway on real sockets (issue 9): slowloris
//! headers, silent and half-finished TLS handshakes, trickled bodies, oversized bodies,
//! headers and URLs, malformed HTTP and JSON, and over MQTT a command burst, packets just
//! over the limit, odd topics and retained junk. Every case checks the gateway stays
//! healthy afterwards: `/healthz` answers, nothing changed in the replica (unit statuses,
//! last event seq), and a normal command still succeeds. Figures go to stdout
//! (`cargo test --test hostile_inputs -- --nocapture`).

#[path = "common/broker.rs"]
#[allow(dead_code, reason = "this binary does not restart the broker")]
mod broker;
mod common;

use axum::body::Bytes;
use broker::Broker;
use common::{ADMIN, TestClock, TestGateway, test_config};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use unitgate::config::Config;

/// The header, body and handshake timeouts of the gateways here, seconds (short, so a
/// test sees them fire; the shipped defaults are 10, 30 and 10).
const TIMEOUT_S: u64 = 2;
/// `api.keep_alive_idle_s` in these tests: longer than the header timeout.
const KEEP_ALIVE_S: u64 = 4;
/// Slack on top of a timeout before a connection still open counts as a failure (a loaded
/// 2-core CI machine).
const SLACK: Duration = Duration::from_secs(8);
/// Longest a normal request may take while the gateway is under attack.
const PROMPT: Duration = Duration::from_secs(2);
/// Body limit of the gateways here.
const MAX_BODY: usize = 64 << 10;
const SITE: &str = "site-test";

#[test]
#[ignore = "the broker's own process, started by tests/common/broker.rs"]
fn embedded_broker_process() {
    broker::serve_if_child();
}

fn hostile_config(dir: &std::path::Path) -> Config {
    let mut cfg = test_config(dir);
    cfg.api.header_read_timeout_s = TIMEOUT_S;
    cfg.api.keep_alive_idle_s = KEEP_ALIVE_S;
    cfg.api.body_read_timeout_s = TIMEOUT_S;
    cfg.api.snapshot_read_timeout_s = TIMEOUT_S;
    cfg.api.tls_handshake_timeout_s = TIMEOUT_S;
    cfg.api.max_body_bytes = MAX_BODY;
    cfg.validate().expect("valid hostile config");
    cfg
}

async fn start(cfg_of: impl FnOnce(&std::path::Path) -> Config) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_of(dir.path());
    let tg = TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await;
    tg.seed(3).await;
    tg
}

fn addr(tg: &TestGateway) -> SocketAddr {
    tg.gw.as_ref().expect("running").addr
}

// ---- health -----------------------------------------------------------------------------

/// What the bad input must not change.
#[derive(Debug, PartialEq)]
struct Replica {
    statuses: Vec<String>,
    last_seq: i64,
}

async fn replica(tg: &TestGateway) -> Replica {
    let mut statuses = Vec::new();
    for u in ["u1", "u2", "u3"] {
        statuses.push(tg.status_of(u).await);
    }
    Replica {
        statuses,
        last_seq: tg.last_seq().await,
    }
}

/// `/healthz` answers and the replica is as it was.
async fn assert_unharmed(tg: &TestGateway, before: &Replica, case: &str) {
    let h = tg
        .call(reqwest::Method::GET, "/healthz", None, None, &[])
        .await;
    assert_eq!(h.status, 200, "{case}: /healthz {:?}", h.body);
    assert_eq!(&replica(tg).await, before, "{case}: the replica changed");
}

/// A normal write still succeeds (run last: it changes the replica).
async fn assert_normal_command(tg: &TestGateway) {
    let a = tg
        .put(
            "/v1/contacts/c9",
            json!({"name": "After the attack", "access_code": "9090"}),
        )
        .await;
    assert_eq!(
        a.status, 201,
        "a normal write after the attack: {:?}",
        a.body
    );
    let a = tg.get("/v1/contacts/c9").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(tg.last_seq().await > 0);
}

/// The contract's error shape with `status` and `code`.
fn assert_error_shape(status: u16, body: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["code"], code, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["details"].is_array(), "{body}");
    assert!(e["request_id"].is_string(), "{body}");
}

// ---- raw HTTP ----------------------------------------------------------------------------

/// What came back on a raw connection.
#[derive(Debug)]
struct Raw {
    /// The response's status, if a response came.
    status: Option<u16>,
    /// Its JSON body (Null if none or not JSON).
    body: Value,
    /// The server closed the connection (EOF or reset) without a whole response.
    closed: bool,
    /// Time from the last byte written to the answer or the close.
    took: Duration,
}

/// Sends `request` and reads one response (or the close), within `within`.
async fn exchange(at: SocketAddr, request: &[u8], within: Duration) -> Raw {
    let mut s = TcpStream::connect(at).await.expect("connect");
    // A server that refuses early may reset while we still write: that is an answer too.
    let _ = s.write_all(request).await;
    read_answer(&mut s, within).await
}

async fn read_answer(s: &mut TcpStream, within: Duration) -> Raw {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = &buf[end + 4..end + 4 + len];
                return Raw {
                    status: Some(status),
                    body: serde_json::from_slice(body).unwrap_or(Value::Null),
                    closed: false,
                    took: started.elapsed(),
                };
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "neither an answer nor a close within {within:?}; got {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Raw {
                    status: None,
                    body: Value::Null,
                    closed: true,
                    took: started.elapsed(),
                };
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A JSON POST as raw bytes (admin token).
fn post_raw(path: &str, body: &[u8]) -> Vec<u8> {
    raw_request("POST", path, body)
}

/// A JSON request as raw bytes (admin token).
fn raw_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A connection that sends `prefix`, then one byte of `trickle` a second (forever when it
/// repeats), and reports how long after connecting the server closed it (None: still
/// open after `give_up`).
fn slow_client(
    at: SocketAddr,
    prefix: Vec<u8>,
    trickle: Vec<u8>,
    give_up: Duration,
) -> tokio::task::JoinHandle<Option<Duration>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let s = TcpStream::connect(at).await.expect("connect");
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            if w.write_all(&prefix).await.is_err() {
                return;
            }
            for b in trickle.iter().cycle() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if w.write_all(&[*b]).await.is_err() {
                    return;
                }
            }
            // Nothing to trickle: stay silent, keeping the write side open.
            std::future::pending::<()>().await;
        });
        let mut sink = [0u8; 4096];
        let closed = tokio::time::timeout(give_up, async {
            loop {
                match r.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        writer.abort();
        closed.ok().map(|_| started.elapsed())
    })
}

/// Normal requests, each on a fresh connection, while something else goes on: latencies.
async fn probe(base: &str, client: &reqwest::Client, n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for i in 0..n {
        let path = if i.is_multiple_of(2) {
            "/healthz"
        } else {
            "/v1/units/u1"
        };
        let t = Instant::now();
        let res = client
            .get(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap_or_else(|e| panic!("normal request {path} under attack: {e}"));
        assert_eq!(res.status(), 200, "{path} under attack");
        let _ = res.bytes().await;
        out.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    out
}

fn fresh_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
}

fn summary(label: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let max = v.last().copied().unwrap_or_default();
    println!(
        "{label}: n={} min={:?} median={:?} max={:?}",
        v.len(),
        v.first().copied().unwrap_or_default(),
        v.get(v.len() / 2).copied().unwrap_or_default(),
        max
    );
    max
}

/// Waits for every slow client and checks each was closed by the server between
/// `TIMEOUT_S` (minus a little: timers are not exact) and `TIMEOUT_S + SLACK`.
async fn assert_all_cut(label: &str, clients: Vec<tokio::task::JoinHandle<Option<Duration>>>) {
    let mut closed = Vec::new();
    for c in clients {
        let t = c.await.expect("slow client task");
        closed.push(t.unwrap_or_else(|| panic!("{label}: a connection was never closed")));
    }
    let max = summary(
        &format!("{label} closed by the server after"),
        closed.clone(),
    );
    let min = closed.iter().min().copied().unwrap_or_default();
    let timeout = Duration::from_secs(TIMEOUT_S);
    assert!(
        min >= timeout - Duration::from_millis(300),
        "{label}: closed after {min:?}, before the {timeout:?} timeout: not the timeout"
    );
    assert!(max <= timeout + SLACK, "{label}: closed only after {max:?}");
}

// ---- slowloris ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_connections_are_cut_and_others_served() {
    let tg = start(hostile_config).await;
    let before = replica(&tg).await;
    let at = addr(&tg);
    let give_up = Duration::from_secs(TIMEOUT_S) + SLACK + Duration::from_secs(5);
    let mut slow = Vec::new();
    // 100 that trickle a request's headers a byte a second (never finishing them), 50
    // that trickle a request line, 50 that connect and say nothing.
    for _ in 0..100 {
        let prefix = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n".to_vec();
        slow.push(slow_client(
            at,
            prefix,
            b"X-Slow: aaaaaaaa".to_vec(),
            give_up,
        ));
    }
    for _ in 0..50 {
        slow.push(slow_client(at, Vec::new(), b"GET /".to_vec(), give_up));
    }
    for _ in 0..50 {
        slow.push(slow_client(at, Vec::new(), Vec::new(), give_up));
    }
    // Give the attackers a moment to connect, then measure normal clients meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = fresh_client().build().expect("client");
    let lat = probe(&tg.base, &client, 10).await;
    let max = summary("plain HTTP latency under 200 slowloris connections", lat);
    assert!(max < PROMPT, "a normal request took {max:?} under attack");
    assert_all_cut("slowloris (plain HTTP)", slow).await;

    // A keep-alive connection idle after its request is cut after keep_alive_idle_s (longer
    // than the first request's header timeout, so pooled client connections are not cut
    // while the client is about to reuse them).
    let mut s = TcpStream::connect(at).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .expect("write");
    let r = read_answer(&mut s, Duration::from_secs(10)).await;
    assert_eq!(r.status, Some(200));
    let idle = read_answer(&mut s, Duration::from_secs(KEEP_ALIVE_S) + SLACK).await;
    assert!(idle.closed, "{idle:?}");
    println!("idle keep-alive connection closed after {:?}", idle.took);
    assert!(idle.took >= Duration::from_secs(KEEP_ALIVE_S) - Duration::from_millis(300));

    assert_unharmed(&tg, &before, "slowloris").await;
    assert_normal_command(&tg).await;
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_not_held_up_by_slow_connections() {
    let tg = start(hostile_config).await;
    let at = addr(&tg);
    let give_up = Duration::from_secs(30);
    let mut slow = Vec::new();
    for _ in 0..20 {
        let prefix = b"GET /healthz HTTP/1.1\r\n".to_vec();
        slow.push(slow_client(at, prefix, b"X-Slow: a".to_vec(), give_up));
        slow.push(slow_client(at, Vec::new(), Vec::new(), give_up));
    }
    // Every attacker is connected once one more connection gets served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tg.call(reqwest::Method::GET, "/healthz", None, None, &[])
            .await
            .status,
        200
    );
    let t = Instant::now();
    tg.stop().await;
    let took = t.elapsed();
    println!("Gateway::stop with 40 slow connections open took {took:?}");
    assert!(
        took < Duration::from_secs(TIMEOUT_S) + SLACK,
        "stop waited {took:?} for slow connections"
    );
    for c in slow {
        assert!(c.await.expect("task").is_some(), "left open after stop");
    }
}

// ---- TLS ---------------------------------------------------------------------------------

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        Pki {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn config(&self, dir: &std::path::Path) -> Config {
        let mut cfg = hostile_config(dir);
        cfg.api.plain_http = false;
        cfg.api.tls_cert = dir.join("server.pem");
        cfg.api.tls_key = dir.join("server.key");
        std::fs::write(&cfg.api.tls_cert, &self.cert_pem).expect("write");
        std::fs::write(&cfg.api.tls_key, &self.key_pem).expect("write");
        cfg.validate().expect("valid TLS config");
        cfg
    }

    fn client(&self, at: SocketAddr) -> reqwest::ClientBuilder {
        fresh_client()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("pem"),
            )
            .resolve("localhost", at)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_tls_handshakes_and_silent_tls_sessions_are_cut() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = pki.config(dir.path());
    let mut tg = TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await;
    let at = addr(&tg);
    tg.base = format!("https://localhost:{}", at.port());
    tg.client = pki.client(at).build().expect("client");
    tg.seed(3).await;
    let before = replica(&tg).await;
    let give_up = Duration::from_secs(TIMEOUT_S) + SLACK + Duration::from_secs(5);
    let mut slow = Vec::new();
    // Silent TCP, and a ClientHello record header trickled a byte a second.
    for _ in 0..60 {
        slow.push(slow_client(at, Vec::new(), Vec::new(), give_up));
        slow.push(slow_client(
            at,
            Vec::new(),
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00],
            give_up,
        ));
    }
    // Sessions that finish the handshake, then send no request.
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let mut silent_sessions = Vec::new();
    for _ in 0..20 {
        let connector = connector.clone();
        silent_sessions.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(at).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut s = connector.connect(name, tcp).await.expect("handshake");
            let t = Instant::now();
            let mut buf = [0u8; 256];
            let r = tokio::time::timeout(give_up, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            r.ok().map(|_| t.elapsed())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lat = probe(&tg.base, &tg.client, 10).await;
    let max = summary("HTTPS latency under 140 stalled TLS connections", lat);
    assert!(
        max < PROMPT,
        "a normal HTTPS request took {max:?} under attack"
    );
    assert_all_cut("unfinished TLS handshakes", slow).await;
    assert_all_cut("TLS sessions without a request", silent_sessions).await;
    assert_unharmed(&tg, &before, "TLS").await;
    assert_normal_command(&tg).await;
    tg.stop().await;
}

// ---- bodies ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_get_408_and_others_are_served() {
    let tg = start(|d| {
        let mut c = hostile_config(d);
        c.api.body_read_timeout_s = 3;
        c
    })
    .await;
    let before = replica(&tg).await;
    let at = addr(&tg);
    let body = br#"{"tenancy_id": "t-future"}"#;
    let mut slow = Vec::new();
    for i in 0..50u32 {
        // Declares the whole body, sends a few bytes at once, then one a second; the
        // snapshot route has its own timeout (set to the same here).
        let mut req = if i.is_multiple_of(2) {
            raw_request("POST", "/v1/units/u1/reserve", body)
        } else {
            raw_request("PUT", "/v1/sync/snapshot", body)
        };
        let tail = req.split_off(req.len() - body.len() + 3);
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let s = TcpStream::connect(at).await.expect("connect");
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                let _ = w.write_all(&req).await;
                for b in tail.iter().take(tail.len() - 1) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if w.write_all(&[*b]).await.is_err() {
                        return;
                    }
                }
                std::future::pending::<()>().await;
            });
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut buf)).await;
            writer.abort();
            let read = read.expect("a trickled body was never answered nor closed");
            (i, started.elapsed(), buf, read.map_err(|e| e.to_string()))
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = fresh_client().build().expect("client");
    let max = summary(
        "latency under 50 trickled bodies",
        probe(&tg.base, &client, 10).await,
    );
    assert!(max < PROMPT, "a normal request took {max:?}");
    let mut took = Vec::new();
    for s in slow {
        let (i, t, raw, read) = s.await.expect("slow body task");
        // The reserve route waits its 3 s, the snapshot route its own 2 s.
        let timeout = Duration::from_secs(if i.is_multiple_of(2) { 3 } else { TIMEOUT_S });
        assert!(
            t >= timeout,
            "{i}: answered after {t:?}, before {timeout:?}"
        );
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with("HTTP/1.1 408 "),
            "{text:?} after {t:?}: {read:?}"
        );
        let json_at = text.find("\r\n\r\n").expect("a head") + 4;
        let body: Value = serde_json::from_str(&text[json_at..]).expect("a JSON error body");
        assert_error_shape(408, &body, 408, "request_timeout");
        took.push(t);
    }
    let max = summary("trickled body answered 408 and closed after", took);
    assert!(max <= Duration::from_secs(3) + SLACK, "{max:?}");
    assert_unharmed(&tg, &before, "slow bodies").await;
    assert_normal_command(&tg).await;
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_headers_and_urls_are_refused_at_once() {
    // The default 30 s body timeout: a 413 that came from waiting would take that long.
    let tg = start(|d| {
        let mut c = hostile_config(d);
        c.api.body_read_timeout_s = 30;
        c
    })
    .await;
    let before = replica(&tg).await;
    let at = addr(&tg);

    // A declared length far over the limit, no body sent: 413 at once.
    for (method, path) in [
        ("POST", "/v1/units/u1/reserve"),
        ("PUT", "/v1/sync/snapshot"),
        ("POST", "/v1/webhooks/x"),
    ] {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000000000\r\n\r\n"
        );
        let r = exchange(at, req.as_bytes(), Duration::from_secs(10)).await;
        println!(
            "Content-Length 1e11 on {path}: {:?} in {:?}",
            r.status, r.took
        );
        if path == "/v1/webhooks/x" {
            // No such source: refused before the body, either way without reading it.
            assert!(matches!(r.status, Some(404 | 413)), "{r:?}");
        } else {
            assert_error_shape(r.status.unwrap_or(0), &r.body, 413, "payload_too_large");
        }
        assert!(r.took < PROMPT, "{path}: {r:?}");
    }
    // Just over the limit, declared: 413; the body itself is never needed.
    let big = vec![b' '; MAX_BODY + 1];
    let r = exchange(
        at,
        &post_raw("/v1/units/u1/reserve", &big),
        Duration::from_secs(10),
    )
    .await;
    assert_error_shape(r.status.unwrap_or(0), &r.body, 413, "payload_too_large");

    // Chunked, growing past the limit: 413.
    let mut req = format!(
        "POST /v1/units/u1/reserve HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..(MAX_BODY / 4096 + 2) {
        req.extend_from_slice(b"1000\r\n");
        req.extend_from_slice(&[b' '; 4096]);
        req.extend_from_slice(b"\r\n");
    }
    let r = exchange(at, &req, Duration::from_secs(10)).await;
    println!(
        "chunked body over the limit: {:?} in {:?}",
        r.status, r.took
    );
    assert_error_shape(r.status.unwrap_or(0), &r.body, 413, "payload_too_large");

    // One huge header, and too many headers: refused (431) or closed, never a 2xx.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4 << 20)
    );
    let r = exchange(at, huge.as_bytes(), Duration::from_secs(10)).await;
    println!(
        "4 MiB header: {:?} closed={} in {:?}",
        r.status, r.closed, r.took
    );
    assert!(r.closed || r.status == Some(431), "{r:?}");
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: gw\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = exchange(at, many.as_bytes(), Duration::from_secs(10)).await;
    println!("500 headers: {:?} closed={}", r.status, r.closed);
    assert!(r.closed || r.status == Some(431), "{r:?}");

    // A very long URL: refused (414/431) or an ordinary 404 in the contract's shape.
    for len in [8 << 10, 1 << 20] {
        let req = format!(
            "GET /v1/units/{} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ADMIN}\r\n\r\n",
            "x".repeat(len)
        );
        let r = exchange(at, req.as_bytes(), Duration::from_secs(10)).await;
        println!("URL of {len} bytes: {:?} closed={}", r.status, r.closed);
        match r.status {
            None => assert!(r.closed),
            Some(414 | 431) => {}
            Some(s) => {
                assert!((400..500).contains(&s), "{r:?}");
                assert!(r.body["error"]["code"].is_string(), "{r:?}");
            }
        }
    }
    assert_unharmed(&tg, &before, "oversized").await;
    assert_normal_command(&tg).await;
    tg.stop().await;
}

// ---- malformed ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_and_json_get_clear_400s() {
    // Deep JSON is large: let the body through the limit so the parser sees it.
    let tg = start(|d| {
        let mut c = hostile_config(d);
        c.api.max_body_bytes = 1 << 20;
        c
    })
    .await;
    let before = replica(&tg).await;
    let at = addr(&tg);
    let within = Duration::from_secs(10);

    // Garbage, HTTP/0.9 and a bad version: a 400 or a close, never a 2xx, never a hang.
    for junk in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"GET /healthz\r\n",
        b"GET /healthz HTTP/9.9\r\n\r\n",
        b"\r\n\r\n\r\n\r\n",
        b"GET /heal\x00thz HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost gw\r\n\r\n",
    ] {
        let r = if junk == b"GET /healthz\r\n" {
            // HTTP/0.9 never sends a blank line: the server must not wait for one forever.
            let mut s = TcpStream::connect(at).await.expect("connect");
            s.write_all(junk).await.expect("write");
            read_answer(&mut s, Duration::from_secs(TIMEOUT_S) + SLACK).await
        } else {
            exchange(at, junk, within).await
        };
        println!(
            "{:?}: {:?} closed={}",
            String::from_utf8_lossy(junk),
            r.status,
            r.closed
        );
        assert!(
            r.closed || r.status.is_some_and(|s| (400..500).contains(&s)),
            "{junk:?}: {r:?}"
        );
    }

    // Bad chunk encoding: 400 in the contract's shape, or a close.
    let bad_chunks = format!(
        "POST /v1/units/u1/reserve HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{{}}\r\n0\r\n\r\n"
    );
    let r = exchange(at, bad_chunks.as_bytes(), within).await;
    println!("bad chunk size: {:?} closed={}", r.status, r.closed);
    if !r.closed {
        assert_error_shape(r.status.unwrap_or(0), &r.body, 400, "bad_request");
    }

    // Invalid UTF-8 inside a JSON string.
    let r = exchange(
        at,
        &post_raw("/v1/units/u1/reserve", b"{\"tenancy_id\": \"t-\xff\xfe\"}"),
        within,
    )
    .await;
    assert_error_shape(r.status.unwrap_or(0), &r.body, 400, "malformed_json");

    // 100 000 levels of nesting, arrays and objects, closed and not: a 400, no stack overflow.
    let depth = 100_000;
    let arrays = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
    let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let open = "[".repeat(depth);
    for (what, body) in [("arrays", arrays), ("objects", objects), ("unclosed", open)] {
        let t = Instant::now();
        let r = exchange(
            at,
            &post_raw("/v1/units/u1/reserve", body.as_bytes()),
            within,
        )
        .await;
        println!("{depth} nested {what}: {:?} in {:?}", r.status, t.elapsed());
        assert_error_shape(r.status.unwrap_or(0), &r.body, 400, "malformed_json");
        let msg = r.body["error"]["message"].as_str().unwrap_or("");
        assert!(
            what == "unclosed" || msg.contains("recursion"),
            "{what}: {msg}"
        );
    }
    // The same over the webhook route (its own body reading).
    let r = exchange(
        at,
        &post_raw("/v1/webhooks/none", "[".repeat(depth).as_bytes()),
        within,
    )
    .await;
    assert!(matches!(r.status, Some(400 | 401 | 404)), "{r:?}");

    assert_unharmed(&tg, &before, "malformed").await;
    assert_normal_command(&tg).await;
    tg.stop().await;
}

// ---- MQTT --------------------------------------------------------------------------------

/// A message the cloud received.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Bytes,
    correlation: Option<Bytes>,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

/// An MQTT 5 client playing the cloud: replies come on its inbox topic.
struct Cloud {
    client: rumqttc::v5::AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn topic(rest: &str) -> String {
    format!("unitgate/v1/{SITE}/{rest}")
}

impl Cloud {
    async fn connect(port: u16) -> Cloud {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::{Event, Incoming};
        let mut o = rumqttc::v5::MqttOptions::new(
            format!("cloud-{:016x}", rand::random::<u64>()),
            "127.0.0.1",
            port,
        );
        o.set_max_packet_size(Some(8 << 20));
        let (client, mut l) = rumqttc::v5::AsyncClient::new(o, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut subacks) = mpsc::unbounded_channel();
        let c2 = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match l.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        for t in [topic("status"), topic("inbox")] {
                            let _ = c2.try_subscribe(t, QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            correlation: p.properties.and_then(|pr| pr.correlation_data),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(20), subacks.recv())
                .await
                .expect("the cloud subscribes")
                .expect("cloud task");
        }
        Cloud { client, rx, task }
    }

    /// Publishes at QoS 1, asking for the reply on the inbox with `corr` when given.
    async fn publish(&self, t: &str, payload: Vec<u8>, retain: bool, corr: Option<&str>) {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::PublishProperties;
        let props = PublishProperties {
            response_topic: corr.map(|_| topic("inbox")),
            correlation_data: corr.map(|c| Bytes::copy_from_slice(c.as_bytes())),
            ..Default::default()
        };
        self.client
            .publish_with_properties(t, QoS::AtLeastOnce, retain, payload, props)
            .await
            .expect("publish");
    }

    /// The next message matching `pred` within `within`.
    async fn next(&mut self, what: &str, within: Duration, pred: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => return m,
                Ok(Some(_)) => continue,
                _ => panic!("no {what} within {within:?}"),
            }
        }
    }

    /// Sends a command and waits for its reply.
    async fn command(&mut self, op: &str, body: Value) -> Value {
        let rid = body["request_id"].as_str().expect("request_id").to_owned();
        let payload = serde_json::to_vec(&body).expect("json");
        self.publish(&topic(&format!("cmd/{op}")), payload, false, Some(&rid))
            .await;
        self.next(
            &format!("the reply to {rid}"),
            Duration::from_secs(20),
            |m| m.topic == topic("inbox") && m.correlation.as_deref() == Some(rid.as_bytes()),
        )
        .await
        .json()
    }
}

fn assert_reply_error(reply: &Value, code: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    let e = &reply["error"];
    assert_eq!(e["code"], code, "{reply}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    assert!(e["details"].is_array(), "{reply}");
    assert!(e["request_id"].is_string(), "{reply}");
}

/// The resident set of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The `unitgate` binary as a daemon (so its memory can be measured on its own), with
/// the test config, MQTT to `mqtt_url` and the API on `port`.
struct Daemon {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn write_config(dir: &std::path::Path, port: u16, mqtt_url: &str) -> std::path::PathBuf {
        let token = |name: &str, t: &str, scope: &str| {
            format!(
                "[[api.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nscopes = [\"{scope}\"]\n",
                unitgate::api::http::auth::token_hash_hex(t)
            )
        };
        let text = format!(
            r#"
[site]
id = "{SITE}"
name = "Test Site"
timezone = "Europe/London"
[store]
data_dir = "{data}"
[api]
listen = "127.0.0.1:{port}"
plain_http = true
control_socket = ""
header_read_timeout_s = {TIMEOUT_S}
body_read_timeout_s = {TIMEOUT_S}
[cloud.mqtt]
url = "{mqtt_url}"
protocol = "v5"
reconnect_max_s = 1
inflight = 20
max_packet_bytes = 4096
{admin}"#,
            data = dir.join("data").display(),
            admin = token("admin", ADMIN, "admin"),
        );
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        let path = dir.join("config.toml");
        std::fs::write(&path, text).expect("config");
        path
    }

    async fn spawn(config: &std::path::Path, base: &str) -> Daemon {
        let log = config.with_extension("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_unitgate"))
            .args(["run", "--config", &config.display().to_string()])
            .env_remove("UNITGATE_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start unitgate");
        let mut d = Daemon { child, log };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await
                && r.status() == 200
            {
                return d;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("unitgate exited ({status}): {}", d.logs());
            }
            assert!(
                Instant::now() < deadline,
                "unitgate never served: {}",
                d.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, and waits for the exit.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("unitgate did not stop on SIGTERM: {}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A normal command over the link still works.
async fn assert_link_serves(cloud: &mut Cloud, rid: &str) {
    let r = cloud
        .command("get_unit", json!({"request_id": rid, "unit_id": "u1"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["unit"]["id"], "u1", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_burst_oversize_odd_topics_and_retained_junk() {
    let b = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let config = Daemon::write_config(dir.path(), port, &b.url(true));
    let base = format!("http://127.0.0.1:{port}");
    let mut daemon = Daemon::spawn(&config, &base).await;
    // The harness's HTTP helpers, pointed at the daemon.
    let tg = TestGateway {
        gw: None,
        cfg: test_config(dir.path()),
        dir: tempfile::tempdir().expect("tempdir"),
        base: base.clone(),
        client: reqwest::Client::new(),
        clock: TestClock::at("2026-03-10T12:00:00Z"),
    };
    tg.seed(3).await;
    let before = replica(&tg).await;
    let mut cloud = Cloud::connect(b.v5).await;
    cloud
        .next("status online", Duration::from_secs(20), |m| {
            m.topic == topic("status") && &m.payload[..] == b"online"
        })
        .await;
    assert_link_serves(&mut cloud, "warm-up").await;

    // A burst: thousands published at once, reads and refused writes, every one answered.
    const BURST: usize = 2000;
    let rss_before = rss(daemon.pid());
    let t = Instant::now();
    for i in 0..BURST {
        let rid = format!("burst-{i}");
        let (op, body) = if i.is_multiple_of(2) {
            ("get_unit", json!({"request_id": rid, "unit_id": "u1"}))
        } else {
            (
                "reserve",
                json!({"request_id": rid, "unit_id": "nope", "tenancy_id": "t-future"}),
            )
        };
        let payload = serde_json::to_vec(&body).expect("json");
        cloud
            .publish(&topic(&format!("cmd/{op}")), payload, false, Some(&rid))
            .await;
    }
    let published = t.elapsed();
    let mut answered = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut rss_peak = rss(daemon.pid());
    while answered.len() < BURST {
        let m = match tokio::time::timeout_at(deadline, cloud.rx.recv()).await {
            Ok(Some(m)) => m,
            _ => panic!("{} of {BURST} burst commands answered", answered.len()),
        };
        let Some(corr) = m.correlation.as_deref() else {
            continue;
        };
        let corr = String::from_utf8_lossy(corr).into_owned();
        if let Some(i) = corr.strip_prefix("burst-") {
            let i: usize = i.parse().expect("index");
            let r = m.json();
            assert_eq!(r["request_id"], corr, "{r}");
            if i.is_multiple_of(2) {
                assert_eq!(r["ok"], true, "{r}");
            } else {
                assert_reply_error(&r, "not_found");
            }
            assert!(answered.insert(i, ()).is_none(), "burst-{i} answered twice");
            if answered.len().is_multiple_of(200) {
                rss_peak = rss_peak.max(rss(daemon.pid()));
            }
        }
    }
    let took = t.elapsed();
    let rss_after = rss(daemon.pid());
    println!(
        "MQTT burst of {BURST}: published in {published:?}, all answered in {took:?} \
         ({:.0}/s); unitgate RSS {} -> peak {} -> {} MiB",
        BURST as f64 / took.as_secs_f64(),
        rss_before >> 20,
        rss_peak.max(rss_after) >> 20,
        rss_after >> 20
    );
    assert!(
        rss_peak.max(rss_after).saturating_sub(rss_before) < 256 << 20,
        "memory grew by {} MiB in the burst",
        (rss_peak.max(rss_after).saturating_sub(rss_before)) >> 20
    );
    assert_link_serves(&mut cloud, "after-burst").await;

    // Payloads around cloud.mqtt.max_packet_bytes (4096).
    let padded = |rid: &str, len: usize| {
        let mut v = serde_json::to_vec(&json!({"request_id": rid, "unit_id": "u1"})).expect("json");
        v.truncate(v.len() - 1);
        v.extend_from_slice(b",\"pad\":\"");
        let fill = len.saturating_sub(v.len() + 2);
        v.extend(std::iter::repeat_n(b'a', fill));
        v.extend_from_slice(b"\"}");
        assert_eq!(v.len(), len);
        v
    };
    for (rid, len, too_large) in [
        ("at-limit", 4096, false),
        ("over-by-1", 4097, true),
        ("over-1m", 1 << 20, true),
    ] {
        cloud
            .publish(&topic("cmd/get_unit"), padded(rid, len), false, Some(rid))
            .await;
        let r = cloud
            .next(
                &format!("the reply to {rid}"),
                Duration::from_secs(20),
                |m| m.correlation.as_deref() == Some(rid.as_bytes()),
            )
            .await
            .json();
        println!("{len}-byte command: {}", r["error"]["code"]);
        if too_large {
            assert_reply_error(&r, "payload_too_large");
        } else {
            // Read past the size check: judged on its fields (an unknown one, `pad`).
            assert_ne!(r["error"]["code"], "payload_too_large", "{r}");
            assert!(r["ok"].is_boolean(), "{r}");
        }
    }
    assert_link_serves(&mut cloud, "after-oversize").await;

    // Odd topics: each answered in the contract's shape with unknown_operation.
    let long = "x".repeat(10_000);
    for (i, op) in [
        "",
        "nope",
        "reserve/extra",
        "get_unit/",
        "rés€rve",
        "..",
        long.as_str(),
    ]
    .iter()
    .enumerate()
    {
        let rid = format!("odd-{i}");
        let body = json!({"request_id": rid, "unit_id": "u1", "tenancy_id": "t-future"});
        let r = cloud.command(op, body).await;
        assert_reply_error(&r, "unknown_operation");
    }
    // Another site's command topic and topics outside cmd/: never acted on.
    for t in [
        "unitgate/v1/other-site/cmd/reserve".to_owned(),
        topic("cmd"),
        topic("reply/x"),
        topic("units/u1"),
    ] {
        let body = json!({"request_id": "elsewhere", "unit_id": "u1", "tenancy_id": "t-future"});
        cloud
            .publish(
                &t,
                serde_json::to_vec(&body).expect("json"),
                false,
                Some("elsewhere"),
            )
            .await;
    }
    assert_link_serves(&mut cloud, "after-odd").await;

    // A flood of junk on a command topic that holds retained junk, then a gateway restart
    // (which receives the retained junk again on subscribing).
    cloud
        .publish(
            &topic("cmd/reserve"),
            b"\xff retained junk".to_vec(),
            true,
            None,
        )
        .await;
    cloud
        .publish(
            &topic("cmd/get_unit"),
            b"{\"request_id\":".to_vec(),
            true,
            None,
        )
        .await;
    for i in 0..1000u32 {
        let junk: Vec<u8> = match i % 4 {
            0 => b"\x00\x01\x02".to_vec(),
            1 => b"{}".to_vec(),
            2 => format!("{{\"request_id\": {i}}}").into_bytes(),
            _ => "[".repeat(10_000).into_bytes(),
        };
        cloud
            .publish(&topic("cmd/reserve"), junk, i.is_multiple_of(10), None)
            .await;
    }
    assert_link_serves(&mut cloud, "after-flood").await;
    assert_unharmed(&tg, &before, "MQTT flood").await;
    daemon.stop().await;
    daemon = Daemon::spawn(&config, &base).await;
    // Back online despite the retained junk it was handed on subscribing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let rid = format!("after-restart-{n}");
        let body = json!({"request_id": rid, "unit_id": "u1"});
        cloud
            .publish(
                &topic("cmd/get_unit"),
                serde_json::to_vec(&body).expect("json"),
                false,
                Some(&rid),
            )
            .await;
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match cloud.rx.recv().await {
                    Some(m) if m.correlation.as_deref() == Some(rid.as_bytes()) => return m,
                    Some(_) => continue,
                    None => std::future::pending().await,
                }
            }
        })
        .await;
        if let Ok(m) = got {
            assert_eq!(m.json()["ok"], true, "{:?}", m.json());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the link never served after the restart"
        );
    }
    // Clear the retained junk.
    for t in ["cmd/reserve", "cmd/get_unit"] {
        cloud.publish(&topic(t), Vec::new(), true, None).await;
    }
    assert_unharmed(&tg, &before, "MQTT retained junk").await;
    assert_normal_command(&tg).await;
    daemon.stop().await;
}
