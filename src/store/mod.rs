//! The SQLite replica: one writer thread with group commit, a pool of readers.
//!
//! Writes are closures sent to the writer thread. It takes every job waiting, runs each
//! in its own savepoint inside one transaction, commits once (one fsync for the batch),
//! and only then answers each job. So a reply means the change is on disk, and a job that
//! fails rolls back alone. Readers use their own connections (WAL: they never block the
//! writer) on the blocking pool.

pub mod alarms;
pub mod cloud;
pub mod events;
pub mod idempotency;
pub mod outbox;
pub mod people;
pub mod schema;
pub mod site;
pub mod units;

use crate::failpoint;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer build.
    #[error(
        "the database has schema version {found}, but this build knows versions up to {known}; refusing to touch it"
    )]
    UnknownSchema {
        /// Version in the file.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// The file is not a replica this build can use (not SQLite, truncated, corrupt, or
    /// from a newer build). Nothing was written to it.
    #[error("{}: {reason}. The file was left untouched. {hint}", path.display())]
    Refused {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
        /// What the operator can do.
        hint: &'static str,
    },
    /// The file holds another site's replica.
    #[error(
        "the database belongs to site {found:?} but the config says site {expected:?}; refusing to mix replicas"
    )]
    SiteMismatch {
        /// Site in the file.
        found: String,
        /// Site in the config.
        expected: String,
    },
    /// A stored value does not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The writer thread is gone (shutting down, or it panicked).
    #[error("the store is shutting down")]
    Closed,
    /// File system trouble opening the store.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

type Job = Box<dyn FnOnce(&Connection) -> Finished + Send>;

/// A job that has run: whether to keep its savepoint, and how to answer once committed.
struct Finished {
    keep: bool,
    answer: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

/// How many jobs one transaction takes at most.
const MAX_BATCH: usize = 512;

struct Inner {
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Readers close first, so the writer's connection is the last one: closing it
        // checkpoints the write-ahead log into the file and removes the log (a clean stop
        // leaves one self-contained file).
        if let Ok(mut readers) = self.readers.lock() {
            readers.clear();
        }
        // Closing the channel lets the writer finish its batch and exit; wait for it so a
        // reopen of the same file sees everything that was answered.
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// A cheap, cloneable handle to the replica.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// What to do about a damaged database file.
const RESTORE_HINT: &str = "Restore a backup (unitgate restore <backup-file>), or move the file away to start with an empty replica that the cloud then fills with a snapshot.";
/// What to do about a database from a newer build.
const UPGRADE_HINT: &str = "It was written by a newer unitgate: install that version (or newer), or restore a backup made by this version (unitgate restore <backup-file>).";

fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    stable_plans(conn)?;
    Ok(())
}

/// Turns on SQLite's query planner stability guarantee: a statement's plan no longer
/// depends on the values bound to it. Without it, a statement whose planning looked at a
/// bound value (any `col = ?` the planner weighs, `LIMIT ?`) is marked to be re-planned,
/// and rusqlite's statement cache clears the bindings of every statement it takes back,
/// so each use of such a cached statement parsed and planned it again (issue 9: the unit
/// query, three joins, was re-prepared on every call, half of a command's instructions).
fn stable_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database file, refusing unknown schema versions
    /// before changing anything, then migrates and starts the writer thread.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let refuse = |reason: String, hint: &'static str| StoreError::Refused {
            path: path.to_owned(),
            reason,
            hint,
        };
        schema::check_file(path).map_err(|reason| refuse(reason, RESTORE_HINT))?;
        let mut conn = Connection::open(path)?;
        // Only reads until the file is known to be a healthy replica of a known version.
        let known = schema::check_known(&conn).and_then(|v| {
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
            Ok(v)
        });
        match known {
            Ok(_) => {}
            Err(StoreError::UnknownSchema { found, known }) => {
                return Err(refuse(
                    format!("its schema version is {found}, newer than this build knows ({known})"),
                    UPGRADE_HINT,
                ));
            }
            Err(StoreError::Sqlite(e)) if is_corrupt(&e) => {
                return Err(refuse(
                    format!("not a usable SQLite database ({e})"),
                    RESTORE_HINT,
                ));
            }
            Err(e) => return Err(e),
        }
        configure_writer(&conn)?;
        schema::migrate(&mut conn)?;
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx))?;
        Ok(Store {
            inner: Arc::new(Inner {
                jobs: Some(tx),
                writer: Some(writer),
                readers: Mutex::new(Vec::new()),
                path: path.to_owned(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in the writer's transaction. Resolves after the commit is durable; if `f`
    /// fails, its changes are rolled back and the others in the batch are unaffected.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |conn| {
            let result = f(conn);
            Finished {
                keep: result.is_ok(),
                answer: Box::new(move |commit| {
                    let _ = reply.send(match commit {
                        Ok(()) => result,
                        Err(e) => Err(e.into()),
                    });
                }),
            }
        });
        let jobs = self.inner.jobs.as_ref().ok_or(StoreError::Closed)?;
        jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a read-only connection on the blocking pool.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock().ok().and_then(|mut p| p.pop()) {
                Some(c) => c,
                None => open_reader(&inner.path)?,
            };
            let result = f(&conn);
            if let Ok(mut pool) = inner.readers.lock() {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|_| E::from(StoreError::Closed))?
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    stable_plans(&conn)?;
    Ok(conn)
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut answers = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = exec_cached(&conn, "BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "store: cannot begin a transaction");
            // Jobs are dropped unanswered: callers see `Closed`-like failure, nothing applied.
            batch.clear();
            continue;
        }
        for job in batch.drain(..) {
            answers.push(run_job(&conn, job));
        }
        let commit = failpoint::check(failpoint::STORE_COMMIT_BEFORE)
            .map_err(StoreError::from)
            .and_then(|()| exec_cached(&conn, "COMMIT"));
        if let Err(e) = &commit {
            tracing::error!(error = %e, "store: commit failed; the batch is rolled back");
            let _ = conn.execute_batch("ROLLBACK");
        }
        // Durable, not yet answered: an `error` here is an acknowledgement that never
        // reaches its caller (who retries with the same idempotency key).
        let commit = commit.and_then(|()| {
            failpoint::check(failpoint::STORE_COMMIT_AFTER).map_err(StoreError::from)
        });
        for answer in answers.drain(..) {
            answer(match &commit {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Corrupt(format!("commit failed: {e}"))),
            });
        }
    }
}

fn run_job(conn: &Connection, job: Job) -> Box<dyn FnOnce(Result<(), StoreError>) + Send> {
    if let Err(e) = exec_cached(conn, "SAVEPOINT job") {
        tracing::error!(error = %e, "store: cannot open a savepoint");
        return Box::new(|_| {});
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn))) {
        Ok(done) => {
            let end = if done.keep {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            let ended = if done.keep {
                exec_cached(conn, end)
            } else {
                conn.execute_batch(end).map_err(StoreError::from)
            };
            if let Err(e) = ended {
                tracing::error!(error = %e, "store: savepoint end failed");
            }
            done.answer
        }
        Err(_) => {
            // The job panicked: undo it; its caller sees the writer as gone for this call.
            tracing::error!("store: a write job panicked; its changes are rolled back");
            let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
            Box::new(|_| {})
        }
    }
}

/// Runs one statement through the connection's statement cache: the writer runs
/// `BEGIN`/`SAVEPOINT`/`RELEASE`/`COMMIT` several times per job, and `execute_batch` would
/// parse each afresh (issue 9).
fn exec_cached(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs `f` inside a nested savepoint: all of it or none of it.
pub fn atomically<T, E>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    exec_cached(conn, "SAVEPOINT inner")?;
    match f(conn) {
        Ok(v) => {
            exec_cached(conn, "RELEASE inner")?;
            Ok(v)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO inner; RELEASE inner")
                .map_err(StoreError::from)?;
            Err(e)
        }
    }
}

/// Now, as stored: RFC 3339 UTC with milliseconds.
pub fn timestamp(now: chrono::DateTime<chrono::Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_newer_schema_without_touching_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        match Store::open(&path) {
            Err(e @ StoreError::Refused { .. }) => {
                let m = e.to_string();
                assert!(
                    m.contains("u.db") && m.contains("schema version is 99"),
                    "{m}"
                );
                assert!(m.contains(&format!("({})", schema::VERSION)), "{m}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("u.db-wal").exists());
    }

    #[test]
    fn refuses_random_bytes_and_a_truncated_file_without_touching_them() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.db");
        {
            let c = Connection::open(&good).unwrap();
            c.execute_batch("CREATE TABLE t (x BLOB); INSERT INTO t VALUES (zeroblob(100000));")
                .unwrap();
        }
        let full = std::fs::read(&good).unwrap();
        let random: Vec<u8> = (0..8192).map(|_| rand::random::<u8>()).collect();
        for (name, bytes) in [
            ("random.db", random),
            ("truncated.db", full[..full.len() / 2].to_vec()),
            ("torn.db", full[..full.len() - 100].to_vec()),
            ("stub.db", full[..50].to_vec()),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let err = Store::open(&path).unwrap_err();
            assert!(matches!(err, StoreError::Refused { .. }), "{name}: {err}");
            assert!(err.to_string().contains(name), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name} changed");
        }
        Store::open(&good).unwrap();
        Store::open(&dir.path().join("empty.db")).unwrap();
    }

    #[tokio::test]
    async fn refuses_another_sites_replica() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        let now = chrono::Utc::now();
        let settings = serde_json::json!({});
        let s = Store::open(&path).unwrap();
        s.write(move |c| site::ensure(c, "site-a", "A", "UTC", &settings, now))
            .await
            .unwrap();
        let settings = serde_json::json!({});
        let err = s
            .write(move |c| site::ensure(c, "site-b", "B", "UTC", &settings, now))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::SiteMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_failed_job_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("u.db")).unwrap();
        s.write(|c| {
            c.execute_batch("CREATE TABLE t (x INTEGER)")
                .map_err(StoreError::from)
        })
        .await
        .unwrap();
        let ok = s.write(|c| {
            c.execute("INSERT INTO t VALUES (1)", [])
                .map_err(StoreError::from)
        });
        let bad = s.write(|c| -> Result<(), StoreError> {
            c.execute("INSERT INTO t VALUES (2)", [])?;
            Err(StoreError::Corrupt("refused".into()))
        });
        let (ok, bad) = tokio::join!(ok, bad);
        assert!(ok.is_ok() && bad.is_err());
        let rows: Vec<i64> = s
            .read(|c| -> Result<Vec<i64>, StoreError> {
                let mut st = c.prepare("SELECT x FROM t ORDER BY x")?;
                let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok(v)
            })
            .await
            .unwrap();
        assert_eq!(rows, [1]);
    }
}
