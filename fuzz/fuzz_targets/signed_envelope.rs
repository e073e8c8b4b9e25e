//! The signed-command envelope (`CloudClients::verify`), on any bytes and on envelopes the
//! harness signs around fuzzed request bytes. Input: `operation\npayload`.
//! Checks: a forged payload never verifies; a correctly signed envelope verifies, returns
//! the request bytes exactly as sent, still verifies after the envelope is re-encoded
//! (serde_json round trip, request kept raw), and stops verifying when a request byte or
//! the operation changes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use unitgate::cloud::signing::{CloudClients, SignatureError, sign};
use unitgate_fuzz::{CLIENT, CLIENT_KEY, split_line};

fn clients() -> &'static CloudClients {
    static C: std::sync::OnceLock<CloudClients> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        CloudClients::from_keys([
            (CLIENT.to_owned(), CLIENT_KEY.to_vec(), vec!["*".to_owned()]),
            (
                "narrow".to_owned(),
                b"narrow-key-narrow-key-narrow-key!".to_vec(),
                vec!["status".to_owned()],
            ),
        ])
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Envelope<'a> {
    client_id: String,
    nonce: i64,
    hmac: String,
    #[serde(borrow)]
    request: &'a RawValue,
}

fuzz_target!(|data: &[u8]| {
    let (op, payload) = split_line(data);
    let Ok(op) = std::str::from_utf8(op) else {
        return;
    };
    let c = clients();
    // Arbitrary bytes: the fuzzer has no key, so nothing it writes may verify.
    if let Ok(v) = c.verify(op, payload) {
        panic!("forged envelope verified: {v:?}");
    }
    // A real signature around the fuzzed request bytes.
    let Ok(raw) = serde_json::from_slice::<&RawValue>(payload) else {
        return;
    };
    let nonce = i64::from_le_bytes(
        payload
            .iter()
            .chain([0u8; 8].iter())
            .take(8)
            .copied()
            .collect::<Vec<_>>()
            .try_into()
            .unwrap_or([0; 8]),
    );
    let mac = sign(CLIENT_KEY, op, nonce, raw.get().as_bytes());
    let env = format!(
        r#"{{"client_id":"{CLIENT}","nonce":{nonce},"hmac":"{mac}","request":{}}}"#,
        raw.get()
    );
    let v = c
        .verify(op, env.as_bytes())
        .unwrap_or_else(|e| panic!("a signed envelope is refused: {e}"));
    assert_eq!(v.client_id, CLIENT);
    assert_eq!(v.nonce, nonce);
    assert_eq!(
        v.request.get(),
        raw.get(),
        "the request is passed on as sent"
    );
    // Re-encoded by another JSON writer (request kept raw): still verifies.
    let parsed: Envelope<'_> = serde_json::from_str(&env).expect("own envelope parses");
    let again = serde_json::to_vec_pretty(&parsed).expect("serializes");
    c.verify(op, &again)
        .unwrap_or_else(|e| panic!("re-encoded envelope refused: {e}"));
    // Another operation, or any change to the request bytes, breaks it.
    let other_op = format!("{op}x");
    assert_eq!(
        c.verify(&other_op, env.as_bytes()).err(),
        Some(SignatureError::Unauthorized)
    );
    let req = raw.get().as_bytes();
    let at = env.len() - 1 - req.len() + (nonce.unsigned_abs() as usize % req.len());
    let mut bent = env.clone().into_bytes();
    for flip in [0x01u8, 0x20] {
        bent[at] ^= flip;
        if let Ok(v) = c.verify(op, &bent) {
            panic!("a changed request verified: {v:?}");
        }
        bent[at] ^= flip;
    }
    // The narrow client may only call `status`.
    let narrow_key = b"narrow-key-narrow-key-narrow-key!";
    let mac = sign(narrow_key, op, nonce, raw.get().as_bytes());
    let env = format!(
        r#"{{"client_id":"narrow","nonce":{nonce},"hmac":"{mac}","request":{}}}"#,
        raw.get()
    );
    match c.verify(op, env.as_bytes()) {
        Ok(_) => assert_eq!(op, "status"),
        Err(SignatureError::Forbidden { .. }) => assert_ne!(op, "status"),
        Err(e) => panic!("narrow client: {e}"),
    }
});
