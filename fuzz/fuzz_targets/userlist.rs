//! The user list (PgBouncer's userlist.txt format, with md5 and SCRAM secrets).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden::auth::UserList;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = UserList::parse(text, std::path::Path::new("/fuzz/userlist.txt"));
    }
});
