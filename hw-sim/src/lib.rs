//! hw-sim: a whole simulated self-storage site for technicians and tests.
//!
//! # Layout
//!
//! - [`config`]: the site file (`[devices]`, shared with the gateway, and `[sim]`).
//! - [`keypad`]: OSDP keypads (libosdp peripheral on its own thread) on a pseudo-terminal
//!   and/or TCP.
//! - [`relay`]: Modbus relay/sensor boards (TCP server, RTU server on a pseudo-terminal).
//! - [`locks`]: the smart-lock vendor API (HTTP).
//! - [`control`]: the control API technicians and tests drive the site with.
//! - [`observe`]: the observation bus (monotonic nanosecond timestamps).
//! - [`fault`]: injected faults.
//! - [`gate`]: gates open when their strike coil energises (the position sensor follows).
//! - [`pty`]: pseudo-terminal pairs linked where the site file names serial devices.
//! - [`line`]: RS-485 line timing for those pseudo-terminals (opt-in, `sim.line_timing`).
//! - [`scenario`]: timed steps with expectations (`hw-sim run`).
//!
//! Devices speak the real protocols over real transports; nothing here calls gateway code.

pub mod config;
pub mod control;
pub mod fault;
pub mod gate;
pub mod keypad;
pub mod line;
pub mod locks;
pub mod observe;
pub mod pty;
pub mod relay;
pub mod scenario;
pub mod web;

use config::SiteFile;
use fault::Faults;
use observe::Bus;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// Errors of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// I/O (binding a port, opening a pty).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The site file is wrong.
    #[error("{0}")]
    Config(String),
    /// OSDP library failure.
    #[error("osdp: {0}")]
    Osdp(String),
    /// No such device (or input, or lock).
    #[error("{0}")]
    NotFound(String),
    /// A request the device cannot take.
    #[error("{0}")]
    BadRequest(String),
}

impl SimError {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SimError {
        let what = what.into();
        move |source| SimError::Io { what, source }
    }
}

/// What every device task gets.
#[derive(Debug, Clone)]
pub struct DeviceContext {
    /// Observation bus.
    pub bus: Bus,
    /// Fault table.
    pub faults: Faults,
    /// Becomes `true` when the simulator stops.
    pub shutdown: watch::Receiver<bool>,
    /// Serial devices with RS-485 line timing (`sim.line_timing`).
    pub line_timing: Vec<String>,
}

/// The running devices.
pub struct Registry {
    /// Keypads by id.
    pub keypads: BTreeMap<String, keypad::Keypad>,
    /// Relay boards by id.
    pub relays: BTreeMap<String, relay::RelayBoard>,
    /// The lock API.
    pub locks: Option<locks::LockApi>,
    /// Observation bus.
    pub bus: Bus,
    /// Fault table.
    pub faults: Faults,
    /// Becomes `true` when the simulator stops (ends the event streams).
    pub shutdown: watch::Receiver<bool>,
    /// The site's units (`[[units]]`), for `GET /units`.
    pub units: Vec<config::UnitConfig>,
}

/// A running simulated site.
pub struct Sim {
    /// Where the control API listens.
    pub control_addr: SocketAddr,
    /// The devices.
    pub registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    control: tokio::task::JoinHandle<()>,
}

impl Sim {
    /// Starts every device of the site file and the control API (on `control_listen`, or
    /// the file's `sim.control_listen`). Every device is listening when this returns.
    pub async fn start(site: &SiteFile, control_listen: Option<&str>) -> Result<Sim, SimError> {
        site.validate()
            .map_err(|p| SimError::Config(p.join("; ")))?;
        let (stop, shutdown) = watch::channel(false);
        let ctx = DeviceContext {
            bus: Bus::new(),
            faults: Faults::default(),
            shutdown,
            line_timing: site.sim.line_timing.clone(),
        };
        let mut relays = BTreeMap::new();
        for cfg in &site.devices.relay_boards {
            relays.insert(cfg.id.clone(), relay::RelayBoard::start(cfg, &ctx).await?);
        }
        let mut keypads = BTreeMap::new();
        for cfg in &site.devices.keypads {
            keypads.insert(cfg.id.clone(), keypad::Keypad::start(cfg, &ctx).await?);
        }
        let locks = match &site.devices.lock_api {
            Some(cfg) => Some(locks::LockApi::start(cfg, &ctx).await?),
            None => None,
        };
        let registry = Arc::new(Registry {
            keypads,
            relays,
            locks,
            bus: ctx.bus.clone(),
            faults: ctx.faults.clone(),
            shutdown: ctx.shutdown.clone(),
            units: site.units.clone(),
        });
        gate::start(&site.devices.keypads, &registry, &ctx);
        let listen = control_listen.unwrap_or(&site.sim.control_listen);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(SimError::io(format!("control API on {listen}")))?;
        let control_addr = listener
            .local_addr()
            .map_err(SimError::io("control API address"))?;
        let app = control::router(registry.clone());
        let mut shutdown = ctx.shutdown.clone();
        let control = tokio::spawn(async move {
            let stopped = async move {
                let _ = shutdown.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(error = %e, "control API stopped");
            }
        });
        Ok(Sim {
            control_addr,
            registry,
            stop,
            control,
        })
    }

    /// The control API's base URL.
    pub fn control_url(&self) -> String {
        format!("http://{}", self.control_addr)
    }

    /// Stops every device and the control API.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.control.await;
        for k in self.registry.keypads.values() {
            k.stop().await;
        }
        for r in self.registry.relays.values() {
            r.stop().await;
        }
        if let Some(l) = &self.registry.locks {
            l.stop().await;
        }
    }
}
