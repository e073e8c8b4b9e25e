//! MQTT commands as the broker delivers them: `unitgate/v1/{site}/cmd/{operation}` with a
//! payload, through `Dispatcher::handle` (the same path as `MqttLink`), into the real
//! router and SQLite replica. Input: `flags` byte, then `operation\npayload`.
//! flags bit 0: send to the signed-commands dispatcher, wrapping the payload in an envelope
//! the harness signs (so the fuzzer reaches past the MAC check); bit 1: MQTT 5 response
//! topic. Checks every reply is the contract's `{"request_id", "ok", "result"|"error"}`
//! on a topic without wildcards.
#![no_main]

use axum::body::Bytes;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use unitgate::cloud::dispatch::{Inbound, Receipt};
use unitgate_fuzz::{CLIENT, CLIENT_KEY, SITE, assert_error_shape, site, split_line};

static NONCE: AtomicI64 = AtomicI64::new(1);
static IDX: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (op, payload) = split_line(rest);
    let op = String::from_utf8_lossy(op);
    let topic = format!("unitgate/v1/{SITE}/cmd/{op}");
    let s = site();
    let signed = flags & 1 != 0;
    let payload: Vec<u8> = if signed {
        match serde_json::from_slice::<&serde_json::value::RawValue>(payload) {
            Ok(raw) => {
                let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
                let mac =
                    unitgate::cloud::signing::sign(CLIENT_KEY, &op, nonce, raw.get().as_bytes());
                format!(
                    r#"{{"client_id":"{CLIENT}","nonce":{nonce},"hmac":"{mac}","request":{}}}"#,
                    raw.get()
                )
                .into_bytes()
            }
            Err(_) => payload.to_vec(),
        }
    } else {
        payload.to_vec()
    };
    let cmd = Inbound {
        topic,
        payload: Bytes::from(payload),
        response_topic: (flags & 2 != 0).then(|| format!("reply/{SITE}/x")),
        correlation: (flags & 2 != 0).then(|| Bytes::from_static(b"corr")),
    };
    let receipt = Receipt {
        conn: 1,
        idx: IDX.fetch_add(1, Ordering::Relaxed),
    };
    let d = if signed { &s.signed } else { &s.dispatcher };
    let done = s.rt.block_on(d.handle(cmd, receipt));
    if let Some(reply) = &done.reply {
        assert!(
            !reply.topic.contains(['+', '#']),
            "reply on a wildcard topic {:?}",
            reply.topic
        );
        assert!(!reply.retain, "a reply is never retained");
        let v: serde_json::Value = serde_json::from_slice(&reply.payload).expect("a reply is JSON");
        assert!(v.get("request_id").is_some_and(|r| r.is_string()), "{v}");
        match v.get("ok").and_then(|o| o.as_bool()) {
            Some(true) => assert!(v.get("result").is_some(), "{v}"),
            Some(false) => assert_error_shape(&v),
            None => panic!("reply without ok: {v}"),
        }
        assert!(
            done.receipts.contains(&receipt),
            "an answered command is acknowledged"
        );
    }
    // Chunks wait for the rest (no receipt); anything else is done at once.
    assert!(done.receipts.len() <= 1 || done.reply.is_some());
});
