//! `cargo bench --bench cloud`: the MQTT link (issue 7), against a real broker on a free
//! loopback port: Mosquitto in its own process when installed (`/usr/sbin/mosquitto`, with
//! `set_tcp_nodelay true`), else rumqttd on a thread of this process; `BENCH_BROKER=mosquitto`
//! or `rumqttd` chooses. A rumqttc v5 client plays the cloud. rumqttd 0.20 never disables
//! Nagle on its sockets: against it every command round trip carries a ~40 ms delayed-ACK
//! stall (measured: p50 43.8 ms, vs 1.2 ms against Mosquitto), so it is not the baseline.
//!
//! 1. Command round trip: the cloud publishes `cmd/grant_access` / `cmd/deallocate`
//!    alternately (QoS 1, response topic + correlation data), one at a time, and a sample is
//!    publish → reply received (dispatch, the durable commit, the reply publish; the link
//!    publishes the command's events and unit state at the same time). Baseline, in the same
//!    run: the same client publishing QoS 1 to a topic it subscribes to itself (the broker's
//!    own ping-pong). Reported: p50/p99 of both and the difference (percentiles of two
//!    distributions, not a per-sample difference).
//! 2. Offline backlog: the link points at a port where no broker listens yet, and N
//!    `access.granted` events (each naming one of 50 existing units, as a keypad would) are
//!    appended through the store with `store::events::append`, 50,000 per transaction — built
//!    offline, not through the gate (the drain is what is measured). Then the broker starts,
//!    a subscriber counts every event on `unitgate/v1/{site}/events` (each `seq` exactly
//!    once, checked), and the drain ends when it has all N and the durable cursor
//!    (`store::cloud::cursor(conn, "mqtt")`) has reached the last one. Drain rate = N / time
//!    from the first event received to the end (the reconnect wait is reported separately).
//!    RSS (`VmRSS` of this process, sampled every 20 ms) before, during build-up and during
//!    the drain. With Mosquitto the subscriber is `mosquitto_sub` (another process), so the
//!    drain's RSS is the gateway's alone; with rumqttd it includes the broker (its log bounded
//!    by `BENCH_BROKER_SEGMENT_MIB` × 4 segments) and the subscriber. Disk bytes per event:
//!    (DB + WAL after build-up − before) / N.
//!
//! Targets (issue 7): drain ≥ 10,000 events/s to a local broker; RSS flat and under 50 MB.
//! Prints a table for people and one JSON object on a line of its own (the only stdout line
//! starting with `{`) for machines. A wrong answer fails the run: a reply that is not
//! `ok` with the expected unit status, a reply or event missing past its deadline, an event
//! received twice or out of the built range. A missed target is reported (PASS/MISS) but
//! does not fail the run.
//!
//! Sizes (environment variables, defaults in brackets): `BENCH_MQTT_OPS` round trips per
//! series [1000], `BENCH_BACKLOG` events in the backlog [300000: 1,000,000 takes about 60 s on its
//! own on 2 cores, over the run's 90 s budget with the round trips; the report extrapolates], `BENCH_INFLIGHT` the
//! link's `cloud.mqtt.inflight` [the gateway's default], `BENCH_BROKER_SEGMENT_MIB` rumqttd's
//! log segment size [8].

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use axum::body::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use serde_json::{Value, json};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use unitgate::api::http::auth::token_hash_hex;
use unitgate::command::snapshot::Snapshot;
use unitgate::command::{Command, Envelope, system_clock};
use unitgate::config::{Config, MqttConfig, TokenConfig};
use unitgate::domain::EventType;
use unitgate::gateway::Gateway;
use unitgate::store::{StoreError, cloud, events};

const SITE: &str = "site-bench";
const TARGET_DRAIN_PER_S: f64 = 10_000.0;
const TARGET_RSS_MB: f64 = 50.0;
/// Events appended per store transaction while building the backlog.
const BUILD_CHUNK: usize = 50_000;
/// Units the backlog's access events name (existing units, so their states are published).
const BACKLOG_UNITS: usize = 50;
/// Units the round-trip commands rotate over.
const RT_UNITS: usize = 16;
/// Round trips before the clock starts (connections, caches).
const WARMUP: usize = 20;
const REPLY_WAIT: Duration = Duration::from_secs(10);

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// Sizes, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    ops: usize,
    backlog: usize,
    inflight: Option<u16>,
    segment_mib: usize,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let s = Settings {
            ops: env_usize("BENCH_MQTT_OPS", 1000)?,
            backlog: env_usize("BENCH_BACKLOG", 300_000)?,
            inflight: match std::env::var("BENCH_INFLIGHT") {
                Ok(v) => Some(v.trim().parse().context("BENCH_INFLIGHT")?),
                Err(_) => None,
            },
            segment_mib: env_usize("BENCH_BROKER_SEGMENT_MIB", 8)?,
        };
        ensure!(
            s.ops >= 2 && s.backlog >= 1,
            "BENCH_MQTT_OPS >= 2, BENCH_BACKLOG >= 1"
        );
        ensure!(s.segment_mib >= 1, "BENCH_BROKER_SEGMENT_MIB >= 1");
        Ok(s)
    }
}

// ---- broker, RSS, gateway -----------------------------------------------------------------

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The broker the bench runs against: Mosquitto in its own process when installed
/// (`BENCH_BROKER=mosquitto`, the default if `/usr/sbin/mosquitto` exists), else rumqttd on a
/// thread of this process (`BENCH_BROKER=rumqttd`; its memory then counts in this process's RSS).
enum Broker {
    Mosquitto {
        child: std::process::Child,
        _dir: tempfile::TempDir,
    },
    Rumqttd,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn broker_kind() -> String {
    std::env::var("BENCH_BROKER").unwrap_or_else(|_| {
        if Path::new(MOSQUITTO).exists() {
            "mosquitto".into()
        } else {
            "rumqttd".into()
        }
    })
}

/// Starts the broker on `port` and waits until it accepts connections.
fn start_broker(port: u16, segment_mib: usize) -> Result<Broker> {
    let broker = match broker_kind().as_str() {
        "mosquitto" => start_mosquitto(port)?,
        "rumqttd" => {
            start_rumqttd(port, segment_mib)?;
            Broker::Rumqttd
        }
        other => bail!("BENCH_BROKER={other:?}: mosquitto or rumqttd"),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        ensure!(
            Instant::now() < deadline,
            "the broker never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(broker)
}

/// Mosquitto on loopback, without Nagle, in memory, queues large enough for the drain.
fn start_mosquitto(port: u16) -> Result<Broker> {
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n\
             persistence false\nmax_inflight_messages 1000\nmax_queued_messages 100000\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        ),
    )?;
    let child = std::process::Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {MOSQUITTO}"))?;
    Ok(Broker::Mosquitto { child, _dir: dir })
}

/// rumqttd (MQTT 5 listener) on its own thread of this process.
fn start_rumqttd(port: u16, segment_mib: usize) -> Result<()> {
    let config: rumqttd::Config = serde_json::from_value(json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 100,
            "max_outgoing_packet_count": 200,
            "max_segment_size": segment_mib << 20,
            "max_segment_count": 4,
        },
        "v5": {"1": {
            "name": "bench",
            "listen": format!("127.0.0.1:{port}"),
            "next_connection_delay_ms": 1,
            "connections": {
                "connection_timeout_ms": 60000,
                "max_payload_size": 4 << 20,
                "max_inflight_count": 500,
                "dynamic_filters": true,
            },
        }},
    }))?;
    std::thread::Builder::new()
        .name("bench-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("the bench broker stopped: {e}");
            }
        })?;
    Ok(())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples this process's RSS every 20 ms until dropped.
struct RssSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if let Ok(mut v) = s.lock() {
                    v.push((Instant::now(), rss_kib()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler { samples, stop }
    }

    /// Max RSS (MB) sampled between `from` and `to`, with the current value at `to`.
    fn max_mb(&self, from: Instant, to: Instant) -> f64 {
        let v = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        let max = v
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, k)| *k)
            .max()
            .unwrap_or(0)
            .max(rss_kib());
        max as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn now_mb() -> f64 {
    rss_kib() as f64 / 1024.0
}

async fn start_gateway(dir: &Path, mqtt_port: u16, inflight: Option<u16>) -> Result<Gateway> {
    let mut cfg = Config::from_toml(&format!(
        r#"
        [site]
        id = "{SITE}"
        name = "Bench Site"
        timezone = "Europe/London"
        [api]
        listen = "127.0.0.1:0"
        plain_http = true
        "#
    ))?;
    cfg.store.data_dir = dir.to_owned();
    cfg.api.tokens = vec![TokenConfig {
        name: "bench".into(),
        sha256: token_hash_hex("bench-admin-token-0123456789"),
        scopes: vec!["admin".into()],
    }];
    let mut mqtt = json!({
        "url": format!("mqtt://127.0.0.1:{mqtt_port}"),
        "protocol": "v5",
        "client_id": format!("unitgate-bench-{mqtt_port}"),
        "reconnect_max_s": 1,
    });
    if let Some(n) = inflight {
        mqtt["inflight"] = json!(n);
    }
    cfg.cloud.mqtt = Some(serde_json::from_value::<MqttConfig>(mqtt)?);
    cfg.validate()
        .map_err(|p| anyhow!("bench config is invalid: {p:?}"))?;
    Ok(Gateway::start(&cfg, system_clock()).await?)
}

/// Applies a snapshot with `units` units `u-0..` (available) and one active tenancy `t-0`.
async fn seed(gw: &Gateway, units: usize) -> Result<()> {
    let units: Vec<Value> = (0..units)
        .map(|i| {
            json!({
                "id": format!("u-{i}"), "name": format!("U{i:04}"), "unit_type": "small",
                "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 5,
                "door_type": "roll_up", "access_type": "indoor", "standard_rate": 45.0,
                "walk_thru_order": i, "floor": 1, "zones": ["main-gate"],
                "status": "available",
            })
        })
        .collect();
    let body = json!({
        "unit_types": [{"id": "small", "name": "Small 5x5"}],
        "units": units,
        "contacts": [{"id": "c-0", "name": "Tenant 0", "access_code": "10000000"}],
        "tenancies": [{"id": "t-0", "contact_id": "c-0", "start_date": "2020-01-01", "state": "active"}],
        "allocations": [],
    });
    let snapshot: Snapshot = unitgate::command::unit::parse_at(body, "")
        .map_err(|e| anyhow!("seed snapshot: {}: {}", e.field, e.message))?;
    let reply = gw
        .executor
        .execute(Envelope {
            command: Command::Snapshot(Box::new(snapshot)),
            idempotency_key: None,
            fingerprint: [0; 32],
            if_match: None,
            request_id: "bench-seed".into(),
        })
        .await;
    ensure!(
        reply.status == 200,
        "seed snapshot answered {}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body[..reply.body.len().min(1000)])
    );
    Ok(())
}

fn topic(rest: &str) -> String {
    format!("unitgate/v1/{SITE}/{rest}")
}

// ---- the cloud's client -------------------------------------------------------------------

/// A message the cloud received.
struct Msg {
    topic: Bytes,
    payload: Bytes,
    correlation: Option<Bytes>,
}

/// A rumqttc v5 client; its event loop runs in a task and forwards every publish.
struct Cloud {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cloud {
    /// Connects and subscribes to `subs` (QoS 1), returning once every SUBACK arrived.
    async fn connect(port: u16, id: &str, subs: &[String]) -> Result<Cloud> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(Some(8 << 20));
        o.set_keep_alive(Duration::from_secs(30));
        // The cloud's side without Nagle (rumqttd itself has no such option).
        let mut net = o.network_options();
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        let (client, mut l) = AsyncClient::new(o, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let (c2, subs2) = (client.clone(), subs.to_vec());
        let task = tokio::spawn(async move {
            loop {
                match l.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        for s in &subs2 {
                            let _ = c2.try_subscribe(s.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(Msg {
                            topic: p.topic,
                            payload: p.payload,
                            correlation: p.properties.and_then(|pr| pr.correlation_data),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        for _ in subs {
            tokio::time::timeout(REPLY_WAIT, sub_rx.recv())
                .await
                .context("the cloud client's subscription was not acknowledged")?
                .context("the cloud client's task ended")?;
        }
        Ok(Cloud { client, rx, task })
    }

    /// The next message on `topic` (with `correlation`, if given), skipping others.
    async fn next(&mut self, topic: &[u8], correlation: Option<&[u8]>) -> Result<Msg> {
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m))
                    if &m.topic[..] == topic
                        && correlation.is_none_or(|c| m.correlation.as_deref() == Some(c)) =>
                {
                    return Ok(m);
                }
                Ok(Some(_)) => continue,
                Ok(None) => bail!("the cloud client's task ended"),
                Err(_) => bail!(
                    "nothing on {} within {REPLY_WAIT:?}",
                    String::from_utf8_lossy(topic)
                ),
            }
        }
    }
}

// ---- 1. round trip ------------------------------------------------------------------------

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    ms(&sorted[rank - 1])
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Latency figures of one series.
struct Series {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    seconds: f64,
}

impl Series {
    fn new(mut lat: Vec<Duration>, seconds: f64) -> Series {
        lat.sort_unstable();
        Series {
            n: lat.len(),
            p50_ms: percentile_ms(&lat, 0.5),
            p99_ms: percentile_ms(&lat, 0.99),
            max_ms: lat.last().map_or(0.0, ms),
            seconds,
        }
    }

    fn json(&self) -> Value {
        json!({"samples": self.n, "p50_ms": round3(self.p50_ms), "p99_ms": round3(self.p99_ms),
               "max_ms": round3(self.max_ms), "seconds": round3(self.seconds)})
    }
}

struct RoundTrip {
    commands: Series,
    ping: Series,
}

/// One command over MQTT; checks the reply. `k` picks the unit and the operation.
async fn command(cloud: &mut Cloud, k: usize, serial: &str) -> Result<Duration> {
    let unit = format!("u-{}", (k / 2) % RT_UNITS);
    let grant = k.is_multiple_of(2);
    let (op, body, want) = if grant {
        (
            "grant_access",
            json!({"request_id": serial, "unit_id": unit, "tenancy_id": "t-0"}),
            "occupied",
        )
    } else {
        (
            "deallocate",
            json!({"request_id": serial, "unit_id": unit}),
            "available",
        )
    };
    let inbox = topic("cloud-inbox");
    let corr = Bytes::from(format!("corr-{serial}"));
    let props = PublishProperties {
        response_topic: Some(inbox.clone()),
        correlation_data: Some(corr.clone()),
        ..Default::default()
    };
    let payload = serde_json::to_vec(&body)?;
    let t = Instant::now();
    cloud
        .client
        .publish_with_properties(
            topic(&format!("cmd/{op}")),
            QoS::AtLeastOnce,
            false,
            payload,
            props,
        )
        .await?;
    let m = cloud.next(inbox.as_bytes(), Some(&corr)).await?;
    let elapsed = t.elapsed();
    let v: Value = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
    ensure!(
        v["ok"] == true && v["request_id"] == serial && v["result"]["unit"]["status"] == want,
        "{op} {unit}: expected ok with unit.status {want:?}, got {v}"
    );
    Ok(elapsed)
}

/// The broker's own ping-pong: publish QoS 1 to a topic this client subscribes to.
async fn ping(cloud: &mut Cloud, i: usize) -> Result<Duration> {
    let t = Instant::now();
    let body = format!("ping-{i}");
    cloud
        .client
        .publish("bench/ping", QoS::AtLeastOnce, false, body.clone())
        .await?;
    let m = cloud.next(b"bench/ping", None).await?;
    let elapsed = t.elapsed();
    ensure!(
        m.payload == body.as_bytes(),
        "ping {i}: got {:?}",
        String::from_utf8_lossy(&m.payload)
    );
    Ok(elapsed)
}

async fn bench_round_trip(s: &Settings) -> Result<RoundTrip> {
    let port = free_port()?;
    let _broker = start_broker(port, s.segment_mib)?;
    let dir = tempfile::tempdir()?;
    let gw = start_gateway(dir.path(), port, s.inflight).await?;
    seed(&gw, RT_UNITS).await?;
    let mut cloud = Cloud::connect(
        port,
        "bench-cloud-rt",
        &[topic("cloud-inbox"), "bench/ping".into()],
    )
    .await?;
    // The link is up once it answers; the first commands also warm it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.links.list().get("mqtt").is_some_and(|l| l.connected) {
        ensure!(Instant::now() < deadline, "the MQTT link never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = rand::random::<u32>();
    let mut k = 0;
    for _ in 0..WARMUP {
        command(&mut cloud, k, &format!("w-{run}-{k}")).await?;
        k += 1;
        ping(&mut cloud, k).await?;
    }
    // Interleaved (command, ping, command, ...) so both see the same machine state.
    let (mut cmd_lat, mut ping_lat) = (Vec::with_capacity(s.ops), Vec::with_capacity(s.ops));
    let (mut cmd_s, mut ping_s) = (0.0, 0.0);
    for i in 0..s.ops {
        let t = Instant::now();
        cmd_lat.push(command(&mut cloud, k, &format!("r-{run}-{k}")).await?);
        cmd_s += t.elapsed().as_secs_f64();
        k += 1;
        let t = Instant::now();
        ping_lat.push(ping(&mut cloud, i).await?);
        ping_s += t.elapsed().as_secs_f64();
    }
    drop(cloud);
    gw.stop().await;
    Ok(RoundTrip {
        commands: Series::new(cmd_lat, cmd_s),
        ping: Series::new(ping_lat, ping_s),
    })
}

/// The drain's subscriber: `mosquitto_sub` in its own process when the broker is Mosquitto
/// (so this process's RSS is the gateway's alone), else a [`Cloud`] client in this process.
enum Subscriber {
    Process {
        _child: tokio::process::Child,
        rx: mpsc::UnboundedReceiver<Msg>,
    },
    InProcess(Cloud),
}

impl Subscriber {
    async fn start(broker: &Broker, port: u16, id: &str, topic: &str) -> Result<Subscriber> {
        if matches!(broker, Broker::Rumqttd) {
            return Ok(Subscriber::InProcess(
                Cloud::connect(port, id, &[topic.to_owned()]).await?,
            ));
        }
        use tokio::io::AsyncBufReadExt as _;
        // -d prints "Subscribed (mid: ...)" once the SUBACK is in; -v prints "topic payload".
        let mut child = tokio::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-i",
                id,
                "-q",
                "1",
            ])
            .args(["-t", topic, "-v", "-d"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start mosquitto_sub (Debian package mosquitto-clients)")?;
        let mut lines =
            tokio::io::BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let prefix = format!("{topic} ");
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(payload) = line.strip_prefix(&prefix) {
                    let _ = tx.send(Msg {
                        topic: Bytes::from(prefix.trim_end().to_owned()),
                        payload: Bytes::from(payload.to_owned()),
                        correlation: None,
                    });
                } else if line.starts_with("Subscribed") {
                    let _ = sub_tx.send(());
                }
            }
        });
        tokio::time::timeout(REPLY_WAIT, sub_rx.recv())
            .await
            .context("mosquitto_sub's subscription was not acknowledged")?
            .context("mosquitto_sub ended")?;
        Ok(Subscriber::Process { _child: child, rx })
    }

    async fn recv(&mut self) -> Option<Msg> {
        match self {
            Subscriber::Process { rx, .. } => rx.recv().await,
            Subscriber::InProcess(c) => c.rx.recv().await,
        }
    }
}

// ---- 2. backlog ---------------------------------------------------------------------------

struct BacklogResults {
    n: usize,
    build_s: f64,
    bytes_per_event: f64,
    disk_before: u64,
    disk_after: u64,
    rss_start_mb: f64,
    rss_build_max_mb: f64,
    rss_after_build_mb: f64,
    rss_drain_start_mb: f64,
    rss_drain_max_mb: f64,
    rss_drain_final_mb: f64,
    connect_wait_s: f64,
    drain_s: f64,
    total_s: f64,
    event_bytes: usize,
}

impl BacklogResults {
    fn rate(&self) -> f64 {
        self.n as f64 / self.drain_s
    }
}

fn disk_bytes(db: &Path) -> u64 {
    let mut wal = PathBuf::from(db);
    wal.as_mut_os_string().push("-wal");
    [db.to_owned(), wal]
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

async fn cursor(gw: &Gateway) -> Result<i64> {
    Ok(gw
        .executor
        .store()
        .read(|c| -> Result<i64, StoreError> { cloud::cursor(c, "mqtt") })
        .await?)
}

async fn bench_backlog(s: &Settings, rss: &RssSampler) -> Result<BacklogResults> {
    let n = s.backlog;
    let port = free_port()?; // nothing listens here until the drain
    let dir = tempfile::tempdir()?;
    let gw = start_gateway(dir.path(), port, s.inflight).await?;
    seed(&gw, BACKLOG_UNITS).await?;
    let db = gw.executor.store().path().to_owned();
    let first_seq = gw
        .executor
        .store()
        .read(|c| -> Result<i64, StoreError> { events::last_seq(c) })
        .await?
        + 1;
    let disk_before = disk_bytes(&db);
    let rss_start_mb = now_mb();

    // Build-up: N access events, BUILD_CHUNK per transaction.
    let build_started = Instant::now();
    let mut built = 0;
    while built < n {
        let chunk = BUILD_CHUNK.min(n - built);
        let from = built;
        gw.executor
            .store()
            .write(move |c| -> Result<(), StoreError> {
                let now = chrono::Utc::now();
                for i in from..from + chunk {
                    let data = json!({
                        "keypad": "kp-front", "zone": "main-gate",
                        "contact_id": format!("c-{}", i % 997),
                        "units": [format!("u-{}", i % BACKLOG_UNITS)],
                    });
                    events::append(c, EventType::AccessGranted, &data, now)?;
                }
                Ok(())
            })
            .await?;
        built += chunk;
    }
    let build_done = Instant::now();
    let build_s = (build_done - build_started).as_secs_f64();
    let last = gw
        .executor
        .store()
        .read(|c| -> Result<i64, StoreError> { events::last_seq(c) })
        .await?;
    ensure!(
        last - first_seq + 1 == n as i64,
        "the build appended {} events, not {n}",
        last - first_seq + 1
    );
    ensure!(
        cursor(&gw).await? < first_seq,
        "events were delivered with no broker listening"
    );
    let disk_after = disk_bytes(&db);
    let rss_build_max_mb = rss.max_mb(build_started, build_done);
    let rss_after_build_mb = now_mb();
    let event_bytes = gw
        .executor
        .store()
        .read(move |c| -> Result<usize, StoreError> {
            let e = events::list(c, SITE, last - 1, 1)?;
            Ok(e.first()
                .map_or(0, |e| serde_json::to_vec(e).map_or(0, |v| v.len())))
        })
        .await?;

    // Drain: broker up, the cloud subscribed, then wait for the link's reconnect.
    let drain_started = Instant::now();
    let rss_drain_start_mb = now_mb();
    let broker = start_broker(port, s.segment_mib)?;
    let events_topic = topic("events");
    let mut cloud = Subscriber::start(&broker, port, "bench-cloud-events", &events_topic).await?;
    let mut seen = vec![false; n];
    let mut got = 0usize;
    let mut first_at = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_progress = (Instant::now(), 0usize);
    while got < n {
        let m = match tokio::time::timeout(Duration::from_millis(500), cloud.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => bail!("the subscriber's task ended"),
            Err(_) => {
                ensure!(
                    Instant::now() < deadline,
                    "the drain did not finish: {got} of {n} events"
                );
                if last_progress.0.elapsed() > Duration::from_secs(30) {
                    bail!("no event for 30 s: {got} of {n} received");
                }
                continue;
            }
        };
        if m.topic != events_topic.as_bytes() {
            continue;
        }
        first_at.get_or_insert_with(Instant::now);
        let v: Value = serde_json::from_slice(&m.payload)
            .map_err(|e| anyhow!("an event that is not JSON: {e}"))?;
        let seq = v["seq"].as_i64().context("an event without seq")?;
        if seq < first_seq || seq > last {
            // Not part of the built backlog (e.g. a queue.full alarm): not counted.
            continue;
        }
        let slot = &mut seen[(seq - first_seq) as usize];
        ensure!(!*slot, "event seq {seq} received twice");
        *slot = true;
        got += 1;
        last_progress = (Instant::now(), got);
    }
    // The cursor is durable after the PUBACKs are written: poll it.
    while cursor(&gw).await? < last {
        ensure!(
            Instant::now() < deadline,
            "the cursor stopped at {} (last {last})",
            cursor(&gw).await?
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let done = Instant::now();
    let first_at = first_at.unwrap_or(done);
    let rss_drain_max_mb = rss.max_mb(drain_started, done);
    let rss_drain_final_mb = now_mb();
    drop(cloud);
    gw.stop().await;
    Ok(BacklogResults {
        n,
        build_s,
        bytes_per_event: (disk_after.saturating_sub(disk_before)) as f64 / n as f64,
        disk_before,
        disk_after,
        rss_start_mb,
        rss_build_max_mb,
        rss_after_build_mb,
        rss_drain_start_mb,
        rss_drain_max_mb,
        rss_drain_final_mb,
        connect_wait_s: (first_at - drain_started).as_secs_f64(),
        drain_s: (done - first_at).as_secs_f64().max(1e-9),
        total_s: (done - drain_started).as_secs_f64(),
        event_bytes,
    })
}

// ---- report -------------------------------------------------------------------------------

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn main() -> Result<()> {
    let s = Settings::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let broker = broker_kind();
    let rss = RssSampler::start();
    let started = Instant::now();
    let rtt = rt.block_on(bench_round_trip(&s))?;
    let bl = rt.block_on(bench_backlog(&s, &rss))?;
    let total_s = started.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let inflight = s
        .inflight
        .map_or_else(|| "default".to_owned(), |n| n.to_string());

    println!(
        "unitgate cloud (MQTT) benchmark ({cores} cores; {total_s:.1} s; broker {broker}; BENCH_MQTT_OPS={} BENCH_BACKLOG={} inflight={inflight})",
        s.ops, s.backlog
    );
    println!();
    println!(
        "Command round trip over MQTT 5 (QoS 1, response topic), one at a time; all replies ok"
    );
    println!(
        "  {:<58} {:>6} {:>8} {:>8} {:>8}",
        "what", "n", "p50 ms", "p99 ms", "max ms"
    );
    for (label, x) in [
        (
            "cmd/grant_access | cmd/deallocate -> reply received",
            &rtt.commands,
        ),
        (
            "baseline: broker ping-pong (publish to own subscription)",
            &rtt.ping,
        ),
    ] {
        println!(
            "  {label:<58} {:>6} {:>8.3} {:>8.3} {:>8.3}",
            x.n, x.p50_ms, x.p99_ms, x.max_ms
        );
    }
    let d50 = rtt.commands.p50_ms - rtt.ping.p50_ms;
    let d99 = rtt.commands.p99_ms - rtt.ping.p99_ms;
    println!(
        "  {:<58} {:>6} {d50:>8.3} {d99:>8.3}",
        "gateway's share (command minus ping-pong)", ""
    );
    println!();
    let drain_pass = bl.rate() >= TARGET_DRAIN_PER_S;
    let rss_max = bl.rss_build_max_mb.max(bl.rss_drain_max_mb);
    let rss_pass = rss_max <= TARGET_RSS_MB;
    println!(
        "Offline backlog: {} access events ({} B each as published), built through the store in {}-event transactions, then drained to a local broker",
        bl.n, bl.event_bytes, BUILD_CHUNK
    );
    println!(
        "  build-up                          {:>10.2} s  ({:.0} events/s)",
        bl.build_s,
        bl.n as f64 / bl.build_s
    );
    println!(
        "  disk (DB + WAL) before / after    {:>10.1} / {:.1} MB",
        bl.disk_before as f64 / 1e6,
        bl.disk_after as f64 / 1e6
    );
    println!(
        "  disk bytes per event              {:>10.1}",
        bl.bytes_per_event
    );
    println!(
        "  broker start -> first event       {:>10.2} s  (the link's reconnect backoff)",
        bl.connect_wait_s
    );
    println!(
        "  drain (first event -> all received, cursor at last) {:.2} s",
        bl.drain_s
    );
    println!(
        "  drain rate                        {:>10.0} events/s  target >= {TARGET_DRAIN_PER_S:.0}/s {}",
        bl.rate(),
        verdict(drain_pass)
    );
    println!(
        "  RSS MB: start {:.1}, build-up max {:.1}, after build-up {:.1}; drain start {:.1}, drain max {:.1} ({}), final {:.1}  target <= {TARGET_RSS_MB:.0} {}",
        bl.rss_start_mb,
        bl.rss_build_max_mb,
        bl.rss_after_build_mb,
        bl.rss_drain_start_mb,
        bl.rss_drain_max_mb,
        if broker == "mosquitto" {
            "the gateway's alone: broker and subscriber are other processes"
        } else {
            "incl. the in-process broker and subscriber"
        },
        bl.rss_drain_final_mb,
        verdict(rss_pass)
    );
    if bl.n < 1_000_000 {
        println!(
            "  extrapolated to 1,000,000 events: build {:.0} s, drain {:.0} s, disk {:.0} MB",
            bl.build_s * 1e6 / bl.n as f64,
            1e6 / bl.rate(),
            bl.bytes_per_event * 1e6 / 1e6
        );
    }
    println!();
    let report = json!({
        "bench": "cloud",
        "cores": cores,
        "seconds": round3(total_s),
        "broker": broker,
        "settings": {"mqtt_ops": s.ops, "backlog": s.backlog, "inflight": s.inflight,
                     "broker_segment_mib": s.segment_mib, "build_chunk": BUILD_CHUNK},
        "round_trip": {
            "command": rtt.commands.json(),
            "baseline_ping_pong": rtt.ping.json(),
            "gateway_p50_ms": round3(d50),
            "gateway_p99_ms": round3(d99),
        },
        "backlog": {
            "events": bl.n,
            "event_bytes": bl.event_bytes,
            "build_s": round3(bl.build_s),
            "disk_bytes_before": bl.disk_before,
            "disk_bytes_after": bl.disk_after,
            "disk_bytes_per_event": round1(bl.bytes_per_event),
            "connect_wait_s": round3(bl.connect_wait_s),
            "drain_s": round3(bl.drain_s),
            "drain_total_s": round3(bl.total_s),
            "drain_events_per_s": round1(bl.rate()),
            "rss_mb": {
                "start": round1(bl.rss_start_mb),
                "build_max": round1(bl.rss_build_max_mb),
                "after_build": round1(bl.rss_after_build_mb),
                "drain_start": round1(bl.rss_drain_start_mb),
                "drain_max": round1(bl.rss_drain_max_mb),
                "drain_final": round1(bl.rss_drain_final_mb),
            },
        },
        "targets": [
            {"name": "drain_events_per_s", "value": round1(bl.rate()),
             "target": TARGET_DRAIN_PER_S, "pass": drain_pass},
            {"name": "rss_max_mb", "value": round1(rss_max),
             "target": TARGET_RSS_MB, "pass": rss_pass},
        ],
    });
    println!("{report}");
    Ok(())
}
