//! OSDP frame boundaries on a byte stream, for observations only: which commands a control
//! panel sends (and how often it polls), which bytes are garbage, and what a reply written
//! by libosdp is. libosdp does the real parsing; this never answers anything.
//!
//! A frame is `[0xFF mark] 0x53 ADDR LEN_LSB LEN_MSB CTRL [SCB] CODE DATA.. [MAC] CHECK`,
//! where LEN counts from SOM to the check bytes, ADDR bit 7 marks a reply, CTRL bit 2
//! selects CRC-16 (else an 8-bit checksum) and CTRL bit 3 announces a security block whose
//! first byte is its length. The command/reply code is never encrypted.

use std::time::{Duration, Instant};

/// Start of message.
pub(crate) const SOM: u8 = 0x53;
/// Optional mark byte before SOM.
pub(crate) const MARK: u8 = 0xFF;
/// `osdp_POLL`.
pub(crate) const CMD_POLL: u8 = 0x60;
/// `osdp_KEYPAD` reply.
pub(crate) const REPLY_KEYPAD: u8 = 0x53;

const HEADER: usize = 5;
/// SOM, ADDR, LEN x2, CTRL, CODE, checksum.
const MIN_FRAME: usize = 7;
/// Larger than any frame libosdp sends or takes (256); anything longer is garbage.
const MAX_FRAME: usize = 1024;
/// A frame that has not completed in this long was garbage that looked like a header.
const STALE: Duration = Duration::from_millis(300);

/// One well-formed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// PD address (bit 7 cleared).
    pub addr: u8,
    /// Sent by a PD (a reply), not by the control panel.
    pub reply: bool,
    /// Command or reply code.
    pub code: u8,
    /// Carries a security block (secure channel).
    pub secure: bool,
    /// Length on the wire (without the mark byte).
    pub len: usize,
}

/// What a chunk of the stream turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// A frame whose check bytes are right.
    Frame(Frame),
    /// Bytes that belong to no valid frame.
    Garbage {
        /// How many.
        bytes: usize,
        /// Why they were rejected.
        reason: &'static str,
    },
}

/// Splits a stream into frames and garbage.
#[derive(Debug, Default)]
pub(crate) struct Sniffer {
    buf: Vec<u8>,
    /// When the partial frame at the head of `buf` started.
    since: Option<Instant>,
    garbage: usize,
}

impl Sniffer {
    /// Takes `bytes` received at `now` and appends what they completed to `out`.
    pub fn push(&mut self, bytes: &[u8], now: Instant, out: &mut Vec<Sniffed>) {
        self.buf.extend_from_slice(bytes);
        self.scan(now, out);
    }

    /// Gives up on a partial frame that has waited too long (call on every tick).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Sniffed>) {
        self.scan(now, out);
    }

    fn scan(&mut self, now: Instant, out: &mut Vec<Sniffed>) {
        loop {
            match self.buf.iter().position(|&b| b == SOM) {
                None => {
                    self.skip(self.buf.len());
                    break;
                }
                Some(p) => self.skip(p),
            }
            if self.buf.len() < HEADER {
                self.wait(now);
                break;
            }
            let len = usize::from(u16::from_le_bytes([self.buf[2], self.buf[3]]));
            if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                self.reject(out, "impossible length");
                continue;
            }
            if self.buf.len() < len {
                if self.since.is_some_and(|s| now.duration_since(s) > STALE) {
                    self.reject(out, "frame never completed");
                    continue;
                }
                self.wait(now);
                break;
            }
            match parse(&self.buf[..len]) {
                Some(frame) => {
                    self.flush_garbage(out, "bytes outside any frame");
                    self.buf.drain(..len);
                    self.since = None;
                    out.push(Sniffed::Frame(frame));
                }
                None => self.reject(out, "bad checksum"),
            }
        }
        self.flush_garbage(out, "bytes outside any frame");
    }

    /// Drops `n` leading bytes; all but mark bytes count as garbage.
    fn skip(&mut self, n: usize) {
        self.garbage += self.buf[..n].iter().filter(|&&b| b != MARK).count();
        self.buf.drain(..n);
    }

    /// The SOM at the head starts no frame: count it as garbage and rescan after it.
    fn reject(&mut self, out: &mut Vec<Sniffed>, reason: &'static str) {
        self.garbage += 1;
        self.buf.drain(..1);
        self.since = None;
        self.flush_garbage(out, reason);
    }

    fn wait(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    fn flush_garbage(&mut self, out: &mut Vec<Sniffed>, reason: &'static str) {
        if self.garbage > 0 {
            // Adjacent rejections of one burst merge into one report.
            if let Some(Sniffed::Garbage { bytes, .. }) = out.last_mut() {
                *bytes += self.garbage;
            } else {
                out.push(Sniffed::Garbage {
                    bytes: self.garbage,
                    reason,
                });
            }
            self.garbage = 0;
        }
    }
}

/// Parses one complete frame (`buf` starts at SOM and is exactly LEN long).
fn parse(buf: &[u8]) -> Option<Frame> {
    let len = buf.len();
    let ctrl = buf[4];
    let check_ok = if ctrl & 0x04 != 0 {
        let want = u16::from_le_bytes([buf[len - 2], buf[len - 1]]);
        crc16(&buf[..len - 2]) == want
    } else {
        checksum(&buf[..len - 1]) == buf[len - 1]
    };
    if !check_ok {
        return None;
    }
    let secure = ctrl & 0x08 != 0;
    let code_at = if secure {
        HEADER + usize::from(*buf.get(HEADER)?)
    } else {
        HEADER
    };
    let check_len = if ctrl & 0x04 != 0 { 2 } else { 1 };
    if code_at >= len - check_len {
        return None;
    }
    Some(Frame {
        addr: buf[1] & 0x7F,
        reply: buf[1] & 0x80 != 0,
        code: buf[code_at],
        secure,
        len,
    })
}

/// Parses one whole frame as libosdp writes it (one packet per write, mark byte first).
pub(crate) fn parse_packet(buf: &[u8]) -> Option<Frame> {
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

/// Index of the first byte after the header (where corruption surely breaks the check).
pub(crate) fn body_start(buf: &[u8]) -> usize {
    buf.iter()
        .position(|&b| b == SOM)
        .map_or(0, |p| p + HEADER)
        .min(buf.len().saturating_sub(1))
}

/// The OSDP name of a command code.
pub(crate) fn command_name(code: u8) -> &'static str {
    match code {
        0x60 => "POLL",
        0x61 => "ID",
        0x62 => "CAP",
        0x64 => "LSTAT",
        0x65 => "ISTAT",
        0x66 => "OSTAT",
        0x67 => "RSTAT",
        0x68 => "OUT",
        0x69 => "LED",
        0x6A => "BUZ",
        0x6B => "TEXT",
        0x6D => "TDSET",
        0x6E => "COMSET",
        0x73 => "BIOREAD",
        0x74 => "BIOMATCH",
        0x75 => "KEYSET",
        0x76 => "CHLNG",
        0x77 => "SCRYPT",
        0x7B => "ACURXSIZE",
        0x7C => "FILETRANSFER",
        0x80 => "MFG",
        0xA1 => "XWR",
        0xA2 => "ABORT",
        0xA7 => "KEEPACTIVE",
        _ => "UNKNOWN",
    }
}

/// OSDP CRC-16 (CRC-16/AUG-CCITT: poly 0x1021, init 0x1D0F).
fn crc16(buf: &[u8]) -> u16 {
    let mut crc: u16 = 0x1D0F;
    for &b in buf {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// OSDP 8-bit checksum: two's complement of the byte sum.
fn checksum(buf: &[u8]) -> u8 {
    buf.iter()
        .fold(0u8, |s, &b| s.wrapping_add(b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A POLL to address 1 with CRC, as libosdp's CP sends it (mark byte first).
    fn poll(addr: u8, seq: u8) -> Vec<u8> {
        let mut f = vec![SOM, addr, 8, 0, 0x04 | seq, CMD_POLL];
        let crc = crc16(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        let mut out = vec![MARK];
        out.extend(f);
        out
    }

    #[test]
    fn crc_matches_the_osdp_check_value() {
        // CRC-16/AUG-CCITT check value for "123456789".
        assert_eq!(crc16(b"123456789"), 0xE5CC);
    }

    #[test]
    fn frames_split_across_reads_and_garbage_between() {
        let mut s = Sniffer::default();
        let now = Instant::now();
        let mut out = vec![];
        let mut stream = b"\x01\x02zz".to_vec();
        stream.extend(poll(1, 1));
        stream.extend(poll(1, 2));
        let (a, b) = stream.split_at(7);
        s.push(a, now, &mut out);
        s.push(b, now, &mut out);
        assert_eq!(
            out[0],
            Sniffed::Garbage {
                bytes: 4,
                reason: "bytes outside any frame"
            }
        );
        let frames: Vec<_> = out
            .iter()
            .filter_map(|x| match x {
                Sniffed::Frame(f) => Some(f.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].code, CMD_POLL);
        assert_eq!(frames[0].addr, 1);
        assert!(!frames[0].reply && !frames[0].secure);
    }

    #[test]
    fn corrupt_frame_is_garbage_and_the_next_one_still_parses() {
        let mut s = Sniffer::default();
        let now = Instant::now();
        let mut out = vec![];
        let mut bad = poll(2, 1);
        bad[6] ^= 0x10;
        s.push(&bad, now, &mut out);
        s.push(&poll(2, 2), now, &mut out);
        assert!(matches!(
            out[0],
            Sniffed::Garbage {
                reason: "bad checksum",
                ..
            }
        ));
        assert!(matches!(out.last(), Some(Sniffed::Frame(f)) if f.code == CMD_POLL));
    }

    #[test]
    fn header_claiming_a_long_frame_expires() {
        let mut s = Sniffer::default();
        let t0 = Instant::now();
        let mut out = vec![];
        s.push(&[SOM, 1, 0xFF, 0x00, 0x04, 0x60], t0, &mut out);
        assert!(out.is_empty(), "still waiting for the rest");
        s.expire(t0 + Duration::from_millis(400), &mut out);
        // The 0xFF inside counts as a mark byte, not garbage.
        assert!(matches!(out[0], Sniffed::Garbage { bytes: 5, .. }));
        s.push(&poll(1, 1), t0 + Duration::from_millis(401), &mut out);
        assert!(matches!(out.last(), Some(Sniffed::Frame(_))));
    }

    #[test]
    fn checksum_frames_and_secure_block_code_position() {
        // Checksum mode, security block of length 2 (type 0x15), then the code.
        let mut f = vec![SOM, 0x81, 0, 0, 0x08 | 0x01, 2, 0x15, 0x40];
        let len = f.len() as u16 + 1;
        f[2..4].copy_from_slice(&len.to_le_bytes());
        f.push(checksum(&f));
        let parsed = parse_packet(&f).expect("valid frame");
        assert_eq!(parsed.code, 0x40);
        assert!(parsed.reply && parsed.secure);
        assert_eq!(parsed.addr, 1);
        assert!(body_start(&f) == 5);
    }
}
