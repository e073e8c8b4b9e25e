//! Device faults against hw-sim over real transports, one after another on one site: a
//! Modbus TCP board offline for 10 s, corrupted replies on a Modbus RTU board (pty), the
//! lock API answering 503 and then 429 with Retry-After. For each: changes made during the
//! fault are retried and land within 2 s of its end, the other devices carry on meanwhile,
//! the process stays nearly idle (no busy loop), and the event log records offline/online.
//!
//! The only test in its binary, so the process CPU time it reads is the gateway's and the
//! simulator's alone.

mod common;

use common::site::{SimSite, until};
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

const TCP: &str = "tcp-1";
const RTU: &str = "rtu-1";
const LOCKS: &str = "locks";
/// Slack on the 2 s convergence target: the test's own polling of the control API.
const CONVERGE: Duration = Duration::from_millis(2100);
/// Most of a core the whole process may use while a device is down.
const IDLE_CPU: f64 = 0.10;

fn devices() -> String {
    format!(
        r#"
[[devices.relay_boards]]
id = "{TCP}"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 4
inputs = 4
timeout_ms = 200
poll_ms = 100

[[devices.relay_boards]]
id = "{RTU}"
transport = "rtu"
port = "{{wires}}/{RTU}"
baud = 19200
unit_id = 3
coils = 4
inputs = 4
timeout_ms = 200
poll_ms = 100

[devices.lock_api]
id = "{LOCKS}"
url = "http://127.0.0.1:0"
api_key_file = "{{wires}}/lock-api.key"
locks = ["lock-1", "lock-2"]
"#
    )
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name in parentheses; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().expect("ticks"))
        .collect();
    // USER_HZ is 100 on every Linux architecture the gateway runs on.
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// CPU share of one core used from `since` (CPU time, instant) until now.
fn cpu_share(since: (Duration, Instant)) -> f64 {
    (cpu_time() - since.0).as_secs_f64() / since.1.elapsed().as_secs_f64()
}

/// Waits out `d` from `from` (the end of an injected fault).
async fn sleep_until(from: Instant, d: Duration) {
    tokio::time::sleep_until(from + d).await;
}

/// The types of the `device.*` events about `device` after `seq`.
async fn device_events(s: &SimSite, seq: i64, device: &str) -> Vec<String> {
    s.t.events_after(seq)
        .await
        .iter()
        .filter(|e| e["data"]["device"] == device)
        .map(|e| e["type"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_converge_within_2_s_and_stall_nothing_else() {
    // Read back rarely, so only fault handling is at work.
    let s = SimSite::start(&devices(), 300, 6).await;
    s.bind("u1", json!({"kind": "relay", "board": TCP, "coil": 1}))
        .await;
    s.bind("u2", json!({"kind": "smart_lock", "id": "lock-1"}))
        .await;
    s.bind("u3", json!({"kind": "relay", "board": RTU, "coil": 1}))
        .await;
    until(
        "available units' coils on",
        Duration::from_secs(5),
        || async { s.coils(TCP).await[1] && s.coils(RTU).await[1] },
    )
    .await;
    let grant = json!({"tenancy_id": "t-started"});

    // 1. The TCP board goes silent for 10 s.
    let seq = s.t.last_seq().await;
    let set = s.fault(TCP, "offline", None, 10_000).await;
    let end = set + Duration::from_secs(10);
    until("TCP board seen offline", Duration::from_secs(3), || async {
        s.device(TCP).await["online"] == false
    })
    .await;
    s.ok("/v1/units/u1/grant_access", grant.clone()).await;
    assert_eq!(s.device(TCP).await["queue_depth"], 1);
    // The lock API and the other board carry on.
    s.ok("/v1/units/u2/grant_access", grant.clone()).await;
    s.ok("/v1/units/u3/grant_access", grant.clone()).await;
    let took = until(
        "lock and RTU coil while TCP is down",
        Duration::from_secs(1),
        || async {
            s.lock("lock-1").await == ("assigned".into(), Some("c2".into()))
                && !s.coils(RTU).await[1]
        },
    )
    .await;
    println!("[faults] other devices during the TCP outage: {took:?}");
    let idle = (cpu_time(), Instant::now());
    sleep_until(set, Duration::from_secs(9)).await;
    let share = cpu_share(idle);
    println!(
        "[faults] CPU while the TCP board is down: {:.1}% of a core",
        share * 100.0
    );
    assert!(share < IDLE_CPU, "busy while a board is down: {share:.3}");
    until(
        "TCP coil after recovery",
        Duration::from_secs(5),
        || async { !s.coils(TCP).await[1] },
    )
    .await;
    let after = end.elapsed();
    println!("[faults] TCP board: change landed {after:?} after the 10 s outage ended");
    assert!(after < CONVERGE, "{after:?} after recovery");
    assert_eq!(
        device_events(&s, seq, TCP).await,
        ["device.offline", "device.online"]
    );

    // 2. Every RTU reply corrupted (bad CRC) for 3 s.
    let seq = s.t.last_seq().await;
    let set = s.fault(RTU, "corrupt", Some(1.0), 3000).await;
    let end = set + Duration::from_secs(3);
    s.ok("/v1/units/u3/deallocate", json!({})).await;
    s.ok("/v1/units/u1/deallocate", json!({})).await;
    until(
        "TCP coil while RTU replies are garbage",
        Duration::from_secs(1),
        || async { s.coils(TCP).await[1] },
    )
    .await;
    until("RTU board converged", Duration::from_secs(6), || async {
        Instant::now() > end && s.coils(RTU).await[1] && s.device(RTU).await["queue_depth"] == 0
    })
    .await;
    let after = end.elapsed();
    println!("[faults] RTU corrupt replies: queue empty {after:?} after they stopped");
    assert!(after < CONVERGE, "{after:?} after recovery");
    let evs = device_events(&s, seq, RTU).await;
    assert!(
        evs.is_empty() || evs == ["device.offline", "device.online"],
        "{evs:?}"
    );

    // 3. The lock API answers 503 for 5 s, then 429 with Retry-After: 1 for 2 s.
    let seq = s.t.last_seq().await;
    let mut seen = s.sim.registry.bus.subscribe();
    let set = s.fault(LOCKS, "http503", None, 5000).await;
    s.ok("/v1/units/u2/deallocate", json!({})).await;
    s.ok("/v1/units/u1/grant_access", grant.clone()).await;
    until(
        "TCP coil while the lock API fails",
        Duration::from_secs(1),
        || async { !s.coils(TCP).await[1] },
    )
    .await;
    let idle = (cpu_time(), Instant::now());
    sleep_until(set, Duration::from_secs(5)).await;
    let share = cpu_share(idle);
    println!(
        "[faults] CPU while the lock API answers 503: {:.1}% of a core",
        share * 100.0
    );
    assert!(
        share < IDLE_CPU,
        "busy while the lock API is down: {share:.3}"
    );
    assert_eq!(s.lock("lock-1").await.0, "assigned", "503 applies nothing");
    let set = s.fault(LOCKS, "http429", Some(1.0), 2000).await;
    let end = set + Duration::from_secs(2);
    until("lock-1 unassigned", Duration::from_secs(6), || async {
        s.lock("lock-1").await == ("unassigned".into(), None)
    })
    .await;
    let late = end.elapsed();
    println!("[faults] lock API: converged {late:?} after the 429s ended");
    assert!(late < CONVERGE, "{late:?} after recovery");
    let mut requests = 0;
    while let Ok(o) = seen.try_recv() {
        if o.device == LOCKS && o.kind == "http_request" {
            requests += 1;
        }
    }
    println!("[faults] lock API: {requests} requests over 7 s of 503/429");
    assert!(
        (3..=30).contains(&requests),
        "{requests} requests: backed off, not hammered"
    );
    assert_eq!(
        device_events(&s, seq, LOCKS).await,
        ["device.offline", "device.online"]
    );
    until("queues empty", Duration::from_secs(3), || async {
        for d in [TCP, RTU, LOCKS] {
            if s.device(d).await["queue_depth"] != 0 {
                return false;
            }
        }
        true
    })
    .await;
    s.stop().await;
}
