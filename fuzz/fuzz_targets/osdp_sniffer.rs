//! The OSDP frame sniffer the keypad driver runs on every byte the bus gives it
//! (`Sniffer::push`), fed in pieces at advancing times, and `parse_packet` on the whole
//! input. Input: bytes; `0xFE 0xFE` separates pieces, and the byte after a separator
//! advances the clock by that many 10 ms steps. Checks: a frame's address has bit 7
//! clear, the sniffer never holds more than it was given, and a packet that parses
//! whole is also what the sniffer finds first in the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use unitgate::devices::osdp::fuzzing::{Sniffed, Sniffer, parse_packet};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut sn = Sniffer::default();
    let mut out = Vec::new();
    for (i, piece) in data.split(|&b| b == 0xFE).enumerate() {
        if i > 0 {
            now += Duration::from_millis(10 * u64::from(piece.first().copied().unwrap_or(0)));
        }
        sn.push(piece, now, &mut out);
    }
    for s in &out {
        if let Sniffed::Frame(f) = s {
            assert!(f.addr < 0x80);
        }
    }
    // The same bytes in one piece, at one instant.
    let mut whole = Sniffer::default();
    let mut first = Vec::new();
    whole.push(data, t0, &mut first);
    if let Some(f) = parse_packet(data) {
        assert!(f.addr < 0x80);
        // The sniffer takes frames up to 1024 bytes; parse_packet has no such limit.
        if data.len() <= 1024 {
            assert_eq!(
                first.first(),
                Some(&Sniffed::Frame(f)),
                "parse_packet and the sniffer disagree"
            );
        }
    }
});
