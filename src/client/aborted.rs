//! A transaction block that died with its server connection.
//!
//! When the server connection of a client inside `BEGIN … ` fails, the work of
//! that transaction is gone. Telling the client "idle" would let its next
//! statements run in autocommit on another connection, outside the transaction
//! it believes it is in. Instead pgwarden answers the way PostgreSQL answers a
//! failed transaction block: every statement is refused (SQLSTATE 25P02) until
//! the client ends the block with ROLLBACK (or COMMIT, which then reports
//! ROLLBACK), after which the client is idle and served normally again. Both
//! the simple and the extended protocol are answered, since drivers such as
//! pgjdbc send ROLLBACK through Parse/Bind/Execute.

use std::collections::HashSet;

use bytes::BytesMut;

use crate::error::ClientError;
use crate::protocol::ServerNotice;
use crate::protocol::messages::{
    cstr, put_command_complete, put_complete, put_error, put_no_data, put_ready,
};

/// What the client is told next.
#[derive(Debug)]
pub struct Aborted {
    /// reported on the first refused statement: why the transaction failed
    first_error: Option<ServerNotice>,
    /// the current extended-protocol batch failed; ignore up to Sync
    skipping: bool,
    /// prepared statements (by name; "" is the unnamed one) that end the block
    ending_statements: HashSet<String>,
    /// portals bound to such a statement
    ending_portals: HashSet<String>,
    /// the block was ended in the current batch; Sync makes the client idle
    ended: bool,
}

impl Aborted {
    /// A dead transaction block; `first_error` is reported on the next statement.
    pub fn new(first_error: Option<ServerNotice>) -> Aborted {
        Aborted {
            first_error,
            skipping: false,
            ending_statements: HashSet::new(),
            ending_portals: HashSet::new(),
            ended: false,
        }
    }

    /// Answers one whole client frame (`body` is `None` when it was too large to
    /// read, which no transaction-ending message is). Returns true once the
    /// client has been told it is idle.
    pub fn answer(&mut self, tag: u8, body: Option<&[u8]>, out: &mut BytesMut) -> bool {
        let body = body.unwrap_or_default();
        match tag {
            b'Q' => {
                if is_block_end(cstr(body).0) {
                    put_command_complete(out, "ROLLBACK");
                    put_ready(out, b'I');
                    return true;
                }
                self.refuse(out);
                put_ready(out, b'E');
            }
            b'F' => {
                self.refuse(out);
                put_ready(out, b'E');
            }
            b'S' => {
                self.skipping = false;
                put_ready(out, if self.ended { b'I' } else { b'E' });
                return self.ended;
            }
            _ if self.skipping => {}
            b'P' => {
                let (name, rest) = cstr(body);
                if is_block_end(cstr(rest).0) {
                    self.ending_statements.insert(lossy(name));
                    put_complete(out, b'1');
                } else {
                    self.fail_batch(out);
                }
            }
            b'B' => {
                let (portal, rest) = cstr(body);
                if self.ending_statements.contains(&lossy(cstr(rest).0)) {
                    self.ending_portals.insert(lossy(portal));
                    put_complete(out, b'2');
                } else {
                    self.fail_batch(out);
                }
            }
            b'D' => {
                let name = lossy(cstr(body.get(1..).unwrap_or_default()).0);
                let known = match body.first() {
                    Some(b'S') => self.ending_statements.contains(&name),
                    _ => self.ending_portals.contains(&name),
                };
                if !known {
                    self.fail_batch(out);
                    return false;
                }
                if body.first() == Some(&b'S') {
                    // ParameterDescription: no parameters.
                    out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                }
                put_no_data(out);
            }
            b'E' => {
                if self.ending_portals.contains(&lossy(cstr(body).0)) {
                    put_command_complete(out, "ROLLBACK");
                    self.ended = true;
                } else {
                    self.fail_batch(out);
                }
            }
            b'C' => put_complete(out, b'3'),
            // Flush, and copy messages that arrive after the copy failed.
            _ => {}
        }
        false
    }

    fn refuse(&mut self, out: &mut BytesMut) {
        let notice = self
            .first_error
            .take()
            .unwrap_or_else(|| ClientError::TransactionAborted.to_notice(false));
        put_error(out, &notice);
    }

    fn fail_batch(&mut self, out: &mut BytesMut) {
        self.refuse(out);
        self.skipping = true;
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// True for a single statement that ends a transaction block without starting another.
fn is_block_end(sql: &[u8]) -> bool {
    let Ok(sql) = std::str::from_utf8(sql) else {
        return false;
    };
    let sql = sql.trim().trim_end_matches(';').trim().to_ascii_uppercase();
    let mut words = sql.split_ascii_whitespace();
    let Some(verb) = words.next() else {
        return false;
    };
    let rest: Vec<&str> = words.collect();
    matches!(verb, "ROLLBACK" | "ABORT" | "COMMIT" | "END")
        && matches!(
            rest.as_slice(),
            [] | ["WORK" | "TRANSACTION"]
                | ["AND", "NO", "CHAIN"]
                | ["WORK" | "TRANSACTION", "AND", "NO", "CHAIN"]
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(out: &BytesMut) -> Vec<u8> {
        let mut tags = Vec::new();
        let mut rest = &out[..];
        while rest.len() >= 5 {
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            tags.push(rest[0]);
            rest = &rest[len + 1..];
        }
        tags
    }

    #[test]
    fn recognises_statements_that_end_a_block() {
        for yes in [
            "ROLLBACK",
            "rollback;",
            " Commit Work ;",
            "END",
            "abort transaction",
            "COMMIT AND NO CHAIN",
        ] {
            assert!(is_block_end(yes.as_bytes()), "{yes}");
        }
        for no in [
            "ROLLBACK TO SAVEPOINT a",
            "COMMIT AND CHAIN",
            "SELECT 1",
            "",
            "ROLLBACK PREPARED 'x'",
            "ROLLBACK; SELECT 1",
        ] {
            assert!(!is_block_end(no.as_bytes()), "{no}");
        }
    }

    #[test]
    fn simple_protocol_refuses_until_rollback() {
        let lost = ServerNotice::new("ERROR", "08006", "lost");
        let mut a = Aborted::new(Some(lost));
        let mut out = BytesMut::new();
        assert!(!a.answer(b'Q', Some(b"INSERT INTO t VALUES (1)\0"), &mut out));
        assert_eq!(tags(&out), b"EZ");
        assert_eq!(ServerNotice::parse(&out[5..]).code, "08006");
        assert_eq!(*out.last().unwrap(), b'E');
        out.clear();
        assert!(!a.answer(b'Q', Some(b"SELECT 1\0"), &mut out));
        assert_eq!(ServerNotice::parse(&out[5..]).code, "25P02");
        out.clear();
        assert!(a.answer(b'Q', Some(b"COMMIT\0"), &mut out));
        assert_eq!(tags(&out), b"CZ");
        assert_eq!(*out.last().unwrap(), b'I');
    }

    #[test]
    fn extended_protocol_rollback_is_answered() {
        let mut a = Aborted::new(None);
        let mut out = BytesMut::new();
        a.answer(b'P', Some(b"\0ROLLBACK\0\0\0"), &mut out);
        a.answer(b'B', Some(b"\0\0\0\0\0\0\0\0"), &mut out);
        a.answer(b'D', Some(b"P\0"), &mut out);
        a.answer(b'E', Some(b"\0\0\0\0\0"), &mut out);
        assert!(a.answer(b'S', None, &mut out));
        assert_eq!(tags(&out), b"12nCZ");
        assert_eq!(*out.last().unwrap(), b'I');
    }

    #[test]
    fn a_failed_batch_is_skipped_to_sync() {
        let mut a = Aborted::new(None);
        let mut out = BytesMut::new();
        a.answer(b'P', Some(b"\0SELECT 1\0\0\0"), &mut out);
        a.answer(b'B', Some(b"\0\0\0\0\0\0\0\0"), &mut out);
        a.answer(b'E', Some(b"\0\0\0\0\0"), &mut out);
        assert!(!a.answer(b'S', None, &mut out));
        assert_eq!(tags(&out), b"EZ");
        assert_eq!(*out.last().unwrap(), b'E');
    }
}
