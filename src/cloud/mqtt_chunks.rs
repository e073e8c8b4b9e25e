//! `cmd/snapshot` in chunks, for snapshots larger than `cloud.mqtt.max_packet_bytes`: the
//! cloud sends `{"request_id", "chunk": i, "chunks": n, "data": "<part i of the JSON body>"}`
//! for i in 0..n under one `request_id`; the parts are joined in order and the snapshot runs
//! once, like any command.
//!
//! Memory is bounded: at most [`MAX_ASSEMBLIES`] snapshots are assembled at once, each at
//! most `api.max_snapshot_bytes` in total, and an assembly left incomplete is dropped after
//! the timeout. No chunk is acknowledged to the broker before the snapshot ran (or was
//! refused), so a gateway dying mid-assembly loses nothing: the broker redelivers them all.

use super::dispatch::{Inbound, Receipt};
use crate::api::error::ApiError;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Snapshots assembled at once, at most.
pub const MAX_ASSEMBLIES: usize = 4;
/// Chunks of one snapshot, at most.
const MAX_CHUNKS: usize = 100_000;

/// One chunk, as the cloud sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The snapshot's request id (the same in every chunk).
    pub request_id: String,
    /// This chunk's index, `0..chunks`.
    pub chunk: usize,
    /// How many chunks there are.
    pub chunks: usize,
    /// This chunk's part of the JSON body.
    pub data: String,
}

impl Chunk {
    /// Reads a chunk from a command object: `None` when it is no chunk (no `chunk` field),
    /// an error when it is a malformed one.
    pub fn parse(v: &serde_json::Value) -> Option<Result<Chunk, ApiError>> {
        let index = v.get("chunk")?;
        let bad = |m: &str| Some(Err(ApiError::new(400, "bad_request", m.to_owned())));
        let Some(request_id) = v.get("request_id").and_then(|r| r.as_str()) else {
            return bad("a snapshot chunk needs a request_id");
        };
        let (Some(chunk), Some(chunks)) = (
            index.as_u64(),
            v.get("chunks").and_then(serde_json::Value::as_u64),
        ) else {
            return bad("chunk and chunks must be non-negative integers");
        };
        let Some(data) = v.get("data").and_then(|d| d.as_str()) else {
            return bad("a snapshot chunk needs data: a string");
        };
        if chunks == 0 || chunks > MAX_CHUNKS as u64 || chunk >= chunks {
            return bad(&format!(
                "chunk must be in 0..chunks and chunks in 1..={MAX_CHUNKS}"
            ));
        }
        Some(Ok(Chunk {
            request_id: request_id.to_owned(),
            chunk: chunk as usize,
            chunks: chunks as usize,
            data: data.to_owned(),
        }))
    }
}

/// Where the answer to an assembled snapshot goes (taken from its first chunk).
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// The command topic.
    pub topic: String,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation: Option<axum::body::Bytes>,
    /// Who sent it (`mqtt` or `mqtt:{client}`); every chunk must come from the same one.
    pub caller: String,
}

impl ReplyTo {
    /// The reply address of `cmd`, sent by `caller`.
    pub fn of(cmd: &Inbound, caller: &str) -> Self {
        ReplyTo {
            topic: cmd.topic.clone(),
            response_topic: cmd.response_topic.clone(),
            correlation: cmd.correlation.clone(),
            caller: caller.to_owned(),
        }
    }
}

/// What adding a chunk gave.
#[derive(Debug)]
pub enum Added {
    /// Kept; more chunks are awaited. Nothing to acknowledge yet.
    Stored,
    /// The last chunk: the whole body, and every chunk's receipt.
    Complete {
        /// The joined JSON body.
        body: String,
        /// Where to answer.
        reply_to: ReplyTo,
        /// The chunks' receipts (this one included).
        receipts: Vec<Receipt>,
    },
    /// Refused: answer the error; the receipts (this one included) are done.
    Refused {
        /// Why.
        error: ApiError,
        /// The chunks' receipts.
        receipts: Vec<Receipt>,
    },
    /// A chunk of a snapshot recently refused: acknowledge it, answer nothing.
    Ignored,
}

/// An assembly given up on after the timeout.
#[derive(Debug)]
pub struct Expired {
    /// The snapshot's request id.
    pub request_id: String,
    /// Where to answer; `None` when the snapshot already ran (only a redelivered tail came
    /// back) and nothing needs saying.
    pub reply_to: Option<ReplyTo>,
    /// The chunks received.
    pub receipts: Vec<Receipt>,
    /// Chunks received and expected.
    pub got: (usize, usize),
}

#[derive(Debug)]
struct Assembly {
    parts: Vec<Option<String>>,
    have: usize,
    bytes: usize,
    receipts: Vec<Receipt>,
    started: Instant,
    reply_to: ReplyTo,
}

/// How an assembly ended, remembered for one timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Ran,
    Refused,
}

#[derive(Debug, Default)]
struct State {
    open: HashMap<String, Assembly>,
    recent: HashMap<String, (Instant, Ended)>,
}

/// Snapshots being assembled (shared by the command tasks).
#[derive(Debug)]
pub struct Assembler {
    max_total: usize,
    timeout: Duration,
    state: Mutex<State>,
}

impl Assembler {
    /// An assembler refusing bodies above `max_total` bytes and dropping assemblies
    /// incomplete after `timeout`.
    pub fn new(max_total: usize, timeout: Duration) -> Self {
        Assembler {
            max_total,
            timeout,
            state: Mutex::default(),
        }
    }

    /// Adds a chunk received as `receipt`.
    pub fn add(&self, c: Chunk, receipt: Receipt, reply_to: ReplyTo, now: Instant) -> Added {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *st;
        let timeout = self.timeout;
        st.recent
            .retain(|_, (at, _)| now.duration_since(*at) < timeout);
        if !st.open.contains_key(&c.request_id) {
            if st.recent.get(&c.request_id).map(|r| r.1) == Some(Ended::Refused) {
                return Added::Ignored;
            }
            if st.open.len() >= MAX_ASSEMBLIES {
                return Added::Refused {
                    error: ApiError::new(
                        429,
                        "too_many_requests",
                        format!(
                            "{MAX_ASSEMBLIES} chunked snapshots are being assembled already; retry later"
                        ),
                    ),
                    receipts: vec![receipt],
                };
            }
            st.open.insert(
                c.request_id.clone(),
                Assembly {
                    parts: vec![None; c.chunks],
                    have: 0,
                    bytes: 0,
                    receipts: Vec::new(),
                    started: now,
                    reply_to: reply_to.clone(),
                },
            );
        }
        let Some(a) = st.open.get_mut(&c.request_id) else {
            return Added::Stored;
        };
        a.receipts.push(receipt);
        let refusal = if a.parts.len() != c.chunks {
            Some(ApiError::new(
                400,
                "bad_request",
                format!(
                    "chunks changed from {} to {} within one snapshot",
                    a.parts.len(),
                    c.chunks
                ),
            ))
        } else if a.reply_to.caller != reply_to.caller {
            Some(ApiError::new(
                403,
                "forbidden",
                "the chunks of one snapshot come from different clients",
            ))
        } else {
            let old = a.parts[c.chunk].as_ref().map_or(0, String::len);
            let total = a.bytes - old + c.data.len();
            if total > self.max_total {
                Some(ApiError::new(
                    413,
                    "payload_too_large",
                    format!(
                        "the chunked snapshot exceeds api.max_snapshot_bytes ({} bytes)",
                        self.max_total
                    ),
                ))
            } else {
                a.bytes = total;
                if a.parts[c.chunk].is_none() {
                    a.have += 1;
                }
                a.parts[c.chunk] = Some(c.data);
                None
            }
        };
        if let Some(error) = refusal {
            let a = st.open.remove(&c.request_id);
            st.recent.insert(c.request_id, (now, Ended::Refused));
            return Added::Refused {
                error,
                receipts: a.map(|a| a.receipts).unwrap_or_default(),
            };
        }
        if a.have < a.parts.len() {
            return Added::Stored;
        }
        let Some(a) = st.open.remove(&c.request_id) else {
            return Added::Stored;
        };
        st.recent.insert(c.request_id, (now, Ended::Ran));
        let mut body = String::with_capacity(a.bytes);
        for p in a.parts.into_iter().flatten() {
            body.push_str(&p);
        }
        Added::Complete {
            body,
            reply_to: a.reply_to,
            receipts: a.receipts,
        }
    }

    /// Takes the assemblies incomplete for longer than the timeout.
    pub fn expire(&self, now: Instant) -> Vec<Expired> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let st = &mut *st;
        let timeout = self.timeout;
        let old: Vec<String> = st
            .open
            .iter()
            .filter(|(_, a)| now.duration_since(a.started) >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for id in old {
            let Some(a) = st.open.remove(&id) else {
                continue;
            };
            let ran = st.recent.get(&id).map(|r| r.1) == Some(Ended::Ran);
            out.push(Expired {
                request_id: id,
                reply_to: (!ran).then_some(a.reply_to),
                receipts: a.receipts,
                got: (a.have, a.parts.len()),
            });
        }
        out
    }

    /// Snapshots being assembled now.
    pub fn open(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &str, i: usize, n: usize, data: &str) -> Chunk {
        Chunk {
            request_id: id.into(),
            chunk: i,
            chunks: n,
            data: data.into(),
        }
    }

    fn to(caller: &str) -> ReplyTo {
        ReplyTo {
            topic: "t".into(),
            response_topic: None,
            correlation: None,
            caller: caller.into(),
        }
    }

    fn r(idx: u64) -> Receipt {
        Receipt { conn: 1, idx }
    }

    #[test]
    fn joins_in_index_order_whatever_the_arrival_order() {
        let a = Assembler::new(100, Duration::from_secs(60));
        let now = Instant::now();
        assert!(matches!(
            a.add(chunk("s", 2, 3, "c"), r(1), to("m"), now),
            Added::Stored
        ));
        assert!(matches!(
            a.add(chunk("s", 0, 3, "a"), r(2), to("m"), now),
            Added::Stored
        ));
        // A redelivered chunk replaces itself.
        assert!(matches!(
            a.add(chunk("s", 0, 3, "a"), r(3), to("m"), now),
            Added::Stored
        ));
        match a.add(chunk("s", 1, 3, "b"), r(4), to("m"), now) {
            Added::Complete { body, receipts, .. } => {
                assert_eq!(body, "abc");
                assert_eq!(receipts, [r(1), r(2), r(3), r(4)]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn refuses_too_large_and_mixed_senders_and_bounds_assemblies() {
        let a = Assembler::new(4, Duration::from_secs(60));
        let now = Instant::now();
        a.add(chunk("big", 0, 2, "abc"), r(1), to("m"), now);
        match a.add(chunk("big", 1, 2, "de"), r(2), to("m"), now) {
            Added::Refused { error, receipts } => {
                assert_eq!(error.status, 413);
                assert_eq!(receipts, [r(1), r(2)]);
            }
            other => panic!("{other:?}"),
        }
        // The rest of a refused snapshot is acknowledged without another answer.
        assert!(matches!(
            a.add(chunk("big", 1, 2, "x"), r(3), to("m"), now),
            Added::Ignored
        ));
        a.add(chunk("mix", 0, 2, "a"), r(4), to("m"), now);
        match a.add(chunk("mix", 1, 2, "b"), r(5), to("other"), now) {
            Added::Refused { error, .. } => assert_eq!(error.status, 403),
            other => panic!("{other:?}"),
        }
        for i in 0..MAX_ASSEMBLIES {
            a.add(chunk(&format!("o{i}"), 0, 2, "a"), r(10), to("m"), now);
        }
        match a.add(chunk("one-more", 0, 2, "a"), r(11), to("m"), now) {
            Added::Refused { error, receipts } => {
                assert_eq!(error.status, 429);
                assert_eq!(receipts, [r(11)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn incomplete_assemblies_expire() {
        let a = Assembler::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        a.add(chunk("s", 0, 2, "a"), r(1), to("m"), t0);
        assert!(a.expire(t0 + Duration::from_secs(59)).is_empty());
        let gone = a.expire(t0 + Duration::from_secs(60));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].got, (1, 2));
        assert!(gone[0].reply_to.is_some());
        assert_eq!(gone[0].receipts, [r(1)]);
        assert_eq!(a.open(), 0);
    }

    #[test]
    fn parses_and_rejects_chunks() {
        let v = serde_json::json!({"request_id": "s", "chunk": 1, "chunks": 2, "data": "x"});
        assert_eq!(
            Chunk::parse(&v).expect("a chunk").expect("valid"),
            chunk("s", 1, 2, "x")
        );
        assert!(Chunk::parse(&serde_json::json!({"request_id": "s"})).is_none());
        for bad in [
            serde_json::json!({"request_id": "s", "chunk": 2, "chunks": 2, "data": "x"}),
            serde_json::json!({"request_id": "s", "chunk": 0, "chunks": 0, "data": "x"}),
            serde_json::json!({"request_id": "s", "chunk": -1, "chunks": 2, "data": "x"}),
            serde_json::json!({"request_id": "s", "chunk": 0, "chunks": 2, "data": 5}),
            serde_json::json!({"chunk": 0, "chunks": 2, "data": "x"}),
        ] {
            assert!(Chunk::parse(&bad).expect("a chunk").is_err(), "{bad}");
        }
    }
}
