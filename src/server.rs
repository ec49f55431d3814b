//! One server connection: connect, startup, authenticate, run pgwarden's own
//! statements, check it is still alive, close.
//!
//! The pool owns server connections; a client borrows one for a transaction and
//! splices bytes through it (`client::splice`). What this type remembers between
//! borrows is what the next borrower needs: the cancel key, the settings last
//! applied to the session, its age, and any bytes the server sent while idle.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::{Authentication, Startup};
use pgwire::messages::terminate::Terminate;
use pgwire::messages::{DecodeContext, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::address::{Address, is_socket_dir, socket_file};
use crate::clock::Tick;
use crate::tls::{Endpoint, Stream, Tls};

use crate::auth::Credential;
use crate::auth::backend::BackendAuth;
use crate::client::expect::Expected;
use crate::client::statements::ServerStatements;
use crate::error::{ServerError, sqlstate};
use crate::keepalive::Keepalive;
use crate::params::ParamSet;
use crate::protocol::ServerNotice;
use crate::protocol::frame::{self, MAX_BUFFERED_LEN, ReadError, read_message};
use crate::protocol::messages::{cancel_request, frontend, parameter_status};

/// Where a server connection goes and as whom.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerTarget {
    /// backend name from the config
    pub backend: Arc<str>,
    /// host name or address, or the folder of its Unix-domain socket
    pub host: String,
    /// TCP port, or the port in the socket file's name
    pub port: u16,
    /// real database name
    pub dbname: String,
    /// user to log in as
    pub user: String,
}

/// What a CancelRequest for this connection must carry, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelKey {
    /// the server's address as connected
    pub addr: Address,
    /// backend process id
    pub pid: i32,
    /// backend secret
    pub secret: i32,
}

impl CancelKey {
    /// Sends a CancelRequest for this connection and waits until PostgreSQL has acted
    /// on it. The server closes a cancel connection only after signalling the backend,
    /// so once this returns `Ok` the cancel can no longer land on a later query.
    pub async fn send(self) -> std::io::Result<()> {
        match &self.addr {
            Address::Tcp(addr) => self.send_on(TcpStream::connect(addr).await?).await,
            Address::Local { path, .. } => self.send_on(UnixStream::connect(path).await?).await,
        }
    }

    async fn send_on<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
    ) -> std::io::Result<()> {
        stream
            .write_all(&cancel_request(self.pid, self.secret))
            .await?;
        let mut rest = [0u8; 64];
        while stream.read(&mut rest).await? > 0 {}
        Ok(())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An open, logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    /// the socket, plain or TLS
    pub stream: Stream,
    /// bytes read from the server and not yet passed on; kept between borrows
    pub inbuf: BytesMut,
    /// requests sent and not yet answered, in order
    pub expected: Expected,
    /// named statements prepared on this connection
    pub statements: ServerStatements,
    /// settings last applied to this session (`None`: server defaults)
    pub applied: Option<Arc<ParamSet>>,
    /// for cancel requests
    pub cancel_key: CancelKey,
    /// ParameterStatus values the server sent at login
    pub reported: Vec<(String, String)>,
    /// process-unique id for logs
    pub id: u64,
    /// pgwarden's end of the connection, and its TLS
    pub endpoint: Endpoint,
    created: Tick,
    idle_since: Tick,
}

impl ServerConn {
    /// Connects, logs in and waits for the first ReadyForQuery, all within `timeout`.
    pub async fn connect(
        target: &ServerTarget,
        credential: &Credential,
        tls: &Tls,
        timeout: Duration,
        keepalive: Keepalive,
    ) -> Result<ServerConn, ServerError> {
        tokio::time::timeout(timeout, Self::login(target, credential, tls, keepalive))
            .await
            .map_err(|_| ServerError::Timeout(timeout))?
    }

    async fn login(
        target: &ServerTarget,
        credential: &Credential,
        tls: &Tls,
        keepalive: Keepalive,
    ) -> Result<ServerConn, ServerError> {
        let (mut stream, addr) = Self::reach(target, tls, keepalive).await?;
        let mut startup = Startup::new();
        startup
            .parameters
            .insert("user".to_owned(), target.user.clone());
        startup
            .parameters
            .insert("database".to_owned(), target.dbname.clone());
        stream.write_all(&frontend(&startup)).await?;

        let mut auth = BackendAuth::new(credential);
        let mut inbuf = BytesMut::with_capacity(8192);
        let mut reported = Vec::new();
        let mut key = None;
        loop {
            let (tag, body) = read(&mut stream, &mut inbuf).await?;
            match tag {
                b'R' => {
                    let request = decode_auth(body)?;
                    if let Some(derive) = auth.derivation(&request) {
                        // Milliseconds of PBKDF2 (a second at the iteration cap), once
                        // per user and salt: not on a thread every session shares.
                        let _ = tokio::task::spawn_blocking(derive).await;
                    }
                    if let Some(reply) = auth.respond(request)? {
                        stream.write_all(&reply).await?;
                    }
                }
                b'S' => {
                    if let Some((name, value)) = parameter_status(&body) {
                        reported.push((name.to_owned(), value.to_owned()));
                    }
                }
                b'K' if body.len() == 8 => {
                    let mut b = &body[..];
                    key = Some((b.get_i32(), b.get_i32()));
                }
                b'E' => return Err(ServerError::Rejected(ServerNotice::parse(&body))),
                b'N' | b'v' => {}
                b'Z' => break,
                other => {
                    return Err(ServerError::Protocol(format!(
                        "unexpected message type '{}' during login",
                        char::from(other)
                    )));
                }
            }
        }
        let (pid, secret) =
            key.ok_or_else(|| ServerError::Protocol("no BackendKeyData at login".into()))?;
        let now = Tick::now();
        Ok(ServerConn {
            endpoint: stream.endpoint(),
            stream,
            inbuf,
            expected: Expected::default(),
            statements: ServerStatements::default(),
            applied: None,
            cancel_key: CancelKey { addr, pid, secret },
            reported,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            created: now,
            idle_since: now,
        })
    }

    /// Opens the socket: TCP (TLS as `[server_tls]` says), or the server's own
    /// Unix-domain socket when `host` is a folder, where libpq uses no TLS either.
    async fn reach(
        target: &ServerTarget,
        tls: &Tls,
        keepalive: Keepalive,
    ) -> Result<(Stream, Address), ServerError> {
        if is_socket_dir(&target.host) {
            let path: Arc<Path> = socket_file(Path::new(&target.host), target.port).into();
            let unix = UnixStream::connect(&path).await?;
            let addr = Address::Local {
                path,
                port: target.port,
            };
            return Ok((Stream::Local(unix), addr));
        }
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        keepalive.apply(&tcp)?;
        let addr = Address::Tcp(tcp.peer_addr()?);
        Ok((tls.connect(tcp, &target.host).await?, addr))
    }

    /// Runs one of pgwarden's own statements (settings, reset) and reads to ReadyForQuery.
    /// Returns the ParameterStatus reports it caused. A server error is returned after
    /// the connection is back at ReadyForQuery, so the connection stays usable.
    pub async fn execute(&mut self, sql: &str) -> Result<Vec<(String, String)>, ServerError> {
        self.run_exempt(sql).await.map(|(reports, _)| reports)
    }

    /// Runs one of pgwarden's own queries and returns its rows as text (NULL as "").
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<String>>, ServerError> {
        self.run_exempt(sql).await.map(|(_, rows)| rows)
    }

    /// Runs `sql` exempted from the session's statement_timeout. The exemption's own
    /// first statement still runs under it, and a client's `1ms` can cancel even that
    /// on a busy server: it changes nothing, so it is simply run again.
    async fn run_exempt(
        &mut self,
        sql: &str,
    ) -> Result<(Vec<(String, String)>, Vec<Vec<String>>), ServerError> {
        let sql = exempt(sql);
        let mut tries = 1;
        loop {
            match self.run(&sql).await {
                Err(ServerError::Rejected(n))
                    if n.code == sqlstate::QUERY_CANCELED && tries < 5 =>
                {
                    tries += 1;
                }
                done => return done,
            }
        }
    }

    /// Runs DISCARD ALL, which cannot share a query string with anything.
    pub async fn discard_all(&mut self) -> Result<(), ServerError> {
        self.run("DISCARD ALL").await.map(drop)
    }

    async fn run(
        &mut self,
        sql: &str,
    ) -> Result<(Vec<(String, String)>, Vec<Vec<String>>), ServerError> {
        self.stream
            .write_all(&frontend(&Query::new(sql.to_owned())))
            .await?;
        let mut reports = Vec::new();
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let (tag, body) = read(&mut self.stream, &mut self.inbuf).await?;
            match tag {
                b'S' => {
                    if let Some((name, value)) = parameter_status(&body) {
                        reports.push((name.to_owned(), value.to_owned()));
                    }
                }
                b'D' => rows.push(data_row(&body)?),
                b'E' => {
                    let notice = ServerNotice::parse(&body);
                    if notice.is_fatal() {
                        return Err(ServerError::Rejected(notice));
                    }
                    failure.get_or_insert(notice);
                }
                b'Z' => {
                    if body.first() != Some(&b'I') {
                        return Err(ServerError::Protocol(
                            "internal statement left a transaction open".into(),
                        ));
                    }
                    break;
                }
                _ => {}
            }
        }
        match failure {
            Some(notice) => Err(ServerError::Rejected(notice)),
            None => Ok((reports, rows)),
        }
    }

    /// Checks an idle connection before it is handed out: the server may have closed
    /// it, or sent something (a FATAL on termination, a ParameterStatus) while idle.
    pub fn check_idle(&mut self) -> Result<(), String> {
        loop {
            self.inbuf.reserve(1024);
            match self.stream.try_read_buf(&mut self.inbuf) {
                Ok(0) => return Err("closed by the server".into()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        while !self.inbuf.is_empty() {
            let (tag, len) = match frame::header(&self.inbuf, MAX_BUFFERED_LEN) {
                Some(Ok(h)) if self.inbuf.len() >= h.1 => h,
                Some(Err(e)) => return Err(e.to_string()),
                _ => return Err("partial message while idle".into()),
            };
            let frame = self.inbuf.split_to(len);
            match tag {
                // Asynchronous messages a session may receive at any time.
                b'S' | b'N' | b'A' => {}
                b'E' => return Err(ServerNotice::parse(&frame[5..]).message),
                other => {
                    return Err(format!(
                        "unexpected message type '{}' while idle",
                        char::from(other)
                    ));
                }
            }
        }
        Ok(())
    }

    /// When it connected.
    pub fn opened(&self) -> Tick {
        self.created
    }

    /// Time since it was last returned to the pool.
    pub fn idle_for(&self) -> Duration {
        self.idle_since.elapsed()
    }

    /// When it was last returned to the pool (when it connected, if never).
    pub fn idle_since(&self) -> Tick {
        self.idle_since
    }

    /// Marks the moment it goes back to the pool.
    pub fn mark_idle(&mut self, now: Tick) {
        self.idle_since = now;
    }

    /// Sends Terminate when the socket takes it without waiting, then closes.
    pub fn close(self) {
        let mut stream = self.stream;
        stream.write_now(&frontend(&Terminate::new()));
    }
}

/// pgwarden's own statements run in the session a client configured: a client's
/// `statement_timeout = '1ms'` must not cancel them. The exemption is local to the
/// implicit transaction of the query string; the session's own value stays
/// readable as `current_setting('pgwarden.statement_timeout')` (see
/// [`SESSION_TIMEOUT`]). The first statement returns one single-column row.
fn exempt(sql: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('pgwarden.statement_timeout', pg_catalog.current_setting('statement_timeout'), true); \
         SET LOCAL statement_timeout = 0; {sql}"
    )
}

/// The session's statement_timeout inside an exempted query string.
pub const SESSION_TIMEOUT: &str = "pg_catalog.current_setting('pgwarden.statement_timeout')";

async fn read(stream: &mut Stream, buf: &mut BytesMut) -> Result<(u8, BytesMut), ServerError> {
    read_message(stream, buf, MAX_BUFFERED_LEN)
        .await
        .map_err(|e| match e {
            ReadError::Io(e) => ServerError::Io(e),
            ReadError::Frame(e) => ServerError::Protocol(e.to_string()),
        })
}

/// The text values of a DataRow (NULL as an empty string).
fn data_row(mut body: &[u8]) -> Result<Vec<String>, ServerError> {
    let bad = || ServerError::Protocol("malformed DataRow".into());
    if body.len() < 2 {
        return Err(bad());
    }
    let count = body.get_i16();
    let mut values = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        if body.len() < 4 {
            return Err(bad());
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(String::new());
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(bad());
        }
        values.push(String::from_utf8_lossy(&body[..len]).into_owned());
        body.advance(len);
    }
    Ok(values)
}

fn decode_auth(mut body: BytesMut) -> Result<Authentication, ServerError> {
    // pgwire's decoder trusts the body to be long enough; check first so that a
    // broken server gets an error, not a panic.
    let needed = match body.get(..4) {
        Some([0, 0, 0, 5]) => 8,
        Some(_) => 4,
        None => usize::MAX,
    };
    if body.len() < needed {
        return Err(ServerError::Protocol(
            "truncated authentication request".into(),
        ));
    }
    let len = body.len() + 4;
    Authentication::decode_body(&mut body, len, &DecodeContext::default())
        .map_err(|e| ServerError::Protocol(format!("authentication request: {e}")))
}
