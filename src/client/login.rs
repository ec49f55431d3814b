//! A client's first seconds: startup packet, authentication, welcome.
//!
//! Everything here runs under `client_login_timeout`. The client's settings
//! (startup parameters and `-c` options) are checked by a server the first time
//! a pool sees them and remembered afterwards, so that a client with a bad
//! setting is refused at login, as PostgreSQL would refuse it, while the common
//! case costs no server round trip at all.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::address::Address;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::Session;
use super::statements::ClientStatements;
use crate::admin::{Console, Role};
use crate::auth;
use crate::auth::hba::{Method, Origin};
use crate::auth::query::Lookup;
use crate::auth::{Credential, Secret};
use crate::config::{AuthMethod, ClientTlsMode, Config};
use crate::error::{ClientError, sqlstate};
use crate::health::probe::Login as ProbeLogin;
use crate::params::{self, ParamSet};
use crate::protocol::ServerNotice;
use crate::protocol::messages::{
    put_auth, put_backend_key, put_negotiate_protocol, put_parameter_status, put_ready,
};
use crate::protocol::startup::{StartupError, StartupRequest, read_startup};
use crate::proxy::Shared;
use crate::registry::Identity;
use crate::tls::{Stream, Tls};

/// What a new connection turned out to be.
pub enum Login {
    /// A CancelRequest: forward it and close.
    Cancel {
        /// pid from the client's BackendKeyData
        pid: i32,
        /// secret from the client's BackendKeyData
        secret: i32,
    },
    /// An authenticated client, welcomed and ready for queries.
    Ready(Box<Session>),
    /// An operator on the admin console.
    Admin(Box<Console>),
}

/// Why a login ended early.
pub enum LoginError {
    /// The client left or the socket failed: nobody to tell.
    Gone,
    /// The client gets this error (as FATAL) before the connection closes.
    Refused(ClientError),
}

impl From<ClientError> for LoginError {
    fn from(e: ClientError) -> Self {
        LoginError::Refused(e)
    }
}

impl From<std::io::Error> for LoginError {
    fn from(_: std::io::Error) -> Self {
        LoginError::Gone
    }
}

/// How a login that did not finish ended.
pub enum Ended {
    /// The client left or the socket failed: nobody to tell.
    Gone,
    /// The client on `Stream` gets this error (as FATAL) before the connection closes.
    Refused(Stream, ClientError),
}

impl LoginError {
    fn on(self, stream: Stream) -> Ended {
        match self {
            LoginError::Gone => Ended::Gone,
            LoginError::Refused(e) => Ended::Refused(stream, e),
        }
    }
}

/// Reads the startup packet(s), authenticates, and welcomes the client.
pub async fn login(stream: Stream, peer: &Address, shared: &Arc<Shared>) -> Result<Login, Ended> {
    let tls = shared.tls.load_full();
    let (mut stream, first) = negotiate(stream, &tls).await?;
    let logged_in = match login_steps(&mut stream, first, peer, shared).await {
        Ok(Step::Cancel { pid, secret }) => return Ok(Login::Cancel { pid, secret }),
        Ok(Step::Admin { user, role }) => {
            return match Console::start(stream, peer.clone(), shared.clone(), user, role).await {
                Ok(console) => Ok(Login::Admin(Box::new(console))),
                Err(_) => Err(Ended::Gone),
            };
        }
        Ok(Step::Ready(logged_in)) => logged_in,
        Err(e) => return Err(e.on(stream)),
    };
    // On the heap from the start: the session's task then holds a pointer, not a copy.
    let mut session = Box::new(Session::new(stream, shared.clone(), *logged_in));
    match session.welcome().await {
        Ok(()) => Ok(Login::Ready(session)),
        Err(e) => Err(e.on(session.into_stream())),
    }
}

enum Step {
    Cancel { pid: i32, secret: i32 },
    Admin { user: String, role: Role },
    Ready(Box<super::LoggedIn>),
}

async fn login_steps(
    stream: &mut Stream,
    first: StartupRequest,
    peer: &Address,
    shared: &Arc<Shared>,
) -> Result<Step, LoginError> {
    let (minor, raw) = match first {
        StartupRequest::Cancel { pid, secret } => return Ok(Step::Cancel { pid, secret }),
        StartupRequest::Startup { minor, params } => (minor, params),
        StartupRequest::Ssl | StartupRequest::GssEnc => {
            return Err(ClientError::Protocol("expected a startup message".into()).into());
        }
    };
    let request = StartupParams::parse(raw)?;
    let mut out = BytesMut::new();
    if minor > 0 || !request.protocol_options.is_empty() {
        put_negotiate_protocol(&mut out, request.protocol_options.clone());
        stream.write_all(&out).await?;
        out.clear();
    }

    let config = shared.config.load_full();
    let origin = Origin::of(peer, stream.is_tls());
    let checked = match method_for(&config, origin, &request) {
        (Method::Reject, line) => {
            warn!(%peer, user = %request.user, db = %request.database, line, "login refused by auth.hba_file");
            return Err(ClientError::HbaRefused {
                line,
                host: origin.to_string(),
                user: request.user,
                database: request.database,
                tls: stream.is_tls(),
            }
            .into());
        }
        (Method::Peer, _) => auth::peer::check(stream, &request.user).await,
        (Method::Cert, _) => auth::cert::check(stream, &request.user),
        (Method::As(method), _) => {
            let credential = match shared.users.load().get(&request.user) {
                Some(c) => Some(c),
                None => looked_up(shared, &config, &request).await?,
            };
            auth::authenticate(stream, method, &request.user, credential).await
        }
    };
    if let Err(e) = checked {
        if matches!(
            e,
            ClientError::AuthFailed(_) | ClientError::PeerFailed(_) | ClientError::CertFailed(_)
        ) {
            warn!(%peer, user = %request.user, db = %request.database, "authentication failed");
        }
        return Err(e.into());
    }
    if config.is_admin_database(&request.database) {
        let g = &config.pgwarden;
        let role = if g.admin_users.contains(&request.user) {
            Role::Admin
        } else if g.stats_users.contains(&request.user) {
            Role::Stats
        } else {
            warn!(%peer, user = %request.user, "admin console refused: not in admin_users or stats_users");
            return Err(ClientError::NotAllowed(format!(
                "user \"{}\" may not use the admin console (pgwarden.admin_users, pgwarden.stats_users)",
                request.user
            ))
            .into());
        };
        put_auth(&mut out, pgwire::messages::startup::Authentication::Ok);
        stream.write_all(&out).await?;
        return Ok(Step::Admin {
            user: request.user,
            role,
        });
    }
    if config.database(&request.database).is_none() {
        return Err(ClientError::UnknownDatabase(request.database).into());
    }
    let admitted = shared
        .admissions
        .admit(&config.pgwarden, &request.user, &request.database)
        .inspect_err(
            |e| warn!(%peer, user = %request.user, db = %request.database, "refusing client: {e}"),
        )?;
    put_auth(&mut out, pgwire::messages::startup::Authentication::Ok);
    stream.write_all(&out).await?;
    let db = config.database(&request.database);
    // The client's settings start as its startup settings: one set, shared.
    let startup = shared.param_sets.intern(request.settings);
    let client = shared.clients.register(
        Identity {
            peer: peer.clone(),
            endpoint: stream.endpoint(),
            pair: shared.clients.pair(&request.database, &request.user),
            socket: Some(stream.as_raw_fd()),
        },
        startup.clone(),
    );
    Ok(Step::Ready(Box::new(super::LoggedIn {
        mode: db.as_ref().map_or(config.pool.mode, |d| d.pool_mode),
        target: db.map(|d| d.target).unwrap_or_default(),
        traffic: shared.metrics.traffic_of(&request.database),
        gate: shared.gate.counter(&request.database),
        registry: shared.statements.of(&request.database),
        startup: startup.clone(),
        params: startup,
        statements: ClientStatements::default(),
        client,
        route: None,
        _admitted: admitted.map(Box::new),
    })))
}

impl Session {
    /// Sends the ParameterStatus set, BackendKeyData and the first ReadyForQuery. The
    /// first client with settings a server has not seen yet has them checked by one
    /// (routed like a transaction); later logins need no server at all.
    async fn welcome(&mut self) -> Result<(), LoginError> {
        let logins = self
            .shared
            .pools
            .logins(self.who.database(), self.who.user());
        let welcome = match logins.welcome_for(&self.who.params) {
            Some(welcome) => welcome,
            None => {
                let attached = self.attach(crate::clock::Tick::now()).await?;
                self.who.client.serving(None);
                attached.conn.release();
                logins.accept(&self.who.params, &attached.reports)
            }
        };
        let mut out = BytesMut::new();
        for (name, value) in &welcome {
            put_parameter_status(&mut out, name, value);
        }
        put_backend_key(&mut out, self.who.client.pid(), self.who.client.secret());
        put_ready(&mut out, b'I');
        self.stream.write_all(&out).await?;
        info!(peer = %self.who.peer(), pid = self.who.client.pid(), db = %self.who.database(), user = %self.who.user(), mode = %self.who.mode, "client logged in");
        Ok(())
    }
}

/// Reads startup packets until a StartupMessage or CancelRequest, answering an
/// SSLRequest with TLS when `[tls]` allows it and refusing GSS encryption. Under
/// `tls.mode = "require"` a StartupMessage in the clear is refused (a CancelRequest
/// is not: libpq sends those in the clear).
/// Answers SSL and GSS requests on a freshly accepted `plain` (TCP or local) stream
/// until the startup packet; a local client is never encrypted nor asked to be, as
/// PostgreSQL treats its own Unix-domain socket.
async fn negotiate(mut plain: Stream, tls: &Tls) -> Result<(Stream, StartupRequest), Ended> {
    // A client may ask for SSL and then GSS (or the reverse) before starting.
    for _ in 0..3 {
        match read_startup(&mut plain).await {
            Ok(StartupRequest::Ssl) => {
                let tcp = match plain {
                    Stream::Plain(tcp) => tcp,
                    local => {
                        plain = local;
                        if plain.write_all(b"N").await.is_err() {
                            return Err(Ended::Gone);
                        }
                        continue;
                    }
                };
                let mut stream = match tls.accept(tcp).await {
                    Ok(Stream::Plain(tcp)) => {
                        plain = Stream::Plain(tcp);
                        continue;
                    }
                    Ok(stream) => stream,
                    Err(e) => {
                        debug!(error = %e, "TLS handshake with a client failed");
                        return Err(Ended::Gone);
                    }
                };
                return match read_startup(&mut stream).await {
                    Ok(StartupRequest::Ssl | StartupRequest::GssEnc) => {
                        let e = ClientError::Protocol("SSL or GSS request inside TLS".into());
                        Err(Ended::Refused(stream, e))
                    }
                    Ok(request) => Ok((stream, request)),
                    Err(StartupError::Io(_)) => Err(Ended::Gone),
                    Err(StartupError::Invalid(e)) => Err(Ended::Refused(stream, e)),
                };
            }
            Ok(StartupRequest::GssEnc) => {
                if plain.write_all(b"N").await.is_err() {
                    return Err(Ended::Gone);
                }
            }
            Ok(StartupRequest::Startup { .. })
                if tls.client_mode == ClientTlsMode::Require
                    && !matches!(plain, Stream::Local(_)) =>
            {
                return Err(Ended::Refused(plain, ClientError::TlsRequired));
            }
            Ok(request) => return Ok((plain, request)),
            Err(StartupError::Io(_)) => return Err(Ended::Gone),
            Err(StartupError::Invalid(e)) => return Err(Ended::Refused(plain, e)),
        }
    }
    let e = ClientError::Protocol("too many SSL/GSS negotiation requests".into());
    Err(Ended::Refused(plain, e))
}

/// How a login is checked: by `auth.type`, or by the first `auth.hba_file` line that
/// matches it (with the line's number); no matching line rejects it.
fn method_for(config: &Config, origin: Origin, request: &StartupParams) -> (Method, Option<usize>) {
    let Some(hba) = &config.auth.hba else {
        let method = match config.auth.method {
            AuthMethod::Cert => Method::Cert,
            other => Method::As(other),
        };
        return (method, None);
    };
    match hba.rule_for(origin, &request.database, &request.user) {
        Some(rule) => (rule.method, Some(rule.line)),
        None => (Method::Reject, None),
    }
}

/// The secret `auth.query` finds for a user missing from the user list, if it is
/// configured. It runs on the primary as `auth.user`, in `auth.dbname` or else the
/// client's database.
async fn looked_up(
    shared: &Shared,
    config: &Config,
    request: &StartupParams,
) -> Result<Option<Arc<Credential>>, ClientError> {
    let auth = &config.auth;
    if auth.query.is_empty() {
        return Ok(None);
    }
    let dbname = match (auth.dbname.as_str(), config.database(&request.database)) {
        ("", Some(db)) => db.dbname,
        ("", None) => return Ok(None),
        (name, _) => name.to_owned(),
    };
    let password = match shared
        .users
        .load()
        .get(&auth.user)
        .map(|c| c.secret.clone())
    {
        Some(Secret::Plain(p)) => p,
        _ => {
            return Err(ClientError::AuthLookup {
                user: request.user.clone(),
                reason: format!(
                    "auth.user \"{}\" has no plain password in the user list",
                    auth.user
                ),
            });
        }
    };
    // Without a primary, a secret found earlier serves at once; else wait for one.
    let primary = match shared.routing.load().primary() {
        Some(p) => Some(p.config.clone()),
        None if shared.auth_query.cached(&request.user).is_some() => None,
        None => {
            let wait = config.failover.client_wait_timeout;
            shared.routing.await_primary(wait).await
        }
    };
    let lookup = primary.as_ref().map(|backend| Lookup {
        backend,
        login: ProbeLogin {
            user: auth.user.clone(),
            password,
            dbname,
            timeout: config.pool.server_connect_timeout,
            tls: shared.tls.load_full(),
        },
        query: &auth.query,
    });
    shared
        .auth_query
        .credential(&request.user, auth.cache_ttl, lookup)
        .await
        .map_err(|reason| {
            warn!(user = %request.user, %reason, "auth.query failed");
            ClientError::AuthLookup {
                user: request.user.clone(),
                reason,
            }
        })
}

/// The parts of a StartupMessage pgwarden acts on.
struct StartupParams {
    user: String,
    database: String,
    settings: ParamSet,
    protocol_options: Vec<String>,
}

impl StartupParams {
    fn parse(raw: Vec<(String, String)>) -> Result<StartupParams, ClientError> {
        let get = |name: &str| raw.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let user = get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
            ClientError::Server(ServerNotice::new(
                "FATAL",
                sqlstate::INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            ))
        })?;
        if let Some(r) = get("replication")
            && !matches!(r.as_str(), "false" | "off" | "no" | "0")
        {
            return Err(ClientError::Unsupported(
                "replication connections are not supported through pgwarden; connect to the server directly".into(),
            ));
        }
        let database = get("database")
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        let options = match get("options") {
            Some(o) => params::parse_options(&o).map_err(ClientError::BadParameter)?,
            None => Vec::new(),
        };
        let mut pairs = Vec::new();
        let mut protocol_options = Vec::new();
        for (name, value) in raw.iter().chain(options.iter()) {
            if name.starts_with("_pq_.") {
                protocol_options.push(name.clone());
            } else if params::is_setting(name) {
                if !params::is_valid_name(name) {
                    return Err(ClientError::BadParameter(format!(
                        "invalid startup parameter name \"{name}\""
                    )));
                }
                pairs.push((name.as_str(), value.as_str()));
            }
        }
        Ok(StartupParams {
            user,
            database,
            settings: ParamSet::from_pairs(pairs),
            protocol_options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<StartupParams, ClientError> {
        StartupParams::parse(
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn startup_parameters_become_settings() {
        let p = parse(&[
            ("user", "app"),
            ("application_name", "psql"),
            ("options", "-c search_path=s1"),
            ("_pq_.compression", "on"),
        ])
        .unwrap();
        assert_eq!(p.database, "app");
        assert_eq!(p.settings.get("application_name"), Some("psql"));
        assert_eq!(p.settings.get("search_path"), Some("s1"));
        assert_eq!(p.protocol_options, vec!["_pq_.compression".to_owned()]);
    }

    #[test]
    fn refuses_what_pgwarden_cannot_serve() {
        assert!(parse(&[("database", "x")]).is_err());
        assert!(matches!(
            parse(&[("user", "u"), ("replication", "database")]),
            Err(ClientError::Unsupported(_))
        ));
        assert!(parse(&[("user", "u"), ("replication", "false")]).is_ok());
        assert!(matches!(
            parse(&[("user", "u"), ("bad name", "1")]),
            Err(ClientError::BadParameter(_))
        ));
        assert!(matches!(
            parse(&[("user", "u"), ("options", "-x")]),
            Err(ClientError::BadParameter(_))
        ));
    }
}
