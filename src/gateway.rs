//! Starts the gateway's parts in order (store, executor, HTTP) and stops them cleanly.

use crate::api::http::{self, Limits, auth::Tokens};
use crate::command::{Clock, Executor};
use crate::config::Config;
use crate::devices::modbus::{InputEvent, RelayBoards};
use crate::devices::osdp::{self, Keypad, KeyPress, OsdpOptions};
use crate::devices::smartlock::{DriverSettings, LockDriver, ReferenceProvider};
use crate::domain::pin::PinKey;
use crate::reconcile::{DeviceHandle, DeviceKind, DeviceRegistry, HealthReport, Reconciler};
use crate::store::{Store, StoreError, site};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

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
}

/// A running gateway.
pub struct Gateway {
    /// Where the HTTP API listens.
    pub addr: SocketAddr,
    /// The command executor (tests and the demo use it directly).
    pub executor: Executor,
    /// Every configured device and its health.
    pub devices: DeviceRegistry,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    hardware_stop: watch::Sender<bool>,
    hardware: Vec<JoinHandle<()>>,
}

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
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
            f.write_all(&key)
                .and_then(|_| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            tracing::info!(path = %path.display(), "created a new PIN key");
            Ok(PinKey::new(key))
        }
        Err(e) => Err(err(e.to_string())),
    }
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
    let settings = serde_json::json!({
        "access_hours": cfg.site.access_hours,
        "auto_occupy": cfg.site.auto_occupy,
        "auto_occupy_at": cfg.site.auto_occupy_at,
        "auto_deallocate": cfg.site.auto_deallocate,
        "auto_overlock": cfg.site.auto_overlock,
    });
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

/// Follows a keypad's link health into the registry and the event log.
async fn report_keypad(k: Keypad, mut report: HealthReport, mut shutdown: watch::Receiver<bool>) {
    let mut rx = k.health();
    loop {
        let h = rx.borrow_and_update().clone();
        if h.online {
            report.record(true, h.last_error).await;
        } else if h.last_error.is_some() {
            report.record(false, h.last_error).await;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return; },
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
        }
    }
}

/// Builds the keypad, relay board and lock API drivers from the config and spawns them,
/// with a reconciler per relay board and lock API and a health reporter per keypad.
fn start_hardware(
    cfg: &Config,
    executor: &Executor,
    committed: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) -> Result<(DeviceRegistry, Vec<JoinHandle<()>>), GatewayError> {
    let registry = DeviceRegistry::default();
    let mut tasks = Vec::new();
    let period = Duration::from_secs(cfg.devices.reconcile_s.max(1));
    let mut handles = Vec::new();
    if !cfg.devices.relay_boards.is_empty() {
        // Input changes have no consumer yet (keypads and door alarms come later): drain them.
        let (input_tx, mut inputs) = mpsc::channel::<InputEvent>(256);
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = inputs.recv().await {
                tracing::trace!(?ev, "relay input");
            }
        }));
        let boards = RelayBoards::new(&cfg.devices.relay_boards, input_tx)
            .map_err(|e| GatewayError::Devices(e.to_string()))?;
        for link in boards.links {
            tasks.push(tokio::spawn(link.run(shutdown.clone())));
        }
        for b in &cfg.devices.relay_boards {
            if let Some(h) = boards.boards.get(&b.id) {
                registry.add(&b.id, DeviceKind::RelayBoard, None);
                handles.push(DeviceHandle::Board(h.clone()));
            }
        }
    }
    if let Some(l) = &cfg.devices.lock_api {
        let provider =
            ReferenceProvider::from_config(l).map_err(|e| GatewayError::Devices(e.to_string()))?;
        let settings = DriverSettings {
            // The outbox retries later; do not hold the lock queue for a minute per lock.
            give_up_after: Duration::from_secs(15),
            ..DriverSettings::default()
        };
        let (driver, handle) = LockDriver::new(&l.id, provider, settings);
        tasks.push(tokio::spawn(driver.run(shutdown.clone())));
        registry.add(&l.id, DeviceKind::LockApi, None);
        handles.push(DeviceHandle::Locks(handle));
    }
    if !cfg.devices.keypads.is_empty() {
        // Key presses have no consumer yet (gate access comes next): drain them, and never
        // log them (they are PINs).
        let (keys_tx, mut keys) = mpsc::channel::<KeyPress>(256);
        tasks.push(tokio::spawn(async move { while keys.recv().await.is_some() {} }));
        let (pads, buses) =
            osdp::spawn_all(&cfg.devices.keypads, &OsdpOptions::default(), keys_tx, &shutdown)
                .map_err(|e| GatewayError::Devices(e.to_string()))?;
        for bus in buses {
            tasks.push(tokio::spawn(async move {
                if let Ok(Err(e)) = bus.await {
                    tracing::error!(error = %e, "OSDP bus stopped");
                }
            }));
        }
        for k in &cfg.devices.keypads {
            registry.add(&k.id, DeviceKind::Keypad, Some(k.zone.clone()));
        }
        for pad in pads {
            let report = HealthReport::new(
                pad.id(),
                DeviceKind::Keypad,
                executor.clone(),
                registry.clone(),
            );
            tasks.push(tokio::spawn(report_keypad(pad, report, shutdown.clone())));
        }
    }
    for h in handles {
        let r = Reconciler::new(
            h,
            executor.clone(),
            committed.clone(),
            registry.clone(),
            period,
        );
        tasks.push(tokio::spawn(r.run(shutdown.clone())));
    }
    Ok((registry, tasks))
}

impl Gateway {
    /// Starts everything for a validated config; the API listens before this returns.
    pub async fn start(cfg: &Config, clock: Clock) -> Result<Gateway, GatewayError> {
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
        let store = open_store(cfg, &clock).await?;
        let committed = Arc::new(Notify::new());
        let executor = Executor::new(
            store,
            cfg.site.id.clone(),
            cfg.tz(),
            pin_key,
            clock,
            i64::from(cfg.api.idempotency_ttl_hours) * 3600,
        )
        .with_lock_api(
            cfg.devices
                .lock_api
                .as_ref()
                .map_or(crate::command::DEFAULT_LOCK_API, |l| &l.id),
        )
        .with_commit_notify(committed.clone());
        let (hardware_stop, hw_shutdown) = watch::channel(false);
        let (devices, hardware) = start_hardware(cfg, &executor, committed, hw_shutdown)?;
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
        };
        let router = http::router_with_devices(
            executor.clone(),
            Tokens::from_config(&cfg.api.tokens),
            limits,
            devices.clone(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let tls_on = tls.is_some();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = match tls {
            Some(config) => tokio::spawn(http::serve(
                http::tls::TlsListener::new(listener, config, http::tls::HANDSHAKE_TIMEOUT),
                router,
                shutdown,
            )),
            None => tokio::spawn(http::serve(listener, router, shutdown)),
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
            stop: Some(stop),
            server,
            hardware_stop,
            hardware,
        })
    }

    /// Stops accepting, lets in-flight requests finish, and closes the store.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.server).await;
        let _ = self.hardware_stop.send(true);
        for task in self.hardware.drain(..) {
            // Every driver and reconciler ends its current I/O within its timeout; a task
            // stuck longer is abandoned.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let executor = self.executor;
        // The last store handle closes the writer thread after its final commit.
        let _ = tokio::task::spawn_blocking(move || drop(executor)).await;
    }

    /// Resolves when the server ends on its own (an error), or never.
    pub async fn wait(&mut self) -> std::io::Result<()> {
        match (&mut self.server).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
