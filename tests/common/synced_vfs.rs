//! A test-only SQLite VFS that knows what a power cut would leave on disk.
//!
//! [`install`] registers `synced`, a shim over the default `unix` VFS, as the process's
//! default VFS, so every connection opened afterwards (the store's writer and readers
//! included) goes through it. For each main database, write-ahead log and rollback journal
//! it keeps an undo log of everything written since that file's last `xSync`: before an
//! `xWrite` the old bytes of the range (unless that exact range is already recorded since
//! the sync), before an `xTruncate` the old tail, plus the file's length at the sync. An
//! `xSync` (on any handle of the file: fsync is per file) empties the log.
//!
//! [`image`] (or [`Cut::image`] from inside the hook) then copies a database and its `-wal`
//! and `-journal` with every unsynced change undone, in reverse order, and the length cut
//! back to the synced one: the disk as a power failure at that instant would leave it.
//! The copy is taken under the one lock every tracked write, truncate and sync also
//! holds, so it is consistent with concurrent writers. [`set_hook`] runs a closure at
//! each write and sync (before it, under that lock), so a test can cut in the middle of a
//! WAL append or between a commit's writes and its fsync.
//!
//! Simplifications, all on the side of keeping data (a real disk may lose more):
//! - a file created since the last directory fsync is assumed to exist, and a deleted one
//!   to be gone (directory entries are durable at once);
//! - every unsynced write is lost whole, none torn or half kept (SQLite must cope with
//!   either; losing all is the case that tests acknowledgements);
//! - the `-shm` index is not tracked or imaged: it is rebuilt from the log on open;
//! - an image reads the live files with `std::fs`, whose close drops the process's POSIX
//!   advisory locks on them as seen by *other* processes (fine in one test process:
//!   SQLite orders its own connections in memory, and WAL locks live in `-shm`);
//! - writes the unix VFS makes behind SQLite's file methods (the size hint that grows the
//!   database before a checkpoint) are not seen, but they only grow the file, and the cut
//!   to the synced length undoes them.

use rusqlite::ffi;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};

/// What one file would lose: its writes and truncations since its last sync.
#[derive(Debug, Default)]
pub struct UndoLog {
    /// Length at the last sync.
    durable_len: u64,
    /// `(offset, old bytes)`, oldest first.
    entries: Vec<(u64, Vec<u8>)>,
    /// Write ranges recorded since the sync (a later write of the same range needs no entry).
    recorded: HashSet<(u64, usize)>,
}

impl UndoLog {
    /// A file whose first `durable_len` bytes are on disk.
    pub fn new(durable_len: u64) -> Self {
        UndoLog {
            durable_len,
            ..Default::default()
        }
    }

    /// Before writing `len` bytes at `off` to a file `cur_len` long; `old` reads the
    /// current bytes of a range inside the file.
    pub fn before_write(
        &mut self,
        off: u64,
        len: usize,
        cur_len: u64,
        old: impl FnOnce(u64, usize) -> Vec<u8>,
    ) {
        if !self.recorded.insert((off, len)) {
            return;
        }
        let end = (off + len as u64).min(cur_len);
        let bytes = if end > off {
            old(off, (end - off) as usize)
        } else {
            Vec::new()
        };
        self.entries.push((off, bytes));
    }

    /// Before cutting a file `cur_len` long to `new_len`.
    pub fn before_truncate(
        &mut self,
        new_len: u64,
        cur_len: u64,
        old: impl FnOnce(u64, usize) -> Vec<u8>,
    ) {
        if new_len < cur_len {
            self.entries
                .push((new_len, old(new_len, (cur_len - new_len) as usize)));
        }
    }

    /// The file is on disk as it is now, `cur_len` long.
    pub fn synced(&mut self, cur_len: u64) {
        self.durable_len = cur_len;
        self.entries.clear();
        self.recorded.clear();
    }

    /// How many undo entries a power cut now would apply.
    pub fn unsynced(&self) -> usize {
        self.entries.len()
    }

    /// Turns the file's current bytes into what the disk holds after a power cut now.
    pub fn undo(&self, bytes: &mut Vec<u8>) {
        for (off, old) in self.entries.iter().rev() {
            let off = *off as usize;
            if bytes.len() < off + old.len() {
                bytes.resize(off + old.len(), 0);
            }
            bytes[off..off + old.len()].copy_from_slice(old);
        }
        bytes.resize(self.durable_len as usize, 0);
    }
}

/// Where in a file operation the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Point {
    /// Before an `xWrite` (the image lacks this write and keeps earlier unsynced ones out).
    Write,
    /// Before an `xSync` (everything since the previous sync is about to become durable).
    Sync,
    /// Between file operations ([`at_once`]).
    Between,
}

/// The shim's state behind the one lock.
#[derive(Default)]
struct State {
    files: HashMap<PathBuf, UndoLog>,
    hook: Option<Hook>,
}

/// A closure run at each tracked write and sync (see [`set_hook`]).
pub type Hook = Box<dyn FnMut(&Cut<'_>) + Send>;

/// A moment at which the hook runs, with the lock held: images taken here are exact.
pub struct Cut<'a> {
    state: &'a State,
    /// The file being written or synced.
    pub path: &'a Path,
    /// Which operation is about to happen.
    pub point: Point,
}

impl Cut<'_> {
    /// The power-cut image of database `db` at this instant.
    pub fn image(&self, db: &Path) -> std::io::Result<Image> {
        image_locked(self.state, db, true)
    }

    /// The files of `db` as they are now, nothing undone (what a crash of the process
    /// alone, with the OS still up, would leave).
    pub fn live(&self, db: &Path) -> std::io::Result<Image> {
        image_locked(self.state, db, false)
    }
}

/// A database's files as a power cut would leave them.
#[derive(Debug, Clone)]
pub struct Image {
    /// `("", db bytes)`, `("-wal", ...)`, `("-journal", ...)`: the files present.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// Undo entries applied (0: nothing unsynced was pending).
    pub discarded: usize,
}

impl Image {
    /// Writes the files as `dir/name`, `dir/name-wal`, ...; returns the database path.
    pub fn write_to(&self, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
        for (suffix, bytes) in &self.files {
            std::fs::write(dir.join(format!("{name}{suffix}")), bytes)?;
        }
        Ok(dir.join(name))
    }
}

fn state() -> MutexGuard<'static, State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn with_suffix(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn image_locked(st: &State, db: &Path, undo: bool) -> std::io::Result<Image> {
    let mut image = Image {
        files: Vec::new(),
        discarded: 0,
    };
    for suffix in ["", "-wal", "-journal"] {
        let path = with_suffix(db, suffix);
        let mut bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(log) = st.files.get(&path).filter(|_| undo) {
            image.discarded += log.unsynced();
            log.undo(&mut bytes);
        }
        image.files.push((suffix, bytes));
    }
    Ok(image)
}

/// The power-cut image of database `db` now (see the module doc).
pub fn image(db: &Path) -> std::io::Result<Image> {
    image_locked(&state(), db, true)
}

/// Runs `f` with the lock held, between any two file operations (a timer's cut), so what
/// `f` reads besides the image is ordered exactly against every write and sync.
pub fn at_once<T>(db: &Path, f: impl FnOnce(&Cut<'_>) -> T) -> T {
    let st = state();
    f(&Cut {
        state: &st,
        path: db,
        point: Point::Between,
    })
}

/// Runs `hook` before every tracked write and sync, with the lock held (`None` removes
/// it). It must not block on anything that opens a database, nor panic (it runs inside
/// SQLite: a panic aborts).
pub fn set_hook(hook: Option<Hook>) {
    state().hook = hook;
}

fn run_hook(st: &mut State, path: &Path, point: Point) {
    if let Some(mut hook) = st.hook.take() {
        hook(&Cut {
            state: st,
            path,
            point,
        });
        if st.hook.is_none() {
            st.hook = Some(hook);
        }
    }
}

/// Whether an fsync of a write-ahead log makes it durable (true unless a negative control
/// turns it off: the log then behaves as under `synchronous=OFF` while SQLite believes
/// it synced).
static WAL_SYNCS_DURABLE: AtomicBool = AtomicBool::new(true);

/// Sets whether write-ahead-log fsyncs count (see [`WAL_SYNCS_DURABLE`]); for controls.
pub fn set_wal_syncs_durable(on: bool) {
    WAL_SYNCS_DURABLE.store(on, Ordering::SeqCst);
}

/// Undo entries pending for a file (tests of the shim).
pub fn unsynced(path: &Path) -> usize {
    state().files.get(path).map_or(0, UndoLog::unsynced)
}

// ---- the VFS --------------------------------------------------------------------------

/// Name the shim registers under.
pub const VFS_NAME: &CStr = c"synced";

/// A file of the shim: the methods pointer SQLite sees, then the real file.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    /// The tracked path (a leaked `Box<PathBuf>`), or null when untracked.
    path: *mut PathBuf,
    /// The real (unix) file, in the same allocation after this header.
    real: *mut ffi::sqlite3_file,
}

/// The real VFS, as an address (raw pointers are not `Sync`).
static REAL: OnceLock<usize> = OnceLock::new();

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    *REAL.get().expect("installed") as *mut ffi::sqlite3_vfs
}

/// Registers the shim as the default VFS (once per process; call before opening anything).
pub fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| unsafe {
        let real = ffi::sqlite3_vfs_find(std::ptr::null());
        assert!(!real.is_null(), "a default VFS");
        REAL.set(real as usize).expect("once");
        let mut mine: ffi::sqlite3_vfs = std::ptr::read(real);
        mine.szOsFile = (std::mem::size_of::<ShimFile>() as c_int) + (*real).szOsFile;
        mine.pNext = std::ptr::null_mut();
        mine.zName = VFS_NAME.as_ptr();
        mine.xOpen = Some(x_open);
        mine.xDelete = Some(x_delete);
        let rc = ffi::sqlite3_vfs_register(Box::leak(Box::new(mine)), 1);
        assert_eq!(rc, ffi::SQLITE_OK, "register the VFS");
    });
}

unsafe fn real_of(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    unsafe { (*(f as *mut ShimFile)).real }
}

unsafe fn methods_of(f: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    unsafe { &*(*real_of(f)).pMethods }
}

unsafe fn tracked_path<'a>(f: *mut ffi::sqlite3_file) -> Option<&'a Path> {
    unsafe {
        let p = (*(f as *mut ShimFile)).path;
        if p.is_null() { None } else { Some(&**p) }
    }
}

unsafe fn real_size(f: *mut ffi::sqlite3_file) -> u64 {
    unsafe {
        let mut size: ffi::sqlite3_int64 = 0;
        match methods_of(f).xFileSize {
            Some(g) if g(real_of(f), &mut size) == ffi::SQLITE_OK => size.max(0) as u64,
            _ => 0,
        }
    }
}

unsafe fn real_read(f: *mut ffi::sqlite3_file, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    unsafe {
        if let Some(g) = methods_of(f).xRead {
            // A short read zero-fills; the range is inside the file anyway.
            let _ = g(
                real_of(f),
                buf.as_mut_ptr().cast(),
                len as c_int,
                off as ffi::sqlite3_int64,
            );
        }
    }
    buf
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        let shim = file as *mut ShimFile;
        let real = (file as *mut u8).add(std::mem::size_of::<ShimFile>()) as *mut ffi::sqlite3_file;
        (*shim).base.pMethods = std::ptr::null();
        (*shim).path = std::ptr::null_mut();
        (*shim).real = real;
        let vfs = real_vfs();
        let Some(open) = (*vfs).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = open(vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        let kinds = ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL | ffi::SQLITE_OPEN_MAIN_JOURNAL;
        if flags & kinds != 0 && !name.is_null() {
            let path = PathBuf::from(CStr::from_ptr(name).to_string_lossy().into_owned());
            let size = {
                (*shim).base.pMethods = &IO_METHODS;
                real_size(file)
            };
            state()
                .files
                .entry(path.clone())
                .or_insert_with(|| UndoLog::new(size));
            (*shim).path = Box::into_raw(Box::new(path));
        }
        (*shim).base.pMethods = &IO_METHODS;
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    unsafe {
        let mut st = state();
        if !name.is_null() {
            let path = PathBuf::from(CStr::from_ptr(name).to_string_lossy().into_owned());
            st.files.remove(&path);
        }
        let _ = vfs;
        let real = real_vfs();
        match (*real).xDelete {
            Some(g) => g(real, name, sync_dir),
            None => ffi::SQLITE_IOERR_DELETE,
        }
    }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let rc = match methods_of(f).xClose {
            Some(g) => g(real_of(f)),
            None => ffi::SQLITE_OK,
        };
        let shim = f as *mut ShimFile;
        if !(*shim).path.is_null() {
            drop(Box::from_raw((*shim).path));
            (*shim).path = std::ptr::null_mut();
        }
        rc
    }
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        match methods_of(f).xRead {
            Some(g) => g(real_of(f), buf, amt, off),
            None => ffi::SQLITE_IOERR_READ,
        }
    }
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    unsafe {
        let Some(g) = methods_of(f).xWrite else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let Some(path) = tracked_path(f) else {
            return g(real_of(f), buf, amt, off);
        };
        let mut st = state();
        run_hook(&mut st, path, Point::Write);
        let size = real_size(f);
        if let Some(log) = st.files.get_mut(path) {
            log.before_write(off as u64, amt as usize, size, |o, n| real_read(f, o, n));
        }
        g(real_of(f), buf, amt, off)
    }
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    unsafe {
        let Some(g) = methods_of(f).xTruncate else {
            return ffi::SQLITE_IOERR_TRUNCATE;
        };
        let Some(path) = tracked_path(f) else {
            return g(real_of(f), size);
        };
        let mut st = state();
        let cur = real_size(f);
        if let Some(log) = st.files.get_mut(path) {
            log.before_truncate(size as u64, cur, |o, n| real_read(f, o, n));
        }
        g(real_of(f), size)
    }
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    unsafe {
        let Some(g) = methods_of(f).xSync else {
            return ffi::SQLITE_IOERR_FSYNC;
        };
        let Some(path) = tracked_path(f) else {
            return g(real_of(f), flags);
        };
        let mut st = state();
        run_hook(&mut st, path, Point::Sync);
        let rc = g(real_of(f), flags);
        let counts =
            WAL_SYNCS_DURABLE.load(Ordering::SeqCst) || !path.to_string_lossy().ends_with("-wal");
        if rc == ffi::SQLITE_OK && counts {
            let size = real_size(f);
            if let Some(log) = st.files.get_mut(path) {
                log.synced(size);
            }
        }
        rc
    }
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut ffi::sqlite3_int64) -> c_int {
    unsafe {
        match methods_of(f).xFileSize {
            Some(g) => g(real_of(f), out),
            None => ffi::SQLITE_IOERR_FSTAT,
        }
    }
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        match methods_of(f).xLock {
            Some(g) => g(real_of(f), level),
            None => ffi::SQLITE_IOERR_LOCK,
        }
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        match methods_of(f).xUnlock {
            Some(g) => g(real_of(f), level),
            None => ffi::SQLITE_IOERR_UNLOCK,
        }
    }
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe {
        match methods_of(f).xCheckReservedLock {
            Some(g) => g(real_of(f), out),
            None => ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        }
    }
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    unsafe {
        match methods_of(f).xFileControl {
            Some(g) => g(real_of(f), op, arg),
            None => ffi::SQLITE_NOTFOUND,
        }
    }
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe { methods_of(f).xSectorSize.map_or(4096, |g| g(real_of(f))) }
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        methods_of(f)
            .xDeviceCharacteristics
            .map_or(0, |g| g(real_of(f)))
    }
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    page_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        match methods_of(f).xShmMap {
            Some(g) => g(real_of(f), page, page_size, extend, out),
            None => ffi::SQLITE_IOERR_SHMMAP,
        }
    }
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    unsafe {
        match methods_of(f).xShmLock {
            Some(g) => g(real_of(f), off, n, flags),
            None => ffi::SQLITE_IOERR_SHMLOCK,
        }
    }
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    unsafe {
        if let Some(g) = methods_of(f).xShmBarrier {
            g(real_of(f));
        }
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    unsafe {
        match methods_of(f).xShmUnmap {
            Some(g) => g(real_of(f), delete),
            None => ffi::SQLITE_OK,
        }
    }
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    off: ffi::sqlite3_int64,
    amt: c_int,
    out: *mut *mut c_void,
) -> c_int {
    unsafe {
        match methods_of(f).xFetch {
            Some(g) => g(real_of(f), off, amt, out),
            None => {
                *out = std::ptr::null_mut();
                ffi::SQLITE_OK
            }
        }
    }
}

unsafe extern "C" fn x_unfetch(
    f: *mut ffi::sqlite3_file,
    off: ffi::sqlite3_int64,
    p: *mut c_void,
) -> c_int {
    unsafe {
        match methods_of(f).xUnfetch {
            Some(g) => g(real_of(f), off, p),
            None => ffi::SQLITE_OK,
        }
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};
