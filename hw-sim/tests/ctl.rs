//! `hw-sim ctl`: the built binary against a simulator started in-process (lock API and a
//! Modbus TCP relay board on port 0): output, `--json`, exit codes 0/1/2, `HW_SIM_URL`.

use hw_sim::Sim;
use hw_sim::config::{
    Devices, LockApiConfig, ModbusTransport, RelayBoardConfig, SimConfig, SiteFile,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn site() -> SiteFile {
    SiteFile {
        sim: SimConfig::default(),
        devices: Devices {
            relay_boards: vec![RelayBoardConfig {
                id: "relay-1".into(),
                transport: ModbusTransport::Tcp,
                address: "127.0.0.1:0".into(),
                port: String::new(),
                baud: 9600,
                parity: "none".into(),
                stop_bits: 1,
                unit_id: 1,
                coils: 10,
                inputs: 10,
                response_delay_ms: 0,
                timeout_ms: None,
                poll_ms: None,
                enabled: None,
            }],
            lock_api: Some(LockApiConfig {
                id: "locks".into(),
                url: "http://127.0.0.1:0".into(),
                api_key_file: Default::default(),
                rate_limit_per_s: 1000,
                locks: vec!["u1".into(), "u2".into(), "u3".into()],
                timeout_ms: None,
                enabled: None,
            }),
            ..Default::default()
        },
        units: Vec::new(),
    }
}

/// The simulator, and the lock API's URL and key read from the control API.
struct Fixture {
    sim: Sim,
    url: String,
    lock_url: String,
    key: String,
}

impl Fixture {
    async fn start() -> Fixture {
        let sim = Sim::start(&site(), Some("127.0.0.1:0"))
            .await
            .expect("start");
        let url = sim.control_url();
        let devices: Value = reqwest::get(format!("{url}/devices"))
            .await
            .expect("control API")
            .json()
            .await
            .expect("JSON");
        let locks = devices
            .as_array()
            .and_then(|l| l.iter().find(|d| d["id"] == "locks"))
            .expect("lock API")
            .clone();
        Fixture {
            sim,
            url,
            lock_url: locks["address"]["url"].as_str().expect("url").to_owned(),
            key: locks["address"]["api_key"]
                .as_str()
                .expect("key")
                .to_owned(),
        }
    }

    /// Runs `hw-sim ctl --url <control> <args>`: (exit code, stdout, stderr).
    async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--url", self.url.as_str()];
        all.extend_from_slice(args);
        run(&all, None).await
    }

    /// A change through the vendor API, as the gateway would make it.
    async fn vendor(&self, path: &str, body: Option<Value>) -> StatusCode {
        let mut r = reqwest::Client::new()
            .post(format!("{}{path}", self.lock_url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.expect("lock API").status()
    }

    async fn vendor_get_status(&self) -> StatusCode {
        reqwest::Client::new()
            .get(format!("{}/v1/locks/u1", self.lock_url))
            .bearer_auth(&self.key)
            .send()
            .await
            .expect("lock API")
            .status()
    }
}

fn command(args: &[&str], env_url: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hw-sim"));
    c.arg("ctl")
        .args(args)
        .env_remove("HW_SIM_URL")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    if let Some(u) = env_url {
        c.env("HW_SIM_URL", u);
    }
    c
}

async fn run(args: &[&str], env_url: Option<&str>) -> (i32, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), command(args, env_url).output())
        .await
        .expect("ctl finished within 30 s")
        .expect("ran hw-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(r: &(i32, String, String)) -> &str {
    assert_eq!(r.0, 0, "exit code; stdout {:?} stderr {:?}", r.1, r.2);
    &r.1
}

fn json_of(r: &(i32, String, String)) -> Value {
    serde_json::from_str(ok(r)).unwrap_or_else(|e| panic!("--json output: {e}: {}", r.1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_locks_lock_and_show() {
    let f = Fixture::start().await;
    assert_eq!(
        f.vendor("/v1/locks/u1/assign", Some(json!({"tenant_ref": "t-42"})))
            .await,
        StatusCode::OK
    );
    assert_eq!(
        f.vendor("/v1/locks/u3/overlock", None).await,
        StatusCode::OK
    );

    let r = f.ctl(&["devices"]).await;
    let out = ok(&r);
    assert!(out.starts_with("ID"), "{out}");
    assert!(
        out.contains("locks") && out.contains("lock_api") && out.contains(&f.lock_url),
        "{out}"
    );
    assert!(
        out.contains("relay-1") && out.contains("relay_board"),
        "{out}"
    );
    let d = json_of(&f.ctl(&["devices", "--json"]).await);
    assert_eq!(d.as_array().map(Vec::len), Some(2));

    let r = f.ctl(&["locks"]).await;
    let out = ok(&r);
    assert!(out.contains("u1") && out.contains("t-42"), "{out}");
    assert!(
        out.contains("3 locks: 1 assigned, 1 overlocked, 1 unassigned"),
        "{out}"
    );
    let l = json_of(&f.ctl(&["--json", "locks"]).await);
    assert_eq!(
        l[0],
        json!({"id": "u1", "state": "assigned", "assigned_to": "t-42"})
    );

    assert_eq!(ok(&f.ctl(&["lock", "u1"]).await), "u1: assigned to t-42\n");
    assert_eq!(ok(&f.ctl(&["lock", "u3"]).await), "u3: overlocked\n");
    let u2 = json_of(&f.ctl(&["lock", "u2", "--json"]).await);
    assert_eq!(u2["state"], "unassigned");

    let r = f.ctl(&["show"]).await;
    let out = ok(&r);
    for want in [
        "relay boards:",
        "relay-1",
        "coils  ( 10)  00000000 00",
        "locks:",
        "3 locks: 1 assigned, 1 overlocked, 1 unassigned",
        "faults: none",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    let s = json_of(&f.ctl(&["show", "--json"]).await);
    assert_eq!(s["locks"]["locks"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        s["relays"]["relay-1"]["coils"].as_array().map(Vec::len),
        Some(10)
    );
    f.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_faults_and_clear() {
    let f = Fixture::start().await;
    let r = f.ctl(&["fault", "locks", "http503", "--for", "30s"]).await;
    assert!(ok(&r).starts_with("locks: http503 ("), "{}", r.1);
    assert_eq!(f.vendor_get_status().await, StatusCode::SERVICE_UNAVAILABLE);
    let r = f
        .ctl(&["fault", "locks", "http429", "--value", "3", "--for", "2m"])
        .await;
    assert!(ok(&r).contains("http429=3"), "{}", r.1);

    let r = f.ctl(&["faults"]).await;
    let out = ok(&r);
    assert!(
        out.starts_with("locks: ") && out.contains("http429=3") && out.contains("http503"),
        "{out}"
    );
    let r = f.ctl(&["devices"]).await;
    assert!(ok(&r).contains("http503"), "{}", r.1);
    let r = f.ctl(&["show"]).await;
    assert!(ok(&r).contains("faults:\n  locks: "), "{}", r.1);
    let j = json_of(&f.ctl(&["faults", "--json"]).await);
    assert_eq!(j[0]["device"], "locks");

    let r = f.ctl(&["clear", "locks"]).await;
    assert_eq!(ok(&r), "cleared 2 faults\n");
    assert_eq!(f.vendor_get_status().await, StatusCode::OK);
    assert_eq!(ok(&f.ctl(&["faults"]).await), "no active faults\n");

    ok(&f
        .ctl(&[
            "fault", "relay-1", "delay", "--value", "5", "--for", "500ms",
        ])
        .await);
    assert_eq!(ok(&f.ctl(&["clear"]).await), "cleared 1 fault\n");
    f.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn door_and_relay() {
    let f = Fixture::start().await;
    let r = f.ctl(&["door", "relay-1", "3", "open"]).await;
    let out = ok(&r);
    assert!(out.starts_with("relay-1 input 3: open\n"), "{out}");
    assert!(out.contains("00010000 00"), "{out}");
    let r = f.ctl(&["relay", "relay-1", "--json"]).await;
    assert_eq!(json_of(&r)["inputs"][3], true);
    ok(&f.ctl(&["door", "relay-1", "3", "close"]).await);
    let r = f.ctl(&["relay", "relay-1"]).await;
    assert!(ok(&r).contains("inputs ( 10)  00000000 00"), "{}", r.1);
    f.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_prints_one_line_per_observation() {
    let f = Fixture::start().await;
    let mut child = command(&["--url", &f.url, "events", "--device", "locks"], None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let live = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
        .await
        .expect("subscribed in time")
        .expect("stderr");
    assert_eq!(live.as_deref(), Some("following events (Ctrl-C to stop)"));
    f.vendor("/v1/locks/u2/overlock", None).await;
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let l = stdout.next_line().await.expect("stdout").expect("a line");
            if l.contains("lock_state_changed") {
                return l;
            }
        }
    })
    .await
    .expect("observation printed in time");
    assert!(
        line.contains("locks") && line.contains("lock=u2") && line.contains("to=overlocked"),
        "{line}"
    );
    child.kill().await.expect("kill ctl events");
    f.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_exit_1_with_the_message() {
    let f = Fixture::start().await;
    let cases: [(&[&str], &str); 6] = [
        (&["lock", "nope"], "no lock \"nope\" (HTTP 404)"),
        (
            &["fault", "nosuch", "offline", "--for", "1s"],
            "no device \"nosuch\"",
        ),
        (&["clear", "nosuch"], "no device \"nosuch\""),
        (&["relay", "nosuch"], "no relay board \"nosuch\""),
        (&["door", "relay-1", "99", "open"], "no input 99"),
        (
            &["fault", "locks", "drop", "--value=-1", "--for", "1s"],
            "value must be",
        ),
    ];
    for (args, want) in cases {
        let (code, out, err) = f.ctl(args).await;
        assert_eq!(code, 1, "{args:?}: {out} {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
    let (code, out, err) = f.ctl(&["events", "--device", "nosuch"]).await;
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    f.sim.stop().await;

    // Nothing listening there any more.
    let (code, _, err) = run(&["--url", &f.url, "devices"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the control API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let cases: [&[&str]; 9] = [
        &[],
        &["explode"],
        &["lock"],
        &["fault", "locks", "http503"],
        &["fault", "locks", "bogus", "--for", "1s"],
        &["fault", "locks", "offline", "--for", "3x"],
        &[
            "fault", "locks", "offline", "--for", "1s", "--value", "many",
        ],
        &["door", "relay-1", "3", "ajar"],
        &["--url", "not a url", "devices"],
    ];
    for args in cases {
        let (code, out, err) = run(args, None).await;
        assert_eq!(code, 2, "{args:?}: {out} {err}");
        assert!(!err.is_empty(), "{args:?}: says why");
    }
    let (_, _, err) = run(&["fault", "locks", "bogus", "--for", "1s"], None).await;
    assert!(err.contains("http503"), "lists the kinds: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_from_hw_sim_url() {
    let f = Fixture::start().await;
    let r = run(&["locks"], Some(&f.url)).await;
    assert!(ok(&r).contains("3 locks"), "{}", r.1);
    f.sim.stop().await;
}
