//! Scenarios: timed steps a technician runs against a site (`hw-sim run FILE`), with
//! expectations on what the devices show, a readable report and exit code 0/1.
//!
//! ```toml
//! name = "A tenant opens a unit door"
//! [[steps]]
//! step = "door"              # press | door | fault | clear | wait
//! board = "relay-1"          #   | expect_keypad | expect_coil | expect_input
//! input = 3                  #   | expect_lock | expect_event | expect_fault
//! open = true
//! [[steps]]
//! step = "expect_input"
//! board = "relay-1"
//! input = 3
//! on = true
//! within_ms = 1000
//! ```
//!
//! Everything goes through the control API, so a scenario runs the same against an
//! in-process simulator, a `hw-sim serve` on the bench, or one next to a real gateway.

use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Title.
    pub name: String,
    /// What it shows (free text).
    #[serde(default)]
    pub description: String,
    /// Steps, run in order.
    pub steps: Vec<Step>,
}

fn default_within() -> u64 {
    2000
}

/// One step: an action, or an expectation polled until `within_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Press keys on a keypad.
    Press {
        /// Keypad id.
        keypad: String,
        /// Keys (`0-9`, `*`, `#`).
        keys: String,
    },
    /// Open or close a door sensor (a discrete input).
    Door {
        /// Board id.
        board: String,
        /// Input number.
        input: u16,
        /// Open (`true`) or closed.
        open: bool,
    },
    /// Inject a fault.
    Fault {
        /// Device id.
        device: String,
        /// Fault kind (offline, delay, drop, corrupt, http429, http503, slow).
        kind: String,
        /// Its value, by kind.
        #[serde(default)]
        value: Option<f64>,
        /// How long.
        for_ms: u64,
    },
    /// Clear faults (of one device, or all).
    Clear {
        /// Device id, or every device.
        #[serde(default)]
        device: Option<String>,
    },
    /// Wait.
    Wait {
        /// Milliseconds.
        ms: u64,
    },
    /// A keypad shows something.
    ExpectKeypad {
        /// Keypad id.
        keypad: String,
        /// LED colour.
        #[serde(default)]
        led: Option<String>,
        /// Text shown (substring).
        #[serde(default)]
        text: Option<String>,
        /// Buzzer on/off.
        #[serde(default)]
        buzzer: Option<bool>,
        /// Deadline.
        #[serde(default = "default_within")]
        within_ms: u64,
    },
    /// A coil is on/off.
    ExpectCoil {
        /// Board id.
        board: String,
        /// Coil number.
        coil: u16,
        /// State.
        on: bool,
        /// Deadline.
        #[serde(default = "default_within")]
        within_ms: u64,
    },
    /// An input is on/off.
    ExpectInput {
        /// Board id.
        board: String,
        /// Input number.
        input: u16,
        /// State.
        on: bool,
        /// Deadline.
        #[serde(default = "default_within")]
        within_ms: u64,
    },
    /// A lock is in a state.
    ExpectLock {
        /// Lock id.
        lock: String,
        /// `unassigned`, `assigned` or `overlocked`.
        state: String,
        /// Deadline.
        #[serde(default = "default_within")]
        within_ms: u64,
    },
    /// An observation arrives (after the last action started) whose data holds `data`.
    ExpectEvent {
        /// Device id.
        device: String,
        /// Observation kind.
        kind: String,
        /// Fields the observation's data must hold.
        #[serde(default)]
        data: Option<toml::Table>,
        /// Deadline.
        #[serde(default = "default_within")]
        within_ms: u64,
    },
    /// A fault is (or is no longer) active on a device.
    ExpectFault {
        /// Device id.
        device: String,
        /// Fault kind.
        kind: String,
        /// Active or not.
        active: bool,
        /// Deadline.
        #[serde(default = "default_within")]
        within_ms: u64,
    },
}

impl Step {
    /// Whether the step does something (rather than waiting or checking).
    pub fn is_action(&self) -> bool {
        matches!(
            self,
            Step::Press { .. } | Step::Door { .. } | Step::Fault { .. } | Step::Clear { .. }
        )
    }

    /// One line describing the step.
    pub fn describe(&self) -> String {
        match self {
            Step::Press { keypad, keys } => format!("press {keys} on {keypad}"),
            Step::Door { board, input, open } => {
                format!(
                    "{} door {board}/{input}",
                    if *open { "open" } else { "close" }
                )
            }
            Step::Fault {
                device,
                kind,
                value,
                for_ms,
            } => match value {
                Some(v) => format!("fault {device} {kind}={v} for {for_ms} ms"),
                None => format!("fault {device} {kind} for {for_ms} ms"),
            },
            Step::Clear { device } => format!(
                "clear faults of {}",
                device.as_deref().unwrap_or("every device")
            ),
            Step::Wait { ms } => format!("wait {ms} ms"),
            Step::ExpectKeypad {
                keypad,
                led,
                text,
                buzzer,
                within_ms,
            } => {
                let mut parts = Vec::new();
                if let Some(l) = led {
                    parts.push(format!("led {l}"));
                }
                if let Some(t) = text {
                    parts.push(format!("text {t:?}"));
                }
                if let Some(b) = buzzer {
                    parts.push(format!("buzzer {}", if *b { "on" } else { "off" }));
                }
                format!("expect {keypad} {} within {within_ms} ms", parts.join(", "))
            }
            Step::ExpectCoil {
                board,
                coil,
                on,
                within_ms,
            } => {
                format!(
                    "expect coil {board}/{coil} {} within {within_ms} ms",
                    onoff(*on)
                )
            }
            Step::ExpectInput {
                board,
                input,
                on,
                within_ms,
            } => {
                format!(
                    "expect input {board}/{input} {} within {within_ms} ms",
                    onoff(*on)
                )
            }
            Step::ExpectLock {
                lock,
                state,
                within_ms,
            } => format!("expect lock {lock} {state} within {within_ms} ms"),
            Step::ExpectEvent {
                device,
                kind,
                within_ms,
                ..
            } => {
                format!("expect event {kind} from {device} within {within_ms} ms")
            }
            Step::ExpectFault {
                device,
                kind,
                active,
                within_ms,
            } => format!(
                "expect fault {kind} on {device} {} within {within_ms} ms",
                if *active { "active" } else { "cleared" }
            ),
        }
    }
}

fn onoff(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// Errors loading a scenario.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ScenarioError {
    /// File.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Scenario {
    /// Reads a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let err = |message: String| ScenarioError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if s.steps.is_empty() {
            return Err(err("a scenario needs at least one step".into()));
        }
        Ok(s)
    }
}

/// The outcome of one step.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Step number (1-based).
    pub n: usize,
    /// Its description.
    pub what: String,
    /// Passed.
    pub ok: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// Why it failed (or what it saw).
    pub detail: String,
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Every step, in order.
    pub steps: Vec<StepResult>,
    /// Total time.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every step passed.
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|s| s.ok)
    }

    /// The report a technician reads.
    pub fn render(&self) -> String {
        let mut out = format!("scenario: {}\n", self.name);
        for s in &self.steps {
            out.push_str(&format!(
                "  {} {:>2}  {:<60} {:>6} ms{}\n",
                if s.ok { "ok  " } else { "FAIL" },
                s.n,
                s.what,
                s.elapsed.as_millis(),
                if s.detail.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", s.detail)
                }
            ));
        }
        let failed = self.steps.iter().filter(|s| !s.ok).count();
        out.push_str(&format!(
            "{} passed, {} failed ({:.1} s)\n",
            self.steps.len() - failed,
            failed,
            self.elapsed.as_secs_f64()
        ));
        out
    }
}

/// Observations seen since the run started, with when they arrived.
type Seen = Arc<Mutex<Vec<(Instant, Value)>>>;

struct Runner {
    http: reqwest::Client,
    base: String,
    seen: Seen,
}

impl Runner {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let res = rb.send().await.map_err(|e| format!("control API: {e}"))?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(body["error"]["message"]
                .as_str()
                .map_or_else(|| format!("control API answered {status}"), str::to_owned))
        }
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Polls `check` until it says yes or the deadline passes; the last "no" is the detail.
    async fn poll<F, Fut>(&self, within_ms: u64, mut check: F) -> Result<String, String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Result<String, String>, String>>,
    {
        let deadline = Instant::now() + Duration::from_millis(within_ms);
        loop {
            let last = match check().await {
                Ok(Ok(seen)) => return Ok(seen),
                Ok(Err(not_yet)) => not_yet,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run_step(&self, step: &Step, since: Instant) -> Result<String, String> {
        use reqwest::Method;
        match step {
            Step::Press { keypad, keys } => self
                .call(Method::POST, &format!("/keypads/{keypad}/keys"), Some(json!({"keys": keys})))
                .await
                .map(|_| String::new()),
            Step::Door { board, input, open } => self
                .call(Method::POST, &format!("/relays/{board}/inputs/{input}"), Some(json!({"on": open})))
                .await
                .map(|_| String::new()),
            Step::Fault { device, kind, value, for_ms } => self
                .call(
                    Method::POST,
                    "/faults",
                    Some(json!({"device": device, "kind": kind, "value": value, "duration_ms": for_ms})),
                )
                .await
                .map(|_| String::new()),
            Step::Clear { device } => {
                let path = match device {
                    Some(d) => format!("/faults?device={d}"),
                    None => "/faults".into(),
                };
                self.call(Method::DELETE, &path, None).await.map(|v| format!("cleared {}", v["cleared"]))
            }
            Step::Wait { ms } => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Ok(String::new())
            }
            Step::ExpectKeypad { keypad, led, text, buzzer, within_ms } => {
                self.poll(*within_ms, || async {
                    let s = self.get(&format!("/keypads/{keypad}")).await?;
                    let shown = format!("led {}, text {:?}, buzzer {}", s["led"], s["text"], s["buzzer"]);
                    let led_ok = led.as_ref().is_none_or(|l| s["led"].as_str() == Some(l.as_str()));
                    let text_ok = text
                        .as_ref()
                        .is_none_or(|t| s["text"].as_str().is_some_and(|x| x.contains(t.as_str())));
                    let buzzer_ok = buzzer.is_none_or(|b| s["buzzer"].as_bool() == Some(b));
                    Ok(if led_ok && text_ok && buzzer_ok { Ok(shown) } else { Err(shown) })
                })
                .await
            }
            Step::ExpectCoil { board, coil, on, within_ms } => {
                self.poll(*within_ms, || async {
                    let s = self.get(&format!("/relays/{board}")).await?;
                    let v = s["coils"][*coil as usize].as_bool().ok_or(format!("board {board} has no coil {coil}"))?;
                    Ok(if v == *on { Ok(String::new()) } else { Err(format!("coil {coil} is {}", onoff(v))) })
                })
                .await
            }
            Step::ExpectInput { board, input, on, within_ms } => {
                self.poll(*within_ms, || async {
                    let s = self.get(&format!("/relays/{board}")).await?;
                    let v = s["inputs"][*input as usize]
                        .as_bool()
                        .ok_or(format!("board {board} has no input {input}"))?;
                    Ok(if v == *on { Ok(String::new()) } else { Err(format!("input {input} is {}", onoff(v))) })
                })
                .await
            }
            Step::ExpectLock { lock, state, within_ms } => {
                self.poll(*within_ms, || async {
                    let s = self.get(&format!("/locks/{lock}")).await?;
                    let now = s["state"].as_str().unwrap_or("?").to_owned();
                    Ok(if now == *state { Ok(String::new()) } else { Err(format!("lock is {now}")) })
                })
                .await
            }
            Step::ExpectEvent { device, kind, data, within_ms } => {
                let want: Option<Value> = data.as_ref().and_then(|t| serde_json::to_value(t).ok());
                self.poll(*within_ms, || async {
                    let seen = self.seen.lock().map_err(|_| "observation log poisoned".to_string())?;
                    let hit = seen.iter().filter(|(at, _)| *at >= since).find(|(_, o)| {
                        o["device"] == json!(device)
                            && o["kind"] == json!(kind)
                            && want.as_ref().is_none_or(|w| contains(&o["data"], w))
                    });
                    Ok(match hit {
                        Some((_, o)) => Ok(o["data"].to_string()),
                        None => Err(format!("no {kind} from {device} yet")),
                    })
                })
                .await
            }
            Step::ExpectFault { device, kind, active, within_ms } => {
                self.poll(*within_ms, || async {
                    let devices = self.get("/devices").await?;
                    let dev = devices
                        .as_array()
                        .and_then(|a| a.iter().find(|d| d["id"] == json!(device)))
                        .ok_or(format!("no device {device}"))?;
                    let is_active = dev["faults"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|f| f["kind"] == json!(kind)));
                    Ok(if is_active == *active {
                        Ok(String::new())
                    } else {
                        Err(format!("fault {kind} is {}", if is_active { "active" } else { "not active" }))
                    })
                })
                .await
            }
        }
    }
}

/// Whether `have` holds every field of `want` (recursively for objects).
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| contains(hv, v))),
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        _ => have == want,
    }
}

/// Runs a scenario against the control API at `base` (e.g. `http://127.0.0.1:9900`).
/// Stops at the first failed step; the rest are reported as not run.
pub async fn run(scenario: &Scenario, base: &str) -> Report {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let seen: Seen = Arc::default();
    let collector = tokio::spawn(collect(http.clone(), base.to_owned(), seen.clone()));
    // Wait until the stream is live (its first line), so no observation is missed.
    let live = Instant::now() + Duration::from_secs(5);
    while seen.lock().map(|s| s.is_empty()).unwrap_or(false)
        && Instant::now() < live
        && !collector.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let runner = Runner {
        http,
        base: base.trim_end_matches('/').to_owned(),
        seen,
    };
    let mut steps = Vec::new();
    let mut failed = false;
    // An expected event counts if it came after the last action started.
    let mut action_start = started;
    for (i, step) in scenario.steps.iter().enumerate() {
        let what = step.describe();
        if failed {
            steps.push(StepResult {
                n: i + 1,
                what,
                ok: false,
                elapsed: Duration::ZERO,
                detail: "not run".into(),
            });
            continue;
        }
        let t0 = Instant::now();
        if step.is_action() {
            action_start = t0;
        }
        let result = runner.run_step(step, action_start).await;
        failed = result.is_err();
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        steps.push(StepResult {
            n: i + 1,
            what,
            ok,
            elapsed: t0.elapsed(),
            detail,
        });
    }
    collector.abort();
    Report {
        name: scenario.name.clone(),
        steps,
        elapsed: started.elapsed(),
    }
}

async fn collect(http: reqwest::Client, base: String, seen: Seen) {
    let Ok(mut res) = http
        .get(format!("{}/events", base.trim_end_matches('/')))
        .timeout(Duration::from_secs(24 * 3600))
        .send()
        .await
    else {
        return;
    };
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = res.chunk().await {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if let (Ok(v), Ok(mut s)) = (serde_json::from_slice::<Value>(&line), seen.lock()) {
                s.push((Instant::now(), v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_step_kind_and_refuses_unknown_ones() {
        let s: Scenario = toml::from_str(
            r#"
            name = "all"
            [[steps]]
            step = "press"
            keypad = "gate-1"
            keys = "1234#"
            [[steps]]
            step = "door"
            board = "relay-1"
            input = 3
            open = true
            [[steps]]
            step = "fault"
            device = "locks"
            kind = "http503"
            for_ms = 100
            [[steps]]
            step = "expect_event"
            device = "relay-1"
            kind = "input_changed"
            data = { input = 3, on = true }
            "#,
        )
        .unwrap();
        assert_eq!(s.steps.len(), 4);
        assert_eq!(s.steps[1].describe(), "open door relay-1/3");
        assert!(
            toml::from_str::<Scenario>("name = \"x\"\n[[steps]]\nstep = \"explode\"\n").is_err()
        );
        assert!(
            toml::from_str::<Scenario>(
                "name = \"x\"\n[[steps]]\nstep = \"wait\"\nms = 1\nextra = 2\n"
            )
            .is_err()
        );
    }

    #[test]
    fn contains_matches_subsets() {
        let have = json!({"input": 3, "on": true, "extra": 1});
        assert!(contains(&have, &json!({"input": 3.0, "on": true})));
        assert!(!contains(&have, &json!({"input": 4})));
        assert!(!contains(&have, &json!({"missing": 1})));
    }
}
