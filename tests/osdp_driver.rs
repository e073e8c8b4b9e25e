//! The OSDP control panel driver against hw-sim keypads over their real transports: the
//! pseudo-terminal (opened like an RS-485 adapter) and TCP. Keys go in through the
//! simulator's control API and must come out of the driver's channel; LED, buzzer and
//! text go out through the driver and must show up in the simulator's keypad state.
//!
//! Timings printed (run with `--nocapture`): time to online and secure, key latency from
//! POST to the driver's channel, recovery after an offline fault.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use unitgate::config::KeypadConfig;
use unitgate::devices::osdp::{
    Buzzer, KeyPress, Keypad, KeypadError, KeypadHealth, Led, LedColor, OsdpOptions, Text,
    spawn_all,
};

const KEY: &str = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b";
const WRONG_KEY: &str = "00112233445566778899aabbccddeeff";
const KEY2: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Serial,
    Tcp,
}

/// A simulated keypad: id, transport, OSDP address, key on the keypad.
struct SimPad {
    id: &'static str,
    via: Via,
    address: u8,
    key: Option<&'static str>,
}

struct Site {
    sim: Sim,
    http: reqwest::Client,
    /// Where the gateway reaches each keypad: (serial path, tcp address).
    wires: HashMap<String, (String, String)>,
    _dir: tempfile::TempDir,
}

impl Site {
    async fn start(pads: &[SimPad]) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut text = String::new();
        for p in pads {
            text += &format!(
                "[[devices.keypads]]\nid = \"{}\"\nzone = \"main-gate\"\naddress = {}\nbaud = 9600\n",
                p.id, p.address
            );
            match p.via {
                Via::Serial => text += &format!("port = \"{}\"\n", dir.path().join(p.id).display()),
                Via::Tcp => text += "tcp = \"127.0.0.1:0\"\n",
            }
            if let Some(k) = p.key {
                text += &format!("scbk = \"{k}\"\n");
            }
        }
        let site = SiteFile::parse(&text).expect("site file");
        let sim = Sim::start(&site, Some("127.0.0.1:0"))
            .await
            .expect("sim starts");
        let http = reqwest::Client::new();
        let devices: Value = http
            .get(format!("{}/devices", sim.control_url()))
            .send()
            .await
            .expect("GET /devices")
            .json()
            .await
            .expect("devices JSON");
        let mut wires = HashMap::new();
        for p in pads {
            let d = devices
                .as_array()
                .and_then(|d| d.iter().find(|d| d["id"] == p.id))
                .unwrap_or_else(|| panic!("{} listed in {devices}", p.id));
            let s = |k: &str| d["address"][k].as_str().unwrap_or_default().to_owned();
            let (serial, tcp) = match p.via {
                Via::Serial => (s("serial"), String::new()),
                Via::Tcp => (String::new(), s("tcp")),
            };
            assert!(!serial.is_empty() || !tcp.is_empty(), "{d}");
            wires.insert(p.id.to_owned(), (serial, tcp));
        }
        Site {
            sim,
            http,
            wires,
            _dir: dir,
        }
    }

    /// The gateway's configuration of a keypad of this site.
    fn keypad(&self, id: &str, address: u8, scbk: Option<&str>) -> KeypadConfig {
        let (port, tcp) = self.wires[id].clone();
        KeypadConfig {
            id: id.into(),
            zone: "main-gate".into(),
            port,
            baud: 9600,
            tcp,
            address,
            scbk: scbk.unwrap_or_default().into(),
            install_mode: false,
            gate: None,
            gate_sensor: None,
            pulse_ms: 3000,
            enabled: true,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.control_url())
    }

    async fn state(&self, id: &str) -> Value {
        self.http
            .get(self.url(&format!("/keypads/{id}")))
            .send()
            .await
            .expect("GET /keypads")
            .json()
            .await
            .expect("keypad JSON")
    }

    async fn state_until(&self, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let s = self.state(id).await;
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: keypad state is {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn press(&self, id: &str, keys: &str) -> u16 {
        self.http
            .post(self.url(&format!("/keypads/{id}/keys")))
            .json(&json!({ "keys": keys }))
            .send()
            .await
            .expect("POST keys")
            .status()
            .as_u16()
    }

    async fn fault(&self, id: &str, kind: &str, ms: u64) {
        let r = self
            .http
            .post(self.url("/faults"))
            .json(&json!({"device": id, "kind": kind, "duration_ms": ms}))
            .send()
            .await
            .expect("POST fault");
        assert_eq!(r.status(), 201);
    }

    async fn faults_over(&self, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            let f: Value = self
                .http
                .get(self.url("/faults"))
                .send()
                .await
                .expect("GET faults")
                .json()
                .await
                .expect("faults JSON");
            if f.as_array().is_some_and(|a| a.is_empty()) {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "faults still active: {f}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Fast backoff so recovery fits a test.
fn options() -> OsdpOptions {
    OsdpOptions {
        refresh: Duration::from_millis(20),
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        command_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        silence: Duration::from_secs(1),
    }
}

/// The running driver.
struct Driver {
    pads: Vec<Keypad>,
    keys: mpsc::Receiver<KeyPress>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), KeypadError>>>,
    started: Instant,
}

impl Driver {
    fn start(cfgs: &[KeypadConfig]) -> Driver {
        let (keys_tx, keys) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let started = Instant::now();
        let (pads, tasks) = spawn_all(cfgs, &options(), keys_tx, &stop_rx).expect("driver starts");
        Driver {
            pads,
            keys,
            stop,
            tasks,
            started,
        }
    }

    fn pad(&self, id: &str) -> &Keypad {
        self.pads
            .iter()
            .find(|p| p.id() == id)
            .expect("keypad handle")
    }

    async fn next_keys(&mut self) -> KeyPress {
        tokio::time::timeout(Duration::from_secs(3), self.keys.recv())
            .await
            .expect("keys within 3 s")
            .expect("key channel open")
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let r = tokio::time::timeout(Duration::from_secs(3), t)
                .await
                .expect("bus stops promptly");
            assert!(matches!(r, Ok(Ok(()))), "{r:?}");
        }
    }
}

/// Waits until the keypad's health satisfies `ok`; returns it and when it did.
async fn health_until(
    pad: &Keypad,
    what: &str,
    within: Duration,
    ok: impl Fn(&KeypadHealth) -> bool,
) -> (KeypadHealth, Instant) {
    let mut rx = pad.health();
    let r = tokio::time::timeout(within, rx.wait_for(|h| ok(h)))
        .await
        .map(|r| r.map(|h| h.clone()));
    match r {
        Ok(Ok(h)) => (h, Instant::now()),
        _ => panic!(
            "{}: {what} within {within:?}; health {:?}",
            pad.id(),
            *pad.health().borrow()
        ),
    }
}

/// Records every health value a keypad goes through.
fn record(pad: &Keypad) -> Arc<Mutex<Vec<KeypadHealth>>> {
    let seen = Arc::new(Mutex::new(vec![pad.health().borrow().clone()]));
    let mut rx = pad.health();
    let s = seen.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let h = rx.borrow_and_update().clone();
            s.lock().expect("record").push(h);
        }
    });
    seen
}

/// Presses keys on the simulator and times their arrival on the driver's channel.
async fn keys_arrive(site: &Site, driver: &mut Driver, id: &str, keys: &str) -> Duration {
    let t = Instant::now();
    assert_eq!(site.press(id, keys).await, 202);
    let posted = t.elapsed();
    let k = driver.next_keys().await;
    let latency = t.elapsed();
    eprintln!(
        "[timing] {id} keys {keys:?}: POST answered in {posted:?}, on the channel after {latency:?}"
    );
    assert_eq!(
        k,
        KeyPress {
            keypad: id.into(),
            keys: keys.into()
        }
    );
    latency
}

async fn online_secure(driver: &Driver, id: &str, what: &str) {
    let (h, at) = health_until(
        driver.pad(id),
        "online and secure",
        Duration::from_secs(5),
        |h| h.online && h.secure,
    )
    .await;
    eprintln!(
        "[timing] {what}: {id} online with secure channel {:?} after start (builds {})",
        at - driver.started,
        h.builds
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_keypad_comes_up_secure_takes_keys_and_shows_outputs() {
    let site = Site::start(&[SimPad {
        id: "gate-1",
        via: Via::Serial,
        address: 5,
        key: Some(KEY),
    }])
    .await;
    let mut driver = Driver::start(&[site.keypad("gate-1", 5, Some(KEY))]);
    online_secure(&driver, "gate-1", "serial").await;
    site.state_until("gate-1", "sim sees the secure channel", |s| {
        s["secure"] == true && s["transport"] == "serial"
    })
    .await;

    let mut lat = vec![];
    for keys in ["1234#", "9", "*", "0*#"] {
        lat.push(keys_arrive(&site, &mut driver, "gate-1", keys).await);
    }
    eprintln!("[timing] serial: key latency POST -> channel {lat:?}");

    let pad = driver.pad("gate-1");
    pad.led(Led::steady(LedColor::Green))
        .await
        .expect("green acked");
    site.state_until("gate-1", "green", |s| s["led"] == "green")
        .await;
    assert_eq!(pad.shown().borrow().led, Some(Led::steady(LedColor::Green)));
    pad.led(Led::steady(LedColor::Red))
        .await
        .expect("red acked");
    site.state_until("gate-1", "red", |s| {
        s["led"] == "red" && s["led_flashing"] == false
    })
    .await;
    pad.buzzer(Buzzer::short()).await.expect("beep acked");
    let s = site
        .state_until("gate-1", "beep", |s| s["last_buzzer"]["count"] == 1)
        .await;
    assert_eq!(s["last_buzzer"]["on_ms"], 200, "{s}");
    pad.text(Text::new("Welcome")).await.expect("text acked");
    site.state_until("gate-1", "text", |s| s["text"] == "Welcome")
        .await;
    // Too long for a keypad line: cut to 32, not refused, not a panic.
    pad.text(Text::new("Please see the office about unit 12B, thank you"))
        .await
        .expect("long text acked");
    site.state_until("gate-1", "cut text", |s| {
        s["text"] == "Please see the office about unit"
    })
    .await;
    let h = pad.health().borrow().clone();
    assert!(h.online && h.secure && h.builds == 1, "{h:?}");
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keypad_works_the_same_and_a_full_queue_is_an_error_not_a_hang() {
    let site = Site::start(&[SimPad {
        id: "gate-2",
        via: Via::Tcp,
        address: 0,
        key: Some(KEY),
    }])
    .await;
    let mut driver = Driver::start(&[site.keypad("gate-2", 0, Some(KEY))]);
    online_secure(&driver, "gate-2", "tcp").await;
    site.state_until("gate-2", "sim sees the secure channel", |s| {
        s["secure"] == true && s["transport"] == "tcp"
    })
    .await;
    let mut lat = vec![];
    for keys in ["1234#", "5678#", "#"] {
        lat.push(keys_arrive(&site, &mut driver, "gate-2", keys).await);
    }
    eprintln!("[timing] tcp: key latency POST -> channel {lat:?}");

    let pad = driver.pad("gate-2").clone();
    pad.led(Led::temporary(LedColor::Green, Duration::from_secs(3)))
        .await
        .expect("temporary green acked");
    site.state_until("gate-2", "temporary green", |s| {
        s["led"] == "green" && s["led_temporary"] == true
    })
    .await;

    // Ten commands at once: libosdp queues four per keypad; the rest fail fast.
    let t = Instant::now();
    let sends: Vec<_> = (0..10)
        .map(|i| {
            let pad = pad.clone();
            let color = if i % 2 == 0 {
                LedColor::Red
            } else {
                LedColor::Amber
            };
            tokio::spawn(async move { pad.led(Led::steady(color)).await })
        })
        .collect();
    let mut ok = 0;
    let mut full = 0;
    for s in sends {
        match s.await.expect("send task") {
            Ok(()) => ok += 1,
            Err(KeypadError::QueueFull) => full += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    eprintln!(
        "[timing] tcp: 10 LED commands at once: {ok} acked, {full} queue full, in {:?}",
        t.elapsed()
    );
    assert!(ok >= 1 && full >= 1, "acked {ok}, full {full}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        pad.health().borrow().online,
        "no NAK took the keypad offline"
    );
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_never_brings_the_secure_channel_up_and_health_says_why() {
    let site = Site::start(&[SimPad {
        id: "gate-1",
        via: Via::Tcp,
        address: 1,
        key: Some(KEY),
    }])
    .await;
    let driver = Driver::start(&[site.keypad("gate-1", 1, Some(WRONG_KEY))]);
    let pad = driver.pad("gate-1");
    let seen = record(pad);
    let (h, _) = health_until(pad, "a key error", Duration::from_secs(5), |h| {
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("scbk differs"))
    })
    .await;
    eprintln!("[info] wrong key: {:?}", h.last_error);
    // Rebuilt at least once with the same (wrong) key: still nothing.
    health_until(pad, "a rebuild", Duration::from_secs(5), |h| h.builds >= 2).await;
    assert_eq!(
        pad.led(Led::steady(LedColor::Green)).await,
        Err(KeypadError::Offline)
    );
    let s = site.state("gate-1").await;
    assert_eq!(s["secure"], false, "{s}");
    assert_eq!(s["counters"]["polls"], 0, "no plaintext POLL ever: {s}");
    let seen = seen.lock().expect("record").clone();
    assert!(
        seen.iter().all(|h| !h.online && !h.secure),
        "never online, never secure: {seen:?}"
    );
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_only_in_install_mode() {
    let site = Site::start(&[SimPad {
        id: "gate-1",
        via: Via::Serial,
        address: 2,
        key: None,
    }])
    .await;
    let mut cfg = site.keypad("gate-1", 2, None);
    let (keys_tx, _keys) = mpsc::channel(8);
    let (_stop, stop_rx) = watch::channel(false);
    let refused = spawn_all(std::slice::from_ref(&cfg), &options(), keys_tx, &stop_rx);
    assert!(
        matches!(&refused, Err(KeypadError::Config { id, reason }) if id == "gate-1" && reason.contains("install_mode")),
        "{:?}",
        refused.err()
    );
    cfg.install_mode = true;
    let mut driver = Driver::start(&[cfg]);
    let (h, _) = health_until(
        driver.pad("gate-1"),
        "online",
        Duration::from_secs(5),
        |h| h.online,
    )
    .await;
    assert!(!h.secure);
    keys_arrive(&site, &mut driver, "gate-1", "42#").await;
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_keypad_is_reported_then_rebuilt_within_the_backoff() {
    let site = Site::start(&[SimPad {
        id: "gate-1",
        via: Via::Serial,
        address: 5,
        key: Some(KEY),
    }])
    .await;
    let mut driver = Driver::start(&[site.keypad("gate-1", 5, Some(KEY))]);
    online_secure(&driver, "gate-1", "serial").await;
    let pad = driver.pad("gate-1").clone();
    pad.led(Led::steady(LedColor::Red)).await.expect("red");

    // Longer than libosdp's ~8.2 s of probing: it gives up and would wait 300 s.
    let t = Instant::now();
    site.fault("gate-1", "offline", 9000).await;
    let (h, at) = health_until(&pad, "offline", Duration::from_secs(4), |h| !h.online).await;
    eprintln!(
        "[timing] offline fault: reported offline after {:?} ({:?})",
        at - t,
        h.last_error
    );
    assert_eq!(
        pad.led(Led::steady(LedColor::Green)).await,
        Err(KeypadError::Offline),
        "commands fail fast while offline"
    );
    assert_eq!(
        pad.shown().borrow().led,
        None,
        "what it shows is unknown now"
    );
    let (h, _) = health_until(
        &pad,
        "the control panel is rebuilt",
        Duration::from_secs(12),
        |h| h.builds >= 2,
    )
    .await;
    eprintln!(
        "[timing] offline fault: rebuilt after {:?} ({:?})",
        t.elapsed(),
        h.last_error
    );
    let over = site.faults_over(Duration::from_secs(10)).await;
    let (h, at) = health_until(&pad, "online again", Duration::from_secs(6), |h| {
        h.online && h.secure
    })
    .await;
    eprintln!(
        "[timing] offline fault: online again {:?} after the fault ended (builds {})",
        at - over,
        h.builds
    );
    // libosdp's probe interval (~1 s) plus our capped backoff (1 s) plus a handshake.
    assert!(at - over < Duration::from_secs(4), "{:?}", at - over);
    pad.led(Led::steady(LedColor::Green))
        .await
        .expect("green after recovery");
    site.state_until("gate-1", "green", |s| s["led"] == "green")
        .await;
    keys_arrive(&site, &mut driver, "gate-1", "7#").await;
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keypad_down_never_stalls_another_on_another_transport() {
    let site = Site::start(&[
        SimPad {
            id: "gate-1",
            via: Via::Serial,
            address: 3,
            key: Some(KEY),
        },
        SimPad {
            id: "gate-2",
            via: Via::Tcp,
            address: 4,
            key: Some(KEY2),
        },
    ])
    .await;
    let mut driver = Driver::start(&[
        site.keypad("gate-1", 3, Some(KEY)),
        site.keypad("gate-2", 4, Some(KEY2)),
    ]);
    online_secure(&driver, "gate-1", "two buses").await;
    online_secure(&driver, "gate-2", "two buses").await;
    let two = driver.pad("gate-2").clone();
    let one = driver.pad("gate-1").clone();
    let seen = record(&two);

    let t = Instant::now();
    site.fault("gate-1", "offline", 9000).await;
    health_until(&one, "gate-1 offline", Duration::from_secs(4), |h| {
        !h.online
    })
    .await;
    // While gate-1 is down (and its panel probes and rebuilds), gate-2 works.
    let mut lat = vec![];
    for keys in ["42#", "1*", "99#"] {
        lat.push(keys_arrive(&site, &mut driver, "gate-2", keys).await);
    }
    two.led(Led::steady(LedColor::Green))
        .await
        .expect("gate-2 green");
    site.state_until("gate-2", "gate-2 green", |s| s["led"] == "green")
        .await;
    two.text(Text::new("Welcome")).await.expect("gate-2 text");
    site.state_until("gate-2", "gate-2 text", |s| s["text"] == "Welcome")
        .await;
    health_until(&one, "gate-1 rebuilt", Duration::from_secs(12), |h| {
        h.builds >= 2
    })
    .await;
    two.led(Led::steady(LedColor::Red))
        .await
        .expect("gate-2 red");
    site.state_until("gate-2", "gate-2 red", |s| s["led"] == "red")
        .await;
    eprintln!(
        "[timing] two buses: gate-2 key latency while gate-1 is down {lat:?} ({:?} into the fault)",
        t.elapsed()
    );
    assert!(
        seen.lock()
            .expect("record")
            .iter()
            .all(|h| h.online && h.builds == 1),
        "gate-2 never went offline nor was rebuilt"
    );
    site.faults_over(Duration::from_secs(10)).await;
    health_until(&one, "gate-1 back", Duration::from_secs(6), |h| {
        h.online && h.secure
    })
    .await;
    keys_arrive(&site, &mut driver, "gate-1", "5#").await;
    driver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_transport_is_retried_with_backoff_not_in_a_loop() {
    // Something that takes the connection and hangs up at once, counting attempts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let addr = listener.local_addr().expect("address");
    let (tx, mut accepts) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
            let _ = tx.send(Instant::now());
        }
    });
    let cfg = KeypadConfig {
        id: "gate-9".into(),
        zone: "main-gate".into(),
        port: String::new(),
        baud: 9600,
        tcp: addr.to_string(),
        address: 1,
        scbk: KEY.into(),
        install_mode: false,
        gate: None,
        gate_sensor: None,
        pulse_ms: 3000,
        enabled: true,
    };
    let driver = Driver::start(&[cfg]);
    let pad = driver.pad("gate-9").clone();
    let (h, _) = health_until(&pad, "the hang-up reported", Duration::from_secs(3), |h| {
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains("closed"))
    })
    .await;
    assert!(!h.online);
    let first = tokio::time::timeout(Duration::from_secs(2), accepts.recv())
        .await
        .expect("a first attempt")
        .expect("listener alive");
    // Backoff 200 ms doubling to 1 s (±20 %): about 5 attempts in 3 s, never hundreds.
    let mut n = 1;
    while let Ok(Some(t)) =
        tokio::time::timeout_at((first + Duration::from_secs(3)).into(), accepts.recv()).await
    {
        assert!(t >= first);
        n += 1;
    }
    eprintln!("[timing] dead transport: {n} connection attempts in 3 s");
    assert!((3..=8).contains(&n), "{n} attempts in 3 s");
    assert_eq!(
        pad.led(Led::steady(LedColor::Red)).await,
        Err(KeypadError::Offline)
    );
    driver.stop().await;
}
