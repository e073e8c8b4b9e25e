//! The durable per-device command queue. Each piece of hardware (a coil, a smart lock) has
//! one row: the state it should be in (`desired`) and the last state the device confirmed
//! (`applied`). A row is pending while they differ. Writing the desired state in the same
//! transaction as the change that causes it makes the queue exactly as durable as the
//! replica; superseded commands coalesce (assign then unassign before delivery leaves the
//! row at its applied state: nothing to send); rows are delivered per device in the order
//! they last changed, and each carries its own retry schedule.

use super::StoreError;
use crate::domain::desired::Target;
use crate::failpoint;
use rusqlite::{Connection, OptionalExtension, params};

/// A target waiting for delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Device id.
    pub device: String,
    /// Target key (`coil:3`, `lock:lock-A01`).
    pub key: String,
    /// What to bring it to.
    pub desired: Target,
    /// What the device last confirmed, if known.
    pub applied: Option<Target>,
    /// Delivery attempts so far.
    pub attempts: u32,
}

/// Sets a target's desired state. Returns whether the row is now pending.
pub fn set_desired(conn: &Connection, device: &str, target: &Target) -> Result<bool, StoreError> {
    failpoint::check(failpoint::OUTBOX_DESIRED_BEFORE)?;
    let key = target.key();
    let desired = serde_json::to_string(target)?;
    let row: Option<(String, Option<String>)> = conn
        .prepare_cached(
            "SELECT desired, applied FROM device_targets WHERE device = ?1 AND target = ?2",
        )?
        .query_row(params![device, key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        Some((old, applied)) if old == desired => Ok(applied.as_deref() != Some(desired.as_str())),
        Some((_, applied)) => {
            conn.prepare_cached(
                "UPDATE device_targets SET desired = ?3, attempts = 0, next_attempt_ms = 0, last_error = NULL,
                    seq = (SELECT COALESCE(MAX(seq), 0) + 1 FROM device_targets)
                 WHERE device = ?1 AND target = ?2",
            )?
            .execute(params![device, key, desired])?;
            Ok(applied.as_deref() != Some(desired.as_str()))
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO device_targets (device, target, desired, applied, seq)
                 VALUES (?1, ?2, ?3, NULL, (SELECT COALESCE(MAX(seq), 0) + 1 FROM device_targets))",
            )?
            .execute(params![device, key, desired])?;
            Ok(true)
        }
    }
}

fn decode(s: &str) -> Result<Target, StoreError> {
    Ok(serde_json::from_str(s)?)
}

/// Pending targets of a device whose retry time has come, oldest change first.
pub fn due(
    conn: &Connection,
    device: &str,
    now_ms: i64,
    limit: u32,
) -> Result<Vec<Pending>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT target, desired, applied, attempts FROM device_targets
         WHERE device = ?1 AND applied IS NOT desired AND next_attempt_ms <= ?2
         ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![device, now_ms, limit], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, u32>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (key, desired, applied, attempts) = row?;
        out.push(Pending {
            device: device.to_owned(),
            key,
            desired: decode(&desired)?,
            applied: applied.as_deref().map(decode).transpose()?,
            attempts,
        });
    }
    Ok(out)
}

/// Records that the device now holds `state` (after a delivery or a read-back). The row
/// stays pending if the desired state moved on meanwhile, or if the device drifted.
pub fn set_applied(conn: &Connection, device: &str, state: &Target) -> Result<(), StoreError> {
    let applied = serde_json::to_string(state)?;
    conn.prepare_cached(
        "UPDATE device_targets SET applied = ?3, attempts = 0, next_attempt_ms = 0, last_error = NULL
         WHERE device = ?1 AND target = ?2",
    )?
    .execute(params![device, state.key(), applied])?;
    Ok(())
}

/// Records a failed delivery and when to try again. The device's state becomes unknown
/// (`applied` NULL): a request whose answer was lost or late may have been carried out, so
/// whatever is desired next is delivered, even the state last confirmed.
pub fn set_failed(
    conn: &Connection,
    device: &str,
    key: &str,
    error: &str,
    next_attempt_ms: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE device_targets SET applied = NULL, attempts = attempts + 1, last_error = ?3,
            next_attempt_ms = ?4
         WHERE device = ?1 AND target = ?2",
    )?
    .execute(params![device, key, error, next_attempt_ms])?;
    Ok(())
}

/// How many targets of a device are pending, and the last delivery error, if any.
pub fn depth(conn: &Connection, device: &str) -> Result<(u64, Option<String>), StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(*), MAX(last_error) FROM device_targets WHERE device = ?1 AND applied IS NOT desired",
        )?
        .query_row([device], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?)
}

/// Every target of a device with its desired and applied state (for read-back and tests).
pub fn targets(
    conn: &Connection,
    device: &str,
) -> Result<Vec<(Target, Option<Target>)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT desired, applied FROM device_targets WHERE device = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([device], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (d, a) = row?;
        out.push((decode(&d)?, a.as_deref().map(decode).transpose()?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::desired::LockTarget;
    use crate::store::Store;

    fn lock(state: LockTarget) -> Target {
        Target::SmartLock {
            lock: "lock-1".into(),
            target: state,
        }
    }

    fn assigned() -> Target {
        lock(LockTarget::Assigned {
            tenant_ref: "c1".into(),
        })
    }

    #[tokio::test]
    async fn superseded_commands_coalesce_and_delivery_clears_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("u.db")).unwrap();
        let result = s
            .write(|c| -> Result<(), StoreError> {
                // First sight: unknown device state, so even "unassigned" is sent once.
                assert!(set_desired(c, "locks", &lock(LockTarget::Unassigned))?);
                set_applied(c, "locks", &lock(LockTarget::Unassigned))?;
                assert_eq!(depth(c, "locks")?.0, 0);
                // assign then unassign before delivery: nothing left to send.
                assert!(set_desired(c, "locks", &assigned())?);
                assert!(!set_desired(c, "locks", &lock(LockTarget::Unassigned))?);
                assert_eq!(depth(c, "locks")?.0, 0);
                assert!(due(c, "locks", i64::MAX, 10)?.is_empty());
                // assign: one pending delivery; a failure schedules a retry.
                set_desired(c, "locks", &assigned())?;
                assert_eq!(due(c, "locks", 0, 10)?.len(), 1);
                set_failed(c, "locks", "lock:lock-1", "HTTP 503", 5_000)?;
                assert!(
                    due(c, "locks", 4_999, 10)?.is_empty(),
                    "not before its retry time"
                );
                let p = due(c, "locks", 5_000, 10)?;
                assert_eq!((p[0].attempts, p[0].desired.clone()), (1, assigned()));
                assert_eq!(depth(c, "locks")?, (1, Some("HTTP 503".into())));
                // Delivered.
                set_applied(c, "locks", &assigned())?;
                assert_eq!(depth(c, "locks")?, (0, None));
                // A failed delivery may have landed: undoing the change still sends it.
                set_desired(c, "locks", &lock(LockTarget::Unassigned))?;
                set_failed(c, "locks", "lock:lock-1", "timed out", 0)?;
                assert!(set_desired(c, "locks", &assigned())?, "state unknown");
                assert_eq!(due(c, "locks", 0, 10)?[0].desired, assigned());
                set_applied(c, "locks", &assigned())?;
                // The device drifted (read-back): pending again toward the desired state.
                set_applied(c, "locks", &lock(LockTarget::Unassigned))?;
                assert_eq!(due(c, "locks", 0, 10)?[0].desired, assigned());
                Ok(())
            })
            .await;
        result.unwrap();
    }

    #[tokio::test]
    async fn delivery_order_is_the_order_of_the_last_change_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("u.db")).unwrap();
        s.write(|c| -> Result<(), StoreError> {
            let coil = |n: u16, on: bool| Target::Coil {
                board: "relay-1".into(),
                coil: n,
                on,
            };
            set_desired(c, "relay-1", &coil(1, true))?;
            set_desired(c, "relay-1", &coil(2, true))?;
            set_desired(
                c,
                "relay-2",
                &Target::Coil {
                    board: "relay-2".into(),
                    coil: 1,
                    on: true,
                },
            )?;
            set_desired(c, "relay-1", &coil(1, false))?;
            let keys: Vec<String> = due(c, "relay-1", 0, 10)?
                .into_iter()
                .map(|p| p.key)
                .collect();
            assert_eq!(keys, ["coil:2", "coil:1"]);
            assert_eq!(
                due(c, "relay-2", 0, 10)?.len(),
                1,
                "devices are independent"
            );
            Ok(())
        })
        .await
        .unwrap();
    }
}
