//! The cloud link's durable state: uplink cursors, cloud clients' nonces, webhook ids.

use super::StoreError;
use crate::failpoint;
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
    // Cached: the MQTT uplink stores its cursor after every acknowledged publish.
    conn.prepare_cached(
        "INSERT INTO uplink_cursors (uplink, seq) VALUES (?1, ?2)
         ON CONFLICT (uplink) DO UPDATE SET seq = max(seq, excluded.seq)",
    )?
    .execute(params![uplink, seq])?;
    Ok(())
}

/// How far below a client's highest nonce a late one is still taken (commands run
/// concurrently, so nonces may be recorded a little out of order).
pub const NONCE_WINDOW: i64 = 63;

/// Takes `nonce` for `client_id` unless it was used before or is older than the window
/// below the client's highest (the anti-replay window of IPsec, RFC 4303 §3.4.3): false,
/// and nothing recorded, for a replayed or stale one.
pub fn take_nonce(conn: &Connection, client_id: &str, nonce: i64) -> Result<bool, StoreError> {
    let row: Option<(i64, u64)> = conn
        .query_row(
            "SELECT nonce, seen FROM client_nonces WHERE client_id = ?1",
            params![client_id],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.cast_unsigned())),
        )
        .optional()?;
    // `seen` bit i: nonce `highest - 1 - i` was taken.
    let (highest, seen) = match row {
        None => (nonce, 0),
        Some((hi, seen)) if nonce > hi => {
            let shift = nonce - hi;
            let moved = if shift > NONCE_WINDOW {
                0
            } else {
                ((seen << shift) | (1 << (shift - 1))) & window_mask()
            };
            (nonce, moved)
        }
        Some((hi, _)) if nonce == hi || hi - nonce > NONCE_WINDOW => return Ok(false),
        Some((hi, seen)) => {
            let bit = 1u64 << (hi - nonce - 1);
            if seen & bit != 0 {
                return Ok(false);
            }
            (hi, seen | bit)
        }
    };
    conn.execute(
        "INSERT INTO client_nonces (client_id, nonce, seen) VALUES (?1, ?2, ?3)
         ON CONFLICT (client_id) DO UPDATE SET nonce = excluded.nonce, seen = excluded.seen",
        params![client_id, highest, seen.cast_signed()],
    )?;
    Ok(true)
}

fn window_mask() -> u64 {
    (1u64 << NONCE_WINDOW) - 1
}

/// Records a webhook event id; false if `source` sent it before (a replay).
pub fn take_webhook_event(
    conn: &Connection,
    source: &str,
    event_id: &str,
    received_at: &str,
) -> Result<bool, StoreError> {
    failpoint::check(failpoint::WEBHOOK_RECORD_BEFORE)?;
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
    fn each_nonce_once_late_ones_within_the_window() {
        let c = db();
        let take = |id: &str, n: i64| take_nonce(&c, id, n).expect("take");
        assert!(take("a", 5));
        assert!(!take("a", 5), "replay");
        assert!(take("a", 8));
        // 6 and 7 arrive late (commands run concurrently): taken once each.
        assert!(take("a", 7));
        assert!(take("a", 6));
        assert!(!take("a", 6), "replay of a late one");
        assert!(!take("a", 5), "replay below the highest");
        assert!(take("b", 1), "per client");
        // Far ahead: everything older falls out of the window.
        assert!(take("a", 8 + NONCE_WINDOW));
        assert!(!take("a", 8), "the old highest, replayed");
        assert!(take("a", 9), "inside the window, never used");
        assert!(!take("a", 8 + NONCE_WINDOW - NONCE_WINDOW - 1), "stale");
        assert!(take("a", 1000));
        assert!(!take("a", 8 + NONCE_WINDOW), "beyond the window now");
        assert!(!take("a", 1000));
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
