//! One request, one answer, within a deadline, over Modbus TCP or a Modbus RTU line.
//!
//! tokio-modbus has no timeout and trusts the answer's shape (its typed helpers
//! `debug_assert!` on it), so requests go through `Client::call` and the answer is checked
//! here. After a timeout or a bad answer the transport is made clean before it is used
//! again: TCP drops the connection; RTU drains the line until it has been quiet (a late or
//! corrupted answer — tokio-modbus reports a bad CRC as "no answer yet", so as a timeout —
//! must not be read as the answer to the next request).

use super::timing;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

/// Why an exchange got no usable answer (device exceptions are answers, not this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Nothing (valid) within the deadline.
    Timeout,
    /// The transport failed, or the answer did not fit the request.
    Transport(String),
}

/// A byte stream a Modbus line runs over: a serial port, a pty, or an in-memory pipe.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Opens the stream of an RTU line (again after a transport error).
pub type Opener = Box<dyn FnMut() -> io::Result<Box<dyn Stream>> + Send>;

/// The transport of a link.
pub enum Wire {
    /// Modbus TCP to one board.
    Tcp(TcpWire),
    /// Modbus RTU on a serial line shared by one or more boards.
    Rtu(RtuWire),
}

impl Wire {
    /// Sends `req` to `unit` and waits for its answer until `timeout` has passed.
    pub async fn exchange(
        &mut self,
        unit: u8,
        req: Request<'static>,
        timeout: Duration,
    ) -> Result<Result<Response, ExceptionCode>, WireError> {
        match self {
            Wire::Tcp(w) => w.exchange(unit, req, timeout).await,
            Wire::Rtu(w) => w.exchange(unit, req, timeout).await,
        }
    }

    /// Whether a new connection (TCP) or a newly opened port (RTU) has been made since the
    /// last call: the boards behind it resynchronise their inputs.
    pub fn take_reconnected(&mut self) -> bool {
        match self {
            Wire::Tcp(w) => std::mem::take(&mut w.reconnected),
            Wire::Rtu(w) => std::mem::take(&mut w.reconnected),
        }
    }
}

/// Modbus TCP: one connection, made on first use and after any failure.
pub struct TcpWire {
    addr: SocketAddr,
    ctx: Option<Context>,
    reconnected: bool,
}

impl TcpWire {
    /// A wire to `addr`; nothing is connected until the first exchange.
    pub fn new(addr: SocketAddr) -> TcpWire {
        TcpWire {
            addr,
            ctx: None,
            reconnected: false,
        }
    }

    async fn exchange(
        &mut self,
        unit: u8,
        req: Request<'static>,
        timeout: Duration,
    ) -> Result<Result<Response, ExceptionCode>, WireError> {
        let deadline = Instant::now() + timeout;
        let ctx = match &mut self.ctx {
            Some(ctx) => ctx,
            None => {
                let stream = timeout_at(deadline, TcpStream::connect(self.addr))
                    .await
                    .map_err(|_| WireError::Timeout)?
                    .map_err(|e| WireError::Transport(format!("connecting {}: {e}", self.addr)))?;
                // Requests are tiny and latency-bound.
                let _ = stream.set_nodelay(true);
                self.reconnected = true;
                self.ctx
                    .insert(tokio_modbus::client::tcp::attach_slave(stream, Slave(unit)))
            }
        };
        ctx.set_slave(Slave(unit));
        let result = call_checked(ctx, req, deadline).await;
        if result.is_err() {
            // A late answer would arrive on this connection: start afresh.
            self.ctx = None;
        }
        result
    }
}

/// Modbus RTU on one serial line: several boards (unit ids) take turns, with the spec's
/// inter-frame silence between one answer (or timeout) and the next request.
pub struct RtuWire {
    open: Opener,
    line: Option<(Context, SharedLine)>,
    gap: Duration,
    /// When the line last went quiet (end of an answer, of a resync, or of opening).
    idle_since: Instant,
    reconnected: bool,
}

impl RtuWire {
    /// A line opened by `open` on first use (and again after a transport error), with
    /// `gap` of silence between frames (see [`timing::frame_gap`]).
    pub fn new(open: Opener, gap: Duration) -> RtuWire {
        RtuWire {
            open,
            line: None,
            gap,
            idle_since: Instant::now(),
            reconnected: false,
        }
    }

    async fn exchange(
        &mut self,
        unit: u8,
        req: Request<'static>,
        timeout: Duration,
    ) -> Result<Result<Response, ExceptionCode>, WireError> {
        let (ctx, line) = match &mut self.line {
            Some(l) => l,
            None => {
                let stream =
                    (self.open)().map_err(|e| WireError::Transport(format!("opening: {e}")))?;
                let line = SharedLine(Arc::new(Mutex::new(stream)));
                let ctx = tokio_modbus::client::rtu::attach_slave(line.clone(), Slave(unit));
                self.reconnected = true;
                // Whatever was on the line before we opened it is not ours.
                let quiet = timing::resync_quiet(self.gap);
                drain(&line, quiet, timeout).await;
                self.idle_since = Instant::now();
                self.line.insert((ctx, line))
            }
        };
        // The silence the spec requires before a new frame.
        sleep_until(self.idle_since + self.gap).await;
        // An answer that came too late for its request is in the way: drop it.
        discard_pending(line).await;
        ctx.set_slave(Slave(unit));
        let deadline = Instant::now() + timeout;
        let result = call_checked(ctx, req, deadline).await;
        match &result {
            Ok(_) => {}
            Err(WireError::Transport(m)) if m.starts_with(IO_PREFIX) => {
                // The port itself failed (unplugged adapter): reopen it next time.
                self.line = None;
            }
            Err(_) => {
                // A late answer, or the rest of a corrupted one, may still be coming.
                let quiet = timing::resync_quiet(self.gap);
                drain(line, quiet, timeout).await;
            }
        }
        self.idle_since = Instant::now();
        result
    }
}

/// Prefix of transport errors that come from the stream itself (not from a bad frame).
const IO_PREFIX: &str = "i/o: ";

/// Calls `req` and checks that the answer fits it: same function, echo of a write, enough
/// bits for a read. Whatever does not fit is a transport error, never a panic.
async fn call_checked(
    ctx: &mut Context,
    req: Request<'static>,
    deadline: Instant,
) -> Result<Result<Response, ExceptionCode>, WireError> {
    let expected = req.clone();
    let answer = match timeout_at(deadline, ctx.call(req)).await {
        Err(_) => return Err(WireError::Timeout),
        Ok(Err(tokio_modbus::Error::Transport(e))) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(WireError::Transport(format!("bad frame: {e}")));
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => {
            return Err(WireError::Transport(format!("{IO_PREFIX}{e}")));
        }
        Ok(Err(tokio_modbus::Error::Protocol(e))) => {
            return Err(WireError::Transport(format!("answer does not match: {e}")));
        }
        Ok(Ok(answer)) => answer,
    };
    match answer {
        Err(code) => Ok(Err(code)),
        Ok(resp) if fits(&expected, &resp) => Ok(Ok(resp)),
        Ok(resp) => Err(WireError::Transport(format!(
            "answer does not match: asked {expected:?}, got {resp:?}"
        ))),
    }
}

/// Whether `resp` is a well-formed answer to `req`.
fn fits(req: &Request<'_>, resp: &Response) -> bool {
    match (req, resp) {
        (Request::ReadCoils(_, n), Response::ReadCoils(bits))
        | (Request::ReadDiscreteInputs(_, n), Response::ReadDiscreteInputs(bits)) => {
            bits.len() >= usize::from(*n)
        }
        (Request::WriteSingleCoil(a, on), Response::WriteSingleCoil(ra, ron)) => {
            a == ra && on == ron
        }
        (Request::WriteMultipleCoils(a, values), Response::WriteMultipleCoils(ra, rn)) => {
            a == ra && values.len() == usize::from(*rn)
        }
        _ => false,
    }
}

/// Reads and discards until the line has been quiet for `quiet`, giving up after `limit`
/// (a line that never stops talking is not ours to fix; the next exchange will fail).
async fn drain(line: &SharedLine, quiet: Duration, limit: Duration) {
    let give_up = Instant::now() + limit.max(quiet);
    let mut reader = line.clone();
    let mut junk = [0u8; 256];
    let mut dropped = 0usize;
    loop {
        let until = (Instant::now() + quiet).min(give_up);
        match timeout_at(until, reader.read(&mut junk)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            // Quiet for long enough, end of stream, or a read error (the next exchange
            // will see it).
            _ => break,
        }
        if Instant::now() >= give_up {
            break;
        }
    }
    if dropped > 0 {
        tracing::debug!(dropped, "modbus rtu: stale bytes dropped from the line");
    }
}

/// Drops whatever bytes are already waiting on the line, without waiting for more.
async fn discard_pending(line: &SharedLine) {
    let mut reader = line.clone();
    let mut junk = [0u8; 256];
    let mut dropped = 0usize;
    // Polls the read exactly once per round: bytes there are taken, an empty line ends it at
    // once (a zero `timeout` would wait for the timer wheel's next 1 ms tick instead).
    loop {
        let mut read = std::pin::pin!(reader.read(&mut junk));
        let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        match polled {
            Poll::Ready(Ok(n)) if n > 0 => dropped += n,
            _ => break,
        }
    }
    if dropped > 0 {
        tracing::debug!(dropped, "modbus rtu: late bytes dropped before a request");
    }
}

/// The line's stream, shared between the tokio-modbus client (which owns one handle) and
/// the resync drain (the other). Only one task uses both, never at the same time; the
/// mutex is held only inside a poll, never across an await.
#[derive(Clone)]
pub struct SharedLine(Arc<Mutex<Box<dyn Stream>>>);

impl SharedLine {
    fn with<R>(
        &self,
        f: impl FnOnce(Pin<&mut Box<dyn Stream>>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match self.0.lock() {
            Ok(mut s) => f(Pin::new(&mut *s)),
            Err(_) => Poll::Ready(Err(io::Error::other("serial line lock poisoned"))),
        }
    }
}

impl AsyncRead for SharedLine {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for SharedLine {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|s| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.with(|s| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_must_fit_their_request() {
        assert!(fits(
            &Request::WriteSingleCoil(3, true),
            &Response::WriteSingleCoil(3, true)
        ));
        // A stale echo of another write is not this write's answer.
        assert!(!fits(
            &Request::WriteSingleCoil(3, true),
            &Response::WriteSingleCoil(3, false)
        ));
        assert!(!fits(
            &Request::ReadCoils(0, 16),
            &Response::ReadCoils(vec![false; 8])
        ));
        assert!(fits(
            &Request::ReadDiscreteInputs(0, 4),
            &Response::ReadDiscreteInputs(vec![false; 8])
        ));
        assert!(!fits(
            &Request::ReadCoils(0, 4),
            &Response::ReadDiscreteInputs(vec![false; 8])
        ));
    }
}
