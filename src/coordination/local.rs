//! Which of two pgwardens sharing one port decides failovers.
//!
//! With `so_reuseport` a new process listens beside the one it replaces (a
//! rolling restart). Without `[coordination]` to elect one of them, both would
//! promote on their own, and two that see a crash a moment apart can pick two
//! different standbys. An exclusive lock on a file settles it: the process that
//! holds it decides; the other follows (routes to whichever node reports itself
//! primary) and tries again every [`RETRY`]. The holder lets go when it stops
//! listening, and the kernel lets go for it when it exits however it exits, so
//! a crashed process never keeps the decisions.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// How often a process waiting for the lock tries again: the longest time in
/// which nobody decides after the holder stops listening.
pub const RETRY: Duration = Duration::from_millis(250);

/// The lock file of one port, open, held or not.
#[derive(Debug)]
pub struct DeciderLock {
    path: PathBuf,
    file: File,
    held: bool,
}

impl DeciderLock {
    /// Where the processes of `config`'s port meet: beside `failover.state_file`
    /// (which only the decider writes), else in `unix_socket_dir` (which they
    /// share for the socket file), else in the temporary folder.
    pub fn path(config: &Config) -> PathBuf {
        if let Some(state) = &config.failover.state_file {
            let mut path = config.resolve(state).into_os_string();
            path.push(".lock");
            return path.into();
        }
        let port = config.listen_addr().port();
        let dir = &config.pgwarden.unix_socket_dir;
        let dir = if dir.as_os_str().is_empty() {
            std::env::temp_dir()
        } else {
            dir.clone()
        };
        dir.join(format!("pgwarden-{port}.lock"))
    }

    /// Opens (creating it) the lock file of `config`'s port and tries to take the
    /// lock; an error names the file.
    pub fn open(config: &Config) -> io::Result<DeciderLock> {
        let path = Self::path(config);
        let named = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("decider lock {} (so_reuseport): {e}", path.display()),
            )
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(named)?;
        let mut lock = DeciderLock {
            path: path.clone(),
            file,
            held: false,
        };
        lock.try_take().map_err(named)?;
        Ok(lock)
    }

    /// Takes the lock if nobody holds it; true while this process holds it.
    pub fn try_take(&mut self) -> io::Result<bool> {
        if !self.held {
            match self.file.try_lock() {
                Ok(()) => self.held = true,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
        Ok(self.held)
    }

    /// True while this process holds the lock.
    pub fn held(&self) -> bool {
        self.held
    }

    /// The lock file.
    pub fn file(&self) -> &Path {
        &self.path
    }
}

/// True when some socket already listens on TCP `port` (read from
/// /proc/net/tcp and tcp6; false where those cannot be read). Before this process
/// binds, that is the process it shares the port with; if this one still got the
/// lock, the other does not use the same lock file.
pub fn port_listened_on(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .any(|table| std::fs::read_to_string(table).is_ok_and(|text| listens_in(&text, port)))
}

/// Whether a /proc/net/tcp table has a socket in state LISTEN (0A) on `port`.
fn listens_in(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let local = fields.next().unwrap_or("");
        let state = fields.nth(1).unwrap_or("");
        state == "0A"
            && local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
                == Some(port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[pgwarden]\nlisten = \"127.0.0.1:7432\"\nso_reuseport = true\n{extra}\n\
             [[backends]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\nport = 5432\n\
             [databases.app]\n"
        );
        Config::parse(&text, Path::new("/etc/pgwarden/pgwarden.toml")).unwrap()
    }

    #[test]
    fn the_lock_lives_beside_the_state_file_else_in_the_socket_folder_else_in_tmp() {
        let state = config("[failover]\nstate_file = \"state.json\"");
        assert_eq!(
            DeciderLock::path(&state),
            Path::new("/etc/pgwarden/state.json.lock")
        );
        let socket = config("unix_socket_dir = \"/run/pgwarden\"");
        assert_eq!(
            DeciderLock::path(&socket),
            Path::new("/run/pgwarden/pgwarden-7432.lock")
        );
        assert_eq!(
            DeciderLock::path(&config("")),
            std::env::temp_dir().join("pgwarden-7432.lock")
        );
    }

    #[test]
    fn one_holder_at_a_time_and_the_next_takes_over_when_it_lets_go() {
        let dir = std::env::temp_dir().join(format!("pgwarden-decider-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = config(&format!("unix_socket_dir = \"{}\"", dir.display()));
        let first = DeciderLock::open(&config).unwrap();
        assert!(first.held());
        let mut second = DeciderLock::open(&config).unwrap();
        assert!(!second.held());
        assert!(!second.try_take().unwrap());
        drop(first);
        assert!(second.try_take().unwrap());
        assert!(second.held());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_listening_socket_is_found_by_its_port() {
        let table = "  sl  local_address rem_address   st tx_queue\n\
            0: 00000000:07E8 00000000:0000 0A 00000000:00000000\n\
            1: 0100007F:1F90 0100007F:D888 01 00000000:00000000\n";
        assert!(listens_in(table, 0x07E8));
        assert!(
            !listens_in(table, 0x1F90),
            "an established connection, not a listener"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(port_listened_on(listener.local_addr().unwrap().port()));
    }

    #[test]
    fn a_folder_that_cannot_hold_the_lock_is_named() {
        let config = config("unix_socket_dir = \"/nonexistent/pgwarden\"");
        let err = DeciderLock::open(&config).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/pgwarden/pgwarden-7432.lock")
                && err.contains("so_reuseport"),
            "{err}"
        );
    }
}
