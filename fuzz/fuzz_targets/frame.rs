//! The frame scanner fed a byte stream in arbitrary pieces, as sockets deliver it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden::protocol::frame::{HEADER_LEN, Scan, Scanner, header};

fuzz_target!(|data: &[u8]| {
    // First byte: which tags are read whole; second: the piece size.
    let [wanted, piece, stream @ ..] = data else {
        return;
    };
    let piece = usize::from(*piece).max(1);
    let whole = |tag: u8| tag & wanted == *wanted;
    let _ = header(stream, 1 << 16);
    let mut scanner = Scanner::default();
    let mut buf: Vec<u8> = Vec::new();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let before = scanner.body_left();
            match scanner.next(&buf, whole) {
                Scan::Body(n) => {
                    assert!(n > 0 && n <= buf.len() && n <= before);
                    buf.drain(..n);
                }
                Scan::Whole { len, .. } => {
                    assert!(len >= HEADER_LEN && len <= buf.len());
                    buf.drain(..len);
                }
                Scan::Header { .. } => {
                    assert!(buf.len() >= HEADER_LEN);
                    buf.drain(..HEADER_LEN);
                }
                Scan::NeedMore => break,
                Scan::Invalid(_) => return,
            }
        }
    }
});
