//! `unitgate run` as a systemd service: readiness, the watchdog, signals and a graceful stop.
//!
//! - `READY=1` (with a one-line `STATUS=`) is sent once [`Gateway::start`] returned: the
//!   store is open and migrated and the API is listening.
//! - `WATCHDOG=1` is sent by the main loop every half `WATCHDOG_USEC`, and only after a
//!   health probe passed: a round trip through the store's writer thread and its reader
//!   pool, within a deadline. A stalled runtime, a wedged writer or an exhausted blocking
//!   pool all stop the pings, so systemd restarts the gateway.
//! - SIGTERM / SIGINT: `STOPPING=1`, then [`Gateway::stop`] (drain within
//!   [`crate::gateway::STOP_GRACE`]), and `run` returns `Ok`.
//! - SIGHUP: [`crate::reload`] applies the config file again, then the automation scheduler
//!   looks again (e.g. after NTP set the clock).
//!
//! Every notification is a no-op without `NOTIFY_SOCKET`. The gateway spawns no child
//! processes, so the variable is left in place (unsetting it would need a single-threaded
//! process).

use crate::gateway::Gateway;
use crate::reload::Reloader;
use crate::store::{Store, StoreError};
use sd_notify::NotifyState;
use std::time::Duration;

/// Errors of the service loop.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The HTTP server ended on its own.
    #[error("the API server stopped: {0}")]
    Server(#[from] std::io::Error),
    /// A signal handler could not be installed.
    #[error("cannot install the {0} handler: {1}")]
    Signal(&'static str, std::io::Error),
}

/// Why a health probe failed.
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    /// The writer thread or the reader pool did not answer in time.
    #[error("the store's {0} did not answer within {1:?}")]
    Timeout(&'static str, Duration),
    /// The store answered with an error.
    #[error("the store's {0} failed: {1}")]
    Store(&'static str, StoreError),
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Tells systemd the gateway is ready, with `status` as its one-line summary.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the gateway is shutting down.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The one-line `STATUS=` of a running gateway.
pub fn summary(gw: &Gateway, https: bool) -> String {
    let devices = gw.devices.list();
    let online = devices.iter().filter(|d| d.online).count();
    format!(
        "serving {} on {}; site {}; {} devices ({} online)",
        if https { "https" } else { "http" },
        gw.addr,
        gw.executor.site_id(),
        devices.len(),
        online
    )
}

/// Proves the store answers: an empty write through the writer thread (nothing is written,
/// so no fsync) and a read on the reader pool, each within `within`.
pub async fn probe(store: &Store, within: Duration) -> Result<(), Unhealthy> {
    let write = store.write(|_| Ok::<_, StoreError>(()));
    match tokio::time::timeout(within, write).await {
        Err(_) => return Err(Unhealthy::Timeout("writer thread", within)),
        Ok(Err(e)) => return Err(Unhealthy::Store("writer thread", e)),
        Ok(Ok(())) => {}
    }
    let read = store.read(|c| {
        c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map_err(StoreError::from)
    });
    match tokio::time::timeout(within, read).await {
        Err(_) => Err(Unhealthy::Timeout("reader pool", within)),
        Ok(Err(e)) => Err(Unhealthy::Store("reader pool", e)),
        Ok(Ok(_)) => Ok(()),
    }
}

/// How often the watchdog is fed: half of `WATCHDOG_USEC` when systemd asked for it.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Serves until SIGTERM or SIGINT, then stops the gateway gracefully. Sends READY first and
/// feeds the watchdog meanwhile. SIGHUP reloads through `reloader` (when given) and kicks
/// the automation scheduler.
pub async fn run(
    mut gw: Gateway,
    mut reloader: Option<Reloader>,
    https: bool,
) -> Result<(), ServiceError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| ServiceError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| ServiceError::Signal("SIGINT", e))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| ServiceError::Signal("SIGHUP", e))?;
    let period = watchdog_period();
    // Never fires when systemd asked for no watchdog.
    let mut tick = tokio::time::interval(period.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let store = gw.executor.store().clone();
    ready(&summary(&gw, https));
    tracing::info!(watchdog = ?period, "ready");
    let result = loop {
        tokio::select! {
            r = gw.wait() => break r.map_err(ServiceError::Server),
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                break Ok(());
            }
            _ = hup.recv() => {
                if let Some(r) = reloader.as_mut() {
                    r.reload(&mut gw).await;
                }
                tracing::info!("SIGHUP: checking automations now");
                gw.automation.kick();
                notify(&[NotifyState::Status(&summary(&gw, https))]);
            }
            _ = tick.tick(), if period.is_some() => {
                let within = period.unwrap_or_default();
                match probe(&store, within).await {
                    Ok(()) => notify(&[NotifyState::Watchdog]),
                    Err(e) => tracing::error!(error = %e, "unhealthy: not feeding the watchdog"),
                }
            }
        }
    };
    stopping();
    drop(store);
    gw.stop().await;
    tracing::info!("stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wedged_writer_thread_fails_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("u.db")).unwrap();
        probe(&store, Duration::from_secs(5)).await.unwrap();
        // A write job that never ends holds the writer thread, as a hung disk would.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let stuck = store.clone();
        let job = tokio::spawn(async move {
            stuck
                .write(move |_| {
                    let _ = started.send(());
                    let _ = wait.recv();
                    Ok::<_, StoreError>(())
                })
                .await
        });
        running.await.unwrap();
        let err = probe(&store, Duration::from_millis(200)).await.unwrap_err();
        assert!(
            matches!(err, Unhealthy::Timeout("writer thread", _)),
            "{err}"
        );
        release.send(()).unwrap();
        job.await.unwrap().unwrap();
        probe(&store, Duration::from_secs(5)).await.unwrap();
    }
}
