//! A real MQTT broker (rumqttd) for the tests, in a child process so a test can kill it
//! (a broker crash: sockets closed, sessions gone) and start it again on the same ports.
//! The child is this same test binary, running the ignored test that calls
//! [`serve_if_child`]; a test binary using this module must declare that test.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENV: &str = "UNITGATE_TEST_BROKER";

/// The name of the test that serves as the broker's process.
pub const CHILD_TEST: &str = "embedded_broker_process";

/// A broker child process with a v3.1.1 and a v5 listener.
pub struct Broker {
    /// Port of the MQTT 3.1.1 listener.
    pub v4: u16,
    /// Port of the MQTT 5 listener.
    pub v5: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    // Bound then released: the broker binds it right after. Two tests racing for the
    // same released port is possible in theory; the kernel hands ports out in sequence.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Broker {
    /// Starts a broker on two free ports and waits until both accept connections.
    pub fn start() -> Broker {
        let mut b = Broker {
            v4: free_port(),
            v5: free_port(),
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args([
                CHILD_TEST,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV, format!("{},{}", self.v4, self.v5))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("broker process starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [self.v4, self.v5] {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                assert!(Instant::now() < deadline, "broker never listened on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the broker (no clean shutdown, nothing persisted).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the broker and starts a fresh one on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `mqtt://127.0.0.1:{port}` of the v5 or the v3.1.1 listener.
    #[allow(dead_code, reason = "not every test binary connects directly")]
    pub fn url(&self, v5: bool) -> String {
        format!("mqtt://127.0.0.1:{}", if v5 { self.v5 } else { self.v4 })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// In the broker's child process: runs rumqttd on the ports the parent chose, forever.
/// Anywhere else: returns at once.
pub fn serve_if_child() {
    let Ok(ports) = std::env::var(ENV) else {
        return;
    };
    let (v4, v5) = ports.split_once(',').expect("two ports");
    let conn = serde_json::json!({
        "connection_timeout_ms": 60000,
        "max_payload_size": 4 << 20,
        "max_inflight_count": 500,
        "dynamic_filters": true,
    });
    let server = |name: &str, port: &str| {
        serde_json::json!({
            "name": name,
            "listen": format!("127.0.0.1:{port}"),
            "next_connection_delay_ms": 1,
            "connections": conn,
        })
    };
    let config: rumqttd::Config = serde_json::from_value(serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 1000,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104857600,
            "max_segment_count": 10,
        },
        "v4": {"1": server("v4", v4)},
        "v5": {"1": server("v5", v5)},
    }))
    .expect("broker config");
    let mut broker = rumqttd::Broker::new(config);
    broker.start().expect("broker runs");
}

/// A TCP relay in front of the broker that can refuse connections, so a test decides when
/// the gateway may reconnect (after the cloud has resubscribed), and can cut the live ones
/// (the link dies without the broker noticing anything but a closed socket).
#[allow(dead_code, reason = "not every test binary relays")]
pub struct Relay {
    /// The port the gateway connects to.
    pub port: u16,
    /// Whether new connections are let through.
    pub open: Arc<AtomicBool>,
    /// Bytes relayed from the broker to the gateway.
    pub down: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

#[allow(dead_code, reason = "not every test binary relays")]
impl Relay {
    /// Listens on a free port, relaying to the broker's `upstream` port.
    pub async fn start(upstream: u16) -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(true));
        let down = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (gate, count, live) = (open.clone(), down.clone(), conns.clone());
        let task = tokio::spawn(async move {
            while let Ok((gw, _)) = l.accept().await {
                if !gate.load(Ordering::SeqCst) {
                    continue;
                }
                let count = count.clone();
                let t = tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut gr, mut gw) = gw.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let to_broker = tokio::io::copy(&mut gr, &mut uw);
                    let to_gateway = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match ur.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if gw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            count.fetch_add(n as u64, Ordering::SeqCst);
                        }
                    };
                    tokio::select! {
                        _ = to_broker => {}
                        _ = to_gateway => {}
                    }
                });
                live.lock().expect("lock").push(t.abort_handle());
            }
        });
        Relay {
            port,
            open,
            down,
            conns,
            task,
        }
    }

    /// Closes every relayed connection now (both sockets dropped).
    pub fn cut(&self) {
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
