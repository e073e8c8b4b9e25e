//! Power loss at each durable step: the real `unitgate run` binary (built with the
//! `failpoints` feature) is started with one failpoint of `unitgate::failpoint::ALL` armed
//! through `FAILPOINTS`, at its 1st, 3rd, 10th and 30th hit, under the traffic that reaches it:
//! allocation commands with idempotency keys from two clients, signed webhooks, the HTTPS
//! uplink to a fake cloud, and a Modbus relay board on an in-process hw-sim driving one
//! overlock coil per unit.
//!
//! Crash (`return(crash)`: `abort()` at that instant): the daemon must die by SIGABRT with the
//! failpoint's line in its log (a failpoint never reached fails the test). Restarted without
//! failpoints, the clients retry what was not acknowledged (same key, same body) and the
//! run checks: each answer is the one the model predicts (every acknowledged command applied
//! exactly once, a retried one once), the last acknowledged command replays byte for byte,
//! unit statuses equal the model's, the event log is gapless with exactly the allocation
//! events the model implies, `PRAGMA integrity_check` is ok, every acknowledged webhook id is
//! recorded (a retried one once), the uplink delivered every event (at least once: the
//! receiver deduplicates by seq, DESIGN.md §3 and src/cloud/https.rs), and the coils
//! converge to DESIGN.md §4. The PIN key failpoints strike the first start instead.
//!
//! The MQTT delivery cursor's failpoints crash the daemon at the 1st, 3rd and 10th cursor
//! write while it publishes its event log (a backlog, then command traffic) to a real broker
//! (rumqttd in a child process, tests/common/broker.rs), read by a subscriber playing the
//! cloud on `unitgate/v1/{site}/+`. What src/cloud/mqtt.rs promises, checked: every seq of
//! the log reaches the cloud; each connection starts with a hello whose `delivered_seq` is
//! the stored cursor, then publishes the events from the one after it, in order, gapless;
//! the cursor never passes an event the cloud has not got; after the restart nothing at or
//! below the cursor stored before the crash is sent again, and everything above it is (so a
//! crash before the cursor write re-sends at least one acknowledged event), never more than
//! the in-flight window past the cursor.
//!
//! Error (`return(error)`) at the commit-path failpoints: the client gets a 500 in the
//! contract's error shape, nothing of it is applied (or, after the commit, it is applied and
//! the retry replays it), the next command succeeds, and a retry with the same key applies
//! once.
//!
//! `POWER_LOSS_PARALLEL` (default 2) scenarios run at once, each with its own files, hw-sim
//! and cloud. Run: `cargo test --features failpoints --test power_loss`.

#[allow(dead_code, reason = "the broker is never restarted here")]
#[path = "common/broker.rs"]
mod broker;
#[path = "common/cloud.rs"]
mod cloud;
#[path = "common/daemon.rs"]
mod daemon;

use daemon::{Daemon, POLL, events_gapless, get_json, integrity_check, signal_of};
use hmac::{Hmac, Mac};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use unitgate::failpoint::{self, ALL, Failpoint};

const TOKEN: &str = "power-loss-admin-token-0123456789";
const BOARD: &str = "overlocks";
const SOURCE: &str = "billing";
const WEBHOOK_SECRET: &str = "power-loss-webhook-secret-0123456789";
const UPLINK_SECRET: &str = "power-loss-uplink-secret-0123456789";
/// Command streams side by side, each on its own units.
const WORKERS: usize = 2;
const UNITS_PER_WORKER: usize = 4;
const UNITS: usize = WORKERS * UNITS_PER_WORKER;
/// Which hits of a failpoint the crash strikes at (the first ones often come before READY,
/// while the queued coils are delivered and the backlog sent; the later ones under traffic).
const HITS: &[u32] = &[1, 3, 10, 30];
/// Generous: a loaded 2-core machine, debug build.
const DEADLINE: Duration = Duration::from_secs(30);
const SIGABRT: i32 = 6;

/// What a failpoint needs to be reached. Every failpoint must have one: a new failpoint
/// without a plan here fails [`every_failpoint_crashes_and_nothing_acknowledged_is_lost`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Hit once, on a first start (empty data directory).
    FirstStart,
    /// Hit by commands, webhooks, hardware deliveries or the uplink.
    Traffic,
    /// Hit by the MQTT link publishing the event log to a broker.
    Mqtt,
}

fn plan(fp: Failpoint) -> Option<Plan> {
    use failpoint::*;
    [
        (PIN_KEY_RENAME_BEFORE, Plan::FirstStart),
        (PIN_KEY_RENAME_AFTER, Plan::FirstStart),
        (OUTBOX_DESIRED_BEFORE, Plan::Traffic),
        (IDEMPOTENCY_RECORD_BEFORE, Plan::Traffic),
        (WEBHOOK_RECORD_BEFORE, Plan::Traffic),
        (STORE_COMMIT_BEFORE, Plan::Traffic),
        (STORE_COMMIT_AFTER, Plan::Traffic),
        (OUTBOX_APPLIED_BEFORE, Plan::Traffic),
        (OUTBOX_APPLIED_AFTER, Plan::Traffic),
        (UPLINK_CURSOR_BEFORE, Plan::Traffic),
        (UPLINK_CURSOR_AFTER, Plan::Traffic),
        (MQTT_CURSOR_BEFORE, Plan::Mqtt),
        (MQTT_CURSOR_AFTER, Plan::Mqtt),
    ]
    .into_iter()
    .find(|(f, _)| *f == fp)
    .map(|(_, p)| p)
}

/// `FAILPOINTS` that fires `task` at the `hit`th pass only.
fn arm(fp: Failpoint, hit: u32, task: &str) -> String {
    if hit <= 1 {
        format!("{}=1*return({task})->off", fp.name)
    } else {
        format!("{}={}*off->1*return({task})->off", fp.name, hit - 1)
    }
}

/// Fails fast unless `target/debug/unitgate` carries the failpoints: a build of another
/// target with other features (in the same target directory) may have replaced it.
fn binary_has_failpoints() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_unitgate"))
        .arg("version")
        .env("FAILPOINTS", "probe.unknown.name=off")
        .output()
        .expect("unitgate version");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown failpoint"),
        "{} was built without the `failpoints` feature (rebuild it: cargo test --features failpoints --test power_loss); it said {}: {stderr}",
        env!("CARGO_BIN_EXE_unitgate"),
        out.status
    );
}

// ---------------------------------------------------------------- the site and its files

fn unit_id(u: usize) -> String {
    format!("u{u}")
}

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("billing.secret"), WEBHOOK_SECRET).expect("secret");
        std::fs::write(dir.path().join("uplink.secret"), UPLINK_SECRET).expect("secret");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        Site { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn data(&self) -> PathBuf {
        self.path().join("data")
    }
    fn db(&self) -> PathBuf {
        self.data().join("unitgate.db")
    }

    /// Writes the config: the relay board at `board` (disabled when None: its commands
    /// only queue), the HTTPS uplink to `uplink` if any. Returns its path.
    fn config(&self, board: Option<&str>, uplink: Option<&str>) -> PathBuf {
        let dir = self.path().display();
        let mut text = format!(
            r#"
[site]
id = "site-power"
name = "Power loss"
timezone = "UTC"
auto_occupy = false
auto_deallocate = false

[store]
data_dir = "{dir}/data"

[api]
listen = "127.0.0.1:0"
plain_http = true
control_socket = "{dir}/control.sock"

[[api.tokens]]
name = "admin"
sha256 = "{hash}"
scopes = ["admin"]

[log]
level = "warn"

[devices]
reconcile_s = 1

[[devices.relay_boards]]
id = "{BOARD}"
transport = "tcp"
address = "{address}"
unit_id = 1
coils = {UNITS}
inputs = {UNITS}
timeout_ms = 300
poll_ms = 50
enabled = {enabled}

[[cloud.webhooks]]
name = "{SOURCE}"
secret_file = "{dir}/billing.secret"
"#,
            hash = unitgate::api::http::auth::token_hash_hex(TOKEN),
            address = board.unwrap_or("127.0.0.1:9"),
            enabled = board.is_some(),
        );
        if let Some(url) = uplink {
            text.push_str(&format!(
                "\n[cloud.https_uplink]\nurl = \"{url}\"\nsecret_file = \"{dir}/uplink.secret\"\nbatch = 4\ntimeout_ms = 5000\n"
            ));
        }
        let path = self.path().join("config.toml");
        std::fs::write(&path, text).expect("config");
        path
    }
}

/// hw-sim with the one relay board; its control URL and the board's Modbus address.
async fn start_sim() -> (Sim, String, String) {
    let text = format!(
        "[[devices.relay_boards]]\nid = \"{BOARD}\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:0\"\nunit_id = 1\ncoils = {UNITS}\ninputs = {UNITS}\n"
    );
    let sim = Sim::start(
        &SiteFile::parse(&text).expect("site file"),
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
    let address = listed
        .as_array()
        .and_then(|d| d.iter().find(|d| d["id"] == BOARD))
        .and_then(|d| d["address"]["address"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("{BOARD}'s address in {listed}"));
    (sim, control, address)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
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

/// The seeded replica every traffic scenario starts from (a copy of it): units `u0..`,
/// each bound to its overlock coil, one contact and tenancy per unit; the board disabled
/// (its targets queued, never applied) and no uplink (every event still to deliver).
/// Returns the directory and the event counts per type the seeding left.
async fn template() -> (Site, BTreeMap<String, i64>) {
    let site = Site::new();
    let config = site.config(None, None);
    let mut d = Daemon::spawn(&config, site.path(), "seed", &[]);
    let base = d.ready(DEADLINE).await;
    let http = client();
    put_ok(
        &http,
        &base,
        "/v1/unit_types/small",
        json!({"name": "Small"}),
    )
    .await;
    let units: Vec<Value> = (0..UNITS)
        .map(|u| {
            json!({
                "id": unit_id(u), "name": format!("P{u:02}"), "unit_type": "small",
                "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 4,
                "door_type": "roll_up", "access_type": "indoor", "standard_rate": 50.0,
                "walk_thru_order": u, "zones": ["main-gate"],
                "lock": {"kind": "relay", "board": BOARD, "coil": u},
            })
        })
        .collect();
    let res = http
        .post(format!("{base}/v1/units/bulk_create"))
        .bearer_auth(TOKEN)
        .json(&json!({ "units": units }))
        .send()
        .await
        .expect("bulk_create");
    assert_eq!(res.status().as_u16(), 201, "{:?}", res.text().await);
    for u in 0..UNITS {
        put_ok(
            &http,
            &base,
            &format!("/v1/contacts/c{u}"),
            json!({"name": format!("Tenant {u}"), "access_code": format!("{}", 52000 + u * 7)}),
        )
        .await;
        put_ok(
            &http,
            &base,
            &format!("/v1/tenancies/t{u}"),
            json!({"contact_id": format!("c{u}"), "start_date": "2030-01-01", "end_date": null}),
        )
        .await;
    }
    let (_, types) = events_gapless(&http, &base, TOKEN, "seed").await;
    let status = d.terminate(DEADLINE).await;
    assert!(status.success(), "seeding daemon stopped with {status}");
    assert!(site.db().exists() && site.data().join("pin.key").exists());
    (site, types)
}

/// A fresh scenario directory holding a copy of the template's replica and PIN key.
fn copy_of(template: &Site) -> Site {
    let site = Site::new();
    for f in ["unitgate.db", "pin.key"] {
        std::fs::copy(template.data().join(f), site.data().join(f)).expect("copy the template");
    }
    site
}

// ---------------------------------------------------------------- the client model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Available,
    Reserved,
    Occupied,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Available => "available",
            Status::Reserved => "reserved",
            Status::Occupied => "occupied",
        }
    }
}

/// What each unit goes through, over and over: the verb, the status after, the events.
const CYCLE: [(&str, Status, &[&str]); 5] = [
    ("reserve", Status::Reserved, &["unit.reserved"]),
    ("grant_access", Status::Occupied, &["unit.occupied"]),
    (
        "deallocate",
        Status::Available,
        &["unit.deallocated", "unit.available"],
    ),
    ("grant_access", Status::Occupied, &["unit.occupied"]),
    (
        "deallocate",
        Status::Available,
        &["unit.deallocated", "unit.available"],
    ),
];

/// One command: the unit's next step in [`CYCLE`].
#[derive(Clone, Debug)]
struct Cmd {
    key: String,
    unit: usize,
    step: usize,
    attempts: u32,
}

impl Cmd {
    fn path(&self) -> String {
        format!(
            "/v1/units/{}/{}",
            unit_id(self.unit),
            CYCLE[self.step % 5].0
        )
    }
    fn body(&self) -> Value {
        if CYCLE[self.step % 5].0 == "deallocate" {
            json!({"by": "power-loss"})
        } else {
            json!({"tenancy_id": format!("t{}", self.unit), "by": "power-loss"})
        }
    }
    fn expect(&self) -> Status {
        CYCLE[self.step % 5].1
    }
}

/// Status, raw body, and whether the gateway says it replayed a stored answer.
type Reply = (u16, Vec<u8>, bool);

async fn send(http: &reqwest::Client, base: &str, cmd: &Cmd) -> Result<Reply, String> {
    let res = http
        .post(format!("{base}{}", cmd.path()))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", &cmd.key)
        .json(&cmd.body())
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

/// One client: its units' steps (moved only by answers), the command in doubt, the answers.
struct Worker {
    w: usize,
    tag: String,
    steps: Vec<usize>,
    next: usize,
    pending: Option<Cmd>,
    acked: Vec<(Cmd, Vec<u8>)>,
    events: BTreeMap<&'static str, i64>,
    /// Retries answered with the stored reply (committed, answer lost).
    replayed: u64,
}

impl Worker {
    fn new(w: usize, tag: &str) -> Worker {
        Worker {
            w,
            tag: tag.to_owned(),
            steps: vec![0; UNITS_PER_WORKER],
            next: 0,
            pending: None,
            acked: Vec::new(),
            events: BTreeMap::new(),
            replayed: 0,
        }
    }

    fn status(&self, i: usize) -> Status {
        match self.steps[i] {
            0 => Status::Available,
            s => CYCLE[(s - 1) % 5].1,
        }
    }

    fn next_cmd(&mut self) -> Cmd {
        let i = self.next % UNITS_PER_WORKER;
        self.next += 1;
        Cmd {
            key: format!("{}-w{}-{}", self.tag, self.w, self.next),
            unit: self.w * UNITS_PER_WORKER + i,
            step: self.steps[i],
            attempts: 0,
        }
    }

    /// An answer that must be the model's: 200 listing the unit in its new status.
    fn ack(&mut self, cmd: Cmd, (status, raw, replayed): Reply, ctx: &str) {
        let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        assert_eq!(
            status,
            200,
            "{ctx}: {} (key {}, attempt {}) answered {status} {body}",
            cmd.path(),
            cmd.key,
            cmd.attempts
        );
        assert!(
            !replayed || cmd.attempts > 1,
            "{ctx}: a new key {} answered as a replay",
            cmd.key
        );
        let unit = if body["unit"].is_object() {
            &body["unit"]
        } else {
            &body["units"][0]
        };
        assert_eq!(
            (unit["id"].as_str(), unit["status"].as_str()),
            (Some(unit_id(cmd.unit).as_str()), Some(cmd.expect().name())),
            "{ctx}: {} (key {}): {body}",
            cmd.path(),
            cmd.key
        );
        self.replayed += u64::from(replayed);
        self.steps[cmd.unit - self.w * UNITS_PER_WORKER] += 1;
        for e in CYCLE[cmd.step % 5].2 {
            *self.events.entry(e).or_default() += 1;
        }
        self.acked.push((cmd, raw));
    }
}

/// Commands until the daemon stops answering (or answers 5xx), or `stop`.
async fn stream(mut w: Worker, base: String, stop: watch::Receiver<bool>, ctx: String) -> Worker {
    let http = client();
    while !*stop.borrow() {
        let mut cmd = w.pending.take().unwrap_or_else(|| w.next_cmd());
        cmd.attempts += 1;
        match send(&http, &base, &cmd).await {
            Ok(r) if r.0 < 500 => w.ack(cmd, r, &ctx),
            _ => {
                w.pending = Some(cmd);
                break;
            }
        }
    }
    w
}

/// Retries a command to an answer (the daemon is back).
async fn retry(w: &mut Worker, base: &str, mut cmd: Cmd, ctx: &str) {
    let http = client();
    let until = Instant::now() + DEADLINE;
    loop {
        cmd.attempts += 1;
        if let Ok(r) = send(&http, base, &cmd).await
            && r.0 < 500
        {
            w.ack(cmd, r, ctx);
            return;
        }
        assert!(Instant::now() < until, "{ctx}: {} never answered", cmd.key);
        tokio::time::sleep(POLL).await; // retry interval
    }
}

// ---------------------------------------------------------------- webhooks

fn sign(body: &[u8]) -> String {
    let t = chrono::Utc::now().timestamp();
    let mut m = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("key");
    m.update(format!("{t}.").as_bytes());
    m.update(body);
    format!("t={t},v1={}", hex::encode(m.finalize().into_bytes()))
}

async fn send_webhook(http: &reqwest::Client, base: &str, id: &str) -> Result<(u16, Value), ()> {
    let body = serde_json::to_vec(&json!({"id": id, "type": "note.power_loss", "data": {}}))
        .expect("JSON");
    let res = http
        .post(format!("{base}/v1/webhooks/{SOURCE}"))
        .header("X-Unitgate-Signature", sign(&body))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|_| ())?;
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// The webhook sender: ids acknowledged (200) and the one in doubt.
#[derive(Default)]
struct Hooks {
    tag: String,
    acked: Vec<String>,
    pending: Option<String>,
    next: u64,
}

async fn stream_hooks(mut h: Hooks, base: String, stop: watch::Receiver<bool>) -> Hooks {
    let http = client();
    while !*stop.borrow() {
        h.next += 1;
        let id = format!("{}-wh-{}", h.tag, h.next);
        match send_webhook(&http, &base, &id).await {
            Ok((200, body)) => {
                assert_eq!(body["id"], id.as_str(), "{body}");
                h.acked.push(id);
            }
            Ok((s, body)) if s < 500 => panic!("webhook {id}: {s} {body}"),
            _ => {
                h.pending = Some(id);
                break;
            }
        }
    }
    h
}

/// Webhook ids recorded in the replica.
fn recorded_hooks(db: &Path) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the replica read-only");
    let mut st = conn
        .prepare("SELECT event_id FROM webhook_events WHERE source = ?1")
        .expect("prepare");
    st.query_map([SOURCE], |r| r.get::<_, String>(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

// ---------------------------------------------------------------- checks after a restart

/// Unit statuses over the API equal the model's.
async fn units_match(http: &reqwest::Client, base: &str, workers: &[Worker], ctx: &str) {
    let listed = get_json(http, base, TOKEN, "/v1/units?limit=200").await;
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
    // Units of no worker here were never touched.
    let mut model: BTreeMap<String, String> = (0..UNITS)
        .map(|u| (unit_id(u), Status::Available.name().to_owned()))
        .collect();
    for w in workers {
        for i in 0..UNITS_PER_WORKER {
            model.insert(
                unit_id(w.w * UNITS_PER_WORKER + i),
                w.status(i).name().to_owned(),
            );
        }
    }
    assert_eq!(actual, model, "{ctx}: unit statuses over GET /v1/units");
}

/// The event log is gapless and holds each allocation event exactly as often as the
/// seeding and the model imply. Returns the last seq.
async fn events_match(
    http: &reqwest::Client,
    base: &str,
    seeded: &BTreeMap<String, i64>,
    workers: &[Worker],
    ctx: &str,
) -> i64 {
    let (all, types) = events_gapless(http, base, TOKEN, ctx).await;
    let mut want = seeded.clone();
    for w in workers {
        for (e, n) in &w.events {
            *want.entry((*e).to_owned()).or_default() += n;
        }
    }
    let pick = |m: &BTreeMap<String, i64>| -> BTreeMap<String, i64> {
        m.iter()
            .filter(|(k, _)| k.starts_with("unit."))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    assert_eq!(
        pick(&types),
        pick(&want),
        "{ctx}: allocation events in the log vs the model"
    );
    all.last().and_then(|e| e["seq"].as_i64()).unwrap_or(0)
}

/// Every seq 1..=last reached the fake cloud in a batch it acknowledged, signed.
async fn uplink_delivered(cloud: &cloud::FakeCloud, last: i64, ctx: &str) -> usize {
    let until = Instant::now() + DEADLINE;
    loop {
        let got = cloud.received();
        let seen: BTreeSet<i64> = got
            .iter()
            .filter(|r| (200..300).contains(&r.answered))
            .flat_map(|r| r.seqs())
            .collect();
        if (1..=last).all(|s| seen.contains(&s)) {
            for r in &got {
                let sig = r.signature.as_deref().expect("signed");
                cloud::verify(UPLINK_SECRET, sig, &r.body);
            }
            let sent: usize = got.iter().map(|r| r.seqs().len()).sum();
            return sent - last as usize;
        }
        let missing: Vec<i64> = (1..=last).filter(|s| !seen.contains(s)).collect();
        assert!(
            Instant::now() < until,
            "{ctx}: the uplink never delivered seqs {missing:?}"
        );
        tokio::time::sleep(POLL).await; // poll interval
    }
}

/// The overlock coils reach DESIGN.md §4 for the model: off only for `occupied`.
async fn hardware_converged(control: &str, workers: &[Worker], ctx: &str) {
    let want: Vec<bool> = workers
        .iter()
        .flat_map(|w| (0..UNITS_PER_WORKER).map(|i| w.status(i) != Status::Occupied))
        .collect();
    let http = client();
    let until = Instant::now() + DEADLINE;
    loop {
        let v: Value = http
            .get(format!("{control}/relays/{BOARD}"))
            .send()
            .await
            .expect("control API")
            .json()
            .await
            .expect("relay JSON");
        let coils: Vec<bool> = v["coils"]
            .as_array()
            .expect("coils")
            .iter()
            .map(|c| c.as_bool().unwrap_or_default())
            .collect();
        if coils[..UNITS] == want[..] {
            return;
        }
        assert!(
            Instant::now() < until,
            "{ctx}: coils {coils:?}, want {want:?}"
        );
        tokio::time::sleep(POLL).await; // poll interval
    }
}

/// The crash: SIGABRT, with the failpoint's own line in the log, exactly once.
fn died_at(d: &mut Daemon, status: std::process::ExitStatus, fp: Failpoint, ctx: &str) {
    let log = d.log_text();
    assert_eq!(
        signal_of(status),
        Some(SIGABRT),
        "{ctx}: expected death by SIGABRT, got {status}; log:\n{log}"
    );
    let line = format!("failpoint {}: crash", fp.name);
    assert_eq!(
        log.matches(&line).count(),
        1,
        "{ctx}: {line:?} once in the log:\n{log}"
    );
}

/// The crash as [`died_at`], and the replica it left behind intact.
fn crashed(d: &mut Daemon, status: std::process::ExitStatus, fp: Failpoint, db: &Path, ctx: &str) {
    died_at(d, status, fp, ctx);
    integrity_check(db, &format!("{ctx}, before the restart"));
}

/// Each worker's command in doubt at the crash, retried with its key until answered;
/// returns how many there were.
async fn settle_in_doubt(workers: &mut [Worker], base: &str, ctx: &str) -> usize {
    let mut retried = 0;
    for w in workers {
        if let Some(cmd) = w.pending.take() {
            retry(w, base, cmd, ctx).await;
            retried += 1;
        }
    }
    retried
}

/// After the restart, unit statuses and the event log as the workers' model has them;
/// returns the log's last seq.
async fn state_matches(
    http: &reqwest::Client,
    base: &str,
    seeded: &BTreeMap<String, i64>,
    workers: &[Worker],
    ctx: &str,
) -> i64 {
    units_match(http, base, workers, ctx).await;
    events_match(http, base, seeded, workers, ctx).await
}

/// The replica intact, a graceful stop that succeeds, and the replica intact after it.
async fn stop_clean(d: &mut Daemon, db: &Path, ctx: &str) {
    integrity_check(db, ctx);
    let status = d.terminate(DEADLINE).await;
    assert!(status.success(), "{ctx}: stopped with {status}");
    integrity_check(db, &format!("{ctx}, after a clean stop"));
}

// ---------------------------------------------------------------- the scenarios

/// Figures of one crash scenario.
#[derive(Debug, Default)]
struct Outcome {
    acked: usize,
    retried: usize,
    replayed: u64,
    hooks: usize,
    resent_events: usize,
    before_ready: bool,
    /// MQTT scenarios: the cursor stored at the crash, and the last seq.
    mqtt: Option<(i64, i64)>,
    took: Duration,
}

/// Traffic until the armed failpoint aborts the daemon, then a restart and every check.
async fn crash_under_traffic(
    template: Arc<(Site, BTreeMap<String, i64>)>,
    fp: Failpoint,
    hit: u32,
) -> Outcome {
    let started = Instant::now();
    let ctx = format!("{} crash at hit {hit}", fp.name);
    let (tpl, seeded) = &*template;
    let site = copy_of(tpl);
    let (sim, control, address) = start_sim().await;
    let cloud = cloud::FakeCloud::start().await;
    let config = site.config(Some(&address), Some(&cloud.url));
    let tag = format!("{}-{hit}", fp.name.replace('.', "-"));
    let spec = arm(fp, hit, "crash");
    let mut d = Daemon::spawn(&config, site.path(), "armed", &[("FAILPOINTS", &spec)]);

    let mut workers: Vec<Worker> = (0..WORKERS).map(|w| Worker::new(w, &tag)).collect();
    let mut hooks = Hooks {
        tag: tag.clone(),
        ..Hooks::default()
    };
    let mut out = Outcome::default();
    let status = match d.ready_or_exit(DEADLINE).await {
        Err(status) => {
            out.before_ready = true;
            status
        }
        Ok(base) => {
            let (stop_tx, stop) = watch::channel(false);
            let streams: Vec<_> = workers
                .drain(..)
                .map(|w| tokio::spawn(stream(w, base.clone(), stop.clone(), ctx.clone())))
                .collect();
            let hook_stream = tokio::spawn(stream_hooks(hooks, base.clone(), stop.clone()));
            let status = d.exit_within(DEADLINE).await;
            let _ = stop_tx.send(true);
            for s in streams {
                workers.push(s.await.expect("command stream"));
            }
            hooks = hook_stream.await.expect("webhook stream");
            match status {
                Some(s) => s,
                None => panic!(
                    "{ctx}: the failpoint was never reached within {DEADLINE:?} ({} commands acknowledged); log:\n{}",
                    workers.iter().map(|w| w.acked.len()).sum::<usize>(),
                    d.log_text()
                ),
            }
        }
    };
    crashed(&mut d, status, fp, &site.db(), &ctx);
    drop(d);

    // Back without failpoints: retry what was in doubt, then check everything.
    let mut d = Daemon::spawn(&config, site.path(), "after", &[]);
    let base = d.ready(DEADLINE).await;
    let http = client();
    out.retried = settle_in_doubt(&mut workers, &base, &ctx).await;
    for w in &workers {
        // The last acknowledged command replays its first answer byte for byte.
        if let Some((cmd, raw)) = w.acked.last().cloned() {
            let (s, again, replayed) = send(&http, &base, &cmd).await.expect("replay answered");
            assert_eq!(
                (s, String::from_utf8_lossy(&again), replayed),
                (200, String::from_utf8_lossy(&raw), true),
                "{ctx}: replay of {}",
                cmd.key
            );
        }
        out.acked += w.acked.len();
        out.replayed += w.replayed;
    }
    let mut accepted: BTreeSet<String> = hooks.acked.iter().cloned().collect();
    if let Some(id) = hooks.pending.take() {
        // Committed before the crash (409 replayed) or not (200 now): recorded once either way.
        let until = Instant::now() + DEADLINE;
        loop {
            match send_webhook(&http, &base, &id).await {
                Ok((200, _)) => break,
                Ok((409, body)) if body["error"]["code"] == "replayed" => break,
                Ok((s, body)) if s < 500 => panic!("{ctx}: webhook {id} retried: {s} {body}"),
                _ => assert!(Instant::now() < until, "{ctx}: webhook {id} never answered"),
            }
            tokio::time::sleep(POLL).await; // retry interval
        }
        accepted.insert(id);
    }
    if let Some(id) = hooks.acked.last() {
        let (s, body) = send_webhook(&http, &base, id).await.expect("answered");
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (409, Some("replayed")),
            "{ctx}: an acknowledged webhook sent again: {body}"
        );
    }
    out.hooks = accepted.len();
    assert_eq!(
        recorded_hooks(&site.db()),
        accepted,
        "{ctx}: webhook ids recorded vs acknowledged"
    );
    let last = state_matches(&http, &base, seeded, &workers, &ctx).await;
    out.resent_events = uplink_delivered(&cloud, last, &ctx).await;
    hardware_converged(&control, &workers, &ctx).await;
    stop_clean(&mut d, &site.db(), &ctx).await;
    sim.stop().await;
    out.took = started.elapsed();
    out
}

/// A first start (empty data directory) dying while it creates the PIN key; the next start
/// comes up with a whole key, and keeps it.
async fn crash_at_first_start(fp: Failpoint) -> Outcome {
    let started = Instant::now();
    let ctx = format!("{} crash at the first start", fp.name);
    let site = Site::new();
    let config = site.config(None, None);
    let key = site.data().join("pin.key");
    let mut d = Daemon::spawn(
        &config,
        site.path(),
        "armed",
        &[("FAILPOINTS", &arm(fp, 1, "crash"))],
    );
    let status = match d.ready_or_exit(DEADLINE).await {
        Err(s) => s,
        Ok(_) => panic!(
            "{ctx}: READY: the failpoint was never reached; log:\n{}",
            d.log_text()
        ),
    };
    died_at(&mut d, status, fp, &ctx);
    drop(d);
    let stale: Vec<String> = std::fs::read_dir(site.data())
        .expect("data dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pin.key."))
        .collect();
    if !stale.is_empty() {
        // Harmless (0600, never read), but not cleaned up: see the report of issue 9.
        println!("{ctx}: temporary key files left behind: {stale:?}");
    }
    let left = std::fs::read(&key).ok();
    if let Some(k) = &left {
        assert_eq!(k.len(), 32, "{ctx}: a short PIN key was left in place");
    }
    assert_eq!(
        left.is_some(),
        fp == failpoint::PIN_KEY_RENAME_AFTER,
        "{ctx}: the key is in place exactly when the rename was done"
    );
    let mut d = Daemon::spawn(&config, site.path(), "after", &[]);
    let base = d.ready(DEADLINE).await;
    let first = std::fs::read(&key).expect("pin.key after the restart");
    assert_eq!(first.len(), 32, "{ctx}");
    if let Some(k) = left {
        assert_eq!(
            k, first,
            "{ctx}: the key renamed into place is the one kept"
        );
    }
    put_ok(
        &client(),
        &base,
        "/v1/contacts/c-pin",
        json!({"name": "Tenant", "access_code": "48213"}),
    )
    .await;
    assert!(d.terminate(DEADLINE).await.success(), "{ctx}");
    let mut d = Daemon::spawn(&config, site.path(), "again", &[]);
    d.ready(DEADLINE).await;
    assert_eq!(
        std::fs::read(&key).expect("pin.key"),
        first,
        "{ctx}: the key changed"
    );
    stop_clean(&mut d, &site.db(), &ctx).await;
    Outcome {
        before_ready: true,
        took: started.elapsed(),
        ..Outcome::default()
    }
}

// ---------------------------------------------------------------- the MQTT link

/// Which hits of an MQTT cursor failpoint the crash strikes at.
const MQTT_HITS: &[u32] = &[1, 3, 10];
/// `[cloud.mqtt] inflight`: small, so the backlog alone takes several cursor writes.
const MQTT_INFLIGHT: i64 = 3;
/// The site id of [`Site::config`], in the MQTT topics.
const SITE_ID: &str = "site-power";

#[test]
#[ignore = "the broker's own process, started by tests/common/broker.rs"]
fn embedded_broker_process() {
    broker::serve_if_child();
}

/// A message the cloud received on `unitgate/v1/{site}/+`.
#[derive(Debug, Clone)]
enum Seen {
    /// `hello`: (`delivered_seq`, `last_event_seq`).
    Hello(i64, i64),
    /// `events`: its `seq`.
    Event(i64),
}

/// The cloud's subscriber: one wildcard filter, so the broker keeps hello and events in one
/// order. Returns what it has received so far (shared) once the broker confirmed the
/// subscription, and the task polling it.
async fn subscribe(port: u16, ctx: &str) -> (Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let mut opts = rumqttc::MqttOptions::new(format!("cloud-{port}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
    client
        .subscribe(
            format!("unitgate/v1/{SITE_ID}/+"),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .expect("subscribe");
    let until = Instant::now() + DEADLINE;
    loop {
        let Ok(ev) = tokio::time::timeout_at(until, el.poll()).await else {
            panic!("{ctx}: no SUBACK within {DEADLINE:?}");
        };
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = ev.expect("broker") {
            break;
        }
    }
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (got, ctx) = (seen.clone(), ctx.to_owned());
    let task = tokio::spawn(async move {
        let _client = client; // dropping it would end the event loop
        loop {
            let p = match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(e) => {
                    // Missing seqs then fail the scenario; at its end the broker goes first.
                    eprintln!("{ctx}: the cloud's subscriber lost the broker: {e}");
                    return;
                }
            };
            let topic = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
            let v: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
            let m = match topic.as_str() {
                "hello" => Seen::Hello(
                    v["delivered_seq"].as_i64().expect("hello delivered_seq"),
                    v["last_event_seq"].as_i64().expect("hello last_event_seq"),
                ),
                "events" => Seen::Event(v["seq"].as_i64().expect("event seq")),
                _ => continue, // status
            };
            seen.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        }
    });
    (got, task)
}

/// The MQTT cursor stored in the replica and its last event seq (read-only), 0 for none.
fn stored_mqtt_cursor(db: &Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the replica read-only");
    conn.query_row(
        "SELECT (SELECT coalesce(max(seq), 0) FROM uplink_cursors WHERE uplink = 'mqtt'),
                (SELECT coalesce(max(seq), 0) FROM events)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .expect("the cursor and the last seq")
}

/// What the cloud received, cut into delivery runs (each opens with a hello):
/// (hello's `delivered_seq`, hello's `last_event_seq`, the event seqs after it).
fn runs(seen: &[Seen], ctx: &str) -> Vec<(i64, i64, Vec<i64>)> {
    let mut runs: Vec<(i64, i64, Vec<i64>)> = Vec::new();
    for m in seen {
        match (m, runs.last_mut()) {
            (Seen::Hello(d, l), _) => runs.push((*d, *l, Vec::new())),
            (Seen::Event(s), Some(run)) => run.2.push(*s),
            (Seen::Event(s), None) => panic!("{ctx}: event {s} before any hello"),
        }
    }
    runs
}

/// The daemon publishes the event log to a broker (a backlog from the template, then the
/// events of a command stream) and crashes at the `hit`th MQTT cursor write; restarted
/// without failpoints it must deliver the rest as src/cloud/mqtt.rs promises (module doc).
async fn crash_on_the_mqtt_link(
    template: Arc<(Site, BTreeMap<String, i64>)>,
    fp: Failpoint,
    hit: u32,
) -> Outcome {
    let started = Instant::now();
    let ctx = format!("{} crash at hit {hit}", fp.name);
    let (tpl, seeded) = &*template;
    let site = copy_of(tpl);
    let broker = tokio::task::spawn_blocking(broker::Broker::start)
        .await
        .expect("broker starts");
    let config = site.config(None, None);
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "\n[cloud.mqtt]\nurl = \"{}\"\nprotocol = \"v3.1.1\"\nreconnect_max_s = 1\ninflight = {MQTT_INFLIGHT}\n",
        broker.url(false)
    ));
    std::fs::write(&config, text).expect("config");
    let (seen, subscriber) = subscribe(broker.v4, &ctx).await;
    let snapshot = || seen.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let tag = format!("{}-{hit}", fp.name.replace('.', "-"));
    let spec = arm(fp, hit, "crash");
    let mut d = Daemon::spawn(&config, site.path(), "armed", &[("FAILPOINTS", &spec)]);
    let mut out = Outcome::default();
    let mut worker = Worker::new(0, &tag);
    let status = match d.ready_or_exit(DEADLINE).await {
        Err(status) => {
            out.before_ready = true;
            status
        }
        Ok(base) => {
            let (stop_tx, stop) = watch::channel(false);
            let commands = tokio::spawn(stream(worker, base, stop, ctx.clone()));
            let status = d.exit_within(DEADLINE).await;
            let _ = stop_tx.send(true);
            worker = commands.await.expect("command stream");
            status.unwrap_or_else(|| {
                panic!(
                    "{ctx}: the failpoint was never reached within {DEADLINE:?} ({} commands acknowledged, {} messages to the cloud); log:\n{}",
                    worker.acked.len(),
                    snapshot().len(),
                    d.log_text()
                )
            })
        }
    };
    crashed(&mut d, status, fp, &site.db(), &ctx);
    let (stored, logged) = stored_mqtt_cursor(&site.db());
    drop(d);

    // Back without failpoints: the command in doubt settled, then no more events.
    let mut d = Daemon::spawn(&config, site.path(), "after", &[]);
    let base = d.ready(DEADLINE).await;
    out.retried = settle_in_doubt(std::slice::from_mut(&mut worker), &base, &ctx).await;
    out.acked = worker.acked.len();
    let http = client();
    let last = state_matches(&http, &base, seeded, std::slice::from_ref(&worker), &ctx).await;

    // Every seq 1..=last reached the cloud, and the stored cursor and GET /v1/status say so.
    let until = Instant::now() + DEADLINE;
    loop {
        let got: BTreeSet<i64> = snapshot()
            .iter()
            .filter_map(|m| match m {
                Seen::Event(s) => Some(*s),
                Seen::Hello(..) => None,
            })
            .collect();
        let missing: Vec<i64> = (1..=last).filter(|s| !got.contains(s)).collect();
        let status = get_json(&http, &base, TOKEN, "/v1/status").await;
        let (cursor, _) = stored_mqtt_cursor(&site.db());
        let shown = &status["link"]["mqtt"];
        if missing.is_empty()
            && cursor == last
            && shown["delivered_seq"].as_i64() == Some(last)
            && shown["connected"] == true
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "{ctx}: the cloud is missing seqs {missing:?}; cursor {cursor}, last {last}; status {status}"
        );
        tokio::time::sleep(POLL).await; // poll interval
    }
    let seen = snapshot();
    let runs = runs(&seen, &ctx);
    assert!(
        runs.len() >= 2,
        "{ctx}: a hello from each start expected: {seen:?}"
    );
    // Each connection: the hello names the cursor, the events follow from the next seq,
    // in order and gapless (the broker keeps one publisher's order).
    for (i, (from, _, evs)) in runs.iter().enumerate() {
        let want: Vec<i64> = (from + 1..=from + evs.len() as i64).collect();
        assert_eq!(
            evs, &want,
            "{ctx}: delivery run {i} (hello delivered_seq {from}) out of order or with gaps"
        );
    }
    // The last run is the restart: it resumes right after the cursor stored before the
    // crash (nothing at or below it again, everything above it), with a hello saying so
    // (and naming the log's last seq then: the command in doubt is retried after it).
    let (before, after) = runs.split_at(runs.len() - 1);
    let (resumed, hello_last, again) = &after[0];
    assert_eq!(
        (*resumed, *hello_last),
        (stored, logged),
        "{ctx}: the hello after the restart (delivered_seq, last_event_seq) vs the replica at the crash"
    );
    assert_eq!(
        again.last().copied().unwrap_or(stored),
        last,
        "{ctx}: the restart delivered up to the last seq"
    );
    let end1 = before
        .iter()
        .filter_map(|r| r.2.last().copied())
        .max()
        .unwrap_or(0);
    // The cursor only passes what the broker acknowledged, so what the cloud has.
    assert!(
        stored <= end1,
        "{ctx}: cursor {stored} stored past the last event delivered before the crash ({end1})"
    );
    if fp == failpoint::MQTT_CURSOR_BEFORE {
        // The crash came after a PUBACK moved the window, before the write: that much
        // was delivered and is sent again.
        assert!(
            end1 > stored,
            "{ctx}: nothing acknowledged past the stored cursor {stored} before the crash"
        );
    }
    // The window is filled only once the cursor of what left it is stored, so no more than
    // a window beyond the stored cursor was ever published: the bound of what is re-sent.
    assert!(
        end1 - stored <= MQTT_INFLIGHT,
        "{ctx}: {} events published past the stored cursor {stored}, more than the in-flight window",
        end1 - stored
    );
    out.resent_events = (end1 - stored).max(0) as usize;
    out.mqtt = Some((stored, logged));
    stop_clean(&mut d, &site.db(), &ctx).await;
    subscriber.abort();
    drop(broker);
    out.took = started.elapsed();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failpoint_crashes_and_nothing_acknowledged_is_lost() {
    binary_has_failpoints();
    let run = Instant::now();
    let missing: Vec<&str> = ALL
        .iter()
        .filter(|f| plan(**f).is_none())
        .map(|f| f.name)
        .collect();
    assert!(
        missing.is_empty(),
        "failpoints without a power-loss scenario: {missing:?}"
    );
    let parallel: usize = std::env::var("POWER_LOSS_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let template = Arc::new(template().await);
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut runs = Vec::new();
    for fp in ALL.iter().copied() {
        let hits: &[u32] = match plan(fp) {
            Some(Plan::FirstStart) => &[1],
            Some(Plan::Mqtt) => MQTT_HITS,
            _ => HITS,
        };
        for &hit in hits {
            let (template, gate) = (template.clone(), gate.clone());
            runs.push((
                fp,
                hit,
                tokio::spawn(async move {
                    let _slot = gate.acquire_owned().await.expect("semaphore");
                    match plan(fp) {
                        Some(Plan::FirstStart) => crash_at_first_start(fp).await,
                        Some(Plan::Mqtt) => crash_on_the_mqtt_link(template, fp, hit).await,
                        _ => crash_under_traffic(template, fp, hit).await,
                    }
                }),
            ));
        }
    }
    let mut panics = Vec::new();
    for (fp, hit, run) in runs {
        match run.await {
            Ok(o) => println!(
                "{:<26} hit {hit:>2}: {:>5.1} s, {:>3} commands acked, {} retried ({} replayed), {:>3} webhooks, {} events resent{}{}",
                fp.name,
                o.took.as_secs_f64(),
                o.acked,
                o.retried,
                o.replayed,
                o.hooks,
                o.resent_events,
                o.mqtt
                    .map(|(c, l)| format!(", MQTT cursor {c} of {l} at the crash"))
                    .unwrap_or_default(),
                if o.before_ready {
                    ", died before READY"
                } else {
                    ""
                }
            ),
            Err(e) => panics.push((fp.name, hit, e)),
        }
    }
    if let Some((name, hit, e)) = panics.into_iter().next() {
        eprintln!("{name} hit {hit} failed");
        std::panic::resume_unwind(e.into_panic());
    }
    println!(
        "power loss: all scenarios in {:.1} s",
        run.elapsed().as_secs_f64()
    );
}

/// One injected I/O error on the command path: the `hit`th pass of `fp` fails.
async fn error_on_the_command_path(
    template: &(Site, BTreeMap<String, i64>),
    fp: Failpoint,
    hit: u32,
    committed: bool,
) {
    let ctx = format!("{} error at hit {hit}", fp.name);
    let (tpl, seeded) = template;
    let site = copy_of(tpl);
    let config = site.config(None, None);
    let tag = format!("{}-err", fp.name.replace('.', "-"));
    let spec = arm(fp, hit, "error");
    let mut d = Daemon::spawn(&config, site.path(), "armed", &[("FAILPOINTS", &spec)]);
    let base = d.ready(DEADLINE).await;
    let http = client();
    let mut w = Worker::new(0, &tag);
    let mut failed = None;
    for _ in 0..20 {
        let mut cmd = w.next_cmd();
        cmd.attempts = 1;
        let r = send(&http, &base, &cmd).await.expect("answered");
        if r.0 >= 500 {
            failed = Some((cmd, r));
            break;
        }
        w.ack(cmd, r, &ctx);
    }
    let Some((cmd, (status, raw, replayed))) = failed else {
        panic!(
            "{ctx}: no command failed: the failpoint was never reached; log:\n{}",
            d.log_text()
        );
    };
    assert!(
        d.log_text()
            .contains(&format!("failpoint {}: error", fp.name)),
        "{ctx}: the failpoint's line in the log:\n{}",
        d.log_text()
    );
    // The contract's error shape, and nothing else.
    let body: Value = serde_json::from_slice(&raw).expect("a JSON error body");
    assert_eq!((status, replayed), (500, false), "{ctx}: {body}");
    let err = body["error"].as_object().expect("{error: {...}}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{ctx}: {body}");
    assert_eq!(err["code"], "internal_error", "{ctx}: {body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{ctx}: {body}"
    );
    assert!(
        err["request_id"].as_str().is_some_and(|m| !m.is_empty()),
        "{ctx}: {body}"
    );
    if !committed {
        // Nothing of it applied: statuses and the log as the model has them without it.
        state_matches(&http, &base, seeded, std::slice::from_ref(&w), &ctx).await;
    }
    // The next command succeeds.
    let mut next = w.next_cmd();
    next.attempts = 1;
    let r = send(&http, &base, &next).await.expect("answered");
    w.ack(next, r, &ctx);
    // The failed one, retried with its key: applied once (replayed if it had committed).
    let mut again = cmd.clone();
    again.attempts = 2;
    let r = send(&http, &base, &again).await.expect("answered");
    assert_eq!(r.2, committed, "{ctx}: the retry replayed a stored answer");
    w.ack(again.clone(), r.clone(), &ctx);
    let third = send(&http, &base, &again).await.expect("answered");
    assert_eq!(
        (third.0, third.1, third.2),
        (200, r.1, true),
        "{ctx}: once more"
    );
    state_matches(&http, &base, seeded, std::slice::from_ref(&w), &ctx).await;
    stop_clean(&mut d, &site.db(), &ctx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_error_on_the_command_path_fails_the_command_alone() {
    binary_has_failpoints();
    let template = template().await;
    for (fp, hit, committed) in [
        (failpoint::STORE_COMMIT_BEFORE, 6, false),
        (failpoint::IDEMPOTENCY_RECORD_BEFORE, 3, false),
        (failpoint::OUTBOX_DESIRED_BEFORE, 3, false),
        (failpoint::STORE_COMMIT_AFTER, 6, true),
    ] {
        let started = Instant::now();
        error_on_the_command_path(&template, fp, hit, committed).await;
        println!(
            "{:<26} error at hit {hit}: {:.1} s",
            fp.name,
            started.elapsed().as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_failpoint_name_is_refused_at_start() {
    binary_has_failpoints();
    let site = Site::new();
    let config = site.config(None, None);
    for (spec, says) in [
        ("store.comit.before=return(crash)", "unknown failpoint"),
        ("store.commit.before=bogus(1)", "store.commit.before"),
        ("store.commit.before", "not name=actions"),
    ] {
        let mut d = Daemon::spawn(&config, site.path(), "typo", &[("FAILPOINTS", spec)]);
        let status = match d.ready_or_exit(DEADLINE).await {
            Err(s) => s,
            Ok(_) => panic!("READY with FAILPOINTS={spec:?}"),
        };
        assert_eq!(status.code(), Some(1), "FAILPOINTS={spec:?}: {status}");
        let log = d.log_text();
        assert!(
            log.contains("FAILPOINTS") && log.contains(says),
            "FAILPOINTS={spec:?}: {log}"
        );
    }
}
