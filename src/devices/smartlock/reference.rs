//! The reference vendor API (DESIGN.md §4; hw-sim serves it): `GET /v1/locks`,
//! `GET /v1/locks/{id}`, `POST /v1/locks/{id}/{assign|unassign|overlock|remove_overlock}`,
//! Bearer API key, errors as `{"error": {"code", "message"}}`, 429 with `Retry-After`.
//!
//! Every URL is the configured base (which may carry a path prefix) plus the route; lock ids
//! are percent-encoded as one path segment. Redirects are not followed (a vendor API that
//! redirects is misconfigured, and the key must not travel elsewhere).

use super::{LockError, LockProvider, LockState};
use crate::config::LockApiConfig;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// The environment variable holding the API key when no `api_key_file` is configured.
pub const API_KEY_ENV: &str = "UNITGATE_LOCK_API_KEY";

/// Largest answer body read; a vendor answer is a few hundred bytes per lock.
const MAX_BODY: usize = 4 << 20;
/// How much of an unreadable body is quoted in an error.
const QUOTE_MAX: usize = 200;

/// Why a provider cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `devices.lock_api.url` is not a usable http(s) base URL.
    #[error("devices.lock_api.url {url:?}: {reason}")]
    Url {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No key: neither `api_key_file` nor the environment variable.
    #[error(
        "devices.lock_api: no API key (set api_key_file, or the environment variable {API_KEY_ENV})"
    )]
    NoKey,
    /// The key file cannot be read or is empty.
    #[error("devices.lock_api.api_key_file {source}")]
    KeyFile {
        /// Cause (names the file).
        source: crate::secret::SecretFileError,
    },
    /// The key is empty or cannot be sent in a header.
    #[error("devices.lock_api: the API key from {from} {reason}")]
    BadKey {
        /// Where the key came from (file path or environment variable).
        from: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("lock API HTTP client: {0}")]
    Client(String),
}

/// An API key. Never printed: `Debug` shows `ApiKey(<redacted>)` and there is no `Display`.
#[derive(Clone)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// A key given directly (trimmed); `None` if it is empty.
    pub fn new(key: &str) -> Option<ApiKey> {
        let k = key.trim();
        (!k.is_empty()).then(|| ApiKey(k.to_owned()))
    }

    /// The key from `file` (trimmed) if one is configured, else from `env` (the value of
    /// [`API_KEY_ENV`], passed in so callers and tests choose where it comes from).
    pub fn load(file: &Path, env: Option<String>) -> Result<ApiKey, SetupError> {
        let (text, from) = if !file.as_os_str().is_empty() {
            let secret = crate::secret::read_secret_file(file)
                .map_err(|source| SetupError::KeyFile { source })?;
            let text = secret.expose_str().ok_or_else(|| SetupError::BadKey {
                from: file.display().to_string(),
                reason: "is not UTF-8 text",
            })?;
            (text.to_owned(), file.display().to_string())
        } else {
            match env {
                Some(v) => (v, format!("${API_KEY_ENV}")),
                None => return Err(SetupError::NoKey),
            }
        };
        let key = ApiKey::new(&text).ok_or_else(|| SetupError::BadKey {
            from: from.clone(),
            reason: "is empty",
        })?;
        // Checked here so a bad key is a setup error, not a failure on every request.
        HeaderValue::from_str(&format!("Bearer {}", key.0)).map_err(|_| SetupError::BadKey {
            from,
            reason: "holds characters that cannot go in an HTTP header",
        })?;
        Ok(key)
    }
}

/// The reference vendor API over reqwest (rustls). Cheap to clone (the client is shared).
#[derive(Clone)]
pub struct ReferenceProvider {
    client: reqwest::Client,
    base: Url,
    timeout: Duration,
}

impl fmt::Debug for ReferenceProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key lives in the client's default headers, marked sensitive; never shown.
        f.debug_struct("ReferenceProvider")
            .field("base", &self.base.as_str())
            .field("timeout", &self.timeout)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl ReferenceProvider {
    /// From `[devices.lock_api]`: the key from `api_key_file` or `UNITGATE_LOCK_API_KEY`.
    /// Reads a small file synchronously: call it at start-up (or in `spawn_blocking`).
    pub fn from_config(cfg: &LockApiConfig) -> Result<ReferenceProvider, SetupError> {
        let key = ApiKey::load(&cfg.api_key_file, std::env::var(API_KEY_ENV).ok())?;
        ReferenceProvider::new(&cfg.url, key, Duration::from_millis(cfg.timeout_ms))
    }

    /// A provider for the API at `base_url` (http or https, optionally with a path prefix),
    /// with `timeout` on every request (connecting included).
    pub fn new(
        base_url: &str,
        key: ApiKey,
        timeout: Duration,
    ) -> Result<ReferenceProvider, SetupError> {
        let bad = |reason: &str| SetupError::Url {
            url: crate::secret::redact_url(base_url),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(base_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("must be http:// or https://"));
        }
        if base.host_str().is_none() {
            return Err(bad("has no host"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("must not have a query or fragment"));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(bad("must not carry credentials (use the API key)"));
        }
        // Routes are appended as segments: drop the trailing slash of the prefix.
        let prefix = base.path().trim_end_matches('/').to_owned();
        base.set_path(&prefix);
        if base.scheme() == "http" {
            tracing::debug!(url = %base, "lock API over plain http");
        }

        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.0)).map_err(|_| {
            SetupError::BadKey {
                from: "the caller".into(),
                reason: "holds characters that cannot go in an HTTP header",
            }
        })?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, auth);
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("unitgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(ReferenceProvider {
            client,
            base,
            timeout,
        })
    }

    /// The base URL every route is appended to.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        u
    }

    /// The URL of a lock's route. Ids that cannot be one path segment (empty, `.`, `..`:
    /// URL resolution would drop them and address another route) are no lock at all.
    fn lock_url(&self, id: &str, action: Option<&str>) -> Result<Url, LockError> {
        if matches!(id, "" | "." | "..") {
            return Err(LockError::NotFound {
                code: "invalid_lock_id".into(),
                message: format!("{id:?} cannot be a lock id"),
            });
        }
        Ok(match action {
            Some(a) => self.url(&["v1", "locks", id, a]),
            None => self.url(&["v1", "locks", id]),
        })
    }

    /// Sends one request; the body of a 2xx answer, or the classified error.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
    ) -> Result<Vec<u8>, LockError> {
        let mut req = self.client.request(method.clone(), url);
        if let Some(b) = body {
            req = req.json(&b);
        } else if method == Method::POST {
            req = req
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}");
        }
        let mut resp = req.send().await.map_err(|e| self.transport(&e))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(&e))? {
            if bytes.len() + chunk.len() > MAX_BODY {
                return Err(LockError::BadAnswer {
                    status: status.as_u16(),
                    reason: format!("answer larger than {MAX_BODY} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(bytes);
        }
        Err(classify(status, &bytes, retry_after))
    }

    fn transport(&self, e: &reqwest::Error) -> LockError {
        let reason = if e.is_timeout() {
            format!("no answer within {} ms", self.timeout.as_millis())
        } else if e.is_connect() {
            format!("cannot connect: {}", source_chain(e))
        } else {
            format!("request failed: {}", source_chain(e))
        };
        LockError::Transient {
            reason,
            status: None,
            retry_after: None,
        }
    }

    async fn lock_call(
        &self,
        id: &str,
        method: Method,
        action: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<LockState, LockError> {
        let bytes = self.call(method, self.lock_url(id, action)?, body).await?;
        let lock: LockState = parse(&bytes)?;
        if lock.id != id {
            return Err(LockError::BadAnswer {
                status: 200,
                reason: format!("asked for lock {id:?}, the answer is about {:?}", lock.id),
            });
        }
        Ok(lock)
    }
}

/// The error chain of a reqwest error without the URL repeated at every level.
fn source_chain(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = cur {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s.to_string());
        cur = s.source();
    }
    if out.is_empty() { e.to_string() } else { out }
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, LockError> {
    serde_json::from_slice(bytes).map_err(|e| LockError::BadAnswer {
        status: 200,
        reason: format!("{e} in {}", quote(bytes)),
    })
}

/// Up to [`QUOTE_MAX`] bytes of a body, lossily decoded, for an error message.
fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(QUOTE_MAX)];
    let s = String::from_utf8_lossy(cut);
    if bytes.len() > QUOTE_MAX {
        format!("{s:?}...")
    } else {
        format!("{s:?}")
    }
}

/// Sorts a non-2xx answer into the error classes.
fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> LockError {
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (String::new(), quote(body)),
    };
    let s = status.as_u16();
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => LockError::Auth { status: s, message },
        StatusCode::NOT_FOUND => LockError::NotFound { code, message },
        StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => LockError::Transient {
            reason: format!("{s} {code}: {message}"),
            status: Some(s),
            retry_after,
        },
        _ if status.is_server_error() => LockError::Transient {
            reason: format!("{s} {code}: {message}"),
            status: Some(s),
            retry_after,
        },
        _ if status.is_client_error() => LockError::Refused {
            status: s,
            code,
            message,
        },
        _ => LockError::BadAnswer {
            status: s,
            reason: format!("unexpected status {status}"),
        },
    }
}

/// `Retry-After` as a delay from `now`: delta-seconds, or an HTTP date (IMF-fixdate, or the
/// obsolete RFC 850 and asctime forms). A date in the past is zero; garbage is `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long numbers saturate rather than fail: the caller caps the wait.
        return Some(Duration::from_secs(v.parse().unwrap_or(u64::MAX)));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v)
        .map(|d| d.to_utc())
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(v, "%A, %d-%b-%y %H:%M:%S GMT")
                .map(|d| d.and_utc())
        })
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(v, "%a %b %e %H:%M:%S %Y").map(|d| d.and_utc())
        })
        .ok()?;
    let when = SystemTime::from(when);
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

impl LockProvider for ReferenceProvider {
    async fn list(&self) -> Result<Vec<LockState>, LockError> {
        let bytes = self
            .call(Method::GET, self.url(&["v1", "locks"]), None)
            .await?;
        parse(&bytes)
    }

    async fn get(&self, id: &str) -> Result<LockState, LockError> {
        self.lock_call(id, Method::GET, None, None).await
    }

    async fn assign(&self, id: &str, tenant_ref: &str) -> Result<LockState, LockError> {
        let body = serde_json::json!({ "tenant_ref": tenant_ref });
        self.lock_call(id, Method::POST, Some("assign"), Some(body))
            .await
    }

    async fn unassign(&self, id: &str) -> Result<LockState, LockError> {
        self.lock_call(id, Method::POST, Some("unassign"), None)
            .await
    }

    async fn overlock(&self, id: &str) -> Result<LockState, LockError> {
        self.lock_call(id, Method::POST, Some("overlock"), None)
            .await
    }

    async fn remove_overlock(&self, id: &str) -> Result<LockState, LockError> {
        self.lock_call(id, Method::POST, Some("remove_overlock"), None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = "Sun, 06 Nov 1994 08:49:47 GMT";
        assert_eq!(parse_retry_after(later, now), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:42 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:39 1994", now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert!(parse_retry_after("99999999999999999999999", now).is_some());
    }

    #[test]
    fn statuses_sort_into_classes() {
        let body = br#"{"error":{"code":"lock_overlocked","message":"remove the overlock first"}}"#;
        assert_eq!(
            classify(StatusCode::CONFLICT, body, None),
            LockError::Refused {
                status: 409,
                code: "lock_overlocked".into(),
                message: "remove the overlock first".into()
            }
        );
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, b"", None),
            LockError::Auth { status: 401, .. }
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, b"nope", None),
            LockError::Auth { status: 403, .. }
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, b"{}", None),
            LockError::NotFound { .. }
        ));
        let t = classify(
            StatusCode::TOO_MANY_REQUESTS,
            b"",
            Some(Duration::from_secs(2)),
        );
        assert!(t.is_rate_limited());
        assert_eq!(t.retry_after(), Some(Duration::from_secs(2)));
        assert!(classify(StatusCode::BAD_GATEWAY, b"<html>", None).is_retryable());
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, b"", None),
            LockError::Refused { status: 400, .. }
        ));
        assert!(matches!(
            classify(StatusCode::MOVED_PERMANENTLY, b"", None),
            LockError::BadAnswer { status: 301, .. }
        ));
    }

    #[test]
    fn key_is_trimmed_redacted_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("key");
        std::fs::write(&f, "  s3cret-key\n").expect("write");
        let k = ApiKey::load(&f, Some("env-key".into())).expect("file wins");
        assert_eq!(k.0, "s3cret-key");
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        let k = ApiKey::load(Path::new(""), Some(" env-key ".into())).expect("env");
        assert_eq!(k.0, "env-key");
        assert!(matches!(
            ApiKey::load(Path::new(""), None),
            Err(SetupError::NoKey)
        ));
        std::fs::write(&f, " \n").expect("write");
        assert!(matches!(
            ApiKey::load(&f, None),
            Err(SetupError::BadKey { .. })
        ));
        std::fs::write(&f, "a\nb").expect("write");
        assert!(matches!(
            ApiKey::load(&f, None),
            Err(SetupError::BadKey { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(
            ApiKey::load(&missing, None),
            Err(SetupError::KeyFile { .. })
        ));

        let p = ReferenceProvider::new(
            "http://127.0.0.1:1/vendor/",
            ApiKey::new("s3cret-key").expect("key"),
            Duration::from_secs(1),
        )
        .expect("provider");
        assert!(!format!("{p:?}").contains("s3cret"), "{p:?}");
        assert_eq!(
            p.lock_url("a/b c", Some("assign")).expect("url").as_str(),
            "http://127.0.0.1:1/vendor/v1/locks/a%2Fb%20c/assign"
        );
        assert!(p.lock_url("..", None).is_err());
        let root = ReferenceProvider::new(
            "https://locks.example",
            ApiKey::new("k").expect("key"),
            Duration::from_secs(1),
        )
        .expect("provider");
        assert_eq!(
            root.url(&["v1", "locks"]).as_str(),
            "https://locks.example/v1/locks"
        );
        for bad in ["ftp://x", "not a url", "http://x/?a=1", "http://u:p@x"] {
            assert!(
                ReferenceProvider::new(bad, ApiKey::new("k").expect("key"), Duration::from_secs(1))
                    .is_err(),
                "{bad}"
            );
        }
    }
}
