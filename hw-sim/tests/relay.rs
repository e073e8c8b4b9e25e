//! Relay boards driven by an independent Modbus client (tokio-modbus) over their real
//! transports: Modbus TCP on a loopback port, Modbus RTU on the pseudo-terminal's slave
//! end, opened like a serial adapter (9600 8N1). State and faults go through the control
//! API, observations come from `GET /events`.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use hw_sim::observe::monotonic_ns;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;
use tokio_serial::{SerialPort, SerialPortBuilderExt};

const TCP: &str = "tcp-board";
const RTU: &str = "rtu-board";
const RTU_UNIT: u8 = 3;
/// How long a client waits for an answer before calling it a timeout (tokio-modbus has
/// no timeout of its own).
const ANSWER: Duration = Duration::from_millis(300);

struct Site {
    sim: Sim,
    http: reqwest::Client,
    tcp: SocketAddr,
    rtu: PathBuf,
    _dir: tempfile::TempDir,
}

impl Site {
    async fn start() -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let link = dir.path().join("rs485-relays");
        let text = format!(
            r#"
[[devices.relay_boards]]
id = "{TCP}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 8
inputs = 8

[[devices.relay_boards]]
id = "{RTU}"
transport = "rtu"
port = "{}"
baud = 9600
unit_id = {RTU_UNIT}
coils = 16
inputs = 4
"#,
            link.display()
        );
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
        let find = |id: &str| {
            devices
                .as_array()
                .and_then(|d| d.iter().find(|d| d["id"] == id))
                .cloned()
                .unwrap_or_else(|| panic!("{id} listed in {devices}"))
        };
        let tcp: SocketAddr = find(TCP)["address"]["address"]
            .as_str()
            .expect("tcp address")
            .parse()
            .expect("socket address");
        assert_ne!(tcp.port(), 0, "the bound port is reported, not :0");
        let rtu = PathBuf::from(find(RTU)["address"]["serial"].as_str().expect("serial"));
        assert_eq!(rtu, link);
        Site {
            sim,
            http,
            tcp,
            rtu,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sim.control_url())
    }

    async fn relays(&self, id: &str) -> Value {
        let r = self
            .http
            .get(self.url(&format!("/relays/{id}")))
            .send()
            .await
            .expect("GET /relays");
        assert_eq!(r.status(), 200);
        r.json().await.expect("relay JSON")
    }

    async fn set_input(&self, id: &str, n: u16, on: bool) {
        let r = self
            .http
            .post(self.url(&format!("/relays/{id}/inputs/{n}")))
            .json(&json!({"on": on}))
            .send()
            .await
            .expect("POST input");
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
    }

    /// Injects a fault; returns a time no later than when it took effect (so it holds
    /// for at least `ms` from then).
    async fn fault(&self, device: &str, kind: &str, value: Option<f64>, ms: u64) -> Instant {
        let before = Instant::now();
        let r = self
            .http
            .post(self.url("/faults"))
            .json(&json!({"device": device, "kind": kind, "value": value, "duration_ms": ms}))
            .send()
            .await
            .expect("POST /faults");
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
        before
    }

    async fn events(&self) -> Events {
        let resp = self
            .http
            .get(self.url("/events"))
            .send()
            .await
            .expect("GET /events");
        let mut ev = Events {
            resp,
            buf: Vec::new(),
        };
        // The first line says the subscription is live: nothing after it is missed.
        ev.wait_for(|e| e["kind"] == "subscribed").await;
        ev
    }
}

/// The NDJSON observation stream.
struct Events {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Events {
    /// The first observation matching `pred`, within 5 s.
    async fn wait_for(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line).expect("NDJSON line");
                if pred(&v) {
                    return v;
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .expect("observation within 5 s")
                .expect("event stream")
                .expect("event stream open");
            self.buf.extend_from_slice(&chunk);
        }
    }
}

fn is(e: &Value, device: &str, kind: &str) -> bool {
    e["device"] == device && e["kind"] == kind
}

async fn tcp_client(addr: SocketAddr, unit: u8) -> Context {
    tokio_modbus::client::tcp::connect_slave(addr, Slave(unit))
        .await
        .expect("tcp connect")
}

/// Opens the serial line as a panel would (9600 8N1), discarding anything stale on it.
fn open_line(path: &Path) -> tokio_serial::SerialStream {
    let port = tokio_serial::new(path.to_string_lossy(), 9600)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .open_native_async()
        .expect("open the serial line");
    port.clear(tokio_serial::ClearBuffer::All)
        .expect("flush the line");
    port
}

fn rtu_client(path: &Path, unit: u8) -> Context {
    tokio_modbus::client::rtu::attach_slave(open_line(path), Slave(unit))
}

/// An answer, or `None` on timeout. Transport errors panic unless asked for.
async fn within<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(ANSWER, f).await.ok()
}

/// CRC-16/MODBUS, table-free, written here so the raw checks do not trust the board's.
fn crc(data: &[u8]) -> [u8; 2] {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= b as u16;
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb == 1 {
                crc ^= 0xA001;
            }
        }
    }
    crc.to_le_bytes()
}

fn with_crc(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(&crc(body));
    v
}

/// Sends raw bytes on the line and reads `n` bytes of answer (or what came within 1 s).
async fn raw_exchange(path: &Path, request: &[u8], n: usize) -> Vec<u8> {
    let mut port = open_line(path);
    port.write_all(request).await.expect("write raw");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 64];
    while got.len() < n {
        match tokio::time::timeout_at(deadline, port.read(&mut buf)).await {
            Ok(Ok(k)) if k > 0 => got.extend_from_slice(&buf[..k]),
            _ => break,
        }
    }
    got
}

/// Polls with fresh clients until the board answers a read normally; returns when.
async fn answers_again<F, Fut>(connect: F, from: Instant) -> Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Context>,
{
    let deadline = from + Duration::from_secs(6);
    while Instant::now() < deadline {
        let mut ctx = connect().await;
        if let Some(Ok(Ok(_))) = within(ctx.read_coils(0, 1)).await {
            return from.elapsed();
        }
    }
    panic!("the board did not answer again within 6 s");
}

#[tokio::test]
async fn tcp_client_writes_and_reads_coils_and_inputs() {
    let site = Site::start().await;
    let mut ev = site.events().await;
    let mut a = tcp_client(site.tcp, 1).await;
    let mut b = tcp_client(site.tcp, 1).await;

    // Write single (FC5) and see it everywhere; measure write -> observation latency.
    let sent = monotonic_ns();
    a.write_single_coil(3, true)
        .await
        .expect("transport")
        .expect("no exception");
    let answered = monotonic_ns();
    // Writes are reported as frames (before the board acts on them).
    let f = ev
        .wait_for(|e| is(e, TCP, "frame_received") && e["data"]["function"] == 5)
        .await;
    assert_eq!(f["data"]["transport"], "tcp");
    let changed = ev
        .wait_for(|e| is(e, TCP, "coil_changed") && e["data"]["coil"] == 3)
        .await;
    assert_eq!(changed["data"]["on"], true);
    let t = changed["t_ns"].as_u64().expect("t_ns");
    assert!(sent < t && t < answered, "observed between send and answer");
    // The answer waits out the board's response delay (3 ms) after it acted.
    assert!(
        answered - t >= 3_000_000,
        "response delay: {} ns",
        answered - t
    );
    eprintln!(
        "write_single_coil -> coil_changed: {} us; coil_changed -> answer: {} us",
        (t - sent) / 1000,
        (answered - t) / 1000
    );

    // Write multiple (FC15) from the other connection: both clients see the result.
    b.write_multiple_coils(4, &[true, false, true, true])
        .await
        .expect("transport")
        .expect("no exception");
    for coil in [4, 6, 7] {
        ev.wait_for(|e| is(e, TCP, "coil_changed") && e["data"]["coil"] == coil)
            .await;
    }
    let want = vec![false, false, false, true, true, false, true, true];
    assert_eq!(a.read_coils(0, 8).await.unwrap().unwrap(), want);
    assert_eq!(b.read_coils(0, 8).await.unwrap().unwrap(), want);
    assert_eq!(site.relays(TCP).await["coils"], json!(want));

    // A door opens (control API) and the client reads it with FC2.
    site.set_input(TCP, 2, true).await;
    let e = ev
        .wait_for(|e| is(e, TCP, "input_changed") && e["data"]["input"] == 2)
        .await;
    assert_eq!(e["data"]["on"], true);
    let inputs = a.read_discrete_inputs(0, 8).await.unwrap().unwrap();
    assert_eq!(
        inputs,
        vec![false, false, true, false, false, false, false, false]
    );
    assert_eq!(site.relays(TCP).await["inputs"][2], true);
}

#[tokio::test]
async fn tcp_bad_addresses_and_functions_answer_exceptions() {
    let site = Site::start().await;
    let mut ev = site.events().await;
    let mut c = tcp_client(site.tcp, 1).await;
    // The device answers (outer Ok) with an exception (inner Err).
    assert_eq!(
        c.read_coils(7, 2).await.expect("transport ok"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        c.write_single_coil(8, true).await.expect("transport ok"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        c.write_multiple_coils(6, &[true; 3])
            .await
            .expect("transport ok"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        c.read_discrete_inputs(100, 1).await.expect("transport ok"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        c.read_coils(0, 0).await.expect("transport ok"),
        Err(ExceptionCode::IllegalDataValue)
    );
    assert_eq!(
        c.read_holding_registers(0, 1).await.expect("transport ok"),
        Err(ExceptionCode::IllegalFunction)
    );
    let e = ev.wait_for(|e| is(e, TCP, "exception")).await;
    assert_eq!(e["data"]["exception"], "IllegalDataAddress");
    assert_eq!(e["data"]["function"], 1);
    ev.wait_for(|e| is(e, TCP, "exception") && e["data"]["exception"] == "IllegalFunction")
        .await;
    // Nothing was written by the refused requests.
    assert_eq!(site.relays(TCP).await["coils"], json!(vec![false; 8]));
    // Another unit id is not this board: no answer.
    let mut other = tcp_client(site.tcp, 9).await;
    assert!(
        within(other.read_coils(0, 1)).await.is_none(),
        "unit 9 ignored"
    );
}

#[tokio::test]
async fn rtu_client_on_the_pty_writes_reads_and_gets_exceptions() {
    let site = Site::start().await;
    let mut ev = site.events().await;
    let mut c = rtu_client(&site.rtu, RTU_UNIT);

    let sent = monotonic_ns();
    within(c.write_single_coil(15, true))
        .await
        .expect("answer")
        .expect("transport")
        .expect("no exception");
    let e = ev
        .wait_for(|e| is(e, RTU, "coil_changed") && e["data"]["coil"] == 15)
        .await;
    eprintln!(
        "rtu write_single_coil -> coil_changed: {} us",
        (e["t_ns"].as_u64().unwrap() - sent) / 1000
    );
    within(c.write_multiple_coils(0, &[true, true, false, true]))
        .await
        .expect("answer")
        .unwrap()
        .unwrap();
    let coils = within(c.read_coils(0, 16)).await.unwrap().unwrap().unwrap();
    let mut want = vec![false; 16];
    for i in [0, 1, 3, 15] {
        want[i] = true;
    }
    assert_eq!(coils, want);
    assert_eq!(site.relays(RTU).await["coils"], json!(want));

    site.set_input(RTU, 3, true).await;
    ev.wait_for(|e| is(e, RTU, "input_changed") && e["data"]["input"] == 3)
        .await;
    assert_eq!(
        within(c.read_discrete_inputs(0, 4))
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
        vec![false, false, false, true]
    );

    assert_eq!(
        within(c.read_discrete_inputs(2, 3))
            .await
            .unwrap()
            .expect("transport ok"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        within(c.write_single_coil(16, false))
            .await
            .unwrap()
            .expect("transport ok"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        within(c.write_single_register(0, 1))
            .await
            .unwrap()
            .expect("transport ok"),
        Err(ExceptionCode::IllegalFunction)
    );
    ev.wait_for(|e| is(e, RTU, "exception") && e["data"]["transport"] == "rtu")
        .await;

    // Another slave id on the same line: this board keeps quiet. (One panel at a time:
    // the line is opened exclusively, like a real serial adapter.)
    drop(c);
    let mut other = rtu_client(&site.rtu, RTU_UNIT + 1);
    assert!(
        within(other.read_coils(0, 1)).await.is_none(),
        "a request for unit 4 is not answered"
    );
    drop(other);
    // Broadcast (unit 0): the write is applied, never answered.
    let mut all = rtu_client(&site.rtu, 0);
    assert!(within(all.write_single_coil(2, true)).await.is_none());
    drop(all);
    ev.wait_for(|e| is(e, RTU, "coil_changed") && e["data"]["coil"] == 2)
        .await;
    let mut c = rtu_client(&site.rtu, RTU_UNIT);
    assert_eq!(
        within(c.read_coils(2, 1)).await.unwrap().unwrap().unwrap(),
        vec![true]
    );
}

#[tokio::test]
async fn tcp_faults_change_what_the_client_sees_and_clear() {
    let site = Site::start().await;
    let addr = site.tcp;
    let connect = || tcp_client(addr, 1);
    let mut c = connect().await;

    // offline: connected but silent; a new connection is accepted and silent too.
    let set = site.fault(TCP, "offline", None, 700).await;
    assert!(
        within(c.read_coils(0, 1)).await.is_none(),
        "offline: no answer"
    );
    let mut fresh = connect().await;
    assert!(within(fresh.read_coils(0, 1)).await.is_none());
    let back = answers_again(connect, set).await;
    assert!(back >= Duration::from_millis(700), "cleared after {back:?}");

    // delay: measurably slower, then fast again.
    let mut c = connect().await;
    let t = Instant::now();
    c.read_coils(0, 1).await.unwrap().unwrap();
    let normal = t.elapsed();
    let set = site.fault(TCP, "delay", Some(400.0), 1200).await;
    let t = Instant::now();
    c.read_coils(0, 1).await.unwrap().unwrap();
    let slow = t.elapsed();
    assert!(
        slow >= Duration::from_millis(400) && slow > normal * 4,
        "delay: {slow:?} vs {normal:?}"
    );
    loop {
        let t = Instant::now();
        c.read_coils(0, 1).await.unwrap().unwrap();
        if t.elapsed() < Duration::from_millis(200) {
            assert!(set.elapsed() >= Duration::from_millis(1200));
            break;
        }
        assert!(
            set.elapsed() < Duration::from_secs(5),
            "delay never cleared"
        );
    }

    // drop, every answer: timeouts, but the write itself happened.
    let set = site.fault(TCP, "drop", Some(1.0), 700).await;
    let mut c = connect().await;
    assert!(within(c.write_single_coil(1, true)).await.is_none());
    assert_eq!(
        site.relays(TCP).await["coils"][1],
        true,
        "acted, answer lost"
    );
    let back = answers_again(connect, set).await;
    assert!(back >= Duration::from_millis(700));

    // drop, half of the answers: some time out, some do not.
    site.fault(TCP, "drop", Some(0.5), 60_000).await;
    let mut c = connect().await;
    let (mut answered, mut lost) = (0, 0);
    for _ in 0..30 {
        match tokio::time::timeout(Duration::from_millis(150), c.read_coils(0, 1)).await {
            Ok(r) => {
                r.unwrap().unwrap();
                answered += 1
            }
            Err(_) => lost += 1,
        }
    }
    assert!(answered > 0 && lost > 0, "{answered} answered, {lost} lost");
    let r = site
        .http
        .delete(site.url(&format!("/faults?device={TCP}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // corrupt: the answer arrives mangled and the client rejects it (a transport or
    // protocol error, not an exception and not a timeout).
    let set = site.fault(TCP, "corrupt", None, 700).await;
    let mut c = connect().await;
    let r = within(c.read_coils(0, 1)).await.expect("an answer arrives");
    assert!(r.is_err(), "corrupt answer rejected by the client: {r:?}");
    let back = answers_again(connect, set).await;
    assert!(back >= Duration::from_millis(700));
}

#[tokio::test]
async fn rtu_faults_change_what_the_client_sees_and_clear() {
    let site = Site::start().await;
    let line = site.rtu.clone();
    let connect = || {
        let line = line.clone();
        async move { rtu_client(&line, RTU_UNIT) }
    };

    let set = site.fault(RTU, "offline", None, 600).await;
    let mut c = connect().await;
    assert!(
        within(c.read_coils(0, 1)).await.is_none(),
        "offline: no answer"
    );
    drop(c);
    let back = answers_again(connect, set).await;
    assert!(back >= Duration::from_millis(600), "cleared after {back:?}");

    let mut c = connect().await;
    let t = Instant::now();
    within(c.read_coils(0, 1)).await.unwrap().unwrap().unwrap();
    let normal = t.elapsed();
    let set = site.fault(RTU, "delay", Some(400.0), 1200).await;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), c.read_coils(0, 1))
        .await
        .expect("late, but answered")
        .unwrap()
        .unwrap();
    let slow = t.elapsed();
    assert!(
        slow >= Duration::from_millis(400) && slow > normal * 4,
        "delay: {slow:?} vs {normal:?}"
    );
    loop {
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), c.read_coils(0, 1))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if t.elapsed() < Duration::from_millis(200) {
            assert!(set.elapsed() >= Duration::from_millis(1200));
            break;
        }
        assert!(
            set.elapsed() < Duration::from_secs(5),
            "delay never cleared"
        );
    }
    drop(c);

    let set = site.fault(RTU, "drop", Some(1.0), 600).await;
    let mut c = connect().await;
    assert!(within(c.write_single_coil(5, true)).await.is_none());
    drop(c);
    assert_eq!(
        site.relays(RTU).await["coils"][5],
        true,
        "acted, answer lost"
    );
    let back = answers_again(connect, set).await;
    assert!(back >= Duration::from_millis(600));

    // corrupt: the answer is on the wire with a bad CRC. tokio-modbus drops such a frame
    // (as a real master would) and times out; the raw bytes show why.
    let set = site.fault(RTU, "corrupt", None, 800).await;
    let mut c = connect().await;
    assert!(
        within(c.read_coils(0, 8)).await.is_none(),
        "bad CRC: no valid answer"
    );
    drop(c);
    let request = with_crc(&[RTU_UNIT, 0x01, 0x00, 0x00, 0x00, 0x08]);
    let answer = raw_exchange(&site.rtu, &request, 6).await;
    assert_eq!(answer.len(), 6, "an answer arrived: {answer:02x?}");
    assert_eq!(&answer[..2], &[RTU_UNIT, 0x01]);
    assert_ne!(
        &answer[4..],
        &crc(&answer[..4]),
        "CRC is wrong: {answer:02x?}"
    );
    let back = answers_again(connect, set).await;
    assert!(back >= Duration::from_millis(800));
    let answer = raw_exchange(&site.rtu, &request, 6).await;
    assert_eq!(&answer[4..], &crc(&answer[..4]), "CRC good again");
}

#[tokio::test]
async fn garbage_on_the_pty_does_not_stop_the_board() {
    let site = Site::start().await;
    let mut ev = site.events().await;
    // Plain garbage, then a long burst (more than tokio-modbus's own RTU server survives).
    let mut port = open_line(&site.rtu);
    port.write_all(b"\x00\xffhello, this is not modbus\r\n")
        .await
        .unwrap();
    let e = ev.wait_for(|e| is(e, RTU, "frame_corrupted")).await;
    assert!(e["data"]["dropped_bytes"].as_u64().unwrap() > 0);
    let burst: Vec<u8> = (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect();
    port.write_all(&burst).await.unwrap();
    ev.wait_for(|e| is(e, RTU, "frame_corrupted")).await;
    // A request with a broken CRC is garbage too, and is not answered.
    let mut bad = with_crc(&[RTU_UNIT, 0x05, 0x00, 0x00, 0xFF, 0x00]);
    bad[7] ^= 0x01;
    port.write_all(&bad).await.unwrap();
    ev.wait_for(|e| is(e, RTU, "frame_corrupted")).await;
    drop(port);
    assert_eq!(site.relays(RTU).await["coils"][0], false);

    // Garbage glued to a valid request: the board resynchronises and answers it.
    let mut glued = b"\x13\x37junk".to_vec();
    glued.extend(with_crc(&[RTU_UNIT, 0x05, 0x00, 0x09, 0xFF, 0x00]));
    let answer = raw_exchange(&site.rtu, &glued, 8).await;
    assert_eq!(
        answer,
        with_crc(&[RTU_UNIT, 0x05, 0x00, 0x09, 0xFF, 0x00]),
        "echo of the write"
    );

    // And a real client carries on.
    let mut c = rtu_client(&site.rtu, RTU_UNIT);
    let coils = within(c.read_coils(8, 2)).await.unwrap().unwrap().unwrap();
    assert_eq!(coils, vec![false, true]);
}

#[tokio::test]
async fn garbage_on_a_tcp_connection_closes_only_that_connection() {
    let site = Site::start().await;
    let mut ev = site.events().await;
    let mut good = tcp_client(site.tcp, 1).await;
    good.write_single_coil(0, true).await.unwrap().unwrap();

    let mut raw = tokio::net::TcpStream::connect(site.tcp).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let e = ev.wait_for(|e| is(e, TCP, "frame_corrupted")).await;
    assert_eq!(e["data"]["transport"], "tcp");
    // The board hangs up on it...
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "closed: {n:?}");

    // ...and everyone else is served.
    assert_eq!(good.read_coils(0, 1).await.unwrap().unwrap(), vec![true]);
    let mut fresh = tcp_client(site.tcp, 1).await;
    assert_eq!(fresh.read_coils(0, 1).await.unwrap().unwrap(), vec![true]);
}

#[tokio::test]
async fn stopping_the_site_removes_the_serial_link() {
    let site = Site::start().await;
    let link = site.rtu.clone();
    assert!(std::fs::symlink_metadata(&link).is_ok());
    let tcp = site.tcp;
    site.sim.stop().await;
    assert!(std::fs::symlink_metadata(&link).is_err(), "link removed");
    assert!(
        tokio::net::TcpStream::connect(tcp).await.is_err(),
        "port closed"
    );
}
