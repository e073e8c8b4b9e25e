//! unitgate: the per-site gateway of a self-storage facility.
//!
//! # Layout
//!
//! - [`domain`]: the pure core: statuses, the allocation state machine, unit records,
//!   access hours, PIN hashing. No I/O.
//! - [`store`]: the SQLite replica: migrations, one writer thread with group commit,
//!   readers, the event log, idempotency records.
//! - [`command`]: every mutating operation as one [`command::Command`], applied by the
//!   same code whichever API it came from.
//! - [`api`]: the error shape and the HTTP API (axum); MQTT joins here.
//! - [`model`]: what the APIs return.
//! - [`config`]: the configuration file, env overrides and validation.
//! - [`devices`]: the device drivers (Modbus relay boards, smart-lock API, OSDP keypads), each a task
//!   behind a handle.
//! - [`reconcile`]: one task per relay board and per lock API delivering the outbox through
//!   the drivers, reading back drift, reporting health.
//! - [`automation`]: the scheduler running auto move-in and auto deallocate when due.
//! - [`gateway`]: starts and stops the parts in order.
//! - [`demo`]: the demo site.
//! - [`ops`]: `status`, `backup`, `restore`, `migrate` beside the daemon; the data-directory lock.
//! - [`service`]: `unitgate run` under systemd: readiness, watchdog, signals, graceful stop.
//! - [`reload`]: SIGHUP: re-reads the config and applies what can change while running.
//! - [`logging`]: the tracing subscriber (human or JSON lines) and per-device spans.
//! - [`secret`]: secrets read from files, never printed.
//! - [`metrics`]: Prometheus text for `GET /metrics`.
//! - [`failpoint`]: named failpoints at each durable step (cargo feature `failpoints`).

pub mod api;
pub mod automation;
pub mod cloud;
pub mod command;
pub mod config;
pub mod demo;
pub mod devices;
pub mod domain;
pub mod failpoint;
pub mod gate;
pub mod gateway;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod reconcile;
pub mod reload;
pub mod secret;
pub mod service;
pub mod store;
