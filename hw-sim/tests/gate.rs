//! A gate opens when its strike coil energises (written by an independent Modbus client)
//! and its position sensor follows; it closes after the strike releases.

use hw_sim::Sim;
use hw_sim::config::SiteFile;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_modbus::prelude::*;

async fn input(sim: &Sim, n: usize) -> bool {
    let s: Value = reqwest::get(format!("{}/relays/gate-relays", sim.control_url()))
        .await
        .expect("GET relay")
        .json()
        .await
        .expect("JSON");
    s["inputs"][n].as_bool().expect("input")
}

async fn wait_input(sim: &Sim, n: usize, want: bool, within: Duration) -> Duration {
    let t0 = Instant::now();
    while input(sim, n).await != want {
        assert!(t0.elapsed() < within, "input {n} never became {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_sensor_follows_the_strike() {
    let site = SiteFile::parse(
        r#"
        [[devices.keypads]]
        id = "gate-1"
        zone = "main-gate"
        tcp = "127.0.0.1:0"
        gate = { board = "gate-relays", coil = 0 }
        gate_sensor = { board = "gate-relays", input = 0 }
        [[devices.relay_boards]]
        id = "gate-relays"
        transport = "tcp"
        address = "127.0.0.1:0"
        coils = 2
        inputs = 2
        "#,
    )
    .expect("site");
    let sim = Sim::start(&site, Some("127.0.0.1:0")).await.expect("sim");
    let devices: Value = reqwest::get(format!("{}/devices", sim.control_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let addr: SocketAddr = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "gate-relays")
        .and_then(|d| d["address"]["address"].as_str())
        .expect("board address")
        .parse()
        .expect("socket address");
    // A plain Modbus TCP client addresses unit 0xFF ("the device at this address").
    let mut modbus = tcp::connect(addr).await.expect("modbus connect");
    assert!(!input(&sim, 0).await, "closed at start");
    modbus
        .write_single_coil(0, true)
        .await
        .expect("transport")
        .expect("no exception");
    let opened = wait_input(&sim, 0, true, Duration::from_secs(2)).await;
    assert!(
        opened >= Duration::from_millis(250),
        "opens after the strike, not at once: {opened:?}"
    );
    assert!(!input(&sim, 1).await, "the other gate stays closed");
    modbus
        .write_single_coil(0, false)
        .await
        .expect("transport")
        .expect("no exception");
    let closed = wait_input(&sim, 0, false, Duration::from_secs(4)).await;
    assert!(
        closed >= Duration::from_millis(1000),
        "closes a while after the strike releases: {closed:?}"
    );
    sim.stop().await;
}
