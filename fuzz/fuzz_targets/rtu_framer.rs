//! hw-sim's Modbus RTU request framer (`RtuFramer`), fed the input in pieces with silences
//! between them as the RTU loop does. Input: bytes; a `0xFE 0xFE` pair is a piece boundary,
//! followed by a silence when the next byte is odd. Checks: every frame has a valid CRC and
//! is 4..=256 bytes; no byte is lost or duplicated (frames + garbage + buffered = pushed);
//! after a silence nothing stays buffered.
#![no_main]

use hw_sim::relay::fuzzing::{Framer, crc16};
use libfuzzer_sys::fuzz_target;

fn check(f: &[u8]) {
    assert!((4..=256).contains(&f.len()), "frame of {} bytes", f.len());
    let (body, crc) = f.split_at(f.len() - 2);
    assert_eq!(
        crc16(body).to_le_bytes(),
        [crc[0], crc[1]],
        "bad CRC: {f:02x?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut fr = Framer::default();
    let (mut pushed, mut framed, mut garbage) = (0usize, 0usize, 0usize);
    let mut pieces = data.split(|&b| b == 0xFE).peekable();
    while let Some(piece) = pieces.next() {
        let silent = piece.first().is_some_and(|b| b & 1 == 1) || pieces.peek().is_none();
        fr.push(piece);
        pushed += piece.len();
        while let Some(f) = fr.next_frame(false) {
            check(&f);
            framed += f.len();
        }
        if silent {
            while let Some(f) = fr.next_frame(true) {
                check(&f);
                framed += f.len();
            }
            assert_eq!(fr.buffered(), 0, "a silence leaves nothing buffered");
            garbage += fr.take_garbage(true).unwrap_or(0);
        } else {
            garbage += fr.take_garbage(false).unwrap_or(0);
        }
        assert_eq!(framed + garbage + fr.garbage() + fr.buffered(), pushed);
    }
});
