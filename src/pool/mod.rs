//! Server connection pools: one per (client-facing database, backend, user).
//!
//! [`Pools`] finds or creates the pool for a key, applies reloaded settings,
//! retires pools whose database or backend went away, and reaps idle
//! connections. It also holds the caps ([`caps`]) that bound several pools
//! together. Clients look a pool up once per change of routing and then keep the
//! `Arc`, so the registry's lock is off the per-transaction path.

mod caps;
mod gate;
mod logins;
mod server_pool;
mod slots;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use caps::{Cap, Caps};
pub use gate::{Admission, Gate, Paused};
pub use logins::Logins;
pub use server_pool::{CheckoutError, PoolSettings, PooledConn, ServerPool, unless_ended};

use crate::auth::Secrets;
use crate::backend::{BackendTable, Routing};
use crate::config::{BackendConfig, Config};
use crate::keepalive::Keepalive;
use crate::registry::ClientRegistry;
use crate::server::ServerTarget;
use crate::tls::Tls;

/// Identifies a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// the database name clients use
    pub database: String,
    /// where and as whom the server connections go
    pub target: ServerTarget,
}

impl PoolKey {
    /// The pool key for `user` on `database` through `backend`, if the database is configured.
    pub fn new(
        config: &Config,
        database: &str,
        user: &str,
        backend: &BackendConfig,
    ) -> Option<PoolKey> {
        let db = config.database(database)?;
        Some(PoolKey {
            database: database.to_owned(),
            target: ServerTarget {
                backend: backend.name.as_str().into(),
                host: backend.host.clone(),
                port: backend.port,
                dbname: db.dbname,
                user: user.to_owned(),
            },
        })
    }
}

/// Which cap: `max_db_connections` of a client-facing database, or
/// `max_user_connections` of a user, on one backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CapKey {
    Database(String, Arc<str>),
    User(String, Arc<str>),
}

impl CapKey {
    /// The limit `config` sets for it (0: none).
    fn limit(&self, config: &Config) -> usize {
        let limit = match self {
            CapKey::Database(database, _) => config
                .database(database)
                .map_or(0, |d| d.max_db_connections),
            CapKey::User(..) => config.pool.max_user_connections,
        };
        limit as usize
    }
}

/// Every pool of the process.
#[derive(Debug)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<ServerPool>>>,
    caps: Mutex<HashMap<CapKey, Arc<Cap>>>,
    logins: Mutex<HashMap<(String, String), Arc<Logins>>>,
    secrets: Secrets,
    tls: Arc<ArcSwap<Tls>>,
    /// told which pools were retired, to end the transactions running on them
    clients: Arc<ClientRegistry>,
}

impl Pools {
    /// An empty registry; pools read credentials from `secrets` and TLS settings from
    /// `tls` when they connect.
    pub fn new(secrets: Secrets, tls: Arc<ArcSwap<Tls>>, clients: Arc<ClientRegistry>) -> Pools {
        Pools {
            pools: Mutex::new(HashMap::new()),
            caps: Mutex::new(HashMap::new()),
            logins: Mutex::new(HashMap::new()),
            secrets,
            tls,
            clients,
        }
    }

    /// The pool for `key`, created with the settings `config` gives it if it does not exist.
    pub fn get(&self, key: &PoolKey, config: &Config) -> Arc<ServerPool> {
        let mut pools = self.lock();
        if let Some(pool) = pools.get(key) {
            return pool.clone();
        }
        let backend = &key.target.backend;
        let caps = Caps::new(
            self.cap(
                CapKey::Database(key.database.clone(), backend.clone()),
                config,
            ),
            self.cap(
                CapKey::User(key.target.user.clone(), backend.clone()),
                config,
            ),
        );
        let pool = Arc::new(ServerPool::new(
            key.target.clone(),
            settings_for(config, &key.database),
            caps.clone(),
            self.secrets.clone(),
            self.tls.clone(),
            self.logins(&key.database, &key.target.user),
        ));
        caps.database.join(&pool);
        caps.user.join(&pool);
        debug!(db = %key.database, backend = %key.target.backend, user = %key.target.user, "pool created");
        pools.insert(key.clone(), pool.clone());
        pool
    }

    /// The cap `key` names, created with the limit `config` gives it.
    fn cap(&self, key: CapKey, config: &Config) -> Arc<Cap> {
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        let limit = key.limit(config);
        caps.entry(key).or_insert_with(|| Cap::new(limit)).clone()
    }

    /// Forgets the caps no pool shares any more (their database, user or node left
    /// the configuration and the last of their pools closed).
    fn forget_unused_caps(&self) {
        // Pools hold their caps; a cap only this registry holds has none left.
        self.caps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, cap| Arc::strong_count(cap) > 1);
    }

    /// Server connections open for client-facing `database`, on every backend together.
    pub fn database_connections(&self, database: &str) -> usize {
        self.open_under(|key| matches!(key, CapKey::Database(db, _) if db == database))
    }

    /// Server connections open for `user`, to every database and backend together.
    pub fn user_connections(&self, user: &str) -> usize {
        self.open_under(|key| matches!(key, CapKey::User(u, _) if u == user))
    }

    /// Server connections open, every database and backend together.
    pub fn server_connections(&self) -> usize {
        // Every connection holds one place under its database's cap.
        self.open_under(|key| matches!(key, CapKey::Database(..)))
    }

    /// Server connections open under the caps `picked` chooses.
    fn open_under(&self, picked: impl Fn(&CapKey) -> bool) -> usize {
        let caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        caps.iter()
            .filter(|(key, _)| picked(key))
            .map(|(_, cap)| cap.open())
            .sum()
    }

    /// The login facts of `user` on `database`, shared by its pools on every backend.
    pub fn logins(&self, database: &str, user: &str) -> Arc<Logins> {
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins
            .entry((database.to_owned(), user.to_owned()))
            .or_default()
            .clone()
    }

    /// Retires every pool of `backend`: idle connections close, waiters re-route,
    /// and transactions running on it end with an error naming the backend.
    pub fn retire_backend(&self, backend: &str) {
        self.retire_where(|key, _| *key.target.backend == *backend);
        info!(%backend, "retired the pools of a backend that left the routing table");
    }

    /// Has the pools of client-facing `database` (or every pool) replace their
    /// connections (RECONNECT); returns how many pools.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let pools = self.all();
        let mut n = 0;
        for (key, pool) in pools {
            if database.is_none_or(|db| key.database == db) {
                pool.reconnect();
                n += 1;
            }
        }
        n
    }

    /// Retires every pool of client-facing `database` (KILL).
    pub fn retire_database(&self, database: &str) {
        self.retire_where(|key, _| key.database == database);
    }

    /// Retires (and forgets) the pools `retire` picks, and ends the transactions
    /// running on their connections.
    fn retire_where(&self, mut retire: impl FnMut(&PoolKey, &ServerPool) -> bool) {
        let mut retired = Vec::new();
        self.lock().retain(|key, pool| {
            if !retire(key, pool) {
                return true;
            }
            pool.retire();
            retired.push(pool.id);
            false
        });
        if !retired.is_empty() {
            self.clients.evict(&retired);
        }
    }

    /// Every pool with its key.
    pub fn all(&self) -> Vec<(PoolKey, Arc<ServerPool>)> {
        self.lock()
            .iter()
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect()
    }

    /// Applies a reloaded config: new sizes, caps and timeouts; pools whose database
    /// or backend changed or disappeared are retired (their clients move to new pools).
    pub fn reconfigure(&self, config: &Config) {
        for (key, cap) in self.caps.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            cap.set_limit(key.limit(config));
        }
        self.retire_where(|key, pool| {
            let still = config
                .backends
                .iter()
                .find(|b| *b.name == *key.target.backend)
                .and_then(|b| PoolKey::new(config, &key.database, &key.target.user, b));
            if still.as_ref() == Some(key) {
                pool.update(settings_for(config, &key.database));
                false
            } else {
                info!(db = %key.database, backend = %key.target.backend, "retiring pool: its database or backend changed");
                true
            }
        });
    }

    /// Every second until `shutdown`: closes idle connections past their timeouts
    /// or broken, and keeps `min_pool_size` connections open on the nodes clients are
    /// routed to now (see [`Pools::warm`]), except for the databases `held` names
    /// (paused or disabled: an operator emptying one does not want them back).
    pub async fn maintain_until(
        &self,
        config: &ArcSwap<Config>,
        routing: &Routing,
        held: impl Fn(&str) -> bool,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            self.forget_unused_caps();
            let warm = self.warm(&config.load(), &routing.load(), &held);
            for (key, pool) in self.all() {
                let warm = warm.contains(&key);
                let closed = pool.reap(warm);
                if closed > 0 {
                    debug!(db = %key.database, backend = %key.target.backend, closed, "reaped idle server connections");
                }
                if warm && let Some(filling) = pool.fill() {
                    tokio::spawn(filling);
                }
            }
        }
    }

    /// The pools that keep their `min_pool_size` connections open: for every database
    /// and user that has logged in, those on the nodes its transactions go to now,
    /// created if missing. So a new primary's pools fill before the first client
    /// after a failover needs them, and a node no longer routed to lets its go.
    fn warm(
        &self,
        config: &Config,
        table: &BackendTable,
        held: impl Fn(&str) -> bool,
    ) -> HashSet<PoolKey> {
        let logged_in: Vec<(String, String)> = self
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut warm = HashSet::new();
        for (database, user) in logged_in {
            let Some(db) = config.database(&database).filter(|d| d.min_pool_size > 0) else {
                continue;
            };
            if held(&database) {
                continue;
            }
            for node in table.candidates(db.target, config.health.max_standby_lag) {
                if let Some(key) = PoolKey::new(config, &database, &user, &node.config) {
                    self.get(&key, config);
                    warm.insert(key);
                }
            }
        }
        warm
    }

    /// Retires every pool (shutdown).
    pub fn retire_all(&self) {
        self.retire_where(|_, _| true);
    }

    /// True when some pool of `backend` completed a transaction within the last `window`.
    pub fn backend_answered_within(&self, backend: &str, window: Duration) -> bool {
        self.lock()
            .iter()
            .any(|(key, pool)| &*key.target.backend == backend && pool.answered_within(window))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Arc<ServerPool>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The settings a pool for `database` gets from `config`.
pub fn settings_for(config: &Config, database: &str) -> PoolSettings {
    let p = &config.pool;
    let (size, min_size) = config
        .database(database)
        .map_or((p.default_pool_size, 0), |d| (d.pool_size, d.min_pool_size));
    PoolSettings {
        size: size as usize,
        min_size: min_size as usize,
        reserve_size: p.reserve_pool_size as usize,
        reserve_timeout: p.reserve_pool_timeout,
        wait_timeout: p.query_wait_timeout,
        connect_timeout: p.server_connect_timeout,
        idle_timeout: p.server_idle_timeout,
        lifetime: p.server_lifetime,
        keepalive: Keepalive::from_config(&config.pgwarden),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::UserList;
    use crate::backend::{Health, Role, probed};

    fn pools_for(config: &Config) -> Pools {
        let secrets = Secrets {
            users: Arc::new(ArcSwap::from_pointee(UserList::default())),
            queried: Arc::default(),
        };
        let tls = Arc::new(ArcSwap::from_pointee(Tls::load(config).unwrap()));
        Pools::new(secrets, tls, Arc::default())
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("test.toml")).unwrap()
    }

    #[test]
    fn pools_share_the_caps_of_their_database_and_user_per_node_and_reloads_change_them() {
        let nodes = "[[backends]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\n\
                     [[backends]]\nname = \"pg2\"\nhost = \"127.0.0.1\"\nport = 5433\n";
        let config = parse(&format!(
            "[pool]\nmax_db_connections = 4\nmax_user_connections = 6\n{nodes}\
             [databases.app]\n[databases.big]\nmax_db_connections = 9\n"
        ));
        let pools = pools_for(&config);
        let pool = |db: &str, user: &str, node: usize| {
            let key = PoolKey::new(&config, db, user, &config.backends[node]).unwrap();
            pools.get(&key, &config)
        };
        let (alice, bob) = (pool("app", "alice", 0), pool("app", "bob", 0));
        assert!(Arc::ptr_eq(&alice.caps.database, &bob.caps.database));
        assert!(!Arc::ptr_eq(&alice.caps.user, &bob.caps.user));
        let elsewhere = pool("app", "alice", 1);
        assert!(!Arc::ptr_eq(&alice.caps.database, &elsewhere.caps.database));
        let big = pool("big", "alice", 0);
        assert!(Arc::ptr_eq(&alice.caps.user, &big.caps.user));
        assert_eq!(
            (alice.caps.database.limit(), alice.caps.user.limit()),
            (4, 6)
        );
        assert_eq!(big.caps.database.limit(), 9);

        pools.reconfigure(&parse(&format!(
            "[pool]\nmax_db_connections = 2\n{nodes}[databases.app]\n[databases.big]\n"
        )));
        assert_eq!(
            (alice.caps.database.limit(), alice.caps.user.limit()),
            (2, 0)
        );
        assert_eq!(big.caps.database.limit(), 2);

        // Once "big" leaves the configuration and its pool is gone, so is its cap.
        pools.reconfigure(&parse(&format!("{nodes}[databases.app]\n")));
        let pg1: Arc<str> = config.backends[0].name.as_str().into();
        let big_cap = CapKey::Database("big".into(), pg1.clone());
        pools.forget_unused_caps();
        assert!(
            pools.caps.lock().unwrap().contains_key(&big_cap),
            "still in use"
        );
        drop(big);
        pools.forget_unused_caps();
        let caps = pools.caps.lock().unwrap();
        assert!(!caps.contains_key(&big_cap));
        assert!(caps.contains_key(&CapKey::Database("app".into(), pg1)));
    }

    #[test]
    fn warm_pools_are_those_on_the_nodes_each_database_is_routed_to_now() {
        let config = parse(
            "[pool]\nmin_pool_size = 2\n\
             [[backends]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\n\
             [[backends]]\nname = \"pg2\"\nhost = \"127.0.0.1\"\nport = 5433\n\
             [databases.app]\n[databases.reports]\ntarget = \"standby\"\n\
             [databases.cold]\nmin_pool_size = 0\n",
        );
        let pools = pools_for(&config);
        for db in ["app", "reports", "cold"] {
            pools.logins(db, "alice");
        }
        let with_primary = |primary: usize| BackendTable {
            generation: 1,
            backends: (config.backends.iter().enumerate())
                .map(|(i, b)| {
                    let role = if i == primary {
                        Role::Primary
                    } else {
                        Role::Standby
                    };
                    probed(b.clone(), role, Health::Up)
                })
                .collect(),
            primary: Some(primary),
            split_brain: false,
        };
        let places = |warm: HashSet<PoolKey>| {
            let mut places: Vec<(String, String)> = (warm.into_iter())
                .map(|k| (k.database, k.target.backend.to_string()))
                .collect();
            places.sort();
            places
        };
        let pair = |db: &str, node: &str| (db.to_owned(), node.to_owned());
        assert_eq!(
            places(pools.warm(&config, &with_primary(0), |_| false)),
            [pair("app", "pg1"), pair("reports", "pg2")]
        );
        // The roles swap: the warm places move, before any client comes; the pools
        // on the old places stay, with no minimum to keep.
        assert_eq!(
            places(pools.warm(&config, &with_primary(1), |_| false)),
            [pair("app", "pg2"), pair("reports", "pg1")]
        );
        assert_eq!(pools.all().len(), 4);
        // A paused or disabled database keeps none.
        assert_eq!(
            places(pools.warm(&config, &with_primary(1), |db| db == "app")),
            [pair("reports", "pg1")]
        );
    }
}
