//! The real `unitgate run` binary as a child process: readiness over its own
//! `NOTIFY_SOCKET`, its stderr in a log file, its exit (status or signal) observed, killed
//! and reaped when dropped so a failing test leaves nothing behind. Plus the checks a
//! restart after a crash needs: `PRAGMA integrity_check` and a gapless event log.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::net::UnixDatagram;
use tokio::time::Instant;

/// Poll interval of every wait.
pub const POLL: Duration = Duration::from_millis(20);

/// A running (or exited) gateway process.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its `NOTIFY_SOCKET`.
    pub notify: UnixDatagram,
    /// Its stderr.
    pub log: PathBuf,
    /// When it was spawned.
    pub started: Instant,
    exited: Option<ExitStatus>,
}

impl Daemon {
    /// Spawns `unitgate run --config <config>` with `env` added; the notify socket and the
    /// log go to `dir` under `tag`.
    pub fn spawn(config: &Path, dir: &Path, tag: &str, env: &[(&str, &str)]) -> Daemon {
        let sock = dir.join(format!("notify-{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let notify = UnixDatagram::bind(&sock).expect("bind the notify socket");
        let log = dir.join(format!("unitgate-{tag}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_unitgate"));
        cmd.args(["run", "--config"])
            .arg(config)
            .env_remove("UNITGATE_CONFIG")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("FAILPOINTS")
            .env("NOTIFY_SOCKET", &sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Daemon {
            child: cmd.spawn().expect("unitgate starts"),
            notify,
            log,
            started: Instant::now(),
            exited: None,
        }
    }

    /// Its stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// READY=1 (Ok with the API's base URL, read from the STATUS line) or the process
    /// exiting first (Err with its status), within `within`.
    pub async fn ready_or_exit(&mut self, within: Duration) -> Result<String, ExitStatus> {
        let until = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(Ok(n)) = tokio::time::timeout(POLL, self.notify.recv(&mut buf)).await {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == "READY=1") {
                    let addr = msg
                        .lines()
                        .find_map(|l| l.strip_prefix("STATUS="))
                        .and_then(|s| s.split_once(" on "))
                        .and_then(|(_, rest)| rest.split(';').next())
                        .expect("the listen address in STATUS");
                    return Ok(format!("http://{addr}"));
                }
                continue;
            }
            if let Some(status) = self.try_exit() {
                return Err(status);
            }
            assert!(
                Instant::now() < until,
                "neither READY nor an exit within {within:?}; log:\n{}",
                self.log_text()
            );
        }
    }

    /// READY=1 within `within`, or a panic with the log.
    pub async fn ready(&mut self, within: Duration) -> String {
        match self.ready_or_exit(within).await {
            Ok(base) => base,
            Err(status) => panic!(
                "unitgate exited ({status}) before READY; log:\n{}",
                self.log_text()
            ),
        }
    }

    /// Waits for the process to exit on its own within `within`; None if it still runs.
    pub async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(POLL).await; // poll interval
        }
    }

    /// SIGTERM, then waits for the exit (a graceful stop); panics past `within`.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        if self.try_exit().is_none() {
            let ok = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status()
                .expect("kill")
                .success();
            assert!(ok, "kill -TERM");
        }
        match self.exit_within(within).await {
            Some(s) => s,
            None => panic!(
                "unitgate did not stop within {within:?}; log:\n{}",
                self.log_text()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The signal that ended the process, if one did.
pub fn signal_of(status: ExitStatus) -> Option<i32> {
    status.signal()
}

/// `PRAGMA integrity_check` on the replica, read-only.
pub fn integrity_check(db: &Path, ctx: &str) {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the replica read-only");
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(verdict, "ok", "{ctx}: PRAGMA integrity_check");
}

/// A GET with a bearer token that must answer 200; its JSON.
pub async fn get_json(http: &reqwest::Client, base: &str, token: &str, path: &str) -> Value {
    let res = http
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status().as_u16(), 200, "GET {path}");
    res.json().await.expect("JSON")
}

/// The whole event log from seq 0, checking that each seq follows the one before; returns
/// the events and a count per type.
pub async fn events_gapless(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    ctx: &str,
) -> (Vec<Value>, BTreeMap<String, i64>) {
    let mut types = BTreeMap::new();
    let (all, _) = events_gapless_after(http, base, token, 0, &mut types, ctx).await;
    (all, types)
}

/// The events after seq `after`, checking that each seq follows the one before and adding
/// each to its type's count in `types`; returns those events and the new end of the log.
pub async fn events_gapless_after(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    mut after: i64,
    types: &mut BTreeMap<String, i64>,
    ctx: &str,
) -> (Vec<Value>, i64) {
    let mut read = Vec::new();
    loop {
        let page = get_json(
            http,
            base,
            token,
            &format!("/v1/events?after={after}&limit=1000"),
        )
        .await;
        let evs = page["events"].as_array().cloned().unwrap_or_default();
        if evs.is_empty() {
            return (read, after);
        }
        for e in evs {
            let seq = e["seq"].as_i64().expect("seq");
            assert_eq!(seq, after + 1, "{ctx}: event seq gap after {after}: {e}");
            after = seq;
            *types
                .entry(e["type"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
            read.push(e);
        }
    }
}
