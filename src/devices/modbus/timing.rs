//! Timing rules, no I/O: the RTU inter-frame gap and the reconnect backoff.

use std::time::Duration;

/// Bits on the wire per RTU character: start bit, 8 data bits, parity bit if any, stop bits.
pub fn bits_per_char(parity: bool, stop_bits: u8) -> u32 {
    1 + 8 + u32::from(parity) + u32::from(stop_bits)
}

/// The silence the Modbus RTU spec (serial line guide §2.5.1.1) requires between frames:
/// 3.5 character times at `baud`, and a fixed 1.75 ms above 19200 baud.
pub fn frame_gap(baud: u32, bits_per_char: u32) -> Duration {
    if baud > 19_200 {
        return Duration::from_micros(1_750);
    }
    // 3.5 characters = 7 / 2 character times, in microseconds, rounded up.
    let micros = (7 * u64::from(bits_per_char) * 1_000_000).div_ceil(2 * u64::from(baud.max(1)));
    Duration::from_micros(micros)
}

/// How long a line must stay quiet after a timeout before it counts as resynchronised:
/// twice the frame gap, at least 5 ms (schedulers and USB adapters jitter by milliseconds).
pub fn resync_quiet(gap: Duration) -> Duration {
    (gap * 2).max(Duration::from_millis(5))
}

/// Capped exponential backoff with jitter for reconnect probes: 100 ms doubling to 1.6 s,
/// each delay drawn from [d/2, d] ("equal jitter"), so boards that failed together do not
/// probe in lockstep and a probe never comes sooner than half the nominal delay.
///
/// The cap is short on purpose: a board back from an outage is found within 1.6 s, so the
/// hardware converges within 2 s of recovery. The price is one probe per 0.8-1.6 s while a
/// board is down: a TCP connect attempt, or on a shared RS-485 bus one request timeout of
/// bus time (a 200 ms timeout is at most a quarter of the bus, and only while it is dead).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

/// First reconnect delay.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay.
pub const BACKOFF_CAP: Duration = Duration::from_millis(1600);

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_BASE }
    }
}

impl Backoff {
    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = BACKOFF_BASE;
    }

    /// The delay before the next attempt; doubles the nominal delay up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_CAP);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_gap_follows_the_spec() {
        // 9600 8N1: 10 bits/char, 3.5 chars = 35 bits = 3.646 ms.
        assert_eq!(
            frame_gap(9600, bits_per_char(false, 1)),
            Duration::from_micros(3646)
        );
        // 19200 8E1: 11 bits/char -> 38.5 bits = 2.005 ms (still computed at 19200).
        assert_eq!(
            frame_gap(19200, bits_per_char(true, 1)),
            Duration::from_micros(2006)
        );
        // Above 19200: fixed 1.75 ms.
        assert_eq!(frame_gap(38400, 11), Duration::from_micros(1750));
        assert_eq!(frame_gap(115200, 10), Duration::from_micros(1750));
        assert!(resync_quiet(frame_gap(115200, 10)) >= Duration::from_millis(5));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::default();
        let mut nominal = BACKOFF_BASE;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= nominal / 2 && d <= nominal,
                "{d:?} outside [{nominal:?}/2, {nominal:?}]"
            );
            nominal = (nominal * 2).min(BACKOFF_CAP);
        }
        assert_eq!(nominal, BACKOFF_CAP);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_BASE);
    }
}
