//! The lock driver: one task per lock API, owning its [`LockProvider`]. A reconciler sends
//! "bring lock X to state S" through a [`LockHandle`] and awaits the outcome; the driver
//! reads the lock, makes the vendor calls [`plan`] names, retries what is worth retrying
//! and reports the API's health on a `watch`.
//!
//! - Each command runs as its own job, so a lock that is slow or backing off never holds
//!   up another; at most [`DriverSettings::concurrency`] vendor calls are in flight.
//! - A new command for a lock with one still running replaces it (the older caller gets
//!   [`CommandError::Superseded`]); the same target again joins the running job instead.
//! - Transient failures (timeouts, connection errors, 5xx) and garbled answers are retried
//!   with capped exponential backoff and jitter, each attempt starting from a fresh read
//!   (a lost reply may hide an applied change), until [`DriverSettings::give_up_after`];
//!   then the last error goes back to the caller, whose durable queue retries later.
//! - A 429 pauses every call of the driver until its `Retry-After` (the vendor's rate limit
//!   is per API key, so other locks' calls would only be refused too), then the refused
//!   call is sent again as it was (a 429 is not applied, so there is nothing to read back).
//! - Auth failures (401/403) are never retried: the health goes offline saying so.

use super::{LockError, LockProvider, LockState, LockStatus, LockStep, plan};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
// Jobs run in the driver's span (`device{id, kind}`), so their log lines name the device.
use tracing::Instrument;

/// How long the driver keeps trying to put back an overlock it lifted for a command that
/// then failed.
const RESTORE_OVERLOCK_WITHIN: Duration = Duration::from_secs(30);
/// Most vendor changes one attempt makes (the longest plan is 3: lift, unassign, assign).
const MAX_STEPS: usize = 6;

/// Where a lock should be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LockTarget {
    /// No tenant.
    Unassigned,
    /// Opened by this tenant's code.
    Assigned {
        /// The tenant reference the vendor stores.
        tenant_ref: String,
    },
    /// Blocked; whatever tenant the lock has stays on it.
    Overlocked,
}

impl fmt::Display for LockTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockTarget::Unassigned => f.write_str("unassigned"),
            LockTarget::Assigned { tenant_ref } => write!(f, "assigned to {tenant_ref:?}"),
            LockTarget::Overlocked => f.write_str("overlocked"),
        }
    }
}

/// Retry, concurrency and health thresholds.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// Vendor calls in flight at once, across all locks.
    pub concurrency: usize,
    /// First retry delay; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// A command stops retrying when the next wait would end later than this after it
    /// started, and returns the last error.
    pub give_up_after: Duration,
    /// Consecutive failed calls (transient or garbled) after which the API is offline.
    pub offline_after: u32,
    /// Longest `Retry-After` honoured as given (a vendor asking for hours is capped).
    pub max_retry_after: Duration,
    /// Commands waiting in the handle's channel.
    pub queue: usize,
}

impl Default for DriverSettings {
    fn default() -> Self {
        DriverSettings {
            concurrency: 4,
            backoff_base: Duration::from_millis(250),
            // Short, so a lock converges within 2 s of the vendor's recovery; with one
            // command in flight per reconciler that is about one call a second while down.
            backoff_max: Duration::from_millis(1600),
            give_up_after: Duration::from_secs(60),
            offline_after: 3,
            max_retry_after: Duration::from_secs(300),
            queue: 256,
        }
    }
}

impl DriverSettings {
    /// The wait before retry `attempt` (0-based) after `e`: `Retry-After` when the vendor
    /// gave one (at least that, for 5xx), else capped exponential backoff with jitter.
    pub fn retry_delay(&self, e: &LockError, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(self.backoff_max);
        // "Equal jitter": at least half the step, so delays still grow, spread so retries
        // from many locks do not arrive together.
        let half = exp / 2;
        let backoff = half + jitter(half);
        match e.retry_after().map(|d| d.min(self.max_retry_after)) {
            Some(ra) if e.is_rate_limited() => {
                ra + jitter((ra / 10).min(Duration::from_millis(500)))
            }
            Some(ra) => ra.max(backoff),
            None => backoff,
        }
    }
}

/// A random duration in `0..=max`.
fn jitter(max: Duration) -> Duration {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand::random_range(0..=ms))
}

/// How the lock API is doing, as the driver last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LockApiHealth {
    /// Whether calls get answers. `false` until the first answer, after
    /// [`DriverSettings::offline_after`] consecutive failures, and after an auth refusal.
    pub online: bool,
    /// The latest failure (kept after recovery, for `GET /v1/devices`' `last_error`).
    pub last_error: Option<String>,
    /// Failed calls since the last answer.
    pub consecutive_failures: u32,
}

/// Why a command did not bring its lock where asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The vendor's last answer (retries, if any, exhausted).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A newer command for the same lock replaced this one.
    #[error("superseded by a newer command for lock {lock:?}")]
    Superseded {
        /// The lock.
        lock: String,
    },
    /// The driver stopped (shutdown) before the command finished.
    #[error("lock driver stopped")]
    Stopped,
    /// The job running the command panicked (a bug).
    #[error("lock driver job failed: {0}")]
    Crashed(String),
}

type Reply<T> = oneshot::Sender<Result<T, CommandError>>;

enum Request {
    BringTo {
        lock: String,
        target: LockTarget,
        reply: Reply<LockState>,
    },
    Read {
        lock: String,
        reply: Reply<LockState>,
    },
    ReadAll {
        reply: Reply<Vec<LockState>>,
    },
}

/// The cheap, cloneable side a reconciler holds.
#[derive(Clone)]
pub struct LockHandle {
    id: Arc<str>,
    tx: mpsc::Sender<Request>,
    health: watch::Receiver<LockApiHealth>,
}

impl fmt::Debug for LockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockHandle").field("id", &self.id).finish()
    }
}

impl LockHandle {
    /// The lock API's device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Brings `lock` to `target` from wherever it is, and returns the lock as the vendor
    /// last reported it.
    pub async fn bring_to(
        &self,
        lock: &str,
        target: LockTarget,
    ) -> Result<LockState, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::BringTo {
            lock: lock.to_owned(),
            target,
            reply,
        })
        .await?;
        rx.await.unwrap_or(Err(CommandError::Stopped))
    }

    /// Reads one lock back (retried like a command).
    pub async fn read(&self, lock: &str) -> Result<LockState, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Read {
            lock: lock.to_owned(),
            reply,
        })
        .await?;
        rx.await.unwrap_or(Err(CommandError::Stopped))
    }

    /// Reads every lock the API key sees (retried like a command).
    pub async fn read_all(&self) -> Result<Vec<LockState>, CommandError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::ReadAll { reply }).await?;
        rx.await.unwrap_or(Err(CommandError::Stopped))
    }

    /// The API's health; `changed()` wakes on every change.
    pub fn health(&self) -> watch::Receiver<LockApiHealth> {
        self.health.clone()
    }

    async fn send(&self, r: Request) -> Result<(), CommandError> {
        self.tx.send(r).await.map_err(|_| CommandError::Stopped)
    }
}

/// State the driver task and its jobs share.
struct Shared<P> {
    id: Arc<str>,
    provider: P,
    settings: DriverSettings,
    permits: Semaphore,
    /// Set by a 429: no call starts before this.
    paused_until: Mutex<Option<Instant>>,
    health: watch::Sender<LockApiHealth>,
}

impl<P: LockProvider> Shared<P> {
    fn pause(&self) -> Option<Instant> {
        let p = *self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        p.filter(|t| *t > Instant::now())
    }

    /// Runs one vendor call: after any rate-limit pause, within the concurrency bound,
    /// recording the outcome in the health. A 429 means the call was not applied: it pauses
    /// every call until `Retry-After` and is sent again, unless that would pass `deadline`.
    async fn guarded<T, F, Fut>(&self, deadline: Instant, mut call: F) -> Result<T, LockError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, LockError>>,
    {
        let mut limited = 0u32;
        loop {
            let permit = loop {
                if let Some(t) = self.pause() {
                    tokio::time::sleep_until(t).await;
                }
                // The semaphore is never closed; if it were, running unbounded beats hanging.
                let permit = self.permits.acquire().await.ok();
                if self.pause().is_none() {
                    break permit;
                }
            };
            let r = call().await;
            drop(permit);
            self.record(&r);
            match r {
                Err(e) if e.is_rate_limited() => {
                    let wait = self.settings.retry_delay(&e, limited);
                    limited = limited.saturating_add(1);
                    let until = Instant::now() + wait;
                    {
                        let mut p = self
                            .paused_until
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        if p.is_none_or(|t| t < until) {
                            *p = Some(until);
                        }
                    }
                    if until > deadline {
                        return Err(e);
                    }
                    tracing::debug!(device = %self.id, wait_ms = wait.as_millis() as u64, "lock API: rate limited, pausing");
                }
                r => return r,
            }
        }
    }

    fn record<T>(&self, r: &Result<T, LockError>) {
        let id = &self.id;
        let offline_after = self.settings.offline_after;
        self.health.send_if_modified(|h| {
            let before = h.clone();
            match r {
                // Refusals and unknown locks are answers too: the API is up.
                Ok(_) | Err(LockError::Refused { .. } | LockError::NotFound { .. }) => {
                    h.online = true;
                    h.consecutive_failures = 0;
                }
                Err(e @ LockError::Auth { .. }) => {
                    h.online = false;
                    h.last_error = Some(format!(
                        "{e}; check devices.lock_api.api_key_file or {} (not retried)",
                        super::reference::API_KEY_ENV
                    ));
                }
                // The vendor is up but wants us slower: not an outage.
                Err(e) if e.is_rate_limited() => h.last_error = Some(e.to_string()),
                Err(e) => {
                    h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                    h.last_error = Some(e.to_string());
                    if h.consecutive_failures >= offline_after {
                        h.online = false;
                    }
                }
            }
            if before.online != h.online {
                match (&h.online, &h.last_error) {
                    (true, _) => tracing::info!(device = %id, "lock API online"),
                    (false, e) => {
                        tracing::warn!(device = %id, error = e.as_deref().unwrap_or(""), "lock API offline")
                    }
                }
            }
            *h != before
        });
    }

    async fn step(
        &self,
        deadline: Instant,
        lock: &str,
        step: &LockStep,
    ) -> Result<LockState, LockError> {
        let p = &self.provider;
        match step {
            LockStep::Assign(t) => self.guarded(deadline, || p.assign(lock, t)).await,
            LockStep::Unassign => self.guarded(deadline, || p.unassign(lock)).await,
            LockStep::Overlock => self.guarded(deadline, || p.overlock(lock)).await,
            LockStep::RemoveOverlock => self.guarded(deadline, || p.remove_overlock(lock)).await,
        }
    }

    /// One attempt: read the lock, then make the planned calls on the states they return.
    async fn converge(
        &self,
        deadline: Instant,
        lock: &str,
        target: &LockTarget,
    ) -> Result<LockState, LockError> {
        let mut current = self.guarded(deadline, || self.provider.get(lock)).await?;
        let mut lifted = None;
        let r = self
            .steps(deadline, lock, target, &mut current, &mut lifted)
            .await;
        if let Err(e) = &r
            && let Some(tenant) = &lifted
        {
            self.fail_closed(lock, &current, target, tenant, e).await;
        }
        r
    }

    async fn steps(
        &self,
        deadline: Instant,
        lock: &str,
        target: &LockTarget,
        current: &mut LockState,
        lifted: &mut Option<String>,
    ) -> Result<LockState, LockError> {
        let mut refused_once = false;
        for _ in 0..MAX_STEPS {
            let Some(step) = plan(current, target) else {
                return Ok(current.clone());
            };
            // The tenant a lift would let in (set before the call: its reply may be lost).
            if step == LockStep::RemoveOverlock && current.assigned_to.is_some() {
                lifted.clone_from(&current.assigned_to);
            }
            match self.step(deadline, lock, &step).await {
                Ok(next) => {
                    *current = next;
                }
                // Someone changed the lock since we read it: read again and replan, once.
                Err(LockError::Refused { .. }) if !refused_once => {
                    refused_once = true;
                    *current = self.guarded(deadline, || self.provider.get(lock)).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(LockError::Refused {
            status: 409,
            code: "no_progress".into(),
            message: format!(
                "lock {lock:?} not {target} after {MAX_STEPS} calls; last seen {:?} assigned to {:?}",
                current.state, current.assigned_to
            ),
        })
    }

    /// After lifting (or trying to lift) the overlock of a lock held by `tenant`, a failed
    /// call may leave the lock open to that tenant until a retry succeeds: put the overlock
    /// back (best effort; idempotent if the lift never happened).
    async fn fail_closed(
        &self,
        lock: &str,
        last: &LockState,
        target: &LockTarget,
        tenant: &str,
        e: &LockError,
    ) {
        let wanted = matches!(target, LockTarget::Assigned { tenant_ref } if tenant_ref == tenant);
        let maybe_open = match last.state {
            // The lift's reply was lost: it may have been applied.
            LockStatus::Overlocked => true,
            LockStatus::Assigned => last.assigned_to.as_deref() == Some(tenant),
            LockStatus::Unassigned => false,
        };
        if wanted || !maybe_open {
            return;
        }
        // Its own short deadline: this runs when the command's may be spent.
        let deadline = Instant::now() + RESTORE_OVERLOCK_WITHIN;
        match self
            .guarded(deadline, || self.provider.overlock(lock))
            .await
        {
            Ok(_) => {
                tracing::warn!(device = %self.id, lock, error = %e, "command failed after lifting the overlock: overlocked again")
            }
            Err(e2) => {
                tracing::error!(device = %self.id, lock, error = %e, overlock_error = %e2, "command failed after lifting the overlock and the overlock could not be put back: the previous tenant may open this lock until a retry succeeds")
            }
        }
    }

    /// Runs `op` until it succeeds, fails for good, or the next wait would pass
    /// `give_up_after`.
    async fn with_retries<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, LockError>
    where
        F: FnMut(Instant) -> Fut,
        Fut: Future<Output = Result<T, LockError>>,
    {
        let started = Instant::now();
        let deadline = started + self.settings.give_up_after;
        let mut attempt = 0u32;
        loop {
            let e = match op(deadline).await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !e.is_retryable() {
                return Err(e);
            }
            let wait = self.settings.retry_delay(&e, attempt);
            if started.elapsed() + wait > self.settings.give_up_after {
                tracing::warn!(device = %self.id, what, error = %e, attempts = attempt + 1, "lock API: giving up for now");
                return Err(e);
            }
            tracing::debug!(device = %self.id, what, error = %e, wait_ms = wait.as_millis() as u64, "lock API: retrying");
            tokio::time::sleep(wait).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

enum Done {
    One(Result<LockState, LockError>),
    Many(Result<Vec<LockState>, LockError>),
}

enum Waiter {
    Command {
        lock: String,
        target: LockTarget,
        replies: Vec<Reply<LockState>>,
    },
    Read(Reply<LockState>),
    ReadAll(Reply<Vec<LockState>>),
    Probe,
}

/// The task owning one lock API's provider. Start it with [`LockDriver::run`].
pub struct LockDriver<P> {
    shared: Arc<Shared<P>>,
    rx: mpsc::Receiver<Request>,
}

impl<P: LockProvider> LockDriver<P> {
    /// A driver for the lock API `id` and the handle to drive it with.
    pub fn new(id: &str, provider: P, settings: DriverSettings) -> (LockDriver<P>, LockHandle) {
        let id: Arc<str> = Arc::from(id);
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let (health, health_rx) = watch::channel(LockApiHealth::default());
        let shared = Arc::new(Shared {
            id: id.clone(),
            provider,
            permits: Semaphore::new(settings.concurrency.max(1)),
            settings,
            paused_until: Mutex::new(None),
            health,
        });
        (
            LockDriver { shared, rx },
            LockHandle {
                id,
                tx,
                health: health_rx,
            },
        )
    }

    /// Serves commands until `shutdown` turns true (or every handle is gone); running jobs
    /// are then cancelled and their callers get [`CommandError::Stopped`].
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut jobs: JoinSet<Done> = JoinSet::new();
        let mut waiters: HashMap<tokio::task::Id, Waiter> = HashMap::new();
        let mut by_lock: HashMap<String, AbortHandle> = HashMap::new();

        // One call at start so the health says something before the first command.
        let s = self.shared.clone();
        let probe = jobs.spawn(
            async move {
                let deadline = Instant::now() + s.settings.give_up_after;
                Done::Many(s.guarded(deadline, || s.provider.list()).await)
            }
            .in_current_span(),
        );
        waiters.insert(probe.id(), Waiter::Probe);

        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                r = self.rx.recv() => match r {
                    Some(r) => self.accept(r, &mut jobs, &mut waiters, &mut by_lock),
                    None => break,
                },
                Some(done) = jobs.join_next_with_id() => {
                    let (id, done) = match done {
                        Ok((id, d)) => (id, Ok(d)),
                        Err(e) => (e.id(), Err(e)),
                    };
                    let Some(w) = waiters.remove(&id) else { continue };
                    if let Waiter::Command { lock, .. } = &w
                        && by_lock.get(lock).is_some_and(|h| h.id() == id)
                    {
                        by_lock.remove(lock);
                    }
                    finish(w, done);
                }
            }
        }
        jobs.shutdown().await;
    }

    fn accept(
        &self,
        r: Request,
        jobs: &mut JoinSet<Done>,
        waiters: &mut HashMap<tokio::task::Id, Waiter>,
        by_lock: &mut HashMap<String, AbortHandle>,
    ) {
        let s = self.shared.clone();
        match r {
            Request::BringTo {
                lock,
                target,
                reply,
            } => {
                if let Some(running) = by_lock.get(&lock) {
                    match waiters.get_mut(&running.id()) {
                        Some(Waiter::Command {
                            target: t, replies, ..
                        }) if *t == target => {
                            replies.push(reply);
                            return;
                        }
                        _ => {
                            running.abort();
                            if let Some(Waiter::Command { replies, .. }) =
                                waiters.remove(&running.id())
                            {
                                for r in replies {
                                    let _ = r
                                        .send(Err(CommandError::Superseded { lock: lock.clone() }));
                                }
                            }
                        }
                    }
                }
                let (l, t) = (lock.clone(), target.clone());
                let h = jobs.spawn(
                    async move {
                        let what = format!("bring {l} to {t}");
                        Done::One(s.with_retries(&what, |d| s.converge(d, &l, &t)).await)
                    }
                    .in_current_span(),
                );
                waiters.insert(
                    h.id(),
                    Waiter::Command {
                        lock: lock.clone(),
                        target,
                        replies: vec![reply],
                    },
                );
                by_lock.insert(lock, h);
            }
            Request::Read { lock, reply } => {
                let h = jobs.spawn(
                    async move {
                        let what = format!("read {lock}");
                        Done::One(
                            s.with_retries(&what, |d| s.guarded(d, || s.provider.get(&lock)))
                                .await,
                        )
                    }
                    .in_current_span(),
                );
                waiters.insert(h.id(), Waiter::Read(reply));
            }
            Request::ReadAll { reply } => {
                let h = jobs.spawn(
                    async move {
                        Done::Many(
                            s.with_retries("list", |d| s.guarded(d, || s.provider.list()))
                                .await,
                        )
                    }
                    .in_current_span(),
                );
                waiters.insert(h.id(), Waiter::ReadAll(reply));
            }
        }
    }
}

/// Hands a finished job's outcome to whoever waits for it.
fn finish(w: Waiter, done: Result<Done, tokio::task::JoinError>) {
    let crashed = |e: &tokio::task::JoinError| {
        if e.is_cancelled() {
            CommandError::Stopped
        } else {
            CommandError::Crashed(e.to_string())
        }
    };
    match (w, done) {
        (Waiter::Command { replies, .. }, Ok(Done::One(r))) => {
            for reply in replies {
                let _ = reply.send(r.clone().map_err(CommandError::from));
            }
        }
        (Waiter::Read(reply), Ok(Done::One(r))) => {
            let _ = reply.send(r.map_err(CommandError::from));
        }
        (Waiter::ReadAll(reply), Ok(Done::Many(r))) => {
            let _ = reply.send(r.map_err(CommandError::from));
        }
        (Waiter::Probe, _) => {}
        (Waiter::Command { replies, .. }, Err(e)) => {
            for reply in replies {
                let _ = reply.send(Err(crashed(&e)));
            }
        }
        (Waiter::Read(reply), Err(e)) => {
            let _ = reply.send(Err(crashed(&e)));
        }
        (Waiter::ReadAll(reply), Err(e)) => {
            let _ = reply.send(Err(crashed(&e)));
        }
        // A job answers the kind it was spawned for; anything else is a bug here.
        (Waiter::Command { replies, .. }, Ok(Done::Many(_))) => {
            for reply in replies {
                let _ = reply.send(Err(CommandError::Crashed("mismatched job".into())));
            }
        }
        (Waiter::Read(reply), Ok(Done::Many(_))) => {
            let _ = reply.send(Err(CommandError::Crashed("mismatched job".into())));
        }
        (Waiter::ReadAll(reply), Ok(Done::One(_))) => {
            let _ = reply.send(Err(CommandError::Crashed("mismatched job".into())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(status: Option<u16>, retry_after: Option<u64>) -> LockError {
        LockError::Transient {
            reason: "x".into(),
            status,
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    /// A vendor in memory with hw-sim's semantics, whose `unassign` is down.
    #[derive(Default)]
    struct UnassignDown {
        locks: Mutex<HashMap<String, LockState>>,
        calls: Mutex<Vec<&'static str>>,
        /// `remove_overlock` is applied but its reply is lost.
        lose_lift_reply: bool,
    }

    impl UnassignDown {
        fn change(
            &self,
            id: &str,
            call: &'static str,
            f: impl FnOnce(&mut LockState),
        ) -> Result<LockState, LockError> {
            self.calls.lock().expect("calls").push(call);
            let mut m = self.locks.lock().expect("locks");
            let l = m.get_mut(id).ok_or(LockError::NotFound {
                code: "lock_not_found".into(),
                message: id.into(),
            })?;
            f(l);
            Ok(l.clone())
        }
    }

    impl LockProvider for UnassignDown {
        async fn list(&self) -> Result<Vec<LockState>, LockError> {
            Ok(self
                .locks
                .lock()
                .expect("locks")
                .values()
                .cloned()
                .collect())
        }
        async fn get(&self, id: &str) -> Result<LockState, LockError> {
            self.change(id, "get", |_| {})
        }
        async fn assign(&self, id: &str, t: &str) -> Result<LockState, LockError> {
            self.change(id, "assign", |l| {
                l.state = LockStatus::Assigned;
                l.assigned_to = Some(t.into());
            })
        }
        async fn unassign(&self, _id: &str) -> Result<LockState, LockError> {
            self.calls.lock().expect("calls").push("unassign");
            Err(LockError::Transient {
                reason: "503".into(),
                status: Some(503),
                retry_after: None,
            })
        }
        async fn overlock(&self, id: &str) -> Result<LockState, LockError> {
            self.change(id, "overlock", |l| l.state = LockStatus::Overlocked)
        }
        async fn remove_overlock(&self, id: &str) -> Result<LockState, LockError> {
            let r = self.change(id, "remove_overlock", |l| {
                l.state = if l.assigned_to.is_some() {
                    LockStatus::Assigned
                } else {
                    LockStatus::Unassigned
                }
            });
            if self.lose_lift_reply {
                return Err(LockError::Transient {
                    reason: "connection closed before the answer".into(),
                    status: None,
                    retry_after: None,
                });
            }
            r
        }
    }

    #[tokio::test]
    async fn a_failed_unassign_after_lifting_the_overlock_puts_it_back() {
        fail_closed_case(false, &["get", "remove_overlock", "unassign", "overlock"]).await;
    }

    #[tokio::test]
    async fn a_lost_lift_reply_puts_the_overlock_back() {
        fail_closed_case(true, &["get", "remove_overlock", "overlock", "get"]).await;
    }

    async fn fail_closed_case(lose_lift_reply: bool, first_calls: &[&str]) {
        let vendor = UnassignDown {
            lose_lift_reply,
            ..Default::default()
        };
        let over = LockState {
            id: "u1".into(),
            state: LockStatus::Overlocked,
            assigned_to: Some("t1".into()),
        };
        vendor
            .locks
            .lock()
            .expect("locks")
            .insert("u1".into(), over.clone());
        let settings = DriverSettings {
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(20),
            give_up_after: Duration::from_millis(100),
            ..Default::default()
        };
        let (driver, h) = LockDriver::new("fake", vendor, settings);
        let shared = driver.shared.clone();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(driver.run(shutdown));
        let r = h.bring_to("u1", LockTarget::Unassigned).await;
        assert!(
            matches!(r, Err(CommandError::Lock(LockError::Transient { .. }))),
            "{r:?}"
        );
        let now = shared.provider.locks.lock().expect("locks")["u1"].clone();
        assert_eq!(now, over, "fail closed: overlocked again, never left open");
        let calls = shared.provider.calls.lock().expect("calls").clone();
        let first: Vec<&str> = calls
            .iter()
            .copied()
            .skip_while(|c| *c != "get")
            .take(4)
            .collect();
        assert_eq!(first, first_calls);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let s = DriverSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..Default::default()
        };
        let e = transient(None, None);
        for _ in 0..100 {
            let d0 = s.retry_delay(&e, 0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d3 = s.retry_delay(&e, 3);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let d30 = s.retry_delay(&e, 30);
            assert!(d30 >= Duration::from_secs(1) && d30 <= Duration::from_secs(2));
        }
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let s = DriverSettings {
            max_retry_after: Duration::from_secs(60),
            ..Default::default()
        };
        for _ in 0..100 {
            let d = s.retry_delay(&transient(Some(429), Some(2)), 0);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_millis(2200));
            let d = s.retry_delay(&transient(Some(429), Some(100_000)), 0);
            assert!(d >= Duration::from_secs(60) && d <= Duration::from_millis(60_500));
            let d = s.retry_delay(&transient(Some(503), Some(1)), 0);
            assert!(d >= Duration::from_secs(1));
        }
    }
}
