//! The extra reads of `GET /v1/status?detail=full` (the status page and `unitgate status`):
//! the newest access decisions and how many units have each status.

use crate::domain::UnitStatus;
use crate::store::StoreError;
use rusqlite::{Connection, params};
use serde::Deserialize;
use std::collections::BTreeMap;
use utoipa::IntoParams;

/// Access decisions listed at most.
pub const ACCESS_DECISIONS: u32 = 50;

/// How far back (in events) the access decisions are looked for: the log is scanned newest
/// first and has no index by type, so a site whose last decisions are buried under more
/// events than this shows fewer (each status read stays a bounded scan).
pub const ACCESS_SCAN_EVENTS: i64 = 20_000;

/// Parameters of `GET /v1/status`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// `full` adds `access_decisions` and `units_by_status`.
    #[param(inline)]
    pub detail: Option<Detail>,
}

/// How much `GET /v1/status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detail {
    /// Also the newest access decisions and the unit counts per status.
    Full,
}

/// One keypad decision, as its `access.granted` / `access.denied` event recorded it (the
/// PIN is never recorded, so never shown).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct AccessDecision {
    /// The event's `seq`.
    pub seq: i64,
    /// When it was decided (RFC 3339 UTC).
    pub occurred_at: String,
    /// Whether the gate opened.
    pub granted: bool,
    /// The keypad (null for a decision compacted under backlog pressure).
    pub keypad: Option<String>,
    /// The zone the keypad guards.
    pub zone: Option<String>,
    /// Why it was refused (`invalid_code`, `no_access`, `overlocked`, ...); null when granted.
    pub reason: Option<String>,
    /// The contact the code belongs to, when it matched one.
    pub contact_id: Option<String>,
    /// The contact's units behind that gate.
    pub units: Vec<String>,
}

/// The newest access decisions, newest first, at most `limit`, among the newest
/// [`ACCESS_SCAN_EVENTS`] events.
pub fn recent_access(
    conn: &Connection,
    last_seq: i64,
    limit: u32,
) -> Result<Vec<AccessDecision>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, type, occurred_at, data FROM events
         WHERE seq > ?1 AND type IN ('access.granted', 'access.denied')
         ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![last_seq.saturating_sub(ACCESS_SCAN_EVENTS), limit],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        },
    )?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, kind, occurred_at, data) = row?;
        // A row this build did not write (or a compacted one) still lists, with blanks.
        let data: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        let text = |k: &str| data.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        out.push(AccessDecision {
            seq,
            occurred_at,
            granted: kind == "access.granted",
            keypad: text("keypad"),
            zone: text("zone"),
            reason: text("reason"),
            contact_id: text("contact_id"),
            units: data
                .get("units")
                .and_then(|u| u.as_array())
                .map(|u| {
                    u.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// How many units have each status; every status is named, 0 included.
pub fn units_by_status(conn: &Connection) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut out: BTreeMap<String, u64> = UnitStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_owned(), 0))
        .collect();
    let mut stmt = conn.prepare_cached("SELECT status, COUNT(*) FROM units GROUP BY status")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (status, n) = row?;
        out.insert(status, n.max(0) as u64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventType;
    use serde_json::json;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL,
                 occurred_at TEXT NOT NULL, data TEXT NOT NULL);
             CREATE TABLE units (id TEXT PRIMARY KEY, status TEXT NOT NULL);",
        )
        .unwrap();
        c
    }

    fn event(c: &Connection, seq: i64, kind: EventType, data: serde_json::Value) {
        c.execute(
            "INSERT INTO events VALUES (?1, ?2, ?3, '2026-03-10T12:00:00Z', ?4)",
            params![seq, format!("evt_{seq}"), kind.as_str(), data.to_string()],
        )
        .unwrap();
    }

    #[test]
    fn access_decisions_come_newest_first_and_skip_other_events() {
        let c = conn();
        event(
            &c,
            1,
            EventType::AccessGranted,
            json!({"keypad": "gate-1", "zone": "main-gate", "contact_id": "c2", "units": ["u1"]}),
        );
        event(&c, 2, EventType::UnitOccupied, json!({"unit_id": "u2"}));
        event(
            &c,
            3,
            EventType::AccessDenied,
            json!({"keypad": "gate-2", "zone": "east", "contact_id": null, "units": [], "reason": "invalid_code"}),
        );
        event(
            &c,
            4,
            EventType::AccessDenied,
            json!({"compacted": true, "summary_seq": 9}),
        );
        let got = recent_access(&c, 4, 50).unwrap();
        assert_eq!(got.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![4, 3, 1]);
        assert_eq!(got[1].reason.as_deref(), Some("invalid_code"));
        assert!(!got[1].granted);
        assert_eq!(
            got[0].keypad, None,
            "a compacted decision lists with blanks"
        );
        assert_eq!(got[2].units, vec!["u1".to_owned()]);
        assert!(got[2].granted);
        assert_eq!(recent_access(&c, 4, 1).unwrap().len(), 1);
    }

    #[test]
    fn decisions_older_than_the_scan_window_are_not_looked_for() {
        let c = conn();
        event(&c, 1, EventType::AccessGranted, json!({"keypad": "k"}));
        assert_eq!(recent_access(&c, ACCESS_SCAN_EVENTS, 50).unwrap().len(), 1);
        assert!(
            recent_access(&c, ACCESS_SCAN_EVENTS + 1, 50)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn every_status_is_counted_zero_included() {
        let c = conn();
        c.execute_batch(
            "INSERT INTO units VALUES ('u1', 'available'), ('u2', 'occupied'), ('u3', 'occupied');",
        )
        .unwrap();
        let got = units_by_status(&c).unwrap();
        assert_eq!(got.len(), UnitStatus::ALL.len());
        assert_eq!(got["available"], 1);
        assert_eq!(got["occupied"], 2);
        assert_eq!(got["repossessed"], 0);
    }
}
