//! Shared parts of the fuzz targets: one real gateway core per process (a SQLite replica in
//! a temporary directory, the executor, the HTTP router with its middleware and the MQTT
//! dispatcher, built by the same functions `unitgate run` uses), and small helpers.

use std::sync::{Arc, OnceLock};
use unitgate::api::http::{self, Limits, auth::Tokens};
use unitgate::cloud::dispatch::Dispatcher;
use unitgate::cloud::signing::CloudClients;
use unitgate::cloud::webhooks::{WebhookSource, Webhooks};
use unitgate::command::Executor;
use unitgate::config::{Config, TokenConfig};

/// The site id every target uses.
pub const SITE: &str = "fuzz-site";
/// The bearer token with every scope.
pub const TOKEN: &str = "fuzz-admin-token";
/// The signing client of signed MQTT commands.
pub const CLIENT: &str = "cloud";
/// Its key.
pub const CLIENT_KEY: &[u8] = b"0123456789abcdef0123456789abcdef-fuzz";
/// The webhook source.
pub const WEBHOOK_SOURCE: &str = "billing";
/// Its secret.
pub const WEBHOOK_SECRET: &[u8] = b"whsec-fuzz-0123456789";

/// One gateway core: runtime, router and both dispatchers.
pub struct Site {
    /// Runs the async parts.
    pub rt: tokio::runtime::Runtime,
    /// The HTTP router as `unitgate run` builds it.
    pub router: axum::Router,
    /// Unsigned MQTT commands.
    pub dispatcher: Dispatcher,
    /// Signed MQTT commands (client [`CLIENT`], every operation).
    pub signed: Dispatcher,
    _dir: tempfile::TempDir,
}

fn tmp_root() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The process's gateway core, built on first use.
pub fn site() -> &'static Site {
    static SITE_CELL: OnceLock<Site> = OnceLock::new();
    SITE_CELL.get_or_init(build)
}

fn build() -> Site {
    let dir = tempfile::Builder::new()
        .prefix("unitgate-fuzz")
        .tempdir_in(tmp_root())
        .expect("temp dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut cfg = Config::default();
    cfg.site.id = SITE.into();
    cfg.site.name = "Fuzz".into();
    cfg.store.data_dir = dir.path().to_path_buf();
    cfg.api.tokens = vec![TokenConfig {
        name: "fuzz".into(),
        sha256: sha256_hex(TOKEN.as_bytes()),
        scopes: vec!["admin".into()],
    }];
    let clock = unitgate::command::system_clock();
    let store = rt
        .block_on(unitgate::gateway::open_store(&cfg, &clock))
        .expect("store");
    let executor = Executor::new(
        store.clone(),
        cfg.site.id.clone(),
        cfg.tz(),
        unitgate::domain::pin::PinKey::new([7; 32]),
        clock,
        3600,
        Arc::new(unitgate::domain::catalog::DeviceCatalog::from_config(
            &cfg.devices,
        )),
    );
    let limits = Limits {
        max_body_bytes: cfg.api.max_body_bytes,
        max_snapshot_bytes: cfg.api.max_snapshot_bytes,
        body_timeout: std::time::Duration::from_secs(5),
        snapshot_timeout: std::time::Duration::from_secs(5),
    };
    let router = http::router_with_cloud(
        executor,
        Tokens::from_config(&cfg.api.tokens),
        limits,
        Default::default(),
        http::Cloud {
            links: Default::default(),
            webhooks: Webhooks::from_sources(vec![WebhookSource::new(
                WEBHOOK_SOURCE,
                WEBHOOK_SECRET,
                true,
            )]),
        },
    );
    let max_packet = 256 << 10;
    let dispatcher = Dispatcher::new(router.clone(), SITE, store.clone(), None, max_packet)
        .with_max_snapshot(1 << 20);
    let clients =
        CloudClients::from_keys([(CLIENT.to_owned(), CLIENT_KEY.to_vec(), vec!["*".to_owned()])]);
    let signed = Dispatcher::new(
        router.clone(),
        SITE,
        store,
        Some(Arc::new(clients)),
        max_packet,
    )
    .with_max_snapshot(1 << 20);
    Site {
        rt,
        router,
        dispatcher,
        signed,
        _dir: dir,
    }
}

/// Hex SHA-256 (config token hashes).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Splits `data` at the first `\n`: (head, rest); no `\n` = (everything, empty).
pub fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Checks an error answer is the contract's error shape: `{"error": {"code", "message", ..}}`.
pub fn assert_error_shape(body: &serde_json::Value) {
    let e = body
        .get("error")
        .unwrap_or_else(|| panic!("error answer without `error`: {body}"));
    assert!(
        e.get("code").is_some_and(|c| c.is_string()),
        "no code: {body}"
    );
    assert!(
        e.get("message").is_some_and(|c| c.is_string()),
        "no message: {body}"
    );
}
