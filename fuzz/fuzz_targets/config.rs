//! The gateway's config file: `Config::from_toml` (the TOML source `Config::load` uses),
//! `validate`, `warnings`, and the MQTT URL parse the link does at start. Checks: a config
//! that validates survives serialize → parse → validate unchanged (what `unitgate config`
//! prints is what it reads back).
#![no_main]

use libfuzzer_sys::fuzz_target;
use unitgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::from_toml(text) else {
        return;
    };
    let _ = cfg.warnings();
    if let Some(m) = &cfg.cloud.mqtt {
        let _ = unitgate::cloud::mqtt::parse_url(&m.url);
    }
    if cfg.validate().is_err() {
        return;
    }
    let _ = cfg.tz();
    let again = toml::to_string(&cfg).expect("a valid config serializes");
    let back = Config::from_toml(&again)
        .unwrap_or_else(|e| panic!("serialized config does not parse: {e}\n{again}"));
    if let Err(p) = back.validate() {
        panic!("serialized config no longer validates: {p:?}\n{again}");
    }
    let twice = toml::to_string(&back).expect("serializes");
    assert_eq!(again, twice, "serialize → parse is not stable");
});
