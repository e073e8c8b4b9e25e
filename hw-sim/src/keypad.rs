//! OSDP keypads: each is a libosdp peripheral device (PD) on its own thread, answering a
//! control panel (CP) over a pseudo-terminal and/or TCP (see [`link`]).
//!
//! The thread sleeps in `poll(2)` on its transports and on a wake-up socket the async side
//! writes to with every request (at most 50 ms while a control panel talks, 250 ms
//! otherwise), so a key press is queued in libosdp at once, ahead of the next POLL; it
//! then refreshes libosdp, then turns what happened (commands from
//! the CP, frames on the wire) into state and observations. The async side talks to it through a request channel and reads a state
//! snapshot; it never blocks on the thread.
//!
//! Keys reach the CP the way a real reader sends them: an `osdp_KEYPAD` reply to a POLL,
//! one reply per [`Keypad::press`], digits as ASCII, `*` as 0x7F and `#` as 0x0D (OSDP
//! spec; libosdp passes the bytes through untouched).

mod frame;
mod link;

use crate::config::KeypadConfig;
use crate::observe::Bus;
use crate::pty::PtyPair;
use crate::{DeviceContext, SimError};
use frame::Sniffed;
use libosdp::{
    OsdpCommand, OsdpCommandBuzzer, OsdpCommandLed, OsdpCommandText, OsdpEvent, OsdpEventKeyPress,
    OsdpFlag, OsdpLedColor, OsdpLedParams, OsdpStatusReportType, PdCapEntity, PdCapability, PdId,
    PdInfoBuilder, PeripheralDevice,
};
use link::{Link, Note, PdChannel, Via};
use serde::Serialize;
use serde_json::json;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// libosdp wants a refresh at least this often while a control panel talks.
const REFRESH: Duration = Duration::from_millis(50);
/// With nobody talking, bytes wake the thread at once anyway: refresh only for timers.
const IDLE_REFRESH: Duration = Duration::from_millis(250);
/// A control panel that sent nothing to us for this long is gone.
const ONLINE_WINDOW: Duration = Duration::from_secs(2);
/// Garbage from the control panel side is reported at most this often (with a byte count).
const GARBAGE_REPORT: Duration = Duration::from_secs(1);
/// Most keys one press may carry (libosdp's keypad event holds 64 bytes).
pub const MAX_KEYS: usize = 64;

/// The OSDP keypad code of a key: digits as ASCII, `*` 0x7F, `#` 0x0D.
pub fn key_code(key: char) -> Option<u8> {
    match key {
        '0'..='9' => Some(key as u8),
        '*' => Some(0x7F),
        '#' => Some(0x0D),
        _ => None,
    }
}

/// An LED pattern: `on_color` for `on_ms`, then `off_color` for `off_ms`, repeating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedPattern {
    /// Colour while on.
    pub on_color: String,
    /// Colour while off (`off` = dark).
    pub off_color: String,
    /// On time in milliseconds.
    pub on_ms: u32,
    /// Off time in milliseconds (0 = steady).
    pub off_ms: u32,
}

impl Default for LedPattern {
    fn default() -> Self {
        LedPattern {
            on_color: "off".into(),
            off_color: "off".into(),
            on_ms: 0,
            off_ms: 0,
        }
    }
}

impl LedPattern {
    fn from_params(p: &OsdpLedParams) -> LedPattern {
        LedPattern {
            on_color: color_name(p.on_color),
            off_color: color_name(p.off_color),
            on_ms: u32::from(p.on_count) * 100,
            off_ms: u32::from(p.off_count) * 100,
        }
    }

    /// Alternates between two different colours.
    fn flashing(&self) -> bool {
        self.on_ms > 0 && self.off_ms > 0 && self.on_color != self.off_color
    }

    /// The colour a person would name: the on colour, or the off colour if never on.
    fn color(&self) -> String {
        if self.on_ms == 0 {
            self.off_color.clone()
        } else {
            self.on_color.clone()
        }
    }
}

/// A buzzer command as the keypad received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuzzerTone {
    /// OSDP tone code (1 off, 2 default tone).
    pub tone: u8,
    /// On time in milliseconds.
    pub on_ms: u32,
    /// Off time in milliseconds.
    pub off_ms: u32,
    /// Repetitions (0 = until told to stop).
    pub count: u8,
}

/// Counters since the keypad started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeypadCounters {
    /// POLLs addressed to this keypad.
    pub polls: u64,
    /// Valid frames addressed to this keypad (POLLs included).
    pub frames: u64,
    /// Frames other than POLL (ID, CAP, LED, ...).
    pub commands: u64,
    /// Keys accepted by [`Keypad::press`].
    pub keys_pressed: u64,
    /// Keys that left in `osdp_KEYPAD` replies.
    pub keys_sent: u64,
    /// Replies that left.
    pub replies_sent: u64,
    /// Replies lost to the drop fault.
    pub replies_dropped: u64,
    /// Replies damaged by the corrupt fault.
    pub replies_corrupted: u64,
    /// Replies held back by the delay fault.
    pub replies_delayed: u64,
    /// Bytes from the control panel side that belonged to no valid frame.
    pub garbage_bytes: u64,
    /// TCP connections accepted.
    pub tcp_connections: u64,
}

/// What the keypad shows, as the control API reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeypadState {
    /// Device id.
    pub id: String,
    /// LED colour now (`off`, `red`, `green`, `amber`, `blue`, `magenta`, `cyan`).
    pub led: String,
    /// Whether the LED alternates between two colours.
    pub led_flashing: bool,
    /// Whether a temporary LED pattern (with a timer) is showing.
    pub led_temporary: bool,
    /// The pattern showing now.
    pub led_pattern: LedPattern,
    /// Whether the buzzer sounds now.
    pub buzzer: bool,
    /// The last buzzer command.
    pub last_buzzer: Option<BuzzerTone>,
    /// What the last text command wrote.
    pub text: String,
    /// Whether that text was temporary.
    pub text_temporary: bool,
    /// Whether a control panel polls it (a frame for it within the last 2 s).
    pub online: bool,
    /// Whether the secure channel is up.
    pub secure: bool,
    /// Transport the control panel uses (`serial` or `tcp`).
    pub transport: Option<String>,
    /// The connected TCP peer.
    pub peer: Option<String>,
    /// Counters.
    pub counters: KeypadCounters,
}

enum Request {
    Press {
        keys: String,
        reply: oneshot::Sender<Result<(), SimError>>,
    },
}

/// A running keypad.
#[derive(Clone)]
pub struct Keypad {
    cfg: KeypadConfig,
    tcp_addr: Option<SocketAddr>,
    pty_path: Option<PathBuf>,
    state: Arc<Mutex<KeypadState>>,
    requests: mpsc::Sender<Request>,
    /// Written to after every request: wakes the thread out of `poll(2)`.
    wake: Arc<UnixStream>,
    stop: Arc<AtomicBool>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    pty: Arc<Mutex<Option<PtyPair>>>,
    line_timing: bool,
}

impl Keypad {
    /// Opens the keypad's transports and starts its thread. Listening when this returns.
    pub async fn start(cfg: &KeypadConfig, ctx: &DeviceContext) -> Result<Keypad, SimError> {
        let key = parse_scbk(&cfg.id, &cfg.scbk)?;
        let pty = if cfg.port.is_empty() {
            None
        } else {
            Some(
                crate::pty::open(Path::new(&cfg.port)).map_err(SimError::io(format!(
                    "keypad {}: pseudo-terminal at {}",
                    cfg.id, cfg.port
                )))?,
            )
        };
        let pty_file = pty
            .as_ref()
            .map(|p| master_file(&cfg.id, &p.master))
            .transpose()?;
        let (listener, tcp_addr) = if cfg.tcp.is_empty() {
            (None, None)
        } else {
            let what = format!("keypad {}: TCP on {}", cfg.id, cfg.tcp);
            let l = tokio::net::TcpListener::bind(&cfg.tcp)
                .await
                .map_err(SimError::io(what.clone()))?;
            let addr = l.local_addr().map_err(SimError::io(what.clone()))?;
            let l = l.into_std().map_err(SimError::io(what.clone()))?;
            l.set_nonblocking(true).map_err(SimError::io(what))?;
            (Some(l), Some(addr))
        };
        let timed = (pty_file.is_some() && ctx.line_timing.contains(&cfg.id))
            .then(|| crate::line::LineTiming::n81(cfg.baud));
        let (wake, woken) = UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(SimError::io(format!("keypad {}: wake-up socket", cfg.id)))?;
        let link = Arc::new(Mutex::new(
            Link::new(&cfg.id, ctx.faults.clone(), pty_file, listener)
                .line_timing(timed)
                .waker(woken),
        ));
        let (cmd_tx, commands) = mpsc::channel();
        let pd = peripheral(cfg, key, link.clone(), cmd_tx)?;
        let state = Arc::new(Mutex::new(KeypadState {
            id: cfg.id.clone(),
            led: "off".into(),
            ..Default::default()
        }));
        let (requests, req_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let device = Device {
            id: cfg.id.clone(),
            address: cfg.address,
            pd,
            link,
            commands,
            requests: req_rx,
            shared: state.clone(),
            bus: ctx.bus.clone(),
            stop: stop.clone(),
            shutdown: ctx.shutdown.clone(),
            st: lock(&state).clone(),
            last_frame: None,
            led_permanent: LedPattern::default(),
            led_temporary: None,
            buzzer_until: None,
            keys_in_flight: VecDeque::new(),
            held: Vec::new(),
            garbage: 0,
            garbage_reason: "",
            garbage_via: Via::Serial,
            garbage_reported: None,
        };
        let thread = std::thread::Builder::new()
            .name(format!("keypad-{}", cfg.id))
            .spawn(move || device.run())
            .map_err(SimError::io(format!("keypad {}: thread", cfg.id)))?;
        tracing::info!(
            keypad = %cfg.id,
            serial = %pty.as_ref().map(|p| p.slave_path.display().to_string()).unwrap_or_default(),
            tcp = %tcp_addr.map(|a| a.to_string()).unwrap_or_default(),
            osdp_address = cfg.address,
            secure = key.is_some(),
            "keypad listening"
        );
        Ok(Keypad {
            cfg: cfg.clone(),
            tcp_addr,
            pty_path: pty.as_ref().map(|p| p.slave_path.clone()),
            state,
            requests,
            wake: Arc::new(wake),
            stop,
            thread: Arc::new(Mutex::new(Some(thread))),
            pty: Arc::new(Mutex::new(pty)),
            line_timing: timed.is_some(),
        })
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Where it listens: the serial link (and the pty behind it), the real TCP address
    /// (also when configured with port 0), the OSDP address.
    pub fn address(&self) -> serde_json::Value {
        json!({
            "serial": self.cfg.port,
            "pty": self.pty_path.as_ref().map(|p| p.display().to_string()),
            "tcp": self.tcp_addr.map(|a| a.to_string()).unwrap_or_default(),
            "osdp_address": self.cfg.address,
            "baud": self.cfg.baud,
            "secure_channel": !self.cfg.scbk.is_empty(),
            "line_timing": self.line_timing,
        })
    }

    /// The real TCP address, if it serves TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Current outputs, link state and counters.
    pub fn state(&self) -> KeypadState {
        lock(&self.state).clone()
    }

    /// Presses keys (`0-9`, `*`, `#`, at most [`MAX_KEYS`]): the keypad reports them to the
    /// control panel in one `osdp_KEYPAD` reply. Refused when no control panel polls it.
    pub async fn press(&self, keys: &str) -> Result<(), SimError> {
        if keys.is_empty() || keys.chars().count() > MAX_KEYS {
            return Err(SimError::BadRequest(format!(
                "keys must be 1 to {MAX_KEYS} characters"
            )));
        }
        if let Some(bad) = keys.chars().find(|&c| key_code(c).is_none()) {
            return Err(SimError::BadRequest(format!(
                "key {bad:?} is not on a keypad: keys may be 0-9, * and #"
            )));
        }
        if !self.state().online {
            return Err(no_control_panel(&self.cfg.id));
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Press {
                keys: keys.to_owned(),
                reply,
            })
            .map_err(|_| SimError::Osdp(format!("keypad {} is stopped", self.cfg.id)))?;
        self.wake_thread();
        match tokio::time::timeout(Duration::from_secs(2), answer).await {
            Ok(Ok(result)) => result,
            _ => Err(SimError::Osdp(format!(
                "keypad {} did not take the keys",
                self.cfg.id
            ))),
        }
    }

    /// Stops the thread and closes the transports (removes the serial link).
    pub async fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake_thread();
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        drop(
            self.pty
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

impl Keypad {
    /// Wakes the thread out of `poll(2)`. A full socket already holds a wake-up, so a
    /// failed write loses nothing.
    fn wake_thread(&self) {
        let _ = (&*self.wake).write(&[1]);
    }
}

fn no_control_panel(id: &str) -> SimError {
    SimError::BadRequest(format!("keypad {id} has no control panel polling it"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn parse_scbk(id: &str, hex: &str) -> Result<Option<[u8; 16]>, SimError> {
    if hex.is_empty() {
        return Ok(None);
    }
    let bad = || SimError::Config(format!("keypad {id}: scbk must be 32 hex digits"));
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(Some(key))
}

/// A non-blocking handle on the pty master for the keypad thread (tokio keeps its own).
fn master_file(id: &str, master: &tokio_serial::SerialStream) -> Result<File, SimError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::fd::{AsRawFd, BorrowedFd};
    let what = format!("keypad {id}: pseudo-terminal master");
    // SAFETY: the descriptor belongs to `master`, which is alive for this whole call; it
    // is only borrowed long enough to duplicate it.
    let fd = unsafe { BorrowedFd::borrow_raw(master.as_raw_fd()) };
    let file = File::from(
        fd.try_clone_to_owned()
            .map_err(SimError::io(what.clone()))?,
    );
    let flags = fcntl(&file, FcntlArg::F_GETFL)
        .map_err(|e| SimError::io(what.clone())(std::io::Error::from(e)))?;
    fcntl(
        &file,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| SimError::io(what)(std::io::Error::from(e)))?;
    Ok(file)
}

/// The libosdp PD: identity, a capability for every command it takes (libosdp NAKs the
/// rest and the CP then drops the PD), secure channel only with a key.
fn peripheral(
    cfg: &KeypadConfig,
    key: Option<[u8; 16]>,
    link: Arc<Mutex<Link>>,
    commands: mpsc::Sender<OsdpCommand>,
) -> Result<PeripheralDevice, SimError> {
    let osdp = |e: libosdp::OsdpError| SimError::Osdp(format!("keypad {}: {e}", cfg.id));
    let baud = i32::try_from(cfg.baud).unwrap_or(0);
    let name: String = cfg.id.chars().filter(|c| *c != '\0').take(15).collect();
    let mut info = PdInfoBuilder::new()
        .name(&name)
        .map_err(osdp)?
        .address(i32::from(cfg.address))
        .map_err(osdp)?
        .baud_rate(baud)
        .map_err(|_| {
            SimError::Config(format!(
                "keypad {}: baud {} (libosdp takes 9600, 19200, 38400, 57600, 115200, 230400)",
                cfg.id, cfg.baud
            ))
        })?
        .id(&pd_id(&cfg.id))
        // Tri-colour LED with timers, one of them; timed buzzer; one text display.
        .capability(PdCapability::LedControl(PdCapEntity::new(4, 1)))
        .capability(PdCapability::AudibleOutput(PdCapEntity::new(2, 1)))
        .capability(PdCapability::TextOutput(PdCapEntity::new(1, 1)));
    if let Some(k) = key {
        // With a key the keypad takes nothing in the clear (and never the default key).
        info = info.secure_channel_key(k).flag(OsdpFlag::EnforceSecure);
    }
    let mut pd = PeripheralDevice::new(info, Box::new(PdChannel(link))).map_err(osdp)?;
    if key.is_none() {
        // libosdp always announces secure channel support; without a key, withdraw it so
        // CPs talk in the clear. set_capabilities passes the slice to C as is, which
        // reads until a function code >= the sentinel: end the list with one.
        pd.set_capabilities(&[
            PdCapability::CommunicationSecurity(PdCapEntity::new(0, 0)),
            PdCapability::Unknown(0xFF, PdCapEntity::new(0, 0)),
        ]);
    }
    // Set once: the binding leaks the closure on every call. Runs inside refresh(), on
    // the keypad thread; it only answers status queries and hands commands over.
    pd.set_command_callback(move |cmd: &mut OsdpCommand| -> i32 {
        let verdict = match cmd {
            OsdpCommand::Status(report) => {
                // Local: tamper, power; remote: reader tamper. All fine.
                report.nr_entries = match report.type_ {
                    OsdpStatusReportType::Local => 2,
                    _ => 1,
                };
                report.report = [0; 64];
                0
            }
            OsdpCommand::Mfg(_) | OsdpCommand::FileTx(_) | OsdpCommand::Output(_) => -1,
            _ => 0,
        };
        if verdict == 0 {
            let _ = commands.send(cmd.clone());
        }
        verdict
    });
    Ok(pd)
}

/// What the PD reports to `osdp_ID`: a made-up vendor, a serial number from the id.
fn pd_id(id: &str) -> PdId {
    let hash = id.bytes().fold(0x811C_9DC5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let v = |s: &str| s.parse::<u8>().unwrap_or(0);
    PdId {
        version: 1,
        model: 1,
        vendor_code: (0x55, 0x47, 0x53),
        serial_number: hash.to_be_bytes(),
        firmware_version: (
            v(env!("CARGO_PKG_VERSION_MAJOR")),
            v(env!("CARGO_PKG_VERSION_MINOR")),
            v(env!("CARGO_PKG_VERSION_PATCH")),
        ),
    }
}

fn color_name(c: OsdpLedColor) -> String {
    match c {
        OsdpLedColor::None => "off".into(),
        OsdpLedColor::Red => "red".into(),
        OsdpLedColor::Green => "green".into(),
        OsdpLedColor::Amber => "amber".into(),
        OsdpLedColor::Blue => "blue".into(),
        OsdpLedColor::Magenta => "magenta".into(),
        OsdpLedColor::Cyan => "cyan".into(),
        OsdpLedColor::Unknown(n) => format!("unknown({n})"),
    }
}

/// The keypad thread: owns the PD and the model of what the keypad shows.
struct Device {
    id: String,
    address: u8,
    pd: PeripheralDevice,
    link: Arc<Mutex<Link>>,
    commands: mpsc::Receiver<OsdpCommand>,
    requests: mpsc::Receiver<Request>,
    shared: Arc<Mutex<KeypadState>>,
    bus: Bus,
    stop: Arc<AtomicBool>,
    shutdown: watch::Receiver<bool>,
    st: KeypadState,
    last_frame: Option<Instant>,
    led_permanent: LedPattern,
    led_temporary: Option<(LedPattern, Instant)>,
    /// `Some(None)`: sounding until told to stop.
    buzzer_until: Option<Option<Instant>>,
    /// Key counts of presses queued in libosdp, oldest first.
    keys_in_flight: VecDeque<usize>,
    /// Keys pressed but not yet queued in libosdp (its event queue was full): a real
    /// keypad buffers fast typing too; at most [`MAX_KEYS`].
    held: Vec<u8>,
    garbage: usize,
    garbage_reason: &'static str,
    garbage_via: Via,
    garbage_reported: Option<Instant>,
}

impl Device {
    fn run(mut self) {
        let mut last_refresh = Instant::now();
        while !self.stopping() {
            self.handle_requests();
            let now = Instant::now();
            let cadence = if self.st.online || self.garbage > 0 {
                REFRESH
            } else {
                IDLE_REFRESH
            };
            let mut wake = last_refresh + cadence;
            if let Some(due) = self.link().next_due() {
                wake = wake.min(due);
            }
            self.link().wait(wake.saturating_duration_since(now));
            // A press that woke the thread is queued before libosdp answers the next POLL.
            self.handle_requests();
            self.link().begin_refresh();
            // The link is not locked here: libosdp calls back into it.
            self.pd.refresh();
            last_refresh = Instant::now();
            self.after_refresh(last_refresh);
        }
        self.link().close();
        tracing::info!(keypad = %self.id, "keypad stopped");
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || *self.shutdown.borrow()
            || self.shutdown.has_changed().is_err()
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        lock(&self.link)
    }

    fn emit(&self, kind: &str, data: serde_json::Value) {
        self.bus.emit(&self.id, kind, data);
    }

    fn after_refresh(&mut self, now: Instant) {
        let (notes, peer) = {
            let mut l = self.link();
            l.flush_due(now);
            l.expire(now);
            (l.take_notes(), l.peer())
        };
        self.st.peer = peer.map(|p| p.to_string());
        for n in notes {
            self.on_note(n, now);
        }
        while let Ok(cmd) = self.commands.try_recv() {
            self.on_command(cmd, now);
        }
        self.tick(now);
        *lock(&self.shared) = self.st.clone();
    }

    fn handle_requests(&mut self) {
        while let Ok(req) = self.requests.try_recv() {
            match req {
                Request::Press { keys, reply } => {
                    let _ = reply.send(self.press(&keys));
                }
            }
        }
    }

    fn press(&mut self, keys: &str) -> Result<(), SimError> {
        if !self.st.online {
            return Err(no_control_panel(&self.id));
        }
        let codes: Vec<u8> = keys.chars().filter_map(key_code).collect();
        if self.held.len() + codes.len() > MAX_KEYS {
            return Err(SimError::BadRequest(format!(
                "keypad {} holds {} keys the control panel has not collected yet; at most {MAX_KEYS}",
                self.id,
                self.held.len()
            )));
        }
        self.st.counters.keys_pressed += codes.len() as u64;
        self.emit(
            "key_pressed",
            json!({"keys": keys, "codes": codes, "transport": self.st.transport}),
        );
        self.held.extend_from_slice(&codes);
        self.release_held();
        Ok(())
    }

    /// Hands the held keys to libosdp as one key-press event, for the next POLL to collect;
    /// when its event queue is full they stay held until a KEYPAD reply has made room.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let event = OsdpEvent::KeyPress(OsdpEventKeyPress::new(self.held.clone()));
        if self.pd.notify_event(event).is_ok() {
            self.keys_in_flight.push_back(self.held.len());
            self.held.clear();
        }
    }

    fn on_note(&mut self, note: Note, now: Instant) {
        match note {
            Note::Rx {
                via,
                item: Sniffed::Frame(f),
            } => {
                if f.reply || (f.addr != self.address && f.addr != 0x7F) {
                    return; // another PD on the bus, or an echo
                }
                self.last_frame = Some(now);
                self.st.counters.frames += 1;
                let first = !self.st.online;
                if first {
                    self.st.online = true;
                    self.st.transport = Some(via.name().into());
                    tracing::info!(keypad = %self.id, transport = via.name(), "control panel is polling");
                    self.emit(
                        "cp_online",
                        json!({"transport": via.name(), "peer": self.st.peer}),
                    );
                }
                let poll = f.code == frame::CMD_POLL;
                if poll {
                    self.st.counters.polls += 1;
                } else {
                    self.st.counters.commands += 1;
                }
                // POLLs come 20 times a second: only the first after a silence is told.
                if first || !poll {
                    self.emit(
                        "frame_received",
                        json!({
                            "command": frame::command_name(f.code),
                            "code": f.code,
                            "secure": f.secure,
                            "bytes": f.len,
                            "transport": via.name(),
                            "first_after_silence": first,
                        }),
                    );
                }
            }
            Note::Rx {
                via,
                item: Sniffed::Garbage { bytes, reason },
            } => {
                self.st.counters.garbage_bytes += bytes as u64;
                self.garbage += bytes;
                self.garbage_reason = reason;
                self.garbage_via = via;
            }
            Note::ReplySent { via, code } => {
                self.st.counters.replies_sent += 1;
                if code == Some(frame::REPLY_KEYPAD)
                    && let Some(n) = self.keys_in_flight.pop_front()
                {
                    self.st.counters.keys_sent += n as u64;
                    self.emit("keys_sent", json!({"count": n, "transport": via.name()}));
                    // That reply freed a place in libosdp's event queue.
                    self.release_held();
                }
            }
            Note::ReplyDropped { via } => {
                self.st.counters.replies_dropped += 1;
                tracing::debug!(keypad = %self.id, transport = via.name(), "reply dropped (fault)");
            }
            Note::ReplyCorrupted { via, at } => {
                self.st.counters.replies_corrupted += 1;
                self.emit(
                    "frame_corrupted",
                    json!({"direction": "tx", "fault": "corrupt", "byte": at, "transport": via.name()}),
                );
            }
            Note::ReplyDelayed { via, ms } => {
                self.st.counters.replies_delayed += 1;
                tracing::debug!(keypad = %self.id, transport = via.name(), ms, "reply delayed (fault)");
            }
            Note::TcpAccepted { peer } => {
                self.st.counters.tcp_connections += 1;
                tracing::info!(keypad = %self.id, %peer, "control panel connected over TCP");
                self.emit(
                    "cp_connected",
                    json!({"transport": "tcp", "peer": peer.to_string()}),
                );
            }
            Note::TcpClosed { peer, reason } => {
                tracing::info!(keypad = %self.id, %peer, %reason, "TCP connection ended");
                self.emit(
                    "cp_disconnected",
                    json!({"transport": "tcp", "peer": peer.to_string(), "reason": reason}),
                );
            }
            Note::TcpReplaced { old } => {
                tracing::info!(keypad = %self.id, peer = %old, "silent TCP connection replaced");
                self.emit(
                    "cp_disconnected",
                    json!({"transport": "tcp", "peer": old.to_string(), "reason": "replaced by a new connection"}),
                );
            }
            Note::TcpRefused { peer, current } => {
                tracing::warn!(keypad = %self.id, %peer, %current, "second TCP connection refused: one control panel at a time");
                self.emit(
                    "tcp_refused",
                    json!({"peer": peer.to_string(), "current": current.to_string()}),
                );
            }
            Note::SerialError { reason } => {
                tracing::warn!(keypad = %self.id, %reason, "serial line error");
                self.emit(
                    "transport_error",
                    json!({"transport": "serial", "reason": reason}),
                );
            }
        }
    }

    fn on_command(&mut self, cmd: OsdpCommand, now: Instant) {
        match cmd {
            OsdpCommand::Led(c) => self.led(&c, now),
            OsdpCommand::Buzzer(b) => self.buzzer(&b, now),
            OsdpCommand::Text(t) => self.text(&t),
            OsdpCommand::ComSet(c) => self.emit(
                "comset",
                json!({"address": c.address, "baud": c.baud_rate, "done": false}),
            ),
            OsdpCommand::ComSetDone(c) => {
                // libosdp answers at the new address from now on.
                self.address = c.address;
                self.emit(
                    "comset",
                    json!({"address": c.address, "baud": c.baud_rate, "done": true}),
                );
            }
            OsdpCommand::KeySet(_) => {
                tracing::warn!(keypad = %self.id, "control panel set a new secure channel key (kept in memory only)");
                self.emit("scbk_changed", json!({}));
            }
            _ => {}
        }
    }

    fn led(&mut self, c: &OsdpCommandLed, now: Instant) {
        if c.permanent.control_code == 1 {
            self.led_permanent = LedPattern::from_params(&c.permanent);
        }
        match c.temporary.control_code {
            1 => self.led_temporary = None,
            2 => {
                let ms = u64::from(c.temporary.timer_count) * 100;
                self.led_temporary = Some((
                    LedPattern::from_params(&c.temporary),
                    now + Duration::from_millis(ms),
                ));
            }
            _ => {}
        }
        self.show_led(now);
        let timer_ms = self
            .led_temporary
            .as_ref()
            .map(|(_, until)| until.saturating_duration_since(now).as_millis() as u64);
        self.emit(
            "led_changed",
            json!({
                "color": self.st.led,
                "flashing": self.st.led_flashing,
                "temporary": self.st.led_temporary,
                "pattern": self.st.led_pattern,
                "timer_ms": timer_ms,
                "permanent": self.led_permanent,
            }),
        );
    }

    fn show_led(&mut self, now: Instant) {
        let temp = self
            .led_temporary
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(p, _)| p);
        let p = temp.unwrap_or(&self.led_permanent).clone();
        self.st.led_temporary = temp.is_some();
        self.st.led = p.color();
        self.st.led_flashing = p.flashing();
        self.st.led_pattern = p;
    }

    fn buzzer(&mut self, b: &OsdpCommandBuzzer, now: Instant) {
        let tone = BuzzerTone {
            tone: b.control_code,
            on_ms: u32::from(b.on_count) * 100,
            off_ms: u32::from(b.off_count) * 100,
            count: b.rep_count,
        };
        let on = b.control_code >= 2 && b.on_count > 0;
        self.buzzer_until = on.then(|| {
            (b.rep_count > 0).then(|| {
                let cycle = u64::from(tone.on_ms + tone.off_ms);
                now + Duration::from_millis(cycle * u64::from(b.rep_count))
            })
        });
        self.st.buzzer = on;
        let duration_ms = self
            .buzzer_until
            .flatten()
            .map(|t| t.saturating_duration_since(now).as_millis() as u64);
        self.emit(
            "buzzer",
            json!({
                "on": on,
                "tone": tone.tone,
                "on_ms": tone.on_ms,
                "off_ms": tone.off_ms,
                "count": tone.count,
                "duration_ms": duration_ms,
            }),
        );
        self.st.last_buzzer = Some(tone);
    }

    fn text(&mut self, t: &OsdpCommandText) {
        let text = String::from_utf8_lossy(&t.data).into_owned();
        let temporary = matches!(t.control_code, 3 | 4);
        self.st.text = text.clone();
        self.st.text_temporary = temporary;
        self.emit(
            "text_shown",
            json!({
                "text": text,
                "temporary": temporary,
                "seconds": temporary.then_some(t.temp_time),
                "wrap": matches!(t.control_code, 2 | 4),
                "row": t.offset_row,
                "col": t.offset_col,
            }),
        );
    }

    /// Timers: the control panel going quiet, the secure channel, temporary LED patterns,
    /// the buzzer finishing, garbage reports.
    fn tick(&mut self, now: Instant) {
        if self.st.online
            && self
                .last_frame
                .is_none_or(|t| now.duration_since(t) > ONLINE_WINDOW)
        {
            self.st.online = false;
            tracing::info!(keypad = %self.id, "control panel stopped polling");
            self.emit(
                "cp_offline",
                json!({"transport": self.st.transport, "silent_ms": ONLINE_WINDOW.as_millis() as u64}),
            );
            self.st.transport = None;
            // Keys nobody collected would otherwise reach the next CP as a stale PIN.
            self.pd.flush_events();
            self.keys_in_flight.clear();
            self.held.clear();
        }
        let secure = self.pd.is_sc_active();
        if secure != self.st.secure {
            self.st.secure = secure;
            let kind = if secure {
                "secure_channel_up"
            } else {
                "secure_channel_down"
            };
            tracing::info!(keypad = %self.id, "{kind}");
            self.emit(kind, json!({"transport": self.st.transport}));
        }
        if self
            .led_temporary
            .as_ref()
            .is_some_and(|(_, until)| *until <= now)
        {
            self.led_temporary = None;
            self.show_led(now);
            self.emit(
                "led_changed",
                json!({
                    "color": self.st.led,
                    "flashing": self.st.led_flashing,
                    "temporary": false,
                    "pattern": self.st.led_pattern,
                    "reason": "temporary_ended",
                }),
            );
        }
        if let Some(Some(until)) = self.buzzer_until
            && until <= now
        {
            self.buzzer_until = None;
            self.st.buzzer = false;
            self.emit("buzzer", json!({"on": false, "reason": "finished"}));
        }
        if self.garbage > 0
            && self
                .garbage_reported
                .is_none_or(|t| now.duration_since(t) >= GARBAGE_REPORT)
        {
            tracing::warn!(
                keypad = %self.id,
                transport = self.garbage_via.name(),
                bytes = self.garbage,
                reason = self.garbage_reason,
                "garbage from the control panel side ignored"
            );
            self.emit(
                "frame_corrupted",
                json!({
                    "direction": "rx",
                    "bytes": self.garbage,
                    "reason": self.garbage_reason,
                    "transport": self.garbage_via.name(),
                }),
            );
            self.garbage = 0;
            self.garbage_reported = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_codes_follow_the_osdp_keypad_encoding() {
        let codes: Vec<u8> = "0189*#".chars().filter_map(key_code).collect();
        assert_eq!(codes, vec![0x30, 0x31, 0x38, 0x39, 0x7F, 0x0D]);
        assert_eq!(key_code('a'), None);
        assert_eq!(key_code('+'), None);
    }

    #[test]
    fn scbk_parses_32_hex_digits_only() {
        let k = parse_scbk("k", "000102030405060708090a0b0c0d0e0f")
            .ok()
            .flatten();
        assert_eq!(k.map(|k| k[15]), Some(15));
        assert!(matches!(parse_scbk("k", ""), Ok(None)));
        assert!(parse_scbk("k", "00").is_err());
        assert!(parse_scbk("k", "zz0102030405060708090a0b0c0d0e0f").is_err());
    }

    #[test]
    fn led_patterns_name_their_colour() {
        let steady = LedPattern {
            on_color: "red".into(),
            off_color: "off".into(),
            on_ms: 100,
            off_ms: 0,
        };
        assert_eq!(steady.color(), "red");
        assert!(!steady.flashing());
        let flash = LedPattern {
            off_ms: 200,
            ..steady.clone()
        };
        assert!(flash.flashing());
        let dark = LedPattern {
            on_ms: 0,
            off_color: "off".into(),
            ..steady
        };
        assert_eq!(dark.color(), "off");
    }
}
