//! Where clients connect: the TCP port and, beside it, a Unix-domain socket.
//!
//! Local applications reach PostgreSQL (and PgBouncer) through a socket file named
//! `.s.PGSQL.<port>` in a folder libpq knows (`host=/var/run/postgresql`, or no
//! host at all with Debian's libpq), so a drop-in pooler offers one too. A socket
//! file outlives a process that is killed; at start-up a file nobody answers on
//! is replaced, one somebody answers on is refused (another pooler runs there).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tracing::info;

use crate::address::Address;
use crate::tls::Stream;

/// The listening sockets for PostgreSQL clients.
#[derive(Debug)]
pub struct ClientListeners {
    tcp: TcpListener,
    local: Option<LocalSocket>,
}

impl ClientListeners {
    /// The TCP listener, and the local socket when configured.
    pub fn new(tcp: TcpListener, local: Option<LocalSocket>) -> Self {
        ClientListeners { tcp, local }
    }

    /// The TCP listener's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next client, from whichever socket has one.
    pub async fn accept(&self) -> io::Result<(Stream, Address)> {
        let tcp = async {
            let (stream, addr) = self.tcp.accept().await?;
            Ok((Stream::Plain(stream), Address::Tcp(addr)))
        };
        match &self.local {
            None => tcp.await,
            Some(local) => tokio::select! {
                r = tcp => r,
                r = local.listener.accept() => {
                    let (stream, _) = r?;
                    let peer = Address::Local { path: local.path.clone(), port: local.port };
                    Ok((Stream::Local(stream), peer))
                }
            },
        }
    }
}

/// A listening Unix-domain socket whose file is removed when it closes.
#[derive(Debug)]
pub struct LocalSocket {
    listener: UnixListener,
    path: Arc<Path>,
    port: u16,
}

impl LocalSocket {
    /// Listens on `path` (named for `port`) with permissions `mode`, replacing a
    /// socket file that a dead process left behind.
    pub fn bind(path: &Path, port: u16, mode: u32) -> io::Result<LocalSocket> {
        let failed = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        };
        clear_stale(path).map_err(failed)?;
        let listener = UnixListener::bind(path).map_err(failed)?;
        let socket = LocalSocket {
            listener,
            path: path.into(),
            port,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
        info!(path = %path.display(), "listening on a Unix-domain socket");
        Ok(socket)
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a socket file nobody listens on; refuses a live socket and any other file.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on it",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_left_by_a_dead_process_is_replaced_and_a_live_one_refused() {
        let dir = crate::scratch_dir("listener");
        let path = dir.join(".s.PGSQL.6432");
        // A bound and closed std listener leaves its file, as a killed process does.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let socket = LocalSocket::bind(&path, 6432, 0o777).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777);
        let e = LocalSocket::bind(&path, 6432, 0o777).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains(".s.PGSQL.6432"), "{e}");
        drop(socket);
        assert!(!path.exists(), "the file goes with the listener");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = crate::scratch_dir("listener");
        let path = dir.join(".s.PGSQL.6432");
        std::fs::write(&path, "data").unwrap();
        let e = LocalSocket::bind(&path, 6432, 0o777).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
