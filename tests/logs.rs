//! Secrets and PINs never reach the logs. The real `unitgate` binary runs a site on hw-sim
//! (an OSDP keypad over a pty with the secure channel, a Modbus TCP board, the lock API)
//! with an MQTT broker, signed MQTT commands, an HTTPS uplink and a webhook source, every
//! secret a known marker. After API calls (right and wrong token), webhooks (good and bad
//! signature), a signed MQTT command and a granted and a refused PIN at the keypad, its
//! whole stderr is searched for the markers, the PINs and the PINs' hashes: at `trace` and at
//! `info`. Also: `check-config` on broken configs next to a secret does not echo it, and JSON
//! logs are one object per line without ANSI codes, carrying the per-device span.

#[path = "common/broker.rs"]
#[allow(dead_code, reason = "only start, url and the child hook are used here")]
mod broker;

use broker::Broker;
use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::time::Instant;
use unitgate::api::http::auth::token_hash_hex;
use unitgate::domain::pin::PinKey;

#[test]
#[ignore = "the broker's own process, started by tests/common/broker.rs"]
fn embedded_broker_process() {
    broker::serve_if_child();
}

const SITE: &str = "site-logs";
const API_TOKEN: &str = "ug_apitoken_MARK1_7f3a9c1e5b2d";
const WRONG_TOKEN: &str = "ug_wrongtoken_MARK2_a9e8d7c6";
const MQTT_PASSWORD: &str = "mqttpass_MARK3_b81d4e2f";
const WEBHOOK_SECRET: &str = "whsec_MARK4_c0ffee123456";
const CLIENT_KEY: &str = "cloudkey_MARK5_0123456789abcdef0123456789";
const LOCK_KEY: &str = "lockkey_MARK6_5a6b7c8d9e";
const UPLINK_SECRET: &str = "uplink_MARK7_9e8d7c6b5a";
const SCBK: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
const PIN_OK: &str = "4829167305";
const PIN_BAD: &str = "7352048196";
const PIN_KEY: [u8; 32] = [7; 32];
const KEYPAD: &str = "gate-1";
const WITHIN: Duration = Duration::from_secs(20);

/// Every string that must not appear in the logs.
fn forbidden() -> Vec<String> {
    let mut out: Vec<String> = [
        API_TOKEN,
        WRONG_TOKEN,
        MQTT_PASSWORD,
        WEBHOOK_SECRET,
        CLIENT_KEY,
        LOCK_KEY,
        UPLINK_SECRET,
        SCBK,
        PIN_OK,
        PIN_BAD,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // Each secret's distinctive middle too, in case a line cuts or re-encodes it.
    out.extend((1..=7).map(|i| format!("MARK{i}")));
    let key = PinKey::new(PIN_KEY);
    for pin in [PIN_OK, PIN_BAD] {
        let h = key.hash(pin);
        out.push(hex::encode(h));
        out.push(hex::encode_upper(h));
    }
    out
}

fn devices(board: &str, lock_url: &str, wires: &str) -> String {
    format!(
        r#"
[[devices.keypads]]
id = "{KEYPAD}"
zone = "main-gate"
port = "{wires}/{KEYPAD}"
baud = 115200
address = 1
scbk = "{SCBK}"
gate = {{ board = "gate-relays", coil = 0 }}
pulse_ms = 300

[[devices.relay_boards]]
id = "gate-relays"
transport = "tcp"
address = "{board}"
unit_id = 1
coils = 2
inputs = 2
timeout_ms = 300
poll_ms = 100

[devices.lock_api]
id = "locks"
url = "{lock_url}"
api_key_file = "{wires}/lock-api.key"
locks = ["lock-1"]
"#
    )
}

/// The gateway process, its stderr collected line by line.
struct Gateway {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    base: String,
}

impl Gateway {
    fn start(config: &std::path::Path) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_unitgate"))
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("UNITGATE_CONFIG")
            .env_remove("NO_COLOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unitgate starts");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let collected = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "API listening"
                {
                    let _ = addr_tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                }
                collected.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(WITHIN) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no 'API listening' line:\n{}",
                    lines.lock().unwrap().join("\n")
                );
            }
        };
        Gateway {
            child,
            lines,
            base: format!("http://{addr}"),
        }
    }

    /// SIGTERM, then the whole stderr once the process has exited.
    fn stop(mut self) -> Vec<String> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20)); // poll interval
        }
        let _ = self.child.wait();
        // The reader thread ends at EOF, right after the exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut last = usize::MAX;
        loop {
            let n = self.lines.lock().unwrap().len();
            if n == last || std::time::Instant::now() > deadline {
                break;
            }
            last = n;
            std::thread::sleep(Duration::from_millis(100)); // poll interval
        }
        self.lines.lock().unwrap().clone()
    }
}

struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let res = rb.send().await.expect("request");
        let status = res.status().as_u16();
        let body = res.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let (status, body) = self.call(method, path, API_TOKEN, Some(body)).await;
        assert!((200..300).contains(&status), "{path}: {status} {body}");
        body
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(reqwest::Method::GET, path, API_TOKEN, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

/// Polls `check` until true or [`WITHIN`] passes.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < WITHIN, "{what}: not within {WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

/// Runs the whole site at `level` and returns the gateway's stderr.
async fn run_site(level: &str) -> Vec<String> {
    let broker = Broker::start();
    let wires = tempfile::tempdir().expect("tempdir");
    let w = wires.path().display().to_string();
    let file = |name: &str, content: &str| {
        let p = wires.path().join(name);
        std::fs::write(&p, content).expect("secret file");
        p.display().to_string()
    };
    // Trailing newlines, as `echo` writes them: not part of the secrets.
    file("lock-api.key", &format!("{LOCK_KEY}\n"));
    let password = file("mqtt.pass", &format!("{MQTT_PASSWORD}\n"));
    let client_key = file("cloud.key", &format!("{CLIENT_KEY}\n"));
    let webhook = file("billing.secret", &format!("{WEBHOOK_SECRET}\n"));
    let uplink = file("uplink.secret", &format!("{UPLINK_SECRET}\n"));

    let sim = Sim::start(
        &SiteFile::parse(&devices("127.0.0.1:0", "http://127.0.0.1:0", &w)).expect("site"),
        Some("127.0.0.1:0"),
    )
    .await
    .expect("sim");
    let http = reqwest::Client::new();
    let listed: Value = http
        .get(format!("{}/devices", sim.control_url()))
        .send()
        .await
        .expect("control API")
        .json()
        .await
        .expect("devices");
    let address = |id: &str, key: &str| -> String {
        listed
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == id))
            .and_then(|d| d["address"][key].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{id} address in {listed}"))
    };
    let data = tempfile::tempdir().expect("tempdir");
    std::fs::write(data.path().join("pin.key"), PIN_KEY).expect("pin key");
    let config = format!(
        r#"
[site]
id = "{SITE}"
name = "Logs"
timezone = "UTC"
[store]
data_dir = "{data}"
[api]
listen = "127.0.0.1:0"
plain_http = true
[[api.tokens]]
name = "cloud"
sha256 = "{hash}"
scopes = ["admin"]
[log]
level = "{level}"
format = "json"
[cloud.mqtt]
url = "{mqtt}"
protocol = "v3.1.1"
username = "gateway"
password_file = "{password}"
signed_commands = true
[[cloud.mqtt.clients]]
id = "cloud"
key_file = "{client_key}"
operations = ["*"]
[cloud.https_uplink]
url = "http://127.0.0.1:9/events"
secret_file = "{uplink}"
[[cloud.webhooks]]
name = "billing"
secret_file = "{webhook}"
{devices}"#,
        data = data.path().display(),
        hash = token_hash_hex(API_TOKEN),
        mqtt = broker.url(false),
        devices = devices(
            &address("gate-relays", "address"),
            &address("locks", "url"),
            &w
        ),
    );
    let config_path = data.path().join("config.toml");
    std::fs::write(&config_path, config).expect("config");

    let gw = Gateway::start(&config_path);
    let api = Http {
        client: reqwest::Client::new(),
        base: gw.base.clone(),
    };
    exercise(&api, &sim, &broker).await;
    let lines = gw.stop();
    sim.stop().await;
    lines
}

/// API calls, webhooks, a signed MQTT command and two PINs.
async fn exercise(api: &Http, sim: &Sim, broker: &Broker) {
    use reqwest::Method;
    api.ok(
        Method::PUT,
        "/v1/unit_types/small",
        json!({"name": "Small"}),
    )
    .await;
    let units: Vec<Value> = (1..=3)
        .map(|i| {
            json!({
                "id": format!("u{i}"), "name": format!("U{i:03}"), "unit_type": "small",
                "width": 5, "length": 5, "height": 8, "door_height": 7, "door_width": 4,
                "door_type": "roll_up", "access_type": "indoor", "standard_rate": 50.0,
                "walk_thru_order": i, "zones": ["main-gate"],
            })
        })
        .collect();
    api.ok(
        Method::POST,
        "/v1/units/bulk_create",
        json!({ "units": units }),
    )
    .await;
    api.ok(
        Method::PUT,
        "/v1/contacts/c1",
        json!({"name": "Contact 1", "access_code": PIN_OK}),
    )
    .await;
    api.ok(
        Method::PUT,
        "/v1/tenancies/t1",
        json!({"contact_id": "c1", "start_date": "2024-01-01", "end_date": null}),
    )
    .await;
    api.ok(
        Method::PATCH,
        "/v1/units/u3",
        json!({"unit": {"lock": {"kind": "smart_lock", "id": "lock-1"}}}),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/units/u1/grant_access",
        json!({"tenancy_id": "t1"}),
    )
    .await;
    api.ok(
        Method::POST,
        "/v1/units/u3/grant_access",
        json!({"tenancy_id": "t1"}),
    )
    .await;
    // A wrong token, on a read and on a write.
    let (status, _) = api.call(Method::GET, "/v1/units", WRONG_TOKEN, None).await;
    assert_eq!(status, 401);
    let (status, _) = api
        .call(
            Method::POST,
            "/v1/units/u2/reserve",
            WRONG_TOKEN,
            Some(json!({"tenancy_id": "t1"})),
        )
        .await;
    assert_eq!(status, 401);

    // Webhooks: a good signature and a bad one.
    let body = json!({"id": "evt-1", "event": "payment.processed", "data": {"contact_id": "c1"}})
        .to_string();
    let now = chrono::Utc::now().timestamp();
    for (secret, expect_ok) in [(WEBHOOK_SECRET, true), ("not-the-secret", false)] {
        let sig = unitgate::cloud::webhooks::sign(secret.as_bytes(), now, body.as_bytes());
        let res = api
            .client
            .post(format!("{}/v1/webhooks/billing", api.base))
            .header("content-type", "application/json")
            .header("x-unitgate-signature", sig)
            .body(body.clone())
            .send()
            .await
            .expect("webhook");
        assert_eq!(res.status().as_u16() != 401, expect_ok, "{}", res.status());
    }

    // A signed MQTT command (the key file ends in a newline that is not part of the key):
    // published until the gateway's subscription takes it.
    let (client, mut events) = {
        let o = rumqttc::MqttOptions::new("cloud-logs", "127.0.0.1", broker.v4);
        rumqttc::AsyncClient::new(o, 10)
    };
    let poller = tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let topic = format!("unitgate/v1/{SITE}/cmd/grant_access");
    let mut nonce = 0;
    until("the signed MQTT grant applied", || {
        nonce += 1;
        let req = format!(r#"{{"request_id":"m{nonce}","unit_id":"u2","tenancy_id":"t1"}}"#);
        let mac = unitgate::cloud::signing::sign(
            CLIENT_KEY.as_bytes(),
            "grant_access",
            nonce,
            req.as_bytes(),
        );
        let payload =
            format!(r#"{{"client_id":"cloud","nonce":{nonce},"hmac":"{mac}","request":{req}}}"#);
        let client = client.clone();
        let topic = topic.clone();
        async move {
            let _ = client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
            api.get("/v1/units/u2").await["unit"]["status"] == "occupied"
        }
    })
    .await;
    poller.abort();

    // Two PINs at the keypad: granted and refused.
    until("keypad online", || async {
        api.get("/v1/devices")
            .await
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["id"] == KEYPAD && d["online"] == true))
    })
    .await;
    let control = reqwest::Client::new();
    for pin in [PIN_OK, PIN_BAD] {
        let r = control
            .post(format!("{}/keypads/{KEYPAD}/keys", sim.control_url()))
            .json(&json!({ "keys": format!("{pin}#") }))
            .send()
            .await
            .expect("press");
        assert_eq!(r.status().as_u16(), 202);
    }
    until("access.granted and access.denied", || async {
        let evs = api.get("/v1/events?after=0&limit=1000").await;
        let types: Vec<String> = evs["events"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|e| e["type"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        types.iter().any(|t| t == "access.granted") && types.iter().any(|t| t == "access.denied")
    })
    .await;
    let (status, _) = api.call(Method::GET, "/metrics", API_TOKEN, None).await;
    assert_eq!(status, 200);
}

fn assert_clean(level: &str, lines: &[String]) {
    assert!(
        lines.len() > 10,
        "{level}: too few lines:\n{}",
        lines.join("\n")
    );
    for secret in forbidden() {
        if let Some(line) = lines.iter().find(|l| l.contains(&secret)) {
            panic!("{level}: {secret:?} appears in the logs:\n{line}");
        }
    }
    for line in lines {
        assert!(!line.contains('\u{1b}'), "{level}: ANSI code in {line}");
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{level}: not one JSON object per line ({e}): {line}"));
        assert!(v.is_object(), "{level}: {line}");
    }
}

/// Whether some line was logged inside `device{id=.., kind=..}`.
fn in_device_span(lines: &[String], id: &str, kind: &str) -> bool {
    lines.iter().any(|l| {
        serde_json::from_str::<Value>(l).is_ok_and(|v| {
            v["spans"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"] == "device" && s["id"] == id && s["kind"] == kind)
            })
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_pin_in_the_logs_at_trace() {
    let lines = run_site("trace").await;
    if let Some(p) = std::env::var_os("UNITGATE_LOGS_DUMP") {
        std::fs::write(p, lines.join("\n")).expect("dump");
    }
    assert_clean("trace", &lines);
    for (id, kind) in [
        (KEYPAD, "keypad"),
        ("gate-relays", "relay_board"),
        ("locks", "lock_api"),
        (KEYPAD, "gate"),
    ] {
        assert!(
            in_device_span(&lines, id, kind),
            "no line in device{{id={id}, kind={kind}}}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_pin_in_the_logs_at_info() {
    let lines = run_site("info").await;
    assert_clean("info", &lines);
    assert!(
        in_device_span(&lines, KEYPAD, "keypad"),
        "the keypad's info lines carry its span"
    );
}

#[test]
fn check_config_does_not_echo_a_secret_next_to_a_bad_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    let head = "[site]\nid = \"s1\"\ntimezone = \"UTC\"\n[api]\nplain_http = true\n[[devices.keypads]]\nid = \"k1\"\nzone = \"z\"\nport = \"/dev/null\"\n";
    let cases = [
        // A bad value on the line before the key.
        format!("{head}baud = \"fast\"\nscbk = \"{SCBK}\"\n"),
        // The key itself unquoted: a TOML syntax error on the secret's own line.
        format!("{head}scbk = {SCBK}\n"),
        // One digit short: refused without quoting it.
        format!("{head}scbk = \"{}\"\n", &SCBK[1..]),
        // A password in the MQTT URL.
        format!(
            "{head}scbk = \"{SCBK}\"\n[cloud.mqtt]\nurl = \"mqtt://gw:{MQTT_PASSWORD}@broker\"\n"
        ),
    ];
    for text in cases {
        std::fs::write(&path, &text).expect("config");
        let out = Command::new(env!("CARGO_BIN_EXE_unitgate"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("UNITGATE_CONFIG")
            .output()
            .expect("check-config");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(1), "{text}\n{all}");
        for secret in [SCBK, &SCBK[1..], MQTT_PASSWORD] {
            assert!(!all.contains(secret), "{secret} echoed for:\n{text}\n{all}");
        }
        assert!(
            all.contains("scbk")
                || all.contains("baud")
                || all.contains("line")
                || all.contains("mqtt"),
            "the problem is named: {all}"
        );
    }
}

/// Found by the interop suite: `log.format = "human"` wrote colour codes into a file.
#[test]
fn human_format_into_a_pipe_has_no_ansi_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[site]\nid = \"s1\"\ntimezone = \"UTC\"\n[store]\ndata_dir = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\nplain_http = true\n[[api.tokens]]\nname = \"cloud\"\nsha256 = \"{}\"\nscopes = [\"read\"]\n[log]\nlevel = \"debug\"\nformat = \"human\"\n",
            dir.path().join("data").display(),
            token_hash_hex(API_TOKEN),
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_unitgate"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unitgate starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("line");
        let listening = line.contains("API listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.last().is_some_and(|l| l.contains("API listening")),
        "{lines:?}"
    );
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "ANSI code in {line:?}");
        assert!(!line.starts_with('{'), "human, not JSON: {line}");
    }
}
