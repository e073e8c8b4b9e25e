//! The link to the cloud platform (DESIGN.md §3): the MQTT link (commands in, events and
//! unit states out), the optional HTTPS event uplink, and inbound webhooks.
//!
//! The event log is the only queue: each uplink delivers it in `seq` order from its durable
//! cursor (`store::cloud`), advanced only when the cloud acknowledged, so nothing held in
//! memory can be lost. [`Links`] holds each link's state for `GET /v1/status`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

/// One link's state, as `GET /v1/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct LinkStatus {
    /// Whether it is connected (MQTT) or its last delivery succeeded (HTTPS).
    pub connected: bool,
    /// Since when it is in its current state.
    pub since: Option<DateTime<Utc>>,
    /// The latest failure, kept after recovery.
    pub last_error: Option<String>,
    /// The last event `seq` the cloud acknowledged on this link.
    pub delivered_seq: i64,
}

/// Every configured link and its state; cheap to clone, shared by the links and the API.
#[derive(Debug, Clone, Default)]
pub struct Links(Arc<RwLock<BTreeMap<String, LinkStatus>>>);

impl Links {
    /// Adds a link (`mqtt`, `https`), disconnected until it says otherwise.
    pub fn add(&self, name: &str) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_owned())
            .or_default();
    }

    /// Changes a link's state with `f`.
    pub fn update(&self, name: &str, f: impl FnOnce(&mut LinkStatus)) {
        let mut all = self.0.write().unwrap_or_else(PoisonError::into_inner);
        f(all.entry(name.to_owned()).or_default());
    }

    /// Records a connect or disconnect (with its reason), stamping `since` on a change.
    pub fn set_connected(
        &self,
        name: &str,
        connected: bool,
        error: Option<String>,
        now: DateTime<Utc>,
    ) {
        self.update(name, |s| {
            if s.connected != connected || s.since.is_none() {
                s.since = Some(now);
            }
            s.connected = connected;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Every link by name.
    pub fn list(&self) -> BTreeMap<String, LinkStatus> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

pub mod backlog;
#[cfg(feature = "demo-broker")]
pub mod broker;
pub mod dispatch;
pub mod https;
pub mod mqtt;
pub mod mqtt_chunks;
pub mod signing;
pub mod webhooks;
