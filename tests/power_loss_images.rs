//! Power loss without killing anything: the real gateway runs in-process on a VFS shim
//! (`common/synced_vfs.rs`) that knows which bytes each file has fsynced, and the test
//! takes hundreds of *synced images* — the database and its write-ahead log as a power
//! cut at that instant would leave them — while concurrent HTTP clients send allocation
//! commands with idempotency keys to units bound to smart locks (so each command also
//! writes the hardware outbox).
//!
//! Cuts land before random log writes (in the middle of a WAL append: frame headers and
//! pages are separate writes), before random log fsyncs (a commit's frames all written,
//! none durable), inside checkpoints (database writes and fsyncs) and from a timer between
//! operations. Clients may only run a few commands ahead of the checker, which keeps the
//! replica small and the run near a minute on a loaded two-core machine. Each cut also records, under the shim's lock, how
//! many commands the clients had seen acknowledged (200 received) and how many they had
//! sent, so the set a cut must keep is exact. Every image is then opened with the store's
//! own open path (which refuses corrupt files) and checked: `PRAGMA integrity_check` is ok;
//! every command acknowledged before the cut is there exactly once (idempotency record
//! with the very bytes the client got, unit status, allocation rows, its events counted
//! once) and each client's applied commands are a prefix of what it sent; the event log's
//! seq runs 1..=last_seq without a gap; each unit's outbox row wants what its status says.
//!
//! The shim's own tests show it is sharp: an unsynced write is missing from an image and a
//! synced one is there, and a connection with `synchronous=OFF` (or an acknowledgement
//! taken before the commit's fsync) loses "acknowledged" rows that the same check finds.
//!
//! `POWER_LOSS_IMAGES` (default 200) sets how many images the gateway test checks;
//! `POWER_LOSS_SEED` reproduces the cut choices (printed at start).

mod common;
#[path = "common/synced_vfs.rs"]
mod synced_vfs;

use common::{ADMIN, TestGateway};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use synced_vfs::{Image, Point, UndoLog};
use tokio::sync::watch;
use tokio::time::Instant;

/// Clients sending commands side by side, each on its own units and tenancy.
const WORKERS: usize = 4;
const UNITS_PER_WORKER: usize = 3;
/// Commands the clients may send per image checked (bounds the replica's growth).
const COMMANDS_PER_IMAGE: usize = 10;
/// Images waiting for the checker at most; cuts are skipped while it is behind.
const IN_FLIGHT: usize = 6;
/// The whole run must end within this (it ends as soon as enough images are checked).
const DEADLINE: Duration = Duration::from_secs(150);

/// Tests that set the shim's (process-wide) hook or rely on its sync rule take turns.
fn hook_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Opens a copied image directly on the real `unix` VFS (not through the shim).
fn open_raw(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        c"unix",
    )
}

fn integrity(conn: &Connection) -> Result<(), String> {
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(|e| format!("integrity_check: {e}"))?;
    if rows == ["ok"] {
        Ok(())
    } else {
        Err(format!("integrity_check: {rows:?}"))
    }
}

// ---- the shim on its own ------------------------------------------------------------------

/// The undo log against a model: after any mix of writes (inside, across and beyond the
/// end), truncations and syncs, undoing gives exactly the bytes of the last sync.
#[test]
fn undo_log_restores_the_last_synced_bytes() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..200 {
        let mut file: Vec<u8> = (0..rng.random_range(0..300))
            .map(|_| rng.random())
            .collect();
        let mut durable = file.clone();
        let mut log = UndoLog::new(file.len() as u64);
        for _ in 0..60 {
            match rng.random_range(0..10) {
                0 => {
                    log.synced(file.len() as u64);
                    durable = file.clone();
                }
                1 => {
                    let to = rng.random_range(0..=file.len());
                    log.before_truncate(to as u64, file.len() as u64, |o, n| {
                        file[o as usize..o as usize + n].to_vec()
                    });
                    file.truncate(to);
                }
                _ => {
                    // Ranges repeat often (SQLite rewrites the same pages): the dedup path.
                    let off = rng.random_range(0..40) * 16;
                    let len = rng.random_range(1..5) * 16;
                    log.before_write(off as u64, len, file.len() as u64, |o, n| {
                        file[o as usize..o as usize + n].to_vec()
                    });
                    if file.len() < off + len {
                        file.resize(off + len, 0);
                    }
                    for b in &mut file[off..off + len] {
                        *b = rng.random();
                    }
                }
            }
            let mut cut = file.clone();
            log.undo(&mut cut);
            assert_eq!(cut, durable, "an image is the last synced content");
        }
    }
}

/// Rows of `t` in an image of `db` (0 when the image has no table yet).
fn rows_in(image: &Image, dir: &Path) -> i64 {
    let db = image.write_to(dir, "copy.db").expect("image written");
    let conn = open_raw(&db).expect("image opens");
    integrity(&conn).expect("image is whole");
    let n = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap_or(0);
    drop(conn);
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    n
}

/// Through SQLite: a commit without fsync (`synchronous=OFF`) is missing from the image,
/// one with fsync (`FULL`) is there with everything logged before it; a checkpoint and
/// the log's reuse afterwards keep it so; a closed database (log checkpointed and deleted)
/// images as the one file.
#[test]
fn an_image_holds_synced_commits_only() {
    synced_vfs::install();
    let _turn = hook_turn();
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("a.db");
    let wal = dir.path().join("a.db-wal");
    let conn = Connection::open(&db).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    conn.execute_batch("CREATE TABLE t (x INTEGER)")
        .expect("table");
    conn.execute("INSERT INTO t VALUES (1)", [])
        .expect("insert");
    let img = synced_vfs::image(&db).expect("image");
    assert_eq!(rows_in(&img, scratch.path()), 1);
    assert_eq!(img.discarded, 0, "nothing unsynced after a FULL commit");

    // The negative control: "acknowledged" after COMMIT returned, but never fsynced.
    conn.pragma_update(None, "synchronous", "OFF").expect("off");
    for i in 2..=5 {
        conn.execute("INSERT INTO t VALUES (?1)", [i])
            .expect("insert");
    }
    assert_eq!(
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        5
    );
    assert!(
        synced_vfs::unsynced(&wal) > 0,
        "unsynced log writes are tracked"
    );
    let img = synced_vfs::image(&db).expect("image");
    assert!(img.discarded > 0);
    assert_eq!(
        rows_in(&img, scratch.path()),
        1,
        "four acknowledged rows lost: the harness sees loss"
    );

    // One FULL commit makes the whole log up to it durable.
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    conn.execute("INSERT INTO t VALUES (6)", [])
        .expect("insert");
    assert_eq!(synced_vfs::unsynced(&wal), 0);
    assert_eq!(
        rows_in(&synced_vfs::image(&db).expect("image"), scratch.path()),
        6
    );

    // Checkpoint (restarting the log), then commits overwrite the log from its start.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    for i in 7..=40 {
        conn.execute("INSERT INTO t VALUES (?1)", [i])
            .expect("insert");
    }
    assert_eq!(
        rows_in(&synced_vfs::image(&db).expect("image"), scratch.path()),
        40
    );
    conn.pragma_update(None, "synchronous", "OFF").expect("off");
    conn.execute("INSERT INTO t VALUES (41)", [])
        .expect("insert");
    assert_eq!(
        rows_in(&synced_vfs::image(&db).expect("image"), scratch.path()),
        40
    );
    // Closing checkpoints into the file, fsyncs it (FULL), then deletes the log.
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    drop(conn);
    assert!(!wal.exists(), "closing deletes the log");
    let img = synced_vfs::image(&db).expect("image");
    assert_eq!(img.files.len(), 1, "just the database file");
    assert_eq!(
        rows_in(&img, scratch.path()),
        41,
        "closing checkpoints and syncs"
    );
}

/// A cut inside a FULL commit, before its fsync, lacks that commit: an acknowledgement
/// given before the fsync (or a test reading acks outside the lock) would be caught.
#[test]
fn a_cut_before_the_commit_fsync_lacks_the_commit() {
    synced_vfs::install();
    let _turn = hook_turn();
    let dir = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("b.db");
    let conn = Connection::open(&db).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "FULL")
        .expect("full");
    conn.execute_batch("CREATE TABLE t (x INTEGER)")
        .expect("table");
    let cuts: Arc<Mutex<Vec<(Point, Image)>>> = Arc::default();
    let (sink, root) = (cuts.clone(), dir.path().to_owned());
    let db2 = db.clone();
    synced_vfs::set_hook(Some(Box::new(move |cut| {
        if cut.path.starts_with(&root)
            && let Ok(img) = cut.image(&db2)
            && let Ok(mut v) = sink.lock()
        {
            v.push((cut.point, img));
        }
    })));
    conn.execute("INSERT INTO t VALUES (1)", [])
        .expect("insert");
    synced_vfs::set_hook(None);
    let cuts = std::mem::take(&mut *cuts.lock().unwrap());
    let writes = cuts.iter().filter(|(p, _)| *p == Point::Write).count();
    let syncs: Vec<&Image> = cuts
        .iter()
        .filter(|(p, _)| *p == Point::Sync)
        .map(|(_, i)| i)
        .collect();
    assert!(
        writes >= 2,
        "a commit appends a frame header and a page: {writes}"
    );
    assert_eq!(syncs.len(), 1, "one fsync per commit");
    assert!(
        syncs[0].discarded >= 2,
        "the commit's frames are not durable yet"
    );
    assert_eq!(
        rows_in(syncs[0], scratch.path()),
        0,
        "the commit is not in the image"
    );
    for (p, img) in &cuts {
        assert_eq!(rows_in(img, scratch.path()), 0, "{p:?}");
    }
    assert_eq!(
        rows_in(&synced_vfs::image(&db).expect("image"), scratch.path()),
        1
    );
}

// ---- the gateway ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Grant,
    Deallocate,
}

#[derive(Debug, Clone)]
struct Sent {
    worker: usize,
    key: String,
    unit: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct Ack {
    worker: usize,
    key: String,
    body: Vec<u8>,
}

/// What the clients have done, appended in order.
#[derive(Default)]
struct Log {
    sent: Mutex<Vec<Sent>>,
    acks: Mutex<Vec<Ack>>,
}

/// One cut: the image and how far the clients were at that instant.
struct CutRecord {
    image: Image,
    /// At a cut before a log fsync: the files with nothing undone.
    live: Option<Image>,
    point: Point,
    /// `db`, `wal`: the file being written or synced.
    file: &'static str,
    acked: usize,
    sent: usize,
}

#[derive(Debug, Default)]
struct Tally {
    images: usize,
    by_point: BTreeMap<String, usize>,
    with_unsynced: usize,
    /// Cuts where some client's last command was committed but not yet acknowledged.
    applied_unacked: usize,
    /// Cuts where some client's sent command was not in the image (lost in flight).
    in_flight_dropped: usize,
    /// Cuts before a log fsync where the written (committed, not yet synced) log held a
    /// command the image lacks: acknowledging at COMMIT before the fsync would lose it.
    lost_if_acked_before_fsync: usize,
    acks_checked: usize,
    failures: Vec<String>,
}

fn worker_of_unit(i: usize) -> usize {
    i / UNITS_PER_WORKER
}

fn unit_id(i: usize) -> String {
    format!("u{}", i + 1)
}

/// Checks one image copied to `db`; returns `(applied_unacked, in_flight_dropped)`.
fn check_image(db: &Path, rec: &CutRecord, log: &Log) -> Result<(bool, bool), String> {
    // The store's own open path: refuses a corrupt or torn file, runs recovery, and its
    // close checkpoints the log into the file (as a restart after the cut would).
    let store = unitgate::store::Store::open(db).map_err(|e| format!("Store::open: {e}"))?;
    drop(store);
    let conn = open_raw(db).map_err(|e| format!("open: {e}"))?;
    integrity(&conn)?;
    let q = |e: rusqlite::Error| e.to_string();

    // The event log: 1..=last_seq, no gap.
    let (count, min, max): (i64, Option<i64>, Option<i64>) = conn
        .query_row("SELECT count(*), min(seq), max(seq) FROM events", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(q)?;
    let last_seq: i64 = conn
        .query_row("SELECT last_seq FROM site", [], |r| r.get(0))
        .map_err(q)?;
    if count != last_seq || (count > 0 && (min != Some(1) || max != Some(last_seq))) {
        return Err(format!(
            "event log not gapless: {count} events, seq {min:?}..{max:?}, last_seq {last_seq}"
        ));
    }

    let sent = log.sent.lock().unwrap()[..rec.sent].to_vec();
    let acks = log.acks.lock().unwrap()[..rec.acked].to_vec();
    let mut stored: BTreeMap<String, (i64, Vec<u8>)> = BTreeMap::new();
    {
        let mut st = conn
            // Keys are stored per token: `<token name> <Idempotency-Key>`.
            .prepare(
                "SELECT substr(key, 7), status, body FROM idempotency WHERE key LIKE 'admin w%'",
            )
            .map_err(q)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))
            .map_err(q)?;
        for row in rows {
            let (k, v) = row.map_err(q)?;
            stored.insert(k, v);
        }
    }
    // Every acknowledged command: its record, byte for byte as the client got it.
    for a in &acks {
        match stored.get(&a.key) {
            Some((200, body)) if *body == a.body => {}
            Some((status, body)) => {
                return Err(format!(
                    "acknowledged {} stored as {status} {:?}, client got {:?}",
                    a.key,
                    String::from_utf8_lossy(body),
                    String::from_utf8_lossy(&a.body)
                ));
            }
            None => return Err(format!("acknowledged {} lost", a.key)),
        }
    }
    // Per unit, in one pass each: grants and deallocations in the log, allocation rows.
    let mut per_unit: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut allocations: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut active_tenancy: BTreeMap<String, String> = BTreeMap::new();
    {
        let mut st = conn
            .prepare(
                "SELECT data->>'unit_id', count(*) FILTER (WHERE data->>'to' = 'occupied'),
                        count(*) FILTER (WHERE type = 'unit.deallocated')
                 FROM events WHERE data->>'unit_id' IS NOT NULL GROUP BY 1",
            )
            .map_err(q)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?))))
            .map_err(q)?;
        for row in rows {
            let (u, v) = row.map_err(q)?;
            per_unit.insert(u, v);
        }
        let mut st = conn
            .prepare(
                "SELECT unit_id, count(*), count(*) FILTER (WHERE ended_at IS NULL),
                        max(CASE WHEN ended_at IS NULL THEN tenancy_id END)
                 FROM unit_allocations GROUP BY unit_id",
            )
            .map_err(q)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (r.get(1)?, r.get(2)?),
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .map_err(q)?;
        for row in rows {
            let (u, v, t) = row.map_err(q)?;
            allocations.insert(u.clone(), v);
            active_tenancy.insert(u, t.unwrap_or_default());
        }
    }
    let (mut applied_unacked, mut dropped) = (false, false);
    let mut keys_seen = 0;
    for w in 0..WORKERS {
        let mine: Vec<&Sent> = sent.iter().filter(|s| s.worker == w).collect();
        let acked = acks.iter().filter(|a| a.worker == w).count();
        // The commands present are a prefix of what this client sent.
        let m = mine
            .iter()
            .take_while(|s| stored.contains_key(&s.key))
            .count();
        let present = mine.iter().filter(|s| stored.contains_key(&s.key)).count();
        keys_seen += present;
        if present != m || m < acked {
            return Err(format!(
                "worker {w}: {present} of its {} sent commands present, prefix {m}, {acked} acknowledged",
                mine.len()
            ));
        }
        applied_unacked |= m > acked;
        dropped |= m < mine.len();
        for u in (0..WORKERS * UNITS_PER_WORKER).filter(|&i| worker_of_unit(i) == w) {
            let unit = unit_id(u);
            let applied: Vec<Kind> = mine[..m]
                .iter()
                .filter(|s| s.unit == unit)
                .map(|s| s.kind)
                .collect();
            let grants = applied.iter().filter(|k| **k == Kind::Grant).count() as i64;
            let deallocs = applied.len() as i64 - grants;
            let occupied = applied.last() == Some(&Kind::Grant);
            let status: String = conn
                .query_row("SELECT status FROM units WHERE id = ?1", [&unit], |r| {
                    r.get(0)
                })
                .map_err(q)?;
            let want = if occupied { "occupied" } else { "available" };
            if status != want {
                return Err(format!(
                    "{unit}: status {status}, commands say {want} ({applied:?})"
                ));
            }
            let (allocs, active) = allocations.get(&unit).copied().unwrap_or((0, 0));
            let tenancy_ok = !occupied
                || active_tenancy.get(&unit).map(String::as_str) == Some(format!("tw{w}").as_str());
            if allocs != grants || active != i64::from(occupied) || !tenancy_ok {
                return Err(format!(
                    "{unit}: {allocs} allocations ({active} active), commands say {grants} ({applied:?})"
                ));
            }
            let (to_occupied, deallocated) = per_unit.get(&unit).copied().unwrap_or((0, 0));
            if (to_occupied, deallocated) != (grants, deallocs) {
                return Err(format!(
                    "{unit}: events show {to_occupied} grants and {deallocated} deallocations, \
                     commands say {grants} and {deallocs}: not exactly once"
                ));
            }
            let desired: String = conn
                .query_row(
                    "SELECT desired FROM device_targets WHERE target = ?1",
                    [format!("lock:lock-{unit}")],
                    |r| r.get(0),
                )
                .map_err(|e| format!("{unit}: outbox row: {e}"))?;
            let desired: Value = serde_json::from_str(&desired).map_err(|e| e.to_string())?;
            let want = if occupied {
                json!({"state": "assigned", "tenant_ref": format!("cw{w}")})
            } else {
                json!({"state": "unassigned"})
            };
            if desired["target"] != want {
                return Err(format!(
                    "{unit}: outbox wants {desired}, status says {want}"
                ));
            }
        }
    }
    if keys_seen != stored.len() {
        return Err(format!(
            "{} idempotency records, {keys_seen} of them from commands sent before the cut",
            stored.len()
        ));
    }
    Ok((applied_unacked, dropped))
}

/// The idempotency keys in an image, opened directly (no store, no checks).
fn keys_in(dir: &Path, name: &str, image: &Image) -> Result<BTreeSet<String>, String> {
    let db = image.write_to(dir, name).map_err(|e| e.to_string())?;
    let conn = open_raw(&db).map_err(|e| e.to_string())?;
    let mut st = conn
        .prepare("SELECT key FROM idempotency")
        .map_err(|e| e.to_string())?;
    let keys = st
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<BTreeSet<String>>>())
        .map_err(|e| e.to_string())?;
    Ok(keys)
}

/// Whether the live files at a cut before a log fsync hold commands the synced image
/// lacks (they must not hold fewer).
fn lost_before_fsync(dir: &Path, live: &Image, synced: &Image) -> Result<bool, String> {
    let live = keys_in(dir, "live.db", live)?;
    let synced = keys_in(dir, "synced.db", synced)?;
    if !synced.is_subset(&live) {
        return Err("the synced image holds keys the live files do not".into());
    }
    Ok(live.len() > synced.len())
}

fn checker(
    rx: mpsc::Receiver<CutRecord>,
    log: Arc<Log>,
    pending: Arc<AtomicUsize>,
    checked: Arc<AtomicUsize>,
    allowance: Arc<watch::Sender<usize>>,
    keep_failed: bool,
) -> Tally {
    let mut tally = Tally::default();
    let scratch = tempfile::tempdir().expect("tempdir");
    for rec in rx {
        let dir = scratch.path().join(format!("cut-{}", tally.images));
        let result = std::fs::create_dir(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                rec.image
                    .write_to(&dir, "unitgate.db")
                    .map_err(|e| e.to_string())
            })
            .and_then(|db| check_image(&db, &rec, &log))
            .and_then(|found| match &rec.live {
                Some(live) => Ok((found, lost_before_fsync(&dir, live, &rec.image)?)),
                None => Ok((found, false)),
            });
        pending.fetch_sub(1, Ordering::SeqCst);
        if std::env::var("PL_DEBUG").is_ok() {
            eprintln!(
                "DBG image {} {:?} {:?}",
                tally.images,
                std::time::SystemTime::now(),
                result.as_ref().err()
            );
        }
        tally.images += 1;
        *tally
            .by_point
            .entry(format!("{:?}{}", rec.point, rec.file))
            .or_default() += 1;
        tally.with_unsynced += usize::from(rec.image.discarded > 0);
        tally.acks_checked += rec.acked;
        match result {
            Ok(((unacked, dropped), lost)) => {
                tally.lost_if_acked_before_fsync += usize::from(lost);
                tally.applied_unacked += usize::from(unacked);
                tally.in_flight_dropped += usize::from(dropped);
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => tally.failures.push(format!(
                "cut {} ({:?}, {} acked, {} sent, {} unsynced writes undone; kept in {}): {e}",
                tally.images,
                rec.point,
                rec.acked,
                rec.sent,
                rec.image.discarded,
                dir.display()
            )),
        }
        let done = checked.fetch_add(1, Ordering::SeqCst) + 1;
        allowance.send_if_modified(|a| {
            let more = (done + IN_FLIGHT) * COMMANDS_PER_IMAGE;
            let grow = more > *a;
            if grow {
                *a = more;
            }
            grow
        });
    }
    if keep_failed && !tally.failures.is_empty() {
        // Keep the failing images for a look.
        let _ = scratch.keep();
    }
    tally
}

/// Requests resent after a transport error (the connection closed before an answer).
static TRANSPORT_RETRIES: AtomicUsize = AtomicUsize::new(0);

/// One client: alternates grant_access and deallocate on its units with fresh keys,
/// replays every fourth command (same key) and checks the replay is byte-identical.
async fn client(
    w: usize,
    base: String,
    log: Arc<Log>,
    stop: Arc<AtomicBool>,
    mut allowance: watch::Receiver<usize>,
) -> Result<usize, String> {
    let http = reqwest::Client::new();
    let mut occupied = [false; UNITS_PER_WORKER];
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        // Keeps the replica (and so each image's check) small: the load waits for the checker.
        allowance
            .wait_for(|&a| log.sent.lock().map_or(0, |s| s.len()) < a)
            .await
            .map_err(|e| e.to_string())?;
        let slot = n % UNITS_PER_WORKER;
        let unit = unit_id(w * UNITS_PER_WORKER + slot);
        let (kind, path, body) = if occupied[slot] {
            (
                Kind::Deallocate,
                format!("/v1/units/{unit}/deallocate"),
                json!({}),
            )
        } else {
            (
                Kind::Grant,
                format!("/v1/units/{unit}/grant_access"),
                json!({"tenancy_id": format!("tw{w}")}),
            )
        };
        let key = format!("w{w}-{n}");
        log.sent.lock().unwrap().push(Sent {
            worker: w,
            key: key.clone(),
            unit: unit.clone(),
            kind,
        });
        let send = || async {
            let mut retries = 0;
            loop {
                let answer = async {
                    let res = http
                        .post(format!("{base}{path}"))
                        .bearer_auth(ADMIN)
                        .header("Idempotency-Key", &key)
                        .json(&body)
                        .send()
                        .await?;
                    let status = res.status().as_u16();
                    Ok::<_, reqwest::Error>((status, res.bytes().await?.to_vec()))
                };
                match answer.await {
                    Ok((200, bytes)) => return Ok(bytes),
                    Ok((status, bytes)) => {
                        return Err(format!(
                            "{key}: {status} {}",
                            String::from_utf8_lossy(&bytes)
                        ));
                    }
                    // The outcome is unknown: ask again with the same key, as a client must.
                    Err(e) if retries < 5 => {
                        retries += 1;
                        TRANSPORT_RETRIES.fetch_add(1, Ordering::SeqCst);
                        eprintln!("{key}: {e:?}; retrying with the same key");
                    }
                    Err(e) => return Err(format!("{key}: {e:?}")),
                }
            }
        };
        let bytes = send().await?;
        log.acks.lock().unwrap().push(Ack {
            worker: w,
            key: key.clone(),
            body: bytes.clone(),
        });
        occupied[slot] = kind == Kind::Grant;
        if n % 4 == 3 {
            let again = send().await?;
            if again != bytes {
                return Err(format!("{key}: replay differs"));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Runs the gateway under load, cutting power until `target` images are checked; returns
/// what the checker found (failing images are kept on disk if `keep_failed`).
async fn run_power_cuts(target: usize, seed: u64, keep_failed: bool) -> Tally {
    let started = Instant::now();

    let t = TestGateway::start().await;
    t.seed(WORKERS * UNITS_PER_WORKER).await;
    for w in 0..WORKERS {
        let a = t
            .put(
                &format!("/v1/contacts/cw{w}"),
                json!({"name": format!("Worker {w}"), "access_code": format!("{}", 4000 + 7 * w)}),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
        let a = t
            .put(
                &format!("/v1/tenancies/tw{w}"),
                json!({"contact_id": format!("cw{w}"), "start_date": "2026-03-01"}),
            )
            .await;
        assert_eq!(a.status, 201, "{:?}", a.body);
    }
    for i in 0..WORKERS * UNITS_PER_WORKER {
        let unit = unit_id(i);
        let a = t
            .patch(
                &format!("/v1/units/{unit}"),
                json!({"unit": {"lock": {"kind": "smart_lock", "id": format!("lock-{unit}")}}}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let db: PathBuf = t.cfg.store.db_path();
    let data_dir = t.cfg.store.data_dir.clone();

    let log = Arc::new(Log::default());
    let pending = Arc::new(AtomicUsize::new(0));
    let checked = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<CutRecord>();
    let allowance = Arc::new(watch::Sender::new(IN_FLIGHT * COMMANDS_PER_IMAGE));
    let check_thread = {
        let (log, pending, checked) = (log.clone(), pending.clone(), checked.clone());
        let allowance = allowance.clone();
        std::thread::spawn(move || checker(rx, log, pending, checked, allowance, keep_failed))
    };

    // File operations on the gateway's replica, by kind (as the hook saw them).
    let ops: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    // Cuts from inside the shim: before random writes and fsyncs of the gateway's files.
    let take = {
        let (log, pending, db) = (log.clone(), pending.clone(), db.clone());
        move |cut: &synced_vfs::Cut<'_>, tx: &mpsc::Sender<CutRecord>, force: bool| -> bool {
            if !force && pending.load(Ordering::SeqCst) >= IN_FLIGHT {
                return false;
            }
            // Under the shim's lock: acks counted here were received before the image.
            let acked = log.acks.lock().map_or(0, |a| a.len());
            let sent = log.sent.lock().map_or(0, |s| s.len());
            let Ok(image) = cut.image(&db) else {
                return false;
            };
            let wal = cut.path.to_string_lossy().ends_with("-wal");
            let live = if cut.point == Point::Sync && wal {
                cut.live(&db).ok()
            } else {
                None
            };
            pending.fetch_add(1, Ordering::SeqCst);
            if tx
                .send(CutRecord {
                    image,
                    live,
                    point: cut.point,
                    file: match cut.point {
                        Point::Between => "",
                        _ if wal => "wal",
                        _ => "db",
                    },
                    acked,
                    sent,
                })
                .is_err()
            {
                pending.fetch_sub(1, Ordering::SeqCst);
                return false;
            }
            true
        }
    };
    {
        let (take, tx, dir) = (take.clone(), tx.clone(), data_dir.clone());
        let pending = pending.clone();
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut log_writes, mut log_syncs) = (0usize, 0usize);
        let ops = ops.clone();
        synced_vfs::set_hook(Some(Box::new(move |cut| {
            if !cut.path.starts_with(&dir) {
                return;
            }
            // Log writes are many (a frame header and a page each), log fsyncs one per
            // commit, database writes and fsyncs rare (checkpoints): cut every kind, about
            // two cuts inside a log append for each cut before a log fsync.
            let wal = cut.path.to_string_lossy().ends_with("-wal");
            if let Ok(mut ops) = ops.lock() {
                *ops.entry(format!("{:?}{}", cut.point, if wal { "wal" } else { "db" }))
                    .or_default() += 1;
            }
            let (p, turn) = match (cut.point, wal) {
                (Point::Write, true) => (0.2, log_writes <= 2 * log_syncs),
                (Point::Sync, true) => (0.8, 2 * log_syncs <= log_writes),
                // A checkpoint writes many database pages in a burst, then fsyncs.
                (Point::Write, false) => (0.02, true),
                _ => (1.0, true),
            };
            // Database-file cuts (rare: checkpoints) may exceed the queue's bound a little.
            let room = if wal { IN_FLIGHT } else { IN_FLIGHT + 3 };
            if turn
                && pending.load(Ordering::SeqCst) < room
                && rng.random_bool(p)
                && take(cut, &tx, !wal)
            {
                match (cut.point, wal) {
                    (Point::Write, true) => log_writes += 1,
                    (Point::Sync, true) => log_syncs += 1,
                    _ => {}
                }
            }
        })));
    }
    // Cuts from a timer, between file operations.
    let stop_timer = Arc::new(AtomicBool::new(false));
    let timer = {
        let (take, tx, db, stop) = (take.clone(), tx.clone(), db.clone(), stop_timer.clone());
        let pending = pending.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // Leaves most of the checker's queue to cuts inside file operations.
                synced_vfs::at_once(&db, |cut| {
                    pending.load(Ordering::SeqCst) < IN_FLIGHT / 3 && take(cut, &tx, false)
                });
                std::thread::sleep(Duration::from_millis(10)); // the cut rate, not a wait
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(client(
                w,
                t.base.clone(),
                log.clone(),
                stop.clone(),
                allowance.subscribe(),
            ))
        })
        .collect();
    loop {
        let done = checked.load(Ordering::SeqCst);
        if done >= target || clients.iter().any(|c| c.is_finished()) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {done} of {target} images checked within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    stop.store(true, Ordering::SeqCst);
    allowance.send_replace(usize::MAX);
    let mut commands = 0;
    for c in clients {
        commands += c
            .await
            .expect("client task")
            .expect("every command answered 200");
    }
    stop_timer.store(true, Ordering::SeqCst);
    timer.join().expect("timer thread");
    synced_vfs::set_hook(None);
    // A last cut with every command acknowledged: all of them must be in it.
    assert!(synced_vfs::at_once(&db, |cut| take(cut, &tx, true)));
    drop(tx);
    drop(take);
    let tally = check_thread.join().expect("checker thread");
    t.stop().await;

    println!(
        "power-loss images: {} images checked ({:?}) in {:.1?}; {} commands sent \
         ({} acknowledged), {} acknowledgements checked across cuts; {} images had unsynced \
         writes undone, {} cut a committed but unacknowledged command, {} dropped an \
         in-flight command, {} cut before a log fsync whose commit an ack at COMMIT would have lost; {} requests resent after a transport error; \
         file operations seen: {:?}",
        tally.images,
        tally.by_point,
        started.elapsed(),
        commands,
        log.acks.lock().unwrap().len(),
        tally.acks_checked,
        tally.with_unsynced,
        tally.applied_unacked,
        tally.in_flight_dropped,
        tally.lost_if_acked_before_fsync,
        TRANSPORT_RETRIES.load(Ordering::SeqCst),
        ops.lock().unwrap(),
    );
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::await_holding_lock,
    reason = "the guard only orders this binary's tests; nothing in the runtime takes it"
)]
async fn acknowledged_commands_survive_every_power_cut() {
    synced_vfs::install();
    let _turn = hook_turn();
    let target = env_u64("POWER_LOSS_IMAGES").unwrap_or(200) as usize;
    let seed = env_u64("POWER_LOSS_SEED").unwrap_or_else(rand::random);
    println!("POWER_LOSS_SEED={seed} POWER_LOSS_IMAGES={target}");
    let tally = run_power_cuts(target, seed, true).await;
    assert!(
        tally.failures.is_empty(),
        "{} of {} images failed; first: {:#?}",
        tally.failures.len(),
        tally.images,
        &tally.failures[..tally.failures.len().min(5)]
    );
    assert!(tally.images >= target, "{} images", tally.images);
    // The cuts were sharp: they undid unsynced writes and landed inside commits.
    assert!(tally.with_unsynced * 4 >= tally.images, "{tally:?}");
    assert!(
        tally.in_flight_dropped > 0 && tally.applied_unacked > 0,
        "{tally:?}"
    );
    // And an acknowledgement given before the fsync would have been caught.
    assert!(tally.lost_if_acked_before_fsync > 0, "{tally:?}");
}

/// The negative control over the whole harness: the same run with the write-ahead log's
/// fsyncs not counted as durable (a store on `synchronous=OFF`, acknowledging commits
/// the disk does not hold) fails the check with acknowledged commands lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::await_holding_lock,
    reason = "the guard only orders this binary's tests; nothing in the runtime takes it"
)]
async fn the_check_catches_acknowledgements_without_fsync() {
    synced_vfs::install();
    let _turn = hook_turn();
    synced_vfs::set_wal_syncs_durable(false);
    let tally = run_power_cuts(30, 1, false).await;
    synced_vfs::set_wal_syncs_durable(true);
    let lost = tally.failures.iter().filter(|f| f.contains("lost")).count();
    println!(
        "negative control: {lost} of {} images lost acknowledged commands",
        tally.images
    );
    assert!(lost > 0, "{tally:?}");
}
