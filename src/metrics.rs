//! Metrics in the Prometheus / OpenMetrics text format (`GET /metrics`).
//!
//! Counters and histograms are updated where things happen: every command in
//! [`crate::command::Executor::execute`] (the one place HTTP, MQTT, webhooks and the
//! scheduler go through), every keypad decision in the gate controller. Gauges of state
//! (device up, queue depth, backlog, link state) are read at scrape time from the device
//! registry, the links and the store: a handful of indexed reads on the reader pool.

use crate::cloud::Links;
use crate::domain::access::DenyReason;
use crate::reconcile::{DeviceKind, DeviceRegistry};
use crate::store::{Store, StoreError};
use prometheus_client::encoding::{EncodeLabelSet, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

/// The content type of [`Metrics::render`]'s text (Prometheus 2.x and later scrape it).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Operation names shown from the start (with zero counts); others appear when first used.
pub const OPERATIONS: &[&str] = &[
    "reserve",
    "grant_access",
    "deallocate",
    "set_status",
    "overlock",
    "remove_overlock",
    "create_units",
    "bulk_create_units",
    "update_unit",
    "bulk_update_units",
    "upsert_unit_type",
    "upsert_contact",
    "upsert_tenancy",
    "snapshot",
    "auto_move_in",
    "auto_deallocate",
    "payment_failed",
    "webhook",
];

/// Command outcomes: applied, a stored reply replayed, refused (4xx), failed (5xx).
pub const OUTCOMES: &[&str] = &["ok", "replayed", "rejected", "error"];

/// Keypad decision reasons: `granted`, then every refusal reason as the events name it.
pub const DECISIONS: &[&str] = &[
    "granted",
    "invalid_code",
    "no_access",
    "gatelocked",
    "overlocked",
    "repossessed",
    "outside_hours",
    "lockout",
];

/// Upper bounds of the command latency buckets, seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    op: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    keypad: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    link: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The gateway's counters and histograms; cheap to clone (one set per gateway).
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    commands: Family<CommandLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    decisions: Family<DecisionLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set: every operation and outcome at zero, the start time and build info.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let commands = Family::<CommandLabels, Counter>::default();
        let latency: Family<OpLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let decisions = Family::<DecisionLabels, Counter>::default();
        for op in OPERATIONS {
            for outcome in OUTCOMES {
                drop(commands.get_or_create(&CommandLabels {
                    op: (*op).to_owned(),
                    outcome,
                }));
            }
            drop(latency.get_or_create(&OpLabels {
                op: (*op).to_owned(),
            }));
        }
        registry.register(
            "unitgate_commands",
            "Commands executed, by operation and outcome (ok, replayed, rejected = 4xx, error = 5xx)",
            commands.clone(),
        );
        registry.register(
            "unitgate_command_duration_seconds",
            "Time to execute a command (queue to the writer, apply, commit), by operation",
            latency.clone(),
        );
        registry.register(
            "unitgate_keypad_decisions",
            "PINs decided at the keypads, by keypad and reason (granted or the refusal reason)",
            decisions.clone(),
        );
        let started = Gauge::<i64>::default();
        started.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        );
        registry.register(
            "unitgate_process_start_time_seconds",
            "Start time of the gateway, seconds since the Unix epoch",
            started,
        );
        registry.register(
            "unitgate_build",
            "The gateway's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics(Arc::new(Inner {
            registry,
            commands,
            latency,
            decisions,
        }))
    }

    /// Counts one executed command by its reply and how long it took.
    pub fn command(&self, op: &str, status: u16, replayed: bool, took: Duration) {
        let outcome = match status {
            _ if replayed => "replayed",
            200..=399 => "ok",
            400..=499 => "rejected",
            _ => "error",
        };
        self.0
            .commands
            .get_or_create(&CommandLabels {
                op: op.to_owned(),
                outcome,
            })
            .inc();
        self.0
            .latency
            .get_or_create(&OpLabels { op: op.to_owned() })
            .observe(took.as_secs_f64());
    }

    /// Shows a keypad's decision counters at zero before its first PIN.
    pub fn keypad(&self, keypad: &str) {
        for reason in DECISIONS {
            drop(self.0.decisions.get_or_create(&DecisionLabels {
                keypad: keypad.to_owned(),
                reason,
            }));
        }
    }

    /// Counts one keypad decision: `None` is a grant, otherwise the refusal reason.
    pub fn keypad_decision(&self, keypad: &str, refused: Option<DenyReason>) {
        let reason = match refused {
            None => "granted",
            Some(DenyReason::InvalidCode) => "invalid_code",
            Some(DenyReason::NoAccess) => "no_access",
            Some(DenyReason::Gatelocked) => "gatelocked",
            Some(DenyReason::Overlocked) => "overlocked",
            Some(DenyReason::Repossessed) => "repossessed",
            Some(DenyReason::OutsideHours) => "outside_hours",
            Some(DenyReason::Lockout) => "lockout",
        };
        self.0
            .decisions
            .get_or_create(&DecisionLabels {
                keypad: keypad.to_owned(),
                reason,
            })
            .inc();
    }

    /// The whole exposition: the counters, then `state`'s gauges, then `# EOF`.
    pub fn render(&self, state: &State) -> String {
        let mut scrape = Registry::default();
        let up = Family::<DeviceLabels, Gauge>::default();
        let depth = Family::<DeviceLabels, Gauge>::default();
        for d in &state.devices {
            let labels = DeviceLabels {
                device: d.id.clone(),
                kind: kind_label(d.kind),
            };
            up.get_or_create(&labels).set(i64::from(d.online));
            depth
                .get_or_create(&labels)
                .set(i64::try_from(d.queue_depth).unwrap_or(i64::MAX));
        }
        scrape.register(
            "unitgate_device_up",
            "1 when the device answers, 0 when it does not (or is disabled)",
            up,
        );
        scrape.register(
            "unitgate_device_queue_depth",
            "Hardware targets waiting to be applied to the device (outbox rows)",
            depth,
        );
        let connected = Family::<LinkLabels, Gauge>::default();
        let backlog = Family::<LinkLabels, Gauge>::default();
        let oldest = Family::<LinkLabels, Gauge>::default();
        for l in &state.links {
            let labels = LinkLabels {
                link: l.name.clone(),
            };
            connected.get_or_create(&labels).set(i64::from(l.connected));
            backlog.get_or_create(&labels).set(l.backlog_events);
            oldest.get_or_create(&labels).set(l.oldest_age_s);
        }
        scrape.register(
            "unitgate_link_connected",
            "1 when the cloud link (mqtt, https) is connected, else 0",
            connected,
        );
        scrape.register(
            "unitgate_uplink_backlog_events",
            "Events in the log not yet acknowledged by the uplink",
            backlog,
        );
        scrape.register(
            "unitgate_uplink_backlog_oldest_age_seconds",
            "Age of the oldest event not yet acknowledged by the uplink (0 when none)",
            oldest,
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.0.registry);
        let _ = text::encode_registry(&mut out, &scrape);
        let _ = text::encode_eof(&mut out);
        out
    }
}

/// A device's state at scrape time.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// Device id.
    pub id: String,
    /// Kind.
    pub kind: DeviceKind,
    /// Whether it answers.
    pub online: bool,
    /// Pending outbox rows.
    pub queue_depth: u64,
}

/// A cloud link's state at scrape time.
#[derive(Debug, Clone)]
pub struct LinkState {
    /// `mqtt` or `https`.
    pub name: String,
    /// Connected now.
    pub connected: bool,
    /// Events it has not acknowledged.
    pub backlog_events: i64,
    /// Age of the oldest of them, seconds (0 when none).
    pub oldest_age_s: i64,
}

/// What the gauges show, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Every configured device.
    pub devices: Vec<DeviceState>,
    /// Every configured cloud link.
    pub links: Vec<LinkState>,
}

impl State {
    /// Reads the devices' health, the links, and per device and link one indexed count
    /// on the store's reader pool.
    pub async fn read(
        store: &Store,
        devices: &DeviceRegistry,
        links: &Links,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<State, StoreError> {
        let entries = devices.list();
        let link_list = links.list();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let names: Vec<String> = link_list.keys().cloned().collect();
        let (depths, backlogs) = store
            .read(move |c| -> Result<_, StoreError> {
                let depths = ids
                    .iter()
                    .map(|id| crate::store::outbox::depth(c, id).map(|(n, _)| n))
                    .collect::<Result<Vec<_>, _>>()?;
                let backlogs = names
                    .iter()
                    .map(|n| crate::cloud::backlog::backlog(c, std::slice::from_ref(n), now))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((depths, backlogs))
            })
            .await?;
        Ok(State {
            devices: entries
                .into_iter()
                .zip(depths)
                .map(|(e, queue_depth)| DeviceState {
                    id: e.id,
                    kind: e.kind,
                    online: e.online,
                    queue_depth,
                })
                .collect(),
            links: link_list
                .into_iter()
                .zip(backlogs)
                .map(|((name, s), b)| LinkState {
                    name,
                    connected: s.connected,
                    backlog_events: b.events,
                    oldest_age_s: b.oldest_age_s.unwrap_or(0),
                })
                .collect(),
        })
    }
}

/// What a scrape reads: the metrics and the state behind the gauges. Cheap to clone.
#[derive(Clone)]
pub struct Scrape {
    /// Runs commands; holds the metrics and the store.
    pub executor: crate::command::Executor,
    /// Devices and their health.
    pub devices: DeviceRegistry,
    /// The cloud links.
    pub links: Links,
}

impl Scrape {
    /// The exposition text now.
    pub async fn text(&self) -> Result<String, StoreError> {
        let e = &self.executor;
        let state = State::read(e.store(), &self.devices, &self.links, e.now()).await?;
        Ok(e.metrics().render(&state))
    }
}

/// Serves `GET /metrics` without a token on `listener` until `shutdown` turns true: for a
/// Prometheus on the box or a management network (`[metrics] listen`). Anything else is 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scrape: Scrape,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let scrape = scrape.clone();
            async move {
                match scrape.text().await {
                    Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: cannot read the store");
                        StatusCode::SERVICE_UNAVAILABLE.into_response()
                    }
                }
            }
        }),
    );
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}

/// The `kind` label of a device.
pub fn kind_label(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::RelayBoard => "relay_board",
        DeviceKind::LockApi => "lock_api",
        DeviceKind::Keypad => "keypad",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_set_shows_every_operation_at_zero_and_ends_with_eof() {
        let m = Metrics::new();
        let text = m.render(&State::default());
        assert!(text.contains(r#"unitgate_commands_total{op="grant_access",outcome="ok"} 0"#));
        assert!(text.contains(r#"unitgate_command_duration_seconds_count{op="reserve"} 0"#));
        assert!(text.contains(r#"unitgate_build_info{version=""#), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn outcomes_and_decisions_count_where_they_belong() {
        let m = Metrics::new();
        m.command("reserve", 200, false, Duration::from_millis(3));
        m.command("reserve", 200, true, Duration::from_millis(1));
        m.command("reserve", 409, false, Duration::from_millis(1));
        m.command("reserve", 503, false, Duration::from_millis(1));
        m.keypad("gate-1");
        m.keypad_decision("gate-1", Some(DenyReason::InvalidCode));
        let text = m.render(&State::default());
        for (outcome, n) in [("ok", 1), ("replayed", 1), ("rejected", 1), ("error", 1)] {
            let line =
                format!(r#"unitgate_commands_total{{op="reserve",outcome="{outcome}"}} {n}"#);
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(r#"unitgate_command_duration_seconds_count{op="reserve"} 4"#));
        assert!(text.contains(
            r#"unitgate_keypad_decisions_total{keypad="gate-1",reason="invalid_code"} 1"#
        ));
        assert!(
            text.contains(r#"unitgate_keypad_decisions_total{keypad="gate-1",reason="granted"} 0"#)
        );
    }
}
