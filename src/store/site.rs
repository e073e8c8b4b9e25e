//! The site row: identity, timezone, settings, and the event sequence counter.

use super::{StoreError, timestamp};
use rusqlite::{Connection, OptionalExtension, params};

/// Makes the file's site row match the configured site, creating it on first start.
/// A file that belongs to another site is refused.
pub fn ensure(
    conn: &Connection,
    id: &str,
    name: &str,
    timezone: &str,
    settings: &serde_json::Value,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    let existing: Option<String> = conn
        .query_row("SELECT id FROM site", [], |r| r.get(0))
        .optional()?;
    match existing {
        Some(found) if found != id => Err(StoreError::SiteMismatch {
            found,
            expected: id.to_owned(),
        }),
        Some(_) => {
            conn.execute(
                "UPDATE site SET name = ?2, timezone = ?3, settings = ?4 WHERE id = ?1",
                params![id, name, timezone, settings.to_string()],
            )?;
            Ok(())
        }
        None => {
            conn.execute(
                "INSERT INTO site (id, name, timezone, settings, last_seq, created_at) VALUES (?1, ?2, ?3, ?4, 0, ?5)",
                params![id, name, timezone, settings.to_string(), timestamp(now)],
            )?;
            Ok(())
        }
    }
}

/// The site id stored in the file, if any.
pub fn id(conn: &Connection) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT id FROM site", [], |r| r.get(0))
        .optional()?)
}

/// The site's automation settings, from the settings the config last wrote (defaults for
/// any key missing).
pub fn automations(conn: &Connection) -> Result<crate::domain::schedule::Automations, StoreError> {
    let settings: Option<String> = conn
        .prepare_cached("SELECT settings FROM site")?
        .query_row([], |r| r.get(0))
        .optional()?;
    match settings {
        Some(s) => Ok(serde_json::from_str(&s)?),
        None => Ok(Default::default()),
    }
}
