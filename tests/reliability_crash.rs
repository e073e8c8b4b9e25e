//! Reliability suite, crash: the real `unitgate run` binary is killed with SIGKILL at a
//! random moment, again and again, during a mixed stream of allocation commands (with
//! idempotency keys), gate entries on an OSDP keypad and door-sensor traffic on a Modbus
//! relay board, all on one in-process hw-sim that outlives every gateway.
//!
//! Each iteration: start the daemon on the same data directory and, from that instant,
//! stream (commands once READY; keys and inputs on hw-sim at once); SIGKILL after a delay
//! drawn uniformly from [0, 150 ms], so kills land during start-up, during commits and
//! during device traffic. Then restart (time to READY measured), retry every command the
//! client did not see acknowledged (same key, same body) and check against the model the
//! client keeps: each answer is the one the model predicts (so nothing acknowledged was
//! lost or applied twice), the last acknowledged commands replay byte for byte, the unit
//! statuses over `GET /v1/units` equal the model's, the event log's seq has no gap, and
//! `PRAGMA integrity_check` is ok after every kill. Every tenth restart also waits for a
//! gate entry (keypad back online, PIN typed, decision logged) and for hw-sim's overlock
//! coils and gate strike to match DESIGN.md §4 for the model's unit statuses. At the end:
//! the whole log once more from seq 0, every allocation event the model implies in it
//! exactly as many times, the hardware converged, and the replica checked after the last kill.
//!
//! `RELIABILITY_ITERATIONS` (default 200; 1000 is the full size, run locally) and
//! `RELIABILITY_SEED` (printed at start; reproduces the command choices and kill delays).

#[path = "common/daemon.rs"]
mod daemon;

use daemon::integrity_check;
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::UnixDatagram;
use tokio::sync::watch;
use tokio::time::Instant;

const TOKEN: &str = "crash-suite-admin-token-0123456789";
const KEYPAD: &str = "gate-1";
const GATES: &str = "gate-relays";
const BOARD: &str = "overlocks";
/// Command streams running side by side, each on its own units and contacts.
const WORKERS: usize = 4;
const UNITS_PER_WORKER: usize = 5;
const CONTACTS_PER_WORKER: usize = 2;
/// The kill comes this long (at most) after the daemon was started.
const KILL_WINDOW_MS: u64 = 150;
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// Every this many iterations, the restarted gateway also waits for a gate entry.
const GATE_CHECK_EVERY: u64 = 10;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The devices, for hw-sim (ports `127.0.0.1:0`) and for the gateway (the ports hw-sim chose).
fn devices(wires: &Path, gates_addr: &str, board_addr: &str) -> String {
    format!(
        r#"
[[devices.keypads]]
id = "{KEYPAD}"
zone = "main-gate"
port = "{wires}/{KEYPAD}"
baud = 115200
address = 1
scbk = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b"
gate = {{ board = "{GATES}", coil = 0 }}
gate_sensor = {{ board = "{GATES}", input = 0 }}
pulse_ms = 200

[[devices.relay_boards]]
id = "{GATES}"
transport = "tcp"
address = "{gates_addr}"
unit_id = 1
coils = 1
inputs = 1
timeout_ms = 300
poll_ms = 50

[[devices.relay_boards]]
id = "{BOARD}"
transport = "tcp"
address = "{board_addr}"
unit_id = 1
coils = 24
inputs = 24
timeout_ms = 300
poll_ms = 50
"#,
        wires = wires.display()
    )
}

/// Unit `u` of worker `w`: its global index is its overlock coil and door input.
fn unit_id(w: usize, u: usize) -> String {
    format!("u{w}-{u}")
}
fn unit_index(w: usize, u: usize) -> usize {
    w * UNITS_PER_WORKER + u
}
fn contact_id(w: usize, c: usize) -> String {
    format!("c{w}-{c}")
}
fn tenancy_id(w: usize, c: usize) -> String {
    format!("t{w}-{c}")
}
fn pin(w: usize, c: usize) -> String {
    format!("{}{}", 4700 + w * 10 + c, 31 + w * 10 + c)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Available,
    Reserved,
    Occupied,
    Overlocked,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Available => "available",
            Status::Reserved => "reserved",
            Status::Occupied => "occupied",
            Status::Overlocked => "overlocked",
        }
    }
}

/// A unit as the model has it: status and the contact whose tenancy holds it.
type UnitState = (Status, Option<usize>);

/// One command with what the model predicts it answers and leaves behind.
#[derive(Clone, Debug)]
struct Cmd {
    key: String,
    path: String,
    body: Value,
    status: u16,
    /// The worker's units after the command (unchanged when refused).
    after: Vec<UnitState>,
    /// Units it changes, with their new status, as the answer must list them.
    changed: Vec<(usize, Status)>,
    events: Vec<&'static str>,
    attempts: u32,
}

/// An acknowledged answer, kept for the replay check.
#[derive(Clone, Debug)]
struct Acked {
    cmd: Cmd,
    status: u16,
    raw: Vec<u8>,
}

/// One command stream and its model.
struct Worker {
    w: usize,
    rng: StdRng,
    units: Vec<UnitState>,
    next_key: u64,
    seed: u64,
    pending: Option<Cmd>,
    acked: Vec<Acked>,
    /// Acknowledged this iteration, for the replay check.
    acked_now: usize,
    sent: u64,
    retried: u64,
    committed_unacked: u64,
    server_errors: u64,
    events: BTreeMap<&'static str, i64>,
}

impl Worker {
    fn new(w: usize, seed: u64) -> Worker {
        Worker {
            w,
            rng: StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (w as u64 + 1))),
            units: vec![(Status::Available, None); UNITS_PER_WORKER],
            next_key: 0,
            seed,
            pending: None,
            acked: Vec::new(),
            acked_now: 0,
            sent: 0,
            retried: 0,
            committed_unacked: 0,
            server_errors: 0,
            events: BTreeMap::new(),
        }
    }

    /// A new command, mostly one the model says is allowed (refusals are commands too).
    fn next_cmd(&mut self) -> Cmd {
        let mut cmd = self.draw();
        for _ in 0..2 {
            if cmd.status == 200 {
                break;
            }
            cmd = self.draw();
        }
        self.next_key += 1;
        cmd.key = format!("crash-{}-{}-{}", self.seed, self.w, self.next_key);
        cmd
    }

    fn draw(&mut self) -> Cmd {
        let u = self.rng.random_range(0..UNITS_PER_WORKER);
        let c = self.rng.random_range(0..CONTACTS_PER_WORKER);
        let op = self.rng.random_range(0..5);
        let mut after = self.units.clone();
        let mut changed = Vec::new();
        let mut events = Vec::new();
        let (path, body) = match op {
            0 | 1 => {
                let (st, holder) = self.units[u];
                let next = match (op, st) {
                    (0, Status::Available) => Some(Status::Reserved),
                    (1, Status::Available) => Some(Status::Occupied),
                    (1, Status::Reserved) if holder == Some(c) => Some(Status::Occupied),
                    _ => None,
                };
                if let Some(n) = next {
                    after[u] = (n, Some(c));
                    changed.push((u, n));
                    events.push(if n == Status::Reserved {
                        "unit.reserved"
                    } else {
                        "unit.occupied"
                    });
                }
                let verb = if op == 0 { "reserve" } else { "grant_access" };
                (
                    format!("/v1/units/{}/{verb}", unit_id(self.w, u)),
                    json!({"tenancy_id": tenancy_id(self.w, c), "by": "crash-suite"}),
                )
            }
            2 => {
                if self.units[u].0 != Status::Available {
                    after[u] = (Status::Available, None);
                    changed.push((u, Status::Available));
                    events.extend(["unit.deallocated", "unit.available"]);
                }
                (
                    format!("/v1/units/{}/deallocate", unit_id(self.w, u)),
                    json!({"by": "crash-suite"}),
                )
            }
            _ => {
                let (from, to, verb, event) = if op == 3 {
                    (
                        Status::Occupied,
                        Status::Overlocked,
                        "overlock",
                        "unit.overlocked",
                    )
                } else {
                    (
                        Status::Overlocked,
                        Status::Occupied,
                        "remove_overlock",
                        "unit.occupied",
                    )
                };
                for (i, s) in after.iter_mut().enumerate() {
                    if *s == (from, Some(c)) {
                        s.0 = to;
                        changed.push((i, to));
                        events.push(event);
                    }
                }
                (
                    format!("/v1/contacts/{}/{verb}", contact_id(self.w, c)),
                    json!({"by": "crash-suite"}),
                )
            }
        };
        Cmd {
            key: String::new(),
            path,
            body,
            status: if changed.is_empty() { 409 } else { 200 },
            after,
            changed,
            events,
            attempts: 0,
        }
    }

    /// An answer to `cmd`: it must be the one the model predicts; then the model moves on.
    fn ack(&mut self, cmd: Cmd, (status, raw, replayed): Reply, ctx: &str) {
        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        assert!(
            !replayed || cmd.attempts > 1,
            "{ctx}: a new key {} answered as a replay",
            cmd.key
        );
        assert_eq!(
            status, cmd.status,
            "{ctx}: {} (key {}, attempt {}) answered {status} {body}; the model expected {}",
            cmd.path, cmd.key, cmd.attempts, cmd.status
        );
        if status == 200 {
            let mut listed: Vec<(String, String)> = if body["unit"].is_object() {
                vec![&body["unit"]]
            } else {
                body["units"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default()
            }
            .into_iter()
            .map(|u| {
                (
                    u["id"].as_str().unwrap_or_default().to_owned(),
                    u["status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
            listed.sort();
            let mut want: Vec<(String, String)> = cmd
                .changed
                .iter()
                .map(|(u, s)| (unit_id(self.w, *u), s.name().to_owned()))
                .collect();
            want.sort();
            assert_eq!(
                listed, want,
                "{ctx}: {} (key {}): {body}",
                cmd.path, cmd.key
            );
        }
        if cmd.attempts > 1 {
            self.retried += 1;
            // Committed before the kill, answer lost: the retry got the stored answer.
            self.committed_unacked += u64::from(replayed);
        }
        self.units = cmd.after.clone();
        for e in &cmd.events {
            *self.events.entry(e).or_default() += 1;
        }
        self.acked.push(Acked { cmd, status, raw });
        self.acked_now += 1;
    }
}

/// Status, body and whether the gateway says it replayed a stored answer.
type Reply = (u16, Vec<u8>, bool);

async fn send(http: &reqwest::Client, base: &str, cmd: &Cmd) -> Result<Reply, String> {
    let res = http
        .post(format!("{base}{}", cmd.path))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", &cmd.key)
        .json(&cmd.body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let raw = res.bytes().await.map_err(|e| e.to_string())?.to_vec();
    Ok((status, raw, replayed))
}

/// Commands until the daemon stops answering (it was killed) or `stop`.
async fn stream(
    mut w: Worker,
    http: reqwest::Client,
    base: String,
    stop: watch::Receiver<bool>,
    ctx: String,
) -> Worker {
    while !*stop.borrow() {
        let mut cmd = match w.pending.take() {
            Some(c) => c,
            None => w.next_cmd(),
        };
        cmd.attempts += 1;
        w.sent += 1;
        match send(&http, &base, &cmd).await {
            Ok((s, raw, replayed)) if s < 500 => w.ack(cmd, (s, raw, replayed), &ctx),
            Ok(_) => {
                // Not acknowledged: retried after the restart. Counted: the daemon should
                // not answer 5xx while it runs.
                w.server_errors += 1;
                w.pending = Some(cmd);
                break;
            }
            Err(_) => {
                w.pending = Some(cmd);
                break;
            }
        }
    }
    w
}

/// A gateway process; killed and reaped when dropped (a failing test leaves nothing behind).
struct Daemon {
    child: Child,
    started: Instant,
}

impl Daemon {
    fn spawn(config: &Path, notify: &Path, log: &Path) -> Daemon {
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_unitgate"))
            .args(["run", "--config"])
            .arg(config)
            .env_remove("UNITGATE_CONFIG")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env("NOTIFY_SOCKET", notify)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("unitgate starts");
        Daemon { child, started }
    }

    /// SIGKILL, and reap. Panics if it had already exited on its own.
    fn kill(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "unitgate exited on its own ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forgets notifications of daemons already gone.
fn drain(notify: &UnixDatagram) {
    let mut buf = [0u8; 4096];
    while notify.try_recv(&mut buf).is_ok() {}
}

/// Waits for READY=1 and returns the API's base URL from its STATUS line.
async fn ready(notify: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).await.expect("notify socket");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if !msg.lines().any(|l| l == "READY=1") {
            continue;
        }
        let addr = msg
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .and_then(|s| s.split_once(" on "))
            .and_then(|(_, rest)| rest.split(';').next())
            .expect("the listen address in STATUS");
        return format!("http://{addr}");
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

async fn get(http: &reqwest::Client, base: &str, path: &str) -> Value {
    daemon::get_json(http, base, TOKEN, path).await
}

async fn put_ok(http: &reqwest::Client, base: &str, path: &str, body: Value) {
    let res = http
        .put(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("PUT");
    let status = res.status().as_u16();
    assert!(status == 200 || status == 201, "PUT {path}: {status}");
}

/// Events after `after`, checking each seq follows the one before; returns the new end.
async fn events_gapless(
    http: &reqwest::Client,
    base: &str,
    after: i64,
    types: &mut BTreeMap<String, i64>,
    ctx: &str,
) -> i64 {
    daemon::events_gapless_after(http, base, TOKEN, after, types, ctx)
        .await
        .1
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Keys typed on the keypad: a tenant's PIN (or a wrong one) and `#`, until `stop`; returns
/// how many entries the keypad took.
async fn gate_traffic(control: String, seed: u64, mut stop: watch::Receiver<bool>) -> u64 {
    let http = client();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0;
    while !*stop.borrow() {
        let keys = if rng.random_bool(0.1) {
            "9999#".to_owned()
        } else {
            let w = rng.random_range(0..WORKERS);
            let c = rng.random_range(0..CONTACTS_PER_WORKER);
            format!("{}#", pin(w, c))
        };
        let r = http
            .post(format!("{control}/keypads/{KEYPAD}/keys"))
            .json(&json!({ "keys": keys }))
            .send()
            .await
            .expect("hw-sim keys");
        let status = r.status().as_u16();
        if status == 202 {
            n += 1;
        } else {
            // Between a kill and the next secure channel no control panel polls the keypad:
            // the tenant's keys go nowhere, as on a real site.
            let text = r.text().await.unwrap_or_default();
            assert!(
                text.contains("control panel") || text.contains("did not take the keys"),
                "hw-sim keys: {status} {text}"
            );
        }
        // The pace of a queue at the gate, not a wait for an outcome.
        let _ = tokio::time::timeout(Duration::from_millis(25), stop.changed()).await;
    }
    n
}

/// Door sensors opening and closing on the relay board, until `stop`.
/// Returns (input changes posted, of which openings).
async fn door_traffic(control: String, seed: u64, mut stop: watch::Receiver<bool>) -> (u64, u64) {
    let http = client();
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut n, mut opened) = (0, 0);
    while !*stop.borrow() {
        let input = rng.random_range(0..WORKERS * UNITS_PER_WORKER);
        let on = rng.random_bool(0.5);
        let r = http
            .post(format!("{control}/relays/{BOARD}/inputs/{input}"))
            .json(&json!({ "on": on }))
            .send()
            .await
            .expect("hw-sim input");
        assert!(r.status().is_success(), "hw-sim input: {}", r.status());
        n += 1;
        opened += u64::from(on);
        // Traffic pace, not a wait for an outcome.
        let _ = tokio::time::timeout(Duration::from_millis(10), stop.changed()).await;
    }
    (n, opened)
}

/// What the run saw, for the report.
#[derive(Default)]
struct Tally {
    startup_kills: u64,
    load_kills: u64,
    ready_after_kill: Vec<Duration>,
    replays: u64,
    keys_typed: u64,
    door_changes: u64,
    door_openings: u64,
    keypad_online: Vec<Duration>,
    converged: Vec<Duration>,
    gate_decided: Vec<Duration>,
}

/// The restart after a kill: READY (timed), every unacknowledged command retried to an
/// answer, the last acknowledged ones replayed, the units and the event log checked.
#[allow(
    clippy::too_many_arguments,
    reason = "the run's state, passed as it is"
)]
async fn restart_and_check(
    workers: &mut [Worker],
    paths: &Paths,
    notify: &UnixDatagram,
    tally: &mut Tally,
    checked_seq: &mut i64,
    types: &mut BTreeMap<String, i64>,
    rng: &mut StdRng,
    ctx: &str,
) -> (Daemon, String) {
    drain(notify);
    let daemon = Daemon::spawn(&paths.config, &paths.notify, &paths.log);
    let base = match tokio::time::timeout(DEADLINE, ready(notify)).await {
        Ok(b) => b,
        Err(_) => panic!(
            "{ctx}: no READY within {DEADLINE:?}; log:\n{}",
            std::fs::read_to_string(&paths.log).unwrap_or_default()
        ),
    };
    tally.ready_after_kill.push(daemon.started.elapsed());
    let http = client();
    for w in workers.iter_mut() {
        if let Some(mut cmd) = w.pending.take() {
            let until = Instant::now() + DEADLINE;
            loop {
                cmd.attempts += 1;
                w.sent += 1;
                match send(&http, &base, &cmd).await {
                    Ok((s, raw, replayed)) if s < 500 => {
                        w.ack(cmd, (s, raw, replayed), ctx);
                        break;
                    }
                    Ok(_) => w.server_errors += 1,
                    Err(_) => {}
                }
                assert!(Instant::now() < until, "{ctx}: {} never answered", cmd.key);
                tokio::time::sleep(POLL).await; // retry interval
            }
        }
        // The last acknowledged commands (those nearest the kill) and one from earlier
        // replay their first answer byte for byte, and change nothing.
        let n = w.acked.len();
        let mut replay: Vec<usize> = (n.saturating_sub(w.acked_now.clamp(1, 2))..n).collect();
        if n > 0 {
            replay.push(rng.random_range(0..n));
        }
        for i in replay {
            let a = w.acked[i].clone();
            let (s, raw, replayed) = send(&http, &base, &a.cmd).await.expect("replay answered");
            assert_eq!(
                (s, String::from_utf8_lossy(&raw), replayed),
                (a.status, String::from_utf8_lossy(&a.raw), true),
                "{ctx}: replay of {} ({})",
                a.cmd.key,
                a.cmd.path
            );
            tally.replays += 1;
        }
        w.acked_now = 0;
    }
    let listed = get(&http, &base, "/v1/units?limit=200").await;
    let actual: BTreeMap<String, String> = listed["units"]
        .as_array()
        .expect("units")
        .iter()
        .map(|u| {
            (
                u["id"].as_str().unwrap_or_default().to_owned(),
                u["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let model: BTreeMap<String, String> = workers
        .iter()
        .flat_map(|w| {
            w.units
                .iter()
                .enumerate()
                .map(|(u, s)| (unit_id(w.w, u), s.0.name().to_owned()))
        })
        .collect();
    assert_eq!(actual, model, "{ctx}: unit statuses over GET /v1/units");
    *checked_seq = events_gapless(&http, &base, *checked_seq, types, ctx).await;
    (daemon, base)
}

/// A tenant at the gate after a restart: waits for the keypad's secure channel (the
/// gateway's OSDP control panel polling hw-sim's keypad again), types a PIN and waits for
/// the decision in the event log. Returns the time to keypad online and to the decision.
async fn gate_entry(
    http: &reqwest::Client,
    base: &str,
    control: &str,
    after: i64,
    ctx: &str,
) -> (Duration, Duration) {
    let started = Instant::now();
    loop {
        let devices = get(http, base, "/v1/devices").await;
        let online = devices
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == KEYPAD))
            .is_some_and(|d| d["online"] == true);
        if online {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "{ctx}: keypad never online");
        tokio::time::sleep(POLL).await; // poll interval
    }
    let online = started.elapsed();
    loop {
        let r = http
            .post(format!("{control}/keypads/{KEYPAD}/keys"))
            .json(&json!({ "keys": format!("{}#", pin(0, 0)) }))
            .send()
            .await
            .expect("hw-sim keys");
        if r.status().as_u16() == 202 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{ctx}: the keypad never took keys"
        );
        tokio::time::sleep(POLL).await; // poll interval
    }
    loop {
        let page = get(http, base, &format!("/v1/events?after={after}&limit=1000")).await;
        let decided = page["events"].as_array().is_some_and(|evs| {
            evs.iter()
                .any(|e| e["type"].as_str().is_some_and(|t| t.starts_with("access.")))
        });
        if decided {
            return (online, started.elapsed());
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{ctx}: no gate decision logged"
        );
        tokio::time::sleep(POLL).await; // poll interval
    }
}

/// Polls hw-sim until its coils are what DESIGN.md §4 says for the model's unit statuses
/// (overlock relay off only for `occupied`) and the gate strike is released.
async fn hardware_converged(workers: &[Worker], control: &str, ctx: &str) -> Duration {
    let want: Vec<bool> = workers
        .iter()
        .flat_map(|w| w.units.iter().map(|u| u.0 != Status::Occupied))
        .collect();
    let http = client();
    let coils = |board: &'static str| {
        let http = http.clone();
        let url = format!("{control}/relays/{board}");
        async move {
            let v: Value = http
                .get(url)
                .send()
                .await
                .expect("control API")
                .json()
                .await
                .expect("relay JSON");
            v["coils"]
                .as_array()
                .expect("coils")
                .iter()
                .map(|c| c.as_bool().unwrap_or_default())
                .collect::<Vec<bool>>()
        }
    };
    let started = Instant::now();
    loop {
        let overlocks = coils(BOARD).await;
        let gate = coils(GATES).await;
        if overlocks[..want.len()] == want[..] && gate == [false] {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{ctx}: hardware not converged: overlock coils {overlocks:?}, want {want:?}; gate strike {gate:?}"
        );
        tokio::time::sleep(POLL).await; // poll interval
    }
}

struct Paths {
    config: PathBuf,
    notify: PathBuf,
    log: PathBuf,
    db: PathBuf,
}

/// The gateway's config in `dir` (data directory `dir/data`), with `devices`.
fn write_config(dir: &Path, paths: &Paths, devices: &str) {
    std::fs::write(
        &paths.config,
        format!(
            r#"
[site]
id = "site-crash"
name = "Crash suite"
timezone = "UTC"
auto_occupy = false
auto_deallocate = false

[store]
data_dir = "{data}"

[api]
listen = "127.0.0.1:0"
plain_http = true
control_socket = "{sock}"

[[api.tokens]]
name = "admin"
sha256 = "{hash}"
scopes = ["admin"]

[access]
lockout_attempts = 1000000

[log]
level = "warn"

[devices]
reconcile_s = 1
{devices}
"#,
            data = dir.join("data").display(),
            sock = dir.join("control.sock").display(),
            hash = unitgate::api::http::auth::token_hash_hex(TOKEN),
        ),
    )
    .expect("config");
}

impl Paths {
    fn in_dir(dir: &Path) -> Paths {
        Paths {
            config: dir.join("config.toml"),
            notify: dir.join("notify.sock"),
            log: dir.join("unitgate.log"),
            db: dir.join("data").join("unitgate.db"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_survive_kill_9_at_random_moments() {
    let iterations = env_u64("RELIABILITY_ITERATIONS").unwrap_or(200);
    let seed = env_u64("RELIABILITY_SEED").unwrap_or_else(|| rand::rng().random());
    println!("reliability crash: RELIABILITY_SEED={seed} RELIABILITY_ITERATIONS={iterations}");
    let mut rng = StdRng::seed_from_u64(seed);
    let run_started = Instant::now();

    // One hw-sim for the whole run.
    let wires = tempfile::tempdir().expect("tempdir");
    let sim_text = devices(wires.path(), "127.0.0.1:0", "127.0.0.1:0");
    let sim = Sim::start(
        &SiteFile::parse(&sim_text).expect("site file"),
        Some("127.0.0.1:0"),
    )
    .await
    .expect("hw-sim");
    let control = sim.control_url();
    let listed: Value = client()
        .get(format!("{control}/devices"))
        .send()
        .await
        .expect("control API")
        .json()
        .await
        .expect("devices JSON");
    let address = |id: &str| -> String {
        listed
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == id))
            .and_then(|d| d["address"]["address"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{id}'s address in {listed}"))
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::in_dir(dir.path());
    let gateway_devices = devices(wires.path(), &address(GATES), &address(BOARD));
    write_config(dir.path(), &paths, &gateway_devices);
    let notify = UnixDatagram::bind(&paths.notify).expect("notify socket");

    // The site, seeded once before any kill.
    let mut daemon = Daemon::spawn(&paths.config, &paths.notify, &paths.log);
    let base = tokio::time::timeout(DEADLINE, ready(&notify))
        .await
        .expect("first READY");
    let http = client();
    put_ok(
        &http,
        &base,
        "/v1/unit_types/small",
        json!({"name": "Small"}),
    )
    .await;
    let mut units = Vec::new();
    for w in 0..WORKERS {
        for u in 0..UNITS_PER_WORKER {
            let i = unit_index(w, u);
            units.push(json!({
                "id": unit_id(w, u), "name": format!("C{i:02}"), "unit_type": "small",
                "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 4,
                "door_type": "roll_up", "access_type": "indoor", "standard_rate": 50.0,
                "walk_thru_order": i, "zones": ["main-gate"],
                "lock": {"kind": "relay", "board": BOARD, "coil": i},
                "door_sensor": {"board": BOARD, "input": i},
            }));
        }
    }
    let res = http
        .post(format!("{base}/v1/units/bulk_create"))
        .bearer_auth(TOKEN)
        .json(&json!({ "units": units }))
        .send()
        .await
        .expect("bulk_create");
    assert_eq!(res.status().as_u16(), 201, "{:?}", res.text().await);
    for w in 0..WORKERS {
        for c in 0..CONTACTS_PER_WORKER {
            put_ok(
                &http,
                &base,
                &format!("/v1/contacts/{}", contact_id(w, c)),
                json!({"name": format!("Tenant {w}-{c}"), "access_code": pin(w, c)}),
            )
            .await;
            put_ok(
                &http,
                &base,
                &format!("/v1/tenancies/{}", tenancy_id(w, c)),
                json!({"contact_id": contact_id(w, c), "start_date": "2030-01-01", "end_date": null}),
            )
            .await;
        }
    }
    let mut types = BTreeMap::new();
    let mut checked_seq = events_gapless(&http, &base, 0, &mut types, "seed").await;
    let seeded = types.clone();
    daemon.kill(&paths.log);
    drop(daemon);

    let mut workers: Vec<Worker> = (0..WORKERS).map(|w| Worker::new(w, seed)).collect();
    let mut tally = Tally::default();
    let mut last = None;
    for it in 1..=iterations {
        let ctx = format!("seed {seed}, iteration {it}");
        // The stream starts with the daemon: keys and door inputs at once, commands from
        // READY on. The kill comes at a uniform moment in the window.
        let delay = Duration::from_millis(rng.random_range(0..=KILL_WINDOW_MS));
        drain(&notify);
        let mut daemon = Daemon::spawn(&paths.config, &paths.notify, &paths.log);
        let kill_at = daemon.started + delay;
        let (stop_tx, stop) = watch::channel(false);
        let gate = tokio::spawn(gate_traffic(control.clone(), rng.random(), stop.clone()));
        let doors = tokio::spawn(door_traffic(control.clone(), rng.random(), stop.clone()));
        let mut streams = Vec::new();
        let ready_before_kill = tokio::select! {
            base = ready(&notify) => {
                let http = client();
                for w in workers.drain(..) {
                    streams.push(tokio::spawn(stream(
                        w, http.clone(), base.clone(), stop.clone(), ctx.clone(),
                    )));
                }
                true
            }
            _ = tokio::time::sleep_until(kill_at) => false,
        };
        tokio::time::sleep_until(kill_at).await;
        daemon.kill(&paths.log);
        let _ = stop_tx.send(true);
        for s in streams {
            workers.push(
                s.await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())),
            );
        }
        tally.keys_typed += gate.await.expect("gate traffic");
        let (changes, openings) = doors.await.expect("door traffic");
        tally.door_changes += changes;
        tally.door_openings += openings;
        if ready_before_kill {
            tally.load_kills += 1;
        } else {
            tally.startup_kills += 1;
        }
        drop(daemon);
        integrity_check(&paths.db, &ctx);

        let (mut daemon, base) = restart_and_check(
            &mut workers,
            &paths,
            &notify,
            &mut tally,
            &mut checked_seq,
            &mut types,
            &mut rng,
            &ctx,
        )
        .await;
        if it % GATE_CHECK_EVERY == 0 {
            let http = client();
            let (online, decided) = gate_entry(&http, &base, &control, checked_seq, &ctx).await;
            tally.keypad_online.push(online);
            tally.gate_decided.push(decided);
            checked_seq = events_gapless(&http, &base, checked_seq, &mut types, &ctx).await;
            tally
                .converged
                .push(hardware_converged(&workers, &control, &ctx).await);
        }
        if it == iterations {
            last = Some((daemon, base));
        } else {
            daemon.kill(&paths.log);
        }
    }

    // The end: the whole log once more from 0, allocation events as the model implies, and
    // the hardware as §4 says for the final statuses.
    let (mut daemon, base) = match last {
        Some(l) => l,
        None => {
            let l = restart_and_check(
                &mut workers,
                &paths,
                &notify,
                &mut tally,
                &mut checked_seq,
                &mut types,
                &mut rng,
                "final",
            )
            .await;
            (l.0, l.1)
        }
    };
    let http = client();
    let mut all = BTreeMap::new();
    let end = events_gapless(&http, &base, 0, &mut all, "final").await;
    // Device events (door alarms, gate decisions) may have come in since the last check.
    assert!(
        end >= checked_seq,
        "the log from 0 ({end}) ends before the checks did ({checked_seq})"
    );
    for t in [
        "unit.reserved",
        "unit.occupied",
        "unit.overlocked",
        "unit.deallocated",
        "unit.available",
    ] {
        let want = seeded.get(t).copied().unwrap_or(0)
            + workers
                .iter()
                .map(|w| w.events.get(t).copied().unwrap_or(0))
                .sum::<i64>();
        assert_eq!(
            all.get(t).copied().unwrap_or(0),
            want,
            "seed {seed}: {t} events: every acknowledged change once"
        );
    }
    let converged = hardware_converged(&workers, &control, &format!("seed {seed}, final")).await;
    daemon.kill(&paths.log);
    drop(daemon);
    integrity_check(&paths.db, "after the final stop");
    sim.stop().await;

    let mut ready = tally.ready_after_kill.clone();
    ready.sort();
    let acked: usize = workers.iter().map(|w| w.acked.len()).sum();
    let sent: u64 = workers.iter().map(|w| w.sent).sum();
    let retried: u64 = workers.iter().map(|w| w.retried).sum();
    let committed_unacked: u64 = workers.iter().map(|w| w.committed_unacked).sum();
    let server_errors: u64 = workers.iter().map(|w| w.server_errors).sum();
    let refused: usize = workers
        .iter()
        .flat_map(|w| w.acked.iter())
        .filter(|a| a.status != 200)
        .count();
    let access = all.get("access.granted").copied().unwrap_or(0)
        + all.get("access.denied").copied().unwrap_or(0);
    let alarms = all.get("door.alarm").copied().unwrap_or(0);
    // A door opening raises at most one alarm, however often the gateway restarts while it
    // stays open (the alarm is kept in the replica until the door closes).
    assert!(
        alarms as u64 <= tally.door_openings,
        "{alarms} door alarms for {} door openings: open doors re-reported at restarts",
        tally.door_openings
    );
    let p50 = percentile(&ready, 0.5);
    let p99 = percentile(&ready, 0.99);
    println!("| figure | value |\n|---|---|");
    println!("| seed | {seed} |");
    println!("| iterations (kill -9) | {iterations} |");
    println!(
        "| kills during start-up (before READY) | {} |",
        tally.startup_kills
    );
    println!("| kills under load (after READY) | {} |", tally.load_kills);
    println!("| commands acknowledged (of which 409) | {acked} ({refused}) |");
    println!("| requests sent | {sent} |");
    println!(
        "| commands retried after a kill (committed before it: replayed) | {retried} ({committed_unacked}) |"
    );
    println!(
        "| acknowledged answers replayed byte for byte | {} |",
        tally.replays
    );
    println!("| 5xx answers | {server_errors} |");
    println!(
        "| keys typed / gate decisions logged | {} / {access} |",
        tally.keys_typed
    );
    println!(
        "| door input changes (openings) / door alarms logged | {} ({}) / {alarms} |",
        tally.door_changes, tally.door_openings
    );
    println!("| events (gapless) | {end} |");
    println!("| restart to READY p50 / p99 | {p50:?} / {p99:?} |");
    let mut online = tally.keypad_online.clone();
    online.sort();
    let mut decided = tally.gate_decided.clone();
    decided.sort();
    println!(
        "| after a restart: keypad online / gate decision logged, p50 (of {}) | {:?} / {:?} |",
        online.len(),
        percentile(&online, 0.5),
        percentile(&decided, 0.5)
    );
    let mut conv = tally.converged.clone();
    conv.sort();
    println!(
        "| hardware converged after a restart, p50 (of {}) / after the last | {:?} / {converged:?} |",
        conv.len(),
        percentile(&conv, 0.5)
    );
    println!("| run time | {:?} |", run_started.elapsed());
    println!(
        "{}",
        json!({
            "suite": "reliability_crash", "seed": seed, "iterations": iterations,
            "startup_kills": tally.startup_kills, "load_kills": tally.load_kills,
            "acknowledged": acked, "refused": refused, "sent": sent, "retried": retried,
            "committed_unacked": committed_unacked,
            "replays": tally.replays, "server_errors": server_errors,
            "keys_typed": tally.keys_typed, "gate_decisions": access,
            "door_changes": tally.door_changes, "door_openings": tally.door_openings, "door_alarms": alarms, "events": end,
            "ready_p50_ms": p50.as_secs_f64() * 1e3, "ready_p99_ms": p99.as_secs_f64() * 1e3,
            "run_s": run_started.elapsed().as_secs_f64(),
        })
    );
    assert!(
        tally.startup_kills > 0 || iterations < 20,
        "no kill landed during start-up"
    );
    assert!(
        tally.load_kills > 0 || iterations < 20,
        "no kill landed under load"
    );
    assert_eq!(server_errors, 0, "seed {seed}: 5xx answers while running");
}

/// The PIN key is created whole or not at all: written beside `pin.key` and renamed into
/// place (a kill -9 between creating and filling the file used to leave a short `pin.key`
/// that refused every later start), 0600, no temporary file left, the same key on every
/// load, also for two starts racing to create it.
#[test]
fn the_pin_key_is_created_whole_or_not_at_all() {
    use std::os::unix::fs::PermissionsExt;
    use unitgate::gateway::load_pin_key;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pin.key");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| load_pin_key(&path));
        let b = s.spawn(|| load_pin_key(&path));
        (
            a.join().expect("thread").expect("created"),
            b.join().expect("thread").expect("created or read"),
        )
    });
    let again = load_pin_key(&path).expect("read");
    assert_eq!(a.hash("470031"), b.hash("470031"), "racing starts agree");
    assert_eq!(a.hash("470031"), again.hash("470031"), "the same key later");
    assert_eq!(std::fs::read(&path).expect("key").len(), 32);
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the gateway reads it");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["pin.key"], "nothing else left behind");
    // A short file (from a version without this fix) is refused, never silently replaced:
    // PINs hashed with a lost key would stop opening gates.
    std::fs::write(&path, b"").expect("truncate");
    assert!(load_pin_key(&path).is_err());
}

/// kill -9 during the very first start on a fresh data directory (PIN key, database file,
/// WAL, migrations, the site row), at a uniform moment up to when an undisturbed first start
/// is READY: the next start must come up on whatever was left, take a contact with a PIN,
/// list its events, and the replica must pass `integrity_check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_killed_at_any_moment_comes_up_next_time() {
    let attempts = env_u64("RELIABILITY_ITERATIONS").map_or(20, |n| (n / 10).max(5));
    let seed = env_u64("RELIABILITY_SEED").unwrap_or_else(|| rand::rng().random());
    println!("first start: RELIABILITY_SEED={seed}, {attempts} kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut first_ready: Option<Duration> = None;
    let mut before_ready = 0;
    for i in 0..=attempts {
        let ctx = format!("seed {seed}, first start {i}");
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::in_dir(dir.path());
        write_config(dir.path(), &paths, "");
        let notify = UnixDatagram::bind(&paths.notify).expect("notify socket");
        let mut daemon = Daemon::spawn(&paths.config, &paths.notify, &paths.log);
        match first_ready {
            // The first one, undisturbed, measures how long a first start takes.
            None => {
                tokio::time::timeout(DEADLINE, ready(&notify))
                    .await
                    .expect("READY");
                first_ready = Some(daemon.started.elapsed());
            }
            Some(window) => {
                let kill_at = daemon.started + window.mul_f64(rng.random_range(0.0..=1.0));
                tokio::select! {
                    _ = ready(&notify) => {}
                    _ = tokio::time::sleep_until(kill_at) => before_ready += 1,
                }
                tokio::time::sleep_until(kill_at).await;
            }
        }
        daemon.kill(&paths.log);
        drop(daemon);
        drain(&notify);
        let mut daemon = Daemon::spawn(&paths.config, &paths.notify, &paths.log);
        let base = match tokio::time::timeout(DEADLINE, ready(&notify)).await {
            Ok(b) => b,
            Err(_) => panic!(
                "{ctx}: no READY after the kill; log:\n{}",
                std::fs::read_to_string(&paths.log).unwrap_or_default()
            ),
        };
        let http = client();
        put_ok(
            &http,
            &base,
            "/v1/contacts/c-first",
            json!({"name": "First", "access_code": "582931"}),
        )
        .await;
        let mut types = BTreeMap::new();
        events_gapless(&http, &base, 0, &mut types, &ctx).await;
        daemon.kill(&paths.log);
        drop(daemon);
        integrity_check(&paths.db, &ctx);
    }
    println!(
        "first start: {attempts} kills, {before_ready} before READY (an undisturbed first start: {:?})",
        first_ready.unwrap_or_default()
    );
}
