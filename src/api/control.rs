//! The control socket: a Unix socket on which the daemon serves a read-only subset of its
//! own HTTP API (`GET /healthz`, `/v1/status`, `/v1/devices`) to `unitgate status`.
//!
//! There is no token: the socket's mode (0660, the daemon's user and group) is the
//! authorisation, and each request reaches the normal router as an [`InternalCaller`] with
//! the `read` scope, so the handlers are the same ones HTTP clients get. Anything else
//! (another path, a write method) is refused before it reaches the router.

use crate::api::error::ApiError;
use crate::api::http::auth::{InternalCaller, Scope};
use crate::api::http::extract::new_request_id;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The routes the control socket serves (GET and HEAD only).
pub const PATHS: [&str; 3] = ["/healthz", "/v1/status", "/v1/devices"];

/// The caller name control-socket requests carry (in logs, as `token`).
pub const CALLER: &str = "control-socket";

/// Mode of the socket file: the daemon's user and group may connect, nobody else.
pub const MODE: u32 = 0o660;

/// How long a stop waits for requests in flight on the socket.
const DRAIN: Duration = Duration::from_secs(5);

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Something answers on the path: another daemon is running with the same socket.
    #[error(
        "control socket {path}: another process answers on it (a second daemon?); refusing to take it over"
    )]
    InUse {
        /// The socket path.
        path: String,
    },
    /// The path exists and is not a socket: it is not ours to remove.
    #[error(
        "control socket {path}: the path exists and is not a socket; refusing to remove it (check api.control_socket)"
    )]
    NotASocket {
        /// The socket path.
        path: String,
    },
    /// Binding, probing or chmod failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// The router the socket serves: `api` (the full HTTP router) behind a gate that lets only
/// reads of [`PATHS`] through, each as the internal read-only caller.
pub fn router(api: Router) -> Router {
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn(read_only))
}

async fn read_only(mut req: Request, next: Next) -> Response {
    let refusal = if !PATHS.contains(&req.uri().path()) {
        Some(ApiError::new(
            404,
            "not_found",
            format!(
                "the control socket serves only {} (read-only)",
                PATHS.join(", ")
            ),
        ))
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        Some(ApiError::new(
            405,
            "method_not_allowed",
            "the control socket is read-only: GET only",
        ))
    } else {
        None
    };
    if let Some(e) = refusal {
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
        return (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            e.body(&new_request_id()),
        )
            .into_response();
    }
    req.extensions_mut()
        .insert(InternalCaller::new(CALLER, vec![Scope::Read]));
    next.run(req).await
}

/// The running control socket server. [`ControlServer::stop`] drains it and removes the
/// socket file; dropping it without a stop aborts it and removes the file too.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// (device, inode) of the socket file we bound: only that file is ever removed.
    file_id: (u64, u64),
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl ControlServer {
    /// Binds `path` (mode 0660) and serves [`router`]`(api)` on it. A stale socket file (no
    /// one answers) is replaced; a live one is refused. `Ok(None)` when the socket's
    /// directory does not exist (a run outside systemd): the daemon runs without it.
    pub async fn start(path: &Path, api: Router) -> Result<Option<ControlServer>, ControlError> {
        let shown = path.display().to_string();
        let io = |source: std::io::Error| ControlError::Io {
            path: shown.clone(),
            source,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            tracing::warn!(
                socket = %shown,
                "control socket disabled: its directory does not exist (systemd's RuntimeDirectory=unitgate creates it); `unitgate status` cannot reach this daemon"
            );
            return Ok(None);
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path: shown });
            }
            Ok(_) => {
                let probe = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::UnixStream::connect(path),
                )
                .await;
                match probe {
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tracing::info!(socket = %shown, "removing a stale control socket");
                        std::fs::remove_file(path).map_err(io)?;
                    }
                    Ok(Err(e)) => return Err(io(e)),
                    // Connected, or accepted but slow: someone is there.
                    Ok(Ok(_)) | Err(_) => return Err(ControlError::InUse { path: shown }),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(MODE)).map_err(io)?;
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::api::http::serve(listener, router(api), async {
            let _ = stopped.await;
        }));
        tracing::info!(socket = %shown, "control socket listening");
        Ok(Some(ControlServer {
            path: path.to_owned(),
            file_id: (meta.dev(), meta.ino()),
            stop: Some(stop),
            task: Some(task),
        }))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets requests in flight finish (a few seconds at most), and removes
    /// the socket file.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN, task).await.is_err() {
                abort.abort();
            }
        }
        self.remove_file();
    }

    fn remove_file(&self) {
        // Only the file this server bound: never one a newer daemon has made since.
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.file_id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            self.remove_file();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    fn api() -> Router {
        // Stands in for the full router: answers with the caller it was given.
        let who = |req: Request| async move {
            req.extensions()
                .get::<InternalCaller>()
                .map(|c| c.principal().name.clone())
                .unwrap_or_default()
        };
        Router::new()
            .route("/v1/status", get(who))
            .route("/v1/units/u1/reserve", post(who))
    }

    async fn call(method: Method, path: &str) -> (StatusCode, String) {
        let res = router(api())
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn reads_pass_as_the_internal_reader_and_nothing_else_does() {
        assert_eq!(
            call(Method::GET, "/v1/status").await,
            (StatusCode::OK, CALLER.to_owned())
        );
        let (status, body) = call(Method::POST, "/v1/units/u1/reserve").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains("\"code\":\"not_found\""), "{body}");
        let (status, body) = call(Method::POST, "/v1/status").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
        assert!(body.contains("read-only"), "{body}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_refused_and_the_file_removed_on_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        // A socket file nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let server = ControlServer::start(&path, api()).await.unwrap().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, MODE);
        match ControlServer::start(&path, api()).await {
            Err(ControlError::InUse { .. }) => {}
            other => panic!("expected InUse, got {other:?}"),
        }
        server.stop().await;
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            ControlServer::start(&path, api()).await,
            Err(ControlError::NotASocket { .. })
        ));
        let missing = dir.path().join("no-such-dir/control.sock");
        assert!(
            ControlServer::start(&missing, api())
                .await
                .unwrap()
                .is_none()
        );
    }
}
