//! OSDP keypads: a libosdp peripheral device per keypad, on its own thread, answering a
//! control panel over a pseudo-terminal and/or TCP. (Scaffold: the protocol side is
//! being built; the interface below is what the control API uses.)

use crate::config::KeypadConfig;
use crate::{DeviceContext, SimError};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// What the keypad shows, as the control API reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeypadState {
    /// Device id.
    pub id: String,
    /// LED colour (`off`, `red`, `green`, `amber`, `blue`).
    pub led: String,
    /// Whether the buzzer sounds.
    pub buzzer: bool,
    /// Text on the display.
    pub text: String,
    /// Whether a control panel polls it.
    pub online: bool,
    /// Whether the secure channel is up.
    pub secure: bool,
}

/// A running keypad.
#[derive(Clone)]
pub struct Keypad {
    cfg: KeypadConfig,
    state: Arc<Mutex<KeypadState>>,
}

impl Keypad {
    /// Starts the keypad's transports.
    pub async fn start(cfg: &KeypadConfig, _ctx: &DeviceContext) -> Result<Keypad, SimError> {
        Ok(Keypad {
            cfg: cfg.clone(),
            state: Arc::new(Mutex::new(KeypadState {
                id: cfg.id.clone(),
                led: "off".into(),
                ..Default::default()
            })),
        })
    }

    /// Device id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Where it listens.
    pub fn address(&self) -> serde_json::Value {
        serde_json::json!({"serial": self.cfg.port, "tcp": self.cfg.tcp, "osdp_address": self.cfg.address})
    }

    /// Current outputs.
    pub fn state(&self) -> KeypadState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Presses keys (`0-9`, `*`, `#`).
    pub async fn press(&self, keys: &str) -> Result<(), SimError> {
        if keys.is_empty()
            || !keys
                .chars()
                .all(|c| c.is_ascii_digit() || c == '*' || c == '#')
        {
            return Err(SimError::BadRequest("keys may be 0-9, * and #".into()));
        }
        Err(SimError::BadRequest("keypad protocol not running".into()))
    }

    /// Stops it.
    pub async fn stop(&self) {}
}
