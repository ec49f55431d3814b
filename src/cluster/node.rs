//! One local PostgreSQL server: its folders, port, and the operations tests and
//! the demo perform on it (start, stop, crash, promote, run SQL).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::ClusterError;
use super::exec::{Programs, run};

/// A PostgreSQL server in a folder of its own.
#[derive(Debug)]
pub struct Node {
    /// name in logs and in `application_name` for replication
    pub name: String,
    /// TCP port on 127.0.0.1
    pub port: u16,
    /// data directory
    pub data: PathBuf,
    /// folder for the Unix socket (shared by the cluster's nodes)
    socket_dir: PathBuf,
    /// server log
    pub log: PathBuf,
    programs: Programs,
}

impl Node {
    pub(super) fn new(name: &str, port: u16, root: &Path, programs: Programs) -> Node {
        Node {
            name: name.to_owned(),
            port,
            data: root.join(name).join("data"),
            socket_dir: root.to_path_buf(),
            log: root.join(name).join("postgres.log"),
            programs,
        }
    }

    /// Settings every node gets, whatever its role.
    pub(super) fn base_settings(&self) -> String {
        format!(
            "\n# pgwarden cluster harness\n\
             port = {}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = 300\n\
             shared_buffers = 64MB\n\
             fsync = off\n\
             wal_level = replica\n\
             wal_log_hints = on\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             wal_keep_size = 256MB\n\
             hot_standby = on\n\
             log_line_prefix = '%m [%p] {} '\n",
            self.port,
            self.socket_dir.display(),
            self.name
        )
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Result<(), ClusterError> {
        self.clear_crashed_pid_file();
        run(self
            .programs
            .command("pg_ctl")
            .arg("start")
            .arg("-w")
            .args(["-t", "120"])
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log))
        .map(|_| ())
        .map_err(|e| e.with_log(self))
    }

    /// Stops the server cleanly (checkpoint, then exit).
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("fast")
    }

    /// Stops the server without a checkpoint, as a crash would.
    pub fn stop_immediate(&self) -> Result<(), ClusterError> {
        self.pg_ctl_stop("immediate")
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
        run(self
            .programs
            .command("pg_ctl")
            .arg("stop")
            .arg("-w")
            .args(["-m", mode])
            .arg("-D")
            .arg(&self.data))
        .map(|_| ())
    }

    /// The postmaster's pid while it runs (a killed one that is not reaped yet does not count).
    pub fn postmaster_pid(&self) -> Option<i32> {
        let pid = self.recorded_pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        (!zombie).then_some(pid)
    }

    fn recorded_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// After a crash the killed postmaster may linger as a zombie until init reaps
    /// it, and PostgreSQL refuses to start while its pid looks alive. Wait for the
    /// reaping; a zombie that outlives that holds nothing, so its pid file can go.
    fn clear_crashed_pid_file(&self) {
        let Some(pid) = self.recorded_pid() else {
            return;
        };
        if self.postmaster_pid().is_some() {
            return;
        }
        for _ in 0..100 {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.data.join("postmaster.pid"));
    }

    /// Sends `signal` to the postmaster (SIGKILL simulates a crash; SIGSTOP a hang).
    pub fn signal(&self, signal: i32) -> Result<(), ClusterError> {
        let pid = self
            .postmaster_pid()
            .ok_or_else(|| ClusterError::new(format!("{} is not running", self.name)))?;
        // SAFETY: sending a signal to a pid we read from the node's own pid file.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(ClusterError::new(format!(
                "kill({pid}, {signal}) failed: {}",
                std::io::Error::last_os_error()
            )))
        }
    }

    /// True when the server is a standby (in recovery).
    pub fn in_recovery(&self) -> Result<bool, ClusterError> {
        Ok(self.sql("SELECT pg_is_in_recovery()")? == "t")
    }

    /// Promotes a standby and waits for it to leave recovery.
    pub fn promote(&self) -> Result<(), ClusterError> {
        match self.sql("SELECT pg_promote(true, 60)")?.as_str() {
            "t" => Ok(()),
            other => Err(ClusterError::new(format!(
                "pg_promote on {} returned {other}",
                self.name
            ))),
        }
    }

    /// Sends `signal` to the postmaster and every process it started: SIGSTOP on all
    /// of them is a server that hangs without closing a single socket.
    pub fn signal_all(&self, signal: i32) -> Result<(), ClusterError> {
        let pid = self
            .postmaster_pid()
            .ok_or_else(|| ClusterError::new(format!("{} is not running", self.name)))?;
        let children = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|child| {
                std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .ok()
                    .and_then(|s| {
                        let after = s.rsplit_once(')')?.1.to_owned();
                        after.split_whitespace().nth(1)?.parse::<i32>().ok()
                    })
                    == Some(pid)
            });
        for p in std::iter::once(pid).chain(children) {
            // SAFETY: signalling the node's own processes.
            unsafe { libc::kill(p, signal) };
        }
        Ok(())
    }

    /// Runs SQL as the superuser over the Unix socket and returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> Result<String, ClusterError> {
        self.sql_in("postgres", sql)
    }

    /// Runs SQL in `database` as the superuser.
    pub fn sql_in(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let psql = self.programs.bin.join("psql");
        let out = run(
            Command::new(if psql.is_file() { psql } else { "psql".into() })
                // A stopped (SIGSTOP) server accepts the socket and never answers.
                .env("PGCONNECT_TIMEOUT", "10")
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
                .arg("-h")
                .arg(&self.socket_dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    database,
                    "-c",
                    sql,
                ]),
        )
        .map_err(|e| e.with_log(self))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A libpq connection string for `user` on 127.0.0.1.
    pub fn conninfo(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={database}",
            self.port
        )
    }

    /// The last lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
