//! Smart locks (DESIGN.md §4): a vendor's cloud API behind [`LockProvider`], so more
//! vendors plug in, and a [`LockDriver`] task per lock API that a reconciler drives
//! through a [`LockHandle`].
//!
//! # Layout
//!
//! - this file: the vendor-neutral vocabulary: [`LockState`], [`LockError`], [`LockProvider`],
//!   and [`plan`], the pure step planner (which vendor call brings a lock closer to a target).
//! - [`reference`](mod@reference): [`ReferenceProvider`], the reference vendor API (the one hw-sim serves).
//! - [`driver`]: [`LockDriver`] / [`LockHandle`]: sequencing, retries, Retry-After, health.
//!
//! # The overlock window
//!
//! Vendors refuse to unassign an overlocked lock (409 `lock_overlocked`): the overlock must
//! be lifted on purpose first. So bringing an overlocked lock to `unassigned` (or to another
//! tenant) is `remove_overlock` then `unassign`, and between the two answers the lock is
//! `assigned` to its previous tenant: for about one round trip that tenant's code would
//! open it. No vendor call order avoids this. The driver keeps the window as short as it can
//! (the second call follows at once, on the state the first returned) and, if the second
//! call fails, puts the overlock back before reporting the failure (fail closed), so a
//! retry later starts again from `overlocked`, not from an open lock.

pub mod driver;
pub mod reference;

pub use driver::{CommandError, DriverSettings, LockApiHealth, LockDriver, LockHandle, LockTarget};
pub use reference::{ApiKey, ReferenceProvider, SetupError};

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// Where a lock stands, as the vendor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockStatus {
    /// No tenant; nobody's code opens it.
    Unassigned,
    /// A tenant's code opens it.
    Assigned,
    /// Blocked by the site; keeps its tenant, if any.
    Overlocked,
}

/// One lock as the vendor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockState {
    /// The vendor's lock id.
    pub id: String,
    /// Unassigned, assigned or overlocked.
    pub state: LockStatus,
    /// The tenant reference while assigned (kept while overlocked).
    pub assigned_to: Option<String>,
}

/// Why a vendor call failed, sorted by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Timeout, connection failure, 5xx or 429: retry later (after `retry_after` if given).
    #[error("lock API unavailable: {reason}")]
    Transient {
        /// What happened, e.g. `timed out after 5000 ms` or `503 service_unavailable: ...`.
        reason: String,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// The vendor's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// 401/403: the API key is wrong or lacks rights. A configuration problem: retrying
    /// changes nothing, so do not hammer the vendor.
    #[error("lock API refused the API key ({status}): {message}")]
    Auth {
        /// 401 or 403.
        status: u16,
        /// The vendor's message.
        message: String,
    },
    /// The vendor refuses the command as it stands (409 and other 4xx): it cannot succeed
    /// without something changing first.
    #[error("lock API refused ({status} {code}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The vendor's error code, e.g. `lock_overlocked`, `already_assigned`.
        code: String,
        /// The vendor's message.
        message: String,
    },
    /// 404: no such lock (or, with code `not_found`, no such route: check the URL).
    #[error("lock API: not found ({code}): {message}")]
    NotFound {
        /// The vendor's error code, e.g. `lock_not_found`.
        code: String,
        /// The vendor's message.
        message: String,
    },
    /// The answer could not be understood (garbled body, wrong shape, redirect).
    #[error("lock API answered something unreadable ({status}): {reason}")]
    BadAnswer {
        /// HTTP status of the answer.
        status: u16,
        /// What was wrong with it.
        reason: String,
    },
}

impl LockError {
    /// Whether the same call may succeed later unchanged: transient failures and garbled
    /// answers (a garbled answer may hide an applied change, so read back before retrying).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LockError::Transient { .. } | LockError::BadAnswer { .. }
        )
    }

    /// The vendor's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LockError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the vendor rate-limited the API key (429).
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            LockError::Transient {
                status: Some(429),
                ..
            }
        )
    }
}

/// A smart-lock vendor's API. Every change answers the lock as it is afterwards; repeating
/// a change already in effect must succeed (vendors are expected to be idempotent).
///
/// The futures borrow their arguments and must be `Send`, so a driver can run them on
/// any worker thread.
pub trait LockProvider: Send + Sync + 'static {
    /// Every lock the API key can see.
    fn list(&self) -> impl Future<Output = Result<Vec<LockState>, LockError>> + Send;
    /// One lock.
    fn get(&self, id: &str) -> impl Future<Output = Result<LockState, LockError>> + Send;
    /// Gives the lock to a tenant.
    fn assign(
        &self,
        id: &str,
        tenant_ref: &str,
    ) -> impl Future<Output = Result<LockState, LockError>> + Send;
    /// Takes the lock from its tenant (vendors refuse while overlocked).
    fn unassign(&self, id: &str) -> impl Future<Output = Result<LockState, LockError>> + Send;
    /// Blocks the lock; the tenant stays on it.
    fn overlock(&self, id: &str) -> impl Future<Output = Result<LockState, LockError>> + Send;
    /// Lifts the overlock: back to assigned if the lock has a tenant, else unassigned.
    fn remove_overlock(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<LockState, LockError>> + Send;
}

/// One vendor call that changes a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockStep {
    /// `assign(tenant_ref)`.
    Assign(String),
    /// `unassign`.
    Unassign,
    /// `overlock`.
    Overlock,
    /// `remove_overlock`.
    RemoveOverlock,
}

/// The next vendor call that brings `current` closer to `target`; `None` when it is there.
/// Overlocking keeps whatever tenant the lock has (vendors keep it, and it comes back on
/// `remove_overlock`); a lock held by another tenant is unassigned before it is assigned.
pub fn plan(current: &LockState, target: &LockTarget) -> Option<LockStep> {
    use LockStatus::*;
    match (target, current.state) {
        (LockTarget::Overlocked, Overlocked) => None,
        (LockTarget::Overlocked, _) => Some(LockStep::Overlock),
        (_, Overlocked) => Some(LockStep::RemoveOverlock),
        (LockTarget::Unassigned, Unassigned) => None,
        (LockTarget::Unassigned, Assigned) => Some(LockStep::Unassign),
        (LockTarget::Assigned { tenant_ref }, Unassigned) => {
            Some(LockStep::Assign(tenant_ref.clone()))
        }
        (LockTarget::Assigned { tenant_ref }, Assigned) => {
            if current.assigned_to.as_deref() == Some(tenant_ref.as_str()) {
                None
            } else {
                Some(LockStep::Unassign)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(state: LockStatus, to: Option<&str>) -> LockState {
        LockState {
            id: "u1".into(),
            state,
            assigned_to: to.map(Into::into),
        }
    }

    /// Applies the vendor semantics of hw-sim (the reference API) to a step.
    fn apply(l: &LockState, step: &LockStep) -> LockState {
        let mut n = l.clone();
        match step {
            LockStep::Assign(t) => {
                assert_eq!(
                    l.state,
                    LockStatus::Unassigned,
                    "planner assigns only free locks"
                );
                n.state = LockStatus::Assigned;
                n.assigned_to = Some(t.clone());
            }
            LockStep::Unassign => {
                assert_ne!(l.state, LockStatus::Overlocked, "vendor refuses this");
                n.state = LockStatus::Unassigned;
                n.assigned_to = None;
            }
            LockStep::Overlock => n.state = LockStatus::Overlocked,
            LockStep::RemoveOverlock => {
                n.state = if l.assigned_to.is_some() {
                    LockStatus::Assigned
                } else {
                    LockStatus::Unassigned
                }
            }
        }
        n
    }

    #[test]
    fn every_start_reaches_every_target_in_at_most_three_steps() {
        let starts = [
            lock(LockStatus::Unassigned, None),
            lock(LockStatus::Assigned, Some("t1")),
            lock(LockStatus::Assigned, Some("t2")),
            lock(LockStatus::Overlocked, Some("t1")),
            lock(LockStatus::Overlocked, Some("t2")),
            lock(LockStatus::Overlocked, None),
        ];
        let targets = [
            LockTarget::Unassigned,
            LockTarget::Assigned {
                tenant_ref: "t1".into(),
            },
            LockTarget::Overlocked,
        ];
        for s in &starts {
            for t in &targets {
                let mut cur = s.clone();
                let mut steps = Vec::new();
                while let Some(step) = plan(&cur, t) {
                    cur = apply(&cur, &step);
                    steps.push(step);
                    assert!(steps.len() <= 3, "{s:?} -> {t:?}: {steps:?}");
                }
                match t {
                    LockTarget::Unassigned => {
                        assert_eq!(cur, lock(LockStatus::Unassigned, None))
                    }
                    LockTarget::Assigned { tenant_ref } => {
                        assert_eq!(cur, lock(LockStatus::Assigned, Some(tenant_ref)))
                    }
                    LockTarget::Overlocked => {
                        assert_eq!(cur.state, LockStatus::Overlocked);
                        assert_eq!(cur.assigned_to, s.assigned_to, "overlock keeps the tenant");
                    }
                }
            }
        }
    }

    #[test]
    fn overlocked_to_other_tenant_lifts_then_unassigns_then_assigns() {
        let t = LockTarget::Assigned {
            tenant_ref: "t2".into(),
        };
        let mut cur = lock(LockStatus::Overlocked, Some("t1"));
        let mut steps = Vec::new();
        while let Some(step) = plan(&cur, &t) {
            cur = apply(&cur, &step);
            steps.push(step);
        }
        assert_eq!(
            steps,
            [
                LockStep::RemoveOverlock,
                LockStep::Unassign,
                LockStep::Assign("t2".into())
            ]
        );
    }

    #[test]
    fn error_classes() {
        let t = LockError::Transient {
            reason: "x".into(),
            status: Some(429),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert!(t.is_retryable() && t.is_rate_limited());
        assert_eq!(t.retry_after(), Some(Duration::from_secs(2)));
        let bad = LockError::BadAnswer {
            status: 200,
            reason: "x".into(),
        };
        assert!(bad.is_retryable() && !bad.is_rate_limited());
        let auth = LockError::Auth {
            status: 401,
            message: "x".into(),
        };
        assert!(!auth.is_retryable());
    }
}
