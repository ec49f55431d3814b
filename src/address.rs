//! Where the other end of a connection is: a TCP address or a Unix-domain socket.
//!
//! Both sides of the proxy may be local. Clients connect to pgwarden's own socket
//! file, and a backend whose `host` is a folder (an absolute path, as in libpq)
//! is reached through PostgreSQL's socket file in it. Listings show a local end
//! as PgBouncer does: address `unix`, and the port in the file's name.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A connection's far end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// a TCP peer
    Tcp(SocketAddr),
    /// a Unix-domain socket file, named for `port`
    Local {
        /// the socket file
        path: Arc<Path>,
        /// the port in its name
        port: u16,
    },
}

impl Address {
    /// The address column of SHOW CLIENTS and SHOW SERVERS: the IP, or `unix`.
    pub fn column(&self) -> String {
        match self {
            Address::Tcp(addr) => addr.ip().to_string(),
            Address::Local { .. } => "unix".into(),
        }
    }

    /// The port column: the TCP port, or the one in the socket file's name.
    pub fn port(&self) -> u16 {
        match self {
            Address::Tcp(addr) => addr.port(),
            Address::Local { port, .. } => *port,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(addr) => addr.fmt(f),
            Address::Local { path, .. } => path.display().fmt(f),
        }
    }
}

/// True when a `host` names a socket folder rather than a host, as libpq decides.
pub fn is_socket_dir(host: &str) -> bool {
    host.starts_with('/')
}

/// The socket file PostgreSQL (and pgwarden) listens on in `dir` for `port`.
pub fn socket_file(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// The longest path a Unix-domain socket may have on Linux (`sun_path` less its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Checks that a socket file's `path` fits in a socket address; the error says why not.
pub fn check_socket_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().len() <= SOCKET_PATH_MAX {
        return Ok(());
    }
    Err(format!(
        "the socket path {} is longer than the {SOCKET_PATH_MAX} bytes a Unix-domain socket's name may have",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_show_as_pgbouncer_shows_them() {
        let tcp = Address::Tcp("127.0.0.1:5000".parse().unwrap());
        assert_eq!((tcp.column(), tcp.port()), ("127.0.0.1".into(), 5000));
        assert_eq!(tcp.to_string(), "127.0.0.1:5000");
        let path = socket_file(Path::new("/run/postgresql"), 6432);
        let local = Address::Local {
            path: path.into(),
            port: 6432,
        };
        assert_eq!((local.column(), local.port()), ("unix".into(), 6432));
        assert_eq!(local.to_string(), "/run/postgresql/.s.PGSQL.6432");
        assert!(is_socket_dir("/run/postgresql"));
        assert!(!is_socket_dir("db1.internal"));
    }
}
