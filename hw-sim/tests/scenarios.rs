//! `hw-sim run`: the shipped scenarios that need no gateway pass against the demo site;
//! a failing expectation exits 1 with a readable report; a bad file exits 2.

use std::process::Command;

fn hw_sim(args: &[&str]) -> (i32, String, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO_BIN_EXE_hw-sim"))
        .args(args)
        .current_dir(root)
        .env_remove("HW_SIM_URL")
        .output()
        .expect("run hw-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_scenarios_pass_against_the_demo_site() {
    let (code, out, err) = hw_sim(&[
        "run",
        "hw-sim/scenarios/door-sensors.toml",
        "hw-sim/scenarios/lock-api-outage.toml",
        "--site",
        "config/sim.toml",
        "--ephemeral",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("11 passed, 0 failed"), "{out}");
    assert!(out.contains("7 passed, 0 failed"), "{out}");
}

#[test]
fn a_failed_expectation_exits_1_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.toml");
    std::fs::write(
        &path,
        r#"
name = "expects a door that nobody opened"
[[steps]]
step = "expect_input"
board = "relay-1"
input = 5
on = true
within_ms = 200
[[steps]]
step = "wait"
ms = 1
"#,
    )
    .unwrap();
    let (code, out, _) = hw_sim(&[
        "run",
        path.to_str().unwrap(),
        "--site",
        "config/sim.toml",
        "--ephemeral",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  1  expect input relay-1/5 on within 200 ms"),
        "{out}"
    );
    assert!(out.contains("(input 5 is off)"), "{out}");
    assert!(out.contains("(not run)"), "{out}");
    assert!(out.contains("0 passed, 2 failed"), "{out}");
}

#[test]
fn the_gate_scenario_needs_a_gateway_and_says_so() {
    let (code, out, _) = hw_sim(&[
        "run",
        "hw-sim/scenarios/gate-entry.toml",
        "--site",
        "config/sim.toml",
        "--ephemeral",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("keypad gate-1 has no control panel polling it"),
        "{out}"
    );
}

#[test]
fn bad_scenario_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "name = \"x\"\n[[steps]]\nstep = \"explode\"\n").unwrap();
    let (code, _, err) = hw_sim(&["run", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("bad.toml") && err.contains("explode"), "{err}");
    let (code, _, err) = hw_sim(&["run", "/no/such/file.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("No such file"), "{err}");
}
