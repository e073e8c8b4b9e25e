//! The automation scheduler (DESIGN.md §2): auto move-in at `auto_occupy_at` site-local
//! time on the start date, auto deallocate once the end date has passed.
//!
//! On start it catches up on everything that fell due while the gateway was down; then it
//! sleeps until the next due instant, at most a minute (the wall clock may jump: boxes
//! without an RTC set it by NTP after boot), or until a command commits (a new reservation
//! may be due sooner) or someone kicks it. Time is the executor's clock, so tests control
//! it. Each transition is a command of its own that re-checks the state in its
//! transaction: running one twice changes nothing.

use crate::command::automation::{AutomationResult, Due};
use crate::command::{Command, Envelope, Executor};
use crate::domain::schedule::{deallocate_at, move_in_at, next_due};
use crate::store::{StoreError, people, site};
use chrono::{DateTime, Utc};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long the scheduler sleeps at most before it looks again.
pub const RECHECK: Duration = Duration::from_secs(60);

/// How long the scheduler lets commits settle before it looks at what they changed.
const SETTLE: Duration = Duration::from_millis(200);

/// Errors of the scheduler's handle.
#[derive(Debug, thiserror::Error)]
pub enum AutomationError {
    /// The scheduler has stopped (the gateway is shutting down).
    #[error("the automation scheduler has stopped")]
    Stopped,
}

/// A cheap handle to the scheduler: ask it to look now.
#[derive(Debug, Clone)]
pub struct AutomationHandle {
    kick: Arc<Notify>,
    requested: Arc<AtomicU64>,
    done: watch::Receiver<u64>,
}

impl AutomationHandle {
    /// Asks for a pass now (the clock was set, SIGHUP), without waiting for it.
    pub fn kick(&self) {
        self.requested.fetch_add(1, Ordering::SeqCst);
        self.kick.notify_one();
    }

    /// Asks for a pass and waits until one that started after this call has finished.
    pub async fn run_now(&self) -> Result<(), AutomationError> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        self.kick.notify_one();
        let mut done = self.done.clone();
        done.wait_for(|d| *d >= ticket)
            .await
            .map(|_| ())
            .map_err(|_| AutomationError::Stopped)
    }
}

/// One automatic transition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Job {
    MoveIn(Due),
    Deallocate(Due),
}

/// The scheduler task.
pub struct Scheduler {
    executor: Executor,
    committed: Arc<Notify>,
    kick: Arc<Notify>,
    requested: Arc<AtomicU64>,
    done: watch::Sender<u64>,
}

impl Scheduler {
    /// A scheduler running transitions through `executor`; `committed` is the executor's
    /// commit notify (see [`Executor::with_commit_notify`]).
    pub fn new(executor: Executor, committed: Arc<Notify>) -> (Scheduler, AutomationHandle) {
        let kick = Arc::new(Notify::new());
        let requested = Arc::new(AtomicU64::new(0));
        let (done, done_rx) = watch::channel(0);
        let handle = AutomationHandle {
            kick: kick.clone(),
            requested: requested.clone(),
            done: done_rx,
        };
        let scheduler = Scheduler {
            executor,
            committed,
            kick,
            requested,
            done,
        };
        (scheduler, handle)
    }

    /// Catches up, then runs transitions as they fall due until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Transitions found due that their command refused (the state changed in between,
        // or the data is inconsistent): not retried until the next timed or kicked pass, so
        // a refusal cannot spin the loop.
        let mut refused: HashSet<Job> = HashSet::new();
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Registered before the pass, so a commit during it still wakes the next wait
            // (`notify_waiters` keeps no permit).
            let committed = self.committed.notified();
            tokio::pin!(committed);
            committed.as_mut().enable();
            let serving = self.requested.load(Ordering::SeqCst);
            let next = match self.pass(&mut refused).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "automations: cannot read the replica");
                    None
                }
            };
            self.done.send_modify(|d| *d = (*d).max(serving));
            // A due instant that passed while the pass ran means: look again at once.
            let wait = next.map_or(RECHECK, |t| {
                (t - self.executor.now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(RECHECK)
            });
            tracing::trace!(?next, ?wait, "automations: waiting");
            tokio::select! {
                _ = tokio::time::sleep(wait) => refused.clear(),
                _ = self.kick.notified() => refused.clear(),
                _ = &mut committed => {
                    // Commits come in bursts (a snapshot, a busy API): look once after it.
                    tokio::select! {
                        _ = tokio::time::sleep(SETTLE) => {}
                        _ = self.kick.notified() => refused.clear(),
                        r = shutdown.changed() => if r.is_err() { return; },
                    }
                }
                r = shutdown.changed() => if r.is_err() { return; },
            }
        }
    }

    /// Runs every transition due now; returns the next instant one falls due.
    async fn pass(&self, refused: &mut HashSet<Job>) -> Result<Option<DateTime<Utc>>, StoreError> {
        let now = self.executor.now();
        let tz = self.executor.tz();
        let today = now.with_timezone(&tz).date_naive();
        let (settings, reservations, ending) = self
            .executor
            .store()
            .read(|c| -> Result<_, StoreError> {
                Ok((
                    site::automations(c)?,
                    people::reservations(c)?,
                    people::ending_allocations(c)?,
                ))
            })
            .await?;
        let mut due = Vec::new();
        let mut later = Vec::new();
        let due_of = |a: &people::DatedAllocation| Due {
            unit_id: a.unit_id.clone(),
            tenancy_id: a.tenancy_id.clone(),
        };
        if settings.auto_deallocate {
            for a in &ending {
                if let Some(end) = a.end_date {
                    let at = deallocate_at(end, tz);
                    if at <= now {
                        due.push(Job::Deallocate(due_of(a)));
                    } else {
                        later.push(at);
                    }
                }
            }
        }
        if settings.auto_occupy {
            for a in &reservations {
                // grant_access refuses a tenancy that has ended; auto deallocate frees its units.
                if a.end_date.is_some_and(|end| end < today) {
                    continue;
                }
                let at = move_in_at(a.start_date, settings.auto_occupy_at, tz);
                if at <= now {
                    due.push(Job::MoveIn(due_of(a)));
                } else {
                    later.push(at);
                }
            }
        }
        refused.retain(|j| due.contains(j));
        for job in due {
            if !refused.contains(&job) && !self.execute(&job).await {
                refused.insert(job);
            }
        }
        Ok(next_due(now, later))
    }

    /// Runs one transition as a command; false when it changed nothing.
    async fn execute(&self, job: &Job) -> bool {
        let (command, due) = match job {
            Job::MoveIn(d) => (Command::AutoMoveIn(d.clone()), d),
            Job::Deallocate(d) => (Command::AutoDeallocate(d.clone()), d),
        };
        let op = command.name();
        let reply = self
            .executor
            .execute(Envelope {
                command,
                idempotency_key: None,
                fingerprint: [0; 32],
                if_match: None,
                request_id: format!("automation-{}", uuid::Uuid::new_v4().simple()),
            })
            .await;
        let result = (reply.status == 200)
            .then(|| serde_json::from_slice::<AutomationResult>(&reply.body).ok())
            .flatten();
        match result {
            Some(AutomationResult { applied: true, .. }) => {
                tracing::info!(op, unit_id = %due.unit_id, tenancy_id = %due.tenancy_id, "automation ran");
                true
            }
            Some(AutomationResult { reason, .. }) => {
                tracing::debug!(op, unit_id = %due.unit_id, tenancy_id = %due.tenancy_id, ?reason, "automation no longer applies");
                false
            }
            None => {
                tracing::warn!(
                    op,
                    unit_id = %due.unit_id,
                    status = reply.status,
                    body = %String::from_utf8_lossy(&reply.body),
                    "automation failed; retried on the next check"
                );
                false
            }
        }
    }
}
