//! Modbus relay/sensor boards: coils and discrete inputs behind a Modbus TCP server or a
//! Modbus RTU server on a pseudo-terminal. (Scaffold: the protocol side is being built;
//! the interface below is what the control API uses.)

use crate::config::RelayBoardConfig;
use crate::{DeviceContext, SimError};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// Coils and inputs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayState {
    /// Coil states.
    pub coils: Vec<bool>,
    /// Discrete input states.
    pub inputs: Vec<bool>,
}

/// A running board.
#[derive(Clone)]
pub struct RelayBoard {
    cfg: RelayBoardConfig,
    state: Arc<Mutex<RelayState>>,
}

impl RelayBoard {
    /// Starts the board's server.
    pub async fn start(
        cfg: &RelayBoardConfig,
        _ctx: &DeviceContext,
    ) -> Result<RelayBoard, SimError> {
        Ok(RelayBoard {
            cfg: cfg.clone(),
            state: Arc::new(Mutex::new(RelayState {
                coils: vec![false; cfg.coils as usize],
                inputs: vec![false; cfg.inputs as usize],
            })),
        })
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Where it listens.
    pub fn address(&self) -> serde_json::Value {
        serde_json::json!({"transport": self.cfg.transport, "address": self.cfg.address, "serial": self.cfg.port, "unit_id": self.cfg.unit_id})
    }

    /// Coils and inputs now.
    pub fn state(&self) -> RelayState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Sets a discrete input (a door opens: `on`).
    pub fn set_input(&self, n: u16, on: bool) -> Result<(), SimError> {
        let mut s = self
            .state
            .lock()
            .map_err(|_| SimError::BadRequest("state poisoned".into()))?;
        let slot = s
            .inputs
            .get_mut(n as usize)
            .ok_or_else(|| SimError::NotFound(format!("board {} has no input {n}", self.cfg.id)))?;
        *slot = on;
        Ok(())
    }

    /// Stops it.
    pub async fn stop(&self) {}
}
