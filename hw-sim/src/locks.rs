//! The smart-lock vendor API (DESIGN.md §4 reference provider). (Scaffold: the HTTP side
//! is being built; the interface below is what the control API uses.)

use crate::config::LockApiConfig;
use crate::{DeviceContext, SimError};
use serde::Serialize;

/// One lock, as `GET /v1/locks/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LockState {
    /// Lock id.
    pub id: String,
    /// `unassigned`, `assigned` or `overlocked`.
    pub state: String,
    /// Tenant reference when assigned.
    pub assigned_to: Option<String>,
}

/// A running lock API.
#[derive(Clone)]
pub struct LockApi {
    cfg: LockApiConfig,
}

impl LockApi {
    /// Starts the HTTP server.
    pub async fn start(cfg: &LockApiConfig, _ctx: &DeviceContext) -> Result<LockApi, SimError> {
        Ok(LockApi { cfg: cfg.clone() })
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Where it listens.
    pub fn address(&self) -> serde_json::Value {
        serde_json::json!({"url": self.cfg.url})
    }

    /// Every lock.
    pub fn locks(&self) -> Vec<LockState> {
        Vec::new()
    }

    /// One lock.
    pub fn lock(&self, id: &str) -> Option<LockState> {
        self.locks().into_iter().find(|l| l.id == id)
    }

    /// Stops it.
    pub async fn stop(&self) {}
}
