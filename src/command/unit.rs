//! Unit create and update (storEDGE shapes): single, comma-separated names, bulk.

use super::{Applied, Context};
use crate::api::error::{ApiError, BulkItemError};
use crate::domain::catalog::{self, Claim, Clash, Exclusive};
use crate::domain::unit::{NewUnit, UnitInput, UnitPatch, UnitRecord, changed_fields};
use crate::domain::{EventType, FieldError};
use crate::model::{UnitEnvelope, UnitView, UnitsResult};
use crate::store::{StoreError, people, units};
use rusqlite::Connection;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use utoipa::ToSchema;

/// Most units one request may create or update.
pub const MAX_BULK: usize = 1000;

/// `POST /v1/units` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUnits {
    /// The unit; `name` may list several comma-separated names.
    pub unit: UnitInput,
}

/// `PATCH|PUT /v1/units/{id}` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitPatchBody {
    /// The fields to change.
    pub unit: UnitPatch,
}

/// Update of one unit.
#[derive(Debug, Clone)]
pub struct UpdateUnit {
    /// Unit id (path).
    pub unit_id: String,
    /// Changes.
    pub patch: UnitPatch,
}

/// `POST /v1/units/bulk_create`, parsed item by item.
#[derive(Debug, Clone)]
pub struct BulkCreate {
    /// The units.
    pub units: Vec<UnitInput>,
}

/// `PUT /v1/units/bulk_update`, parsed item by item.
#[derive(Debug, Clone)]
pub struct BulkUpdate {
    /// The changes, each with its `id`.
    pub units: Vec<UnitPatch>,
}

/// Bulk request body as it arrives (items are checked one by one).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// The units, 1 to 1000.
    #[schema(value_type = Vec<Object>, min_items = 1, max_items = 1000)]
    pub units: Vec<Value>,
}

/// Keys whose values are JSON arrays somewhere in the API. serde reads an array as a
/// struct's fields in order, so an array anywhere else would be taken positionally.
const ARRAY_KEYS: [&str; 8] = [
    "zones",
    "unit_amenities",
    "tax_rates",
    "units",
    "unit_types",
    "contacts",
    "tenancies",
    "allocations",
];

/// The path of the first array where the API never takes one, if any.
fn positional_array(v: &Value, path: &str) -> Option<String> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(map) => map.iter().find_map(|(k, child)| match child {
            Value::Array(_) if !ARRAY_KEYS.contains(&k.as_str()) => Some(join(k)),
            _ => positional_array(child, &join(k)),
        }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| match item {
            Value::Array(_) => Some(format!("{path}[{i}]")),
            _ => positional_array(item, &format!("{path}[{i}]")),
        }),
        _ => None,
    }
}

/// Deserializes a JSON object, naming the field at fault.
pub fn parse_at<T: DeserializeOwned>(v: Value, prefix: &str) -> Result<T, FieldError> {
    let field = |p: &str| match (prefix.is_empty(), p.is_empty()) {
        (true, true) => "body".to_owned(),
        (true, false) => p.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{p}"),
    };
    if !v.is_object() {
        return Err(FieldError::new(field(""), "must be a JSON object"));
    }
    if let Some(p) = positional_array(&v, "") {
        return Err(FieldError::new(field(&p), "must not be an array here"));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut path = e.path().to_string();
        let message = e.into_inner().to_string();
        // A missing field is reported at the parent: name the field itself. (An unknown
        // field's path already ends with its key.)
        for lead in ["missing field `"] {
            if let Some(rest) = message.strip_prefix(lead)
                && let Some((name, _)) = rest.split_once('`')
            {
                path = if path == "." {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
            }
        }
        let field = match (prefix.is_empty(), path.as_str()) {
            (_, ".") => prefix.to_owned(),
            (true, p) => p.to_owned(),
            (false, p) => format!("{prefix}.{p}"),
        };
        // serde's messages name the type, not the value: safe to show (no PIN echo).
        FieldError::new(
            if field.is_empty() {
                "body".to_owned()
            } else {
                field
            },
            message,
        )
    })
}

type ErrorHash = BTreeMap<String, Vec<BulkItemError>>;

fn hash_key(field: &str) -> String {
    field.split(['.', '[']).next().unwrap_or(field).to_owned()
}

fn push(
    hash: &mut ErrorHash,
    field: &str,
    id: Option<&str>,
    name: Option<&str>,
    message: impl Into<String>,
) {
    hash.entry(hash_key(field))
        .or_default()
        .push(BulkItemError {
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            message: message.into(),
        });
}

fn item_name(v: &Value) -> Option<String> {
    v.get("name").and_then(Value::as_str).map(str::to_owned)
}

fn item_id(v: &Value) -> Option<String> {
    v.get("id").and_then(Value::as_str).map(str::to_owned)
}

/// Parses every bulk item as `T`; every problem goes into one `error_hash` (400).
/// `required_id` demands an `id` on each item (bulk_update).
fn parse_items<T: DeserializeOwned>(body: BulkBody, required_id: bool) -> Result<Vec<T>, ApiError> {
    check_bulk_len(body.units.len())?;
    let mut hash = ErrorHash::new();
    let mut out = Vec::with_capacity(body.units.len());
    for v in body.units {
        let (id, name) = (item_id(&v), item_name(&v));
        if required_id && id.is_none() {
            push(&mut hash, "id", None, name.as_deref(), "is required");
            continue;
        }
        match parse_at::<T>(v, "") {
            Ok(item) => out.push(item),
            Err(e) => push(
                &mut hash,
                &e.field,
                id.as_deref(),
                name.as_deref(),
                e.message,
            ),
        }
    }
    if hash.is_empty() {
        Ok(out)
    } else {
        Err(ApiError::bulk(400, hash))
    }
}

impl BulkCreate {
    /// Parses every item.
    pub fn parse(body: BulkBody) -> Result<Self, ApiError> {
        Ok(BulkCreate {
            units: parse_items(body, false)?,
        })
    }
}

impl BulkUpdate {
    /// Parses every item; each needs an `id`.
    pub fn parse(body: BulkBody) -> Result<Self, ApiError> {
        Ok(BulkUpdate {
            units: parse_items(body, true)?,
        })
    }
}

fn check_bulk_len(n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_BULK {
        return Err(ApiError::validation(vec![FieldError::new(
            "units",
            format!("must hold 1 to {MAX_BULK} units"),
        )]));
    }
    Ok(())
}

/// One unit's problem found against the replica.
struct Problem {
    field: &'static str,
    id: Option<String>,
    name: String,
    message: String,
}

impl Problem {
    fn new(
        field: &'static str,
        id: Option<&String>,
        name: &str,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            field,
            id: id.cloned(),
            name: name.to_owned(),
            message: message.into(),
        }
    }
}

/// The locks and door sensors that units of a request, each `(old, new)` (old None: a new
/// unit), would share with another unit of the request or of the replica. Indexes of the
/// clashes are those of `changes`.
fn binding_clashes(
    conn: &Connection,
    changes: &[(Option<&UnitRecord>, &UnitRecord)],
) -> Result<Vec<Clash>, StoreError> {
    let mut claims: Vec<Claim<'_>> = changes
        .iter()
        .map(|(old, new)| {
            Claim::change(&new.id, &new.name, old.map(|o| &o.bindings), &new.bindings)
        })
        .collect();
    if !claims.iter().any(Claim::is_checked) {
        return Ok(Vec::new());
    }
    let in_request: HashSet<&str> = changes
        .iter()
        .flat_map(|(old, new)| [Some(new.id.as_str()), old.map(|o| o.id.as_str())])
        .flatten()
        .collect();
    let replica = units::bound(conn)?;
    claims.extend(
        replica
            .iter()
            .filter(|u| !in_request.contains(u.id.as_str()))
            .map(|u| Claim::held(&u.id, &u.name, &u.bindings)),
    );
    Ok(catalog::clashes(&claims))
}

/// The 409 for a lock or door sensor another unit holds (as `access_code_taken` is for a
/// PIN; the other unit is named, it is no secret).
fn binding_in_use(clashes: &[Clash]) -> ApiError {
    let (code, what) = match clashes.first().map(|c| c.what) {
        Some(Exclusive::DoorSensor) => ("door_sensor_in_use", "a door sensor"),
        _ => ("lock_in_use", "a lock"),
    };
    let message = clashes.first().map_or_else(String::new, |c| {
        format!(
            "{}: {what} belongs to one unit; unbind it there first",
            c.message
        )
    });
    ApiError::new(409, code, message).with_details(
        clashes
            .iter()
            .map(|c| FieldError::new(format!("unit.{}", c.what.field()), c.message.clone()))
            .collect(),
    )
}

/// Checks new units against the replica (unit type, names, ids) and builds their records.
fn plan_creates(
    conn: &Connection,
    inputs: Vec<NewUnit>,
) -> Result<(Vec<UnitRecord>, Vec<Problem>), StoreError> {
    let mut problems = Vec::new();
    let mut records = Vec::new();
    let mut names_seen = HashSet::new();
    let mut ids_seen = HashSet::new();
    let mut types_ok: HashMap<String, bool> = HashMap::new();
    for new in inputs {
        let type_ok = match types_ok.get(&new.unit_type_id) {
            Some(ok) => *ok,
            None => {
                let ok = people::unit_type(conn, &new.unit_type_id)?.is_some();
                types_ok.insert(new.unit_type_id.clone(), ok);
                ok
            }
        };
        let first = new.names.first().cloned().unwrap_or_default();
        if !type_ok {
            let m = format!("unknown unit type {:?}", new.unit_type_id);
            problems.push(Problem::new("unit_type", new.id.as_ref(), &first, m));
        }
        if new.status != crate::domain::UnitStatus::Available {
            let m = "new units start available; use the allocation operations";
            problems.push(Problem::new("status", new.id.as_ref(), &first, m));
        }
        if let Some(id) = &new.id
            && (units::get(conn, id)?.is_some() || !ids_seen.insert(id.clone()))
        {
            problems.push(Problem::new(
                "id",
                Some(id),
                &first,
                "has already been taken",
            ));
        }
        for name in &new.names {
            if units::id_by_name(conn, name)?.is_some() || !names_seen.insert(name.clone()) {
                problems.push(Problem::new(
                    "name",
                    new.id.as_ref(),
                    name,
                    "has already been taken",
                ));
            }
            records.push(UnitRecord {
                id: new
                    .id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                name: name.clone(),
                unit_type_id: new.unit_type_id.clone(),
                status: new.status,
                gatelock: new.gatelock,
                attrs: new.attrs.clone(),
                bindings: new.bindings.clone(),
                version: 1,
            });
        }
    }
    Ok((records, problems))
}

fn insert_all(
    conn: &Connection,
    ctx: &Context,
    records: &[UnitRecord],
) -> Result<Vec<UnitView>, ApiError> {
    let mut views = Vec::with_capacity(records.len());
    for r in records {
        units::insert(conn, r, ctx.now)?;
        ctx.refresh_hardware(conn, &r.id)?;
        ctx.emit(
            conn,
            EventType::UnitCreated,
            json!({ "unit_id": r.id, "name": r.name, "status": r.status }),
        )?;
    }
    for r in records {
        let row = units::get(conn, &r.id)?.ok_or_else(ApiError::internal)?;
        views.push(row.view());
    }
    Ok(views)
}

impl CreateUnits {
    /// Creates one unit per comma-separated name.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let new = self.unit.into_new(true).map_err(|errs| {
            ApiError::validation(
                errs.into_iter()
                    .map(|e| FieldError::new(format!("unit.{}", e.field), e.message))
                    .collect(),
            )
        })?;
        let devices = ctx.catalog.check(&new.bindings);
        let (records, problems) = plan_creates(conn, vec![new])?;
        let mut errors: Vec<FieldError> = problems
            .into_iter()
            .map(|p| {
                FieldError::new(
                    format!("unit.{}", p.field),
                    format!("{}: {}", p.name, p.message),
                )
            })
            .collect();
        errors.extend(
            devices
                .into_iter()
                .map(|e| FieldError::new(format!("unit.{}", e.field), e.message)),
        );
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
        let changes: Vec<_> = records.iter().map(|r| (None, r)).collect();
        let clashes = binding_clashes(conn, &changes)?;
        if !clashes.is_empty() {
            return Err(binding_in_use(&clashes));
        }
        let views = insert_all(conn, ctx, &records)?;
        Applied::created(&UnitsResult { units: views })
    }
}

impl BulkCreate {
    /// Creates every unit or none.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let mut hash = ErrorHash::new();
        let mut news = Vec::new();
        for input in self.units {
            let (id, name) = (input.id.clone(), input.name.clone());
            match input.into_new(false) {
                Ok(n) => news.push(n),
                Err(errs) => {
                    for e in errs {
                        push(
                            &mut hash,
                            &e.field,
                            id.as_deref(),
                            name.as_deref(),
                            e.message,
                        );
                    }
                }
            }
        }
        // Each item has one name, so news and records pair up one to one.
        let given: Vec<Option<String>> = news.iter().map(|n| n.id.clone()).collect();
        for n in &news {
            for e in ctx.catalog.check(&n.bindings) {
                let name = n.names.first().map(String::as_str);
                push(&mut hash, &e.field, n.id.as_deref(), name, e.message);
            }
        }
        let (records, problems) = plan_creates(conn, news)?;
        for p in problems {
            push(
                &mut hash,
                p.field,
                p.id.as_deref(),
                Some(&p.name),
                p.message,
            );
        }
        let changes: Vec<_> = records.iter().map(|r| (None, r)).collect();
        for c in binding_clashes(conn, &changes)? {
            let id = given.get(c.claim).and_then(Option::as_deref);
            let name = records.get(c.claim).map(|r| r.name.as_str());
            push(&mut hash, c.what.field(), id, name, c.message);
        }
        if !hash.is_empty() {
            return Err(ApiError::bulk(400, hash));
        }
        let views = insert_all(conn, ctx, &records)?;
        Applied::created(&UnitsResult { units: views })
    }
}

/// Writes changed units (a rename chain or swap within the set is fine) and emits
/// `unit.updated` for each. Unchanged units are not touched. Returns the ids written.
pub fn write_updates(
    conn: &Connection,
    ctx: &Context,
    changes: &[(UnitRecord, UnitRecord)],
) -> Result<Vec<String>, ApiError> {
    let changed: Vec<_> = changes
        .iter()
        .map(|(old, new)| (old, new, changed_fields(old, new)))
        .filter(|(_, _, fields)| !fields.is_empty())
        .collect();
    // Park renamed units on a name no unit can have, so swaps don't trip the unique index.
    for (old, new, _) in &changed {
        if old.name != new.name {
            conn.prepare_cached("UPDATE units SET name = ?2 WHERE id = ?1")
                .and_then(|mut s| s.execute(rusqlite::params![old.id, format!("\u{1}{}", old.id)]))
                .map_err(StoreError::from)?;
        }
    }
    let mut ids = Vec::with_capacity(changed.len());
    for (old, new, fields) in changed {
        let mut next = new.clone();
        next.version = old.version + 1;
        units::update(conn, &next, ctx.now)?;
        if old.bindings.lock != next.bindings.lock {
            ctx.release_hardware(conn, old)?;
        }
        ctx.refresh_hardware(conn, &next.id)?;
        let mut data = json!({ "unit_id": next.id, "changed": fields, "version": next.version });
        if old.status != next.status {
            data["from"] = json!(old.status);
            data["to"] = json!(next.status);
        }
        ctx.emit(conn, EventType::UnitUpdated, data)?;
        ids.push(next.id.clone());
    }
    Ok(ids)
}

/// Checks a batch of patched units against the replica: unit types exist and names stay unique.
fn check_patched(
    conn: &Connection,
    patched: &[(UnitRecord, UnitRecord)],
) -> Result<Vec<Problem>, StoreError> {
    let mut problems = Vec::new();
    let moving: HashSet<&str> = patched.iter().map(|(o, _)| o.id.as_str()).collect();
    let mut names = HashSet::new();
    for (old, new) in patched {
        if old.unit_type_id != new.unit_type_id
            && people::unit_type(conn, &new.unit_type_id)?.is_none()
        {
            let m = format!("unknown unit type {:?}", new.unit_type_id);
            problems.push(Problem::new("unit_type", Some(&new.id), &new.name, m));
        }
        let holder = units::id_by_name(conn, &new.name)?;
        let taken_elsewhere = holder.is_some_and(|h| h != new.id && !moving.contains(h.as_str()));
        if taken_elsewhere || !names.insert(new.name.clone()) {
            problems.push(Problem::new(
                "name",
                Some(&new.id),
                &new.name,
                "has already been taken",
            ));
        }
    }
    Ok(problems)
}

impl UpdateUnit {
    /// PATCH/PUT: omitted fields unchanged.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let row = units::get(conn, &self.unit_id)?
            .ok_or_else(|| ApiError::not_found("unit", &self.unit_id))?;
        ctx.check_version(&self.unit_id, row.record.version)?;
        if self.patch.id.as_ref().is_some_and(|id| *id != self.unit_id) {
            return Err(ApiError::validation(vec![FieldError::new(
                "unit.id",
                "does not match the unit in the path",
            )]));
        }
        let new = self.patch.apply(&row.record).map_err(|errs| {
            ApiError::validation(
                errs.into_iter()
                    .map(|e| FieldError::new(format!("unit.{}", e.field), e.message))
                    .collect(),
            )
        })?;
        let devices = ctx
            .catalog
            .check_change(Some(&row.record.bindings), &new.bindings);
        let pair = vec![(row.record.clone(), new)];
        let problems = check_patched(conn, &pair)?;
        let mut errors: Vec<FieldError> = problems
            .into_iter()
            .map(|p| FieldError::new(format!("unit.{}", p.field), p.message))
            .collect();
        errors.extend(
            devices
                .into_iter()
                .map(|e| FieldError::new(format!("unit.{}", e.field), e.message)),
        );
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
        let clashes = binding_clashes(conn, &[(Some(&pair[0].0), &pair[0].1)])?;
        if !clashes.is_empty() {
            return Err(binding_in_use(&clashes));
        }
        write_updates(conn, ctx, &pair)?;
        let row = units::get(conn, &self.unit_id)?.ok_or_else(ApiError::internal)?;
        Applied::ok(&UnitEnvelope { unit: row.view() })
    }
}

impl BulkUpdate {
    /// Updates every unit or none.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let mut hash = ErrorHash::new();
        let mut missing = ErrorHash::new();
        let mut pairs = Vec::new();
        let mut seen = HashSet::new();
        for patch in self.units {
            let id = patch.id.clone().unwrap_or_default();
            if !seen.insert(id.clone()) {
                push(&mut hash, "id", Some(&id), None, "is given twice");
                continue;
            }
            let Some(row) = units::get(conn, &id)? else {
                push(&mut missing, "id", Some(&id), None, "not found");
                continue;
            };
            match patch.apply(&row.record) {
                Ok(new) => pairs.push((row.record, new)),
                Err(errs) => {
                    for e in errs {
                        push(
                            &mut hash,
                            &e.field,
                            Some(&id),
                            Some(&row.record.name),
                            e.message,
                        );
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Err(ApiError::bulk(404, missing));
        }
        for p in check_patched(conn, &pairs)? {
            push(
                &mut hash,
                p.field,
                p.id.as_deref(),
                Some(&p.name),
                p.message,
            );
        }
        for (old, new) in &pairs {
            for e in ctx.catalog.check_change(Some(&old.bindings), &new.bindings) {
                push(
                    &mut hash,
                    &e.field,
                    Some(&new.id),
                    Some(&new.name),
                    e.message,
                );
            }
        }
        let changes: Vec<_> = pairs.iter().map(|(old, new)| (Some(old), new)).collect();
        for c in binding_clashes(conn, &changes)? {
            let (_, new) = &pairs[c.claim];
            push(
                &mut hash,
                c.what.field(),
                Some(&new.id),
                Some(&new.name),
                c.message,
            );
        }
        if !hash.is_empty() {
            return Err(ApiError::bulk(400, hash));
        }
        write_updates(conn, ctx, &pairs)?;
        let mut views = Vec::with_capacity(pairs.len());
        for (old, _) in &pairs {
            let row = units::get(conn, &old.id)?.ok_or_else(ApiError::internal)?;
            views.push(row.view());
        }
        Applied::ok(&UnitsResult { units: views })
    }
}
