//! Where clients connect: the TCP port and, beside it, a Unix-domain socket.
//!
//! Local applications reach PostgreSQL (and PgBouncer) through a socket file named
//! `.s.PGSQL.<port>` in a folder libpq knows (`host=/var/run/postgresql`, or no
//! host at all with Debian's libpq), so a drop-in pooler offers one too. A socket
//! file outlives a process that is killed; at start-up a file nobody answers on
//! is replaced, one somebody answers on is refused (another pooler runs there),
//! unless `so_reuseport` asks to share: then the new process takes the name over.
//!
//! Sharing is how a rolling restart works: a new pgwarden listens beside the old
//! one (SO_REUSEPORT on the TCP port, a renamed-over socket file), and the old one
//! stops listening and serves its clients until they leave. A listener that
//! closes resets the connections still queued on it, so [`ClientListeners::close`]
//! accepts those first.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use socket2::{SockAddr, SockRef, Socket};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
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

    /// Stops listening, and returns the connections the kernel had queued already.
    pub fn close(self) -> Vec<(Stream, Address)> {
        let mut queued: Vec<(Stream, Address)> = waiting(&self.tcp)
            .filter_map(|(socket, addr)| {
                let stream = TcpStream::from_std(socket.into()).ok()?;
                Some((Stream::Plain(stream), Address::Tcp(addr.as_socket()?)))
            })
            .collect();
        if let Some(local) = &self.local {
            queued.extend(waiting(&local.listener).filter_map(|(socket, _)| {
                let stream = UnixStream::from_std(socket.into()).ok()?;
                let peer = Address::Local {
                    path: local.path.clone(),
                    port: local.port,
                };
                Some((Stream::Local(stream), peer))
            }));
        }
        queued
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

/// The connections queued on a listening socket, accepted without waiting.
fn waiting(listener: &impl AsFd) -> impl Iterator<Item = (Socket, SockAddr)> + '_ {
    std::iter::from_fn(move || {
        let (socket, addr) = SockRef::from(listener).accept().ok()?;
        // Accepted sockets do not inherit the listener's O_NONBLOCK, and tokio needs it.
        socket.set_nonblocking(true).ok()?;
        Some((socket, addr))
    })
}

/// A listening Unix-domain socket whose file is removed when it closes, unless
/// another process has taken the name over by then.
#[derive(Debug)]
pub struct LocalSocket {
    listener: UnixListener,
    path: Arc<Path>,
    port: u16,
    /// device and inode of the socket file this listener made
    file: (u64, u64),
}

impl LocalSocket {
    /// Listens on `path` (named for `port`) with permissions `mode`, replacing a
    /// socket file that a dead process left behind, and with `share` one that a
    /// live process listens on (it keeps serving the clients it has).
    pub fn bind(path: &Path, port: u16, mode: u32, share: bool) -> io::Result<LocalSocket> {
        let failed = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        };
        clear_stale(path, share).map_err(failed)?;
        // Made under a private name and renamed into place, the file appears at
        // once with its permissions, and replaces a live one without a gap.
        // (No longer than `.s.PGSQL.<port>`, so within the length a socket name may have.)
        let private = path.with_file_name(format!(".pgw.{}", std::process::id()));
        let _ = std::fs::remove_file(&private);
        let listener = UnixListener::bind(&private).map_err(failed)?;
        let made = std::fs::set_permissions(&private, std::fs::Permissions::from_mode(mode))
            .and_then(|()| std::fs::metadata(&private))
            .and_then(|meta| std::fs::rename(&private, path).map(|()| meta));
        let meta = made.map_err(|e| {
            let _ = std::fs::remove_file(&private);
            failed(e)
        })?;
        info!(path = %path.display(), "listening on a Unix-domain socket");
        Ok(LocalSocket {
            listener,
            path: path.into(),
            port,
            file: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes a socket file nobody listens on; refuses any other file, and a live
/// socket unless it is to be shared.
fn clear_stale(path: &Path, share: bool) -> io::Result<()> {
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
        Ok(_) if share => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on it (so_reuseport = true shares it)",
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_socket_left_by_a_dead_process_is_replaced_and_a_live_one_refused() {
        let dir = crate::scratch_dir("listener");
        let path = dir.join(".s.PGSQL.6432");
        // A bound and closed std listener leaves its file, as a killed process does.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let socket = LocalSocket::bind(&path, 6432, 0o777, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777);
        let e = LocalSocket::bind(&path, 6432, 0o777, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains(".s.PGSQL.6432"), "{e}");
        drop(socket);
        assert!(!path.exists(), "the file goes with the listener");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_shared_name_moves_to_the_new_listener_and_outlives_the_old_one() {
        let dir = crate::scratch_dir("listener");
        let path = dir.join(".s.PGSQL.6432");
        let old = LocalSocket::bind(&path, 6432, 0o777, false).unwrap();
        let new = LocalSocket::bind(&path, 6432, 0o770, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o770);
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), new.listener.accept()).await;
        assert!(
            matches!(accepted, Ok(Ok(_))),
            "the new listener has the name"
        );
        drop(old);
        assert!(path.exists(), "the old listener leaves the new one's file");
        drop(new);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn closing_hands_over_the_connections_already_queued() {
        let dir = crate::scratch_dir("listener");
        let path = dir.join(".s.PGSQL.6432");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let local = LocalSocket::bind(&path, 6432, 0o777, false).unwrap();
        let listeners = ClientListeners::new(tcp, Some(local));
        let mut tcp_clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut local_clients: Vec<_> = (0..2)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).unwrap())
            .collect();
        let queued = listeners.close();
        assert_eq!(queued.len(), 5);
        assert!(!path.exists(), "the socket file goes with the listener");
        for (mut stream, _) in queued {
            stream.write_all(b"S").await.unwrap();
        }
        for client in &mut tcp_clients {
            let mut byte = [0; 1];
            client.read_exact(&mut byte).unwrap();
        }
        for client in &mut local_clients {
            let mut byte = [0; 1];
            client.read_exact(&mut byte).unwrap();
        }
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "no longer listening"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_left_alone() {
        let dir = crate::scratch_dir("listener");
        let path = dir.join(".s.PGSQL.6432");
        std::fs::write(&path, "data").unwrap();
        let e = LocalSocket::bind(&path, 6432, 0o777, false).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
