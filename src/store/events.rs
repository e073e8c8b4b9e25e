//! The event log: appended in the same transaction as the change it records.

use super::{StoreError, timestamp};
use crate::domain::{Event, EventType};
use rusqlite::{Connection, params};

/// Appends one event and returns its `seq`. The counter lives in the site row, so `seq`
/// stays gapless (a rolled-back job rolls back its increment) and never reuses a number
/// even if old events are compacted away.
pub fn append(
    conn: &Connection,
    kind: EventType,
    data: &serde_json::Value,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<i64, StoreError> {
    let seq: i64 = conn
        .prepare_cached("UPDATE site SET last_seq = last_seq + 1 RETURNING last_seq")?
        .query_row([], |r| r.get(0))?;
    let id = format!("evt_{}", uuid::Uuid::new_v4().simple());
    conn.prepare_cached(
        "INSERT INTO events (seq, id, type, occurred_at, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        seq,
        id,
        kind.as_str(),
        timestamp(now),
        data.to_string()
    ])?;
    Ok(seq)
}

/// Events with `seq > after`, oldest first, at most `limit`.
pub fn list(
    conn: &Connection,
    site_id: &str,
    after: i64,
    limit: u32,
) -> Result<Vec<Event>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, type, occurred_at, data FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, id, kind, occurred_at, data) = row?;
        out.push(Event {
            seq,
            id,
            kind,
            occurred_at,
            site_id: site_id.to_owned(),
            data: serde_json::from_str(&data)?,
        });
    }
    Ok(out)
}

/// The newest `seq` (0 when the log is empty).
pub fn last_seq(conn: &Connection) -> Result<i64, StoreError> {
    Ok(
        conn.query_row("SELECT COALESCE((SELECT last_seq FROM site), 0)", [], |r| {
            r.get(0)
        })?,
    )
}
