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
//!
//! A process that finds its address already listened on, and still gets the
//! lock, shares the port with one that does not take its files (a version
//! without the lock, or one told of other files), which decides on its own: it
//! follows until that listener is gone.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;

/// How often a process waiting for the lock tries again: the longest time in
/// which nobody decides after the holder stops listening.
pub const RETRY: Duration = Duration::from_millis(250);

/// The lock files of one port, open, held or not.
#[derive(Debug)]
pub struct DeciderLock {
    /// in the order the configurations named them
    files: Vec<LockFile>,
    /// this process took them all: it keeps them until it lets go, and decides
    /// unless it follows another listener (`beside`)
    taken: bool,
    /// another process on this process's address
    beside: Beside,
}

/// One lock file, open.
#[derive(Debug)]
struct LockFile {
    path: PathBuf,
    file: File,
    /// this process holds its lock
    locked: bool,
}

/// What this process knows of another listener on its own address.
#[derive(Debug, Clone, Copy)]
enum Beside {
    /// none, or one that shares these files (it holds them, or waits for them)
    Nobody,
    /// one listened there when the lock was opened, before this process bound
    Before(SocketAddr),
    /// one listened there first without these files, and decides on its own: this
    /// process follows while a socket other than its own (`own`, an inode) listens
    Following { addr: SocketAddr, own: u64 },
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
    /// lock; an error names the file. Called before binding, so that a listener
    /// found on the address then is another process's (see [`DeciderLock::bound`]).
    pub fn open(config: &Config) -> io::Result<DeciderLock> {
        let addr = config.listen_addr();
        let mut lock = DeciderLock {
            files: vec![LockFile::open(&Self::path(config))?],
            taken: false,
            beside: if listened_by_another(addr, None) {
                Beside::Before(addr)
            } else {
                Beside::Nobody
            },
        };
        lock.try_take()?;
        Ok(lock)
    }

    /// Once this process listens on its address (`listener`): true when it took
    /// the lock though another process listened there before it. That one does not
    /// share these files and decides on its own, so this one follows while it
    /// listens. An error means this process cannot tell its own socket from the
    /// other's, and decides beside it.
    pub fn bound(&mut self, listener: &impl AsRawFd) -> io::Result<bool> {
        let Beside::Before(addr) = std::mem::replace(&mut self.beside, Beside::Nobody) else {
            return Ok(false);
        };
        if !self.taken {
            // The other holds these files: it shares them, as in a rolling restart.
            return Ok(false);
        }
        let own = socket_inode(listener)?;
        self.beside = Beside::Following { addr, own };
        Ok(true)
    }

    /// Adds the lock file at `path`, which a reloaded configuration names. The
    /// holder takes it at once; a waiting process takes it with the others.
    pub fn add(&mut self, path: &Path) -> io::Result<Added> {
        if self.files.iter().any(|f| f.path == path) {
            return Ok(Added::Known);
        }
        let mut file = LockFile::open(path)?;
        // A waiting process takes it later, with the others.
        let added = if !self.taken || file.lock()? {
            Added::Taken
        } else {
            Added::HeldElsewhere
        };
        self.files.push(file);
        Ok(added)
    }

    /// Takes the lock if nobody holds any of its files (and the listener this
    /// process follows is gone); true while this process decides. Files taken by
    /// an attempt that fails are let go again.
    pub fn try_take(&mut self) -> io::Result<bool> {
        if !self.taken {
            self.take_files()?;
        }
        if self.taken
            && let Beside::Following { addr, own } = self.beside
            && !listened_by_another(addr, Some(own))
        {
            self.beside = Beside::Nobody;
        }
        Ok(self.held())
    }

    /// Takes every file, or none.
    fn take_files(&mut self) -> io::Result<()> {
        let mut complete = true;
        for file in &mut self.files {
            if !file.locked {
                complete &= file.lock()?;
            }
        }
        if complete {
            self.taken = true;
        } else {
            for file in &mut self.files {
                if std::mem::take(&mut file.locked) {
                    file.file.unlock()?;
                }
            }
        }
        Ok(())
    }

    /// True while this process decides: it holds the lock, and follows no
    /// listener that was on its address first.
    pub fn held(&self) -> bool {
        self.taken && !matches!(self.beside, Beside::Following { .. })
    }

    /// Who decides while this process does not, for the log and for refusals.
    pub fn who_decides(&self) -> String {
        match self.beside {
            Beside::Following { addr, .. } if self.taken => format!(
                "it listened on {addr} first, without the decider lock {}",
                self.files()
            ),
            _ => format!("it holds the decider lock {}", self.files()),
        }
    }

    /// The lock files, for the log.
    pub fn files(&self) -> String {
        let paths: Vec<String> = self
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        paths.join(", ")
    }
}

impl LockFile {
    /// Opens (creating it) the file at `path`, not locked yet.
    fn open(path: &Path) -> io::Result<LockFile> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| named(path, e))?;
        Ok(LockFile {
            path: path.to_owned(),
            file,
            locked: false,
        })
    }

    /// Takes the file's exclusive lock if nobody holds it; true once this process does.
    fn lock(&mut self) -> io::Result<bool> {
        self.locked = match self.file.try_lock() {
            Ok(()) => true,
            Err(TryLockError::WouldBlock) => false,
            Err(TryLockError::Error(e)) => return Err(named(&self.path, e)),
        };
        Ok(self.locked)
    }
}

/// `e`, naming the lock file it is about.
fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("decider lock {} (so_reuseport): {e}", path.display()),
    )
}

/// True when a socket other than `own` (an inode) listens on TCP `addr`, as
/// /proc/net/tcp or tcp6 lists them (false where they cannot be read). Before this
/// process binds, that is the process it shares the port with.
fn listened_by_another(addr: SocketAddr, own: Option<u64>) -> bool {
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    std::fs::read_to_string(table)
        .is_ok_and(|text| listeners_in(&text, addr).any(|inode| Some(inode) != own))
}

/// The inode of a socket, as /proc/net/tcp names it.
fn socket_inode(socket: &impl AsRawFd) -> io::Result<u64> {
    std::fs::metadata(format!("/proc/self/fd/{}", socket.as_raw_fd())).map(|m| m.ino())
}

/// The inodes of the sockets in state LISTEN (0A) on `addr` in a /proc/net/tcp table.
fn listeners_in(table: &str, addr: SocketAddr) -> impl Iterator<Item = u64> + '_ {
    let local = proc_address(addr);
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
            .then(|| fields.get(9)?.parse().ok())
            .flatten()
    })
}

/// `addr` as /proc/net/tcp writes a local address: each 32-bit word of the IP in
/// the machine's byte order, in hex, then the port.
fn proc_address(addr: SocketAddr) -> String {
    let octets = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    let words: String = octets
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    format!("{words}:{:04X}", addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration listening on `listen`, with `extra` in `[pgwarden]`.
    fn config_on(listen: &str, extra: &str) -> Config {
        let text = format!(
            "[pgwarden]\nlisten = \"{listen}\"\nso_reuseport = true\n{extra}\n\
             [[backends]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\nport = 5432\n\
             [databases.app]\n"
        );
        Config::parse(&text, Path::new("/etc/pgwarden/pgwarden.toml")).unwrap()
    }

    fn config(extra: &str) -> Config {
        config_on("127.0.0.1:7432", extra)
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
        let (_dir, config) = folder("decider");
        let first = DeciderLock::open(&config).unwrap();
        assert!(first.held());
        let mut second = DeciderLock::open(&config).unwrap();
        assert!(!second.held());
        assert!(!second.try_take().unwrap());
        drop(first);
        assert!(second.try_take().unwrap());
        assert!(second.held());
    }

    /// A configuration listening on `addr`, its lock file in `dir`.
    fn listening_on(addr: SocketAddr, dir: &Path) -> Config {
        config_on(
            &addr.to_string(),
            &format!("unix_socket_dir = \"{}\"", dir.display()),
        )
    }

    /// A scratch folder of its own for a test, removed when dropped (also when the
    /// test panics), and a configuration locking in it.
    fn folder(name: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgwarden-{name}-"))
            .tempdir()
            .unwrap();
        let config = config(&format!("unix_socket_dir = \"{}\"", dir.path().display()));
        (dir, config)
    }

    #[test]
    fn the_holder_takes_a_reloaded_configurations_file_too() {
        let (_dir_a, old) = folder("reload-old");
        let (dir_b, new) = folder("reload-new");
        let mut holder = DeciderLock::open(&old).unwrap();
        assert_eq!(holder.add(&DeciderLock::path(&old)).unwrap(), Added::Known);
        assert_eq!(holder.add(&DeciderLock::path(&new)).unwrap(), Added::Taken);
        assert!(holder.files().contains(&dir_b.path().display().to_string()));
        // A process started with either configuration finds the lock taken.
        let mut started_new = DeciderLock::open(&new).unwrap();
        assert!(!started_new.held());
        assert!(!DeciderLock::open(&old).unwrap().held());
        drop(holder);
        assert!(started_new.try_take().unwrap());
    }

    #[test]
    fn a_waiting_process_takes_all_its_files_or_none() {
        let (_dir_a, one) = folder("all-one");
        let (_dir_b, other) = folder("all-other");
        let holder = DeciderLock::open(&one).unwrap();
        let mut waiting = DeciderLock::open(&one).unwrap();
        assert_eq!(
            waiting.add(&DeciderLock::path(&other)).unwrap(),
            Added::Taken
        );
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
    }

    #[test]
    fn a_holder_is_told_when_another_decides_through_the_reloaded_file() {
        let (_dir_a, one) = folder("elsewhere-one");
        let (_dir_b, other) = folder("elsewhere-other");
        let mut holder = DeciderLock::open(&one).unwrap();
        let other_holder = DeciderLock::open(&other).unwrap();
        assert!(other_holder.held());
        assert_eq!(
            holder.add(&DeciderLock::path(&other)).unwrap(),
            Added::HeldElsewhere
        );
        assert!(holder.held(), "it keeps deciding, as the other does");
        drop((holder, other_holder));
    }

    #[test]
    fn a_listener_is_found_by_its_address_and_told_from_this_process_own() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n\
            1: 0100007F:1F90 0100007F:D888 01 00000000:00000000 00:00000000 00000000     0        0 4343 1\n\
            2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1\n";
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        // Not the connection (state 01), not the wildcard address: a listener of its own.
        assert_eq!(listeners_in(table, addr).collect::<Vec<_>>(), [4242]);
        assert_eq!(proc_address("[::1]:8080".parse().unwrap()).len(), 32 + 5);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let own = socket_inode(&listener).unwrap();
        assert!(listened_by_another(addr, None));
        assert!(!listened_by_another(addr, Some(own)));
    }

    #[test]
    fn a_holder_beside_an_earlier_listener_follows_until_it_stops() {
        let (dir, _) = folder("beside");
        let earlier = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = listening_on(earlier.local_addr().unwrap(), dir.path());
        let mut lock = DeciderLock::open(&config).unwrap();
        // Any socket of this process's stands for its own listener: only its inode counts.
        let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(lock.bound(&own).unwrap());
        assert!(!lock.held());
        assert!(!lock.try_take().unwrap());
        assert!(lock.who_decides().contains("listened on"));
        drop(earlier);
        assert!(lock.try_take().unwrap());
    }

    #[test]
    fn a_listener_that_holds_the_lock_is_waited_for_not_followed() {
        let (dir, _) = folder("waits");
        let holder_listens = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = listening_on(holder_listens.local_addr().unwrap(), dir.path());
        let holder = DeciderLock::open(&config).unwrap();
        let mut waiting = DeciderLock::open(&config).unwrap();
        let own = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!waiting.bound(&own).unwrap());
        assert!(waiting.who_decides().contains("holds the decider lock"));
        drop(holder);
        assert!(waiting.try_take().unwrap());
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
