//! `auth.query`: secrets of users that are not in the user list, looked up on
//! the primary (PgBouncer's auth_query).
//!
//! The query runs as `auth.user` over a kept-open connection per (backend,
//! database), so a login costs one round trip, not a connection. A secret found
//! is cached for `auth.cache_ttl`; after that the next login looks again, so a
//! changed or dropped password takes effect within the TTL. When the lookup
//! cannot run (no primary during a failover, primary unreachable) a cached
//! secret keeps serving logins, however old: a failover must not lock users
//! out. The cached credential is also what pool connections log in with
//! (a SCRAM verifier through the key recovered from the client's proof).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tracing::{debug, warn};

use super::userlist::{Credential, Secret};
use crate::config::BackendConfig;
use crate::health::probe::{Login, connect, describe};

/// The looked-up secrets and the connections that look them up.
#[derive(Debug, Default)]
pub struct AuthQuery {
    cache: Mutex<HashMap<String, Cached>>,
    sessions: Mutex<HashMap<(String, String), Arc<Client>>>,
}

#[derive(Debug)]
struct Cached {
    fetched: Instant,
    credential: Arc<Credential>,
}

/// Where and how to run one lookup.
pub struct Lookup<'a> {
    /// the primary
    pub backend: &'a BackendConfig,
    /// `auth.user` on `auth.dbname` (or the client's database)
    pub login: Login,
    /// `auth.query`
    pub query: &'a str,
}

impl AuthQuery {
    /// The last secret found for `user`, however old (for server logins).
    pub fn cached(&self, user: &str) -> Option<Arc<Credential>> {
        self.lock_cache().get(user).map(|c| c.credential.clone())
    }

    /// The credential a client logging in as `user` is checked against: the
    /// cached one while younger than `ttl`, else a fresh lookup (`None` when there
    /// is no primary to ask). `Ok(None)` means the user has no usable secret.
    pub async fn credential(
        &self,
        user: &str,
        ttl: Duration,
        lookup: Option<Lookup<'_>>,
    ) -> Result<Option<Arc<Credential>>, String> {
        if let Some(c) = self.lock_cache().get(user)
            && c.fetched.elapsed() < ttl
        {
            return Ok(Some(c.credential.clone()));
        }
        let found = match lookup {
            Some(lookup) => self.run(&lookup, user).await,
            None => Err("no primary to run auth.query on".to_owned()),
        };
        match found {
            Ok(Some(secret)) => {
                let mut cache = self.lock_cache();
                // The same secret keeps its credential, and with it a recovered SCRAM key.
                let credential = match cache.get(user) {
                    Some(c) if c.credential.secret == secret => c.credential.clone(),
                    _ => Arc::new(Credential::new(user.to_owned(), secret)),
                };
                cache.insert(
                    user.to_owned(),
                    Cached {
                        fetched: Instant::now(),
                        credential: credential.clone(),
                    },
                );
                Ok(Some(credential))
            }
            Ok(None) => {
                self.lock_cache().remove(user);
                Ok(None)
            }
            Err(e) => match self.cached(user) {
                Some(stale) => {
                    warn!(user, error = %e, "auth.query failed; using the secret found earlier");
                    Ok(Some(stale))
                }
                None => Err(e),
            },
        }
    }

    /// Runs the query once, on a fresh connection if the kept one has failed.
    async fn run(&self, lookup: &Lookup<'_>, user: &str) -> Result<Option<Secret>, String> {
        let key = (lookup.backend.name.clone(), lookup.login.dbname.clone());
        let mut last_error = String::new();
        for _ in 0..2 {
            let kept = self.lock_sessions().get(&key).cloned();
            let client = match kept {
                Some(c) if !c.is_closed() => c,
                _ => {
                    let c = Arc::new(connect(lookup.backend, &lookup.login).await?);
                    self.lock_sessions().insert(key.clone(), c.clone());
                    c
                }
            };
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&user];
            let query = client.query_opt(lookup.query, &params);
            match tokio::time::timeout(lookup.login.timeout, query).await {
                Ok(Ok(row)) => return secret_of(row, user),
                // A SQL error (bad query, permission) will not go away by retrying.
                Ok(Err(e)) if e.as_db_error().is_some() => return Err(describe(&e)),
                Ok(Err(e)) => last_error = describe(&e),
                Err(_) => last_error = format!("timed out after {:?}", lookup.login.timeout),
            }
            debug!(user, error = %last_error, "auth.query connection failed; reconnecting");
            self.lock_sessions().remove(&key);
        }
        Err(last_error)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Client>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The secret in the query's second column (`passwd`); none for no row or NULL.
fn secret_of(row: Option<tokio_postgres::Row>, user: &str) -> Result<Option<Secret>, String> {
    let Some(row) = row else {
        return Ok(None);
    };
    if row.len() < 2 {
        return Err("auth.query must return two columns: user name and secret".into());
    }
    let secret: Option<String> = row
        .try_get(1)
        .map_err(|e| format!("auth.query's second column is not text: {e}"))?;
    match secret.filter(|s| !s.is_empty()) {
        Some(s) => Secret::parse(&s)
            .map(Some)
            .map_err(|e| format!("secret of user \"{user}\": {e}")),
        None => Ok(None),
    }
}
