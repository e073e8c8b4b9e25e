//! Reconcilers: one task per relay board and one for the lock API, bringing the hardware
//! to the desired state the outbox holds (`store::outbox`).
//!
//! Each task loops: take the device's due targets (oldest change first), deliver each
//! through the driver handle (coil write / `bring_to`), and record the outcome: applied on
//! success, or failed with a retry time (capped exponential backoff with jitter, at least
//! the vendor's `Retry-After`). It wakes on the executor's commit [`Notify`], on a short
//! tick (retries, changes made outside the executor), and on health changes.
//!
//! Read-back: at start, when the device comes back online and every `reconcile_s`, the
//! actual coils / locks are read and recorded as applied, so drift behind the gateway's
//! back becomes pending again and is corrected. When a device comes back online every
//! pending target is delivered at once, whatever its retry time. An offline lock API is
//! probed (its driver retries a read with its backoff, at most 1.6 s apart), so its return
//! is noticed without waiting for a retry of the queue.
//!
//! Health transitions become `device.offline` / `device.online` events, and the
//! [`DeviceRegistry`] (read by `GET /v1/devices`) holds each device's health.

use crate::command::Executor;
use crate::devices::modbus::{BoardState, RelayBoard};
use crate::devices::smartlock::{self, CommandError, LockHandle, LockState, LockStatus};
use crate::domain::EventType;
use crate::domain::desired::{LockTarget, Target};
use crate::failpoint;
use crate::store::{StoreError, events, outbox};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How often a reconciler looks for due retries and new rows without being woken.
pub const TICK: Duration = Duration::from_secs(1);
/// Targets taken per pass.
const BATCH: u32 = 64;
/// First retry delay after a failed delivery.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What kind of device an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A Modbus relay board.
    RelayBoard,
    /// The smart-lock vendor API.
    LockApi,
    /// An OSDP keypad.
    Keypad,
}

/// One device as `GET /v1/devices` shows it (without its queue, which is read from the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Device id.
    pub id: String,
    /// Kind.
    pub kind: DeviceKind,
    /// The zone a keypad guards.
    pub zone: Option<String>,
    /// Whether it answers.
    pub online: bool,
    /// The latest failure, kept after recovery.
    pub last_error: Option<String>,
}

/// Every configured device and its health, shared by the reconcilers and the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct DeviceRegistry(Arc<RwLock<Vec<DeviceEntry>>>);

impl DeviceRegistry {
    /// Adds a device (offline until its reconciler says otherwise).
    pub fn add(&self, id: &str, kind: DeviceKind, zone: Option<String>) {
        let mut list = self.0.write().unwrap_or_else(PoisonError::into_inner);
        list.push(DeviceEntry {
            id: id.to_owned(),
            kind,
            zone,
            online: false,
            last_error: None,
        });
    }

    /// Forgets every device (the hardware is being restarted with a reloaded config).
    pub fn clear(&self) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Records a device's health.
    pub fn set_health(&self, id: &str, online: bool, last_error: Option<String>) {
        let mut list = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = list.iter_mut().find(|e| e.id == id) {
            e.online = online;
            e.last_error = last_error;
        }
    }

    /// Every device, in configuration order.
    pub fn list(&self) -> Vec<DeviceEntry> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The driver a reconciler delivers through.
#[derive(Debug, Clone)]
pub enum DeviceHandle {
    /// A relay board's coils.
    Board(RelayBoard),
    /// The lock API.
    Locks(LockHandle),
}

/// A driver's health as reported: online, offline (with the reason) or not yet known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// No answer and no failure yet.
    Unknown,
    /// Answering; the latest failure, kept after recovery.
    Online(Option<String>),
    /// Not answering, and why.
    Offline(Option<String>),
}

impl Seen {
    /// From a driver that says online, or offline once something failed.
    pub fn from_flag(online: bool, last_error: Option<String>) -> Seen {
        match (online, last_error) {
            (true, e) => Seen::Online(e),
            (false, Some(e)) => Seen::Offline(Some(e)),
            (false, None) => Seen::Unknown,
        }
    }
}

fn board_seen(h: &crate::devices::modbus::Health) -> Seen {
    match h.state {
        BoardState::Online => Seen::Online(h.last_error.clone()),
        BoardState::Offline => Seen::Offline(h.last_error.clone()),
        BoardState::Connecting => Seen::Unknown,
    }
}

fn lock_seen(h: &smartlock::LockApiHealth) -> Seen {
    Seen::from_flag(h.online, h.last_error.clone())
}

/// A failed delivery: the message to store and the least wait the device asked for.
struct Failure {
    message: String,
    retry_after: Option<Duration>,
}

impl DeviceHandle {
    fn health(&self) -> Seen {
        match self {
            DeviceHandle::Board(b) => board_seen(&b.health().borrow()),
            DeviceHandle::Locks(l) => lock_seen(&l.health().borrow()),
        }
    }

    /// Waits until the driver's health changes; never resolves once the driver is gone.
    async fn health_changed(rx: &mut HealthRx) {
        let gone = match rx {
            HealthRx::Board(r) => r.changed().await.is_err(),
            HealthRx::Locks(r) => r.changed().await.is_err(),
        };
        if gone {
            std::future::pending::<()>().await;
        }
    }

    fn health_rx(&self) -> HealthRx {
        match self {
            DeviceHandle::Board(b) => HealthRx::Board(b.health()),
            DeviceHandle::Locks(l) => HealthRx::Locks(l.health()),
        }
    }

    /// Asks a device that is offline whether it is back, where nothing else would: a relay
    /// board's link probes by itself, but the lock API is only called when there is work,
    /// and an offline device gets none.
    async fn probe(&self) {
        if let DeviceHandle::Locks(l) = self {
            // The outcome shows in the driver's health; the driver retries with its backoff
            // meanwhile, which is the probe cadence.
            let _ = l.read_all().await;
        }
    }

    /// Delivers one target; on success returns the state to record as applied.
    async fn deliver(&self, t: &Target) -> Result<Target, Failure> {
        match (self, t) {
            (DeviceHandle::Board(b), Target::Coil { coil, on, .. }) => b
                .write_coil(*coil, *on)
                .await
                .map(|()| t.clone())
                .map_err(|e| Failure {
                    message: e.to_string(),
                    retry_after: None,
                }),
            (DeviceHandle::Locks(l), Target::SmartLock { lock, target }) => {
                let want = match target {
                    LockTarget::Unassigned => smartlock::LockTarget::Unassigned,
                    LockTarget::Assigned { tenant_ref } => smartlock::LockTarget::Assigned {
                        tenant_ref: tenant_ref.clone(),
                    },
                    LockTarget::Overlocked { .. } => smartlock::LockTarget::Overlocked,
                };
                match l.bring_to(lock, want).await {
                    Ok(state) => Ok(applied_lock(&state, t)),
                    Err(e) => Err(Failure {
                        retry_after: match &e {
                            CommandError::Lock(le) => le.retry_after(),
                            _ => None,
                        },
                        message: e.to_string(),
                    }),
                }
            }
            _ => Err(Failure {
                message: format!("target {} does not belong to this device", t.key()),
                retry_after: None,
            }),
        }
    }

    /// Reads the actual state of `targets` (those it can read); the error is the reason
    /// nothing could be read.
    async fn read_back(&self, targets: &[Target]) -> Result<Vec<Target>, String> {
        match self {
            DeviceHandle::Board(b) => {
                let count = b.coil_count();
                if count == 0 {
                    return Ok(Vec::new());
                }
                let bits = b.read_coils(0, count).await.map_err(|e| e.to_string())?;
                Ok(targets
                    .iter()
                    .filter_map(|t| match t {
                        Target::Coil { board, coil, .. } => {
                            bits.get(usize::from(*coil)).map(|on| Target::Coil {
                                board: board.clone(),
                                coil: *coil,
                                on: *on,
                            })
                        }
                        Target::SmartLock { .. } => None,
                    })
                    .collect())
            }
            DeviceHandle::Locks(l) => {
                let all = l.read_all().await.map_err(|e| e.to_string())?;
                let by_id: HashMap<&str, &LockState> =
                    all.iter().map(|s| (s.id.as_str(), s)).collect();
                Ok(targets
                    .iter()
                    .filter_map(|t| match t {
                        Target::SmartLock { lock, .. } => {
                            by_id.get(lock.as_str()).map(|s| applied_lock(s, t))
                        }
                        Target::Coil { .. } => None,
                    })
                    .collect())
            }
        }
    }
}

enum HealthRx {
    Board(watch::Receiver<crate::devices::modbus::Health>),
    Locks(watch::Receiver<smartlock::LockApiHealth>),
}

/// The vendor's view of a lock as a target. An overlocked lock satisfies an overlocked
/// target whatever tenant it keeps (the driver's overlock leaves the tenant alone).
fn applied_lock(state: &LockState, desired: &Target) -> Target {
    let lock = state.id.clone();
    let target = match state.state {
        LockStatus::Unassigned => LockTarget::Unassigned,
        LockStatus::Assigned => LockTarget::Assigned {
            tenant_ref: state.assigned_to.clone().unwrap_or_default(),
        },
        LockStatus::Overlocked => match desired {
            Target::SmartLock {
                target: t @ LockTarget::Overlocked { .. },
                ..
            } => t.clone(),
            _ => LockTarget::Overlocked {
                tenant_ref: state.assigned_to.clone(),
            },
        },
    };
    Target::SmartLock { lock, target }
}

/// The wait before the next attempt after `attempts` failures (capped exponential, equal
/// jitter), and at least `retry_after`.
pub fn retry_delay(attempts: u32, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(2u32.saturating_pow(attempts.min(20)))
        .min(BACKOFF_MAX);
    let half = exp / 2;
    let half_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    let backoff = half + Duration::from_millis(rand::random_range(0..=half_ms));
    retry_after.map_or(backoff, |ra| ra.min(BACKOFF_MAX).max(backoff))
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A device's health as `GET /v1/devices` and the event log show it: every observation
/// goes to the [`DeviceRegistry`], and a change of online state becomes a
/// `device.offline` / `device.online` event (the first contact after start is not one).
pub struct HealthReport {
    device: String,
    kind: DeviceKind,
    executor: Executor,
    registry: DeviceRegistry,
    /// What was last reported: None until the first known state.
    reported: Option<bool>,
}

impl HealthReport {
    /// A report for `device`, which the registry must already list.
    pub fn new(
        device: &str,
        kind: DeviceKind,
        executor: Executor,
        registry: DeviceRegistry,
    ) -> HealthReport {
        HealthReport {
            device: device.to_owned(),
            kind,
            executor,
            registry,
            reported: None,
        }
    }

    /// Records what was seen; true when the device has just come online (first contact
    /// included), which is when its state should be read back.
    pub async fn record(&mut self, online: bool, error: Option<String>) -> bool {
        if self.reported == Some(online) {
            self.registry.set_health(&self.device, online, error);
            return false;
        }
        let was = self.reported.replace(online);
        if online && was.is_none() {
            self.registry.set_health(&self.device, online, error);
            return true; // first contact: nothing to announce
        }
        let kind = if online {
            EventType::DeviceOnline
        } else {
            EventType::DeviceOffline
        };
        let mut data = serde_json::json!({
            "device": self.device,
            "kind": self.kind,
        });
        if !online && let Some(e) = &error {
            data["error"] = serde_json::Value::String(e.clone());
        }
        let now = self.executor.now();
        let r = self
            .executor
            .store()
            .write(move |c| events::append(c, kind, &data, now))
            .await;
        match r {
            Ok(_) => tracing::info!(device = %self.device, online, "device health changed"),
            Err(e) => {
                tracing::warn!(device = %self.device, error = %e, "cannot record device health")
            }
        }
        // After the event, so whoever sees the new health finds its event in the log.
        self.registry.set_health(&self.device, online, error);
        online
    }
}

/// Follows a driver's health watch into `report` until `shutdown` (or the driver is gone);
/// `seen` reads one value of it.
pub async fn follow_health<T>(
    mut rx: watch::Receiver<T>,
    seen: fn(&T) -> Seen,
    mut report: HealthReport,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = seen(&rx.borrow_and_update());
        match now {
            Seen::Unknown => {}
            Seen::Online(e) => {
                report.record(true, e).await;
            }
            Seen::Offline(e) => {
                report.record(false, e).await;
            }
        }
        tokio::select! {
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
            r = rx.changed() => if r.is_err() { return; },
        }
    }
}

/// One device's reconciler.
pub struct Reconciler {
    device: String,
    kind: DeviceKind,
    handle: DeviceHandle,
    executor: Executor,
    wake: Arc<Notify>,
    registry: DeviceRegistry,
    period: Duration,
}

impl Reconciler {
    /// A reconciler for the device `handle` drives, recording in `executor`'s store, woken
    /// by `wake`, reading back every `period`.
    pub fn new(
        handle: DeviceHandle,
        executor: Executor,
        wake: Arc<Notify>,
        registry: DeviceRegistry,
        period: Duration,
    ) -> Reconciler {
        let (device, kind) = match &handle {
            DeviceHandle::Board(b) => (b.id().to_owned(), DeviceKind::RelayBoard),
            DeviceHandle::Locks(l) => (l.id().to_owned(), DeviceKind::LockApi),
        };
        Reconciler {
            device,
            kind,
            handle,
            executor,
            wake,
            registry,
            period,
        }
    }

    /// Runs until `shutdown` becomes true. Health is reported alongside, so a change is
    /// recorded even while a delivery is in progress.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let report = HealthReport::new(
            &self.device,
            self.kind,
            self.executor.clone(),
            self.registry.clone(),
        );
        let stop = shutdown.clone();
        let reporting = async {
            match &self.handle {
                DeviceHandle::Board(b) => follow_health(b.health(), board_seen, report, stop).await,
                DeviceHandle::Locks(l) => follow_health(l.health(), lock_seen, report, stop).await,
            }
        };
        tokio::join!(reporting, self.reconcile(shutdown));
    }

    async fn reconcile(&self, mut shutdown: watch::Receiver<bool>) {
        let mut health_rx = self.handle.health_rx();
        // Online as last seen here: None until known.
        let mut online: Option<bool> = None;
        let mut read_due = true;
        let mut force = false;
        let mut next_read = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Registered before the pass, so a commit during it is not missed.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let seen = self.handle.health();
            let now_online = match &seen {
                Seen::Unknown => online,
                Seen::Online(_) => Some(true),
                Seen::Offline(_) => Some(false),
            };
            if now_online == Some(true) && online != Some(true) {
                // (Back) online: read it back and deliver everything pending at once.
                read_due = true;
                force = true;
            }
            online = now_online;
            let reachable = !matches!(seen, Seen::Offline(_));
            let now = tokio::time::Instant::now();
            if reachable && (read_due || now >= next_read) {
                match self.read_back().await {
                    Ok(()) => read_due = false,
                    // Tried again on the next wake-up (at most a tick away).
                    Err(e) => {
                        tracing::debug!(device = %self.device, error = %e, "read-back failed")
                    }
                }
                next_read = tokio::time::Instant::now() + self.period;
            } else if now >= next_read {
                // Offline: the read-back waits for its return (`read_due` is set then).
                next_read = now + self.period;
            }
            if !reachable {
                self.handle.probe().await;
            }
            if !matches!(seen, Seen::Offline(_)) || force {
                if let Err(e) = self.deliver_due(force).await {
                    tracing::warn!(device = %self.device, error = %e, "reconcile pass failed");
                }
                force = false;
            }
            tokio::select! {
                // A dropped sender means the gateway is gone: stop (never spin on the error).
                r = shutdown.changed() => if r.is_err() { return; },
                _ = &mut notified => {}
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(next_read) => {}
                _ = DeviceHandle::health_changed(&mut health_rx) => {}
            }
        }
    }

    /// Reads the device back and records what it holds.
    async fn read_back(&self) -> Result<(), String> {
        let device = self.device.clone();
        let known = self
            .executor
            .store()
            .read(move |c| outbox::targets(c, &device))
            .await
            .map_err(|e| e.to_string())?;
        if known.is_empty() {
            return Ok(());
        }
        let desired: Vec<Target> = known.iter().map(|(d, _)| d.clone()).collect();
        let actual = self.handle.read_back(&desired).await?;
        let mut changes = Vec::new();
        for a in actual {
            let Some((d, applied)) = known.iter().find(|(d, _)| d.key() == a.key()) else {
                continue;
            };
            // Unchanged and still pending: leave its retry schedule alone.
            if applied.as_ref() == Some(&a) && &a != d {
                continue;
            }
            if applied.as_ref() != Some(&a) {
                changes.push(a);
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let device = self.device.clone();
        let n = changes.len();
        self.executor
            .store()
            .write(move |c| -> Result<(), StoreError> {
                for a in &changes {
                    outbox::set_applied(c, &device, a)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?;
        tracing::debug!(device = %self.device, changed = n, "read-back recorded");
        Ok(())
    }

    /// Delivers the due targets (every pending one when `force`), in order.
    async fn deliver_due(&self, force: bool) -> Result<(), StoreError> {
        loop {
            let device = self.device.clone();
            let now = if force { i64::MAX } else { wall_ms() };
            let due = self
                .executor
                .store()
                .read(move |c| outbox::due(c, &device, now, BATCH))
                .await?;
            if due.is_empty() {
                return Ok(());
            }
            let full = due.len() == BATCH as usize;
            let mut failed = false;
            for p in due {
                let device = self.device.clone();
                match self.handle.deliver(&p.desired).await {
                    Ok(applied) => {
                        failpoint::check(failpoint::OUTBOX_APPLIED_BEFORE)?;
                        self.executor
                            .store()
                            .write(move |c| outbox::set_applied(c, &device, &applied))
                            .await?;
                        failpoint::check(failpoint::OUTBOX_APPLIED_AFTER)?;
                    }
                    Err(f) => {
                        failed = true;
                        let next = wall_ms().saturating_add(
                            i64::try_from(retry_delay(p.attempts, f.retry_after).as_millis())
                                .unwrap_or(i64::MAX),
                        );
                        tracing::debug!(device = %self.device, target = %p.key, error = %f.message, "delivery failed");
                        self.executor
                            .store()
                            .write(move |c| {
                                outbox::set_failed(c, &device, &p.key, &f.message, next)
                            })
                            .await?;
                    }
                }
            }
            // A forced pass takes everything once; a full batch means there may be more.
            if force || failed || !full {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_is_capped_and_honours_retry_after() {
        for _ in 0..50 {
            let d0 = retry_delay(0, None);
            assert!(d0 >= Duration::from_millis(500) && d0 <= Duration::from_secs(1));
            let d3 = retry_delay(3, None);
            assert!(d3 >= Duration::from_secs(4) && d3 <= Duration::from_secs(8));
            assert!(retry_delay(40, None) <= BACKOFF_MAX);
            assert!(retry_delay(0, Some(Duration::from_secs(20))) >= Duration::from_secs(20));
            assert!(retry_delay(0, Some(Duration::from_secs(9_999))) <= BACKOFF_MAX);
        }
    }

    #[test]
    fn an_overlocked_lock_satisfies_an_overlocked_target_whatever_its_tenant() {
        let want = Target::SmartLock {
            lock: "l1".into(),
            target: LockTarget::Overlocked {
                tenant_ref: Some("c1".into()),
            },
        };
        let state = LockState {
            id: "l1".into(),
            state: LockStatus::Overlocked,
            assigned_to: Some("c9".into()),
        };
        assert_eq!(applied_lock(&state, &want), want);
        let unassigned = Target::SmartLock {
            lock: "l1".into(),
            target: LockTarget::Unassigned,
        };
        assert_ne!(applied_lock(&state, &unassigned), unassigned);
    }
}
