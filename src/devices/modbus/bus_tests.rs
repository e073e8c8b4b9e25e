//! Several boards on one RTU line (hw-sim gives each board its own pty, so the shared bus
//! is tested here): a fake bus on an in-memory pipe records when each frame arrives.

use super::wire::{Opener, RtuWire, Stream, Wire};
use super::*;
use crate::config::{ModbusTransport, RelayBoardConfig};
use std::sync::Mutex as StdMutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

/// What the fake bus saw: per request, the unit, the function, when it arrived and when
/// the answer was written (`None`: that unit is silent).
#[derive(Debug, Clone)]
struct Seen {
    unit: u8,
    fc: u8,
    arrived: Instant,
    answered: Option<Instant>,
}

/// Serves 8-byte requests (FC1, FC2, FC5) for `answering` units; others stay silent.
async fn fake_bus(mut line: DuplexStream, answering: Vec<u8>, seen: Arc<StdMutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64];
    loop {
        let Ok(n) = line.read(&mut chunk).await else {
            return;
        };
        if n == 0 {
            return;
        }
        let arrived = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 8 {
            let frame: Vec<u8> = buf.drain(..8).collect();
            assert_eq!(
                crc16(&frame[..6]).to_le_bytes(),
                [frame[6], frame[7]],
                "bad CRC from the driver"
            );
            let (unit, fc) = (frame[0], frame[1]);
            let mut entry = Seen {
                unit,
                fc,
                arrived,
                answered: None,
            };
            if answering.contains(&unit) {
                let answer = match fc {
                    1 | 2 => {
                        let qty = u16::from_be_bytes([frame[4], frame[5]]);
                        let bytes = usize::from(qty).div_ceil(8);
                        let mut body = vec![unit, fc, bytes as u8];
                        body.extend(std::iter::repeat_n(0u8, bytes));
                        seal(body)
                    }
                    _ => frame.clone(), // FC5 echoes the request
                };
                if line.write_all(&answer).await.is_err() {
                    return;
                }
                entry.answered = Some(Instant::now());
            }
            seen.lock().unwrap().push(entry);
        }
    }
}

fn board(id: &str, unit: u8, timeout_ms: u64) -> RelayBoardConfig {
    RelayBoardConfig {
        id: id.into(),
        transport: ModbusTransport::Rtu,
        address: String::new(),
        port: "bus".into(),
        baud: 1200,
        parity: "none".into(),
        stop_bits: 1,
        unit_id: unit,
        coils: 8,
        inputs: 8,
        response_delay_ms: None,
        timeout_ms,
        poll_ms: 60_000,
        enabled: true,
    }
}

struct Bus {
    boards: BTreeMap<String, RelayBoard>,
    seen: Arc<StdMutex<Vec<Seen>>>,
    gap: Duration,
    _stop: watch::Sender<bool>,
}

fn start_bus(answering: Vec<u8>) -> Bus {
    let (ours, theirs) = tokio::io::duplex(1024);
    let seen = Arc::new(StdMutex::new(Vec::new()));
    tokio::spawn(fake_bus(theirs, answering, seen.clone()));
    let mut stream = Some(ours);
    let open: Opener = Box::new(move || {
        stream
            .take()
            .map(|s| Box::new(s) as Box<dyn Stream>)
            .ok_or_else(|| std::io::Error::other("already opened"))
    });
    // 1200 baud 8N1: 3.5 characters of 10 bits = 29.2 ms, long enough to measure.
    let gap = timing::frame_gap(1200, timing::bits_per_char(false, 1));
    let cfgs = [board("b1", 1, 100), board("b2", 2, 100)];
    let refs: Vec<&RelayBoardConfig> = cfgs.iter().collect();
    let (events, _) = mpsc::channel(16);
    let (link, handles) = build_link(
        "rtu test".into(),
        Wire::Rtu(RtuWire::new(open, gap)),
        &refs,
        events,
    );
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(link.run(shutdown));
    Bus {
        boards: handles.into_iter().collect(),
        seen,
        gap,
        _stop: stop,
    }
}

#[tokio::test]
async fn boards_sharing_a_line_take_turns_with_the_spec_gap() {
    let bus = start_bus(vec![1, 2]);
    let (b1, b2) = (&bus.boards["b1"], &bus.boards["b2"]);
    for i in 0..5u16 {
        b1.write_coil(i, true).await.expect("b1 write");
        b2.write_coil(i, false).await.expect("b2 write");
        assert_eq!(b2.read_coils(0, 8).await.expect("b2 read").len(), 8);
    }
    let seen = bus.seen.lock().unwrap().clone();
    assert!(seen.iter().any(|s| s.unit == 1 && s.fc == 5));
    assert!(seen.iter().any(|s| s.unit == 2 && s.fc == 5));
    for pair in seen.windows(2) {
        let Some(answered) = pair[0].answered else {
            continue;
        };
        let silence = pair[1].arrived.duration_since(answered);
        // The pipe has no wire time; allow 1 ms of scheduling slop in measuring.
        assert!(
            silence + Duration::from_millis(1) >= bus.gap,
            "only {silence:?} of silence between frames (need {:?}): {pair:?}",
            bus.gap
        );
    }
}

#[tokio::test]
async fn a_silent_board_goes_offline_without_holding_up_its_neighbour() {
    let bus = start_bus(vec![1]);
    let (b1, b2) = (&bus.boards["b1"], &bus.boards["b2"]);
    let mut health = b2.health();
    // b2 never answers: its polls and requests time out until it is offline.
    let deadline = Duration::from_secs(5);
    let mut failures = 0;
    while health.borrow().state != BoardState::Offline {
        match tokio::time::timeout(deadline, b2.write_coil(0, true)).await {
            Ok(Err(ModbusError::Timeout { .. })) => failures += 1,
            Ok(Err(ModbusError::Offline { .. })) => break,
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            failures <= OFFLINE_AFTER,
            "still not offline after {failures} timeouts"
        );
    }
    health
        .wait_for(|h| h.state == BoardState::Offline)
        .await
        .expect("health");
    // Offline: refused at once.
    let t = Instant::now();
    assert!(matches!(
        b2.write_coil(0, true).await,
        Err(ModbusError::Offline { .. })
    ));
    assert!(t.elapsed() < Duration::from_millis(20));
    // The neighbour keeps working; only an occasional probe of b2 (100 ms timeout) can
    // stand in its way.
    for i in 0..10u16 {
        let t = Instant::now();
        b1.write_coil(i % 8, i % 2 == 0).await.expect("b1 write");
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "b1 write took {:?}",
            t.elapsed()
        );
    }
    assert!(b1.health().borrow().is_online());
}

#[test]
fn boards_on_one_port_must_agree_on_the_line() {
    let (events, _) = mpsc::channel(1);
    let mut b = board("b2", 2, 100);
    b.baud = 9600;
    let err = RelayBoards::new(&[board("b1", 1, 100), b], events.clone()).unwrap_err();
    assert!(matches!(err, ModbusError::Config(_)), "{err}");
    let err =
        RelayBoards::new(&[board("b1", 1, 100), board("b2", 1, 100)], events.clone()).unwrap_err();
    assert!(matches!(err, ModbusError::Config(_)), "{err}");
    let ok = RelayBoards::new(&[board("b1", 1, 100), board("b2", 2, 100)], events).unwrap();
    assert_eq!(ok.links.len(), 1, "one task per serial port");
    assert_eq!(ok.boards.len(), 2);
}
