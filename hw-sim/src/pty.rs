//! Pseudo-terminal pairs standing in for RS-485 adapters: the simulator keeps the master
//! end; the slave end's path is linked where the site file says the serial device is.

use std::path::{Path, PathBuf};

/// A pseudo-terminal pair. The simulator reads and writes `master`; the control panel
/// opens `slave_path` (or the link to it). `_slave` stays open so the master never sees
/// EIO while no panel is attached.
pub struct PtyPair {
    /// The master end, as a serial stream (tokio-serial accepts it).
    pub master: tokio_serial::SerialStream,
    /// The slave end, kept open.
    pub _slave: tokio_serial::SerialStream,
    /// `/dev/pts/N`.
    pub slave_path: PathBuf,
    /// The link created for it, removed on drop.
    pub link: Option<PathBuf>,
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        if let Some(l) = &self.link {
            let _ = std::fs::remove_file(l);
        }
    }
}

/// Opens a pty pair in raw mode and, if `link` is non-empty, makes `link` a symlink to the
/// slave (replacing a stale link; refusing to replace anything that is not a symlink).
pub fn open(link: &Path) -> std::io::Result<PtyPair> {
    let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::other)?;
    let slave_path = slave_name(&slave)?;
    let link = if link.as_os_str().is_empty() {
        None
    } else {
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(link) {
            Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)?,
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a symlink; not replacing it",
                        link.display()
                    ),
                ));
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&slave_path, link)?;
        Some(link.to_owned())
    };
    Ok(PtyPair {
        master,
        _slave: slave,
        slave_path,
        link,
    })
}

fn slave_name(s: &tokio_serial::SerialStream) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let link = format!("/proc/self/fd/{fd}");
    std::fs::read_link(link)
}
