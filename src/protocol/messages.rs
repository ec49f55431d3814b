//! The messages pgwarden writes itself, and the few it must read.
//!
//! Writing goes through pgwire's message types so that the encodings are the
//! crate's, not ours. Reading borrows from frame bodies the proxy already holds:
//! the hot path only ever needs a status byte, a parameter name and value, or
//! the severity of an error, and none of those deserve an allocation.

use bytes::{Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::extendedquery::{BindComplete, CloseComplete, ParseComplete};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};

/// An ErrorResponse or NoticeResponse: the fields PostgreSQL defines, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerNotice {
    /// `ERROR`, `FATAL`, `WARNING`, … (never localized)
    pub severity: String,
    /// SQLSTATE
    pub code: String,
    /// primary message
    pub message: String,
    /// every other field (detail, hint, position, …) as sent
    pub other: Vec<(u8, String)>,
}

impl ServerNotice {
    /// A notice pgwarden raises itself.
    pub fn new(severity: &str, code: &str, message: impl Into<String>) -> Self {
        ServerNotice {
            severity: severity.to_owned(),
            code: code.to_owned(),
            message: message.into(),
            other: Vec::new(),
        }
    }

    /// Parses the body of an ErrorResponse or NoticeResponse.
    pub fn parse(body: &[u8]) -> Self {
        let mut notice = ServerNotice::new("", "", "");
        let mut localized_severity = String::new();
        for (kind, value) in fields(body) {
            let value = String::from_utf8_lossy(value).into_owned();
            match kind {
                // The first non-empty one counts, as in error_is_fatal.
                b'V' if notice.severity.is_empty() => notice.severity = value,
                b'V' => {}
                b'S' => localized_severity = value,
                b'C' => notice.code = value,
                b'M' => notice.message = value,
                _ => notice.other.push((kind, value)),
            }
        }
        if notice.severity.is_empty() {
            notice.severity = localized_severity;
        }
        notice
    }

    /// True for FATAL and PANIC: the server closes the connection after sending it.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }

    fn wire_fields(&self) -> Vec<(u8, String)> {
        let mut out = Vec::with_capacity(self.other.len() + 4);
        out.push((b'S', self.severity.clone()));
        out.push((b'V', self.severity.clone()));
        out.push((b'C', self.code.clone()));
        out.push((b'M', self.message.clone()));
        out.extend(self.other.iter().cloned());
        out
    }
}

/// Iterates the `(field type, value)` pairs of an ErrorResponse/NoticeResponse body.
fn fields(body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = body;
    std::iter::from_fn(move || {
        let (&kind, tail) = rest.split_first()?;
        if kind == 0 {
            return None;
        }
        let end = memchr::memchr(0, tail)?;
        rest = &tail[end + 1..];
        Some((kind, &tail[..end]))
    })
}

/// True when an ErrorResponse body carries severity FATAL or PANIC; reads without allocating.
pub fn error_is_fatal(body: &[u8]) -> bool {
    let mut severity = None;
    for (kind, value) in fields(body) {
        match kind {
            b'V' if !value.is_empty() => return matches!(value, b"FATAL" | b"PANIC"),
            b'S' => severity = Some(value),
            _ => {}
        }
    }
    matches!(severity, Some(b"FATAL" | b"PANIC"))
}

/// Splits a ParameterStatus body into name and value.
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

/// Splits at the first NUL: the C string and what follows it (all of `bytes` and
/// nothing when there is no NUL). A vectorised search: query texts are this scan's
/// longest input, and it runs on every one. The empty string (the unnamed statement
/// and portal of most extended-protocol messages) is answered before the search is
/// set up, which would cost more than all the rest of the call.
pub fn cstr(bytes: &[u8]) -> (&[u8], &[u8]) {
    if let Some((0, rest)) = bytes.split_first() {
        return (&[], rest);
    }
    match memchr::memchr(0, bytes) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[]),
    }
}

/// Reads the text of a simple Query body (up to its terminator).
pub fn query_text(body: &[u8]) -> &[u8] {
    cstr(body).0
}

/// Appends the encoding of one pgwire message. Encoding only fails for messages over
/// pgwire's size limits, which nothing pgwarden builds can reach; such a message is
/// dropped and logged rather than taking the process down.
fn put(buf: &mut BytesMut, message: &impl Message) {
    if let Err(e) = message.encode(buf) {
        tracing::error!(error = %e, "could not encode a protocol message");
    }
}

/// ErrorResponse.
pub fn put_error(buf: &mut BytesMut, notice: &ServerNotice) {
    put(buf, &ErrorResponse::new(notice.wire_fields()));
}

/// NoticeResponse.
pub fn put_notice(buf: &mut BytesMut, notice: &ServerNotice) {
    put(buf, &NoticeResponse::new(notice.wire_fields()));
}

/// ReadyForQuery with the given status byte (`I`, `T` or `E`).
pub fn put_ready(buf: &mut BytesMut, status: u8) {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    put(buf, &ReadyForQuery::new(status));
}

/// ParameterStatus.
pub fn put_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put(
        buf,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
    );
}

/// BackendKeyData with a protocol 3.0 (four-byte) key.
pub fn put_backend_key(buf: &mut BytesMut, pid: i32, secret: i32) {
    put(buf, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

/// An Authentication request or result.
pub fn put_auth(buf: &mut BytesMut, auth: Authentication) {
    put(buf, &auth);
}

/// NegotiateProtocolVersion: pgwarden speaks 3.0 and none of the `_pq_` options.
pub fn put_negotiate_protocol(buf: &mut BytesMut, unsupported: Vec<String>) {
    put(buf, &NegotiateProtocolVersion::new(0, unsupported));
}

/// CommandComplete.
pub fn put_command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, &CommandComplete::new(tag.to_owned()));
}

/// ParseComplete, BindComplete or CloseComplete, by their type byte.
pub fn put_complete(buf: &mut BytesMut, tag: u8) {
    match tag {
        b'1' => put(buf, &ParseComplete::new()),
        b'2' => put(buf, &BindComplete::new()),
        _ => put(buf, &CloseComplete::new()),
    }
}

/// NoData ('n'): pgwire has no standalone type for it.
pub fn put_no_data(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'n', 0, 0, 0, 4]);
}

/// A CancelRequest packet for a server connection.
pub fn cancel_request(pid: i32, secret: i32) -> BytesMut {
    let mut buf = BytesMut::with_capacity(16);
    put(&mut buf, &CancelRequest::new(pid, SecretKey::I32(secret)));
    buf
}

/// A frontend message for pgwarden's own conversation with a server.
pub fn frontend(message: &impl Message) -> Bytes {
    let mut buf = BytesMut::new();
    put(&mut buf, message);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_body(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in fields {
            body.push(*k);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn notice_round_trip_keeps_every_field() {
        let n = ServerNotice {
            severity: "ERROR".into(),
            code: "42P01".into(),
            message: "relation \"x\" does not exist".into(),
            other: vec![(b'P', "15".into()), (b'H', "check the name".into())],
        };
        let mut buf = BytesMut::new();
        put_error(&mut buf, &n);
        assert_eq!(buf[0], b'E');
        assert_eq!(ServerNotice::parse(&buf[5..]), n);
        assert!(!error_is_fatal(&buf[5..]));
    }

    #[test]
    fn fatal_is_read_from_the_unlocalized_severity() {
        let body = error_body(&[(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "57P01")]);
        assert!(error_is_fatal(&body));
        // A localized 'S' must not fool the check when 'V' is present.
        let body = error_body(&[(b'S', "SCHWERWIEGEND"), (b'V', "FATAL")]);
        assert!(error_is_fatal(&body));
        let body = error_body(&[(b'S', "PANIC")]);
        assert!(error_is_fatal(&body));
        assert!(ServerNotice::parse(&body).is_fatal());
        // Truncated bodies parse as far as they go and never panic.
        assert!(!error_is_fatal(b"Sxx"));
        assert_eq!(ServerNotice::parse(b"Mabc").message, "");
    }

    #[test]
    fn fatal_check_and_full_parse_agree_on_odd_severities() {
        // Found by fuzzing: an empty 'V' must not hide the 'S' from one of them.
        let crash =
            b"A\xfe\x00\x01\x00SPANIC\x00\xfe\x14\xff\xff\xff\xff\xff\xff\x7f\x00V\x00V\x01";
        assert_eq!(error_is_fatal(crash), ServerNotice::parse(crash).is_fatal());
        assert!(error_is_fatal(crash));
        // Repeated 'V': both take the first.
        let body = error_body(&[(b'V', "FATAL"), (b'V', "ERROR")]);
        assert!(error_is_fatal(&body) && ServerNotice::parse(&body).is_fatal());
    }

    #[test]
    fn parameter_status_splits_name_and_value() {
        assert_eq!(
            parameter_status(b"TimeZone\0UTC\0"),
            Some(("TimeZone", "UTC"))
        );
        assert_eq!(parameter_status(b"TimeZone"), None);
    }
}
