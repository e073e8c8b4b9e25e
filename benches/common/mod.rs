//! Setup shared by the benches (`mod common;` in each): hw-sim started in-process from
//! site-file TOML, its observation stream, the gateway under test with a seeded site, the
//! bare SQLite commit loop, latency series and the machine's load average. Each bench uses
//! a part, hence `dead_code` allowed here.
#![allow(dead_code)]

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use hw_sim::observe::monotonic_ns;
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::Writer as _;
use unitgate::api::http::auth::token_hash_hex;
use unitgate::command::{Executor, system_clock};
use unitgate::config::{Config, TokenConfig};
use unitgate::gateway::Gateway;
use unitgate::store::{StoreError, outbox};

/// The admin token of every bench gateway.
pub const TOKEN: &str = "bench-admin-token-0123456789";
/// Longest wait for a device change after a command (a miss fails the run).
pub const CHANGE_WITHIN: Duration = Duration::from_secs(5);
/// Longest wait for the gateway's outbox to drain between commands.
pub const SETTLE_WITHIN: Duration = Duration::from_secs(5);
/// Poll interval of the outbox-depth wait (between samples, never inside one).
pub const SETTLE_POLL: Duration = Duration::from_micros(500);
/// The tenant every grant is for; the lock API stores it as `tenant_ref`.
pub const CONTACT: &str = "c-bench";
/// The seeded tenancy.
pub const TENANCY: &str = "t-bench";
/// The seeded contact's gate PIN.
pub const PIN: &str = "24681357";
/// Commands (or bare writes) before the clock starts: connections open, caches warm.
pub const WARMUP_OPS: usize = 10;

/// A whole number from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// One measured series: latencies in nanoseconds, sorted.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub ns: Vec<u64>,
}

impl Series {
    pub fn new(label: &str, mut ns: Vec<u64>) -> Series {
        ns.sort_unstable();
        Series {
            label: label.into(),
            ns,
        }
    }

    /// Nearest-rank percentile, in milliseconds.
    pub fn p(&self, q: f64) -> f64 {
        if self.ns.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.ns.len() as f64).ceil() as usize).clamp(1, self.ns.len());
        ms(self.ns[rank - 1])
    }

    pub fn max(&self) -> f64 {
        self.ns.last().map_or(0.0, |&n| ms(n))
    }

    pub fn json(&self) -> Value {
        json!({"n": self.ns.len(), "p50_ms": round3(self.p(0.50)), "p99_ms": round3(self.p(0.99)),
               "max_ms": round3(self.max()), "min_ms": round3(self.ns.first().map_or(0.0, |&n| ms(n)))})
    }
}

pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---- hw-sim observations ------------------------------------------------------------------

/// One line of hw-sim's `GET /events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Observation {
    pub t_ns: u64,
    pub device: String,
    pub kind: String,
    #[serde(default)]
    pub data: Value,
}

/// A device output the bench changes, and how its changes show on the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actuator {
    Coil { board: String, coil: u16 },
    Lock { api: String, lock: String },
}

impl Actuator {
    /// The state this observation says the actuator went to, if it is a change of it.
    pub fn change(&self, o: &Observation) -> Option<String> {
        match self {
            Actuator::Coil { board, coil } => (o.device == *board
                && o.kind == "coil_changed"
                && o.data["coil"].as_u64() == Some(u64::from(*coil)))
            .then(|| coil_state(o.data["on"].as_bool().unwrap_or(false))),
            Actuator::Lock { api, lock } => (o.device == *api
                && o.kind == "lock_state_changed"
                && o.data["lock"].as_str() == Some(lock.as_str()))
            .then(|| {
                lock_state(
                    o.data["to"].as_str().unwrap_or("?"),
                    o.data["assigned_to"].as_str(),
                )
            }),
        }
    }

    /// The state DESIGN.md §4 asks for: an occupied unit's overlock coil is off and its
    /// lock assigned to the tenant; an available unit's coil is on and its lock unassigned.
    pub fn wanted(&self, occupied: bool) -> String {
        match self {
            Actuator::Coil { .. } => coil_state(!occupied),
            Actuator::Lock { .. } if occupied => lock_state("assigned", Some(CONTACT)),
            Actuator::Lock { .. } => lock_state("unassigned", None),
        }
    }
}

pub fn coil_state(on: bool) -> String {
    if on { "on" } else { "off" }.into()
}

pub fn lock_state(to: &str, tenant: Option<&str>) -> String {
    format!("{to} (tenant {})", tenant.unwrap_or("none"))
}

/// hw-sim's observation stream, read by a task into a channel.
pub struct Observations {
    pub rx: mpsc::UnboundedReceiver<Result<Observation, String>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for Observations {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Observations {
    /// Subscribes to every device's observations (unfiltered, so a `lagged` line, which
    /// hw-sim sends as device `*`, is seen) and waits until the subscription is live.
    pub async fn subscribe(http: &reqwest::Client, control_url: &str) -> Result<Observations> {
        let mut res = http
            .get(format!("{control_url}/events"))
            .send()
            .await
            .context("hw-sim GET /events")?;
        ensure!(
            res.status().is_success(),
            "hw-sim GET /events answered {}",
            res.status()
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            loop {
                match res.chunk().await {
                    Ok(Some(bytes)) => {
                        buf.extend_from_slice(&bytes);
                        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=nl).collect();
                            let parsed = serde_json::from_slice::<Observation>(&line[..nl])
                                .map_err(|e| {
                                    format!(
                                        "hw-sim event line does not parse ({e}): {}",
                                        String::from_utf8_lossy(&line)
                                    )
                                });
                            if tx.send(parsed).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Err("hw-sim event stream ended".into()));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!("hw-sim event stream: {e}")));
                        return;
                    }
                }
            }
        });
        let mut obs = Observations { rx, task };
        let first = obs.next(Instant::now() + CHANGE_WITHIN).await?;
        ensure!(
            first.kind == "subscribed",
            "hw-sim's first event line is {first:?}, not `subscribed`"
        );
        Ok(obs)
    }

    pub async fn next(&mut self, deadline: Instant) -> Result<Observation> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Err(_) => bail!("no hw-sim observation in time"),
            Ok(None) => bail!("hw-sim event reader stopped"),
            Ok(Some(Err(m))) => bail!("{m}"),
            Ok(Some(Ok(o))) if o.kind == "lagged" => {
                bail!("hw-sim dropped observations for this reader: {}", o.data)
            }
            Ok(Some(Ok(o))) => Ok(o),
        }
    }

    /// Waits for `target` (one of `all`) to change to `want`; any other change of `all` on
    /// the way, or a change before `t0`, is a wrong answer.
    pub async fn change_of(
        &mut self,
        all: &[Actuator],
        target: &Actuator,
        want: &str,
        t0: u64,
    ) -> Result<Observation> {
        let deadline = Instant::now() + CHANGE_WITHIN;
        loop {
            let o = self
                .next(deadline)
                .await
                .with_context(|| format!("waiting for {target:?} to become {want}"))?;
            for a in all {
                let Some(state) = a.change(&o) else { continue };
                ensure!(
                    a == target && state == want,
                    "while waiting for {target:?} to become {want}, hw-sim saw {a:?} become {state}: {o:?}"
                );
                ensure!(
                    o.t_ns >= t0,
                    "{target:?} changed before the command was sent: {o:?}"
                );
                return Ok(o);
            }
        }
    }

    /// Fails on any change of `all` already waiting (nothing should move between commands).
    pub fn expect_still(&mut self, all: &[Actuator]) -> Result<()> {
        while let Ok(o) = self.rx.try_recv() {
            let o = o.map_err(|m| anyhow!(m))?;
            ensure!(
                o.kind != "lagged",
                "hw-sim dropped observations: {}",
                o.data
            );
            if let Some(a) = all.iter().find(|a| a.change(&o).is_some()) {
                bail!("{a:?} changed with no command outstanding: {o:?}");
            }
        }
        Ok(())
    }

    /// Drops what is waiting (changes made while setting up).
    pub fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

// ---- the simulator ------------------------------------------------------------------------

/// hw-sim started in-process from site-file TOML, with its devices' addresses.
pub struct SimSite {
    pub sim: Sim,
    pub devices: Value,
    _dir: tempfile::TempDir,
}

impl SimSite {
    pub async fn start(toml: &str, dir: tempfile::TempDir) -> Result<SimSite> {
        let site = SiteFile::parse(toml).map_err(|e| anyhow!("bench site file: {e}"))?;
        let sim = Sim::start(&site, Some("127.0.0.1:0")).await?;
        let devices: Value = reqwest::Client::new()
            .get(format!("{}/devices", sim.control_url()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(SimSite {
            sim,
            devices,
            _dir: dir,
        })
    }

    /// `address.<field>` of a device, from the control API's `GET /devices`.
    pub fn address(&self, id: &str, field: &str) -> Result<String> {
        self.devices
            .as_array()
            .and_then(|l| l.iter().find(|d| d["id"] == id))
            .and_then(|d| d["address"][field].as_str())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("hw-sim GET /devices has no {id}.address.{field}"))
    }

    pub async fn stop(self) {
        self.sim.stop().await;
    }
}

// ---- the gateway under test ---------------------------------------------------------------

/// The gateway with `devices_toml` (its `[devices]` section) and a seeded site.
pub struct GatewayUnderTest {
    pub gw: Gateway,
    pub http: reqwest::Client,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl GatewayUnderTest {
    pub async fn start(devices_toml: &str) -> Result<GatewayUnderTest> {
        let dir = tempfile::tempdir()?;
        let mut cfg = Config::from_toml(&format!(
            r#"
            [site]
            id = "site-bench"
            name = "Bench Site"
            timezone = "Europe/London"
            [api]
            listen = "127.0.0.1:0"
            plain_http = true
            {devices_toml}
            "#
        ))?;
        cfg.store.data_dir = dir.path().to_owned();
        cfg.api.tokens = vec![TokenConfig {
            name: "bench".into(),
            sha256: token_hash_hex(TOKEN),
            scopes: vec!["admin".into()],
        }];
        cfg.validate()
            .map_err(|p| anyhow!("bench config is invalid: {p:?}"))?;
        let gw = Gateway::start(&cfg, system_clock()).await?;
        let base = format!("http://{}", gw.addr);
        Ok(GatewayUnderTest {
            gw,
            http: reqwest::Client::new(),
            base,
            _dir: dir,
        })
    }

    pub fn executor(&self) -> &Executor {
        &self.gw.executor
    }

    /// A request as admin; the answer's status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<(u16, Value)> {
        let res = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await?;
        let status = res.status().as_u16();
        let raw = res.bytes().await?;
        Ok((status, serde_json::from_slice(&raw).unwrap_or(Value::Null)))
    }

    pub async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
        want: u16,
    ) -> Result<Value> {
        let (status, v) = self.call(method.clone(), path, body).await?;
        ensure!(
            status == want,
            "{method} {path} answered {status}, expected {want}: {v}"
        );
        Ok(v)
    }

    /// A unit type, units `u-1..=u-n` each bound to `bindings[i]`, one contact with a
    /// tenancy that has started.
    pub async fn seed(&self, bindings: &[Value]) -> Result<Vec<String>> {
        use reqwest::Method;
        self.expect(
            Method::PUT,
            "/v1/unit_types/small",
            json!({"name": "Small"}),
            201,
        )
        .await?;
        let mut units = Vec::new();
        for (i, binding) in bindings.iter().enumerate() {
            let id = format!("u-{}", i + 1);
            self.expect(
                Method::POST,
                "/v1/units",
                json!({"unit": {
                    "id": id, "name": format!("B{:03}", i + 1), "unit_type": "small",
                    "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 4,
                    "door_type": "roll_up", "access_type": "indoor", "standard_rate": 50.0,
                    "walk_thru_order": i, "zones": ["main-gate"],
                }}),
                201,
            )
            .await?;
            self.expect(
                Method::PATCH,
                &format!("/v1/units/{id}"),
                json!({"unit": {"lock": binding}}),
                200,
            )
            .await?;
            units.push(id);
        }
        self.expect(
            Method::PUT,
            &format!("/v1/contacts/{CONTACT}"),
            json!({"name": "Bench Tenant", "access_code": PIN}),
            201,
        )
        .await?;
        self.expect(
            Method::PUT,
            &format!("/v1/tenancies/{TENANCY}"),
            json!({"contact_id": CONTACT, "start_date": "2020-01-01"}),
            201,
        )
        .await?;
        Ok(units)
    }

    pub async fn stop(self) {
        self.gw.stop().await;
    }
}

/// Waits until the gateway has nothing pending for `device` (every change delivered,
/// acknowledged and recorded).
pub async fn settled(executor: &Executor, device: &str) -> Result<()> {
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let d = device.to_owned();
        let (depth, last_error) = executor
            .store()
            .read(move |c| -> Result<_, StoreError> { outbox::depth(c, &d) })
            .await?;
        if depth == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{device}: {depth} change(s) still pending after {SETTLE_WITHIN:?} (last error {last_error:?})"
        );
        tokio::time::sleep(SETTLE_POLL).await; // poll interval, not a wait for the outcome
    }
}

/// `ops` timed commands (after a warm-up) from one client: grant_access to an available
/// unit, deallocate an occupied one, rotating over `units`; each sent once `device` has
/// settled. Returns (command → change, command → HTTP answer) in nanoseconds.
pub async fn drive_gateway(
    g: &GatewayUnderTest,
    obs: &mut Observations,
    device: &str,
    units: &[(String, Actuator)],
    ops: usize,
    settle: bool,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let all: Vec<Actuator> = units.iter().map(|(_, a)| a.clone()).collect();
    let mut occupied = vec![false; units.len()];
    let mut change = Vec::with_capacity(ops);
    let mut answer = Vec::with_capacity(ops);
    for i in 0..WARMUP_OPS + ops {
        let k = i % units.len();
        let (unit, actuator) = &units[k];
        let grant = !occupied[k];
        if settle {
            settled(g.executor(), device).await?;
        }
        obs.expect_still(&all)?;
        let (op, body) = if grant {
            ("grant_access", json!({ "tenancy_id": TENANCY }))
        } else {
            ("deallocate", json!({}))
        };
        let request = g
            .http
            .post(format!("{}/v1/units/{unit}/{op}", g.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .build()?;
        let t0 = monotonic_ns();
        let res = g.http.execute(request).await?;
        let status = res.status().as_u16();
        let raw = res.bytes().await?;
        let t_answer = monotonic_ns();
        let want_status = if grant { "occupied" } else { "available" };
        let got = serde_json::from_slice::<Value>(&raw)
            .ok()
            .and_then(|v| v["unit"]["status"].as_str().map(str::to_owned));
        ensure!(
            status == 200 && got.as_deref() == Some(want_status),
            "{op} {unit}: status {status}, expected 200 with unit.status {want_status:?}: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(500)])
        );
        let seen = obs
            .change_of(&all, actuator, &actuator.wanted(grant), t0)
            .await
            .with_context(|| format!("{op} {unit}"))?;
        occupied[k] = grant;
        if i >= WARMUP_OPS {
            change.push(seen.t_ns - t0);
            answer.push(t_answer - t0);
        }
    }
    settled(g.executor(), device).await?;
    obs.expect_still(&all)?;
    Ok((change, answer))
}

/// A bare tokio-modbus client writing single coils `coils` in turn (each to its other
/// state): (write → acknowledged, write → coil observed), in nanoseconds.
pub async fn bare_modbus(
    ctx: &mut tokio_modbus::client::Context,
    obs: &mut Observations,
    board: &str,
    coils: &[u16],
    ops: usize,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let all: Vec<Actuator> = coils
        .iter()
        .map(|&coil| Actuator::Coil {
            board: board.into(),
            coil,
        })
        .collect();
    let mut on = vec![false; coils.len()];
    let mut rtt = Vec::with_capacity(ops);
    let mut change = Vec::with_capacity(ops);
    for i in 0..WARMUP_OPS + ops {
        let k = i % coils.len();
        let next = !on[k];
        obs.expect_still(&all)?;
        let t0 = monotonic_ns();
        tokio::time::timeout(CHANGE_WITHIN, ctx.write_single_coil(coils[k], next))
            .await
            .with_context(|| format!("{board}: no answer to a bare write of coil {}", coils[k]))?
            .with_context(|| format!("{board}: bare write of coil {}", coils[k]))?
            .map_err(|code| anyhow!("{board}: bare write of coil {}: {code:?}", coils[k]))?;
        let t_ack = monotonic_ns();
        let seen = obs
            .change_of(&all, &all[k], &coil_state(next), t0)
            .await
            .with_context(|| format!("{board}: bare write of coil {}", coils[k]))?;
        on[k] = next;
        if i >= WARMUP_OPS {
            rtt.push(t_ack - t0);
            change.push(seen.t_ns - t0);
        }
    }
    Ok((rtt, change))
}

pub fn coil_bindings(board: &str, units: usize) -> (Vec<Value>, Vec<Actuator>) {
    (1..=units as u16)
        .map(|coil| {
            (
                json!({"kind": "relay", "board": board, "coil": coil}),
                Actuator::Coil {
                    board: board.into(),
                    coil,
                },
            )
        })
        .unzip()
}

/// The gateway's half of a path: start it, seed and bind the units, wait until the
/// bindings' first states have landed, then drive the commands.
pub async fn gateway_half(
    devices_toml: &str,
    obs: &mut Observations,
    device: &str,
    bindings: Vec<Value>,
    actuators: Vec<Actuator>,
    ops: usize,
    settle: bool,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let g = GatewayUnderTest::start(devices_toml).await?;
    let result = async {
        let units = g.seed(&bindings).await?;
        settled(g.executor(), device).await?;
        obs.clear();
        let units: Vec<(String, Actuator)> = units.into_iter().zip(actuators).collect();
        drive_gateway(&g, obs, device, &units, ops, settle).await
    }
    .await;
    g.stop().await;
    result
}

/// The 1-minute load average (Linux), to judge how busy the machine was.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `n` one-row transactions, each `BEGIN IMMEDIATE; INSERT; COMMIT` with the gateway's
/// pragmas (WAL, synchronous=FULL), on a fresh file `baseline.db` in `dir`: each commit's
/// latency and the whole loop's seconds.
pub fn sqlite_commit_loop(dir: &Path, n: usize) -> Result<(Vec<Duration>, f64)> {
    let conn = rusqlite::Connection::open(dir.join("baseline.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    ensure!(
        mode == "wal" && sync == 2,
        "baseline pragmas did not take: {mode}, {sync}"
    );
    conn.execute_batch(
        "CREATE TABLE allocations (id INTEGER PRIMARY KEY, unit_id TEXT NOT NULL, at TEXT NOT NULL) STRICT",
    )?;
    let mut latencies = Vec::with_capacity(n);
    let started = std::time::Instant::now();
    for i in 0..n {
        let t = std::time::Instant::now();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        conn.prepare_cached("INSERT INTO allocations (unit_id, at) VALUES (?1, ?2)")?
            .execute(rusqlite::params![
                format!("u-{}", i % 512),
                "2026-03-10T12:00:00.000Z"
            ])?;
        conn.execute_batch("COMMIT")?;
        latencies.push(t.elapsed());
    }
    let seconds = started.elapsed().as_secs_f64();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM allocations", [], |r| r.get(0))?;
    ensure!(rows == n as i64, "baseline wrote {rows} rows, not {n}");
    Ok((latencies, seconds))
}
