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

    /// The postmaster's pid while it runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
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

    /// Runs SQL as the superuser over the Unix socket and returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> Result<String, ClusterError> {
        self.sql_in("postgres", sql)
    }

    /// Runs SQL in `database` as the superuser.
    pub fn sql_in(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let psql = self.programs.bin.join("psql");
        let out = run(
            Command::new(if psql.is_file() { psql } else { "psql".into() })
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
