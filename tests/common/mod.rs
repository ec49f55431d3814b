//! Test harness: a real PostgreSQL (one per test binary, from `pgwarden::cluster`),
//! a fresh user and database per test, and pgwarden started as its own process in
//! front of it, exactly as an operator would run it.

#![allow(dead_code)]

pub mod etcd;
pub mod relay;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgwarden::cluster::{Cluster, ClusterSpec, free_port};
use tokio_postgres::types::Type;

static CLUSTER: OnceLock<Mutex<Option<Cluster>>> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

extern "C" fn stop_shared_cluster() {
    if let Some(slot) = CLUSTER.get() {
        drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// Runs `f` with the test binary's shared PostgreSQL, started on first use and
/// stopped when the test process exits.
pub fn with_cluster<T>(f: impl FnOnce(&Cluster) -> T) -> T {
    let slot = CLUSTER.get_or_init(|| {
        let cluster = Cluster::start(&ClusterSpec::default())
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL for the tests: {e}"));
        // SAFETY: registers a plain extern "C" function; it runs once at process exit.
        unsafe { libc::atexit(stop_shared_cluster) };
        Mutex::new(Some(cluster))
    });
    let guard = slot.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.as_ref().expect("cluster is only taken at exit"))
}

/// A primary and two streaming standbys (pg_basebackup -R) of the test's own; a
/// 2 s `wal_receiver_timeout` lets the standbys witness a hung primary quickly.
pub fn three_nodes(synchronous: bool) -> Cluster {
    Cluster::start(&ClusterSpec {
        standbys: 2,
        synchronous,
        settings: vec![("wal_receiver_timeout".into(), "2s".into())],
    })
    .expect("start a three-node cluster")
}

/// A user and a database of one test's own.
#[derive(Debug, Clone)]
pub struct Db {
    pub name: String,
    pub user: String,
    pub password: String,
    /// port of the PostgreSQL server, for direct connections
    pub server_port: u16,
}

impl Db {
    /// Creates a fresh user (password authentication) and a database it owns.
    pub fn create() -> Db {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}_{n}", std::process::id());
        let db = Db {
            name: format!("db_{tag}"),
            user: format!("user_{tag}"),
            password: format!("pw'{tag}"),
            server_port: 0,
        };
        with_cluster(|c| {
            c.create_user(&db.user, &db.password).unwrap();
            c.create_database(&db.name, &db.user).unwrap();
            Db {
                server_port: c.primary().port,
                ..db
            }
        })
    }

    /// Creates a fresh user and database on a cluster of the test's own.
    pub fn create_on(cluster: &Cluster) -> Db {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}_{n}", std::process::id());
        let db = Db {
            name: format!("db_{tag}"),
            user: format!("user_{tag}"),
            password: format!("pw_{tag}"),
            server_port: cluster.primary().port,
        };
        cluster.create_user(&db.user, &db.password).unwrap();
        cluster.create_database(&db.name, &db.user).unwrap();
        db
    }

    /// Runs SQL as the superuser in this database, directly on the server.
    pub fn admin_sql(&self, sql: &str) -> String {
        with_cluster(|c| c.primary().sql_in(&self.name, sql).unwrap())
    }

    /// A direct connection to PostgreSQL, bypassing pgwarden.
    pub async fn direct(&self) -> tokio_postgres::Client {
        connect(&format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            self.server_port,
            self.user,
            quote(&self.password),
            self.name
        ))
        .await
        .unwrap()
    }
}

/// How to configure the pgwarden under test; each field is TOML appended to its section.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub pgwarden: String,
    pub auth: Option<String>,
    /// more `[auth]` keys (`query`, `user`, …)
    pub auth_keys: String,
    pub pool: String,
    pub health: String,
    pub failover: String,
    /// (name, port) of each backend; empty: the shared cluster's server as "pg1"
    pub backends: Vec<(String, u16)>,
    /// more keys for the backend of the same index (`replication_port = …`)
    pub backend_keys: Vec<String>,
    /// every backend's `host` (default 127.0.0.1; a folder for a Unix-domain socket)
    pub backend_host: Option<String>,
    /// extra `[databases.X]` entries, verbatim
    pub databases: String,
    /// extra keys for every `[databases.X]` entry
    pub database: String,
    /// user list lines beyond the test databases' users
    pub extra_users: String,
    /// whole extra sections (`[tls]`, `[server_tls]`, …), verbatim
    pub sections: String,
    /// extra environment variables for the process
    pub env: Vec<(String, String)>,
    /// soft and hard open-files limits the process starts with
    pub open_files: Option<(u64, u64)>,
}

/// Options with `settings` as the `[pool]` section.
pub fn pool(settings: &str) -> Options {
    Options {
        pool: settings.into(),
        ..Default::default()
    }
}

/// The server process serving the client's next statement.
pub async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_typed_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Backend pids of the sessions the test user has on the server.
pub fn server_pids(db: &Db) -> Vec<i32> {
    db.admin_sql(&format!(
        "SELECT pid FROM pg_stat_activity WHERE usename = '{}' ORDER BY pid",
        db.user
    ))
    .lines()
    .filter_map(|l| l.trim().parse().ok())
    .collect()
}

/// A pgwarden process.
pub struct Pgwarden {
    child: Child,
    pub port: u16,
    /// the HTTP endpoint's port
    pub http_port: u16,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
    launch: Launch,
}

/// How the process starts, besides its configuration.
#[derive(Debug, Clone)]
struct Launch {
    env: Vec<(String, String)>,
    open_files: Option<(u64, u64)>,
}

impl Pgwarden {
    /// Starts pgwarden for `dbs` with default options.
    pub fn start(dbs: &[&Db]) -> Pgwarden {
        Self::start_with(dbs, Options::default())
    }

    /// Starts pgwarden for `dbs` and waits until it accepts connections.
    pub fn start_with(dbs: &[&Db], options: Options) -> Pgwarden {
        let launch = Launch {
            env: options.env.clone(),
            open_files: options.open_files,
        };
        // A port found free can be taken before pgwarden binds it, by another test's
        // outgoing connection (both come from the ephemeral range): such a start is
        // tried again on other ports.
        for _ in 0..3 {
            let port = free_port().unwrap();
            let http_port = free_port().unwrap();
            let config = config_text(port, http_port, dbs, &options);
            match Self::launch(
                port,
                http_port,
                &config,
                &userlist(dbs, &options),
                launch.clone(),
            ) {
                Ok(p) => return p,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("pgwarden found its ports taken three times");
    }

    /// Starts a second pgwarden with this one's configuration and ports (which
    /// needs `so_reuseport = true`), in a folder of its own, and waits until it
    /// listens too.
    pub fn beside(&self) -> Pgwarden {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap();
        Self::launch(
            self.port,
            self.http_port,
            &read("pgwarden.toml"),
            &read("userlist.txt"),
            self.launch.clone(),
        )
        .unwrap_or_else(|log| panic!("{log}"))
    }

    fn launch(
        port: u16,
        http_port: u16,
        config_text: &str,
        userlist: &str,
        launch: Launch,
    ) -> Result<Pgwarden, String> {
        let dir = std::env::temp_dir().join(format!(
            "pgwarden-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("pgwarden.toml");
        std::fs::write(&config, config_text).unwrap();
        std::fs::write(dir.join("userlist.txt"), userlist).unwrap();
        let log = dir.join("pgwarden.log");
        let child = spawn(&config, &log, &launch);
        let mut p = Pgwarden {
            child,
            port,
            http_port,
            dir,
            config,
            log,
            launch,
        };
        p.wait_ready(0)?;
        Ok(p)
    }

    /// Kills pgwarden with SIGKILL (a crash: no shutdown) and starts it again with
    /// the same configuration and ports; its log goes on in the same file.
    pub fn restart(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        let logged = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        self.child = spawn(&self.config, &self.log, &self.launch);
        self.wait_ready(logged)
            .unwrap_or_else(|log| panic!("{log}"));
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the process listens, as its log says past the first `logged`
    /// bytes; what it logged if it exited first.
    fn wait_ready(&mut self, logged: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("pgwarden exited with {status}:\n{}", self.log()));
            }
            // The HTTP endpoint starts just after the client listener. Its line in the
            // log tells a process that shares its ports from the one already there.
            let log = std::fs::read(&self.log).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(logged..).unwrap_or_default());
            if new.contains("HTTP endpoint listening") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("pgwarden did not start listening:\n{}", self.log());
    }

    /// The libpq connection string for `db` through pgwarden.
    pub fn conninfo(&self, db: &Db) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            self.port,
            db.user,
            quote(&db.password),
            db.name
        )
    }

    /// A tokio-postgres client through pgwarden.
    pub async fn connect(&self, db: &Db) -> tokio_postgres::Client {
        connect(&self.conninfo(db))
            .await
            .unwrap_or_else(|e| panic!("connect through pgwarden: {e:?}\n{}", self.log()))
    }

    /// The process id, for /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on the HTTP endpoint: the status line and the body.
    pub fn http_get(&self, path: &str) -> (String, String) {
        http(
            self.http_port,
            &format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n"),
        )
    }

    /// The log file (it outlives restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What pgwarden logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal to the pgwarden process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit and returns whether it exited successfully.
    pub fn wait_exit(&mut self, within: Duration) -> Option<bool> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Checks that the process exits, and successfully, within `within`.
    pub fn exits_cleanly(&mut self, within: Duration) {
        let exit = self.wait_exit(within);
        assert_eq!(exit, Some(true), "exit within {within:?}:\n{}", self.log());
    }

    /// Rewrites the configuration file (for reload tests).
    pub fn rewrite_config(&self, dbs: &[&Db], options: &Options) {
        std::fs::write(
            &self.config,
            config_text(self.port, self.http_port, dbs, options),
        )
        .unwrap();
        std::fs::write(self.dir.join("userlist.txt"), userlist(dbs, options)).unwrap();
    }
}

impl Drop for Pgwarden {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- pgwarden log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(config: &Path, log: &Path, launch: &Launch) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgwarden"));
    command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "pgwarden=debug,info")
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log);
    if let Some((soft, hard)) = launch.open_files {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit is async-signal-safe, as code between fork and exec must be.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    command.spawn().unwrap()
}

fn config_text(port: u16, http_port: u16, dbs: &[&Db], o: &Options) -> String {
    let auth = o.auth.as_deref().unwrap_or("scram-sha-256");
    let mut text = format!(
        "[pgwarden]\nlisten = \"127.0.0.1:{port}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n\
         shutdown_timeout = \"10s\"\n{}\n\
         [auth]\ntype = \"{auth}\"\nfile = \"userlist.txt\"\n{}\n\
         [pool]\n{}\n[health]\n{}\n[failover]\n{}\n",
        o.pgwarden, o.auth_keys, o.pool, o.health, o.failover
    );
    let backends = if o.backends.is_empty() {
        vec![(
            "pg1".to_owned(),
            dbs.first().map_or(5432, |d| d.server_port),
        )]
    } else {
        o.backends.clone()
    };
    let host = o.backend_host.as_deref().unwrap_or("127.0.0.1");
    for (i, (name, backend_port)) in backends.into_iter().enumerate() {
        text.push_str(&format!(
            "[[backends]]\nname = \"{name}\"\nhost = \"{host}\"\nport = {backend_port}\n{}\n",
            o.backend_keys.get(i).map_or("", String::as_str)
        ));
    }
    for db in dbs {
        text.push_str(&format!("[databases.{}]\n{}\n", db.name, o.database));
    }
    text.push_str(&o.databases);
    text.push_str(&o.sections);
    text
}

fn userlist(dbs: &[&Db], o: &Options) -> String {
    // The monitor logs in as the harness superuser.
    let (user, password) = pgwarden::cluster::SUPERUSER;
    let mut text = format!("\"{user}\" \"{password}\"\n");
    text += &dbs
        .iter()
        .map(|d| format!("\"{}\" \"{}\"\n", d.user, d.password.replace('"', "\"\"")))
        .collect::<String>();
    text.push_str(&o.extra_users);
    text
}

/// Polls `check` every 50 ms until it returns true; panics with `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spawns `work` and checks that it is still waiting 300 ms later, for what
/// `blocked_by` names; [`served`] then awaits it once that is out of the way.
pub async fn waits<T: Send + 'static>(
    blocked_by: &str,
    work: impl Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let task = tokio::spawn(work);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!task.is_finished(), "did not wait for {blocked_by}");
    task
}

/// Awaits a task [`waits`] started, which must finish within 5 s now.
pub async fn served<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("still waiting 5 s after what held it back was gone")
        .unwrap()
}

/// Checks that pgwarden ended a session (a shutdown, KILL): 57P01 admin_shutdown,
/// or closed without a word.
pub fn ended_by_admin_shutdown(err: &tokio_postgres::Error) {
    assert!(
        sqlstate(err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
}

/// Quotes a libpq connection-string value.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// One HTTP/1.0 request; returns the status line and the body.
pub fn http(port: u16, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// Connects with tokio-postgres and drives the connection in the background.
pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The message of a tokio-postgres error: the server's (or pgwarden's) when it sent one.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// The SQLSTATE of a tokio-postgres error, if the server (or pgwarden) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

/// A raw socket speaking the protocol by hand, for what drivers never send.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw { stream }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// A StartupMessage for protocol 3.0.
    pub fn startup(&mut self, params: &[(&str, &str)]) {
        self.send(&startup_packet(196_608, params));
    }

    /// Sends one typed message.
    pub fn message(&mut self, tag: u8, body: &[u8]) {
        self.send(&frame(tag, body));
    }

    /// Reads one typed message; `None` when the connection closed.
    pub fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.stream.read_exact(&mut header).ok()?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).ok()?;
        Some((header[0], body))
    }

    /// Reads messages up to and including the next one of type `tag`.
    pub fn read_until(&mut self, tag: u8) -> Vec<(u8, Vec<u8>)> {
        let mut seen = Vec::new();
        while let Some(m) = self.read() {
            let done = m.0 == tag;
            seen.push(m);
            if done {
                break;
            }
        }
        seen
    }
}

/// One typed message.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The SQLSTATE ('C' field) of an ErrorResponse body.
pub fn error_code(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find(|f| f.first() == Some(&b'C'))
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .unwrap_or_default()
}

/// What a writer saw: acknowledged ids with when, and the SQLSTATEs of failures.
pub type Ledger = (Vec<(i32, Instant)>, Vec<String>);

/// The acknowledged ids missing from `stored` (one id a line, as `sql_in` returns them).
pub fn lost_commits(acked: &[(i32, Instant)], stored: &str) -> Vec<i32> {
    let stored: std::collections::BTreeSet<i32> =
        stored.lines().filter_map(|l| l.parse().ok()).collect();
    acked
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !stored.contains(id))
        .collect()
}

/// A StartupMessage: the protocol `version` and `params`.
pub fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Inserts ids through pgwarden every 20 ms until stopped.
pub fn writer(conninfo: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Ledger> {
    tokio::spawn(async move {
        let client = connect(&conninfo).await.unwrap();
        let (mut acked, mut failures) = (Vec::new(), Vec::new());
        let mut id = 0;
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            match client
                .execute_typed("INSERT INTO ledger VALUES ($1)", &[(&id, Type::INT4)])
                .await
            {
                Ok(_) => acked.push((id, Instant::now())),
                Err(e) => {
                    assert!(
                        !e.is_closed(),
                        "pgwarden closed the writer's connection: {e}"
                    );
                    failures.push(sqlstate(&e).unwrap_or_else(|| e.to_string()));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (acked, failures)
    })
}

/// A `SELECT pg_sleep(30)` running on a client through pgwarden, for cancel tests.
pub struct Sleeping {
    cancel: tokio_postgres::CancelToken,
    task: tokio::task::JoinHandle<(tokio_postgres::Client, tokio_postgres::Error)>,
}

impl Sleeping {
    /// Starts the statement on `client` and gives it 300 ms to be running.
    pub async fn start(client: tokio_postgres::Client) -> Sleeping {
        let cancel = client.cancel_token();
        let task = tokio::spawn(async move {
            let e = client
                .simple_query("SELECT pg_sleep(30)")
                .await
                .unwrap_err();
            (client, e)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        Sleeping { cancel, task }
    }

    /// Sends the client's CancelRequest and checks the statement ended with 57014;
    /// returns the client.
    pub async fn cancel(self) -> tokio_postgres::Client {
        self.cancel
            .cancel_query(tokio_postgres::NoTls)
            .await
            .unwrap();
        let (client, e) = self.task.await.unwrap();
        assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
        client
    }
}

/// A folder of the test's own in the temporary folder (`pgwarden-<name>-<pid>`),
/// removed when dropped, also when the test panics.
pub struct Folder(PathBuf);

impl Folder {
    /// Creates it.
    pub fn new(name: &str) -> Folder {
        let dir = std::env::temp_dir().join(format!("pgwarden-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Folder(dir)
    }
}

impl std::ops::Deref for Folder {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
