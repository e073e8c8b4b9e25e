//! One process at a time owns a replica: the daemon holds an exclusive `flock` on
//! `<data_dir>/unitgate.lock` while it runs; `restore` and `migrate` take the same lock, so
//! they refuse while the daemon runs and the daemon cannot start under them. The kernel
//! drops the lock when the process ends, however it ends: a stale lock file is harmless.

use rustix::fs::{FlockOperation, flock};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "unitgate.lock";

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (the daemon, or a restore or migrate) holds it.
    #[error(
        "{path} is locked by another process: the daemon (or a restore/migrate) is using this data directory"
    )]
    Held {
        /// The lock file.
        path: String,
    },
    /// The lock file cannot be opened or locked.
    #[error("lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// An exclusive hold on a data directory, released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock without waiting; [`LockError::Held`] when another process has it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = data_dir.join(LOCK_FILE);
        let io = |source: std::io::Error| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        // Read-only is enough for flock, so a lock file root created (`sudo unitgate
        // restore`) still serves the daemon's own user. It holds nothing: 0644.
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut opts = std::fs::OpenOptions::new();
                opts.read(true).write(true).create(true).truncate(false);
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o644);
                opts.open(&path).map_err(io)?
            }
            Err(e) => return Err(io(e)),
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DataDirLock { _file: file, path }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(LockError::Held {
                path: path.display().to_string(),
            }),
            Err(e) => Err(io(e.into())),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in the same
        // process conflicts just as another process would.
        assert!(matches!(
            DataDirLock::acquire(dir.path()),
            Err(LockError::Held { .. })
        ));
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
