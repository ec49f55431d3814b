//! Splicing one client onto one server connection until the transaction ends.
//!
//! Bytes flow both ways at once, in one task, through four cancel-safe socket
//! operations in a `select!` loop: read client, write server, read server, write
//! client. Reading and writing each direction independently means a client that
//! pipelines faster than the server answers cannot deadlock the pair, and a
//! slow client reading a large result only slows itself.
//!
//! Bytes are never copied between user-space buffers: what was read is split
//! off its buffer (`BytesMut::split_to`, O(1)) and written from there. Each
//! direction is walked once by a frame [`Scanner`] that sees only what decides
//! when the server connection is free again:
//!
//! - client → server: Query, Sync and FunctionCall are requests that will each be
//!   answered by a ReadyForQuery; other extended-protocol messages leave state on
//!   the server until the next Sync; Terminate is never forwarded.
//! - server → client: ReadyForQuery (status byte), ParameterStatus (the client's
//!   settings), ErrorResponse (a FATAL means the connection is going away),
//!   CopyInResponse (the server ignores Syncs until the copy ends).
//!
//! The transaction is over when every request has been answered, the last status
//! is idle, and the client is between frames with nothing unsynced.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::params::ParamSet;
use crate::protocol::ServerNotice;
use crate::protocol::frame::{HEADER_LEN, Scan, Scanner};
use crate::protocol::messages::{error_is_fatal, parameter_status};
use crate::server::ServerConn;

/// Bytes one direction may have read but not yet written before it stops reading.
const HIGH_WATER: usize = 256 * 1024;
/// Read size.
const READ_CHUNK: usize = 8 * 1024;

/// How a splice ended.
#[derive(Debug)]
pub enum Outcome {
    /// Everything the client asked is answered and the server is idle: the
    /// connection is clean and can serve someone else.
    Idle,
    /// The client closed (Terminate or EOF) and what it sent before has reached the
    /// server. `clean` says whether the server connection is idle with nothing owed.
    ClientLeft {
        /// true when the server connection may be reused
        clean: bool,
    },
    /// The server connection failed; the client's in-flight requests are unanswered.
    ServerLost {
        /// what was observed
        reason: String,
        /// the FATAL the server sent before closing, if it sent one
        notice: Option<ServerNotice>,
        /// requests ('Q', 'S', 'F') the client is still owed an answer for
        pending: usize,
        /// the client had sent part of a batch (no Sync yet) or part of a frame
        mid_batch: bool,
    },
    /// The client sent bytes that are not PostgreSQL framing.
    ClientProtocol(String),
}

/// The client's side of a splice; it outlives any one server connection.
pub struct ClientSide<'a> {
    /// the client socket
    pub stream: &'a mut TcpStream,
    /// bytes read from the client and not yet forwarded
    pub inbuf: &'a mut BytesMut,
    /// frame position on the client stream
    pub scanner: &'a mut Scanner,
    /// the client's settings; replaced when the server reports a change the client made
    pub params: &'a mut Arc<ParamSet>,
    /// transaction status as the client last saw it
    pub status: &'a mut u8,
}

/// What went through one splice, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Traffic {
    /// Query and Execute messages from the client
    pub queries: u64,
    /// bytes read from the client
    pub received: u64,
    /// bytes written to the client
    pub sent: u64,
}

/// Per-splice bookkeeping of what the server still owes and what the client has started.
#[derive(Default)]
struct Exchange {
    traffic: Traffic,
    /// extended-protocol messages sent since the last Sync or Query
    unsynced: bool,
    /// the server is in COPY FROM STDIN and ignores Sync until the copy ends
    copy_in: bool,
    /// the client sent Terminate: forward nothing more
    client_done: bool,
    /// a FATAL the server sent; the connection is about to close
    fatal: Option<ServerNotice>,
}

/// Splices `client` onto `server` until the transaction ends (or, with `hold`,
/// until the client leaves or `stop` fires while the session is idle). `evicted`
/// fires when the server's backend leaves the routing table: the transaction is
/// then lost. Returns how it ended, the bytes still to be written to the
/// client (which the caller flushes after giving the server connection back),
/// and what went through.
pub async fn splice(
    client: ClientSide<'_>,
    server: &mut ServerConn,
    hold: bool,
    stop: &CancellationToken,
    evicted: &CancellationToken,
) -> (Outcome, BytesMut, Traffic) {
    let mut x = Exchange::default();
    let (outcome, rest) = run(client, server, hold, stop, evicted, &mut x).await;
    (outcome, rest, x.traffic)
}

async fn run(
    client: ClientSide<'_>,
    server: &mut ServerConn,
    hold: bool,
    stop: &CancellationToken,
    evicted: &CancellationToken,
    x: &mut Exchange,
) -> (Outcome, BytesMut) {
    let ClientSide {
        stream,
        inbuf,
        scanner,
        params,
        status,
    } = client;
    let (mut client_r, mut client_w) = stream.split();
    let ServerConn {
        stream: server_stream,
        inbuf: server_in,
        pending,
        applied,
        ..
    } = server;
    let (mut server_r, mut server_w) = server_stream.split();

    // Created once: a cancellation future registers its waker when first polled.
    let stopped = stop.cancelled();
    let evicted = evicted.cancelled();
    tokio::pin!(stopped, evicted);
    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    let mut server_scan = Scanner::default();

    macro_rules! lost {
        ($reason:expr) => {
            return (
                Outcome::ServerLost {
                    reason: $reason,
                    notice: x.fatal.take(),
                    pending: pending.len(),
                    mid_batch: x.unsynced || !scanner.at_boundary(),
                },
                to_client,
            )
        };
    }

    // Whatever the client already sent starts the exchange.
    if let Err(e) = forward_client(inbuf, scanner, &mut to_server, pending, x) {
        return (Outcome::ClientProtocol(e), to_client);
    }

    loop {
        let idle = pending.is_empty() && *status == b'I' && !x.unsynced && scanner.at_boundary();
        if x.client_done && to_server.is_empty() {
            // The client is gone once what it sent before leaving reached the
            // server; the connection is reusable only if nothing is owed.
            return (Outcome::ClientLeft { clean: idle }, BytesMut::new());
        }
        if hold && idle && to_server.is_empty() && to_client.is_empty() && stop.is_cancelled() {
            return (Outcome::Idle, to_client);
        }
        tokio::select! {
            biased;
            r = server_w.write_buf(&mut to_server), if !to_server.is_empty() => {
                if let Err(e) = r {
                    lost!(format!("write failed: {e}"));
                }
            }
            r = client_w.write_buf(&mut to_client), if !to_client.is_empty() && !x.client_done => {
                match r {
                    Ok(n) => x.traffic.sent += n as u64,
                    Err(_) => {
                        x.client_done = true;
                        to_client.clear();
                    }
                }
            }
            r = read_into(&mut server_r, server_in), if to_client.len() < HIGH_WATER => {
                match r {
                    Ok(0) => match &x.fatal {
                        Some(n) => lost!(n.message.clone()),
                        None => lost!("server closed the connection".to_owned()),
                    },
                    Ok(_) => {}
                    Err(e) => lost!(format!("read failed: {e}")),
                }
                // A session that holds its server (session mode) keeps reading
                // past the end of each transaction.
                loop {
                    match forward_server(server_in, &mut server_scan, &mut to_client, pending, status, params, applied, x) {
                        Ok(true) if !hold && scanner.at_boundary() => return (Outcome::Idle, to_client),
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => lost!(e),
                    }
                }
            }
            r = read_into(&mut client_r, inbuf), if !x.client_done && to_server.len() < HIGH_WATER => {
                match r {
                    Ok(0) | Err(_) => x.client_done = true,
                    Ok(n) => {
                        x.traffic.received += n as u64;
                        if let Err(e) = forward_client(inbuf, scanner, &mut to_server, pending, x) {
                            return (Outcome::ClientProtocol(e), to_client);
                        }
                    }
                }
            }
            () = &mut evicted => lost!("its backend left the routing table (down or fenced)".to_owned()),
            () = &mut stopped, if hold && idle && !stop.is_cancelled() => {}
        }
    }
}

async fn read_into<R: AsyncReadExt + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    r.read_buf(buf).await
}

/// Moves the first `n` bytes of `from` to the end of `to` without copying when they are adjacent.
fn pass(from: &mut BytesMut, n: usize, to: &mut BytesMut) {
    if n > 0 {
        to.unsplit(from.split_to(n));
    }
}

/// The frontend messages pgwarden understands after login.
pub fn is_frontend_message(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' | b'F' | b'd' | b'c' | b'f' | b'X'
    )
}

/// Scans new client bytes, counts requests, and queues them for the server.
fn forward_client(
    inbuf: &mut BytesMut,
    scanner: &mut Scanner,
    to_server: &mut BytesMut,
    pending: &mut std::collections::VecDeque<u8>,
    x: &mut Exchange,
) -> Result<(), String> {
    let mut pos = 0;
    while !x.client_done {
        if scanner.at_boundary()
            && let Some(&tag) = inbuf.get(pos)
            && !is_frontend_message(tag)
        {
            return Err(format!(
                "invalid frontend message type '{}'",
                char::from(tag)
            ));
        }
        match scanner.next(&inbuf[pos..], |t| t == b'X') {
            Scan::Body(n) => pos += n,
            Scan::Header { tag } => {
                match tag {
                    b'Q' | b'F' => {
                        pending.push_back(tag);
                        x.unsynced = false;
                        x.traffic.queries += 1;
                    }
                    b'E' => {
                        x.unsynced = true;
                        x.traffic.queries += 1;
                    }
                    // A Sync sent during COPY FROM STDIN is ignored by the server.
                    b'S' if !x.copy_in => {
                        pending.push_back(tag);
                        x.unsynced = false;
                    }
                    b'c' | b'f' => x.copy_in = false,
                    b'S' | b'H' | b'd' => {}
                    _ => x.unsynced = true,
                }
                pos += HEADER_LEN;
            }
            Scan::Whole { len, .. } => {
                // Terminate: forward what came before it, never the message itself.
                pass(inbuf, pos, to_server);
                let _ = inbuf.split_to(len);
                pos = 0;
                x.client_done = true;
            }
            Scan::NeedMore => break,
            Scan::Invalid(e) => return Err(e.to_string()),
        }
    }
    pass(inbuf, pos, to_server);
    Ok(())
}

/// Scans new server bytes and queues them for the client. Returns true when the
/// transaction is over; the ReadyForQuery that ends it is the last byte queued,
/// and anything after it stays in `inbuf`.
#[allow(clippy::too_many_arguments)]
fn forward_server(
    inbuf: &mut BytesMut,
    scanner: &mut Scanner,
    to_client: &mut BytesMut,
    pending: &mut std::collections::VecDeque<u8>,
    status: &mut u8,
    params: &mut Arc<ParamSet>,
    applied: &mut Option<Arc<ParamSet>>,
    x: &mut Exchange,
) -> Result<bool, String> {
    let mut pos = 0;
    let wanted = |t| matches!(t, b'Z' | b'S' | b'E' | b'G' | b'W');
    loop {
        match scanner.next(&inbuf[pos..], wanted) {
            Scan::Body(n) => pos += n,
            Scan::Header { .. } => pos += HEADER_LEN,
            Scan::Whole { tag, len } => {
                let body = &inbuf[pos + HEADER_LEN..pos + len];
                match tag {
                    b'Z' => {
                        *status = body.first().copied().unwrap_or(b'I');
                        pending.pop_front();
                        // A server error ends any COPY.
                        x.copy_in = false;
                        pos += len;
                        if pending.is_empty() && *status == b'I' && !x.unsynced {
                            pass(inbuf, pos, to_client);
                            return Ok(true);
                        }
                    }
                    b'S' => {
                        if let Some((name, value)) = parameter_status(body)
                            && let Some(next) = params.after_report(name, value)
                        {
                            *params = Arc::new(next);
                            *applied = Some(params.clone());
                        }
                        pos += len;
                    }
                    b'E' if error_is_fatal(body) => {
                        // Held back: the client learns of the loss as an error on
                        // its request, and keeps its connection.
                        x.fatal = Some(ServerNotice::parse(body));
                        pass(inbuf, pos, to_client);
                        let _ = inbuf.split_to(len);
                        pos = 0;
                    }
                    b'G' | b'W' => {
                        x.copy_in = true;
                        // COPY started by an Execute: the Sync the client sent right
                        // after it arrives during the copy and gets no answer.
                        if pending.front() == Some(&b'S') {
                            pending.pop_front();
                        }
                        pos += len;
                    }
                    _ => pos += len,
                }
            }
            Scan::NeedMore => break,
            Scan::Invalid(e) => return Err(format!("invalid message from server: {e}")),
        }
    }
    pass(inbuf, pos, to_client);
    Ok(false)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn buf(parts: &[Vec<u8>]) -> BytesMut {
        let mut b = BytesMut::new();
        for p in parts {
            b.extend_from_slice(p);
        }
        b
    }

    #[test]
    fn counts_requests_and_unsynced_messages() {
        let mut inbuf = buf(&[
            frame(b'P', b"\0select 1\0\0\0"),
            frame(b'B', b"\0\0\0\0\0\0\0\0"),
            frame(b'E', b"\0\0\0\0\0"),
        ]);
        let mut scanner = Scanner::default();
        let mut out = BytesMut::new();
        let mut pending = VecDeque::new();
        let mut x = Exchange::default();
        forward_client(&mut inbuf, &mut scanner, &mut out, &mut pending, &mut x).unwrap();
        assert!(x.unsynced);
        assert!(pending.is_empty());
        let mut more = buf(&[frame(b'S', b""), frame(b'Q', b"select 2\0")]);
        forward_client(&mut more, &mut scanner, &mut out, &mut pending, &mut x).unwrap();
        assert!(!x.unsynced);
        assert_eq!(pending, VecDeque::from([b'S', b'Q']));
        assert!(more.is_empty());
    }

    #[test]
    fn terminate_is_swallowed_and_stops_forwarding() {
        let mut inbuf = buf(&[frame(b'Q', b"x\0"), frame(b'X', b""), frame(b'Q', b"y\0")]);
        let mut scanner = Scanner::default();
        let mut out = BytesMut::new();
        let mut pending = VecDeque::new();
        let mut x = Exchange::default();
        forward_client(&mut inbuf, &mut scanner, &mut out, &mut pending, &mut x).unwrap();
        assert!(x.client_done);
        assert_eq!(&out[..], &frame(b'Q', b"x\0")[..]);
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn garbage_after_login_is_a_protocol_error() {
        let mut inbuf = BytesMut::from(&b"GARBAGE!"[..]);
        let err = forward_client(
            &mut inbuf,
            &mut Scanner::default(),
            &mut BytesMut::new(),
            &mut VecDeque::new(),
            &mut Exchange::default(),
        )
        .unwrap_err();
        assert!(err.contains("invalid frontend message type 'G'"), "{err}");
    }

    #[test]
    fn partial_client_frames_stream_through() {
        let whole = frame(b'd', &[7u8; 100]);
        let mut scanner = Scanner::default();
        let mut out = BytesMut::new();
        let mut pending = VecDeque::new();
        let mut x = Exchange::default();
        let mut first = BytesMut::from(&whole[..40]);
        forward_client(&mut first, &mut scanner, &mut out, &mut pending, &mut x).unwrap();
        assert_eq!(out.len(), 40);
        assert!(!scanner.at_boundary());
        let mut rest = BytesMut::from(&whole[40..]);
        forward_client(&mut rest, &mut scanner, &mut out, &mut pending, &mut x).unwrap();
        assert_eq!(&out[..], &whole[..]);
        assert!(scanner.at_boundary());
    }

    struct ServerSide {
        scanner: Scanner,
        out: BytesMut,
        pending: VecDeque<u8>,
        status: u8,
        params: Arc<ParamSet>,
        applied: Option<Arc<ParamSet>>,
        x: Exchange,
    }

    impl ServerSide {
        fn new(pending: &[u8]) -> Self {
            ServerSide {
                scanner: Scanner::default(),
                out: BytesMut::new(),
                pending: pending.iter().copied().collect(),
                status: b'I',
                params: Arc::new(ParamSet::default()),
                applied: None,
                x: Exchange::default(),
            }
        }
        fn feed(&mut self, inbuf: &mut BytesMut) -> Result<bool, String> {
            forward_server(
                inbuf,
                &mut self.scanner,
                &mut self.out,
                &mut self.pending,
                &mut self.status,
                &mut self.params,
                &mut self.applied,
                &mut self.x,
            )
        }
    }

    #[test]
    fn idle_after_the_last_ready_for_query_only() {
        let mut s = ServerSide::new(b"QQ");
        let mut inbuf = buf(&[frame(b'C', b"SELECT 1\0"), frame(b'Z', b"I")]);
        assert!(!s.feed(&mut inbuf).unwrap());
        let mut inbuf = buf(&[
            frame(b'C', b"SELECT 1\0"),
            frame(b'Z', b"I"),
            frame(b'N', b"\0"),
        ]);
        assert!(s.feed(&mut inbuf).unwrap());
        // The asynchronous notice after the final ReadyForQuery stays with the server.
        assert_eq!(&inbuf[..], &frame(b'N', b"\0")[..]);
    }

    #[test]
    fn a_transaction_block_keeps_the_server() {
        let mut s = ServerSide::new(b"Q");
        let mut inbuf = buf(&[frame(b'C', b"BEGIN\0"), frame(b'Z', b"T")]);
        assert!(!s.feed(&mut inbuf).unwrap());
        assert_eq!(s.status, b'T');
    }

    #[test]
    fn copy_in_started_by_execute_swallows_the_sync() {
        let mut s = ServerSide::new(b"S");
        let mut inbuf = buf(&[frame(b'1', b""), frame(b'2', b""), frame(b'G', b"\0\0\0")]);
        assert!(!s.feed(&mut inbuf).unwrap());
        assert!(s.pending.is_empty());
        assert!(s.x.copy_in);
    }

    #[test]
    fn fatal_errors_are_held_back_from_the_client() {
        let mut s = ServerSide::new(b"Q");
        let fatal = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0";
        let mut inbuf = buf(&[frame(b'D', b"\0\0"), frame(b'E', fatal)]);
        assert!(!s.feed(&mut inbuf).unwrap());
        assert_eq!(&s.out[..], &frame(b'D', b"\0\0")[..]);
        assert_eq!(s.x.fatal.as_ref().unwrap().code, "57P01");
    }

    #[test]
    fn reported_settings_follow_the_client() {
        let mut s = ServerSide::new(b"Q");
        let mut inbuf = buf(&[
            frame(b'S', b"TimeZone\0Asia/Tokyo\0"),
            frame(b'C', b"SET\0"),
            frame(b'Z', b"I"),
        ]);
        assert!(s.feed(&mut inbuf).unwrap());
        assert_eq!(s.params.get("timezone"), Some("Asia/Tokyo"));
        assert!(Arc::ptr_eq(s.applied.as_ref().unwrap(), &s.params));
        // ParameterStatus still reaches the client.
        assert_eq!(s.out[0], b'S');
    }
}
