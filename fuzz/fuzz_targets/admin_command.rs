//! The admin console's command language.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden::admin::command::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        let _ = parse(sql);
    }
});
