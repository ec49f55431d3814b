//! The configuration file, from TOML text to a validated config.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, std::path::Path::new("/fuzz/pgwarden.toml"));
    }
});
