//! Open-door alarms: the unit door inputs that raised `door.alarm` and have not closed since.
//!
//! Kept with the event in one transaction, so after a restart (or a board reconnecting) a
//! door that is still open is not reported again; it is reported again once it has closed
//! and opens anew.

use super::{StoreError, events};
use crate::domain::EventType;
use rusqlite::{Connection, params};

/// The inputs whose alarm is raised and not yet cleared, as `(board, input)`.
pub fn open(conn: &Connection) -> Result<Vec<(String, u16)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT board, input FROM door_alarms")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (board, input) = row?;
        let input = u16::try_from(input)
            .map_err(|_| StoreError::Corrupt(format!("door alarm input {input}")))?;
        out.push((board, input));
    }
    Ok(out)
}

/// Appends the `door.alarm` event and records the input as alarmed, together.
pub fn raise(
    conn: &Connection,
    board: &str,
    input: u16,
    unit_id: &str,
    data: &serde_json::Value,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<i64, StoreError> {
    let seq = events::append(conn, EventType::DoorAlarm, data, at)?;
    conn.prepare_cached(
        "INSERT INTO door_alarms (board, input, unit_id, raised_seq) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (board, input) DO UPDATE SET unit_id = excluded.unit_id,
             raised_seq = excluded.raised_seq",
    )?
    .execute(params![board, i64::from(input), unit_id, seq])?;
    Ok(seq)
}

/// The input closed: its next opening raises a new alarm.
pub fn clear(conn: &Connection, board: &str, input: u16) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM door_alarms WHERE board = ?1 AND input = ?2")?
        .execute(params![board, i64::from(input)])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use serde_json::json;

    #[tokio::test]
    async fn a_raised_alarm_survives_reopening_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.db");
        let store = Store::open(&path).unwrap();
        let now = chrono::Utc::now();
        store
            .write(move |c| -> Result<(), StoreError> {
                crate::store::site::ensure(c, "s1", "Site", "UTC", &json!({}), now)?;
                raise(c, "doors", 3, "u3", &json!({"kind": "unit_door_open"}), now)?;
                raise(c, "doors", 5, "u5", &json!({"kind": "unit_door_open"}), now)?;
                clear(c, "doors", 5)?;
                Ok(())
            })
            .await
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let open = store.read(open).await.unwrap();
        assert_eq!(open, vec![("doors".to_owned(), 3)]);
        let alarms: i64 = store
            .read(|c| -> Result<i64, StoreError> {
                Ok(c.query_row(
                    "SELECT count(*) FROM events WHERE type = 'door.alarm'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(alarms, 2);
    }
}
