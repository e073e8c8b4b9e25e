//! Operations: one type per operation, parsed from HTTP or MQTT into [`Command`] and
//! applied by the same code inside the store's writer, with idempotency and `If-Match`.

pub mod allocation;
pub mod automation;
pub mod snapshot;
pub mod unit;
pub mod upsert;

use crate::api::error::ApiError;
use crate::domain::catalog::DeviceCatalog;
use crate::domain::desired;
use crate::domain::pin::PinKey;
use crate::domain::unit::UnitRecord;
use crate::domain::{EventType, FieldError};
use crate::store::{self, Store, StoreError, events, idempotency, outbox};
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use rusqlite::Connection;
use std::sync::Arc;
use tokio::sync::Notify;

/// Every mutating operation of the API.
#[derive(Debug, Clone)]
pub enum Command {
    /// `reserve`.
    Reserve(allocation::UnitAllocation),
    /// `grant_access`.
    GrantAccess(allocation::UnitAllocation),
    /// `deallocate`.
    Deallocate(allocation::UnitOnly),
    /// `set_status` (operator states).
    SetStatus(allocation::SetStatus),
    /// `overlock` every occupied unit of a contact.
    Overlock(allocation::ContactOnly),
    /// `remove_overlock` from every overlocked unit of a contact.
    RemoveOverlock(allocation::ContactOnly),
    /// `POST /v1/units`.
    CreateUnits(unit::CreateUnits),
    /// `POST /v1/units/bulk_create`.
    BulkCreateUnits(unit::BulkCreate),
    /// `PATCH|PUT /v1/units/{id}`.
    UpdateUnit(unit::UpdateUnit),
    /// `PUT /v1/units/bulk_update`.
    BulkUpdateUnits(unit::BulkUpdate),
    /// `PUT /v1/unit_types/{id}`.
    UpsertUnitType(upsert::UpsertUnitType),
    /// `PUT /v1/contacts/{id}`.
    UpsertContact(upsert::UpsertContact),
    /// `PUT /v1/tenancies/{id}`.
    UpsertTenancy(upsert::UpsertTenancy),
    /// `PUT /v1/sync/snapshot`.
    Snapshot(Box<snapshot::Snapshot>),
    /// Auto move-in of a reserved unit (the scheduler).
    AutoMoveIn(automation::Due),
    /// Auto deallocate of a unit whose tenancy has ended (the scheduler).
    AutoDeallocate(automation::Due),
    /// A `payment.failed` event: auto overlock when the site has it on.
    PaymentFailed(automation::PaymentFailed),
    /// A verified inbound webhook event (its id taken in the same transaction).
    Webhook(crate::cloud::webhooks::Inbound),
}

impl Command {
    /// The operation name (as in MQTT topics and logs).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Reserve(_) => "reserve",
            Command::GrantAccess(_) => "grant_access",
            Command::Deallocate(_) => "deallocate",
            Command::SetStatus(_) => "set_status",
            Command::Overlock(_) => "overlock",
            Command::RemoveOverlock(_) => "remove_overlock",
            Command::CreateUnits(_) => "create_units",
            Command::BulkCreateUnits(_) => "bulk_create_units",
            Command::UpdateUnit(_) => "update_unit",
            Command::BulkUpdateUnits(_) => "bulk_update_units",
            Command::UpsertUnitType(_) => "upsert_unit_type",
            Command::UpsertContact(_) => "upsert_contact",
            Command::UpsertTenancy(_) => "upsert_tenancy",
            Command::Snapshot(_) => "snapshot",
            Command::AutoMoveIn(_) => "auto_move_in",
            Command::AutoDeallocate(_) => "auto_deallocate",
            Command::PaymentFailed(_) => "payment_failed",
            Command::Webhook(_) => "webhook",
        }
    }

    fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        match self {
            Command::Reserve(c) => c.reserve(conn, ctx),
            Command::GrantAccess(c) => c.grant_access(conn, ctx),
            Command::Deallocate(c) => c.deallocate(conn, ctx),
            Command::SetStatus(c) => c.apply(conn, ctx),
            Command::Overlock(c) => c.overlock(conn, ctx),
            Command::RemoveOverlock(c) => c.remove_overlock(conn, ctx),
            Command::CreateUnits(c) => c.apply(conn, ctx),
            Command::BulkCreateUnits(c) => c.apply(conn, ctx),
            Command::UpdateUnit(c) => c.apply(conn, ctx),
            Command::BulkUpdateUnits(c) => c.apply(conn, ctx),
            Command::UpsertUnitType(c) => c.apply(conn, ctx),
            Command::UpsertContact(c) => c.apply(conn, ctx),
            Command::UpsertTenancy(c) => c.apply(conn, ctx),
            Command::Snapshot(c) => c.apply(conn, ctx),
            Command::AutoMoveIn(c) => c.move_in(conn, ctx),
            Command::AutoDeallocate(c) => c.deallocate(conn, ctx),
            Command::PaymentFailed(c) => c.apply(conn, ctx),
            Command::Webhook(c) => c.apply(conn, ctx),
        }
    }
}

/// A successful result: status and the JSON body, serialized.
#[derive(Debug)]
pub struct Applied {
    /// HTTP status (200 or 201).
    pub status: u16,
    /// The result object as JSON bytes.
    pub body: Vec<u8>,
}

impl Applied {
    /// 200 with a body.
    pub fn ok(body: &impl serde::Serialize) -> Result<Self, ApiError> {
        Self::with_status(200, body)
    }

    /// 201 with a body.
    pub fn created(body: &impl serde::Serialize) -> Result<Self, ApiError> {
        Self::with_status(201, body)
    }

    /// 200 or 201 with a body.
    pub fn with_status(status: u16, body: &impl serde::Serialize) -> Result<Self, ApiError> {
        let body = serde_json::to_vec(body).map_err(|_| ApiError::internal())?;
        Ok(Applied { status, body })
    }
}

/// What a command sees while it runs.
#[derive(Debug, Clone)]
pub struct Context {
    /// Site id.
    pub site_id: String,
    /// Site timezone.
    pub tz: Tz,
    /// Key for PIN hashes.
    pub pin_key: PinKey,
    /// The time of the request.
    pub now: DateTime<Utc>,
    /// Expected unit version from `If-Match`, if any.
    pub if_match: Option<i64>,
    /// The device id of the lock API (where smart-lock targets go).
    pub lock_api: String,
    /// The declared devices that unit bindings may name.
    pub catalog: Arc<DeviceCatalog>,
}

impl Context {
    /// Today's date at the site.
    pub fn today(&self) -> NaiveDate {
        self.now.with_timezone(&self.tz).date_naive()
    }

    /// Appends an event to the log.
    pub fn emit(
        &self,
        conn: &Connection,
        kind: EventType,
        data: serde_json::Value,
    ) -> Result<i64, StoreError> {
        events::append(conn, kind, &data, self.now)
    }

    /// Queues the hardware state a unit now needs (in the caller's transaction).
    pub fn refresh_hardware(&self, conn: &Connection, unit_id: &str) -> Result<(), StoreError> {
        if let Some(row) = store::units::get(conn, unit_id)?
            && let Some(t) = desired::unit_target(&row.record, row.contact_id.as_deref())
        {
            outbox::set_desired(conn, t.device(&self.lock_api), &t)?;
        }
        Ok(())
    }

    /// Frees the hardware a unit was bound to (binding changed or unit removed): the lock
    /// goes unassigned, the overlock coil energised.
    pub fn release_hardware(&self, conn: &Connection, old: &UnitRecord) -> Result<(), StoreError> {
        let free = UnitRecord {
            status: crate::domain::UnitStatus::Available,
            ..old.clone()
        };
        if let Some(t) = desired::unit_target(&free, None) {
            outbox::set_desired(conn, t.device(&self.lock_api), &t)?;
        }
        Ok(())
    }

    /// Refuses with 409 when `If-Match` names another version.
    pub fn check_version(&self, unit_id: &str, version: i64) -> Result<(), ApiError> {
        match self.if_match {
            Some(expected) if expected != version => Err(ApiError::new(
                409,
                "version_mismatch",
                format!("unit {unit_id} is at version {version}, not {expected} (If-Match)"),
            )),
            _ => Ok(()),
        }
    }
}

/// A request ready to run: the command plus its envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The operation.
    pub command: Command,
    /// `Idempotency-Key` / MQTT `request_id`.
    pub idempotency_key: Option<String>,
    /// Hash of the operation, its ids and its canonical body: a reused key must match it.
    pub fingerprint: [u8; 32],
    /// `If-Match` version.
    pub if_match: Option<i64>,
    /// Request id for the error shape.
    pub request_id: String,
}

/// The answer, as bytes to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
    /// Whether this is a stored reply to an earlier request with the same key.
    pub replayed: bool,
}

/// Checks an `Idempotency-Key`.
pub fn validate_idempotency_key(key: &str) -> Result<(), FieldError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(())
}

/// A clock, so tests can fix "now".
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// Runs commands against the store.
#[derive(Clone)]
pub struct Executor {
    store: Store,
    site_id: String,
    tz: Tz,
    pin_key: PinKey,
    clock: Clock,
    idempotency_ttl_s: i64,
    lock_api: String,
    /// Shared by every clone, so a SIGHUP reload of `[devices]` reaches them all.
    catalog: Arc<std::sync::RwLock<Arc<DeviceCatalog>>>,
    committed: Option<Arc<Notify>>,
    metrics: crate::metrics::Metrics,
}

/// The lock API's device id when the config names none.
pub const DEFAULT_LOCK_API: &str = "locks";

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("site_id", &self.site_id)
            .finish()
    }
}

impl Executor {
    /// An executor for one site whose unit bindings may name the devices of `catalog`.
    pub fn new(
        store: Store,
        site_id: String,
        tz: Tz,
        pin_key: PinKey,
        clock: Clock,
        idempotency_ttl_s: i64,
        catalog: Arc<DeviceCatalog>,
    ) -> Self {
        Executor {
            store,
            site_id,
            tz,
            pin_key,
            clock,
            idempotency_ttl_s,
            lock_api: DEFAULT_LOCK_API.to_owned(),
            catalog: Arc::new(std::sync::RwLock::new(catalog)),
            committed: None,
            metrics: crate::metrics::Metrics::new(),
        }
    }

    /// The gateway's metrics (commands are counted here; others count through it).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Pings `notify` after every command that committed a change (a 2xx reply), so the
    /// hardware reconcilers pick up new outbox rows at once.
    pub fn with_commit_notify(mut self, notify: Arc<Notify>) -> Self {
        self.committed = Some(notify);
        self
    }

    /// Names the device that carries smart-lock targets (the configured lock API's id).
    pub fn with_lock_api(mut self, id: &str) -> Self {
        self.lock_api = id.to_owned();
        self
    }

    /// The devices unit bindings may name.
    pub fn catalog(&self) -> Arc<DeviceCatalog> {
        self.catalog
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the device catalog (a reloaded `[devices]`) for this executor and its clones.
    pub fn set_catalog(&self, catalog: Arc<DeviceCatalog>) {
        *self
            .catalog
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = catalog;
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The site id.
    pub fn site_id(&self) -> &str {
        &self.site_id
    }

    /// Now, from the executor's clock.
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Today's date at the site.
    pub fn today(&self) -> NaiveDate {
        self.now().with_timezone(&self.tz).date_naive()
    }

    /// The site timezone.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// Runs a command: replays a stored reply for a known key, otherwise applies it in one
    /// transaction (all of it or none of it) and stores the reply with the key.
    pub async fn execute(&self, env: Envelope) -> Reply {
        let ctx = Context {
            site_id: self.site_id.clone(),
            tz: self.tz,
            pin_key: self.pin_key.clone(),
            now: self.now(),
            if_match: env.if_match,
            lock_api: self.lock_api.clone(),
            catalog: self.catalog(),
        };
        let request_id = env.request_id.clone();
        let ttl = self.idempotency_ttl_s;
        let op = env.command.name();
        let started = std::time::Instant::now();
        let result = self
            .store
            .write(move |conn| -> Result<Reply, StoreError> { run(conn, env, &ctx, ttl) })
            .await;
        let status = result.as_ref().map_or(500, |r| r.status);
        let replayed = result.as_ref().is_ok_and(|r| r.replayed);
        self.metrics
            .command(op, status, replayed, started.elapsed());
        match result {
            Ok(reply) => {
                tracing::debug!(
                    op,
                    status = reply.status,
                    replayed = reply.replayed,
                    "command"
                );
                if (200..300).contains(&reply.status)
                    && !reply.replayed
                    && let Some(n) = &self.committed
                {
                    n.notify_waiters();
                }
                reply
            }
            Err(e) => {
                let e = ApiError::from(e);
                Reply {
                    status: e.status,
                    body: e.body(&request_id),
                    replayed: false,
                }
            }
        }
    }
}

fn run(conn: &Connection, env: Envelope, ctx: &Context, ttl_s: i64) -> Result<Reply, StoreError> {
    let now_unix = ctx.now.timestamp();
    if let Some(key) = &env.idempotency_key {
        if let Some(stored) = idempotency::get(conn, key)? {
            if stored.fingerprint == env.fingerprint {
                return Ok(Reply {
                    status: stored.status,
                    body: stored.body,
                    replayed: true,
                });
            }
            let e = ApiError::new(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request; use a new key",
            );
            return Ok(Reply {
                status: e.status,
                body: e.body(&env.request_id),
                replayed: false,
            });
        }
        purge_expired(conn, now_unix, ttl_s)?;
    }
    let outcome = store::atomically(conn, |c| env.command.apply(c, ctx));
    let (status, body) = match outcome {
        Ok(applied) => (applied.status, applied.body),
        Err(e) => (e.status, e.body(&env.request_id)),
    };
    // Server faults are not final: the client may retry them with the same key.
    if let Some(key) = &env.idempotency_key
        && status < 500
    {
        let stored = idempotency::StoredReply {
            fingerprint: env.fingerprint.to_vec(),
            status,
            body,
        };
        idempotency::put(conn, key, &stored, now_unix)?;
        return Ok(Reply {
            status,
            body: stored.body,
            replayed: false,
        });
    }
    Ok(Reply {
        status,
        body,
        replayed: false,
    })
}

/// Purges keys older than the TTL now and then (at most once a minute per process).
fn purge_expired(conn: &Connection, now_unix: i64, ttl_s: i64) -> Result<(), StoreError> {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    if (now_unix - LAST.load(Ordering::Relaxed)).abs() >= 60 {
        LAST.store(now_unix, Ordering::Relaxed);
        let n = idempotency::purge(conn, now_unix - ttl_s)?;
        if n > 0 {
            tracing::debug!(purged = n, "idempotency keys expired");
        }
    }
    Ok(())
}

/// Checks a free-text `by` field.
pub fn check_by(by: &Option<String>) -> Result<(), ApiError> {
    match by {
        Some(b) if b.len() > 128 => Err(ApiError::validation(vec![FieldError::new(
            "by",
            "must be at most 128 characters",
        )])),
        _ => Ok(()),
    }
}
