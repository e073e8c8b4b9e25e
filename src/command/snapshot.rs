//! `PUT /v1/sync/snapshot`: the whole site replica from the cloud, applied as a diff in
//! one transaction. Unchanged rows are not written and produce no events.

use super::unit::write_updates;
use super::upsert::{ContactBody, TenancyBody, contact_record, tenancy_record};
use super::{Applied, Context};
use crate::api::error::ApiError;
use crate::domain::catalog::{self, Claim};
use crate::domain::hours::AccessHours;
use crate::domain::unit::{UnitInput, UnitRecord, validate_id};
use crate::domain::{EventType, FieldError, Patch};
use crate::model::AllocationView;
use crate::store::{StoreError, people, units};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use utoipa::ToSchema;

/// A unit type in a snapshot.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotUnitType {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
}

/// A contact in a snapshot.
#[derive(Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotContact {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// PIN (hashed on arrival), or null for none.
    #[serde(default)]
    pub access_code: Option<String>,
    /// Contact access hours.
    #[serde(default)]
    pub access_hours: Option<AccessHours>,
}

impl std::fmt::Debug for SnapshotContact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotContact")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A tenancy in a snapshot.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTenancy {
    /// Id.
    pub id: String,
    /// Contact id.
    pub contact_id: String,
    /// Start date.
    pub start_date: chrono::NaiveDate,
    /// Move-out date.
    #[serde(default)]
    pub end_date: Option<chrono::NaiveDate>,
    /// State.
    #[serde(default)]
    pub state: Option<String>,
}

/// An allocation in a snapshot (ended ones may be included).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotAllocation {
    /// Id.
    pub id: String,
    /// Unit id.
    pub unit_id: String,
    /// Tenancy id.
    pub tenancy_id: String,
    /// Reserved at.
    #[serde(default)]
    pub reserved_at: Option<String>,
    /// Reserved by.
    #[serde(default)]
    pub reserved_by: Option<String>,
    /// Access granted at.
    #[serde(default)]
    pub granted_access_at: Option<String>,
    /// Access granted by.
    #[serde(default)]
    pub granted_access_by: Option<String>,
    /// Ended at (null: active).
    #[serde(default)]
    pub ended_at: Option<String>,
    /// Ended by.
    #[serde(default)]
    pub ended_by: Option<String>,
}

/// The whole replica. Every list is required: a missing list would otherwise delete
/// everything of that kind.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// All unit types.
    pub unit_types: Vec<SnapshotUnitType>,
    /// All units, each with `id` and `status`.
    pub units: Vec<UnitInput>,
    /// All contacts.
    pub contacts: Vec<SnapshotContact>,
    /// All tenancies.
    pub tenancies: Vec<SnapshotTenancy>,
    /// All allocations.
    pub allocations: Vec<SnapshotAllocation>,
}

/// Counts of one kind of row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Counts {
    /// New rows.
    pub created: u64,
    /// Changed rows.
    pub updated: u64,
    /// Removed rows.
    pub deleted: u64,
    /// Rows left as they were.
    pub unchanged: u64,
}

/// What a snapshot changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct SnapshotResult {
    /// Unit types.
    pub unit_types: Counts,
    /// Units.
    pub units: Counts,
    /// Contacts.
    pub contacts: Counts,
    /// Tenancies.
    pub tenancies: Counts,
    /// Allocations.
    pub allocations: Counts,
    /// Events appended.
    pub events: u64,
}

/// `PUT /v1/sync/snapshot` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SnapshotReply {
    /// What changed.
    pub snapshot: SnapshotResult,
}

const MAX_DETAILS: usize = 100;

struct Planned {
    unit_types: Vec<people::UnitTypeRecord>,
    units: Vec<UnitRecord>,
    contacts: Vec<people::ContactRecord>,
    tenancies: Vec<people::TenancyRecord>,
    allocations: Vec<AllocationView>,
}

fn unique_ids<'a>(
    errors: &mut Vec<FieldError>,
    kind: &str,
    ids: impl Iterator<Item = &'a str>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        if let Err(m) = validate_id(id) {
            errors.push(FieldError::new(format!("{kind}[{i}].id"), m));
        } else if !seen.insert(id) {
            errors.push(FieldError::new(
                format!("{kind}[{i}].id"),
                format!("{id:?} is given twice"),
            ));
        }
    }
    seen
}

impl Snapshot {
    /// Checks the snapshot on its own (no database) and builds the desired records.
    fn plan(self, ctx: &Context) -> Result<Planned, Vec<FieldError>> {
        let mut errors = Vec::new();
        let type_ids = unique_ids(
            &mut errors,
            "unit_types",
            self.unit_types.iter().map(|t| t.id.as_str()),
        );
        let contact_ids = unique_ids(
            &mut errors,
            "contacts",
            self.contacts.iter().map(|c| c.id.as_str()),
        );
        let tenancy_ids = unique_ids(
            &mut errors,
            "tenancies",
            self.tenancies.iter().map(|t| t.id.as_str()),
        );
        let _ = unique_ids(
            &mut errors,
            "allocations",
            self.allocations.iter().map(|a| a.id.as_str()),
        );
        let mut unit_types = Vec::new();
        for (i, t) in self.unit_types.iter().enumerate() {
            if t.name.trim().is_empty() || t.name.len() > 200 {
                errors.push(FieldError::new(
                    format!("unit_types[{i}].name"),
                    "must be 1 to 200 characters",
                ));
            }
            unit_types.push(people::UnitTypeRecord {
                id: t.id.clone(),
                name: t.name.clone(),
                version: 1,
            });
        }
        let mut contacts = Vec::new();
        let mut pins = HashSet::new();
        for (i, c) in self.contacts.iter().enumerate() {
            let body = ContactBody {
                name: c.name.clone(),
                access_code: c.access_code.clone().map_or(Patch::Null, Patch::Value),
                access_hours: c.access_hours.clone().map_or(Patch::Null, Patch::Value),
            };
            match contact_record(ctx, &c.id, &body, None) {
                Ok(r) => {
                    if let Some(h) = &r.pin_hash
                        && !pins.insert(h.clone())
                    {
                        errors.push(FieldError::new(
                            format!("contacts[{i}].access_code"),
                            "is the same as another contact's",
                        ));
                    }
                    contacts.push(r);
                }
                Err(errs) => errors.extend(
                    errs.into_iter()
                        .map(|e| FieldError::new(format!("contacts[{i}].{}", e.field), e.message)),
                ),
            }
        }
        let mut tenancies = Vec::new();
        for (i, t) in self.tenancies.iter().enumerate() {
            let body = TenancyBody {
                contact_id: t.contact_id.clone(),
                start_date: t.start_date,
                end_date: t.end_date,
                state: t.state.clone(),
            };
            match tenancy_record(&t.id, &body, 1) {
                Ok(r) => {
                    if !contact_ids.contains(r.contact_id.as_str()) {
                        errors.push(FieldError::new(
                            format!("tenancies[{i}].contact_id"),
                            "not in the snapshot",
                        ));
                    }
                    tenancies.push(r);
                }
                Err(errs) => errors
                    .extend(errs.into_iter().map(|e| {
                        FieldError::new(format!("tenancies[{i}].{}", e.field), e.message)
                    })),
            }
        }
        let mut units = Vec::new();
        // Where each of `units` is in the request (units that don't parse are left out).
        let mut unit_at = Vec::new();
        let mut names = HashSet::new();
        let mut unit_ids = HashSet::new();
        for (i, u) in self.units.into_iter().enumerate() {
            if u.id.is_none() {
                errors.push(FieldError::new(format!("units[{i}].id"), "is required"));
            }
            match u.into_new(false) {
                Ok(n) => {
                    let id = n.id.clone().unwrap_or_default();
                    if !unit_ids.insert(id.clone()) {
                        errors.push(FieldError::new(
                            format!("units[{i}].id"),
                            format!("{id:?} is given twice"),
                        ));
                    }
                    let name = n.names.first().cloned().unwrap_or_default();
                    if !names.insert(name.clone()) {
                        errors.push(FieldError::new(
                            format!("units[{i}].name"),
                            format!("{name:?} is given twice"),
                        ));
                    }
                    if !type_ids.contains(n.unit_type_id.as_str()) {
                        errors.push(FieldError::new(
                            format!("units[{i}].unit_type"),
                            "not in the snapshot",
                        ));
                    }
                    errors.extend(
                        ctx.catalog
                            .check(&n.bindings)
                            .into_iter()
                            .map(|e| FieldError::new(format!("units[{i}].{}", e.field), e.message)),
                    );
                    unit_at.push(i);
                    units.push(UnitRecord {
                        id,
                        name,
                        unit_type_id: n.unit_type_id,
                        status: n.status,
                        gatelock: n.gatelock,
                        attrs: n.attrs,
                        bindings: n.bindings,
                        version: 1,
                    });
                }
                Err(errs) => errors.extend(
                    errs.into_iter()
                        .map(|e| FieldError::new(format!("units[{i}].{}", e.field), e.message)),
                ),
            }
        }
        // The snapshot is the whole replica: its units are checked among themselves only.
        let claims: Vec<Claim<'_>> = units
            .iter()
            .map(|u| Claim::change(&u.id, &u.name, None, &u.bindings))
            .collect();
        for c in catalog::clashes(&claims) {
            errors.push(FieldError::new(
                format!("units[{}].{}", unit_at[c.claim], c.what.field()),
                c.message,
            ));
        }
        let mut active: HashMap<&str, usize> = HashMap::new();
        let mut allocations = Vec::new();
        for (i, a) in self.allocations.iter().enumerate() {
            if !unit_ids.contains(&a.unit_id) {
                errors.push(FieldError::new(
                    format!("allocations[{i}].unit_id"),
                    "not in the snapshot",
                ));
            }
            if !tenancy_ids.contains(a.tenancy_id.as_str()) {
                errors.push(FieldError::new(
                    format!("allocations[{i}].tenancy_id"),
                    "not in the snapshot",
                ));
            }
            if a.ended_at.is_none() && active.insert(a.unit_id.as_str(), i).is_some() {
                errors.push(FieldError::new(
                    format!("allocations[{i}].unit_id"),
                    "the unit already has an active allocation",
                ));
            }
            allocations.push(AllocationView {
                id: a.id.clone(),
                unit_id: a.unit_id.clone(),
                tenancy_id: a.tenancy_id.clone(),
                reserved_at: a.reserved_at.clone(),
                reserved_by: a.reserved_by.clone(),
                granted_access_at: a.granted_access_at.clone(),
                granted_access_by: a.granted_access_by.clone(),
                ended_at: a.ended_at.clone(),
                ended_by: a.ended_by.clone(),
            });
        }
        for (u, &i) in units.iter().zip(&unit_at) {
            match (
                u.status.has_allocation(),
                active.contains_key(u.id.as_str()),
            ) {
                (true, false) => errors.push(FieldError::new(
                    format!("units[{i}].status"),
                    format!("{} needs an active allocation", u.status),
                )),
                (false, true) => errors.push(FieldError::new(
                    format!("units[{i}].status"),
                    format!("{} units have no active allocation", u.status),
                )),
                _ => {}
            }
        }
        if errors.is_empty() {
            Ok(Planned {
                unit_types,
                units,
                contacts,
                tenancies,
                allocations,
            })
        } else {
            errors.truncate(MAX_DETAILS);
            Err(errors)
        }
    }

    /// Applies the snapshot as a diff.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let plan = self.plan(ctx).map_err(ApiError::validation)?;
        let result = apply_plan(conn, ctx, plan)?;
        Applied::ok(&SnapshotReply { snapshot: result })
    }
}

fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute(params)?;
    Ok(())
}

fn apply_plan(conn: &Connection, ctx: &Context, plan: Planned) -> Result<SnapshotResult, ApiError> {
    let mut r = SnapshotResult::default();
    let now = ctx.now;

    // Allocations first out: they reference units and tenancies, and a unit may have
    // only one active allocation at a time.
    let old_allocs: HashMap<String, AllocationView> = people::allocations(conn)?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let want_allocs: HashMap<&str, &AllocationView> = plan
        .allocations
        .iter()
        .map(|a| (a.id.as_str(), a))
        .collect();
    for (id, old) in &old_allocs {
        match want_allocs.get(id.as_str()) {
            None => {
                people::delete_allocation(conn, id)?;
                r.allocations.deleted += 1;
            }
            Some(new) if *new != old => people::delete_allocation(conn, id)?,
            Some(_) => r.allocations.unchanged += 1,
        }
    }

    // Unit types.
    let old_types: HashMap<String, people::UnitTypeRecord> = people::unit_types(conn)?
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect();
    for t in &plan.unit_types {
        match old_types.get(&t.id) {
            Some(o) if o.name == t.name => r.unit_types.unchanged += 1,
            Some(o) => {
                people::put_unit_type(
                    conn,
                    &people::UnitTypeRecord {
                        version: o.version + 1,
                        ..t.clone()
                    },
                    now,
                )?;
                r.unit_types.updated += 1;
            }
            None => {
                people::put_unit_type(conn, t, now)?;
                r.unit_types.created += 1;
            }
        }
    }

    // Contacts: free the PINs that move or go away before any is taken.
    let old_contacts: HashMap<String, people::ContactRecord> = people::contacts(conn)?
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    let want_contacts: HashMap<&str, &people::ContactRecord> =
        plan.contacts.iter().map(|c| (c.id.as_str(), c)).collect();
    for (id, old) in &old_contacts {
        let freed = want_contacts
            .get(id.as_str())
            .is_none_or(|new| new.pin_hash != old.pin_hash);
        if freed && old.pin_hash.is_some() {
            exec(
                conn,
                "UPDATE contacts SET pin_hash = NULL WHERE id = ?1",
                [id],
            )?;
        }
    }
    for c in &plan.contacts {
        match old_contacts.get(&c.id) {
            Some(o)
                if (&o.name, &o.pin_hash, &o.access_hours)
                    == (&c.name, &c.pin_hash, &c.access_hours) =>
            {
                r.contacts.unchanged += 1
            }
            Some(o) => {
                people::put_contact(
                    conn,
                    &people::ContactRecord {
                        version: o.version + 1,
                        ..c.clone()
                    },
                    now,
                )?;
                r.contacts.updated += 1;
            }
            None => {
                people::put_contact(conn, c, now)?;
                r.contacts.created += 1;
            }
        }
    }

    // Tenancies.
    let old_tenancies: HashMap<String, people::TenancyRecord> = people::tenancies(conn)?
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect();
    for t in &plan.tenancies {
        match old_tenancies.get(&t.id) {
            Some(o)
                if (&o.contact_id, o.start_date, o.end_date, &o.state)
                    == (&t.contact_id, t.start_date, t.end_date, &t.state) =>
            {
                r.tenancies.unchanged += 1
            }
            Some(o) => {
                people::put_tenancy(
                    conn,
                    &people::TenancyRecord {
                        version: o.version + 1,
                        ..t.clone()
                    },
                    now,
                )?;
                r.tenancies.updated += 1;
            }
            None => {
                people::put_tenancy(conn, t, now)?;
                r.tenancies.created += 1;
            }
        }
    }

    // Units: park names of units that go away, update changed ones, insert new ones.
    let old_units: HashMap<String, UnitRecord> = units::all(conn)?
        .into_iter()
        .map(|u| (u.record.id.clone(), u.record))
        .collect();
    let want_units: HashSet<&str> = plan.units.iter().map(|u| u.id.as_str()).collect();
    let leaving: Vec<&UnitRecord> = old_units
        .values()
        .filter(|u| !want_units.contains(u.id.as_str()))
        .collect();
    for u in &leaving {
        exec(
            conn,
            "UPDATE units SET name = ?2 WHERE id = ?1",
            [&u.id, &format!("\u{1}{}", u.id)],
        )?;
    }
    let mut updates = Vec::new();
    let mut inserts = Vec::new();
    for u in plan.units {
        match old_units.get(&u.id) {
            Some(o) => {
                let new = UnitRecord {
                    version: o.version,
                    ..u
                };
                if crate::domain::unit::changed_fields(o, &new).is_empty() {
                    r.units.unchanged += 1;
                } else {
                    updates.push((o.clone(), new));
                }
            }
            None => inserts.push(u),
        }
    }
    // Units whose hardware may need another state: refreshed once everything is written.
    let mut touched: HashSet<String> = HashSet::new();
    let updated = write_updates(conn, ctx, &updates)?;
    r.units.updated = updated.len() as u64;
    touched.extend(updated);
    for u in &inserts {
        units::insert(conn, u, now)?;
        touched.insert(u.id.clone());
        ctx.emit(
            conn,
            EventType::UnitCreated,
            json!({ "unit_id": u.id, "name": u.name, "status": u.status }),
        )?;
    }
    r.units.created = inserts.len() as u64;

    // Allocations in: new and changed.
    for a in old_allocs.values() {
        if want_allocs.get(a.id.as_str()).is_none_or(|new| *new != a) {
            touched.insert(a.unit_id.clone());
        }
    }
    let moved_tenancies: HashSet<&str> = plan
        .tenancies
        .iter()
        .filter(|t| {
            old_tenancies
                .get(&t.id)
                .is_some_and(|o| o.contact_id != t.contact_id)
        })
        .map(|t| t.id.as_str())
        .collect();
    for a in &plan.allocations {
        if a.ended_at.is_none() && moved_tenancies.contains(a.tenancy_id.as_str()) {
            touched.insert(a.unit_id.clone());
        }
        match old_allocs.get(&a.id) {
            Some(o) if o == a => {}
            Some(_) => {
                touched.insert(a.unit_id.clone());
                people::put_allocation(conn, a)?;
                r.allocations.updated += 1;
            }
            None => {
                people::put_allocation(conn, a)?;
                r.allocations.created += 1;
                touched.insert(a.unit_id.clone());
            }
        }
    }

    // Deletions, children before parents.
    for u in &leaving {
        ctx.release_hardware(conn, u)?;
        touched.remove(&u.id);
        units::delete(conn, &u.id)?;
        ctx.emit(
            conn,
            EventType::UnitDeleted,
            json!({ "unit_id": u.id, "name": u.name }),
        )?;
    }
    r.units.deleted = leaving.len() as u64;
    let want: HashSet<&str> = plan.tenancies.iter().map(|t| t.id.as_str()).collect();
    for id in old_tenancies
        .keys()
        .filter(|id| !want.contains(id.as_str()))
    {
        people::delete_tenancy(conn, id)?;
        r.tenancies.deleted += 1;
    }
    for id in old_contacts
        .keys()
        .filter(|id| !want_contacts.contains_key(id.as_str()))
    {
        people::delete_contact(conn, id)?;
        r.contacts.deleted += 1;
    }
    let want: HashSet<&str> = plan.unit_types.iter().map(|t| t.id.as_str()).collect();
    for id in old_types.keys().filter(|id| !want.contains(id.as_str())) {
        people::delete_unit_type(conn, id)?;
        r.unit_types.deleted += 1;
    }
    let mut touched: Vec<String> = touched.into_iter().collect();
    touched.sort();
    for id in &touched {
        ctx.refresh_hardware(conn, id)?;
    }
    r.events = r.units.created + r.units.updated + r.units.deleted;
    Ok(r)
}
