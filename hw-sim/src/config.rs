//! The site file: the same `[devices]` section the gateway reads, plus `[sim]` for the
//! simulator itself. One file describes one site.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole file (unknown top-level sections, e.g. the gateway's `[api]`, are ignored).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct SiteFile {
    /// Simulator settings.
    pub sim: SimConfig,
    /// The site's devices.
    pub devices: Devices,
    /// `[[units]]`: storage units and the devices bound to them, for the technician page
    /// and `GET /units`. Optional.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<UnitConfig>,
}

/// `[[units]]`: one storage unit and the simulated devices bound to it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnitConfig {
    /// The unit's name (e.g. `u-A01`).
    pub name: String,
    /// The smart lock's id at the lock API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
    /// The overlock relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlock: Option<UnitCoil>,
    /// The door sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<UnitInput>,
}

/// A relay board coil bound to a unit (0-based, as in `GET /relays/{id}`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnitCoil {
    /// Relay board id.
    pub board: String,
    /// Coil number, 0-based.
    pub coil: u16,
}

/// A relay board discrete input bound to a unit (0-based).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UnitInput {
    /// Relay board id.
    pub board: String,
    /// Input number, 0-based.
    pub input: u16,
}

/// `[sim]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Control API address.
    pub control_listen: String,
    /// Serial devices (keypad or RTU board ids) whose pseudo-terminal behaves like an
    /// RS-485 line at the device's baud (see [`crate::line`]). Empty (the default): bytes
    /// move at once, whatever the baud.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub line_timing: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            control_listen: "127.0.0.1:9900".into(),
            line_timing: Vec::new(),
        }
    }
}

/// `[devices]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Devices {
    /// OSDP keypads at the gates.
    pub keypads: Vec<KeypadConfig>,
    /// Modbus relay / sensor boards.
    pub relay_boards: Vec<RelayBoardConfig>,
    /// The smart-lock vendor API.
    pub lock_api: Option<LockApiConfig>,
    /// Gateway only (read-back period); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_s: Option<u64>,
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

/// `[[devices.keypads]]`: an OSDP peripheral (keypad + LED + buzzer + text display).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeypadConfig {
    /// Device id, e.g. `gate-1`.
    pub id: String,
    /// The gate zone this keypad guards.
    pub zone: String,
    /// Serial device the control panel opens (RS-485 adapter; the simulator links its
    /// pseudo-terminal here). Empty: no serial line.
    #[serde(default)]
    pub port: String,
    /// Baud rate (9600 or 115200).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Also serve OSDP over TCP at this address (simulator and gateway). Empty: no TCP.
    #[serde(default)]
    pub tcp: String,
    /// OSDP peripheral address (0-126).
    #[serde(default)]
    pub address: u8,
    /// Secure channel base key, 32 hex digits. Empty: no secure channel.
    #[serde(default)]
    pub scbk: String,
    /// The gate strike relay this keypad opens.
    pub gate: Option<CoilRef>,
    /// The gate position input (open = on).
    #[serde(default)]
    pub gate_sensor: Option<InputRef>,
    /// Gateway only (plaintext allowed); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_mode: Option<bool>,
    /// Gateway only (gate pulse length); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pulse_ms: Option<u64>,
    /// Gateway only (declared but not driven); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

fn default_baud() -> u32 {
    9600
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
    /// RTU: the serial device (the simulator links its pseudo-terminal here).
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
    /// Simulator: response delay in milliseconds.
    #[serde(default = "default_delay")]
    pub response_delay_ms: u64,
    /// Gateway only (request timeout); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Gateway only (input polling); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_ms: Option<u64>,
    /// Gateway only (declared but not driven); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
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
fn default_delay() -> u64 {
    3
}

/// `[devices.lock_api]`: the smart-lock vendor API (DESIGN.md §4 reference provider).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockApiConfig {
    /// Device id.
    #[serde(default = "default_lock_api_id")]
    pub id: String,
    /// Base URL (the gateway calls it; the simulator listens on its host:port).
    pub url: String,
    /// File holding the API key (never in this file).
    #[serde(default)]
    pub api_key_file: PathBuf,
    /// Simulator: requests per second allowed per key before 429.
    #[serde(default = "default_rate")]
    pub rate_limit_per_s: u32,
    /// Simulator: the lock ids it serves.
    #[serde(default)]
    pub locks: Vec<String>,
    /// Gateway only (request timeout); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Gateway only (declared but not driven); accepted so one file describes the site, ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

fn default_lock_api_id() -> String {
    "locks".into()
}
fn default_rate() -> u32 {
    20
}

/// Errors reading the site file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot read it.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Does not parse.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: String,
        /// Parser message (names the key).
        message: String,
    },
    /// Values do not make sense.
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        /// File.
        path: String,
        /// Each problem, naming the key.
        problems: Vec<String>,
    },
}

impl SiteFile {
    /// The same site on free ports (`127.0.0.1:0`) with its serial links under `dir`, so a
    /// test or a second simulator never collides with one already running.
    pub fn ephemeral(&self, dir: &Path) -> SiteFile {
        let mut s = self.clone();
        s.sim.control_listen = "127.0.0.1:0".into();
        for k in &mut s.devices.keypads {
            if !k.port.is_empty() {
                k.port = dir.join(&k.id).display().to_string();
            }
            if !k.tcp.is_empty() {
                k.tcp = "127.0.0.1:0".into();
            }
        }
        for b in &mut s.devices.relay_boards {
            match b.transport {
                ModbusTransport::Tcp => b.address = "127.0.0.1:0".into(),
                ModbusTransport::Rtu => b.port = dir.join(&b.id).display().to_string(),
            }
        }
        if let Some(l) = &mut s.devices.lock_api {
            l.url = "http://127.0.0.1:0".into();
        }
        s
    }

    /// Reads and checks a site file.
    pub fn load(path: &Path) -> Result<SiteFile, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        let file = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: p.clone(),
            message,
        })?;
        file.validate()
            .map_err(|problems| ConfigError::Invalid { path: p, problems })?;
        Ok(file)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<SiteFile, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Every problem, naming its key.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let boards: std::collections::HashMap<&str, &RelayBoardConfig> = self
            .devices
            .relay_boards
            .iter()
            .map(|b| (b.id.as_str(), b))
            .collect();
        for (i, k) in self.devices.keypads.iter().enumerate() {
            let key = format!("devices.keypads[{i}]");
            if !ids.insert(k.id.clone()) {
                p.push(format!("{key}.id: {:?} is used twice", k.id));
            }
            if k.port.is_empty() && k.tcp.is_empty() {
                p.push(format!("{key}: set port (serial) or tcp"));
            }
            if k.address > 126 {
                p.push(format!("{key}.address: must be 0 to 126"));
            }
            if !k.scbk.is_empty()
                && (k.scbk.len() != 32 || !k.scbk.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                p.push(format!("{key}.scbk: must be 32 hex digits"));
            }
            if let Some(g) = &k.gate {
                match boards.get(g.board.as_str()) {
                    None => p.push(format!("{key}.gate.board: no relay board {:?}", g.board)),
                    Some(b) if g.coil >= b.coils => p.push(format!(
                        "{key}.gate.coil: board {:?} has {} coils",
                        b.id, b.coils
                    )),
                    _ => {}
                }
            }
        }
        for (i, b) in self.devices.relay_boards.iter().enumerate() {
            let key = format!("devices.relay_boards[{i}]");
            if !ids.insert(b.id.clone()) {
                p.push(format!("{key}.id: {:?} is used twice", b.id));
            }
            match b.transport {
                ModbusTransport::Tcp if b.address.is_empty() => {
                    p.push(format!("{key}.address: required for tcp"))
                }
                ModbusTransport::Rtu if b.port.is_empty() => {
                    p.push(format!("{key}.port: required for rtu"))
                }
                _ => {}
            }
            if !["none", "even", "odd"].contains(&b.parity.as_str()) {
                p.push(format!("{key}.parity: none, even or odd"));
            }
            if !(1..=2).contains(&b.stop_bits) {
                p.push(format!("{key}.stop_bits: 1 or 2"));
            }
            if b.coils == 0 && b.inputs == 0 {
                p.push(format!("{key}: a board needs coils or inputs"));
            }
        }
        for (i, id) in self.sim.line_timing.iter().enumerate() {
            let serial = self
                .devices
                .keypads
                .iter()
                .any(|k| k.id == *id && !k.port.is_empty())
                || self
                    .devices
                    .relay_boards
                    .iter()
                    .any(|b| b.id == *id && b.transport == ModbusTransport::Rtu);
            if !serial {
                p.push(format!(
                    "sim.line_timing[{i}]: {id:?} is no keypad with a port and no RTU board"
                ));
            }
        }
        if let Some(l) = &self.devices.lock_api {
            if !ids.insert(l.id.clone()) {
                p.push(format!("devices.lock_api.id: {:?} is used twice", l.id));
            }
            if !(l.url.starts_with("http://") || l.url.starts_with("https://")) {
                p.push("devices.lock_api.url: must be an http:// or https:// URL".into());
            }
        }
        self.validate_units(&boards, &mut p);
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// Every unit names a known board coil/input and a lock the lock API has.
    fn validate_units(
        &self,
        boards: &std::collections::HashMap<&str, &RelayBoardConfig>,
        p: &mut Vec<String>,
    ) {
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.units.iter().enumerate() {
            let key = format!("units[{i}]");
            if u.name.trim().is_empty() {
                p.push(format!("{key}.name: must not be empty"));
            } else if !names.insert(u.name.as_str()) {
                p.push(format!("{key}.name: {:?} is used twice", u.name));
            }
            if let Some(lock) = &u.lock {
                match &self.devices.lock_api {
                    None => p.push(format!(
                        "{key}.lock: {lock:?} but the site has no [devices.lock_api]"
                    )),
                    Some(l) if !l.locks.contains(lock) => p.push(format!(
                        "{key}.lock: {lock:?} is not in devices.lock_api.locks"
                    )),
                    Some(_) => {}
                }
            }
            if let Some(o) = &u.overlock {
                match boards.get(o.board.as_str()) {
                    None => p.push(format!(
                        "{key}.overlock.board: no relay board {:?}",
                        o.board
                    )),
                    Some(b) if o.coil >= b.coils => p.push(format!(
                        "{key}.overlock.coil: board {:?} has {} coils (0-based)",
                        b.id, b.coils
                    )),
                    Some(_) => {}
                }
            }
            if let Some(d) = &u.door {
                match boards.get(d.board.as_str()) {
                    None => p.push(format!("{key}.door.board: no relay board {:?}", d.board)),
                    Some(b) if d.input >= b.inputs => p.push(format!(
                        "{key}.door.input: board {:?} has {} inputs (0-based)",
                        b.id, b.inputs
                    )),
                    Some(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_site_file_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sim.toml");
        let site = SiteFile::load(&path).unwrap();
        assert_eq!(site.devices.keypads.len(), 2);
        let relay = site
            .devices
            .relay_boards
            .iter()
            .find(|b| b.id == "relay-1")
            .unwrap();
        assert_eq!(
            (relay.coils, relay.inputs, relay.transport),
            (32, 32, ModbusTransport::Rtu)
        );
        assert_eq!(site.devices.lock_api.as_ref().unwrap().locks.len(), 60);
        let e = site.ephemeral(Path::new("/tmp/x"));
        assert_eq!(e.devices.keypads[0].port, "/tmp/x/gate-1");
        assert_eq!(e.devices.lock_api.unwrap().url, "http://127.0.0.1:0");
    }

    #[test]
    fn problems_name_their_keys() {
        let site = SiteFile::parse(
            r#"
            [[devices.keypads]]
            id = "k"
            zone = "z"
            address = 200
            scbk = "xyz"
            gate = { board = "nope", coil = 0 }
            [[devices.relay_boards]]
            id = "k"
            transport = "rtu"
            coils = 1
            inputs = 1
            "#,
        )
        .unwrap();
        let p = site.validate().unwrap_err().join("\n");
        for key in [
            "devices.keypads[0]: set port",
            "devices.keypads[0].address",
            "devices.keypads[0].scbk",
            "devices.keypads[0].gate.board",
            "devices.relay_boards[0].id",
            "devices.relay_boards[0].port",
        ] {
            assert!(p.contains(key), "missing {key} in {p}");
        }
        let timed = SiteFile::parse(
            "[sim]\nline_timing = [\"k\", \"nope\"]\n[[devices.keypads]]\nid = \"k\"\nzone = \"z\"\ntcp = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        let p = timed.validate().unwrap_err().join("\n");
        assert!(
            p.contains("sim.line_timing[0]"),
            "a keypad without a port: {p}"
        );
        assert!(p.contains("sim.line_timing[1]"), "no such device: {p}");
        assert!(
            SiteFile::parse("[devices]\nkeypad = []\n").is_err(),
            "unknown keys are refused"
        );
    }
}
