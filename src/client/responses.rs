//! Server → client: matching each server message to the request it answers.
//!
//! Rows and other bulky messages stream through by their headers; the small
//! messages that end a request are read whole so that the head of the
//! [`Expected`](super::expect::Expected) queue can be popped, answers to
//! injected messages swallowed, and pgwarden's own answers slotted in at their
//! turn. ReadyForQuery carries the transaction status; ParameterStatus the
//! client's settings; a FATAL ErrorResponse means the connection is going away
//! and is held back for the loss report.

use std::sync::Arc;

use bytes::BytesMut;

use super::expect::{Expect, Reply};
use super::splice::{Ctx, pass};
use crate::error::{ClientError, sqlstate};
use crate::protocol::ServerNotice;
use crate::protocol::frame::{HEADER_LEN, Scan};
use crate::protocol::messages::{
    error_is_fatal, parameter_status, put_command_complete, put_error, put_ready,
};

/// Server messages read whole.
fn read_whole(tag: u8) -> bool {
    matches!(tag, b'Z' | b'S' | b'E' | b'G' | b'W' | b'1' | b'3')
}

/// Scans new server bytes in `inbuf` and queues them for the client. Returns true when
/// every request is answered and the server is idle: the ReadyForQuery that ends the
/// transaction is the last byte queued, and anything after it stays in `inbuf`.
pub fn forward(
    inbuf: &mut BytesMut,
    scanner: &mut crate::protocol::frame::Scanner,
    to_client: &mut BytesMut,
    cx: &mut Ctx<'_>,
) -> Result<bool, String> {
    let mut pos = 0;
    loop {
        if scanner.at_boundary() {
            answer_locally(inbuf, &mut pos, to_client, cx);
        }
        match scanner.next(&inbuf[pos..], read_whole) {
            Scan::Body(n) => pos += n,
            Scan::Header { tag } => {
                settle_streamed(tag, cx)?;
                pos += HEADER_LEN;
            }
            Scan::Whole { tag, len } => {
                let body = &inbuf[pos + HEADER_LEN..pos + len];
                let keep = settle_whole(tag, body, cx)?;
                let ours = if tag == b'E' && keep {
                    timeout_error(body, cx)
                } else {
                    None
                };
                if keep && ours.is_none() {
                    pos += len;
                } else {
                    pass(inbuf, pos, to_client);
                    let _ = inbuf.split_to(len);
                    pos = 0;
                    if let Some(ours) = ours {
                        to_client.extend_from_slice(&ours);
                    }
                }
                if tag == b'Z' && cx.idle() {
                    pass(inbuf, pos, to_client);
                    return Ok(true);
                }
            }
            Scan::NeedMore => break,
            Scan::Invalid(e) => return Err(format!("invalid message from server: {e}")),
        }
    }
    pass(inbuf, pos, to_client);
    Ok(false)
}

/// Writes pgwarden's own answers that are next in line. Inlined: it runs at every
/// message boundary, and there is rarely one.
#[inline]
pub fn answer_locally(
    inbuf: &mut BytesMut,
    pos: &mut usize,
    to_client: &mut BytesMut,
    cx: &mut Ctx<'_>,
) {
    if matches!(cx.expected.head(), Some(Expect::Reply(_))) {
        write_replies(inbuf, pos, to_client, cx);
    }
}

fn write_replies(
    inbuf: &mut BytesMut,
    pos: &mut usize,
    to_client: &mut BytesMut,
    cx: &mut Ctx<'_>,
) {
    while let Some(Expect::Reply(_)) = cx.expected.head() {
        pass(inbuf, *pos, to_client);
        *pos = 0;
        if let Some(Expect::Reply(reply)) = cx.expected.pop() {
            match reply {
                Reply::Bytes(bytes) => to_client.extend_from_slice(&bytes),
                Reply::Done(tag) => {
                    put_command_complete(to_client, tag);
                    put_ready(to_client, *cx.status);
                }
            }
        }
    }
}

/// The error a client sees in place of the server's "canceling statement due to user
/// request" when pgwarden sent that cancel for `query_timeout`: the same SQLSTATE
/// (57014), and a message that names the limit rather than a request nobody made.
fn timeout_error(body: &[u8], cx: &mut Ctx<'_>) -> Option<BytesMut> {
    let limit = cx.x.timed_out?;
    if ServerNotice::parse(body).code != sqlstate::QUERY_CANCELED {
        return None;
    }
    cx.x.timed_out = None;
    let mut out = BytesMut::new();
    put_error(&mut out, &ClientError::QueryTimeout(limit).to_notice(false));
    Some(out)
}

fn desync(tag: u8, cx: &Ctx<'_>) -> String {
    format!(
        "server sent '{}' while pgwarden expected an answer to {:?}",
        char::from(tag),
        cx.expected.head()
    )
}

/// Pops the request a streamed message (read by its header only) completes.
fn settle_streamed(tag: u8, cx: &mut Ctx<'_>) -> Result<(), String> {
    let head = cx.expected.head();
    let done = match tag {
        // Rows, notices, notifications, copy data: never the end of a request.
        b'D' | b'N' | b'A' | b'd' | b'c' | b'H' | b'V' | b't' => false,
        b'T' | b'n' => matches!(head, Some(Expect::Describe(_))),
        b'C' | b'I' | b's' => matches!(head, Some(Expect::Execute)),
        b'2' => {
            if !matches!(head, Some(Expect::Bind(_))) {
                return Err(desync(tag, cx));
            }
            true
        }
        _ => false,
    };
    if done {
        cx.expected.pop();
    }
    Ok(())
}

/// Handles a whole message; false means it must not reach the client.
fn settle_whole(tag: u8, body: &[u8], cx: &mut Ctx<'_>) -> Result<bool, String> {
    match tag {
        b'Z' => {
            cx.x.answered += 1;
            *cx.status = body.first().copied().unwrap_or(b'I');
            cx.x.traffic.transactions += u64::from(*cx.status == b'I');
            cx.x.copy_in = false;
            match cx.expected.pop() {
                Some(Expect::Sync | Expect::Query | Expect::Function) => Ok(true),
                other => Err(format!(
                    "server sent ReadyForQuery while pgwarden expected {other:?}"
                )),
            }
        }
        b'S' => {
            if let Some((name, value)) = parameter_status(body)
                && let Some(next) = cx.params.after_report(name, value)
            {
                *cx.params = Arc::new(next);
                *cx.applied = Some(cx.params.clone());
            }
            Ok(true)
        }
        b'E' if error_is_fatal(body) => {
            // Held back: the client learns of the loss as an error on its request,
            // and keeps its connection.
            cx.x.fatal = Some(ServerNotice::parse(body));
            Ok(false)
        }
        b'E' => {
            match cx.expected.head() {
                Some(Expect::Query | Expect::Function) | None => {}
                head => {
                    // A shared statement whose result type changed under it (DDL):
                    // the next Parse of its text prepares a fresh one.
                    if let Some(Expect::Bind(Some(s)) | Expect::Describe(Some(s))) = head
                        && ServerNotice::parse(body).code == sqlstate::FEATURE_NOT_SUPPORTED
                    {
                        cx.registry.retire(s);
                    }
                    // The server skips the rest of the batch up to its Sync: so do we,
                    // undoing what the skipped (or failed) Parses promised.
                    for skipped in cx.expected.skip_to_sync() {
                        if let Expect::Parse {
                            statement,
                            client_name,
                            ..
                        } = skipped
                        {
                            if let Some(statement) = statement {
                                cx.server_statements.remove(&statement.server_name);
                            }
                            if let Some(name) = client_name {
                                cx.client_statements.remove(&name);
                            }
                        }
                    }
                }
            }
            Ok(true)
        }
        b'1' => match cx.expected.pop() {
            Some(Expect::Parse {
                swallow, statement, ..
            }) => {
                if let Some(statement) = statement {
                    statement.confirm();
                }
                Ok(!swallow)
            }
            other => Err(format!(
                "server sent ParseComplete while pgwarden expected {other:?}"
            )),
        },
        b'3' => match cx.expected.pop() {
            Some(Expect::Close { swallow }) => Ok(!swallow),
            other => Err(format!(
                "server sent CloseComplete while pgwarden expected {other:?}"
            )),
        },
        b'G' | b'W' => {
            cx.x.copy_in = true;
            // COPY started by an Execute: the Sync the client sent right after it
            // arrives during the copy and gets no answer.
            if matches!(cx.expected.head(), Some(Expect::Execute)) {
                cx.expected.drop_next_sync();
            }
            Ok(true)
        }
        _ => Ok(true),
    }
}
