//! Configuration: the TOML schema, its defaults, and validation.
//!
//! Every key is documented with its default in `conf/pgwarden.toml`. Unknown keys
//! are errors, and every error names the file, the key and the reason, so that an
//! operator can fix a config from the message alone. The same loader serves
//! `run`, `check-config` and a SIGHUP reload.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::address::{check_socket_path, is_socket_dir, socket_file};
use crate::auth::hba::Hba;

/// A configuration problem: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {reason}", file.display())]
pub struct ConfigError {
    /// the file that holds the problem
    pub file: PathBuf,
    /// dotted key (`pool.default_pool_size`) or `line N` for line-based files
    pub key: String,
    /// what is wrong and, where it helps, what is expected
    pub reason: String,
}

impl ConfigError {
    /// Builds an error for `key` in `file`.
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The keys of `[pgwarden]` that a reload leaves as they are until a restart (the
/// whole of `[coordination]` too).
pub const RESTART_ONLY: [&str; 6] = [
    "pgwarden.listen",
    "pgwarden.so_reuseport",
    "pgwarden.unix_socket_dir",
    "pgwarden.unix_socket_mode",
    "pgwarden.workers",
    "pgwarden.http_listen",
];

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[pgwarden]`: the listener and process-wide limits
    #[serde(default)]
    pub pgwarden: General,
    /// `[auth]`: how clients authenticate
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[pool]`: server connection pools
    #[serde(default)]
    pub pool: PoolConfig,
    /// `[health]`: how backends are probed
    #[serde(default)]
    pub health: HealthConfig,
    /// `[failover]`: what happens when the primary fails
    #[serde(default)]
    pub failover: FailoverConfig,
    /// `[coordination]`: one failover decision among several proxies (absent: this proxy decides alone)
    #[serde(default)]
    pub coordination: Option<CoordinationConfig>,
    /// `[tls]`: TLS between clients and pgwarden
    #[serde(default)]
    pub tls: TlsConfig,
    /// `[server_tls]`: TLS between pgwarden and the backends
    #[serde(default)]
    pub server_tls: ServerTlsConfig,
    /// `[[backends]]`: the PostgreSQL nodes
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// `[databases.NAME]`: the databases clients may ask for
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// Where this configuration was read from; relative paths inside it resolve against its folder.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[pgwarden]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct General {
    /// address clients connect to
    pub listen: String,
    /// folder of the Unix-domain socket `.s.PGSQL.<listen port>` for local clients; empty: none
    pub unix_socket_dir: PathBuf,
    /// permissions of that socket file, in octal
    pub unix_socket_mode: String,
    /// most client connections held at once
    pub max_client_conn: usize,
    /// most client connections of one user; 0: no limit
    pub max_user_client_conn: usize,
    /// most client connections to one database; 0: no limit
    pub max_db_client_conn: usize,
    /// how long a client may take from connect to finished authentication
    #[serde(with = "duration")]
    pub client_login_timeout: Duration,
    /// how long a shutdown waits for running transactions
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// what SIGTERM does
    pub sigterm: ShutdownMode,
    /// let other processes listen on the same port and socket file (rolling restarts)
    pub so_reuseport: bool,
    /// tracing filter (`info`, `debug`, `pgwarden=debug,info`, …); `RUST_LOG` overrides it
    pub log_level: String,
    /// runtime worker threads; 0: one per CPU, but one on machines of two CPUs or fewer
    pub workers: usize,
    /// address of the HTTP endpoint (/metrics, /health/*, /status); empty disables it
    pub http_listen: String,
    /// users who may run every admin console command
    pub admin_users: Vec<String>,
    /// users who may run the admin console's SHOW commands
    pub stats_users: Vec<String>,
    /// the period SHOW STATS averages over
    #[serde(with = "duration")]
    pub stats_period: Duration,
    /// probe idle client and server sockets with TCP keepalive
    pub tcp_keepalive: bool,
    /// idle time before the first keepalive probe, in whole seconds; "0": the system's
    #[serde(with = "duration")]
    pub tcp_keepidle: Duration,
    /// time between keepalive probes, in whole seconds; "0": the system's
    #[serde(with = "duration")]
    pub tcp_keepintvl: Duration,
    /// unanswered keepalive probes before a connection is dropped; 0: the system's
    pub tcp_keepcnt: u32,
    /// how long sent data may stay unacknowledged before a connection is dropped; "0": the system's
    #[serde(with = "duration")]
    pub tcp_user_timeout: Duration,
}

impl Default for General {
    fn default() -> Self {
        General {
            listen: "127.0.0.1:6432".into(),
            unix_socket_dir: PathBuf::new(),
            unix_socket_mode: "0777".into(),
            max_client_conn: 10_000,
            max_user_client_conn: 0,
            max_db_client_conn: 0,
            client_login_timeout: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(30),
            sigterm: ShutdownMode::WaitForServers,
            so_reuseport: false,
            log_level: "info".into(),
            workers: 0,
            http_listen: "127.0.0.1:9930".into(),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            stats_period: Duration::from_secs(60),
            tcp_keepalive: true,
            tcp_keepidle: Duration::ZERO,
            tcp_keepintvl: Duration::ZERO,
            tcp_keepcnt: 0,
            tcp_user_timeout: Duration::ZERO,
        }
    }
}

/// How a shutdown treats connected clients (PgBouncer's SHUTDOWN modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// stop listening, let running transactions finish (up to `shutdown_timeout`), exit
    WaitForServers,
    /// stop listening, serve the connected clients until the last one leaves, exit
    WaitForClients,
}

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// whether clients may or must use TLS
    pub mode: ClientTlsMode,
    /// the server certificate chain (PEM) pgwarden presents
    pub cert_file: PathBuf,
    /// its private key (PEM)
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; with it, TLS
    /// clients may present one, for `cert` authentication
    pub ca_file: PathBuf,
}

/// TLS towards clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`
    #[default]
    Disable,
    /// TLS when the client asks for it
    Allow,
    /// a client that does not use TLS is refused
    Require,
}

/// `[server_tls]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    /// whether and how pgwarden uses TLS to the backends (as libpq's sslmode)
    pub mode: ServerTlsMode,
    /// CA certificates (PEM) the backends' certificates must chain to (verify-ca, verify-full)
    pub ca_file: PathBuf,
}

/// TLS towards the backends, with libpq's sslmode meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// plain TCP
    #[default]
    Disable,
    /// TLS when the backend offers it, unverified
    Prefer,
    /// TLS or no connection, unverified
    Require,
    /// TLS with a certificate signed by `ca_file`
    VerifyCa,
    /// as verify-ca, and the certificate names the backend's host
    VerifyFull,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// client authentication method
    #[serde(rename = "type")]
    pub method: AuthMethod,
    /// user list in PgBouncer's auth_file format
    pub file: PathBuf,
    /// SQL that returns (name, secret) for `$1` on the primary, for users not in
    /// the user list (PgBouncer's auth_query); empty: no lookup
    pub query: String,
    /// user that runs `query`; its plain password is in the user list
    pub user: String,
    /// database `query` runs in; empty: the client's database
    pub dbname: String,
    /// how long a looked-up secret is used before the next login looks again
    #[serde(with = "duration")]
    pub cache_ttl: Duration,
    /// rules in pg_hba.conf format, read with `type = "hba"`
    pub hba_file: PathBuf,
    /// `hba_file` as read when the configuration was loaded
    #[serde(skip)]
    pub hba: Option<Arc<Hba>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::ScramSha256,
            file: PathBuf::from("userlist.txt"),
            query: String::new(),
            user: String::new(),
            dbname: String::new(),
            cache_ttl: Duration::from_secs(10),
            hba_file: PathBuf::new(),
            hba: None,
        }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// no password asked
    Trust,
    /// md5 challenge; users with a SCRAM secret are asked for SCRAM instead, as PostgreSQL does
    Md5,
    /// SCRAM-SHA-256
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// the method of the first `hba_file` line that matches the login
    Hba,
    /// a TLS client certificate (checked against `tls.ca_file`) whose common name is the user
    Cert,
}

/// `[pool]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// default pooling mode
    pub mode: PoolMode,
    /// server connections per (backend, database, user)
    pub default_pool_size: u32,
    /// server connections each pool keeps open even when idle (capped at its size)
    pub min_pool_size: u32,
    /// extra connections for clients that waited `reserve_pool_timeout`
    pub reserve_pool_size: u32,
    /// server connections of one database on one node, all users together; 0: no cap
    pub max_db_connections: u32,
    /// server connections of one user on one node, all databases together; 0: no cap
    pub max_user_connections: u32,
    /// wait before a client may use the reserve pool
    #[serde(with = "duration")]
    pub reserve_pool_timeout: Duration,
    /// how long a client may wait for a server connection; 0 waits forever
    #[serde(with = "duration")]
    pub query_wait_timeout: Duration,
    /// bound on connecting and logging in to a server
    #[serde(with = "duration")]
    pub server_connect_timeout: Duration,
    /// close server connections idle this long; 0 keeps them
    #[serde(with = "duration")]
    pub server_idle_timeout: Duration,
    /// close server connections this old when they are next idle; 0 keeps them
    #[serde(with = "duration")]
    pub server_lifetime: Duration,
    /// named prepared statements kept per server connection; 0 passes them through untouched
    pub max_prepared_statements: usize,
    /// disconnect a client that keeps a transaction open this long without sending anything; 0: never
    #[serde(with = "duration")]
    pub idle_transaction_timeout: Duration,
    /// disconnect a client that sends nothing between transactions this long; 0: never
    #[serde(with = "duration")]
    pub client_idle_timeout: Duration,
    /// cancel a request the server has not answered within this long; 0: never
    #[serde(with = "duration")]
    pub query_timeout: Duration,
    /// largest message a client may send after login; larger ones close the connection
    #[serde(with = "size")]
    pub max_message_size: u64,
}

/// Bounds of `pool.max_message_size`: below 64 kB ordinary statements would not
/// fit; above 1 GB is more than PostgreSQL itself accepts.
pub const MESSAGE_SIZE_BOUNDS: (u64, u64) = (64 << 10, 1 << 30);

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            default_pool_size: 20,
            min_pool_size: 0,
            reserve_pool_size: 0,
            max_db_connections: 0,
            max_user_connections: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            query_wait_timeout: Duration::from_secs(30),
            server_connect_timeout: Duration::from_secs(5),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            max_prepared_statements: 200,
            idle_transaction_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            max_message_size: 256 << 20,
        }
    }
}

/// When a server connection goes back to its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// after every transaction
    Transaction,
    /// when the client disconnects
    Session,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        })
    }
}

/// `[health]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// time between probes of a healthy backend
    #[serde(with = "duration")]
    pub interval: Duration,
    /// bound on one probe (connect, login, query)
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// consecutive failed probes that mark a backend down
    pub failure_threshold: u32,
    /// user the monitor (and the failover controller) logs in as; its password comes from the user list
    pub user: String,
    /// database the monitor connects to
    pub dbname: String,
    /// standbys further behind than this are not used for reads
    #[serde(with = "size")]
    pub max_standby_lag: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            user: "postgres".into(),
            dbname: "postgres".into(),
            max_standby_lag: 16 << 20,
        }
    }
}

/// `[failover]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// who decides about promotions
    pub mode: FailoverMode,
    /// promote only when the healthy standbys confirm they lost the primary too
    pub require_witness: bool,
    /// refuse a candidate that received this much less WAL than the old primary had written
    #[serde(with = "size")]
    pub maximum_lag_on_failover: u64,
    /// how long a transaction waits for a primary before SQLSTATE 57P03
    #[serde(with = "duration")]
    pub client_wait_timeout: Duration,
    /// bound on `pg_promote`
    #[serde(with = "duration")]
    pub promote_timeout: Duration,
    /// user the re-pointed standbys replicate as (default: `health.user`); password from the user list
    pub replication_user: Option<String>,
    /// set `default_transaction_read_only` on a fenced node that comes back as a primary
    pub fence_read_only: bool,
    /// shell command run on failover, fencing, split brain, …, with the event in its environment
    pub on_event: Option<String>,
    /// bound on the hook command
    #[serde(with = "duration")]
    pub hook_timeout: Duration,
    /// how long a switchover waits for running transactions and for the target to catch up
    #[serde(with = "duration")]
    pub switchover_timeout: Duration,
    /// where a proxy without `[coordination]` keeps the primary, the fenced nodes and
    /// the failover step, so that a restart resumes them
    pub state_file: Option<PathBuf>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            mode: FailoverMode::Auto,
            require_witness: true,
            maximum_lag_on_failover: 16 << 20,
            client_wait_timeout: Duration::from_secs(30),
            promote_timeout: Duration::from_secs(60),
            replication_user: None,
            fence_read_only: true,
            on_event: None,
            hook_timeout: Duration::from_secs(30),
            switchover_timeout: Duration::from_secs(10),
            state_file: None,
        }
    }
}

impl FailoverConfig {
    /// The user standbys replicate as.
    pub fn replication_user<'a>(&'a self, health: &'a HealthConfig) -> &'a str {
        self.replication_user.as_deref().unwrap_or(&health.user)
    }
}

/// `[coordination]`: proxies that share one cluster elect a leader in etcd, and
/// only the leader promotes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinationConfig {
    /// etcd endpoints (`http://host:port`, or all `https://host:port` for TLS)
    pub etcd: Vec<String>,
    /// key prefix shared by every proxy of one cluster
    pub prefix: String,
    /// the leader lease: how long a dead leader blocks a takeover
    #[serde(with = "duration", default = "default_lease_ttl")]
    pub lease_ttl: Duration,
    /// this proxy's name in etcd and SHOW COORDINATION (default: host name and process id)
    #[serde(default)]
    pub name: Option<String>,
    /// the etcd user pgwarden authenticates as, with `password_file` (default: no authentication)
    #[serde(default)]
    pub user: Option<String>,
    /// a file whose first line is that user's password
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) etcd's certificate must chain to (`https://` endpoints; default: the system's)
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// the client certificate (PEM) pgwarden presents to etcd, with `key_file`
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// its private key (PEM)
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// what those files hold, read when the configuration is loaded
    #[serde(skip)]
    pub access: EtcdAccess,
}

impl CoordinationConfig {
    /// True when the endpoints are `https://` (validated: all or none are).
    pub fn uses_tls(&self) -> bool {
        self.etcd.iter().any(|e| e.starts_with("https://"))
    }
}

/// The credentials and certificates `[coordination]` names, as read from their files.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// user and password, with `user` and `password_file`
    pub credentials: Option<(String, String)>,
    /// PEM CA certificates, with `ca_file`
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate and key, with `cert_file` and `key_file`
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password and the private key never reach a log.
        f.debug_struct("EtcdAccess")
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl EtcdAccess {
    /// Reads the files `c` names; `file` is the configuration, for errors and relative paths.
    fn read(c: &CoordinationConfig, file: &Path) -> Result<EtcdAccess, ConfigError> {
        let err = |key: &str, path: &Path, reason: String| {
            ConfigError::new(
                file,
                format!("coordination.{key}"),
                format!("{}: {reason}", path.display()),
            )
        };
        let read = |key: &str, path: &Path| {
            let path = resolve_against(file, path);
            std::fs::read(&path)
                .map_err(|e| err(key, &path, format!("cannot read: {e}")))
                .map(|bytes| (path, bytes))
        };
        let certificates = |key: &str, path: &Path| {
            let (path, pem) = read(key, path)?;
            match rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(certs) if !certs.is_empty() => Ok(pem),
                Ok(_) => Err(err(key, &path, "no PEM certificate in it".into())),
                Err(e) => Err(err(key, &path, e.to_string())),
            }
        };
        let credentials = match (&c.user, &c.password_file) {
            (Some(user), Some(path)) => {
                let (path, bytes) = read("password_file", path)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| err("password_file", &path, "not UTF-8 text".into()))?;
                let password = text.lines().next().unwrap_or_default();
                if password.is_empty() {
                    return Err(err(
                        "password_file",
                        &path,
                        "empty: its first line must be the password".into(),
                    ));
                }
                Some((user.clone(), password.to_owned()))
            }
            _ => None,
        };
        let ca = c
            .ca_file
            .as_deref()
            .map(|path| certificates("ca_file", path))
            .transpose()?;
        let identity = match (&c.cert_file, &c.key_file) {
            (Some(cert), Some(key)) => {
                let cert = certificates("cert_file", cert)?;
                let (path, pem) = read("key_file", key)?;
                rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem)
                    .map_err(|e| err("key_file", &path, e.to_string()))?;
                Some((cert, pem))
            }
            _ => None,
        };
        Ok(EtcdAccess {
            credentials,
            ca,
            identity,
        })
    }
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(5)
}

/// Who decides which node is the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    /// pgwarden promotes the best standby when the primary fails
    Auto,
    /// pgwarden never promotes; it routes to whichever node reports itself primary
    Follow,
    /// the first backend is the primary, whatever happens
    Off,
}

/// Where a database's transactions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// the primary only
    #[default]
    Primary,
    /// healthy standbys only (load-balanced)
    Standby,
    /// a healthy standby, else the primary
    PreferStandby,
    /// any healthy node
    Any,
}

impl Target {
    /// What a database with this target waits for, in messages.
    pub fn name(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Standby => "standby",
            Target::PreferStandby => "standby or primary",
            Target::Any => "node",
        }
    }
}

/// `[[backends]]`: one PostgreSQL node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// name used in logs, errors and admin commands
    pub name: String,
    /// host name or address, or (an absolute path) the folder of its Unix-domain socket
    pub host: String,
    /// TCP port, or the port in the socket file's name
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// higher wins when two failover candidates have received the same WAL
    #[serde(default)]
    pub priority: i32,
    /// the host standbys stream from when this node is primary, if not `host`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_host: Option<String>,
    /// the port standbys stream from when this node is primary, if not `port`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_port: Option<u16>,
}

impl BackendConfig {
    /// Where standbys reach this node for WAL: pgwarden may reach it another way
    /// (a different network, a load balancer) than its peers do.
    pub fn replication_addr(&self) -> (&str, u16) {
        (
            self.replication_host.as_deref().unwrap_or(&self.host),
            self.replication_port.unwrap_or(self.port),
        )
    }
}

fn default_pg_port() -> u16 {
    5432
}

/// `[databases.NAME]`: a database clients may connect to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// real name on the server; defaults to the client-facing name
    pub dbname: Option<String>,
    /// overrides `pool.default_pool_size`
    pub pool_size: Option<u32>,
    /// overrides `pool.min_pool_size`
    pub min_pool_size: Option<u32>,
    /// overrides `pool.max_db_connections`
    pub max_db_connections: Option<u32>,
    /// overrides `pool.mode`
    pub pool_mode: Option<PoolMode>,
    /// which nodes serve this database
    #[serde(default)]
    pub target: Target,
}

/// The name of the admin console's virtual database; no `[databases]` entry may take it.
pub const ADMIN_DATABASE: &str = "pgwarden";

/// PgBouncer's name for its console, which pgwarden's answers to as well unless a
/// database of that name is configured: monitoring set up for PgBouncer then works
/// unchanged.
pub const PGBOUNCER_ADMIN_DATABASE: &str = "pgbouncer";

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))?;
        let mut config = Config::parse(&text, path)?;
        config.source = path.to_path_buf();
        Ok(config)
    }

    /// Parses and validates configuration text; `path` is only used in errors and to resolve relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new(path, "(syntax)", describe_toml_error(&e, text)))?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = match e.path().to_string() {
                p if p == "." => "(top level)".to_owned(),
                p => p,
            };
            ConfigError::new(path, key, describe_toml_error(e.inner(), text))
        })?;
        config.source = path.to_path_buf();
        config.validate()?;
        if let Some(c) = &mut config.coordination {
            c.access = EtcdAccess::read(c, &config.source)?;
        }
        if config.auth.method == AuthMethod::Hba {
            let path = config.resolve(&config.auth.hba_file);
            let hba = Hba::load(&path)?;
            if let Some(line) = hba.cert_line()
                && config.tls.ca_file.as_os_str().is_empty()
            {
                return Err(ConfigError::new(
                    &path,
                    format!("line {line}"),
                    "cert needs tls.ca_file, the CA client certificates chain to",
                ));
            }
            config.auth.hba = Some(Arc::new(hba));
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: String, reason: String| Err(ConfigError::new(&self.source, key, reason));
        let g = &self.pgwarden;
        if let Err(e) = g.listen.parse::<SocketAddr>() {
            return err(
                "pgwarden.listen".into(),
                format!("`{}` is not an address:port ({e})", g.listen),
            );
        }
        if self.unix_socket_mode().is_none() {
            return err(
                "pgwarden.unix_socket_mode".into(),
                format!(
                    "`{}` is not a file mode: write octal digits up to \"0777\"",
                    g.unix_socket_mode
                ),
            );
        }
        if let Some(Err(reason)) = self.unix_socket_path().map(|p| check_socket_path(&p)) {
            return err("pgwarden.unix_socket_dir".into(), reason);
        }
        if !g.http_listen.is_empty()
            && let Err(e) = g.http_listen.parse::<SocketAddr>()
        {
            return err(
                "pgwarden.http_listen".into(),
                format!(
                    "`{}` is not an address:port ({e}); use \"\" to disable",
                    g.http_listen
                ),
            );
        }
        if g.max_client_conn == 0 {
            return err(
                "pgwarden.max_client_conn".into(),
                "must be at least 1".into(),
            );
        }
        if g.stats_period < Duration::from_secs(1) {
            return err("pgwarden.stats_period".into(), "must be at least 1s".into());
        }
        if g.client_login_timeout.is_zero() {
            return err(
                "pgwarden.client_login_timeout".into(),
                "must be above 0".into(),
            );
        }
        // Linux's limits (TCP_KEEPIDLE and TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT).
        for (key, d) in [
            ("pgwarden.tcp_keepidle", g.tcp_keepidle),
            ("pgwarden.tcp_keepintvl", g.tcp_keepintvl),
        ] {
            if d.subsec_nanos() != 0 || d.as_secs() > 32_767 {
                return err(
                    key.into(),
                    "must be whole seconds from 1s to 32767s, or \"0\" for the system's".into(),
                );
            }
        }
        if g.tcp_keepcnt > 127 {
            return err(
                "pgwarden.tcp_keepcnt".into(),
                "must be at most 127 (0: the system's)".into(),
            );
        }
        if g.tcp_user_timeout.as_millis() > i32::MAX as u128 {
            return err(
                "pgwarden.tcp_user_timeout".into(),
                "must be at most 24 days (\"0\": the system's)".into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&g.log_level) {
            return err("pgwarden.log_level".into(), e.to_string());
        }
        if self.pool.default_pool_size == 0 {
            return err("pool.default_pool_size".into(), "must be at least 1".into());
        }
        if self.pool.server_connect_timeout.is_zero() {
            return err(
                "pool.server_connect_timeout".into(),
                "must be above 0".into(),
            );
        }
        let (min, max) = MESSAGE_SIZE_BOUNDS;
        if !(min..=max).contains(&self.pool.max_message_size) {
            return err(
                "pool.max_message_size".into(),
                format!(
                    "{} bytes is out of bounds: write 64kB to 1GB, e.g. \"256MB\"",
                    self.pool.max_message_size
                ),
            );
        }
        let h = &self.health;
        if h.interval.is_zero() || h.timeout.is_zero() {
            return err(
                "health.interval".into(),
                "interval and timeout must be above 0".into(),
            );
        }
        if h.failure_threshold == 0 {
            return err(
                "health.failure_threshold".into(),
                "must be at least 1".into(),
            );
        }
        if self.failover.client_wait_timeout.is_zero() {
            return err(
                "failover.client_wait_timeout".into(),
                "must be above 0".into(),
            );
        }
        if let Some(c) = &self.coordination {
            if self.failover.state_file.is_some() {
                return err(
                    "failover.state_file".into(),
                    "not used with [coordination], where etcd keeps the cluster state: remove one"
                        .into(),
                );
            }
            if cfg!(not(feature = "etcd")) {
                return err(
                    "coordination".into(),
                    "this pgwarden was built without the `etcd` feature".into(),
                );
            }
            if c.etcd.is_empty() {
                return err(
                    "coordination.etcd".into(),
                    "at least one endpoint is required".into(),
                );
            }
            if !c.prefix.starts_with('/') || c.prefix.ends_with('/') {
                return err(
                    "coordination.prefix".into(),
                    "must start with '/' and not end with one (e.g. \"/pgwarden/main\")".into(),
                );
            }
            if c.lease_ttl < Duration::from_secs(2) {
                return err(
                    "coordination.lease_ttl".into(),
                    "must be at least 2s (etcd leases have whole seconds)".into(),
                );
            }
            let (secure, plain): (Vec<_>, Vec<_>) =
                c.etcd.iter().partition(|e| e.starts_with("https://"));
            if let (Some(secure), Some(plain)) = (secure.first(), plain.first()) {
                return err(
                    "coordination.etcd".into(),
                    format!(
                        "`{plain}` is not https:// like `{secure}`: either every endpoint uses TLS or none does"
                    ),
                );
            }
            for [(a, a_set), (b, b_set)] in [
                [
                    ("user", c.user.is_some()),
                    ("password_file", c.password_file.is_some()),
                ],
                [
                    ("cert_file", c.cert_file.is_some()),
                    ("key_file", c.key_file.is_some()),
                ],
            ] {
                if a_set != b_set {
                    let (given, missing) = if a_set { (a, b) } else { (b, a) };
                    return err(
                        format!("coordination.{given}"),
                        format!("needs coordination.{missing} too (both or neither)"),
                    );
                }
            }
            if c.user.as_deref() == Some("") {
                return err("coordination.user".into(), "must not be empty".into());
            }
            if !c.uses_tls() {
                for (key, set) in [
                    ("ca_file", c.ca_file.is_some()),
                    ("cert_file", c.cert_file.is_some()),
                ] {
                    if set {
                        return err(
                            format!("coordination.{key}"),
                            "the etcd endpoints are plain http://, so it would not be used: use https:// endpoints or remove it".into(),
                        );
                    }
                }
            }
        }
        if self.backends.is_empty() {
            return err(
                "backends".into(),
                "at least one [[backends]] entry is required".into(),
            );
        }
        for (i, b) in self.backends.iter().enumerate() {
            if !is_simple_name(&b.name) {
                return err(
                    format!("backends[{i}].name"),
                    format!(
                        "`{}` must be non-empty letters, digits, '_', '-' or '.'",
                        b.name
                    ),
                );
            }
            if self.backends[..i].iter().any(|o| o.name == b.name) {
                return err(
                    format!("backends[{i}].name"),
                    format!("duplicate backend name `{}`", b.name),
                );
            }
            if b.host.is_empty() {
                return err(format!("backends[{i}].host"), "must not be empty".into());
            }
            if b.port == 0 {
                return err(format!("backends[{i}].port"), "must be 1-65535".into());
            }
            if is_socket_dir(&b.host)
                && let Err(reason) = check_socket_path(&socket_file(Path::new(&b.host), b.port))
            {
                return err(format!("backends[{i}].host"), reason);
            }
        }
        match (self.auth.method, self.auth.hba_file.as_os_str().is_empty()) {
            (AuthMethod::Hba, true) => {
                return err(
                    "auth.hba_file".into(),
                    "required when auth.type is hba".into(),
                );
            }
            (AuthMethod::Hba, false) | (_, true) => {}
            (_, false) => {
                return err(
                    "auth.hba_file".into(),
                    "only read with auth.type = \"hba\"; set both, or neither".into(),
                );
            }
        }
        if !self.auth.query.is_empty() {
            if !self.auth.query.contains("$1") {
                return err(
                    "auth.query".into(),
                    "must take the user name as $1, e.g. \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"".into(),
                );
            }
            if self.auth.user.is_empty() {
                return err("auth.user".into(), "required when auth.query is set".into());
            }
        }
        if self.auth.method == AuthMethod::Cert && self.tls.ca_file.as_os_str().is_empty() {
            return err(
                "tls.ca_file".into(),
                "required when auth.type is cert: the CA client certificates chain to".into(),
            );
        }
        if self.tls.mode == ClientTlsMode::Disable && !self.tls.ca_file.as_os_str().is_empty() {
            return err(
                "tls.ca_file".into(),
                "client certificates need tls.mode allow or require".into(),
            );
        }
        if self.tls.mode != ClientTlsMode::Disable {
            for (key, path) in [
                ("tls.cert_file", &self.tls.cert_file),
                ("tls.key_file", &self.tls.key_file),
            ] {
                if path.as_os_str().is_empty() {
                    return err(
                        key.into(),
                        "required when tls.mode is allow or require".into(),
                    );
                }
            }
        }
        if matches!(
            self.server_tls.mode,
            ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull
        ) && self.server_tls.ca_file.as_os_str().is_empty()
        {
            return err(
                "server_tls.ca_file".into(),
                "required when server_tls.mode is verify-ca or verify-full".into(),
            );
        }
        if self.databases.is_empty() {
            return err(
                "databases".into(),
                "at least one [databases.NAME] entry is required".into(),
            );
        }
        for (name, db) in &self.databases {
            if name.is_empty() || name.len() > 63 {
                return err(
                    format!("databases.\"{name}\""),
                    "names are 1 to 63 bytes".into(),
                );
            }
            if name == ADMIN_DATABASE {
                return err(
                    format!("databases.{name}"),
                    format!("`{ADMIN_DATABASE}` is reserved for the admin console"),
                );
            }
            if db.dbname.as_deref() == Some("") {
                return err(
                    format!("databases.{name}.dbname"),
                    "must not be empty".into(),
                );
            }
            if db.pool_size == Some(0) {
                return err(
                    format!("databases.{name}.pool_size"),
                    "must be at least 1".into(),
                );
            }
        }
        Ok(())
    }

    /// Settings that are valid but unsafe, as `(key, why)`: `check-config` prints
    /// them and `run` logs them at start-up.
    pub fn warnings(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.auth.method == AuthMethod::Trust {
            out.push((
                "auth.type",
                "trust: anyone who can connect logs in as any user without a password".into(),
            ));
        }
        for line in self.auth.hba.iter().flat_map(|h| h.open_trust_lines()) {
            out.push((
                "auth.hba_file",
                format!("line {line}: trust for addresses beyond loopback: anyone there logs in as the users the line names without a password"),
            ));
        }
        let exposed = |addr: &str| {
            addr.parse::<SocketAddr>()
                .is_ok_and(|a| !a.ip().is_loopback())
        };
        if exposed(&self.pgwarden.http_listen) {
            out.push((
                "pgwarden.http_listen",
                format!(
                    "`{}` is not a loopback address: metrics and cluster status are open to the network without authentication",
                    self.pgwarden.http_listen
                ),
            ));
        }
        if exposed(&self.pgwarden.listen) && self.tls.mode != ClientTlsMode::Require {
            out.push((
                "tls.mode",
                format!(
                    "pgwarden listens on `{}` but does not require TLS: queries and results cross the network in clear",
                    self.pgwarden.listen
                ),
            ));
        }
        if self.pgwarden.client_login_timeout > Duration::from_secs(60) {
            out.push((
                "pgwarden.client_login_timeout",
                "over 1m: clients that never finish logging in hold a connection slot that long"
                    .into(),
            ));
        }
        if let Some(c) = &self.coordination
            && c.user.is_some()
            && let Some(remote) = c.etcd.iter().find(|e| !endpoint_is_local(e))
            && !c.uses_tls()
        {
            out.push((
                "coordination.etcd",
                format!(
                    "`{remote}` is not on this machine and not https://: the etcd password crosses the network in clear"
                ),
            ));
        }
        if self.failover.mode == FailoverMode::Auto && !self.failover.require_witness {
            out.push((
                "failover.require_witness",
                "false: a pgwarden cut off from a healthy primary promotes a standby (two primaries)".into(),
            ));
        }
        out
    }

    /// The address to listen on (validated at load).
    pub fn listen_addr(&self) -> SocketAddr {
        self.pgwarden
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 6432)))
    }

    /// The Unix-domain socket clients may connect to, named as PostgreSQL names its
    /// own (`.s.PGSQL.<port>`), unless `unix_socket_dir` is empty.
    pub fn unix_socket_path(&self) -> Option<PathBuf> {
        let dir = &self.pgwarden.unix_socket_dir;
        if dir.as_os_str().is_empty() {
            return None;
        }
        Some(socket_file(&self.resolve(dir), self.listen_addr().port()))
    }

    /// `pgwarden.unix_socket_mode` as permission bits, if it is valid.
    pub fn unix_socket_mode(&self) -> Option<u32> {
        u32::from_str_radix(&self.pgwarden.unix_socket_mode, 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
    }

    /// A path from the config, resolved against the config file's folder when relative.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        resolve_against(&self.source, path)
    }

    /// The HTTP endpoint's address, unless disabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.pgwarden.http_listen.parse().ok()
    }

    /// True when a client asking for `database` reaches the admin console.
    pub fn is_admin_database(&self, database: &str) -> bool {
        database == ADMIN_DATABASE
            || (database == PGBOUNCER_ADMIN_DATABASE
                && !self.databases.contains_key(PGBOUNCER_ADMIN_DATABASE))
    }

    /// Every key's default value, dotted as [`Config::flatten`] names them (keys of
    /// backends and databases have none).
    pub fn defaults() -> HashMap<String, String> {
        toml::from_str::<Config>("")
            .map(|c| c.flatten().into_iter().collect())
            .unwrap_or_default()
    }

    /// True for keys a reload cannot change: they take effect at the next restart.
    pub fn needs_restart(key: &str) -> bool {
        RESTART_ONLY.contains(&key) || key.starts_with("coordination.")
    }

    /// The restart-only keys whose values differ from the running configuration's.
    pub fn restart_keys_changed(&self, running: &Config) -> Vec<&'static str> {
        let new: HashMap<String, String> = self.flatten().into_iter().collect();
        let old: HashMap<String, String> = running.flatten().into_iter().collect();
        RESTART_ONLY
            .into_iter()
            .filter(|key| new.get(*key) != old.get(*key))
            .collect()
    }

    /// Every key and its value, dotted (`pool.default_pool_size`), for SHOW CONFIG.
    pub fn flatten(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&key, v, out);
                    }
                }
                toml::Value::Array(a) if a.iter().all(|v| v.is_table()) && !a.is_empty() => {
                    for (i, v) in a.iter().enumerate() {
                        walk(&format!("{prefix}[{i}]"), v, out);
                    }
                }
                toml::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
                other => out.push((prefix.to_owned(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        if let Ok(value) = toml::Value::try_from(self) {
            walk("", &value, &mut out);
        }
        out
    }

    /// The user list file.
    pub fn auth_file(&self) -> PathBuf {
        self.resolve(&self.auth.file)
    }

    /// Pool settings for one client-facing database, with its overrides applied.
    pub fn database(&self, name: &str) -> Option<DatabaseSettings> {
        let db = self.databases.get(name)?;
        let pool_size = db.pool_size.unwrap_or(self.pool.default_pool_size);
        let min_pool_size = db.min_pool_size.unwrap_or(self.pool.min_pool_size);
        Some(DatabaseSettings {
            dbname: db.dbname.clone().unwrap_or_else(|| name.to_owned()),
            pool_size,
            min_pool_size: min_pool_size.min(pool_size),
            max_db_connections: db
                .max_db_connections
                .unwrap_or(self.pool.max_db_connections),
            pool_mode: db.pool_mode.unwrap_or(self.pool.mode),
            target: db.target,
        })
    }

    /// Checks the keys that name users against the user list.
    pub fn check_users(&self, users: &crate::auth::UserList) -> Result<(), ConfigError> {
        let mut named = vec![("health.user", self.health.user.as_str())];
        if !self.auth.query.is_empty() {
            named.push(("auth.user", &self.auth.user));
        }
        if let Some(user) = &self.failover.replication_user {
            named.push(("failover.replication_user", user));
        }
        for (key, user) in named {
            match users
                .get(user)
                .map(|c| matches!(c.secret, crate::auth::Secret::Plain(_)))
            {
                Some(true) => {}
                Some(false) => {
                    return Err(ConfigError::new(
                        &self.source,
                        key,
                        format!(
                            "user \"{user}\" needs a plain password in the user list (pgwarden logs in with it)"
                        ),
                    ));
                }
                None => {
                    return Err(ConfigError::new(
                        &self.source,
                        key,
                        format!(
                            "user \"{user}\" is not in the user list {}",
                            self.auth_file().display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The effective settings of one `[databases.NAME]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// real database name on the server
    pub dbname: String,
    /// server connections per backend for each user
    pub pool_size: u32,
    /// of which each pool keeps this many open even when idle
    pub min_pool_size: u32,
    /// server connections per backend for all its users together; 0: no cap
    pub max_db_connections: u32,
    /// pooling mode
    pub pool_mode: PoolMode,
    /// which nodes serve it
    pub target: Target,
}

/// True when an etcd endpoint (`scheme://host:port`) is on this machine.
fn endpoint_is_local(endpoint: &str) -> bool {
    let authority = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `path`, resolved against the folder of the configuration file `source` when relative.
fn resolve_against(source: &Path, path: &Path) -> PathBuf {
    match source.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Turns a TOML error into one line: the message and where it is.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().to_owned();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{message} (line {line}, column {column})")
        }
        None => message,
    }
}

/// Durations are strings with units: `"500ms"`, `"15s"`, `"10m"`, `"1h"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Writes a duration the way it is configured.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Parses a duration string with a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// Parses `"250ms"`, `"1s"`, `"1h 30m"`; a bare number is refused so the unit is never guessed.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        humantime::parse_duration(s).map_err(|e| {
            format!("`{s}` is not a duration ({e}); write it with a unit, e.g. \"500ms\", \"30s\", \"10m\"")
        })
    }
}

/// Sizes are a number of bytes or a string with a unit: `"16MB"`, `"512kB"`, `"1GB"`.
pub mod size {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    /// Writes a size in bytes.
    pub fn serialize<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n)
    }

    /// Parses a size.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(n),
            Raw::Text(s) => parse(&s).map_err(serde::de::Error::custom),
        }
    }

    /// Parses `"16MB"` (units B, kB, MB, GB, TB, powers of 1024 as in PostgreSQL).
    pub fn parse(s: &str) -> Result<u64, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("`{s}` is not a size; write e.g. \"16MB\""))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "kB" | "KB" => 10,
            "MB" => 20,
            "GB" => 30,
            "TB" => 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}`; use B, kB, MB, GB or TB"
                ));
            }
        };
        n.checked_mul(1 << shift)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[backends]]
name = "pg1"
host = "127.0.0.1"
[databases.appdb]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("conf/test.toml"))
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.pgwarden.listen, "127.0.0.1:6432");
        assert_eq!(c.pgwarden.max_client_conn, 10_000);
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.pool.query_wait_timeout, Duration::from_secs(30));
        assert_eq!(c.backends[0].port, 5432);
        assert_eq!(c.auth.method, AuthMethod::ScramSha256);
        let db = c.database("appdb").unwrap();
        assert_eq!(db.dbname, "appdb");
        assert_eq!(db.pool_size, 20);
        assert!(c.database("other").is_none());
    }

    #[test]
    fn unsafe_settings_are_flagged_and_defaults_are_safe() {
        assert_eq!(parse(MINIMAL).unwrap().warnings(), vec![]);
        let c = parse(&format!(
            "[pgwarden]\nlisten = \"0.0.0.0:6432\"\nhttp_listen = \"0.0.0.0:9930\"\n\
             client_login_timeout = \"10m\"\n[auth]\ntype = \"trust\"\n\
             [failover]\nrequire_witness = false\n{MINIMAL}"
        ))
        .unwrap();
        let keys: Vec<_> = c.warnings().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "auth.type",
                "pgwarden.http_listen",
                "tls.mode",
                "pgwarden.client_login_timeout",
                "failover.require_witness"
            ]
        );
    }

    #[test]
    fn etcd_endpoints_on_this_machine_are_told_apart() {
        for local in [
            "http://127.0.0.1:2379",
            "http://localhost:2379",
            "http://[::1]:2379",
        ] {
            assert!(endpoint_is_local(local), "{local}");
        }
        for remote in ["http://10.0.0.5:2379", "http://etcd-0.etcd:2379"] {
            assert!(!endpoint_is_local(remote), "{remote}");
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../conf/pgwarden.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.auth_file(), PathBuf::from("conf/userlist.txt"));
    }

    #[test]
    fn min_pool_size_is_capped_at_the_pool_size() {
        let c = parse(&format!(
            "[pool]\nmin_pool_size = 5\n{MINIMAL}pool_size = 3\n[databases.big]\nmin_pool_size = 2\n"
        ))
        .unwrap();
        assert_eq!(c.database("appdb").unwrap().min_pool_size, 3);
        assert_eq!(c.database("big").unwrap().min_pool_size, 2);
        assert_eq!(
            parse(MINIMAL)
                .unwrap()
                .database("appdb")
                .unwrap()
                .min_pool_size,
            0
        );
    }

    #[test]
    fn per_database_overrides_apply() {
        let c = parse(&format!(
            "[pool]\nmax_db_connections = 50\n{MINIMAL}dbname = \"real\"\npool_size = 3\npool_mode = \"session\"\nmax_db_connections = 4\n[databases.other]\n"
        ))
        .unwrap();
        let db = c.database("appdb").unwrap();
        assert_eq!(
            db,
            DatabaseSettings {
                dbname: "real".into(),
                pool_size: 3,
                min_pool_size: 0,
                max_db_connections: 4,
                pool_mode: PoolMode::Session,
                target: Target::Primary,
            }
        );
        assert_eq!(c.database("other").unwrap().max_db_connections, 50);
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = parse(&format!("[pool]\nmode = \"statement\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "pool.mode");
        assert!(e.reason.contains("statement"), "{e}");
        assert!(e.to_string().starts_with("conf/test.toml: pool.mode: "));

        let e = parse(&format!("[pool]\nquery_wait_timeout = \"30\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "pool.query_wait_timeout");
        assert!(e.reason.contains("unit"), "{e}");

        let e = parse(&format!("[pool]\nbogus = 1\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "pool.bogus");
        assert!(e.reason.contains("unknown field `bogus`"), "{e}");
        assert!(e.reason.contains("line 2"), "{e}");

        let e = parse(&format!("[pgwarden]\nlisten = \"nowhere\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "pgwarden.listen");

        let e = parse(&format!("{MINIMAL}pool_size = 0\n")).unwrap_err();
        assert_eq!(e.key, "databases.appdb.pool_size");

        let e = parse("[databases.appdb]\n").unwrap_err();
        assert_eq!(e.key, "backends");

        let e = parse(&format!(
            "{MINIMAL}[[backends]]\nname = \"pg1\"\nhost = \"h\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "backends[1].name");

        let e = parse(&format!("{MINIMAL}[databases.pgwarden]\n")).unwrap_err();
        assert_eq!(e.key, "databases.pgwarden");

        let e = parse("[pgwarden\n").unwrap_err();
        assert_eq!(e.key, "(syntax)");
    }

    #[test]
    fn tls_modes_need_their_files() {
        let e = parse(&format!("[tls]\nmode = \"require\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "tls.cert_file");
        let e = parse(&format!("[tls]\nmode = \"sometimes\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "tls.mode");
        let e = parse(&format!("[server_tls]\nmode = \"verify-full\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "server_tls.ca_file");
        let c = parse(&format!(
            "[tls]\nmode = \"allow\"\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[server_tls]\nmode = \"require\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.tls.mode, ClientTlsMode::Allow);
        assert_eq!(c.server_tls.mode, ServerTlsMode::Require);
    }

    #[test]
    fn sizes_take_postgres_units() {
        assert_eq!(size::parse("16MB"), Ok(16 << 20));
        assert_eq!(size::parse("512kB"), Ok(512 << 10));
        assert_eq!(size::parse("100"), Ok(100));
        assert!(size::parse("16 mb").is_err());
        assert!(size::parse("lots").is_err());
        let c = parse(&format!("[health]\nmax_standby_lag = 1024\n[failover]\nmaximum_lag_on_failover = \"1MB\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.health.max_standby_lag, 1024);
        assert_eq!(c.failover.maximum_lag_on_failover, 1 << 20);
        assert_eq!(parse(MINIMAL).unwrap().pool.max_message_size, 256 << 20);
        for (size, ok) in [
            ("\"64kB\"", true),
            ("\"1GB\"", true),
            ("\"63kB\"", false),
            ("\"2GB\"", false),
        ] {
            let r = parse(&format!("[pool]\nmax_message_size = {size}\n{MINIMAL}"));
            match r {
                Ok(_) => assert!(ok, "{size} was accepted"),
                Err(e) => {
                    assert!(!ok, "{size}: {e}");
                    assert_eq!(e.key, "pool.max_message_size");
                }
            }
        }
        let e = parse(&format!("[failover]\nmode = \"sometimes\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "failover.mode");
    }

    #[test]
    fn keepalive_settings_stay_within_what_the_kernel_takes() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.pgwarden.tcp_keepalive);
        assert!(c.pgwarden.tcp_keepidle.is_zero());
        for (line, ok) in [
            ("tcp_keepidle = \"30s\"", true),
            ("tcp_keepidle = \"1500ms\"", false),
            ("tcp_keepintvl = \"10h\"", false),
            ("tcp_keepcnt = 127", true),
            ("tcp_keepcnt = 128", false),
            ("tcp_user_timeout = \"250ms\"", true),
            ("tcp_user_timeout = \"30d\"", false),
        ] {
            match parse(&format!("[pgwarden]\n{line}\n{MINIMAL}")) {
                Ok(_) => assert!(ok, "{line} was accepted"),
                Err(e) => {
                    assert!(!ok, "{line}: {e}");
                    let key = line.split(' ').next().unwrap();
                    assert_eq!(e.key, format!("pgwarden.{key}"));
                }
            }
        }
    }

    #[test]
    fn the_console_answers_to_pgbouncers_name_unless_a_database_takes_it() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.is_admin_database("pgwarden"));
        assert!(c.is_admin_database("pgbouncer"));
        assert!(!c.is_admin_database("app"));
        let c = parse(&format!("{MINIMAL}\n[databases.pgbouncer]\n")).unwrap();
        assert!(!c.is_admin_database("pgbouncer"));
        assert!(c.is_admin_database("pgwarden"));
    }

    #[test]
    fn stats_period_is_a_minute_and_at_least_a_second() {
        assert_eq!(
            parse(MINIMAL).unwrap().pgwarden.stats_period,
            Duration::from_secs(60)
        );
        let c = parse(&format!("[pgwarden]\nstats_period = \"5s\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.pgwarden.stats_period, Duration::from_secs(5));
        let e = parse(&format!("[pgwarden]\nstats_period = \"500ms\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "pgwarden.stats_period");
        assert!(e.reason.contains("at least 1s"), "{e}");
    }

    #[test]
    fn sigterm_waits_for_servers_unless_told_to_wait_for_clients() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.pgwarden.sigterm, ShutdownMode::WaitForServers);
        assert!(!c.pgwarden.so_reuseport);
        let text =
            format!("[pgwarden]\nsigterm = \"wait_for_clients\"\nso_reuseport = true\n{MINIMAL}");
        let c = parse(&text).unwrap();
        assert_eq!(c.pgwarden.sigterm, ShutdownMode::WaitForClients);
        assert!(c.pgwarden.so_reuseport);
        let e = parse(&format!("[pgwarden]\nsigterm = \"now\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "pgwarden.sigterm");
    }

    #[test]
    fn a_reload_names_the_restart_only_keys_it_cannot_apply() {
        let running = parse(MINIMAL).unwrap();
        let text =
            format!("[pgwarden]\nso_reuseport = true\nworkers = 3\nmax_client_conn = 5\n{MINIMAL}");
        let new = parse(&text).unwrap();
        assert_eq!(
            new.restart_keys_changed(&running),
            vec!["pgwarden.so_reuseport", "pgwarden.workers"]
        );
        assert!(running.restart_keys_changed(&running).is_empty());
    }

    #[test]
    fn the_unix_socket_is_named_for_the_port_beside_the_config() {
        assert_eq!(parse(MINIMAL).unwrap().unix_socket_path(), None);
        let c = parse(&format!(
            "[pgwarden]\nlisten = \"127.0.0.1:7000\"\nunix_socket_dir = \"run\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.unix_socket_path(),
            Some(PathBuf::from("conf/run/.s.PGSQL.7000"))
        );
        assert_eq!(c.unix_socket_mode(), Some(0o777));
        let long = format!("/{}", "d".repeat(100));
        for (line, key) in [
            ("unix_socket_mode = \"0660\"", None),
            (
                "unix_socket_mode = \"0999\"",
                Some("pgwarden.unix_socket_mode"),
            ),
            (
                "unix_socket_mode = \"1777\"",
                Some("pgwarden.unix_socket_mode"),
            ),
            (
                &format!("unix_socket_dir = \"{long}\"") as &str,
                Some("pgwarden.unix_socket_dir"),
            ),
        ] {
            match (parse(&format!("[pgwarden]\n{line}\n{MINIMAL}")), key) {
                (Ok(_), None) => {}
                (Err(e), Some(key)) => assert_eq!(e.key, key, "{line}: {e}"),
                (result, _) => panic!("{line}: {result:?}"),
            }
        }
        // A backend's socket folder is held to the same bound.
        let backend = |host: &str| {
            parse(&format!(
                "{MINIMAL}[[backends]]\nname = \"pg2\"\nhost = \"{host}\"\n"
            ))
        };
        assert!(backend("/var/run/postgresql").is_ok());
        assert_eq!(backend(&long).unwrap_err().key, "backends[1].host");
    }

    #[test]
    #[cfg(feature = "etcd")]
    fn coordination_is_optional_and_checked() {
        assert!(parse(MINIMAL).unwrap().coordination.is_none());
        let c = parse(&format!(
            "[coordination]\netcd = [\"http://127.0.0.1:2379\"]\nprefix = \"/pgwarden/main\"\n{MINIMAL}"
        ))
        .unwrap();
        let c = c.coordination.unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert_eq!(c.name, None);
        for (section, key) in [
            ("etcd = []\nprefix = \"/p\"", "coordination.etcd"),
            (
                "etcd = [\"http://e:2379\"]\nprefix = \"p/\"",
                "coordination.prefix",
            ),
            (
                "etcd = [\"http://e:2379\"]\nprefix = \"/p\"\nlease_ttl = \"1s\"",
                "coordination.lease_ttl",
            ),
        ] {
            let e = parse(&format!("[coordination]\n{section}\n{MINIMAL}")).unwrap_err();
            assert_eq!(e.key, key);
        }
    }

    #[test]
    #[cfg(feature = "etcd")]
    fn coordination_auth_and_tls_keys_are_checked() {
        let section = |endpoint: &str, keys: &str| {
            format!("[coordination]\netcd = [\"{endpoint}\"]\nprefix = \"/p\"\n{keys}\n{MINIMAL}")
        };
        for (endpoint, keys, key) in [
            ("http://e:2379", "user = \"root\"", "coordination.user"),
            (
                "http://e:2379",
                "password_file = \"pw\"",
                "coordination.password_file",
            ),
            (
                "http://e:2379",
                "user = \"\"\npassword_file = \"pw\"",
                "coordination.user",
            ),
            (
                "https://e:2379",
                "cert_file = \"c.pem\"",
                "coordination.cert_file",
            ),
            (
                "https://e:2379",
                "key_file = \"k.pem\"",
                "coordination.key_file",
            ),
            (
                "http://e:2379",
                "ca_file = \"ca.pem\"",
                "coordination.ca_file",
            ),
            (
                "http://e:2379",
                "cert_file = \"c.pem\"\nkey_file = \"k.pem\"",
                "coordination.cert_file",
            ),
            ("http://e:2379\", \"https://f:2379", "", "coordination.etcd"),
            ("https://e:2379\", \"f:2379", "", "coordination.etcd"),
        ] {
            let e = parse(&section(endpoint, keys)).unwrap_err();
            assert_eq!(e.key, key, "{keys}: {e}");
            assert!(e.to_string().starts_with("conf/test.toml: "), "{e}");
        }
        let c = parse(&section("https://e:2379", "")).unwrap();
        let c = c.coordination.unwrap();
        assert!(c.uses_tls());
        assert_eq!(c.access, EtcdAccess::default());
    }

    #[test]
    #[cfg(feature = "etcd")]
    fn coordination_files_are_read_at_load() {
        let dir = crate::scratch_dir("config");
        let config = dir.join("pgwarden.toml");
        let load = |scheme: &str, keys: &str| {
            Config::parse(
                &format!(
                    "[coordination]\netcd = [\"{scheme}://e:2379\"]\nprefix = \"/p\"\n{keys}\n{MINIMAL}"
                ),
                &config,
            )
        };
        let with_password = "user = \"root\"\npassword_file = \"pw\"";
        let e = load("http", with_password).unwrap_err();
        assert_eq!(e.key, "coordination.password_file");
        assert!(
            e.reason.contains(&dir.join("pw").display().to_string()),
            "{e}"
        );
        assert!(e.reason.contains("cannot read"), "{e}");
        std::fs::write(dir.join("pw"), "\nsecond line").unwrap();
        let e = load("http", with_password).unwrap_err();
        assert_eq!(e.key, "coordination.password_file");
        assert!(e.reason.contains("empty"), "{e}");
        std::fs::write(dir.join("pw"), "s3cret word\n").unwrap();
        let in_clear = load("http", with_password).unwrap();
        let warned: Vec<_> = in_clear.warnings().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            warned,
            ["coordination.etcd"],
            "a password to a remote etcd over http"
        );
        let c = in_clear.coordination.unwrap();
        let credentials = ("root".to_owned(), "s3cret word".to_owned());
        assert_eq!(c.access.credentials, Some(credentials));
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");

        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        std::fs::write(dir.join("ca.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
        let tls = "ca_file = \"ca.pem\"\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"";
        let c = load("https", tls).unwrap().coordination.unwrap();
        assert_eq!(c.access.ca.as_deref(), Some(made.cert.pem().as_bytes()));
        assert!(c.access.identity.is_some());
        for (keys, key) in [
            (
                "ca_file = \"junk.pem\"\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"",
                "coordination.ca_file",
            ),
            (
                "cert_file = \"junk.pem\"\nkey_file = \"key.pem\"",
                "coordination.cert_file",
            ),
            (
                "cert_file = \"cert.pem\"\nkey_file = \"cert.pem\"",
                "coordination.key_file",
            ),
            (
                "cert_file = \"cert.pem\"\nkey_file = \"missing.pem\"",
                "coordination.key_file",
            ),
        ] {
            let e = load("https", keys).unwrap_err();
            assert_eq!(e.key, key, "{keys}: {e}");
            assert!(e.reason.contains(".pem: "), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration::parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(duration::parse("0"), Ok(Duration::ZERO));
        assert!(duration::parse("15").is_err());
        assert!(duration::parse("fast").is_err());
    }

    #[test]
    fn client_certificates_need_a_ca_and_tls() {
        let e = parse(&format!("[auth]\ntype = \"cert\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "tls.ca_file");
        let e = parse(&format!("[tls]\nca_file = \"ca.pem\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "tls.ca_file");
        assert!(e.reason.contains("tls.mode"), "{e}");
    }

    #[test]
    fn the_hba_file_is_read_with_type_hba_only() {
        let e = parse(&format!("[auth]\ntype = \"hba\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "auth.hba_file");
        let e = parse(&format!("[auth]\nhba_file = \"hba.conf\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "auth.hba_file");
        assert!(e.reason.contains("type = \"hba\""), "{e}");

        let dir = crate::scratch_dir("config");
        let config = dir.join("pgwarden.toml");
        let load = || {
            Config::parse(
                &format!("[auth]\ntype = \"hba\"\nhba_file = \"hba.conf\"\n{MINIMAL}"),
                &config,
            )
        };
        let e = load().unwrap_err();
        assert_eq!(
            e.file,
            dir.join("hba.conf"),
            "relative to the config's folder"
        );
        assert!(e.reason.contains("cannot read"), "{e}");
        std::fs::write(dir.join("hba.conf"), "host all all 10.0.0.0/8 ldap\n").unwrap();
        let e = load().unwrap_err();
        assert_eq!(
            (e.file.clone(), e.key.as_str()),
            (dir.join("hba.conf"), "line 1")
        );
        std::fs::write(dir.join("hba.conf"), "hostssl all all 0.0.0.0/0 cert\n").unwrap();
        let e = load().unwrap_err();
        assert!(e.reason.contains("tls.ca_file"), "{e}");
        std::fs::write(dir.join("hba.conf"), "host all all 0.0.0.0/0 trust\n").unwrap();
        let c = load().unwrap();
        assert!(c.auth.hba.is_some());
        let warned: Vec<_> = c.warnings().into_iter().map(|(k, _)| k).collect();
        assert_eq!(warned, ["auth.hba_file"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
