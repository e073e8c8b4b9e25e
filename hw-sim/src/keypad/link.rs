//! The keypad's wire: a pseudo-terminal and/or a TCP listener (one control panel connection
//! at a time), offered to libosdp as one non-blocking [`Channel`]. Faults act here, on the
//! bytes, the way a bad cable or a dead transceiver would: offline swallows everything,
//! drop loses a reply, corrupt flips a byte of a reply, delay holds a reply back.
//!
//! Replies go to the transport the last command frame came from. Everything worth telling
//! (frames seen, garbage, replies sent or damaged, connections) is queued as [`Note`]s for
//! the device loop, which owns state and observations.
//!
//! With line timing ([`Link::line_timing`]) the pseudo-terminal behaves like an RS-485 line
//! at the keypad's baud ([`crate::line`]): the control panel's bytes reach libosdp one
//! character time apart once the line is free, and replies leave paced at the baud rate,
//! after the command that asked for them has finished.

use super::frame::{self, Sniffed, Sniffer};
use crate::fault::Faults;
use crate::line::{self, LineClock, LineTiming, Transit};
use libosdp::{Channel, ChannelError};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde::Serialize;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most this many bytes reach libosdp per refresh: its receive ring holds 512 and a
/// flood must not overflow it (the rest waits in the kernel for the next refresh).
const RX_BUDGET: usize = 256;
/// A TCP connection that sent something this recently is in use: a second one is refused.
pub(crate) const LIVE: Duration = Duration::from_secs(2);
/// After a hang-up or error on a transport, leave it alone this long (no busy polling).
const QUIET: Duration = Duration::from_secs(1);

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Via {
    /// The pseudo-terminal (RS-485 stand-in).
    Serial,
    /// The TCP connection.
    Tcp,
}

impl Via {
    /// Name used in state and observations.
    pub fn name(self) -> &'static str {
        match self {
            Via::Serial => "serial",
            Via::Tcp => "tcp",
        }
    }
}

/// Something that happened on the wire.
#[derive(Debug)]
pub(crate) enum Note {
    /// Bytes from the control panel side turned out to be a frame or garbage.
    Rx { via: Via, item: Sniffed },
    /// A reply left (`code` is its reply code, read before any corruption).
    ReplySent { via: Via, code: Option<u8> },
    /// A reply was lost to the drop fault.
    ReplyDropped { via: Via },
    /// A reply byte was flipped by the corrupt fault.
    ReplyCorrupted { via: Via, at: usize },
    /// A reply was held back by the delay fault.
    ReplyDelayed { via: Via, ms: u64 },
    /// A control panel connected over TCP.
    TcpAccepted { peer: SocketAddr },
    /// The TCP connection ended.
    TcpClosed { peer: SocketAddr, reason: String },
    /// A second TCP connection was turned away while the first is in use.
    TcpRefused {
        peer: SocketAddr,
        current: SocketAddr,
    },
    /// A silent TCP connection was replaced by a new one.
    TcpReplaced { old: SocketAddr },
    /// The pseudo-terminal reported a hang-up or error.
    SerialError { reason: String },
}

struct TcpConn {
    stream: TcpStream,
    peer: SocketAddr,
    sniffer: Sniffer,
    last_rx: Instant,
}

struct Delayed {
    due: Instant,
    via: Via,
    bytes: Vec<u8>,
    code: Option<u8>,
}

/// The serial line's timing and the bytes in transit on it.
struct Timed {
    clock: LineClock,
    /// Control panel → keypad.
    rx: Transit,
    /// Keypad → control panel.
    tx: Transit,
    /// Replies in `tx`, oldest first: bytes not yet written, reply code.
    replies: VecDeque<(usize, Option<u8>)>,
    scratch: Vec<u8>,
}

/// The transports and what is in flight on them.
pub(crate) struct Link {
    device: String,
    faults: Faults,
    pty: Option<File>,
    pty_sniffer: Sniffer,
    pty_quiet_until: Option<Instant>,
    listener: Option<TcpListener>,
    listener_quiet_until: Option<Instant>,
    conn: Option<TcpConn>,
    active: Option<Via>,
    rx_budget: usize,
    delayed: VecDeque<Delayed>,
    notes: Vec<Note>,
    scratch: Vec<Sniffed>,
    timed: Option<Timed>,
    /// The keypad's wake-up socket: readable when a request waits.
    waker: Option<UnixStream>,
}

impl Link {
    /// A link over a pseudo-terminal master (non-blocking) and/or a TCP listener
    /// (non-blocking).
    pub fn new(
        device: &str,
        faults: Faults,
        pty: Option<File>,
        listener: Option<TcpListener>,
    ) -> Link {
        Link {
            device: device.to_owned(),
            faults,
            pty,
            pty_sniffer: Sniffer::default(),
            pty_quiet_until: None,
            listener,
            listener_quiet_until: None,
            conn: None,
            active: None,
            rx_budget: RX_BUDGET,
            delayed: VecDeque::new(),
            notes: Vec::new(),
            scratch: Vec::new(),
            timed: None,
            waker: None,
        }
    }

    /// Gives the pseudo-terminal RS-485 line timing (`None`: bytes move at once).
    pub fn line_timing(mut self, timing: Option<LineTiming>) -> Link {
        self.timed = timing.map(|t| Timed {
            clock: LineClock::new(t),
            rx: Transit::new(t),
            tx: Transit::new(t),
            replies: VecDeque::new(),
            scratch: Vec::new(),
        });
        self
    }

    /// Also wakes [`Link::wait`] when `waker` turns readable (a non-blocking socket).
    pub fn waker(mut self, waker: UnixStream) -> Link {
        self.waker = Some(waker);
        self
    }

    /// Sleeps until a transport (or the waker) has something (or `timeout`), then accepts new TCP
    /// connections. Never longer than `timeout`.
    pub fn wait(&mut self, timeout: Duration) {
        let now = Instant::now();
        let pty_ok = self.pty_quiet_until.is_none_or(|t| now >= t);
        let listener_ok = self.listener_quiet_until.is_none_or(|t| now >= t);
        let (pty_hup, listener_ready) = {
            let mut fds = Vec::with_capacity(4);
            let mut pty_at = None;
            let mut listener_at = None;
            if let (Some(p), true) = (&self.pty, pty_ok) {
                pty_at = Some(fds.len());
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            if let (Some(l), true) = (&self.listener, listener_ok) {
                listener_at = Some(fds.len());
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            if let Some(c) = &self.conn {
                fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
            }
            if let Some(w) = &self.waker {
                fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
            }
            // Rounded up: a sub-millisecond wait for a byte on a timed line must not spin.
            let ms = PollTimeout::try_from(line::ceil_ms(timeout)).unwrap_or(PollTimeout::MAX);
            if nix::poll::poll(&mut fds, ms).is_err() {
                // EINTR or the like: the caller's loop comes straight back.
                return;
            }
            let revents = |at: Option<usize>| {
                at.and_then(|i| fds[i].revents())
                    .unwrap_or(PollFlags::empty())
            };
            let p = revents(pty_at);
            (
                p.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)
                    && !p.contains(PollFlags::POLLIN),
                revents(listener_at).contains(PollFlags::POLLIN),
            )
        };
        if let Some(mut w) = self.waker.as_ref() {
            // Drain the wake-ups (non-blocking): the caller handles every request anyway.
            let mut buf = [0u8; 64];
            while matches!(w.read(&mut buf), Ok(n) if n > 0) {}
        }
        if pty_hup {
            self.pty_quiet_until = Some(now + QUIET);
            self.notes.push(Note::SerialError {
                reason: "pseudo-terminal hung up".into(),
            });
        }
        if listener_ready {
            self.accept(Instant::now());
        }
    }

    /// Starts a refresh: libosdp may read another budget of bytes.
    pub fn begin_refresh(&mut self) {
        self.rx_budget = RX_BUDGET;
    }

    fn accept(&mut self, now: Instant) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Some(c) = &self.conn
                        && now.duration_since(c.last_rx) < LIVE
                    {
                        // Dropping the stream closes it: the newcomer sees EOF at once.
                        self.notes.push(Note::TcpRefused {
                            peer,
                            current: c.peer,
                        });
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    if let Some(old) = self.conn.take() {
                        self.notes.push(Note::TcpReplaced { old: old.peer });
                    }
                    self.conn = Some(TcpConn {
                        stream,
                        peer,
                        sniffer: Sniffer::default(),
                        last_rx: now,
                    });
                    self.notes.push(Note::TcpAccepted { peer });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of file descriptors: the listener would stay readable.
                    tracing::warn!(device = %self.device, error = %e, "accepting a TCP connection failed");
                    self.listener_quiet_until = Some(now + QUIET);
                    break;
                }
            }
        }
        self.listener = Some(listener);
    }

    /// libosdp reads: bytes from whichever transport has some (none while offline).
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let offline = self.faults.offline(&self.device);
        loop {
            let max = buf.len().min(self.rx_budget);
            if max == 0 {
                return 0;
            }
            let Some((via, n)) = self.read_any(&mut buf[..max]) else {
                return 0;
            };
            self.rx_budget -= n;
            self.active.get_or_insert(via);
            self.sniff(via, n, buf);
            if !offline {
                return n;
            }
            // Offline: the bytes were on the wire (and seen) but nobody hears them.
        }
    }

    fn read_any(&mut self, buf: &mut [u8]) -> Option<(Via, usize)> {
        let now = Instant::now();
        if self.timed.is_some() {
            if let Some(n) = self.read_timed(now, buf) {
                return Some((Via::Serial, n));
            }
        } else if let Some(n) = self.read_pty(now, buf) {
            return Some((Via::Serial, n));
        }
        if let Some(c) = self.conn.as_mut() {
            match c.stream.read(buf) {
                Ok(0) => self.close_conn("closed by the control panel".into()),
                Ok(n) => {
                    c.last_rx = now;
                    return Some((Via::Tcp, n));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => self.close_conn(e.to_string()),
            }
        }
        None
    }

    /// Reads the pseudo-terminal as it is.
    fn read_pty(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let p = self.pty.as_mut()?;
        if self.pty_quiet_until.is_some_and(|t| now < t) {
            return None;
        }
        match p.read(buf) {
            Ok(n) if n > 0 => Some(n),
            Ok(_) => None,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => None,
            Err(e) => {
                self.pty_quiet_until = Some(now + QUIET);
                self.notes.push(Note::SerialError {
                    reason: e.to_string(),
                });
                None
            }
        }
    }

    /// Timed line: everything the pseudo-terminal holds goes on the line now; what has
    /// crossed it by `now` is read.
    fn read_timed(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        let mut chunk = [0u8; 512];
        while let Some(n) = self.read_pty(now, &mut chunk) {
            let t = self.timed.as_mut()?;
            t.rx.push(&mut t.clock, now, &chunk[..n]);
        }
        let t = self.timed.as_mut()?;
        t.scratch.clear();
        let n = t.rx.take_due(now, buf.len(), &mut t.scratch);
        buf[..n].copy_from_slice(&t.scratch[..n]);
        (n > 0).then_some(n)
    }

    fn sniff(&mut self, via: Via, n: usize, buf: &[u8]) {
        let now = Instant::now();
        let sniffer = match via {
            Via::Serial => &mut self.pty_sniffer,
            Via::Tcp => match self.conn.as_mut() {
                Some(c) => &mut c.sniffer,
                None => return,
            },
        };
        sniffer.push(&buf[..n], now, &mut self.scratch);
        // Replies follow the last command, not stray bytes on the other transport.
        if self
            .scratch
            .iter()
            .any(|s| matches!(s, Sniffed::Frame(f) if !f.reply))
        {
            self.active = Some(via);
        }
        self.notes
            .extend(self.scratch.drain(..).map(|item| Note::Rx { via, item }));
    }

    /// Gives up on partial frames that never completed (call on every tick).
    pub fn expire(&mut self, now: Instant) {
        self.pty_sniffer.expire(now, &mut self.scratch);
        self.notes
            .extend(self.scratch.drain(..).map(|item| Note::Rx {
                via: Via::Serial,
                item,
            }));
        if let Some(c) = self.conn.as_mut() {
            c.sniffer.expire(now, &mut self.scratch);
            self.notes
                .extend(self.scratch.drain(..).map(|item| Note::Rx {
                    via: Via::Tcp,
                    item,
                }));
        }
    }

    fn close_conn(&mut self, reason: String) {
        if let Some(c) = self.conn.take() {
            self.notes.push(Note::TcpClosed {
                peer: c.peer,
                reason,
            });
            if self.active == Some(Via::Tcp) {
                self.active = None;
            }
        }
    }

    /// libosdp writes one reply packet: faults apply, then it leaves (or waits).
    pub fn write(&mut self, buf: &[u8]) {
        let Some(via) = self.active else {
            return;
        };
        if self.faults.offline(&self.device) {
            return;
        }
        if self.faults.drop_now(&self.device) {
            self.notes.push(Note::ReplyDropped { via });
            return;
        }
        let code = frame::parse_packet(buf).map(|f| f.code);
        let mut bytes = buf.to_vec();
        if self.faults.corrupt_now(&self.device) && !bytes.is_empty() {
            // A byte after the header: the frame still looks like a frame, so the
            // control panel sees a bad check rather than silence.
            let from = frame::body_start(&bytes);
            let at = rand::random_range(from..bytes.len());
            bytes[at] ^= rand::random_range(1..=255u8);
            self.notes.push(Note::ReplyCorrupted { via, at });
        }
        let now = Instant::now();
        let due = match self.faults.delay(&self.device) {
            Some(d) => {
                self.notes.push(Note::ReplyDelayed {
                    via,
                    ms: d.as_millis() as u64,
                });
                now + d
            }
            None if !self.delayed.is_empty() => now, // keep replies in order
            None => return self.send(via, &bytes, code),
        };
        self.delayed.push_back(Delayed {
            due,
            via,
            bytes,
            code,
        });
    }

    /// When the next held-back reply is due, or (timed line) the next byte crosses.
    pub fn next_due(&self) -> Option<Instant> {
        let timed = self.timed.as_ref().and_then(|t| {
            [t.rx.next_due(), t.tx.next_due()]
                .into_iter()
                .flatten()
                .min()
        });
        [self.delayed.front().map(|d| d.due), timed]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends held-back replies that are due, and (timed line) the reply bytes whose wire
    /// time has come.
    pub fn flush_due(&mut self, now: Instant) {
        while self.delayed.front().is_some_and(|d| d.due <= now) {
            if let Some(d) = self.delayed.pop_front() {
                self.send(d.via, &d.bytes, d.code);
            }
        }
        self.pace(now);
    }

    /// Timed line: writes the reply bytes that have crossed the line by `now`.
    fn pace(&mut self, now: Instant) {
        let Some(t) = self.timed.as_mut() else {
            return;
        };
        t.scratch.clear();
        let n = t.tx.take_due(now, usize::MAX, &mut t.scratch);
        if n == 0 {
            return;
        }
        let result = match self.pty.as_mut() {
            Some(p) => write_some(p, &t.scratch),
            None => Ok(0),
        };
        match result {
            Ok(sent) if sent < n => {
                tracing::warn!(device = %self.device, sent, of = n, "reply cut short: the line is full")
            }
            Ok(_) => {}
            Err(e) => self.notes.push(Note::SerialError {
                reason: e.to_string(),
            }),
        }
        // Replies whose last byte has now crossed are sent.
        let mut left = n;
        while let Some((rest, code)) = t.replies.front_mut() {
            let k = left.min(*rest);
            *rest -= k;
            left -= k;
            if *rest > 0 {
                break;
            }
            let code = *code;
            t.replies.pop_front();
            self.notes.push(Note::ReplySent {
                via: Via::Serial,
                code,
            });
        }
    }

    fn send(&mut self, via: Via, bytes: &[u8], code: Option<u8>) {
        if via == Via::Serial
            && let Some(t) = self.timed.as_mut()
        {
            // Onto the line behind the command (half duplex); `pace` writes it out.
            t.tx.push(&mut t.clock, Instant::now(), bytes);
            t.replies.push_back((bytes.len(), code));
            return;
        }
        let result = match via {
            Via::Serial => match self.pty.as_mut() {
                Some(p) => write_some(p, bytes),
                None => return,
            },
            Via::Tcp => match self.conn.as_mut() {
                Some(c) => write_some(&mut c.stream, bytes),
                None => return,
            },
        };
        match result {
            Ok(n) if n == bytes.len() => self.notes.push(Note::ReplySent { via, code }),
            Ok(n) => {
                tracing::warn!(device = %self.device, via = via.name(), sent = n, of = bytes.len(), "reply cut short: the line is full")
            }
            Err(e) => match via {
                Via::Serial => self.notes.push(Note::SerialError {
                    reason: e.to_string(),
                }),
                Via::Tcp => self.close_conn(e.to_string()),
            },
        }
    }

    /// The TCP peer, if one is connected.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.conn.as_ref().map(|c| c.peer)
    }

    /// What happened since the last call.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    /// Closes every transport.
    pub fn close(&mut self) {
        self.pty = None;
        self.listener = None;
        self.conn = None;
        self.delayed.clear();
        if let Some(t) = self.timed.as_mut() {
            t.rx.clear();
            t.tx.clear();
            t.replies.clear();
        }
    }
}

/// Writes what fits without blocking.
fn write_some(w: &mut impl Write, mut bytes: &[u8]) -> std::io::Result<usize> {
    let mut sent = 0;
    while !bytes.is_empty() {
        match w.write(bytes) {
            Ok(0) => break,
            Ok(n) => {
                sent += n;
                bytes = &bytes[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// The [`Channel`] libosdp owns: a handle on the shared [`Link`]. libosdp never frees it
/// (the binding leaks the box), so `close` is what releases the transports.
pub(crate) struct PdChannel(pub Arc<Mutex<Link>>);

impl PdChannel {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Channel for PdChannel {
    fn get_id(&self) -> i32 {
        0
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        Ok(self.link().read(buf))
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        self.link().write(buf);
        // The line takes whatever is put on it, heard or not (like RS-485).
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        self.link().close();
        Ok(())
    }
}
