//! Client → server: walking the client's messages, recording what each will be
//! answered with, and translating named prepared statements.
//!
//! Most bytes pass untouched and uncopied. The exceptions, all small messages:
//! Parse, Bind, Describe and Close of a *named* statement carry the client's
//! name, which becomes the statement's server-side name; a Parse the server
//! already has, a Close of a statement, and a DEALLOCATE or DISCARD ALL are
//! answered by pgwarden without reaching the server; a Query whose SQL will not
//! behave as on a direct connection earns a NOTICE first; Terminate is never
//! forwarded.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::expect::{Expect, Reply};
use super::splice::{Ctx, pass};
use super::sql;
use super::statements::{ClientStatements, Registry, Statement, close_message};
use crate::error::{ClientError, sqlstate};
use crate::protocol::ServerNotice;
use crate::protocol::frame::{self, HEADER_LEN, MAX_BUFFERED_LEN, MAX_MESSAGE_LEN};
use crate::protocol::messages::{cstr, put_complete, put_error, put_notice, put_ready};

/// The frontend messages pgwarden understands after login.
pub fn is_frontend_message(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X'
    )
}

/// Messages pgwarden reads whole (when they are at most `MAX_BUFFERED_LEN`).
pub fn read_whole(tag: u8) -> bool {
    matches!(tag, b'Q' | b'P' | b'B' | b'D' | b'C' | b'X')
}

/// Longest statement-name prefix of a Bind that is read to rename it while the rest streams.
const MAX_BIND_PREFIX: usize = 1024;

/// Scans new client bytes in `inbuf`, queues them (rewritten where needed) for the
/// server in `to_server`, and records what the server will answer.
pub fn forward(
    inbuf: &mut BytesMut,
    to_server: &mut BytesMut,
    cx: &mut Ctx<'_>,
) -> Result<(), ClientError> {
    let mut pos = 0;
    while !cx.x.client_done {
        if !cx.scanner.at_boundary() {
            let n = cx.scanner.pass(inbuf.len() - pos);
            if n == 0 {
                break;
            }
            if !cx.x.skipping {
                pos += n;
            } else {
                drop_bytes(inbuf, &mut pos, to_server, n);
            }
            continue;
        }
        // The type byte is checked first: garbage is a protocol error even before a length arrives.
        if let Some(&tag) = inbuf.get(pos)
            && !is_frontend_message(tag)
        {
            return Err(ClientError::Protocol(format!(
                "invalid frontend message type '{}'",
                char::from(tag)
            )));
        }
        let Some(header) = inbuf
            .get(pos..)
            .and_then(|b| frame::header(b, cx.scanner.max()))
        else {
            break;
        };
        let (tag, len) = header?;
        let available = inbuf.len() - pos;
        let whole = read_whole(tag) && len <= MAX_BUFFERED_LEN;
        if whole && available < len {
            break;
        }
        if cx.x.skipping && tag != b'S' && tag != b'X' {
            // A local error ended this batch: drop everything up to its Sync.
            if whole {
                drop_bytes(inbuf, &mut pos, to_server, len);
            } else {
                cx.scanner.begin(len - HEADER_LEN);
                drop_bytes(inbuf, &mut pos, to_server, HEADER_LEN);
            }
            continue;
        }
        if !whole {
            if tag == b'B' && cx.max_prepared > 0 {
                // A large Bind streams, but its statement name must be translated first.
                match bind_prefix(&inbuf[pos..]) {
                    Some((_, name_end)) if !bind_statement(&inbuf[pos..], name_end).is_empty() => {
                        let prefix_len = name_end + 1;
                        let rewritten = rename_bind(&inbuf[pos..pos + prefix_len], len, cx);
                        drop_bytes(inbuf, &mut pos, to_server, prefix_len);
                        to_server.extend_from_slice(&rewritten);
                        cx.scanner.begin(len - prefix_len);
                        continue;
                    }
                    Some(_) => {}
                    None if available < MAX_BIND_PREFIX => break,
                    None => {
                        return Err(ClientError::Protocol(
                            "Bind message without a statement name".into(),
                        ));
                    }
                }
            }
            if tag == b'P'
                && cx.max_prepared > 0
                && inbuf.get(pos + HEADER_LEN).is_some_and(|&b| b != 0)
            {
                refuse(
                    cx,
                    "a named prepared statement longer than 1 MiB is not supported in transaction pooling",
                );
                cx.scanner.begin(len - HEADER_LEN);
                drop_bytes(inbuf, &mut pos, to_server, HEADER_LEN);
                continue;
            }
            account(tag, cx);
            cx.scanner.begin(len - HEADER_LEN);
            pos += HEADER_LEN;
            continue;
        }
        let body = &inbuf[pos + HEADER_LEN..pos + len];
        match translate(tag, body, cx) {
            Translation::Pass => pos += len,
            Translation::Drop => drop_bytes(inbuf, &mut pos, to_server, len),
            Translation::Replace(bytes) => {
                drop_bytes(inbuf, &mut pos, to_server, len);
                to_server.extend_from_slice(&bytes);
            }
            Translation::Terminate => {
                drop_bytes(inbuf, &mut pos, to_server, len);
                cx.x.client_done = true;
            }
        }
    }
    if pos == inbuf.len() && to_server.is_empty() {
        // All that was read goes on as it came (most requests): the buffer changes
        // hands whole. Splitting it would allocate a shared header for its two halves,
        // and the client's next read starts a buffer of its own anyway.
        std::mem::swap(inbuf, to_server);
    } else {
        pass(inbuf, pos, to_server);
    }
    Ok(())
}

/// Moves what precedes `pos` to the server, then drops `n` bytes from `inbuf`.
fn drop_bytes(inbuf: &mut BytesMut, pos: &mut usize, to_server: &mut BytesMut, n: usize) {
    pass(inbuf, *pos, to_server);
    *pos = 0;
    let _ = inbuf.split_to(n);
}

/// What becomes of one whole client message.
enum Translation {
    /// forward it as it is
    Pass,
    /// do not forward it (pgwarden answers it, or it is part of a failed batch)
    Drop,
    /// forward these bytes instead (injected messages, then the renamed message)
    Replace(BytesMut),
    /// Terminate: end the session
    Terminate,
}

/// Records what a streamed (or passed) message will be answered with.
fn account(tag: u8, cx: &mut Ctx<'_>) {
    match tag {
        b'Q' => {
            cx.expected.push(Expect::Query);
            cx.x.unsynced = false;
            cx.x.traffic.queries += 1;
        }
        b'F' => {
            cx.expected.push(Expect::Function);
            cx.x.unsynced = false;
        }
        // A Sync sent during COPY FROM STDIN is ignored by the server.
        b'S' if !cx.x.copy_in => {
            cx.expected.push(Expect::Sync);
            cx.x.unsynced = false;
            cx.x.skipping = false;
        }
        b'S' => cx.x.skipping = false,
        b'P' => {
            cx.expected.push(Expect::Parse {
                swallow: false,
                statement: None,
                client_name: None,
            });
            cx.x.unsynced = true;
        }
        b'B' => {
            cx.expected.push(Expect::Bind(None));
            cx.x.unsynced = true;
        }
        b'D' => {
            cx.expected.push(Expect::Describe(None));
            cx.x.unsynced = true;
        }
        b'E' => {
            cx.expected.push(Expect::Execute);
            cx.x.unsynced = true;
            cx.x.traffic.queries += 1;
        }
        b'C' => {
            cx.expected.push(Expect::Close { swallow: false });
            cx.x.unsynced = true;
        }
        b'c' | b'f' => cx.x.copy_in = false,
        _ => {}
    }
}

/// Answers the current request with an error and drops the rest of its batch,
/// as the server would after an error.
fn refuse(cx: &mut Ctx<'_>, message: &str) {
    let mut out = BytesMut::new();
    put_error(
        &mut out,
        &ServerNotice::new("ERROR", sqlstate::FEATURE_NOT_SUPPORTED, message),
    );
    cx.expected.push(Expect::Reply(Reply::Bytes(out.freeze())));
    cx.x.skipping = true;
    cx.x.unsynced = true;
}

/// A batch of named Parses answered without a server.
pub struct Answered {
    /// bytes of the client's buffer it took
    pub used: usize,
    /// statements it prepared
    pub statements: u64,
    /// its ParseCompletes and ReadyForQuery
    pub answer: BytesMut,
}

/// Answers a batch of named Parses and its Sync without a server when every
/// statement in it is one a server of this database has already accepted. Drivers
/// that prepare and wait (libpq's PQprepare, used by `pgbench -M prepared`) prepare
/// between transactions, and waiting for a server there could wait on the very pool
/// their own open transactions hold.
pub fn prepare_without_server(
    inbuf: &[u8],
    statements: &mut ClientStatements,
    registry: &Registry,
    search_path: &str,
) -> Option<Answered> {
    let mut pos = 0;
    let mut found = Vec::new();
    loop {
        let (tag, len) = frame::header(&inbuf[pos..], MAX_MESSAGE_LEN)?.ok()?;
        let body = inbuf.get(pos + HEADER_LEN..pos + len)?;
        pos += len;
        match tag {
            b'P' => {
                let (name, rest) = cstr(body);
                let fresh = !name.is_empty()
                    && !statements.contains(name)
                    && !found.iter().any(|(n, _)| *n == name);
                if !fresh {
                    return None;
                }
                found.push((name, registry.confirmed(search_path, rest)?));
            }
            b'S' => break,
            _ => return None,
        }
    }
    let mut answer = BytesMut::new();
    let count = found.len() as u64;
    for (name, statement) in found {
        statements.insert(name, statement);
        put_complete(&mut answer, b'1');
    }
    put_ready(&mut answer, b'I');
    Some(Answered {
        used: pos,
        statements: count,
        answer,
    })
}

fn translate(tag: u8, body: &[u8], cx: &mut Ctx<'_>) -> Translation {
    match tag {
        b'X' => Translation::Terminate,
        b'Q' => query(body, cx),
        b'P' if cx.max_prepared > 0 => parse(body, cx),
        b'B' if cx.max_prepared > 0 => {
            let (portal, rest) = cstr(body);
            let (name, _) = cstr(rest);
            if name.is_empty() {
                account(tag, cx);
                return Translation::Pass;
            }
            let mut out = BytesMut::new();
            let prefix = portal.len() + 1 + name.len() + 1;
            let renamed = rename_bind_with(portal, name, body.len() + 4, prefix, cx, &mut out);
            if renamed {
                out.extend_from_slice(&body[prefix..]);
                Translation::Replace(out)
            } else {
                Translation::Pass
            }
        }
        b'D' if cx.max_prepared > 0 && body.first() == Some(&b'S') => {
            let (name, _) = cstr(&body[1..]);
            let statement = (!name.is_empty())
                .then(|| cx.client_statements.get(name).cloned())
                .flatten();
            match statement {
                Some(statement) => {
                    let mut out = ensure_prepared(&statement, cx);
                    cx.expected.push(Expect::Describe(Some(statement.clone())));
                    cx.x.unsynced = true;
                    let server_name = statement.server_name.as_bytes();
                    out.put_u8(b'D');
                    out.put_i32((4 + 1 + server_name.len() + 1) as i32);
                    out.put_u8(b'S');
                    out.put_slice(server_name);
                    out.put_u8(0);
                    Translation::Replace(out)
                }
                None => {
                    account(tag, cx);
                    Translation::Pass
                }
            }
        }
        b'C' if cx.max_prepared > 0 && body.first() == Some(&b'S') => {
            let (name, _) = cstr(&body[1..]);
            if name.is_empty() {
                account(tag, cx);
                return Translation::Pass;
            }
            // The server keeps the statement for other clients; the client's name goes.
            // Closing a name that does not exist is not an error in PostgreSQL either.
            cx.client_statements.remove(name);
            let mut out = BytesMut::new();
            put_complete(&mut out, b'3');
            cx.expected.push(Expect::Reply(Reply::Bytes(out.freeze())));
            cx.x.unsynced = true;
            Translation::Drop
        }
        _ => {
            account(tag, cx);
            Translation::Pass
        }
    }
}

/// A Query: what its SQL means for pooling.
fn query(body: &[u8], cx: &mut Ctx<'_>) -> Translation {
    let text = crate::protocol::messages::query_text(body);
    let glance = sql::glance(text);
    let nothing_in_flight = cx.expected.is_empty() && *cx.status == b'I';
    if cx.max_prepared > 0 {
        match &glance.deallocate {
            Some(None) => {
                cx.client_statements.clear();
                return answer_locally(cx, "DEALLOCATE ALL");
            }
            Some(Some(name)) if cx.client_statements.remove(name.as_bytes()) => {
                return answer_locally(cx, "DEALLOCATE");
            }
            _ => {}
        }
        if glance.discard_all && nothing_in_flight {
            // The client's session is what DISCARD ALL resets; server connections are shared.
            cx.client_statements.clear();
            cx.x.reset_all = true;
            return answer_locally(cx, "DISCARD ALL");
        }
        if glance.reset_all || glance.deallocate.is_some() {
            // DISCARD ALL or DEALLOCATE ALL inside a longer text reaches the server and
            // drops its statements: prepare them again when next needed.
            cx.server_statements.clear();
        }
    }
    if let Some(notice) = glance.notice.filter(|_| cx.transaction_pooling) {
        let mut out = BytesMut::new();
        put_notice(&mut out, &ServerNotice::new("NOTICE", "0A000", notice));
        cx.expected.push(Expect::Reply(Reply::Bytes(out.freeze())));
    }
    cx.x.touched.extend(glance.settings);
    cx.x.reset_all |= glance.reset_all;
    account(b'Q', cx);
    Translation::Pass
}

fn answer_locally(cx: &mut Ctx<'_>, tag: &'static str) -> Translation {
    cx.expected.push(Expect::Reply(Reply::Done(tag)));
    cx.x.traffic.queries += 1;
    Translation::Drop
}

/// A Parse. Unnamed: forwarded. Named: renamed to the statement's server-side name,
/// or answered by pgwarden when the server connection already has it.
fn parse(body: &[u8], cx: &mut Ctx<'_>) -> Translation {
    let (name, rest) = cstr(body);
    if name.is_empty() {
        let glance = sql::glance(cstr(rest).0);
        cx.x.touched.extend(glance.settings);
        account(b'P', cx);
        return Translation::Pass;
    }
    if cx.client_statements.contains(name) {
        let mut out = BytesMut::new();
        put_error(
            &mut out,
            &ServerNotice::new(
                "ERROR",
                "42P05",
                format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(name)
                ),
            ),
        );
        cx.expected.push(Expect::Reply(Reply::Bytes(out.freeze())));
        cx.x.skipping = true;
        cx.x.unsynced = true;
        return Translation::Drop;
    }
    cx.x.traffic.client_parses += 1;
    let search_path = cx.params.get("search_path").unwrap_or_default();
    let statement = cx.registry.statement(search_path, rest);
    let shared = statement.in_use();
    cx.client_statements.insert(name, statement.clone());
    cx.x.unsynced = true;
    let prepared_here = cx.server_statements.touch(&statement.server_name);
    if prepared_here && shared {
        let mut out = BytesMut::new();
        put_complete(&mut out, b'1');
        cx.expected.push(Expect::Reply(Reply::Bytes(out.freeze())));
        return Translation::Drop;
    }
    let mut out = BytesMut::new();
    if !prepared_here {
        make_room(&statement, cx, &mut out);
    }
    prepare_on_server(statement, Some(Bytes::copy_from_slice(name)), cx, &mut out);
    Translation::Replace(out)
}

/// Writes the Parse that prepares `statement` on the server connection, for the
/// client's Parse of it as `client_name`, or (`None`) injected before a Bind.
fn prepare_on_server(
    statement: Arc<Statement>,
    client_name: Option<Bytes>,
    cx: &mut Ctx<'_>,
    out: &mut BytesMut,
) {
    // A Close first, in case the server has the name after all (after a DISCARD ALL
    // that failed, say): closing a name that does not exist is not an error.
    out.extend_from_slice(&close_message(&statement.server_name));
    cx.expected.push(Expect::Close { swallow: true });
    out.extend_from_slice(&statement.parse_message());
    cx.x.traffic.server_parses += 1;
    cx.expected.push(Expect::Parse {
        swallow: client_name.is_none(),
        statement: Some(statement),
        client_name,
    });
}

/// Records `statement` in the server connection's cache, closing the statement it evicts.
fn make_room(statement: &Arc<Statement>, cx: &mut Ctx<'_>, out: &mut BytesMut) {
    if let Some(evicted) = cx
        .server_statements
        .insert(statement.clone(), cx.max_prepared)
    {
        out.extend_from_slice(&close_message(&evicted));
        cx.expected.push(Expect::Close { swallow: true });
    }
}

/// The messages that make sure the server connection has `statement` prepared.
fn ensure_prepared(statement: &Arc<Statement>, cx: &mut Ctx<'_>) -> BytesMut {
    let mut out = BytesMut::new();
    if cx.server_statements.touch(&statement.server_name) {
        return out;
    }
    make_room(statement, cx, &mut out);
    prepare_on_server(statement.clone(), None, cx, &mut out);
    out
}

/// Where a Bind's statement name ends, if both cstrings are in `frame` (header included).
fn bind_prefix(frame: &[u8]) -> Option<(usize, usize)> {
    let body = frame.get(HEADER_LEN..)?;
    let portal_end = body.iter().take(MAX_BIND_PREFIX).position(|&b| b == 0)?;
    let name_end = body[portal_end + 1..]
        .iter()
        .take(MAX_BIND_PREFIX)
        .position(|&b| b == 0)?;
    Some((
        HEADER_LEN + portal_end,
        HEADER_LEN + portal_end + 1 + name_end,
    ))
}

fn bind_statement(frame: &[u8], name_end: usize) -> &[u8] {
    let body = &frame[HEADER_LEN..name_end];
    let (_, name) = cstr(body);
    name
}

/// The rewritten header and prefix of a streamed Bind (the rest follows unchanged).
fn rename_bind(prefix: &[u8], len: usize, cx: &mut Ctx<'_>) -> BytesMut {
    let (portal, rest) = cstr(&prefix[HEADER_LEN..]);
    let (name, _) = cstr(rest);
    let mut out = BytesMut::new();
    if !rename_bind_with(
        portal,
        name,
        len - 1,
        prefix.len() - HEADER_LEN,
        cx,
        &mut out,
    ) {
        out.extend_from_slice(prefix);
    }
    out
}

/// Writes the injected messages a Bind needs and its renamed header and prefix to
/// `out`; `length` is the Bind's length field, `prefix` the bytes of portal and name.
/// Returns false (writing nothing) when the statement is not one of the client's.
fn rename_bind_with(
    portal: &[u8],
    name: &[u8],
    length: usize,
    prefix: usize,
    cx: &mut Ctx<'_>,
    out: &mut BytesMut,
) -> bool {
    let Some(statement) = cx.client_statements.get(name).cloned() else {
        account(b'B', cx);
        return false;
    };
    // Injected messages first, then the Bind: the queue follows the bytes.
    out.extend_from_slice(&ensure_prepared(&statement, cx));
    // A prepared SET changes the session each time it runs.
    cx.x.touched.extend(statement.settings.iter().cloned());
    cx.expected.push(Expect::Bind(Some(statement.clone())));
    cx.x.unsynced = true;
    cx.x.traffic.binds += 1;
    let server_name = statement.server_name.as_bytes();
    let new_length = length - prefix + portal.len() + 1 + server_name.len() + 1;
    out.put_u8(b'B');
    out.put_i32(new_length as i32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(server_name);
    out.put_u8(0);
    true
}
