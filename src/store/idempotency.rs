//! Stored responses of mutating requests, keyed by `Idempotency-Key` (or MQTT `request_id`).

use super::StoreError;
use crate::failpoint;
use rusqlite::{Connection, OptionalExtension, params};

/// A response as first sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    /// Hash of what was asked (operation, ids, canonical body).
    pub fingerprint: Vec<u8>,
    /// HTTP status.
    pub status: u16,
    /// Body bytes exactly as first sent.
    pub body: Vec<u8>,
}

/// The stored reply for a key, if any.
pub fn get(conn: &Connection, key: &str) -> Result<Option<StoredReply>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT fingerprint, status, body FROM idempotency WHERE key = ?1")?
        .query_row([key], |r| {
            Ok(StoredReply {
                fingerprint: r.get(0)?,
                status: r.get(1)?,
                body: r.get(2)?,
            })
        })
        .optional()?)
}

/// Records the reply for a key (in the same transaction as the change).
pub fn put(
    conn: &Connection,
    key: &str,
    reply: &StoredReply,
    now_unix: i64,
) -> Result<(), StoreError> {
    failpoint::check(failpoint::IDEMPOTENCY_RECORD_BEFORE)?;
    conn.prepare_cached(
        "INSERT INTO idempotency (key, fingerprint, status, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![key, reply.fingerprint, reply.status, reply.body, now_unix])?;
    Ok(())
}

/// Forgets keys older than `cutoff_unix`; returns how many.
pub fn purge(conn: &Connection, cutoff_unix: i64) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM idempotency WHERE created_at < ?1",
        [cutoff_unix],
    )?)
}
