//! A connection that is plain TCP, TLS over TCP, or a local Unix-domain socket,
//! on either side of the proxy.
//!
//! The session and splice code is written once against [`Stream`]. A plain or
//! local stream keeps what the hot path relies on: a lock-free split into read and
//! write halves, and waiting for readability without a buffer (so an idle
//! client costs no read buffer). A TLS stream splits through tokio's generic
//! split, and is read without waiting for readability first, because rustls
//! may already hold decrypted bytes that the socket no longer signals.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio_rustls::TlsStream;
use tokio_rustls::rustls::{CipherSuite, ProtocolVersion};

/// The local end of a connection and what its TLS negotiated, as SHOW CLIENTS and
/// SHOW SERVERS report them. Small and `Copy`: a session hands it on with every
/// server connection it takes, without an allocation or a reference count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// the local address (none on a Unix-domain socket)
    pub local: Option<std::net::SocketAddr>,
    /// the TLS protocol version and cipher suite, when encrypted
    pub tls: Option<(ProtocolVersion, CipherSuite)>,
}

impl Endpoint {
    /// `TLSv1_3/TLS13_AES_256_GCM_SHA384`, or empty when not encrypted.
    pub fn tls_description(&self) -> String {
        self.tls
            .map(|(version, suite)| format!("{version:?}/{suite:?}"))
            .unwrap_or_default()
    }
}

/// Plain TCP, TLS, or a Unix-domain socket.
#[derive(Debug)]
pub enum Stream {
    /// no encryption
    Plain(TcpStream),
    /// TLS, client- or server-side
    Tls(Box<TlsStream<TcpStream>>),
    /// a local client on the Unix-domain socket (never encrypted, as in PostgreSQL)
    Local(UnixStream),
}

impl Stream {
    /// True when the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Where this end of the connection is, and what its TLS negotiated.
    pub fn endpoint(&self) -> Endpoint {
        let (local, tls) = match self {
            Stream::Plain(s) => (s.local_addr().ok(), None),
            Stream::Tls(s) => {
                let (version, suite) = match &**s {
                    TlsStream::Server(s) => {
                        let c = s.get_ref().1;
                        (c.protocol_version(), c.negotiated_cipher_suite())
                    }
                    TlsStream::Client(s) => {
                        let c = s.get_ref().1;
                        (c.protocol_version(), c.negotiated_cipher_suite())
                    }
                };
                let tls = version.zip(suite.map(|s| s.suite()));
                (s.get_ref().0.local_addr().ok(), tls)
            }
            Stream::Local(_) => (None, None),
        };
        Endpoint { local, tls }
    }

    /// The certificate a TLS client presented (and the handshake verified), in DER.
    pub fn client_certificate(&self) -> Option<&[u8]> {
        match self {
            Stream::Tls(s) => match &**s {
                TlsStream::Server(s) => s.get_ref().1.peer_certificates()?.first().map(|c| &c[..]),
                TlsStream::Client(_) => None,
            },
            _ => None,
        }
    }

    /// Ready when a read may find bytes. Plain and local sockets wait for
    /// readability; TLS is ready at once (see the module docs).
    pub fn poll_ready_to_read(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            // Polled readiness parks the waker in the socket's own slot, where
            // `readable()` would keep a waiter of its own in every idle session.
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::Local(s) => s.poll_read_ready(cx),
            Stream::Tls(_) => Poll::Ready(Ok(())),
        }
    }

    /// Reads what has arrived without waiting; `WouldBlock` when nothing has.
    pub fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read_buf(buf),
            Stream::Local(s) => s.try_read_buf(buf),
            Stream::Tls(s) => s
                .read_buf(buf)
                .now_or_never()
                .unwrap_or_else(|| Err(io::ErrorKind::WouldBlock.into())),
        }
    }

    /// Writes what the socket takes at once, without waiting (a farewell Terminate).
    pub fn write_now(&mut self, bytes: &[u8]) {
        match self {
            Stream::Plain(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Local(s) => {
                let _ = s.try_write(bytes);
            }
            Stream::Tls(s) => {
                let _ = async {
                    s.write_all(bytes).await?;
                    s.flush().await
                }
                .now_or_never();
            }
        }
    }

    /// Splits into halves that can be used at the same time.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Local(s) => {
                let (r, w) = s.split();
                (ReadHalf::Local(r), WriteHalf::Local(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

/// The reading half of a [`Stream`].
#[derive(Debug)]
pub enum ReadHalf<'a> {
    /// plain TCP
    Plain(tcp::ReadHalf<'a>),
    /// TLS
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
    /// Unix-domain socket
    Local(unix::ReadHalf<'a>),
}

/// The writing half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf<'a> {
    /// plain TCP
    Plain(tcp::WriteHalf<'a>),
    /// TLS
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
    /// Unix-domain socket
    Local(unix::WriteHalf<'a>),
}

/// Forwards a poll call to whichever variant is inside.
macro_rules! either {
    ($self:ident, $s:ident => $call:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => $call,
            Self::Tls($s) => $call,
            Self::Local($s) => $call,
        }
    };
}

impl AsRawFd for Stream {
    /// The socket, under TLS too.
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Plain(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.get_ref().0.as_raw_fd(),
            Stream::Local(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

/// Writes to a plain socket: first straight away, which is all a socket with room
/// needs (nearly every write), then through `poll_write`, which waits for room. The
/// attempt skips the readiness poll, its task-budget and waker bookkeeping, which
/// cost more than the write's own work on small messages.
fn poll_write_plain<W: AsyncWrite + Unpin>(
    socket: &mut W,
    try_write: impl FnOnce(&W) -> io::Result<usize>,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    match try_write(socket) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pin::new(socket).poll_write(cx, buf),
        written => Poll::Ready(written),
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => poll_write_plain(s, |s| s.try_write(buf), cx, buf),
            Stream::Local(s) => poll_write_plain(s, |s| s.try_write(buf), cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => poll_write_plain(s, |s| s.try_write(buf), cx, buf),
            WriteHalf::Local(s) => poll_write_plain(s, |s| s.try_write(buf), cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}
