//! Every device observation, on one broadcast bus, stamped with `CLOCK_MONOTONIC` in
//! nanoseconds (comparable across processes on the same machine, so tests and benchmarks
//! can compute latency between two observations, or from a request they sent).

use serde::Serialize;
use tokio::sync::broadcast;

/// One thing a device saw or did.
#[derive(Debug, Clone, Serialize)]
pub struct Observation {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub t_ns: u64,
    /// Device id.
    pub device: String,
    /// What happened: `coil_changed`, `input_changed`, `led_changed`, `buzzer`,
    /// `text_shown`, `key_pressed`, `lock_state_changed`, `frame_received`,
    /// `frame_corrupted`, `fault_set`, `fault_cleared`, ...
    pub kind: String,
    /// Details.
    pub data: serde_json::Value,
}

/// The monotonic clock the bus stamps with, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The observation bus. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Bus {
    tx: broadcast::Sender<Observation>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

impl Bus {
    /// A bus keeping up to 4096 observations for slow readers.
    pub fn new() -> Self {
        Bus {
            tx: broadcast::channel(4096).0,
        }
    }

    /// Publishes an observation (no-op without subscribers).
    pub fn emit(&self, device: &str, kind: &str, data: serde_json::Value) {
        let _ = self.tx.send(Observation {
            t_ns: monotonic_ns(),
            device: device.to_owned(),
            kind: kind.to_owned(),
            data,
        });
    }

    /// A new subscriber, seeing observations from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Observation> {
        self.tx.subscribe()
    }
}
