//! Errors that reach a client, and the one place where they become SQLSTATEs.
//!
//! Every failure a client can observe is a [`ClientError`]. Its variant decides the
//! SQLSTATE and the message; [`ClientError::to_response`] renders it as the
//! ErrorResponse the client reads. Keeping the mapping here means the same cause
//! always produces the same code, whichever part of pgwarden detected it.

use std::io;
use std::time::Duration;

use crate::protocol::ServerNotice;
use crate::protocol::frame::FrameError;
use crate::registry::WaitEnd;

/// SQLSTATE codes pgwarden itself emits.
pub mod sqlstate {
    /// invalid_password
    pub const INVALID_PASSWORD: &str = "28P01";
    /// query_canceled (a cancel request or statement_timeout)
    pub const QUERY_CANCELED: &str = "57014";
    /// invalid_authorization_specification
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// invalid_catalog_name (unknown database)
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// too_many_connections
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// sqlclient_unable_to_establish_sqlconnection
    pub const CANNOT_CONNECT: &str = "08001";
    /// connection_failure
    pub const CONNECTION_FAILURE: &str = "08006";
    /// protocol_violation
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// feature_not_supported
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// admin_shutdown
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// cannot_connect_now
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// in_failed_sql_transaction
    pub const IN_FAILED_TRANSACTION: &str = "25P02";
    /// invalid_parameter_value
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    /// insufficient_privilege
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// syntax_error
    pub const SYNTAX_ERROR: &str = "42601";
    /// object_not_in_prerequisite_state
    pub const NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// idle_in_transaction_session_timeout
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    /// idle_session_timeout
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
    /// program_limit_exceeded
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
}

/// Why a server connection could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TCP connect, or the socket failed during login or use.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server did not answer within the configured bound.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The server rejected us (login failure, bad startup parameter, …).
    #[error("{}", .0.message)]
    Rejected(ServerNotice),
    /// The server sent something the protocol does not allow at that point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The user list holds no secret pgwarden can log in to the server with.
    #[error("{0}")]
    Credentials(String),
    /// TLS to the server was required and failed (refused, handshake, certificate).
    #[error("TLS: {0}")]
    Tls(String),
}

/// Every failure a client can be told about.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Wrong password or unknown user: one message for both, so that user names cannot be probed.
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    /// `auth.hba_file` has no line for the login (`line` is `None`), or its line says reject.
    #[error(
        "{} for host \"{host}\", user \"{user}\", database \"{database}\", {}",
        if .line.is_some() { "auth.hba_file rejects connection" } else { "no auth.hba_file entry" },
        if *.tls { "SSL encryption" } else { "no encryption" }
    )]
    HbaRefused {
        /// the line that rejected it
        line: Option<usize>,
        /// the client's address, or `[local]`
        host: String,
        /// the user it asked for
        user: String,
        /// the database it asked for
        database: String,
        /// whether the connection is encrypted
        tls: bool,
    },
    /// A TLS client presented no certificate, or one that names another user.
    #[error("certificate authentication failed for user \"{0}\"")]
    CertFailed(String),
    /// A local client's operating-system user is not the user it asked to be.
    #[error("peer authentication failed for user \"{0}\"")]
    PeerFailed(String),
    /// The client asked for a database pgwarden has no `[databases]` entry for.
    #[error("database \"{0}\" is not configured in pgwarden")]
    UnknownDatabase(String),
    /// `max_client_conn` reached.
    #[error("no more connections allowed (max_client_conn = {0})")]
    TooManyClients(usize),
    /// No server connection became free within `query_wait_timeout`.
    #[error(
        "query_wait_timeout: no server connection for database \"{database}\" within {timeout:?}"
    )]
    PoolTimeout {
        /// client-facing database name
        database: String,
        /// the bound that expired
        timeout: Duration,
    },
    /// pgwarden could not open a server connection.
    #[error("could not connect to backend {backend}: {source}")]
    ServerConnect {
        /// backend name from the configuration
        backend: String,
        /// what went wrong
        source: ServerError,
    },
    /// The server connection died while this client was using it.
    #[error("connection to backend {backend} lost during the transaction: {reason}")]
    ServerLost {
        /// backend name from the configuration
        backend: String,
        /// what was observed
        reason: String,
    },
    /// No backend to route to within `failover.client_wait_timeout`.
    #[error(
        "no {what} available for database \"{database}\" within {waited:?} (failover in progress?)"
    )]
    Unavailable {
        /// client-facing database name
        database: String,
        /// "primary", "standby", …
        what: &'static str,
        /// how long the request waited
        waited: Duration,
    },
    /// An error the server reported that must reach the client unchanged.
    #[error("{}", .0.message)]
    Server(ServerNotice),
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client sent a message longer than `pool.max_message_size`. The connection
    /// is closed: the rest of the stream cannot be read without reading past it.
    #[error(
        "message of type '{tag}' is {len} bytes, over pool.max_message_size ({max} bytes); closing the connection",
        tag = char::from(*.tag)
    )]
    MessageTooLarge {
        /// type byte
        tag: u8,
        /// its length field
        len: usize,
        /// the limit
        max: usize,
    },
    /// The client asked for something pgwarden does not do.
    #[error("{0}")]
    Unsupported(String),
    /// A startup parameter pgwarden refuses before asking any server.
    #[error("{0}")]
    BadParameter(String),
    /// pgwarden is stopping.
    #[error("pgwarden is shutting down")]
    Shutdown,
    /// An operator ran KILL on the client's database.
    #[error("terminated by the admin console (KILL)")]
    Killed,
    /// The user may not use the admin console (or this command).
    #[error("{0}")]
    NotAllowed(String),
    /// The admin console closed the database to new clients (DISABLE).
    #[error("database \"{0}\" is not currently accepting connections")]
    Disabled(String),
    /// `max_user_client_conn` or `max_db_client_conn` reached.
    #[error("too many connections for {what} (pgwarden.{key} = {max})")]
    LimitReached {
        /// the configuration key of the limit
        key: &'static str,
        /// `user "…"` or `database "…"`
        what: String,
        /// the limit
        max: usize,
    },
    /// `auth.query` could not run and no secret was found earlier.
    #[error("cannot look up user \"{user}\" with auth.query: {reason}")]
    AuthLookup {
        /// the user logging in
        user: String,
        /// why the lookup failed
        reason: String,
    },
    /// `tls.mode = "require"` and the client did not ask for TLS.
    #[error("pgwarden requires TLS: connect with sslmode=require (or verify-ca, verify-full)")]
    TlsRequired,
    /// The client kept a transaction open and sent nothing for `idle_transaction_timeout`.
    #[error(
        "terminating connection due to idle-in-transaction timeout (pool.idle_transaction_timeout = {0:?})"
    )]
    IdleInTransaction(std::time::Duration),
    /// The client sent nothing between transactions for `client_idle_timeout`.
    #[error(
        "terminating connection due to idle-session timeout (pool.client_idle_timeout = {0:?})"
    )]
    IdleSession(std::time::Duration),
    /// pgwarden cancelled a request the server had not answered within `query_timeout`;
    /// the server confirmed the cancel, so the client and the server connection stay.
    #[error("canceling statement due to query_timeout (pool.query_timeout = {0:?})")]
    QueryTimeout(std::time::Duration),
    /// The client's CancelRequest ended its request's wait for a server connection:
    /// the request never reached a server.
    #[error("canceling statement due to user request (it was waiting for a server connection)")]
    Canceled,
    /// The client closed its connection while its request waited for a server
    /// connection: the request never reached a server, and no one is left to tell.
    #[error("the client closed its connection while waiting for a server connection")]
    Left,
    /// A statement sent after the transaction was lost and before the client ended it.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    TransactionAborted,
}

/// A client's frame header that cannot be accepted. Only the client's direction is
/// bounded by `pool.max_message_size`, so an over-long frame from a client is that limit.
impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLong { tag, len, max } => ClientError::MessageTooLarge { tag, len, max },
            FrameError::BadLength { .. } => ClientError::Protocol(e.to_string()),
        }
    }
}

impl From<WaitEnd> for ClientError {
    /// Why a wait without a bound of its own ended: a deadline passed only where the
    /// waiter set one, which maps it to its own error first.
    fn from(end: WaitEnd) -> Self {
        match end {
            WaitEnd::Canceled => ClientError::Canceled,
            WaitEnd::Left => ClientError::Left,
            WaitEnd::Killed | WaitEnd::Overdue => ClientError::Killed,
        }
    }
}

impl ServerError {
    /// True for failures that a failover or a restart can cure: the server is
    /// unreachable, or says it is starting or stopping.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Io(_) | ServerError::Timeout(_) => true,
            ServerError::Rejected(n) => matches!(n.code.as_str(), "57P01" | "57P02" | "57P03"),
            ServerError::Protocol(_) | ServerError::Credentials(_) | ServerError::Tls(_) => false,
        }
    }
}

impl ClientError {
    /// The SQLSTATE a client sees for this error.
    pub fn sqlstate(&self) -> &str {
        use sqlstate::*;
        match self {
            ClientError::AuthFailed(_) => INVALID_PASSWORD,
            ClientError::UnknownDatabase(_) => INVALID_CATALOG_NAME,
            ClientError::TooManyClients(_)
            | ClientError::LimitReached { .. }
            | ClientError::PoolTimeout { .. } => TOO_MANY_CONNECTIONS,
            ClientError::ServerConnect { source, .. } => match source {
                ServerError::Rejected(notice) => &notice.code,
                ServerError::Credentials(_) => INVALID_AUTHORIZATION,
                _ => CANNOT_CONNECT,
            },
            ClientError::ServerLost { .. } | ClientError::Left => CONNECTION_FAILURE,
            ClientError::Unavailable { .. } => CANNOT_CONNECT_NOW,
            ClientError::Server(notice) => &notice.code,
            ClientError::Protocol(_) => PROTOCOL_VIOLATION,
            // A configured limit, not malformed input: 54000 as PostgreSQL uses for its
            // own size limits, and the message names the key to raise.
            ClientError::MessageTooLarge { .. } => PROGRAM_LIMIT_EXCEEDED,
            ClientError::Unsupported(_) => FEATURE_NOT_SUPPORTED,
            ClientError::BadParameter(_) => INVALID_PARAMETER_VALUE,
            ClientError::Shutdown | ClientError::Killed => ADMIN_SHUTDOWN,
            ClientError::NotAllowed(_) => INSUFFICIENT_PRIVILEGE,
            ClientError::TlsRequired
            | ClientError::HbaRefused { .. }
            | ClientError::PeerFailed(_)
            | ClientError::CertFailed(_) => INVALID_AUTHORIZATION,
            ClientError::AuthLookup { .. } => CANNOT_CONNECT,
            ClientError::Disabled(_) => NOT_IN_PREREQUISITE_STATE,
            ClientError::TransactionAborted => IN_FAILED_TRANSACTION,
            ClientError::QueryTimeout(_) | ClientError::Canceled => QUERY_CANCELED,
            ClientError::IdleInTransaction(_) => IDLE_IN_TRANSACTION_TIMEOUT,
            ClientError::IdleSession(_) => IDLE_SESSION_TIMEOUT,
        }
    }

    /// A short label for the login-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            ClientError::AuthFailed(_) => "password",
            ClientError::UnknownDatabase(_) => "database",
            ClientError::TooManyClients(_) => "max_client_conn",
            ClientError::LimitReached { key, .. } => key,
            ClientError::IdleInTransaction(_) => "idle_transaction_timeout",
            ClientError::NotAllowed(_) => "not_allowed",
            ClientError::TlsRequired => "tls",
            ClientError::HbaRefused { .. } => "hba",
            ClientError::Disabled(_) => "disabled",
            ClientError::PeerFailed(_) => "peer",
            ClientError::CertFailed(_) => "cert",
            ClientError::AuthLookup { .. } => "auth_query",
            ClientError::Protocol(_)
            | ClientError::MessageTooLarge { .. }
            | ClientError::Unsupported(_) => "protocol",
            ClientError::BadParameter(_) | ClientError::Server(_) => "parameter",
            _ => "server",
        }
    }

    /// The notice a client receives, with severity `FATAL` when pgwarden closes the connection after it.
    pub fn to_notice(&self, fatal: bool) -> ServerNotice {
        let severity = if fatal { "FATAL" } else { "ERROR" };
        match self {
            // Keep the server's own detail and hint, but never let a server FATAL end a
            // client connection that pgwarden keeps open.
            ClientError::Server(notice) => ServerNotice {
                severity: severity.to_owned(),
                ..notice.clone()
            },
            _ => ServerNotice::new(severity, self.sqlstate(), self.to_string()),
        }
    }
}
