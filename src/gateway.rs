//! Starts the gateway's parts in order (store, executor, HTTP) and stops them cleanly.

use crate::api::http::{self, Limits, auth::Tokens};
use crate::automation::{AutomationHandle, Scheduler};
use crate::command::{Clock, Executor};
use crate::config::Config;
use crate::devices::modbus::{InputEvent, RelayBoards};
use crate::devices::osdp::{self, KeyPress, OsdpOptions};
use crate::devices::smartlock::{DriverSettings, LockDriver, ReferenceProvider};
use crate::domain::pin::PinKey;
use crate::failpoint;
use crate::gate::GateController;
use crate::logging::device_span;
use crate::reconcile::{
    DeviceHandle, DeviceKind, DeviceRegistry, HealthReport, Reconciler, Seen, follow_health,
};
use crate::store::{Store, StoreError, site};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Errors starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The replica could not be opened.
    #[error("cannot open the replica: {0}")]
    Store(#[from] StoreError),
    /// The PIN key could not be read or created.
    #[error("PIN key {path}: {message}")]
    PinKey {
        /// The key file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The HTTPS certificate, key or client CA cannot be used (the message names the key).
    #[error("{0}")]
    Tls(#[from] http::tls::TlsError),
    /// The relay boards or the lock API cannot be set up from the config.
    #[error("devices: {0}")]
    Devices(String),
    /// A cloud link (uplink, webhooks, MQTT) cannot be set up from the config.
    #[error("cloud: {0}")]
    Cloud(String),
    /// The control socket cannot be set up (or another daemon answers on it).
    #[error("{0}")]
    Control(#[from] crate::api::control::ControlError),
    /// Another process (a running daemon, a restore or a migrate) holds the data directory.
    #[error("{0}")]
    DataDirLocked(#[from] crate::ops::lock::LockError),
}

/// A running gateway.
pub struct Gateway {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The command executor (tests and the demo use it directly).
    pub executor: Executor,
    /// Every configured device and its health.
    pub devices: DeviceRegistry,
    /// The automation scheduler (kick it after the clock was set).
    pub automation: AutomationHandle,
    /// The cloud links' state (`GET /v1/status`).
    pub links: crate::cloud::Links,
    /// Where the plain `[metrics] listen` listener is, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// The API's bearer tokens (shared with the router; a SIGHUP reload swaps them).
    pub tokens: Tokens,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    hardware_stop: watch::Sender<bool>,
    hardware: Vec<JoinHandle<()>>,
    /// The device drivers, reconcilers and gate controller: restarted on their own when a
    /// reload changes `[devices]`, `[access]` or the site's hours.
    devices_stop: watch::Sender<bool>,
    device_tasks: Vec<JoinHandle<()>>,
    pin_key: PinKey,
    committed: Arc<Notify>,
    /// The control socket server (`unitgate status`), when configured.
    control: Option<crate::api::control::ControlServer>,
    /// Held while running: one process per replica (see [`crate::ops::lock`]).
    data_lock: crate::ops::lock::DataDirLock,
}

/// How long [`Gateway::stop`] waits in all: in-flight HTTP requests get up to
/// [`HTTP_DRAIN`], then the device, cloud and automation tasks the rest. Below the unit's
/// `TimeoutStopSec=30`, so systemd never has to SIGKILL a draining gateway.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// How long in-flight HTTP requests may take to finish after a stop; a request still
/// running then is cut off unanswered (never acknowledged).
pub const HTTP_DRAIN: Duration = Duration::from_secs(10);

/// Reads the PIN key, creating it (0600, 32 random bytes) on first start.
pub fn load_pin_key(path: &Path) -> Result<PinKey, GatewayError> {
    let err = |message: String| GatewayError::PinKey {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                err(format!("must hold exactly 32 bytes, not {}", b.len()))
            })?;
            Ok(PinKey::new(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            // Written whole beside it (0600) and renamed into place: a crash or power loss
            // mid-write must not leave a short key file that refuses every later start.
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut tmp = tempfile::Builder::new()
                .prefix(".pin.key.")
                .tempfile_in(dir)
                .map_err(|e| err(e.to_string()))?;
            tmp.write_all(&key)
                .and_then(|_| tmp.as_file().sync_all())
                .and_then(|()| failpoint::check(failpoint::PIN_KEY_RENAME_BEFORE))
                .map_err(|e| err(e.to_string()))?;
            match tmp.persist_noclobber(path) {
                Ok(_) => {}
                // Another start created it first: that key is the one.
                Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                    return load_pin_key(path);
                }
                Err(e) => return Err(err(e.error.to_string())),
            }
            failpoint::check(failpoint::PIN_KEY_RENAME_AFTER).map_err(|e| err(e.to_string()))?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all(); // the rename, durable
            }
            tracing::info!(path = %path.display(), "created a new PIN key");
            Ok(PinKey::new(key))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The site settings as the site row stores them (the automations read them from there).
pub fn site_settings(site: &crate::config::SiteConfig) -> serde_json::Value {
    serde_json::json!({
        "access_hours": site.access_hours,
        "auto_occupy": site.auto_occupy,
        "auto_occupy_at": site.auto_occupy_at,
        "auto_deallocate": site.auto_deallocate,
        "auto_overlock": site.auto_overlock,
    })
}

/// Opens the replica for the configured site (blocking work runs off the runtime).
pub async fn open_store(cfg: &Config, clock: &Clock) -> Result<Store, GatewayError> {
    let db = cfg.store.db_path();
    let data_dir = cfg.store.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || -> Result<Store, StoreError> {
        std::fs::create_dir_all(&data_dir)?;
        Store::open(&db)
    })
    .await
    .map_err(|_| StoreError::Closed)??;
    let settings = site_settings(&cfg.site);
    let (id, name, tz, now) = (
        cfg.site.id.clone(),
        cfg.site.name.clone(),
        cfg.site.timezone.clone(),
        clock(),
    );
    store
        .write(move |c| site::ensure(c, &id, &name, &tz, &settings, now))
        .await?;
    Ok(store)
}

/// Builds the keypad, relay board and lock API drivers from the config and spawns them:
/// a reconciler per relay board and lock API, a health reporter per keypad, and the gate
/// controller taking the key presses and input changes. Devices with `enabled = false` are
/// listed (offline, saying so) and driven by nothing; their commands wait in the outbox.
fn start_hardware(
    cfg: &Config,
    executor: &Executor,
    pin_key: PinKey,
    committed: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
    registry: &DeviceRegistry,
) -> Result<Vec<JoinHandle<()>>, GatewayError> {
    const DISABLED: &str = "disabled in the configuration (enabled = false)";
    let disabled = |id: &str, kind: DeviceKind, zone: Option<String>| {
        registry.add(id, kind, zone);
        registry.set_health(id, false, Some(DISABLED.into()));
    };
    let mut tasks = Vec::new();
    let period = Duration::from_secs(cfg.devices.reconcile_s.max(1));
    let mut handles = Vec::new();
    let devices_err = |e: &dyn std::fmt::Display| GatewayError::Devices(e.to_string());

    let (input_tx, inputs) = mpsc::channel::<InputEvent>(256);
    let mut boards = BTreeMap::new();
    let relay_boards: Vec<_> = cfg
        .devices
        .relay_boards
        .iter()
        .filter(|b| b.enabled)
        .cloned()
        .collect();
    if !relay_boards.is_empty() {
        let built = RelayBoards::new(&relay_boards, input_tx).map_err(|e| devices_err(&e))?;
        for link in built.links {
            let span = device_span(&link.board_ids().join(","), "relay_board");
            tasks.push(tokio::spawn(link.run(shutdown.clone()).instrument(span)));
        }
        boards = built.boards;
    }
    for b in &cfg.devices.relay_boards {
        match boards.get(&b.id) {
            Some(h) => {
                registry.add(&b.id, DeviceKind::RelayBoard, None);
                handles.push(DeviceHandle::Board(h.clone()));
            }
            None => disabled(&b.id, DeviceKind::RelayBoard, None),
        }
    }
    match &cfg.devices.lock_api {
        Some(l) if l.enabled => {
            let provider = ReferenceProvider::from_config(l).map_err(|e| devices_err(&e))?;
            let settings = DriverSettings {
                // The outbox retries later; do not hold the lock queue for a minute per lock.
                give_up_after: Duration::from_secs(15),
                ..DriverSettings::default()
            };
            let (driver, handle) = LockDriver::new(&l.id, provider, settings);
            let span = device_span(&l.id, "lock_api");
            tasks.push(tokio::spawn(driver.run(shutdown.clone()).instrument(span)));
            registry.add(&l.id, DeviceKind::LockApi, None);
            handles.push(DeviceHandle::Locks(handle));
        }
        Some(l) => disabled(&l.id, DeviceKind::LockApi, None),
        None => {}
    }

    let (keys_tx, keys) = mpsc::channel::<KeyPress>(256);
    let keypads: Vec<_> = cfg
        .devices
        .keypads
        .iter()
        .filter(|k| k.enabled)
        .cloned()
        .collect();
    let mut pads = HashMap::new();
    if !keypads.is_empty() {
        let (handles, buses) =
            osdp::spawn_all(&keypads, &OsdpOptions::default(), keys_tx, &shutdown)
                .map_err(|e| devices_err(&e))?;
        for bus in buses {
            tasks.push(tokio::spawn(async move {
                if let Ok(Err(e)) = bus.await {
                    tracing::error!(error = %e, "OSDP bus stopped");
                }
            }));
        }
        pads = handles
            .into_iter()
            .map(|p| (p.id().to_owned(), p))
            .collect();
    }
    for k in &cfg.devices.keypads {
        let Some(pad) = pads.get(&k.id) else {
            disabled(&k.id, DeviceKind::Keypad, Some(k.zone.clone()));
            continue;
        };
        registry.add(&k.id, DeviceKind::Keypad, Some(k.zone.clone()));
        let report = HealthReport::new(
            &k.id,
            DeviceKind::Keypad,
            executor.clone(),
            registry.clone(),
        );
        let seen = |h: &osdp::KeypadHealth| Seen::from_flag(h.online, h.last_error.clone());
        tasks.push(tokio::spawn(
            follow_health(pad.health(), seen, report, shutdown.clone())
                .instrument(device_span(&k.id, "keypad")),
        ));
    }
    let gate = GateController::new(cfg, executor.clone(), pin_key, pads, boards);
    tasks.push(tokio::spawn(gate.run(keys, inputs, shutdown.clone())));

    for h in handles {
        let span = match &h {
            DeviceHandle::Board(b) => device_span(b.id(), "relay_board"),
            DeviceHandle::Locks(l) => device_span(l.id(), "lock_api"),
        };
        let r = Reconciler::new(
            h,
            executor.clone(),
            committed.clone(),
            registry.clone(),
            period,
        );
        tasks.push(tokio::spawn(r.run(shutdown.clone()).instrument(span)));
    }
    Ok(tasks)
}

/// Waits for `tasks` until `deadline`; those still running then are aborted.
async fn join_until(tasks: Vec<JoinHandle<()>>, deadline: tokio::time::Instant) {
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let all = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout_at(deadline, all).await.is_err() {
        tracing::warn!("some tasks did not stop within the grace period; abandoned");
        for a in aborts {
            a.abort();
        }
    }
}

impl Gateway {
    /// Starts everything for a validated config; the API listens before this returns.
    pub async fn start(cfg: &Config, clock: Clock) -> Result<Gateway, GatewayError> {
        for w in cfg.warnings() {
            tracing::warn!(key = %w.key, "{}", w.message);
        }
        // Certificate problems surface before anything is opened or bound. Reading a few
        // small PEM files once at start is fine on the runtime thread.
        let tls = if cfg.api.plain_http {
            None
        } else {
            Some(http::tls::server_config(&cfg.api)?)
        };
        let pin_key = {
            let path = cfg.store.pin_key_path();
            let dir = cfg.store.data_dir.clone();
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir).ok();
                load_pin_key(&path)
            })
            .await
            .map_err(|_| StoreError::Closed)??
        };
        // Before the replica is opened: `restore`/`migrate` hold this lock while they work.
        let data_lock = crate::ops::lock::DataDirLock::acquire(&cfg.store.data_dir)?;
        let store = open_store(cfg, &clock).await?;
        let committed = Arc::new(Notify::new());
        let pin_key_for_gates = pin_key.clone();
        let executor = Executor::new(
            store,
            cfg.site.id.clone(),
            cfg.tz(),
            pin_key,
            clock,
            i64::from(cfg.api.idempotency_ttl_hours) * 3600,
            Arc::new(crate::domain::catalog::DeviceCatalog::from_config(
                &cfg.devices,
            )),
        )
        .with_lock_api(
            cfg.devices
                .lock_api
                .as_ref()
                .map_or(crate::command::DEFAULT_LOCK_API, |l| &l.id),
        )
        .with_commit_notify(committed.clone());
        let (scheduler, automation) = Scheduler::new(executor.clone(), committed.clone());
        let (hardware_stop, _) = watch::channel(false);
        let (devices_stop, devices_shutdown) = watch::channel(false);
        let devices = DeviceRegistry::default();
        let device_tasks = start_hardware(
            cfg,
            &executor,
            pin_key_for_gates.clone(),
            committed.clone(),
            devices_shutdown,
            &devices,
        )?;
        let mut hardware = Vec::new();
        hardware.push(tokio::spawn(scheduler.run(hardware_stop.subscribe())));
        let links = crate::cloud::Links::default();
        let cloud_err = |e: &dyn std::fmt::Display| GatewayError::Cloud(e.to_string());
        let webhooks = crate::cloud::webhooks::Webhooks::load(&cfg.cloud.webhooks)
            .map_err(|e| cloud_err(&e))?;
        if let Some(up) = &cfg.cloud.https_uplink {
            let uplink = crate::cloud::https::HttpsUplink::new(
                up,
                executor.clone(),
                links.clone(),
                committed.clone(),
            )
            .map_err(|e| cloud_err(&e))?;
            hardware.push(tokio::spawn(uplink.run(hardware_stop.subscribe())));
        }
        let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
            .await
            .map_err(|source| GatewayError::Listen {
                addr: cfg.api.listen.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                addr: cfg.api.listen.clone(),
                source,
            })?;
        let limits = Limits {
            max_body_bytes: cfg.api.max_body_bytes,
            max_snapshot_bytes: cfg.api.max_snapshot_bytes,
            body_timeout: Duration::from_secs(cfg.api.body_read_timeout_s),
            snapshot_timeout: Duration::from_secs(cfg.api.snapshot_read_timeout_s),
        };
        let tokens = Tokens::from_config(&cfg.api.tokens);
        let router = http::router_with_cloud(
            executor.clone(),
            tokens.clone(),
            limits,
            devices.clone(),
            http::Cloud {
                links: links.clone(),
                webhooks,
            },
        );
        if let Some(m) = &cfg.cloud.mqtt {
            let clients = if m.signed_commands {
                let c = crate::cloud::signing::CloudClients::load(&m.clients)
                    .map_err(|e| cloud_err(&e))?;
                Some(Arc::new(c))
            } else {
                None
            };
            let dispatcher = crate::cloud::dispatch::Dispatcher::new(
                router.clone(),
                &cfg.site.id,
                executor.store().clone(),
                clients,
                m.max_packet_bytes,
            )
            .with_max_snapshot(cfg.api.max_snapshot_bytes);
            let link = crate::cloud::mqtt::MqttLink::new(
                m,
                executor.clone(),
                dispatcher,
                links.clone(),
                committed.clone(),
            )
            .map_err(|e| cloud_err(&e))?;
            hardware.push(tokio::spawn(link.run(hardware_stop.subscribe())));
        }
        hardware.push(tokio::spawn(
            crate::cloud::backlog::BacklogGuard::new(
                executor.clone(),
                links.clone(),
                cfg.cloud.backlog_cap_mib,
            )
            .run(hardware_stop.subscribe()),
        ));
        let control = if cfg.api.control_socket.as_os_str().is_empty() {
            None
        } else {
            crate::api::control::ControlServer::start(&cfg.api.control_socket, router.clone())
                .await?
        };
        let metrics_addr = if cfg.metrics.listen.is_empty() {
            None
        } else {
            let listen_err = |source| GatewayError::Listen {
                addr: cfg.metrics.listen.clone(),
                source,
            };
            let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
                .await
                .map_err(listen_err)?;
            let at = l.local_addr().map_err(listen_err)?;
            let scrape = crate::metrics::Scrape {
                executor: executor.clone(),
                devices: devices.clone(),
                links: links.clone(),
            };
            hardware.push(tokio::spawn(crate::metrics::serve(
                l,
                scrape,
                hardware_stop.subscribe(),
            )));
            tracing::info!(addr = %at, "metrics listening (no token: keep it on loopback or a management network)");
            Some(at)
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let tls_on = tls.is_some();
        let serve_options = http::ServeOptions {
            header_read_timeout: Duration::from_secs(cfg.api.header_read_timeout_s),
            keep_alive_idle: Duration::from_secs(cfg.api.keep_alive_idle_s),
            max_connections: cfg.api.max_connections,
        };
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = match tls {
            Some(config) => tokio::spawn(http::serve_with(
                http::tls::TlsListener::new(
                    listener,
                    config,
                    Duration::from_secs(cfg.api.tls_handshake_timeout_s),
                ),
                router,
                serve_options,
                shutdown,
            )),
            None => tokio::spawn(http::serve_with(listener, router, serve_options, shutdown)),
        };
        tracing::info!(
            %addr,
            site = %cfg.site.id,
            https = tls_on,
            mtls = !cfg.api.tls_client_ca.as_os_str().is_empty() && tls_on,
            "API listening"
        );
        Ok(Gateway {
            addr,
            executor,
            devices,
            automation,
            links,
            metrics_addr,
            tokens,
            stop: Some(stop),
            server,
            hardware_stop,
            hardware,
            devices_stop,
            device_tasks,
            pin_key: pin_key_for_gates,
            committed,
            control,
            data_lock,
        })
    }

    /// Stops the device drivers, reconcilers and gate controller and starts them again from
    /// `cfg` (a reloaded, validated config): new `[devices]`, `[access]` and site hours.
    /// Queued device commands stay in the outbox meanwhile. On an error the devices are
    /// left stopped; the caller restarts them with the previous config.
    pub async fn restart_devices(&mut self, cfg: &Config) -> Result<(), GatewayError> {
        let _ = self.devices_stop.send(true);
        // Serial ports are exclusive: the old drivers must have let go before new ones open.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        join_until(std::mem::take(&mut self.device_tasks), deadline).await;
        self.devices.clear();
        let (stop, shutdown) = watch::channel(false);
        self.devices_stop = stop;
        self.executor.set_catalog(Arc::new(
            crate::domain::catalog::DeviceCatalog::from_config(&cfg.devices),
        ));
        match start_hardware(
            cfg,
            &self.executor,
            self.pin_key.clone(),
            self.committed.clone(),
            shutdown,
            &self.devices,
        ) {
            Ok(tasks) => {
                self.device_tasks = tasks;
                self.committed.notify_waiters();
                Ok(())
            }
            Err(e) => {
                // Whatever was spawned before the failure stops again.
                let _ = self.devices_stop.send(true);
                Err(e)
            }
        }
    }

    /// Stops accepting, lets in-flight requests finish (each answered only after its change
    /// is committed), stops every other task, and closes the store, all within
    /// [`STOP_GRACE`].
    pub async fn stop(mut self) {
        let started = tokio::time::Instant::now();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(c) = self.control.take() {
            c.stop().await;
        }
        if tokio::time::timeout(HTTP_DRAIN, &mut self.server)
            .await
            .is_err()
        {
            tracing::warn!("HTTP requests still running after {HTTP_DRAIN:?}; cut off unanswered");
            self.server.abort();
        }
        let _ = self.hardware_stop.send(true);
        let _ = self.devices_stop.send(true);
        // Every driver and reconciler ends its current I/O within its timeout; a task
        // stuck past the grace period is abandoned.
        let mut tasks = std::mem::take(&mut self.hardware);
        tasks.append(&mut self.device_tasks);
        join_until(tasks, started + STOP_GRACE).await;
        let executor = self.executor;
        // The last store handle closes the writer thread after its final commit.
        let _ = tokio::task::spawn_blocking(move || drop(executor)).await;
        // Only now may a restore or migrate (or the next daemon) take the replica.
        drop(self.data_lock);
    }

    /// Resolves when the server ends on its own (an error), or never.
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.server).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
