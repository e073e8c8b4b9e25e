//! Unit records: the storEDGE fields, hardware bindings, and the rules for creating and
//! patching them.

use super::{FieldError, Patch, UnitStatus};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Door type (storEDGE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DoorType {
    /// No door.
    None,
    /// Roll-up door.
    RollUp,
    /// Swing door.
    Swing,
}

/// Access type (storEDGE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessType {
    /// Inside a building.
    Indoor,
    /// Drive-up.
    Outdoor,
}

/// What locks the unit: a smart lock of the lock API, or an overlock relay coil.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LockBinding {
    /// A smart lock by its vendor id.
    SmartLock {
        /// Lock id at the lock API.
        id: String,
    },
    /// A relay coil that drives the unit's overlock.
    Relay {
        /// Relay board id.
        board: String,
        /// Coil number on the board.
        coil: u16,
    },
}

/// A door sensor: a discrete input on a relay board.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DoorSensor {
    /// Relay board id.
    pub board: String,
    /// Discrete input number on the board.
    pub input: u16,
}

/// The storEDGE descriptive fields of a unit, stored as one JSON document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UnitAttributes {
    /// Free text.
    pub description: Option<String>,
    /// Width.
    pub width: f64,
    /// Length.
    pub length: f64,
    /// Height.
    pub height: f64,
    /// Door height.
    pub door_height: f64,
    /// Door width.
    pub door_width: f64,
    /// Door type.
    pub door_type: DoorType,
    /// Access type.
    pub access_type: AccessType,
    /// Floor number.
    pub floor: Option<i64>,
    /// Directions to the unit.
    pub directions: Option<String>,
    /// Standard monthly rate.
    pub standard_rate: f64,
    /// Position in the walk-through order.
    pub walk_thru_order: i64,
    /// Whether the unit can be rented.
    pub rentable: bool,
    /// Combination lock number.
    pub combination_lock_number: Option<String>,
    /// Overlock lock number.
    pub overlock_lock_number: Option<String>,
    /// Attribute description.
    pub attribute_description: Option<String>,
    /// Desirability rank.
    pub rank: Option<i64>,
    /// Amenity ids.
    pub unit_amenities: Vec<String>,
    /// Tax rate ids.
    pub tax_rates: Vec<String>,
}

/// The unit ↔ hardware bindings (DESIGN.md §4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Bindings {
    /// Gate zones the unit's tenant may pass.
    pub zones: Vec<String>,
    /// What locks the unit.
    pub lock: Option<LockBinding>,
    /// The unit's door sensor.
    pub door_sensor: Option<DoorSensor>,
}

/// A unit as the replica holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitRecord {
    /// Cloud id (opaque).
    pub id: String,
    /// Unit name, unique at the site.
    pub name: String,
    /// Unit type id.
    pub unit_type_id: String,
    /// Status.
    pub status: UnitStatus,
    /// Gatelock: the tenant's PIN does not open the gate for this unit; its lock and
    /// overlock still follow `status` (DESIGN.md §4).
    pub gatelock: bool,
    /// storEDGE fields.
    pub attrs: UnitAttributes,
    /// Hardware bindings.
    pub bindings: Bindings,
    /// Increments on every change.
    pub version: i64,
}

/// Unit fields in a create request (`POST /v1/units`, bulk_create, snapshot). Required fields
/// are `Option` here so that a missing one is reported by name, next to every other problem.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitInput {
    /// Cloud id; generated when omitted (only one name may be given with an id).
    pub id: Option<String>,
    /// Name; in `POST /v1/units` a comma-separated list creates several identical units.
    pub name: Option<String>,
    /// Unit type id.
    pub unit_type: Option<String>,
    /// Status; only the snapshot may set it (new units start `available`).
    pub status: Option<UnitStatus>,
    /// Width.
    pub width: Option<f64>,
    /// Length.
    pub length: Option<f64>,
    /// Height.
    pub height: Option<f64>,
    /// Door height.
    pub door_height: Option<f64>,
    /// Door width.
    pub door_width: Option<f64>,
    /// Door type.
    pub door_type: Option<DoorType>,
    /// Access type.
    pub access_type: Option<AccessType>,
    /// Standard rate.
    pub standard_rate: Option<f64>,
    /// Walk-through order.
    pub walk_thru_order: Option<i64>,
    /// Description.
    pub description: Option<String>,
    /// Floor.
    pub floor: Option<i64>,
    /// Directions.
    pub directions: Option<String>,
    /// Rentable (default true).
    pub rentable: Option<bool>,
    /// Combination lock number.
    pub combination_lock_number: Option<String>,
    /// Overlock lock number.
    pub overlock_lock_number: Option<String>,
    /// Attribute description.
    pub attribute_description: Option<String>,
    /// Rank.
    pub rank: Option<i64>,
    /// Amenity ids.
    pub unit_amenities: Option<Vec<String>>,
    /// Tax rate ids.
    pub tax_rates: Option<Vec<String>>,
    /// Gate zones.
    pub zones: Option<Vec<String>>,
    /// Lock binding.
    pub lock: Option<LockBinding>,
    /// Door sensor.
    pub door_sensor: Option<DoorSensor>,
    /// Gatelock: the PIN does not open the gate for this unit (default false).
    pub gatelock: Option<bool>,
}

/// A partial update of a unit (PATCH/PUT, bulk_update). Omitted fields stay as they are; a
/// `null` array stays as it is while `[]` clears it; `null` clears an optional scalar or binding.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitPatch {
    /// Unit id: only in bulk_update, where it names the unit.
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub id: Option<String>,
    /// Name.
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub name: Patch<String>,
    /// Unit type id.
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub unit_type: Patch<String>,
    /// Width.
    #[schema(value_type = Option<f64>)]
    #[serde(default)]
    pub width: Patch<f64>,
    /// Length.
    #[schema(value_type = Option<f64>)]
    #[serde(default)]
    pub length: Patch<f64>,
    /// Height.
    #[schema(value_type = Option<f64>)]
    #[serde(default)]
    pub height: Patch<f64>,
    /// Door height.
    #[schema(value_type = Option<f64>)]
    #[serde(default)]
    pub door_height: Patch<f64>,
    /// Door width.
    #[schema(value_type = Option<f64>)]
    #[serde(default)]
    pub door_width: Patch<f64>,
    /// Door type.
    #[schema(value_type = Option<DoorType>)]
    #[serde(default)]
    pub door_type: Patch<DoorType>,
    /// Access type.
    #[schema(value_type = Option<AccessType>)]
    #[serde(default)]
    pub access_type: Patch<AccessType>,
    /// Standard rate.
    #[schema(value_type = Option<f64>)]
    #[serde(default)]
    pub standard_rate: Patch<f64>,
    /// Walk-through order.
    #[schema(value_type = Option<i64>)]
    #[serde(default)]
    pub walk_thru_order: Patch<i64>,
    /// Rentable.
    #[schema(value_type = Option<bool>)]
    #[serde(default)]
    pub rentable: Patch<bool>,
    /// Description (null clears).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub description: Patch<String>,
    /// Floor (null clears).
    #[schema(value_type = Option<i64>)]
    #[serde(default)]
    pub floor: Patch<i64>,
    /// Directions (null clears).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub directions: Patch<String>,
    /// Combination lock number (null clears).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub combination_lock_number: Patch<String>,
    /// Overlock lock number (null clears).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub overlock_lock_number: Patch<String>,
    /// Attribute description (null clears).
    #[schema(value_type = Option<String>)]
    #[serde(default)]
    pub attribute_description: Patch<String>,
    /// Rank (null clears).
    #[schema(value_type = Option<i64>)]
    #[serde(default)]
    pub rank: Patch<i64>,
    /// Amenity ids (null unchanged, [] clears).
    #[schema(value_type = Option<Vec<String>>)]
    #[serde(default)]
    pub unit_amenities: Patch<Vec<String>>,
    /// Tax rate ids (null unchanged, [] clears).
    #[schema(value_type = Option<Vec<String>>)]
    #[serde(default)]
    pub tax_rates: Patch<Vec<String>>,
    /// Gate zones (null unchanged, [] clears).
    #[schema(value_type = Option<Vec<String>>)]
    #[serde(default)]
    pub zones: Patch<Vec<String>>,
    /// Lock binding (null removes).
    #[schema(value_type = Option<LockBinding>)]
    #[serde(default)]
    pub lock: Patch<LockBinding>,
    /// Door sensor (null removes).
    #[schema(value_type = Option<DoorSensor>)]
    #[serde(default)]
    pub door_sensor: Patch<DoorSensor>,
    /// Gatelock: the PIN does not open the gate for this unit (null unchanged).
    #[schema(value_type = Option<bool>)]
    #[serde(default)]
    pub gatelock: Patch<bool>,
}

const MAX_TEXT: usize = 1000;
const MAX_NAME: usize = 100;

/// Checks an id taken from outside (unit, contact, tenancy, unit type, zone...).
pub fn validate_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err("may contain only letters, digits, '-', '_', '.' and ':'");
    }
    Ok(())
}

fn check_dimension(errors: &mut Vec<FieldError>, field: &str, v: f64) {
    if !(v.is_finite() && v > 0.0 && v < 1e6) {
        errors.push(FieldError::new(field, "must be a number greater than 0"));
    }
}

fn check_text(errors: &mut Vec<FieldError>, field: &str, v: Option<&String>) {
    if v.is_some_and(|s| s.len() > MAX_TEXT) {
        errors.push(FieldError::new(
            field,
            format!("must be at most {MAX_TEXT} characters"),
        ));
    }
}

/// Checks a unit name.
pub fn validate_name(name: &str) -> Result<(), String> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err("can't be blank".into());
    }
    if trimmed.len() > MAX_NAME {
        return Err(format!("must be at most {MAX_NAME} characters"));
    }
    if trimmed.contains(',') {
        return Err("can't contain ','".into());
    }
    Ok(())
}

fn check_ids(errors: &mut Vec<FieldError>, field: &str, ids: &[String]) {
    if ids.len() > 64 {
        errors.push(FieldError::new(field, "must have at most 64 entries"));
    }
    for (i, id) in ids.iter().enumerate() {
        if let Err(m) = validate_id(id) {
            errors.push(FieldError::new(format!("{field}[{i}]"), m));
        }
    }
}

/// Checks the bindings' shape (whether the devices exist is checked against the config).
pub fn validate_bindings(errors: &mut Vec<FieldError>, b: &Bindings) {
    check_ids(errors, "zones", &b.zones);
    let mut seen = std::collections::HashSet::new();
    if !b.zones.iter().all(|z| seen.insert(z)) {
        errors.push(FieldError::new("zones", "must not repeat a zone"));
    }
    match &b.lock {
        Some(LockBinding::SmartLock { id }) => {
            if let Err(m) = validate_id(id) {
                errors.push(FieldError::new("lock.id", m));
            }
        }
        Some(LockBinding::Relay { board, .. }) => {
            if let Err(m) = validate_id(board) {
                errors.push(FieldError::new("lock.board", m));
            }
        }
        None => {}
    }
    if let Some(d) = &b.door_sensor
        && let Err(m) = validate_id(&d.board)
    {
        errors.push(FieldError::new("door_sensor.board", m));
    }
}

/// Checks the attribute values.
pub fn validate_attrs(errors: &mut Vec<FieldError>, a: &UnitAttributes) {
    for (field, v) in [
        ("width", a.width),
        ("length", a.length),
        ("height", a.height),
        ("door_height", a.door_height),
        ("door_width", a.door_width),
    ] {
        check_dimension(errors, field, v);
    }
    if !(a.standard_rate.is_finite() && a.standard_rate >= 0.0) {
        errors.push(FieldError::new(
            "standard_rate",
            "must be a number of at least 0",
        ));
    }
    if a.walk_thru_order < 0 {
        errors.push(FieldError::new("walk_thru_order", "must be at least 0"));
    }
    for (field, v) in [
        ("description", &a.description),
        ("directions", &a.directions),
        ("combination_lock_number", &a.combination_lock_number),
        ("overlock_lock_number", &a.overlock_lock_number),
        ("attribute_description", &a.attribute_description),
    ] {
        check_text(errors, field, v.as_ref());
    }
    check_ids(errors, "unit_amenities", &a.unit_amenities);
    check_ids(errors, "tax_rates", &a.tax_rates);
}

/// A unit to be created, once its input has been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct NewUnit {
    /// Given id, if any.
    pub id: Option<String>,
    /// Names (one unit per name).
    pub names: Vec<String>,
    /// Unit type id.
    pub unit_type_id: String,
    /// Status (`available` unless a snapshot says otherwise).
    pub status: UnitStatus,
    /// Gatelock.
    pub gatelock: bool,
    /// Attributes.
    pub attrs: UnitAttributes,
    /// Bindings.
    pub bindings: Bindings,
}

impl UnitInput {
    /// Checks the input; `many_names` allows a comma-separated name list.
    /// Returns every problem found, not just the first.
    pub fn into_new(self, many_names: bool) -> Result<NewUnit, Vec<FieldError>> {
        let mut errors = Vec::new();
        fn required<T>(errors: &mut Vec<FieldError>, field: &str, v: Option<T>) -> Option<T> {
            if v.is_none() {
                errors.push(FieldError::new(field, "is required"));
            }
            v
        }
        let names: Vec<String> = match required(&mut errors, "name", self.name) {
            Some(n) if many_names => n.split(',').map(|s| s.trim().to_owned()).collect(),
            Some(n) => vec![n.trim().to_owned()],
            None => vec![],
        };
        for name in &names {
            if let Err(m) = validate_name(name) {
                errors.push(FieldError::new("name", m));
                break;
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
            errors.push(FieldError::new("name", format!("{dup:?} is given twice")));
        }
        if names.len() > 1000 {
            errors.push(FieldError::new("name", "at most 1000 units per request"));
        }
        if let Some(id) = &self.id {
            if let Err(m) = validate_id(id) {
                errors.push(FieldError::new("id", m));
            }
            if names.len() > 1 {
                errors.push(FieldError::new("id", "can't be given with several names"));
            }
        }
        // One lock or door sensor belongs to one unit: it can't be copied to several.
        if names.len() > 1 {
            if self.lock.is_some() {
                errors.push(FieldError::new(
                    "lock",
                    "can't be given with several names: a lock binds one unit",
                ));
            }
            if self.door_sensor.is_some() {
                errors.push(FieldError::new(
                    "door_sensor",
                    "can't be given with several names: a door sensor belongs to one unit",
                ));
            }
        }
        let unit_type = required(&mut errors, "unit_type", self.unit_type);
        if let Some(t) = &unit_type
            && let Err(m) = validate_id(t)
        {
            errors.push(FieldError::new("unit_type", m));
        }
        let width = required(&mut errors, "width", self.width);
        let length = required(&mut errors, "length", self.length);
        let height = required(&mut errors, "height", self.height);
        let door_height = required(&mut errors, "door_height", self.door_height);
        let door_width = required(&mut errors, "door_width", self.door_width);
        let door_type = required(&mut errors, "door_type", self.door_type);
        let access_type = required(&mut errors, "access_type", self.access_type);
        let standard_rate = required(&mut errors, "standard_rate", self.standard_rate);
        let walk_thru_order = required(&mut errors, "walk_thru_order", self.walk_thru_order);
        let (
            Some(unit_type_id),
            Some(width),
            Some(length),
            Some(height),
            Some(door_height),
            Some(door_width),
            Some(door_type),
            Some(access_type),
            Some(standard_rate),
            Some(walk_thru_order),
        ) = (
            unit_type,
            width,
            length,
            height,
            door_height,
            door_width,
            door_type,
            access_type,
            standard_rate,
            walk_thru_order,
        )
        else {
            return Err(errors);
        };
        let attrs = UnitAttributes {
            description: self.description,
            width,
            length,
            height,
            door_height,
            door_width,
            door_type,
            access_type,
            floor: self.floor,
            directions: self.directions,
            standard_rate,
            walk_thru_order,
            rentable: self.rentable.unwrap_or(true),
            combination_lock_number: self.combination_lock_number,
            overlock_lock_number: self.overlock_lock_number,
            attribute_description: self.attribute_description,
            rank: self.rank,
            unit_amenities: self.unit_amenities.unwrap_or_default(),
            tax_rates: self.tax_rates.unwrap_or_default(),
        };
        let bindings = Bindings {
            zones: self.zones.unwrap_or_default(),
            lock: self.lock,
            door_sensor: self.door_sensor,
        };
        validate_attrs(&mut errors, &attrs);
        validate_bindings(&mut errors, &bindings);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(NewUnit {
            id: self.id,
            names,
            unit_type_id,
            status: self.status.unwrap_or(UnitStatus::Available),
            gatelock: self.gatelock.unwrap_or(false),
            attrs,
            bindings,
        })
    }
}

fn set<T: Clone>(field: &Patch<T>, target: &mut T) {
    if let Patch::Value(v) = field {
        *target = v.clone();
    }
}

fn set_opt<T: Clone>(field: &Patch<T>, target: &mut Option<T>) {
    match field {
        Patch::Absent => {}
        Patch::Null => *target = None,
        Patch::Value(v) => *target = Some(v.clone()),
    }
}

impl UnitPatch {
    /// Applies the patch to a copy of the record and checks the result. The new record's
    /// version is not bumped here: the store does that only if something changed.
    pub fn apply(&self, unit: &UnitRecord) -> Result<UnitRecord, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut next = unit.clone();
        set(&self.gatelock, &mut next.gatelock);
        if let Patch::Value(name) = &self.name {
            match validate_name(name) {
                Ok(()) => next.name = name.trim().to_owned(),
                Err(m) => errors.push(FieldError::new("name", m)),
            }
        }
        if let Patch::Value(t) = &self.unit_type {
            match validate_id(t) {
                Ok(()) => next.unit_type_id = t.clone(),
                Err(m) => errors.push(FieldError::new("unit_type", m)),
            }
        }
        let a = &mut next.attrs;
        set(&self.width, &mut a.width);
        set(&self.length, &mut a.length);
        set(&self.height, &mut a.height);
        set(&self.door_height, &mut a.door_height);
        set(&self.door_width, &mut a.door_width);
        set(&self.door_type, &mut a.door_type);
        set(&self.access_type, &mut a.access_type);
        set(&self.standard_rate, &mut a.standard_rate);
        set(&self.walk_thru_order, &mut a.walk_thru_order);
        set(&self.rentable, &mut a.rentable);
        set_opt(&self.description, &mut a.description);
        set_opt(&self.floor, &mut a.floor);
        set_opt(&self.directions, &mut a.directions);
        set_opt(
            &self.combination_lock_number,
            &mut a.combination_lock_number,
        );
        set_opt(&self.overlock_lock_number, &mut a.overlock_lock_number);
        set_opt(&self.attribute_description, &mut a.attribute_description);
        set_opt(&self.rank, &mut a.rank);
        set(&self.unit_amenities, &mut a.unit_amenities);
        set(&self.tax_rates, &mut a.tax_rates);
        let b = &mut next.bindings;
        set(&self.zones, &mut b.zones);
        set_opt(&self.lock, &mut b.lock);
        set_opt(&self.door_sensor, &mut b.door_sensor);
        validate_attrs(&mut errors, &next.attrs);
        validate_bindings(&mut errors, &next.bindings);
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }
}

/// The fields that differ between two versions of a unit, by their API names.
pub fn changed_fields(old: &UnitRecord, new: &UnitRecord) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.name != new.name {
        out.push("name");
    }
    if old.unit_type_id != new.unit_type_id {
        out.push("unit_type");
    }
    if old.status != new.status {
        out.push("status");
    }
    if old.gatelock != new.gatelock {
        out.push("gatelock");
    }
    if old.attrs != new.attrs {
        out.push("attributes");
    }
    if old.bindings.zones != new.bindings.zones {
        out.push("zones");
    }
    if old.bindings.lock != new.bindings.lock {
        out.push("lock");
    }
    if old.bindings.door_sensor != new.bindings.door_sensor {
        out.push("door_sensor");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> UnitInput {
        serde_json::from_value(serde_json::json!({
            "name": "A1, A2 ,A3", "unit_type": "small", "width": 5, "length": 10, "height": 8,
            "door_height": 7, "door_width": 4, "door_type": "roll_up", "access_type": "indoor",
            "standard_rate": 99.5, "walk_thru_order": 1, "zones": ["main-gate"]
        }))
        .unwrap()
    }

    fn record() -> UnitRecord {
        let mut i = input();
        i.name = Some("A1".into());
        let n = i.into_new(false).unwrap_or_else(|e| panic!("{e:?}"));
        UnitRecord {
            id: "u1".into(),
            name: "A1".into(),
            unit_type_id: n.unit_type_id,
            status: UnitStatus::Available,
            gatelock: n.gatelock,
            attrs: n.attrs,
            bindings: n.bindings,
            version: 1,
        }
    }

    #[test]
    fn comma_separated_names_create_many() {
        let n = input().into_new(true).unwrap();
        assert_eq!(n.names, ["A1", "A2", "A3"]);
        assert_eq!(n.status, UnitStatus::Available);
        assert!(n.attrs.rentable);
    }

    #[test]
    fn missing_and_bad_fields_are_all_reported() {
        let mut i = input();
        i.width = None;
        i.door_type = None;
        let errs = i.into_new(true).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["width", "door_type"]);
        let mut i = input();
        i.height = Some(0.0);
        i.name = Some("A1,,A2".into());
        let fields: Vec<_> = i
            .into_new(true)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["name", "height"]);
        let mut i = input();
        i.name = Some("B1,B1".into());
        assert_eq!(
            i.into_new(true).unwrap_err()[0].message,
            "\"B1\" is given twice"
        );
    }

    #[test]
    fn several_names_cannot_share_a_lock_or_door_sensor() {
        let mut i = input();
        i.lock = Some(LockBinding::SmartLock { id: "lk-1".into() });
        i.door_sensor = Some(DoorSensor {
            board: "rb1".into(),
            input: 1,
        });
        let fields: Vec<_> = i
            .clone()
            .into_new(true)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["lock", "door_sensor"]);
        i.name = Some("A1".into());
        assert!(i.into_new(true).is_ok(), "one name may");
    }

    #[test]
    fn patch_null_array_is_unchanged_and_empty_array_clears() {
        let r = record();
        let p: UnitPatch = serde_json::from_str(r#"{"zones": null, "width": 6}"#).unwrap();
        let n = p.apply(&r).unwrap();
        assert_eq!(n.bindings.zones, ["main-gate"]);
        assert_eq!(n.attrs.width, 6.0);
        let p: UnitPatch = serde_json::from_str(r#"{"zones": []}"#).unwrap();
        assert!(p.apply(&r).unwrap().bindings.zones.is_empty());
        let p: UnitPatch = serde_json::from_str(r#"{"floor": 2}"#).unwrap();
        let n = p.apply(&r).unwrap();
        assert_eq!(n.attrs.floor, Some(2));
        let p: UnitPatch = serde_json::from_str(r#"{"floor": null}"#).unwrap();
        assert_eq!(p.apply(&n).unwrap().attrs.floor, None);
        assert_eq!(
            changed_fields(&r, &p.apply(&r).unwrap()),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn gatelock_defaults_off_is_patched_and_named_on_its_own() {
        assert!(!input().into_new(true).unwrap().gatelock);
        let mut i = input();
        i.gatelock = Some(true);
        assert!(i.into_new(true).unwrap().gatelock);
        let r = record();
        let p: UnitPatch = serde_json::from_str(r#"{"gatelock": true}"#).unwrap();
        let locked = p.apply(&r).unwrap();
        assert!(locked.gatelock);
        assert_eq!(locked.attrs, r.attrs, "not a storEDGE attribute");
        assert_eq!(changed_fields(&r, &locked), ["gatelock"]);
        for keep in [r#"{}"#, r#"{"gatelock": null}"#, r#"{"width": 5}"#] {
            let p: UnitPatch = serde_json::from_str(keep).unwrap();
            assert!(p.apply(&locked).unwrap().gatelock, "{keep}");
        }
        let p: UnitPatch = serde_json::from_str(r#"{"gatelock": false}"#).unwrap();
        assert_eq!(p.apply(&locked).unwrap(), r);
        assert!(serde_json::from_str::<UnitPatch>(r#"{"gatelock": "yes"}"#).is_err());
        assert!(serde_json::from_str::<UnitInput>(r#"{"gatelock": 1}"#).is_err());
    }

    #[test]
    fn patch_rejects_bad_values_and_unknown_fields() {
        let p: UnitPatch = serde_json::from_str(r#"{"width": -1, "zones": ["bad zone"]}"#).unwrap();
        let fields: Vec<_> = p
            .apply(&record())
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["width", "zones[0]"]);
        assert!(serde_json::from_str::<UnitPatch>(r#"{"colour": "red"}"#).is_err());
        assert!(
            serde_json::from_str::<UnitPatch>(r#"{"lock": {"kind": "relay", "board": "b1"}}"#)
                .is_err()
        );
    }
}
