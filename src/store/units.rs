//! Unit queries.

use super::{StoreError, timestamp};
use crate::domain::UnitStatus;
use crate::domain::allocation::UnitFacts;
use crate::domain::unit::{Bindings, UnitRecord};
use crate::model::{UnitTypeRef, UnitView};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};

/// A unit row with what its view needs from the joined tables.
#[derive(Debug, Clone)]
pub struct UnitRow {
    /// The record.
    pub record: UnitRecord,
    /// Its unit type's name.
    pub unit_type_name: String,
    /// Tenancy of the active allocation.
    pub tenancy_id: Option<String>,
    /// Contact of that tenancy.
    pub contact_id: Option<String>,
    /// Created.
    pub created_at: String,
    /// Last changed.
    pub updated_at: String,
}

const SELECT: &str =
    "SELECT u.id, u.name, u.unit_type_id, t.name, u.status, u.attrs, u.zones, u.lock,
        u.door_sensor, u.version, u.created_at, u.updated_at, a.tenancy_id, tn.contact_id,
        u.gatelock
    FROM units u
    JOIN unit_types t ON t.id = u.unit_type_id
    LEFT JOIN unit_allocations a ON a.unit_id = u.id AND a.ended_at IS NULL
    LEFT JOIN tenancies tn ON tn.id = a.tenancy_id";

fn decode<T: serde::de::DeserializeOwned>(s: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn decode_opt<T: serde::de::DeserializeOwned>(s: Option<String>) -> rusqlite::Result<Option<T>> {
    s.as_deref().map(decode).transpose()
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<UnitRow> {
    let status: String = r.get(4)?;
    let status: UnitStatus = status.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(UnitRow {
        record: UnitRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            unit_type_id: r.get(2)?,
            status,
            gatelock: r.get(14)?,
            attrs: decode(&r.get::<_, String>(5)?)?,
            bindings: Bindings {
                zones: decode(&r.get::<_, String>(6)?)?,
                lock: decode_opt(r.get(7)?)?,
                door_sensor: decode_opt(r.get(8)?)?,
            },
            version: r.get(9)?,
        },
        unit_type_name: r.get(3)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
        tenancy_id: r.get(12)?,
        contact_id: r.get(13)?,
    })
}

impl UnitRow {
    /// The API representation.
    pub fn view(&self) -> UnitView {
        let u = &self.record;
        let a = &u.attrs;
        let fmt = |v: f64| {
            if v.fract() == 0.0 {
                format!("{}", v as i64)
            } else {
                format!("{v}")
            }
        };
        UnitView {
            id: u.id.clone(),
            name: u.name.clone(),
            price: a.standard_rate,
            description: a.description.clone(),
            width: a.width,
            length: a.length,
            height: a.height,
            door_height: a.door_height,
            door_width: a.door_width,
            door_type: a.door_type,
            access_type: a.access_type,
            floor: a.floor,
            directions: a.directions.clone(),
            size: format!("{}x{}x{}", fmt(a.width), fmt(a.length), fmt(a.height)),
            area: a.width * a.length,
            standard_rate: a.standard_rate,
            walk_thru_order: a.walk_thru_order,
            available_for_move_in: u.status == UnitStatus::Available && a.rentable,
            rentable: a.rentable,
            status: u.status,
            gatelock: u.gatelock,
            current_tenant_id: self.contact_id.clone(),
            current_tenancy_id: self.tenancy_id.clone(),
            combination_lock_number: a.combination_lock_number.clone(),
            overlock_lock_number: a.overlock_lock_number.clone(),
            attribute_description: a.attribute_description.clone(),
            rank: a.rank,
            unit_amenities: a.unit_amenities.clone(),
            tax_rates: a.tax_rates.clone(),
            unit_type: UnitTypeRef {
                id: u.unit_type_id.clone(),
                name: self.unit_type_name.clone(),
            },
            zones: u.bindings.zones.clone(),
            lock: u.bindings.lock.clone(),
            door_sensor: u.bindings.door_sensor.clone(),
            version: u.version,
            created_at: self.created_at.clone(),
            updated_at: self.updated_at.clone(),
        }
    }

    /// What the state machine needs.
    pub fn facts(&self) -> UnitFacts {
        UnitFacts {
            id: self.record.id.clone(),
            status: self.record.status,
            tenancy_id: self.tenancy_id.clone(),
        }
    }
}

/// One unit with its joins.
pub fn get(conn: &Connection, id: &str) -> Result<Option<UnitRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("{SELECT} WHERE u.id = ?1"))?
        .query_row([id], from_row)
        .optional()?)
}

/// Filters of `GET /v1/units`.
#[derive(Debug, Clone, Default)]
pub struct UnitFilter {
    /// Any of these statuses (empty: all).
    pub statuses: Vec<UnitStatus>,
    /// Only this unit type.
    pub unit_type_id: Option<String>,
    /// Only units whose zones include this one.
    pub zone: Option<String>,
    /// Only rentable units.
    pub rentable_only: bool,
    /// Page size.
    pub limit: u32,
    /// Offset.
    pub offset: u64,
}

/// A page of units (ordered by name) and the number matching.
pub fn list(conn: &Connection, f: &UnitFilter) -> Result<(Vec<UnitRow>, u64), StoreError> {
    let mut clauses = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if !f.statuses.is_empty() {
        let marks = vec!["?"; f.statuses.len()].join(",");
        clauses.push(format!("u.status IN ({marks})"));
        args.extend(
            f.statuses
                .iter()
                .map(|s| Value::Text(s.as_str().to_owned())),
        );
    }
    if let Some(t) = &f.unit_type_id {
        clauses.push("u.unit_type_id = ?".to_owned());
        args.push(Value::Text(t.clone()));
    }
    if let Some(z) = &f.zone {
        clauses
            .push("EXISTS (SELECT 1 FROM json_each(u.zones) WHERE json_each.value = ?)".to_owned());
        args.push(Value::Text(z.clone()));
    }
    if f.rentable_only {
        clauses.push("json_extract(u.attrs, '$.rentable') = 1".to_owned());
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    let total: i64 = conn.query_row(
        &format!("SELECT COUNT(*) FROM units u{filter}"),
        params_from_iter(args.iter()),
        |r| r.get(0),
    )?;
    let mut page_args = args;
    page_args.push(Value::Integer(f.limit as i64));
    page_args.push(Value::Integer(f.offset.min(i64::MAX as u64) as i64));
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT}{filter} ORDER BY u.name LIMIT ? OFFSET ?"
    ))?;
    let rows = stmt
        .query_map(params_from_iter(page_args.iter()), from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((rows, total as u64))
}

/// Every unit, keyed by id (for the snapshot diff).
pub fn all(conn: &Connection) -> Result<Vec<UnitRow>, StoreError> {
    let mut stmt = conn.prepare(SELECT)?;
    let rows = stmt
        .query_map([], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A unit's bindings, by id and name.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundUnit {
    /// Unit id.
    pub id: String,
    /// Unit name.
    pub name: String,
    /// Its bindings.
    pub bindings: Bindings,
}

/// Every unit bound to a lock or a door sensor, in id order.
pub fn bound(conn: &Connection) -> Result<Vec<BoundUnit>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, zones, lock, door_sensor FROM units
         WHERE lock IS NOT NULL OR door_sensor IS NOT NULL ORDER BY id",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(BoundUnit {
                id: r.get(0)?,
                name: r.get(1)?,
                bindings: Bindings {
                    zones: decode(&r.get::<_, String>(2)?)?,
                    lock: decode_opt(r.get(3)?)?,
                    door_sensor: decode_opt(r.get(4)?)?,
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The unit id holding a name, if any.
pub fn id_by_name(conn: &Connection, name: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM units WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

fn json_opt<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>, StoreError> {
    Ok(v.as_ref().map(serde_json::to_string).transpose()?)
}

/// Runs an insert or update whose parameters are the unit's columns in table order
/// (`?1` id .. `?9` version, `?10` the time, `?11` gatelock).
fn write(
    conn: &Connection,
    sql: &str,
    u: &UnitRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute(params![
        u.id,
        u.name,
        u.unit_type_id,
        u.status.as_str(),
        serde_json::to_string(&u.attrs)?,
        serde_json::to_string(&u.bindings.zones)?,
        json_opt(&u.bindings.lock)?,
        json_opt(&u.bindings.door_sensor)?,
        u.version,
        timestamp(now),
        u.gatelock
    ])?;
    Ok(())
}

/// Inserts a new unit.
pub fn insert(
    conn: &Connection,
    u: &UnitRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    write(
        conn,
        "INSERT INTO units (id, name, unit_type_id, status, attrs, zones, lock, door_sensor, version, created_at, updated_at, gatelock)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11)",
        u,
        now,
    )
}

/// Writes every field of an existing unit (the caller has bumped `version`).
pub fn update(
    conn: &Connection,
    u: &UnitRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    write(
        conn,
        "UPDATE units SET name = ?2, unit_type_id = ?3, status = ?4, attrs = ?5, zones = ?6, lock = ?7,
            door_sensor = ?8, version = ?9, updated_at = ?10, gatelock = ?11 WHERE id = ?1",
        u,
        now,
    )
}

/// Sets a unit's status and bumps its version; returns the new version.
pub fn set_status(
    conn: &Connection,
    id: &str,
    status: UnitStatus,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE units SET status = ?2, version = version + 1, updated_at = ?3 WHERE id = ?1 RETURNING version")?
        .query_row(params![id, status.as_str(), timestamp(now)], |r| r.get(0))?)
}

/// Deletes a unit (snapshot only; its allocations must be gone first).
pub fn delete(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM units WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// The allocated units of every tenancy of a contact, in name order.
pub fn of_contact(conn: &Connection, contact_id: &str) -> Result<Vec<UnitRow>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT} WHERE tn.contact_id = ?1 ORDER BY u.name"
    ))?;
    let rows = stmt
        .query_map([contact_id], from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}
