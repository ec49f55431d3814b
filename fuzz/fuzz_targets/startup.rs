//! The startup packet as a client sends it: length, code, parameters.
#![no_main]

use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use pgwarden::protocol::startup::{parse_startup, read_startup};

fuzz_target!(|data: &[u8]| {
    // The socket path: a slice is always ready, so the future completes at once.
    let mut input = data;
    let _ = read_startup(&mut input)
        .now_or_never()
        .expect("a slice never blocks");
    // The decoder on its own, with whatever length prefix the input carries.
    let _ = parse_startup(bytes::BytesMut::from(data));
});
