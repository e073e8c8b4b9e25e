//! Secrets read from files (MQTT password, signing keys, webhook and uplink secrets, the
//! lock API key): one reader for all of them, and a type that never prints its content.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// A secret's bytes. `Debug` shows `Secret(<redacted>)`; there is no `Display`, so it
/// cannot reach a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// A secret held in memory (tests, tools).
    pub fn new(bytes: impl AsRef<[u8]>) -> Secret {
        Secret(bytes.as_ref().into())
    }

    /// The bytes, for the one place that uses them (a MAC, a header, a login).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as UTF-8, for APIs that take text (MQTT password, HTTP header).
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a secret file cannot be used. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file holds nothing (or only a newline).
    #[error("{path} is empty")]
    Empty {
        /// The file.
        path: String,
    },
}

/// Reads a secret file: its bytes without one trailing `\n` or `\r\n` (what `echo` and
/// editors add); refuses an empty file; warns (does not refuse) when every user may read it.
pub fn read_secret_file(path: &Path) -> Result<Secret, SecretFileError> {
    let shown = || path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| SecretFileError::Read {
        path: shown(),
        source,
    })?;
    let bytes = strip_one_newline(&bytes);
    if bytes.is_empty() {
        return Err(SecretFileError::Empty { path: shown() });
    }
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(path = %path.display(), "secret file is readable by every user; chmod o-r it");
        }
    }
    Ok(Secret::new(bytes))
}

/// `url` fit for a message: credentials in it (`scheme://user:password@host`) become
/// `scheme://***@host`. URLs with credentials are refused anyway; this keeps the refusal
/// from printing them.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_owned(),
    };
    match scheme {
        Some(s) => format!("{s}://{rest}"),
        None => rest,
    }
}

fn strip_one_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r\n")
        .or_else(|| b.strip_suffix(b"\n"))
        .unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_dropped_and_nothing_else() {
        assert_eq!(strip_one_newline(b"key\n"), b"key");
        assert_eq!(strip_one_newline(b"key\r\n"), b"key");
        assert_eq!(strip_one_newline(b"key\n\n"), b"key\n");
        assert_eq!(strip_one_newline(b" key "), b" key ");
        assert_eq!(strip_one_newline(b"key"), b"key");
    }

    #[test]
    fn credentials_in_urls_are_not_shown() {
        assert_eq!(
            redact_url("mqtt://gw:hunter2@broker:1883/x"),
            "mqtt://***@broker:1883/x"
        );
        assert_eq!(redact_url("https://h/p?a=b@c"), "https://h/p?a=b@c");
        assert_eq!(redact_url("u:p@host"), "***@host");
        assert_eq!(redact_url("http://host:80"), "http://host:80");
    }

    #[test]
    fn empty_files_are_refused_and_debug_redacts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(
            read_secret_file(&p),
            Err(SecretFileError::Empty { .. })
        ));
        std::fs::write(&p, "hunter2-marker\r\n").unwrap();
        let s = read_secret_file(&p).unwrap();
        assert_eq!(s.expose(), b"hunter2-marker");
        assert!(!format!("{s:?}").contains("hunter2"));
        let missing = read_secret_file(&dir.path().join("none")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }
}
