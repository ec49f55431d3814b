//! The routing table: every PostgreSQL node as pgwarden last saw it, and which
//! one takes writes.
//!
//! A [`BackendTable`] is an immutable snapshot behind an `ArcSwap`. Only the
//! health monitor (which also runs the failover controller) stores new ones;
//! every transaction reads the current one with a single atomic load and never
//! takes a lock. `generation` increases only when routing changes, so clients
//! can keep what they derived from a table (their pool) until it does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{BackendConfig, Config, FailoverMode, Target};

/// What a node is in the cluster, as it reports itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// not in recovery: accepts writes
    Primary,
    /// in recovery: replays WAL
    Standby,
}

/// Whether probes reach a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// not probed yet
    Unknown,
    /// the last probe succeeded
    Up,
    /// the last `failures` probes failed, fewer than the threshold
    Suspect {
        /// consecutive failures so far
        failures: u32,
    },
    /// `failure_threshold` consecutive probes failed
    Down,
}

impl Health {
    /// The state after a probe; `threshold` consecutive failures mean down.
    pub fn after(self, probe_ok: bool, threshold: u32) -> Health {
        match (self, probe_ok) {
            (_, true) => Health::Up,
            (Health::Down, false) => Health::Down,
            (Health::Suspect { failures }, false) if failures + 1 >= threshold => Health::Down,
            (Health::Suspect { failures }, false) => Health::Suspect {
                failures: failures + 1,
            },
            (Health::Unknown | Health::Up, false) if threshold <= 1 => Health::Down,
            (Health::Unknown | Health::Up, false) => Health::Suspect { failures: 1 },
        }
    }

    /// A short name for logs and the admin console.
    pub fn name(&self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Suspect { .. } => "suspect",
            Health::Down => "down",
        }
    }
}

/// A standby's WAL receiver, from `pg_stat_wal_receiver`.
#[derive(Debug, Clone, PartialEq)]
pub struct Receiver {
    /// `streaming`, `waiting`, …
    pub status: String,
    /// where it streams from
    pub sender_host: Option<String>,
    /// port it streams from
    pub sender_port: Option<i32>,
}

/// One standby connected to a primary, from `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// the standby's `application_name`
    pub name: String,
    /// `streaming`, `catchup`, …
    pub state: String,
    /// `sync`, `quorum`, `async`, …
    pub sync_state: String,
    /// WAL position the standby has replayed
    pub replay_lsn: Option<u64>,
}

/// What the last successful probe of a node saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    /// primary or standby
    pub role: Role,
    /// current timeline
    pub timeline: Option<u32>,
    /// primary: `pg_current_wal_lsn()`; standby: last received (flushed) position
    pub lsn: Option<u64>,
    /// standby: last replayed position
    pub replay_lsn: Option<u64>,
    /// standby: seconds since the last replayed transaction's commit, when it is behind
    pub replay_delay: Option<f64>,
    /// standby: its WAL receiver, while one runs
    pub receiver: Option<Receiver>,
    /// primary: the standbys streaming from it
    pub replicas: Vec<Replica>,
    /// round trip of the probe query
    pub latency: Duration,
}

/// One node as the table sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// name, host, port, priority from the config
    pub config: BackendConfig,
    /// whether probes reach it
    pub health: Health,
    /// never routed to until it rejoins as a standby or an operator unfences it
    pub fenced: bool,
    /// the last successful probe
    pub facts: Option<Facts>,
    /// bytes of WAL this standby is behind the primary
    pub lag_bytes: Option<u64>,
    /// when it was last probed
    pub checked_at: Option<SystemTime>,
}

impl Backend {
    /// A node nothing is known about yet.
    pub fn new(config: BackendConfig) -> Backend {
        Backend {
            config,
            health: Health::Unknown,
            fenced: false,
            facts: None,
            lag_bytes: None,
            checked_at: None,
        }
    }

    /// Probes reach it and it is not fenced.
    pub fn routable(&self) -> bool {
        !self.fenced && matches!(self.health, Health::Up | Health::Suspect { .. })
    }

    /// Its role according to the last successful probe.
    pub fn role(&self) -> Option<Role> {
        self.facts.as_ref().map(|f| f.role)
    }

    /// `host:port`
    pub fn addr(&self) -> String {
        format!("{}:{}", self.config.host, self.config.port)
    }
}

/// A snapshot of the cluster as pgwarden routes it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTable {
    /// increases whenever routing changes
    pub generation: u64,
    /// every configured node, in config order
    pub backends: Vec<Backend>,
    /// index into `backends` of the node writes go to
    pub primary: Option<usize>,
    /// two nodes report themselves primary
    pub split_brain: bool,
}

impl BackendTable {
    /// The table before any probe: nothing is routable except, with failover off,
    /// the first backend, which is the primary whatever happens.
    pub fn initial(config: &Config, generation: u64) -> BackendTable {
        BackendTable {
            generation,
            backends: config.backends.iter().cloned().map(Backend::new).collect(),
            primary: (config.failover.mode == FailoverMode::Off && !config.backends.is_empty())
                .then_some(0),
            split_brain: false,
        }
    }

    /// The node writes go to, if there is one to route to.
    pub fn primary(&self) -> Option<&Backend> {
        self.primary.and_then(|i| self.backends.get(i))
    }

    /// The node with this name.
    pub fn get(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.config.name == name)
    }

    /// The node a transaction for a database with `target` goes to. `turn` spreads
    /// reads over the eligible nodes; `max_lag` excludes standbys too far behind.
    pub fn route(&self, target: Target, max_lag: u64, turn: usize) -> Option<&Backend> {
        let nodes = self.candidates(target, max_lag);
        (!nodes.is_empty()).then(|| nodes[turn % nodes.len()])
    }

    /// Every node that may serve a database with `target` now, standbys first.
    pub fn candidates(&self, target: Target, max_lag: u64) -> Vec<&Backend> {
        let standbys = || {
            self.backends.iter().enumerate().filter_map(move |(i, b)| {
                (Some(i) != self.primary
                    && b.routable()
                    && b.role() == Some(Role::Standby)
                    && b.lag_bytes.is_none_or(|lag| lag <= max_lag))
                .then_some(b)
            })
        };
        match target {
            Target::Primary => self.primary().into_iter().collect(),
            Target::Standby => standbys().collect(),
            Target::PreferStandby => {
                let nodes: Vec<&Backend> = standbys().collect();
                if nodes.is_empty() {
                    self.primary().into_iter().collect()
                } else {
                    nodes
                }
            }
            Target::Any => standbys().chain(self.primary()).collect(),
        }
    }

    /// True when routing would differ between the two tables (who is primary, who
    /// is routable); probe statistics alone do not count.
    pub fn routing_differs(&self, other: &BackendTable) -> bool {
        self.primary != other.primary
            || self.backends.len() != other.backends.len()
            || self.backends.iter().zip(&other.backends).any(|(a, b)| {
                a.config != b.config
                    || a.routable() != b.routable()
                    || a.role() != b.role()
                    || a.fenced != b.fenced
            })
    }
}

/// The shared routing table and a channel that ticks whenever routing changes.
#[derive(Debug)]
pub struct Routing {
    table: ArcSwap<BackendTable>,
    /// the table's generation, stored after it
    generation: AtomicU64,
    changed: watch::Sender<u64>,
}

impl Routing {
    /// A routing table starting from `table`.
    pub fn new(table: BackendTable) -> Routing {
        let generation = table.generation;
        Routing {
            table: ArcSwap::from_pointee(table),
            generation: AtomicU64::new(generation),
            changed: watch::Sender::new(generation),
        }
    }

    /// The current snapshot: one atomic load.
    pub fn load(&self) -> arc_swap::Guard<Arc<BackendTable>> {
        self.table.load()
    }

    /// The current snapshot, owned.
    pub fn load_full(&self) -> Arc<BackendTable> {
        self.table.load_full()
    }

    /// The current snapshot's generation: one plain load, for a session that routed
    /// that generation already and needs nothing else of the table.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Publishes a new snapshot; waiters are woken when its generation is new.
    pub fn store(&self, table: BackendTable) {
        let generation = table.generation;
        self.table.store(Arc::new(table));
        self.generation.store(generation, Ordering::Release);
        self.changed.send_if_modified(|g| {
            let newer = *g != generation;
            *g = generation;
            newer
        });
    }

    /// A receiver that sees every later routing change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The primary, waiting up to `wait` for one to be routed (start-up, failover).
    pub async fn await_primary(&self, wait: Duration) -> Option<BackendConfig> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(primary) = self.load().primary() {
                return Some(primary.config.clone());
            }
            tokio::time::timeout_at(deadline, changes.changed())
                .await
                .ok()?
                .ok()?;
        }
    }
}

/// A node as a probe that found it in `role` and `health` leaves it (for tests).
#[cfg(test)]
pub(crate) fn probed(config: BackendConfig, role: Role, health: Health) -> Backend {
    Backend {
        facts: Some(Facts {
            role,
            timeline: Some(1),
            lsn: Some(0),
            replay_lsn: None,
            replay_delay: None,
            receiver: None,
            replicas: Vec::new(),
            latency: Duration::ZERO,
        }),
        health,
        ..Backend::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, role: Role, health: Health) -> Backend {
        let config = BackendConfig {
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            priority: 0,
            replication_host: None,
            replication_port: None,
        };
        probed(config, role, health)
    }

    #[test]
    fn health_needs_threshold_failures_and_one_success() {
        let mut h = Health::Unknown;
        h = h.after(false, 3);
        assert_eq!(h, Health::Suspect { failures: 1 });
        h = h.after(false, 3);
        assert_eq!(h, Health::Suspect { failures: 2 });
        h = h.after(false, 3);
        assert_eq!(h, Health::Down);
        h = h.after(false, 3);
        assert_eq!(h, Health::Down);
        assert_eq!(h.after(true, 3), Health::Up);
        assert_eq!(Health::Up.after(false, 1), Health::Down);
        assert_eq!(Health::Suspect { failures: 2 }.after(true, 3), Health::Up);
    }

    #[test]
    fn routes_by_target_and_spreads_reads() {
        let mut table = BackendTable {
            generation: 1,
            backends: vec![
                backend("a", Role::Primary, Health::Up),
                backend("b", Role::Standby, Health::Up),
                backend("c", Role::Standby, Health::Suspect { failures: 1 }),
                backend("d", Role::Standby, Health::Down),
            ],
            primary: Some(0),
            split_brain: false,
        };
        let name = |b: Option<&Backend>| b.map(|b| b.config.name.clone());
        assert_eq!(name(table.route(Target::Primary, 0, 0)), Some("a".into()));
        assert_eq!(name(table.route(Target::Standby, 0, 0)), Some("b".into()));
        assert_eq!(name(table.route(Target::Standby, 0, 1)), Some("c".into()));
        assert_eq!(name(table.route(Target::Standby, 0, 2)), Some("b".into()));
        // A standby too far behind is skipped.
        table.backends[1].lag_bytes = Some(100);
        assert_eq!(name(table.route(Target::Standby, 50, 0)), Some("c".into()));
        // Without standbys, prefer-standby falls back to the primary; standby finds nothing.
        table.backends[1].fenced = true;
        table.backends[2].health = Health::Down;
        assert_eq!(table.route(Target::Standby, 50, 0), None);
        assert_eq!(
            name(table.route(Target::PreferStandby, 50, 0)),
            Some("a".into())
        );
        assert_eq!(name(table.route(Target::Any, 50, 7)), Some("a".into()));
        // Without a primary, primary-routed databases have nowhere to go.
        table.primary = None;
        assert!(table.route(Target::Primary, 0, 0).is_none());
    }

    #[test]
    fn probe_statistics_do_not_change_routing() {
        let a = BackendTable {
            generation: 1,
            backends: vec![backend("a", Role::Primary, Health::Up)],
            primary: Some(0),
            split_brain: false,
        };
        let mut b = a.clone();
        b.backends[0].lag_bytes = Some(5);
        assert!(!a.routing_differs(&b));
        b.backends[0].health = Health::Down;
        assert!(a.routing_differs(&b));
    }
}
