//! `unitgate demo`: a demo site (3 unit types, 60 units over 2 zones, 20 contacts and
//! tenancies in mixed states) seeded through the same snapshot operation the cloud uses.

use crate::command::snapshot::Snapshot;
use crate::command::{Command, Envelope, Executor};
use crate::store::units;
use chrono::{Days, NaiveDate};
use serde_json::{Value, json};

/// The demo's configuration file, built in so the demo runs from any directory.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// The demo site's hardware (hw-sim's site file; its `[devices]` are the gateway's too).
pub const SIM_CONFIG: &str = include_str!("../config/sim.toml");

/// Starts the demo site's hardware in-process and points the gateway's `[devices]` at it.
/// The lock API key is made up once and kept in the data directory (0600).
#[cfg(feature = "demo-sim")]
pub async fn start_hardware(
    cfg: &mut crate::config::Config,
    sim_listen: &str,
) -> Result<hw_sim::Sim, DemoError> {
    use std::io::Write;
    let key_path = cfg.store.data_dir.join("lock-api.key");
    if !key_path.exists() {
        std::fs::create_dir_all(&cfg.store.data_dir)
            .map_err(|e| DemoError::Hardware(e.to_string()))?;
        let key = hex::encode(rand::random::<[u8; 16]>());
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(&key_path)
            .and_then(|mut f| f.write_all(key.as_bytes()))
            .map_err(|e| DemoError::Hardware(format!("{}: {e}", key_path.display())))?;
    }
    let mut site = hw_sim::config::SiteFile::parse(SIM_CONFIG).map_err(DemoError::Hardware)?;
    if let Some(l) = &mut site.devices.lock_api {
        l.api_key_file = key_path.clone();
    }
    site.units = sim_units();
    let sim = hw_sim::Sim::start(&site, Some(sim_listen))
        .await
        .map_err(|e| DemoError::Hardware(e.to_string()))?;
    let with_devices = crate::config::Config::from_toml(&format!("{DEMO_CONFIG}\n{SIM_CONFIG}"))
        .map_err(|e| DemoError::Hardware(e.to_string()))?;
    cfg.devices = with_devices.devices;
    if let Some(l) = &mut cfg.devices.lock_api {
        l.api_key_file = key_path;
    }
    Ok(sim)
}

/// The simulator's `[[units]]` for the demo, made from the units [`snapshot`] seeds, so the
/// sim page names and binds the same units as the gateway.
#[cfg(feature = "demo-sim")]
pub fn sim_units() -> Vec<hw_sim::config::UnitConfig> {
    use hw_sim::config::{UnitCoil, UnitConfig, UnitInput};
    let snap = snapshot(NaiveDate::default());
    let Some(units) = snap["units"].as_array() else {
        return Vec::new();
    };
    let port = |v: &Value, key: &str| v[key].as_u64().and_then(|n| u16::try_from(n).ok());
    units
        .iter()
        .filter_map(|u| {
            let name = u["id"].as_str()?.to_owned();
            let lock = &u["lock"];
            let door = &u["door_sensor"];
            Some(UnitConfig {
                name,
                lock: (lock["kind"] == "smart_lock")
                    .then(|| lock["id"].as_str().map(str::to_owned))
                    .flatten(),
                overlock: (lock["kind"] == "relay")
                    .then(|| {
                        Some(UnitCoil {
                            board: lock["board"].as_str()?.to_owned(),
                            coil: port(lock, "coil")?,
                        })
                    })
                    .flatten(),
                door: door["board"].as_str().and_then(|board| {
                    Some(UnitInput {
                        board: board.to_owned(),
                        input: port(door, "input")?,
                    })
                }),
            })
        })
        .collect()
}

/// The demo site's devices declared disabled, for a build without the simulator: the demo
/// units stay bound to them (bindings must name declared devices) and their commands queue.
pub fn declared_devices() -> Result<crate::config::DevicesConfig, DemoError> {
    let mut devices = crate::config::Config::from_toml(&format!("{DEMO_CONFIG}\n{SIM_CONFIG}"))
        .map_err(|e| DemoError::Hardware(e.to_string()))?
        .devices;
    devices.keypads.iter_mut().for_each(|k| k.enabled = false);
    devices
        .relay_boards
        .iter_mut()
        .for_each(|b| b.enabled = false);
    if let Some(l) = &mut devices.lock_api {
        l.enabled = false;
    }
    Ok(devices)
}

/// The demo snapshot for a site whose local date is `today`.
pub fn snapshot(today: NaiveDate) -> Value {
    let day = |offset: i64| -> String {
        if offset >= 0 {
            today.checked_add_days(Days::new(offset as u64))
        } else {
            today.checked_sub_days(Days::new(offset.unsigned_abs()))
        }
        .unwrap_or(today)
        .to_string()
    };
    let unit_types = json!([
        {"id": "small", "name": "Small 5x5"},
        {"id": "medium", "name": "Medium 10x10"},
        {"id": "large", "name": "Large 10x20"},
    ]);
    let mut units = Vec::new();
    for (block, zone, access) in [("A", "main-gate", "indoor"), ("B", "east-gate", "outdoor")] {
        for n in 1..=30 {
            let (kind, w, l, rate) = match n % 3 {
                1 => ("small", 5, 5, 45.0),
                2 => ("medium", 10, 10, 95.0),
                _ => ("large", 10, 20, 170.0),
            };
            let relay = if block == "B" {
                json!({"kind": "relay", "board": "relay-1", "coil": n + 1})
            } else {
                json!({"kind": "smart_lock", "id": format!("lock-{block}{n:02}")})
            };
            units.push(json!({
                "id": format!("u-{block}{n:02}"), "name": format!("{block}{n:02}"), "unit_type": kind,
                "width": w, "length": l, "height": 8, "door_height": 7, "door_width": w.min(8),
                "door_type": if block == "A" { "swing" } else { "roll_up" }, "access_type": access,
                "standard_rate": rate, "walk_thru_order": n, "floor": if block == "A" { json!(1) } else { Value::Null },
                "zones": [zone], "lock": relay,
                "door_sensor": if block == "B" { json!({"board": "relay-1", "input": n}) } else { Value::Null },
                "status": "available",
            }));
        }
    }
    let mut contacts = Vec::new();
    let mut tenancies = Vec::new();
    let mut allocations = Vec::new();
    let mut allocate = |units: &mut Vec<Value>,
                        unit: &str,
                        tenancy: &str,
                        status: &str,
                        granted: bool| {
        if let Some(u) = units.iter_mut().find(|u| u["id"] == unit) {
            u["status"] = json!(status);
        }
        allocations.push(json!({
            "id": format!("alloc-{unit}"), "unit_id": unit, "tenancy_id": tenancy,
            "reserved_at": format!("{}T09:00:00.000Z", day(-40)), "reserved_by": "demo",
            "granted_access_at": if granted { json!(format!("{}T06:00:00.000Z", day(-30))) } else { Value::Null },
            "granted_access_by": if granted { json!("demo") } else { Value::Null },
        }));
    };
    for n in 1..=20 {
        let c = format!("c-{n:02}");
        let t = format!("t-{n:02}");
        contacts.push(json!({
            "id": c, "name": format!("Demo Tenant {n:02}"), "access_code": format!("{}", 100000 + n * 7),
        }));
        let (start, state) = match n {
            14..=16 => (day(7), "upcoming"),
            19 => (day(3), "upcoming"),
            20 => (day(0), "active"),
            _ => (day(-30), "active"),
        };
        tenancies.push(json!({"id": t, "contact_id": c, "start_date": start, "state": state}));
        let a = format!("u-A{n:02}");
        match n {
            1..=10 => allocate(&mut units, &a, &t, "occupied", true),
            11..=13 => allocate(&mut units, &a, &t, "overlocked", true),
            14..=16 => allocate(&mut units, &a, &t, "reserved", false),
            17 => {
                allocate(&mut units, &a, &t, "occupied", true);
                allocate(&mut units, "u-B17", &t, "occupied", true);
            }
            18 => allocate(&mut units, &a, &t, "repossessed", true),
            _ => {}
        }
        if (1..=5).contains(&n) {
            allocate(&mut units, &format!("u-B{n:02}"), &t, "occupied", true);
        }
    }
    for u in units.iter_mut() {
        if u["id"] == "u-B29" || u["id"] == "u-B30" {
            u["status"] = json!("unavailable");
        }
    }
    json!({
        "unit_types": unit_types, "units": units, "contacts": contacts,
        "tenancies": tenancies, "allocations": allocations,
    })
}

/// Errors seeding the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The built-in snapshot does not parse (a bug).
    #[error("demo snapshot: {0}")]
    Snapshot(#[from] serde_json::Error),
    /// The replica refused it.
    #[error("seeding the demo site failed ({status}): {body}")]
    Refused {
        /// Status.
        status: u16,
        /// Body.
        body: String,
    },
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The simulated hardware did not start.
    #[error("simulated hardware: {0}")]
    Hardware(String),
}

/// Seeds the demo site unless the replica already holds units. Returns whether it seeded.
pub async fn seed(executor: &Executor) -> Result<bool, DemoError> {
    let filter = units::UnitFilter {
        limit: 1,
        ..Default::default()
    };
    let (_, total) = executor
        .store()
        .read(move |c| units::list(c, &filter))
        .await?;
    if total > 0 {
        return Ok(false);
    }
    let today = executor.today();
    let snapshot: Snapshot = serde_json::from_value(snapshot(today))?;
    let reply = executor
        .execute(Envelope {
            command: Command::Snapshot(Box::new(snapshot)),
            idempotency_key: None,
            fingerprint: [0; 32],
            if_match: None,
            request_id: "demo-seed".into(),
        })
        .await;
    if reply.status != 200 {
        return Err(DemoError::Refused {
            status: reply.status,
            body: String::from_utf8_lossy(&reply.body).into_owned(),
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::catalog::{Claim, DeviceCatalog, clashes};

    #[test]
    fn the_demo_units_bind_declared_devices_one_unit_each() {
        let catalog = DeviceCatalog::from_config(&declared_devices().expect("devices"));
        let today = NaiveDate::from_ymd_opt(2026, 3, 10).expect("date");
        let s: Snapshot = serde_json::from_value(snapshot(today)).expect("snapshot");
        let units: Vec<_> = s
            .units
            .into_iter()
            .map(|u| u.into_new(false).expect("valid unit"))
            .collect();
        for u in &units {
            assert_eq!(catalog.check(&u.bindings), [], "{:?}", u.names);
        }
        let claims: Vec<_> = units
            .iter()
            .map(|u| Claim::change(&u.names[0], &u.names[0], None, &u.bindings))
            .collect();
        assert_eq!(clashes(&claims), []);
    }

    #[cfg(feature = "demo-sim")]
    #[test]
    fn the_sim_units_are_the_demo_units_and_the_sim_accepts_them() {
        let mut site = hw_sim::config::SiteFile::parse(SIM_CONFIG).expect("sim.toml");
        site.units = sim_units();
        assert_eq!(site.units.len(), 60);
        assert_eq!(site.units[0].name, "u-A01");
        assert_eq!(site.units[0].lock.as_deref(), Some("lock-A01"));
        let b01 = &site.units[30];
        assert_eq!(b01.name, "u-B01");
        assert_eq!(b01.overlock.as_ref().map(|c| c.coil), Some(2));
        assert_eq!(b01.door.as_ref().map(|d| d.input), Some(1));
        assert_eq!(site.validate(), Ok(()));
    }
}
