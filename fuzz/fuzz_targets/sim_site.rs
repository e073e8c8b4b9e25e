//! hw-sim site files: `SiteFile::parse` and `validate` (what `SiteFile::load` runs), and
//! `ephemeral`. Checks: a valid site file survives serialize → parse → validate unchanged.
#![no_main]

use hw_sim::config::SiteFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(site) = SiteFile::parse(text) else {
        return;
    };
    if site.validate().is_err() {
        return;
    }
    let _ = site.ephemeral(std::path::Path::new("/nonexistent"));
    let again = toml::to_string(&site).expect("a valid site file serializes");
    let back = SiteFile::parse(&again)
        .unwrap_or_else(|e| panic!("serialized site file does not parse: {e}\n{again}"));
    if let Err(p) = back.validate() {
        panic!("serialized site file no longer validates: {p:?}\n{again}");
    }
    assert_eq!(again, toml::to_string(&back).expect("serializes"));
});
