//! The MQTT link against a real broker (rumqttd in a child process), with an independent
//! rumqttc client playing the cloud: commands and replies over MQTT 5 and 3.1.1, signed
//! commands, the retained status and unit states, and event delivery across broker and
//! gateway restarts.

#[path = "common/broker.rs"]
mod broker;
mod common;

use axum::body::Bytes;
use broker::Broker;
use common::{TestClock, TestGateway, test_config};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use unitgate::cloud::signing::sign;
use unitgate::config::MqttConfig;

const SITE: &str = "site-test";
const WAIT: Duration = Duration::from_secs(20);

#[test]
#[ignore = "the broker's own process, started by tests/common/broker.rs"]
fn embedded_broker_process() {
    broker::serve_if_child();
}

// ---- the cloud side ---------------------------------------------------------------------

/// A message the cloud received.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Bytes,
    retain: bool,
    correlation: Option<Bytes>,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

enum CloudClient {
    V3(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// An independent MQTT client playing the cloud; it reconnects (and resubscribes) on its own.
struct Cloud {
    client: CloudClient,
    rx: mpsc::UnboundedReceiver<Msg>,
    subacks: mpsc::UnboundedReceiver<()>,
    subs: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cloud {
    async fn connect(port: u16, v5: bool, subs: &[String]) -> Cloud {
        let id = format!("cloud-{}", rand_id());
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, subacks) = mpsc::unbounded_channel();
        let n = subs.len();
        let subs = subs.to_vec();
        let (client, task) = if v5 {
            let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
            o.set_max_packet_size(Some(8 << 20));
            let (c, mut l) = rumqttc::v5::AsyncClient::new(o, 100);
            let c2 = c.clone();
            let task = tokio::spawn(async move {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::{Event, Incoming};
                loop {
                    match l.poll().await {
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                            for s in &subs {
                                let _ = c2.try_subscribe(s.clone(), QoS::AtLeastOnce);
                            }
                        }
                        Ok(Event::Incoming(Incoming::SubAck(_))) => {
                            let _ = sub_tx.send(());
                        }
                        Ok(Event::Incoming(Incoming::Publish(p))) => {
                            let _ = tx.send(Msg {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload,
                                retain: p.retain,
                                correlation: p.properties.and_then(|pr| pr.correlation_data),
                            });
                        }
                        Ok(_) => {}
                        // The broker is restarting: try again shortly.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
            (CloudClient::V5(c), task)
        } else {
            let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
            o.set_max_packet_size(8 << 20, 8 << 20);
            let (c, mut l) = rumqttc::AsyncClient::new(o, 100);
            let c2 = c.clone();
            let task = tokio::spawn(async move {
                use rumqttc::{Event, Packet, QoS};
                loop {
                    match l.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            for s in &subs {
                                let _ = c2.try_subscribe(s.clone(), QoS::AtLeastOnce);
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            let _ = sub_tx.send(());
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let _ = tx.send(Msg {
                                topic: p.topic,
                                payload: p.payload,
                                retain: p.retain,
                                correlation: None,
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            });
            (CloudClient::V3(c), task)
        };
        let mut cloud = Cloud {
            client,
            rx,
            subacks,
            subs: n,
            task,
        };
        cloud.subscribed().await;
        cloud
    }

    /// Waits for the subscriptions of the next (re)connection.
    async fn subscribed(&mut self) {
        for _ in 0..self.subs {
            tokio::time::timeout(WAIT, self.subacks.recv())
                .await
                .expect("the cloud client subscribes")
                .expect("cloud task runs");
        }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>, response: Option<(&str, &[u8])>) {
        match &self.client {
            CloudClient::V3(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish"),
            CloudClient::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                use rumqttc::v5::mqttbytes::v5::PublishProperties;
                let props = PublishProperties {
                    response_topic: response.map(|(t, _)| t.to_owned()),
                    correlation_data: response.map(|(_, c)| Bytes::copy_from_slice(c)),
                    ..Default::default()
                };
                c.publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                    .await
                    .expect("publish")
            }
        }
    }

    /// The next message matching `pred` (others are skipped), within the deadline.
    async fn next(&mut self, what: &str, pred: impl Fn(&Msg) -> bool) -> Msg {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if pred(&m) => return m,
                Ok(Some(_)) => continue,
                _ => panic!("no {what} within {WAIT:?}"),
            }
        }
    }
}

fn rand_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn topic(rest: &str) -> String {
    format!("unitgate/v1/{SITE}/{rest}")
}

// ---- the gateway side --------------------------------------------------------------------

fn mqtt_config(url: &str, v5: bool) -> MqttConfig {
    serde_json::from_value(json!({
        "url": url,
        "protocol": if v5 { "v5" } else { "v3.1.1" },
        "reconnect_max_s": 1,
        "inflight": 20,
    }))
    .expect("mqtt config")
}

async fn gateway(mqtt: MqttConfig) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(dir.path());
    cfg.cloud.mqtt = Some(mqtt);
    cfg.validate().expect("valid config");
    TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await
}

/// Waits until the gateway's link is up (its retained `online` is seen).
async fn online(cloud: &mut Cloud) {
    cloud
        .next("status online", |m| {
            m.topic == topic("status") && &m.payload[..] == b"online"
        })
        .await;
}

/// Sends a command and waits for its reply (MQTT 5: response topic + correlation data;
/// 3.1.1: the reply topic, which the cloud must have subscribed to).
async fn command(cloud: &mut Cloud, op: &str, body: Value) -> Value {
    let rid = body["request_id"].as_str().expect("request_id").to_owned();
    let payload = serde_json::to_vec(&body).expect("json");
    call(cloud, op, payload, &rid).await
}

async fn call(cloud: &mut Cloud, op: &str, payload: Vec<u8>, rid: &str) -> Value {
    let v5 = matches!(cloud.client, CloudClient::V5(_));
    let response = topic("cloud-inbox");
    let corr = format!("corr-{rid}");
    cloud
        .publish(
            &topic(&format!("cmd/{op}")),
            payload,
            v5.then_some((response.as_str(), corr.as_bytes())),
        )
        .await;
    let reply_topic = if v5 {
        response.clone()
    } else {
        topic(&format!("reply/{rid}"))
    };
    let m = cloud
        .next(&format!("reply to {op} {rid}"), |m| {
            m.topic == reply_topic && (!v5 || m.correlation.as_deref() == Some(corr.as_bytes()))
        })
        .await;
    m.json()
}

fn assert_ok(reply: &Value, rid: &str) -> Value {
    assert_eq!(reply["request_id"], rid, "{reply}");
    assert_eq!(reply["ok"], true, "{reply}");
    reply["result"].clone()
}

fn assert_error(reply: &Value, code: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    let e = &reply["error"];
    assert_eq!(e["code"], code, "{reply}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    assert!(e["details"].is_array(), "{reply}");
    assert!(e["request_id"].is_string(), "{reply}");
}

// ---- commands ----------------------------------------------------------------------------

#[tokio::test]
async fn every_route_family_over_mqtt5_with_response_topic_replies() {
    let b = Broker::start();
    let tg = gateway(mqtt_config(&b.url(true), true)).await;
    let mut cloud = Cloud::connect(b.v5, true, &[topic("status"), topic("cloud-inbox")]).await;
    online(&mut cloud).await;
    tg.seed(3).await;

    // Sync upserts.
    let r = command(
        &mut cloud,
        "upsert_unit_type",
        json!({"request_id": "m1", "id": "big", "name": "Big"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m1")["unit_type"]["id"], "big");
    let r = command(
        &mut cloud,
        "upsert_contact",
        json!({"request_id": "m2", "id": "c9", "name": "Nine", "access_code": "9999"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m2")["contact"]["id"], "c9");
    assert!(
        r.to_string().find("9999").is_none(),
        "the PIN never comes back"
    );
    let r = command(
        &mut cloud,
        "upsert_tenancy",
        json!({"request_id": "m3", "id": "t9", "contact_id": "c9", "start_date": "2026-03-01"}),
    )
    .await;
    assert_ok(&r, "m3");

    // Allocations: the unit really changes, as HTTP sees it.
    let r = command(
        &mut cloud,
        "grant_access",
        json!({"request_id": "m4", "unit_id": "u1", "tenancy_id": "t9"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m4")["unit"]["status"], "occupied");
    assert_eq!(tg.status_of("u1").await, "occupied");
    let r = command(
        &mut cloud,
        "overlock",
        json!({"request_id": "m5", "contact_id": "c9"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m5")["units"][0]["status"], "overlocked");
    let r = command(
        &mut cloud,
        "remove_overlock",
        json!({"request_id": "m6", "contact_id": "c9"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m6")["units"][0]["status"], "occupied");
    let r = command(
        &mut cloud,
        "reserve",
        json!({"request_id": "m7", "unit_id": "u2", "tenancy_id": "t-future"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m7")["unit"]["status"], "reserved");
    let r = command(
        &mut cloud,
        "deallocate",
        json!({"request_id": "m8", "unit_id": "u2"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m8")["unit"]["status"], "available");
    let r = command(
        &mut cloud,
        "set_status",
        json!({"request_id": "m9", "unit_id": "u3", "status": "unavailable"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m9")["unit"]["status"], "unavailable");

    // Idempotency: the same request id answers the first result and changes nothing.
    let before = tg.last_seq().await;
    let r = command(
        &mut cloud,
        "grant_access",
        json!({"request_id": "m4", "unit_id": "u1", "tenancy_id": "t9"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m4")["unit"]["status"], "occupied");
    assert_eq!(tg.last_seq().await, before);

    // Units and reads.
    let r = command(
        &mut cloud,
        "update_unit",
        json!({"request_id": "m10", "unit_id": "u1", "unit": {"floor": 2}}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m10")["unit"]["floor"], 2);
    let r = command(
        &mut cloud,
        "get_unit",
        json!({"request_id": "m11", "unit_id": "u1"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "m11")["unit"]["status"], "occupied");
    let r = command(
        &mut cloud,
        "list_units",
        json!({"request_id": "m12", "status": "available", "limit": 10}),
    )
    .await;
    let list = assert_ok(&r, "m12");
    assert_eq!(list["units"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["meta"]["pagination"]["per_page"], 10);
    let r = command(
        &mut cloud,
        "events",
        json!({"request_id": "m13", "after": 0, "limit": 5}),
    )
    .await;
    assert_eq!(
        assert_ok(&r, "m13")["events"].as_array().map(Vec::len),
        Some(5)
    );
    let r = command(&mut cloud, "devices", json!({"request_id": "m14"})).await;
    assert!(assert_ok(&r, "m14").is_array());

    // Refusals keep the contract's error shape.
    let r = command(
        &mut cloud,
        "reserve",
        json!({"request_id": "e1", "unit_id": "u1", "tenancy_id": "t-future"}),
    )
    .await;
    assert_error(&r, "invalid_transition");
    let r = command(
        &mut cloud,
        "reserve",
        json!({"request_id": "e2", "unit_id": "u2"}),
    )
    .await;
    assert_eq!(r["error"]["details"][0]["field"], "tenancy_id", "{r}");
    let r = command(
        &mut cloud,
        "get_unit",
        json!({"request_id": "e3", "unit_id": "nope"}),
    )
    .await;
    assert_error(&r, "not_found");
    let r = command(&mut cloud, "drop_tables", json!({"request_id": "e4"})).await;
    assert_error(&r, "unknown_operation");
    assert_eq!(r["request_id"], "e4");
    let r = command(&mut cloud, "get_unit", json!({"request_id": "e5"})).await;
    assert_eq!(r["error"]["details"][0]["field"], "unit_id", "{r}");
    // With a response topic even an unreadable command is answered.
    let r = call(&mut cloud, "reserve", b"not json{".to_vec(), "e6").await;
    assert_error(&r, "malformed_json");
    let r = call(&mut cloud, "reserve", b"[1,2]".to_vec(), "e7").await;
    assert_error(&r, "validation_error");
    let r = call(&mut cloud, "reserve", br#"{"unit_id":"u1"}"#.to_vec(), "e8").await;
    assert_eq!(r["error"]["details"][0]["field"], "request_id", "{r}");
    tg.stop().await;
}

#[tokio::test]
async fn mqtt311_replies_on_the_reply_topic_and_survives_garbage() {
    let b = Broker::start();
    let tg = gateway(mqtt_config(&b.url(false), false)).await;
    let mut cloud = Cloud::connect(b.v4, false, &[topic("status"), topic("reply/+")]).await;
    online(&mut cloud).await;
    tg.seed(2).await;

    // Garbage with no reply address: logged, not answered, nothing breaks.
    for junk in [&b"\xff\xfe"[..], b"{}", b"[]", br#"{"request_id": "a/b"}"#] {
        cloud
            .publish(&topic("cmd/reserve"), junk.to_vec(), None)
            .await;
    }
    let r = command(
        &mut cloud,
        "grant_access",
        json!({"request_id": "v3-1", "unit_id": "u1", "tenancy_id": "t-started"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "v3-1")["unit"]["status"], "occupied");
    let r = command(
        &mut cloud,
        "payment_failed",
        json!({"request_id": "v3-2", "contact_id": "c2"}),
    )
    .await;
    assert_ok(&r, "v3-2");
    let r = command(
        &mut cloud,
        "create_units",
        json!({"request_id": "v3-3", "unit": {
        "name": "N1,N2", "unit_type": "small", "width": 5, "length": 5, "height": 8,
        "door_height": 7, "door_width": 4, "door_type": "roll_up", "access_type": "indoor",
        "standard_rate": 10.0, "walk_thru_order": 9}}),
    )
    .await;
    assert_eq!(
        assert_ok(&r, "v3-3")["units"].as_array().map(Vec::len),
        Some(2)
    );
    let r = command(
        &mut cloud,
        "list_available_units",
        json!({"request_id": "v3-4"}),
    )
    .await;
    assert!(assert_ok(&r, "v3-4")["units"].is_array());
    let r = command(
        &mut cloud,
        "bulk_update_units",
        json!({"request_id": "v3-5", "units": [{"id": "nope", "floor": 1}]}),
    )
    .await;
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"]["error_hash"].is_object(), "{r}");
    let r = command(
        &mut cloud,
        "deallocate",
        json!({"request_id": "v3-6", "unit_id": "u1"}),
    )
    .await;
    assert_eq!(assert_ok(&r, "v3-6")["unit"]["status"], "available");
    let r = command(
        &mut cloud,
        "reserve",
        json!({"request_id": "v3-7", "unit_id": "u2", "tenancy_id": 5}),
    )
    .await;
    assert_error(&r, "validation_error");

    // Many at once: each reply carries its own request's answer.
    let mut ids = Vec::new();
    for i in 0..20u32 {
        let rid = format!("many-{i}");
        let unit = if i.is_multiple_of(2) { "u1" } else { "nope" };
        let body = json!({"request_id": rid, "unit_id": unit});
        cloud
            .publish(
                &topic("cmd/get_unit"),
                serde_json::to_vec(&body).expect("json"),
                None,
            )
            .await;
        ids.push((rid, unit));
    }
    let mut seen = std::collections::HashMap::new();
    while seen.len() < ids.len() {
        let m = cloud
            .next("concurrent replies", |m| m.topic.contains("/reply/many-"))
            .await;
        let rid = m.topic.rsplit('/').next().expect("rid").to_owned();
        seen.insert(rid, m.json());
    }
    for (rid, unit) in ids {
        let r = &seen[&rid];
        assert_eq!(r["request_id"], rid.as_str());
        assert_eq!(r["ok"], unit == "u1", "{rid}: {r}");
    }
    tg.stop().await;
}

// ---- signed commands ---------------------------------------------------------------------

#[tokio::test]
async fn signed_commands_good_bad_replayed_forbidden() {
    let b = Broker::start();
    let keys = tempfile::tempdir().expect("tempdir");
    let key = b"k-0123456789abcdef0123456789abcdef".to_vec();
    let (full, narrow) = (keys.path().join("full.key"), keys.path().join("narrow.key"));
    std::fs::write(&full, &key).expect("key");
    std::fs::write(&narrow, &key).expect("key");
    let mut m = mqtt_config(&b.url(true), true);
    m.signed_commands = true;
    m.clients = serde_json::from_value(json!([
        {"id": "cloud", "key_file": full, "operations": ["*"]},
        {"id": "reader", "key_file": narrow, "operations": ["get_unit"]},
    ]))
    .expect("clients");
    let mut tg = gateway(m).await;
    let mut cloud = Cloud::connect(b.v5, true, &[topic("status"), topic("cloud-inbox")]).await;
    online(&mut cloud).await;
    tg.seed(2).await;

    let signed = |client: &str, op: &str, nonce: i64, request: &str, key: &[u8]| {
        let mac = sign(key, op, nonce, request.as_bytes());
        format!(r#"{{"client_id":"{client}","nonce":{nonce},"hmac":"{mac}","request":{request}}}"#)
            .into_bytes()
    };
    // Good: the request's own bytes (spacing kept) are signed.
    let req = r#"{"request_id": "s1",  "unit_id": "u1", "tenancy_id": "t-started"}"#;
    let r = call(
        &mut cloud,
        "grant_access",
        signed("cloud", "grant_access", 1, req, &key),
        "s1",
    )
    .await;
    assert_eq!(assert_ok(&r, "s1")["unit"]["status"], "occupied");
    // Bad MAC (other key), unknown client: unauthorized, nothing changes.
    let req = r#"{"request_id":"s2","unit_id":"u1"}"#;
    let r = call(
        &mut cloud,
        "deallocate",
        signed(
            "cloud",
            "deallocate",
            2,
            req,
            b"another key, long enough........",
        ),
        "s2",
    )
    .await;
    assert_error(&r, "unauthorized");
    let r = call(
        &mut cloud,
        "deallocate",
        signed("ghost", "deallocate", 2, req, &key),
        "s2",
    )
    .await;
    assert_error(&r, "unauthorized");
    assert_eq!(tg.status_of("u1").await, "occupied");
    // A MAC for another operation does not carry over.
    let r = call(
        &mut cloud,
        "deallocate",
        signed("cloud", "get_unit", 3, req, &key),
        "s2",
    )
    .await;
    assert_error(&r, "unauthorized");
    // Replayed nonce.
    let req = r#"{"request_id":"s3","unit_id":"u1"}"#;
    let r = call(
        &mut cloud,
        "get_unit",
        signed("cloud", "get_unit", 1, req, &key),
        "s3",
    )
    .await;
    assert_error(&r, "replayed");
    // Forbidden operation for a narrow client, allowed one fine.
    let req = r#"{"request_id":"s4","unit_id":"u1"}"#;
    let r = call(
        &mut cloud,
        "deallocate",
        signed("reader", "deallocate", 1, req, &key),
        "s4",
    )
    .await;
    assert_error(&r, "forbidden");
    let req = r#"{"request_id":"s5","unit_id":"u1"}"#;
    let r = call(
        &mut cloud,
        "get_unit",
        signed("reader", "get_unit", 2, req, &key),
        "s5",
    )
    .await;
    assert_ok(&r, "s5");
    // An unsigned command is refused.
    let r = command(
        &mut cloud,
        "get_unit",
        json!({"request_id": "s6", "unit_id": "u1"}),
    )
    .await;
    assert_error(&r, "bad_request");

    // Nonces are durable: after a restart the old ones stay spent.
    tg.restart().await;
    online(&mut cloud).await;
    let req = r#"{"request_id":"s7","unit_id":"u1"}"#;
    let r = call(
        &mut cloud,
        "get_unit",
        signed("cloud", "get_unit", 1, req, &key),
        "s7",
    )
    .await;
    assert_error(&r, "replayed");
    let r = call(
        &mut cloud,
        "get_unit",
        signed("cloud", "get_unit", 10, req, &key),
        "s7",
    )
    .await;
    assert_ok(&r, "s7");
    tg.stop().await;
}

// ---- status and unit state ---------------------------------------------------------------

#[tokio::test]
async fn retained_online_then_offline_will_when_the_gateway_dies() {
    let b = Broker::start();
    let mut tg = gateway(mqtt_config(&b.url(true), true)).await;
    {
        let mut first = Cloud::connect(b.v5, true, &[topic("status")]).await;
        online(&mut first).await;
    }
    // A subscriber arriving later gets the retained state.
    let mut late = Cloud::connect(b.v5, true, &[topic("status")]).await;
    let m = late
        .next("retained status", |m| m.topic == topic("status"))
        .await;
    assert_eq!(&m.payload[..], b"online");
    assert!(m.retain);

    // Stopped: the link task ends and its socket closes without a DISCONNECT, as in a
    // crash, so the broker publishes the will.
    let gw = tg.gw.take().expect("running");
    gw.stop().await;
    late.next("offline will", |m| {
        m.topic == topic("status") && &m.payload[..] == b"offline"
    })
    .await;
    let mut later = Cloud::connect(b.v5, true, &[topic("status")]).await;
    let m = later
        .next("retained status", |m| m.topic == topic("status"))
        .await;
    assert_eq!(&m.payload[..], b"offline");
}

#[tokio::test]
async fn retained_unit_state_follows_each_change() {
    let b = Broker::start();
    let tg = gateway(mqtt_config(&b.url(false), false)).await;
    let mut cloud = Cloud::connect(b.v4, false, &[topic("status"), topic("units/+")]).await;
    online(&mut cloud).await;
    tg.seed(2).await;
    let a = tg
        .post(
            "/v1/units/u2/grant_access",
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    cloud
        .next("occupied unit state", |m| {
            m.topic == topic("units/u2") && m.json()["unit"]["status"] == "occupied"
        })
        .await;
    // A subscriber arriving later gets the current state, retained, as GET /v1/units/u2
    // shows it.
    let mut late = Cloud::connect(b.v4, false, &[topic("units/u2")]).await;
    let want = tg.get("/v1/units/u2").await.body;
    let m = late
        .next("retained unit state", |m| m.topic == topic("units/u2"))
        .await;
    assert!(m.retain);
    assert_eq!(m.json(), want);
    let a = tg.post("/v1/units/u2/deallocate", json!({})).await;
    assert_eq!(a.status, 200);
    late.next("available unit state", |m| {
        m.topic == topic("units/u2") && m.json()["unit"]["status"] == "available"
    })
    .await;
    tg.stop().await;
}

// ---- event delivery ----------------------------------------------------------------------

/// A TCP relay in front of the broker that can refuse connections, so a test decides when
/// the gateway may reconnect (after the cloud has resubscribed).
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        let open = Arc::new(AtomicBool::new(true));
        let gate = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = l.accept().await {
                if !gate.load(Ordering::SeqCst) {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Relay { port, open, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Collects events until `last` is seen; checks they come in `seq` order with none missing
/// after `from`, and that repeats (allowed only across a reconnect) stay within the window.
async fn events_until(cloud: &mut Cloud, from: i64, last: i64, window: usize) {
    let mut next = from + 1;
    let mut repeats = 0usize;
    while next <= last {
        let m = cloud
            .next(&format!("event {next}"), |m| m.topic == topic("events"))
            .await;
        let seq = m.json()["seq"].as_i64().expect("seq");
        assert_eq!(m.json()["site_id"], SITE);
        if seq < next {
            repeats += 1;
            continue;
        }
        assert_eq!(seq, next, "events out of order or missing");
        next += 1;
    }
    assert!(repeats <= window * 2, "{repeats} repeats");
}

#[tokio::test]
async fn events_in_order_across_a_broker_restart_and_a_gateway_restart() {
    let mut b = Broker::start();
    let relay = Relay::start(b.v5).await;
    let mut tg = gateway(mqtt_config(
        &format!("mqtt://127.0.0.1:{}", relay.port),
        true,
    ))
    .await;
    let mut cloud = Cloud::connect(
        b.v5,
        true,
        &[topic("status"), topic("events"), topic("hello")],
    )
    .await;
    online(&mut cloud).await;
    tg.seed(10).await;

    // A stream of allocation changes, with the broker killed and restarted in the middle.
    let churn = |tg: &TestGateway, round: usize| {
        let tg_base = tg.base.clone();
        let client = tg.client.clone();
        async move {
            for i in 1..=10 {
                let (op, body) = if round.is_multiple_of(2) {
                    ("grant_access", json!({"tenancy_id": "t-started"}))
                } else {
                    ("deallocate", json!({}))
                };
                let res = client
                    .post(format!("{tg_base}/v1/units/u{i}/{op}"))
                    .bearer_auth(common::ADMIN)
                    .json(&body)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(res.status(), 200);
            }
        }
    };
    churn(&tg, 0).await;
    relay.open.store(false, Ordering::SeqCst);
    b.restart();
    churn(&tg, 1).await; // committed while the broker is down
    cloud.subscribed().await;
    relay.open.store(true, Ordering::SeqCst);
    churn(&tg, 2).await;
    let last = tg.last_seq().await;
    events_until(&mut cloud, 0, last, 20).await;
    let status = tg.gw.as_ref().expect("gw").links.list();
    let mqtt = &status["mqtt"];
    assert!(mqtt.connected);
    // The cursor reaches the end once the last PUBACKs are in.
    let deadline = Instant::now() + WAIT;
    while tg.gw.as_ref().expect("gw").links.list()["mqtt"].delivered_seq < last {
        assert!(Instant::now() < deadline, "cursor stuck");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Gateway restart: changes made while the link is cut wait in the log and drain from
    // the cursor after the restart.
    relay.open.store(false, Ordering::SeqCst);
    b.restart();
    cloud.subscribed().await;
    churn(&tg, 3).await;
    let backlog_to = tg.last_seq().await;
    tg.restart().await;
    relay.open.store(true, Ordering::SeqCst);
    let hello = cloud
        .next("hello", |m| m.topic == topic("hello"))
        .await
        .json();
    assert_eq!(hello["site_id"], SITE);
    assert_eq!(hello["delivered_seq"], last);
    assert_eq!(hello["last_event_seq"], backlog_to);
    events_until(&mut cloud, last, backlog_to, 20).await;
    tg.stop().await;
}
