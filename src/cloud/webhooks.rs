//! Inbound webhooks `POST /v1/webhooks/{source}` (DESIGN.md §3): the signature is the
//! authentication. `X-Unitgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` over
//! the raw body, checked timing-safe with the source's secret, within ±5 minutes of the
//! gateway's clock. The event id is taken in the same transaction as the action it causes,
//! so a replay is refused (409 `replayed`) and a failed action leaves the id free for a retry.
//!
//! Envelope: the storage platforms' `{"event", "timestamp", "data": {...}}` (`type` is
//! accepted for `event`) plus the `id` that replay refusal needs.

use crate::api::error::ApiError;
use crate::command::allocation::{ByBody, ContactOnly, write_transition};
use crate::command::automation::{PaymentFailed, PaymentFailedBody};
use crate::command::{Applied, Context};
use crate::config::WebhookSourceConfig;
use crate::domain::allocation as rules;
use crate::domain::{FieldError, UnitStatus};
use crate::secret::{Secret, read_secret_file};
use crate::store::{cloud, people, site, timestamp, units};
use hmac::{Hmac, Mac};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The signature header of webhooks and of the HTTPS uplink.
pub const SIGNATURE_HEADER: &str = "x-unitgate-signature";

/// How far a signature's `t` may be from the gateway's clock, seconds.
pub const TOLERANCE_S: i64 = 300;

/// Errors loading the webhook sources.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A secret file cannot be read or is empty.
    #[error("webhook source {source_name}: secret_file {source}")]
    Secret {
        /// The source.
        source_name: String,
        /// What is wrong (names the file).
        source: crate::secret::SecretFileError,
    },
}

/// Why a signature was refused (each answers 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `X-Unitgate-Signature` header.
    #[error("the X-Unitgate-Signature header is missing")]
    Missing,
    /// The header is not `t=<unix>,v1=<hex>`.
    #[error("the X-Unitgate-Signature header is not t=<unix>,v1=<hex>")]
    Malformed,
    /// `t` is more than [`TOLERANCE_S`] away from the gateway's clock.
    #[error("the signature's timestamp is {0} s away from the gateway's clock (tolerance 300 s)")]
    Expired(i64),
    /// No `v1` matches.
    #[error("the signature does not match the body")]
    Mismatch,
}

impl SignatureError {
    /// The error code in the answer.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed | SignatureError::Mismatch => "signature_invalid",
            SignatureError::Expired(_) => "signature_expired",
        }
    }
}

impl From<SignatureError> for ApiError {
    fn from(e: SignatureError) -> Self {
        ApiError::new(401, e.code(), e.to_string())
    }
}

fn mac(secret: &[u8], t: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The `X-Unitgate-Signature` value for `body` signed at unix time `t`.
pub fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let tag = mac(secret, t, body).finalize().into_bytes();
    format!("t={t},v1={}", hex::encode(tag))
}

/// Checks `header` against `body`: well-formed, `t` within the tolerance of `now_unix`, and
/// one `v1` (several are allowed while a secret rotates) matching, compared in constant time.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &[u8],
    now_unix: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut t = None;
    let mut tags = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" if t.is_none() => {
                t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?);
            }
            "v1" => tags.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            // Other schemes (v0, a future v2) are ignored, as Stripe-style senders expect.
            "t" => return Err(SignatureError::Malformed),
            _ => {}
        }
    }
    let (Some(t), false) = (t, tags.is_empty()) else {
        return Err(SignatureError::Malformed);
    };
    let skew = now_unix.saturating_sub(t);
    if skew.abs() > TOLERANCE_S {
        return Err(SignatureError::Expired(skew));
    }
    let expected = mac(secret, t, body);
    // Every candidate is checked (verify_slice is constant-time for each).
    let ok = tags.iter().fold(false, |ok, tag| {
        expected.clone().verify_slice(tag).is_ok() | ok
    });
    if ok {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// One configured webhook source with its secret.
#[derive(Clone)]
pub struct WebhookSource {
    /// The `{source}` path segment.
    pub name: String,
    secret: Secret,
    /// `payment.processed` lifts the contact's overlock.
    pub remove_overlock_on_payment: bool,
}

impl std::fmt::Debug for WebhookSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSource")
            .field("name", &self.name)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl WebhookSource {
    /// A source with its secret in hand (tests, tools).
    pub fn new(name: &str, secret: &[u8], remove_overlock_on_payment: bool) -> Self {
        WebhookSource {
            name: name.to_owned(),
            secret: Secret::new(secret),
            remove_overlock_on_payment,
        }
    }

    /// Verifies a request's signature with this source's secret.
    pub fn verify(
        &self,
        header: Option<&str>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<(), SignatureError> {
        verify(header, body, self.secret.expose(), now_unix)
    }
}

/// Every configured source by name; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Webhooks(Arc<BTreeMap<String, WebhookSource>>);

impl Webhooks {
    /// Reads each source's secret file.
    pub fn load(sources: &[WebhookSourceConfig]) -> Result<Webhooks, WebhookError> {
        let mut all = BTreeMap::new();
        for s in sources {
            let secret =
                read_secret_file(&s.secret_file).map_err(|source| WebhookError::Secret {
                    source_name: s.name.clone(),
                    source,
                })?;
            all.insert(
                s.name.clone(),
                WebhookSource {
                    name: s.name.clone(),
                    secret,
                    remove_overlock_on_payment: s.remove_overlock_on_payment,
                },
            );
        }
        Ok(Webhooks(Arc::new(all)))
    }

    /// Sources given directly.
    pub fn from_sources(sources: Vec<WebhookSource>) -> Webhooks {
        Webhooks(Arc::new(
            sources.into_iter().map(|s| (s.name.clone(), s)).collect(),
        ))
    }

    /// The source named `name`.
    pub fn get(&self, name: &str) -> Option<&WebhookSource> {
        self.0.get(name)
    }
}

/// A webhook body: `{"id", "event" | "type", "timestamp"?, "data": {...}}`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct WebhookEvent {
    /// The event's id at its source (replays of it are refused), 1 to 128 characters.
    pub id: String,
    /// `payment.failed`, `payment.processed`, `tenancy.ended`; others are acknowledged and ignored.
    #[serde(rename = "type", alias = "event")]
    pub kind: String,
    /// When it happened at the source (informational).
    #[serde(default)]
    pub timestamp: Option<String>,
    /// Type-specific fields: `contact_id` (or `payment.customer_id`), `tenancy_id`, `end_date`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: Value,
}

/// The answer to an accepted webhook.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookResult {
    /// The event id.
    pub id: String,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// True for a type this gateway does not act on (acknowledged so the sender stops retrying).
    pub ignored: bool,
    /// What the action did, by type.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    #[schema(value_type = Object)]
    pub result: Value,
}

/// A verified webhook event to apply (the `Command::Webhook` operation).
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The source it came from.
    pub source: String,
    /// The source's `remove_overlock_on_payment`.
    pub remove_overlock_on_payment: bool,
    /// The event.
    pub event: WebhookEvent,
}

fn field<'a>(data: &'a Value, paths: &[&[&str]]) -> Option<&'a str> {
    paths.iter().find_map(|p| {
        p.iter()
            .try_fold(data, |v, k| v.get(*k))
            .and_then(Value::as_str)
    })
}

fn required<'a>(data: &'a Value, name: &str, paths: &[&[&str]]) -> Result<&'a str, ApiError> {
    field(data, paths).filter(|s| !s.is_empty()).ok_or_else(|| {
        ApiError::validation(vec![FieldError::new(format!("data.{name}"), "required")])
    })
}

impl Inbound {
    /// The `by` recorded on allocations and events this source changes.
    fn by(&self) -> String {
        format!("webhook:{}", self.source)
    }

    /// Takes the event id (refusing a replay) and applies the event, all in the caller's
    /// transaction.
    pub fn apply(self, conn: &Connection, ctx: &Context) -> Result<Applied, ApiError> {
        let ev = &self.event;
        if ev.id.is_empty() || ev.id.len() > 128 {
            return Err(ApiError::validation(vec![FieldError::new(
                "id",
                "must be 1 to 128 characters",
            )]));
        }
        if !cloud::take_webhook_event(conn, &self.source, &ev.id, &timestamp(ctx.now))? {
            return Err(ApiError::new(
                409,
                "replayed",
                format!("event {:?} from {} was received before", ev.id, self.source),
            ));
        }
        let (ignored, result) = match ev.kind.as_str() {
            "payment.failed" => (false, self.payment_failed(conn, ctx)?),
            "payment.processed" => (false, self.payment_processed(conn, ctx)?),
            "tenancy.ended" => (false, self.tenancy_ended(conn, ctx)?),
            _ => (true, Value::Null),
        };
        tracing::info!(source = %self.source, id = %ev.id, kind = %ev.kind, ignored, "webhook applied");
        Applied::ok(&WebhookResult {
            id: ev.id.clone(),
            kind: ev.kind.clone(),
            ignored,
            result,
        })
    }

    fn contact_id(&self) -> Result<&str, ApiError> {
        required(
            &self.event.data,
            "contact_id",
            &[
                &["contact_id"],
                &["payment", "customer_id"],
                &["customer_id"],
            ],
        )
    }

    /// `payment.failed`: the automation's auto overlock (when the site has it on).
    fn payment_failed(&self, conn: &Connection, ctx: &Context) -> Result<Value, ApiError> {
        let applied = PaymentFailed {
            contact_id: self.contact_id()?.to_owned(),
            body: PaymentFailedBody {
                event_id: Some(self.event.id.clone()),
            },
        }
        .apply(conn, ctx)?;
        serde_json::from_slice(&applied.body).map_err(|_| ApiError::internal())
    }

    /// `payment.processed`: lifts the contact's overlock if this source may, else only records.
    fn payment_processed(&self, conn: &Connection, ctx: &Context) -> Result<Value, ApiError> {
        let contact_id = self.contact_id()?;
        if people::contact(conn, contact_id)?.is_none() {
            return Err(ApiError::not_found("contact", contact_id));
        }
        let nothing =
            |reason: &str| json!({"overlock_removed": false, "reason": reason, "units": []});
        if !self.remove_overlock_on_payment {
            return Ok(nothing("remove_overlock_on_payment is off for this source"));
        }
        let overlocked = units::of_contact(conn, contact_id)?
            .iter()
            .any(|u| u.record.status == UnitStatus::Overlocked);
        if !overlocked {
            return Ok(nothing("the contact has no overlocked units"));
        }
        let applied = ContactOnly {
            contact_id: contact_id.to_owned(),
            body: ByBody {
                by: Some(self.by()),
            },
        }
        .remove_overlock(conn, ctx)?;
        let mut v: Value =
            serde_json::from_slice(&applied.body).map_err(|_| ApiError::internal())?;
        v["overlock_removed"] = json!(true);
        Ok(v)
    }

    /// `tenancy.ended`: with the site's auto_deallocate on, the tenancy's units are deallocated
    /// (unless `end_date` is still ahead, site local date: then the scheduler does it).
    fn tenancy_ended(&self, conn: &Connection, ctx: &Context) -> Result<Value, ApiError> {
        let data = &self.event.data;
        let tenancy_id = required(data, "tenancy_id", &[&["tenancy_id"], &["tenancy", "id"]])?;
        if people::tenancy(conn, tenancy_id)?.is_none() {
            return Err(ApiError::not_found("tenancy", tenancy_id));
        }
        let nothing = |reason: String| json!({"deallocated": false, "reason": reason, "units": []});
        if let Some(end) = field(data, &[&["end_date"], &["tenancy", "end_date"]]) {
            let end = end.parse::<chrono::NaiveDate>().map_err(|_| {
                ApiError::validation(vec![FieldError::new(
                    "data.end_date",
                    "must be a date (YYYY-MM-DD)",
                )])
            })?;
            if end > ctx.today() {
                return Ok(nothing(format!("the tenancy ends on {end}")));
            }
        }
        if !site::automations(conn)?.auto_deallocate {
            return Ok(nothing("auto_deallocate is off".into()));
        }
        let by = self.by();
        let mut views = Vec::new();
        for unit_id in people::active_units_of_tenancy(conn, tenancy_id)? {
            let Some(row) = units::get(conn, &unit_id)? else {
                continue;
            };
            if let Ok(t) = rules::deallocate(&row.facts()) {
                write_transition(conn, ctx, &t, Some(&by))?;
                let row = units::get(conn, &unit_id)?.ok_or_else(ApiError::internal)?;
                views.push(row.view());
            }
        }
        if views.is_empty() {
            return Ok(nothing("the tenancy holds no units".into()));
        }
        Ok(json!({"deallocated": true, "units": views}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_773_144_000;

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let h = sign(b"secret", NOW, b"{\"a\":1}");
        assert_eq!(verify(Some(&h), b"{\"a\":1}", b"secret", NOW), Ok(()));
        assert_eq!(
            verify(Some(&h), b"{\"a\":2}", b"secret", NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(Some(&h), b"{\"a\":1}", b"other", NOW),
            Err(SignatureError::Mismatch)
        );
        let shifted = h.replace(&format!("t={NOW}"), &format!("t={}", NOW + 1));
        assert_eq!(
            verify(Some(&shifted), b"{\"a\":1}", b"secret", NOW),
            Err(SignatureError::Mismatch),
            "t is signed"
        );
    }

    #[test]
    fn known_vector() {
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac k
        let h = sign(b"k", 1_700_000_000, b"{}");
        let expected = {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"k").unwrap();
            m.update(b"1700000000.{}");
            hex::encode(m.finalize().into_bytes())
        };
        assert_eq!(h, format!("t=1700000000,v1={expected}"));
    }

    #[test]
    fn tolerance_is_five_minutes_either_way() {
        for (t, ok) in [
            (NOW - 300, true),
            (NOW + 300, true),
            (NOW - 301, false),
            (NOW + 301, false),
        ] {
            let h = sign(b"s", t, b"x");
            assert_eq!(
                verify(Some(&h), b"x", b"s", NOW).is_ok(),
                ok,
                "t = now{:+}",
                t - NOW
            );
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        for h in [
            "",
            "t=1",
            "v1=00",
            "t=x,v1=00",
            "t=1,v1=zz",
            "garbage",
            "t=1,t=1,v1=00",
        ] {
            let e = verify(Some(h), b"x", b"s", 1).unwrap_err();
            assert_eq!(e, SignatureError::Malformed, "{h:?}");
        }
        assert_eq!(verify(None, b"x", b"s", 1), Err(SignatureError::Missing));
    }

    #[test]
    fn a_rotated_secret_may_sign_beside_the_old() {
        let good = sign(b"new", NOW, b"x");
        let tag = good.split("v1=").nth(1).unwrap();
        let h = format!("t={NOW},v1={},v1={tag}", "00".repeat(32));
        assert_eq!(verify(Some(&h), b"x", b"new", NOW), Ok(()));
    }
}
