//! kill -9 with a backlog: the real `unitgate run` binary builds up undelivered events while
//! the broker is down, is killed with SIGKILL (no shutdown, no flush), and after a restart
//! drains the backlog from its durable cursor to an independent subscriber: every event,
//! in `seq` order, none missing.

#[path = "common/broker.rs"]
mod broker;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const TOKEN: &str = "kill-test-admin-token-0123456789";
const SITE: &str = "site-kill";
const UNITS: usize = 2000;
/// `[cloud.mqtt] inflight` of the gateway under test.
const INFLIGHT: i64 = 50;

#[test]
#[ignore = "the broker's own process, started by tests/common/broker.rs"]
fn embedded_broker_process() {
    broker::serve_if_child();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The gateway binary on `config`, waited for until its API answers.
async fn start_gateway(config: &std::path::Path, base: &str) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_unitgate"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unitgate starts");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the gateway never answered");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    child
}

/// The next `until` event seqs the subscriber receives.
async fn receive(el: &mut rumqttc::EventLoop, until: usize) -> Vec<i64> {
    let mut seqs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seqs.len() < until {
        let Ok(ev) = tokio::time::timeout_at(deadline, el.poll()).await else {
            panic!("only {} of {until} events arrived", seqs.len());
        };
        let ev = ev.expect("broker");
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let e: Value = serde_json::from_slice(&p.payload).expect("event JSON");
            seqs.push(e["seq"].as_i64().expect("seq"));
        }
    }
    seqs
}

async fn call(http: &reqwest::Client, method: reqwest::Method, url: String, body: Value) -> u16 {
    http.request(method, url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_survives_kill_9_and_drains_from_the_cursor() {
    let mut b = broker::Broker::start();
    b.kill(); // the cloud is unreachable while the backlog builds up
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[site]
id = "{SITE}"
name = "Kill test"
timezone = "Europe/London"

[store]
data_dir = "{data}"

[api]
listen = "127.0.0.1:{port}"
plain_http = true

[[api.tokens]]
name = "admin"
sha256 = "{hash}"
scopes = ["admin"]

[cloud.mqtt]
url = "{url}"
protocol = "v3.1.1"
reconnect_max_s = 1
inflight = {INFLIGHT}
"#,
            data = dir.path().join("data").display(),
            hash = unitgate::api::http::auth::token_hash_hex(TOKEN),
            url = b.url(false),
        ),
    )
    .expect("config");

    let mut gw = start_gateway(&config, &base).await;
    let http = reqwest::Client::new();
    let put = reqwest::Method::PUT;
    let created = call(
        &http,
        put,
        format!("{base}/v1/unit_types/small"),
        json!({"name": "Small"}),
    )
    .await;
    assert_eq!(created, 201, "unit type created");
    let names: Vec<String> = (1..=UNITS).map(|i| format!("K{i:04}")).collect();
    for chunk in names.chunks(100) {
        let status = call(
            &http,
            reqwest::Method::POST,
            format!("{base}/v1/units"),
            json!({"unit": {
                "name": chunk.join(","), "unit_type": "small", "width": 5, "length": 5,
                "height": 8, "door_height": 7, "door_width": 5, "door_type": "roll_up",
                "access_type": "indoor", "standard_rate": 45.0, "walk_thru_order": 1,
            }}),
        )
        .await;
        assert_eq!(status, 201, "units created");
    }
    let events: Value = http
        .get(format!("{base}/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    let backlog = events["backlog"]["events"].as_i64().expect("backlog");
    assert!(backlog >= UNITS as i64, "backlog {backlog}: {events}");

    // SIGKILL: no shutdown, no flush, the broker never saw any of it.
    gw.kill().expect("kill -9");
    gw.wait().expect("reaped");

    b.restart();
    let mut opts = MqttOptions::new("kill-test-cloud", "127.0.0.1", b.v4);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 64);
    client
        .subscribe(format!("unitgate/v1/{SITE}/events"), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.expect("broker") {
            break;
        }
    }

    // First run after the kill: killed again, with -9, in the middle of the drain.
    let mut gw = start_gateway(&config, &base).await;
    let first = receive(&mut el, UNITS / 3).await;
    gw.kill().expect("kill -9 mid-drain");
    gw.wait().expect("reaped");
    let mut gw = start_gateway(&config, &base).await;
    let mut second = Vec::new();
    while second.last().is_none_or(|s| *s < backlog) {
        second.extend(receive(&mut el, 1).await);
    }
    gw.kill().expect("kill");
    let _ = gw.wait();
    // One stream as the cloud saw it: the first run's events (including any it published
    // and the subscriber read only later), then the second run's from the cursor. At most
    // one step back, at the restart, by no more than the in-flight window; otherwise every
    // seq once, in order, none missing.
    let all: Vec<i64> = first.iter().chain(second.iter()).copied().collect();
    let back: Vec<usize> = (1..all.len()).filter(|&i| all[i] <= all[i - 1]).collect();
    assert!(back.len() <= 1, "more than one restart point: {back:?}");
    let split = back.first().copied().unwrap_or(all.len());
    let (run1, run2) = all.split_at(split);
    let end1 = *run1.last().expect("first run delivered");
    assert_eq!(run1, (1..=end1).collect::<Vec<_>>().as_slice());
    if let Some(&resumed) = run2.first() {
        let again = end1 + 1 - resumed;
        println!("kill -9 after {end1} events published; resumed at {resumed} ({again} again)");
        assert!(
            again <= INFLIGHT,
            "{again} duplicates: beyond the in-flight window"
        );
        assert_eq!(run2, (resumed..=backlog).collect::<Vec<_>>().as_slice());
    } else {
        assert_eq!(end1, backlog);
    }
}
