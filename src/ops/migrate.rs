//! `unitgate migrate`: applies pending schema migrations to the replica without starting
//! the daemon (it would apply them at start too). A file written by a newer build is
//! refused before anything touches it.

use super::lock::{DataDirLock, LockError};
use crate::store::{StoreError, schema};
use rusqlite::Connection;
use std::path::Path;

/// Errors of `migrate`.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The daemon holds the data directory.
    #[error("the daemon is running (it holds the lock {0}); stop it first")]
    DaemonRunning(String),
    /// The data directory's lock.
    #[error("{0}")]
    Lock(LockError),
    /// The store refused (unknown schema version, not a database, ...).
    #[error("{db}: {source}")]
    Store {
        /// The database file.
        db: String,
        /// Cause.
        source: StoreError,
    },
    /// File system trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// From which schema version to which the file went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Version before.
    pub from: i64,
    /// Version after (this build's [`schema::VERSION`]).
    pub to: i64,
}

/// Migrates the replica at `db` (creating it, in `data_dir`, when there is none).
pub fn migrate(db: &Path, data_dir: &Path) -> Result<Migrated, MigrateError> {
    std::fs::create_dir_all(data_dir)?;
    let _lock = DataDirLock::acquire(data_dir).map_err(|e| match e {
        LockError::Held { path } => MigrateError::DaemonRunning(path),
        e => MigrateError::Lock(e),
    })?;
    let store = |source: StoreError| MigrateError::Store {
        db: db.display().to_string(),
        source,
    };
    let sqlite = |e: rusqlite::Error| store(e.into());
    let mut conn = Connection::open(db).map_err(sqlite)?;
    // Before anything writes: a newer file is left exactly as it is.
    let from = schema::check_known(&conn).map_err(store)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(sqlite)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sqlite)?;
    schema::migrate(&mut conn).map_err(store)?;
    let to = schema::version(&conn).map_err(store)?;
    conn.close().map_err(|(_, e)| sqlite(e))?;
    // Closing checkpointed and removed the -wal: the file is all there is to hand over.
    super::own_like(db, data_dir)?;
    Ok(Migrated { from, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_a_fresh_file_then_has_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("unitgate.db");
        let m = migrate(&db, dir.path()).unwrap();
        assert_eq!((m.from, m.to), (0, schema::VERSION));
        let again = migrate(&db, dir.path()).unwrap();
        assert_eq!((again.from, again.to), (schema::VERSION, schema::VERSION));
    }

    #[test]
    fn a_newer_file_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("unitgate.db");
        Connection::open(&db)
            .unwrap()
            .pragma_update(None, "user_version", schema::VERSION + 1)
            .unwrap();
        let before = std::fs::read(&db).unwrap();
        let e = migrate(&db, dir.path()).unwrap_err();
        assert!(e.to_string().contains("refusing to touch it"), "{e}");
        assert_eq!(std::fs::read(&db).unwrap(), before);
    }

    #[test]
    fn a_replica_made_by_root_goes_to_the_data_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        if std::fs::metadata(dir.path()).unwrap().uid() != 0 {
            return; // only root can hand a file to another user
        }
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(65534), Some(65534)).unwrap();
        migrate(&data.join("unitgate.db"), &data).unwrap();
        let m = std::fs::metadata(data.join("unitgate.db")).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534));
        // The lock file root made stays usable by that user: flock needs only read access.
        let lock = std::fs::metadata(data.join(crate::ops::lock::LOCK_FILE)).unwrap();
        assert_eq!(lock.mode() & 0o004, 0o004);
    }

    #[test]
    fn refused_while_the_data_directory_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _daemon = DataDirLock::acquire(dir.path()).unwrap();
        let e = migrate(&dir.path().join("unitgate.db"), dir.path()).unwrap_err();
        assert!(matches!(e, MigrateError::DaemonRunning(_)), "{e}");
    }
}
