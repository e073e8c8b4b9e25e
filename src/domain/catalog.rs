//! What a unit's hardware bindings (DESIGN.md §4) may name: the site's declared devices,
//! built from `[devices]`, and the rule that one lock or door sensor belongs to one unit.
//! Pure: checking a binding never talks to a device.

use super::FieldError;
use super::unit::{Bindings, DoorSensor, LockBinding};
use crate::config::DevicesConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A relay board's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardShape {
    /// Number of coils (0-based numbers below it).
    pub coils: u16,
    /// Number of discrete inputs.
    pub inputs: u16,
}

/// The devices bindings may name. Disabled devices are in it: they are declared, only not
/// installed yet, and units may be bound to them ahead of time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCatalog {
    boards: BTreeMap<String, BoardShape>,
    /// None: no lock API. Some(None): a lock API that accepts any lock id.
    locks: Option<Option<BTreeSet<String>>>,
    /// (board, coil) → the keypad whose gate strike it is.
    gate_coils: HashMap<(String, u16), String>,
    /// (board, input) → the keypad whose gate position sensor it is.
    gate_sensors: HashMap<(String, u16), String>,
}

impl DeviceCatalog {
    /// The catalog of a `[devices]` section, enabled or not.
    pub fn from_config(devices: &DevicesConfig) -> Self {
        let boards = devices
            .relay_boards
            .iter()
            .map(|b| {
                let shape = BoardShape {
                    coils: b.coils,
                    inputs: b.inputs,
                };
                (b.id.clone(), shape)
            })
            .collect();
        let locks = devices
            .lock_api
            .as_ref()
            .map(|l| l.locks.as_ref().map(|ids| ids.iter().cloned().collect()));
        let mut gate_coils = HashMap::new();
        let mut gate_sensors = HashMap::new();
        for k in &devices.keypads {
            if let Some(g) = &k.gate {
                gate_coils.insert((g.board.clone(), g.coil), k.id.clone());
            }
            if let Some(g) = &k.gate_sensor {
                gate_sensors.insert((g.board.clone(), g.input), k.id.clone());
            }
        }
        DeviceCatalog {
            boards,
            locks,
            gate_coils,
            gate_sensors,
        }
    }

    /// Every problem with the bindings against the declared devices, with fields
    /// `lock.kind`, `lock.id`, `lock.board`, `lock.coil`, `door_sensor.board`,
    /// `door_sensor.input`. Zones are not checked against the keypads: the cloud may
    /// define a zone before its keypad is installed, and until then it opens nothing.
    pub fn check(&self, b: &Bindings) -> Vec<FieldError> {
        self.check_change(None, b)
    }

    /// Checks what a change binds anew: the lock and door sensor that differ from `old`
    /// (everything when `old` is None). A binding kept as it was is not checked again, so a
    /// unit whose board left the config can still be renamed or re-bound.
    pub fn check_change(&self, old: Option<&Bindings>, new: &Bindings) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(lock) = &new.lock
            && old.is_none_or(|o| o.lock != new.lock)
        {
            self.check_lock(&mut errors, lock);
        }
        if let Some(sensor) = &new.door_sensor
            && old.is_none_or(|o| o.door_sensor != new.door_sensor)
        {
            self.check_door_sensor(&mut errors, sensor);
        }
        errors
    }

    /// Checks a lock binding (see [`DeviceCatalog::check`]).
    pub fn check_lock(&self, errors: &mut Vec<FieldError>, lock: &LockBinding) {
        match lock {
            LockBinding::SmartLock { id } => match &self.locks {
                None => errors.push(FieldError::new(
                    "lock.kind",
                    "smart_lock needs a lock API and none is configured ([devices.lock_api])",
                )),
                Some(Some(known)) if !known.contains(id) => errors.push(FieldError::new(
                    "lock.id",
                    format!("lock {id:?} is not in the lock API's list (devices.lock_api.locks)"),
                )),
                Some(_) => {}
            },
            LockBinding::Relay { board, coil } => {
                let Some(shape) = self.board(errors, "lock.board", board) else {
                    return;
                };
                if *coil >= shape.coils {
                    errors.push(FieldError::new(
                        "lock.coil",
                        format!(
                            "coil {coil} is out of range: board {board:?} has {} coils{}",
                            shape.coils,
                            range(shape.coils)
                        ),
                    ));
                } else if let Some(keypad) = self.gate_coils.get(&(board.clone(), *coil)) {
                    // The overlock relay is energised whenever the unit is not occupied: on a
                    // gate strike that would hold the gate open, or pulse it on every change.
                    errors.push(FieldError::new(
                        "lock.coil",
                        format!(
                            "coil {coil} of board {board:?} is the gate strike of keypad \
                             {keypad:?}, not an overlock relay"
                        ),
                    ));
                }
            }
        }
    }

    /// Checks a door sensor binding (see [`DeviceCatalog::check`]).
    pub fn check_door_sensor(&self, errors: &mut Vec<FieldError>, sensor: &DoorSensor) {
        let DoorSensor { board, input } = sensor;
        let Some(shape) = self.board(errors, "door_sensor.board", board) else {
            return;
        };
        if *input >= shape.inputs {
            errors.push(FieldError::new(
                "door_sensor.input",
                format!(
                    "input {input} is out of range: board {board:?} has {} inputs{}",
                    shape.inputs,
                    range(shape.inputs)
                ),
            ));
        } else if let Some(keypad) = self.gate_sensors.get(&(board.clone(), *input)) {
            // A gate opening would raise door alarms on the unit.
            errors.push(FieldError::new(
                "door_sensor.input",
                format!(
                    "input {input} of board {board:?} is the gate position sensor of keypad \
                     {keypad:?}, not a unit door sensor"
                ),
            ));
        }
    }

    fn board(&self, errors: &mut Vec<FieldError>, field: &str, id: &str) -> Option<BoardShape> {
        let shape = self.boards.get(id).copied();
        if shape.is_none() {
            let configured = if self.boards.is_empty() {
                "no relay boards are configured".to_owned()
            } else {
                let ids: Vec<&str> = self.boards.keys().map(String::as_str).collect();
                format!("configured: {}", ids.join(", "))
            };
            errors.push(FieldError::new(
                field,
                format!("relay board {id:?} is not configured ({configured})"),
            ));
        }
        shape
    }
}

fn range(n: u16) -> String {
    match n {
        0 => String::new(),
        n => format!(", 0-{}", n - 1),
    }
}

/// What a unit holds alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exclusive {
    /// Its lock (smart lock or overlock coil).
    Lock,
    /// Its door sensor input.
    DoorSensor,
}

impl Exclusive {
    /// The unit field it lives in.
    pub fn field(self) -> &'static str {
        match self {
            Exclusive::Lock => "lock",
            Exclusive::DoorSensor => "door_sensor",
        }
    }
}

/// A unit's bindings as the one-unit-per-lock rule sees them.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// Unit id.
    pub unit_id: &'a str,
    /// Unit name.
    pub unit_name: &'a str,
    /// Its bindings (after the change).
    pub bindings: &'a Bindings,
    /// Whether its lock is checked (new or changed); an unchecked one only blocks others.
    pub check_lock: bool,
    /// Whether its door sensor is checked.
    pub check_door_sensor: bool,
}

impl<'a> Claim<'a> {
    /// A unit's bindings after a change from `old` (None: a new unit): only what it binds
    /// anew is checked.
    pub fn change(
        unit_id: &'a str,
        unit_name: &'a str,
        old: Option<&Bindings>,
        new: &'a Bindings,
    ) -> Self {
        Claim {
            unit_id,
            unit_name,
            bindings: new,
            check_lock: new.lock.is_some() && old.is_none_or(|o| o.lock != new.lock),
            check_door_sensor: new.door_sensor.is_some()
                && old.is_none_or(|o| o.door_sensor != new.door_sensor),
        }
    }

    /// A unit's bindings as they stand: they only block others.
    pub fn held(unit_id: &'a str, unit_name: &'a str, bindings: &'a Bindings) -> Self {
        Claim {
            unit_id,
            unit_name,
            bindings,
            check_lock: false,
            check_door_sensor: false,
        }
    }

    /// Whether anything of it is checked.
    pub fn is_checked(&self) -> bool {
        self.check_lock || self.check_door_sensor
    }
}

/// A checked claim on a lock or door sensor that another unit holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clash {
    /// Index of the refused claim.
    pub claim: usize,
    /// What is shared.
    pub what: Exclusive,
    /// The unit holding it.
    pub holder_id: String,
    /// That unit's name.
    pub holder_name: String,
    /// What is shared and with whom, for the error's detail.
    pub message: String,
}

#[derive(PartialEq, Eq, Hash)]
enum Key<'a> {
    Lock(&'a LockBinding),
    Sensor(&'a DoorSensor),
}

/// Two units bound to one lock (or door sensor) would make the desired hardware state flap
/// between them. Of each group sharing one, the holder is the first unchecked claim (the
/// replica as it stands), else the first claim; every other checked claim clashes with it.
/// Unchecked claims that already share are left alone. Ordered by claim, lock first.
pub fn clashes(claims: &[Claim<'_>]) -> Vec<Clash> {
    let mut groups: HashMap<Key<'_>, Vec<usize>> = HashMap::new();
    for (i, c) in claims.iter().enumerate() {
        let keys = [
            c.bindings.lock.as_ref().map(Key::Lock),
            c.bindings.door_sensor.as_ref().map(Key::Sensor),
        ];
        for key in keys.into_iter().flatten() {
            groups.entry(key).or_default().push(i);
        }
    }
    let mut out = Vec::new();
    for (key, members) in &groups {
        if members.len() < 2 {
            continue;
        }
        let (what, checked): (Exclusive, fn(&Claim<'_>) -> bool) = match key {
            Key::Lock(_) => (Exclusive::Lock, |c| c.check_lock),
            Key::Sensor(_) => (Exclusive::DoorSensor, |c| c.check_door_sensor),
        };
        let holder = members
            .iter()
            .copied()
            .find(|&i| !checked(&claims[i]))
            .unwrap_or(members[0]);
        let h = &claims[holder];
        for &i in members {
            if i == holder || !checked(&claims[i]) {
                continue;
            }
            let shared = match key {
                Key::Lock(LockBinding::SmartLock { id }) => format!("lock {id:?}"),
                Key::Lock(LockBinding::Relay { board, coil }) => {
                    format!("coil {coil} of board {board:?}")
                }
                Key::Sensor(DoorSensor { board, input }) => {
                    format!("input {input} of board {board:?}")
                }
            };
            out.push(Clash {
                claim: i,
                what,
                holder_id: h.unit_id.to_owned(),
                holder_name: h.unit_name.to_owned(),
                message: format!(
                    "{shared} is bound to unit {:?} ({})",
                    h.unit_id, h.unit_name
                ),
            });
        }
    }
    out.sort_by_key(|c| (c.claim, c.what));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn catalog(devices: &str) -> DeviceCatalog {
        let c = Config::from_toml(devices).expect("devices parse");
        DeviceCatalog::from_config(&c.devices)
    }

    const SITE: &str = r#"
        [[devices.keypads]]
        id = "gate-1"
        zone = "main-gate"
        tcp = "127.0.0.1:1"
        gate = { board = "gate-relays", coil = 0 }
        gate_sensor = { board = "gate-relays", input = 1 }
        [[devices.relay_boards]]
        id = "gate-relays"
        transport = "tcp"
        address = "127.0.0.1:1"
        coils = 2
        inputs = 2
        [[devices.relay_boards]]
        id = "relay-1"
        transport = "tcp"
        address = "127.0.0.1:2"
        coils = 8
        inputs = 4
        enabled = false
        [devices.lock_api]
        url = "http://127.0.0.1:3"
        locks = ["lk-1", "lk-2"]
    "#;

    fn relay(board: &str, coil: u16) -> Bindings {
        Bindings {
            lock: Some(LockBinding::Relay {
                board: board.into(),
                coil,
            }),
            ..Bindings::default()
        }
    }

    fn smart(id: &str) -> Bindings {
        Bindings {
            lock: Some(LockBinding::SmartLock { id: id.into() }),
            ..Bindings::default()
        }
    }

    fn sensor(board: &str, input: u16) -> Bindings {
        Bindings {
            door_sensor: Some(DoorSensor {
                board: board.into(),
                input,
            }),
            ..Bindings::default()
        }
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn declared_devices_are_accepted_enabled_or_not() {
        let c = catalog(SITE);
        let mut b = relay("relay-1", 7);
        b.door_sensor = sensor("relay-1", 3).door_sensor;
        b.zones = vec!["a-zone-without-keypad".into()];
        assert_eq!(c.check(&b), []);
        assert_eq!(c.check(&smart("lk-2")), []);
        assert_eq!(c.check(&relay("gate-relays", 1)), [], "coil 1 is no strike");
        assert_eq!(c.check(&sensor("gate-relays", 0)), [], "input 0 is no gate");
    }

    #[test]
    fn unknown_boards_and_out_of_range_numbers_are_named() {
        let c = catalog(SITE);
        let e = c.check(&relay("relay-9", 0));
        assert_eq!(fields(&e), ["lock.board"]);
        assert!(
            e[0].message.contains("configured: gate-relays, relay-1"),
            "{e:?}"
        );
        let e = c.check(&relay("relay-1", 8));
        assert_eq!(fields(&e), ["lock.coil"]);
        assert!(e[0].message.contains("has 8 coils, 0-7"), "{e:?}");
        let e = c.check(&sensor("nope", 0));
        assert_eq!(fields(&e), ["door_sensor.board"]);
        let e = c.check(&sensor("relay-1", 4));
        assert_eq!(fields(&e), ["door_sensor.input"]);
        assert!(e[0].message.contains("has 4 inputs"), "{e:?}");
        let e = catalog("").check(&relay("relay-1", 0));
        assert!(
            e[0].message.contains("no relay boards are configured"),
            "{e:?}"
        );
    }

    #[test]
    fn gate_strikes_and_gate_sensors_are_not_unit_bindings() {
        let c = catalog(SITE);
        let e = c.check(&relay("gate-relays", 0));
        assert_eq!(fields(&e), ["lock.coil"]);
        assert!(e[0].message.contains("gate strike of keypad \"gate-1\""));
        let e = c.check(&sensor("gate-relays", 1));
        assert_eq!(fields(&e), ["door_sensor.input"]);
        assert!(
            e[0].message
                .contains("gate position sensor of keypad \"gate-1\"")
        );
    }

    #[test]
    fn smart_locks_need_a_lock_api_and_a_listed_id() {
        let c = catalog(SITE);
        assert_eq!(fields(&c.check(&smart("lk-3"))), ["lock.id"]);
        assert_eq!(fields(&catalog("").check(&smart("lk-1"))), ["lock.kind"]);
        let any = catalog("[devices.lock_api]\nurl = \"http://127.0.0.1:3\"\n");
        assert_eq!(any.check(&smart("whatever-the-vendor-has")), []);
    }

    #[test]
    fn only_what_a_change_binds_anew_is_checked() {
        let c = catalog(SITE);
        let mut old = relay("relay-9", 0);
        old.door_sensor = sensor("relay-9", 0).door_sensor;
        let mut new = old.clone();
        new.zones = vec!["main-gate".into()];
        assert_eq!(c.check_change(Some(&old), &new), []);
        new.door_sensor = sensor("relay-1", 9).door_sensor;
        assert_eq!(
            fields(&c.check_change(Some(&old), &new)),
            ["door_sensor.input"]
        );
        assert_eq!(
            fields(&c.check_change(None, &new)),
            ["lock.board", "door_sensor.input"]
        );
    }

    fn claim<'a>(id: &'a str, b: &'a Bindings, checked: bool) -> Claim<'a> {
        Claim {
            unit_id: id,
            unit_name: id,
            bindings: b,
            check_lock: checked,
            check_door_sensor: checked,
        }
    }

    #[test]
    fn a_lock_or_sensor_claimed_twice_clashes_with_its_holder() {
        let (l1, l1b, s1) = (smart("lk-1"), smart("lk-1"), sensor("relay-1", 2));
        let mut both = relay("relay-1", 3);
        both.door_sensor = s1.door_sensor.clone();
        let other = relay("relay-1", 4);
        // u1 holds lk-1 in the replica; u2 asks for it too; u3 asks for u4's door sensor.
        let claims = [
            claim("u1", &l1, false),
            claim("u2", &l1b, true),
            claim("u3", &both, true),
            claim("u4", &s1, false),
            claim("u5", &other, true),
        ];
        let got: Vec<_> = clashes(&claims)
            .into_iter()
            .map(|c| (c.claim, c.what, c.holder_id))
            .collect();
        assert_eq!(
            got,
            [
                (1, Exclusive::Lock, "u1".to_owned()),
                (2, Exclusive::DoorSensor, "u4".to_owned())
            ]
        );
    }

    #[test]
    fn within_a_request_the_first_claim_holds_and_old_sharing_is_left_alone() {
        let (a, b, c) = (smart("lk-1"), smart("lk-1"), smart("lk-1"));
        let claims = [
            claim("u1", &a, true),
            claim("u2", &b, true),
            claim("u3", &c, true),
        ];
        let got: Vec<_> = clashes(&claims)
            .into_iter()
            .map(|c| (c.claim, c.holder_id))
            .collect();
        assert_eq!(got, [(1, "u1".to_owned()), (2, "u1".to_owned())]);
        let claims = [claim("u1", &a, false), claim("u2", &b, false)];
        assert_eq!(clashes(&claims), []);
        // A smart lock and a relay coil never share, whatever their ids.
        let (s, r) = (smart("relay-1"), relay("relay-1", 0));
        assert_eq!(clashes(&[claim("u1", &s, true), claim("u2", &r, true)]), []);
    }
}
