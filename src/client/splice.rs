//! Splicing one client onto one server connection until the transaction ends.
//!
//! Bytes flow both ways at once, in one task: each wait polls four socket
//! operations (write server, write client, read server, read client) and handles
//! the first that is ready, as an `Event`. Polling them by hand rather than
//! through `select!` spares each wait the building of a future per branch.
//! Reading and writing each direction independently means a client that
//! pipelines faster than the server answers cannot deadlock the pair, and a
//! slow client reading a large result only slows itself.
//!
//! Bytes are rarely copied between user-space buffers: what was read is split
//! off its buffer (`BytesMut::split_to`, O(1)) and written from there. Each
//! direction is walked once, frame by frame: [`super::frontend`] records every
//! request in the server connection's queue of expected answers (and renames
//! prepared statements), [`super::responses`] pops it as the answers arrive.
//!
//! The transaction is over when nothing is owed, the last status is idle, and
//! the client is between frames with nothing unsynced.
//!
//! One timer serves every time limit, since they never apply at once:
//! `client_idle_timeout` while a held session (session mode) waits for its client
//! between transactions, `idle_transaction_timeout` while the server waits for the
//! client inside a transaction (nothing owed), `query_timeout` while the server owes answers. A
//! query over its limit is cancelled through PostgreSQL's own CancelRequest; the
//! server connection is kept when the server confirms the cancel and answers, and
//! closed when it does not within a grace period.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::tls::Stream;
use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio::time::Sleep;
use tokio_util::io::{poll_read_buf, poll_write_buf};

use super::expect::Expected;
use super::statements::{ClientStatements, Registry, ServerStatements};
use super::{frontend, responses};
use crate::clock::Tick;
use crate::error::ClientError;
use crate::metrics::DatabaseTraffic;
use crate::params::ParamSet;
use crate::protocol::ServerNotice;
use crate::protocol::frame::Scanner;
use crate::registry::{Ending, Stop};
use crate::server::ServerConn;

/// Bytes one direction may have read but not yet written before it stops reading.
const HIGH_WATER: usize = 256 * 1024;
/// Read size.
const READ_CHUNK: usize = 8 * 1024;
/// Least room a read is given; below it `READ_CHUNK` more is reserved. Small, so that
/// a client's small first buffer still has room for the read that waits for its next
/// message instead of being replaced by a chunk that read may never use.
pub const MIN_READ_ROOM: usize = 512;

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
    /// The session ends with this error: the client sent what pgwarden cannot pass
    /// on (bytes that are not PostgreSQL framing, a message over
    /// `pool.max_message_size`), or was killed from the admin console.
    Refused(ClientError),
    /// The client kept its transaction open without a word for `idle_transaction_timeout`;
    /// the server connection is inside that transaction.
    IdleInTransaction,
    /// A held session's client sent nothing between transactions for this long
    /// (`client_idle_timeout`); the server connection is idle.
    ClientIdle(Duration),
}

/// The client's side of a splice; it outlives any one server connection.
pub struct ClientSide<'a> {
    /// the client socket
    pub stream: &'a mut Stream,
    /// bytes read from the client and not yet forwarded
    pub inbuf: &'a mut BytesMut,
    /// frame position on the client stream
    pub scanner: &'a mut Scanner,
    /// the client's settings; replaced when the server reports a change the client made
    pub params: &'a mut Arc<ParamSet>,
    /// transaction status as the client last saw it
    pub status: &'a mut u8,
    /// the client's named prepared statements
    pub statements: &'a mut ClientStatements,
}

/// What the splice knows of the pool it runs in.
pub struct Pooling<'a> {
    /// statements by content, shared by every client
    pub registry: &'a Registry,
    /// `pool.max_prepared_statements`; 0 passes named statements through untouched
    pub max_prepared: usize,
    /// transaction pooling (warn about what does not survive a transaction)
    pub transaction: bool,
    /// session pooling: keep the connection past transaction ends
    pub hold: bool,
    /// `pool.idle_transaction_timeout`; zero: none
    pub idle_transaction_timeout: Duration,
    /// `pool.query_timeout`; zero: none
    pub query_timeout: Duration,
    /// `pool.client_idle_timeout`, for a held session; zero: none
    pub client_idle_timeout: Duration,
    /// how long the server has to act on a cancel sent for `query_timeout` and answer
    pub cancel_grace: Duration,
    /// when the server connection was taken: the clock of what the client already sent
    pub started: Tick,
    /// where a held session's figures go at each transaction's end, rather than
    /// only once the session ends
    pub traffic: &'a DatabaseTraffic,
}

/// What went through one splice, for the metrics.
#[derive(Debug, Default)]
pub struct Traffic {
    /// the wait for the server connection, in seconds, while its assignment is
    /// unpublished
    pub assigned_after: Option<f64>,
    /// Query and Execute messages from the client
    pub queries: u64,
    /// bytes read from the client
    pub received: u64,
    /// bytes written to the client
    pub sent: u64,
    /// transactions finished: ReadyForQuery with the server idle (an autocommit
    /// statement or batch, or a COMMIT or ROLLBACK)
    pub transactions: u64,
    /// named statements the client prepared (with statement translation on)
    pub client_parses: u64,
    /// statements pgwarden prepared on the server connection for them
    pub server_parses: u64,
    /// Binds of the client's named statements
    pub binds: u64,
    /// nanoseconds the server owed answers, in the periods closed so far (PgBouncer's
    /// query time: the server at work, not waiting for the client)
    pub busy: u64,
    /// when the open period of owed answers began
    busy_since: Option<Tick>,
    /// when the transaction under way began: its first period of owed answers
    transaction_since: Option<Tick>,
}

impl Traffic {
    /// Opens a period of owed answers if the server owes some and none is open. The
    /// clock is read only then: once per statement the client sends, not per message.
    fn busy_from(&mut self, owes: bool, now: impl FnOnce() -> Tick) {
        if owes && self.busy_since.is_none() {
            let now = now();
            self.busy_since = Some(now);
            self.transaction_since.get_or_insert(now);
        }
    }

    /// Adds the figures gathered since the last call to `to` and starts them over,
    /// with the duration of one transaction or server assignment when one ended.
    pub fn publish(&mut self, to: &DatabaseTraffic, seconds: Option<f64>) {
        to.add(|t| {
            if let Some(waited) = self.assigned_after {
                t.server_assignments += 1;
                t.wait_seconds.observe(waited);
            }
            if let Some(seconds) = seconds {
                t.transaction_seconds.observe(seconds);
            }
            t.query_seconds += self.busy as f64 * 1e-9;
            t.transactions += self.transactions;
            t.queries += self.queries;
            t.received_bytes += self.received;
            t.sent_bytes += self.sent;
            t.client_parses += self.client_parses;
            t.server_parses += self.server_parses;
            t.binds += self.binds;
        });
        *self = Traffic {
            busy_since: self.busy_since,
            transaction_since: self.transaction_since,
            ..Traffic::default()
        };
    }

    /// A held session's transaction ended `now`: its figures go out, and a request
    /// the client already sent opens the next one.
    fn transaction_ended(&mut self, to: &DatabaseTraffic, owes: bool, now: Tick) {
        self.busy_until(|| now);
        let seconds = self.transaction_since.take().map(|t| now.secs_since(t));
        self.publish(to, seconds);
        self.busy_from(owes, || now);
    }

    /// Closes the open period, if any, at `now`.
    pub fn busy_until(&mut self, now: impl FnOnce() -> Tick) {
        if let Some(since) = self.busy_since.take() {
            self.busy += now().as_nanos().saturating_sub(since.as_nanos());
        }
    }
}

/// Per-splice bookkeeping of what the client has started.
#[derive(Debug, Default)]
pub struct Exchange {
    /// what went through
    pub traffic: Traffic,
    /// extended-protocol messages sent since the last Sync or Query
    pub unsynced: bool,
    /// the server is in COPY FROM STDIN and ignores Sync until the copy ends
    pub copy_in: bool,
    /// the client sent Terminate (or left): forward nothing more
    pub client_done: bool,
    /// a local error ended the current batch: drop the client's messages up to Sync
    pub skipping: bool,
    /// a FATAL the server sent; the connection is about to close
    pub fatal: Option<ServerNotice>,
    /// settings the client's statements may have changed for its session
    pub touched: Vec<String>,
    /// the client ran RESET ALL or DISCARD ALL
    pub reset_all: bool,
    /// ReadyForQuery messages received: each one completes a request
    pub answered: u64,
    /// set while a cancel sent for `query_timeout` (the limit held) is in effect: the
    /// server's "canceling statement" error is then pgwarden's, and says so
    pub timed_out: Option<Duration>,
}

/// Everything both directions read and update.
pub struct Ctx<'a> {
    /// what the server connection still owes
    pub expected: &'a mut Expected,
    /// statements prepared on the server connection
    pub server_statements: &'a mut ServerStatements,
    /// settings applied to the server connection
    pub applied: &'a mut Option<Arc<ParamSet>>,
    /// the client's named statements
    pub client_statements: &'a mut ClientStatements,
    /// statements by content
    pub registry: &'a Registry,
    /// server-side statements kept per connection (0: no translation)
    pub max_prepared: usize,
    /// transaction pooling
    pub transaction_pooling: bool,
    /// the client's settings
    pub params: &'a mut Arc<ParamSet>,
    /// transaction status as the client last saw it
    pub status: &'a mut u8,
    /// frame position on the client stream
    pub scanner: &'a mut Scanner,
    /// this splice's bookkeeping
    pub x: &'a mut Exchange,
}

impl Ctx<'_> {
    /// Nothing owed, server idle, client between batches: the connection is free.
    pub fn idle(&self) -> bool {
        self.expected.is_empty()
            && *self.status == b'I'
            && !self.x.unsynced
            && !self.x.skipping
            && self.scanner.at_boundary()
    }

    /// The client's requests are whole and synced, and the server owes their answers:
    /// nothing more from the client can be needed before the server speaks. (Not so
    /// in a COPY FROM STDIN, a batch without Sync or a partly read message: the server
    /// may be waiting for the rest.)
    pub fn awaits_answer(&self) -> bool {
        !self.expected.is_empty()
            && !self.x.unsynced
            && !self.x.copy_in
            && !self.x.skipping
            && self.scanner.at_boundary()
    }

    /// Nothing owed and the client between batches, inside a transaction block:
    /// the server waits for the client's next statement.
    pub fn waits_in_transaction(&self) -> bool {
        self.expected.is_empty()
            && matches!(*self.status, b'T' | b'E')
            && !self.x.unsynced
            && self.scanner.at_boundary()
    }
}

/// What the splice's one timer is armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// nothing
    Off,
    /// a held session waits for its client between transactions
    ClientIdle,
    /// the server waits for the client inside a transaction
    IdleInTransaction,
    /// the server owes answers; armed again at each completed request (the count of them)
    Query(u64),
    /// a cancel was sent for `query_timeout`: the server has until then to act on it
    /// and answer the request it was sent for (the count of completed requests then)
    Grace(u64),
}

/// What ended one wait of the splice.
enum Event {
    /// bytes went to the server
    ServerWrote(std::io::Result<usize>),
    /// bytes went to the client
    ClientWrote(std::io::Result<usize>),
    /// bytes came from the server (0: it closed)
    ServerRead(std::io::Result<usize>),
    /// bytes came from the client (0: it closed)
    ClientRead(std::io::Result<usize>),
    /// the session is killed, evicted or shut down
    Stop(Stop),
    /// the CancelRequest for `query_timeout` went out (or could not)
    CancelSent(std::io::Result<()>),
    /// the armed timer fired
    Deadline,
}

/// A CancelRequest on its way (boxed: only a query over its limit pays for it).
type Cancel = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// Splices `client` onto `server` until the transaction ends (or, with `hold`,
/// until the client leaves or pgwarden shuts down while the session is idle).
/// `ending` also stops it when the client is killed, or evicted because the
/// server's pool was retired (its backend left the routing table): the
/// transaction is then lost. Returns how it ended and the bytes still to be
/// written to the client (which the caller flushes after giving the server
/// connection back); `x` tells what went through and what the client's
/// statements did to its session.
pub async fn splice(
    client: ClientSide<'_>,
    server: &mut ServerConn,
    pooling: Pooling<'_>,
    ending: &Ending,
    x: &mut Exchange,
) -> (Outcome, BytesMut) {
    let ClientSide {
        stream,
        inbuf,
        scanner,
        params,
        status,
        statements,
    } = client;
    let (mut client_r, mut client_w) = stream.split();
    let ServerConn {
        stream: server_stream,
        inbuf: server_in,
        expected,
        statements: server_statements,
        applied,
        cancel_key,
        ..
    } = server;
    let (mut server_r, mut server_w) = server_stream.split();
    let hold = pooling.hold;
    let idle_limit = pooling.idle_transaction_timeout;
    let query_limit = pooling.query_timeout;
    let client_idle_limit = pooling.client_idle_timeout;
    let mut cx = Ctx {
        expected,
        server_statements,
        applied,
        client_statements: statements,
        registry: pooling.registry,
        max_prepared: pooling.max_prepared,
        transaction_pooling: pooling.transaction,
        params,
        status,
        scanner,
        x,
    };

    let mut to_server = BytesMut::new();
    let mut to_client = BytesMut::new();
    let mut server_scan = Scanner::default();
    // Reset when what it is armed for changes (once per wait or per request), not per
    // read; made when first armed, since most pools set neither limit.
    let mut deadline: Option<Pin<Box<Sleep>>> = None;
    let mut timer = Timer::Off;
    let mut cancel: Option<Cancel> = None;

    macro_rules! lost {
        ($reason:expr) => {
            return (
                Outcome::ServerLost {
                    reason: $reason,
                    notice: cx.x.fatal.take(),
                    pending: cx.expected.answers_owed(),
                    mid_batch: cx.x.unsynced || !cx.scanner.at_boundary(),
                },
                to_client,
            )
        };
    }

    // Whatever the client already sent starts the exchange, and the server's work
    // on it starts with the checkout (spares a clock reading per transaction).
    if let Err(e) = client_sent(inbuf, &mut to_server, server_in, &mut to_client, &mut cx) {
        return (Outcome::Refused(e), to_client);
    }
    cx.x.traffic
        .busy_from(!cx.expected.is_empty(), || pooling.started);
    // Nothing came from the server since the client's bytes last went to it. While
    // so, and the server owes whole requests, the client is not read: most answers
    // then end the transaction in one read, and the client read that would only
    // have waited (with its wake-up bookkeeping) is spared. What the client sends
    // meanwhile waits in its socket until the server's first bytes; a client gone
    // during a long query is noticed then, and its server connection, which had to
    // finish the query anyway, stays usable.
    let mut server_quiet = true;

    loop {
        // A cancel still on its way could land on the next query this connection
        // runs, for this client or another: until it is confirmed the connection
        // is not given back, and nothing more is sent to it.
        let idle = cx.idle() && cancel.is_none();
        if cx.x.client_done && to_server.is_empty() {
            // The client is gone once what it sent before leaving reached the
            // server; the connection is reusable only if nothing is owed.
            return (Outcome::ClientLeft { clean: idle }, BytesMut::new());
        }
        if idle && !hold && to_server.is_empty() && inbuf.is_empty() {
            // Everything was answered by pgwarden itself (a DEALLOCATE, say).
            return (Outcome::Idle, to_client);
        }
        // A held session may be shut down only with nothing left to write.
        let idle_held = hold && idle && to_server.is_empty() && to_client.is_empty();
        let want = match timer {
            // The grace lasts until the cancel is confirmed and its request answered.
            Timer::Grace(at)
                if cancel.is_some() || (cx.x.answered == at && !cx.expected.is_empty()) =>
            {
                timer
            }
            _ if !client_idle_limit.is_zero() && idle_held => Timer::ClientIdle,
            _ if !idle_limit.is_zero() && to_server.is_empty() && cx.waits_in_transaction() => {
                Timer::IdleInTransaction
            }
            _ if !query_limit.is_zero() && !cx.expected.is_empty() => Timer::Query(cx.x.answered),
            _ => Timer::Off,
        };
        if want != timer {
            if matches!(timer, Timer::Grace(_)) {
                // Answered without the cancel's error (it came too late): no later
                // "canceling statement" is pgwarden's.
                cx.x.timed_out = None;
            }
            timer = want;
            let limit = match want {
                Timer::ClientIdle => client_idle_limit,
                Timer::IdleInTransaction => idle_limit,
                Timer::Query(_) => query_limit,
                Timer::Off | Timer::Grace(_) => Duration::ZERO,
            };
            if !limit.is_zero() {
                let at = tokio::time::Instant::now() + limit;
                match &mut deadline {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
        }
        // Polled in this order, so that bytes already read move on before more are
        // read; the first thing ready is handled, then every condition is looked at again.
        let event = std::future::poll_fn(|task| {
            if !to_server.is_empty()
                && cancel.is_none()
                && let Poll::Ready(r) =
                    poll_write_buf(Pin::new(&mut server_w), task, &mut to_server)
            {
                return Poll::Ready(Event::ServerWrote(r));
            }
            if !to_client.is_empty()
                && !cx.x.client_done
                && let Poll::Ready(r) =
                    poll_write_buf(Pin::new(&mut client_w), task, &mut to_client)
            {
                return Poll::Ready(Event::ClientWrote(r));
            }
            if to_client.len() < HIGH_WATER
                && let Poll::Ready(r) = poll_read_into(Pin::new(&mut server_r), task, server_in)
            {
                return Poll::Ready(Event::ServerRead(r));
            }
            if !cx.x.client_done
                && to_server.len() < HIGH_WATER
                && !(server_quiet && cx.awaits_answer())
                && let Poll::Ready(r) = poll_read_into(Pin::new(&mut client_r), task, inbuf)
            {
                return Poll::Ready(Event::ClientRead(r));
            }
            if let Poll::Ready(stop) = ending.poll(task, idle_held, true) {
                return Poll::Ready(Event::Stop(stop));
            }
            if let Some(sending) = &mut cancel
                && let Poll::Ready(r) = sending.as_mut().poll(task)
            {
                return Poll::Ready(Event::CancelSent(r));
            }
            if timer != Timer::Off
                && let Some(sleep) = &mut deadline
                && sleep.as_mut().poll(task).is_ready()
            {
                return Poll::Ready(Event::Deadline);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::ServerWrote(r) => {
                if let Err(e) = r {
                    lost!(format!("write failed: {e}"));
                }
            }
            Event::ClientWrote(r) => match r {
                Ok(n) => cx.x.traffic.sent += n as u64,
                Err(_) => {
                    cx.x.client_done = true;
                    to_client.clear();
                }
            },
            Event::ServerRead(r) => {
                match r {
                    Ok(0) => match &cx.x.fatal {
                        Some(n) => lost!(n.message.clone()),
                        None => lost!("server closed the connection".to_owned()),
                    },
                    Ok(_) => server_quiet = false,
                    Err(e) => lost!(format!("read failed: {e}")),
                }
                // A session that holds its server (session mode) keeps reading
                // past the end of each transaction.
                loop {
                    match responses::forward(server_in, &mut server_scan, &mut to_client, &mut cx) {
                        // With a cancel unconfirmed the loop's top returns once it is.
                        Ok(true) if !hold && cancel.is_none() => return (Outcome::Idle, to_client),
                        Ok(true) if hold => cx.x.traffic.transaction_ended(
                            pooling.traffic,
                            !cx.expected.is_empty(),
                            Tick::now(),
                        ),
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => lost!(e),
                    }
                }
                // All answered mid-transaction (or mid-session). At a transaction's
                // end the caller closes the period with the reading that ends it.
                if cx.expected.is_empty() {
                    cx.x.traffic.busy_until(Tick::now);
                }
            }
            Event::ClientRead(r) => match r {
                Ok(0) | Err(_) => cx.x.client_done = true,
                Ok(n) => {
                    if timer == Timer::ClientIdle {
                        // The client spoke, even if pgwarden answers it alone: the wait starts over.
                        timer = Timer::Off;
                    }
                    cx.x.traffic.received += n as u64;
                    if let Err(e) =
                        client_sent(inbuf, &mut to_server, server_in, &mut to_client, &mut cx)
                    {
                        return (Outcome::Refused(e), to_client);
                    }
                    cx.x.traffic.busy_from(!cx.expected.is_empty(), Tick::now);
                    server_quiet = true;
                }
            },
            Event::Stop(stop) => match stop {
                Stop::Evicted => {
                    lost!("its backend left the routing table (down or fenced)".to_owned())
                }
                Stop::Killed => return (Outcome::Refused(ClientError::Killed), to_client),
                Stop::ShutDown => return (Outcome::Idle, to_client),
            },
            Event::CancelSent(r) => {
                cancel = None;
                if let Err(e) = r {
                    // Not delivered: nothing is on its way to a later query either.
                    tracing::info!(server = %cancel_key.addr, error = %e, "query_timeout: cancel request could not be sent");
                }
            }
            Event::Deadline => match timer {
                Timer::ClientIdle => return (Outcome::ClientIdle(client_idle_limit), to_client),
                Timer::IdleInTransaction => return (Outcome::IdleInTransaction, to_client),
                Timer::Query(_) => {
                    let key = cancel_key.clone();
                    tracing::info!(server = %key.addr, server_pid = key.pid, limit = ?query_limit, "query_timeout: cancelling the request");
                    cancel = Some(Box::pin(key.send()));
                    cx.x.timed_out = Some(query_limit);
                    timer = Timer::Grace(cx.x.answered);
                    if let Some(sleep) = &mut deadline {
                        sleep
                            .as_mut()
                            .reset(tokio::time::Instant::now() + pooling.cancel_grace);
                    }
                }
                // The server neither acted on the cancel nor answered: it is stuck or
                // gone, and only closing its connection frees the client. The client
                // gets 08006 (connection failure), not 57014: with no answer pgwarden
                // cannot tell whether the statement took effect (a COMMIT may have
                // committed), and 08006 is what makes drivers treat the outcome as
                // unknown. Its transaction block, if any, is reported lost (25P02).
                Timer::Grace(_) => lost!(format!(
                    "no answer within {:?} of the cancel sent for pool.query_timeout = {query_limit:?}",
                    pooling.cancel_grace
                )),
                Timer::Off => {}
            },
        }
    }
}

/// Forwards new client bytes, then writes the answers pgwarden gives itself that are
/// next in line (they need no server message to come first).
fn client_sent(
    inbuf: &mut BytesMut,
    to_server: &mut BytesMut,
    server_in: &mut BytesMut,
    to_client: &mut BytesMut,
    cx: &mut Ctx<'_>,
) -> Result<(), ClientError> {
    frontend::forward(inbuf, to_server, cx)?;
    responses::answer_locally(server_in, &mut 0, to_client, cx);
    Ok(())
}

/// Reads into `buf`, giving it room first when it has little.
fn poll_read_into<R: AsyncRead>(
    r: Pin<&mut R>,
    task: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        buf.reserve(READ_CHUNK);
    }
    poll_read_buf(r, task, buf)
}

/// Moves the first `n` bytes of `from` to the end of `to` without copying when they are adjacent.
pub fn pass(from: &mut BytesMut, n: usize, to: &mut BytesMut) {
    if n > 0 {
        to.unsplit(from.split_to(n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::expect::Expect;

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

    /// Both directions of one splice, without sockets.
    #[derive(Default)]
    struct Pair {
        expected: Expected,
        server_statements: ServerStatements,
        applied: Option<Arc<ParamSet>>,
        client_statements: ClientStatements,
        registry: Registry,
        params: Arc<ParamSet>,
        status: u8,
        scanner: Scanner,
        server_scanner: Scanner,
        x: Exchange,
        to_server: BytesMut,
        to_client: BytesMut,
    }

    impl Pair {
        fn new() -> Pair {
            Pair {
                status: b'I',
                ..Pair::default()
            }
        }

        fn cx(&mut self) -> (Ctx<'_>, &mut BytesMut, &mut BytesMut, &mut Scanner) {
            (
                Ctx {
                    expected: &mut self.expected,
                    server_statements: &mut self.server_statements,
                    applied: &mut self.applied,
                    client_statements: &mut self.client_statements,
                    registry: &self.registry,
                    max_prepared: 2,
                    transaction_pooling: true,
                    params: &mut self.params,
                    status: &mut self.status,
                    scanner: &mut self.scanner,
                    x: &mut self.x,
                },
                &mut self.to_server,
                &mut self.to_client,
                &mut self.server_scanner,
            )
        }

        fn client(&mut self, parts: &[Vec<u8>]) -> Result<(), ClientError> {
            let mut inbuf = buf(parts);
            let (mut cx, to_server, to_client, _) = self.cx();
            client_sent(
                &mut inbuf,
                to_server,
                &mut BytesMut::new(),
                to_client,
                &mut cx,
            )
        }

        fn server(&mut self, parts: &[Vec<u8>]) -> Result<bool, String> {
            let mut inbuf = buf(parts);
            let (mut cx, _, to_client, scanner) = self.cx();
            responses::forward(&mut inbuf, scanner, to_client, &mut cx)
        }

        /// The type bytes of the messages queued for the client (and forgets them).
        fn client_got(&mut self) -> Vec<u8> {
            tags(&std::mem::take(&mut self.to_client))
        }

        fn server_got(&mut self) -> Vec<u8> {
            tags(&std::mem::take(&mut self.to_server))
        }
    }

    fn tags(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 5 {
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.push(rest[0]);
            rest = &rest[(len + 1).min(rest.len())..];
        }
        out
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        frame(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(stmt: &str) -> Vec<u8> {
        frame(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
    }

    fn sync() -> Vec<u8> {
        frame(b'S', b"")
    }

    fn ready(status: u8) -> Vec<u8> {
        frame(b'Z', &[status])
    }

    #[test]
    fn requests_are_queued_in_order_and_answers_pop_them() {
        let mut p = Pair::new();
        p.client(&[parse("", "select 1"), bind(""), frame(b'E', b"\0\0\0\0\0")])
            .unwrap();
        assert!(p.x.unsynced);
        assert_eq!(p.expected.len(), 3);
        p.client(&[sync(), frame(b'Q', b"select 2\0")]).unwrap();
        assert!(!p.x.unsynced);
        assert_eq!(p.server_got(), b"PBESQ");
        assert!(
            !p.server(&[
                frame(b'1', b""),
                frame(b'2', b""),
                frame(b'D', b"\0\0"),
                frame(b'C', b"SELECT 1\0"),
                ready(b'I')
            ])
            .unwrap()
        );
        assert!(
            p.server(&[
                frame(b'T', b"\0\0"),
                frame(b'D', b"\0\0"),
                frame(b'C', b"SELECT 1\0"),
                ready(b'I'),
                frame(b'N', b"\0")
            ])
            .unwrap()
        );
        assert!(p.expected.is_empty());
        assert_eq!(p.client_got(), b"12DCZTDCZ");
    }

    #[test]
    fn a_transaction_block_keeps_the_server() {
        let mut p = Pair::new();
        p.client(&[frame(b'Q', b"BEGIN\0")]).unwrap();
        assert!(!p.server(&[frame(b'C', b"BEGIN\0"), ready(b'T')]).unwrap());
        assert_eq!(p.status, b'T');
    }

    #[test]
    fn terminate_is_swallowed_and_stops_forwarding() {
        let mut p = Pair::new();
        p.client(&[frame(b'Q', b"x\0"), frame(b'X', b""), frame(b'Q', b"y\0")])
            .unwrap();
        assert!(p.x.client_done);
        assert_eq!(p.server_got(), b"Q");
    }

    #[test]
    fn garbage_after_login_is_a_protocol_error() {
        let mut p = Pair::new();
        let err = p.client(&[b"GARBAGE!".to_vec()]).unwrap_err().to_string();
        assert!(err.contains("invalid frontend message type 'G'"), "{err}");
    }

    #[test]
    fn large_frames_stream_through_in_pieces() {
        let mut p = Pair::new();
        let whole = frame(b'd', &[7u8; 100]);
        p.client(&[whole[..40].to_vec()]).unwrap();
        assert_eq!(p.to_server.len(), 40);
        assert!(!p.scanner.at_boundary());
        p.client(&[whole[40..].to_vec()]).unwrap();
        assert_eq!(&p.to_server[..], &whole[..]);
        assert!(p.scanner.at_boundary());
    }

    #[test]
    fn named_statements_get_server_names_and_are_prepared_where_missing() {
        let mut p = Pair::new();
        // The client prepares s1: it reaches the server renamed, after a swallowed Close.
        p.client(&[parse("s1", "select $1"), sync()]).unwrap();
        let sent = std::mem::take(&mut p.to_server);
        assert_eq!(tags(&sent), b"CPS");
        assert!(!sent.windows(2).any(|w| w == b"s1"));
        assert!(
            p.server(&[frame(b'3', b""), frame(b'1', b""), ready(b'I')])
                .unwrap()
        );
        assert_eq!(p.client_got(), b"1Z");

        // Another server connection (empty cache): the Bind is preceded by a Parse.
        p.server_statements.clear();
        p.client(&[bind("s1"), frame(b'E', b"\0\0\0\0\0"), sync()])
            .unwrap();
        assert_eq!(p.server_got(), b"CPBES");
        assert!(
            p.server(&[
                frame(b'3', b""),
                frame(b'1', b""),
                frame(b'2', b""),
                frame(b'C', b"SELECT 1\0"),
                ready(b'I')
            ])
            .unwrap()
        );
        assert_eq!(p.client_got(), b"2CZ");

        // Preparing the same text again on a connection that has it, while a client
        // holds it: answered by pgwarden.
        p.client(&[parse("s2", "select $1"), sync()]).unwrap();
        assert_eq!(p.server_got(), b"S");
        assert_eq!(p.client_got(), b"1");
        assert!(p.server(&[ready(b'I')]).unwrap());
        assert_eq!(p.client_got(), b"Z");

        // Close only forgets the client's name, and is answered at its turn.
        p.client(&[frame(b'C', b"Ss2\0"), frame(b'C', b"Ss1\0"), sync()])
            .unwrap();
        assert_eq!(p.server_got(), b"S");
        assert!(p.client_statements.is_empty());
        assert!(p.server(&[ready(b'I')]).unwrap());
        assert_eq!(p.client_got(), b"33Z");

        // Held by no client any more, it may predate a schema change: a new Parse of
        // its text prepares it again on the server.
        p.client(&[parse("s3", "select $1"), sync()]).unwrap();
        assert_eq!(p.server_got(), b"CPS");
        assert!(
            p.server(&[frame(b'3', b""), frame(b'1', b""), ready(b'I')])
                .unwrap()
        );
        assert_eq!(p.client_got(), b"1Z");
    }

    #[test]
    fn the_clock_is_read_only_to_open_or_close_a_period_of_owed_answers() {
        let mut t = Traffic::default();
        let never = || -> Tick { panic!("the clock was read") };
        t.busy_until(never);
        t.busy_from(false, never);
        t.busy_from(true, || Tick::from_nanos(1_000));
        t.busy_from(true, never);
        t.busy_until(|| Tick::from_nanos(4_000));
        t.busy_until(never);
        t.busy_from(true, || Tick::from_nanos(10_000));
        t.busy_until(|| Tick::from_nanos(10_500));
        assert_eq!(t.busy, 3_500);
    }

    #[test]
    fn parses_of_accepted_statements_are_answered_without_a_server() {
        let mut p = Pair::new();
        let batch = |parts: &[Vec<u8>]| parts.concat();
        let prepare_s2 = batch(&[parse("s2", "select $1"), sync()]);
        // Not yet accepted by any server: a server is needed.
        assert!(
            frontend::prepare_without_server(
                &prepare_s2,
                &mut p.client_statements,
                &p.registry,
                ""
            )
            .is_none()
        );
        p.client(&[parse("s1", "select $1"), sync()]).unwrap();
        p.server(&[frame(b'3', b""), frame(b'1', b""), ready(b'I')])
            .unwrap();
        // Accepted now: s2 is answered at once, and its Sync with it.
        let answered = frontend::prepare_without_server(
            &prepare_s2,
            &mut p.client_statements,
            &p.registry,
            "",
        )
        .unwrap();
        assert_eq!(answered.used, prepare_s2.len());
        assert_eq!(answered.statements, 1);
        assert_eq!(tags(&answered.answer), b"1Z");
        assert!(p.client_statements.contains(b"s2"));
        // A name in use, an unknown text, or anything but Parse and Sync needs a server.
        for other in [
            batch(&[parse("s2", "select $1"), sync()]),
            batch(&[parse("s3", "select 2"), sync()]),
            batch(&[parse("s3", "select $1"), bind("s3"), sync()]),
            batch(&[parse("s3", "select $1")]),
        ] {
            assert!(
                frontend::prepare_without_server(&other, &mut p.client_statements, &p.registry, "")
                    .is_none()
            );
        }
    }

    #[test]
    fn a_failed_parse_forgets_the_names_and_skips_to_sync() {
        let mut p = Pair::new();
        p.client(&[
            parse("bad", "selec oops"),
            bind("bad"),
            frame(b'E', b"\0\0\0\0\0"),
            sync(),
        ])
        .unwrap();
        let error = frame(b'E', b"SERROR\0C42601\0Msyntax error\0\0");
        assert!(p.server(&[frame(b'3', b""), error, ready(b'I')]).unwrap());
        assert_eq!(p.client_got(), b"EZ");
        assert!(p.client_statements.is_empty());
        assert!(p.server_statements.is_empty());
    }

    #[test]
    fn preparing_an_existing_name_fails_like_postgres() {
        let mut p = Pair::new();
        p.client(&[parse("s1", "select 1"), sync()]).unwrap();
        p.server(&[frame(b'3', b""), frame(b'1', b""), ready(b'I')])
            .unwrap();
        p.client_got();
        p.server_got();
        p.client(&[parse("s1", "select 2"), bind("s1"), sync()])
            .unwrap();
        assert_eq!(p.server_got(), b"S");
        assert_eq!(p.client_got(), b"E");
        assert!(p.server(&[ready(b'I')]).unwrap());
    }

    #[test]
    fn the_server_cache_closes_what_it_evicts() {
        let mut p = Pair::new();
        for (i, sql) in ["select 1", "select 2", "select 3"].iter().enumerate() {
            p.client(&[parse(&format!("s{i}"), sql), sync()]).unwrap();
        }
        // Capacity 2: the third Parse evicts the first statement with a Close.
        assert_eq!(p.server_got(), b"CPSCPSCCPS");
        assert_eq!(p.server_statements.len(), 2);
    }

    #[test]
    fn deallocate_and_discard_all_are_answered_locally() {
        let mut p = Pair::new();
        p.client(&[parse("s1", "select 1"), sync()]).unwrap();
        p.server(&[frame(b'3', b""), frame(b'1', b""), ready(b'I')])
            .unwrap();
        p.server_got();
        p.client_got();
        p.client(&[frame(b'Q', b"DEALLOCATE s1\0")]).unwrap();
        assert_eq!(p.server_got(), b"");
        assert_eq!(p.client_got(), b"CZ");
        assert!(p.client_statements.is_empty());
        p.client(&[frame(b'Q', b"discard all\0")]).unwrap();
        assert_eq!(p.client_got(), b"CZ");
        assert!(p.x.reset_all);
        // An SQL-level statement the client does not have: the server answers.
        p.client(&[frame(b'Q', b"DEALLOCATE other\0")]).unwrap();
        assert_eq!(p.server_got(), b"Q");
    }

    #[test]
    fn session_only_sql_gets_a_notice_first_and_settings_are_noted() {
        let mut p = Pair::new();
        p.client(&[frame(b'Q', b"LISTEN jobs; SET statement_timeout = 5\0")])
            .unwrap();
        assert_eq!(p.client_got(), b"N");
        assert_eq!(p.server_got(), b"Q");
        assert_eq!(p.x.touched, ["statement_timeout"]);
    }

    #[test]
    fn copy_in_started_by_execute_swallows_the_sync() {
        let mut p = Pair::new();
        p.client(&[
            parse("", "copy t from stdin"),
            bind(""),
            frame(b'E', b"\0\0\0\0\0"),
            sync(),
        ])
        .unwrap();
        assert!(
            !p.server(&[frame(b'1', b""), frame(b'2', b""), frame(b'G', b"\0\0\0")])
                .unwrap()
        );
        assert!(p.x.copy_in);
        p.client(&[frame(b'd', b"1\n"), frame(b'c', b""), sync()])
            .unwrap();
        assert!(p.server(&[frame(b'C', b"COPY 1\0"), ready(b'I')]).unwrap());
        assert!(p.expected.is_empty());
    }

    #[test]
    fn fatal_errors_are_held_back_from_the_client() {
        let mut p = Pair::new();
        p.client(&[frame(b'Q', b"select 1\0")]).unwrap();
        let fatal = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0";
        assert!(
            !p.server(&[frame(b'D', b"\0\0"), frame(b'E', fatal)])
                .unwrap()
        );
        assert_eq!(p.client_got(), b"D");
        assert_eq!(p.x.fatal.as_ref().unwrap().code, "57P01");
        assert_eq!(p.expected.answers_owed(), 1);
    }

    #[test]
    fn reported_settings_follow_the_client() {
        let mut p = Pair::new();
        p.client(&[frame(b'Q', b"SET TimeZone = 'Asia/Tokyo'\0")])
            .unwrap();
        assert!(
            p.server(&[
                frame(b'S', b"TimeZone\0Asia/Tokyo\0"),
                frame(b'C', b"SET\0"),
                ready(b'I')
            ])
            .unwrap()
        );
        assert_eq!(p.params.get("timezone"), Some("Asia/Tokyo"));
        assert!(Arc::ptr_eq(p.applied.as_ref().unwrap(), &p.params));
        assert_eq!(p.client_got(), b"SCZ");
    }

    #[test]
    fn an_answer_nobody_asked_for_is_a_desync() {
        let mut p = Pair::new();
        p.expected.push(Expect::Query);
        assert!(p.server(&[frame(b'1', b"")]).is_err());
    }
}
