//! Modbus relay boards (`[[devices.relay_boards]]`): coils (gate strikes, overlock relays)
//! and discrete inputs (door sensors, gate position), over Modbus TCP or Modbus RTU.
//!
//! [`RelayBoards::new`] plans one [`ModbusLink`] task per transport — one per TCP board, one
//! per serial port however many boards (unit ids) share it — and one cheap [`RelayBoard`]
//! handle per board. The link owns its transport and does everything on it, one frame at a
//! time: the handles' writes and reads, the input polls (every `poll_ms`, changes sent as
//! [`InputEvent`]s), and the reconnect probes of offline boards.
//!
//! Health ([`Health`] in a `watch`): a board is offline after [`OFFLINE_AFTER`] consecutive
//! timeouts or transport errors and online again on its first answer (a device exception
//! is an answer). While offline, requests fail at once with [`ModbusError::Offline`] and the
//! link probes the board with capped exponential backoff with jitter (100 ms doubling to
//! 1.6 s, see [`timing::Backoff`]).
//!
//! RTU: between one answer (or timeout) and the next request the line stays silent for
//! 3.5 character times at the configured baud (1.75 ms above 19200 baud); after a timeout
//! or a bad answer the line is drained until quiet, so a late answer is never taken for
//! the next one. Every request is bounded by `timeout_ms`.
//!
//! Errors keep tokio-modbus's nesting apart: [`ModbusError::Exception`] is the board
//! answering with an exception code; [`ModbusError::Timeout`] and
//! [`ModbusError::Transport`] are the wire.

#[cfg(test)]
mod bus_tests;
mod link;
pub mod timing;
mod wire;

pub use link::OFFLINE_AFTER;
pub use tokio_modbus::ExceptionCode;

use crate::config::{ModbusTransport, RelayBoardConfig};
use link::{Job, Link, Op, Reply, Slot};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use wire::{RtuWire, TcpWire, Wire};

/// A board's id, cheap to clone into events and errors.
pub type BoardId = Arc<str>;

/// Requests a link queues before callers wait to submit more.
const QUEUE: usize = 64;

/// What can go wrong talking to a board.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModbusError {
    /// The board answered with a Modbus exception (e.g. IllegalDataAddress): it is alive,
    /// the request does not fit it. Retrying will not help.
    #[error("relay board {board}: device exception {code}")]
    Exception {
        /// Board id.
        board: BoardId,
        /// The exception code it sent.
        code: ExceptionCode,
    },
    /// No valid answer in time (on RTU a corrupted answer shows up as this too).
    #[error("relay board {board}: no answer within {} ms", after.as_millis())]
    Timeout {
        /// Board id.
        board: BoardId,
        /// The timeout that passed.
        after: Duration,
    },
    /// The transport failed or the answer did not fit the request.
    #[error("relay board {board}: {message}")]
    Transport {
        /// Board id.
        board: BoardId,
        /// What happened.
        message: String,
    },
    /// The board is offline; the request was not sent.
    #[error("relay board {board} is offline: {last_error}")]
    Offline {
        /// Board id.
        board: BoardId,
        /// Why it went offline (its last failure).
        last_error: String,
    },
    /// The request cannot be expressed (e.g. zero coils).
    #[error("relay board {board}: {message}")]
    Invalid {
        /// Board id.
        board: BoardId,
        /// What is wrong with it.
        message: String,
    },
    /// The link task has stopped (shutdown).
    #[error("relay board {board}: driver stopped")]
    Stopped {
        /// Board id.
        board: BoardId,
    },
    /// The boards' configuration cannot be served (e.g. two boards on one serial port
    /// with different baud rates).
    #[error("relay boards: {0}")]
    Config(String),
}

impl ModbusError {
    /// Whether the same request may succeed later (the wire failed, not the request).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ModbusError::Timeout { .. }
                | ModbusError::Transport { .. }
                | ModbusError::Offline { .. }
        )
    }
}

/// Whether a board answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoardState {
    /// Not heard from yet since the driver started.
    Connecting,
    /// It answers.
    Online,
    /// [`OFFLINE_AFTER`] requests in a row failed; probed with backoff.
    Offline,
}

/// A board's health, published through a `watch`.
#[derive(Debug, Clone)]
pub struct Health {
    /// Online, offline or not yet known.
    pub state: BoardState,
    /// The last failure, kept after recovery.
    pub last_error: Option<String>,
    /// Failures since the last answer.
    pub consecutive_failures: u32,
    /// Reconnect probes made while offline, in total (shows the backoff at work).
    pub probes: u64,
    /// When `state` last changed.
    pub since: std::time::Instant,
}

impl Health {
    fn new() -> Health {
        Health {
            state: BoardState::Connecting,
            last_error: None,
            consecutive_failures: 0,
            probes: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Whether the board answers.
    pub fn is_online(&self) -> bool {
        self.state == BoardState::Online
    }
}

/// Discrete inputs as polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputEvent {
    /// Every input of a board: the first poll after start or a reconnect, or after events
    /// were lost because the consumer fell behind. Replaces what the consumer knew.
    Snapshot {
        /// Board id.
        board: BoardId,
        /// Input states, input 0 first.
        inputs: Vec<bool>,
    },
    /// One input changed (`on`: contact closed / door open, as the board reports it).
    Changed {
        /// Board id.
        board: BoardId,
        /// Input number (0-based).
        input: u16,
        /// New state.
        on: bool,
    },
}

/// A handle on one relay board. Cheap to clone; requests go to its link's task.
#[derive(Clone)]
pub struct RelayBoard {
    id: BoardId,
    slot: usize,
    coils: u16,
    inputs: u16,
    jobs: mpsc::Sender<Job>,
    health: watch::Receiver<Health>,
}

impl std::fmt::Debug for RelayBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBoard")
            .field("id", &self.id)
            .field("state", &self.health.borrow().state)
            .finish_non_exhaustive()
    }
}

impl RelayBoard {
    /// Board id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Number of coils in the configuration.
    pub fn coil_count(&self) -> u16 {
        self.coils
    }

    /// Number of discrete inputs in the configuration.
    pub fn input_count(&self) -> u16 {
        self.inputs
    }

    /// The board's health, updated by its link.
    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Sets one coil; resolves when the board has acknowledged it.
    pub async fn write_coil(&self, coil: u16, on: bool) -> Result<(), ModbusError> {
        self.submit(Op::WriteCoil(coil, on)).await.map(|_| ())
    }

    /// Sets consecutive coils from `first` in one request (FC15, at most 1968).
    pub async fn write_coils(&self, first: u16, values: &[bool]) -> Result<(), ModbusError> {
        if values.is_empty() || values.len() > 1968 {
            return Err(self.invalid("write 1 to 1968 coils at a time"));
        }
        self.submit(Op::WriteCoils(first, values.to_vec()))
            .await
            .map(|_| ())
    }

    /// Reads `count` coils from `first` (what the relays actually are).
    pub async fn read_coils(&self, first: u16, count: u16) -> Result<Vec<bool>, ModbusError> {
        if count == 0 {
            return Err(self.invalid("read at least one coil"));
        }
        self.bits(self.submit(Op::ReadCoils(first, count)).await?)
    }

    /// Reads `count` discrete inputs from `first`.
    pub async fn read_inputs(&self, first: u16, count: u16) -> Result<Vec<bool>, ModbusError> {
        if count == 0 {
            return Err(self.invalid("read at least one input"));
        }
        self.bits(self.submit(Op::ReadInputs(first, count)).await?)
    }

    async fn submit(&self, op: Op) -> Result<Reply, ModbusError> {
        {
            let h = self.health.borrow();
            if h.state == BoardState::Offline {
                return Err(ModbusError::Offline {
                    board: self.id.clone(),
                    last_error: h.last_error.clone().unwrap_or_else(|| "no answer".into()),
                });
            }
        }
        let (reply, answer) = oneshot::channel();
        let stopped = || ModbusError::Stopped {
            board: self.id.clone(),
        };
        self.jobs
            .send(Job {
                slot: self.slot,
                op,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        // The link answers every job within the board's timeout once it takes it.
        answer.await.map_err(|_| stopped())?
    }

    fn bits(&self, reply: Reply) -> Result<Vec<bool>, ModbusError> {
        match reply {
            Reply::Bits(b) => Ok(b),
            Reply::Done => Err(ModbusError::Transport {
                board: self.id.clone(),
                message: "no bits in the answer".into(),
            }),
        }
    }

    fn invalid(&self, message: &str) -> ModbusError {
        ModbusError::Invalid {
            board: self.id.clone(),
            message: message.into(),
        }
    }
}

/// The task serving one transport: a Modbus TCP board, or a serial port and its RTU boards.
pub struct ModbusLink {
    link: Link,
}

impl std::fmt::Debug for ModbusLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusLink")
            .field("name", &self.link.name)
            .finish_non_exhaustive()
    }
}

impl ModbusLink {
    /// `tcp 127.0.0.1:502` or `rtu /dev/ttyUSB0`.
    pub fn name(&self) -> &str {
        &self.link.name
    }

    /// The ids of the boards on this link.
    pub fn board_ids(&self) -> Vec<&str> {
        self.link.slots.iter().map(|s| &*s.id).collect()
    }

    /// Serves until `shutdown` becomes true. Spawn one per link.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        self.link.run(shutdown).await
    }
}

/// Every configured relay board: the link tasks to spawn and the handles to use.
#[derive(Debug)]
pub struct RelayBoards {
    /// One per transport; spawn each `run`.
    pub links: Vec<ModbusLink>,
    /// Handles by board id.
    pub boards: BTreeMap<String, RelayBoard>,
}

impl RelayBoards {
    /// Plans links for `configs` (already validated by `DevicesConfig::problems`). Nothing
    /// is opened here: a missing port or an unreachable board is a health matter, not a
    /// startup failure. Input changes of every board go to `events`.
    pub fn new(
        configs: &[RelayBoardConfig],
        events: mpsc::Sender<InputEvent>,
    ) -> Result<RelayBoards, ModbusError> {
        let mut links = Vec::new();
        let mut boards = BTreeMap::new();
        // RTU boards grouped by serial port, in configuration order.
        let mut ports: Vec<(&str, Vec<&RelayBoardConfig>)> = Vec::new();
        for cfg in configs {
            match cfg.transport {
                ModbusTransport::Tcp => {
                    let addr: SocketAddr = cfg.address.parse().map_err(|_| {
                        ModbusError::Config(format!(
                            "board {}: address {:?} is not IP:PORT",
                            cfg.id, cfg.address
                        ))
                    })?;
                    let wire = Wire::Tcp(TcpWire::new(addr));
                    let (link, handles) =
                        build_link(format!("tcp {addr}"), wire, &[cfg], events.clone());
                    links.push(link);
                    boards.extend(handles);
                }
                ModbusTransport::Rtu => match ports.iter_mut().find(|(p, _)| *p == cfg.port) {
                    Some((_, group)) => group.push(cfg),
                    None => ports.push((&cfg.port, vec![cfg])),
                },
            }
        }
        for (port, group) in ports {
            let line = SerialSettings::of(group[0])?;
            for other in &group[1..] {
                if SerialSettings::of(other)? != line {
                    return Err(ModbusError::Config(format!(
                        "boards {} and {} share {port} with different baud/parity/stop bits",
                        group[0].id, other.id
                    )));
                }
                if group.iter().filter(|b| b.unit_id == other.unit_id).count() > 1 {
                    return Err(ModbusError::Config(format!(
                        "two boards on {port} have unit id {}",
                        other.unit_id
                    )));
                }
            }
            let gap = timing::frame_gap(
                line.baud,
                timing::bits_per_char(line.parity != tokio_serial::Parity::None, line.stop_bits),
            );
            let path = port.to_owned();
            let open: wire::Opener = Box::new(move || line.open(&path));
            let wire = Wire::Rtu(RtuWire::new(open, gap));
            let (link, handles) = build_link(format!("rtu {port}"), wire, &group, events.clone());
            links.push(link);
            boards.extend(handles);
        }
        Ok(RelayBoards { links, boards })
    }
}

/// A link over `wire` for `cfgs`, and their handles.
fn build_link(
    name: String,
    wire: Wire,
    cfgs: &[&RelayBoardConfig],
    events: mpsc::Sender<InputEvent>,
) -> (ModbusLink, Vec<(String, RelayBoard)>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let mut slots = Vec::new();
    let mut handles = Vec::new();
    for (i, cfg) in cfgs.iter().enumerate() {
        let id: BoardId = cfg.id.as_str().into();
        let (health, health_rx) = watch::channel(Health::new());
        slots.push(Slot::new(
            id.clone(),
            cfg.unit_id,
            cfg.inputs,
            Duration::from_millis(cfg.timeout_ms),
            Duration::from_millis(cfg.poll_ms),
            health,
        ));
        handles.push((
            cfg.id.clone(),
            RelayBoard {
                id,
                slot: i,
                coils: cfg.coils,
                inputs: cfg.inputs,
                jobs: tx.clone(),
                health: health_rx,
            },
        ));
    }
    let link = Link {
        name,
        wire,
        slots,
        jobs: rx,
        events,
    };
    (ModbusLink { link }, handles)
}

/// How a serial line is set up; boards sharing a port must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SerialSettings {
    baud: u32,
    parity: tokio_serial::Parity,
    stop_bits: u8,
}

impl SerialSettings {
    fn of(cfg: &RelayBoardConfig) -> Result<SerialSettings, ModbusError> {
        let parity = match cfg.parity.as_str() {
            "none" => tokio_serial::Parity::None,
            "even" => tokio_serial::Parity::Even,
            "odd" => tokio_serial::Parity::Odd,
            other => {
                return Err(ModbusError::Config(format!(
                    "board {}: parity {other:?} (none, even or odd)",
                    cfg.id
                )));
            }
        };
        if !(1..=2).contains(&cfg.stop_bits) || cfg.baud == 0 {
            return Err(ModbusError::Config(format!(
                "board {}: stop bits must be 1 or 2 and baud above 0",
                cfg.id
            )));
        }
        Ok(SerialSettings {
            baud: cfg.baud,
            parity,
            stop_bits: cfg.stop_bits,
        })
    }

    /// Opens the port 8 data bits, no flow control (open(2) and termios: quick, so done
    /// on the link's task).
    fn open(&self, path: &str) -> std::io::Result<Box<dyn wire::Stream>> {
        use tokio_serial::SerialPortBuilderExt;
        let stop_bits = if self.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        };
        let port = tokio_serial::new(path, self.baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(self.parity)
            .stop_bits(stop_bits)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native_async()
            .map_err(std::io::Error::other)?;
        Ok(Box::new(port))
    }
}
