//! OSDP control panel for the gate keypads (`[[devices.keypads]]`).
//!
//! One [`OsdpBus`] per transport — a serial line (several keypads with different OSDP
//! addresses may share one RS-485 bus) or a TCP connection — runs libosdp's
//! `ControlPanel` on its own thread (libosdp is synchronous and wants a refresh at least
//! every 50 ms). Callers hold a [`Keypad`] handle per keypad: commands go in through a
//! bounded channel and come back acknowledged (the keypad's ACK read off the wire), key
//! presses come out on a tokio channel, health is a `watch`.
//!
//! Secure channel: a keypad with a key always runs with libosdp's `EnforceSecure`, so the
//! panel never falls back to plaintext or the default key; a keypad without a key is
//! refused unless `install_mode`. libosdp retries an offline keypad only after 300 s, so
//! the bus rebuilds its control panel itself after a capped exponential backoff with
//! jitter (that briefly re-handshakes the other keypads on the same serial bus).

mod frame;
mod panel;
mod wire;

/// The frame sniffer, for the fuzz targets in `fuzz/` only (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    pub use super::frame::{Frame, Sniffed, Sniffer, parse_packet};
}

use crate::config::KeypadConfig;
use libosdp::{
    OsdpCommand, OsdpCommandBuzzer, OsdpCommandLed, OsdpCommandText, OsdpLedColor, OsdpLedParams,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Most characters one text command carries (the binding panics beyond).
pub const MAX_TEXT: usize = 32;
/// Commands libosdp queues per keypad; one more is refused with [`KeypadError::QueueFull`].
pub const QUEUE_PER_KEYPAD: usize = 4;

/// Errors of the OSDP driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeypadError {
    /// The keypad's configuration cannot be run.
    #[error("keypad {id}: {reason}")]
    Config {
        /// Keypad id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// The keypad is not online (or not under the secure channel it requires).
    #[error("keypad is offline")]
    Offline,
    /// libosdp's per-keypad queue is full.
    #[error("keypad command queue is full")]
    QueueFull,
    /// The keypad answered NAK.
    #[error("keypad refused the command (NAK{})", .0.map(|r| format!(", reason {r}")).unwrap_or_default())]
    Refused(Option<u8>),
    /// No acknowledgement in time.
    #[error("no acknowledgement within {0:?}")]
    Timeout(Duration),
    /// The control panel was rebuilt (or the keypad dropped) before the acknowledgement.
    #[error("control panel restarted before the keypad acknowledged")]
    Restarted,
    /// The bus is stopped.
    #[error("the keypad driver is stopped")]
    Stopped,
    /// The control panel thread could not start or died.
    #[error("control panel thread: {0}")]
    Thread(String),
}

/// Where a bus's control panel talks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// A serial line (RS-485 adapter or pty).
    Serial {
        /// Device path.
        path: String,
        /// Baud rate.
        baud: u32,
    },
    /// OSDP over TCP.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Serial { path, baud } => write!(f, "{path}@{baud}"),
            Transport::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// One keypad as the control panel sees it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeypadSpec {
    /// Device id.
    pub id: String,
    /// OSDP address (0-126).
    pub address: u8,
    /// Secure channel base key; `None` only in install mode.
    pub key: Option<[u8; 16]>,
    /// Commissioning: plaintext allowed when there is no key.
    pub install_mode: bool,
    /// Baud rate given to libosdp.
    pub baud: u32,
}

impl std::fmt::Debug for KeypadSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("KeypadSpec")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("secure", &self.key.is_some())
            .finish()
    }
}

/// Keypads that share one transport, hence one control panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// The transport.
    pub transport: Transport,
    /// Its keypads, in configuration order.
    pub keypads: Vec<KeypadSpec>,
}

/// Groups keypads by transport and checks what the driver needs: a key unless
/// `install_mode`, unique addresses and one baud rate per serial line.
pub fn plan(keypads: &[KeypadConfig]) -> Result<Vec<BusConfig>, KeypadError> {
    let mut buses: BTreeMap<Transport, Vec<KeypadSpec>> = BTreeMap::new();
    for k in keypads {
        let bad = |reason: String| KeypadError::Config {
            id: k.id.clone(),
            reason,
        };
        let key = parse_key(&k.scbk).map_err(|r| bad(r.into()))?;
        if key.is_none() && !k.install_mode {
            return Err(bad(
                "no secure channel key: plaintext is allowed only with install_mode".into(),
            ));
        }
        if k.address > 126 {
            return Err(bad(format!("OSDP address {} is not 0-126", k.address)));
        }
        let transport = if !k.port.is_empty() {
            Transport::Serial {
                path: k.port.clone(),
                baud: k.baud,
            }
        } else {
            Transport::Tcp(
                k.tcp
                    .parse()
                    .map_err(|_| bad(format!("tcp {:?} is not IP:PORT", k.tcp)))?,
            )
        };
        if let Transport::Serial { path, baud } = &transport
            && let Some((other, _)) = buses.iter().find(|(t, _)| {
                matches!(t, Transport::Serial { path: p, baud: b } if p == path && b != baud)
            })
        {
            return Err(bad(format!("{path} is also configured as {other}")));
        }
        let pads = buses.entry(transport).or_default();
        if let Some(other) = pads.iter().find(|p| p.address == k.address) {
            return Err(bad(format!(
                "OSDP address {} is already used by {} on the same line",
                k.address, other.id
            )));
        }
        pads.push(KeypadSpec {
            id: k.id.clone(),
            address: k.address,
            key,
            install_mode: k.install_mode,
            baud: k.baud,
        });
    }
    Ok(buses
        .into_iter()
        .map(|(transport, keypads)| BusConfig { transport, keypads })
        .collect())
}

/// 32 hex digits to the 16-byte key; empty is no key.
fn parse_key(hex: &str) -> Result<Option<[u8; 16]>, &'static str> {
    if hex.is_empty() {
        return Ok(None);
    }
    const BAD: &str = "scbk must be 32 hex digits";
    if hex.len() != 32 {
        return Err(BAD);
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).ok_or(BAD)?;
        *b = u8::from_str_radix(pair, 16).map_err(|_| BAD)?;
    }
    Ok(Some(key))
}

/// Timings of the driver.
#[derive(Debug, Clone)]
pub struct OsdpOptions {
    /// Pause between refreshes of libosdp (it needs one at least every 50 ms).
    pub refresh: Duration,
    /// First wait before rebuilding the control panel for an offline keypad.
    pub backoff_min: Duration,
    /// Longest wait between rebuilds.
    pub backoff_max: Duration,
    /// How long a command may wait for the keypad's acknowledgement.
    pub command_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// A keypad silent this long is reported offline (libosdp itself probes for ~8 s).
    pub silence: Duration,
}

impl Default for OsdpOptions {
    fn default() -> Self {
        OsdpOptions {
            refresh: Duration::from_millis(20),
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
            command_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            silence: Duration::from_secs(2),
        }
    }
}

/// A keypad's link health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeypadHealth {
    /// libosdp has it online and it answered recently.
    pub online: bool,
    /// The secure channel is up.
    pub secure: bool,
    /// The last thing that went wrong, kept after recovery.
    pub last_error: Option<String>,
    /// Control panels built for its bus so far (1 = never rebuilt).
    pub builds: u32,
}

/// LED colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedColor {
    /// Dark.
    Off,
    /// Red.
    Red,
    /// Green.
    Green,
    /// Amber.
    Amber,
    /// Blue.
    Blue,
}

impl LedColor {
    fn osdp(self) -> OsdpLedColor {
        match self {
            LedColor::Off => OsdpLedColor::None,
            LedColor::Red => OsdpLedColor::Red,
            LedColor::Green => OsdpLedColor::Green,
            LedColor::Amber => OsdpLedColor::Amber,
            LedColor::Blue => OsdpLedColor::Blue,
        }
    }
}

/// How the LED shows its colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedMode {
    /// Steady, until told otherwise.
    Steady,
    /// Flashing (dark in between), until told otherwise.
    Flash {
        /// On time (100 ms steps).
        on: Duration,
        /// Off time (100 ms steps).
        off: Duration,
    },
    /// Over the permanent state for `duration`, then back by itself.
    Temporary {
        /// How long (100 ms steps).
        duration: Duration,
        /// Flash instead of steady.
        flash: bool,
    },
}

/// An LED command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Led {
    /// Colour.
    pub color: LedColor,
    /// Mode.
    pub mode: LedMode,
}

impl Led {
    /// A steady colour.
    pub fn steady(color: LedColor) -> Led {
        Led {
            color,
            mode: LedMode::Steady,
        }
    }

    /// A colour for a while (grant: green for 3 s), then back to the permanent one.
    pub fn temporary(color: LedColor, duration: Duration) -> Led {
        Led {
            color,
            mode: LedMode::Temporary {
                duration,
                flash: false,
            },
        }
    }
}

/// A buzzer pattern (default tone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buzzer {
    /// On time (100 ms steps).
    pub on: Duration,
    /// Off time (100 ms steps).
    pub off: Duration,
    /// Repetitions (at least 1).
    pub count: u8,
}

impl Buzzer {
    /// The short beep of a grant.
    pub fn short() -> Buzzer {
        Buzzer {
            on: Duration::from_millis(200),
            off: Duration::from_millis(100),
            count: 1,
        }
    }

    /// The long beep of a denial.
    pub fn long() -> Buzzer {
        Buzzer {
            on: Duration::from_millis(1000),
            off: Duration::from_millis(100),
            count: 1,
        }
    }
}

/// A text command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text {
    /// Row, from 1.
    pub row: u8,
    /// Column, from 1.
    pub col: u8,
    /// What to show: printable ASCII, at most [`MAX_TEXT`] characters (cut, not refused).
    pub text: String,
    /// Shown for this long (whole seconds), else until replaced.
    pub temporary: Option<Duration>,
}

impl Text {
    /// Permanent text at row 1, column 1.
    pub fn new(text: impl Into<String>) -> Text {
        Text {
            row: 1,
            col: 1,
            text: text.into(),
            temporary: None,
        }
    }
}

/// A command for a keypad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeypadCommand {
    /// Set the LED.
    Led(Led),
    /// Sound the buzzer.
    Buzzer(Buzzer),
    /// Show text.
    Text(Text),
}

/// Durations in OSDP's 100 ms steps, at least one (0 and 0 would be NAKed).
fn ticks(d: Duration) -> u8 {
    u8::try_from((d.as_millis() / 100).clamp(1, 255)).unwrap_or(u8::MAX)
}

impl KeypadCommand {
    /// The libosdp command, with everything the binding or keypad would choke on fixed:
    /// LED on time never 0, text cut to [`MAX_TEXT`] printable ASCII characters.
    pub fn to_osdp(&self) -> OsdpCommand {
        match self {
            KeypadCommand::Led(led) => {
                let nop = OsdpLedParams::default();
                let params = |control_code, on, off, timer_count| OsdpLedParams {
                    control_code,
                    on_count: on,
                    // Steady is on > 0, off = 0.
                    off_count: off,
                    on_color: led.color.osdp(),
                    off_color: OsdpLedColor::None,
                    timer_count,
                };
                let (temporary, permanent) = match led.mode {
                    LedMode::Steady => (nop, params(1, 1, 0, 0)),
                    LedMode::Flash { on, off } => (nop, params(1, ticks(on), ticks(off), 0)),
                    LedMode::Temporary { duration, flash } => {
                        let timer = u16::try_from((duration.as_millis() / 100).clamp(1, 65_535))
                            .unwrap_or(u16::MAX);
                        let (on, off) = if flash { (3, 3) } else { (1, 0) };
                        (params(2, on, off, timer), nop)
                    }
                };
                OsdpCommand::Led(OsdpCommandLed {
                    reader: 0,
                    led_number: 0,
                    temporary,
                    permanent,
                })
            }
            KeypadCommand::Buzzer(b) => OsdpCommand::Buzzer(OsdpCommandBuzzer {
                reader: 0,
                control_code: 2,
                on_count: ticks(b.on),
                off_count: (b.off.as_millis() / 100).min(255) as u8,
                rep_count: b.count.max(1),
            }),
            KeypadCommand::Text(t) => {
                let data: Vec<u8> = t
                    .text
                    .chars()
                    .take(MAX_TEXT)
                    .map(|c| {
                        if c.is_ascii() && !c.is_ascii_control() {
                            c as u8
                        } else {
                            b'?'
                        }
                    })
                    .collect();
                let (control_code, temp_time) = match t.temporary {
                    None => (1, 0),
                    Some(d) => (3, d.as_secs().clamp(1, 255) as u8),
                };
                OsdpCommand::Text(OsdpCommandText {
                    reader: 0,
                    control_code,
                    temp_time,
                    offset_row: t.row.max(1),
                    offset_col: t.col.max(1),
                    data,
                })
            }
        }
    }

    /// The OSDP command code on the wire.
    fn code(&self) -> u8 {
        match self {
            KeypadCommand::Led(_) => frame::CMD_LED,
            KeypadCommand::Buzzer(_) => frame::CMD_BUZ,
            KeypadCommand::Text(_) => frame::CMD_TEXT,
        }
    }
}

/// What a keypad acknowledged last (forgotten when it goes offline: it may have restarted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shown {
    /// The last acknowledged LED command.
    pub led: Option<Led>,
    /// The last acknowledged text.
    pub text: Option<Text>,
    /// The last acknowledged buzzer command.
    pub buzzer: Option<Buzzer>,
}

/// Keys pressed on a keypad, as one OSDP keypad report. `Debug` counts the keys and
/// never shows them (they are PIN digits).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPress {
    /// Keypad id.
    pub keypad: String,
    /// `0`-`9`, `*`, `#`.
    pub keys: String,
}

impl std::fmt::Debug for KeyPress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPress")
            .field("keypad", &self.keypad)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A key's character from its OSDP code: digits as ASCII, `*` 0x7F, `#` 0x0D (and the
/// ASCII `*`/`#` some readers send). Anything else is not a key.
pub fn key_char(code: u8) -> Option<char> {
    match code {
        b'0'..=b'9' => Some(char::from(code)),
        0x7F | b'*' => Some('*'),
        0x0D | b'#' => Some('#'),
        _ => None,
    }
}

/// A command on its way to the control panel thread.
struct Request {
    keypad: usize,
    command: KeypadCommand,
    reply: oneshot::Sender<Result<(), KeypadError>>,
}

/// Handle on one keypad; cheap to clone.
#[derive(Clone)]
pub struct Keypad {
    id: Arc<str>,
    index: usize,
    requests: std_mpsc::SyncSender<Request>,
    health: watch::Receiver<KeypadHealth>,
    shown: watch::Receiver<Shown>,
    timeout: Duration,
}

impl std::fmt::Debug for Keypad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keypad").field("id", &self.id).finish()
    }
}

impl Keypad {
    /// Device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Link health, updated by the control panel thread.
    pub fn health(&self) -> watch::Receiver<KeypadHealth> {
        self.health.clone()
    }

    /// What the keypad acknowledged last.
    pub fn shown(&self) -> watch::Receiver<Shown> {
        self.shown.clone()
    }

    /// Sends a command and waits for the keypad's acknowledgement. Fails at once when the
    /// keypad is offline or its queue is full; never waits longer than the command timeout.
    pub async fn send(&self, command: KeypadCommand) -> Result<(), KeypadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(Request {
                keypad: self.index,
                command,
                reply,
            })
            .map_err(|e| match e {
                std_mpsc::TrySendError::Full(_) => KeypadError::QueueFull,
                std_mpsc::TrySendError::Disconnected(_) => KeypadError::Stopped,
            })?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(KeypadError::Stopped),
            Err(_) => Err(KeypadError::Timeout(self.timeout)),
        }
    }

    /// Sets the LED.
    pub async fn led(&self, led: Led) -> Result<(), KeypadError> {
        self.send(KeypadCommand::Led(led)).await
    }

    /// Sounds the buzzer.
    pub async fn buzzer(&self, buzzer: Buzzer) -> Result<(), KeypadError> {
        self.send(KeypadCommand::Buzzer(buzzer)).await
    }

    /// Shows text.
    pub async fn text(&self, text: Text) -> Result<(), KeypadError> {
        self.send(KeypadCommand::Text(text)).await
    }
}

/// One control panel on one transport, with its keypads.
pub struct OsdpBus {
    config: BusConfig,
    options: OsdpOptions,
    requests: std_mpsc::Receiver<Request>,
    keys: mpsc::Sender<KeyPress>,
    health: Vec<watch::Sender<KeypadHealth>>,
    shown: Vec<watch::Sender<Shown>>,
}

impl std::fmt::Debug for OsdpBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsdpBus")
            .field("transport", &self.config.transport)
            .field("keypads", &self.config.keypads)
            .finish()
    }
}

impl OsdpBus {
    /// A bus and a handle per keypad; nothing runs until [`OsdpBus::run`]. Key presses of
    /// every keypad go to `keys` (dropped with a warning when it is full: the control panel
    /// never waits).
    pub fn new(
        config: BusConfig,
        options: OsdpOptions,
        keys: mpsc::Sender<KeyPress>,
    ) -> Result<(OsdpBus, Vec<Keypad>), KeypadError> {
        for k in config.keypads.iter().filter(|k| k.key.is_none()) {
            if !k.install_mode {
                return Err(KeypadError::Config {
                    id: k.id.clone(),
                    reason: "no secure channel key: plaintext is allowed only with install_mode"
                        .into(),
                });
            }
            tracing::warn!(keypad = %k.id, "OSDP keypad in install mode: plaintext, no secure channel");
        }
        let (req_tx, requests) =
            std_mpsc::sync_channel(QUEUE_PER_KEYPAD * config.keypads.len().max(1));
        let mut health = Vec::new();
        let mut shown = Vec::new();
        let mut pads = Vec::new();
        for (index, k) in config.keypads.iter().enumerate() {
            let (h_tx, h_rx) = watch::channel(KeypadHealth::default());
            let (s_tx, s_rx) = watch::channel(Shown::default());
            health.push(h_tx);
            shown.push(s_tx);
            pads.push(Keypad {
                id: k.id.as_str().into(),
                index,
                requests: req_tx.clone(),
                health: h_rx,
                shown: s_rx,
                // Queued behind at most QUEUE_PER_KEYPAD others, each acknowledged in ~50 ms.
                timeout: options.command_timeout,
            });
        }
        Ok((
            OsdpBus {
                config,
                options,
                requests,
                keys,
                health,
                shown,
            },
            pads,
        ))
    }

    /// Runs the control panel thread until `shutdown` turns true (or its sender goes).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), KeypadError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = oneshot::channel::<()>();
        let name = format!("osdp {}", self.config.transport);
        let panel = panel::Panel::new(self, stop.clone());
        // The thread's log lines carry the bus's device span, as the task's do.
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("osdp-cp".into())
            .spawn(move || {
                let _span = span.enter();
                panel.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| KeypadError::Thread(e.to_string()))?;
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            _ = done => {}
        }
        stop.store(true, Ordering::Relaxed);
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                tracing::error!(bus = %name, "OSDP control panel thread died");
                Err(KeypadError::Thread(format!("{name} died")))
            }
        }
    }
}

/// A spawned bus; resolves when the bus has stopped.
pub type BusTask = JoinHandle<Result<(), KeypadError>>;

/// Plans the buses of `keypads` and spawns each on the runtime: the keypad handles, and
/// the bus tasks to await after `shutdown`.
pub fn spawn_all(
    keypads: &[KeypadConfig],
    options: &OsdpOptions,
    keys: mpsc::Sender<KeyPress>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Vec<Keypad>, Vec<BusTask>), KeypadError> {
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for bus in plan(keypads)? {
        // One span per line: its keypads' ids (one id on the usual one-keypad line).
        let ids: Vec<&str> = bus.keypads.iter().map(|k| k.id.as_str()).collect();
        let span = crate::logging::device_span(&ids.join(","), "keypad");
        let (bus, pads) = OsdpBus::new(bus, options.clone(), keys.clone())?;
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            bus.run(shutdown.clone()),
            span,
        )));
        handles.extend(pads);
    }
    Ok((handles, tasks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypad(id: &str, port: &str, tcp: &str, address: u8, scbk: &str) -> KeypadConfig {
        KeypadConfig {
            id: id.into(),
            zone: "main-gate".into(),
            port: port.into(),
            baud: 9600,
            tcp: tcp.into(),
            address,
            scbk: scbk.into(),
            install_mode: false,
            gate: None,
            gate_sensor: None,
            pulse_ms: 3000,
            enabled: true,
        }
    }

    const KEY: &str = "000102030405060708090a0b0c0d0e0f";

    #[test]
    fn keypads_on_one_line_share_a_bus_and_need_distinct_addresses() {
        let buses = plan(&[
            keypad("a", "/dev/rs485", "", 1, KEY),
            keypad("b", "", "127.0.0.1:4000", 1, KEY),
            keypad("c", "/dev/rs485", "", 2, KEY),
        ])
        .unwrap_or_default();
        assert_eq!(buses.len(), 2);
        let serial = &buses[0];
        assert_eq!(
            serial.transport,
            Transport::Serial {
                path: "/dev/rs485".into(),
                baud: 9600
            }
        );
        let ids: Vec<&str> = serial.keypads.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(serial.keypads[0].key.map(|k| k[15]), Some(15));

        let clash = plan(&[
            keypad("a", "/dev/rs485", "", 1, KEY),
            keypad("c", "/dev/rs485", "", 1, KEY),
        ]);
        assert!(matches!(clash, Err(KeypadError::Config { id, .. }) if id == "c"));
        let mut fast = keypad("d", "/dev/rs485", "", 3, KEY);
        fast.baud = 115_200;
        assert!(plan(&[keypad("a", "/dev/rs485", "", 1, KEY), fast]).is_err());
    }

    #[test]
    fn no_key_is_refused_unless_install_mode() {
        let mut k = keypad("a", "/dev/rs485", "", 1, "");
        let err = plan(std::slice::from_ref(&k)).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("install_mode")));
        k.install_mode = true;
        let buses = plan(&[k]).unwrap_or_default();
        assert_eq!(buses[0].keypads[0].key, None);
        assert!(plan(&[keypad("a", "/dev/x", "", 1, "abc")]).is_err());
        assert!(plan(&[keypad("a", "/dev/x", "", 1, &"zz".repeat(16))]).is_err());
    }

    #[test]
    fn keys_map_back_from_osdp_codes() {
        let keys: String = [b'1', b'2', 0x7F, 0x0D, b'#', 0x00, 0xFF]
            .iter()
            .filter_map(|&c| key_char(c))
            .collect();
        assert_eq!(keys, "12*##");
    }

    #[test]
    fn steady_leds_are_never_all_zero_and_text_is_cut() {
        let OsdpCommand::Led(l) = KeypadCommand::Led(Led::steady(LedColor::Green)).to_osdp() else {
            panic!("an LED command")
        };
        assert_eq!(
            (
                l.permanent.control_code,
                l.permanent.on_count,
                l.permanent.off_count
            ),
            (1, 1, 0)
        );
        assert_eq!(l.temporary.control_code, 0);
        let OsdpCommand::Led(t) =
            KeypadCommand::Led(Led::temporary(LedColor::Red, Duration::from_millis(50))).to_osdp()
        else {
            panic!("an LED command")
        };
        assert_eq!((t.temporary.control_code, t.temporary.timer_count), (2, 1));
        assert!(t.temporary.on_count > 0);

        let long = "Welcome to the storage facility, unit 12 — enjoy";
        let OsdpCommand::Text(x) = KeypadCommand::Text(Text::new(long)).to_osdp() else {
            panic!("a text command")
        };
        assert_eq!(x.data.len(), MAX_TEXT);
        assert!(x.data.iter().all(|b| b.is_ascii_graphic() || *b == b' '));
        let OsdpCommand::Buzzer(b) = KeypadCommand::Buzzer(Buzzer {
            on: Duration::ZERO,
            off: Duration::ZERO,
            count: 0,
        })
        .to_osdp() else {
            panic!("a buzzer command")
        };
        assert_eq!((b.on_count, b.rep_count), (1, 1));
    }
}
