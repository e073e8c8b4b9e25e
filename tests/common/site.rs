//! A whole simulated site: hw-sim in-process and the gateway, both configured from one
//! `[devices]` text (as `config/sim.toml` describes the demo site for both), with the
//! lock API's real URL filled in once the simulator listens. Helpers read the simulated
//! hardware through hw-sim's control API.

use super::{TestClock, TestGateway, test_config};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;
use unitgate::config::Config;

/// The lock API key, in `{wires}/lock-api.key`.
pub const LOCK_API_KEY: &str = "site-test-lock-key-0123456789";
/// Poll interval of every wait.
pub const POLL: Duration = Duration::from_millis(20);

/// `[[devices.keypads]]` text: a secure-channel keypad at 115200 baud on a pty in
/// `{wires}`, whose gate strike is `coil` of `board` (and gate sensor `sensor`, if any).
pub fn keypad(
    id: &str,
    zone: &str,
    address: u8,
    board: &str,
    coil: u8,
    sensor: Option<u8>,
    pulse_ms: u64,
) -> String {
    let sensor = sensor.map_or(String::new(), |n| {
        format!("gate_sensor = {{ board = \"{board}\", input = {n} }}\n")
    });
    format!(
        r#"
[[devices.keypads]]
id = "{id}"
zone = "{zone}"
port = "{{wires}}/{id}"
baud = 115200
address = {address}
scbk = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a{address:02x}"
gate = {{ board = "{board}", coil = {coil} }}
{sensor}pulse_ms = {pulse_ms}
"#
    )
}

/// `[[devices.relay_boards]]` text: a Modbus TCP board on a port hw-sim picks.
pub fn tcp_board(id: &str, coils: u16, inputs: u16, timeout_ms: u64, poll_ms: u64) -> String {
    format!(
        r#"
[[devices.relay_boards]]
id = "{id}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = {coils}
inputs = {inputs}
timeout_ms = {timeout_ms}
poll_ms = {poll_ms}
"#
    )
}

/// hw-sim and the gateway driving it.
pub struct SimSite {
    /// The simulator.
    pub sim: Sim,
    /// Client for the control API.
    pub http: reqwest::Client,
    /// The gateway.
    pub t: TestGateway,
    /// Holds the pseudo-terminal links and key files.
    pub wires: tempfile::TempDir,
}

impl SimSite {
    /// Starts hw-sim with `devices` (a `[devices]` TOML text in which `{wires}` stands for
    /// a fresh directory for pty links, holding `lock-api.key` with [`LOCK_API_KEY`]), then the gateway with the same
    /// devices, `reconcile_s`, the clock at 2026-03-10T12:00Z and `TestGateway::seed(units)`.
    pub async fn start(devices: &str, reconcile_s: u64, units: usize) -> SimSite {
        Self::start_with(devices, reconcile_s, units, |_| {}).await
    }

    /// [`SimSite::start`], with `tweak` applied to the gateway's config before it starts.
    pub async fn start_with(
        devices: &str,
        reconcile_s: u64,
        units: usize,
        tweak: impl FnOnce(&mut Config),
    ) -> SimSite {
        let wires = tempfile::tempdir().expect("tempdir");
        let devices = devices.replace("{wires}", &wires.path().display().to_string());
        std::fs::write(
            wires.path().join("lock-api.key"),
            format!("{LOCK_API_KEY}\n"),
        )
        .expect("lock API key file");
        let sim = Sim::start(
            &SiteFile::parse(&devices).expect("site file"),
            Some("127.0.0.1:0"),
        )
        .await
        .expect("sim");
        let http = reqwest::Client::new();

        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = test_config(dir.path());
        let hw = Config::from_toml(&format!(
            "[site]\nid = \"x\"\nname = \"x\"\ntimezone = \"UTC\"\n{devices}"
        ))
        .expect("the gateway reads the site file's devices");
        cfg.devices = hw.devices;
        cfg.devices.reconcile_s = reconcile_s;
        // Ports the simulator chose (`127.0.0.1:0` in the text) go into the gateway's copy.
        let listed: Value = http
            .get(format!("{}/devices", sim.control_url()))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("devices JSON");
        let address = |id: &str, key: &str| -> Option<String> {
            listed
                .as_array()
                .and_then(|d| d.iter().find(|d| d["id"] == id))
                .and_then(|d| d["address"][key].as_str())
                .map(str::to_owned)
        };
        if let Some(l) = cfg.devices.lock_api.as_mut() {
            l.url = address(&l.id, "url").expect("lock API url");
        }
        for b in &mut cfg.devices.relay_boards {
            if let Some(a) = address(&b.id, "address") {
                b.address = a;
            }
        }
        tweak(&mut cfg);
        cfg.validate().expect("valid config");
        let t = TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await;
        t.seed(units).await;
        SimSite {
            sim,
            http,
            t,
            wires,
        }
    }

    /// GET on the control API.
    pub async fn control(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.sim.control_url()))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("control JSON")
    }

    /// A board's coils now.
    pub async fn coils(&self, board: &str) -> Vec<bool> {
        self.control(&format!("/relays/{board}")).await["coils"]
            .as_array()
            .expect("coils")
            .iter()
            .map(|v| v.as_bool().expect("bool"))
            .collect()
    }

    /// A lock's state and tenant now.
    pub async fn lock(&self, id: &str) -> (String, Option<String>) {
        let v = self.control(&format!("/locks/{id}")).await;
        (
            v["state"].as_str().unwrap_or_default().to_owned(),
            v["assigned_to"].as_str().map(str::to_owned),
        )
    }

    /// The gateway's `GET /v1/devices` entry of `id`.
    pub async fn device(&self, id: &str) -> Value {
        let a = self.t.get("/v1/devices").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        a.body
            .as_array()
            .and_then(|l| l.iter().find(|d| d["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} in {:?}", a.body))
    }

    /// Sets a unit's lock binding.
    pub async fn bind(&self, unit: &str, lock: Value) {
        let a = self
            .t
            .patch(
                &format!("/v1/units/{unit}"),
                json!({"unit": {"lock": lock}}),
            )
            .await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }

    /// A POST to the gateway that must answer 200.
    pub async fn ok(&self, path: &str, body: Value) -> Value {
        let a = self.t.post(path, body).await;
        assert_eq!(a.status, 200, "{path}: {:?}", a.body);
        a.body
    }

    /// Injects a fault on a simulated device; returns when it was set.
    pub async fn fault(&self, device: &str, kind: &str, value: Option<f64>, ms: u64) -> Instant {
        let r = self
            .http
            .post(format!("{}/faults", self.sim.control_url()))
            .json(&json!({"device": device, "kind": kind, "value": value, "duration_ms": ms}))
            .send()
            .await
            .expect("POST /faults");
        assert!(r.status().is_success(), "{}", r.status());
        Instant::now()
    }

    /// Stops the gateway, then the simulator.
    pub async fn stop(self) {
        self.t.stop().await;
        self.sim.stop().await;
    }
}

/// Polls `check` until it returns true or `within` passes; returns the time it took.
pub async fn until<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(POLL).await; // poll interval, not a wait for the outcome
    }
}
