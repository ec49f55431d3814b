//! One client session: login, then a loop of transactions, then teardown.
//!
//! Between transactions a client holds no server connection; pgwarden only
//! watches its socket (with no buffer allocated). The first frame of a request
//! makes the session pick the backend from the routing table, check out a server
//! connection from that backend's pool, bring the connection's settings in line
//! with the client's, and splice the two until the transaction ends
//! ([`splice`]). Session pooling runs the same splice without releasing at
//! transaction ends.
//!
//! Failures never take the client down with them when PostgreSQL would not:
//! a pool timeout or a lost server answers the request with an error and the
//! client carries on; a transaction block lost with its server is answered as a
//! failed block until the client rolls it back ([`aborted`]).

pub mod aborted;
pub mod expect;
pub mod frontend;
mod login;
pub mod responses;
pub mod splice;
mod sql;
pub mod statements;

use crate::address::Address;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;

use arc_swap::{ArcSwap, Cache};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::backend::BackendTable;
use crate::boxed::boxed_in_place;
use crate::clock::Tick;
use crate::config::{Config, PoolMode, Target};
use crate::error::{ClientError, ServerError};
use crate::keepalive::Keepalive;
use crate::metrics::{ClientState, DatabaseTraffic};
use crate::params::{ParamSet, literal, sync_statement};
use crate::pool::{CheckoutError, PoolKey, PooledConn, ServerPool, unless_ended};
use crate::protocol::ServerNotice;
use crate::protocol::frame::{self, HEADER_LEN, Scan, Scanner};
use crate::protocol::messages::{put_error, put_ready};
use crate::proxy::{Shared, Slot};
use crate::registry::{ClientHandle, Entry, Stop, WaitEnd};
use crate::server::SESSION_TIMEOUT;
use crate::tls::Stream;
use aborted::Aborted;
pub use login::{Ended, Login, LoginError};
use splice::{ClientSide, Exchange, Outcome, Pooling};
use statements::{ClientStatements, Registry};

/// Read size for client sockets.
const READ_CHUNK: usize = 8 * 1024;
/// Room for the first read of a request. Most requests fit, and an allocation this
/// small is served from the allocator's per-thread cache; a larger request grows the
/// buffer by `READ_CHUNK`.
const FIRST_READ: usize = 1024;

/// Runs a freshly accepted connection to its end; `slot` counts it until then.
///
/// A plain function returning the task's future, not an `async fn`: an async fn
/// keeps room for its arguments (and again for their moved copies) in its state for
/// as long as it runs, which every idle session would carry for hours.
pub fn serve(stream: Stream, peer: Address, slot: Slot) -> impl Future<Output = ()> + Send {
    if let Stream::Plain(tcp) = &stream {
        let _ = tcp.set_nodelay(true);
        let keepalive = Keepalive::from_config(&slot.config.load().pgwarden);
        if let Err(e) = keepalive.apply(tcp) {
            debug!(%peer, error = %e, "could not set TCP keepalive on a client socket");
        }
    }
    // Boxed: the login's state is large and short-lived, and an idle session's task
    // should not carry its size for hours.
    let login = Box::pin(admit(stream, peer, Arc::clone(&slot)));
    async move {
        match login.await {
            Some(Login::Ready(session)) => session.run().await,
            Some(Login::Admin(console)) => Box::pin(console.run()).await,
            Some(Login::Cancel { .. }) | None => {}
        }
        drop(slot);
    }
}

/// Logs the client in within `client_login_timeout`, or answers what it asked
/// instead (a CancelRequest) or why it is refused; `None` when nothing follows.
async fn admit(stream: Stream, peer: Address, shared: Arc<Shared>) -> Option<Login> {
    let timeout = shared.config.load().pgwarden.client_login_timeout;
    match tokio::time::timeout(timeout, login::login(stream, &peer, &shared)).await {
        Err(_) => {
            shared
                .metrics
                .login_failures
                .with_label_values(&["timeout"])
                .inc();
            info!(%peer, "client did not finish logging in within client_login_timeout");
            None
        }
        Ok(Err(Ended::Refused(mut stream, e))) => {
            debug!(%peer, error = %e, "login refused");
            shared
                .metrics
                .login_failures
                .with_label_values(&[e.reason()])
                .inc();
            farewell(&mut stream, &e.to_notice(true)).await;
            None
        }
        Ok(Err(Ended::Gone)) => {
            debug!(%peer, "client left during login");
            None
        }
        Ok(Ok(Login::Cancel { pid, secret })) => {
            let connect = shared.config.load().pool.server_connect_timeout;
            shared.clients.cancel(pid, secret, connect).await;
            None
        }
        Ok(Ok(login)) => Some(login),
    }
}

/// Sends a last error and closes gently: unread input at close would make the
/// kernel reset the connection, and the client might never read the error.
/// Boxed, so that every session's task does not carry the size of its last words.
pub async fn farewell(stream: &mut Stream, notice: &ServerNotice) {
    let mut out = BytesMut::new();
    put_error(&mut out, notice);
    let goodbye = async {
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        let mut sink = vec![0u8; 4096];
        let mut budget: usize = 64 * 1024;
        while budget > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => budget = budget.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), goodbye)).await;
}

/// What login established about a client.
pub struct LoggedIn {
    mode: PoolMode,
    target: Target,
    params: Arc<ParamSet>,
    /// the settings the client logged in with (RESET ALL returns to them)
    startup: Arc<ParamSet>,
    /// its named prepared statements
    statements: ClientStatements,
    /// its database's statements by content
    registry: Arc<Registry>,
    client: ClientHandle,
    /// its database's traffic figures
    traffic: Arc<DatabaseTraffic>,
    /// this database's in-flight counter at the admission gate
    gate: Arc<AtomicUsize>,
    /// the primary's pool and the routing generation it was chosen in
    route: Option<(u64, Arc<ServerPool>)>,
    /// its slots under the per-user and per-database limits, held for the session
    /// (boxed: most sessions have none, and every session's state is kept small)
    _admitted: Option<Box<crate::limits::Admitted>>,
}

impl LoggedIn {
    /// The client-facing database (kept once, in the client registry).
    fn database(&self) -> &str {
        self.client.entry().identity.database()
    }

    /// The user name.
    fn user(&self) -> &str {
        self.client.entry().identity.user()
    }

    /// The client's address.
    fn peer(&self) -> &Address {
        &self.client.entry().identity.peer
    }
}

/// A server connection in hand for a client's request.
struct Attached {
    conn: PooledConn,
    /// what the server reported while the client's settings were applied to it
    reports: Vec<(String, String)>,
    /// whether getting it awaited anything: a slot, a connect, the settings, a routing change
    waited: bool,
}

/// How the session answers the client while it holds no server connection.
enum Between {
    /// Requests go to a server.
    Ready,
    /// A request failed before it was complete: drop what follows up to its Sync,
    /// then report this error (if not reported yet) and ReadyForQuery.
    Skipping(Option<Box<ServerNotice>>),
    /// The transaction block died with its server connection.
    Aborted(Box<Aborted>),
}

/// Why the session ends.
enum End {
    /// The client left.
    Gone,
    /// pgwarden is shutting down and the client is between transactions.
    Shutdown,
    /// The client is told this error, then disconnected.
    Fatal(ClientError),
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Gone
    }
}

/// The running configuration, as a session's cache sees it.
struct ConfigOf(Arc<Shared>);

impl std::ops::Deref for ConfigOf {
    type Target = ArcSwap<Config>;

    fn deref(&self) -> &ArcSwap<Config> {
        &self.0.config
    }
}

/// An authenticated client.
pub struct Session {
    stream: Stream,
    shared: Arc<Shared>,
    /// the running configuration, cached: a transaction's look at it is one plain
    /// load where `ArcSwap::load` takes two locked instructions. An idle session
    /// keeps the configuration of its last transaction alive until its next.
    config: Cache<ConfigOf, Arc<Config>>,
    who: LoggedIn,
    inbuf: BytesMut,
    scanner: Scanner,
    /// transaction status as the client last saw it
    status: u8,
    between: Between,
    /// bytes read between transactions, published with the next one's figures
    received: u64,
}

impl Session {
    fn new(stream: Stream, shared: Arc<Shared>, who: LoggedIn) -> Session {
        let max_message = shared.limits.max_message();
        Session {
            stream,
            config: Cache::new(ConfigOf(shared.clone())),
            shared,
            who,
            inbuf: BytesMut::new(),
            scanner: Scanner::new(max_message),
            status: b'I',
            between: Between::Ready,
            received: 0,
        }
    }

    fn into_stream(self) -> Stream {
        self.stream
    }

    async fn run(mut self: Box<Self>) {
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        let end = self.serve_requests().await;
        self.publish_received();
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Gone => {
                info!(peer = %self.who.peer(), pid = self.who.client.pid(), "client disconnected")
            }
            // Boxed: the error and its last words would otherwise take room in
            // every session's task, idle ones included, for the whole session.
            end => Box::pin(self.see_off(end)).await,
        }
    }

    /// Tells the client why it is disconnected, and closes.
    async fn see_off(mut self: Box<Self>, end: End) {
        let pid = self.who.client.pid();
        let error = match end {
            End::Gone => return,
            End::Shutdown => {
                info!(peer = %self.who.peer(), pid, "client disconnected by shutdown");
                ClientError::Shutdown
            }
            End::Fatal(e) => {
                warn!(peer = %self.who.peer(), pid, error = %e, "client disconnected after an error");
                e
            }
        };
        farewell(&mut self.stream, &error.to_notice(true)).await;
    }

    async fn serve_requests(&mut self) -> End {
        // Each request's admission at the gate borrows this counter.
        let gate = self.who.gate.clone();
        loop {
            let tag = match self.next_tag().await {
                Ok(tag) => tag,
                Err(end) => return end,
            };
            if tag == b'X' {
                return End::Gone;
            }
            // Boxed for the same reason: a request (checkout, splice) needs far more
            // state than waiting for the next one, which is what most sessions do.
            if let Err(end) = boxed_in_place(|| self.request(tag, &gate)).await {
                return end;
            }
            // A request answered without a server published nothing.
            self.publish_received();
        }
    }

    /// Adds the bytes read since the last transaction to the figures now.
    fn publish_received(&mut self) {
        let received = std::mem::take(&mut self.received);
        if received > 0 {
            self.who.traffic.add(|t| t.received_bytes += received);
        }
    }

    /// Serves one client request that starts with a frame of type `tag`, admitted
    /// through the gate with its database's counter `gate`.
    async fn request(&mut self, tag: u8, gate: &AtomicUsize) -> Result<(), End> {
        if !frontend::is_frontend_message(tag) {
            return Err(End::Fatal(ClientError::Protocol(format!(
                "invalid frontend message type '{}'",
                char::from(tag)
            ))));
        }
        match &mut self.between {
            Between::Skipping(error) => {
                if tag == b'S' {
                    let mut out = BytesMut::new();
                    if let Some(notice) = error.take() {
                        put_error(&mut out, &notice);
                    }
                    put_ready(&mut out, self.status);
                    self.between = if self.status == b'E' {
                        Between::Aborted(Box::new(Aborted::new(None)))
                    } else {
                        Between::Ready
                    };
                    self.stream.write_all(&out).await?;
                }
                return self.skip_frame();
            }
            Between::Aborted(_) => {
                let body = self.take_frame().await?;
                let mut out = BytesMut::new();
                let Between::Aborted(aborted) = &mut self.between else {
                    unreachable!("matched above");
                };
                if aborted.answer(tag, body.as_deref(), &mut out) {
                    self.status = b'I';
                    self.between = Between::Ready;
                }
                self.stream.write_all(&out).await?;
                return Ok(());
            }
            Between::Ready => {}
        }
        match tag {
            // Without a server these do nothing: Flush has nothing to flush, and copy
            // data after a failed COPY is dropped as PostgreSQL drops it.
            b'H' | b'd' | b'c' | b'f' => return self.skip_frame(),
            // A Sync on its own is answered without bothering a server.
            b'S' => {
                self.skip_frame()?;
                let mut out = BytesMut::new();
                put_ready(&mut out, self.status);
                self.stream.write_all(&out).await?;
                return Ok(());
            }
            _ => {}
        }
        // A message pgwarden reads whole arrives whole before a server is taken for it.
        if let Some(Ok((tag, len))) = frame::header(&self.inbuf, self.scanner.max())
            && frontend::read_whole(tag)
            && len <= frame::MAX_BUFFERED_LEN
        {
            while self.inbuf.len() < len {
                self.fill().await?;
            }
        }
        // Only a named statement can be known already; most Parses are unnamed, and
        // they skip the configuration and search_path lookups.
        if tag == b'P'
            && self.inbuf.get(HEADER_LEN).is_some_and(|&b| b != 0)
            && self.who.mode == PoolMode::Transaction
            && self.config.load().pool.max_prepared_statements > 0
            && let Some(answered) = frontend::prepare_without_server(
                &self.inbuf,
                &mut self.who.statements,
                &self.who.registry,
                self.who.params.get("search_path").unwrap_or_default(),
            )
        {
            self.inbuf.advance(answered.used);
            self.who
                .traffic
                .add(|t| t.client_parses += answered.statements);
            self.stream.write_all(&answered.answer).await?;
            return Ok(());
        }
        let waiting = Tick::now();
        self.who.client.wait_from(waiting);
        self.who.client.set_state(ClientState::Waiting);
        let admitted = self
            .shared
            .gate
            .enter(self.who.database(), gate, self.who.client.entry())
            .await;
        // Kept apart from the admission: wrapping the attach's result in another
        // would copy it, error variants and all, every transaction.
        let attached = match &admitted {
            Ok(_) => self.attach(waiting).await,
            Err(end) => Err(ClientError::from(*end)),
        };
        // The wait ends when it began unless something was awaited: most transactions
        // find an idle connection in line with their settings, and skip a clock reading.
        let started = match (&admitted, &attached) {
            (Ok(admission), Ok(a)) if !a.waited && !admission.waited => waiting,
            _ => Tick::now(),
        };
        let waited = started.secs_since(waiting);
        let conn = match attached {
            Ok(a) => a.conn,
            Err(e) => {
                drop(admitted);
                self.who.client.stop_waiting();
                self.who.client.set_state(ClientState::Idle);
                let timed_out = matches!(e, ClientError::PoolTimeout { .. });
                self.who.traffic.add(|t| {
                    t.wait_seconds.observe(waited);
                    t.wait_timeouts += u64::from(timed_out);
                });
                match e {
                    ClientError::Killed => return Err(End::Fatal(e)),
                    ClientError::Left => return Err(End::Gone),
                    _ => {}
                }
                return self.refuse(tag, e).await;
            }
        };
        self.who.client.set_state(ClientState::Active);
        // The settings' address tells whether the transaction replaced them, without
        // a second reference held across it. The registry holds the settings it shows,
        // which are these, so no new set can be allocated at their address meanwhile.
        let settings = Arc::as_ptr(&self.who.params) as usize;
        let result = self.transaction(conn, started, waited).await;
        // A SET (of application_name, say) changed them: SHOW CLIENTS shows the new ones.
        if settings != Arc::as_ptr(&self.who.params) as usize {
            self.who.client.set_settings(self.who.params.clone());
        }
        drop(admitted);
        self.who.client.set_state(ClientState::Idle);
        result
    }

    /// Splices the client onto `conn` for one transaction (or, in session mode, for
    /// the rest of the session) that `started` then after `waited` seconds for the
    /// connection, and settles what the splice leaves.
    async fn transaction(
        &mut self,
        mut conn: PooledConn,
        started: Tick,
        waited: f64,
    ) -> Result<(), End> {
        let hold = self.who.mode == PoolMode::Session;
        let client = ClientSide {
            stream: &mut self.stream,
            inbuf: &mut self.inbuf,
            scanner: &mut self.scanner,
            params: &mut self.who.params,
            status: &mut self.status,
            statements: &mut self.who.statements,
        };
        let config = self.config.load();
        let pooling = Pooling {
            registry: &self.who.registry,
            max_prepared: config.pool.max_prepared_statements,
            transaction: !hold,
            hold,
            idle_transaction_timeout: config.pool.idle_transaction_timeout,
            query_timeout: config.pool.query_timeout,
            // Between transactions a held session waits for its client in the splice.
            client_idle_timeout: if hold {
                self.shared.limits.client_idle()
            } else {
                Duration::ZERO
            },
            // A server that answers new connections within this answers a cancel within it.
            cancel_grace: config.pool.server_connect_timeout,
            started,
            traffic: &self.who.traffic,
        };
        let ending = &self.who.client.entry().ending;
        let mut exchange = Exchange::default();
        // Its figures go out with the transaction's: one lock for all of them.
        exchange.traffic.assigned_after = Some(waited);
        exchange.traffic.received = std::mem::take(&mut self.received);
        let (outcome, to_client) =
            splice::splice(client, &mut conn, pooling, ending, &mut exchange).await;
        // A cancel the client sent as its transaction ended may still be on its way to
        // this connection: it serves no one else until that has landed.
        if self.who.client.stop_serving() {
            self.who.client.entry().cancels_landed().await;
        }
        // One clock reading ends the transaction and dates the connection's return.
        let ended = Tick::now();
        exchange.traffic.busy_until(|| ended);
        // A held session published each transaction as it ended: what is left
        // is figures, not a transaction.
        let seconds = (!hold).then(|| ended.secs_since(started));
        // Counted as sent now, since it is written below (unless the client is gone).
        exchange.traffic.sent += to_client.len() as u64;
        exchange.traffic.publish(&self.who.traffic, seconds);
        let result = match outcome {
            Outcome::Idle if hold => {
                reset_and_release(conn).await;
                Err(End::Shutdown)
            }
            Outcome::Idle => {
                match self.settle_settings(&mut conn, &exchange).await {
                    Ok(()) => conn.release_at(ended),
                    Err(e) => {
                        debug!(error = %e, "could not read the settings a transaction changed");
                        conn.discard();
                    }
                }
                Ok(())
            }
            Outcome::ClientLeft { clean: true } if !hold => {
                conn.release();
                Err(End::Gone)
            }
            Outcome::ClientLeft { clean: true } => {
                reset_and_release(conn).await;
                Err(End::Gone)
            }
            Outcome::ClientLeft { clean: false } => {
                conn.discard();
                Err(End::Gone)
            }
            Outcome::ServerLost {
                reason,
                notice,
                pending,
                mid_batch,
            } => {
                let backend = conn.pool().target.backend.to_string();
                conn.discard();
                // Others may be about to hit the same failure: let the monitor look now.
                self.shared.alarm.notify_one();
                let reason = match notice {
                    Some(n) => format!("{reason} ({})", n.code),
                    None => reason,
                };
                warn!(peer = %self.who.peer(), pid = self.who.client.pid(), %backend, %reason, "server connection lost during a transaction");
                let error = ClientError::ServerLost { backend, reason };
                if hold {
                    // A session-mode client's session state is gone with its server.
                    return Err(End::Fatal(error));
                }
                self.answer_lost(error, to_client, pending, mid_batch)
                    .await?;
                return Ok(());
            }
            Outcome::Refused(e) => {
                conn.discard();
                Err(End::Fatal(e))
            }
            Outcome::ClientIdle(limit) => {
                reset_and_release(conn).await;
                Err(self.idle_past(limit))
            }
            // Closing the server connection rolls the transaction back; it is never reused.
            Outcome::IdleInTransaction => {
                conn.discard();
                let limit = self.shared.config.load().pool.idle_transaction_timeout;
                Err(End::Fatal(ClientError::IdleInTransaction(limit)))
            }
        };
        if !to_client.is_empty() {
            self.stream.write_all(&to_client).await?;
        }
        result
    }

    /// After a transaction that ran SET, RESET or DISCARD ALL: learns what the session
    /// settings really are now (a SET in a rolled-back block or SET LOCAL does not
    /// stick), makes them the client's, and leaves the server connection matching them.
    async fn settle_settings(
        &mut self,
        conn: &mut PooledConn,
        x: &Exchange,
    ) -> Result<(), ServerError> {
        if x.touched.is_empty() && !x.reset_all {
            return Ok(());
        }
        let timeout = conn.pool().connect_timeout();
        let run = async {
            if x.reset_all {
                // The client's session starts over from its startup settings; the server
                // connection starts over from the server defaults.
                conn.execute("RESET ALL").await?;
                conn.applied = None;
                self.who.params = self.who.startup.clone();
            }
            if !x.touched.is_empty() {
                let names: Vec<String> = x.touched.iter().map(|n| literal(n)).collect();
                let rows = conn
                    .query_rows(&format!(
                        "SELECT lower(name), \
                                CASE lower(name) WHEN 'statement_timeout' THEN {SESSION_TIMEOUT} ELSE setting END, \
                                reset_val \
                         FROM pg_catalog.pg_settings WHERE lower(name) IN ({})",
                        names.join(", ")
                    ))
                    .await?;
                let mut client = (*self.who.params).clone();
                let mut server = conn.applied.as_deref().cloned().unwrap_or_default();
                for row in rows {
                    let [name, setting, reset] = row.as_slice() else {
                        continue;
                    };
                    if setting == reset {
                        server.remove(name);
                        client.remove(name);
                        if let Some(startup) = self.who.startup.get(name) {
                            client.insert(name, startup);
                        }
                    } else {
                        server.insert(name, setting);
                        client.insert(name, setting);
                    }
                }
                self.who.params = Arc::new(client);
                conn.applied = Some(Arc::new(server));
            }
            if let Some(sql) = sync_statement(conn.applied.as_ref(), &self.who.params) {
                conn.execute(&sql).await?;
            }
            conn.applied = Some(self.who.params.clone());
            Ok(())
        };
        // Boxed: rarely needed, and its state would otherwise enlarge every request's.
        Box::pin(tokio::time::timeout(timeout, run))
            .await
            .unwrap_or(Err(ServerError::Timeout(timeout)))
    }

    /// Picks the backend, checks out a connection, and applies the client's settings to
    /// it. While nothing can serve the request (no primary during a failover, the
    /// primary unreachable) it waits for the routing to change, up to
    /// `failover.client_wait_timeout` from `start` (a clock reading just taken).
    async fn attach(&mut self, start: Tick) -> Result<Attached, ClientError> {
        let mut waited = false;
        // Routing changes are watched from the first wait on: most transactions never wait.
        let mut wait: Option<(watch::Receiver<u64>, Tick, Duration)> = None;
        let mut last_error = None;
        loop {
            if let Some((changes, ..)) = &mut wait {
                changes.borrow_and_update();
            }
            // A primary's pool, routed in this generation already, needs no look at
            // the table (only primary routes are kept); it is borrowed, not cloned, as
            // the checkout clones it already.
            let generation = self.shared.routing.generation();
            let fresh;
            let (routed, pool) = match &self.who.route {
                Some((routed, pool)) if *routed == generation => (generation, Some(pool)),
                _ => {
                    let table = self.shared.routing.load();
                    fresh = self.route(&table)?;
                    (table.generation, fresh.as_ref())
                }
            };
            if let Some(pool) = pool {
                // The fast paths are tried before awaiting: each future polled costs.
                // After a wait for the routing, `start` is too old to judge lifetimes by.
                let now = if waited { Tick::now() } else { start };
                let checkout = match pool.try_checkout(now) {
                    Some(conn) => Ok(conn),
                    None => {
                        waited = true;
                        pool.checkout(self.who.client.entry()).await
                    }
                };
                match checkout {
                    Ok(mut conn) => {
                        let mut reports = Vec::new();
                        if let Some(sql) = sync_statement(conn.applied.as_ref(), &self.who.params) {
                            waited = true;
                            let params = self.who.params.clone();
                            (conn, reports) =
                                take_settings(conn, sql, params, self.who.client.entry()).await?;
                        }
                        if let Some(end) = self.who.client.served(conn.serving().clone()) {
                            // Canceled, or its client gone, before a server could be
                            // told: it never runs.
                            if self.who.client.stop_serving() {
                                self.who.client.entry().cancels_landed().await;
                            }
                            conn.release();
                            return Err(ClientError::from(end));
                        }
                        // Retired before the registry knew this client uses it: the
                        // retirement's sweep of the registry did not see it.
                        if conn.pool().is_retired() {
                            self.who.client.entry().ending.evict();
                        }
                        return Ok(Attached {
                            conn,
                            reports,
                            waited,
                        });
                    }
                    // The backend left the routing table while we waited: route again.
                    Err(CheckoutError::Retired) => {
                        self.who.route = None;
                        continue;
                    }
                    Err(CheckoutError::Killed) => return Err(ClientError::Killed),
                    Err(CheckoutError::Canceled) => return Err(ClientError::Canceled),
                    Err(CheckoutError::Left) => return Err(ClientError::Left),
                    Err(CheckoutError::Timeout(timeout)) => {
                        warn!(peer = %self.who.peer(), db = %self.who.database(), user = %self.who.user(), ?timeout, "query_wait_timeout: no server connection");
                        return Err(ClientError::PoolTimeout {
                            database: self.who.database().to_owned(),
                            timeout,
                        });
                    }
                    Err(CheckoutError::Connect(source)) => {
                        let transient = source.is_transient();
                        let error = ClientError::ServerConnect {
                            backend: pool.target.backend.to_string(),
                            source,
                        };
                        if !transient {
                            return Err(error);
                        }
                        // Perhaps the primary just died: have it probed, and wait for
                        // the routing to change rather than failing the request.
                        self.shared.alarm.notify_one();
                        last_error = Some(error);
                    }
                }
            }
            if wait.is_none() {
                let limit = self.shared.config.load().failover.client_wait_timeout;
                let changes = self.shared.routing.subscribe();
                // A table published since the one routed above is not waited for.
                let newer = *changes.borrow() != routed;
                wait = Some((changes, start.after(limit), limit));
                if newer {
                    continue;
                }
            }
            waited = true;
            let (changes, deadline, limit) = wait.as_mut().expect("subscribed above");
            // Bounded like a wait for a pool's connection: by the registry's sweep.
            let overdue = Tick::now() >= *deadline || {
                let pause = self.who.client.entry().begin_wait(Some(*deadline));
                tokio::select! {
                    _ = changes.changed() => false,
                    end = pause.ended() => match end {
                        WaitEnd::Overdue => true,
                        end => return Err(ClientError::from(end)),
                    },
                }
            };
            if overdue {
                return Err(last_error.unwrap_or(ClientError::Unavailable {
                    database: self.who.database().to_owned(),
                    what: self.who.target.name(),
                    waited: *limit,
                }));
            }
        }
    }

    /// The pool of the backend this client's next transaction goes to, or `None` when
    /// no node can serve it right now.
    fn route(&mut self, table: &BackendTable) -> Result<Option<Arc<ServerPool>>, ClientError> {
        let primary = self.who.target == Target::Primary;
        let config = self.shared.config.load();
        let turn = if primary {
            0
        } else {
            self.shared.read_turn.fetch_add(1, Ordering::Relaxed)
        };
        let Some(backend) = table.route(self.who.target, config.health.max_standby_lag, turn)
        else {
            return Ok(None);
        };
        let key = PoolKey::new(
            &config,
            self.who.database(),
            self.who.user(),
            &backend.config,
        )
        .ok_or_else(|| ClientError::UnknownDatabase(self.who.database().to_owned()))?;
        let pool = self.shared.pools.get(&key, &config);
        if primary {
            self.who.route = Some((table.generation, pool.clone()));
            let logged = &self.shared.first_transaction_logged;
            let seen = logged.load(Ordering::Relaxed);
            if table.generation > seen
                && logged
                    .compare_exchange(seen, table.generation, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                info!(backend = %backend.config.name, generation = table.generation, "first transaction routed after a routing change");
            }
        }
        Ok(Some(pool))
    }

    /// Answers a request that could not get a server connection; the client stays.
    async fn refuse(&mut self, tag: u8, error: ClientError) -> Result<(), End> {
        let notice = error.to_notice(false);
        if matches!(tag, b'Q' | b'F') {
            // A complete request on its own: answer it and go on.
            self.skip_frame()?;
            let mut out = BytesMut::new();
            put_error(&mut out, &notice);
            put_ready(&mut out, self.status);
            self.stream.write_all(&out).await?;
        } else {
            // Part of an extended-protocol batch: the error comes at its Sync.
            self.between = Between::Skipping(Some(Box::new(notice)));
        }
        Ok(())
    }

    /// Tells a client whose server connection died what became of its requests.
    async fn answer_lost(
        &mut self,
        error: ClientError,
        mut out: BytesMut,
        pending: usize,
        mid_batch: bool,
    ) -> Result<(), End> {
        let in_block = self.status != b'I';
        let lost = error.to_notice(false);
        let mut first = Some(lost.clone());
        let next_error = |first: &mut Option<ServerNotice>| {
            first.take().unwrap_or_else(|| {
                if in_block {
                    ClientError::TransactionAborted.to_notice(false)
                } else {
                    lost.clone()
                }
            })
        };
        self.status = if in_block { b'E' } else { b'I' };
        for _ in 0..pending {
            put_error(&mut out, &next_error(&mut first));
            put_ready(&mut out, self.status);
        }
        self.between = if mid_batch {
            Between::Skipping(Some(Box::new(next_error(&mut first))))
        } else if in_block {
            Between::Aborted(Box::new(Aborted::new(first)))
        } else {
            Between::Ready
        };
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Waits until the client buffer starts with a frame header, dropping the rest of
    /// a frame that was being skipped. Returns the frame's type.
    async fn next_tag(&mut self) -> Result<u8, End> {
        loop {
            // A reload's limits hold from each client's next request on.
            let limits = &self.shared.limits;
            self.scanner.set_max(limits.max_message());
            if !self.scanner.at_boundary() {
                if let Scan::Body(n) = self.scanner.next(&self.inbuf, |_| false) {
                    self.inbuf.advance(n);
                    continue;
                }
            } else if let Some(header) = frame::header(&self.inbuf, self.scanner.max()) {
                return header.map(|(tag, _)| tag).map_err(|e| End::Fatal(e.into()));
            }
            let idle_limit = limits.client_idle();
            if idle_limit.is_zero() || !self.idle() {
                self.fill().await?;
                continue;
            }
            // Boxed: only sessions with a limit carry the timer's state.
            match Box::pin(tokio::time::timeout(idle_limit, self.fill())).await {
                Ok(filled) => filled?,
                Err(_) => return Err(self.idle_past(idle_limit)),
            }
        }
    }

    /// Ends a session whose client sent nothing between transactions for `limit`.
    fn idle_past(&self, limit: Duration) -> End {
        info!(peer = %self.who.peer(), pid = self.who.client.pid(), ?limit, "closing a client idle past client_idle_timeout");
        End::Fatal(ClientError::IdleSession(limit))
    }

    /// Drops the frame at the start of the buffer; its body is dropped as it arrives.
    fn skip_frame(&mut self) -> Result<(), End> {
        match self.scanner.next(&self.inbuf, |_| false) {
            Scan::Header { .. } => {
                self.inbuf.advance(HEADER_LEN);
                Ok(())
            }
            other => Err(End::Fatal(ClientError::Protocol(format!(
                "unexpected framing state {other:?}"
            )))),
        }
    }

    /// Reads the whole frame at the start of the buffer and returns its body, or skips
    /// it and returns `None` when it is too large to hold.
    async fn take_frame(&mut self) -> Result<Option<BytesMut>, End> {
        loop {
            match self.scanner.next(&self.inbuf, |_| true) {
                Scan::Whole { len, .. } => {
                    let mut frame = self.inbuf.split_to(len);
                    frame.advance(HEADER_LEN);
                    return Ok(Some(frame));
                }
                Scan::NeedMore => self.fill().await?,
                Scan::Invalid(frame::FrameError::TooLong { .. }) => {
                    self.skip_frame()?;
                    return Ok(None);
                }
                other => {
                    return Err(End::Fatal(ClientError::Protocol(format!(
                        "unexpected framing state {other:?}"
                    ))));
                }
            }
        }
    }

    /// Reads more client bytes. While the buffer is empty its memory is given back,
    /// so that an idle client costs only its socket and this struct: the wait for
    /// readability needs no buffer, and one is allocated only when bytes are there.
    async fn fill(&mut self) -> Result<(), End> {
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        }
        let idle = self.idle();
        let (stream, inbuf) = (&mut self.stream, &mut self.inbuf);
        let ending = &self.who.client.entry().ending;
        // Readiness alone is polled only before the first wait. After a wake the read
        // finds it out itself (a wake without bytes, rare, leaves a buffer allocated).
        let mut waited = false;
        // One poll function rather than a select of futures: this runs once per request.
        let read = std::future::poll_fn(|cx| {
            if let Poll::Ready(stop) = ending.poll(cx, idle, false) {
                return Poll::Ready(Err(stop));
            }
            if !std::mem::replace(&mut waited, true)
                && let Err(e) = ready!(stream.poll_ready_to_read(cx))
            {
                return Poll::Ready(Ok(Err(e)));
            }
            if inbuf.capacity() - inbuf.len() < splice::MIN_READ_ROOM {
                if inbuf.is_empty() {
                    // Made at its size: growing an empty buffer takes the long way.
                    *inbuf = BytesMut::with_capacity(FIRST_READ);
                } else {
                    inbuf.reserve(READ_CHUNK);
                }
            }
            // A poll-based read (rather than try_read) lets tokio note that a short read
            // drained the socket, which spares the splice a read that would find nothing.
            tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, inbuf).map(Ok)
        });
        match read.await {
            Ok(Ok(0) | Err(_)) => Err(End::Gone),
            Ok(Ok(n)) => {
                self.received += n as u64;
                Ok(())
            }
            Err(Stop::Killed) => Err(End::Fatal(ClientError::Killed)),
            Err(Stop::ShutDown) => Err(End::Shutdown),
            // Not asked for: no transaction runs here.
            Err(Stop::Evicted) => Ok(()),
        }
    }

    /// True when the client is between transactions with nothing half-sent.
    fn idle(&self) -> bool {
        self.inbuf.is_empty()
            && self.scanner.at_boundary()
            && matches!(self.between, Between::Ready)
    }
}

/// [`apply_settings`] for the request of the client whose registry entry is
/// `waiter`: a cancel, KILL or the client's leaving ends the request now, not once
/// the server has answered, and the change goes on for the pool.
async fn take_settings(
    conn: PooledConn,
    sql: String,
    params: Arc<ParamSet>,
    waiter: &Entry,
) -> Result<(PooledConn, Vec<(String, String)>), ClientError> {
    let pause = waiter.begin_wait(None);
    unless_ended(apply_settings(conn, sql, params), pause.ended()).await?
}

/// Brings a server connection's settings in line with the client's `params` by
/// running `sql`. On failure the connection goes back (if the server merely refused
/// the settings) or is closed. It owns what it uses: it may finish in a task of its
/// own ([`unless_ended`]).
async fn apply_settings(
    mut conn: PooledConn,
    sql: String,
    params: Arc<ParamSet>,
) -> Result<(PooledConn, Vec<(String, String)>), ClientError> {
    let backend = conn.pool().target.backend.to_string();
    let timeout = conn.pool().connect_timeout();
    match tokio::time::timeout(timeout, conn.execute(&sql)).await {
        Ok(Ok(reports)) => {
            conn.applied = Some(params);
            Ok((conn, reports))
        }
        Ok(Err(ServerError::Rejected(notice))) if !notice.is_fatal() => {
            conn.release();
            Err(ClientError::Server(notice))
        }
        Ok(Err(source)) => Err(ClientError::ServerConnect { backend, source }),
        Err(_) => Err(ClientError::ServerConnect {
            backend,
            source: ServerError::Timeout(timeout),
        }),
    }
}

/// Session pooling: the next client must find a fresh session.
async fn reset_and_release(mut conn: PooledConn) {
    let timeout = conn.pool().connect_timeout();
    // Boxed: session pooling's alone, and its state would otherwise enlarge every request's.
    match Box::pin(tokio::time::timeout(timeout, conn.discard_all())).await {
        Ok(Ok(_)) => {
            conn.applied = None;
            conn.release();
        }
        _ => conn.discard(),
    }
}
