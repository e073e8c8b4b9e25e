//! `cargo bench --bench footprint`: what the daemon costs a small gateway box (issue 8).
//! Each figure is of the real `unitgate run` binary (the release build cargo makes for this
//! bench, `env!("CARGO_BIN_EXE_unitgate")`, default features) in its own process, measured
//! from `/proc/PID`, beside a baseline taken in the same run.
//!
//! 1. Idle: a site of 4 OSDP keypads (secure channel, on pseudo-terminals as on RS-485), a
//!    Modbus TCP gate board, a Modbus RTU overlock board (pseudo-terminal) and the smart-lock
//!    API, all simulated by hw-sim in this process, and 100 units. Once every device is
//!    online in `GET /v1/devices` and `BENCH_FOOTPRINT_SETTLE_S` more have passed, CPU is
//!    (utime + stime) of `/proc/PID/stat` over `BENCH_FOOTPRINT_WINDOW_S`, and RSS is
//!    `VmRSS` sampled each second (max) plus `VmHWM` (the peak since exec, start-up included).
//!    The keypads must be polled all along: hw-sim's POLL counter of each keypad rises over
//!    the window and each is still online at its end (else the run fails). Baselines: the
//!    CPU of this process over the same window (hw-sim answering the polls, plus this
//!    bench's own sampling), and the RSS of an idle `sleep` for scale.
//! 2. Size: the binary as built, and a copy stripped with `strip`. When `cargo deb` has left
//!    a package in target/debian, its binary too (the production build, no default
//!    features: no in-process hw-sim, no embedded broker), for free; otherwise that figure
//!    would need a second release build, which this bench does not make.
//! 3. Cold start: a data dir holding `BENCH_FOOTPRINT_UNITS` units (seeded through the
//!    library with a snapshot, then the gateway stopped), started `BENCH_FOOTPRINT_STARTS`
//!    times: exec → `READY=1` on a `NOTIFY_SOCKET` this bench binds (the daemon sends it once
//!    the store is open and the API listens; checked: `GET /v1/status` answers 200 right
//!    after), then SIGTERM and wait for exit 0. If no READY comes, exec → first 200 from
//!    `GET /v1/status` (polled every 2 ms) is measured instead, and the report says so.
//!    Baseline: the same with 0 units. No hardware is configured for these starts.
//!
//! Targets (issue 8): RSS ≤ 20 MB and CPU ≤ 1% of a core while polling 4 keypads; cold start
//! to READY with 10,000 units ≤ 500 ms (p50). Prints a table for people and one JSON object
//! on a line of its own (the only stdout line starting with `{`) for machines. A wrong answer
//! fails the run (a device not online within 30 s, keypads not polled, a start that never
//! gets ready, an exit other than 0 after SIGTERM); a missed target is reported (PASS/MISS)
//! but does not fail it.
//!
//! Sizes (environment variables, defaults in brackets): `BENCH_FOOTPRINT_WINDOW_S` [30],
//! `BENCH_FOOTPRINT_SETTLE_S` [5], `BENCH_FOOTPRINT_STARTS` [10], `BENCH_FOOTPRINT_UNITS`
//! [10000]. `BENCH_FOOTPRINT_BIN` runs another binary in 1 and 3, e.g. the package's
//! (`dpkg -x target/debian/unitgate_*.deb DIR`, then `DIR/usr/bin/unitgate`). The daemon
//! inherits this process's environment (so `MALLOC_ARENA_MAX=2 cargo bench ...` reaches it).

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use unitgate::api::http::auth::token_hash_hex;
use unitgate::command::snapshot::Snapshot;
use unitgate::command::{Command as GwCommand, Envelope, system_clock};
use unitgate::config::Config;
use unitgate::gateway::Gateway;

const SITE: &str = "site-bench";
const TOKEN: &str = "bench-footprint-token-0123456789";
const LOCK_KEY: &str = "bench-lock-key-0123456789";
const KEYPADS: usize = 4;
const IDLE_UNITS: usize = 100;
const TARGET_RSS_MB: f64 = 20.0;
const TARGET_CPU_PCT: f64 = 1.0;
const TARGET_READY_MS: f64 = 500.0;
/// Longest wait for every device to come online, and for a start to get ready.
const ONLINE_WITHIN: Duration = Duration::from_secs(30);
const READY_WITHIN: Duration = Duration::from_secs(20);
const EXIT_WITHIN: Duration = Duration::from_secs(20);

struct Settings {
    window_s: u64,
    settle_s: u64,
    starts: usize,
    units: usize,
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let s = Settings {
            window_s: env_usize("BENCH_FOOTPRINT_WINDOW_S", 30)? as u64,
            settle_s: env_usize("BENCH_FOOTPRINT_SETTLE_S", 5)? as u64,
            starts: env_usize("BENCH_FOOTPRINT_STARTS", 10)?,
            units: env_usize("BENCH_FOOTPRINT_UNITS", 10_000)?,
        };
        ensure!(
            s.window_s >= 1,
            "BENCH_FOOTPRINT_WINDOW_S must be at least 1"
        );
        ensure!(s.starts >= 1, "BENCH_FOOTPRINT_STARTS must be at least 1");
        Ok(s)
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

/// The site's devices for hw-sim and the gateway alike. `{wires}` is the pty directory;
/// `board` and `locks` the addresses hw-sim chose (`127.0.0.1:0` to let it choose).
fn devices(wires: &Path, board: &str, locks: &str) -> String {
    let wires = wires.display();
    let mut t = String::new();
    for n in 1..=KEYPADS {
        t += &format!(
            r#"
[[devices.keypads]]
id = "gate-{n}"
zone = "zone-{n}"
port = "{wires}/gate-{n}"
baud = 9600
address = {n}
scbk = "{n:02}1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b"
gate = {{ board = "gate-relays", coil = {c} }}
gate_sensor = {{ board = "gate-relays", input = {c} }}
"#,
            c = n - 1
        );
    }
    t += &format!(
        r#"
[[devices.relay_boards]]
id = "gate-relays"
transport = "tcp"
address = "{board}"
unit_id = 1
coils = {KEYPADS}
inputs = {KEYPADS}

[[devices.relay_boards]]
id = "relay-1"
transport = "rtu"
port = "{wires}/relay-1"
baud = 19200
unit_id = 1
coils = 32
inputs = 32

[devices.lock_api]
id = "locks"
url = "{locks}"
api_key_file = "{wires}/lock-api.key"
locks = ["lock-1", "lock-2", "lock-3", "lock-4"]
"#
    );
    t
}

/// The daemon's config file: plain HTTP on `listen`, one admin token, `extra` appended.
fn config_text(data_dir: &Path, listen: &str, extra: &str) -> String {
    format!(
        r#"[site]
id = "{SITE}"
name = "Bench Site"
timezone = "Europe/London"

[store]
data_dir = "{}"

[api]
listen = "{listen}"
plain_http = true
control_socket = "{}"

[log]
level = "warn"

[[api.tokens]]
name = "bench"
sha256 = "{}"
scopes = ["admin"]

{extra}"#,
        data_dir.display(),
        data_dir.join("control.sock").display(),
        token_hash_hex(TOKEN),
    )
}

/// The daemon under test: `BENCH_FOOTPRINT_BIN`, else the binary cargo built for this bench.
fn binary() -> PathBuf {
    std::env::var_os("BENCH_FOOTPRINT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_unitgate")),
        PathBuf::from,
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts a gateway in this process on `data_dir`, applies a snapshot of `units` units,
/// and stops it: the data dir the binary then starts from.
async fn seed(data_dir: &Path, units: usize) -> Result<()> {
    let cfg = Config::from_toml(&config_text(data_dir, "127.0.0.1:0", ""))?;
    cfg.validate()
        .map_err(|p| anyhow!("bench config is invalid: {p:?}"))?;
    let gw = Gateway::start(&cfg, system_clock()).await?;
    let list: Vec<Value> = (0..units)
        .map(|i| {
            json!({
                "id": format!("u-{i}"), "name": format!("U{i:05}"), "unit_type": "small",
                "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 5,
                "door_type": "roll_up", "access_type": "indoor", "standard_rate": 45.0,
                "walk_thru_order": i, "floor": 1, "zones": ["zone-1"],
                "status": "available",
            })
        })
        .collect();
    let body = json!({
        "unit_types": [{"id": "small", "name": "Small 5x5"}],
        "units": list,
        "contacts": [{"id": "c-0", "name": "Tenant 0", "access_code": "10000000"}],
        "tenancies": [{"id": "t-0", "contact_id": "c-0", "start_date": "2020-01-01", "state": "active"}],
        "allocations": [],
    });
    let snapshot: Snapshot = unitgate::command::unit::parse_at(body, "")
        .map_err(|e| anyhow!("seed snapshot: {}: {}", e.field, e.message))?;
    let reply = gw
        .executor
        .execute(Envelope {
            command: GwCommand::Snapshot(Box::new(snapshot)),
            idempotency_key: None,
            fingerprint: [0; 32],
            if_match: None,
            request_id: "bench-seed".into(),
        })
        .await;
    ensure!(
        reply.status == 200,
        "seed snapshot answered {}: {}",
        reply.status,
        String::from_utf8_lossy(&reply.body[..reply.body.len().min(1000)])
    );
    gw.stop().await;
    Ok(())
}

/// The daemon, started from `config`, with `NOTIFY_SOCKET` if given; stderr to `log`.
fn spawn(config: &Path, notify: Option<&Path>, log: &Path) -> Result<Child> {
    let mut c = Command::new(binary());
    c.arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("UNITGATE_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    match notify {
        Some(p) => c.env("NOTIFY_SOCKET", p),
        None => c.env_remove("NOTIFY_SOCKET"),
    };
    Ok(c.spawn()?)
}

/// SIGTERM, then the exit status within [`EXIT_WITHIN`] (must be 0).
fn terminate(child: &mut Child, log: &Path) -> Result<()> {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    ensure!(st.success(), "kill -TERM failed");
    let deadline = Instant::now() + EXIT_WITHIN;
    loop {
        if let Some(st) = child.try_wait()? {
            ensure!(
                st.success(),
                "the daemon exited {st} after SIGTERM; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the daemon did not exit within {EXIT_WITHIN:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start with the state (field 3).
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// A `VmRSS:`/`VmHWM:` line of `/proc/PID/status`, in KiB.
fn status_kib(pid: &str, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} for {pid}"))
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value> {
    let r = http.get(url).bearer_auth(TOKEN).send().await?;
    ensure!(r.status() == 200, "GET {url}: {}", r.status());
    Ok(r.json().await?)
}

struct Idle {
    online_s: f64,
    window_s: f64,
    cpu_pct: f64,
    sim_cpu_pct: f64,
    rss_max_mb: f64,
    rss_end_mb: f64,
    rss_anon_mb: f64,
    rss_file_mb: f64,
    hwm_mb: f64,
    threads: u64,
    polls_per_s: Vec<f64>,
    sleep_rss_mb: f64,
}

async fn bench_idle(s: &Settings) -> Result<Idle> {
    let wires = tempfile::tempdir()?;
    std::fs::write(wires.path().join("lock-api.key"), format!("{LOCK_KEY}\n"))?;
    let site = SiteFile::parse(&devices(wires.path(), "127.0.0.1:0", "http://127.0.0.1:0"))
        .map_err(|e| anyhow!("site file: {e}"))?;
    let sim = Sim::start(&site, Some("127.0.0.1:0")).await?;
    let http = reqwest::Client::new();
    let listed = get_json(&http, &format!("{}/devices", sim.control_url())).await?;
    let address = |id: &str, key: &str| -> Result<String> {
        listed
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == id))
            .and_then(|d| d["address"][key].as_str())
            .map(str::to_owned)
            .with_context(|| format!("hw-sim lists no {key} for {id}: {listed}"))
    };
    let board = address("gate-relays", "address")?;
    let locks = address("locks", "url")?;

    let data = tempfile::tempdir()?;
    seed(data.path(), IDLE_UNITS).await?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let text = config_text(data.path(), &listen, &devices(wires.path(), &board, &locks));
    Config::from_toml(&text)?
        .validate()
        .map_err(|p| anyhow!("bench config is invalid: {p:?}"))?;
    let config = data.path().join("config.toml");
    std::fs::write(&config, &text)?;
    let log = data.path().join("unitgate.log");
    let started = Instant::now();
    let mut child = spawn(&config, None, &log)?;
    let pid = child.id().to_string();
    let base = format!("http://{listen}");

    let result = async {
        // Every device online in the gateway's view.
        let deadline = Instant::now() + ONLINE_WITHIN;
        loop {
            if let Ok(d) = get_json(&http, &format!("{base}/v1/devices")).await
                && let Some(list) = d.as_array()
                && list.len() == KEYPADS + 3
                && list.iter().all(|d| d["online"] == true)
            {
                break;
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "the daemon exited {st}; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let d = get_json(&http, &format!("{base}/v1/devices")).await;
                bail!("devices not all online within {ONLINE_WITHIN:?}: {d:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let online_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(s.settle_s)).await;

        let polls = |http: reqwest::Client, url: String| async move {
            let mut v = Vec::new();
            for n in 1..=KEYPADS {
                let k = get_json(&http, &format!("{url}/keypads/gate-{n}")).await?;
                ensure!(k["online"] == true, "keypad gate-{n} not polled: {k}");
                v.push(k["counters"]["polls"].as_u64().context("polls")?);
            }
            Ok::<_, anyhow::Error>(v)
        };
        let tck = clk_tck();
        let polls0 = polls(http.clone(), sim.control_url()).await?;
        let t0 = Instant::now();
        let (cpu0, sim0) = (cpu_ticks(&pid)?, cpu_ticks("self")?);
        let mut rss_max = 0u64;
        let end = t0 + Duration::from_secs(s.window_s);
        while Instant::now() < end {
            rss_max = rss_max.max(status_kib(&pid, "VmRSS:")?);
            tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
        }
        let (cpu1, sim1) = (cpu_ticks(&pid)?, cpu_ticks("self")?);
        let window_s = t0.elapsed().as_secs_f64();
        let polls1 = polls(http.clone(), sim.control_url()).await?;
        let rss_end = status_kib(&pid, "VmRSS:")?;
        let polls_per_s: Vec<f64> = polls0
            .iter()
            .zip(&polls1)
            .map(|(a, b)| (b - a) as f64 / window_s)
            .collect();
        ensure!(
            polls_per_s.iter().all(|p| *p > 1.0),
            "keypads not polled through the window: {polls_per_s:?} polls/s"
        );
        Ok(Idle {
            online_s,
            window_s,
            cpu_pct: (cpu1 - cpu0) as f64 / tck / window_s * 100.0,
            sim_cpu_pct: (sim1 - sim0) as f64 / tck / window_s * 100.0,
            rss_max_mb: rss_max.max(rss_end) as f64 / 1024.0,
            rss_end_mb: rss_end as f64 / 1024.0,
            rss_anon_mb: status_kib(&pid, "RssAnon:")? as f64 / 1024.0,
            rss_file_mb: status_kib(&pid, "RssFile:")? as f64 / 1024.0,
            hwm_mb: status_kib(&pid, "VmHWM:")? as f64 / 1024.0,
            threads: status_kib(&pid, "Threads:")?,
            polls_per_s,
            sleep_rss_mb: 0.0,
        })
    }
    .await;
    let stopped = terminate(&mut child, &log);
    sim.stop().await;
    let mut idle = result?;
    stopped?;

    let mut sleep = Command::new("sleep").arg("60").spawn()?;
    let spid = sleep.id().to_string();
    // Measured once it has exec'd and sleeps (state S), not while it is still loading.
    let deadline = Instant::now() + Duration::from_secs(5);
    let sleeping = || -> bool {
        let exe = std::fs::read_link(format!("/proc/{spid}/exe"));
        let stat = std::fs::read_to_string(format!("/proc/{spid}/stat")).unwrap_or_default();
        exe.is_ok_and(|p| p.ends_with("sleep"))
            && stat
                .rfind(')')
                .is_some_and(|i| stat[i + 1..].trim_start().starts_with('S'))
    };
    while !sleeping() {
        ensure!(Instant::now() < deadline, "`sleep` did not start");
        std::thread::sleep(Duration::from_millis(2));
    }
    idle.sleep_rss_mb = status_kib(&spid, "VmRSS:")? as f64 / 1024.0;
    let _ = sleep.kill();
    let _ = sleep.wait();
    Ok(idle)
}

struct Sizes {
    built: u64,
    stripped: u64,
    package: Option<(String, u64)>,
}

fn bench_size() -> Result<Sizes> {
    let bin = Path::new(env!("CARGO_BIN_EXE_unitgate"));
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("unitgate");
    std::fs::copy(bin, &copy)?;
    let st = Command::new("strip")
        .arg(&copy)
        .status()
        .context("run strip")?;
    ensure!(st.success(), "strip failed");
    // The package's binary (stripped by cargo-deb), if `cargo deb` left one.
    let debs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(&debs).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "deb")
            && let Ok(t) = e.metadata().and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(n, _)| t > *n)
        {
            newest = Some((t, p));
        }
    }
    let package = match newest {
        Some((_, deb)) => {
            let x = dir.path().join("x");
            let st = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&x)
                .status();
            match st {
                Ok(st) if st.success() => std::fs::metadata(x.join("usr/bin/unitgate"))
                    .ok()
                    .map(|m| (deb.display().to_string(), m.len())),
                _ => None,
            }
        }
        None => None,
    };
    Ok(Sizes {
        built: std::fs::metadata(bin)?.len(),
        stripped: std::fs::metadata(&copy)?.len(),
        package,
    })
}

struct Starts {
    units: usize,
    /// What was timed: `ready` (READY=1) or `status_200`.
    measured: &'static str,
    ms: Vec<f64>,
}

impl Starts {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    }
}

/// Starts the daemon `n` times on a data dir of `units` units; each time exec → ready.
async fn bench_starts(units: usize, n: usize) -> Result<Starts> {
    let data = tempfile::tempdir()?;
    seed(data.path(), units).await?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let config = data.path().join("config.toml");
    std::fs::write(&config, config_text(data.path(), &listen, ""))?;
    let log = data.path().join("unitgate.log");
    let sock_path = data.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let http = reqwest::Client::new();
    let status_url = format!("http://{listen}/v1/status");
    let mut measured = "ready";
    let mut ms = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let mut child = spawn(&config, Some(&sock_path), &log)?;
        let deadline = t0 + READY_WITHIN;
        let ready = loop {
            if measured == "ready" {
                let mut buf = [0u8; 4096];
                match sock.recv(&mut buf) {
                    Ok(len) => {
                        let msg = String::from_utf8_lossy(&buf[..len]);
                        if msg.lines().any(|l| l == "READY=1") {
                            break Some(t0.elapsed());
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e.into()),
                }
            } else if let Ok(r) = http.get(&status_url).bearer_auth(TOKEN).send().await
                && r.status() == 200
            {
                break Some(t0.elapsed());
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "the daemon exited {st} while starting; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                break None;
            }
        };
        match ready {
            Some(d) => {
                // READY means the API listens: it answers at once, from the seeded replica.
                let r = http.get(&status_url).bearer_auth(TOKEN).send().await?;
                ensure!(
                    r.status() == 200,
                    "GET /v1/status after ready: {}",
                    r.status()
                );
                let st: Value = r.json().await?;
                ensure!(
                    st["last_seq"].as_u64().is_some_and(|n| n >= units as u64),
                    "the replica lacks the {units} seeded units: {st}"
                );
                ms.push(d.as_secs_f64() * 1000.0);
                terminate(&mut child, &log)?;
            }
            None if i == 0 && measured == "ready" => {
                // No sd_notify in this build: time the API's first answer instead.
                terminate(&mut child, &log)?;
                measured = "status_200";
                let t0 = Instant::now();
                let mut child = spawn(&config, None, &log)?;
                let deadline = t0 + READY_WITHIN;
                loop {
                    if let Ok(r) = http.get(&status_url).bearer_auth(TOKEN).send().await
                        && r.status() == 200
                    {
                        break;
                    }
                    ensure!(Instant::now() < deadline, "no answer from {status_url}");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                terminate(&mut child, &log)?;
            }
            None => {
                let _ = child.kill();
                bail!("start {i} ({units} units) not ready within {READY_WITHIN:?}");
            }
        }
    }
    Ok(Starts {
        units,
        measured,
        ms,
    })
}

fn main() -> Result<()> {
    let s = Settings::from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let idle = rt.block_on(bench_idle(&s))?;
    let size = bench_size()?;
    let cold = rt.block_on(bench_starts(s.units, s.starts))?;
    let empty = rt.block_on(bench_starts(0, s.starts))?;
    let total_s = started.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);

    println!(
        "unitgate footprint benchmark ({cores} cores; {total_s:.1} s; BENCH_FOOTPRINT_WINDOW_S={} SETTLE_S={} STARTS={} UNITS={})",
        s.window_s, s.settle_s, s.starts, s.units
    );
    println!();
    let rss_pass = idle.rss_max_mb <= TARGET_RSS_MB;
    let cpu_pass = idle.cpu_pct <= TARGET_CPU_PCT;
    println!("Daemon: {}", binary().display());
    println!();
    println!(
        "Idle `unitgate run`: {KEYPADS} OSDP keypads (secure channel, pty), Modbus TCP + RTU boards, lock API on hw-sim; {IDLE_UNITS} units"
    );
    println!(
        "  all devices online after exec     {:>8.2} s; then {} s settle, {:.1} s window",
        idle.online_s, s.settle_s, idle.window_s
    );
    println!(
        "  keypad polls/s (hw-sim counters)  {}",
        idle.polls_per_s
            .iter()
            .map(|p| format!("{p:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!(
        "  CPU, % of one core                {:>8.2}   target <= {TARGET_CPU_PCT:.0} {}",
        idle.cpu_pct,
        verdict(cpu_pass)
    );
    println!(
        "  RSS max in window (VmRSS)         {:>8.1} MB  target <= {TARGET_RSS_MB:.0} {}",
        idle.rss_max_mb,
        verdict(rss_pass)
    );
    println!(
        "  RSS at end / peak since exec      {:>8.1} / {:.1} MB (VmHWM); {} threads",
        idle.rss_end_mb, idle.hwm_mb, idle.threads
    );
    println!(
        "  RSS at end: anonymous / file      {:>8.1} / {:.1} MB (file: the binary's and libraries' pages, shared and reclaimable)",
        idle.rss_anon_mb, idle.rss_file_mb
    );
    println!(
        "  baseline: hw-sim (this process)   {:>8.2} % CPU",
        idle.sim_cpu_pct
    );
    println!(
        "  baseline: idle `sleep` RSS        {:>8.1} MB",
        idle.sleep_rss_mb
    );
    println!();
    println!("Binary size (x86_64)");
    println!(
        "  as built (release, default features)        {:>8.1} MiB",
        mib(size.built)
    );
    println!(
        "  stripped                                    {:>8.1} MiB",
        mib(size.stripped)
    );
    match &size.package {
        Some((deb, b)) => println!(
            "  package binary (no default features, stripped) {:>5.1} MiB  ({deb})",
            mib(*b)
        ),
        None => println!(
            "  package binary: no target/debian/*.deb (run `cargo deb --profile dist` first)"
        ),
    }
    println!();
    let ready_pass = cold.pct(0.5) <= TARGET_READY_MS;
    let what = |m: &str| {
        if m == "ready" {
            "exec -> READY=1"
        } else {
            "exec -> first 200 from GET /v1/status (no READY received)"
        }
    };
    println!("Cold start, {} starts each", s.starts);
    println!(
        "  {:<52} {:>8} {:>8} {:>8}",
        "what", "p50 ms", "min ms", "max ms"
    );
    for (x, pass) in [(&cold, Some(ready_pass)), (&empty, None)] {
        println!(
            "  {:<52} {:>8.1} {:>8.1} {:>8.1}{}",
            format!("{} units: {}", x.units, what(x.measured)),
            x.pct(0.5),
            x.pct(0.0),
            x.pct(1.0),
            pass.map_or(String::new(), |p| format!(
                "  target <= {TARGET_READY_MS:.0} {}",
                verdict(p)
            ))
        );
    }
    println!();
    let starts = |x: &Starts| {
        json!({
            "units": x.units, "measured": x.measured, "n": x.ms.len(),
            "p50_ms": round1(x.pct(0.5)), "min_ms": round1(x.pct(0.0)),
            "max_ms": round1(x.pct(1.0)),
            "all_ms": x.ms.iter().map(|v| round1(*v)).collect::<Vec<_>>(),
        })
    };
    let report = json!({
        "bench": "footprint",
        "binary": binary().display().to_string(),
        "cores": cores,
        "seconds": round3(total_s),
        "settings": {"window_s": s.window_s, "settle_s": s.settle_s, "starts": s.starts,
                     "units": s.units, "keypads": KEYPADS, "idle_units": IDLE_UNITS},
        "idle": {
            "online_s": round3(idle.online_s),
            "window_s": round3(idle.window_s),
            "cpu_pct": round3(idle.cpu_pct),
            "rss_max_mb": round1(idle.rss_max_mb),
            "rss_end_mb": round1(idle.rss_end_mb),
            "rss_anon_mb": round1(idle.rss_anon_mb),
            "rss_file_mb": round1(idle.rss_file_mb),
            "hwm_mb": round1(idle.hwm_mb),
            "threads": idle.threads,
            "keypad_polls_per_s": idle.polls_per_s.iter().map(|p| round1(*p)).collect::<Vec<_>>(),
            "baseline_hw_sim_cpu_pct": round3(idle.sim_cpu_pct),
            "baseline_sleep_rss_mb": round1(idle.sleep_rss_mb),
        },
        "size": {
            "built_bytes": size.built,
            "stripped_bytes": size.stripped,
            "package_binary_bytes": size.package.as_ref().map(|(_, b)| *b),
        },
        "cold_start": starts(&cold),
        "cold_start_baseline": starts(&empty),
        "targets": [
            {"name": "idle_rss_max_mb", "value": round1(idle.rss_max_mb),
             "target": TARGET_RSS_MB, "pass": rss_pass},
            {"name": "idle_cpu_pct", "value": round3(idle.cpu_pct),
             "target": TARGET_CPU_PCT, "pass": cpu_pass},
            {"name": "cold_start_p50_ms", "value": round1(cold.pct(0.5)),
             "target": TARGET_READY_MS, "pass": ready_pass, "measured": cold.measured},
        ],
    });
    println!("{report}");
    Ok(())
}
