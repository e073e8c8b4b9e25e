//! HTTPS for the API: PEM files to a rustls [`ServerConfig`] (optional mTLS), and a
//! [`TlsListener`] that completes handshakes in their own tasks so a slow or stalled
//! client never holds up the others.

use crate::config::ApiConfig;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to complete the TLS handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; beyond this, new connections wait in the kernel backlog.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Finished handshakes waiting for the server to pick them up.
const READY_QUEUE: usize = 64;

/// A TLS setup problem, naming the configuration key it comes from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A configured file cannot be read.
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        /// The configuration key, e.g. `api.tls_cert`.
        key: &'static str,
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A configured file is not the PEM it should be, or rustls refuses its contents.
    #[error("{key}: {path}: {message}")]
    Invalid {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The crypto provider of every TLS config here: the one reqwest's rustls also uses,
/// so the build carries a single crypto library.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

fn invalid(key: &'static str, path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        key,
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_private_key(
    key: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_pem(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => invalid(
            key,
            path,
            "holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA or EC)",
        ),
        e => invalid(key, path, format!("not valid PEM: {e}")),
    })
}

/// The server config of `api`: TLS 1.3 and 1.2, ALPN h2 and http/1.1, and client
/// certificates required when `api.tls_client_ca` is set. Reads the files now.
pub fn server_config(api: &ApiConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certs = load_certs("api.tls_cert", &api.tls_cert)?;
    let private_key = load_private_key("api.tls_key", &api.tls_key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid("api.tls_cert", &api.tls_cert, e.to_string()))?;
    let builder = if api.tls_client_ca.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let key = "api.tls_client_ca";
        let path = &api.tls_client_ca;
        let mut roots = RootCertStore::empty();
        for cert in load_certs(key, path)? {
            roots
                .add(cert)
                .map_err(|e| invalid(key, path, format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| invalid(key, path, e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_single_cert(certs, private_key).map_err(|e| {
        invalid(
            "api.tls_key",
            &api.tls_key,
            format!("does not fit the certificate of api.tls_cert: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands over only those that completed the TLS handshake.
///
/// Handshakes run in their own tasks with a deadline; a failed or late one is logged at
/// debug and dropped. Dropping the listener stops accepting and closes the socket.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `tcp` (call inside a tokio runtime).
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>, handshake_timeout: Duration) -> Self {
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        // An address we cannot read is not worth failing for; axum only logs it.
        let local_addr = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let acceptor = tokio::spawn(accept_loop(
            tcp,
            TlsAcceptor::from(config),
            handshake_timeout,
            tx,
        ));
        TlsListener {
            ready,
            local_addr,
            acceptor,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = pending.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = tx.closed() => return,
            r = tcp.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // The server is gone when this fails; the connection just closes.
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(
                    %peer,
                    timeout_s = handshake_timeout.as_secs_f32(),
                    "TLS handshake timed out"
                ),
            }
        });
    }
}

/// Per-connection errors are the client's problem; anything else (e.g. out of file
/// descriptors) is logged and retried after a pause, as axum's own TCP listener does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        tracing::debug!(error = %e, "accept failed");
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            None => {
                // The accept loop only ends once this listener is dropped; should it ever
                // end otherwise, stop handing out connections rather than spin.
                tracing::error!("the TLS accept loop stopped");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::ServerName;
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        dir: tempfile::TempDir,
        ca_der: CertificateDer<'static>,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca, ca_key);
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
            Pki {
                ca_der: ca_cert.der().clone(),
                dir,
            }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn api(&self) -> ApiConfig {
            ApiConfig {
                tls_cert: self.path("cert.pem"),
                tls_key: self.path("key.pem"),
                ..ApiConfig::default()
            }
        }

        fn client(&self) -> tokio_rustls::TlsConnector {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        }
    }

    fn err_text(api: &ApiConfig) -> String {
        server_config(api).expect_err("must fail").to_string()
    }

    #[test]
    fn problems_name_the_key_and_the_file() {
        let pki = Pki::new();
        let mut api = pki.api();
        api.tls_cert = pki.path("missing.pem");
        let e = err_text(&api);
        assert!(
            e.starts_with(&format!(
                "api.tls_cert: cannot read {}: ",
                api.tls_cert.display()
            )),
            "{e}"
        );

        let mut api = pki.api();
        api.tls_cert = pki.path("key.pem");
        assert!(err_text(&api).contains("holds no PEM certificate"));

        let mut api = pki.api();
        api.tls_key = pki.path("cert.pem");
        let e = err_text(&api);
        assert!(
            e.starts_with("api.tls_key: ") && e.contains("no PEM private key"),
            "{e}"
        );

        std::fs::write(pki.path("junk.pem"), "not pem at all\n").unwrap();
        let mut api = pki.api();
        api.tls_client_ca = pki.path("junk.pem");
        let e = err_text(&api);
        assert!(
            e.starts_with("api.tls_client_ca: ") && e.contains("no PEM certificate"),
            "{e}"
        );

        // The CA's certificate with the server's key: a mismatch is caught at start.
        let mut api = pki.api();
        api.tls_cert = pki.path("ca.pem");
        let e = err_text(&api);
        assert!(
            e.starts_with("api.tls_key: ") && e.contains("does not fit"),
            "{e}"
        );

        assert!(server_config(&pki.api()).is_ok());
    }

    #[test]
    fn offers_h2_and_http1() {
        let pki = Pki::new();
        let config = server_config(&pki.api()).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    async fn listener(pki: &Pki, timeout: Duration) -> (TlsListener, SocketAddr) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let config = server_config(&pki.api()).unwrap();
        (TlsListener::new(tcp, config, timeout), addr)
    }

    #[tokio::test]
    async fn stalled_and_broken_handshakes_do_not_hold_up_others() {
        use axum::serve::Listener;
        let pki = Pki::new();
        let (mut l, addr) = listener(&pki, Duration::from_secs(60)).await;
        // One client that never speaks, one that speaks garbage.
        let _stalled = TcpStream::connect(addr).await.unwrap();
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let connector = pki.client();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            tls.write_all(b"ping").await.unwrap();
            tls.flush().await.unwrap();
            tls
        });
        let (mut io, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .expect("the good client is handed over while another one stalls");
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // The broken client was dropped, not handed over: its socket is closed.
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut rest))
            .await
            .expect("the server closes a failed handshake")
            .unwrap_or(0);
        assert!(
            !rest.starts_with(b"HTTP/"),
            "plain HTTP got an HTTP answer: {n} bytes"
        );
        client.await.unwrap();
    }

    #[tokio::test]
    async fn a_handshake_past_the_deadline_is_closed() {
        let pki = Pki::new();
        let (_l, addr) = listener(&pki, Duration::from_millis(200)).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut buf))
            .await
            .expect("the server hangs up on a silent client after the deadline");
        assert!(matches!(r, Ok(0)) || r.is_err(), "{r:?}");
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn dropping_the_listener_closes_the_port() {
        let pki = Pki::new();
        let (l, addr) = listener(&pki, HANDSHAKE_TIMEOUT).await;
        drop(l);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if TcpStream::connect(addr).await.is_err() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still accepting after the listener was dropped"
            );
            tokio::task::yield_now().await;
        }
    }
}
