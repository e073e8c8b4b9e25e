//! OSDP keypads driven by an independent control panel: libosdp's ControlPanel (the same
//! crate, the CP side) on its own thread, over the keypad's real transports — the
//! pseudo-terminal's slave end opened like an RS-485 adapter, and TCP. Keys go in through
//! `POST /keypads/{id}/keys`; LED, buzzer and text go out as OSDP commands and come back
//! through `GET /keypads/{id}` and `GET /events`. The CP's channel measures the wire on its
//! own (reply checks, reply latency, unanswered commands) so faults are seen from the CP.
//!
//! libosdp timings that shape these tests (compile-time in libosdp 3.2.7): the CP polls
//! every 50 ms, waits 200 ms for a reply, then probes up to 8 times 800 ms apart (about
//! 8.2 s in all) before it marks the PD offline; one reply with a bad check marks it
//! offline at once; an offline PD is retried only after 300 s. So "recovers" means a CP
//! started after the fault talks to the keypad again, as the gateway's driver will do.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use libosdp::{
    Channel, ChannelError, ControlPanelBuilder, OsdpCommand, OsdpCommandBuzzer, OsdpCommandLed,
    OsdpCommandText, OsdpEvent, OsdpLedColor, OsdpLedParams, PdInfoBuilder,
};
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// A deadline of `secs` seconds, times four: each wait ends as soon as its condition holds,
/// so the slack costs nothing when the machine is idle and keeps a loaded CI machine (two
/// cores, other test binaries running) from failing a healthy keypad.
fn patience(secs: u64) -> Duration {
    Duration::from_secs(secs * 4)
}

const ID: &str = "gate-1";
const OSDP_ADDRESS: i32 = 5;
const KEY: &str = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b";
const WRONG_KEY: &str = "00112233445566778899aabbccddeeff";

fn key_bytes(hex: &str) -> [u8; 16] {
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex key");
    }
    k
}

// ---------------------------------------------------------------------------------------
// The simulated site, driven through the control API.

struct Site {
    sim: Sim,
    http: reqwest::Client,
    serial: PathBuf,
    tcp: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy)]
struct Transports {
    serial: bool,
    tcp: bool,
}

const SERIAL: Transports = Transports {
    serial: true,
    tcp: false,
};
const TCP: Transports = Transports {
    serial: false,
    tcp: true,
};
const BOTH: Transports = Transports {
    serial: true,
    tcp: true,
};

impl Site {
    async fn start(t: Transports, scbk: Option<&str>) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let serial = dir.path().join("rs485-gate-1");
        let mut text = format!(
            "[[devices.keypads]]\nid = \"{ID}\"\nzone = \"main-gate\"\naddress = {OSDP_ADDRESS}\nbaud = 9600\n"
        );
        if t.serial {
            text += &format!("port = \"{}\"\n", serial.display());
        }
        if t.tcp {
            text += "tcp = \"127.0.0.1:0\"\n";
        }
        if let Some(k) = scbk {
            text += &format!("scbk = \"{k}\"\n");
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
        let me = devices
            .as_array()
            .and_then(|d| d.iter().find(|d| d["id"] == ID))
            .cloned()
            .unwrap_or_else(|| panic!("{ID} listed in {devices}"));
        assert_eq!(me["kind"], "keypad");
        assert_eq!(me["address"]["osdp_address"], OSDP_ADDRESS);
        let tcp = t.tcp.then(|| {
            let a: SocketAddr = me["address"]["tcp"]
                .as_str()
                .expect("tcp address")
                .parse()
                .expect("socket address");
            assert_ne!(a.port(), 0, "the bound port is reported, not :0");
            a
        });
        if t.serial {
            assert_eq!(me["address"]["serial"], serial.display().to_string());
        }
        Site {
            sim,
            http,
            serial,
            tcp,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.control_url())
    }

    fn serial(&self) -> Wire {
        Wire::Serial(self.serial.clone())
    }

    fn tcp(&self) -> Wire {
        Wire::Tcp(self.tcp.expect("keypad serves TCP"))
    }

    async fn state(&self) -> Value {
        let r = self
            .http
            .get(self.url(&format!("/keypads/{ID}")))
            .send()
            .await
            .expect("GET /keypads");
        assert_eq!(r.status(), 200);
        r.json().await.expect("keypad JSON")
    }

    /// Polls the keypad's state until `ok` holds.
    async fn state_until(
        &self,
        what: &str,
        within: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.state().await;
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: keypad state is {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn press(&self, keys: &str) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/keypads/{ID}/keys")))
            .json(&json!({"keys": keys}))
            .send()
            .await
            .expect("POST keys");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn fault(&self, kind: &str, value: Option<f64>, ms: u64) {
        let r = self
            .http
            .post(self.url("/faults"))
            .json(&json!({"device": ID, "kind": kind, "value": value, "duration_ms": ms}))
            .send()
            .await
            .expect("POST fault");
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
    }

    /// Waits until the keypad has no active fault.
    async fn faults_over(&self, within: Duration) {
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
                return;
            }
            assert!(Instant::now() < deadline, "faults still active: {f}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Subscribes to the keypad's observations (live when this returns).
    async fn events(&self) -> Events {
        let mut resp = self
            .http
            .get(self.url(&format!("/events?device={ID}")))
            .send()
            .await
            .expect("GET /events");
        let (tx, rx) = tmpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&line)
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut ev = Events {
            rx,
            seen: vec![],
            reader,
        };
        ev.wait("subscribed", |_| true, patience(5)).await;
        ev
    }
}

/// The observation stream; `wait` looks at everything seen so far, then at what comes.
struct Events {
    rx: tmpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    /// Closes the stream (the control API's graceful stop waits for open streams).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Events {
    async fn wait(&mut self, kind: &str, pred: impl Fn(&Value) -> bool, within: Duration) -> Value {
        let hit = |v: &Value| v["kind"] == kind && pred(&v["data"]);
        if let Some(v) = self.seen.iter().find(|v| hit(v)) {
            return v.clone();
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(v)) => {
                    self.seen.push(v.clone());
                    if hit(&v) {
                        return v;
                    }
                }
                _ => panic!(
                    "no {kind} observation within {within:?}; seen: {}",
                    serde_json::to_string_pretty(&self.seen).unwrap_or_default()
                ),
            }
        }
    }

    /// Everything that arrived so far, without waiting.
    fn drain(&mut self) -> &[Value] {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
        &self.seen
    }
}

// ---------------------------------------------------------------------------------------
// The control panel: libosdp CP on its own thread, with a channel that watches the wire.

/// Where the control panel connects.
enum Wire {
    Serial(PathBuf),
    Tcp(SocketAddr),
}

enum Port {
    Serial(Box<dyn tokio_serial::SerialPort>),
    Tcp(TcpStream),
}

/// What the CP's channel saw, measured without libosdp: reply frames whose check bytes
/// are right or wrong, how long replies took, commands that got no reply at all.
#[derive(Default)]
struct Tap {
    rx: Vec<u8>,
    good_replies: u64,
    bad_replies: u64,
    awaiting: Option<Instant>,
    unanswered: u64,
    latencies: Vec<Duration>,
    inject: Vec<u8>,
}

impl Tap {
    fn sent(&mut self) {
        if self.awaiting.replace(Instant::now()).is_some() {
            self.unanswered += 1;
        }
    }

    fn received(&mut self, bytes: &[u8]) {
        if let Some(t) = self.awaiting.take() {
            self.latencies.push(t.elapsed());
        }
        self.rx.extend_from_slice(bytes);
        loop {
            let Some(som) = self.rx.iter().position(|&b| b == 0x53) else {
                self.rx.clear();
                return;
            };
            self.rx.drain(..som);
            if self.rx.len() < 5 {
                return;
            }
            let len = usize::from(self.rx[2]) | usize::from(self.rx[3]) << 8;
            if !(7..=300).contains(&len) {
                self.bad_replies += 1;
                self.rx.drain(..1);
                continue;
            }
            if self.rx.len() < len {
                return;
            }
            let f = &self.rx[..len];
            let ok = if f[4] & 0x04 != 0 {
                crc16_aug_ccitt(&f[..len - 2]) == u16::from_le_bytes([f[len - 2], f[len - 1]])
            } else {
                f[..len - 1]
                    .iter()
                    .fold(0u8, |s, b| s.wrapping_add(*b))
                    .wrapping_neg()
                    == f[len - 1]
            };
            if ok {
                self.good_replies += 1;
                self.rx.drain(..len);
            } else {
                self.bad_replies += 1;
                self.rx.drain(..1);
            }
        }
    }
}

/// OSDP's CRC-16: polynomial 0x1021, initial value 0x1D0F, MSB first.
fn crc16_aug_ccitt(data: &[u8]) -> u16 {
    data.iter().fold(0x1D0F_u16, |crc, &b| {
        (0..8).fold(crc ^ (u16::from(b) << 8), |c, _| {
            if c & 0x8000 != 0 {
                (c << 1) ^ 0x1021
            } else {
                c << 1
            }
        })
    })
}

/// The CP's libosdp channel: never blocks (`read` answers 0 when nothing is there).
struct CpChannel {
    port: Option<Port>,
    tap: Arc<Mutex<Tap>>,
}

fn quiet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

impl CpChannel {
    fn open(wire: &Wire, tap: Arc<Mutex<Tap>>) -> CpChannel {
        let port = match wire {
            Wire::Serial(path) => Port::Serial(
                // A zero timeout makes reads return at once (TimedOut) when idle.
                tokio_serial::new(path.to_string_lossy(), 9600)
                    .timeout(Duration::ZERO)
                    .open()
                    .expect("open the keypad's serial line"),
            ),
            Wire::Tcp(addr) => {
                let s = TcpStream::connect(addr).expect("connect to the keypad");
                s.set_nonblocking(true).expect("non-blocking");
                s.set_nodelay(true).expect("nodelay");
                Port::Tcp(s)
            }
        };
        CpChannel {
            port: Some(port),
            tap,
        }
    }

    fn raw_read(&mut self, buf: &mut [u8]) -> usize {
        let r = match self.port.as_mut() {
            Some(Port::Serial(p)) => p.read(buf),
            Some(Port::Tcp(s)) => s.read(buf),
            None => return 0,
        };
        match r {
            Ok(n) => n,
            Err(e) if quiet(&e) => 0,
            Err(_) => 0,
        }
    }

    fn raw_write(&mut self, mut buf: &[u8]) {
        let deadline = Instant::now() + Duration::from_millis(100);
        while !buf.is_empty() && Instant::now() < deadline {
            let r = match self.port.as_mut() {
                Some(Port::Serial(p)) => p.write(buf),
                Some(Port::Tcp(s)) => s.write(buf),
                None => return,
            };
            match r {
                Ok(n) => buf = &buf[n..],
                Err(e) if quiet(&e) => {}
                Err(_) => return,
            }
        }
    }

    fn tap(&self) -> MutexGuard<'_, Tap> {
        self.tap.lock().expect("tap")
    }
}

impl Channel for CpChannel {
    fn get_id(&self) -> i32 {
        0
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let n = self.raw_read(buf);
        if n > 0 {
            self.tap().received(&buf[..n]);
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        let garbage = {
            let mut t = self.tap();
            t.sent();
            std::mem::take(&mut t.inject)
        };
        if !garbage.is_empty() {
            self.raw_write(&garbage);
        }
        self.raw_write(buf);
        Ok(buf.len())
    }

    /// libosdp flushes before every command: drop stale input (late replies), but let the
    /// tap see it.
    fn flush(&mut self) -> Result<(), ChannelError> {
        let mut buf = [0u8; 256];
        loop {
            let n = self.raw_read(&mut buf);
            if n == 0 {
                return Ok(());
            }
            self.tap().rx.extend_from_slice(&buf[..n]);
        }
    }

    /// libosdp never frees the channel: closing is what releases the port.
    fn close(&mut self) -> Result<(), ChannelError> {
        self.port = None;
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct CpStatus {
    online: bool,
    secure: bool,
    ever_online: bool,
    ever_secure: bool,
}

/// A control panel talking to the keypad.
struct Cp {
    commands: mpsc::Sender<OsdpCommand>,
    events: tmpsc::UnboundedReceiver<OsdpEvent>,
    status: Arc<Mutex<CpStatus>>,
    tap: Arc<Mutex<Tap>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Cp {
    fn start(wire: &Wire, key: Option<&str>) -> Cp {
        let tap = Arc::new(Mutex::new(Tap::default()));
        let channel = CpChannel::open(wire, tap.clone());
        let mut pd = PdInfoBuilder::new()
            .name("gate-1")
            .expect("name")
            .address(OSDP_ADDRESS)
            .expect("address")
            .baud_rate(9600)
            .expect("baud");
        if let Some(k) = key {
            pd = pd.secure_channel_key(key_bytes(k));
        }
        let mut cp = ControlPanelBuilder::new()
            .add_channel(Box::new(channel), vec![pd])
            .build()
            .expect("control panel");
        let (ev_tx, events) = tmpsc::unbounded_channel();
        // Set once (the binding leaks the closure); runs inside refresh().
        cp.set_event_callback(move |_pd, event| {
            let _ = ev_tx.send(event);
            0
        });
        let (commands, cmd_rx) = mpsc::channel::<OsdpCommand>();
        let status = Arc::new(Mutex::new(CpStatus::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (status, stop) = (status.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    while let Ok(cmd) = cmd_rx.try_recv() {
                        cp.send_command(0, cmd).expect("CP queues the command");
                    }
                    cp.refresh();
                    let (online, secure) = (cp.is_online(0), cp.is_sc_active(0));
                    if let Ok(mut s) = status.lock() {
                        s.online = online;
                        s.secure = secure;
                        s.ever_online |= online;
                        s.ever_secure |= secure;
                    }
                    // The CP's own cadence (libosdp wants a refresh at least every 50 ms).
                    std::thread::sleep(Duration::from_millis(10));
                }
                drop(cp); // teardown closes the channel
            })
        };
        Cp {
            commands,
            events,
            status,
            tap,
            stop,
            thread: Some(thread),
        }
    }

    fn status(&self) -> CpStatus {
        *self.status.lock().expect("status")
    }

    fn tap(&self) -> MutexGuard<'_, Tap> {
        self.tap.lock().expect("tap")
    }

    fn send(&self, cmd: OsdpCommand) {
        self.commands.send(cmd).expect("CP thread alive");
    }

    async fn until(&self, what: &str, within: Duration, ok: impl Fn(&Cp) -> bool) {
        let deadline = Instant::now() + within;
        while !ok(self) {
            if Instant::now() >= deadline {
                let (good, bad) = {
                    let t = self.tap();
                    (t.good_replies, t.bad_replies)
                };
                panic!(
                    "{what} within {within:?}; CP {:?}, good replies {good}, bad {bad}",
                    self.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn online(&self, secure: bool) {
        self.until("CP sees the keypad online", patience(5), |c| {
            let s = c.status();
            s.online && s.secure == secure
        })
        .await;
    }

    /// The next keypress event's bytes.
    async fn keys(&mut self) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + patience(3);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(OsdpEvent::KeyPress(k))) => return k.data,
                Ok(Some(_)) => {}
                _ => panic!("no keypress reached the CP; CP {:?}", self.status()),
            }
        }
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn led(temporary: OsdpLedParams, permanent: OsdpLedParams) -> OsdpCommand {
    OsdpCommand::Led(OsdpCommandLed {
        reader: 0,
        led_number: 0,
        temporary,
        permanent,
    })
}

/// A steady colour (libosdp refuses on and off times both zero).
fn steady(color: OsdpLedColor) -> OsdpLedParams {
    OsdpLedParams {
        control_code: 1,
        on_count: 1,
        off_count: 0,
        on_color: color,
        off_color: OsdpLedColor::None,
        timer_count: 0,
    }
}

fn nop() -> OsdpLedParams {
    OsdpLedParams::default()
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_cp_sees_the_keypad_and_gets_keys_with_osdp_codes() {
    let site = Site::start(SERIAL, None).await;
    let mut ev = site.events().await;

    let (status, body) = site.press("1234#").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "keypad gate-1 has no control panel polling it"
    );

    let mut cp = Cp::start(&site.serial(), None);
    cp.online(false).await;
    ev.wait("cp_online", |d| d["transport"] == "serial", patience(3))
        .await;
    // The handshake: osdp_ID then osdp_CAP, in the clear.
    ev.wait(
        "frame_received",
        |d| d["command"] == "CAP" && d["secure"] == false,
        patience(3),
    )
    .await;
    let s = site
        .state_until("polled", patience(3), |s| {
            s["counters"]["polls"].as_u64() > Some(3)
        })
        .await;
    assert_eq!(s["online"], true);
    assert_eq!(s["transport"], "serial");
    assert_eq!(s["secure"], false);

    let (status, body) = site.press("1234*#").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        cp.keys().await,
        b"1234\x7f\x0d",
        "digits as ASCII, * as 0x7F, # as 0x0D"
    );
    ev.wait("key_pressed", |d| d["keys"] == "1234*#", patience(1))
        .await;
    ev.wait("keys_sent", |d| d["count"] == 6, patience(1)).await;
    let s = site
        .state_until("keys counted", patience(2), |s| {
            s["counters"]["keys_sent"] == 6
        })
        .await;
    assert_eq!(s["counters"]["keys_pressed"], 6);

    // One key at a time works the same way.
    for k in ["9", "#"] {
        assert_eq!(site.press(k).await.0, 202);
        let want = if k == "#" { vec![0x0D] } else { vec![b'9'] };
        assert_eq!(cp.keys().await, want);
    }

    for bad in ["12a4", "", "1 2", &"1".repeat(65)] {
        let (status, body) = site.press(bad).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
    let (status, _) = site.press(&"1".repeat(64)).await;
    assert_eq!(status, 202, "64 keys fit one osdp_KEYPAD reply");
    assert_eq!(cp.keys().await.len(), 64);

    drop(cp);
    ev.wait("cp_offline", |_| true, patience(4)).await;
    assert_eq!(site.press("1").await.0, 400);
    drop(ev);
    site.sim.stop().await;
    assert!(
        std::fs::symlink_metadata(&site.serial).is_err(),
        "stopping removes the serial link"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_cp_drives_led_buzzer_and_text() {
    let site = Site::start(TCP, None).await;
    let mut ev = site.events().await;
    let cp = Cp::start(&site.tcp(), None);
    cp.online(false).await;
    ev.wait("cp_connected", |d| d["transport"] == "tcp", patience(2))
        .await;
    ev.wait("cp_online", |d| d["transport"] == "tcp", patience(2))
        .await;

    cp.send(led(nop(), steady(OsdpLedColor::Red)));
    ev.wait(
        "led_changed",
        |d| d["color"] == "red" && d["flashing"] == false && d["temporary"] == false,
        patience(2),
    )
    .await;
    ev.wait("frame_received", |d| d["command"] == "LED", patience(1))
        .await;
    let s = site.state().await;
    assert_eq!(s["led"], "red");
    assert_eq!(s["led_flashing"], false);

    // A temporary green flash for 1.5 s, then back to red by itself.
    cp.send(led(
        OsdpLedParams {
            control_code: 2,
            on_count: 3,
            off_count: 3,
            on_color: OsdpLedColor::Green,
            off_color: OsdpLedColor::None,
            timer_count: 15,
        },
        nop(),
    ));
    ev.wait(
        "led_changed",
        |d| d["color"] == "green" && d["flashing"] == true && d["temporary"] == true,
        patience(2),
    )
    .await;
    let s = site.state().await;
    assert_eq!(
        (&s["led"], &s["led_flashing"], &s["led_temporary"]),
        (&json!("green"), &json!(true), &json!(true)),
        "{s}"
    );
    assert_eq!(s["led_pattern"]["on_ms"], 300);
    ev.wait(
        "led_changed",
        |d| d["reason"] == "temporary_ended" && d["color"] == "red",
        patience(4),
    )
    .await;

    cp.send(OsdpCommand::Buzzer(OsdpCommandBuzzer {
        reader: 0,
        control_code: 2,
        on_count: 2,
        off_count: 1,
        rep_count: 2,
    }));
    let b = ev.wait("buzzer", |d| d["on"] == true, patience(2)).await;
    assert_eq!(
        (
            &b["data"]["on_ms"],
            &b["data"]["off_ms"],
            &b["data"]["count"]
        ),
        (&json!(200), &json!(100), &json!(2))
    );
    let s = site.state().await;
    assert_eq!(s["last_buzzer"]["count"], 2, "{s}");
    ev.wait("buzzer", |d| d["reason"] == "finished", patience(3))
        .await;
    assert_eq!(site.state().await["buzzer"], false);

    cp.send(OsdpCommand::Text(OsdpCommandText {
        reader: 0,
        control_code: 1,
        temp_time: 0,
        offset_row: 1,
        offset_col: 1,
        data: b"Welcome".to_vec(),
    }));
    ev.wait(
        "text_shown",
        |d| d["text"] == "Welcome" && d["temporary"] == false,
        patience(2),
    )
    .await;
    let s = site.state().await;
    assert_eq!(s["text"], "Welcome");
    assert!(s["counters"]["commands"].as_u64() >= Some(5), "{s}");
    // Every command was acknowledged: the CP still has the keypad online.
    assert!(cp.status().online);
    assert_eq!(cp.tap().bad_replies, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_takes_one_control_panel_at_a_time() {
    let site = Site::start(TCP, None).await;
    let mut ev = site.events().await;
    let first = Cp::start(&site.tcp(), None);
    first.online(false).await;

    // A second panel while the first polls is turned away (sees EOF).
    let mut intruder = TcpStream::connect(site.tcp.expect("tcp")).expect("connect");
    intruder
        .set_read_timeout(Some(patience(3)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    match intruder.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("second connection should be closed, got {other:?}"),
    }
    ev.wait("tcp_refused", |_| true, patience(2)).await;
    assert!(first.status().online, "the first panel is undisturbed");

    // When the first one goes away, the next one is taken at once.
    drop(first);
    ev.wait(
        "cp_disconnected",
        |d| d["reason"] == "closed by the control panel",
        patience(2),
    )
    .await;
    let mut second = Cp::start(&site.tcp(), None);
    second.online(false).await;
    assert_eq!(site.press("77#").await.0, 202);
    assert_eq!(second.keys().await, b"77\x0d");
    let s = site.state().await;
    assert_eq!(s["counters"]["tcp_connections"], 2, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_channel_comes_up_with_the_matching_key() {
    let site = Site::start(SERIAL, Some(KEY)).await;
    let mut ev = site.events().await;
    let mut cp = Cp::start(&site.serial(), Some(KEY));
    cp.online(true).await;
    ev.wait("frame_received", |d| d["command"] == "CHLNG", patience(1))
        .await;
    ev.wait("frame_received", |d| d["command"] == "SCRYPT", patience(1))
        .await;
    ev.wait("secure_channel_up", |_| true, patience(2)).await;
    site.state_until("secure", patience(2), |s| s["secure"] == true)
        .await;

    assert_eq!(site.press("2468#").await.0, 202);
    assert_eq!(cp.keys().await, b"2468\x0d");

    cp.send(led(nop(), steady(OsdpLedColor::Amber)));
    ev.wait(
        "frame_received",
        |d| d["command"] == "LED" && d["secure"] == true,
        patience(2),
    )
    .await;
    ev.wait("led_changed", |d| d["color"] == "amber", patience(2))
        .await;
    assert!(cp.status().secure && cp.status().online);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_channel_stays_down_with_a_wrong_key() {
    let site = Site::start(TCP, Some(KEY)).await;
    let mut ev = site.events().await;
    let cp = Cp::start(&site.tcp(), Some(WRONG_KEY));
    ev.wait("frame_received", |d| d["command"] == "CHLNG", patience(3))
        .await;
    // The CP gives up on the secure channel and tries a plain POLL: the keypad refuses
    // it (it takes nothing in the clear once it has a key) and the CP drops it.
    site.state_until("a plain POLL arrived", patience(3), |s| {
        s["counters"]["polls"].as_u64() >= Some(1)
    })
    .await;
    cp.until("CP marks the keypad offline", patience(3), |c| {
        !c.status().online
    })
    .await;
    assert!(
        !cp.status().ever_secure,
        "no secure channel with a wrong key"
    );
    let s = site.state().await;
    assert_eq!(s["secure"], false, "{s}");
    assert!(
        !ev.drain().iter().any(|e| e["kind"] == "secure_channel_up"),
        "no secure_channel_up observation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_makes_replies_late_then_clears() {
    let site = Site::start(TCP, None).await;
    let cp = Cp::start(&site.tcp(), None);
    cp.online(false).await;
    cp.until("some replies measured", patience(2), |c| {
        c.tap().latencies.len() >= 20
    })
    .await;
    let baseline = cp.tap().latencies.iter().max().copied().unwrap_or_default();
    assert!(
        baseline < Duration::from_millis(100),
        "baseline {baseline:?}"
    );

    // 150 ms late: under libosdp's 200 ms reply timeout, so the CP keeps the keypad.
    let mark = cp.tap().latencies.len();
    site.fault("delay", Some(150.0), 1500).await;
    cp.until("a late reply", patience(2), |c| {
        c.tap().latencies[mark..]
            .iter()
            .any(|l| *l >= Duration::from_millis(150))
    })
    .await;
    assert!(cp.status().online, "a 150 ms delay keeps the keypad online");
    site.faults_over(patience(3)).await;
    let mark = cp.tap().latencies.len() + 2; // a reply may still be in flight
    cp.until("prompt replies again", patience(3), |c| {
        let l = &c.tap().latencies;
        l.len() >= mark + 10 && l[mark..].iter().all(|l| *l < Duration::from_millis(100))
    })
    .await;
    assert!(cp.status().online);
    let s = site.state().await;
    assert!(s["counters"]["replies_delayed"].as_u64() > Some(0), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_drop_loses_replies_then_clears() {
    let site = Site::start(TCP, None).await;
    let mut cp = Cp::start(&site.tcp(), None);
    cp.online(false).await;
    assert_eq!(cp.tap().unanswered, 0);

    site.fault("drop", Some(1.0), 1200).await;
    cp.until("commands go unanswered", patience(2), |c| {
        c.tap().unanswered >= 1
    })
    .await;
    site.faults_over(patience(3)).await;
    // The CP probes again (800 ms apart, 8 tries) and the keypad answers: still online.
    let good = cp.tap().good_replies;
    cp.until("replies flow again", patience(3), |c| {
        c.tap().good_replies >= good + 10
    })
    .await;
    assert!(
        cp.status().online,
        "a short loss does not take the keypad offline"
    );
    let s = site.state().await;
    assert!(s["counters"]["replies_dropped"].as_u64() >= Some(1), "{s}");
    assert_eq!(site.press("5#").await.0, 202);
    assert_eq!(cp.keys().await, b"5\x0d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_corrupt_gives_the_cp_bad_frames_then_clears() {
    let site = Site::start(TCP, None).await;
    let mut ev = site.events().await;
    let cp = Cp::start(&site.tcp(), None);
    cp.online(false).await;
    assert_eq!(cp.tap().bad_replies, 0);

    site.fault("corrupt", Some(1.0), 1000).await;
    cp.until("a reply with a bad check", patience(2), |c| {
        c.tap().bad_replies >= 1
    })
    .await;
    // libosdp's CP drops a PD at the first reply that fails its check.
    cp.until("CP marks the keypad offline", patience(2), |c| {
        !c.status().online
    })
    .await;
    ev.wait(
        "frame_corrupted",
        |d| d["direction"] == "tx" && d["fault"] == "corrupt",
        patience(1),
    )
    .await;
    assert!(site.state().await["counters"]["replies_corrupted"].as_u64() >= Some(1));

    site.faults_over(patience(3)).await;
    drop(cp);
    // One control panel at a time: the next is refused until the simulator saw this one go.
    ev.wait("cp_disconnected", |d| d["transport"] == "tcp", patience(2))
        .await;
    let mut cp = Cp::start(&site.tcp(), None);
    cp.online(false).await;
    assert_eq!(site.press("31#").await.0, 202);
    assert_eq!(cp.keys().await, b"31\x0d");
    assert_eq!(
        cp.tap().bad_replies,
        0,
        "clean replies once the fault is over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_offline_makes_the_cp_give_up_then_clears() {
    let site = Site::start(SERIAL, None).await;
    let mut ev = site.events().await;
    let cp = Cp::start(&site.serial(), None);
    cp.online(false).await;

    // Longer than libosdp's ~8.2 s of probing.
    site.fault("offline", None, 9000).await;
    cp.until("CP marks the keypad offline", patience(11), |c| {
        !c.status().online
    })
    .await;
    let unanswered = cp.tap().unanswered;
    assert!(unanswered >= 8, "the CP probed {unanswered} times");
    // The CP now waits 300 s before trying again: the keypad sees it go quiet.
    ev.wait("cp_offline", |_| true, patience(4)).await;
    assert_eq!(site.press("1").await.0, 400);

    site.faults_over(patience(3)).await;
    drop(cp);
    let mut cp = Cp::start(&site.serial(), None);
    cp.online(false).await;
    assert_eq!(site.press("0#").await.0, 202);
    assert_eq!(cp.keys().await, b"0\x0d");
}

/// Bytes that start no valid frame: noise, a SOM with an impossible length, a header that
/// announces 255 bytes that never come.
fn garbage() -> Vec<u8> {
    let mut g = b"\x00\x01noise\x7f\x80\xfe".to_vec();
    g.extend_from_slice(&[0x53, 0x05, 0x02, 0x00, 0x04, 0x60]);
    // Deterministic pseudo-random bytes.
    let mut x: u32 = 0x1234_5678;
    g.extend((0..300).map(|_| {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (x >> 24) as u8
    }));
    g.extend_from_slice(&[0xFF, 0x53, 0x05, 0xFF, 0x00, 0x04]);
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_serial_line_is_reported_and_survived() {
    let site = Site::start(BOTH, None).await;
    let mut ev = site.events().await;
    {
        // Something else on the bus: raw bytes into the slave end.
        let mut line = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&site.serial)
            .expect("open the serial line");
        line.write_all(&garbage()).expect("write garbage");
    }
    let g = ev
        .wait(
            "frame_corrupted",
            |d| d["direction"] == "rx" && d["transport"] == "serial",
            patience(3),
        )
        .await;
    assert!(g["data"]["bytes"].as_u64() > Some(100), "{g}");
    site.state_until("garbage counted", patience(2), |s| {
        s["counters"]["garbage_bytes"].as_u64() > Some(100)
    })
    .await;

    let mut cp = Cp::start(&site.serial(), None);
    cp.online(false).await;
    assert_eq!(site.press("12#").await.0, 202);
    assert_eq!(cp.keys().await, b"12\x0d");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_tcp_is_reported_and_survived() {
    let site = Site::start(TCP, None).await;
    let mut ev = site.events().await;
    {
        let mut s = TcpStream::connect(site.tcp.expect("tcp")).expect("connect");
        s.write_all(&garbage()).expect("write garbage");
    }
    ev.wait(
        "frame_corrupted",
        |d| d["direction"] == "rx" && d["transport"] == "tcp",
        patience(3),
    )
    .await;

    let mut cp = Cp::start(&site.tcp(), None);
    cp.online(false).await;
    let before = site.state().await["counters"]["garbage_bytes"]
        .as_u64()
        .unwrap_or(0);
    // Noise between the CP's frames (no SOM that could swallow a command).
    cp.tap().inject = b"\x00\x11\x22noise on the line\x7f\xfe".to_vec();
    site.state_until("mid-session noise counted", patience(3), |s| {
        s["counters"]["garbage_bytes"].as_u64() > Some(before)
    })
    .await;
    let good = cp.tap().good_replies;
    cp.until("the CP keeps talking", patience(2), |c| {
        c.tap().good_replies >= good + 10
    })
    .await;
    assert!(cp.status().online);
    assert_eq!(site.press("4#").await.0, 202);
    assert_eq!(cp.keys().await, b"4\x0d");
}

#[test]
fn osdp_crc_check_value() {
    // The tap's CRC, checked against the catalogue value for "123456789".
    assert_eq!(crc16_aug_ccitt(b"123456789"), 0xE5CC);
}
