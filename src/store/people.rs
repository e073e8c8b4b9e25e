//! Unit types, contacts, tenancies and allocations.

use super::{StoreError, timestamp};
use crate::domain::hours::AccessHours;
use crate::model::{AllocationView, ContactView, TenancyView, UnitTypeView};
use chrono::NaiveDate;
use rusqlite::{Connection, OptionalExtension, Row, params};

/// A unit type row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitTypeRecord {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: i64,
}

impl UnitTypeRecord {
    /// API representation.
    pub fn view(&self) -> UnitTypeView {
        UnitTypeView {
            id: self.id.clone(),
            name: self.name.clone(),
            version: self.version,
        }
    }
}

/// A contact row. The PIN exists here only as its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRecord {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Keyed hash of the access code.
    pub pin_hash: Option<Vec<u8>>,
    /// Contact-specific access hours.
    pub access_hours: Option<AccessHours>,
    /// Version.
    pub version: i64,
}

impl ContactRecord {
    /// API representation (never the hash).
    pub fn view(&self) -> ContactView {
        ContactView {
            id: self.id.clone(),
            name: self.name.clone(),
            has_access_code: self.pin_hash.is_some(),
            access_hours: self.access_hours.clone(),
            version: self.version,
        }
    }
}

/// A tenancy row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenancyRecord {
    /// Id.
    pub id: String,
    /// Contact id.
    pub contact_id: String,
    /// Start date.
    pub start_date: NaiveDate,
    /// Move-out date.
    pub end_date: Option<NaiveDate>,
    /// State as the cloud names it.
    pub state: String,
    /// Version.
    pub version: i64,
}

impl TenancyRecord {
    /// API representation.
    pub fn view(&self) -> TenancyView {
        TenancyView {
            id: self.id.clone(),
            contact_id: self.contact_id.clone(),
            start_date: self.start_date.to_string(),
            end_date: self.end_date.map(|d| d.to_string()),
            state: self.state.clone(),
            version: self.version,
        }
    }

    /// What the state machine needs.
    pub fn facts(&self) -> crate::domain::allocation::TenancyFacts {
        crate::domain::allocation::TenancyFacts {
            id: self.id.clone(),
            start_date: self.start_date,
            end_date: self.end_date,
        }
    }
}

fn conversion<E: std::error::Error + Send + Sync + 'static>(col: usize, e: E) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
}

/// Gets a unit type.
pub fn unit_type(conn: &Connection, id: &str) -> Result<Option<UnitTypeRecord>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id, name, version FROM unit_types WHERE id = ?1")?
        .query_row([id], |r| {
            Ok(UnitTypeRecord {
                id: r.get(0)?,
                name: r.get(1)?,
                version: r.get(2)?,
            })
        })
        .optional()?)
}

/// Every unit type.
pub fn unit_types(conn: &Connection) -> Result<Vec<UnitTypeRecord>, StoreError> {
    let mut stmt = conn.prepare("SELECT id, name, version FROM unit_types ORDER BY id")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(UnitTypeRecord {
                id: r.get(0)?,
                name: r.get(1)?,
                version: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Inserts or updates a unit type (the caller decides the version).
pub fn put_unit_type(
    conn: &Connection,
    t: &UnitTypeRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO unit_types (id, name, version, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(id) DO UPDATE SET name = excluded.name, version = excluded.version, updated_at = excluded.updated_at",
    )?
    .execute(params![t.id, t.name, t.version, timestamp(now)])?;
    Ok(())
}

fn contact_from_row(r: &Row<'_>) -> rusqlite::Result<ContactRecord> {
    let hours: Option<String> = r.get(3)?;
    Ok(ContactRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        pin_hash: r.get(2)?,
        access_hours: hours
            .map(|h| serde_json::from_str(&h))
            .transpose()
            .map_err(|e| conversion(3, e))?,
        version: r.get(4)?,
    })
}

/// Gets a contact.
pub fn contact(conn: &Connection, id: &str) -> Result<Option<ContactRecord>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT id, name, pin_hash, access_hours, version FROM contacts WHERE id = ?1",
        )?
        .query_row([id], contact_from_row)
        .optional()?)
}

/// Every contact.
pub fn contacts(conn: &Connection) -> Result<Vec<ContactRecord>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT id, name, pin_hash, access_hours, version FROM contacts")?;
    let rows = stmt
        .query_map([], contact_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The contact holding a PIN hash, if any.
pub fn pin_owner(conn: &Connection, pin_hash: &[u8]) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM contacts WHERE pin_hash = ?1")?
        .query_row([pin_hash], |r| r.get(0))
        .optional()?)
}

/// Inserts or updates a contact.
pub fn put_contact(
    conn: &Connection,
    c: &ContactRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    let hours = c
        .access_hours
        .as_ref()
        .map(serde_json::to_string)
        .transpose()?;
    conn.prepare_cached(
        "INSERT INTO contacts (id, name, pin_hash, access_hours, version, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(id) DO UPDATE SET name = excluded.name, pin_hash = excluded.pin_hash,
            access_hours = excluded.access_hours, version = excluded.version, updated_at = excluded.updated_at",
    )?
    .execute(params![c.id, c.name, c.pin_hash, hours, c.version, timestamp(now)])?;
    Ok(())
}

fn tenancy_from_row(r: &Row<'_>) -> rusqlite::Result<TenancyRecord> {
    let start: String = r.get(2)?;
    let end: Option<String> = r.get(3)?;
    Ok(TenancyRecord {
        id: r.get(0)?,
        contact_id: r.get(1)?,
        start_date: start.parse().map_err(|e| conversion(2, e))?,
        end_date: end
            .map(|e| e.parse())
            .transpose()
            .map_err(|e| conversion(3, e))?,
        state: r.get(4)?,
        version: r.get(5)?,
    })
}

/// Gets a tenancy.
pub fn tenancy(conn: &Connection, id: &str) -> Result<Option<TenancyRecord>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id, contact_id, start_date, end_date, state, version FROM tenancies WHERE id = ?1")?
        .query_row([id], tenancy_from_row)
        .optional()?)
}

/// Every tenancy.
pub fn tenancies(conn: &Connection) -> Result<Vec<TenancyRecord>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT id, contact_id, start_date, end_date, state, version FROM tenancies")?;
    let rows = stmt
        .query_map([], tenancy_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Inserts or updates a tenancy.
pub fn put_tenancy(
    conn: &Connection,
    t: &TenancyRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO tenancies (id, contact_id, start_date, end_date, state, version, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(id) DO UPDATE SET contact_id = excluded.contact_id, start_date = excluded.start_date,
            end_date = excluded.end_date, state = excluded.state, version = excluded.version,
            updated_at = excluded.updated_at",
    )?
    .execute(params![
        t.id,
        t.contact_id,
        t.start_date.to_string(),
        t.end_date.map(|d| d.to_string()),
        t.state,
        t.version,
        timestamp(now)
    ])?;
    Ok(())
}

fn allocation_from_row(r: &Row<'_>) -> rusqlite::Result<AllocationView> {
    Ok(AllocationView {
        id: r.get(0)?,
        unit_id: r.get(1)?,
        tenancy_id: r.get(2)?,
        reserved_at: r.get(3)?,
        reserved_by: r.get(4)?,
        granted_access_at: r.get(5)?,
        granted_access_by: r.get(6)?,
        ended_at: r.get(7)?,
        ended_by: r.get(8)?,
    })
}

const ALLOCATION_COLUMNS: &str = "id, unit_id, tenancy_id, reserved_at, reserved_by, granted_access_at, granted_access_by, ended_at, ended_by";

/// The active allocation of a unit, if any.
pub fn active_allocation(
    conn: &Connection,
    unit_id: &str,
) -> Result<Option<AllocationView>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {ALLOCATION_COLUMNS} FROM unit_allocations WHERE unit_id = ?1 AND ended_at IS NULL"
        ))?
        .query_row([unit_id], allocation_from_row)
        .optional()?)
}

/// The units of a tenancy's active allocations.
pub fn active_units_of_tenancy(
    conn: &Connection,
    tenancy_id: &str,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT unit_id FROM unit_allocations WHERE tenancy_id = ?1 AND ended_at IS NULL ORDER BY unit_id",
    )?;
    let rows = stmt
        .query_map([tenancy_id], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

/// Every allocation (active and ended).
pub fn allocations(conn: &Connection) -> Result<Vec<AllocationView>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {ALLOCATION_COLUMNS} FROM unit_allocations"
    ))?;
    let rows = stmt
        .query_map([], allocation_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Inserts or replaces an allocation.
pub fn put_allocation(conn: &Connection, a: &AllocationView) -> Result<(), StoreError> {
    conn.prepare_cached(&format!(
        "INSERT INTO unit_allocations ({ALLOCATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(id) DO UPDATE SET unit_id = excluded.unit_id, tenancy_id = excluded.tenancy_id,
            reserved_at = excluded.reserved_at, reserved_by = excluded.reserved_by,
            granted_access_at = excluded.granted_access_at, granted_access_by = excluded.granted_access_by,
            ended_at = excluded.ended_at, ended_by = excluded.ended_by"
    ))?
    .execute(params![
        a.id,
        a.unit_id,
        a.tenancy_id,
        a.reserved_at,
        a.reserved_by,
        a.granted_access_at,
        a.granted_access_by,
        a.ended_at,
        a.ended_by
    ])?;
    Ok(())
}

/// Deletes an allocation (snapshot only).
pub fn delete_allocation(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM unit_allocations WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Deletes a tenancy (snapshot only).
pub fn delete_tenancy(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM tenancies WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Deletes a contact (snapshot only).
pub fn delete_contact(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM contacts WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Deletes a unit type (snapshot only).
pub fn delete_unit_type(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM unit_types WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// An active allocation with its tenancy's dates: what the automations look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatedAllocation {
    /// Unit id.
    pub unit_id: String,
    /// Tenancy id.
    pub tenancy_id: String,
    /// The tenancy's start date.
    pub start_date: NaiveDate,
    /// The tenancy's end date.
    pub end_date: Option<NaiveDate>,
}

fn dated(conn: &Connection, filter: &str) -> Result<Vec<DatedAllocation>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT a.unit_id, a.tenancy_id, t.start_date, t.end_date
         FROM unit_allocations a
         JOIN units u ON u.id = a.unit_id
         JOIN tenancies t ON t.id = a.tenancy_id
         WHERE a.ended_at IS NULL AND {filter}
         ORDER BY a.unit_id"
    ))?;
    let rows = stmt
        .query_map([], |r| {
            let start: String = r.get(2)?;
            let end: Option<String> = r.get(3)?;
            Ok(DatedAllocation {
                unit_id: r.get(0)?,
                tenancy_id: r.get(1)?,
                start_date: start.parse().map_err(|e| conversion(2, e))?,
                end_date: end
                    .map(|e| e.parse())
                    .transpose()
                    .map_err(|e| conversion(3, e))?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Reserved units waiting for their move-in.
pub fn reservations(conn: &Connection) -> Result<Vec<DatedAllocation>, StoreError> {
    dated(conn, "u.status = 'reserved'")
}

/// Active allocations of tenancies that have an end date (any status deallocate takes).
pub fn ending_allocations(conn: &Connection) -> Result<Vec<DatedAllocation>, StoreError> {
    dated(
        conn,
        "t.end_date IS NOT NULL AND u.status IN ('reserved', 'occupied', 'overlocked', 'repossessed')",
    )
}
