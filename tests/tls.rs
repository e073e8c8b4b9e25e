//! HTTPS on the API (DESIGN.md §3): rustls with certificates made at test time, ALPN,
//! handshakes that cannot block each other, optional mTLS, and startup errors naming the key.

mod common;

use common::{ADMIN, TestClock, TestGateway, test_config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use unitgate::config::Config;
use unitgate::gateway::Gateway;

/// A CA that can sign certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`, as (cert PEM, key PEM).
    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The site's PKI, written to the gateway's data directory.
struct Pki {
    server_ca: Ca,
    client_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            server_ca: Ca::new("unitgate test server CA"),
            client_ca: Ca::new("unitgate test client CA"),
        }
    }

    /// A config serving HTTPS with a server certificate for localhost and 127.0.0.1.
    fn config(&self, dir: &Path, mtls: bool) -> Config {
        let mut cfg = test_config(dir);
        let (cert, key) = self.server_ca.sign(&["localhost", "127.0.0.1"]);
        let write = |name: &str, text: &str| -> PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        cfg.api.plain_http = false;
        cfg.api.tls_cert = write("server.pem", &cert);
        cfg.api.tls_key = write("server.key", &key);
        if mtls {
            cfg.api.tls_client_ca = write("clients-ca.pem", &self.client_ca.pem);
        }
        cfg.validate().expect("valid TLS config");
        cfg
    }

    /// A client that trusts the server CA; `localhost` resolves to the gateway.
    fn client(&self, addr: SocketAddr) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.server_ca.pem.as_bytes()).unwrap(),
            )
            .resolve("localhost", addr)
            .timeout(Duration::from_secs(5))
    }
}

/// Starts the gateway with TLS and points the harness at it over HTTPS.
async fn start(pki: &Pki, mtls: bool) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let cfg = pki.config(dir.path(), mtls);
    let mut t = TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await;
    let addr = t.gw.as_ref().unwrap().addr;
    t.base = format!("https://localhost:{}", addr.port());
    t.client = pki.client(addr).build().unwrap();
    t
}

fn addr(t: &TestGateway) -> SocketAddr {
    t.gw.as_ref().unwrap().addr
}

/// The whole error chain as text (reqwest hides the TLS cause in its sources).
fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(" / ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[tokio::test]
async fn https_serves_health_and_authenticated_routes() {
    let pki = Pki::new();
    let t = start(&pki, false).await;
    assert!(t.base.starts_with("https://"));

    let h = t
        .call(reqwest::Method::GET, "/healthz", None, None, &[])
        .await;
    assert_eq!(h.status, 200, "{:?}", h.body);

    t.seed(2).await;
    let a = t.get("/v1/units/u1").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["unit"]["status"], "available");
    let list = t.get("/v1/units").await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert_eq!(list.body["units"].as_array().unwrap().len(), 2);

    // TLS does not replace the bearer token.
    let anon = t
        .call(reqwest::Method::GET, "/v1/units", None, None, &[])
        .await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.code(), "unauthorized");

    // The certificate names the IP too.
    let by_ip = t
        .client
        .get(format!("https://127.0.0.1:{}/healthz", addr(&t).port()))
        .send()
        .await
        .expect("https by IP");
    assert_eq!(by_ip.status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn alpn_offers_h2_and_http1() {
    let pki = Pki::new();
    let t = start(&pki, false).await;
    let url = format!("{}/v1/units", t.base);

    let h2 = t.client.get(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(h2.version(), reqwest::Version::HTTP_2);
    assert_eq!(h2.status(), 200);

    let h1 = pki.client(addr(&t)).http1_only().build().unwrap();
    let r = h1.get(&url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    t.stop().await;
}

#[tokio::test]
async fn plain_http_and_untrusting_clients_are_refused() {
    let pki = Pki::new();
    let t = start(&pki, false).await;
    let port = addr(&t).port();

    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP on the TLS port answered: {plain:?}"
    );
    assert!(
        !plain.unwrap_err().is_timeout(),
        "refused, not left hanging"
    );

    // A client with only the usual roots does not trust the site's CA.
    let stranger = reqwest::Client::builder()
        .resolve("localhost", addr(&t))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .expect_err("a client that does not trust the CA must fail");
    assert!(stranger.is_connect(), "{}", chain(&stranger));
    assert!(
        chain(&stranger).to_lowercase().contains("certificate"),
        "{}",
        chain(&stranger)
    );

    // The server survives both.
    let h = t
        .call(reqwest::Method::GET, "/healthz", None, None, &[])
        .await;
    assert_eq!(h.status, 200);
    t.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_does_not_block_other_clients() {
    let pki = Pki::new();
    let t = start(&pki, false).await;
    // One connection that never sends a ClientHello, one that stops half-way through a record.
    let _silent = TcpStream::connect(addr(&t)).await.unwrap();
    let mut partial = TcpStream::connect(addr(&t)).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();

    // Handshakes time out after 10 s; the client gives up after 5 s, so a listener that
    // handshakes one connection at a time fails here.
    let h = t
        .call(reqwest::Method::GET, "/healthz", None, None, &[])
        .await;
    assert_eq!(h.status, 200);
    let a = t.get("/v1/units").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    t.stop().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let pki = Pki::new();
    let t = start(&pki, true).await;
    let url = format!("{}/healthz", t.base);

    let none = t
        .client
        .get(&url)
        .send()
        .await
        .expect_err("no client certificate must be refused");
    assert!(!none.is_timeout(), "{}", chain(&none));

    let identity = |ca: &Ca| {
        let (cert, key) = ca.sign(&["site-cloud"]);
        reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap()
    };
    let rogue = Ca::new("someone else's CA");
    let wrong = pki
        .client(addr(&t))
        .identity(identity(&rogue))
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .expect_err("a certificate from another CA must be refused");
    assert!(!wrong.is_timeout(), "{}", chain(&wrong));

    let good = pki
        .client(addr(&t))
        .identity(identity(&pki.client_ca))
        .build()
        .unwrap();
    let r = good.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = good
        .get(format!("{}/v1/units", t.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["units"], serde_json::json!([]));
    // The certificate authenticates the connection; the token still authorises the request.
    let r = good
        .get(format!("{}/v1/units", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    t.stop().await;
}

#[tokio::test]
async fn missing_or_bad_files_stop_the_start_naming_the_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::at("2026-03-10T12:00:00Z").clock();

    let mut cfg = pki.config(dir.path(), false);
    let missing = dir.path().join("nope.pem");
    cfg.api.tls_cert = missing.clone();
    let e = Gateway::start(&cfg, clock.clone())
        .await
        .err()
        .expect("a missing certificate must stop the start")
        .to_string();
    assert!(
        e.starts_with(&format!(
            "api.tls_cert: cannot read {}: ",
            missing.display()
        )),
        "{e}"
    );
    assert!(e.contains("No such file"), "{e}");
    // Nothing was opened: the failure comes before the replica.
    assert!(!dir.path().join("unitgate.db").exists());

    let mut cfg = pki.config(dir.path(), false);
    cfg.api.tls_key = cfg.api.tls_cert.clone();
    let e = Gateway::start(&cfg, clock.clone())
        .await
        .err()
        .expect("a certificate where the key belongs must stop the start")
        .to_string();
    assert!(e.starts_with("api.tls_key: "), "{e}");
    assert!(e.contains("no PEM private key"), "{e}");

    let mut cfg = pki.config(dir.path(), true);
    std::fs::write(&cfg.api.tls_client_ca, "garbage\n").unwrap();
    let e = Gateway::start(&cfg, clock.clone())
        .await
        .err()
        .expect("a client CA file without certificates must stop the start")
        .to_string();
    assert!(e.starts_with("api.tls_client_ca: "), "{e}");

    cfg.api.tls_client_ca = dir.path().join("absent-ca.pem");
    let e = Gateway::start(&cfg, clock)
        .await
        .err()
        .expect("a missing client CA must stop the start")
        .to_string();
    assert!(e.starts_with("api.tls_client_ca: cannot read "), "{e}");
}

#[tokio::test]
async fn stop_closes_the_tls_port() {
    let pki = Pki::new();
    let t = start(&pki, false).await;
    let a = addr(&t);
    assert_eq!(
        t.call(reqwest::Method::GET, "/healthz", None, None, &[])
            .await
            .status,
        200
    );
    t.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(a).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the port still accepts after stop"
        );
        tokio::task::yield_now().await;
    }
}
