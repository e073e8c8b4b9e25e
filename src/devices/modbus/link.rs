//! The task that owns one transport (a TCP board, or a serial line with its boards): serves
//! the handles' requests one at a time, polls inputs, tracks each board's health and probes
//! offline boards with backoff.

use super::timing::Backoff;
use super::wire::{Wire, WireError};
use super::{BoardId, BoardState, Health, InputEvent, ModbusError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_modbus::{Request, Response};

/// Consecutive transport failures (timeouts, bad answers) after which a board is offline.
/// Three: one lost or corrupted answer is routine on RS-485, three in a row are not.
pub const OFFLINE_AFTER: u32 = 3;

/// Most bits one read may ask for (Modbus spec §6.1/§6.2); larger reads are split.
const MAX_READ_BITS: u16 = 2000;

/// What a handle asks for.
#[derive(Debug)]
pub enum Op {
    /// FC5.
    WriteCoil(u16, bool),
    /// FC15.
    WriteCoils(u16, Vec<bool>),
    /// FC1.
    ReadCoils(u16, u16),
    /// FC2.
    ReadInputs(u16, u16),
}

/// What an [`Op`] gives back.
#[derive(Debug)]
pub enum Reply {
    /// A write was acknowledged.
    Done,
    /// The bits read.
    Bits(Vec<bool>),
}

/// A request from a handle.
pub struct Job {
    /// Which board of the link.
    pub slot: usize,
    /// What to do.
    pub op: Op,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<Reply, ModbusError>>,
}

/// A board as its link sees it.
pub struct Slot {
    pub id: BoardId,
    pub unit: u8,
    pub inputs: u16,
    pub timeout: Duration,
    pub poll: Duration,
    pub health: watch::Sender<Health>,
    failures: u32,
    backoff: Backoff,
    /// Online/connecting: the next input poll. Offline: the next probe.
    due: Instant,
    /// Inputs as last reported; `None`: the next poll reports a snapshot.
    known_inputs: Option<Vec<bool>>,
}

impl Slot {
    /// A board not yet heard from.
    pub fn new(
        id: BoardId,
        unit: u8,
        inputs: u16,
        timeout: Duration,
        poll: Duration,
        health: watch::Sender<Health>,
    ) -> Slot {
        Slot {
            id,
            unit,
            inputs,
            timeout,
            poll,
            health,
            failures: 0,
            backoff: Backoff::default(),
            due: Instant::now(),
            known_inputs: None,
        }
    }

    fn state(&self) -> BoardState {
        self.health.borrow().state
    }
}

/// One transport and the boards behind it.
pub struct Link {
    pub name: String,
    pub wire: Wire,
    pub slots: Vec<Slot>,
    pub jobs: mpsc::Receiver<Job>,
    pub events: mpsc::Sender<InputEvent>,
}

impl Link {
    /// Serves until `shutdown` turns true (or its sender goes away).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(link = %self.name, boards = self.slots.len(), "modbus link started");
        let mut jobs_open = true;
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                () = &mut stopped => break,
                () = self.step(&mut jobs_open) => {}
            }
        }
        tracing::info!(link = %self.name, "modbus link stopped");
    }

    /// One unit of work: an overdue poll/probe first (so a stream of writes cannot starve
    /// the inputs), else whichever comes first of a request and the next poll/probe.
    async fn step(&mut self, jobs_open: &mut bool) {
        let (slot, due) = self.next_due();
        if due <= Instant::now() {
            return self.tick(slot).await;
        }
        tokio::select! {
            job = self.jobs.recv(), if *jobs_open => match job {
                Some(job) => self.serve(job).await,
                // Every handle is gone: keep polling inputs, stop listening for requests.
                None => *jobs_open = false,
            },
            () = sleep_until(due) => self.tick(slot).await,
        }
    }

    fn next_due(&self) -> (usize, Instant) {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.due))
            .min_by_key(|(_, due)| *due)
            // A link always has a board; if not, sleep long rather than spin.
            .unwrap_or((0, Instant::now() + Duration::from_secs(3600)))
    }

    async fn serve(&mut self, job: Job) {
        let Some(slot) = self.slots.get(job.slot) else {
            return;
        };
        if slot.state() == BoardState::Offline {
            // Fail fast: the board gets its chance at its next probe, not per request.
            let _ = job.reply.send(Err(offline_error(slot)));
            return;
        }
        let outcome = match job.op {
            Op::WriteCoil(coil, on) => self
                .exchange(job.slot, Request::WriteSingleCoil(coil, on))
                .await
                .map(|_| Reply::Done),
            Op::WriteCoils(first, values) => self
                .exchange(job.slot, Request::WriteMultipleCoils(first, values.into()))
                .await
                .map(|_| Reply::Done),
            Op::ReadCoils(first, count) => self
                .read_bits(job.slot, false, first, count)
                .await
                .map(Reply::Bits),
            Op::ReadInputs(first, count) => self
                .read_bits(job.slot, true, first, count)
                .await
                .map(Reply::Bits),
        };
        // The caller may have given up waiting; nothing to do then.
        let _ = job.reply.send(outcome);
    }

    /// A poll (online or connecting) or a probe (offline) of one board.
    async fn tick(&mut self, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let probing = slot.state() == BoardState::Offline;
        if probing {
            slot.health.send_modify(|h| h.probes += 1);
        }
        let inputs = slot.inputs;
        if inputs == 0 {
            // Nothing to poll: one coil read keeps health current.
            let _ = self.exchange(i, Request::ReadCoils(0, 1)).await;
        } else if let Ok(bits) = self.read_bits(i, true, 0, inputs).await {
            self.report_inputs(i, bits);
        }
        // The next poll counts from the end of this one, so polls that time out cannot
        // pile up ahead of the handles' requests. Offline: `failed` set the backoff.
        if let Some(slot) = self.slots.get_mut(i)
            && slot.state() != BoardState::Offline
        {
            slot.due = Instant::now() + slot.poll;
        }
    }

    /// Emits what changed since the last report (everything, as a snapshot, after a
    /// (re)connect or lost events). Never waits on the consumer: if the channel is full,
    /// the next poll sends a snapshot instead.
    fn report_inputs(&mut self, i: usize, bits: Vec<bool>) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let mut lost = false;
        match &slot.known_inputs {
            None => {
                let ev = InputEvent::Snapshot {
                    board: slot.id.clone(),
                    inputs: bits.clone(),
                };
                lost = matches!(
                    self.events.try_send(ev),
                    Err(mpsc::error::TrySendError::Full(_))
                );
            }
            Some(known) => {
                for (n, (&was, &on)) in known.iter().zip(&bits).enumerate() {
                    if was == on {
                        continue;
                    }
                    let ev = InputEvent::Changed {
                        board: slot.id.clone(),
                        input: n as u16,
                        on,
                    };
                    if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ev) {
                        lost = true;
                        break;
                    }
                }
            }
        }
        if lost {
            tracing::warn!(board = %slot.id, "input events not consumed; will resend a snapshot");
            slot.known_inputs = None;
        } else {
            slot.known_inputs = Some(bits);
        }
    }

    /// Reads `count` coils or inputs from `first`, split into spec-sized requests.
    async fn read_bits(
        &mut self,
        i: usize,
        inputs: bool,
        first: u16,
        count: u16,
    ) -> Result<Vec<bool>, ModbusError> {
        let mut bits = Vec::with_capacity(usize::from(count));
        let mut at = first;
        let mut left = count;
        while left > 0 {
            let n = left.min(MAX_READ_BITS);
            let req = if inputs {
                Request::ReadDiscreteInputs(at, n)
            } else {
                Request::ReadCoils(at, n)
            };
            match self.exchange(i, req).await? {
                Response::ReadCoils(mut b) | Response::ReadDiscreteInputs(mut b) => {
                    b.truncate(usize::from(n));
                    bits.extend(b);
                }
                // The wire checked that the answer fits the request.
                _ => {}
            }
            left -= n;
            at = at.wrapping_add(n);
        }
        Ok(bits)
    }

    /// One request to board `i`, with its health updated by the outcome.
    async fn exchange(&mut self, i: usize, req: Request<'static>) -> Result<Response, ModbusError> {
        let Some(slot) = self.slots.get(i) else {
            return Err(ModbusError::Stopped { board: "?".into() });
        };
        let (unit, timeout, board) = (slot.unit, slot.timeout, slot.id.clone());
        let result = self.wire.exchange(unit, req, timeout).await;
        if self.wire.take_reconnected() {
            // A new connection: every board behind it reports a full snapshot next.
            for s in &mut self.slots {
                s.known_inputs = None;
            }
        }
        match result {
            Ok(Ok(resp)) => {
                self.succeeded(i);
                Ok(resp)
            }
            Ok(Err(code)) => {
                // The board answered: it is alive, the request was wrong for it.
                self.succeeded(i);
                Err(ModbusError::Exception { board, code })
            }
            Err(WireError::Timeout) => {
                self.failed(i, format!("no answer within {} ms", timeout.as_millis()));
                Err(ModbusError::Timeout {
                    board,
                    after: timeout,
                })
            }
            Err(WireError::Transport(message)) => {
                self.failed(i, message.clone());
                Err(ModbusError::Transport { board, message })
            }
        }
    }

    fn succeeded(&mut self, i: usize) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.failures = 0;
        slot.backoff.reset();
        if slot.state() != BoardState::Online {
            tracing::info!(board = %slot.id, link = %self.name, "relay board online");
            // Back from offline: inputs may have changed unseen; poll now, as a snapshot.
            slot.known_inputs = None;
            slot.due = Instant::now();
            slot.health.send_modify(|h| {
                h.state = BoardState::Online;
                h.consecutive_failures = 0;
                h.since = std::time::Instant::now();
            });
        } else if slot.health.borrow().consecutive_failures != 0 {
            slot.health.send_modify(|h| h.consecutive_failures = 0);
        }
    }

    fn failed(&mut self, i: usize, error: String) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.failures = slot.failures.saturating_add(1);
        let was = slot.state();
        let now_offline = was == BoardState::Offline || slot.failures >= OFFLINE_AFTER;
        if now_offline {
            slot.due = Instant::now() + slot.backoff.next_delay();
        }
        if was != BoardState::Offline && now_offline {
            tracing::warn!(board = %slot.id, link = %self.name, %error, "relay board offline");
        } else {
            tracing::debug!(board = %slot.id, %error, failures = slot.failures, "relay board request failed");
        }
        let failures = slot.failures;
        slot.health.send_modify(|h| {
            if now_offline && h.state != BoardState::Offline {
                h.state = BoardState::Offline;
                h.since = std::time::Instant::now();
            }
            h.consecutive_failures = failures;
            h.last_error = Some(error);
        });
    }
}

fn offline_error(slot: &Slot) -> ModbusError {
    ModbusError::Offline {
        board: slot.id.clone(),
        last_error: slot
            .health
            .borrow()
            .last_error
            .clone()
            .unwrap_or_else(|| "no answer".into()),
    }
}
