//! RS-485 line timing for the pseudo-terminals (opt-in: `line_timing = true` on a keypad or
//! an RTU board in the site file).
//!
//! A pty moves bytes at once whatever baud its termios names. With line timing, the
//! simulator behaves like a device on a half-duplex RS-485 line at the configured baud:
//!
//! - Bytes the control panel / master wrote are handed to the device only once their wire
//!   time has elapsed: a chunk of `n` bytes read at `now` starts on the line at
//!   `max(now, line free)` and byte `i` of it arrives `(i + 1)` character times later.
//! - Bytes the device sends leave no faster than one character time each (the writes are
//!   paced), and not before the line is free: the line is half-duplex, so an answer cannot
//!   start before the request has finished.
//!
//! One [`LineClock`] per line, shared by both directions. A character is 10 bits for 8N1,
//! 11 with parity or with 2 stop bits, 12 with both ([`LineTiming`]). No I/O here: the
//! keypad thread and the RTU task do their own reads, writes and waits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Baud and character size of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    /// Bits per second.
    pub baud: u32,
    /// Bits per character: start + 8 data + parity (0/1) + stop (1/2).
    pub bits_per_char: u32,
}

impl LineTiming {
    /// 8 data bits with `parity` (`none`, `even`, `odd`) and `stop_bits` (1 or 2).
    pub fn new(baud: u32, parity: &str, stop_bits: u8) -> LineTiming {
        let parity_bit = u32::from(parity != "none");
        LineTiming {
            baud: baud.max(1),
            bits_per_char: 1 + 8 + parity_bit + u32::from(stop_bits.max(1)),
        }
    }

    /// 8N1 (OSDP always is).
    pub fn n81(baud: u32) -> LineTiming {
        LineTiming::new(baud, "none", 1)
    }

    /// Wire time of `n` characters.
    pub fn wire_time(&self, n: usize) -> Duration {
        let bits = u128::from(self.bits_per_char) * n as u128;
        Duration::from_nanos((bits * 1_000_000_000 / u128::from(self.baud)) as u64)
    }

    /// The Modbus RTU inter-frame silence t3.5: 3.5 characters, fixed at 1.75 ms above
    /// 19200 baud (Modbus over serial line spec §2.5.1.1).
    pub fn t35(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            self.wire_time(7) / 2
        }
    }
}

/// One chunk in transit: its bytes, when its first byte started, how many were taken.
#[derive(Debug)]
struct Chunk {
    start: Instant,
    bytes: Vec<u8>,
    taken: usize,
}

/// A half-duplex line: when it is next free, and the bytes in transit on it (in one
/// direction per queue the caller keeps: [`LineClock::send`] returns a [`Transit`]).
#[derive(Debug)]
pub struct LineClock {
    timing: LineTiming,
    free_at: Option<Instant>,
}

impl LineClock {
    /// An idle line.
    pub fn new(timing: LineTiming) -> LineClock {
        LineClock {
            timing,
            free_at: None,
        }
    }

    /// The line's timing.
    pub fn timing(&self) -> LineTiming {
        self.timing
    }

    /// Puts `n` bytes on the line at `now`: returns when the first starts
    /// (`max(now, line free)`); the line is busy until the last has arrived.
    pub fn reserve(&mut self, now: Instant, n: usize) -> Instant {
        let start = self.free_at.map_or(now, |f| f.max(now));
        self.free_at = Some(start + self.timing.wire_time(n));
        start
    }

    /// Keeps the line silent for `d` after it is next free (Modbus t3.5 after a frame).
    pub fn silence(&mut self, now: Instant, d: Duration) {
        let free = self.free_at.map_or(now, |f| f.max(now));
        self.free_at = Some(free + d);
    }

    /// When the line is free (`None`: it has never been used).
    pub fn free_at(&self) -> Option<Instant> {
        self.free_at
    }
}

/// Bytes in transit in one direction: each byte becomes available one character time after
/// the previous one, from its chunk's start on the line.
#[derive(Debug)]
pub struct Transit {
    timing: LineTiming,
    chunks: VecDeque<Chunk>,
}

impl Transit {
    /// Nothing in transit.
    pub fn new(timing: LineTiming) -> Transit {
        Transit {
            timing,
            chunks: VecDeque::new(),
        }
    }

    /// Puts `bytes` on `line` at `now` (after whatever is already on it).
    pub fn push(&mut self, line: &mut LineClock, now: Instant, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let start = line.reserve(now, bytes.len());
        self.chunks.push_back(Chunk {
            start,
            bytes: bytes.to_vec(),
            taken: 0,
        });
    }

    /// Whether nothing is in transit.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Bytes in transit, not yet taken.
    pub fn pending(&self) -> usize {
        self.chunks.iter().map(|c| c.bytes.len() - c.taken).sum()
    }

    /// When the next byte not yet taken has fully arrived.
    pub fn next_due(&self) -> Option<Instant> {
        self.chunks
            .front()
            .map(|c| c.start + self.timing.wire_time(c.taken + 1))
    }

    /// When the last byte in transit has fully arrived.
    pub fn done_at(&self) -> Option<Instant> {
        self.chunks
            .back()
            .map(|c| c.start + self.timing.wire_time(c.bytes.len()))
    }

    /// Moves the bytes that have arrived by `now` into `out` (at most `max`); how many.
    pub fn take_due(&mut self, now: Instant, max: usize, out: &mut Vec<u8>) -> usize {
        let mut moved = 0;
        while moved < max {
            let Some(c) = self.chunks.front_mut() else {
                break;
            };
            let elapsed = now.saturating_duration_since(c.start);
            // Whole characters on the wire by now.
            let arrived = (elapsed.as_nanos() * u128::from(self.timing.baud)
                / (u128::from(self.timing.bits_per_char) * 1_000_000_000))
                .min(c.bytes.len() as u128) as usize;
            let n = arrived.saturating_sub(c.taken).min(max - moved);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&c.bytes[c.taken..c.taken + n]);
            c.taken += n;
            moved += n;
            if c.taken == c.bytes.len() {
                self.chunks.pop_front();
            }
        }
        moved
    }

    /// Drops everything in transit.
    pub fn clear(&mut self) {
        self.chunks.clear();
    }
}

/// Rounds a wait up to whole milliseconds (`poll(2)` and tokio's timer count in ms: a
/// shorter wait rounded down would spin).
pub fn ceil_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_micros().div_ceil(1000) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn character_sizes_follow_the_framing() {
        assert_eq!(LineTiming::n81(9600).bits_per_char, 10);
        assert_eq!(LineTiming::new(9600, "even", 1).bits_per_char, 11);
        assert_eq!(LineTiming::new(9600, "none", 2).bits_per_char, 11);
        assert_eq!(LineTiming::new(9600, "odd", 2).bits_per_char, 12);
        // 96 characters of 10 bits at 9600 baud: exactly 100 ms.
        assert_eq!(
            LineTiming::n81(9600).wire_time(96),
            Duration::from_millis(100)
        );
        // 8E1 at 19200: 11 bits, 572.9 µs a character.
        assert_eq!(
            LineTiming::new(19200, "even", 1).wire_time(1),
            Duration::from_nanos(572_916)
        );
        assert_eq!(
            LineTiming::n81(115_200).wire_time(1152),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn t35_is_three_and_a_half_characters_up_to_19200() {
        assert_eq!(LineTiming::n81(9600).t35(), Duration::from_nanos(3_645_833));
        assert_eq!(
            LineTiming::n81(19200).t35(),
            Duration::from_nanos(1_822_916)
        );
        assert_eq!(LineTiming::n81(115_200).t35(), Duration::from_micros(1750));
    }

    #[test]
    fn the_line_is_half_duplex_and_chunks_queue_behind_each_other() {
        let t = LineTiming::n81(10_000); // 1 ms a character
        let mut line = LineClock::new(t);
        let t0 = Instant::now();
        // A 10-byte request read at t0 occupies the line for 10 ms.
        assert_eq!(line.reserve(t0, 10), t0);
        assert_eq!(line.free_at(), Some(t0 + Duration::from_millis(10)));
        // An answer queued at t0 + 2 ms cannot start before the request has finished.
        let start = line.reserve(t0 + Duration::from_millis(2), 5);
        assert_eq!(start, t0 + Duration::from_millis(10));
        assert_eq!(line.free_at(), Some(t0 + Duration::from_millis(15)));
        // Once the line is idle, a chunk starts when it is put on the line.
        let later = t0 + Duration::from_millis(50);
        assert_eq!(line.reserve(later, 1), later);
        // A Modbus silence pushes the next frame back.
        line.silence(later, t.t35());
        assert_eq!(line.reserve(later, 1), later + t.wire_time(1) + t.t35());
    }

    #[test]
    fn bytes_arrive_one_character_time_apart() {
        let t = LineTiming::n81(10_000); // 1 ms a character
        let mut line = LineClock::new(t);
        let mut tr = Transit::new(t);
        let t0 = Instant::now();
        tr.push(&mut line, t0, b"abcd");
        tr.push(&mut line, t0, b"ef");
        assert_eq!(tr.pending(), 6);
        assert_eq!(tr.next_due(), Some(t0 + Duration::from_millis(1)));
        assert_eq!(tr.done_at(), Some(t0 + Duration::from_millis(6)));
        let mut out = Vec::new();
        let ms = |n: u64| t0 + Duration::from_micros(n * 1000);
        assert_eq!(tr.take_due(ms(0), 100, &mut out), 0);
        assert_eq!(
            tr.take_due(ms(1) - Duration::from_nanos(1), 100, &mut out),
            0
        );
        assert_eq!(tr.take_due(ms(1), 100, &mut out), 1);
        assert_eq!(
            tr.take_due(ms(3) + Duration::from_micros(500), 100, &mut out),
            2
        );
        assert_eq!(tr.next_due(), Some(ms(4)));
        // A budget caps what one call takes.
        assert_eq!(tr.take_due(ms(60), 2, &mut out), 2);
        assert_eq!(tr.take_due(ms(60), 100, &mut out), 1);
        assert_eq!(out, b"abcdef");
        assert!(tr.is_empty());
        assert_eq!(tr.next_due(), None);
    }

    #[test]
    fn waits_round_up_to_whole_milliseconds() {
        assert_eq!(ceil_ms(Duration::from_micros(87)), Duration::from_millis(1));
        assert_eq!(ceil_ms(Duration::from_millis(3)), Duration::from_millis(3));
        assert_eq!(ceil_ms(Duration::ZERO), Duration::ZERO);
    }
}
