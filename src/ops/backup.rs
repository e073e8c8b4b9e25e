//! `unitgate backup` and `unitgate restore`.
//!
//! A backup is SQLite's online backup API run in one step from a read-only connection: one
//! read transaction, so the copy is the replica as of one commit while the daemon keeps
//! writing (WAL: the reader blocks nobody). It is written to `<file>.tmp`, switched to
//! rollback-journal mode (one self-contained file), integrity-checked, fsynced and renamed.
//!
//! A restore checks the file first (integrity, schema version, site), refuses while the
//! daemon holds the data directory's lock, keeps the current replica as
//! `<db>.before-restore-<timestamp>` (with its `-wal`, so nothing committed is dropped) and
//! renames the checked copy into place.

use super::lock::{DataDirLock, LockError};
use crate::store::{events, schema, site};
use rusqlite::{Connection, OpenFlags};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Errors of backup and restore.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target exists and `--force` was not given.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(String),
    /// There is no replica to back up.
    #[error("no replica at {0} (check store.data_dir)")]
    NoReplica(String),
    /// The file is not a usable unitgate replica.
    #[error("{path}: {reason}")]
    Unusable {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The backup belongs to another site.
    #[error(
        "{path} holds site {found:?} but the config says site {expected:?}; pass --force to restore it anyway"
    )]
    OtherSite {
        /// The file.
        path: String,
        /// Site in the file.
        found: String,
        /// Site in the config.
        expected: String,
    },
    /// The daemon is running.
    #[error("the daemon is running ({0}); stop it first (systemctl stop unitgate)")]
    DaemonRunning(String),
    /// The data directory's lock.
    #[error("{0}")]
    Lock(#[from] LockError),
    /// SQLite said no.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The store said no.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// File system trouble.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What a replica file holds, as checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// File size in bytes.
    pub bytes: u64,
    /// Schema version (`PRAGMA user_version`).
    pub schema_version: i64,
    /// The site it belongs to.
    pub site_id: Option<String>,
    /// The last event `seq`.
    pub last_seq: i64,
}

/// The result of a restore.
#[derive(Debug, Clone)]
pub struct Restored {
    /// What was restored.
    pub info: ReplicaInfo,
    /// Where the replica it replaced was kept (None when there was none).
    pub kept: Option<PathBuf>,
}

/// `<path><suffix>` (suffix appended to the file name, not replacing an extension).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Checks an open replica: integrity, a schema version this build knows, its site and seq.
fn inspect(conn: &Connection, path: &Path) -> Result<ReplicaInfo, BackupError> {
    let unusable = |reason: String| BackupError::Unusable {
        path: path.display().to_string(),
        reason,
    };
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| unusable(format!("not a readable SQLite database: {e}")))?;
    if check != "ok" {
        return Err(unusable(format!("integrity check failed: {check}")));
    }
    let schema_version = schema::check_known(conn).map_err(|e| unusable(e.to_string()))?;
    if schema_version == 0 {
        return Err(unusable(
            "not a unitgate replica (schema version 0: no tables)".into(),
        ));
    }
    Ok(ReplicaInfo {
        bytes: std::fs::metadata(path)?.len(),
        schema_version,
        site_id: site::id(conn)?,
        last_seq: events::last_seq(conn)?,
    })
}

/// Copies the replica at `db` into `dest` while the daemon may be writing to it.
pub fn backup(db: &Path, dest: &Path, force: bool) -> Result<ReplicaInfo, BackupError> {
    if dest.exists() && !force {
        return Err(BackupError::Exists(dest.display().to_string()));
    }
    if !db.exists() {
        return Err(BackupError::NoReplica(db.display().to_string()));
    }
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(std::time::Duration::from_secs(10))?;
    let tmp = with_suffix(dest, ".tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let result = (|| -> Result<ReplicaInfo, BackupError> {
        // It holds PIN hashes and tenants' names: readable by its owner only.
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        drop(opts.open(&tmp)?);
        let mut out = Connection::open(&tmp)?;
        {
            use rusqlite::backup::StepResult;
            let b = rusqlite::backup::Backup::new(&src, &mut out)?;
            // All pages in one step (-1): one read transaction, one consistent cut. Stepping
            // in pieces would restart from scratch whenever the daemon commits in between.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                match b.step(-1)? {
                    StepResult::Done => break,
                    // Only a writer holding the file in a non-WAL mode gets here; retry.
                    _ if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(50))
                    }
                    other => {
                        return Err(BackupError::Unusable {
                            path: db.display().to_string(),
                            reason: format!("the backup could not finish ({other:?})"),
                        });
                    }
                }
            }
        }
        // A single self-contained file: no -wal beside it to forget.
        let _: String = out.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
        let info = inspect(&out, &tmp)?;
        out.close().map_err(|(_, e)| e)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        Ok(info)
    })();
    let info = match result {
        Ok(i) => i,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, dest)?;
    fsync_dir(dest)?;
    Ok(info)
}

/// Checks a backup file without changing it.
pub fn check(file: &Path) -> Result<ReplicaInfo, BackupError> {
    if !file.is_file() {
        return Err(BackupError::Unusable {
            path: file.display().to_string(),
            reason: "no such file".into(),
        });
    }
    let conn = Connection::open_with_flags(file, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    inspect(&conn, file)
}

/// Replaces the replica at `db` (in `data_dir`) with the backup `file`. `site_id` is the
/// configured site; another site's backup needs `force`. `daemon_answers` says whether the
/// control socket answered (checked by the caller); the data directory's lock is checked
/// here and held throughout, so the daemon cannot start halfway.
pub fn restore(
    file: &Path,
    db: &Path,
    data_dir: &Path,
    site_id: &str,
    force: bool,
    daemon_answers: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Restored, BackupError> {
    let info = check(file)?;
    match &info.site_id {
        Some(found) if found != site_id && !force => {
            return Err(BackupError::OtherSite {
                path: file.display().to_string(),
                found: found.clone(),
                expected: site_id.to_owned(),
            });
        }
        _ => {}
    }
    std::fs::create_dir_all(data_dir)?;
    let _lock = match DataDirLock::acquire(data_dir) {
        Ok(l) => l,
        Err(LockError::Held { path }) => {
            return Err(BackupError::DaemonRunning(format!(
                "it holds the lock {path}"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if daemon_answers {
        return Err(BackupError::DaemonRunning(
            "it answers on the control socket".into(),
        ));
    }
    // The copy lands in the data directory first, so the final rename is atomic.
    let incoming = with_suffix(db, ".restore-tmp");
    std::fs::copy(file, &incoming)?;
    let prepared = (|| {
        std::fs::set_permissions(&incoming, std::fs::Permissions::from_mode(0o640))?;
        super::own_like(&incoming, data_dir)?;
        std::fs::File::open(&incoming)?.sync_all()
    })();
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&incoming);
        return Err(e.into());
    }
    let kept = if db.exists() {
        let stamp = now.format("%Y%m%dT%H%M%SZ");
        let kept = with_suffix(db, &format!(".before-restore-{stamp}"));
        // A hard link keeps the current replica without a moment with no replica at `db`.
        if std::fs::hard_link(db, &kept).is_err() {
            std::fs::copy(db, &kept)?;
        }
        // Its WAL may hold commits not yet in the file: it goes with it, under the name
        // SQLite looks for beside the kept file.
        let wal = with_suffix(db, "-wal");
        if wal.exists() {
            std::fs::rename(&wal, with_suffix(&kept, "-wal"))?;
        }
        Some(kept)
    } else {
        None
    };
    match std::fs::remove_file(with_suffix(db, "-shm")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    std::fs::rename(&incoming, db)?;
    fsync_dir(db)?;
    Ok(Restored { info, kept })
}
