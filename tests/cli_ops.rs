//! The operator's commands against the real `unitgate run` binary: `status` over the
//! control socket (running, stopped, killed), `backup` under a continuous write load (a
//! consistent cut), `restore` into a stopped daemon (and refused while it runs), `migrate`.

use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

const TOKEN: &str = "ops-test-admin-token-0123456789";
const SITE: &str = "site-ops";
const UNITS: usize = 12;

/// What a `unitgate` command said.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn unitgate(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_unitgate"))
        .args(args)
        .env_remove("UNITGATE_CONFIG")
        .output()
        .await
        .expect("run unitgate");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A site directory: config, data dir and control socket, for a daemon started and stopped
/// as the test needs.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    /// `extra` is appended to the config (e.g. a `[cloud.mqtt]` section).
    fn new(extra: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[site]
id = "{SITE}"
name = "Ops Site"
timezone = "Europe/London"
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
[[devices.relay_boards]]
id = "relay-1"
transport = "tcp"
address = "127.0.0.1:9"
coils = 16
inputs = 16
enabled = false
{extra}
"#,
            data = dir.path().join("data").display(),
            sock = dir.path().join("ctl.sock").display(),
            hash = unitgate::api::http::auth::token_hash_hex(TOKEN),
        );
        std::fs::write(dir.path().join("config.toml"), text).unwrap();
        Site { dir }
    }

    fn config(&self) -> String {
        self.dir.path().join("config.toml").display().to_string()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("data/unitgate.db")
    }

    /// Starts `unitgate run` and waits (polling, with a deadline) until its API listens.
    async fn start(&self) -> Daemon {
        let log = self.dir.path().join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_unitgate"))
            .args(["run", "--config", &self.config()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("unitgate starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        let base = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = listening_addr(&text) {
                break format!("http://{addr}");
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never listened; its log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
        };
        let http = reqwest::Client::new();
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the API never answered");
            tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
        }
        Daemon {
            child,
            base,
            http,
            log,
        }
    }
}

/// The `IP:PORT` of the "API listening" log line, whatever the log format.
fn listening_addr(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("API listening"))?;
    let at = line.find("127.0.0.1:")?;
    let rest = &line[at + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!port.is_empty()).then(|| format!("127.0.0.1:{port}"))
}

struct Daemon {
    child: Child,
    base: String,
    http: reqwest::Client,
    log: PathBuf,
}

impl Daemon {
    async fn call(&self, method: reqwest::Method, path: &str, body: Value, key: &str) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .json(&body);
        if !key.is_empty() {
            req = req.header("Idempotency-Key", key);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        assert!(status < 300, "{path}: {status} {body}");
        body
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, Value::Null, "").await
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(st.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the daemon stops within 30 s")
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// SIGKILL: no cleanup at all.
    async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// A unit type, `UNITS` units `u1..`, a contact with a started tenancy `t-started`
    /// and a future one `t-future`.
    async fn seed(&self) {
        use reqwest::Method;
        self.call(
            Method::PUT,
            "/v1/unit_types/small",
            json!({"name": "Small"}),
            "",
        )
        .await;
        let units: Vec<Value> = (1..=UNITS)
            .map(|i| {
                json!({
                    "id": format!("u{i}"), "name": format!("U{i:03}"), "unit_type": "small",
                    "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 4,
                    "door_type": "roll_up", "access_type": "indoor", "standard_rate": 50.0,
                    "walk_thru_order": i,
                })
            })
            .collect();
        self.call(
            Method::POST,
            "/v1/units/bulk_create",
            json!({ "units": units }),
            "",
        )
        .await;
        self.call(
            Method::PUT,
            "/v1/contacts/c1",
            json!({"name": "Tenant"}),
            "",
        )
        .await;
        for (id, start) in [("t-started", "2020-01-01"), ("t-future", "2099-01-01")] {
            self.call(
                Method::PUT,
                &format!("/v1/tenancies/{id}"),
                json!({"contact_id": "c1", "start_date": start}),
                "",
            )
            .await;
        }
    }
}

/// What a replica file holds, as far as these tests look.
struct Replica {
    /// Each unit's status.
    units: BTreeMap<String, String>,
    /// Every event's seq, in order.
    seqs: Vec<i64>,
    /// (unit, status it went to) of every unit transition event, in seq order.
    transitions: Vec<(String, String)>,
}

fn read_replica(db: &Path) -> Replica {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let units = c
        .prepare("SELECT id, status FROM units")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut seqs = Vec::new();
    let mut transitions = Vec::new();
    let mut st = c
        .prepare("SELECT seq, data FROM events ORDER BY seq")
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .unwrap();
    for row in rows {
        let (seq, data) = row.unwrap();
        seqs.push(seq);
        let data: Value = serde_json::from_str(&data).unwrap();
        if let (Some(unit), Some(to)) = (data["unit_id"].as_str(), data["to"].as_str()) {
            transitions.push((unit.to_owned(), to.to_owned()));
        }
    }
    Replica {
        units,
        seqs,
        transitions,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_site_links_backlog_and_devices_and_says_when_nothing_runs() {
    // An MQTT broker address where nothing listens: the link stays disconnected.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let site = Site::new(&format!(
        "[cloud.mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nreconnect_max_s = 1\n"
    ));
    let daemon = site.start().await;

    // The socket is there with mode 0660, owned by the daemon's user.
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(site.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let out = unitgate(&["status", "--config", &site.config()]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    for want in [
        "site:     site-ops",
        "state:    running",
        "mqtt",
        "disconnected",
        "event backlog:",
        "relay-1",
        "disabled",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} not in:\n{}",
            out.stdout
        );
    }

    let out = unitgate(&[
        "status",
        "--socket",
        site.socket().to_str().unwrap(),
        "--json",
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("--json prints JSON");
    assert_eq!(v["status"]["site_id"], SITE);
    assert_eq!(v["status"]["link"]["mqtt"]["connected"], false);
    assert!(v["status"]["backlog"]["events"].is_i64(), "{v}");
    assert!(v["status"]["uptime_s"].is_u64(), "{v}");
    let devices = v["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["id"], "relay-1");
    assert_eq!(devices[0]["online"], false);

    // The socket serves reads only, and nothing but the operations subset.
    let raw = raw_request(&site.socket(), "POST /v1/units/u1/reserve HTTP/1.1").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    let raw = raw_request(&site.socket(), "GET /v1/units HTTP/1.1").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");

    // A clean stop removes the socket: `status` says the daemon is not running (exit 3).
    daemon.stop().await;
    assert!(!site.socket().exists(), "the socket outlived the daemon");
    let out = unitgate(&["status", "--config", &site.config()]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("not running"), "{}", out.stderr);
    assert!(out.stdout.is_empty());

    // kill -9 leaves the socket file behind: still "not running" (a stale socket), and the
    // next start replaces it.
    let daemon = site.start().await;
    daemon.kill().await;
    assert!(site.socket().exists());
    let out = unitgate(&["status", "--config", &site.config()]).await;
    assert_eq!(out.code, 3, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("stale"), "{}", out.stderr);
    let daemon = site.start().await;
    let out = unitgate(&["status", "--config", &site.config()]).await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    daemon.stop().await;
}

/// One raw HTTP/1.1 request on the control socket; the answer's text.
async fn raw_request(socket: &Path, request_line: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(
        format!("{request_line}\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_is_a_consistent_cut_and_restores() {
    let site = Site::new("");
    let daemon = Arc::new(site.start().await);
    daemon.seed().await;

    // Writers: reserve, deallocate, grant access, deallocate, round after round, on every
    // unit, each command with its own idempotency key, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (d, stop, done) = (daemon.clone(), stop.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            let mine: Vec<usize> = (1..=UNITS).filter(|u| u % 3 == w).collect();
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                for u in &mine {
                    let cycle = [
                        ("reserve", json!({"tenancy_id": "t-future"})),
                        ("deallocate", json!({})),
                        ("grant_access", json!({"tenancy_id": "t-started"})),
                        ("deallocate", json!({})),
                    ];
                    for (i, (op, body)) in cycle.into_iter().enumerate() {
                        d.call(
                            reqwest::Method::POST,
                            &format!("/v1/units/u{u}/{op}"),
                            body,
                            &format!("k-u{u}-{round}-{i}"),
                        )
                        .await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                round += 1;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the writers are stuck");
        assert!(writers.iter().all(|w| !w.is_finished()), "a writer failed");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    }
    let backup = site.dir.path().join("site.backup");
    let before = done.load(Ordering::Relaxed);
    let out = unitgate(&[
        "backup",
        backup.to_str().unwrap(),
        "--config",
        &site.config(),
    ])
    .await;
    let during = done.load(Ordering::Relaxed) - before;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("integrity ok"), "{}", out.stdout);
    assert!(during > 0, "no command completed while the backup ran");
    // Let the load go on past the backup, so the live file moved on from the cut.
    while done.load(Ordering::Relaxed) < before + during + 150 {
        assert!(Instant::now() < deadline, "the writers are stuck");
        assert!(writers.iter().all(|w| !w.is_finished()), "a writer failed");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let total = done.load(Ordering::Relaxed);
    assert!(total >= 300, "only {total} commands");

    // The backup file: intact, events gapless 1..N, and every unit's status is the one its
    // last transition event up to N says (a consistent cut, not a mix of two moments).
    let c = Connection::open_with_flags(&backup, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let check: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let last_seq: i64 = c
        .query_row("SELECT last_seq FROM site", [], |r| r.get(0))
        .unwrap();
    drop(c);
    assert!(
        !backup.with_extension("backup-wal").exists()
            && !PathBuf::from(format!("{}-wal", backup.display())).exists(),
        "the backup is one file"
    );
    assert!(
        out.stdout.contains(&format!("last event seq {last_seq}")),
        "{}",
        out.stdout
    );
    let Replica {
        units,
        seqs,
        transitions,
    } = read_replica(&backup);
    let n = seqs.len() as i64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "gapless 1..N");
    assert_eq!(n, last_seq);
    let mut implied: BTreeMap<String, String> = units
        .keys()
        .map(|u| (u.clone(), "available".to_owned()))
        .collect();
    for (unit, to) in transitions {
        implied.insert(unit, to);
    }
    assert_eq!(units, implied, "unit states match their events up to {n}");
    assert_eq!(units.len(), UNITS);
    println!(
        "backup under load: cut at seq {n}, {during} commands completed while `unitgate backup` ran, {total} in all"
    );

    // The live replica went on past the cut.
    let live = daemon.get("/v1/status").await;
    let live_seq = live["last_seq"].as_i64().unwrap();
    assert!(live_seq > last_seq, "live {live_seq} vs backup {last_seq}");

    // Restore is refused while the daemon runs, and changes nothing.
    let out = unitgate(&[
        "restore",
        backup.to_str().unwrap(),
        "--config",
        &site.config(),
    ])
    .await;
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("daemon is running") && out.stderr.contains("lock"),
        "{}",
        out.stderr
    );

    // Stopped, the backup goes back in; the daemon then serves exactly the backup's state.
    let Ok(daemon) = Arc::try_unwrap(daemon) else {
        panic!("writers still hold the daemon")
    };
    daemon.stop().await;
    let out = unitgate(&[
        "restore",
        backup.to_str().unwrap(),
        "--config",
        &site.config(),
    ])
    .await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("kept the previous replica as"),
        "{}",
        out.stdout
    );
    let kept: Vec<_> = std::fs::read_dir(site.dir.path().join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("unitgate.db.before-restore-") && !n.ends_with("-wal"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let kept_seqs = read_replica(&site.dir.path().join("data").join(&kept[0])).seqs;
    assert_eq!(
        kept_seqs.len() as i64,
        live_seq,
        "the kept replica is the live one"
    );
    assert!(!PathBuf::from(format!("{}-wal", site.db().display())).exists());

    let daemon = site.start().await;
    let status = daemon.get("/v1/status").await;
    assert_eq!(status["last_seq"], last_seq);
    for (unit, want) in &units {
        let got = daemon.get(&format!("/v1/units/{unit}")).await;
        assert_eq!(&got["unit"]["status"], want, "{unit}: {got}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_checks_the_file_and_the_site_first() {
    let site = Site::new("");
    let not_db = site.dir.path().join("junk.backup");
    std::fs::write(&not_db, b"this is not a database at all, not even close").unwrap();
    let out = unitgate(&[
        "restore",
        not_db.to_str().unwrap(),
        "--config",
        &site.config(),
    ])
    .await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("junk.backup"), "{}", out.stderr);
    assert!(!site.db().exists(), "nothing was put in place");

    // Another site's replica needs --force.
    let other = Site::new("");
    let text = std::fs::read_to_string(other.config())
        .unwrap()
        .replace("id = \"site-ops\"", "id = \"site-other\"");
    std::fs::write(other.config(), text).unwrap();
    let out = unitgate(&["migrate", "--config", &other.config()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let d = other.start().await;
    d.stop().await;
    let backup = other.dir.path().join("other.backup");
    let out = unitgate(&[
        "backup",
        backup.to_str().unwrap(),
        "--config",
        &other.config(),
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Refuses to overwrite without --force.
    let again = unitgate(&[
        "backup",
        backup.to_str().unwrap(),
        "--config",
        &other.config(),
    ])
    .await;
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);

    let out = unitgate(&[
        "restore",
        backup.to_str().unwrap(),
        "--config",
        &site.config(),
    ])
    .await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("site-other"), "{}", out.stderr);
    assert!(!site.db().exists());
    let out = unitgate(&[
        "restore",
        backup.to_str().unwrap(),
        "--config",
        &site.config(),
        "--force",
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(site.db().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_then_has_nothing_to_do_and_refuses_a_running_daemon_or_newer_file() {
    let site = Site::new("");
    let version = unitgate::store::schema::VERSION;
    let out = unitgate(&["migrate", "--config", &site.config()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("schema version 0 -> {version}")),
        "{}",
        out.stdout
    );
    let out = unitgate(&["migrate", "--config", &site.config()]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("schema version {version} (up to date)")),
        "{}",
        out.stdout
    );

    let daemon = site.start().await;
    let out = unitgate(&["migrate", "--config", &site.config()]).await;
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("daemon is running"), "{}", out.stderr);
    daemon.stop().await;

    Connection::open(site.db())
        .unwrap()
        .pragma_update(None, "user_version", version + 1)
        .unwrap();
    let before = std::fs::read(site.db()).unwrap();
    let out = unitgate(&["migrate", "--config", &site.config()]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("refusing to touch it"),
        "{}",
        out.stderr
    );
    assert_eq!(std::fs::read(site.db()).unwrap(), before);
}

#[tokio::test]
async fn check_config_names_a_bad_control_socket() {
    let site = Site::new("");
    let text = std::fs::read_to_string(site.config()).unwrap();
    let sock = site.socket().display().to_string();
    for (bad, says) in [
        ("relative/ctl.sock".to_owned(), "absolute path"),
        (format!("/tmp/{}/ctl.sock", "x".repeat(120)), "at most 107"),
    ] {
        std::fs::write(site.config(), text.replace(&sock, &bad)).unwrap();
        let out = unitgate(&["check-config", "--config", &site.config()]).await;
        assert_eq!(out.code, 1, "{bad}: {}", out.stdout);
        assert!(
            out.stderr.contains("api.control_socket:") && out.stderr.contains(says),
            "{}",
            out.stderr
        );
    }
    std::fs::write(site.config(), text.replace(&sock, "")).unwrap();
    let out = unitgate(&["check-config", "--config", &site.config()]).await;
    assert_eq!(
        out.code, 0,
        "an empty path disables the socket: {}",
        out.stderr
    );
    let out = unitgate(&["status", "--config", &site.config()]).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(out.stderr.contains("--socket"), "{}", out.stderr);
}
