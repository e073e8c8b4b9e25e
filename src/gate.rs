//! The gate controller: the on-site decisions that keep working with the cloud link down.
//!
//! One task takes every keypad's key presses and every relay board's input changes:
//!
//! - Keys build a PIN per keypad ([`Entry`]); on `#` the decision is made from the local
//!   replica alone ([`decide`]: a read on the store's reader pool, no network I/O), then the
//!   gate relay is pulsed and the keypad shows the outcome (LED, buzzer, text), each in its
//!   own task so a slow keypad or board never holds up the next tenant. Every decision is
//!   an `access.granted` / `access.denied` event (contact, units, keypad, reason; never the
//!   PIN). Wrong codes count towards the keypad's lockout ([`Lockout`]).
//! - A unit door input opening while the unit is not `occupied` raises `door.alarm`; so
//!   does a gate position input that stays open longer than `access.gate_held_open_s`. A
//!   door's alarm is kept in the replica with its event ([`alarms`]) until the door closes,
//!   so a restart or a board reconnecting does not report the same open door again.
//!
//! At start every gate strike coil is switched off: a gateway killed in the middle of a
//! pulse must not leave a gate open.

use crate::command::Executor;
use crate::config::{CoilRef, Config, InputRef};
use crate::devices::modbus::{InputEvent, RelayBoard};
use crate::devices::osdp::{Buzzer, KeyPress, Keypad, Led, LedColor, Text};
use crate::domain::EventType;
use crate::domain::access::{
    Decision, Entry, Holder, KeyOutcome, Lockout, LockoutPolicy, Pin, UnitAccess, decide,
    locked_out,
};
use crate::domain::hours::AccessHours;
use crate::domain::pin::{self, PinKey};
use crate::domain::status::UnitStatus;
use crate::store::{StoreError, alarms, events, people};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// A keypad as the controller knows it.
#[derive(Debug)]
struct Gate {
    zone: String,
    strike: Option<CoilRef>,
    sensor: Option<InputRef>,
    pulse: Duration,
    entry: Entry,
    lockout: Lockout,
}

/// What the controller needs from the configuration.
#[derive(Debug, Clone)]
pub struct GateSettings {
    site_hours: AccessHours,
    tz: Tz,
    lockout: LockoutPolicy,
    held_open: Duration,
}

impl GateSettings {
    /// From the validated configuration.
    pub fn from_config(cfg: &Config) -> GateSettings {
        GateSettings {
            site_hours: cfg.site.access_hours.clone(),
            tz: cfg.tz(),
            lockout: LockoutPolicy {
                attempts: cfg.access.lockout_attempts,
                window: Duration::from_secs(cfg.access.lockout_window_s),
                duration: Duration::from_secs(cfg.access.lockout_s),
            },
            held_open: Duration::from_secs(cfg.access.gate_held_open_s),
        }
    }
}

/// The gate controller task; start it with [`GateController::run`].
pub struct GateController {
    settings: GateSettings,
    executor: Executor,
    pin_key: PinKey,
    gates: HashMap<String, Gate>,
    keypads: HashMap<String, Keypad>,
    boards: BTreeMap<String, RelayBoard>,
    /// Gate sensors seen open, since when, and whether the alarm was raised.
    open_gates: HashMap<String, (Instant, bool)>,
    /// Unit door inputs with an alarm raised and not yet closed.
    alarmed: BTreeSet<(String, u16)>,
    /// Events on their way to the log, in decision order (see [`record_events`]).
    events: mpsc::Sender<LogEntry>,
}

/// What the controller writes to the replica, in the order it decided it.
enum LogEntry {
    /// An event for the log.
    Event(EventType, serde_json::Value, DateTime<Utc>),
    /// A unit door opened on a unit that is not occupied: `door.alarm`, and the door's
    /// alarm recorded as raised.
    DoorAlarm {
        board: String,
        input: u16,
        unit_id: String,
        data: serde_json::Value,
        at: DateTime<Utc>,
    },
    /// An alarmed door closed.
    DoorClosed { board: String, input: u16 },
}

impl GateController {
    /// A controller for the configured keypads, driving `keypads` and the gate strikes on
    /// `boards`.
    pub fn new(
        cfg: &Config,
        executor: Executor,
        pin_key: PinKey,
        keypads: HashMap<String, Keypad>,
        boards: BTreeMap<String, RelayBoard>,
    ) -> GateController {
        let executor_for_events = executor.clone();
        for k in &cfg.devices.keypads {
            executor.metrics().keypad(&k.id);
        }
        let gates = cfg
            .devices
            .keypads
            .iter()
            .map(|k| {
                (
                    k.id.clone(),
                    Gate {
                        zone: k.zone.clone(),
                        strike: k.gate.clone(),
                        sensor: k.gate_sensor.clone(),
                        pulse: Duration::from_millis(k.pulse_ms),
                        entry: Entry::default(),
                        lockout: Lockout::default(),
                    },
                )
            })
            .collect();
        GateController {
            settings: GateSettings::from_config(cfg),
            executor,
            pin_key,
            gates,
            keypads,
            boards,
            open_gates: HashMap::new(),
            events: {
                let (tx, rx) = mpsc::channel(EVENT_QUEUE);
                tokio::spawn(record_events(executor_for_events, rx));
                tx
            },
            alarmed: BTreeSet::new(),
        }
    }

    /// Runs until `shutdown` turns true or both channels close.
    pub async fn run(
        mut self,
        mut keys: mpsc::Receiver<KeyPress>,
        mut inputs: mpsc::Receiver<InputEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        self.close_all_gates();
        match self.executor.store().read(alarms::open).await {
            Ok(open) => self.alarmed = open.into_iter().collect(),
            Err(e) => tracing::warn!(error = %e, "cannot read the open door alarms"),
        }
        let (mut keys_open, mut inputs_open) = (true, true);
        while keys_open || inputs_open {
            let wake = self.next_deadline();
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return; },
                k = keys.recv(), if keys_open => match k {
                    Some(k) => self.keys(&k).await,
                    None => keys_open = false,
                },
                i = inputs.recv(), if inputs_open => match i {
                    Some(i) => self.input(i).await,
                    None => inputs_open = false,
                },
                _ = sleep_until(wake) => self.timers(),
            }
        }
    }

    /// Switches every gate strike off (the safe state after a restart).
    fn close_all_gates(&self) {
        for g in self.gates.values() {
            if let Some(c) = &g.strike
                && let Some(b) = self.boards.get(&c.board)
            {
                let (b, coil) = (b.clone(), c.coil);
                tokio::spawn(async move {
                    if let Err(e) = b.write_coil(coil, false).await {
                        tracing::warn!(board = %b.id(), coil, error = %e, "cannot close the gate at start");
                    }
                });
            }
        }
    }

    /// The earliest keypad entry timeout or gate-held-open alarm.
    fn next_deadline(&self) -> Option<Instant> {
        let entries = self.gates.values().filter_map(|g| g.entry.deadline());
        let gates = self
            .open_gates
            .values()
            .filter(|(_, raised)| !raised)
            .map(|(since, _)| *since + self.settings.held_open);
        entries.chain(gates).min()
    }

    /// Drops stale entries and raises gate-held-open alarms that are due.
    fn timers(&mut self) {
        let now = Instant::now();
        for g in self.gates.values_mut() {
            g.entry.expire(now);
        }
        let held = self.settings.held_open;
        let due: Vec<String> = self
            .open_gates
            .iter()
            .filter(|(_, (since, raised))| !raised && now.duration_since(*since) >= held)
            .map(|(k, _)| k.clone())
            .collect();
        for keypad in due {
            if let Some(entry) = self.open_gates.get_mut(&keypad) {
                entry.1 = true;
            }
            let Some(g) = self.gates.get(&keypad) else {
                continue;
            };
            let sensor = g.sensor.clone();
            let data = json!({
                "kind": "gate_held_open",
                "keypad": keypad,
                "zone": g.zone,
                "board": sensor.as_ref().map(|s| s.board.clone()),
                "input": sensor.as_ref().map(|s| s.input),
                "open_s": held.as_secs(),
            });
            tracing::warn!(keypad = %keypad, "gate held open");
            self.record(EventType::DoorAlarm, data);
        }
    }

    async fn keys(&mut self, press: &KeyPress) {
        for key in press.keys.chars() {
            let Some(g) = self.gates.get_mut(&press.keypad) else {
                return;
            };
            let now = Instant::now();
            if let KeyOutcome::Submitted(pin) = g.entry.press(now, key) {
                let span = crate::logging::device_span(&press.keypad, "gate");
                self.submit(&press.keypad, pin, now).instrument(span).await;
            }
        }
    }

    /// Decides one PIN and acts on it.
    async fn submit(&mut self, keypad: &str, pin: Pin, now: Instant) {
        let Some(g) = self.gates.get(keypad) else {
            return;
        };
        let zone = g.zone.clone();
        let decision = if g.lockout.remaining(now).is_some() {
            locked_out()
        } else {
            match self.holder(pin).await {
                Ok(holder) => {
                    let local = self
                        .executor
                        .now()
                        .with_timezone(&self.settings.tz)
                        .naive_local();
                    decide(&zone, holder.as_ref(), &self.settings.site_hours, local)
                }
                Err(e) => {
                    // The replica cannot be read: nobody can be checked, so nobody is let
                    // in, and the office is the place to go.
                    tracing::error!(keypad, error = %e, "cannot read the replica for a PIN");
                    Decision::Denied {
                        reason: crate::domain::access::DenyReason::NoAccess,
                        contact_id: None,
                        units: Vec::new(),
                        text: crate::domain::access::SEE_OFFICE.into(),
                    }
                }
            }
        };
        let Some(g) = self.gates.get_mut(keypad) else {
            return;
        };
        let mut locked_now = false;
        match &decision {
            Decision::Granted { .. } => g.lockout.right(),
            Decision::Denied { reason, .. } if reason.is_wrong_code() => {
                locked_now = g.lockout.wrong(now, &self.settings.lockout);
            }
            Decision::Denied { .. } => {}
        }
        let (strike, pulse) = (g.strike.clone(), g.pulse);
        let refused = match &decision {
            Decision::Granted { .. } => None,
            Decision::Denied { reason, .. } => Some(*reason),
        };
        self.executor.metrics().keypad_decision(keypad, refused);
        self.act(keypad, strike, pulse, &decision);
        let mut data = match &decision {
            Decision::Granted { contact_id, units } => json!({
                "keypad": keypad, "zone": zone, "contact_id": contact_id, "units": units,
            }),
            Decision::Denied {
                reason,
                contact_id,
                units,
                ..
            } => json!({
                "keypad": keypad, "zone": zone, "contact_id": contact_id, "units": units,
                "reason": reason,
            }),
        };
        if locked_now {
            data["lockout_s"] = json!(self.settings.lockout.duration.as_secs());
            tracing::warn!(keypad, "keypad locked out after too many wrong PINs");
        }
        let kind = match decision {
            Decision::Granted { .. } => EventType::AccessGranted,
            Decision::Denied { .. } => EventType::AccessDenied,
        };
        self.record(kind, data);
    }

    /// The PIN's contact and units, from the replica (off the runtime).
    async fn holder(&self, pin: Pin) -> Result<Option<Holder>, StoreError> {
        if pin::validate(pin.as_str()).is_err() {
            return Ok(None);
        }
        let hash = self.pin_key.hash(pin.as_str());
        self.executor.store().read(move |c| holder(c, &hash)).await
    }

    /// Pulses the gate and shows the outcome on the keypad, without waiting for either.
    fn act(&self, keypad: &str, strike: Option<CoilRef>, pulse: Duration, decision: &Decision) {
        let granted = matches!(decision, Decision::Granted { .. });
        if granted
            && let Some(c) = &strike
            && let Some(b) = self.boards.get(&c.board)
        {
            let (b, coil) = (b.clone(), c.coil);
            let pulse_task = async move {
                if let Err(e) = b.write_coil(coil, true).await {
                    tracing::error!(board = %b.id(), coil, error = %e, "cannot open the gate");
                    return;
                }
                tokio::time::sleep(pulse).await; // the pulse itself
                // A failed release is retried: a strike left on is an open gate.
                for attempt in 0..5u32 {
                    match b.write_coil(coil, false).await {
                        Ok(()) => return,
                        Err(e) => {
                            tracing::error!(board = %b.id(), coil, attempt, error = %e, "cannot close the gate");
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                    }
                }
            };
            tokio::spawn(pulse_task.in_current_span());
        }
        if let Some(k) = self.keypads.get(keypad) {
            let k = k.clone();
            let (led, buzzer, text) = match decision {
                Decision::Granted { .. } => (
                    Led::temporary(LedColor::Green, pulse.max(Duration::from_secs(1))),
                    Buzzer::short(),
                    crate::domain::access::WELCOME.to_owned(),
                ),
                Decision::Denied { text, .. } => (
                    Led::temporary(LedColor::Red, Duration::from_secs(3)),
                    Buzzer::long(),
                    text.clone(),
                ),
            };
            let feedback = async move {
                let mut text = Text::new(text);
                text.temporary = Some(Duration::from_secs(5));
                for r in [k.led(led).await, k.buzzer(buzzer).await, k.text(text).await] {
                    if let Err(e) = r {
                        tracing::debug!(keypad = %k.id(), error = %e, "keypad feedback not shown");
                    }
                }
            };
            tokio::spawn(feedback.in_current_span());
        }
    }

    async fn input(&mut self, ev: InputEvent) {
        let changes: Vec<(String, u16, bool)> = match ev {
            InputEvent::Snapshot { board, inputs } => inputs
                .iter()
                .enumerate()
                .filter_map(|(i, on)| u16::try_from(i).ok().map(|i| (board.to_string(), i, *on)))
                .collect(),
            InputEvent::Changed { board, input, on } => vec![(board.to_string(), input, on)],
        };
        for (board, input, on) in changes {
            if let Some(keypad) = self.gate_sensor(&board, input) {
                if on {
                    self.open_gates
                        .entry(keypad)
                        .or_insert((Instant::now(), false));
                } else {
                    self.open_gates.remove(&keypad);
                }
                continue;
            }
            let key = (board.clone(), input);
            if !on {
                if self.alarmed.remove(&key) {
                    self.log(LogEntry::DoorClosed { board, input });
                }
                continue;
            }
            if self.alarmed.contains(&key) {
                continue;
            }
            let (b, i) = (board.clone(), input);
            let unit = self
                .executor
                .store()
                .read(move |c| unit_behind_door(c, &b, i))
                .await;
            match unit {
                Ok(Some((unit_id, status))) if status != UnitStatus::Occupied => {
                    self.alarmed.insert(key);
                    tracing::warn!(unit = %unit_id, %status, "door open on a unit that is not occupied");
                    let data = json!({"kind": "unit_door_open", "unit_id": unit_id,
                                      "status": status, "board": board, "input": input});
                    let at = self.executor.now();
                    self.log(LogEntry::DoorAlarm {
                        board,
                        input,
                        unit_id,
                        data,
                        at,
                    });
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look up a door sensor"),
            }
        }
    }

    fn gate_sensor(&self, board: &str, input: u16) -> Option<String> {
        self.gates
            .iter()
            .find(|(_, g)| {
                g.sensor
                    .as_ref()
                    .is_some_and(|s| s.board == board && s.input == input)
            })
            .map(|(k, _)| k.clone())
    }

    /// Queues an event for the log without holding up the next decision.
    fn record(&self, kind: EventType, data: serde_json::Value) {
        let now = self.executor.now();
        self.log(LogEntry::Event(kind, data, now));
    }

    fn log(&self, entry: LogEntry) {
        if let Err(e) = self.events.try_send(entry) {
            // Only when the store has been stuck for thousands of decisions. A lost
            // DoorClosed heals itself: the next input snapshot shows the door closed.
            tracing::error!(error = %e, "gate log entry dropped: the log is not keeping up");
        }
    }
}

/// Most events waiting for the log.
const EVENT_QUEUE: usize = 4096;

/// Writes the controller's events in the order they were decided, as many per commit as
/// are waiting.
async fn record_events(executor: Executor, mut rx: mpsc::Receiver<LogEntry>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let taken = std::mem::take(&mut batch);
        let n = taken.len();
        let r = executor
            .store()
            .write(move |c| -> Result<(), StoreError> {
                for entry in &taken {
                    match entry {
                        LogEntry::Event(kind, data, at) => {
                            events::append(c, *kind, data, *at)?;
                        }
                        LogEntry::DoorAlarm {
                            board,
                            input,
                            unit_id,
                            data,
                            at,
                        } => {
                            alarms::raise(c, board, *input, unit_id, data, *at)?;
                        }
                        LogEntry::DoorClosed { board, input } => {
                            alarms::clear(c, board, *input)?;
                        }
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(events = n, error = %e, "cannot record gate events");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The contact holding `pin_hash`, its hours and its allocated units (with their gatelocks).
fn holder(c: &Connection, pin_hash: &[u8]) -> Result<Option<Holder>, StoreError> {
    let Some(contact_id) = people::pin_owner(c, pin_hash)? else {
        return Ok(None);
    };
    let hours = people::contact(c, &contact_id)?.and_then(|r| r.access_hours);
    let mut stmt = c.prepare_cached(
        "SELECT u.id, u.status, u.zones, u.gatelock FROM unit_allocations a
         JOIN tenancies t ON t.id = a.tenancy_id
         JOIN units u ON u.id = a.unit_id
         WHERE t.contact_id = ?1 AND a.ended_at IS NULL
         ORDER BY u.id",
    )?;
    let units = stmt
        .query_map(params![contact_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter_map(|(unit_id, status, zones, gatelock)| {
            Some(UnitAccess {
                unit_id,
                status: UnitStatus::from_str(&status).ok()?,
                zones: serde_json::from_str(&zones).ok()?,
                gatelock,
            })
        })
        .collect();
    Ok(Some(Holder {
        contact_id,
        hours,
        units,
    }))
}

/// The unit whose door sensor is `board`/`input`, with its status.
fn unit_behind_door(
    c: &Connection,
    board: &str,
    input: u16,
) -> Result<Option<(String, UnitStatus)>, StoreError> {
    let row: Option<(String, String)> = c
        .query_row(
            "SELECT id, status FROM units
             WHERE json_extract(door_sensor, '$.board') = ?1
               AND json_extract(door_sensor, '$.input') = ?2
             LIMIT 1",
            params![board, input],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.and_then(|(id, s)| UnitStatus::from_str(&s).ok().map(|s| (id, s))))
}
