//! The libosdp channel: a serial line or a TCP connection, never blocking (`read` answers
//! 0 when nothing is there), with a tap that reads frame codes off both directions.

use super::Transport;
use super::frame::{self, Sniffed, Sniffer};
use libosdp::{Channel, ChannelError};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long one write may take before the rest is dropped (libosdp retries the command).
const WRITE_DEADLINE: Duration = Duration::from_millis(100);
/// Most reads one flush makes, so a chattering line cannot hold the thread.
const FLUSH_READS: usize = 64;

/// Something seen on the wire, in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireEvent {
    /// The control panel sent `code` to `addr`.
    Sent { addr: u8, code: u8 },
    /// A keypad answered.
    Reply {
        addr: u8,
        code: u8,
        reason: Option<u8>,
    },
    /// A reply failed its check.
    BadCheck,
}

/// Shared between the channel (inside libosdp) and the control panel thread.
#[derive(Debug, Default)]
pub struct Tap {
    events: Vec<WireEvent>,
    rx: Sniffer,
    /// Why the transport failed, once it has.
    broken: Option<String>,
}

impl Tap {
    /// Everything seen since the last call.
    pub fn take(&mut self) -> Vec<WireEvent> {
        std::mem::take(&mut self.events)
    }

    /// Why the transport failed, if it has.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    fn received(&mut self, bytes: &[u8]) {
        let mut out = Vec::new();
        self.rx.push(bytes, Instant::now(), &mut out);
        for s in out {
            self.push(match s {
                Sniffed::Frame(f) if f.reply => WireEvent::Reply {
                    addr: f.addr,
                    code: f.code,
                    reason: f.first_data,
                },
                // Our own frames echoed back (a half-duplex adapter): nothing to learn.
                Sniffed::Frame(_) => continue,
                Sniffed::BadCheck => WireEvent::BadCheck,
            });
        }
    }

    fn push(&mut self, e: WireEvent) {
        // Drained after every refresh; the bound only guards a thread that stalls.
        if self.events.len() < 4096 {
            self.events.push(e);
        }
    }

    fn fail(&mut self, why: String) {
        self.broken.get_or_insert(why);
    }
}

/// Locks the tap (a poisoned lock still holds good data).
pub fn lock(tap: &Mutex<Tap>) -> MutexGuard<'_, Tap> {
    tap.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Port {
    Serial(Box<dyn tokio_serial::SerialPort>),
    Tcp(TcpStream),
}

/// The channel handed to libosdp. libosdp never frees it, so `close` drops the port
/// and the tap: what leaks per control panel is this small shell.
pub struct Wire {
    port: Option<Port>,
    tap: Option<Arc<Mutex<Tap>>>,
}

fn quiet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

impl Wire {
    /// Opens the transport (blocking for at most `connect_timeout` on TCP). With it comes a
    /// duplicate of its descriptor, for the control panel thread to wait on until a reply
    /// arrives rather than wake on a timer (see `panel.rs`).
    pub fn open(
        transport: &Transport,
        connect_timeout: Duration,
        tap: Arc<Mutex<Tap>>,
    ) -> Result<(Wire, OwnedFd), String> {
        let (port, readable) = match transport {
            Transport::Serial { path, baud } => {
                // A zero timeout makes reads return at once (TimedOut) when idle.
                let port = tokio_serial::new(path.as_str(), *baud)
                    .timeout(Duration::ZERO)
                    .open_native()
                    .map_err(|e| format!("cannot open serial line {path}: {e}"))?;
                // SAFETY: `port` owns this descriptor and outlives the borrow, which only
                // lasts for the dup.
                let fd = unsafe { BorrowedFd::borrow_raw(port.as_raw_fd()) };
                let readable = rustix::io::fcntl_dupfd_cloexec(fd, 0)
                    .map_err(|e| format!("serial line {path}: {e}"))?;
                (Port::Serial(Box::new(port)), readable)
            }
            Transport::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, connect_timeout)
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                let readable = s
                    .set_nonblocking(true)
                    .and_then(|()| s.set_nodelay(true))
                    .and_then(|()| s.try_clone())
                    .map_err(|e| format!("tcp {addr}: {e}"))?;
                (Port::Tcp(s), OwnedFd::from(readable))
            }
        };
        Ok((
            Wire {
                port: Some(port),
                tap: Some(tap),
            },
            readable,
        ))
    }

    fn with_tap(&self, f: impl FnOnce(&mut Tap)) {
        if let Some(t) = &self.tap {
            f(&mut lock(t));
        }
    }

    fn fail(&mut self, why: String) {
        self.with_tap(|t| t.fail(why));
        self.port = None;
    }

    fn raw_read(&mut self, buf: &mut [u8]) -> usize {
        let r = match self.port.as_mut() {
            Some(Port::Serial(p)) => p.read(buf),
            Some(Port::Tcp(s)) => match s.read(buf) {
                Ok(0) if !buf.is_empty() => {
                    self.fail("the keypad closed the TCP connection".into());
                    return 0;
                }
                r => r,
            },
            None => return 0,
        };
        match r {
            Ok(n) => n,
            Err(e) if quiet(&e) => 0,
            Err(e) => {
                self.fail(format!("read failed: {e}"));
                0
            }
        }
    }
}

impl Channel for Wire {
    fn get_id(&self) -> i32 {
        0
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        let n = self.raw_read(buf);
        if n > 0 {
            let bytes = &buf[..n];
            self.with_tap(|t| t.received(bytes));
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        if let Some(f) = frame::parse_packet(buf).filter(|f| !f.reply) {
            self.with_tap(|t| {
                t.push(WireEvent::Sent {
                    addr: f.addr,
                    code: f.code,
                })
            });
        }
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut rest = buf;
        while !rest.is_empty() {
            let r = match self.port.as_mut() {
                Some(Port::Serial(p)) => p.write(rest),
                Some(Port::Tcp(s)) => s.write(rest),
                None => break,
            };
            match r {
                Ok(0) => {
                    self.fail("the transport took no bytes".into());
                    break;
                }
                Ok(n) => rest = &rest[n..],
                Err(e) if quiet(&e) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    // Output buffer full: the line drains at its baud rate.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    self.fail(format!("write failed: {e}"));
                    break;
                }
            }
        }
        Ok(buf.len() - rest.len())
    }

    /// libosdp flushes before resending: stale replies must not count as answers.
    fn flush(&mut self) -> Result<(), ChannelError> {
        let mut buf = [0u8; 256];
        for _ in 0..FLUSH_READS {
            if self.raw_read(&mut buf) == 0 {
                break;
            }
        }
        self.with_tap(|t| t.rx.clear());
        Ok(())
    }

    fn close(&mut self) -> Result<(), ChannelError> {
        self.port = None;
        self.tap = None;
        Ok(())
    }
}
