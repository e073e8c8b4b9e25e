//! SIGHUP: read the config file again and apply what can change while running.
//!
//! Applied: `api.tokens` (swapped for the next request), the site's name, access hours and
//! automation settings (written to the site row), `[access]`, and `[devices]` (the device
//! drivers, reconcilers and gate controller restart with the new section). Everything else
//! (listen address, TLS, data_dir, cloud links, logging, the metrics listener, site id and
//! timezone, the lock API's id) needs a restart: it is reported and left as it was.
//!
//! A file that does not load or validate is refused as a whole, every problem logged,
//! and the running config stays. So does one whose devices cannot be started: the
//! previous devices are started again.

use crate::config::Config;
use crate::gateway::{Gateway, site_settings};
use crate::store::{StoreError, site};
use serde_json::Value;
use std::path::PathBuf;

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys applied, e.g. `api.tokens`, `devices`.
    pub applied: Vec<String>,
    /// Keys that differ from the running config but need a restart; left as they were.
    pub needs_restart: Vec<String>,
}

/// Why a reload was refused (the running config stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not load (syntax, unknown key, wrong type).
    #[error("{0}")]
    Load(#[from] crate::config::ConfigError),
    /// The file loads but has problems, each naming its key.
    #[error("{} problem(s): {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<crate::config::ConfigProblem>),
    /// The new devices could not be started; the previous ones run again.
    #[error("the new devices cannot start ({0}); the previous devices were restarted")]
    Devices(String),
    /// The site row could not be updated.
    #[error("cannot update the site settings: {0}")]
    Store(#[from] StoreError),
}

/// Re-reads one config file on demand and remembers what is running.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    running: Config,
}

/// The top-level keys of `section` whose values differ, as `section.key`.
fn changed(section: &str, old: &impl serde::Serialize, new: &impl serde::Serialize) -> Vec<String> {
    let (old, new) = (
        serde_json::to_value(old).unwrap_or(Value::Null),
        serde_json::to_value(new).unwrap_or(Value::Null),
    );
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| o.get(*k) != n.get(*k))
                .map(|k| format!("{section}.{k}"))
                .collect()
        }
        (o, n) if o != n => vec![section.to_owned()],
        _ => Vec::new(),
    }
}

fn lock_api_id(cfg: &Config) -> Option<&str> {
    cfg.devices.lock_api.as_ref().map(|l| l.id.as_str())
}

/// Splits the differences between the running config and a new one into what a reload
/// applies and what needs a restart, and builds the config that will then be running.
pub fn plan(running: &Config, new: &Config) -> (Config, Reloaded) {
    let mut next = running.clone();
    let mut r = Reloaded::default();
    for key in changed("site", &running.site, &new.site) {
        match key.as_str() {
            "site.id" | "site.timezone" => r.needs_restart.push(key),
            _ => r.applied.push(key),
        }
    }
    next.site.name = new.site.name.clone();
    next.site.access_hours = new.site.access_hours.clone();
    next.site.auto_occupy = new.site.auto_occupy;
    next.site.auto_occupy_at = new.site.auto_occupy_at.clone();
    next.site.auto_deallocate = new.site.auto_deallocate;
    next.site.auto_overlock = new.site.auto_overlock;
    for key in changed("api", &running.api, &new.api) {
        if key == "api.tokens" {
            next.api.tokens = new.api.tokens.clone();
            r.applied.push(key);
        } else {
            r.needs_restart.push(key);
        }
    }
    if !changed("access", &running.access, &new.access).is_empty() {
        next.access = new.access.clone();
        r.applied.push("access".into());
    }
    if !changed("devices", &running.devices, &new.devices).is_empty() {
        // Queued smart-lock commands are addressed to the lock API's id.
        if lock_api_id(running) == lock_api_id(new) {
            next.devices = new.devices.clone();
            r.applied.push("devices".into());
        } else {
            r.needs_restart.push("devices.lock_api.id".into());
        }
    }
    r.needs_restart
        .extend(changed("store", &running.store, &new.store));
    r.needs_restart
        .extend(changed("log", &running.log, &new.log));
    r.needs_restart
        .extend(changed("cloud", &running.cloud, &new.cloud));
    r.needs_restart
        .extend(changed("metrics", &running.metrics, &new.metrics));
    (next, r)
}

impl Reloader {
    /// A reloader for `path`, whose contents `running` was started from.
    pub fn new(path: PathBuf, running: Config) -> Reloader {
        Reloader { path, running }
    }

    /// The config now running.
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Reloads and logs one line saying what changed (or every problem, when refused).
    pub async fn reload(&mut self, gw: &mut Gateway) -> Option<Reloaded> {
        match self.try_reload(gw).await {
            Ok(r) => {
                tracing::info!(
                    config = %self.path.display(),
                    applied = ?r.applied,
                    needs_restart = ?r.needs_restart,
                    "SIGHUP: config reloaded{}",
                    if r.applied.is_empty() && r.needs_restart.is_empty() {
                        " (nothing changed)"
                    } else if r.needs_restart.is_empty() {
                        ""
                    } else {
                        "; some changes need a restart and were left as they were"
                    }
                );
                Some(r)
            }
            Err(e) => {
                tracing::error!(
                    config = %self.path.display(),
                    "SIGHUP: config refused, the running config stays: {e}"
                );
                None
            }
        }
    }

    /// Reloads: everything or nothing of what can change while running.
    pub async fn try_reload(&mut self, gw: &mut Gateway) -> Result<Reloaded, ReloadError> {
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || Config::load_unchecked(Some(&path)))
            .await
            .map_err(|_| StoreError::Closed)??;
        new.validate().map_err(ReloadError::Invalid)?;
        let (next, report) = plan(&self.running, &new);
        next.validate().map_err(ReloadError::Invalid)?;
        let devices_changed = report
            .applied
            .iter()
            .any(|k| k == "devices" || k == "access" || k == "site.access_hours");
        if devices_changed && let Err(e) = gw.restart_devices(&next).await {
            if let Err(again) = gw.restart_devices(&self.running).await {
                tracing::error!(error = %again, "the previous devices cannot start again either");
            }
            return Err(ReloadError::Devices(e.to_string()));
        }
        if report.applied.iter().any(|k| k.starts_with("site.")) {
            let (id, name, tz) = (
                next.site.id.clone(),
                next.site.name.clone(),
                next.site.timezone.clone(),
            );
            let (settings, now) = (site_settings(&next.site), gw.executor.now());
            gw.executor
                .store()
                .write(move |c| site::ensure(c, &id, &name, &tz, &settings, now))
                .await?;
        }
        gw.tokens.replace(&next.api.tokens);
        self.running = next;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::from_toml(&format!(
            "[site]\nid = \"s1\"\ntimezone = \"Europe/London\"\n[api]\nplain_http = true\nlisten = \"127.0.0.1:0\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn tokens_and_hours_apply_listen_and_cloud_need_a_restart() {
        let old = cfg("");
        let mut new = cfg("[site.access_hours]\nmon = \"06:00-22:00\"\n[access]\nlockout_s = 30\n");
        new.api.listen = "127.0.0.1:1".into();
        new.api.tokens.push(crate::config::TokenConfig {
            name: "t".into(),
            sha256: "00".repeat(32),
            scopes: vec!["read".into()],
        });
        new.cloud.backlog_cap_mib = 1;
        new.metrics.listen = "127.0.0.1:9464".into();
        let (next, r) = plan(&old, &new);
        assert_eq!(
            r.applied,
            ["site.access_hours", "api.tokens", "access"],
            "{r:?}"
        );
        assert_eq!(
            r.needs_restart,
            ["api.listen", "cloud.backlog_cap_mib", "metrics.listen"]
        );
        assert_eq!(next.api.listen, old.api.listen);
        assert_eq!(next.metrics.listen, old.metrics.listen);
        assert_eq!(next.cloud.backlog_cap_mib, old.cloud.backlog_cap_mib);
        assert_eq!(next.api.tokens.len(), 1);
        assert_eq!(next.access.lockout_s, 30);
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let (_, r) = plan(&cfg(""), &cfg(""));
        assert_eq!(r, Reloaded::default());
    }
}
