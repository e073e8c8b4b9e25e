//! The MQTT link (DESIGN.md §3): commands in on `cmd/#`, replies, the event log, retained
//! unit states and the retained `online`/`offline` status out. MQTT 5 or 3.1.1 behind one
//! small interface ([`Client`], [`Wire`]).
//!
//! Two tasks: the *poll* task owns rumqttc's event loop and only polls it; the *sender*
//! task decides what to publish and enqueues it with non-blocking `try_publish`. Each
//! QoS 1 publish is tagged in a FIFO shared under a lock: rumqttc sends requests in
//! channel order and reports `Outgoing::Publish(pkid)` for each, so the FIFO's head names
//! the packet id, and the broker's PUBACK for that id names the event `seq` it confirms.
//! The event cursor advances only on PUBACK and only contiguously. On a disconnect the
//! poll task takes every publish rumqttc still holds (in flight or queued) out of it under
//! the same lock: events are re-read from the durable cursor after the reconnect (rumqttc's
//! own in-memory retransmission is not trusted, see CRATES.md), replies are re-sent.
//!
//! Commands are acknowledged manually (`set_manual_acks`): a command's PUBACK is enqueued
//! only after its reply was handed to the client library (the command's effect is committed
//! by then), and PUBACKs go out in the order the commands arrived, as MQTT 3.1.1 §4.6 and
//! MQTT 5 §4.6 require of QoS 1 receivers. A command not yet acknowledged when the link
//! drops is redelivered by the broker (persistent session) and answered again from the
//! idempotency store, so delivery is at-least-once and the effect exactly-once. Acks of a
//! previous connection are never sent on a new one (the packet id would name another
//! message).

use super::Links;
use super::dispatch::{Dispatcher, Done, Inbound, Outbound, Receipt};
use crate::command::Executor;
use crate::config::{MqttConfig, MqttProtocol};
use crate::failpoint;
use crate::store::{StoreError, events, units};
use axum::body::Bytes;
use rumqttc::{TlsConfiguration, Transport};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc, watch};

/// Commands handled at once; more wait (and the broker holds them) until one finishes.
const CONCURRENT_COMMANDS: usize = 32;
/// Largest command or reply the link handles at all (the configured limit is enforced
/// with an error reply below this; beyond it, the client library drops the connection).
const HARD_PACKET_CAP: usize = 64 << 20;
/// How often the event log is looked at without a commit notification (device health,
/// gate decisions and automations append events without the executor).
const EVENT_POLL: Duration = Duration::from_secs(1);
/// Room left for the topic and properties when checking a payload against the limit.
const PACKET_OVERHEAD: usize = 1024;
/// Replies kept while the link is down, at most (the cloud retries; replies are idempotent).
const MAX_BUFFERED: usize = 10_000;

/// The MQTT link cannot be set up from the config.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// `cloud.mqtt.url` is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("cloud.mqtt.url: {0}")]
    Url(String),
    /// A credential or certificate file cannot be used.
    #[error("{0}")]
    File(String),
    /// TLS setup failed.
    #[error("cloud.mqtt TLS: {0}")]
    Tls(String),
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
pub fn parse_url(url: &str) -> Result<Endpoint, MqttError> {
    // Every message below quotes the URL: never with credentials in it.
    let shown = crate::secret::redact_url(url);
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(MqttError::Url(format!(
            "{shown:?} must start with mqtt:// or mqtts://"
        )));
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') {
        return Err(MqttError::Url(format!(
            "{shown:?} must not carry credentials (use username and password_file)"
        )));
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(r) => match r.split_once(']') {
            Some((h, after)) => (h, after.strip_prefix(':')),
            None => return Err(MqttError::Url(format!("{shown:?}: unclosed ["))),
        },
        None => match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| MqttError::Url(format!("{shown:?}: bad port {p:?}")))?,
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(MqttError::Url(format!("{shown:?}: no host")));
    }
    Ok(Endpoint {
        host: host.to_owned(),
        port,
        tls,
    })
}

fn tls_config(cfg: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    use crate::api::http::tls::{load_certs, load_private_key};
    let tls_err = |e: &dyn std::fmt::Display| MqttError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    if cfg.ca_file.as_os_str().is_empty() {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(MqttError::Tls(
                "no system root certificates found; set cloud.mqtt.ca_file".into(),
            ));
        }
    } else {
        for c in load_certs("cloud.mqtt.ca_file", &cfg.ca_file).map_err(|e| tls_err(&e))? {
            roots.add(c).map_err(|e| tls_err(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_err(&e))?
        .with_root_certificates(roots);
    let config = if cfg.client_cert.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let certs =
            load_certs("cloud.mqtt.client_cert", &cfg.client_cert).map_err(|e| tls_err(&e))?;
        let key =
            load_private_key("cloud.mqtt.client_key", &cfg.client_key).map_err(|e| tls_err(&e))?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| tls_err(&e))?
    };
    Ok(Arc::new(config))
}

/// The topics of one site.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `unitgate/v1/{site}/status`.
    pub status: String,
    /// `unitgate/v1/{site}/events`.
    pub events: String,
    /// `unitgate/v1/{site}/hello`.
    pub hello: String,
    /// `unitgate/v1/{site}/cmd/#`.
    pub commands: String,
    /// `unitgate/v1/{site}/units/`.
    pub units_prefix: String,
}

impl Topics {
    /// The topics of `site_id`.
    pub fn new(site_id: &str) -> Self {
        let base = format!("unitgate/v1/{site_id}");
        Topics {
            status: format!("{base}/status"),
            events: format!("{base}/events"),
            hello: format!("{base}/hello"),
            commands: format!("{base}/cmd/#"),
            units_prefix: format!("{base}/units/"),
        }
    }

    /// Whether a publish is regenerated after a reconnect (events, unit states, status,
    /// hello) rather than re-sent (replies).
    fn regenerated(&self, topic: &str) -> bool {
        topic == self.events
            || topic == self.status
            || topic == self.hello
            || topic.starts_with(&self.units_prefix)
    }
}

// ---- the two protocol versions behind one interface --------------------------------------

/// The publishing half of either protocol's client.
#[derive(Clone)]
enum Client {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Enqueues a QoS 1 publish without waiting; false when the request channel is full
    /// (or closed).
    fn try_publish(&self, m: &Outbound) -> bool {
        match self {
            Client::V3(c) => c
                .try_publish(
                    m.topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    m.retain,
                    m.payload.to_vec(),
                )
                .is_ok(),
            Client::V5(c) => {
                let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
                match &m.correlation {
                    Some(cd) => {
                        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                            correlation_data: Some(cd.clone()),
                            ..Default::default()
                        };
                        c.try_publish_with_properties(
                            m.topic.clone(),
                            qos,
                            m.retain,
                            m.payload.clone(),
                            props,
                        )
                        .is_ok()
                    }
                    None => c
                        .try_publish(m.topic.clone(), qos, m.retain, m.payload.clone())
                        .is_ok(),
                }
            }
        }
    }

    /// Enqueues the acknowledgement of a received command; false when the channel is full.
    fn try_ack(&self, a: &AckHandle) -> bool {
        match (self, a) {
            (Client::V3(c), AckHandle::V3(p)) => c.try_ack(p).is_ok(),
            (Client::V5(c), AckHandle::V5(p)) => c.try_ack(p).is_ok(),
            // Cannot happen: one link speaks one protocol. Nothing to acknowledge.
            _ => true,
        }
    }

    fn try_subscribe(&self, topic: &str) -> bool {
        match self {
            Client::V3(c) => c.try_subscribe(topic, rumqttc::QoS::AtLeastOnce).is_ok(),
            Client::V5(c) => c
                .try_subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .is_ok(),
        }
    }
}

/// What is needed to acknowledge a received publish (its header; the payload is dropped).
#[derive(Debug, Clone)]
enum AckHandle {
    V3(Box<rumqttc::Publish>),
    V5(Box<rumqttc::v5::mqttbytes::v5::Publish>),
}

/// What the event loop reported, in protocol-neutral terms.
enum WireEvent {
    Connected,
    Sent(u16),
    Acked { pkid: u16, refused: Option<String> },
    Command(Inbound, AckHandle),
    Other,
}

/// Either protocol's event loop.
enum Wire {
    V3(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Wire {
    async fn poll(&mut self) -> Result<WireEvent, String> {
        match self {
            Wire::V3(l) => {
                use rumqttc::{Event, Outgoing, Packet};
                Ok(match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => WireEvent::Connected,
                    Event::Incoming(Packet::PubAck(a)) => WireEvent::Acked {
                        pkid: a.pkid,
                        refused: None,
                    },
                    Event::Incoming(Packet::Publish(mut p)) => {
                        let payload = std::mem::take(&mut p.payload);
                        WireEvent::Command(
                            Inbound {
                                topic: p.topic.clone(),
                                payload,
                                response_topic: None,
                                correlation: None,
                            },
                            AckHandle::V3(Box::new(p)),
                        )
                    }
                    Event::Outgoing(Outgoing::Publish(pkid)) => WireEvent::Sent(pkid),
                    _ => WireEvent::Other,
                })
            }
            Wire::V5(l) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                use rumqttc::v5::{Event, Incoming};
                Ok(match l.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Incoming::ConnAck(_)) => WireEvent::Connected,
                    Event::Incoming(Packet::PubAck(a)) => WireEvent::Acked {
                        pkid: a.pkid,
                        refused: match a.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            r => Some(format!("the broker refused a publish: {r:?}")),
                        },
                    },
                    Event::Incoming(Packet::Publish(mut p)) => {
                        let (response_topic, correlation) = p
                            .properties
                            .take()
                            .map(|pr| (pr.response_topic, pr.correlation_data))
                            .unwrap_or_default();
                        let payload = std::mem::take(&mut p.payload);
                        WireEvent::Command(
                            Inbound {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload,
                                response_topic,
                                correlation,
                            },
                            AckHandle::V5(Box::new(p)),
                        )
                    }
                    Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => WireEvent::Sent(pkid),
                    _ => WireEvent::Other,
                })
            }
        }
    }

    /// Takes every publish the client library still holds (in flight, pending or queued in
    /// its request channel) out of it. Call with the flight lock held.
    fn take_publishes(&mut self) -> Vec<Outbound> {
        let mut out = Vec::new();
        match self {
            Wire::V3(l) => {
                l.clean();
                l.pending.retain(|r| match r {
                    rumqttc::Request::Publish(p) => {
                        out.push(Outbound {
                            topic: p.topic.clone(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                            correlation: None,
                        });
                        false
                    }
                    _ => true,
                });
            }
            Wire::V5(l) => {
                l.clean();
                l.pending.retain(|r| match r {
                    rumqttc::v5::Request::Publish(p) => {
                        out.push(Outbound {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                            correlation: p
                                .properties
                                .as_ref()
                                .and_then(|pr| pr.correlation_data.clone()),
                        });
                        false
                    }
                    _ => true,
                });
            }
        }
        out
    }
}

/// Builds the client and event loop for the config (reads the password file and TLS files).
fn connect_options(
    cfg: &MqttConfig,
    site_id: &str,
    topics: &Topics,
) -> Result<(Client, Wire), MqttError> {
    let ep = parse_url(&cfg.url)?;
    let client_id = if cfg.client_id.is_empty() {
        format!("unitgate-{site_id}")
    } else {
        cfg.client_id.clone()
    };
    let password = if cfg.password_file.as_os_str().is_empty() {
        String::new()
    } else {
        let p = crate::secret::read_secret_file(&cfg.password_file)
            .map_err(|e| MqttError::File(format!("cloud.mqtt.password_file: {e}")))?;
        p.expose_str()
            .ok_or_else(|| {
                MqttError::File(format!(
                    "cloud.mqtt.password_file: {} is not UTF-8 text",
                    cfg.password_file.display()
                ))
            })?
            .to_owned()
    };
    let transport = if ep.tls {
        Some(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls_config(cfg)?,
        )))
    } else {
        None
    };
    let keep_alive = Duration::from_secs(cfg.keep_alive_s.max(5));
    let out_max = cfg.max_packet_bytes.saturating_add(PACKET_OVERHEAD * 4);
    // Room for every event in flight plus replies and unit states around them.
    let inflight = cfg.inflight.saturating_add(200);
    let cap = usize::from(inflight) + 64;
    Ok(match cfg.protocol {
        MqttProtocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(client_id, ep.host, ep.port);
            o.set_keep_alive(keep_alive)
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_inflight(inflight)
                .set_max_packet_size(HARD_PACKET_CAP, out_max)
                .set_last_will(rumqttc::LastWill::new(
                    &topics.status,
                    "offline",
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            if !cfg.username.is_empty() {
                o.set_credentials(cfg.username.clone(), password);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let (c, mut l) = rumqttc::AsyncClient::new(o, cap);
            // Small request/reply packets: without TCP_NODELAY, Nagle and the broker's
            // delayed ACK add ~40 ms to every command (measured by benches/cloud.rs).
            let mut net = l.network_options();
            net.set_tcp_nodelay(true);
            l.set_network_options(net);
            (Client::V3(c), Wire::V3(Box::new(l)))
        }
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::QoS;
            use rumqttc::v5::mqttbytes::v5::LastWill;
            let mut o = rumqttc::v5::MqttOptions::new(client_id, ep.host, ep.port);
            o.set_keep_alive(keep_alive)
                .set_clean_start(false)
                .set_manual_acks(true)
                .set_session_expiry_interval(Some(cfg.session_expiry_s))
                .set_outgoing_inflight_upper_limit(inflight)
                .set_max_packet_size(Some(HARD_PACKET_CAP as u32))
                .set_last_will(LastWill::new(
                    &topics.status,
                    "offline",
                    QoS::AtLeastOnce,
                    true,
                    None,
                ));
            if !cfg.username.is_empty() {
                o.set_credentials(cfg.username.clone(), password);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            let mut net = o.network_options();
            net.set_tcp_nodelay(true);
            o.set_network_options(net);
            let (c, l) = rumqttc::v5::AsyncClient::new(o, cap);
            (Client::V5(c), Wire::V5(Box::new(l)))
        }
    })
}

// ---- the link -----------------------------------------------------------------------------

/// What a publish counts for once acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// An event (or a unit state published with it): counts toward that `seq`.
    Event(i64),
    /// A reply, the status or hello: nothing waits for it.
    Plain,
    /// A reply whose commands are acknowledged once it is handed over (key into
    /// `Sender::replies`).
    Reply(u64),
}

/// Publishes handed to the client library and not yet acknowledged, shared by the two tasks.
#[derive(Debug, Default)]
struct Flight {
    connected: bool,
    /// The connection's number (grows on every CONNACK): received commands carry it.
    conn: u64,
    /// Enqueued, not yet written (`Outgoing::Publish` pops the head).
    queued: VecDeque<Tag>,
    /// Written, awaiting PUBACK, by packet id.
    written: HashMap<u16, Tag>,
}

type SharedFlight = Arc<Mutex<Flight>>;

fn lock(f: &SharedFlight) -> std::sync::MutexGuard<'_, Flight> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// From the poll task to the sender.
enum Note {
    Connected,
    Disconnected {
        resend: Vec<Outbound>,
    },
    Acked(Option<i64>),
    /// A command arrived (in arrival order): it is acknowledged once done.
    Received(Receipt, AckHandle),
}

/// The MQTT link: build with [`MqttLink::new`], then [`MqttLink::run`] it.
pub struct MqttLink {
    cfg: MqttConfig,
    topics: Topics,
    executor: Executor,
    dispatcher: Dispatcher,
    links: Links,
    committed: Arc<Notify>,
    client: Client,
    wire: Wire,
}

impl MqttLink {
    /// The link of `cfg`, dispatching commands through `dispatcher` and publishing the log of
    /// `executor`'s store; `committed` wakes it on new events.
    pub fn new(
        cfg: &MqttConfig,
        executor: Executor,
        dispatcher: Dispatcher,
        links: Links,
        committed: Arc<Notify>,
    ) -> Result<Self, MqttError> {
        let topics = Topics::new(executor.site_id());
        let (client, wire) = connect_options(cfg, executor.site_id(), &topics)?;
        links.add("mqtt");
        Ok(MqttLink {
            cfg: cfg.clone(),
            topics,
            executor,
            dispatcher,
            links,
            committed,
            client,
            wire,
        })
    }

    /// Runs until `shutdown` turns true. Never returns an error: a broken link is retried
    /// with capped exponential backoff and jitter, and shown in `GET /v1/status`.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let flight = SharedFlight::default();
        let (notes_tx, notes_rx) = mpsc::unbounded_channel();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Done>(1024);
        let delivered = {
            let r = self
                .executor
                .store()
                .read(|c| crate::store::cloud::cursor(c, "mqtt"))
                .await;
            r.unwrap_or_else(|e: StoreError| {
                tracing::error!(error = %e, "cannot read the MQTT cursor; starting from 0");
                0
            })
        };
        self.links.update("mqtt", |s| s.delivered_seq = delivered);
        let sender = Sender {
            client: self.client.clone(),
            flight: flight.clone(),
            topics: self.topics.clone(),
            executor: self.executor.clone(),
            links: self.links.clone(),
            inflight: usize::from(self.cfg.inflight.max(1)),
            max_payload: self.cfg.max_packet_bytes,
            connected: false,
            subscribed: true,
            buffer: VecDeque::new(),
            replies: HashMap::new(),
            next_reply: 0,
            acks: VecDeque::new(),
            finished: HashSet::new(),
            window: VecDeque::new(),
            delivered,
            next_after: delivered,
        };
        let poller = Poller {
            wire: self.wire,
            flight,
            notes: notes_tx,
            jobs: jobs_tx.clone(),
            dispatcher: self.dispatcher.clone(),
            links: self.links,
            topics: self.topics,
            clock: self.executor.clone(),
            reconnect_max: Duration::from_secs(self.cfg.reconnect_max_s.max(1)),
        };
        // Chunked snapshots left incomplete are dropped (and their chunks acknowledged).
        let sweeper = {
            let (d, jobs, mut stop) = (self.dispatcher.clone(), jobs_tx.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(EVENT_POLL);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.changed() => return,
                    }
                    for done in d.expire_chunks() {
                        if jobs.send(done).await.is_err() {
                            return;
                        }
                    }
                }
            })
        };
        let send_task =
            tokio::spawn(sender.run(notes_rx, jobs_rx, self.committed, shutdown.clone()));
        poller.run(shutdown).await;
        sweeper.abort();
        let _ = send_task.await;
    }
}

/// The task that polls the event loop, and nothing else (never publishes).
struct Poller {
    wire: Wire,
    flight: SharedFlight,
    notes: mpsc::UnboundedSender<Note>,
    jobs: mpsc::Sender<Done>,
    dispatcher: Dispatcher,
    links: Links,
    topics: Topics,
    clock: Executor,
    reconnect_max: Duration,
}

impl Poller {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let commands = Arc::new(Semaphore::new(CONCURRENT_COMMANDS));
        let mut backoff = Duration::from_millis(100);
        let mut received: u64 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let ev = tokio::select! {
                ev = self.wire.poll() => ev,
                _ = shutdown.changed() => return,
            };
            match ev {
                Ok(WireEvent::Connected) => {
                    backoff = Duration::from_millis(100);
                    {
                        let mut f = lock(&self.flight);
                        f.connected = true;
                        f.conn += 1;
                    }
                    tracing::info!("MQTT link connected");
                    self.links
                        .set_connected("mqtt", true, None, self.clock.now());
                    let _ = self.notes.send(Note::Connected);
                }
                Ok(WireEvent::Sent(pkid)) => {
                    let mut f = lock(&self.flight);
                    match f.queued.pop_front() {
                        Some(tag) => {
                            f.written.insert(pkid, tag);
                        }
                        None => tracing::warn!(pkid, "MQTT publish written that was not tracked"),
                    }
                }
                Ok(WireEvent::Acked { pkid, refused }) => {
                    let tag = lock(&self.flight).written.remove(&pkid);
                    if let Some(why) = refused {
                        // Not delivered: the window stays open, so a reconnect re-sends it.
                        tracing::error!(pkid, reason = %why, "MQTT publish refused by the broker");
                        self.links
                            .update("mqtt", |s| s.last_error = Some(why.clone()));
                        continue;
                    }
                    let seq = match tag {
                        Some(Tag::Event(seq)) => Some(seq),
                        _ => None,
                    };
                    let _ = self.notes.send(Note::Acked(seq));
                }
                Ok(WireEvent::Command(cmd, ack)) => {
                    received += 1;
                    let receipt = Receipt {
                        conn: lock(&self.flight).conn,
                        idx: received,
                    };
                    // Announced before the command runs, so acks keep arrival order.
                    let _ = self.notes.send(Note::Received(receipt, ack));
                    if !cmd
                        .topic
                        .starts_with(self.topics.commands.trim_end_matches('#'))
                    {
                        let _ = self.jobs.send(Done::nothing(receipt)).await;
                        continue;
                    }
                    // The poll task never waits for a command: each runs in its own task,
                    // at most CONCURRENT_COMMANDS at once, the rest waiting for a permit.
                    let (d, jobs, permits) =
                        (self.dispatcher.clone(), self.jobs.clone(), commands.clone());
                    tokio::spawn(async move {
                        let Ok(_permit) = permits.acquire_owned().await else {
                            return;
                        };
                        let done = d.handle(cmd, receipt).await;
                        let _ = jobs.send(done).await;
                    });
                }
                Ok(WireEvent::Other) => {}
                Err(e) => {
                    let resend: Vec<Outbound> = {
                        let mut f = lock(&self.flight);
                        let was = f.connected;
                        f.connected = false;
                        f.queued.clear();
                        f.written.clear();
                        let taken = self.wire.take_publishes();
                        if was {
                            tracing::warn!(error = %e, "MQTT link lost");
                        } else {
                            tracing::debug!(error = %e, "MQTT connect failed");
                        }
                        taken
                            .into_iter()
                            .filter(|m| !self.topics.regenerated(&m.topic))
                            .collect()
                    };
                    self.links
                        .set_connected("mqtt", false, Some(e.clone()), self.clock.now());
                    let _ = self.notes.send(Note::Disconnected { resend });
                    // Full jitter over [backoff/2, backoff], doubling up to the cap.
                    let half = backoff / 2;
                    let wait = half + half.mul_f64(rand::random::<f64>());
                    backoff = (backoff * 2).min(self.reconnect_max);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}

/// The task that decides what to publish: replies, status, hello, events, unit states.
struct Sender {
    client: Client,
    flight: SharedFlight,
    topics: Topics,
    executor: Executor,
    links: Links,
    inflight: usize,
    max_payload: usize,
    connected: bool,
    /// The command subscription is still to be made on this connection.
    subscribed: bool,
    /// Waiting to be enqueued, in order.
    buffer: VecDeque<(Outbound, Tag)>,
    /// The commands each waiting reply acknowledges, by `Tag::Reply` key.
    replies: HashMap<u64, Vec<Receipt>>,
    next_reply: u64,
    /// Commands received on this connection and not yet acknowledged, in arrival order.
    acks: VecDeque<(Receipt, AckHandle)>,
    /// Commands done (reply handed over, or none to give) and not yet acknowledged.
    finished: HashSet<Receipt>,
    /// Events enqueued and not yet fully acknowledged, oldest first: (seq, acks missing).
    window: VecDeque<(i64, u32)>,
    /// The durable cursor.
    delivered: i64,
    /// The last `seq` taken into the window.
    next_after: i64,
}

impl Sender {
    async fn run(
        mut self,
        mut notes: mpsc::UnboundedReceiver<Note>,
        mut jobs: mpsc::Receiver<Done>,
        committed: Arc<Notify>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(EVENT_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut acked = false;
            tokio::select! {
                n = notes.recv() => match n {
                    Some(n) => acked |= self.note(n).await,
                    None => return,
                },
                j = jobs.recv() => if let Some(j) = j { self.push_done(j) },
                _ = committed.notified() => {}
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            // Take everything already waiting, so acks are written to the store in one go.
            while let Ok(n) = notes.try_recv() {
                acked |= self.note(n).await;
            }
            while let Ok(j) = jobs.try_recv() {
                self.push_done(j);
            }
            if acked {
                self.store_cursor().await;
            }
            if self.connected {
                self.flush();
                if self.buffer.is_empty() {
                    self.pump().await;
                    self.flush();
                }
            }
            self.ack_ready();
        }
    }

    /// A command finished: its reply is queued and its receipts are acknowledged once the
    /// reply is handed over (at once when there is no reply).
    fn push_done(&mut self, d: Done) {
        match d.reply {
            Some(m) => {
                let m = self.fit(m);
                if self.buffer.len() >= MAX_BUFFERED {
                    tracing::warn!(topic = %m.topic, "MQTT reply dropped: too many waiting while the link is down");
                    self.finished.extend(d.receipts);
                    return;
                }
                self.next_reply += 1;
                self.replies.insert(self.next_reply, d.receipts);
                self.buffer.push_back((m, Tag::Reply(self.next_reply)));
            }
            None => self.finished.extend(d.receipts),
        }
    }

    /// Acknowledges the done commands at the head of the arrival order, on the connection
    /// they arrived on; those of an earlier connection are forgotten (redelivered).
    fn ack_ready(&mut self) {
        while let Some((receipt, handle)) = self.acks.front() {
            let f = lock(&self.flight);
            if !f.connected || f.conn != receipt.conn {
                let stale = receipt.conn != f.conn;
                drop(f);
                if !stale {
                    return;
                }
                let r = *receipt;
                self.finished.remove(&r);
                self.acks.pop_front();
                continue;
            }
            if !self.finished.contains(receipt) || !self.client.try_ack(handle) {
                return;
            }
            drop(f);
            let r = *receipt;
            self.finished.remove(&r);
            self.acks.pop_front();
        }
        // Receipts of earlier connections that finished late are of no use.
        if self.finished.len() > self.acks.len() {
            let conn = lock(&self.flight).conn;
            self.finished.retain(|r| r.conn == conn);
        }
    }

    /// A reply larger than the limit becomes an error reply saying so (the client library
    /// would otherwise drop the connection over it, again and again).
    fn fit(&self, m: Outbound) -> Outbound {
        if m.payload.len() + m.topic.len() + PACKET_OVERHEAD
            <= self.max_payload + PACKET_OVERHEAD * 4
        {
            return m;
        }
        let rid = serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v.get("request_id").cloned())
            .unwrap_or(serde_json::Value::Null);
        let reply = serde_json::json!({
            "request_id": rid,
            "ok": false,
            "error": {
                "code": "payload_too_large",
                "message": format!("the result is {} bytes, more than cloud.mqtt.max_packet_bytes ({}); ask for less (limit, after)", m.payload.len(), self.max_payload),
                "details": [],
                "request_id": rid,
            }
        });
        Outbound {
            payload: Bytes::from(serde_json::to_vec(&reply).unwrap_or_default()),
            ..m
        }
    }

    /// Handles a note; true when an event acknowledgement moved the window.
    async fn note(&mut self, n: Note) -> bool {
        match n {
            Note::Connected => {
                self.connected = true;
                self.subscribed = false;
                self.restart_events();
                let hello = self.hello().await;
                self.buffer.push_front((hello, Tag::Plain));
                self.buffer.push_front((
                    Outbound {
                        topic: self.topics.status.clone(),
                        payload: Bytes::from_static(b"online"),
                        retain: true,
                        correlation: None,
                    },
                    Tag::Plain,
                ));
                false
            }
            Note::Received(receipt, handle) => {
                self.acks.push_back((receipt, handle));
                false
            }
            Note::Disconnected { resend } => {
                self.connected = false;
                // The broker redelivers every command not acknowledged.
                self.acks.clear();
                self.finished.clear();
                self.restart_events();
                for m in resend.into_iter().rev() {
                    self.buffer.push_front((m, Tag::Plain));
                }
                false
            }
            Note::Acked(None) => false,
            Note::Acked(Some(seq)) => {
                let mut moved = false;
                if let Some(e) = self.window.iter_mut().find(|(s, _)| *s == seq) {
                    e.1 = e.1.saturating_sub(1);
                }
                while let Some(&(s, 0)) = self.window.front() {
                    self.window.pop_front();
                    self.delivered = s;
                    moved = true;
                }
                moved
            }
        }
    }

    /// Forgets the events in flight: they are read again from the cursor.
    fn restart_events(&mut self) {
        self.window.clear();
        self.buffer.retain(|(_, t)| !matches!(t, Tag::Event(_)));
        self.next_after = self.delivered;
    }

    async fn hello(&self) -> Outbound {
        let last = self
            .executor
            .store()
            .read(events::last_seq)
            .await
            .unwrap_or_else(|e: StoreError| {
                tracing::error!(error = %e, "cannot read the last event seq");
                0
            });
        let body = serde_json::json!({
            "site_id": self.executor.site_id(),
            "last_event_seq": last,
            "delivered_seq": self.delivered,
        });
        Outbound {
            topic: self.topics.hello.clone(),
            payload: Bytes::from(body.to_string()),
            retain: false,
            correlation: None,
        }
    }

    /// Records the delivered `seq` as the durable cursor, between the failpoints
    /// `mqtt.cursor.before` and `mqtt.cursor.after`. A failure is logged and retried with
    /// the next acknowledgement: meanwhile a restart re-sends from the stored cursor.
    async fn store_cursor(&mut self) {
        let seq = self.delivered;
        let r = match failpoint::check(failpoint::MQTT_CURSOR_BEFORE) {
            Ok(()) => {
                self.executor
                    .store()
                    .write(move |c| crate::store::cloud::advance_cursor(c, "mqtt", seq))
                    .await
            }
            Err(e) => Err(StoreError::from(e)),
        }
        .and_then(|()| failpoint::check(failpoint::MQTT_CURSOR_AFTER).map_err(StoreError::from));
        if let Err(e) = r {
            let e: StoreError = e;
            tracing::error!(error = %e, "cannot store the MQTT cursor");
        }
        self.links.update("mqtt", |s| s.delivered_seq = seq);
    }

    /// Enqueues what the buffer holds, in order, while the client library takes it.
    fn flush(&mut self) {
        if !self.subscribed {
            let f = lock(&self.flight);
            if f.connected && self.client.try_subscribe(&self.topics.commands) {
                self.subscribed = true;
            }
        }
        while let Some((m, tag)) = self.buffer.front() {
            let mut f = lock(&self.flight);
            if !f.connected || !self.client.try_publish(m) {
                return;
            }
            f.queued.push_back(*tag);
            drop(f);
            if let Some((_, Tag::Reply(k))) = self.buffer.pop_front()
                && let Some(receipts) = self.replies.remove(&k)
            {
                self.finished.extend(receipts);
            }
        }
    }

    /// Reads the next events after the window into the buffer, with the states of the
    /// units they touch.
    async fn pump(&mut self) {
        let room = self.inflight.saturating_sub(self.window.len());
        if room == 0 {
            return;
        }
        let (after, site) = (self.next_after, self.executor.site_id().to_owned());
        let read = self
            .executor
            .store()
            .read(move |c| -> Result<_, StoreError> {
                let evs = events::list(c, &site, after, room as u32)?;
                let mut touched: Vec<String> = Vec::new();
                for e in &evs {
                    for id in unit_ids(&e.data) {
                        if !touched.contains(&id) {
                            touched.push(id);
                        }
                    }
                }
                let mut states = Vec::new();
                for id in touched {
                    if let Some(row) = units::get(c, &id)? {
                        states.push((id, crate::model::UnitEnvelope { unit: row.view() }));
                    }
                }
                Ok((evs, states))
            })
            .await;
        let (evs, states) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the event log for MQTT");
                return;
            }
        };
        let Some(last) = evs.last().map(|e| e.seq) else {
            return;
        };
        for e in &evs {
            let payload = serde_json::to_vec(e).unwrap_or_default();
            self.buffer.push_back((
                Outbound {
                    topic: self.topics.events.clone(),
                    payload: Bytes::from(payload),
                    retain: false,
                    correlation: None,
                },
                Tag::Event(e.seq),
            ));
            self.window.push_back((e.seq, 1));
        }
        // The unit states count toward the batch's last event: the cursor passes it only
        // once they are acknowledged too, so a retained state is never left stale.
        for (id, state) in states {
            self.buffer.push_back((
                Outbound {
                    topic: format!("{}{id}", self.topics.units_prefix),
                    payload: Bytes::from(serde_json::to_vec(&state).unwrap_or_default()),
                    retain: true,
                    correlation: None,
                },
                Tag::Event(last),
            ));
            if let Some(w) = self.window.back_mut() {
                w.1 += 1;
            }
        }
        self.next_after = last;
    }
}

/// The unit ids an event's data names (`unit_id`, or `units` as ids or unit objects).
fn unit_ids(data: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(id) = data.get("unit_id").and_then(|v| v.as_str()) {
        out.push(id.to_owned());
    }
    if let Some(list) = data.get("units").and_then(|v| v.as_array()) {
        for u in list {
            if let Some(id) = u.as_str().or_else(|| u.get("id").and_then(|v| v.as_str())) {
                out.push(id.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://broker:1884").expect("url"),
            Endpoint {
                host: "broker".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(parse_url("mqtts://b.example").expect("url").port, 8883);
        assert_eq!(parse_url("mqtt://127.0.0.1").expect("url").port, 1883);
        assert_eq!(parse_url("mqtt://[::1]:99").expect("url").host, "::1");
        for bad in ["http://x", "mqtt://", "mqtt://h:port", "mqtt:///x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unit_ids_from_event_data() {
        let d = serde_json::json!({"unit_id": "u1", "units": ["u2", {"id": "u3"}]});
        assert_eq!(unit_ids(&d), ["u1", "u2", "u3"]);
        assert!(unit_ids(&serde_json::json!({"device": "kp"})).is_empty());
    }
}
