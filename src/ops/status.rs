//! `unitgate status`: asks the running daemon over its control socket (plain HTTP/1.1) for
//! `GET /v1/status?detail=full` and `GET /v1/devices` (the reads the `/status` web page
//! makes), and shows them as a table or as JSON.

use super::{EXIT_NOT_RUNNING, EXIT_UNKNOWN};
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

/// How long the whole exchange with the daemon may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (a site with thousands of devices stays far below).
const MAX_ANSWER: usize = 16 << 20;
/// Access decisions the table shows (`--json` has every one the daemon sent).
const ACCESS_SHOWN: usize = 10;

/// Why the daemon's state could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No socket, or nobody answers on it.
    #[error("unitgate is not running: {0}")]
    NotRunning(String),
    /// Something is there, but the state cannot be read.
    #[error("cannot tell whether unitgate runs: {0}")]
    Unknown(String),
}

impl StatusError {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            StatusError::NotRunning(_) => EXIT_NOT_RUNNING,
            StatusError::Unknown(_) => EXIT_UNKNOWN,
        }
    }
}

/// What the daemon said: its `/v1/status` and `/v1/devices` answers, as they came.
#[derive(Debug, Clone)]
pub struct Report {
    /// `GET /v1/status?detail=full`.
    pub status: Value,
    /// `GET /v1/devices`.
    pub devices: Value,
}

impl Report {
    /// The `--json` output: `{"status": {...}, "devices": [...]}`.
    pub fn to_json(&self) -> Value {
        json!({"status": self.status, "devices": self.devices})
    }
}

/// Reads the daemon's state over the control socket at `socket`.
pub async fn fetch(socket: &Path) -> Result<Report, StatusError> {
    tokio::time::timeout(TIMEOUT, async {
        Ok(Report {
            status: get(socket, "/v1/status?detail=full").await?,
            devices: get(socket, "/v1/devices").await?,
        })
    })
    .await
    .map_err(|_| {
        StatusError::Unknown(format!(
            "{} accepted the connection but did not answer within {} s",
            socket.display(),
            TIMEOUT.as_secs()
        ))
    })?
}

async fn get(socket: &Path, path: &str) -> Result<Value, StatusError> {
    let shown = socket.display();
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StatusError::NotRunning(format!(
                "no control socket at {shown} (is the service started? `systemctl status unitgate`)"
            )),
            std::io::ErrorKind::ConnectionRefused => StatusError::NotRunning(format!(
                "nobody answers on {shown} (a stale socket: the daemon has stopped)"
            )),
            std::io::ErrorKind::PermissionDenied => StatusError::Unknown(format!(
                "permission denied on {shown}: run as root or as a member of group unitgate"
            )),
            _ => StatusError::Unknown(format!("{shown}: {e}")),
        })?;
    let unknown = |m: String| StatusError::Unknown(format!("{shown}: {m}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unknown(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| unknown(e.to_string()))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| unknown(e.to_string()))?;
    let status = res.status();
    let body = Limited::new(res.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| unknown(e.to_string()))?
        .to_bytes();
    conn.abort();
    if !status.is_success() {
        return Err(unknown(format!(
            "GET {path} answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body).map_err(|e| unknown(format!("GET {path}: not JSON: {e}")))
}

/// `1h 02m`, `3m 20s`, `12s`.
fn duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn since(v: &Value, now: DateTime<Utc>) -> String {
    match v
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => format!(
            "{} ({} ago)",
            t.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S UTC"),
            duration((now - t.with_timezone(&Utc)).num_seconds())
        ),
        None => "-".into(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Lays out rows as left-aligned columns, two spaces apart, indented by two.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::from(" ");
        for (c, cell) in r.iter().enumerate() {
            let pad = if c + 1 == r.len() { 0 } else { widths[c] };
            let _ = write!(line, " {cell:<pad$} ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// The human table: site, version, uptime, cloud links, event backlog, devices, units by
/// status and the newest access decisions.
pub fn render(report: &Report, now: DateTime<Utc>) -> String {
    let s = &report.status;
    let mut out = String::new();
    let _ = writeln!(out, "site:     {}", text(&s["site_id"]));
    let _ = writeln!(out, "version:  unitgate {}", text(&s["version"]));
    if let Some(up) = s["uptime_s"].as_i64() {
        let _ = writeln!(out, "uptime:   {}", duration(up));
    }
    let _ = writeln!(out, "state:    running");
    let _ = writeln!(out);

    let links = s["link"].as_object();
    match links {
        Some(l) if !l.is_empty() => {
            let _ = writeln!(out, "cloud links:");
            let mut rows = vec![vec![
                "LINK".to_owned(),
                "STATE".into(),
                "SINCE".into(),
                "DELIVERED SEQ".into(),
                "LAST ERROR".into(),
            ]];
            for (name, link) in l {
                let state = if link["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "disconnected"
                };
                rows.push(vec![
                    name.clone(),
                    state.into(),
                    since(&link["since"], now),
                    text(&link["delivered_seq"]),
                    text(&link["last_error"]),
                ]);
            }
            table(&mut out, &rows);
        }
        _ => {
            let _ = writeln!(out, "cloud links: none configured");
        }
    }
    let b = &s["backlog"];
    let oldest = match b["oldest_age_s"].as_i64() {
        Some(a) => format!(", oldest {} old", duration(a)),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "event backlog: {} undelivered{oldest}",
        text(&b["events"])
    );
    if let Some(seq) = s["last_seq"].as_i64() {
        let _ = writeln!(out, "last event seq: {seq}");
    }
    if !s["last_sync"].is_null() {
        let _ = writeln!(out, "last cloud sync: {}", since(&s["last_sync"], now));
    }
    let _ = writeln!(out);

    devices(&mut out, report);
    units(&mut out, s);
    access(&mut out, s, now);
    out
}

fn devices(out: &mut String, report: &Report) {
    let devices = report.devices.as_array().map(Vec::as_slice).unwrap_or(&[]);
    if devices.is_empty() {
        let _ = writeln!(out, "devices: none configured");
        return;
    }
    let online = devices
        .iter()
        .filter(|d| d["online"].as_bool() == Some(true))
        .count();
    let _ = writeln!(
        out,
        "devices: {online} online, {} not",
        devices.len() - online
    );
    let mut rows = vec![vec![
        "ID".to_owned(),
        "KIND".into(),
        "STATE".into(),
        "QUEUE".into(),
        "LAST ERROR".into(),
    ]];
    for d in devices {
        let last_error = text(&d["last_error"]);
        let state = if d["online"].as_bool() == Some(true) {
            "online"
        } else if last_error.starts_with("disabled") {
            "disabled"
        } else {
            "offline"
        };
        rows.push(vec![
            text(&d["id"]),
            text(&d["kind"]),
            state.into(),
            text(&d["queue_depth"]),
            last_error,
        ]);
    }
    table(out, &rows);
}

/// `units: 3 available, 1 occupied, ...` (absent when the daemon does not send the counts).
fn units(out: &mut String, s: &Value) {
    let Some(counts) = s["units_by_status"].as_object() else {
        return;
    };
    let total: i64 = counts.values().filter_map(Value::as_i64).sum();
    let each: Vec<String> = counts
        .iter()
        .map(|(status, n)| format!("{} {status}", text(n)))
        .collect();
    let _ = writeln!(out);
    let _ = writeln!(out, "units: {total} ({})", each.join(", "));
}

/// The newest access decisions, newest first.
fn access(out: &mut String, s: &Value, now: DateTime<Utc>) {
    let Some(list) = s["access_decisions"].as_array() else {
        return;
    };
    let _ = writeln!(out);
    if list.is_empty() {
        let _ = writeln!(out, "access decisions: none yet");
        return;
    }
    let shown = list.len().min(ACCESS_SHOWN);
    let _ = writeln!(
        out,
        "access decisions (newest {shown} of {}; --json has all):",
        list.len()
    );
    let mut rows = vec![vec![
        "TIME".to_owned(),
        "KEYPAD".into(),
        "ZONE".into(),
        "DECISION".into(),
        "REASON".into(),
    ]];
    for a in &list[..shown] {
        let granted = a["granted"].as_bool() == Some(true);
        rows.push(vec![
            since(&a["occurred_at"], now),
            text(&a["keypad"]),
            text(&a["zone"]),
            if granted { "granted" } else { "denied" }.into(),
            if granted {
                "-".into()
            } else {
                text(&a["reason"])
            },
        ]);
    }
    table(out, &rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_links_backlog_and_devices() {
        let now: DateTime<Utc> = "2026-01-01T12:00:00Z".parse().unwrap();
        let report = Report {
            status: json!({
                "site_id": "s1", "version": "0.1.0", "uptime_s": 3725, "last_seq": 42,
                "link": {"mqtt": {"connected": false, "since": "2026-01-01T11:59:00Z",
                    "last_error": "connection refused", "delivered_seq": 40}},
                "backlog": {"events": 2, "oldest_age_s": 61},
                "devices": {"online": 1, "offline": 1},
                "units_by_status": {"available": 3, "occupied": 1, "overlocked": 0},
                "access_decisions": [
                    {"seq": 41, "occurred_at": "2026-01-01T11:59:50Z", "granted": false,
                        "keypad": "gate-1", "zone": "main-gate", "reason": "invalid_code"},
                    {"seq": 40, "occurred_at": "2026-01-01T11:58:00Z", "granted": true,
                        "keypad": "gate-1", "zone": "main-gate", "reason": null}
                ]
            }),
            devices: json!([
                {"id": "relay-1", "kind": "relay_board", "online": true, "queue_depth": 0, "last_error": null},
                {"id": "gate-1", "kind": "keypad", "online": false, "queue_depth": 3,
                    "last_error": "disabled in the configuration (enabled = false)"}
            ]),
        };
        let t = render(&report, now);
        for want in [
            "site:     s1",
            "uptime:   1h 02m",
            "mqtt  disconnected  2026-01-01 11:59:00 UTC (1m 00s ago)  40",
            "connection refused",
            "event backlog: 2 undelivered, oldest 1m 01s old",
            "last event seq: 42",
            "devices: 1 online, 1 not",
            "relay-1  relay_board  online    0",
            "gate-1   keypad       disabled  3",
            "units: 4 (3 available, 1 occupied, 0 overlocked)",
            "access decisions (newest 2 of 2; --json has all):",
            "2026-01-01 11:59:50 UTC (10s ago)     gate-1  main-gate  denied    invalid_code",
            "2026-01-01 11:58:00 UTC (2m 00s ago)  gate-1  main-gate  granted   -",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        assert!(
            t.find("access decisions").unwrap() > t.find("units:").unwrap(),
            "{t}"
        );
    }

    #[test]
    fn an_older_daemon_without_the_detail_still_renders() {
        let now: DateTime<Utc> = "2026-01-01T12:00:00Z".parse().unwrap();
        let report = Report {
            status: json!({"site_id": "s1", "backlog": {"events": 0}}),
            devices: json!([]),
        };
        let t = render(&report, now);
        assert!(t.contains("devices: none configured"), "{t}");
        assert!(
            !t.contains("units:") && !t.contains("access decisions"),
            "{t}"
        );
    }
}
