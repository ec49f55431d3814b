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
//!
//! Where the file is depends on the configuration, which a reload may change. A
//! process keeps every lock file its configurations named since it started:
//! the holder takes a newly named file too, so that a process started with the
//! new configuration finds it taken; a process that waits takes all its files
//! at once or none, so that two waiting processes never each hold a part.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// How often a process waiting for the lock tries again: the longest time in
/// which nobody decides after the holder stops listening.
pub const RETRY: Duration = Duration::from_millis(250);

/// The lock files of one port, open, held or not.
#[derive(Debug)]
pub struct DeciderLock {
    /// in the order the configurations named them, each with whether it is locked
    files: Vec<(PathBuf, File, bool)>,
    /// this process took them all once: it decides until it lets go
    held: bool,
}

/// What a reload's lock file did to the decider lock.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// the file was among the lock's already
    Known,
    /// the holder took it too, or a waiting process will take it with the others
    Taken,
    /// the holder could not take it: another process decides through it
    HeldElsewhere,
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
        let mut lock = DeciderLock {
            files: vec![Self::open_file(&Self::path(config))?],
            held: false,
        };
        lock.try_take()?;
        Ok(lock)
    }

    /// Adds the lock file a reloaded `config` names. The holder takes it at once;
    /// a waiting process takes it with the others.
    pub fn add(&mut self, config: &Config) -> io::Result<Added> {
        let path = Self::path(config);
        if self.files.iter().any(|(p, _, _)| *p == path) {
            return Ok(Added::Known);
        }
        let mut file = Self::open_file(&path)?;
        let added = if self.held {
            if lock_file(&file.1).map_err(|e| named(&path, e))? {
                file.2 = true;
                Added::Taken
            } else {
                Added::HeldElsewhere
            }
        } else {
            Added::Taken
        };
        self.files.push(file);
        Ok(added)
    }

    /// Takes the lock if nobody holds any of its files; true while this process
    /// holds it. Files taken by an attempt that fails are let go again.
    pub fn try_take(&mut self) -> io::Result<bool> {
        if self.held {
            return Ok(true);
        }
        let mut complete = true;
        for (path, file, locked) in &mut self.files {
            if !*locked {
                *locked = lock_file(file).map_err(|e| named(path, e))?;
                complete &= *locked;
            }
        }
        if complete {
            self.held = true;
        } else {
            for (_, file, locked) in &mut self.files {
                if std::mem::take(locked) {
                    file.unlock()?;
                }
            }
        }
        Ok(self.held)
    }

    /// True while this process holds the lock.
    pub fn held(&self) -> bool {
        self.held
    }

    /// The lock files, for the log.
    pub fn files(&self) -> String {
        let paths: Vec<String> = self
            .files
            .iter()
            .map(|(p, _, _)| p.display().to_string())
            .collect();
        paths.join(", ")
    }

    fn open_file(path: &Path) -> io::Result<(PathBuf, File, bool)> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| named(path, e))?;
        Ok((path.to_owned(), file, false))
    }
}

/// Takes `file`'s exclusive lock if nobody holds it.
fn lock_file(file: &File) -> io::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// `e`, naming the lock file it is about.
fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("decider lock {} (so_reuseport): {e}", path.display()),
    )
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
        let (dir, config) = folder("decider");
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

    /// A scratch folder of its own for a test, and a configuration locking in it.
    fn folder(name: &str) -> (PathBuf, Config) {
        let dir = std::env::temp_dir().join(format!("pgwarden-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = config(&format!("unix_socket_dir = \"{}\"", dir.display()));
        (dir, config)
    }

    #[test]
    fn the_holder_takes_a_reloaded_configurations_file_too() {
        let (dir_a, old) = folder("reload-old");
        let (dir_b, new) = folder("reload-new");
        let mut holder = DeciderLock::open(&old).unwrap();
        assert_eq!(holder.add(&old).unwrap(), Added::Known);
        assert_eq!(holder.add(&new).unwrap(), Added::Taken);
        assert!(holder.files().contains(&dir_b.display().to_string()));
        // A process started with either configuration finds the lock taken.
        let mut started_new = DeciderLock::open(&new).unwrap();
        assert!(!started_new.held());
        assert!(!DeciderLock::open(&old).unwrap().held());
        drop(holder);
        assert!(started_new.try_take().unwrap());
        for dir in [dir_a, dir_b] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_waiting_process_takes_all_its_files_or_none() {
        let (dir_a, one) = folder("all-one");
        let (dir_b, other) = folder("all-other");
        let holder = DeciderLock::open(&one).unwrap();
        let mut waiting = DeciderLock::open(&one).unwrap();
        assert_eq!(waiting.add(&other).unwrap(), Added::Taken);
        assert!(!waiting.try_take().unwrap());
        // The failed attempt let go of the file it could take.
        let third = DeciderLock::open(&other).unwrap();
        assert!(third.held());
        drop(holder);
        assert!(
            !waiting.try_take().unwrap(),
            "the third holds the other file"
        );
        drop(third);
        assert!(waiting.try_take().unwrap());
        for dir in [dir_a, dir_b] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_holder_is_told_when_another_decides_through_the_reloaded_file() {
        let (dir_a, one) = folder("elsewhere-one");
        let (dir_b, other) = folder("elsewhere-other");
        let mut holder = DeciderLock::open(&one).unwrap();
        let other_holder = DeciderLock::open(&other).unwrap();
        assert!(other_holder.held());
        assert_eq!(holder.add(&other).unwrap(), Added::HeldElsewhere);
        assert!(holder.held(), "it keeps deciding, as the other does");
        drop((holder, other_holder));
        for dir in [dir_a, dir_b] {
            std::fs::remove_dir_all(dir).unwrap();
        }
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
