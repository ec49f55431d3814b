//! The server messages pgwarden reads itself: ErrorResponse/NoticeResponse,
//! ParameterStatus, and the text of a Query.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgwarden::protocol::ServerNotice;
use pgwarden::protocol::messages::{error_is_fatal, parameter_status, query_text};

fuzz_target!(|body: &[u8]| {
    let notice = ServerNotice::parse(body);
    // The allocation-free check must agree with the full parse.
    assert_eq!(error_is_fatal(body), notice.is_fatal());
    let _ = parameter_status(body);
    assert!(query_text(body).len() <= body.len());
});
