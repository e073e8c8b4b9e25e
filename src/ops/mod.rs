//! Operating a gateway from the command line, next to the daemon: `status` asks the running
//! daemon over its control socket; `backup`, `restore` and `migrate` work on the replica file.
//!
//! Exit codes (README "Command line"): [`EXIT_OK`], [`EXIT_FAILED`], [`EXIT_USAGE`] (clap),
//! [`EXIT_NOT_RUNNING`] and [`EXIT_UNKNOWN`] (`status`, after the LSB `status` convention).

pub mod backup;
pub mod lock;
pub mod migrate;
pub mod status;

/// Done; for `status`: the daemon is running and answered.
pub const EXIT_OK: i32 = 0;
/// The operation failed or was refused (the message says why).
pub const EXIT_FAILED: i32 = 1;
/// The command line is wrong (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// `status`: the daemon is not running (no socket, or nobody answers on it).
pub const EXIT_NOT_RUNNING: i32 = 3;
/// `status`: cannot tell (no permission on the socket, or an answer that makes no sense).
pub const EXIT_UNKNOWN: i32 = 4;

/// Gives `file` the owner and group of `data_dir`, so that a replica written by `sudo
/// unitgate restore|migrate` stays usable by a daemon running as its own user.
pub(crate) fn own_like(file: &std::path::Path, data_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let d = std::fs::metadata(data_dir)?;
    let f = std::fs::metadata(file)?;
    if (f.uid(), f.gid()) != (d.uid(), d.gid()) {
        std::os::unix::fs::chown(file, Some(d.uid()), Some(d.gid()))?;
    }
    Ok(())
}

/// Whether something answers on the control socket at `path` (within a second).
pub async fn daemon_answers(path: &std::path::Path) -> bool {
    if path.as_os_str().is_empty() {
        return false;
    }
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::net::UnixStream::connect(path)
        )
        .await,
        Ok(Ok(_))
    )
}
