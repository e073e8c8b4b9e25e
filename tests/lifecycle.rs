//! `unitgate run` as systemd runs it: the real binary with a temp config, a fake
//! NOTIFY_SOCKET the test reads, real signals. READY only once the API answers, the
//! watchdog fed, STOPPING and exit 0 at SIGTERM with nothing acknowledged lost, SIGHUP
//! reloads tokens (and refuses a bad file), and a bad database is refused untouched.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use unitgate::api::http::auth::token_hash_hex;

const ADMIN: &str = "lifecycle-admin-token-0123456789";
const OTHER: &str = "lifecycle-other-token-0123456789";
const DEADLINE: Duration = Duration::from_secs(60);

fn config_text(data_dir: &Path, tokens: &[&str], extra: &str) -> String {
    let mut text = format!(
        "[site]\nid = \"site-life\"\nname = \"Lifecycle\"\ntimezone = \"Europe/London\"\n\
         [store]\ndata_dir = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\nplain_http = true\n{extra}\n",
        data_dir.display()
    );
    for (i, t) in tokens.iter().enumerate() {
        text.push_str(&format!(
            "[[api.tokens]]\nname = \"t{i}\"\nsha256 = \"{}\"\nscopes = [\"admin\"]\n",
            token_hash_hex(t)
        ));
    }
    text
}

/// A gateway process with its notify socket and its log file.
struct Daemon {
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
    /// Every notification received, in order.
    seen: Vec<String>,
}

impl Daemon {
    fn spawn(dir: &Path, config: &Path, watchdog_usec: Option<u64>) -> Daemon {
        let sock = dir.join(format!("notify-{}.sock", rand_suffix()));
        let notify = UnixDatagram::bind(&sock).expect("bind the notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = dir.join(format!("log-{}.txt", rand_suffix()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_unitgate"));
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .env_remove("UNITGATE_CONFIG")
            .env("NOTIFY_SOCKET", &sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        match watchdog_usec {
            Some(us) => cmd.env("WATCHDOG_USEC", us.to_string()),
            None => cmd.env_remove("WATCHDOG_USEC"),
        };
        cmd.env_remove("WATCHDOG_PID");
        Daemon {
            child: cmd.spawn().expect("start unitgate"),
            notify,
            log,
            seen: Vec::new(),
        }
    }

    /// Reads notifications until one contains `what`; returns that message.
    fn wait_for(&mut self, what: &str) -> String {
        let until = Instant::now() + DEADLINE;
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.lines().any(|l| l == what) {
                    return msg;
                }
            } else if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "unitgate exited ({status}) before {what}; log:\n{}",
                    self.logs()
                );
            }
        }
        panic!(
            "no {what} within {DEADLINE:?}; seen {:?}; log:\n{}",
            self.seen,
            self.logs()
        );
    }

    /// Waits for READY=1 and returns the API's base URL, read from its STATUS line.
    fn ready(&mut self) -> String {
        let msg = self.wait_for("READY=1");
        let status = msg
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .expect("STATUS= with READY=1");
        let addr = status
            .split_once(" on ")
            .and_then(|(_, rest)| rest.split(';').next())
            .expect("the listen address in STATUS");
        format!("http://{addr}")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    fn wait_exit(&mut self) -> i32 {
        let until = Instant::now() + DEADLINE;
        while Instant::now() < until {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("unitgate did not exit; log:\n{}", self.logs());
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls the log until it contains `what`.
    fn wait_log(&self, what: &str) {
        let until = Instant::now() + DEADLINE;
        while Instant::now() < until {
            if self.logs().contains(what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no {what:?} in the log:\n{}", self.logs());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn setup(tokens: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&data, tokens, "")).unwrap();
    (dir, config)
}

async fn get(client: &reqwest::Client, url: &str, token: &str) -> u16 {
    client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_after_the_api_answers_then_watchdog_then_stopping_at_sigterm() {
    let (dir, config) = setup(&[ADMIN]);
    let mut d = Daemon::spawn(dir.path(), &config, Some(400_000));
    let url = d.ready();
    assert!(
        d.seen[0].contains("READY=1"),
        "READY comes first: {:?}",
        d.seen
    );
    // The API answers as soon as READY was sent (no retry).
    let client = reqwest::Client::new();
    assert_eq!(get(&client, &format!("{url}/healthz"), ADMIN).await, 200);
    assert_eq!(get(&client, &format!("{url}/v1/status"), ADMIN).await, 200);
    // Fed at half of WATCHDOG_USEC: several pings in a couple of seconds.
    let started = Instant::now();
    for _ in 0..5 {
        d.wait_for("WATCHDOG=1");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    d.signal("TERM");
    d.wait_for("STOPPING=1");
    assert_eq!(d.wait_exit(), 0, "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_watchdog_pings_unless_systemd_asks() {
    let (dir, config) = setup(&[ADMIN]);
    let mut d = Daemon::spawn(dir.path(), &config, None);
    d.ready();
    d.signal("INT");
    d.wait_for("STOPPING=1");
    assert_eq!(d.wait_exit(), 0);
    assert!(
        !d.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "{:?}",
        d.seen
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_commands_in_flight_loses_nothing_acknowledged() {
    let (dir, config) = setup(&[ADMIN]);
    let mut d = Daemon::spawn(dir.path(), &config, None);
    let url = d.ready();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (client, url, acked, refused) =
            (client.clone(), url.clone(), acked.clone(), refused.clone());
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let id = format!("t-{w}-{n}");
                let r = client
                    .put(format!("{url}/v1/unit_types/{id}"))
                    .bearer_auth(ADMIN)
                    .header("Idempotency-Key", format!("k-{id}"))
                    .json(&serde_json::json!({ "name": format!("Type {id}") }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => acked.lock().unwrap().push(id),
                    // Refused or cut off: not acknowledged, so nothing is owed.
                    _ => {
                        refused.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }));
    }
    // Let the writers get going, then stop the gateway under load.
    let until = Instant::now() + DEADLINE;
    while acked.lock().unwrap().len() < 200 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_term = acked.lock().unwrap().len();
    assert!(
        before_term >= 200,
        "only {before_term} commands acknowledged"
    );
    let term = Instant::now();
    d.signal("TERM");
    for w in writers {
        w.await.unwrap();
    }
    assert!(refused.load(Ordering::SeqCst));
    assert_eq!(d.wait_exit(), 0, "{}", d.logs());
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{} acknowledged ({} after SIGTERM); exit 0 {:?} after SIGTERM",
        acked.len(),
        acked.len() - before_term,
        term.elapsed()
    );

    // Every acknowledged command is in the replica after a restart.
    let mut d = Daemon::spawn(dir.path(), &config, None);
    let url = d.ready();
    for id in &acked {
        let r = client
            .get(format!("{url}/v1/unit_types/{id}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged {id} lost");
    }
    d.signal("TERM");
    assert_eq!(d.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_swaps_tokens_and_refuses_an_invalid_file() {
    let (dir, config) = setup(&[ADMIN]);
    let data = dir.path().join("data");
    let mut d = Daemon::spawn(dir.path(), &config, None);
    let url = d.ready();
    let status = format!("{url}/v1/status");
    let client = reqwest::Client::new();
    assert_eq!(get(&client, &status, ADMIN).await, 200);
    assert_eq!(get(&client, &status, OTHER).await, 401);

    // OTHER in, ADMIN out; a new listen address is reported as needing a restart.
    let text = config_text(&data, &[OTHER], "").replace("127.0.0.1:0", "127.0.0.1:1");
    std::fs::write(&config, text).unwrap();
    d.signal("HUP");
    let until = Instant::now() + DEADLINE;
    while get(&client, &status, OTHER).await != 200 {
        assert!(Instant::now() < until, "the new token never worked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&client, &status, ADMIN).await, 401);
    d.wait_log("config reloaded");
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("config reloaded"))
        .unwrap();
    assert!(
        line.contains("api.tokens") && line.contains("api.listen"),
        "{line}"
    );
    assert!(
        !logs.contains(&token_hash_hex(OTHER)),
        "a token hash logged"
    );

    // An invalid file (and a valid token in it) changes nothing; the process lives on.
    let bad = config_text(&data, &[ADMIN], "")
        .replace("Europe/London", "Nowhere/Land")
        .replace("[api]\n", "[api]\nmax_body_bytes = 0\n");
    std::fs::write(&config, bad).unwrap();
    d.signal("HUP");
    d.wait_log("config refused");
    let refused = d.logs();
    let line = refused
        .lines()
        .find(|l| l.contains("config refused"))
        .unwrap();
    assert!(line.contains("site.timezone"), "{line}");
    assert_eq!(get(&client, &status, OTHER).await, 200);
    assert_eq!(get(&client, &status, ADMIN).await, 401);
    assert!(d.child.try_wait().unwrap().is_none(), "the gateway died");

    // Unparsable TOML is refused too.
    std::fs::write(&config, "[site\nid = ").unwrap();
    d.signal("HUP");
    let until = Instant::now() + DEADLINE;
    while d.logs().matches("config refused").count() < 2 {
        assert!(Instant::now() < until, "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&client, &status, OTHER).await, 200);
    d.signal("TERM");
    assert_eq!(d.wait_exit(), 0);
}

/// Bytes and modification time of a file.
fn fingerprint(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

/// Starts the gateway on a prepared database; it must refuse, untouched, never READY.
fn assert_refused(dir: &Path, config: &Path, db: &Path, expect: &[&str]) {
    let before = fingerprint(db);
    let mut d = Daemon::spawn(dir, config, Some(400_000));
    let code = d.wait_exit();
    let logs = d.logs();
    assert_ne!(code, 0, "{logs}");
    for e in expect {
        assert!(logs.contains(e), "no {e:?} in:\n{logs}");
    }
    assert!(logs.contains(&db.display().to_string()), "{logs}");
    assert!(fingerprint(db) == before, "the database file changed");
    let mut buf = [0u8; 1024];
    while let Ok(n) = d.notify.recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(!msg.contains("READY=1"), "READY sent: {msg}");
    }
}

#[test]
fn a_corrupt_or_truncated_database_is_refused_untouched() {
    let (dir, config) = setup(&[ADMIN]);
    let db = dir.path().join("data/unitgate.db");
    // A real replica, made by the gateway itself.
    let mut d = Daemon::spawn(dir.path(), &config, None);
    d.ready();
    d.signal("TERM");
    assert_eq!(d.wait_exit(), 0);
    let good = std::fs::read(&db).unwrap();
    assert!(good.len() > 8192, "{}", good.len());

    std::fs::write(&db, &good[..good.len() / 2]).unwrap();
    assert_refused(dir.path(), &config, &db, &["truncated", "Restore a backup"]);

    let noise: Vec<u8> = (0..good.len()).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(&db, noise).unwrap();
    assert_refused(dir.path(), &config, &db, &["not an SQLite database"]);

    // The original file works again.
    std::fs::write(&db, &good).unwrap();
    let mut d = Daemon::spawn(dir.path(), &config, None);
    d.ready();
    d.signal("TERM");
    assert_eq!(d.wait_exit(), 0);
}

#[test]
fn a_database_from_a_newer_build_is_refused_untouched() {
    let (dir, config) = setup(&[ADMIN]);
    let db = dir.path().join("data/unitgate.db");
    let mut d = Daemon::spawn(dir.path(), &config, None);
    d.ready();
    d.signal("TERM");
    assert_eq!(d.wait_exit(), 0);
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "DELETE").unwrap();
        c.pragma_update(None, "user_version", 999).unwrap();
    }
    assert_refused(
        dir.path(),
        &config,
        &db,
        &["schema version is 999", "newer unitgate"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_restarts_the_devices_with_a_new_devices_section() {
    let board = |id: &str, enabled: bool| {
        format!(
            "[[devices.relay_boards]]\nid = \"{id}\"\ntransport = \"tcp\"\naddress = \"127.0.0.1:9\"\ncoils = 8\ninputs = 8\nenabled = {enabled}\n"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&data, &[ADMIN], &board("rb1", false))).unwrap();
    let mut d = Daemon::spawn(dir.path(), &config, None);
    let url = d.ready();
    let client = reqwest::Client::new();
    let devices = || async {
        let v: serde_json::Value = client
            .get(format!("{url}/v1/devices"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(devices().await, ["rb1"]);
    let two = format!("{}{}", board("rb1", false), board("rb2", true));
    std::fs::write(&config, config_text(&data, &[ADMIN], &two)).unwrap();
    d.signal("HUP");
    let until = Instant::now() + DEADLINE;
    while devices().await != ["rb1", "rb2"] {
        assert!(Instant::now() < until, "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.wait_log("config reloaded");
    // A board that does not exist on the bus is reported, not fatal.
    assert!(d.child.try_wait().unwrap().is_none());
    d.signal("TERM");
    assert_eq!(d.wait_exit(), 0, "{}", d.logs());
}
