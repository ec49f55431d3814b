//! Local PostgreSQL clusters: a primary and N streaming standbys on loopback
//! ports, in a temporary folder, for the tests, the benchmarks and `pgwarden demo`.
//!
//! Servers run as the `postgres` system user when pgwarden runs as root (initdb
//! and postgres refuse root). Each cluster picks free ports, so several can run
//! side by side, and removes everything it made when dropped, including while a
//! panicking test unwinds.

pub mod demo;
mod exec;
mod node;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use exec::Programs;
use exec::run;
pub use node::Node;

/// The superuser's name and password in every harness cluster.
pub const SUPERUSER: (&str, &str) = ("postgres", "postgres");

/// Something the harness could not do, with what PostgreSQL said about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClusterError(String);

impl ClusterError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> ClusterError {
        ClusterError(message.into())
    }

    fn with_log(self, node: &Node) -> ClusterError {
        ClusterError(format!(
            "{}\n--- last lines of {} ---\n{}",
            self.0,
            node.log.display(),
            node.log_tail(20)
        ))
    }
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    /// streaming standbys made with `pg_basebackup -R`
    pub standbys: usize,
    /// `synchronous_standby_names = 'ANY 1 (*)'` on the primary
    pub synchronous: bool,
    /// extra `postgresql.conf` lines for every node, e.g. `("wal_receiver_timeout", "2s")`
    pub settings: Vec<(String, String)>,
}

/// A running primary (`nodes[0]`) and its standbys.
#[derive(Debug)]
pub struct Cluster {
    /// the servers; the first one starts as the primary
    pub nodes: Vec<Node>,
    root: PathBuf,
    programs: Programs,
    spec: ClusterSpec,
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Creates and starts the cluster `spec` describes.
    pub fn start(spec: &ClusterSpec) -> Result<Cluster, ClusterError> {
        let programs = Programs::find()?;
        let root = std::env::temp_dir().join(format!(
            "pgwarden-{}-{}-{:08x}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        programs.make_dir(&root)?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            root,
            programs,
            spec: spec.clone(),
        };
        cluster.init_primary()?;
        for i in 0..spec.standbys {
            cluster.add_standby(&format!("pg{}", i + 2))?;
        }
        Ok(cluster)
    }

    /// The node that started as primary.
    pub fn primary(&self) -> &Node {
        &self.nodes[0]
    }

    /// The harness's folder (sockets and node folders live in it).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn node(&self, name: &str) -> Result<Node, ClusterError> {
        let node = Node::new(name, free_port()?, &self.root, self.programs.clone());
        self.programs.make_dir(&self.root.join(name))?;
        Ok(node)
    }

    fn init_primary(&mut self) -> Result<(), ClusterError> {
        let node = self.node("pg1")?;
        let pwfile = self.root.join("pwfile");
        self.programs.write_file(&pwfile, SUPERUSER.1)?;
        run(self
            .programs
            .command("initdb")
            .arg("-D")
            .arg(&node.data)
            .args(["-U", SUPERUSER.0, "-E", "UTF8", "--locale=C", "-N"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display())))?;
        self.configure(&node)?;
        node.start()?;
        self.nodes.push(node);
        Ok(())
    }

    fn add_standby(&mut self, name: &str) -> Result<(), ClusterError> {
        let primary = self.primary();
        let node = self.node(name)?;
        run(self
            .programs
            .command("pg_basebackup")
            .arg("-h")
            .arg(&self.root)
            .args(["-p", &primary.port.to_string(), "-U", SUPERUSER.0])
            .arg("-D")
            .arg(&node.data)
            .args(["-R", "-X", "stream", "-c", "fast", "-N"]))?;
        self.configure(&node)?;
        // Stream over TCP like a real standby, so that pgwarden can re-point it later.
        self.follow(&node, primary)?;
        node.start()?;
        self.nodes.push(node);
        Ok(())
    }

    /// Turns `node` (stopped or crashed, on an old timeline) into a standby of
    /// `primary`, as an operator would: clean shutdown, `pg_rewind` from the new
    /// primary, `standby.signal`, `primary_conninfo`, start.
    pub fn rejoin(&self, node: usize, primary: usize) -> Result<(), ClusterError> {
        let (n, p) = (&self.nodes[node], &self.nodes[primary]);
        if n.postmaster_pid().is_none() {
            // pg_rewind needs a cleanly shut down target: finish crash recovery first.
            n.start()?;
        }
        n.stop()?;
        // pg_rewind reads the source's timeline from its control file, which a
        // freshly promoted server only updates at its first checkpoint.
        p.sql("CHECKPOINT")?;
        run(self
            .programs
            .command("pg_rewind")
            .arg("-D")
            .arg(&n.data)
            .arg(format!(
                "--source-server={}",
                p.conninfo(SUPERUSER.0, SUPERUSER.1, "postgres")
            )))
        .map_err(|e| e.with_log(n))?;
        // pg_rewind copied the source's configuration files: make the node itself again.
        self.configure(n)?;
        self.follow(n, p)?;
        n.start()
    }

    /// Writes the standby configuration that makes `node` stream from `primary`.
    fn follow(&self, node: &Node, primary: &Node) -> Result<(), ClusterError> {
        self.programs
            .write_file(&node.data.join("standby.signal"), "")?;
        let auto = node.data.join("postgresql.auto.conf");
        let kept: String = std::fs::read_to_string(&auto)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
            .map(|l| format!("{l}\n"))
            .collect();
        self.programs.write_file(
            &auto,
            &format!(
                "{kept}primary_conninfo = '{} application_name={}'\n",
                primary.conninfo(SUPERUSER.0, SUPERUSER.1, "postgres"),
                node.name
            ),
        )
    }

    /// Creates a login role with a password.
    pub fn create_user(&self, name: &str, password: &str) -> Result<(), ClusterError> {
        self.primary().sql(&format!(
            "CREATE ROLE \"{name}\" LOGIN PASSWORD '{}'",
            password.replace('\'', "''")
        ))?;
        Ok(())
    }

    /// Creates a database owned by `owner`.
    pub fn create_database(&self, name: &str, owner: &str) -> Result<(), ClusterError> {
        self.primary()
            .sql(&format!("CREATE DATABASE \"{name}\" OWNER \"{owner}\""))?;
        Ok(())
    }

    /// Waits until every standby has replayed what the primary has written so far
    /// (a database just created can then be connected to on them), for at most `limit`.
    pub fn wait_replayed(&self, limit: Duration) -> Result<(), ClusterError> {
        let written = self.primary().sql("SELECT pg_current_wal_lsn()")?;
        let written = written.trim();
        let caught_up = format!("SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn");
        let deadline = Instant::now() + limit;
        for standby in &self.nodes[1..] {
            while standby.sql(&caught_up)?.trim() != "t" {
                if Instant::now() > deadline {
                    return Err(ClusterError::new(format!(
                        "{} has not replayed the primary's WAL up to {written} within {limit:?}",
                        standby.name
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Runs a PostgreSQL client program (psql, pgbench) from the server's folder.
    pub fn client_program(&self, name: &str) -> std::process::Command {
        let path = self.programs.bin.join(name);
        std::process::Command::new(if path.is_file() { path } else { name.into() })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.iter().rev() {
            if node.postmaster_pid().is_some() {
                // A stopped (SIGSTOP) server must be woken to stop.
                let _ = node.signal_all(libc::SIGCONT);
                if node.stop_immediate().is_err() {
                    let _ = node.signal(libc::SIGKILL);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Cluster {
    /// Appends the node's own settings to its postgresql.conf (later lines win). Every
    /// node gets the same replication settings, so that any of them can be primary.
    fn configure(&self, node: &Node) -> Result<(), ClusterError> {
        let mut conf = node.base_settings();
        if self.spec.synchronous {
            conf.push_str("synchronous_standby_names = 'ANY 1 (*)'\n");
        }
        for (k, v) in &self.spec.settings {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        append(&node.data.join("postgresql.conf"), &conf)
    }
}

fn append(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| ClusterError::new(format!("cannot append to {}: {e}", path.display())))
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ClusterError::new(format!("no free port: {e}")))
}
