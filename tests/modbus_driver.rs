//! The Modbus driver against hw-sim's relay boards over their real transports: Modbus TCP
//! on loopback and Modbus RTU on the simulator's pseudo-terminal. What the board did is
//! checked through the control API (`GET /relays/{id}`) and its observations
//! (`GET /events`); faults are injected with `POST /faults`.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::watch;
use unitgate::config::{ModbusTransport, RelayBoardConfig};
use unitgate::devices::modbus::{
    BoardState, ExceptionCode, InputEvent, ModbusError, RelayBoard, RelayBoards,
};

const TCP: &str = "tcp-a";
const TCP2: &str = "tcp-b";
const RTU: &str = "rtu-a";
const RTU_UNIT: u8 = 3;
/// Generous upper bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(5);

struct Site {
    sim: Sim,
    http: reqwest::Client,
    boards: BTreeMap<String, RelayBoard>,
    events: mpsc::Receiver<InputEvent>,
    tcp_addr: SocketAddr,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn board(id: &str, transport: ModbusTransport, timeout_ms: u64) -> RelayBoardConfig {
    RelayBoardConfig {
        id: id.into(),
        transport,
        address: String::new(),
        port: String::new(),
        baud: 19200,
        parity: "none".into(),
        stop_bits: 1,
        unit_id: 1,
        coils: 8,
        inputs: 8,
        response_delay_ms: None,
        timeout_ms,
        poll_ms: 50,
        enabled: true,
    }
}

impl Site {
    /// The simulator with two TCP boards and one RTU board, and the driver for them
    /// (requests time out after `timeout_ms`).
    async fn start(timeout_ms: u64) -> Site {
        let dir = tempfile::tempdir().expect("temp dir");
        let link = dir.path().join("rs485-0");
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
id = "{TCP2}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 8
inputs = 8

[[devices.relay_boards]]
id = "{RTU}"
transport = "rtu"
port = "{}"
baud = 19200
parity = "none"
stop_bits = 1
unit_id = {RTU_UNIT}
coils = 8
inputs = 8
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
        let tcp_address = |id: &str| -> String {
            devices
                .as_array()
                .and_then(|d| d.iter().find(|d| d["id"] == id))
                .and_then(|d| d["address"]["address"].as_str())
                .unwrap_or_else(|| panic!("{id} in {devices}"))
                .to_owned()
        };
        let mut a = board(TCP, ModbusTransport::Tcp, timeout_ms);
        a.address = tcp_address(TCP);
        let mut b = board(TCP2, ModbusTransport::Tcp, timeout_ms);
        b.address = tcp_address(TCP2);
        let mut r = board(RTU, ModbusTransport::Rtu, timeout_ms);
        r.port = link.display().to_string();
        r.unit_id = RTU_UNIT;
        let tcp_addr = a.address.parse().expect("tcp address");
        let (tx, events) = mpsc::channel(256);
        let planned = RelayBoards::new(&[a, b, r], tx).expect("plan");
        let (stop, shutdown) = watch::channel(false);
        for link in planned.links {
            tokio::spawn(link.run(shutdown.clone()));
        }
        Site {
            sim,
            http,
            boards: planned.boards,
            events,
            tcp_addr,
            _stop: stop,
            _dir: dir,
        }
    }

    fn board(&self, id: &str) -> &RelayBoard {
        &self.boards[id]
    }

    async fn relay(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/relays/{id}", self.sim.control_url()))
            .send()
            .await
            .expect("GET /relays")
            .json()
            .await
            .expect("relay JSON")
    }

    async fn set_input(&self, id: &str, n: u16, on: bool) {
        let r = self
            .http
            .post(format!("{}/relays/{id}/inputs/{n}", self.sim.control_url()))
            .json(&json!({ "on": on }))
            .send()
            .await
            .expect("POST input");
        assert!(r.status().is_success(), "{}", r.status());
    }

    async fn fault(&self, device: &str, kind: &str, value: Option<f64>, duration_ms: u64) {
        let r = self
            .http
            .post(format!("{}/faults", self.sim.control_url()))
            .json(&json!({"device": device, "kind": kind, "value": value, "duration_ms": duration_ms}))
            .send()
            .await
            .expect("POST /faults");
        assert!(r.status().is_success(), "{}", r.status());
    }

    async fn clear_faults(&self) {
        self.http
            .delete(format!("{}/faults", self.sim.control_url()))
            .send()
            .await
            .expect("DELETE /faults");
    }

    /// Waits for the board's health to satisfy `f`.
    async fn health_until(
        &self,
        id: &str,
        within: Duration,
        f: impl Fn(&unitgate::devices::modbus::Health) -> bool,
    ) {
        let mut h = self.board(id).health();
        let reached = tokio::time::timeout(within, h.wait_for(|h| f(h)))
            .await
            .map(|r| r.is_ok());
        assert_eq!(reached, Ok(true), "{id}: health still {:?}", *h.borrow());
    }

    /// The next input event of `board` (others are skipped).
    async fn next_event(&mut self, board: &str) -> InputEvent {
        let deadline = tokio::time::Instant::now() + SOON;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no input event from {board}"))
                .expect("events channel open");
            let of = match &ev {
                InputEvent::Snapshot { board, .. } | InputEvent::Changed { board, .. } => board,
            };
            if &**of == board {
                return ev;
            }
        }
    }
}

/// `GET /events?device=` as parsed lines, live once the `subscribed` line came.
struct Observations {
    lines: mpsc::UnboundedReceiver<Value>,
}

impl Observations {
    async fn subscribe(site: &Site, device: &str) -> Observations {
        let mut resp = site
            .http
            .get(format!("{}/events?device={device}", site.sim.control_url()))
            .send()
            .await
            .expect("GET /events");
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
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
        let first = tokio::time::timeout(SOON, lines.recv())
            .await
            .expect("subscribed line")
            .expect("stream open");
        assert_eq!(first["kind"], "subscribed");
        Observations { lines }
    }

    /// The next observation of `kind` whose data contains `data`.
    async fn expect(&mut self, kind: &str, data: Value) -> Value {
        let deadline = tokio::time::Instant::now() + SOON;
        loop {
            let v = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no {kind} {data}"))
                .expect("stream open");
            let fits = data
                .as_object()
                .is_none_or(|want| want.iter().all(|(k, x)| &v["data"][k] == x));
            if v["kind"] == kind && fits {
                return v;
            }
        }
    }
}

fn coils_of(relay: &Value) -> Vec<bool> {
    relay["coils"]
        .as_array()
        .expect("coils")
        .iter()
        .map(|c| c.as_bool().expect("bool"))
        .collect()
}

async fn writes_land_and_read_back(id: &str) {
    let site = Site::start(500).await;
    let b = site.board(id);
    site.health_until(id, SOON, |h| h.is_online()).await;
    let mut obs = Observations::subscribe(&site, id).await;
    b.write_coil(2, true).await.expect("write coil 2");
    obs.expect("coil_changed", json!({"coil": 2, "on": true}))
        .await;
    b.write_coils(5, &[true, true])
        .await
        .expect("write coils 5-6");
    obs.expect("coil_changed", json!({"coil": 6, "on": true}))
        .await;
    let sim = coils_of(&site.relay(id).await);
    let expected = vec![false, false, true, false, false, true, true, false];
    assert_eq!(sim, expected, "the board's coils");
    assert_eq!(b.read_coils(0, 8).await.expect("read back"), expected);
    b.write_coil(2, false).await.expect("write coil 2 off");
    obs.expect("coil_changed", json!({"coil": 2, "on": false}))
        .await;
    assert_eq!(b.read_coils(2, 1).await.expect("read back"), vec![false]);
    site.sim.stop().await;
}

#[tokio::test]
async fn tcp_coil_writes_land_on_the_board_and_read_back() {
    writes_land_and_read_back(TCP).await;
}

#[tokio::test]
async fn rtu_coil_writes_land_on_the_board_and_read_back() {
    writes_land_and_read_back(RTU).await;
}

async fn input_changes_arrive(id: &str) {
    let mut site = Site::start(500).await;
    site.set_input(id, 1, true).await;
    // The first poll is a snapshot of the whole board.
    match site.next_event(id).await {
        InputEvent::Snapshot { inputs, .. } => {
            assert_eq!(inputs.len(), 8);
            assert!(
                inputs[1],
                "input 1 was on before the first poll: {inputs:?}"
            );
        }
        other => panic!("expected a snapshot first, got {other:?}"),
    }
    site.set_input(id, 4, true).await;
    assert_eq!(
        site.next_event(id).await,
        InputEvent::Changed {
            board: id.into(),
            input: 4,
            on: true
        }
    );
    site.set_input(id, 4, false).await;
    assert_eq!(
        site.next_event(id).await,
        InputEvent::Changed {
            board: id.into(),
            input: 4,
            on: false
        }
    );
    assert!(site.board(id).read_inputs(0, 8).await.expect("read inputs")[1]);
    site.sim.stop().await;
}

#[tokio::test]
async fn tcp_input_changes_arrive_on_the_channel() {
    input_changes_arrive(TCP).await;
}

#[tokio::test]
async fn rtu_input_changes_arrive_on_the_channel() {
    input_changes_arrive(RTU).await;
}

async fn exception_is_not_a_timeout(id: &str) {
    let site = Site::start(200).await;
    site.health_until(id, SOON, |h| h.is_online()).await;
    let b = site.board(id);
    // Coil 100 of an 8-coil board: the board answers IllegalDataAddress.
    match b.write_coil(100, true).await {
        Err(ModbusError::Exception { code, .. }) => {
            assert_eq!(code, ExceptionCode::IllegalDataAddress)
        }
        other => panic!("expected a device exception, got {other:?}"),
    }
    assert!(b.health().borrow().is_online(), "an exception is an answer");
    // Answers 400 ms late against a 200 ms timeout: a timeout, not an exception.
    site.fault(id, "delay", Some(400.0), 60_000).await;
    match b.write_coil(1, true).await {
        Err(e @ ModbusError::Timeout { .. }) => assert!(e.is_retryable()),
        other => panic!("expected a timeout, got {other:?}"),
    }
    site.clear_faults().await;
    // Late answers of the delay may still be on the way: the driver must not take them
    // for the answers of what follows.
    site.health_until(id, SOON, |h| h.is_online()).await;
    check_clean_answers(&site, id).await;
    site.sim.stop().await;
}

/// Alternating writes, each read back: a stale answer would show up as a mismatch.
async fn check_clean_answers(site: &Site, id: &str) {
    let b = site.board(id);
    let deadline = Instant::now() + SOON;
    let mut ok = 0;
    for i in 0..20u16 {
        let on = i % 2 == 0;
        let coil = i % 8;
        // Right after a fault a poll may still fail once: retry within the deadline.
        loop {
            let res = async {
                b.write_coil(coil, on).await?;
                b.read_coils(coil, 1).await
            }
            .await;
            match res {
                Ok(bits) => {
                    assert_eq!(bits, vec![on], "coil {coil} read back");
                    ok += 1;
                    break;
                }
                Err(e) if Instant::now() < deadline && e.is_retryable() => {
                    site.health_until(id, SOON, |h| h.state != BoardState::Offline)
                        .await;
                }
                Err(e) => panic!("{id}: {e}"),
            }
        }
        assert_eq!(coils_of(&site.relay(id).await)[usize::from(coil)], on);
    }
    assert_eq!(ok, 20);
}

#[tokio::test]
async fn tcp_device_exception_is_distinct_from_timeout() {
    exception_is_not_a_timeout(TCP).await;
}

#[tokio::test]
async fn rtu_device_exception_is_distinct_from_timeout() {
    exception_is_not_a_timeout(RTU).await;
}

async fn offline_fault(id: &str) {
    let site = Site::start(200).await;
    site.health_until(id, SOON, |h| h.is_online()).await;
    let b = site.board(id);
    b.write_coil(0, true).await.expect("write before the fault");
    let down = Duration::from_millis(3000);
    let fault_at = Instant::now();
    site.fault(id, "offline", None, down.as_millis() as u64)
        .await;
    site.health_until(id, SOON, |h| h.state == BoardState::Offline)
        .await;
    let offline_after = fault_at.elapsed();
    let probes_then = b.health().borrow().probes;
    // Offline: requests fail fast.
    for _ in 0..50 {
        let t = Instant::now();
        match b.write_coil(1, true).await {
            Err(ModbusError::Offline { last_error, .. }) => assert!(!last_error.is_empty()),
            other => panic!("expected offline, got {other:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_millis(20),
            "took {:?}",
            t.elapsed()
        );
    }
    // Back online after the fault, on its own.
    site.health_until(id, Duration::from_secs(15), |h| h.is_online())
        .await;
    let back_after = fault_at.elapsed();
    let probes = b.health().borrow().probes - probes_then;
    println!(
        "{id}: offline detected after {offline_after:?}, back online after {back_after:?} \
         (fault {down:?}), {probes} probes while down"
    );
    // Backoff 100 ms doubling (each probe also waits the 200 ms timeout): about 6 probes
    // in 3 s. A busy loop would make hundreds.
    assert!(
        probes <= 12,
        "{probes} probes in {down:?}: backoff not working"
    );
    assert!(back_after < down + Duration::from_secs(6));
    b.write_coil(1, true).await.expect("write after recovery");
    assert!(coils_of(&site.relay(id).await)[1]);
    site.sim.stop().await;
}

#[tokio::test]
async fn tcp_offline_board_fails_fast_backs_off_and_recovers() {
    offline_fault(TCP).await;
}

#[tokio::test]
async fn rtu_offline_board_fails_fast_backs_off_and_recovers() {
    offline_fault(RTU).await;
}

async fn corrupt_fault(id: &str) {
    let site = Site::start(200).await;
    site.health_until(id, SOON, |h| h.is_online()).await;
    let b = site.board(id);
    site.fault(id, "corrupt", Some(1.0), 60_000).await;
    let err = b.write_coil(3, true).await.expect_err("corrupted answer");
    println!("{id}: corrupted answer -> {err}");
    match (id, &err) {
        // tokio-modbus keeps waiting for a valid CRC: it can only be a timeout on RTU.
        (RTU, ModbusError::Timeout { .. }) => {}
        // TCP: the mangled transaction id does not match the request.
        (TCP, ModbusError::Transport { .. }) => {}
        (_, ModbusError::Offline { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    site.health_until(id, SOON, |h| h.state == BoardState::Offline)
        .await;
    site.clear_faults().await;
    site.health_until(id, Duration::from_secs(15), |h| h.is_online())
        .await;
    check_clean_answers(&site, id).await;
    site.sim.stop().await;
}

#[tokio::test]
async fn tcp_corrupt_answers_are_errors_then_recover() {
    corrupt_fault(TCP).await;
}

#[tokio::test]
async fn rtu_corrupt_answers_are_errors_then_recover() {
    corrupt_fault(RTU).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn write_latencies(b: &RelayBoard, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        b.write_coil((i % 8) as u16, i % 2 == 0)
            .await
            .expect("write");
        out.push(t.elapsed());
    }
    out.sort();
    out
}

#[tokio::test]
async fn an_offline_board_does_not_delay_another() {
    let site = Site::start(200).await;
    site.health_until(TCP, SOON, |h| h.is_online()).await;
    site.health_until(TCP2, SOON, |h| h.is_online()).await;
    let other = site.board(TCP2);
    let before = write_latencies(other, 100).await;
    site.fault(TCP, "offline", None, 60_000).await;
    // While TCP-A times out, is declared offline and probed, TCP-B's writes go on.
    let during = write_latencies(other, 300).await;
    site.health_until(TCP, SOON, |h| h.state == BoardState::Offline)
        .await;
    println!(
        "{TCP2} write p50/p99/max: before {:?}/{:?}/{:?}, while {TCP} is down {:?}/{:?}/{:?}",
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        before[before.len() - 1],
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during[during.len() - 1],
    );
    // A stall behind the dead board would cost its 200 ms timeout.
    assert!(
        during[during.len() - 1] < Duration::from_millis(100),
        "slowest write {:?}",
        during[during.len() - 1]
    );
    site.sim.stop().await;
}

/// Not a pass/fail test: the driver's write round trip against a bare tokio-modbus client
/// writing to the same simulated board in the same run.
#[tokio::test]
async fn write_round_trip_driver_vs_bare_client() {
    use tokio_modbus::client::Writer;
    let site = Site::start(500).await;
    site.health_until(TCP, SOON, |h| h.is_online()).await;
    let n = 500;
    let driver = write_latencies(site.board(TCP), n).await;
    let mut ctx = tokio_modbus::client::tcp::connect_slave(site.tcp_addr, tokio_modbus::Slave(1))
        .await
        .expect("bare client connects");
    let mut bare = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        ctx.write_single_coil((i % 8) as u16, i % 2 == 0)
            .await
            .expect("transport")
            .expect("no exception");
        bare.push(t.elapsed());
    }
    bare.sort();
    println!(
        "TCP write round trip over {n} writes: driver p50 {:?} p99 {:?}; bare tokio-modbus \
         p50 {:?} p99 {:?}",
        percentile(&driver, 0.5),
        percentile(&driver, 0.99),
        percentile(&bare, 0.5),
        percentile(&bare, 0.99),
    );
    site.sim.stop().await;
}
