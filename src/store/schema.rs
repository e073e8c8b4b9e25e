//! Schema migrations, applied in order; `PRAGMA user_version` records how far a file is.

use super::StoreError;
use rusqlite::Connection;

/// Each entry migrates from version `i` to `i + 1`. Never edit a released entry: add one.
const MIGRATIONS: &[&str] = &[
    // 1: the replica, the event log and idempotency records.
    r#"
    CREATE TABLE site (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        timezone    TEXT NOT NULL,
        settings    TEXT NOT NULL,
        last_seq    INTEGER NOT NULL DEFAULT 0,
        created_at  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE unit_types (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        updated_at  TEXT NOT NULL
    ) STRICT;
    CREATE TABLE units (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        unit_type_id  TEXT NOT NULL REFERENCES unit_types(id),
        status        TEXT NOT NULL CHECK (status IN
                        ('available','reserved','occupied','overlocked','unavailable','repossessed')),
        attrs         TEXT NOT NULL,
        zones         TEXT NOT NULL,
        lock          TEXT,
        door_sensor   TEXT,
        version       INTEGER NOT NULL,
        created_at    TEXT NOT NULL,
        updated_at    TEXT NOT NULL
    ) STRICT;
    CREATE INDEX units_by_status ON units(status, name);
    CREATE INDEX units_by_type ON units(unit_type_id);
    CREATE TABLE contacts (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        pin_hash      BLOB UNIQUE,
        access_hours  TEXT,
        version       INTEGER NOT NULL,
        updated_at    TEXT NOT NULL
    ) STRICT;
    CREATE TABLE tenancies (
        id          TEXT PRIMARY KEY,
        contact_id  TEXT NOT NULL REFERENCES contacts(id),
        start_date  TEXT NOT NULL,
        end_date    TEXT,
        state       TEXT NOT NULL,
        version     INTEGER NOT NULL,
        updated_at  TEXT NOT NULL
    ) STRICT;
    CREATE INDEX tenancies_by_contact ON tenancies(contact_id);
    CREATE TABLE unit_allocations (
        id                 TEXT PRIMARY KEY,
        unit_id            TEXT NOT NULL REFERENCES units(id),
        tenancy_id         TEXT NOT NULL REFERENCES tenancies(id),
        reserved_at        TEXT,
        reserved_by        TEXT,
        granted_access_at  TEXT,
        granted_access_by  TEXT,
        ended_at           TEXT,
        ended_by           TEXT
    ) STRICT;
    CREATE UNIQUE INDEX allocations_active_per_unit ON unit_allocations(unit_id) WHERE ended_at IS NULL;
    CREATE INDEX allocations_by_tenancy ON unit_allocations(tenancy_id);
    CREATE TABLE events (
        seq          INTEGER PRIMARY KEY,
        id           TEXT NOT NULL UNIQUE,
        type         TEXT NOT NULL,
        occurred_at  TEXT NOT NULL,
        data         TEXT NOT NULL
    ) STRICT;
    CREATE TABLE idempotency (
        key          TEXT PRIMARY KEY,
        fingerprint  BLOB NOT NULL,
        status       INTEGER NOT NULL,
        body         BLOB NOT NULL,
        created_at   INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX idempotency_by_age ON idempotency(created_at);
    "#,
    // 2: the durable per-device command queue, as desired vs applied state per target.
    r#"
    CREATE TABLE device_targets (
        device           TEXT NOT NULL,
        target           TEXT NOT NULL,
        desired          TEXT NOT NULL,
        applied          TEXT,
        seq              INTEGER NOT NULL,
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms  INTEGER NOT NULL DEFAULT 0,
        last_error       TEXT,
        PRIMARY KEY (device, target)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX device_targets_pending ON device_targets(device, seq) WHERE applied IS NOT desired;
    "#,
    // 3: gatelock, a per-unit flag that keeps the tenant's PIN from opening the gate.
    r#"
    ALTER TABLE units ADD COLUMN gatelock INTEGER NOT NULL DEFAULT 0 CHECK (gatelock IN (0, 1));
    "#,
    // 4: the cloud link: how far each uplink has delivered the event log, the last nonce of
    // each signing cloud client, and the webhook event ids already taken.
    r#"
    CREATE TABLE uplink_cursors (
        uplink  TEXT PRIMARY KEY,
        seq     INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE client_nonces (
        client_id  TEXT PRIMARY KEY,
        nonce      INTEGER NOT NULL,
        seen       INTEGER NOT NULL DEFAULT 0
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE webhook_events (
        source       TEXT NOT NULL,
        event_id     TEXT NOT NULL,
        received_at  TEXT NOT NULL,
        PRIMARY KEY (source, event_id)
    ) STRICT, WITHOUT ROWID;
    "#,
    // 5: unit door inputs with a `door.alarm` raised and not closed since, so a restart does
    // not raise the same open door again.
    r#"
    CREATE TABLE door_alarms (
        board       TEXT NOT NULL,
        input       INTEGER NOT NULL,
        unit_id     TEXT NOT NULL,
        raised_seq  INTEGER NOT NULL,
        PRIMARY KEY (board, input)
    ) STRICT, WITHOUT ROWID;
    "#,
];

/// The schema version this build writes.
pub const VERSION: i64 = MIGRATIONS.len() as i64;

/// Reads the file's schema version without changing anything.
pub fn version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
}

/// Checks, by reading its header only, that an existing file looks like a whole SQLite
/// database: the magic string, a valid page size, and not shorter than the header says
/// (a truncated copy). A missing or empty file passes (it becomes a new replica).
pub fn check_file(path: &std::path::Path) -> Result<(), String> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len == 0 {
        return Ok(());
    }
    let mut header = [0u8; 100];
    if len < 100 || f.read_exact(&mut header).is_err() {
        return Err(format!(
            "it is {len} bytes long, shorter than an SQLite header: truncated or not a database"
        ));
    }
    if &header[..16] != b"SQLite format 3\0" {
        return Err("it is not an SQLite database (bad header)".into());
    }
    let page = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        p if p >= 512 && p.is_power_of_two() => u64::from(p),
        p => return Err(format!("its header is corrupt (page size {p})")),
    };
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    // The page count in the header is valid when its change counter matches (SQLite's
    // "version-valid-for"); a write-ahead log may hold pages the file does not have yet.
    let wal = path.with_extension(match path.extension() {
        Some(e) => format!("{}-wal", e.to_string_lossy()),
        None => "-wal".into(),
    });
    let wal_has_frames = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
    let pages = u64::from(be32(28));
    if be32(24) == be32(92) && pages > 0 && !wal_has_frames && len < pages * page {
        return Err(format!(
            "it is truncated: {len} bytes, but its header says {pages} pages of {page} bytes"
        ));
    }
    if len % page != 0 && !wal_has_frames {
        return Err(format!(
            "it is truncated or torn: {len} bytes is not a whole number of {page}-byte pages"
        ));
    }
    Ok(())
}

/// Refuses a file written by a newer build, before anything touches it.
pub fn check_known(conn: &Connection) -> Result<i64, StoreError> {
    let found = version(conn)?;
    if !(0..=VERSION).contains(&found) {
        return Err(StoreError::UnknownSchema {
            found,
            known: VERSION,
        });
    }
    Ok(found)
}

/// Applies every pending migration, each in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let from = check_known(conn)?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database migrated");
    }
    Ok(())
}
