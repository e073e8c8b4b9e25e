//! Injected faults: per device, each with a kind, an optional value and an end time.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The device does not answer at all.
    Offline,
    /// Every answer is late by `value` milliseconds.
    Delay,
    /// A fraction `value` (0..1) of answers is dropped.
    Drop,
    /// A fraction `value` (0..1, default 1) of answers is corrupted on the wire.
    Corrupt,
    /// HTTP devices answer 429 with `Retry-After: value` seconds (default 1).
    Http429,
    /// HTTP devices answer 503.
    Http503,
    /// HTTP devices answer after `value` milliseconds.
    Slow,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Offline,
        FaultKind::Delay,
        FaultKind::Drop,
        FaultKind::Corrupt,
        FaultKind::Http429,
        FaultKind::Http503,
        FaultKind::Slow,
    ];
}

/// An active fault.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveFault {
    /// Kind.
    pub kind: FaultKind,
    /// Parameter (ms, rate or seconds, by kind).
    pub value: Option<f64>,
    /// Milliseconds left.
    pub remaining_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Option<f64>,
    until: Instant,
}

/// The fault table. Cheap to clone; checked by devices on every frame/request.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    map: Arc<Mutex<HashMap<(String, FaultKind), Entry>>>,
}

impl Faults {
    /// Injects (or replaces) a fault on a device for `duration`.
    pub fn set(&self, device: &str, kind: FaultKind, value: Option<f64>, duration: Duration) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(
                (device.to_owned(), kind),
                Entry {
                    value,
                    until: Instant::now() + duration,
                },
            );
        }
    }

    /// Clears the faults of one device, or of all. Returns how many were active.
    pub fn clear(&self, device: Option<&str>) -> usize {
        let Ok(mut m) = self.map.lock() else { return 0 };
        let now = Instant::now();
        let before = m.values().filter(|e| e.until > now).count();
        match device {
            Some(d) => m.retain(|(dev, _), _| dev != d),
            None => m.clear(),
        }
        before - m.values().filter(|e| e.until > now).count()
    }

    /// The fault's value if it is active on the device (`Some(None)`: active, no value).
    pub fn get(&self, device: &str, kind: FaultKind) -> Option<Option<f64>> {
        let m = self.map.lock().ok()?;
        m.get(&(device.to_owned(), kind))
            .filter(|e| e.until > Instant::now())
            .map(|e| e.value)
    }

    /// Whether the device is offline now.
    pub fn offline(&self, device: &str) -> bool {
        self.get(device, FaultKind::Offline).is_some()
    }

    /// Extra delay for the device's answers now.
    pub fn delay(&self, device: &str) -> Option<Duration> {
        self.get(device, FaultKind::Delay)
            .map(|v| Duration::from_millis(v.unwrap_or(1000.0).max(0.0) as u64))
    }

    /// Whether to drop this answer (decided at random by the drop rate).
    pub fn drop_now(&self, device: &str) -> bool {
        self.get(device, FaultKind::Drop)
            .is_some_and(|v| rand::random::<f64>() < v.unwrap_or(1.0))
    }

    /// Whether to corrupt this answer (decided at random by the corrupt rate).
    pub fn corrupt_now(&self, device: &str) -> bool {
        self.get(device, FaultKind::Corrupt)
            .is_some_and(|v| rand::random::<f64>() < v.unwrap_or(1.0))
    }

    /// Active faults of a device.
    pub fn active(&self, device: &str) -> Vec<ActiveFault> {
        let Ok(m) = self.map.lock() else {
            return vec![];
        };
        let now = Instant::now();
        let mut out: Vec<ActiveFault> = m
            .iter()
            .filter(|((d, _), e)| d == device && e.until > now)
            .map(|((_, kind), e)| ActiveFault {
                kind: *kind,
                value: e.value,
                remaining_ms: (e.until - now).as_millis() as u64,
            })
            .collect();
        out.sort_by_key(|f| f.kind as u8);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_expire_and_clear() {
        let f = Faults::default();
        f.set("a", FaultKind::Offline, None, Duration::from_millis(30));
        f.set("a", FaultKind::Delay, Some(50.0), Duration::from_secs(60));
        f.set("b", FaultKind::Drop, Some(1.0), Duration::from_secs(60));
        assert!(f.offline("a"));
        assert_eq!(f.delay("a"), Some(Duration::from_millis(50)));
        assert!(f.drop_now("b") && !f.drop_now("a"));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!f.offline("a"), "expired");
        assert_eq!(f.active("a").len(), 1);
        assert_eq!(f.clear(Some("a")), 1);
        assert!(f.delay("a").is_none());
        assert_eq!(f.clear(None), 1);
    }
}
