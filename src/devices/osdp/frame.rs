//! OSDP frame boundaries, read off the wire beside libosdp: which command the control panel
//! sent to which address, and what the keypad answered (ACK, NAK, ...). libosdp keeps
//! command outcomes to itself (the binding drops its notifications), so this is how a
//! command's acknowledgement reaches the caller. Nothing here answers anything.
//!
//! A frame is `[0xFF mark] 0x53 ADDR LEN_LSB LEN_MSB CTRL [SCB] CODE DATA.. [MAC] CHECK`:
//! LEN counts from SOM to the check bytes, ADDR bit 7 marks a reply, CTRL bit 2 selects
//! CRC-16 (else an 8-bit checksum), CTRL bit 3 announces a security block whose first byte
//! is its length. The code is never encrypted, the data is under the secure channel.

use std::time::{Duration, Instant};

const SOM: u8 = 0x53;
const HEADER: usize = 5;
/// SOM, ADDR, LEN x2, CTRL, CODE, checksum.
const MIN_FRAME: usize = 7;
/// Larger than anything libosdp sends or takes; longer is garbage.
const MAX_FRAME: usize = 1024;
/// A partial frame that has not completed in this long was garbage shaped like a header.
const STALE: Duration = Duration::from_millis(300);

/// `osdp_POLL`.
pub const CMD_POLL: u8 = 0x60;
/// `osdp_CAP`.
pub const CMD_CAP: u8 = 0x62;
/// `osdp_LED`.
pub const CMD_LED: u8 = 0x69;
/// `osdp_BUZ`.
pub const CMD_BUZ: u8 = 0x6A;
/// `osdp_TEXT`.
pub const CMD_TEXT: u8 = 0x6B;
/// `osdp_CHLNG` (secure channel, step 1).
pub const CMD_CHLNG: u8 = 0x76;
/// `osdp_SCRYPT` (secure channel, step 2).
pub const CMD_SCRYPT: u8 = 0x77;
/// `osdp_ACK`.
pub const REPLY_ACK: u8 = 0x40;
/// `osdp_NAK`.
pub const REPLY_NAK: u8 = 0x41;
/// `osdp_PDCAP`.
pub const REPLY_PDCAP: u8 = 0x46;
/// `osdp_CCRYPT`: the keypad's answer to a challenge.
pub const REPLY_CCRYPT: u8 = 0x76;

/// One frame whose check bytes are right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Keypad address (bit 7 cleared).
    pub addr: u8,
    /// Sent by a keypad.
    pub reply: bool,
    /// Command or reply code.
    pub code: u8,
    /// Under the secure channel.
    pub secure: bool,
    /// First data byte when in the clear (a NAK's reason).
    pub first_data: Option<u8>,
}

/// A name for logs and errors.
pub fn command_name(code: u8) -> String {
    match code {
        CMD_POLL => "POLL".into(),
        0x61 => "ID".into(),
        CMD_CAP => "CAP".into(),
        CMD_LED => "LED".into(),
        CMD_BUZ => "BUZ".into(),
        CMD_TEXT => "TEXT".into(),
        CMD_CHLNG => "CHLNG".into(),
        CMD_SCRYPT => "SCRYPT".into(),
        c => format!("{c:#04x}"),
    }
}

/// What a run of received bytes turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A well-formed frame.
    Frame(Frame),
    /// A frame-shaped run whose check failed.
    BadCheck,
}

/// Splits the received stream into frames.
#[derive(Debug, Default)]
pub struct Sniffer {
    buf: Vec<u8>,
    since: Option<Instant>,
}

impl Sniffer {
    /// Takes bytes received at `now`; appends what they completed to `out`.
    pub fn push(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Sniffed>) {
        self.buf.extend_from_slice(bytes);
        loop {
            match self.buf.iter().position(|&b| b == SOM) {
                None => {
                    self.buf.clear();
                    self.since = None;
                    return;
                }
                Some(p) => {
                    self.buf.drain(..p);
                }
            }
            if self.buf.len() < HEADER {
                self.since.get_or_insert(now);
                return;
            }
            let len = usize::from(u16::from_le_bytes([self.buf[2], self.buf[3]]));
            if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                self.skip_one();
                continue;
            }
            if self.buf.len() < len {
                if self.since.is_some_and(|s| now.duration_since(s) > STALE) {
                    self.skip_one();
                    continue;
                }
                self.since.get_or_insert(now);
                return;
            }
            match parse(&self.buf[..len]) {
                Some(f) => {
                    self.buf.drain(..len);
                    self.since = None;
                    out.push(Sniffed::Frame(f));
                }
                None => {
                    out.push(Sniffed::BadCheck);
                    self.skip_one();
                }
            }
        }
    }

    /// Forgets a partial frame (libosdp flushed the input).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.since = None;
    }

    fn skip_one(&mut self) {
        self.buf.drain(..1);
        self.since = None;
    }
}

/// Parses one packet as libosdp writes it (a whole frame per write, mark byte first).
pub fn parse_packet(buf: &[u8]) -> Option<Frame> {
    let start = buf.iter().position(|&b| b == SOM)?;
    let buf = &buf[start..];
    if buf.len() < HEADER {
        return None;
    }
    let len = usize::from(u16::from_le_bytes([buf[2], buf[3]]));
    if !(MIN_FRAME..=buf.len()).contains(&len) {
        return None;
    }
    parse(&buf[..len])
}

/// Parses exactly one frame (starts at SOM, LEN bytes long).
fn parse(buf: &[u8]) -> Option<Frame> {
    let len = buf.len();
    if len < MIN_FRAME {
        return None;
    }
    let ctrl = buf[4];
    let crc = ctrl & 0x04 != 0;
    let check_len = if crc { 2 } else { 1 };
    let ok = if crc {
        crc16(&buf[..len - 2]) == u16::from_le_bytes([buf[len - 2], buf[len - 1]])
    } else {
        checksum(&buf[..len - 1]) == buf[len - 1]
    };
    if !ok {
        return None;
    }
    let secure = ctrl & 0x08 != 0;
    let code_at = if secure {
        HEADER + usize::from(*buf.get(HEADER)?)
    } else {
        HEADER
    };
    if code_at >= len - check_len {
        return None;
    }
    let first_data = (!secure && code_at + 1 < len - check_len).then(|| buf[code_at + 1]);
    Some(Frame {
        addr: buf[1] & 0x7F,
        reply: buf[1] & 0x80 != 0,
        code: buf[code_at],
        secure,
        first_data,
    })
}

/// OSDP's CRC-16: polynomial 0x1021, initial value 0x1D0F, MSB first.
fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0x1D0F_u16, |crc, &b| {
        (0..8).fold(crc ^ (u16::from(b) << 8), |c, _| {
            if c & 0x8000 != 0 {
                (c << 1) ^ 0x1021
            } else {
                c << 1
            }
        })
    })
}

fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
pub(crate) fn build(addr: u8, code: u8, data: &[u8]) -> Vec<u8> {
    let len = HEADER + 1 + data.len() + 2;
    let mut f = vec![
        SOM,
        addr,
        (len & 0xFF) as u8,
        (len >> 8) as u8,
        0x04, // sequence 0, CRC
        code,
    ];
    f.extend_from_slice(data);
    let c = crc16(&f);
    f.extend_from_slice(&c.to_le_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_catalogue_check_value() {
        assert_eq!(crc16(b"123456789"), 0xE5CC);
    }

    #[test]
    fn a_nak_is_read_with_its_reason_across_chunks_and_noise() {
        let nak = build(0x85, REPLY_NAK, &[0x03]);
        let mut stream = b"\x00noise\xff".to_vec();
        stream.extend_from_slice(&nak);
        let mut s = Sniffer::default();
        let mut out = vec![];
        let now = Instant::now();
        let (a, b) = stream.split_at(9);
        s.push(a, now, &mut out);
        assert!(out.is_empty());
        s.push(b, now, &mut out);
        assert_eq!(
            out,
            vec![Sniffed::Frame(Frame {
                addr: 5,
                reply: true,
                code: REPLY_NAK,
                secure: false,
                first_data: Some(3),
            })]
        );
    }

    #[test]
    fn garbage_never_panics_and_bad_checks_are_reported() {
        let mut bad = build(0x85, REPLY_ACK, &[]);
        let n = bad.len();
        bad[n - 1] ^= 0xFF;
        let mut s = Sniffer::default();
        let mut out = vec![];
        let now = Instant::now();
        s.push(&bad, now, &mut out);
        assert_eq!(out, vec![Sniffed::BadCheck]);
        // A header announcing a long frame that never comes is dropped once stale.
        out.clear();
        s.push(&[0x53, 0x05, 0xFF, 0x00, 0x04], now, &mut out);
        let later = now + Duration::from_secs(1);
        s.push(&build(0x85, REPLY_ACK, &[]), later, &mut out);
        assert!(out.contains(&Sniffed::Frame(Frame {
            addr: 5,
            reply: true,
            code: REPLY_ACK,
            secure: false,
            first_data: None,
        })));
        let mut x: u32 = 7;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect();
        s.push(&noise, later, &mut out);
        for chunk in noise.chunks(5) {
            let _ = parse_packet(chunk);
        }
    }

    #[test]
    fn a_sent_packet_names_its_command() {
        let mut p = vec![0xFF];
        p.extend_from_slice(&build(0x05, CMD_LED, &[0; 14]));
        let f = parse_packet(&p).map(|f| (f.addr, f.reply, f.code));
        assert_eq!(f, Some((5, false, CMD_LED)));
        assert_eq!(command_name(CMD_LED), "LED");
    }
}
