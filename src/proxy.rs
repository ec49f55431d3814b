//! The running proxy: shared state, the listener, signals, reload and shutdown.
//!
//! [`Shared`] is what every client task and background task may read; it holds
//! swappable snapshots (configuration, user list, routing table) rather than
//! locks, so a reload replaces them without stopping anyone. The accept loop
//! enforces `max_client_conn` by answering excess clients with an error instead
//! of leaving them in the kernel's backlog.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::address::Address;
use crate::auth::query::AuthQuery;
use crate::auth::{Secrets, UserList};
use crate::backend::{BackendTable, Routing};
use crate::client;
use crate::clock::nanos;
use crate::config::{Config, ConfigError, PoolConfig, ShutdownMode};
use crate::coordination::local::DeciderLock;
use crate::error::ClientError;
use crate::health;
use crate::listener::{ClientListeners, LocalSocket};
use crate::metrics::Metrics;
use crate::pool::{Gate, Pools};
use crate::registry::ClientRegistry;
use crate::tls::{Stream, Tls};

/// State shared by every task of the proxy.
#[derive(Debug)]
pub struct Shared {
    /// the running configuration
    pub config: ArcSwap<Config>,
    /// the user list
    pub users: Arc<ArcSwap<UserList>>,
    /// certificates and TLS modes, both sides
    pub tls: Arc<ArcSwap<Tls>>,
    /// secrets found by `auth.query`
    pub auth_query: Arc<AuthQuery>,
    /// the routing table, written by the health monitor only
    pub routing: Routing,
    /// clients saw a server connection fail: the monitor probes at once
    pub alarm: Notify,
    /// the configuration was reloaded: the monitor re-reads the backends
    pub reconfigured: Notify,
    /// spreads reads over standbys
    pub read_turn: AtomicUsize,
    /// the routing generation whose first transaction on a new primary was logged
    pub first_transaction_logged: AtomicU64,
    /// server connection pools
    pub pools: Pools,
    /// every connected client (cancel keys, admin listings)
    pub clients: Arc<ClientRegistry>,
    /// client counts for the per-user and per-database limits
    pub admissions: Arc<crate::limits::Admissions>,
    /// admission of transactions: PAUSE, RESUME, switchover
    pub gate: Gate,
    /// every metric
    pub metrics: Metrics,
    /// SHOW STATS averages of the last `stats_period`
    pub stats: crate::admin::stats::Averages,
    /// commands for the health monitor (FENCE, PROMOTE, SWITCHOVER, …)
    pub monitor: crate::health::Commands,
    /// when the process started
    pub started_at: std::time::SystemTime,
    /// failovers, switchovers and promotions so far
    pub history: crate::failover::History,
    /// one shared copy of each distinct set of client settings
    pub param_sets: crate::params::Interner,
    /// named prepared statements by database and content, shared by every client
    pub statements: crate::client::statements::Registries,
    /// fired once pgwarden stops: running transactions finish, then it exits
    pub shutdown: CancellationToken,
    /// fired when pgwarden stops listening (a shutdown, or one that waits for the
    /// clients to leave: SHUTDOWN WAIT_FOR_CLIENTS)
    pub leaving: CancellationToken,
    /// client sessions past login, admin consoles included
    pub sessions: AtomicUsize,
    /// the failover election among proxies, with `[coordination]`
    pub coordination: Option<Arc<crate::coordination::Coordinator>>,
    /// accepted connections, logging in or logged in
    connections: AtomicUsize,
    /// the running configuration's limits that every session reads at each request
    pub limits: RequestLimits,
}

/// Settings every session reads at each request, as plain atomics: cheaper there
/// than loading the configuration. A reload's values hold from each client's next
/// request on.
#[derive(Debug, Default)]
pub struct RequestLimits {
    max_message: AtomicUsize,
    client_idle_nanos: AtomicU64,
}

impl RequestLimits {
    /// Takes the values of `pool`.
    pub fn set(&self, pool: &PoolConfig) {
        self.max_message
            .store(pool.max_message_size as usize, Ordering::Relaxed);
        self.client_idle_nanos
            .store(nanos(pool.client_idle_timeout), Ordering::Relaxed);
    }

    /// `pool.max_message_size`.
    pub fn max_message(&self) -> usize {
        self.max_message.load(Ordering::Relaxed)
    }

    /// `pool.client_idle_timeout` (zero: none).
    pub fn client_idle(&self) -> Duration {
        Duration::from_nanos(self.client_idle_nanos.load(Ordering::Relaxed))
    }
}

impl Shared {
    /// Shared state for `config`, `users` and `tls`.
    pub fn new(config: Config, users: UserList, tls: Tls) -> Arc<Shared> {
        let users = Arc::new(ArcSwap::from_pointee(users));
        let tls = Arc::new(ArcSwap::from_pointee(tls));
        let auth_query = Arc::new(AuthQuery::default());
        let secrets = Secrets {
            users: users.clone(),
            queried: auth_query.clone(),
        };
        let coordination = config
            .coordination
            .clone()
            .map(|c| Arc::new(crate::coordination::Coordinator::new(c)));
        let clients = Arc::new(ClientRegistry::default());
        let limits = RequestLimits::default();
        limits.set(&config.pool);
        let shutdown = CancellationToken::new();
        Arc::new(Shared {
            coordination,
            routing: Routing::new(BackendTable::initial(&config, 1)),
            alarm: Notify::new(),
            reconfigured: Notify::new(),
            read_turn: AtomicUsize::new(0),
            first_transaction_logged: AtomicU64::new(1),
            pools: Pools::new(secrets, tls.clone(), clients.clone()),
            limits,
            config: ArcSwap::from_pointee(config),
            users,
            tls,
            auth_query,
            clients,
            admissions: Arc::default(),
            gate: Gate::default(),
            metrics: Metrics::new(),
            stats: Default::default(),
            monitor: crate::health::Commands::default(),
            started_at: std::time::SystemTime::now(),
            history: crate::failover::History::default(),
            param_sets: crate::params::Interner::default(),
            statements: crate::client::statements::Registries::default(),
            leaving: shutdown.child_token(),
            shutdown,
            sessions: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
        })
    }

    /// Stops listening, then either drains running transactions and exits
    /// (`WaitForServers`) or serves the connected clients until they leave
    /// (`WaitForClients`), and says which. A second request while the clients are
    /// being waited for goes on to the drain, as a second SIGTERM does in PgBouncer.
    pub fn stop(&self, mode: ShutdownMode, by: &str) -> ShutdownMode {
        if mode == ShutdownMode::WaitForClients && !self.leaving.is_cancelled() {
            info!(
                by,
                clients = self.sessions.load(Ordering::Relaxed),
                "no longer listening: serving the connected clients until they leave"
            );
            self.leaving.cancel();
            return mode;
        }
        if !self.shutdown.is_cancelled() {
            info!(by, "shutdown requested");
            self.shutdown.cancel();
        }
        ShutdownMode::WaitForServers
    }

    /// Accepted client connections, logging in or logged in.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Re-reads the configuration file and the user list and applies them.
    /// On any error the running configuration stays as it is.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let old = self.config.load_full();
        let config = Config::load(&old.source)?;
        let users = UserList::load(&config.auth_file())?;
        config.check_users(&users)?;
        let tls = Tls::load(&config)?;
        let unapplied = config.restart_keys_changed(&old);
        if !unapplied.is_empty() {
            warn!(
                keys = unapplied.join(", "),
                "these keys take effect at the next restart"
            );
        }
        if config.coordination != old.coordination {
            // Joining or leaving an election mid-flight could leave a failover half done.
            warn!("[coordination] takes effect at the next restart");
        }
        if config.pgwarden.log_level != old.pgwarden.log_level
            && crate::set_log_level(&config.pgwarden.log_level)
        {
            info!(log_level = %config.pgwarden.log_level, "log level changed");
        }
        self.users.store(Arc::new(users));
        self.tls.store(Arc::new(tls));
        self.pools.reconfigure(&config);
        self.limits.set(&config.pool);
        self.config.store(Arc::new(config));
        self.reconfigured.notify_one();
        Ok(())
    }
}

/// One accepted connection, counted against `max_client_conn` until dropped. The
/// session's task holds it, so no wrapper future is needed to give it back.
#[derive(Debug)]
pub struct Slot(Arc<Shared>);

impl std::ops::Deref for Slot {
    type Target = Arc<Shared>;

    fn deref(&self) -> &Arc<Shared> {
        &self.0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The sockets pgwarden listens on, and on a shared port the lock that says
/// whether this process decides failovers.
#[derive(Debug)]
pub struct Listeners {
    /// PostgreSQL clients (and the admin console)
    pub clients: ClientListeners,
    /// /metrics, /health/*, /status
    pub http: Option<TcpListener>,
    /// with `so_reuseport` and no `[coordination]`: which process on the port decides failovers
    pub decider: Option<DeciderLock>,
}

/// Listens with a backlog deep enough for a connection storm (tokio's default is
/// 1024); with `share`, beside other processes that share the port too.
async fn listen(addr: SocketAddr, share: bool) -> io::Result<TcpListener> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(share)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    bind().map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// The runtime threads for `pgwarden.workers`; 0 picks one per CPU, but one on a
/// machine of two CPUs or fewer.
///
/// One worker runs everything on the main thread with tokio's current-thread
/// scheduler: no work stealing, no waking of an idle sibling. Where the pooler
/// shares two cores with PostgreSQL and the clients, a second worker mostly adds
/// those wakeups: measured on 2 vCPUs with pgbench -S at 10 to 200 clients, one
/// worker cost 10-30 % less CPU per transaction than two, at the same or better
/// throughput. With more cores, more workers carry more load.
fn workers(configured: usize) -> usize {
    match configured {
        0 => match std::thread::available_parallelism().map_or(1, |n| n.get()) {
            cpus if cpus <= 2 => 1,
            cpus => cpus,
        },
        n => n,
    }
}

/// The runtime the proxy runs on, with `pgwarden.workers` threads (see [`workers`]).
pub fn runtime(config: &Config) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers(config.pgwarden.workers) {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder.enable_all().build()
}

/// Binds the listeners; separate from [`serve`] so that callers learn about a busy port at once.
pub async fn bind(config: &Config) -> io::Result<Listeners> {
    let share = config.pgwarden.so_reuseport;
    let addr = config.listen_addr();
    let mut decider = if share && config.coordination.is_none() {
        Some(DeciderLock::open(config)?)
    } else {
        None
    };
    let tcp = listen(addr, share).await?;
    if let Some(lock) = &mut decider {
        match lock.bound(&tcp) {
            Ok(false) => {}
            Ok(true) => warn!(
                %addr,
                lock = %lock.files(),
                "another process already listens here, yet this pgwarden took the decider lock: it does not use this lock file (a pgwarden version without one, another failover.state_file or unix_socket_dir, or another program); this one follows until that process stops listening"
            ),
            Err(e) => warn!(
                %addr,
                lock = %lock.files(),
                error = %e,
                "another process already listens here, yet this pgwarden took the decider lock, and cannot tell its own socket from it: both will fail over on their own; give both the same lock file"
            ),
        }
    }
    let local = match config.unix_socket_path() {
        Some(path) => {
            let mode = config.unix_socket_mode().unwrap_or(0o777);
            let port = config.listen_addr().port();
            Some(LocalSocket::bind(&path, port, mode, share)?)
        }
        None => None,
    };
    let clients = ClientListeners::new(tcp, local);
    let http = match config.http_addr() {
        Some(addr) => Some(listen(addr, share).await?),
        None => None,
    };
    Ok(Listeners {
        clients,
        http,
        decider,
    })
}

/// Serves clients until told to stop listening (`shared.leaving`): a shutdown
/// (`shared.shutdown`) then drains running transactions, a wait for the clients
/// serves them until the last one leaves or a shutdown comes after all.
pub async fn serve(listeners: Listeners, shared: Arc<Shared>) -> io::Result<()> {
    let listener = listeners.clients;
    info!(addr = %listener.local_addr()?, "pgwarden listening");
    if let Some(http) = listeners.http {
        tokio::spawn(crate::admin::http::serve(http, shared.clone()));
    }
    let signals = tokio::spawn(handle_signals(shared.clone()));
    let monitor = tokio::spawn(health::run(shared.clone(), listeners.decider));
    let coordination = tokio::spawn(crate::coordination::run(shared.clone()));
    tokio::spawn(crate::admin::stats::run(shared.clone()));
    tokio::spawn(shared.clients.clone().sweep_waits());
    let reaper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let shutdown = shared.shutdown.clone();
            shared
                .pools
                .maintain_until(
                    &shared.config,
                    &shared.routing,
                    |db| shared.gate.is_paused(db) || shared.admissions.is_disabled(db),
                    shutdown,
                )
                .await
        })
    };
    let sessions = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shared.leaving.cancelled() => break,
        };
        admit(&shared, &sessions, stream, peer);
    }
    for (stream, peer) in listener.close() {
        admit(&shared, &sessions, stream, peer);
    }
    sessions.close();
    if !shared.shutdown.is_cancelled() {
        tokio::select! {
            () = sessions.wait() => info!("the last client left"),
            () = shared.shutdown.cancelled() => {}
        }
        shared.shutdown.cancel();
    }
    shared.clients.shut_down_all();
    let grace = shared.config.load().pgwarden.shutdown_timeout;
    info!(
        clients = shared.sessions.load(Ordering::Relaxed),
        ?grace,
        "shutting down: waiting for running transactions"
    );
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        warn!(
            clients = shared.sessions.load(Ordering::Relaxed),
            "shutdown_timeout reached; closing the remaining connections"
        );
    }
    shared.pools.retire_all();
    signals.abort();
    let _ = reaper.await;
    let _ = monitor.await;
    let _ = coordination.await;
    info!("pgwarden stopped");
    Ok(())
}

/// Starts a session for an accepted connection, or refuses it over `max_client_conn`.
fn admit(shared: &Arc<Shared>, sessions: &TaskTracker, stream: Stream, peer: Address) {
    let max = shared.config.load().pgwarden.max_client_conn;
    if shared.connections.fetch_add(1, Ordering::AcqRel) >= max {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        sessions.spawn(refuse(stream, peer, max));
        return;
    }
    sessions.spawn(client::serve(stream, peer, Slot(shared.clone())));
}

async fn refuse(mut stream: Stream, peer: Address, max: usize) {
    warn!(%peer, max_client_conn = max, "refusing client: max_client_conn reached");
    client::farewell(
        &mut stream,
        &ClientError::TooManyClients(max).to_notice(true),
    )
    .await;
}

/// Reloads and says how it went, in the log and the metrics (SIGHUP and the admin RELOAD).
pub fn report_reload(shared: &Shared) -> Result<(), ConfigError> {
    let result = shared.reload();
    match &result {
        Ok(()) => info!("configuration reloaded"),
        Err(e) => error!(error = %e, "reload failed; the running configuration is unchanged"),
    }
    let label = if result.is_ok() { "ok" } else { "error" };
    shared.metrics.reloads.with_label_values(&[label]).inc();
    result
}

/// SIGHUP reloads; SIGTERM stops as `pgwarden.sigterm` says, SIGINT waits for
/// the running transactions; SIGUSR1 and SIGUSR2 pause and resume every database,
/// as in PgBouncer.
async fn handle_signals(shared: Arc<Shared>) {
    let install = || -> io::Result<_> {
        Ok([
            signal(SignalKind::hangup())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::user_defined1())?,
            signal(SignalKind::user_defined2())?,
        ])
    };
    let Ok(
        [
            mut hangup,
            mut terminate,
            mut interrupt,
            mut pause,
            mut resume,
        ],
    ) = install()
    else {
        error!(
            "cannot install signal handlers; SIGHUP reload and graceful shutdown are unavailable"
        );
        return;
    };
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = report_reload(&shared);
            }
            _ = terminate.recv() => {
                shared.stop(shared.config.load().pgwarden.sigterm, "SIGTERM");
            }
            _ = interrupt.recv() => {
                shared.stop(ShutdownMode::WaitForServers, "SIGINT");
            }
            _ = pause.recv() => {
                info!("SIGUSR1: pausing every database");
                shared.gate.pause(None);
            }
            _ = resume.recv() => {
                info!("SIGUSR2: resuming every database");
                shared.gate.resume(None);
            }
        }
    }
}
