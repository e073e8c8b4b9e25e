//! Configuration: a TOML file plus `UNITGATE__SECTION__KEY` environment overrides, every
//! key defaulted, then [`Config::validate`] names each bad key.

use crate::domain::hours::AccessHours;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The site this gateway serves.
    pub site: SiteConfig,
    /// The SQLite replica.
    pub store: StoreConfig,
    /// The HTTP API.
    pub api: ApiConfig,
    /// Logging.
    pub log: LogConfig,
    /// The site's hardware (the same section hw-sim reads).
    pub devices: DevicesConfig,
    /// Gate access at the keypads: brute-force lockout, gate alarms.
    pub access: AccessConfig,
    /// The link to the cloud platform: MQTT, the HTTPS event uplink, inbound webhooks.
    pub cloud: CloudConfig,
    /// Prometheus metrics: an optional plain listener besides `GET /metrics` on the API.
    pub metrics: MetricsConfig,
    /// hw-sim's own section when the site file is shared with the simulator: ignored here.
    #[serde(skip_serializing)]
    pub sim: Option<toml_ignored::Ignored>,
}

/// A section that is accepted and ignored.
pub mod toml_ignored {
    /// Any value, dropped.
    #[derive(Debug, Clone, Default)]
    pub struct Ignored;

    impl<'de> serde::Deserialize<'de> for Ignored {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            serde::de::IgnoredAny::deserialize(d).map(|_| Ignored)
        }
    }
}

/// `[devices]`: gate keypads, relay boards, the smart-lock API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesConfig {
    /// How often every device's actual state is read back and drift corrected, in seconds.
    pub reconcile_s: u64,
    /// OSDP keypads at the gates.
    pub keypads: Vec<KeypadConfig>,
    /// Modbus relay / sensor boards.
    pub relay_boards: Vec<RelayBoardConfig>,
    /// The smart-lock vendor API.
    pub lock_api: Option<LockApiConfig>,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            reconcile_s: 30,
            keypads: Vec::new(),
            relay_boards: Vec::new(),
            lock_api: None,
        }
    }
}

/// A coil on a relay board.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoilRef {
    /// Board id.
    pub board: String,
    /// Coil number (0-based).
    pub coil: u16,
}

/// A discrete input on a relay board.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputRef {
    /// Board id.
    pub board: String,
    /// Input number (0-based).
    pub input: u16,
}

/// `[[devices.keypads]]`: an OSDP reader (keypad, LED, buzzer, display) at a gate.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeypadConfig {
    /// Device id, e.g. `gate-1`.
    pub id: String,
    /// The gate zone it guards (units list the zones their tenants may pass).
    pub zone: String,
    /// Serial device of the RS-485 line (e.g. `/dev/unitgate-rs485-0`). Empty: use `tcp`.
    #[serde(default)]
    pub port: String,
    /// Baud rate (9600 or 115200).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// OSDP over TCP at `host:port`, used when `port` is empty.
    #[serde(default)]
    pub tcp: String,
    /// OSDP address of the reader (0-126).
    #[serde(default)]
    pub address: u8,
    /// Secure channel base key, 32 hex digits. Required unless `install_mode`.
    #[serde(default)]
    pub scbk: String,
    /// Commissioning only: allow plaintext and the default key (SCBK-D).
    #[serde(default)]
    pub install_mode: bool,
    /// The gate strike this keypad opens.
    pub gate: Option<CoilRef>,
    /// The gate position input (on = open).
    #[serde(default)]
    pub gate_sensor: Option<InputRef>,
    /// How long a granted entry holds the strike, in milliseconds.
    #[serde(default = "default_pulse_ms")]
    pub pulse_ms: u64,
    /// `false`: declared but not installed yet. Bindings to it are accepted and its commands
    /// queue durably until it is enabled; no driver runs. Default `true`.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

impl std::fmt::Debug for KeypadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secure channel key stays out of logs.
        f.debug_struct("KeypadConfig")
            .field("id", &self.id)
            .field("zone", &self.zone)
            .field("port", &self.port)
            .field("tcp", &self.tcp)
            .field("address", &self.address)
            .field("secure", &!self.scbk.is_empty())
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

fn default_baud() -> u32 {
    9600
}
fn default_enabled() -> bool {
    true
}
fn default_pulse_ms() -> u64 {
    3000
}

/// Transport of a relay board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModbusTransport {
    /// Modbus TCP.
    Tcp,
    /// Modbus RTU on a serial line.
    Rtu,
}

/// `[[devices.relay_boards]]`: coils (gate strikes, overlock relays) and discrete inputs
/// (door sensors, gate position).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayBoardConfig {
    /// Device id, e.g. `relay-1`.
    pub id: String,
    /// `tcp` or `rtu`.
    pub transport: ModbusTransport,
    /// TCP: `host:port`.
    #[serde(default)]
    pub address: String,
    /// RTU: the serial device.
    #[serde(default)]
    pub port: String,
    /// RTU: baud rate.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// RTU: `none`, `even` or `odd`.
    #[serde(default = "default_parity")]
    pub parity: String,
    /// RTU: 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Modbus unit (slave) id.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// Number of coils.
    pub coils: u16,
    /// Number of discrete inputs.
    pub inputs: u16,
    /// Simulator only: its response delay (ignored by the gateway).
    #[serde(default, skip_serializing)]
    pub response_delay_ms: Option<u64>,
    /// How long to wait for an answer, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How often to read the inputs, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// `false`: declared but not installed yet. Bindings to it are accepted and its commands
    /// queue durably until it is enabled; no driver runs. Default `true`.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_parity() -> String {
    "none".into()
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit_id() -> u8 {
    1
}
fn default_timeout_ms() -> u64 {
    500
}
fn default_poll_ms() -> u64 {
    250
}

/// `[devices.lock_api]`: the smart-lock vendor API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockApiConfig {
    /// Device id.
    #[serde(default = "default_lock_api_id")]
    pub id: String,
    /// Base URL of the vendor API.
    pub url: String,
    /// File holding the API key (or set `UNITGATE_LOCK_API_KEY`). Never the key itself.
    #[serde(default)]
    pub api_key_file: PathBuf,
    /// Request timeout, in milliseconds.
    #[serde(default = "default_lock_timeout_ms")]
    pub timeout_ms: u64,
    /// Simulator only: its rate limit (ignored by the gateway).
    #[serde(default, skip_serializing)]
    pub rate_limit_per_s: Option<u32>,
    /// The lock ids installed at the site (hw-sim serves these): a smart-lock binding to any
    /// other id is refused. Unset: any id is accepted, since the vendor knows its locks and
    /// checking a binding must not need the network.
    #[serde(default)]
    pub locks: Option<Vec<String>>,
    /// `false`: declared but not installed yet. Bindings to it are accepted and its commands
    /// queue durably until it is enabled; no driver runs. Default `true`.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_lock_api_id() -> String {
    "locks".into()
}
fn default_lock_timeout_ms() -> u64 {
    5000
}

/// OSDP's well-known default secure channel key (SCBK-D): refused outside install mode.
pub const SCBK_DEFAULT: &str = "303132333435363738393a3b3c3d3e3f";

impl DevicesConfig {
    /// Every problem, each naming its key.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut p = Vec::new();
        let mut bad = |key: String, message: String| p.push(ConfigProblem { key, message });
        if !(1..=86_400).contains(&self.reconcile_s) {
            bad("devices.reconcile_s".into(), "1 to 86400 seconds".into());
        }
        let mut ids = std::collections::HashSet::new();
        let boards: std::collections::HashMap<&str, &RelayBoardConfig> = self
            .relay_boards
            .iter()
            .map(|b| (b.id.as_str(), b))
            .collect();
        for (i, b) in self.relay_boards.iter().enumerate() {
            let key = format!("devices.relay_boards[{i}]");
            if crate::domain::unit::validate_id(&b.id).is_err() || !ids.insert(b.id.clone()) {
                bad(
                    format!("{key}.id"),
                    format!("{:?} must be a unique id", b.id),
                );
            }
            match b.transport {
                ModbusTransport::Tcp if b.address.parse::<SocketAddr>().is_err() => bad(
                    format!("{key}.address"),
                    "tcp boards need \"IP:PORT\"".into(),
                ),
                ModbusTransport::Rtu if b.port.is_empty() => bad(
                    format!("{key}.port"),
                    "rtu boards need a serial device (e.g. /dev/unitgate-rs485-0)".into(),
                ),
                _ => {}
            }
            if !["none", "even", "odd"].contains(&b.parity.as_str()) {
                bad(format!("{key}.parity"), "none, even or odd".into());
            }
            if !(1..=2).contains(&b.stop_bits) {
                bad(format!("{key}.stop_bits"), "1 or 2".into());
            }
            if !(1..=247).contains(&b.unit_id) {
                bad(format!("{key}.unit_id"), "1 to 247".into());
            }
            if !(10..=10_000).contains(&b.timeout_ms) {
                bad(format!("{key}.timeout_ms"), "10 to 10000".into());
            }
            if !(20..=60_000).contains(&b.poll_ms) {
                bad(format!("{key}.poll_ms"), "20 to 60000".into());
            }
        }
        let coil_ok = |c: &CoilRef| {
            boards
                .get(c.board.as_str())
                .is_some_and(|b| c.coil < b.coils)
        };
        let input_ok = |c: &InputRef| {
            boards
                .get(c.board.as_str())
                .is_some_and(|b| c.input < b.inputs)
        };
        for (i, k) in self.keypads.iter().enumerate() {
            let key = format!("devices.keypads[{i}]");
            if crate::domain::unit::validate_id(&k.id).is_err() || !ids.insert(k.id.clone()) {
                bad(
                    format!("{key}.id"),
                    format!("{:?} must be a unique id", k.id),
                );
            }
            if crate::domain::unit::validate_id(&k.zone).is_err() {
                bad(
                    format!("{key}.zone"),
                    "must be set (the zone units list in `zones`)".into(),
                );
            }
            if k.port.is_empty() && k.tcp.is_empty() {
                bad(format!("{key}.port"), "set port (serial) or tcp".into());
            }
            if !k.tcp.is_empty() && k.tcp.parse::<SocketAddr>().is_err() {
                bad(format!("{key}.tcp"), "must be \"IP:PORT\"".into());
            }
            if ![9600, 19200, 38400, 57600, 115200].contains(&k.baud) {
                bad(
                    format!("{key}.baud"),
                    "9600, 19200, 38400, 57600 or 115200".into(),
                );
            }
            if k.address > 126 {
                bad(format!("{key}.address"), "0 to 126".into());
            }
            let hex = k.scbk.len() == 32 && k.scbk.bytes().all(|b| b.is_ascii_hexdigit());
            if !k.scbk.is_empty() && !hex {
                bad(format!("{key}.scbk"), "must be 32 hex digits".into());
            } else if !k.install_mode && k.scbk.is_empty() {
                bad(
                    format!("{key}.scbk"),
                    "a secure channel key is required (plaintext only with install_mode = true)"
                        .into(),
                );
            } else if !k.install_mode && k.scbk.eq_ignore_ascii_case(SCBK_DEFAULT) {
                bad(
                    format!("{key}.scbk"),
                    "the OSDP default key is refused outside install_mode".into(),
                );
            }
            if k.gate.as_ref().is_some_and(|g| !coil_ok(g)) {
                bad(
                    format!("{key}.gate"),
                    "names a board or coil that is not configured".into(),
                );
            }
            if k.gate_sensor.as_ref().is_some_and(|g| !input_ok(g)) {
                bad(
                    format!("{key}.gate_sensor"),
                    "names a board or input that is not configured".into(),
                );
            }
            if !(100..=60_000).contains(&k.pulse_ms) {
                bad(format!("{key}.pulse_ms"), "100 to 60000".into());
            }
        }
        if let Some(l) = &self.lock_api {
            if !ids.insert(l.id.clone()) {
                bad(
                    "devices.lock_api.id".into(),
                    format!("{:?} is used by another device", l.id),
                );
            }
            if !(l.url.starts_with("https://") || l.url.starts_with("http://")) {
                bad(
                    "devices.lock_api.url".into(),
                    "must be an https:// (or http:// on a trusted link) URL".into(),
                );
            }
            if !(100..=60_000).contains(&l.timeout_ms) {
                bad("devices.lock_api.timeout_ms".into(), "100 to 60000".into());
            }
            let mut seen = std::collections::HashSet::new();
            for (i, lock) in l.locks.iter().flatten().enumerate() {
                if crate::domain::unit::validate_id(lock).is_err() || !seen.insert(lock) {
                    bad(
                        format!("devices.lock_api.locks[{i}]"),
                        format!("{lock:?} must be a unique lock id"),
                    );
                }
            }
        }
        p
    }
}

/// `[site]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    /// Site id (cloud id). Required.
    pub id: String,
    /// Display name.
    pub name: String,
    /// IANA timezone, e.g. `Europe/London`.
    pub timezone: String,
    /// Gate access hours per weekday.
    pub access_hours: AccessHours,
    /// Reserved → occupied on the start date.
    pub auto_occupy: bool,
    /// Site-local time of the automatic move-in.
    pub auto_occupy_at: String,
    /// Deallocate when a tenancy's end date has passed.
    pub auto_deallocate: bool,
    /// Overlock on `payment.failed`.
    pub auto_overlock: bool,
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig {
            id: String::new(),
            name: String::new(),
            timezone: "UTC".into(),
            access_hours: AccessHours::always(),
            auto_occupy: true,
            auto_occupy_at: "06:00".into(),
            auto_deallocate: true,
            auto_overlock: false,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Directory for the database and the PIN key.
    pub data_dir: PathBuf,
    /// File with the 32-byte PIN hash key; empty = `<data_dir>/pin.key`, created on first start.
    pub pin_key_file: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: PathBuf::from("/var/lib/unitgate"),
            pin_key_file: PathBuf::new(),
        }
    }
}

impl StoreConfig {
    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("unitgate.db")
    }

    /// The PIN key file.
    pub fn pin_key_path(&self) -> PathBuf {
        if self.pin_key_file.as_os_str().is_empty() {
            self.data_dir.join("pin.key")
        } else {
            self.pin_key_file.clone()
        }
    }
}

/// A bearer token: only its SHA-256 is configured.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (for logs).
    pub name: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    /// Scopes: `read`, `allocations:write`, `units:write`, `admin`.
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: String,
    /// Serve plain HTTP (no TLS). Only for localhost demos or behind a TLS terminator.
    pub plain_http: bool,
    /// PEM certificate chain for HTTPS.
    pub tls_cert: PathBuf,
    /// PEM private key for HTTPS.
    pub tls_key: PathBuf,
    /// PEM CA certificate(s) for mTLS: when set, clients must present a certificate
    /// signed by one of them. Empty = no client certificates asked for.
    pub tls_client_ca: PathBuf,
    /// Largest request body, except the snapshot.
    pub max_body_bytes: usize,
    /// Largest `PUT /v1/sync/snapshot` body.
    pub max_snapshot_bytes: usize,
    /// Seconds a client has to send its first request's headers, from connecting; a
    /// slower or silent connection is closed (slowloris).
    pub header_read_timeout_s: u64,
    /// Seconds a keep-alive connection may wait for its next request (idle, then headers)
    /// before it is closed; at least `header_read_timeout_s`.
    pub keep_alive_idle_s: u64,
    /// Seconds a client has to send a whole request body (every route but the snapshot);
    /// later, the request is answered 408 and the connection closed.
    pub body_read_timeout_s: u64,
    /// Seconds a client has to send the whole `PUT /v1/sync/snapshot` body.
    pub snapshot_read_timeout_s: u64,
    /// Seconds a client has to complete the TLS handshake.
    pub tls_handshake_timeout_s: u64,
    /// Connections served at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_ttl_hours: u32,
    /// The control socket (`unitgate status`): a Unix socket serving a read-only subset of
    /// the API, guarded by its file mode (0660). Empty = none.
    pub control_socket: PathBuf,
    /// Bearer tokens.
    pub tokens: Vec<TokenConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8443".into(),
            plain_http: false,
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            max_body_bytes: 1 << 20,
            max_snapshot_bytes: 64 << 20,
            header_read_timeout_s: 10,
            keep_alive_idle_s: 60,
            body_read_timeout_s: 30,
            snapshot_read_timeout_s: 600,
            tls_handshake_timeout_s: 10,
            max_connections: 512,
            idempotency_ttl_hours: 48,
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            tokens: Vec::new(),
        }
    }
}

/// Where the daemon listens for `unitgate status` unless configured (systemd's
/// `RuntimeDirectory=unitgate` makes the directory).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/unitgate/control.sock";

/// What is wrong with a control socket path, if anything (empty = disabled, fine).
fn control_socket_problem(path: &Path) -> Option<String> {
    let bytes = path.as_os_str().len();
    if bytes == 0 {
        return None;
    }
    if !path.is_absolute() {
        return Some(format!(
            "{:?} must be an absolute path (e.g. {DEFAULT_CONTROL_SOCKET:?}), or \"\" for no control socket",
            path.display().to_string()
        ));
    }
    // sun_path holds 108 bytes with the terminating NUL.
    if bytes > 107 {
        return Some(format!(
            "is {bytes} bytes long; a Unix socket path may have at most 107"
        ));
    }
    if path.is_dir() {
        return Some(format!(
            "{:?} is a directory; name the socket file in it",
            path.display().to_string()
        ));
    }
    None
}

/// `[access]`: how the keypads decide, beyond the site's hours.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// Wrong PINs at one keypad that lock it out...
    pub lockout_attempts: u32,
    /// ...within this many seconds...
    pub lockout_window_s: u64,
    /// ...for this many seconds.
    pub lockout_s: u64,
    /// A gate open longer than this (seconds) raises `door.alarm`.
    pub gate_held_open_s: u64,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            lockout_attempts: 5,
            lockout_window_s: 600,
            lockout_s: 300,
            gate_held_open_s: 60,
        }
    }
}

/// `[cloud]`: how the site talks to the cloud platform (DESIGN.md §3).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// The MQTT link (commands in, events and unit states out).
    pub mqtt: Option<MqttConfig>,
    /// The optional HTTPS event uplink, for clouds without MQTT.
    pub https_uplink: Option<HttpsUplinkConfig>,
    /// Inbound webhooks `POST /v1/webhooks/{source}`, one entry per source.
    pub webhooks: Vec<WebhookSourceConfig>,
    /// Disk the undelivered event backlog may use, in MiB, before `queue.full` is raised and
    /// access events beyond the cap are compacted into counts (allocation events never are).
    pub backlog_cap_mib: u64,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            mqtt: None,
            https_uplink: None,
            webhooks: Vec::new(),
            backlog_cap_mib: 512,
        }
    }
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum MqttProtocol {
    /// MQTT 5 (response topic + correlation data).
    #[serde(rename = "v5")]
    V5,
    /// MQTT 3.1.1 (replies on the reply topic).
    #[serde(rename = "v3.1.1")]
    V311,
}

/// `[cloud.mqtt]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// `v5` (default) or `v3.1.1`.
    #[serde(default = "default_mqtt_protocol")]
    pub protocol: MqttProtocol,
    /// Client id; empty = `unitgate-{site_id}`.
    #[serde(default)]
    pub client_id: String,
    /// Username for the broker, if it wants one.
    #[serde(default)]
    pub username: String,
    /// File holding the password (never in this file).
    #[serde(default)]
    pub password_file: PathBuf,
    /// CA certificates (PEM) to trust for `mqtts://`; empty = the system's roots.
    #[serde(default)]
    pub ca_file: PathBuf,
    /// Client certificate (PEM) for certificate auth.
    #[serde(default)]
    pub client_cert: PathBuf,
    /// Its private key (PEM).
    #[serde(default)]
    pub client_key: PathBuf,
    /// Keep-alive, seconds.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Session expiry (v5) in seconds: how long the broker keeps commands for us while away.
    #[serde(default = "default_session_expiry_s")]
    pub session_expiry_s: u32,
    /// Events published and not yet acknowledged, at most.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// Longest wait between reconnect attempts, seconds.
    #[serde(default = "default_reconnect_max_s")]
    pub reconnect_max_s: u64,
    /// Largest MQTT packet accepted or sent, bytes (snapshots arrive chunked below it).
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Message-level security for brokers we do not trust: every command carries a client
    /// id, a monotonic nonce and an HMAC-SHA256 under that client's key (see `clients`).
    #[serde(default)]
    pub signed_commands: bool,
    /// The cloud clients allowed to send commands, with their keys and operations.
    #[serde(default)]
    pub clients: Vec<MqttClientConfig>,
}

/// `[[cloud.mqtt.clients]]`: one cloud client of the command topics.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttClientConfig {
    /// The client's id, as it signs its commands.
    pub id: String,
    /// File holding its HMAC key (at least 32 bytes of secret).
    pub key_file: PathBuf,
    /// Operations it may call (`reserve`, `snapshot`, ...); `["*"]` = all.
    pub operations: Vec<String>,
}

/// `[cloud.https_uplink]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsUplinkConfig {
    /// Where event batches are POSTed.
    pub url: String,
    /// File holding the signing secret of `X-Unitgate-Signature`.
    pub secret_file: PathBuf,
    /// Events per batch, at most.
    #[serde(default = "default_batch")]
    pub batch: u32,
    /// Request timeout, milliseconds.
    #[serde(default = "default_uplink_timeout_ms")]
    pub timeout_ms: u64,
}

/// `[[cloud.webhooks]]`: a source allowed to POST `/v1/webhooks/{name}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSourceConfig {
    /// The `{source}` path segment.
    pub name: String,
    /// File holding the source's signing secret.
    pub secret_file: PathBuf,
    /// `payment.processed` lifts the contact's overlock (else it is only recorded).
    #[serde(default)]
    pub remove_overlock_on_payment: bool,
}

impl CloudConfig {
    /// What is wrong with the backlog cap, the HTTPS uplink and the webhook sources:
    /// (key, message) pairs.
    pub fn uplink_problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.backlog_cap_mib == 0 {
            p.push(("cloud.backlog_cap_mib".into(), "must be at least 1".into()));
        }
        if let Some(u) = &self.https_uplink {
            if !(u.url.starts_with("https://") || u.url.starts_with("http://"))
                || reqwest::Url::parse(&u.url).is_err()
            {
                p.push((
                    "cloud.https_uplink.url".into(),
                    format!(
                        "{:?} is not an http(s):// URL",
                        crate::secret::redact_url(&u.url)
                    ),
                ));
            }
            if u.secret_file.as_os_str().is_empty() {
                p.push((
                    "cloud.https_uplink.secret_file".into(),
                    "required (the file holding the signing secret)".into(),
                ));
            }
            if !(1..=10_000).contains(&u.batch) {
                p.push((
                    "cloud.https_uplink.batch".into(),
                    "must be 1 to 10000".into(),
                ));
            }
            if !(100..=300_000).contains(&u.timeout_ms) {
                p.push((
                    "cloud.https_uplink.timeout_ms".into(),
                    "must be 100 to 300000".into(),
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for w in &self.webhooks {
            let ok = !w.name.is_empty()
                && w.name.len() <= 64
                && w.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                p.push((
                    "cloud.webhooks.name".into(),
                    format!(
                        "{:?} must be 1 to 64 of [A-Za-z0-9-_.] (a URL path segment)",
                        w.name
                    ),
                ));
            }
            if !seen.insert(w.name.as_str()) {
                p.push((
                    "cloud.webhooks.name".into(),
                    format!("{:?} is configured twice", w.name),
                ));
            }
            if w.secret_file.as_os_str().is_empty() {
                p.push((
                    format!("cloud.webhooks.{}.secret_file", w.name),
                    "required (the file holding the source's signing secret)".into(),
                ));
            }
        }
        p
    }
}

impl MqttConfig {
    /// What is wrong with this section: (key, message) pairs.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if let Err(e) = crate::cloud::mqtt::parse_url(&self.url) {
            p.push(("cloud.mqtt.url", e.to_string()));
        }
        if self.inflight == 0 {
            p.push(("cloud.mqtt.inflight", "must be at least 1".into()));
        }
        if self.max_packet_bytes < 4096 {
            p.push((
                "cloud.mqtt.max_packet_bytes",
                "must be at least 4096".into(),
            ));
        }
        if self.client_cert.as_os_str().is_empty() != self.client_key.as_os_str().is_empty() {
            p.push((
                "cloud.mqtt.client_key",
                "client_cert and client_key go together".into(),
            ));
        }
        if !self.password_file.as_os_str().is_empty() && self.username.is_empty() {
            p.push((
                "cloud.mqtt.username",
                "password_file is set but username is empty".into(),
            ));
        }
        if self.signed_commands && self.clients.is_empty() {
            p.push((
                "cloud.mqtt.clients",
                "signed_commands = true needs at least one [[cloud.mqtt.clients]]".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.clients {
            if c.id.is_empty() || !seen.insert(c.id.as_str()) {
                p.push((
                    "cloud.mqtt.clients.id",
                    format!("{:?} is empty or used twice", c.id),
                ));
            }
            if c.key_file.as_os_str().is_empty() {
                p.push((
                    "cloud.mqtt.clients.key_file",
                    format!("client {:?}: required", c.id),
                ));
            }
            for op in &c.operations {
                if op != "*" && !crate::cloud::dispatch::OPERATIONS.contains(&op.as_str()) {
                    p.push((
                        "cloud.mqtt.clients.operations",
                        format!("client {:?}: unknown operation {op:?}", c.id),
                    ));
                }
            }
        }
        p
    }
}

fn default_mqtt_protocol() -> MqttProtocol {
    MqttProtocol::V5
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_session_expiry_s() -> u32 {
    7 * 24 * 3600
}
fn default_inflight() -> u16 {
    100
}
fn default_reconnect_max_s() -> u64 {
    30
}
fn default_max_packet_bytes() -> usize {
    256 * 1024
}
fn default_batch() -> u32 {
    500
}
fn default_uplink_timeout_ms() -> u64 {
    10_000
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `IP:PORT` of a plain-HTTP `GET /metrics` without a token, for a local Prometheus;
    /// empty = off (the API's `/metrics` with a `read` token is always there).
    pub listen: String,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Filter, e.g. `info` or `unitgate=debug`.
    pub level: String,
    /// `auto` (human on a terminal, JSON otherwise), `human` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "auto".into(),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `site.timezone`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override does not parse. The message gives line and column but not
    /// the line itself, which may hold a secret (a keypad's `scbk`).
    #[error("cannot load configuration: {}", without_source_lines(&.0.to_string()))]
    Load(#[from] config::ConfigError),
    /// Values are out of range.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

/// A TOML parse error without the quoted source (`  |`, `6 | scbk = ...`, `  |   ^^^`).
fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            let t = t.trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|')
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Scopes a token may carry.
pub const SCOPES: [&str; 4] = ["read", "allocations:write", "units:write", "admin"];

impl Config {
    /// Loads `path` (if given) and `UNITGATE__SECTION__KEY` overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let cfg = Self::load_unchecked(path)?;
        cfg.validate().map_err(ConfigError::Invalid)?;
        Ok(cfg)
    }

    /// Loads without validating.
    pub fn load_unchecked(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(p) = path {
            b = b.add_source(
                config::File::from(p)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        Self::finish(b)
    }

    /// Loads from TOML text plus environment overrides, without validating.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::finish(
            config::Config::builder()
                .add_source(config::File::from_str(text, config::FileFormat::Toml)),
        )
    }

    fn finish(
        b: config::ConfigBuilder<config::builder::DefaultState>,
    ) -> Result<Config, ConfigError> {
        let b = b.add_source(
            config::Environment::with_prefix("UNITGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        Ok(b.build()?.try_deserialize()?)
    }

    /// Every problem, each naming its key.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(ConfigProblem {
                key: key.to_owned(),
                message,
            })
        };
        let a = &self.access;
        if a.lockout_attempts == 0 {
            bad("access.lockout_attempts", "must be at least 1".into());
        }
        if a.lockout_window_s == 0 || a.lockout_s == 0 {
            let key = if a.lockout_s == 0 {
                "access.lockout_s"
            } else {
                "access.lockout_window_s"
            };
            bad(key, "must be at least 1 second".into());
        }
        if let Some(k) = self
            .devices
            .keypads
            .iter()
            .find(|k| k.gate.is_some() && a.gate_held_open_s * 1000 <= k.pulse_ms)
        {
            bad(
                "access.gate_held_open_s",
                format!(
                    "must be longer than keypad {}'s gate pulse ({} ms), or every entry raises an alarm",
                    k.id, k.pulse_ms
                ),
            );
        }
        if let Err(m) = crate::domain::unit::validate_id(&self.site.id) {
            bad("site.id", format!("{m} (the site's cloud id; required)"));
        }
        if self.site.timezone.parse::<chrono_tz::Tz>().is_err() {
            bad(
                "site.timezone",
                format!(
                    "{:?} is not an IANA timezone (e.g. \"Europe/London\")",
                    self.site.timezone
                ),
            );
        }
        if let Err(errs) = self.site.access_hours.validate() {
            for e in errs {
                bad(&format!("site.access_hours.{}", e.field), e.message);
            }
        }
        if chrono::NaiveTime::parse_from_str(&self.site.auto_occupy_at, "%H:%M").is_err() {
            bad(
                "site.auto_occupy_at",
                format!("{:?} is not a time \"HH:MM\"", self.site.auto_occupy_at),
            );
        }
        if self.store.data_dir.as_os_str().is_empty() {
            bad(
                "store.data_dir",
                "must be set (e.g. /var/lib/unitgate)".into(),
            );
        }
        if self.api.listen.parse::<SocketAddr>().is_err() {
            bad(
                "api.listen",
                format!(
                    "{:?} is not an address \"IP:PORT\" (e.g. \"0.0.0.0:8443\")",
                    self.api.listen
                ),
            );
        }
        if !self.api.plain_http {
            if self.api.tls_cert.as_os_str().is_empty() {
                bad(
                    "api.tls_cert",
                    "required unless api.plain_http = true (a PEM certificate chain)".into(),
                );
            }
            if self.api.tls_key.as_os_str().is_empty() {
                bad(
                    "api.tls_key",
                    "required unless api.plain_http = true (a PEM private key)".into(),
                );
            }
        } else if !self.api.tls_client_ca.as_os_str().is_empty() {
            bad(
                "api.tls_client_ca",
                "client certificates need HTTPS: set api.plain_http = false, or leave this empty"
                    .into(),
            );
        }
        if !(1024..=(64 << 20)).contains(&self.api.max_body_bytes) {
            bad(
                "api.max_body_bytes",
                "must be between 1024 and 67108864".into(),
            );
        }
        if !(1024..=(1 << 30)).contains(&self.api.max_snapshot_bytes) {
            bad(
                "api.max_snapshot_bytes",
                "must be between 1024 and 1073741824".into(),
            );
        }
        for (key, v) in [
            ("api.header_read_timeout_s", self.api.header_read_timeout_s),
            ("api.keep_alive_idle_s", self.api.keep_alive_idle_s),
            ("api.body_read_timeout_s", self.api.body_read_timeout_s),
            (
                "api.snapshot_read_timeout_s",
                self.api.snapshot_read_timeout_s,
            ),
            (
                "api.tls_handshake_timeout_s",
                self.api.tls_handshake_timeout_s,
            ),
        ] {
            if !(1..=3600).contains(&v) {
                bad(key, "must be between 1 and 3600 seconds".into());
            }
        }
        if !(1..=65536).contains(&self.api.max_connections) {
            bad("api.max_connections", "must be between 1 and 65536".into());
        }
        if self.api.idempotency_ttl_hours == 0 {
            bad("api.idempotency_ttl_hours", "must be at least 1".into());
        }
        if let Some(m) = control_socket_problem(&self.api.control_socket) {
            bad("api.control_socket", m);
        }
        for (i, t) in self.api.tokens.iter().enumerate() {
            let key = format!("api.tokens[{i}]");
            if t.name.is_empty() {
                bad(&format!("{key}.name"), "must be set".into());
            }
            if t.sha256.len() != 64 || hex::decode(&t.sha256).is_err() {
                bad(
                    &format!("{key}.sha256"),
                    "must be 64 hex digits: the SHA-256 of the token, never the token itself"
                        .into(),
                );
            }
            if t.scopes.is_empty() {
                bad(
                    &format!("{key}.scopes"),
                    format!("must name at least one of {}", SCOPES.join(", ")),
                );
            }
            for s in &t.scopes {
                if !SCOPES.contains(&s.as_str()) {
                    bad(
                        &format!("{key}.scopes"),
                        format!(
                            "unknown scope {s:?} (expected one of {})",
                            SCOPES.join(", ")
                        ),
                    );
                }
            }
        }
        for d in self.devices.problems() {
            bad(&d.key, d.message);
        }
        if let Some(m) = &self.cloud.mqtt {
            for (key, message) in m.problems() {
                bad(key, message);
            }
        }
        for (key, message) in self.cloud.uplink_problems() {
            bad(&key, message);
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            bad(
                "metrics.listen",
                format!(
                    "{:?} is not IP:PORT (e.g. \"127.0.0.1:9464\"; empty = off)",
                    self.metrics.listen
                ),
            );
        }
        if !["auto", "human", "json"].contains(&self.log.format.as_str()) {
            bad(
                "log.format",
                format!("{:?} is not auto, human or json", self.log.format),
            );
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            bad(
                "log.level",
                format!("{:?} is not a log filter (e.g. \"info\")", self.log.level),
            );
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// What is valid but probably not meant: shown by `check-config`, logged at start.
    pub fn warnings(&self) -> Vec<ConfigProblem> {
        let mut w = Vec::new();
        // Accepted so that a package can install a config with no credential in it: the API
        // then refuses every request (401) until a token is added and the daemon reloaded.
        if self.api.tokens.is_empty() {
            w.push(ConfigProblem {
                key: "api.tokens".into(),
                message: "no API tokens: the API refuses every request; add [[api.tokens]] with name, sha256 and scopes (see `unitgate token`)".into(),
            });
        }
        w
    }

    /// The site timezone (valid after `validate`).
    pub fn tz(&self) -> chrono_tz::Tz {
        self.site.timezone.parse().unwrap_or(chrono_tz::UTC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> String {
        format!(
            r#"
            [site]
            id = "site-1"
            timezone = "Europe/London"
            [store]
            data_dir = "/tmp/x"
            [api]
            plain_http = true
            [[api.tokens]]
            name = "cloud"
            sha256 = "{}"
            scopes = ["admin"]
            "#,
            "a".repeat(64)
        )
    }

    #[test]
    fn defaults_fill_every_key() {
        let c = Config::from_toml(&minimal()).unwrap();
        c.validate().unwrap();
        assert_eq!(c.api.max_body_bytes, 1 << 20);
        assert!(c.site.auto_occupy);
        assert_eq!(c.site.auto_occupy_at, "06:00");
    }

    #[test]
    fn problems_name_their_keys() {
        let text = minimal()
            .replace("Europe/London", "Mars/Olympus")
            .replace("\"admin\"", "\"root\"")
            .replace("plain_http = true", "plain_http = false");
        let c = Config::from_toml(&text).unwrap();
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "site.timezone",
                "api.tls_cert",
                "api.tls_key",
                "api.tokens[0].scopes"
            ]
        );
    }

    #[test]
    fn uplink_and_webhook_problems_name_their_keys() {
        let text = format!(
            r#"{}
            [cloud]
            backlog_cap_mib = 0
            [cloud.https_uplink]
            url = "ftp://x"
            secret_file = "/etc/unitgate/uplink.secret"
            batch = 0
            [[cloud.webhooks]]
            name = "billing"
            secret_file = "/a"
            [[cloud.webhooks]]
            name = "billing"
            secret_file = ""
            [[cloud.webhooks]]
            name = "bad/name"
            secret_file = "/b"
            "#,
            minimal()
        );
        let keys: Vec<String> = Config::from_toml(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "cloud.backlog_cap_mib",
                "cloud.https_uplink.url",
                "cloud.https_uplink.batch",
                "cloud.webhooks.name",
                "cloud.webhooks.billing.secret_file",
                "cloud.webhooks.name",
            ]
        );
    }

    #[test]
    fn reconcile_period_defaults_to_30_s_and_is_bounded() {
        assert_eq!(
            Config::from_toml(&minimal()).unwrap().devices.reconcile_s,
            30
        );
        let c = Config::from_toml(&format!("{}\n[devices]\nreconcile_s = 0\n", minimal())).unwrap();
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["devices.reconcile_s"]);
    }

    #[test]
    fn client_ca_needs_https() {
        let with_ca = minimal().replace(
            "plain_http = true",
            "plain_http = true\ntls_client_ca = \"/etc/unitgate/clients.pem\"",
        );
        let c = Config::from_toml(&with_ca).unwrap();
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["api.tls_client_ca"]);

        let https = with_ca.replace(
            "plain_http = true",
            "plain_http = false\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"",
        );
        let c = Config::from_toml(&https).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.api.tls_client_ca,
            PathBuf::from("/etc/unitgate/clients.pem")
        );
        assert!(
            Config::from_toml(&minimal())
                .unwrap()
                .api
                .tls_client_ca
                .as_os_str()
                .is_empty()
        );
    }

    #[test]
    fn the_sim_site_file_is_a_valid_devices_section() {
        let sim = include_str!("../config/sim.toml");
        let c = Config::from_toml(&format!("{}\n{sim}", minimal())).unwrap();
        assert_eq!(c.devices.keypads.len(), 2);
        assert_eq!(c.devices.relay_boards.len(), 2);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn device_problems_name_their_keys() {
        let text = format!(
            "{}\n{}",
            minimal(),
            r#"
            [[devices.keypads]]
            id = "gate-1"
            zone = "main-gate"
            tcp = "127.0.0.1:1"
            gate = { board = "relay-9", coil = 0 }
            [[devices.keypads]]
            id = "gate-2"
            zone = "main-gate"
            port = "/dev/ttyUSB0"
            scbk = "303132333435363738393A3B3C3D3E3F"
            [[devices.relay_boards]]
            id = "relay-1"
            transport = "rtu"
            coils = 4
            inputs = 4
            [devices.lock_api]
            url = "ftp://locks"
            "#
        );
        let c = Config::from_toml(&text).unwrap();
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "devices.relay_boards[0].port",
                "devices.keypads[0].scbk",
                "devices.keypads[0].gate",
                "devices.keypads[1].scbk",
                "devices.lock_api.url",
            ]
        );
    }

    #[test]
    fn devices_are_enabled_unless_declared_otherwise() {
        let sim = include_str!("../config/sim.toml");
        let c = Config::from_toml(&format!("{}\n{sim}", minimal())).unwrap();
        assert!(c.devices.keypads.iter().all(|k| k.enabled));
        assert!(c.devices.relay_boards.iter().all(|b| b.enabled));
        assert!(c.devices.lock_api.as_ref().is_some_and(|l| l.enabled));
        let text = format!(
            "{}\n{}",
            minimal(),
            r#"
            [[devices.keypads]]
            id = "gate-1"
            zone = "main-gate"
            tcp = "127.0.0.1:1"
            install_mode = true
            enabled = false
            [[devices.relay_boards]]
            id = "relay-1"
            transport = "tcp"
            address = "127.0.0.1:1"
            coils = 4
            inputs = 4
            enabled = false
            [devices.lock_api]
            url = "http://127.0.0.1:1"
            enabled = false
            "#
        );
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert!(!c.devices.keypads[0].enabled);
        assert!(!c.devices.relay_boards[0].enabled);
        assert!(c.devices.lock_api.as_ref().is_some_and(|l| !l.enabled));
    }

    #[test]
    fn lock_list_ids_must_be_unique_ids() {
        let text = format!(
            "{}\n[devices.lock_api]\nurl = \"http://127.0.0.1:1\"\nlocks = [\"lk-1\", \"bad id\", \"lk-1\"]\n",
            minimal()
        );
        let c = Config::from_toml(&text).unwrap();
        let keys: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            ["devices.lock_api.locks[1]", "devices.lock_api.locks[2]"]
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = minimal().replace("[store]", "[store]\ndata_dri = \"/x\"");
        assert!(Config::from_toml(&text).is_err());
    }
}
