//! Chunked `cmd/snapshot`: each input line is one command object, read by `Chunk::parse`
//! and fed to an `Assembler` as the dispatcher does (a line starting with `!` comes from a
//! second client). Checks against a model: a completed snapshot is exactly its latest parts
//! joined in index order and within the size limit, and every received chunk is handed
//! back for acknowledgement exactly once (on completion, refusal, ignore or expiry).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use unitgate::cloud::dispatch::{Inbound, Receipt};
use unitgate::cloud::mqtt_chunks::{Added, Assembler, Chunk, ReplyTo};

const MAX_TOTAL: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(60);

fuzz_target!(|data: &[u8]| {
    let asm = Assembler::new(MAX_TOTAL, TIMEOUT);
    let start = Instant::now();
    let cmd = Inbound {
        topic: "unitgate/v1/s/cmd/snapshot".into(),
        payload: Default::default(),
        response_topic: None,
        correlation: None,
    };
    let mut given = HashSet::new();
    let mut back: Vec<Receipt> = Vec::new();
    let mut model: HashMap<String, Vec<Option<String>>> = HashMap::new();
    for (i, line) in data.split(|&b| b == b'\n').enumerate().take(64) {
        let (caller, line) = match line.strip_prefix(b"!") {
            Some(l) => ("mqtt:other", l),
            None => ("mqtt", line),
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let c = match Chunk::parse(&v) {
            None => {
                assert!(v.get("chunk").is_none(), "a chunk field makes it a chunk");
                continue;
            }
            Some(Err(e)) => {
                assert_eq!(e.status, 400);
                continue;
            }
            Some(Ok(c)) => c,
        };
        assert!(c.chunk < c.chunks);
        let receipt = Receipt {
            conn: 1,
            idx: i as u64,
        };
        given.insert(receipt);
        let now = start + Duration::from_millis(i as u64);
        let (id, idx, n, part) = (c.request_id.clone(), c.chunk, c.chunks, c.data.clone());
        match asm.add(c, receipt, ReplyTo::of(&cmd, caller), now) {
            Added::Stored => {
                let m = model.entry(id).or_insert_with(|| vec![None; n]);
                assert_eq!(m.len(), n);
                m[idx] = Some(part);
                assert!(m.iter().any(Option::is_none), "stored, yet complete");
            }
            Added::Complete {
                body,
                reply_to,
                receipts,
            } => {
                let mut m = model.remove(&id).unwrap_or_else(|| vec![None; n]);
                m[idx] = Some(part);
                let want: String = m
                    .iter()
                    .map(|p| p.as_deref().expect("complete means every part"))
                    .collect();
                assert_eq!(body, want, "parts joined in index order");
                assert!(body.len() <= MAX_TOTAL);
                assert_eq!(reply_to.caller, caller);
                assert!(receipts.contains(&receipt));
                back.extend(receipts);
            }
            Added::Refused { error, receipts } => {
                model.remove(&id);
                assert!(matches!(error.status, 400 | 403 | 413 | 429), "{error:?}");
                assert!(receipts.contains(&receipt));
                back.extend(receipts);
            }
            Added::Ignored => back.push(receipt),
        }
    }
    for x in asm.expire(start + TIMEOUT * 2) {
        assert!(x.got.0 < x.got.1, "an expired assembly was incomplete");
        back.extend(x.receipts);
    }
    assert_eq!(asm.open(), 0);
    let unique: HashSet<_> = back.iter().copied().collect();
    assert_eq!(unique.len(), back.len(), "a chunk handed back twice");
    assert_eq!(unique, given, "every chunk is handed back exactly once");
});
