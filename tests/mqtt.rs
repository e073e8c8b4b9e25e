//! The MQTT link against a real broker (rumqttd in a child process), with an independent
//! rumqttc client playing the cloud: commands and replies over MQTT 5 and 3.1.1, signed
//! commands, the retained status and unit states, and event delivery across broker and
//! gateway restarts.

#[path = "common/broker.rs"]
mod broker;
mod common;

use axum::body::Bytes;
use broker::{Broker, Relay};
use common::{TestClock, TestGateway, test_config};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
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
    assert_eq!(r["request_id"], "s6", "answered by its own request id: {r}");

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

// ---- commands acknowledged only after they ran ---------------------------------------------

/// A command whose execution is held up (the store's writer busy) when the link dies, and
/// whose gateway is then restarted before it could answer, is redelivered by the broker
/// after the reconnect and applied exactly once: with acks on receipt it would be lost.
async fn command_redelivered_after_the_link_dies_mid_command(v5: bool) {
    let b = Broker::start();
    let relay = Relay::start(if v5 { b.v5 } else { b.v4 }).await;
    let mut tg = gateway(mqtt_config(&format!("mqtt://127.0.0.1:{}", relay.port), v5)).await;
    let inbox = if v5 {
        topic("cloud-inbox")
    } else {
        topic("reply/+")
    };
    let mut cloud =
        Cloud::connect(if v5 { b.v5 } else { b.v4 }, v5, &[topic("status"), inbox]).await;
    online(&mut cloud).await;
    tg.seed(2).await;
    let before = tg.last_seq().await;

    // Hold the store's writer: the command arrives and waits in the middle of its work.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let store = tg.gw.as_ref().expect("gw").executor.store().clone();
    let blocker = tokio::spawn(async move {
        store
            .write(move |_| -> Result<(), unitgate::store::StoreError> {
                let _ = held.recv();
                Ok(())
            })
            .await
    });
    let body = json!({"request_id": "rd-1", "unit_id": "u1", "tenancy_id": "t-started"});
    let payload = serde_json::to_vec(&body).expect("json");
    let len = payload.len() as u64;
    let seen = relay.down.load(Ordering::SeqCst);
    let corr = b"corr-rd-1";
    cloud
        .publish(
            &topic("cmd/grant_access"),
            payload,
            v5.then_some((topic("cloud-inbox").as_str(), &corr[..])),
        )
        .await;
    // The command reached the gateway's socket ...
    let deadline = Instant::now() + WAIT;
    while relay.down.load(Ordering::SeqCst) < seen + len {
        assert!(
            Instant::now() < deadline,
            "the command never reached the gateway"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ... (a round trip through the gateway lets it read it) ...
    assert_eq!(tg.get("/v1/units/u2").await.status, 200);
    // ... and the link dies before the command ran; the gateway is then stopped before it
    // can answer, and comes back with the broker holding the command.
    relay.open.store(false, Ordering::SeqCst);
    relay.cut();
    release.send(()).expect("blocker waits");
    blocker.await.expect("blocker").expect("write");
    tg.restart().await;
    relay.open.store(true, Ordering::SeqCst);

    let reply_topic = if v5 {
        topic("cloud-inbox")
    } else {
        topic("reply/rd-1")
    };
    let m = cloud
        .next("the redelivered command's reply", |m| {
            m.topic == reply_topic
        })
        .await;
    let r = m.json();
    assert_eq!(assert_ok(&r, "rd-1")["unit"]["status"], "occupied");
    if v5 {
        assert_eq!(m.correlation.as_deref(), Some(&corr[..]));
    }
    assert_eq!(tg.status_of("u1").await, "occupied");
    // Applied once: one event for it, whatever the number of deliveries.
    let evs = tg.events_after(before).await;
    let for_u1: Vec<_> = evs
        .iter()
        .filter(|e| e.to_string().contains("\"u1\""))
        .collect();
    assert_eq!(for_u1.len(), 1, "{evs:?}");
    // Answered again, from the idempotency store, if the cloud sends it once more.
    let again = command(&mut cloud, "grant_access", body).await;
    assert_eq!(again["result"], r["result"]);
    assert_eq!(tg.events_after(before).await.len(), evs.len());
    tg.stop().await;
}

#[tokio::test]
async fn command_redelivered_after_the_link_dies_mid_command_v5() {
    command_redelivered_after_the_link_dies_mid_command(true).await;
}

#[tokio::test]
async fn command_redelivered_after_the_link_dies_mid_command_v311() {
    command_redelivered_after_the_link_dies_mid_command(false).await;
}

// ---- chunked snapshot --------------------------------------------------------------------

fn snapshot_unit(i: usize) -> Value {
    json!({
        "id": format!("s{i}"), "name": format!("S{i}"), "unit_type": "small",
        "status": "available", "width": 5, "length": 10, "height": 8, "door_height": 7,
        "door_width": 4, "door_type": "roll_up", "access_type": "indoor",
        "standard_rate": 60, "walk_thru_order": i, "zones": ["main-gate"],
    })
}

fn snapshot_of(units: usize) -> Vec<u8> {
    let units: Vec<Value> = (1..=units).map(snapshot_unit).collect();
    serde_json::to_vec(&json!({
        "unit_types": [{"id": "small", "name": "Small"}],
        "units": units,
        "contacts": [],
        "tenancies": [],
        "allocations": [],
    }))
    .expect("json")
}

/// Publishes `body` as `cmd/snapshot` chunks of `size` bytes, last chunk first.
async fn send_chunks(cloud: &Cloud, rid: &str, body: &[u8], size: usize) -> usize {
    let text = std::str::from_utf8(body).expect("utf-8");
    let parts: Vec<&str> = text
        .as_bytes()
        .chunks(size)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    let n = parts.len();
    for (i, part) in parts.iter().enumerate().rev() {
        let msg = json!({"request_id": rid, "chunk": i, "chunks": n, "data": part});
        let corr = format!("corr-{rid}");
        cloud
            .publish(
                &topic("cmd/snapshot"),
                serde_json::to_vec(&msg).expect("json"),
                Some((topic("cloud-inbox").as_str(), corr.as_bytes())),
            )
            .await;
    }
    n
}

#[tokio::test]
async fn snapshot_larger_than_a_packet_arrives_in_chunks_and_runs_once() {
    let b = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(dir.path());
    let mut m = mqtt_config(&b.url(true), true);
    m.max_packet_bytes = 4096;
    cfg.cloud.mqtt = Some(m);
    cfg.api.max_snapshot_bytes = 64 << 10;
    cfg.validate().expect("valid config");
    let tg = TestGateway::start_with(dir, cfg, TestClock::at("2026-03-10T12:00:00Z")).await;
    let mut cloud = Cloud::connect(b.v5, true, &[topic("status"), topic("cloud-inbox")]).await;
    online(&mut cloud).await;

    let body = snapshot_of(80);
    assert!(body.len() > 4 * 4096, "{} bytes", body.len());
    // Whole, it is refused as too large for one packet.
    let mut whole: Value = serde_json::from_slice(&body).expect("json");
    whole["request_id"] = json!("snap-whole");
    let r = command(&mut cloud, "snapshot", whole).await;
    assert_error(&r, "payload_too_large");
    assert_eq!(tg.get("/v1/units/s1").await.status, 404);

    // In chunks (sent last first): joined by index, run once, answered once.
    let n = send_chunks(&cloud, "snap-1", &body, 1500).await;
    assert!(n > 10, "{n} chunks");
    let m = cloud
        .next("the chunked snapshot's reply", |m| {
            m.topic == topic("cloud-inbox") && m.json()["request_id"] == "snap-1"
        })
        .await;
    assert_eq!(m.correlation.as_deref(), Some(&b"corr-snap-1"[..]));
    let r = m.json();
    assert_eq!(
        assert_ok(&r, "snap-1")["snapshot"]["units"]["created"],
        80,
        "{r}"
    );
    assert_eq!(tg.status_of("s80").await, "available");
    let units = tg.get("/v1/units?limit=200").await.body["units"]
        .as_array()
        .map(Vec::len);
    assert_eq!(units, Some(80));
    // Nothing more for snap-1 arrives before the answer to a later command.
    let later = command(
        &mut cloud,
        "get_unit",
        json!({"request_id": "after-snap", "unit_id": "s1"}),
    )
    .await;
    assert_ok(&later, "after-snap");
    while let Ok(m) = cloud.rx.try_recv() {
        assert_ne!(m.json()["request_id"], "snap-1", "answered twice");
    }

    // The same snapshot again, in chunks: the idempotent answer, nothing changes.
    let before = tg.last_seq().await;
    send_chunks(&cloud, "snap-1", &body, 1500).await;
    let m = cloud
        .next("the repeated snapshot's reply", |m| {
            m.json()["request_id"] == "snap-1"
        })
        .await;
    assert_eq!(m.json()["result"], r["result"]);
    assert_eq!(tg.last_seq().await, before);

    // Above api.max_snapshot_bytes in total: refused once, the rest ignored, nothing applied.
    let huge = snapshot_of(400);
    assert!(huge.len() > 64 << 10);
    send_chunks(&cloud, "snap-huge", &huge, 3000).await;
    let m = cloud
        .next("the oversized snapshot's refusal", |m| {
            m.json()["request_id"] == "snap-huge"
        })
        .await;
    assert_error(&m.json(), "payload_too_large");
    assert_eq!(tg.get("/v1/units/s81").await.status, 404);
    let later = command(
        &mut cloud,
        "get_unit",
        json!({"request_id": "after-huge", "unit_id": "s1"}),
    )
    .await;
    assert_ok(&later, "after-huge");
    while let Ok(m) = cloud.rx.try_recv() {
        assert_ne!(m.json()["request_id"], "snap-huge", "refused twice");
    }
    tg.stop().await;
}

// ---- a broker outage during allocation changes and gate decisions -----------------------

/// One keypad on the main gate, its strike on a Modbus TCP relay board (hw-sim).
const KEYPAD_SITE: &str = r#"
[[devices.keypads]]
id = "gate-1"
zone = "main-gate"
port = "{wires}/gate-1"
baud = 115200
address = 1
scbk = "5e1f0c2a9b8d7e6f4a3b2c1d0e9f8a7b"
gate = { board = "gate-relays", coil = 0 }
pulse_ms = 200

[[devices.relay_boards]]
id = "gate-relays"
transport = "tcp"
address = "127.0.0.1:0"
unit_id = 1
coils = 2
inputs = 2
timeout_ms = 300
poll_ms = 50
"#;

/// Types `keys` on the keypad and waits for the gate decision after `seq`; returns its seq.
async fn gate_decision(s: &common::site::SimSite, after: i64, keys: &str) -> i64 {
    let r = s
        .http
        .post(format!("{}/keypads/gate-1/keys", s.sim.control_url()))
        .json(&json!({"keys": keys}))
        .send()
        .await
        .expect("press");
    assert_eq!(r.status().as_u16(), 202);
    let deadline = Instant::now() + WAIT;
    loop {
        let evs = s.t.events_after(after).await;
        if let Some(e) = evs
            .iter()
            .find(|e| e["type"].as_str().is_some_and(|t| t.starts_with("access.")))
        {
            return e["seq"].as_i64().expect("seq");
        }
        assert!(Instant::now() < deadline, "no gate decision: {evs:?}");
        tokio::time::sleep(common::site::POLL).await;
    }
}

#[tokio::test]
async fn broker_outage_site_keeps_working_and_every_event_arrives_in_order() {
    let b = Broker::start();
    let relay = Relay::start(b.v5).await;
    let url = format!("mqtt://127.0.0.1:{}", relay.port);
    let s = common::site::SimSite::start_with(KEYPAD_SITE, 30, 6, |cfg| {
        cfg.cloud.mqtt = Some(mqtt_config(&url, true));
    })
    .await;
    let links = || s.t.gw.as_ref().expect("gw").links.list()["mqtt"].clone();
    let mut cloud = Cloud::connect(b.v5, true, &[topic("status"), topic("events")]).await;
    online(&mut cloud).await;
    common::site::until("keypad online", WAIT, || async {
        s.device("gate-1").await["online"] == true
    })
    .await;
    // c2 (PIN 2222) occupies u1, behind the main gate. Its event is where the cloud's view
    // starts: everything after it must arrive, in order.
    let mark = s
        .ok(
            "/v1/units/u1/grant_access",
            json!({"tenancy_id": "t-started"}),
        )
        .await;
    assert_eq!(mark["unit"]["status"], "occupied");
    let from = s.t.last_seq().await;
    cloud
        .next("the mark event", |m| {
            m.topic == topic("events") && m.json()["seq"].as_i64() == Some(from)
        })
        .await;

    // Allocation changes on u2..u6 and gate decisions (granted and denied), interleaved.
    let round = |r: usize| {
        let s = &s;
        async move {
            let mut last = s.t.last_seq().await;
            for i in 2..=6 {
                let (op, body) = if r.is_multiple_of(2) {
                    ("grant_access", json!({"tenancy_id": "t-started"}))
                } else {
                    ("deallocate", json!({}))
                };
                let a = s.t.post(&format!("/v1/units/u{i}/{op}"), body).await;
                assert_eq!(a.status, 200, "round {r}, u{i}: {:?}", a.body);
                if i % 2 == 0 {
                    let keys = if i == 4 { "9999#" } else { "2222#" };
                    last = gate_decision(s, s.t.last_seq().await, keys).await;
                }
            }
            last
        }
    };
    // The broker goes away (from the gateway's side) in the middle of a round, once some of
    // its events were delivered: the link drops, nothing else does.
    let delivered_before = links().delivered_seq;
    let cut = async {
        let deadline = Instant::now() + WAIT;
        while links().delivered_seq < from + 3 {
            assert!(Instant::now() < deadline, "no delivery before the outage");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        relay.open.store(false, Ordering::SeqCst);
        relay.cut();
    };
    tokio::join!(round(0), cut);
    let deadline = Instant::now() + WAIT;
    while links().connected {
        assert!(
            Instant::now() < deadline,
            "the link never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let committed_at_drop = s.t.last_seq().await;
    let mut gate_seqs = Vec::new();
    for r in 1..=3 {
        gate_seqs.push(round(r).await);
    }
    assert!(!links().connected, "the broker was still unreachable");
    let status = s.t.get("/v1/status").await;
    assert_eq!(status.status, 200);
    let during = s.t.last_seq().await;
    assert!(
        during >= committed_at_drop + 3 * 8,
        "{committed_at_drop} → {during}"
    );

    // The broker is back: the backlog drains in seq order, then new changes follow.
    relay.open.store(true, Ordering::SeqCst);
    round(4).await;
    let last = s.t.last_seq().await;
    let mut next = from + 1;
    let mut repeats = Vec::new();
    let mut decisions = 0;
    while next <= last {
        let m = cloud
            .next(&format!("event {next} of {last}"), |m| {
                m.topic == topic("events")
            })
            .await;
        let e = m.json();
        let seq = e["seq"].as_i64().expect("seq");
        if seq < next {
            repeats.push(seq);
            continue;
        }
        assert_eq!(seq, next, "events out of order or missing");
        if e["type"].as_str().is_some_and(|t| t.starts_with("access.")) {
            decisions += 1;
        }
        next += 1;
    }
    assert_eq!(decisions, 5 * 3, "every gate decision reached the cloud");
    // Repeats only of what was sent but not acknowledged when the link dropped.
    for r in &repeats {
        assert!(
            *r > delivered_before && *r <= committed_at_drop,
            "seq {r} repeated; only ({delivered_before}, {committed_at_drop}] may be: {repeats:?}"
        );
    }
    let deadline = Instant::now() + WAIT;
    while links().delivered_seq < last {
        assert!(
            Instant::now() < deadline,
            "cursor stuck at {}",
            links().delivered_seq
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The gate decisions taken during the outage are among them, as the log has them.
    for g in gate_seqs {
        assert!(g > committed_at_drop && g <= during, "{g}");
    }
    eprintln!(
        "outage: {} events committed while down, {} repeats after the reconnect",
        during - committed_at_drop,
        repeats.len()
    );
    s.stop().await;
}
