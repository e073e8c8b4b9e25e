//! Modbus relay/sensor boards: coils (gate strikes, overlock relays) and discrete inputs
//! (door sensors, gate position) behind a Modbus TCP server or a Modbus RTU server on a
//! pseudo-terminal.
//!
//! Both transports share one request handler (`Board::handle`): unit-id filter, faults,
//! the coil/input map, observations, response delay. TCP runs tokio-modbus's server with a
//! transport wrapper (`TcpWire`) that can mangle an answer on its way out. RTU has its own
//! framer (`RtuFramer`) and writes its own answers, because tokio-modbus's RTU server
//! gives up (and returns) after 20 bytes of garbage, drops unknown function codes as noise
//! without an answer, and owns the write path, so it could neither report garbage, nor
//! answer IllegalFunction, nor send a bad CRC. PDUs are still decoded by tokio-modbus.
//!
//! Supported: read coils (FC1), read discrete inputs (FC2), write single coil (FC5), write
//! multiple coils (FC15). Any other function answers IllegalFunction; addresses past the
//! board answer IllegalDataAddress; bad quantities or values answer IllegalDataValue.
//! Requests for another unit id are ignored; unit 0 (broadcast) writes are applied, never
//! answered.
//!
//! Observations: `coil_changed {coil, on}` and `input_changed {input, on}` (on change only),
//! `frame_received {function, unit, transport, count}` (every write; other requests at most
//! once a second, `count` = requests since the previous one), `exception {function, code,
//! exception, transport}`, `frame_corrupted {transport, ...}` for garbage.
//!
//! Faults: `offline` (requests not even seen; TCP connections stay open, silent), `delay`
//! (+value ms on top of `response_delay_ms`), `drop` (the board acts, the answer is lost, at
//! a rate), `corrupt` (RTU: bad CRC; TCP: the transaction id mangled, at a rate).

use crate::config::{ModbusTransport, RelayBoardConfig};
use crate::fault::Faults;
use crate::line::{LineClock, LineTiming, Transit};
use crate::observe::Bus;
use crate::pty::PtyPair;
use crate::{DeviceContext, SimError};
use serde::Serialize;
use serde_json::json;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_modbus::bytes::Bytes;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

/// Coils and inputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayState {
    /// Coil states.
    pub coils: Vec<bool>,
    /// Discrete input states.
    pub inputs: Vec<bool>,
}

/// A running board. Cheap to clone.
#[derive(Clone)]
pub struct RelayBoard {
    board: Arc<Board>,
    address: serde_json::Value,
    stop: Arc<watch::Sender<bool>>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl RelayBoard {
    /// Starts the board's server: listening (TCP, `:0` allowed) or its pseudo-terminal
    /// linked (RTU) when this returns.
    pub async fn start(
        cfg: &RelayBoardConfig,
        ctx: &DeviceContext,
    ) -> Result<RelayBoard, SimError> {
        let board = Arc::new(Board {
            cfg: cfg.clone(),
            state: Mutex::new(RelayState {
                coils: vec![false; cfg.coils as usize],
                inputs: vec![false; cfg.inputs as usize],
            }),
            bus: ctx.bus.clone(),
            faults: ctx.faults.clone(),
            tally: Mutex::new(Tally::default()),
        });
        let (stop, own_stop) = watch::channel(false);
        let stopped = stopped(ctx.shutdown.clone(), own_stop);
        let (address, task) = match cfg.transport {
            ModbusTransport::Tcp => {
                let listener =
                    TcpListener::bind(&cfg.address)
                        .await
                        .map_err(SimError::io(format!(
                            "relay board {}: binding {}",
                            cfg.id, cfg.address
                        )))?;
                let bound = listener
                    .local_addr()
                    .map_err(SimError::io(format!("relay board {}: address", cfg.id)))?;
                tracing::info!(board = %cfg.id, address = %bound, unit = cfg.unit_id, "modbus tcp board listening");
                let address = json!({
                    "transport": "tcp", "address": bound.to_string(), "unit_id": cfg.unit_id,
                });
                let task = tokio::spawn(run_tcp(board.clone(), listener, stopped));
                (address, task)
            }
            ModbusTransport::Rtu => {
                let pty =
                    crate::pty::open(std::path::Path::new(&cfg.port)).map_err(SimError::io(
                        format!("relay board {}: pseudo-terminal at {}", cfg.id, cfg.port),
                    ))?;
                tracing::info!(board = %cfg.id, serial = %cfg.port, pty = %pty.slave_path.display(),
                    unit = cfg.unit_id, "modbus rtu board on pseudo-terminal");
                let address = json!({
                    "transport": "rtu", "serial": cfg.port, "pty": pty.slave_path,
                    "baud": cfg.baud, "parity": cfg.parity, "stop_bits": cfg.stop_bits,
                    "unit_id": cfg.unit_id, "line_timing": ctx.line_timing.contains(&cfg.id),
                });
                let line = ctx
                    .line_timing
                    .contains(&cfg.id)
                    .then(|| LineClock::new(LineTiming::new(cfg.baud, &cfg.parity, cfg.stop_bits)));
                let task = tokio::spawn(run_rtu(board.clone(), pty, line, stopped));
                (address, task)
            }
        };
        Ok(RelayBoard {
            board,
            address,
            stop: Arc::new(stop),
            task: Arc::new(Mutex::new(Some(task))),
        })
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.board.cfg.id
    }

    /// Where it listens: `{"transport": "tcp", "address": "127.0.0.1:PORT", "unit_id"}` or
    /// `{"transport": "rtu", "serial": link, "pty": "/dev/pts/N", "baud", ..., "unit_id"}`.
    pub fn address(&self) -> serde_json::Value {
        self.address.clone()
    }

    /// Coils and inputs now.
    pub fn state(&self) -> RelayState {
        self.board
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Sets a discrete input (a door opens: `on`); observed as `input_changed` if it changed.
    pub fn set_input(&self, n: u16, on: bool) -> Result<(), SimError> {
        let b = &self.board;
        let changed = {
            let mut s = b
                .state
                .lock()
                .map_err(|_| SimError::BadRequest("state poisoned".into()))?;
            let count = s.inputs.len();
            let slot = s.inputs.get_mut(n as usize).ok_or_else(|| {
                SimError::NotFound(format!(
                    "board {} has no input {n} (it has {count})",
                    b.cfg.id
                ))
            })?;
            std::mem::replace(slot, on) != on
        };
        if changed {
            b.bus
                .emit(&b.cfg.id, "input_changed", json!({"input": n, "on": on}));
        }
        Ok(())
    }

    /// Stops its server (and removes its pseudo-terminal link).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Resolves when the simulator or this board stops (or their senders are gone).
async fn stopped(mut sim: watch::Receiver<bool>, mut own: watch::Receiver<bool>) {
    tokio::select! {
        _ = sim.wait_for(|s| *s) => {}
        _ = own.wait_for(|s| *s) => {}
    }
}

/// The board itself, shared by its transport tasks.
struct Board {
    cfg: RelayBoardConfig,
    state: Mutex<RelayState>,
    bus: Bus,
    faults: Faults,
    tally: Mutex<Tally>,
}

/// Requests seen since the last `frame_received` observation (polls are not reported one
/// by one: a gateway polling every 100 ms would drown the stream).
#[derive(Default)]
struct Tally {
    count: u64,
    last: Option<Instant>,
}

/// How often polls (anything but a write) are reported at most.
const POLL_REPORT_EVERY: Duration = Duration::from_secs(1);

/// What to do with a request.
enum Outcome {
    /// Send nothing (not ours, broadcast, offline, dropped).
    Silent,
    /// Answer; `corrupt`: damage it on the wire.
    Answer {
        answer: Result<Response, ExceptionCode>,
        corrupt: bool,
    },
}

/// A request as the transport decoded it.
enum Incoming {
    /// A PDU tokio-modbus could decode.
    Request(Request<'static>),
    /// A CRC-valid frame whose PDU does not decode (e.g. FC5 with value 0x1234).
    Malformed(u8),
}

const FC_WRITE_COIL: u8 = 0x05;
const FC_WRITE_COILS: u8 = 0x0F;

/// Modbus limits on quantities per request (spec §6.1, §6.2, §6.11).
const MAX_READ_BITS: usize = 2000;
const MAX_WRITE_BITS: usize = 1968;

impl Board {
    fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Serves one request addressed to `unit`: the whole device behaviour, transport aside.
    async fn handle(&self, unit: u8, incoming: Incoming, transport: &'static str) -> Outcome {
        // On a shared bus the other slaves' requests pass by: only ours (and broadcasts).
        // Over TCP the unit id 0xFF means "the device at this address" (Modbus TCP spec).
        let ours = unit == self.cfg.unit_id || unit == 0 || (transport == "tcp" && unit == 0xFF);
        if !ours {
            tracing::trace!(board = %self.id(), unit, "request for another unit ignored");
            return Outcome::Silent;
        }
        // Switched off: it does not even see the request.
        if self.faults.offline(self.id()) {
            tracing::debug!(board = %self.id(), "offline: request not answered");
            return Outcome::Silent;
        }
        let fc = match &incoming {
            Incoming::Request(r) => r.function_code().value(),
            Incoming::Malformed(fc) => *fc,
        };
        self.note_frame(fc, unit, transport);
        let answer = match incoming {
            Incoming::Request(req) => self.apply(req),
            Incoming::Malformed(_) => Err(ExceptionCode::IllegalDataValue),
        };
        if let Err(code) = &answer {
            self.bus.emit(
                self.id(),
                "exception",
                json!({"function": fc, "code": u8::from(*code), "exception": format!("{code:?}"),
                       "transport": transport}),
            );
        }
        if unit == 0 {
            // Broadcast: applied, never answered.
            return Outcome::Silent;
        }
        let delay = Duration::from_millis(self.cfg.response_delay_ms)
            + self.faults.delay(self.id()).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // A dropped reply: the board acted on the request, the answer is lost.
        if self.faults.drop_now(self.id()) {
            tracing::debug!(board = %self.id(), "drop fault: reply not sent");
            return Outcome::Silent;
        }
        Outcome::Answer {
            answer,
            corrupt: self.faults.corrupt_now(self.id()),
        }
    }

    /// Reports the request: writes one by one, everything else at most once a second.
    fn note_frame(&self, fc: u8, unit: u8, transport: &'static str) {
        let Ok(mut t) = self.tally.lock() else { return };
        t.count += 1;
        let write = fc == FC_WRITE_COIL || fc == FC_WRITE_COILS;
        if write || t.last.is_none_or(|l| l.elapsed() >= POLL_REPORT_EVERY) {
            self.bus.emit(
                self.id(),
                "frame_received",
                json!({"function": fc, "unit": unit, "transport": transport,
                       "count": t.count}),
            );
            t.count = 0;
            t.last = Some(Instant::now());
        }
    }

    /// Executes a request against the coil/input map.
    fn apply(&self, req: Request<'static>) -> Result<Response, ExceptionCode> {
        let Ok(mut s) = self.state.lock() else {
            return Err(ExceptionCode::ServerDeviceFailure);
        };
        match req {
            Request::ReadCoils(addr, qty) => {
                read_bits(&s.coils, addr, qty, MAX_READ_BITS).map(Response::ReadCoils)
            }
            Request::ReadDiscreteInputs(addr, qty) => {
                read_bits(&s.inputs, addr, qty, MAX_READ_BITS).map(Response::ReadDiscreteInputs)
            }
            Request::WriteSingleCoil(addr, on) => {
                let slot = s
                    .coils
                    .get_mut(addr as usize)
                    .ok_or(ExceptionCode::IllegalDataAddress)?;
                if std::mem::replace(slot, on) != on {
                    self.bus
                        .emit(self.id(), "coil_changed", json!({"coil": addr, "on": on}));
                }
                Ok(Response::WriteSingleCoil(addr, on))
            }
            Request::WriteMultipleCoils(addr, values) => {
                let range = bit_range(s.coils.len(), addr, values.len(), MAX_WRITE_BITS)?;
                for (i, (slot, &on)) in s.coils[range].iter_mut().zip(values.iter()).enumerate() {
                    if std::mem::replace(slot, on) != on {
                        self.bus.emit(
                            self.id(),
                            "coil_changed",
                            json!({"coil": addr as usize + i, "on": on}),
                        );
                    }
                }
                // The quantity fits: bit_range capped it at MAX_WRITE_BITS.
                Ok(Response::WriteMultipleCoils(addr, values.len() as u16))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }

    /// Garbage on the line or a connection: a log line and an observation.
    fn report_garbage(&self, transport: &'static str, data: serde_json::Value) {
        tracing::warn!(board = %self.id(), transport, %data, "garbage received; resynchronising");
        let mut data = data;
        data["transport"] = json!(transport);
        self.bus.emit(self.id(), "frame_corrupted", data);
    }
}

/// The index range of `qty` bits from `addr`, or the exception the spec asks for.
fn bit_range(
    len: usize,
    addr: u16,
    qty: usize,
    max: usize,
) -> Result<std::ops::Range<usize>, ExceptionCode> {
    if qty == 0 || qty > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    let start = addr as usize;
    if start + qty > len {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(start..start + qty)
}

fn read_bits(bits: &[bool], addr: u16, qty: u16, max: usize) -> Result<Vec<bool>, ExceptionCode> {
    bit_range(bits.len(), addr, qty as usize, max).map(|r| bits[r].to_vec())
}

// --- Modbus TCP -------------------------------------------------------------------------

/// One TCP connection's view of the board (tokio-modbus calls it per request).
struct TcpSession {
    board: Arc<Board>,
    corrupt_next: Arc<AtomicBool>,
}

impl tokio_modbus::server::Service for TcpSession {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let board = self.board.clone();
        let corrupt_next = self.corrupt_next.clone();
        Box::pin(async move {
            match board
                .handle(req.slave, Incoming::Request(req.request), "tcp")
                .await
            {
                Outcome::Silent => Ok(None),
                Outcome::Answer { answer, corrupt } => {
                    if corrupt {
                        corrupt_next.store(true, Ordering::Release);
                    }
                    answer.map(Some)
                }
            }
        })
    }
}

/// A TCP connection as the board sees it. Reading, it checks each MBAP header as it
/// arrives (protocol id 0, a length a PDU can have), so garbage fails at once instead of
/// leaving tokio-modbus's codec waiting for a 12 kB "frame" that `GET / HTTP/1.1` announces.
/// Writing, it can mangle the next answer: the MBAP transaction id is inverted, so the
/// client sees a frame that does not belong to its request.
struct TcpWire {
    stream: TcpStream,
    peer: SocketAddr,
    corrupt_next: Arc<AtomicBool>,
    mbap: MbapCheck,
}

/// Where the incoming byte stream is: in a header, or in a body of known length.
#[derive(Debug, Default)]
struct MbapCheck {
    header: Vec<u8>,
    body_left: usize,
}

/// MBAP header length (transaction, protocol, length, unit).
const MBAP_LEN: usize = 7;
/// Largest MBAP length field: unit id + a 253-byte PDU.
const MBAP_MAX_LENGTH: usize = 254;

impl MbapCheck {
    /// Follows `bytes`; an error names the first impossible header.
    fn follow(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (MBAP_LEN - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == MBAP_LEN {
                let h = std::mem::take(&mut self.header);
                let protocol = u16::from_be_bytes([h[2], h[3]]);
                let length = usize::from(u16::from_be_bytes([h[4], h[5]]));
                if protocol != 0 || !(2..=MBAP_MAX_LENGTH).contains(&length) {
                    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                    return Err(format!(
                        "not a Modbus TCP header: {hex} (protocol {protocol}, length {length})"
                    ));
                }
                self.body_left = length - 1;
            }
        }
        Ok(())
    }
}

impl AsyncRead for TcpWire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res
            && let Err(e) = self.mbap.follow(&buf.filled()[before..])
        {
            let e = format!("from {}: {e}", self.peer);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        res
    }
}

impl AsyncWrite for TcpWire {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The server writes one answer at a time and an answer (≤ 260 bytes) goes out in
        // one write, so the first bytes of this write are the answer's MBAP header.
        if buf.len() >= 2 && self.corrupt_next.load(Ordering::Acquire) {
            let mut mangled = buf.to_vec();
            mangled[0] ^= 0xFF;
            mangled[1] ^= 0xFF;
            let res = Pin::new(&mut self.stream).poll_write(cx, &mangled);
            if matches!(res, Poll::Ready(Ok(n)) if n >= 2) {
                self.corrupt_next.store(false, Ordering::Release);
            }
            return res;
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn run_tcp(board: Arc<Board>, listener: TcpListener, stopped: impl Future<Output = ()>) {
    let server = tokio_modbus::server::tcp::Server::new(listener);
    let on_connected = |stream: TcpStream, peer: SocketAddr| {
        let board = board.clone();
        async move {
            tracing::debug!(board = %board.id(), %peer, "modbus tcp client connected");
            let corrupt_next = Arc::new(AtomicBool::new(false));
            Ok(Some((
                TcpSession {
                    board,
                    corrupt_next: corrupt_next.clone(),
                },
                TcpWire {
                    stream,
                    peer,
                    corrupt_next,
                    mbap: MbapCheck::default(),
                },
            )))
        }
    };
    // A connection ends with an error: garbage (its codec cannot frame it) closes only that
    // connection; a reset is just a client going away.
    let on_error = {
        let board = board.clone();
        move |e: io::Error| {
            if e.kind() == io::ErrorKind::InvalidData {
                board.report_garbage(
                    "tcp",
                    json!({"error": e.to_string(), "action": "connection closed"}),
                );
            } else {
                tracing::debug!(board = %board.id(), error = %e, "modbus tcp connection ended");
            }
        }
    };
    let serve = async {
        loop {
            // Only accept() failing (e.g. out of file descriptors) ends serve(): retry.
            if let Err(e) = server.serve(&on_connected, on_error.clone()).await {
                tracing::error!(board = %board.id(), error = %e, "modbus tcp accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // Dropping serve() cancels every connection task (tokio-modbus ties them to it).
    tokio::select! {
        () = serve => {}
        () = stopped => {}
    }
}

// --- Modbus RTU -------------------------------------------------------------------------

/// Smallest RTU ADU: unit, function, CRC.
const MIN_ADU: usize = 4;
/// Largest RTU ADU (Modbus over serial line, §2.5.1.1).
const MAX_ADU: usize = 256;
/// Garbage is reported at the latest after this many dropped bytes.
const GARBAGE_REPORT_BYTES: usize = 256;

/// CRC-16/MODBUS (reflected 0xA001, initial 0xFFFF), sent low byte first.
fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0xFFFF, |crc, &b| crc16_step(crc, b))
}

fn crc16_step(crc: u16, byte: u8) -> u16 {
    let mut crc = crc ^ u16::from(byte);
    for _ in 0..8 {
        crc = if crc & 1 != 0 {
            (crc >> 1) ^ 0xA001
        } else {
            crc >> 1
        };
    }
    crc
}

fn crc_ok(adu: &[u8]) -> bool {
    let (body, crc) = adu.split_at(adu.len() - 2);
    crc16(body) == u16::from_le_bytes([crc[0], crc[1]])
}

/// Appends the CRC to an ADU body.
fn seal(mut adu: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&adu);
    adu.extend_from_slice(&crc.to_le_bytes());
    adu
}

/// Length of the request ADU starting the buffer: `Some(Some(n))` known, `Some(None)` not
/// known yet (a byte count still to come), `None` a function code without a fixed layout.
fn request_len(buf: &[u8]) -> Option<Option<usize>> {
    let fc = *buf.get(1)?;
    let counted = |at: usize, fixed: usize| Some(buf.get(at).map(|&n| fixed + usize::from(n)));
    match fc {
        0x01..=0x06 | 0x08 => Some(Some(8)),
        0x07 | 0x0B | 0x0C | 0x11 => Some(Some(4)),
        0x0F | 0x10 => counted(6, 9),
        0x16 => Some(Some(10)),
        0x17 => counted(10, 13),
        0x18 => Some(Some(6)),
        _ => None,
    }
}

/// Garbage dropped while looking for frames.
#[derive(Debug, Default, PartialEq)]
struct Garbage {
    bytes: usize,
    head: Vec<u8>,
}

/// Finds RTU request frames in a byte stream. Bytes that start no CRC-valid frame are
/// dropped one at a time until one does (resynchronisation); an incomplete frame is kept
/// until the line has been silent for a frame gap, then dropped too. No I/O.
#[derive(Debug, Default)]
struct RtuFramer {
    buf: Vec<u8>,
    garbage: Garbage,
}

enum Scan {
    Frame(usize),
    Wait,
    Bad,
}

impl RtuFramer {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next CRC-checked ADU (CRC included). `silent`: the line has been quiet for a
    /// frame gap, so an incomplete frame will never complete.
    fn next_frame(&mut self, silent: bool) -> Option<Vec<u8>> {
        while !self.buf.is_empty() {
            match self.scan() {
                Scan::Frame(n) => return Some(self.buf.drain(..n).collect()),
                Scan::Wait if !silent && self.buf.len() < MAX_ADU => return None,
                Scan::Wait | Scan::Bad => {
                    let b = self.buf.remove(0);
                    self.garbage.bytes += 1;
                    if self.garbage.head.len() < 32 {
                        self.garbage.head.push(b);
                    }
                }
            }
        }
        None
    }

    fn scan(&self) -> Scan {
        let b = &self.buf;
        if b.len() < MIN_ADU {
            return Scan::Wait;
        }
        match request_len(b) {
            Some(Some(n)) if n > MAX_ADU => Scan::Bad,
            Some(Some(n)) if b.len() < n => Scan::Wait,
            Some(Some(n)) if crc_ok(&b[..n]) => Scan::Frame(n),
            Some(Some(_)) => Scan::Bad,
            Some(None) => Scan::Wait,
            // No fixed layout (e.g. 0x2B, or a function that does not exist): the shortest
            // prefix with a valid CRC is the frame (one running CRC, so garbage costs
            // O(MAX_ADU) per dropped byte).
            None => {
                let mut crc = 0xFFFF;
                for n in 1..=b.len().min(MAX_ADU) - 2 {
                    crc = crc16_step(crc, b[n - 1]);
                    if n + 2 >= MIN_ADU && crc == u16::from_le_bytes([b[n], b[n + 1]]) {
                        return Scan::Frame(n + 2);
                    }
                }
                Scan::Wait
            }
        }
    }

    /// The garbage dropped so far, if it is time to report it (`now`: a frame or a silence
    /// ended the run).
    fn take_garbage(&mut self, now: bool) -> Option<Garbage> {
        let g = &self.garbage;
        (g.bytes > 0 && (now || g.bytes >= GARBAGE_REPORT_BYTES))
            .then(|| std::mem::take(&mut self.garbage))
    }
}

/// Encodes an answer's PDU (only the answers [`Board::apply`] gives).
fn encode_pdu(fc: u8, answer: &Result<Response, ExceptionCode>) -> Vec<u8> {
    let exception = |code: ExceptionCode| vec![fc | 0x80, u8::from(code)];
    match answer {
        Ok(Response::ReadCoils(bits)) | Ok(Response::ReadDiscreteInputs(bits)) => {
            let mut pdu = vec![fc, bits.len().div_ceil(8) as u8];
            for chunk in bits.chunks(8) {
                pdu.push(
                    chunk
                        .iter()
                        .enumerate()
                        .fold(0u8, |acc, (i, &on)| acc | (u8::from(on) << i)),
                );
            }
            pdu
        }
        Ok(Response::WriteSingleCoil(addr, on)) => {
            let [a, b] = addr.to_be_bytes();
            vec![fc, a, b, if *on { 0xFF } else { 0x00 }, 0x00]
        }
        Ok(Response::WriteMultipleCoils(addr, qty)) => {
            let [a, b] = addr.to_be_bytes();
            let [c, d] = qty.to_be_bytes();
            vec![fc, a, b, c, d]
        }
        Ok(_) => exception(ExceptionCode::ServerDeviceFailure),
        Err(code) => exception(*code),
    }
}

/// Damages an ADU so its CRC fails: one bit of the CRC flipped, so the frame's length and
/// content stay readable and the receiver sees exactly a CRC error.
fn damage(adu: &mut [u8]) {
    let at = adu.len().saturating_sub(1 + rand::random_range(0..2usize));
    if let Some(b) = adu.get_mut(at) {
        *b ^= 1 << rand::random_range(0..8u32);
    }
}

/// The silence that ends a frame: 3.5 characters (11 bits each) at the line's baud rate,
/// but at least 10 ms, since a pseudo-terminal has no baud timing and the scheduler jitters.
fn frame_gap(baud: u32) -> Duration {
    let chars = Duration::from_micros(3_500_000 * 11 / u64::from(baud.max(1)));
    chars.max(Duration::from_millis(10))
}

/// How long a write may wait for the panel to read before the queue is flushed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

async fn run_rtu(
    board: Arc<Board>,
    mut pty: PtyPair,
    mut line: Option<LineClock>,
    stopped: impl Future<Output = ()>,
) {
    tokio::select! {
        () = rtu_loop(&board, &mut pty, &mut line) => {}
        () = stopped => {}
    }
    // Dropping the pair removes the link.
    drop(pty);
}

/// With line timing (`line`), a request reaches the board once its bytes and the t3.5
/// silence that ends it have crossed the line, and answers leave at the baud rate.
async fn rtu_loop(board: &Board, pty: &mut PtyPair, line: &mut Option<LineClock>) {
    let gap = frame_gap(board.cfg.baud);
    let mut framer = RtuFramer::default();
    let mut chunk = [0u8; 512];
    loop {
        while let Some(adu) = framer.next_frame(false) {
            if let Some(g) = framer.take_garbage(true) {
                report_rtu_garbage(board, g);
            }
            end_of_frame(line).await;
            serve_rtu(board, pty, line, &adu).await;
        }
        if let Some(g) = framer.take_garbage(false) {
            report_rtu_garbage(board, g);
        }
        // With a partial frame buffered, wait at most a frame gap for the rest.
        let read = pty.master.read(&mut chunk);
        let got = if framer.buf.is_empty() {
            Some(read.await)
        } else {
            tokio::time::timeout(gap, read).await.ok()
        };
        match got {
            Some(Ok(n)) if n > 0 => {
                if let Some(line) = line.as_mut() {
                    // The chunk crosses the line behind whatever is still on it.
                    let start = line.reserve(Instant::now(), n);
                    let arrived = start + line.timing().wire_time(n);
                    tokio::time::sleep_until(arrived.into()).await;
                }
                framer.push(&chunk[..n]);
            }
            Some(res) => {
                // The simulator holds the slave end open, so this is unexpected: back off
                // rather than spin.
                tracing::warn!(board = %board.id(), result = ?res.map(|_| "end of file"),
                    "reading the pseudo-terminal failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None => {
                while let Some(adu) = framer.next_frame(true) {
                    if let Some(g) = framer.take_garbage(true) {
                        report_rtu_garbage(board, g);
                    }
                    end_of_frame(line).await;
                    serve_rtu(board, pty, line, &adu).await;
                }
                if let Some(g) = framer.take_garbage(true) {
                    report_rtu_garbage(board, g);
                }
            }
        }
    }
}

fn report_rtu_garbage(board: &Board, g: Garbage) {
    let head: String = g.head.iter().map(|b| format!("{b:02x}")).collect();
    board.report_garbage(
        "rtu",
        json!({"dropped_bytes": g.bytes, "head_hex": head,
               "error": "no CRC-valid request frame"}),
    );
}

/// With line timing: a slave knows a frame has ended only after t3.5 of silence.
async fn end_of_frame(line: &mut Option<LineClock>) {
    if let Some(line) = line.as_mut() {
        line.silence(Instant::now(), line.timing().t35());
        if let Some(free) = line.free_at() {
            tokio::time::sleep_until(free.into()).await;
        }
    }
}

/// Writes an answer: at once, or with line timing paced at the baud rate once the line is
/// free, followed by t3.5 of silence.
async fn send_rtu(pty: &mut PtyPair, line: &mut Option<LineClock>, frame: &[u8]) -> io::Result<()> {
    let Some(line) = line.as_mut() else {
        return pty.master.write_all(frame).await;
    };
    let mut transit = Transit::new(line.timing());
    transit.push(line, Instant::now(), frame);
    let mut due = Vec::with_capacity(frame.len());
    while let Some(next) = transit.next_due() {
        tokio::time::sleep_until(next.into()).await;
        due.clear();
        transit.take_due(Instant::now(), usize::MAX, &mut due);
        pty.master.write_all(&due).await?;
    }
    line.silence(Instant::now(), line.timing().t35());
    Ok(())
}

/// Serves one CRC-checked ADU.
async fn serve_rtu(board: &Board, pty: &mut PtyPair, line: &mut Option<LineClock>, adu: &[u8]) {
    let unit = adu[0];
    let pdu = &adu[1..adu.len() - 2];
    let fc = pdu[0];
    if unit != board.cfg.unit_id && unit != 0 {
        tracing::trace!(board = %board.id(), unit, "frame for another unit ignored");
        return;
    }
    let incoming = match Request::try_from(Bytes::copy_from_slice(pdu)) {
        Ok(req) => Incoming::Request(req),
        Err(e) if fc < 0x80 => {
            tracing::debug!(board = %board.id(), fc, error = %e, "malformed request");
            Incoming::Malformed(fc)
        }
        Err(e) => {
            // An exception function code in a request: nothing a master sends.
            board.report_garbage(
                "rtu",
                json!({"error": e.to_string(), "function": fc, "action": "ignored"}),
            );
            return;
        }
    };
    let Outcome::Answer { answer, corrupt } = board.handle(unit, incoming, "rtu").await else {
        return;
    };
    let mut body = vec![unit];
    body.extend(encode_pdu(fc, &answer));
    let mut frame = seal(body);
    if corrupt {
        damage(&mut frame);
        tracing::debug!(board = %board.id(), "corrupt fault: answer sent with a bad CRC");
    }
    match tokio::time::timeout(WRITE_TIMEOUT, send_rtu(pty, line, &frame)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(board = %board.id(), error = %e, "writing the answer failed"),
        Err(_) => {
            // Nobody reads the line (a panel sent requests and went away): discard the
            // unread answers so the board is not stuck behind them.
            use tokio_serial::SerialPort;
            tracing::warn!(board = %board.id(), "answers not read by any panel; flushing the line");
            if let Err(e) = pty._slave.clear(tokio_serial::ClearBuffer::Input) {
                tracing::warn!(board = %board.id(), error = %e, "flushing the line failed");
            }
        }
    }
}

/// The RTU request framer, for the fuzz targets in `fuzz/` only (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    /// [`super::RtuFramer`] behind a public face.
    #[derive(Debug, Default)]
    pub struct Framer(super::RtuFramer);

    impl Framer {
        /// Appends received bytes.
        pub fn push(&mut self, bytes: &[u8]) {
            self.0.push(bytes);
        }

        /// The next CRC-checked ADU; `silent`: a frame gap has passed.
        pub fn next_frame(&mut self, silent: bool) -> Option<Vec<u8>> {
            self.0.next_frame(silent)
        }

        /// Bytes still buffered.
        pub fn buffered(&self) -> usize {
            self.0.buf.len()
        }

        /// Garbage bytes dropped and not yet reported.
        pub fn garbage(&self) -> usize {
            self.0.garbage.bytes
        }

        /// Takes the garbage report, as the RTU loop does (`now`: a frame or silence).
        pub fn take_garbage(&mut self, now: bool) -> Option<usize> {
            self.0.take_garbage(now).map(|g| g.bytes)
        }
    }

    /// CRC-16/MODBUS.
    pub fn crc16(data: &[u8]) -> u16 {
        super::crc16(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FC1 read 8 coils from 0 at unit 1, the spec's worked example layout.
    fn read_coils_frame() -> Vec<u8> {
        seal(vec![0x01, 0x01, 0x00, 0x00, 0x00, 0x08])
    }

    #[test]
    fn crc_matches_the_reference_vector() {
        // Modbus over serial line spec, appendix B: 02 07 -> CRC 0x1241 sent 41 12.
        assert_eq!(seal(vec![0x02, 0x07]), vec![0x02, 0x07, 0x41, 0x12]);
        // CRC-16/MODBUS check value for "123456789".
        assert_eq!(crc16(b"123456789"), 0x4B37);
    }

    #[test]
    fn frame_split_across_reads_is_assembled() {
        let f = read_coils_frame();
        let mut fr = RtuFramer::default();
        fr.push(&f[..3]);
        assert_eq!(fr.next_frame(false), None);
        fr.push(&f[3..]);
        assert_eq!(fr.next_frame(false), Some(f));
        assert_eq!(fr.take_garbage(true), None);
    }

    #[test]
    fn garbage_before_a_frame_is_dropped_and_reported() {
        let f = read_coils_frame();
        let mut fr = RtuFramer::default();
        fr.push(b"\xff\xfe\x00garbage");
        fr.push(&f);
        // Unknown leading bytes wait for silence before they are given up.
        let mut got = fr.next_frame(false);
        if got.is_none() {
            got = fr.next_frame(true);
        }
        assert_eq!(got, Some(f));
        let g = fr.take_garbage(true).expect("garbage reported");
        assert_eq!(g.bytes, 10);
        assert_eq!(&g.head[..3], b"\xff\xfe\x00");
    }

    #[test]
    fn incomplete_frame_is_dropped_after_silence() {
        let mut fr = RtuFramer::default();
        fr.push(&read_coils_frame()[..5]);
        assert_eq!(fr.next_frame(false), None);
        assert_eq!(fr.take_garbage(false), None, "not yet: the rest may come");
        assert_eq!(fr.next_frame(true), None);
        assert_eq!(fr.take_garbage(true).map(|g| g.bytes), Some(5));
        assert!(fr.buf.is_empty());
    }

    #[test]
    fn bad_crc_frame_is_garbage_and_next_frame_still_decodes() {
        let mut bad = read_coils_frame();
        bad[7] ^= 0x55;
        let good = read_coils_frame();
        let mut fr = RtuFramer::default();
        fr.push(&bad);
        fr.push(&good);
        let mut got = fr.next_frame(false);
        if got.is_none() {
            got = fr.next_frame(true);
        }
        assert_eq!(got, Some(good));
        assert_eq!(fr.take_garbage(true).map(|g| g.bytes), Some(8));
    }

    #[test]
    fn unknown_function_with_valid_crc_is_a_frame() {
        // FC 0x41 (user-defined) with two data bytes.
        let f = seal(vec![0x01, 0x41, 0x12, 0x34]);
        let mut fr = RtuFramer::default();
        fr.push(&f);
        assert_eq!(fr.next_frame(false), Some(f));
    }

    #[test]
    fn endless_garbage_is_reported_in_bounded_runs() {
        let mut fr = RtuFramer::default();
        fr.push(&[0xEE; 1000]);
        assert_eq!(fr.next_frame(false), None);
        let g = fr
            .take_garbage(false)
            .expect("reported without waiting for silence");
        assert!(g.bytes >= GARBAGE_REPORT_BYTES);
        assert!(fr.buf.len() < MAX_ADU);
    }

    #[test]
    fn write_multiple_coils_length_comes_from_its_byte_count() {
        // FC15, 10 coils from 0x13: byte count 2.
        let f = seal(vec![0x01, 0x0F, 0x00, 0x13, 0x00, 0x0A, 0x02, 0xCD, 0x01]);
        let mut fr = RtuFramer::default();
        fr.push(&f[..6]);
        assert_eq!(fr.next_frame(false), None);
        fr.push(&f[6..]);
        assert_eq!(fr.next_frame(false), Some(f));
    }

    #[test]
    fn answers_encode_as_the_spec_shows() {
        // Spec §6.1 example: 10 coils -> byte count 2, CD 01.
        let bits = vec![
            true, false, true, true, false, false, true, true, true, false,
        ];
        assert_eq!(
            encode_pdu(1, &Ok(Response::ReadCoils(bits))),
            vec![0x01, 0x02, 0xCD, 0x01]
        );
        assert_eq!(
            encode_pdu(5, &Ok(Response::WriteSingleCoil(0xAC, true))),
            vec![0x05, 0x00, 0xAC, 0xFF, 0x00]
        );
        assert_eq!(
            encode_pdu(15, &Ok(Response::WriteMultipleCoils(0x13, 10))),
            vec![0x0F, 0x00, 0x13, 0x00, 0x0A]
        );
        assert_eq!(
            encode_pdu(1, &Err(ExceptionCode::IllegalDataAddress)),
            vec![0x81, 0x02]
        );
    }

    #[test]
    fn damaged_frames_fail_their_crc() {
        for _ in 0..100 {
            let mut f = seal(vec![0x01, 0x05, 0x00, 0x03, 0xFF, 0x00]);
            damage(&mut f);
            assert!(!crc_ok(&f));
            assert_eq!(
                &f[..6],
                &[0x01, 0x05, 0x00, 0x03, 0xFF, 0x00],
                "content kept"
            );
        }
    }

    #[test]
    fn mbap_check_passes_frames_and_stops_garbage() {
        let mut m = MbapCheck::default();
        // FC1 request, transaction 7, unit 1, split anywhere.
        let frame = [0, 7, 0, 0, 0, 6, 1, 1, 0, 0, 0, 8];
        for split in 0..frame.len() {
            assert_eq!(m.follow(&frame[..split]), Ok(()));
            assert_eq!(m.follow(&frame[split..]), Ok(()));
        }
        assert!(
            m.follow(b"GET / HTTP/1.1\r\n").is_err(),
            "protocol id 0x5420"
        );
        let mut m = MbapCheck::default();
        assert!(m.follow(&[0, 1, 0, 0, 0, 0, 1]).is_err(), "length 0");
        let mut m = MbapCheck::default();
        assert!(m.follow(&[0, 1, 0, 0, 1, 0, 1]).is_err(), "length 256");
    }

    /// Over a real pseudo-terminal with line timing at 9600 8N1: an FC1 read of 728 coils
    /// is an 8-byte request, t3.5, and a 96-byte answer (91 data bytes): 8.3 + 3.6 + 100 ms
    /// of wire time before the answer's last byte can be read, and not much more.
    #[tokio::test]
    async fn a_timed_rtu_line_takes_the_wire_time() {
        use tokio_serial::SerialPortBuilderExt as _;
        let dir = tempfile::tempdir().unwrap();
        let port = dir.path().join("r").display().to_string();
        let cfg = RelayBoardConfig {
            id: "r".into(),
            transport: ModbusTransport::Rtu,
            address: String::new(),
            port: port.clone(),
            baud: 9600,
            parity: "none".into(),
            stop_bits: 1,
            unit_id: 1,
            coils: 728,
            inputs: 0,
            response_delay_ms: 0,
            timeout_ms: None,
            poll_ms: None,
            enabled: None,
        };
        let (_stop, shutdown) = watch::channel(false);
        let ctx = DeviceContext {
            bus: Bus::new(),
            faults: Faults::default(),
            shutdown,
            line_timing: vec!["r".into()],
        };
        let board = RelayBoard::start(&cfg, &ctx).await.unwrap();
        assert_eq!(board.address()["line_timing"], true);
        let mut line = tokio_serial::new(&port, 9600).open_native_async().unwrap();
        let timing = LineTiming::n81(9600);
        let floor = timing.wire_time(8) + timing.t35() + timing.wire_time(96);
        let request = seal(vec![0x01, 0x01, 0x00, 0x00, 0x02, 0xD8]);
        let mut answer = Vec::new();
        let t0 = Instant::now();
        line.write_all(&request).await.unwrap();
        let mut buf = [0u8; 256];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while answer.len() < 96 {
            let n = tokio::time::timeout_at(deadline, line.read(&mut buf))
                .await
                .expect("the answer arrives")
                .unwrap();
            answer.extend_from_slice(&buf[..n]);
        }
        let took = t0.elapsed();
        assert_eq!(answer.len(), 96);
        assert_eq!(&answer[..3], &[0x01, 0x01, 91]);
        assert!(crc_ok(&answer));
        assert!(took >= floor, "{took:?} < wire time {floor:?}");
        // The schedule is absolute (late wake-ups do not add up), so only a stall of the
        // test's own thread adds to it; the bound is generous for a loaded CI machine yet
        // catches a board that waits for something else (a frame-gap timeout, the 1 s
        // write timeout) or paces per byte with a sleep that accumulates.
        assert!(
            took < floor + Duration::from_millis(400),
            "{took:?}: much more than the wire time {floor:?}"
        );
        board.stop().await;
    }

    #[test]
    fn quantities_and_addresses_are_checked() {
        assert_eq!(bit_range(8, 0, 8, 2000), Ok(0..8));
        assert_eq!(
            bit_range(8, 7, 2, 2000),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            bit_range(8, 0, 0, 2000),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            bit_range(4000, 0, 2001, 2000),
            Err(ExceptionCode::IllegalDataValue)
        );
    }
}
