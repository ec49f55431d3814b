//! Probing one backend: a kept-open monitoring connection, one query that reads
//! everything the monitor needs, and a task that repeats it.
//!
//! Every step is bounded by `health.timeout`, because a hung or partitioned
//! server answers nothing: TCP connects may even succeed while the startup never
//! completes. A probe that times out or fails drops its connection; the next one
//! connects again. After a failure the prober speeds up (the next probe starts a
//! quarter of the interval after the failed one started, at once if that has
//! passed) so that a node that is really gone reaches the failure threshold
//! quickly, and the monitor can wake it at once when clients see errors.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Statement};

use crate::backend::{Facts, Receiver, Replica, Role};
use crate::config::BackendConfig;
use crate::tls::Tls;

/// How to reach a backend as the monitor user.
#[derive(Debug, Clone)]
pub struct Login {
    /// user name
    pub user: String,
    /// its password (plain, from the user list)
    pub password: String,
    /// database to connect to
    pub dbname: String,
    /// bound on connect + login, and on each query
    pub timeout: Duration,
    /// TLS towards the backends, as `[server_tls]` says
    pub tls: Arc<Tls>,
}

/// Opens a monitoring or control connection to `backend`, bounded by `login.timeout`.
pub async fn connect(backend: &BackendConfig, login: &Login) -> Result<Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(&backend.host)
        .port(backend.port)
        .user(&login.user)
        .password(&login.password)
        .dbname(&login.dbname)
        .application_name("pgwarden-monitor")
        .connect_timeout(login.timeout);
    let connect = async {
        match login.tls.postgres() {
            None => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                Ok(client)
            }
            Some((mode, tls)) => {
                config.ssl_mode(mode);
                let (client, connection) = config.connect(tls).await?;
                tokio::spawn(connection);
                Ok(client)
            }
        }
    };
    tokio::time::timeout(login.timeout, connect)
        .await
        .map_err(|_| format!("connect timed out after {:?}", login.timeout))?
        .map_err(|e: tokio_postgres::Error| describe(&e))
}

/// A tokio-postgres error in one line, with the server's message when there is one,
/// else with its causes (a TLS handshake error says which certificate check failed).
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut line = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        line = format!("{line}: {c}");
        cause = c.source();
    }
    line
}

/// Everything a probe reads, in one round trip.
const PROBE: &str = "\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END,
       pg_last_wal_replay_lsn(),
       CASE WHEN pg_is_in_recovery()
            THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), (pg_control_checkpoint()).timeline_id)
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
       CASE WHEN pg_is_in_recovery() AND pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn()
            THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END,
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT sender_host FROM pg_stat_wal_receiver),
       (SELECT sender_port FROM pg_stat_wal_receiver)";

const REPLICAS: &str =
    "SELECT application_name, state, sync_state, replay_lsn FROM pg_stat_replication ORDER BY 1";

/// A monitoring connection with its statements prepared.
struct Session {
    client: Client,
    probe: Statement,
    replicas: Statement,
}

impl Session {
    async fn open(backend: &BackendConfig, login: &Login) -> Result<Session, String> {
        let client = connect(backend, login).await?;
        let probe = client.prepare(PROBE).await.map_err(|e| describe(&e))?;
        let replicas = client.prepare(REPLICAS).await.map_err(|e| describe(&e))?;
        Ok(Session {
            client,
            probe,
            replicas,
        })
    }

    async fn facts(&self) -> Result<Facts, String> {
        let started = Instant::now();
        let row = self
            .client
            .query_one(&self.probe, &[])
            .await
            .map_err(|e| describe(&e))?;
        let latency = started.elapsed();
        let in_recovery: bool = row.get(0);
        let lsn = |i| row.get::<_, Option<PgLsn>>(i).map(u64::from);
        let status: Option<String> = row.get(5);
        let mut facts = Facts {
            role: if in_recovery {
                Role::Standby
            } else {
                Role::Primary
            },
            lsn: lsn(1),
            replay_lsn: lsn(2),
            timeline: row.get::<_, Option<i32>>(3).map(|t| t as u32),
            replay_delay: row.get(4),
            receiver: status.map(|status| Receiver {
                status,
                sender_host: row.get(6),
                sender_port: row.get(7),
            }),
            replicas: Vec::new(),
            latency,
        };
        if !in_recovery {
            facts.replicas = self
                .client
                .query(&self.replicas, &[])
                .await
                .map_err(|e| describe(&e))?
                .iter()
                .map(|r| Replica {
                    name: r.get(0),
                    state: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    sync_state: r.get::<_, Option<String>>(2).unwrap_or_default(),
                    replay_lsn: r.get::<_, Option<PgLsn>>(3).map(u64::from),
                })
                .collect();
        }
        Ok(facts)
    }
}

/// One probe's outcome, sent to the monitor.
#[derive(Debug)]
pub struct Report {
    /// index of the backend in the monitor's list
    pub index: usize,
    /// the monitor's configuration epoch the prober was started in
    pub epoch: u64,
    /// what the probe saw, or why it failed
    pub result: Result<Facts, String>,
    /// when the probe started: what it saw is at least this recent
    pub started: SystemTime,
    /// the probe failed because it waited the whole `health.timeout`, not because
    /// the server refused or reset it
    pub timed_out: bool,
}

/// A running prober; stops when dropped.
#[derive(Debug)]
pub struct Prober {
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Prober {
    /// Starts probing `backend` every `interval`, reporting to `reports`.
    pub fn start(
        index: usize,
        epoch: u64,
        backend: BackendConfig,
        login: Login,
        interval: Duration,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Prober {
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn(run(
            index,
            epoch,
            backend,
            login,
            interval,
            reports,
            wake.clone(),
        ));
        Prober { wake, task }
    }

    /// Probes now instead of at the next interval.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    index: usize,
    epoch: u64,
    backend: BackendConfig,
    login: Login,
    interval: Duration,
    reports: mpsc::UnboundedSender<Report>,
    wake: Arc<Notify>,
) {
    let mut session: Option<Session> = None;
    loop {
        let started = SystemTime::now();
        let clock = Instant::now();
        let result = tokio::time::timeout(login.timeout, async {
            if session.is_none() {
                session = Some(Session::open(&backend, &login).await?);
            }
            match &session {
                Some(s) => s.facts().await,
                None => Err("no monitoring connection".to_owned()),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("probe timed out after {:?}", login.timeout)));
        let ok = result.is_ok();
        if !ok {
            // The connection may be half-dead or still waiting for an answer.
            session = None;
        }
        let report = Report {
            index,
            epoch,
            timed_out: !ok && clock.elapsed() >= login.timeout,
            result,
            started,
        };
        if reports.send(report).is_err() {
            return;
        }
        // After a failure the next probe is due a quarter interval after this one
        // *started*: a refused connection is retried soon, and a probe that timed
        // out is followed at once, so a silent hang reaches the failure threshold
        // after `failure_threshold × timeout`, not that plus the pauses.
        let pause = if ok {
            interval
        } else {
            (interval / 4)
                .max(Duration::from_millis(50))
                .saturating_sub(clock.elapsed())
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
        }
    }
}
