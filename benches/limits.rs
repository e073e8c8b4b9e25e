//! `cargo bench --bench limits`: the gateway against the physical limits of its links and
//! its disk, each measured beside the limit computed for the same path, in the same run.
//! The gateway and hw-sim both run in this process; hw-sim's pseudo-terminals have RS-485
//! line timing on (`[sim] line_timing`, hw-sim/src/line.rs): bytes cross them no faster
//! than the baud rate allows, and an answer starts only once the request has finished.
//!
//! 1. Keypad → gate. A valid PIN and `#` pressed on hw-sim's OSDP keypad (control API
//!    `POST /keypads/gate-1/keys`, one `osdp_KEYPAD` reply) → the gate strike coil the
//!    gateway energises (a Modbus TCP board, so no second serial line), at 9600 and
//!    115200 baud, in the clear (`install_mode`) and with the secure channel. A sample:
//!    CLOCK_MONOTONIC before the press request → `t_ns` of hw-sim's `coil_changed`. The
//!    floor is the wire time of what must cross the line: the POLL that collects the keys
//!    and the KEYPAD reply carrying them (libosdp frames: 0xFF mark, 5-byte header, code,
//!    data, CRC-16; secure: + 2-byte SCB, 4-byte MAC, data AES-padded to 16). The LED,
//!    buzzer and text commands follow the gate, off the measured path.
//! 2. Modbus RTU. The gateway's HTTP `grant_access`/`deallocate` → the overlock coil on an
//!    RTU board at 9600, 19200 and 115200 baud 8N1 (board response delay 0), beside a bare
//!    tokio-modbus RTU client on the same line. Floor: the Write Single Coil request (8
//!    bytes) and the t3.5 that ends it (the board acts then); round trip: + the 8-byte echo
//!    and its t3.5.
//! 3. Durable commits on the file system of the temp dir: a bare `write 4 KiB + fdatasync`
//!    loop (appending to a file), a bare SQLite loop (WAL, synchronous=FULL, one-row
//!    `BEGIN IMMEDIATE; INSERT; COMMIT`; the loop `benches/api.rs` uses), and the gateway's
//!    store (`Store::write` of a one-row insert, resolved once durable) with 1 and with
//!    `BENCH_LIMITS_CLIENTS` concurrent callers (group commit: one fsync per batch).
//!
//! Prints a table and one JSON object on a line of its own (the only stdout line starting
//! with `{`). A wrong answer fails the run (no gate within 5 s, a Modbus exception, a
//! commit that did not land). Sizes (environment, defaults in brackets):
//! `BENCH_LIMITS_KEYPAD_N` PINs per keypad series [40], `BENCH_LIMITS_RTU_N` commands per
//! RTU series [60], `BENCH_LIMITS_COMMITS` commits per sequential loop [300],
//! `BENCH_LIMITS_GROUP_COMMITS` commits with many clients [3000], `BENCH_LIMITS_CLIENTS`
//! [32], `BENCH_LIMITS_POLL_MS` the RTU board's input `poll_ms` [the gateway's default].

mod common;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use common::{
    GatewayUnderTest, Observation, Observations, PIN, Series, SimSite, TENANCY, bare_modbus,
    coil_bindings, env_usize, gateway_half, load_average, round3, settled,
};
use hw_sim::observe::monotonic_ns;
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use unitgate::store::{Store, StoreError};

const KEYPAD: &str = "gate-1";
const GATE_BOARD: &str = "gate-relays";
const RTU_BOARD: &str = "relay-rtu";
const SCBK: &str = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b";
/// The shortest gate pulse the gateway takes.
const PULSE_MS: u64 = 100;
/// Each PIN is pressed a random 0..this many ms after the previous gate closed (more than
/// the keypad feedback after a grant plus a poll period, even at 9600 baud).
const PHASE_MS: u64 = 400;
/// PINs pressed before the clock starts.
const KEYPAD_WARMUP: usize = 3;
/// Longest wait for the keypad to be polled (and its secure channel up).
const ONLINE_WITHIN: Duration = Duration::from_secs(20);
/// libosdp's CP polls a PD when more than this has passed since the last poll
/// (OSDP_PD_POLL_TIMEOUT_MS in libosdp-sys 3.2.7).
const LIBOSDP_POLL_MS: f64 = 50.0;

/// Sizes, from the environment.
struct Settings {
    keypad_n: usize,
    rtu_n: usize,
    commits: usize,
    group_commits: usize,
    clients: usize,
    poll_ms: Option<u64>,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let s = Settings {
            keypad_n: env_usize("BENCH_LIMITS_KEYPAD_N", 40)?,
            rtu_n: env_usize("BENCH_LIMITS_RTU_N", 60)?,
            commits: env_usize("BENCH_LIMITS_COMMITS", 300)?,
            group_commits: env_usize("BENCH_LIMITS_GROUP_COMMITS", 3000)?,
            clients: env_usize("BENCH_LIMITS_CLIENTS", 32)?,
            poll_ms: match std::env::var("BENCH_LIMITS_POLL_MS") {
                Ok(v) => Some(
                    v.trim()
                        .parse()
                        .with_context(|| format!("BENCH_LIMITS_POLL_MS={v:?}"))?,
                ),
                Err(_) => None,
            },
        };
        ensure!(
            s.keypad_n >= 1 && s.rtu_n >= 1 && s.commits >= 1 && s.clients >= 1,
            "BENCH_LIMITS_* sizes must be at least 1"
        );
        ensure!(
            s.group_commits >= s.clients,
            "BENCH_LIMITS_GROUP_COMMITS must be at least BENCH_LIMITS_CLIENTS"
        );
        Ok(s)
    }
}

// ---- wire-time floors ---------------------------------------------------------------------

/// Milliseconds on the wire for `bytes` characters of `bits` bits at `baud`.
fn wire_ms(bytes: usize, bits: u32, baud: u32) -> f64 {
    bytes as f64 * f64::from(bits) * 1000.0 / f64::from(baud)
}

/// OSDP frame sizes on the wire (libosdp: mark byte, CRC-16), plain or secure.
fn osdp_frame(data: usize, secure: bool) -> usize {
    // 0xFF mark + SOM, ADDR, LEN (2), CTRL + code + CRC (2).
    let plain = 1 + 5 + 1 + 2;
    if secure {
        // + SCB (len, type); data encrypted, padded to 16 (0x80 then zeros); MAC (4).
        let enc = if data == 0 { 0 } else { (data / 16 + 1) * 16 };
        plain + 2 + enc + 4
    } else {
        plain + data
    }
}

/// The keypad → gate floor: POLL + KEYPAD reply (reader 1, count 1, keys).
fn keypad_floor(keys: usize, secure: bool, baud: u32) -> (usize, f64) {
    let bytes = osdp_frame(0, secure) + osdp_frame(2 + keys, secure);
    (bytes, wire_ms(bytes, 10, baud))
}

/// Modbus RTU Write Single Coil at `baud` 8N1: (request + t3.5, round trip) in ms.
fn rtu_floor(baud: u32) -> (f64, f64) {
    let t35 = if baud > 19_200 {
        1.75
    } else {
        wire_ms(7, 10, baud) / 2.0
    };
    let to_coil = wire_ms(8, 10, baud) + t35;
    (to_coil, to_coil + wire_ms(8, 10, baud) + t35)
}

// ---- 1. keypad → gate ---------------------------------------------------------------------

/// One keypad series: its figures and its floor.
struct KeypadResult {
    baud: u32,
    secure: bool,
    series: Series,
    floor_bytes: usize,
    floor_ms: f64,
}

impl KeypadResult {
    fn json(&self) -> Value {
        json!({"baud": self.baud, "secure_channel": self.secure, "measured": self.series.json(),
               "floor_bytes": self.floor_bytes, "floor_ms": round3(self.floor_ms),
               "ratio_p50": round3(self.series.p(0.5) / self.floor_ms),
               "ratio_p99": round3(self.series.p(0.99) / self.floor_ms)})
    }
}

/// Waits for an observation `pred` accepts (others are skipped).
async fn wait_for(
    obs: &mut Observations,
    what: &str,
    mut pred: impl FnMut(&Observation) -> bool,
) -> Result<Observation> {
    let deadline = Instant::now() + common::CHANGE_WITHIN;
    loop {
        let o = obs
            .next(deadline)
            .await
            .with_context(|| format!("waiting for {what}"))?;
        if pred(&o) {
            return Ok(o);
        }
    }
}

fn gate_coil(o: &Observation, on: bool) -> bool {
    o.device == GATE_BOARD && o.kind == "coil_changed" && o.data["coil"] == 0 && o.data["on"] == on
}

async fn bench_keypad(baud: u32, secure: bool, n: usize) -> Result<KeypadResult> {
    let dir = tempfile::tempdir()?;
    let port = dir.path().join(KEYPAD).display().to_string();
    let key = if secure {
        format!("scbk = {SCBK:?}")
    } else {
        String::new()
    };
    let site = SimSite::start(
        &format!(
            r#"
            [sim]
            line_timing = ["{KEYPAD}"]
            [[devices.keypads]]
            id = "{KEYPAD}"
            zone = "main-gate"
            port = {port:?}
            baud = {baud}
            address = 1
            {key}
            gate = {{ board = "{GATE_BOARD}", coil = 0 }}
            [[devices.relay_boards]]
            id = "{GATE_BOARD}"
            transport = "tcp"
            address = "127.0.0.1:0"
            unit_id = 1
            coils = 2
            inputs = 2
            response_delay_ms = 0
            "#
        ),
        dir,
    )
    .await?;
    let result = async {
        let http = reqwest::Client::new();
        let control = site.sim.control_url();
        let mut obs = Observations::subscribe(&http, &control).await?;
        let serial = site.address(KEYPAD, "serial")?;
        let board = site.address(GATE_BOARD, "address")?;
        let mode = if secure {
            format!("scbk = {SCBK:?}")
        } else {
            "install_mode = true".into()
        };
        let g = GatewayUnderTest::start(&format!(
            r#"
            [[devices.keypads]]
            id = "{KEYPAD}"
            zone = "main-gate"
            port = {serial:?}
            baud = {baud}
            address = 1
            {mode}
            gate = {{ board = "{GATE_BOARD}", coil = 0 }}
            pulse_ms = {PULSE_MS}
            [[devices.relay_boards]]
            id = "{GATE_BOARD}"
            transport = "tcp"
            address = {board:?}
            unit_id = 1
            coils = 2
            inputs = 2
            "#
        ))
        .await?;
        let samples = async {
            // One unit (its overlock on coil 1 of the gate board), occupied by the tenant.
            let units = g
                .seed(&[json!({"kind": "relay", "board": GATE_BOARD, "coil": 1})])
                .await?;
            g.expect(
                reqwest::Method::POST,
                &format!("/v1/units/{}/grant_access", units[0]),
                json!({ "tenancy_id": TENANCY }),
                200,
            )
            .await?;
            settled(g.executor(), GATE_BOARD).await?;
            wait_online(&http, &control, secure).await?;
            obs.clear();
            let mut ns = Vec::with_capacity(n);
            let mut stages: Vec<[u64; 3]> = Vec::with_capacity(n);
            let keys = format!("{PIN}#");
            for i in 0..KEYPAD_WARMUP + n {
                // Not a wait for an outcome: a random phase against the keypad's poll
                // cycle. Pressed right after the last gate closed, every PIN would land at
                // the same point of the cycle (the LED/buzzer/text after the grant reset
                // libosdp's poll timer), and the series would measure that one phase.
                let phase = rand::random::<u64>() % PHASE_MS;
                tokio::time::sleep(Duration::from_millis(phase)).await;
                let t0 = monotonic_ns();
                let res = http
                    .post(format!("{control}/keypads/{KEYPAD}/keys"))
                    .json(&json!({ "keys": keys }))
                    .send()
                    .await?;
                ensure!(
                    res.status().as_u16() == 202,
                    "pressing keys answered {}: {}",
                    res.status(),
                    res.text().await.unwrap_or_default()
                );
                // hw-sim's own stamps on the way: the keys taken, then sent in a reply.
                let (mut pressed, mut sent) = (None, None);
                let open = wait_for(&mut obs, "the gate strike on", |o| {
                    if o.device == KEYPAD && o.kind == "key_pressed" {
                        pressed.get_or_insert(o.t_ns);
                    }
                    if o.device == KEYPAD && o.kind == "keys_sent" {
                        sent.get_or_insert(o.t_ns);
                    }
                    gate_coil(o, true)
                })
                .await
                .with_context(|| format!("PIN {i}"))?;
                ensure!(open.t_ns >= t0, "the gate opened before the PIN: {open:?}");
                wait_for(&mut obs, "the gate strike off", |o| gate_coil(o, false)).await?;
                if i >= KEYPAD_WARMUP {
                    ns.push(open.t_ns - t0);
                    if let (Some(p), Some(s)) = (pressed, sent) {
                        stages.push([p.saturating_sub(t0), s.saturating_sub(p), open.t_ns.saturating_sub(s)]);
                    }
                }
            }
            if !stages.is_empty() {
                let med = |k: usize| {
                    let mut v: Vec<u64> = stages.iter().map(|s| s[k]).collect();
                    v.sort_unstable();
                    v[v.len() / 2] as f64 / 1e6
                };
                eprintln!(
                    "keypad stages, {baud} baud, secure {secure}, medians of {}: press request → hw-sim key_pressed {:.1} ms; → keys_sent (the POLL that collects them) {:.1} ms; → gate coil on {:.1} ms",
                    stages.len(),
                    med(0),
                    med(1),
                    med(2)
                );
            }
            Ok::<_, anyhow::Error>(ns)
        }
        .await;
        g.stop().await;
        samples
    }
    .await;
    site.stop().await;
    let ns = result?;
    let (floor_bytes, floor_ms) = keypad_floor(PIN.len() + 1, secure, baud);
    Ok(KeypadResult {
        baud,
        secure,
        series: Series::new(
            &format!(
                "{baud} baud, {}",
                if secure { "secure channel" } else { "plain" }
            ),
            ns,
        ),
        floor_bytes,
        floor_ms,
    })
}

/// Waits until hw-sim's keypad is polled (and, if asked, its secure channel is up).
async fn wait_online(http: &reqwest::Client, control: &str, secure: bool) -> Result<()> {
    let deadline = Instant::now() + ONLINE_WITHIN;
    loop {
        let k: Value = http
            .get(format!("{control}/keypads/{KEYPAD}"))
            .send()
            .await?
            .json()
            .await?;
        if k["online"] == true && (!secure || k["secure"] == true) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("keypad not polled (secure: {secure}) within {ONLINE_WITHIN:?}: {k}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a wait for the outcome
    }
}

// ---- 2. Modbus RTU ------------------------------------------------------------------------

struct RtuResult {
    baud: u32,
    bare_rtt: Series,
    bare_change: Series,
    gateway_change: Series,
    to_coil_ms: f64,
    round_trip_ms: f64,
}

impl RtuResult {
    fn json(&self) -> Value {
        json!({"baud": self.baud, "framing": "8N1",
               "bare_round_trip": self.bare_rtt.json(), "bare_command_to_coil": self.bare_change.json(),
               "gateway_command_to_coil": self.gateway_change.json(),
               "floor_to_coil_ms": round3(self.to_coil_ms), "floor_round_trip_ms": round3(self.round_trip_ms),
               "ratio_bare_round_trip_p50": round3(self.bare_rtt.p(0.5) / self.round_trip_ms),
               "ratio_bare_to_coil_p50": round3(self.bare_change.p(0.5) / self.to_coil_ms),
               "ratio_gateway_to_coil_p50": round3(self.gateway_change.p(0.5) / self.to_coil_ms),
               "ratio_gateway_to_coil_p99": round3(self.gateway_change.p(0.99) / self.to_coil_ms)})
    }
}

async fn bench_rtu(baud: u32, s: &Settings) -> Result<RtuResult> {
    const UNITS: usize = 4;
    let coils = 2 * UNITS as u16 + 1;
    let dir = tempfile::tempdir()?;
    let port = dir.path().join(RTU_BOARD).display().to_string();
    let site = SimSite::start(
        &format!(
            r#"
            [sim]
            line_timing = ["{RTU_BOARD}"]
            [[devices.relay_boards]]
            id = "{RTU_BOARD}"
            transport = "rtu"
            port = {port:?}
            baud = {baud}
            unit_id = 1
            coils = {coils}
            inputs = 8
            response_delay_ms = 0
            "#
        ),
        dir,
    )
    .await?;
    let result = async {
        let http = reqwest::Client::new();
        let mut obs = Observations::subscribe(&http, &site.sim.control_url()).await?;
        let serial = site.address(RTU_BOARD, "serial")?;
        ensure!(Path::new(&serial).exists(), "no pty link at {serial}");
        let bare_coils: Vec<u16> = (UNITS as u16 + 1..coils).collect();
        let (rtt, change) = {
            use tokio_serial::SerialPortBuilderExt as _;
            let line = tokio_serial::new(&serial, baud)
                .open_native_async()
                .with_context(|| format!("opening {serial} at {baud} baud"))?;
            let mut ctx = tokio_modbus::client::rtu::attach_slave(line, tokio_modbus::Slave(1));
            bare_modbus(&mut ctx, &mut obs, RTU_BOARD, &bare_coils, s.rtu_n).await?
        };
        let (bindings, actuators) = coil_bindings(RTU_BOARD, UNITS);
        let poll = s
            .poll_ms
            .map_or(String::new(), |ms| format!("poll_ms = {ms}"));
        let devices = format!(
            r#"
            [[devices.relay_boards]]
            id = "{RTU_BOARD}"
            transport = "rtu"
            port = {serial:?}
            baud = {baud}
            unit_id = 1
            coils = {coils}
            inputs = 8
            {poll}
            "#
        );
        let (gw_change, _answer) = gateway_half(
            &devices, &mut obs, RTU_BOARD, bindings, actuators, s.rtu_n, true,
        )
        .await?;
        Ok::<_, anyhow::Error>((rtt, change, gw_change))
    }
    .await;
    site.stop().await;
    let (rtt, change, gw) = result?;
    let (to_coil_ms, round_trip_ms) = rtu_floor(baud);
    Ok(RtuResult {
        baud,
        bare_rtt: Series::new("bare client: write → answered", rtt),
        bare_change: Series::new("bare client: write → coil", change),
        gateway_change: Series::new("gateway: HTTP command → coil", gw),
        to_coil_ms,
        round_trip_ms,
    })
}

// ---- 3. durable commits -------------------------------------------------------------------

/// A commit loop's rate.
struct Rate {
    label: String,
    key: &'static str,
    clients: usize,
    commits: usize,
    seconds: f64,
    series: Series,
}

impl Rate {
    fn per_s(&self) -> f64 {
        self.commits as f64 / self.seconds
    }

    fn json(&self) -> Value {
        json!({"clients": self.clients, "commits": self.commits, "seconds": round3(self.seconds),
               "commits_per_s": (self.per_s() * 10.0).round() / 10.0,
               "latency": self.series.json()})
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// `write 4 KiB + fdatasync`, appending to one file in `dir`.
fn bare_fsync(dir: &Path, n: usize) -> Result<Rate> {
    let mut f = std::fs::File::create(dir.join("fsync.bin"))?;
    let block = [0x5Au8; 4096];
    let mut lat = Vec::with_capacity(n);
    let started = std::time::Instant::now();
    for _ in 0..n {
        let t = std::time::Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        lat.push(nanos(t.elapsed()));
    }
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        f.metadata()?.len() == 4096 * n as u64,
        "the fsync file is not {n} blocks long"
    );
    Ok(Rate {
        label: "bare write 4 KiB + fdatasync (append)".into(),
        key: "bare_fdatasync",
        clients: 1,
        commits: n,
        seconds,
        series: Series::new("", lat),
    })
}

/// `Store::write` of a one-row insert from `clients` callers at once, `n` in all.
async fn store_commits(store: &Store, clients: usize, n: usize) -> Result<Rate> {
    let before = rows(store).await?;
    let started = std::time::Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let store = store.clone();
        let share = n / clients + usize::from(c < n % clients);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(share);
            for _ in 0..share {
                let t = std::time::Instant::now();
                store
                    .write(|conn| -> Result<(), StoreError> {
                        conn.prepare_cached("INSERT INTO bench_commits (at) VALUES (?1)")?
                            .execute(["2026-03-10T12:00:00.000Z"])?;
                        Ok(())
                    })
                    .await?;
                lat.push(nanos(t.elapsed()));
            }
            Ok::<_, StoreError>(lat)
        }));
    }
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let added = rows(store).await? - before;
    ensure!(added == n as i64, "{added} rows committed, not {n}");
    Ok(Rate {
        label: format!(
            "gateway store: Store::write, {clients} client{}",
            if clients == 1 { "" } else { "s" }
        ),
        key: if clients == 1 {
            "store_1_client"
        } else {
            "store_many_clients"
        },
        clients,
        commits: n,
        seconds,
        series: Series::new("", lat),
    })
}

async fn rows(store: &Store) -> Result<i64> {
    Ok(store
        .read(|c| -> Result<i64, StoreError> {
            Ok(c.query_row("SELECT COUNT(*) FROM bench_commits", [], |r| r.get(0))?)
        })
        .await?)
}

async fn bench_commits(s: &Settings) -> Result<Vec<Rate>> {
    let dir = tempfile::tempdir()?;
    let fsync = bare_fsync(dir.path(), s.commits)?;
    let (lat, seconds) = common::sqlite_commit_loop(dir.path(), s.commits)?;
    let sqlite = Rate {
        label: "bare SQLite INSERT+COMMIT (WAL, FULL)".into(),
        key: "bare_sqlite",
        clients: 1,
        commits: s.commits,
        seconds,
        series: Series::new("", lat.into_iter().map(nanos).collect()),
    };
    let store = Store::open(&dir.path().join("store.db"))?;
    store
        .write(|c| -> Result<(), StoreError> {
            c.execute_batch(
                "CREATE TABLE bench_commits (id INTEGER PRIMARY KEY, at TEXT NOT NULL) STRICT",
            )?;
            Ok(())
        })
        .await?;
    let one = store_commits(&store, 1, s.commits).await?;
    let many = store_commits(&store, s.clients, s.group_commits).await?;
    drop(store);
    Ok(vec![fsync, sqlite, one, many])
}

// ---- report -------------------------------------------------------------------------------

fn fs_type(path: &Path) -> String {
    // The mount whose point is the longest prefix of `path`.
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "?".into();
    };
    let p = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && p.starts_with(f[1]))
                .then(|| (f[1].len(), format!("{} ({})", f[2], f[0])))
        })
        .max_by_key(|(n, _)| *n)
        .map_or("?".into(), |(_, t)| t)
}

fn main() -> Result<()> {
    let s = Settings::from_env()?;
    let load_before = load_average();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let mut keypads = Vec::new();
    for baud in [9600, 115_200] {
        for secure in [false, true] {
            keypads.push(
                rt.block_on(bench_keypad(baud, secure, s.keypad_n))
                    .with_context(|| format!("keypad → gate at {baud} (secure {secure})"))?,
            );
        }
    }
    let mut rtus = Vec::new();
    for baud in [9600, 19_200, 115_200] {
        rtus.push(
            rt.block_on(bench_rtu(baud, &s))
                .with_context(|| format!("Modbus RTU at {baud}"))?,
        );
    }
    let commits = rt.block_on(bench_commits(&s)).context("durable commits")?;
    let total_s = started.elapsed().as_secs_f64();
    let load_after = load_average();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let tmp = std::env::temp_dir();
    let fs = fs_type(&tmp);
    let load = |l: Option<f64>| l.map_or("?".to_owned(), |l| format!("{l:.2}"));

    println!(
        "unitgate limits benchmark ({cores} cores; {total_s:.1} s; load average {} before, {} after; temp dir {} on {fs})",
        load(load_before),
        load(load_after),
        tmp.display()
    );
    println!(
        "(the tails are sensitive to other work on the machine: compare load averages before comparing runs.)"
    );
    println!();
    println!(
        "1. Keypad → gate: PIN+# pressed on hw-sim → gate strike coil on (Modbus TCP board); RS-485 line timing on; pulse {PULSE_MS} ms"
    );
    println!(
        "  {:<28} {:>4} {:>8} {:>8} {:>8} {:>6} {:>9} {:>8} {:>8}",
        "series", "n", "p50 ms", "p99 ms", "max ms", "bytes", "floor ms", "p50/flr", "p99/flr"
    );
    for k in &keypads {
        println!(
            "  {:<28} {:>4} {:>8.3} {:>8.3} {:>8.3} {:>6} {:>9.3} {:>8.1} {:>8.1}",
            k.series.label,
            k.series.ns.len(),
            k.series.p(0.5),
            k.series.p(0.99),
            k.series.max(),
            k.floor_bytes,
            k.floor_ms,
            k.series.p(0.5) / k.floor_ms,
            k.series.p(0.99) / k.floor_ms
        );
    }
    println!(
        "  floor: POLL + osdp_KEYPAD reply ({} keys) on the wire at 10 bits/char. The CP polls a PD once more than {LIBOSDP_POLL_MS} ms have passed",
        PIN.len() + 1
    );
    println!(
        "  since its last poll or good reply; the gateway's CP thread refreshes libosdp every 20 ms (or early for a command), so a POLL goes out up to 20 ms after it falls due and its reply is read at the next refresh: a key press waits for the next poll (a poll period is ~50-90 ms; longer if it lands in the LED/buzzer/text after a grant). PINs are pressed at a random phase (0-{PHASE_MS} ms after the last gate closed)."
    );
    println!();
    println!(
        "2. Modbus RTU Write Single Coil, 8N1, RS-485 line timing on (board response delay 0)"
    );
    println!(
        "  {:<8} {:<32} {:>4} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "baud", "series", "n", "p50 ms", "p99 ms", "max ms", "floor ms", "p50/flr"
    );
    for r in &rtus {
        for (series, floor) in [
            (&r.bare_rtt, r.round_trip_ms),
            (&r.bare_change, r.to_coil_ms),
            (&r.gateway_change, r.to_coil_ms),
        ] {
            println!(
                "  {:<8} {:<32} {:>4} {:>8.3} {:>8.3} {:>8.3} {:>9.3} {:>8.2}",
                r.baud,
                series.label,
                series.ns.len(),
                series.p(0.5),
                series.p(0.99),
                series.max(),
                floor,
                series.p(0.5) / floor
            );
        }
    }
    println!(
        "  floor: → coil = 8-byte request + t3.5; round trip = + 8-byte echo + t3.5. The gateway's figure also holds HTTP, the durable commit and the outbox hand-off (see 3), and its input polls share the line (poll_ms {}).",
        s.poll_ms.map_or("default".to_owned(), |ms| ms.to_string())
    );
    println!();
    println!("3. Durable commits on {fs}");
    println!(
        "  {:<44} {:>7} {:>6} {:>10} {:>8} {:>8}",
        "loop", "clients", "n", "commits/s", "p50 ms", "p99 ms"
    );
    for c in &commits {
        println!(
            "  {:<44} {:>7} {:>6} {:>10.1} {:>8.3} {:>8.3}",
            c.label,
            c.clients,
            c.commits,
            c.per_s(),
            c.series.p(0.5),
            c.series.p(0.99)
        );
    }
    let rate = |k: &str| {
        commits
            .iter()
            .find(|c| c.key == k)
            .map_or(f64::NAN, Rate::per_s)
    };
    let ratios = json!({
        "sqlite_over_fdatasync": round3(rate("bare_sqlite") / rate("bare_fdatasync")),
        "store_1_over_sqlite": round3(rate("store_1_client") / rate("bare_sqlite")),
        "store_many_over_store_1": round3(rate("store_many_clients") / rate("store_1_client")),
        "store_many_over_fdatasync": round3(rate("store_many_clients") / rate("bare_fdatasync")),
    });
    println!("  ratios: {ratios}");
    println!();

    let report = json!({
        "bench": "limits",
        "cores": cores,
        "load_average_1m": {"before": load_before, "after": load_after},
        "seconds": round3(total_s),
        "filesystem": fs,
        "settings": {"keypad_n": s.keypad_n, "rtu_n": s.rtu_n, "commits": s.commits,
                     "group_commits": s.group_commits, "clients": s.clients,
                     "rtu_poll_ms": s.poll_ms, "gate_pulse_ms": PULSE_MS, "line_timing": true},
        "keypad_to_gate": keypads.iter().map(KeypadResult::json).collect::<Vec<_>>(),
        "modbus_rtu": rtus.iter().map(RtuResult::json).collect::<Vec<_>>(),
        "commits": commits.iter().map(|c| (c.key.to_owned(), c.json())).collect::<serde_json::Map<_, _>>(),
        "commit_ratios": ratios,
    });
    println!("{report}");
    if report["commits"].as_object().is_none_or(|m| m.len() != 4) {
        return Err(anyhow!("commit loops missing"));
    }
    Ok(())
}
