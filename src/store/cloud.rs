//! The cloud link's durable state: uplink cursors, cloud clients' nonces, webhook ids.

use super::StoreError;
use rusqlite::{Connection, OptionalExtension, params};

/// The last event `seq` an uplink has had acknowledged (0 before the first).
pub fn cursor(conn: &Connection, uplink: &str) -> Result<i64, StoreError> {
    Ok(conn
        .query_row(
            "SELECT seq FROM uplink_cursors WHERE uplink = ?1",
            params![uplink],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Moves an uplink's cursor forward to `seq` (never back).
pub fn advance_cursor(conn: &Connection, uplink: &str, seq: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO uplink_cursors (uplink, seq) VALUES (?1, ?2)
         ON CONFLICT (uplink) DO UPDATE SET seq = max(seq, excluded.seq)",
        params![uplink, seq],
    )?;
    Ok(())
}

/// Takes `nonce` for `client_id` if it is greater than every nonce the client used
/// before; false (and nothing recorded) for a replayed or stale one.
pub fn take_nonce(conn: &Connection, client_id: &str, nonce: i64) -> Result<bool, StoreError> {
    let n = conn.execute(
        "INSERT INTO client_nonces (client_id, nonce) VALUES (?1, ?2)
         ON CONFLICT (client_id) DO UPDATE SET nonce = excluded.nonce
         WHERE excluded.nonce > client_nonces.nonce",
        params![client_id, nonce],
    )?;
    Ok(n == 1)
}

/// Records a webhook event id; false if `source` sent it before (a replay).
pub fn take_webhook_event(
    conn: &Connection,
    source: &str,
    event_id: &str,
    received_at: &str,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "INSERT INTO webhook_events (source, event_id, received_at) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING",
        params![source, event_id, received_at],
    )?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().expect("db");
        crate::store::schema::migrate(&mut c).expect("migrate");
        c
    }

    #[test]
    fn cursors_only_move_forward() {
        let c = db();
        assert_eq!(cursor(&c, "mqtt").expect("read"), 0);
        advance_cursor(&c, "mqtt", 10).expect("advance");
        advance_cursor(&c, "mqtt", 7).expect("advance");
        assert_eq!(cursor(&c, "mqtt").expect("read"), 10);
        assert_eq!(cursor(&c, "https").expect("read"), 0);
    }

    #[test]
    fn nonces_must_grow_per_client() {
        let c = db();
        assert!(take_nonce(&c, "a", 5).expect("take"));
        assert!(!take_nonce(&c, "a", 5).expect("take"), "replay");
        assert!(!take_nonce(&c, "a", 4).expect("take"), "stale");
        assert!(take_nonce(&c, "a", 6).expect("take"));
        assert!(take_nonce(&c, "b", 1).expect("take"), "per client");
    }

    #[test]
    fn webhook_ids_are_taken_once_per_source() {
        let c = db();
        let t = "2026-03-10T12:00:00Z";
        assert!(take_webhook_event(&c, "stripe", "evt_1", t).expect("take"));
        assert!(!take_webhook_event(&c, "stripe", "evt_1", t).expect("take"));
        assert!(take_webhook_event(&c, "other", "evt_1", t).expect("take"));
    }
}
