//! `hw-sim ctl`: the control API (DESIGN.md §5) as a command line for technicians.
//!
//! Human-readable output by default, `--json` for the API's raw JSON. Exit codes: 0 done,
//! 1 the API refused or could not be reached (the message is printed), 2 usage error.

use clap::{Args, Subcommand, ValueEnum};
use hw_sim::fault::FaultKind;
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

/// `hw-sim ctl [--url URL] [--json] <command>`.
#[derive(Args)]
pub struct CtlArgs {
    /// Control API base URL.
    #[arg(
        long,
        env = "HW_SIM_URL",
        default_value = "http://127.0.0.1:9900",
        value_parser = parse_url,
        global = true
    )]
    url: Url,
    /// Print the API's raw JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// List the devices with their addresses and active faults.
    Devices,
    /// Press keys on a keypad (`0-9`, `*`, `#`), e.g. `press gate-1 1234#`.
    Press {
        /// Keypad id.
        keypad: String,
        /// Keys, in order.
        keys: String,
    },
    /// Show a keypad's LED, buzzer and text.
    Keypad {
        /// Keypad id.
        id: String,
    },
    /// Show a relay board's coils and inputs.
    Relay {
        /// Board id.
        id: String,
    },
    /// Open or close a door sensor (sets a discrete input on or off).
    Door {
        /// Board id.
        board: String,
        /// Input number (0-based).
        input: u16,
        /// `open` (input on) or `close` (input off).
        state: DoorState,
    },
    /// List the smart locks.
    Locks,
    /// Show one smart lock.
    Lock {
        /// Lock id.
        id: String,
    },
    /// Change a smart lock at the lock itself, behind the gateway's back (drift), e.g.
    /// `set-lock lock-A01 unassigned` or `set-lock lock-A01 assigned --tenant c7`.
    SetLock {
        /// Lock id.
        id: String,
        /// `unassigned`, `assigned` or `overlocked`.
        #[arg(value_parser = ["unassigned", "assigned", "overlocked"])]
        state: String,
        /// The tenant reference (assigned or overlocked).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Inject a fault on a device for a while.
    Fault {
        /// Device id.
        device: String,
        /// offline, delay, drop, corrupt, http429, http503 or slow.
        #[arg(value_parser = parse_kind)]
        kind: FaultKind,
        /// Milliseconds (delay, slow), rate 0..1 (drop, corrupt) or seconds (http429/503 Retry-After).
        #[arg(long)]
        value: Option<f64>,
        /// How long, e.g. `30s`, `500ms`, `2m`.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Duration,
    },
    /// Clear the faults of one device, or of all.
    Clear {
        /// Device id (default: every device).
        device: Option<String>,
    },
    /// List the active faults.
    Faults,
    /// Follow the observation stream (Ctrl-C to stop).
    Events {
        /// Only this device's observations.
        #[arg(long)]
        device: Option<String>,
    },
    /// A compact summary of the whole site.
    Show,
}

#[derive(Clone, Copy, ValueEnum)]
enum DoorState {
    Open,
    Close,
}

fn parse_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s).map_err(|e| format!("{s:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("{s:?}: must be an http:// URL"));
    }
    Ok(u)
}

fn parse_kind(s: &str) -> Result<FaultKind, String> {
    serde_json::from_value(json!(s)).map_err(|_| {
        let names: Vec<String> = FaultKind::ALL.iter().map(|k| kind_name(*k)).collect();
        format!("unknown fault kind {s:?} (one of {})", names.join(", "))
    })
}

fn kind_name(k: FaultKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `500ms`, `30s`, `1.5s`, `2m`, `1h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a duration like 500ms, 30s, 2m or 1h");
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'));
    let (num, unit) = s.split_at(split.ok_or_else(bad)?);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => return Err(bad()),
    };
    if !(1.0..=86_400_000.0).contains(&ms) {
        return Err(format!("{s:?}: must be between 1ms and 24h"));
    }
    Ok(Duration::from_millis(ms as u64))
}

/// Why a command failed (exit code 1).
enum Failure {
    /// The API answered with an error.
    Api(String),
    /// The API could not be reached or answered nonsense.
    Transport(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Api(m) | Failure::Transport(m) => f.write_str(m),
        }
    }
}

/// A control API client.
struct Control {
    http: reqwest::Client,
    base: Url,
}

impl Control {
    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().extend(segments);
        }
        u
    }

    fn unreachable(&self, e: reqwest::Error) -> Failure {
        let mut m = format!("cannot reach the control API at {}: {e}", self.base);
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let _ = write!(m, ": {s}");
            source = s.source();
        }
        Failure::Transport(m)
    }

    async fn call(&self, method: Method, url: Url, body: Option<Value>) -> Result<Value, Failure> {
        let mut req = self
            .http
            .request(method, url)
            .timeout(Duration::from_secs(10));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(api_error(status, &text));
        }
        serde_json::from_str(&text)
            .map_err(|e| Failure::Transport(format!("the control API answered non-JSON: {e}")))
    }

    async fn get(&self, segments: &[&str]) -> Result<Value, Failure> {
        self.call(Method::GET, self.url(segments), None).await
    }
}

fn api_error(status: StatusCode, body: &str) -> Failure {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.trim().to_owned());
    Failure::Api(format!("{message} (HTTP {})", status.as_u16()))
}

/// Runs one `ctl` command; returns the process exit code.
pub async fn run(args: CtlArgs) -> ExitCode {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let ctl = Control {
        http,
        base: args.url,
    };
    let result = match args.cmd {
        CtlCmd::Events { device } => events(&ctl, device.as_deref(), args.json).await,
        cmd => command(&ctl, cmd, args.json).await.map(|out| {
            // A closed pipe (`| head`) is not worth a panic.
            let _ = std::io::stdout().write_all(out.as_bytes());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Runs a command that answers once; returns what to print.
async fn command(ctl: &Control, cmd: CtlCmd, raw: bool) -> Result<String, Failure> {
    let v = match &cmd {
        CtlCmd::Devices => ctl.get(&["devices"]).await?,
        CtlCmd::Press { keypad, keys } => {
            let u = ctl.url(&["keypads", keypad, "keys"]);
            ctl.call(Method::POST, u, Some(json!({"keys": keys})))
                .await?
        }
        CtlCmd::Keypad { id } => ctl.get(&["keypads", id]).await?,
        CtlCmd::Relay { id } => ctl.get(&["relays", id]).await?,
        CtlCmd::Door {
            board,
            input,
            state,
        } => {
            let u = ctl.url(&["relays", board, "inputs", &input.to_string()]);
            let on = matches!(state, DoorState::Open);
            ctl.call(Method::POST, u, Some(json!({"on": on}))).await?
        }
        CtlCmd::Locks => ctl.get(&["locks"]).await?,
        CtlCmd::Lock { id } => ctl.get(&["locks", id]).await?,
        CtlCmd::SetLock { id, state, tenant } => {
            let body = json!({"state": state, "assigned_to": tenant});
            ctl.call(Method::PUT, ctl.url(&["locks", id]), Some(body))
                .await?
        }
        CtlCmd::Fault {
            device,
            kind,
            value,
            duration,
        } => {
            let body = json!({
                "device": device,
                "kind": kind,
                "value": value,
                "duration_ms": duration.as_millis() as u64,
            });
            ctl.call(Method::POST, ctl.url(&["faults"]), Some(body))
                .await?
        }
        CtlCmd::Clear { device } => {
            let mut u = ctl.url(&["faults"]);
            if let Some(d) = device {
                u.query_pairs_mut().append_pair("device", d);
            }
            ctl.call(Method::DELETE, u, None).await?
        }
        CtlCmd::Faults => ctl.get(&["faults"]).await?,
        CtlCmd::Show => return show(ctl, raw).await,
        CtlCmd::Events { .. } => return Ok(String::new()),
    };
    if raw {
        return Ok(pretty(&v));
    }
    Ok(match cmd {
        CtlCmd::Devices => render_devices(&v),
        CtlCmd::Press { keypad, keys } => format!("{keypad}: pressed {keys}\n"),
        CtlCmd::Keypad { id } => render_keypad(&id, &v, "", true),
        CtlCmd::Relay { id } => render_relay(&id, &v, ""),
        CtlCmd::Door {
            board,
            input,
            state,
        } => {
            let what = match state {
                DoorState::Open => "open",
                DoorState::Close => "closed",
            };
            format!(
                "{board} input {input}: {what}\n{}",
                render_relay(&board, &v, "")
            )
        }
        CtlCmd::Locks => render_locks(&v),
        CtlCmd::Lock { .. } | CtlCmd::SetLock { .. } => render_lock(&v) + "\n",
        CtlCmd::Fault { device, .. } => {
            format!("{device}: {}\n", render_faults(&v["faults"]))
        }
        CtlCmd::Clear { .. } => {
            let n = v["cleared"].as_u64().unwrap_or(0);
            format!("cleared {n} fault{}\n", if n == 1 { "" } else { "s" })
        }
        CtlCmd::Faults => render_fault_list(&v),
        CtlCmd::Show | CtlCmd::Events { .. } => String::new(),
    })
}

/// `key=value` pairs of an object, skipping `skip`, nulls and empty strings.
fn fields(v: &Value, skip: &[&str]) -> String {
    let Some(o) = v.as_object() else {
        return scalar(v);
    };
    o.iter()
        .filter(|(k, v)| {
            !skip.contains(&k.as_str())
                && !v.is_null()
                && v.as_str() != Some("")
                && **v != json!([])
        })
        .map(|(k, v)| format!("{k}={}", scalar(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() || s.contains(char::is_whitespace) => format!("{s:?}"),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::Null => "-".into(),
        Value::Array(a) if a.iter().all(Value::is_boolean) => bits(a),
        v => v.to_string(),
    }
}

/// `[true, false, ...]` as `10000000 00000000` (bit 0 first, grouped by 8).
fn bits(a: &[Value]) -> String {
    let s: Vec<String> = a
        .chunks(8)
        .map(|c| {
            c.iter()
                .map(|b| if b.as_bool() == Some(true) { '1' } else { '0' })
                .collect()
        })
        .collect();
    s.join(" ")
}

fn render_faults(faults: &Value) -> String {
    let list = faults.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return "no faults".into();
    }
    list.iter()
        .map(|f| {
            let mut s = f["kind"].as_str().unwrap_or("?").to_owned();
            if let Some(v) = f["value"].as_f64() {
                let _ = write!(s, "={v}");
            }
            let left = f["remaining_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
            let _ = write!(s, " ({left:.1}s left)");
            s
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn render_fault_list(v: &Value) -> String {
    let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
    if list.is_empty() {
        return "no active faults\n".into();
    }
    list.iter()
        .map(|d| {
            format!(
                "{}: {}\n",
                d["device"].as_str().unwrap_or("?"),
                render_faults(&d["faults"])
            )
        })
        .collect()
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn render_devices(v: &Value) -> String {
    let mut rows = vec![vec![
        "ID".to_owned(),
        "KIND".into(),
        "ADDRESS".into(),
        "FAULTS".into(),
    ]];
    for d in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let faults = d["faults"].as_array().map_or(0, Vec::len);
        rows.push(vec![
            d["id"].as_str().unwrap_or("?").to_owned(),
            d["kind"].as_str().unwrap_or("?").to_owned(),
            fields(&d["address"], &[]),
            if faults == 0 {
                "-".into()
            } else {
                render_faults(&d["faults"])
            },
        ]);
    }
    table(&rows)
}

/// What a technician looks at first on a keypad, in this order.
const KEYPAD_FIRST: [&str; 5] = ["led", "buzzer", "text", "online", "secure"];

/// `id  led=.. buzzer=.. text=".." online=.. secure=..`; `full` adds the other fields, one
/// line per nested object (counters and the like).
fn render_keypad(id: &str, v: &Value, indent: &str, full: bool) -> String {
    let first: Vec<String> = KEYPAD_FIRST
        .iter()
        .filter_map(|k| v.get(*k).map(|x| format!("{k}={}", scalar(x))))
        .collect();
    let mut out = format!("{indent}{id:<12} {}\n", first.join(" "));
    if !full {
        return out;
    }
    let Some(o) = v.as_object() else { return out };
    let mut skip: Vec<&str> = KEYPAD_FIRST.to_vec();
    skip.push("id");
    skip.extend(
        o.iter()
            .filter(|(_, x)| x.is_object())
            .map(|(k, _)| k.as_str()),
    );
    let rest = fields(v, &skip);
    if !rest.is_empty() {
        let _ = writeln!(out, "{indent}  {rest}");
    }
    for (k, x) in o.iter().filter(|(_, x)| x.is_object()) {
        let _ = writeln!(out, "{indent}  {k}: {}", fields(x, &[]));
    }
    out
}

fn render_relay(id: &str, v: &Value, indent: &str) -> String {
    let count = |k: &str| v[k].as_array().map_or(0, Vec::len);
    let mut out = format!("{indent}{id}");
    let rest = fields(v, &["id", "coils", "inputs"]);
    if !rest.is_empty() {
        let _ = write!(out, "  {rest}");
    }
    out.push('\n');
    for k in ["coils", "inputs"] {
        let _ = writeln!(out, "{indent}  {k:<6} ({:>3})  {}", count(k), scalar(&v[k]));
    }
    out
}

fn render_lock(l: &Value) -> String {
    let id = l["id"].as_str().unwrap_or("?");
    let state = l["state"].as_str().unwrap_or("?");
    match l["assigned_to"].as_str() {
        Some(t) if state == "assigned" => format!("{id}: assigned to {t}"),
        Some(t) => format!("{id}: {state} (tenant {t})"),
        None => format!("{id}: {state}"),
    }
}

fn lock_counts(v: &Value) -> String {
    let list = v.as_array().map(Vec::as_slice).unwrap_or_default();
    let n = |s: &str| list.iter().filter(|l| l["state"] == s).count();
    format!(
        "{} locks: {} assigned, {} overlocked, {} unassigned",
        list.len(),
        n("assigned"),
        n("overlocked"),
        n("unassigned")
    )
}

fn render_locks(v: &Value) -> String {
    let mut rows = vec![vec!["ID".to_owned(), "STATE".into(), "ASSIGNED_TO".into()]];
    for l in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        rows.push(vec![
            l["id"].as_str().unwrap_or("?").to_owned(),
            l["state"].as_str().unwrap_or("?").to_owned(),
            l["assigned_to"].as_str().unwrap_or("-").to_owned(),
        ]);
    }
    table(&rows) + &lock_counts(v) + "\n"
}

/// The whole site. Shows what it can; fails (exit 1) if any part could not be read.
async fn show(ctl: &Control, raw: bool) -> Result<String, Failure> {
    let devices = ctl.get(&["devices"]).await?;
    let faults = ctl.get(&["faults"]).await?;
    let mut failed = Vec::new();
    let mut out = String::new();
    let mut by_kind: serde_json::Map<String, Value> = serde_json::Map::new();
    let _ = writeln!(out, "site at {}", ctl.base);
    for (kind, title, path) in [
        ("keypad", "keypads", "keypads"),
        ("relay_board", "relay boards", "relays"),
        ("lock_api", "locks", "locks"),
    ] {
        let list: Vec<&Value> = devices
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}:");
        let mut states = serde_json::Map::new();
        for d in list {
            let id = d["id"].as_str().unwrap_or("?");
            let segments: &[&str] = if kind == "lock_api" {
                &[path]
            } else {
                &[path, id]
            };
            match ctl.get(segments).await {
                Ok(v) => {
                    let line = match kind {
                        "keypad" => render_keypad(id, &v, "  ", false),
                        "relay_board" => render_relay(id, &v, "  "),
                        _ => format!(
                            "  {id:<12} {}  ({})\n",
                            lock_counts(&v),
                            d["address"]["url"].as_str().unwrap_or("?")
                        ),
                    };
                    out.push_str(&line);
                    states.insert(id.to_owned(), v);
                }
                Err(e) => {
                    let _ = writeln!(out, "  {id:<12} error: {e}");
                    failed.push(format!("{id}: {e}"));
                }
            }
        }
        by_kind.insert(path.to_owned(), Value::Object(states));
    }
    let fault_lines = render_fault_list(&faults);
    if fault_lines == "no active faults\n" {
        out.push_str("faults: none\n");
    } else {
        out.push_str("faults:\n");
        for l in fault_lines.lines() {
            let _ = writeln!(out, "  {l}");
        }
    }
    if raw {
        out = pretty(&json!({
            "devices": devices,
            "keypads": by_kind.remove("keypads").unwrap_or(json!({})),
            "relays": by_kind.remove("relays").unwrap_or(json!({})),
            "locks": by_kind.remove("locks").unwrap_or(json!({})),
            "faults": faults,
        }));
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        let _ = std::io::stdout().write_all(out.as_bytes());
        Err(Failure::Api(format!(
            "some devices could not be read: {}",
            failed.join("; ")
        )))
    }
}

/// Follows `GET /events`, one line per observation, until the stream ends or stdout closes.
async fn events(ctl: &Control, device: Option<&str>, raw: bool) -> Result<(), Failure> {
    if let Some(d) = device {
        let devices = ctl.get(&["devices"]).await?;
        let known = devices
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["id"] == d));
        if !known {
            return Err(Failure::Api(format!("no device {d:?}")));
        }
    }
    let mut u = ctl.url(&["events"]);
    if let Some(d) = device {
        u.query_pairs_mut().append_pair("device", d);
    }
    let mut resp = ctl
        .http
        .get(u)
        .send()
        .await
        .map_err(|e| ctl.unreachable(e))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(api_error(status, &text));
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout();
    loop {
        let chunk = resp.chunk().await.map_err(|e| ctl.unreachable(e))?;
        let Some(chunk) = chunk else {
            return Err(Failure::Transport(
                "the control API closed the event stream".into(),
            ));
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            let out = if raw {
                Some(text.to_owned())
            } else {
                render_event(text)
            };
            if let Some(out) = out
                && writeln!(stdout, "{out}").is_err()
            {
                return Ok(());
            }
        }
    }
}

/// `   12.345678s  device  kind  k=v ...`; the stream's opening `subscribed` line goes to stderr.
fn render_event(line: &str) -> Option<String> {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Some(line.to_owned());
    };
    if v["kind"] == "subscribed" {
        eprintln!("following events (Ctrl-C to stop)");
        return None;
    }
    let t = v["t_ns"].as_u64().unwrap_or(0) as f64 / 1e9;
    Some(format!(
        "{t:>14.6}s  {:<12} {:<20} {}",
        v["device"].as_str().unwrap_or("?"),
        v["kind"].as_str().unwrap_or("?"),
        fields(&v["data"], &[])
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "30", "s", "3x", "-1s", "0s", "25h", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bit_strings_and_fields() {
        let v = json!([true, false, false, false, false, false, false, false, true]);
        assert_eq!(scalar(&v), "10000000 1");
        // Keys already sorted: the order holds with or without serde_json's preserve_order.
        let k =
            json!({"buzzer": false, "id": "gate-1", "led": "green", "text": "Wel come", "x": ""});
        assert_eq!(fields(&k, &["id"]), "buzzer=no led=green text=\"Wel come\"");
    }
}
