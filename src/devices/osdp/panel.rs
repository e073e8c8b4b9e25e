//! The control panel thread: builds libosdp's `ControlPanel` on the bus's transport,
//! refreshes it every few tens of milliseconds (waking early for commands, and as soon as
//! a keypad's reply arrives on the line), matches
//! commands to the keypads' ACK/NAK read off the wire, hands key presses to tokio,
//! publishes health, and rebuilds everything after a backoff when a keypad or the
//! transport is lost.

use super::frame::{self, command_name};
use super::wire::{self, Tap, Wire, WireEvent};
use super::{
    KeyPress, KeypadCommand, KeypadError, KeypadHealth, KeypadSpec, OsdpBus, OsdpOptions,
    QUEUE_PER_KEYPAD, Request, Shown, Transport, key_char,
};
use libosdp::{ControlPanel, ControlPanelBuilder, OsdpEvent, OsdpFlag, PdInfoBuilder};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// libosdp probes an unanswering keypad about once a second; quieter than this means it
/// has given up (its own retry is 300 s away).
const GIVEN_UP_QUIET: Duration = Duration::from_millis(1500);
/// How long after a frame the line is watched for its reply (libosdp gives up at 200 ms).
const REPLY_WAIT: Duration = Duration::from_millis(250);
/// What the control panel thread waits on between refreshes.
enum Wake {
    /// Bytes on the keypads' line (a reply is due), for at most this long.
    Line(Duration),
    /// A request from tokio, for at most this long.
    Request(Duration),
}

/// Blocks until `line` has bytes to read, or `wait` has passed. A line in error (hung up)
/// counts as a timeout: the refresh that follows notices and rebuilds.
fn wait_readable(line: &OwnedFd, wait: Duration) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(line, PollFlags::IN)];
    let ready = poll(&mut fds, Some(&timeout)).unwrap_or(0);
    if ready > 0 && !fds[0].revents().contains(PollFlags::IN) {
        std::thread::sleep(wait);
    }
}

/// Events one refresh may collect before the rest are dropped (a flooding keypad).
const MAX_EVENTS: usize = 256;

thread_local! {
    /// libosdp's events, collected by a callback that captures nothing: the binding leaks
    /// the boxed closure on every `set_event_callback`, and a zero-sized one costs nothing
    /// (the panel is rebuilt, so the callback is set once per panel).
    static EVENTS: RefCell<Vec<(i32, OsdpEvent)>> = const { RefCell::new(Vec::new()) };
}

fn on_event(pd: i32, event: OsdpEvent) -> i32 {
    EVENTS.with(|e| {
        if let Ok(mut e) = e.try_borrow_mut()
            && e.len() < MAX_EVENTS
        {
            e.push((pd, event));
        }
    });
    0
}

struct Pending {
    command: KeypadCommand,
    reply: oneshot::Sender<Result<(), KeypadError>>,
}

/// What the thread knows about one keypad.
struct Pad {
    spec: KeypadSpec,
    health: watch::Sender<KeypadHealth>,
    shown: watch::Sender<Shown>,
    /// Submitted to libosdp, not yet acknowledged, oldest first.
    pending: VecDeque<Pending>,
    /// The command whose reply is awaited on the wire.
    in_flight: Option<u8>,
    online: bool,
    /// Online and answering: what health says, and what commands require.
    reported: bool,
    last_reply: Option<Instant>,
    last_sent: Option<(u8, Instant)>,
    /// A frame went out and its reply has not been read yet.
    awaiting: bool,
    last_reply_code: Option<u8>,
    bad_check: bool,
    /// When it stopped being online in this panel (or the panel was built).
    down_since: Instant,
    /// When libosdp was seen to have given up on it.
    given_up: Option<Instant>,
}

impl Pad {
    fn reset(&mut self, now: Instant) {
        self.in_flight = None;
        self.online = false;
        self.reported = false;
        self.last_reply = None;
        self.last_sent = None;
        self.awaiting = false;
        self.last_reply_code = None;
        self.bad_check = false;
        self.down_since = now;
        self.given_up = None;
    }

    fn fail_pending(&mut self, e: &KeypadError) {
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(e.clone()));
        }
        self.in_flight = None;
    }

    fn set_error(&self, why: String) {
        self.health.send_if_modified(|h| {
            if h.last_error.as_deref() == Some(why.as_str()) {
                return false;
            }
            tracing::warn!(keypad = %self.spec.id, error = %why, "OSDP keypad");
            h.last_error = Some(why);
            true
        });
    }

    /// Why libosdp dropped the keypad, from the last exchange on the wire.
    fn diagnose(&self) -> String {
        let addr = self.spec.address;
        // libosdp probes ~1 s apart: a reply older than the last probe by more than its
        // 200 ms reply window means the keypad stopped answering.
        let unanswered = match (self.last_sent, self.last_reply) {
            (Some((_, sent)), Some(reply)) => sent > reply + Duration::from_millis(300),
            _ => false,
        };
        match (self.last_sent.map(|(c, _)| c), self.last_reply_code) {
            _ if self.bad_check => "a reply failed its check (line noise or a second master?)".into(),
            (_, None) => format!("no reply from OSDP address {addr} (wiring, address or baud?)"),
            _ if unanswered => format!("the keypad at OSDP address {addr} stopped answering"),
            (Some(frame::CMD_CHLNG), Some(frame::REPLY_CCRYPT)) => {
                "secure channel refused: the keypad's cryptogram does not match our key (scbk differs)"
                    .into()
            }
            (Some(frame::CMD_SCRYPT), _) => {
                "secure channel refused: the keypad rejected our cryptogram (scbk differs)".into()
            }
            (Some(frame::CMD_CHLNG), Some(frame::REPLY_NAK)) => {
                "secure channel refused: the keypad NAKed the challenge (no key set on it?)".into()
            }
            (Some(frame::CMD_CAP), Some(frame::REPLY_PDCAP)) if self.spec.key.is_some() => {
                "the keypad offers no secure channel and plaintext is refused".into()
            }
            (Some(sent), Some(frame::REPLY_NAK)) => {
                format!("the keypad NAKed {} and was dropped", command_name(sent))
            }
            (sent, Some(reply)) => format!(
                "control panel dropped the keypad (last command {}, last reply {reply:#04x})",
                sent.map(command_name).unwrap_or_else(|| "none".into())
            ),
        }
    }
}

/// Capped exponential backoff with ±20 % jitter.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    fn take(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Why a panel ended.
enum End {
    Stop,
    Rebuild,
}

/// The thread's state.
pub(super) struct Panel {
    transport: Transport,
    options: OsdpOptions,
    requests: Receiver<Request>,
    keys: mpsc::Sender<KeyPress>,
    pads: Vec<Pad>,
    stop: Arc<AtomicBool>,
    backoff: Backoff,
    builds: u32,
}

impl Panel {
    pub(super) fn new(bus: OsdpBus, stop: Arc<AtomicBool>) -> Panel {
        let now = Instant::now();
        let pads = bus
            .config
            .keypads
            .into_iter()
            .zip(bus.health)
            .zip(bus.shown)
            .map(|((spec, health), shown)| Pad {
                spec,
                health,
                shown,
                pending: VecDeque::new(),
                in_flight: None,
                online: false,
                reported: false,
                last_reply: None,
                last_sent: None,
                awaiting: false,
                last_reply_code: None,
                bad_check: false,
                down_since: now,
                given_up: None,
            })
            .collect();
        Panel {
            transport: bus.config.transport,
            backoff: Backoff::new(bus.options.backoff_min, bus.options.backoff_max),
            options: bus.options,
            requests: bus.requests,
            keys: bus.keys,
            pads,
            stop,
            builds: 0,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub(super) fn run(mut self) {
        tracing::info!(bus = %self.transport, keypads = self.pads.len(), "OSDP control panel starting");
        while !self.stopping() {
            let tap = Arc::new(Mutex::new(Tap::default()));
            let built = Wire::open(&self.transport, self.options.connect_timeout, tap.clone())
                .and_then(|(w, line)| self.build(w).map(|cp| (cp, line)));
            match built {
                Ok((cp, line)) => {
                    self.builds += 1;
                    let builds = self.builds;
                    for p in &self.pads {
                        p.health.send_if_modified(|h| {
                            h.builds = builds;
                            true
                        });
                    }
                    if let End::Stop = self.serve(cp, &tap, &line) {
                        break;
                    }
                }
                Err(why) => {
                    for p in &self.pads {
                        p.set_error(why.clone());
                    }
                    let delay = self.backoff.take();
                    tracing::debug!(bus = %self.transport, ?delay, "OSDP transport down; retrying");
                    self.idle(delay);
                }
            }
        }
        for p in &mut self.pads {
            p.fail_pending(&KeypadError::Stopped);
            p.health.send_if_modified(|h| {
                let was = h.online || h.secure;
                h.online = false;
                h.secure = false;
                was
            });
        }
        tracing::info!(bus = %self.transport, "OSDP control panel stopped");
    }

    fn build(&self, wire: Wire) -> Result<ControlPanel, String> {
        let mut infos = Vec::new();
        for p in &self.pads {
            let s = &p.spec;
            let name: String = s.id.chars().filter(|c| *c != '\0').take(15).collect();
            let bad = |e: libosdp::OsdpError| format!("keypad {}: {e}", s.id);
            let mut info = PdInfoBuilder::new()
                .name(&name)
                .map_err(bad)?
                .address(i32::from(s.address))
                .map_err(bad)?
                .baud_rate(i32::try_from(s.baud).unwrap_or(0))
                .map_err(|_| format!("keypad {}: libosdp does not take baud {}", s.id, s.baud))?;
            if let Some(k) = s.key {
                // Never plaintext, never the default key, once a key is set.
                info = info.secure_channel_key(k).flag(OsdpFlag::EnforceSecure);
            }
            infos.push(info);
        }
        let mut cp = ControlPanelBuilder::new()
            .add_channel(Box::new(wire), infos)
            .build()
            .map_err(|e| format!("control panel setup: {e}"))?;
        cp.set_event_callback(on_event);
        Ok(cp)
    }

    /// Waits `delay`, answering commands (offline) and watching for stop.
    fn idle(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        while !self.stopping() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            // Short slices: stop is a flag, not a message.
            match self
                .requests
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(r) => {
                    let _ = r.reply.send(Err(KeypadError::Offline));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left.min(Duration::from_millis(100)))
                }
            }
        }
    }

    fn serve(&mut self, mut cp: ControlPanel, tap: &Arc<Mutex<Tap>>, line: &OwnedFd) -> End {
        let start = Instant::now();
        for p in &mut self.pads {
            p.reset(start);
        }
        EVENTS.with(|e| e.borrow_mut().clear());
        let end = loop {
            while let Ok(r) = self.requests.try_recv() {
                self.submit(&mut cp, r);
            }
            cp.refresh();
            let now = Instant::now();
            let broken = self.after_refresh(&cp, tap, now);
            if self.stopping() {
                break End::Stop;
            }
            if let Some(why) = broken {
                for p in &self.pads {
                    p.set_error(why.clone());
                }
                break End::Rebuild;
            }
            if self
                .pads
                .iter()
                .any(|p| p.given_up.is_some_and(|t| now >= t))
            {
                break End::Rebuild;
            }
            match self.next_wake(Instant::now()) {
                Wake::Line(wait) => wait_readable(line, wait),
                Wake::Request(wait) => match self.requests.recv_timeout(wait) {
                    Ok(r) => self.submit(&mut cp, r),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
                },
            }
        };
        // Teardown closes the channel, which drops the port.
        drop(cp);
        let keypad_lost = self.pads.iter().any(|p| p.given_up.is_some());
        let now = Instant::now();
        for p in &mut self.pads {
            p.fail_pending(&KeypadError::Restarted);
            p.reset(now);
            p.health.send_if_modified(|h| {
                let was = h.online || h.secure;
                h.online = false;
                h.secure = false;
                was
            });
            p.shown.send_replace(Shown::default());
        }
        if let End::Rebuild = end
            && !keypad_lost
        {
            // The transport broke (not a keypad): wait before reopening it.
            let delay = self.backoff.take();
            self.idle(delay);
        }
        end
    }

    /// What to wait on before the next refresh, and for how long: `refresh` at most. While an
    /// online keypad's reply is due (a frame went out since its last reply, less than
    /// [`REPLY_WAIT`] ago), the line itself, so the reply is read as soon as it lands
    /// (requests queue meanwhile: a reply takes milliseconds). Otherwise requests, for
    /// `refresh`: waking earlier for libosdp's POLL timer would poll each keypad ~40 % more
    /// often and cost more idle CPU than the ~10 ms of key latency it saves.
    fn next_wake(&self, now: Instant) -> Wake {
        let mut wait = self.options.refresh;
        let mut reply_due = false;
        for p in self.pads.iter().filter(|p| p.online && p.awaiting) {
            let Some((_, sent)) = p.last_sent else {
                continue;
            };
            let hurry_until = sent + REPLY_WAIT;
            if now < hurry_until {
                reply_due = true;
                wait = wait.min(hurry_until - now);
            }
        }
        if reply_due {
            Wake::Line(wait)
        } else {
            Wake::Request(wait)
        }
    }

    fn submit(&mut self, cp: &mut ControlPanel, r: Request) {
        let Some(pad) = self.pads.get_mut(r.keypad) else {
            let _ = r.reply.send(Err(KeypadError::Stopped));
            return;
        };
        let i = r.keypad as i32;
        let secure_ok = pad.spec.key.is_none() || cp.is_sc_active(i);
        if !pad.reported || !cp.is_online(i) || !secure_ok {
            let _ = r.reply.send(Err(KeypadError::Offline));
            return;
        }
        if pad.pending.len() >= QUEUE_PER_KEYPAD {
            let _ = r.reply.send(Err(KeypadError::QueueFull));
            return;
        }
        match cp.send_command(i, r.command.to_osdp()) {
            Ok(()) => pad.pending.push_back(Pending {
                command: r.command,
                reply: r.reply,
            }),
            Err(_) => {
                let _ = r.reply.send(Err(KeypadError::QueueFull));
            }
        }
    }

    /// Reads what happened; returns why the transport broke, if it did.
    fn after_refresh(
        &mut self,
        cp: &ControlPanel,
        tap: &Arc<Mutex<Tap>>,
        now: Instant,
    ) -> Option<String> {
        let (events, broken) = {
            let mut t = wire::lock(tap);
            (t.take(), t.broken().map(str::to_owned))
        };
        for e in events {
            self.on_wire(e, now);
        }
        let osdp_events = EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()));
        for (pd, event) in osdp_events {
            self.on_osdp_event(pd, event);
        }
        let mut all_online = true;
        for (i, p) in self.pads.iter_mut().enumerate() {
            let i = i as i32;
            let online = cp.is_online(i);
            let secure = cp.is_sc_active(i);
            all_online &= online;
            if online != p.online {
                p.online = online;
                if online {
                    p.given_up = None;
                    tracing::info!(keypad = %p.spec.id, secure, "OSDP keypad online");
                } else {
                    p.down_since = now;
                    p.fail_pending(&KeypadError::Offline);
                    p.shown.send_replace(Shown::default());
                    tracing::warn!(keypad = %p.spec.id, "OSDP keypad offline");
                }
            }
            let silent = p
                .last_reply
                .is_none_or(|t| now.duration_since(t) > self.options.silence);
            if online && silent {
                p.set_error(format!(
                    "no reply for more than {} ms",
                    self.options.silence.as_millis()
                ));
            }
            if !online && p.given_up.is_none() {
                let quiet = p
                    .last_sent
                    .map_or(p.down_since, |(_, t)| t.max(p.down_since));
                if now.duration_since(quiet) > GIVEN_UP_QUIET {
                    let why = p.diagnose();
                    p.set_error(why);
                    let delay = self.backoff.take();
                    tracing::info!(keypad = %p.spec.id, ?delay, "OSDP keypad dropped; rebuilding the control panel after a backoff");
                    p.given_up = Some(now + delay);
                }
            }
            let reported = online && !silent;
            if p.reported && !reported {
                // It may come back restarted: what it shows is unknown until told again.
                p.shown.send_replace(Shown::default());
            }
            p.reported = reported;
            p.health.send_if_modified(|h| {
                let changed = h.online != reported || h.secure != secure;
                h.online = reported;
                h.secure = secure;
                changed
            });
        }
        if all_online {
            self.backoff.reset();
        }
        broken
    }

    fn on_wire(&mut self, e: WireEvent, now: Instant) {
        match e {
            WireEvent::Sent { addr, code } => {
                if let Some(p) = self.pads.iter_mut().find(|p| p.spec.address == addr) {
                    p.last_sent = Some((code, now));
                    p.awaiting = true;
                    p.in_flight = matches!(code, frame::CMD_LED | frame::CMD_BUZ | frame::CMD_TEXT)
                        .then_some(code);
                }
            }
            WireEvent::Reply { addr, code, reason } => {
                let Some(p) = self.pads.iter_mut().find(|p| p.spec.address == addr) else {
                    return;
                };
                p.last_reply = Some(now);
                p.awaiting = false;
                p.last_reply_code = Some(code);
                p.bad_check = false;
                let Some(sent) = p.in_flight.take() else {
                    return;
                };
                let outcome = match code {
                    frame::REPLY_ACK => Ok(()),
                    frame::REPLY_NAK => Err(KeypadError::Refused(reason)),
                    // BUSY and the like: libosdp sends the command again.
                    _ => return,
                };
                let Some(at) = p.pending.iter().position(|c| c.command.code() == sent) else {
                    return;
                };
                let Some(done) = p.pending.remove(at) else {
                    return;
                };
                if outcome.is_ok() {
                    p.shown.send_modify(|s| match &done.command {
                        KeypadCommand::Led(l) => s.led = Some(*l),
                        KeypadCommand::Text(t) => s.text = Some(t.clone()),
                        KeypadCommand::Buzzer(b) => s.buzzer = Some(*b),
                    });
                } else {
                    p.set_error(format!("the keypad NAKed {}", command_name(sent)));
                }
                let _ = done.reply.send(outcome);
            }
            WireEvent::BadCheck => {
                // A damaged frame names no reliable address: every keypad on the line saw it.
                for p in &mut self.pads {
                    p.bad_check = true;
                }
            }
        }
    }

    fn on_osdp_event(&mut self, pd: i32, event: OsdpEvent) {
        let Some(p) = usize::try_from(pd).ok().and_then(|i| self.pads.get(i)) else {
            return;
        };
        let OsdpEvent::KeyPress(k) = event else {
            return;
        };
        let keys: String = k.data.iter().filter_map(|&c| key_char(c)).collect();
        if keys.len() != k.data.len() {
            // Only the codes that are not keys: the digits around them may be a PIN.
            let odd: Vec<u8> = k
                .data
                .iter()
                .copied()
                .filter(|&c| key_char(c).is_none())
                .collect();
            tracing::warn!(keypad = %p.spec.id, codes = ?odd, "OSDP keypad sent codes that are not keys; ignored them");
        }
        if keys.is_empty() {
            return;
        }
        let press = KeyPress {
            keypad: p.spec.id.clone(),
            keys,
        };
        // Never wait here: a stalled consumer must not stop the polling.
        if let Err(e) = self.keys.try_send(press) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "key presses dropped: the consumer is behind",
                mpsc::error::TrySendError::Closed(_) => "key presses dropped: nobody listens",
            };
            p.set_error(why.into());
        }
    }
}
