//! The offline backlog (issue 7). The event log is the queue: events after the lowest uplink
//! cursor are undelivered. Its disk use is estimated from the undelivered rows (their text
//! plus a fixed per-row overhead). Above `cloud.backlog_cap_mib`:
//!
//! - one `queue.full` event is raised (an alarm), and `queue.ok` once the backlog is back
//!   under [`RECOVERY_PERCENT`] of the cap (hysteresis, so it does not flap);
//! - undelivered access events (`access.granted`/`access.denied`) older than the newest
//!   [`KEEP_NEWEST_ACCESS`] are compacted **in place**: each keeps its `seq`, id, type and
//!   time, its data becomes `{"compacted": true, "summary_seq": N}`, and one
//!   `access.compacted` event (seq N) counts them per keypad, type and reason and names the
//!   seq range. `seq` stays gapless, so a consumer never mistakes compaction for loss.
//!   Allocation (`unit.*`), device, door and queue events are never touched. A pass
//!   compacts at most [`COMPACT_CHUNK`] (oldest first), so the writer is never held long.
//!
//! In-place compaction keeps each row's id, type and time, so it saves about 20-50% of an
//! access row, not all of it: past the cap the backlog still grows, more slowly, and
//! `queue.full` stays raised. Only uplinks' backlogs count: without an uplink nothing is
//! queued and nothing is compacted.

use crate::command::Executor;
use crate::domain::EventType;
use crate::store::{StoreError, cloud, events};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::watch;

/// Newest undelivered access events kept whole when compacting.
pub const KEEP_NEWEST_ACCESS: i64 = 1000;
/// `queue.ok` is raised when the backlog is below this share of the cap.
pub const RECOVERY_PERCENT: u64 = 80;
/// Per-row overhead of the estimate (rowid, record header, the `id` index entry): measured,
/// the estimate is then within a few percent of the file's growth for access events.
const ROW_OVERHEAD: i64 = 72;
/// Most access events compacted per pass (the oldest first): a pass holds the writer for
/// about 0.2 s at most; a larger excess takes several passes, each with its summary.
pub const COMPACT_CHUNK: i64 = 50_000;

/// The backlog as `GET /v1/status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Backlog {
    /// Events not yet acknowledged by every configured uplink.
    pub events: i64,
    /// Age of the oldest of them, seconds (null when there is none).
    pub oldest_age_s: Option<i64>,
}

/// The lowest cursor over `uplinks` (None when no uplink is configured: nothing is queued).
pub fn floor(conn: &Connection, uplinks: &[String]) -> Result<Option<i64>, StoreError> {
    let mut min = None;
    for u in uplinks {
        let c = cloud::cursor(conn, u)?;
        min = Some(min.map_or(c, |m: i64| m.min(c)));
    }
    Ok(min)
}

/// The undelivered backlog over `uplinks`, aged by `now`.
pub fn backlog(
    conn: &Connection,
    uplinks: &[String],
    now: DateTime<Utc>,
) -> Result<Backlog, StoreError> {
    let Some(floor) = floor(conn, uplinks)? else {
        return Ok(Backlog::default());
    };
    let last = events::last_seq(conn)?;
    let oldest: Option<String> = conn
        .query_row(
            "SELECT occurred_at FROM events WHERE seq > ?1 ORDER BY seq LIMIT 1",
            [floor],
            |r| r.get(0),
        )
        .optional()?;
    let oldest_age_s = oldest
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| (now - t.with_timezone(&Utc)).num_seconds().max(0));
    Ok(Backlog {
        events: (last - floor).max(0),
        oldest_age_s,
    })
}

/// Estimated bytes of the events after `floor`.
pub fn undelivered_bytes(conn: &Connection, floor: i64) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(length(data) + length(id) + length(type) + length(occurred_at) + ?2), 0)
         FROM events WHERE seq > ?1",
        params![floor, ROW_OVERHEAD],
        |r| r.get(0),
    )?)
}

/// Whether the latest queue alarm in the log is `queue.full`.
fn alarm_raised(conn: &Connection) -> Result<bool, StoreError> {
    let t: Option<String> = conn
        .query_row(
            "SELECT type FROM events WHERE type IN ('queue.full', 'queue.ok') ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(t.as_deref() == Some("queue.full"))
}

/// What one check did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOutcome {
    /// The estimate before compaction, bytes.
    pub bytes: i64,
    /// `queue.full` raised now.
    pub raised: bool,
    /// `queue.ok` raised now.
    pub recovered: bool,
    /// Access events compacted now.
    pub compacted: i64,
}

/// Compacts undelivered access events after `floor`, older than the newest `keep`, in
/// place (at most [`COMPACT_CHUNK`], oldest first); appends one `access.compacted` summary.
/// Returns how many were compacted.
pub fn compact_access(
    conn: &Connection,
    floor: i64,
    keep: i64,
    now: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let rows: Vec<(i64, String, String)> = {
        let mut stmt = conn.prepare(
            "SELECT seq, type, data FROM (
                SELECT seq, type, data FROM events
                WHERE seq > ?1 AND type IN ('access.granted', 'access.denied')
                  AND json_extract(data, '$.compacted') IS NULL
                ORDER BY seq DESC LIMIT -1 OFFSET ?2
             ) ORDER BY seq LIMIT ?3",
        )?;
        stmt.query_map(params![floor, keep, COMPACT_CHUNK], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?
    };
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(0);
    };
    let (from_seq, to_seq) = (first.0, last.0);
    let mut counts: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for (_, kind, data) in &rows {
        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
        *counts
            .entry((s("keypad"), kind.clone(), s("reason")))
            .or_default() += 1;
    }
    let counts: Vec<_> = counts
        .into_iter()
        .map(|((keypad, kind, reason), count)| {
            json!({"keypad": keypad, "type": kind, "reason": (!reason.is_empty()).then_some(reason), "count": count})
        })
        .collect();
    let n = rows.len() as i64;
    let summary = events::append(
        conn,
        EventType::AccessCompacted,
        &json!({"from_seq": from_seq, "to_seq": to_seq, "count": n, "counts": counts}),
        now,
    )?;
    let placeholder = json!({"compacted": true, "summary_seq": summary}).to_string();
    let mut update = conn.prepare("UPDATE events SET data = ?2 WHERE seq = ?1")?;
    for (seq, _, _) in &rows {
        update.execute(params![seq, placeholder])?;
    }
    Ok(n)
}

/// Whether a backlog of `bytes` calls for [`act`] given the alarm state.
pub fn needs_action(bytes: i64, cap_bytes: i64, raised: bool) -> bool {
    bytes > cap_bytes || (raised && below_recovery(bytes, cap_bytes))
}

fn below_recovery(bytes: i64, cap_bytes: i64) -> bool {
    (bytes as i128) * 100 < (cap_bytes as i128) * RECOVERY_PERCENT as i128
}

/// One pass of the policy in one transaction: measure, then [`act`]. `raised` is the alarm
/// state (the latest of `queue.full`/`queue.ok` in the log).
pub fn check(
    conn: &Connection,
    uplinks: &[String],
    cap_bytes: i64,
    raised: bool,
    now: DateTime<Utc>,
) -> Result<CheckOutcome, StoreError> {
    let Some(floor) = floor(conn, uplinks)? else {
        return Ok(CheckOutcome::default());
    };
    let bytes = undelivered_bytes(conn, floor)?;
    act(conn, floor, bytes, cap_bytes, raised, now)
}

/// Raises or clears the alarm for a measured backlog (`bytes` after `floor`) and compacts
/// when it is over the cap.
pub fn act(
    conn: &Connection,
    floor: i64,
    bytes: i64,
    cap_bytes: i64,
    raised: bool,
    now: DateTime<Utc>,
) -> Result<CheckOutcome, StoreError> {
    let mut out = CheckOutcome {
        bytes,
        ..Default::default()
    };
    if bytes > cap_bytes {
        if !raised {
            events::append(
                conn,
                EventType::QueueFull,
                &json!({"backlog_bytes": bytes, "cap_bytes": cap_bytes, "events": events::last_seq(conn)? - floor}),
                now,
            )?;
            out.raised = true;
        }
        out.compacted = compact_access(conn, floor, KEEP_NEWEST_ACCESS, now)?;
    } else if raised && below_recovery(bytes, cap_bytes) {
        events::append(
            conn,
            EventType::QueueOk,
            &json!({"backlog_bytes": bytes, "cap_bytes": cap_bytes}),
            now,
        )?;
        out.recovered = true;
    }
    Ok(out)
}

/// The task applying the policy every 5 s (a cheap read first; the writer only when needed).
pub struct BacklogGuard {
    executor: Executor,
    links: super::Links,
    cap_bytes: i64,
    period: Duration,
}

impl BacklogGuard {
    /// A guard over the cursors of the links in `links` (their names are their cursors),
    /// with a cap in MiB.
    pub fn new(executor: Executor, links: super::Links, cap_mib: u64) -> Self {
        BacklogGuard {
            executor,
            links,
            cap_bytes: i64::try_from(cap_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX),
            period: Duration::from_secs(5),
        }
    }

    /// Checks every period until shutdown.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // The alarm state, from the log once (then kept here: the log has no index by type).
        let mut raised = loop {
            match self.executor.store().read(alarm_raised).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, "backlog: cannot read the alarm state");
                    tokio::select! {
                        r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
                        _ = tokio::time::sleep(self.period) => {}
                    }
                }
            }
        };
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
                _ = tick.tick() => {}
            }
            // Read each pass: links register as their tasks start.
            let uplinks: Vec<String> = self.links.list().into_keys().collect();
            if uplinks.is_empty() {
                continue;
            }
            let (cap, now) = (self.cap_bytes, self.executor.now());
            // Measured on a reader (a scan of the backlog): the writer is held only to act.
            let measured = self
                .executor
                .store()
                .read(move |c| -> Result<Option<(i64, i64)>, StoreError> {
                    let Some(f) = floor(c, &uplinks)? else {
                        return Ok(None);
                    };
                    Ok(Some((f, undelivered_bytes(c, f)?)))
                })
                .await;
            let (floor, bytes) = match measured {
                Ok(Some((f, b))) if needs_action(b, cap, raised) => (f, b),
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "backlog: cannot measure");
                    continue;
                }
            };
            let started = std::time::Instant::now();
            let outcome = self
                .executor
                .store()
                .write(move |c| act(c, floor, bytes, cap, raised, now))
                .await;
            if let Ok(o) = &outcome {
                raised = (raised || o.raised) && !o.recovered;
            }
            match outcome {
                Ok(o) if o.raised || o.compacted > 0 => tracing::warn!(
                    backlog_bytes = o.bytes,
                    cap_bytes = cap,
                    compacted = o.compacted,
                    ms = started.elapsed().as_millis() as u64,
                    "backlog over its cap: queue.full; access events compacted"
                ),
                Ok(o) if o.recovered => tracing::info!(
                    backlog_bytes = o.bytes,
                    "backlog back under its cap: queue.ok"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "backlog: check failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().expect("db");
        crate::store::schema::migrate(&mut c).expect("migrate");
        c.execute(
            "INSERT INTO site (id, name, timezone, settings, created_at) VALUES ('s', 's', 'UTC', '{}', '')",
            [],
        )
        .expect("site");
        c
    }

    fn now() -> DateTime<Utc> {
        "2026-03-10T12:00:00Z".parse().expect("time")
    }

    fn access(c: &Connection, n: usize, keypad: &str) {
        for i in 0..n {
            let (kind, data) = if i.is_multiple_of(3) {
                (
                    EventType::AccessDenied,
                    json!({"keypad": keypad, "reason": "wrong_code", "pad": "x".repeat(200)}),
                )
            } else {
                (
                    EventType::AccessGranted,
                    json!({"keypad": keypad, "pad": "x".repeat(200)}),
                )
            };
            events::append(c, kind, &data, now()).expect("append");
        }
    }

    #[test]
    fn over_the_cap_compacts_access_in_place_and_keeps_seq_gapless() {
        let c = db();
        let up = vec!["https".to_owned()];
        events::append(
            &c,
            EventType::UnitOccupied,
            &json!({"unit_id": "u1"}),
            now(),
        )
        .expect("append");
        access(&c, 3000, "kp1");
        events::append(
            &c,
            EventType::UnitOverlocked,
            &json!({"unit_id": "u1"}),
            now(),
        )
        .expect("append");
        access(&c, 1200, "kp2");
        let before = undelivered_bytes(&c, 0).expect("bytes");
        assert!(!alarm_raised(&c).expect("alarm"));
        let o = check(&c, &up, 100_000, false, now()).expect("check");
        assert!(o.raised);
        assert!(alarm_raised(&c).expect("alarm"), "the log holds the state");
        assert_eq!(o.compacted, 4200 - KEEP_NEWEST_ACCESS);
        let after = undelivered_bytes(&c, 0).expect("bytes");
        // Each compacted row keeps its id, type and time: ~40% saved on these 380-byte rows.
        assert!(after < before * 7 / 10, "{before} -> {after}");
        let all = events::list(&c, "s", 0, 10_000).expect("list");
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.seq, i as i64 + 1, "gapless");
        }
        assert_eq!(all[0].data["unit_id"], "u1", "allocation events untouched");
        assert_eq!(all[3001].data["unit_id"], "u1");
        let summary = all
            .iter()
            .find(|e| e.kind == "access.compacted")
            .expect("summary");
        assert_eq!(summary.data["count"], 3200);
        assert_eq!(summary.data["from_seq"], 2);
        let total: i64 = summary.data["counts"]
            .as_array()
            .expect("counts")
            .iter()
            .map(|c| c["count"].as_i64().expect("n"))
            .sum();
        assert_eq!(total, 3200);
        // A second pass raises no second alarm and compacts nothing more.
        let o = check(&c, &up, 100_000, true, now()).expect("check");
        assert!(!o.raised);
        assert_eq!(o.compacted, 0);
        // Delivery brings it under: queue.ok once.
        cloud::advance_cursor(&c, "https", events::last_seq(&c).expect("seq")).expect("advance");
        assert!(
            check(&c, &up, 100_000, true, now())
                .expect("check")
                .recovered
        );
        assert!(!alarm_raised(&c).expect("alarm"));
        assert!(
            !check(&c, &up, 100_000, false, now())
                .expect("check")
                .recovered
        );
    }

    #[test]
    fn no_uplink_no_backlog() {
        let c = db();
        access(&c, 10, "kp1");
        assert_eq!(
            backlog(&c, &[], now()).expect("backlog"),
            Backlog::default()
        );
        let b =
            backlog(&c, &["https".into()], now() + chrono::Duration::seconds(90)).expect("backlog");
        assert_eq!(
            b,
            Backlog {
                events: 10,
                oldest_age_s: Some(90)
            }
        );
    }
}
