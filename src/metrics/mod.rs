//! Every Prometheus metric pgwarden exports, in one place.
//!
//! Names start with `pgwarden_` and carry their unit; labels are bounded
//! (database, user, backend, state — never a client). Sessions add each
//! transaction's figures to their database's [`DatabaseTraffic`] under one lock
//! ([`traffic`]). Gauges that describe clients and pools are filled in at scrape
//! time from the client registry and the pools themselves.

pub mod traffic;

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::backend::{BackendTable, Health, Role};
use crate::pool::Pools;
use crate::registry::ClientRegistry;
use traffic::Traffic;
pub use traffic::{DatabaseTraffic, Totals};

/// Buckets for transaction and wait durations: 100 µs to 30 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The registry and every metric.
pub struct Metrics {
    registry: Registry,
    /// CPU, memory, threads and descriptors of the process, under the unprefixed
    /// `process_*` names every Prometheus client library gives them
    process: Registry,
    clients: IntGaugeVec,
    server_connections: IntGaugeVec,
    longest_wait: prometheus::GaugeVec,
    traffic: Traffic,
    /// failed logins by reason (`password`, `database`, `protocol`, …)
    pub login_failures: IntCounterVec,
    backend_up: IntGaugeVec,
    backend_role: IntGaugeVec,
    backend_fenced: IntGaugeVec,
    lag_bytes: IntGaugeVec,
    lag_seconds: prometheus::GaugeVec,
    /// duration of health probes, by backend
    pub probe_seconds: HistogramVec,
    /// failed health probes, by backend
    pub probe_failures: IntCounterVec,
    /// automatic promotions
    pub failovers: IntCounter,
    /// planned primary changes
    pub switchovers: IntCounter,
    /// nodes fenced
    pub fencings: IntCounter,
    primary_available: IntGauge,
    split_brain: IntGauge,
    /// 1 while etcd answers (always 0 without `[coordination]`)
    pub coordination_up: IntGauge,
    /// 1 while this proxy holds the failover leadership in etcd
    pub coordination_leader: IntGauge,
    /// etcd revision of the last cluster state seen
    pub coordination_revision: IntGauge,
    /// alarms a follower passed on to the leader (`sent`) and the leader acted on (`received`)
    pub coordination_alarms: IntCounterVec,
    /// configuration reloads by result (`ok`, `error`)
    pub reloads: IntCounterVec,
    names: Vec<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The state a client is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// between transactions
    Idle,
    /// waiting for a server connection
    Waiting,
    /// holding a server connection
    Active,
}

impl ClientState {
    /// Every state, in the order of their discriminants.
    pub const ALL: [ClientState; 3] =
        [ClientState::Idle, ClientState::Waiting, ClientState::Active];

    /// Its `state` label on `pgwarden_clients`.
    pub fn label(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// A registry that remembers what was registered in it.
struct Declared {
    registry: Registry,
    names: Vec<String>,
}

impl Declared {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&mut self, collector: C) -> C {
        for desc in collector.desc() {
            self.names.push(format!("pgwarden_{}", desc.fq_name));
        }
        self.registry
            .register(Box::new(collector.clone()))
            .expect("metric names are unique constants");
        collector
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&mut self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(SECONDS.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("valid metric"))
    }

    fn single(&mut self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }

    fn single_gauge(&mut self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric. The names are constants, so registration
    /// cannot fail at run time.
    pub fn new() -> Metrics {
        let mut r = Declared {
            registry: Registry::new_custom(Some("pgwarden".into()), None).expect("valid prefix"),
            names: Vec::new(),
        };
        r.gauge("build_info", "pgwarden version", &["version"])
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let longest_wait = r.add(
            prometheus::GaugeVec::new(
                Opts::new(
                    "client_longest_wait_seconds",
                    "How long the longest-waiting client has waited for a server connection so far (0: none waiting)",
                ),
                &["database", "user"],
            )
            .expect("valid metric"),
        );
        let lag_seconds = r.add(
            prometheus::GaugeVec::new(
                Opts::new(
                    "replication_lag_seconds",
                    "Seconds since the last transaction a standby replayed, while it is behind",
                ),
                &["backend"],
            )
            .expect("valid metric"),
        );
        let process = Registry::new();
        let collector = prometheus::process_collector::ProcessCollector::for_self();
        r.names
            .extend(collector.desc().iter().map(|d| d.fq_name.clone()));
        process
            .register(Box::new(collector))
            .expect("registered once");
        Metrics {
            clients: r.gauge(
                "clients",
                "Client connections by state (active, waiting, idle)",
                &["database", "user", "state"],
            ),
            server_connections: r.gauge(
                "server_connections",
                "Server connections by state (active, login: being opened, idle)",
                &["backend", "database", "state"],
            ),
            longest_wait,
            traffic: r.add(Traffic::new()),
            login_failures: r.counter(
                "login_failures_total",
                "Failed client logins by reason",
                &["reason"],
            ),
            backend_up: r.gauge(
                "backend_up",
                "1 while health probes reach the backend",
                &["backend"],
            ),
            backend_role: r.gauge(
                "backend_role",
                "1 for the role the backend reports (primary, standby)",
                &["backend", "role"],
            ),
            backend_fenced: r.gauge(
                "backend_fenced",
                "1 while the backend is fenced",
                &["backend"],
            ),
            lag_bytes: r.gauge(
                "replication_lag_bytes",
                "Bytes of WAL a standby has not replayed yet",
                &["backend"],
            ),
            lag_seconds,
            probe_seconds: r.histogram(
                "health_probe_duration_seconds",
                "Duration of successful health probes",
                &["backend"],
            ),
            probe_failures: r.counter(
                "health_probe_failures_total",
                "Failed health probes",
                &["backend"],
            ),
            failovers: r.single(
                "failovers_total",
                "Automatic promotions after a primary failure",
            ),
            switchovers: r.single("switchovers_total", "Planned primary changes"),
            fencings: r.single("fencings_total", "Nodes fenced"),
            primary_available: r.single_gauge("primary_available", "1 while a primary is routable"),
            split_brain: r
                .single_gauge("split_brain", "1 while two nodes report themselves primary"),
            coordination_up: r.single_gauge(
                "coordination_up",
                "1 while etcd answers ([coordination] configured)",
            ),
            coordination_leader: r.single_gauge(
                "coordination_leader",
                "1 while this proxy is the failover leader",
            ),
            coordination_revision: r.single_gauge(
                "coordination_state_revision",
                "etcd revision of the last cluster state seen",
            ),
            coordination_alarms: r.counter(
                "coordination_alarms_total",
                "Primary failures a follower passed on to the leader, by direction (sent, received)",
                &["direction"],
            ),
            reloads: r.counter(
                "config_reloads_total",
                "Configuration reloads by result",
                &["result"],
            ),
            process,
            registry: r.registry,
            names: r.names,
        }
    }

    /// The traffic figures the clients of `database` add to.
    pub fn traffic_of(&self, database: &str) -> Arc<DatabaseTraffic> {
        self.traffic.of(database)
    }

    /// Every database's traffic totals.
    pub fn traffic_totals(&self) -> BTreeMap<String, Totals> {
        self.traffic.totals()
    }

    /// Mirrors the routing table into the backend gauges.
    pub fn observe_table(&self, table: &BackendTable) {
        self.primary_available
            .set(i64::from(table.primary().is_some_and(|p| p.routable())));
        self.split_brain.set(i64::from(table.split_brain));
        for b in &table.backends {
            let name = b.config.name.as_str();
            self.backend_up
                .with_label_values(&[name])
                .set(i64::from(matches!(
                    b.health,
                    Health::Up | Health::Suspect { .. }
                )));
            self.backend_fenced
                .with_label_values(&[name])
                .set(i64::from(b.fenced));
            for (role, label) in [(Role::Primary, "primary"), (Role::Standby, "standby")] {
                self.backend_role
                    .with_label_values(&[name, label])
                    .set(i64::from(b.role() == Some(role)));
            }
            match b.lag_bytes {
                Some(lag) => self.lag_bytes.with_label_values(&[name]).set(lag as i64),
                None => self.lag_bytes.with_label_values(&[name]).set(0),
            }
            let delay = b.facts.as_ref().and_then(|f| f.replay_delay).unwrap_or(0.0);
            self.lag_seconds
                .with_label_values(&[name])
                .set(delay.max(0.0));
        }
    }

    /// The Prometheus text exposition, with the client, pool and wait gauges refreshed
    /// first: the registry and the pools hold those figures, so the hot path keeps no
    /// gauge of its own.
    pub fn render(&self, pools: &Pools, clients: &ClientRegistry) -> Vec<u8> {
        let tallies = clients.tally();
        // Every pair that has had clients, so that "none" reads 0, not absent.
        for (database, user) in clients.pairs() {
            let tally = tallies
                .get(&(database.clone(), user.clone()))
                .copied()
                .unwrap_or_default();
            self.longest_wait
                .with_label_values(&[database.as_str(), user.as_str()])
                .set(tally.longest_wait.as_secs_f64());
            for state in ClientState::ALL {
                self.clients
                    .with_label_values(&[database.as_str(), user.as_str(), state.label()])
                    .set(tally.states[state as usize] as i64);
            }
        }
        self.server_connections.reset();
        for (key, pool) in pools.all() {
            let (in_use, idle, _) = pool.counts();
            let login = pool.opening();
            // As SHOW POOLS splits them: sv_active, sv_login, sv_idle.
            for (state, count) in [
                ("active", in_use.saturating_sub(login)),
                ("login", login),
                ("idle", idle),
            ] {
                self.server_connections
                    .with_label_values(&[&*key.target.backend, key.database.as_str(), state])
                    .add(count as i64);
            }
        }
        let mut out = Vec::new();
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        out
    }

    /// The name of every metric family (for checking alert rules and dashboards).
    pub fn names(&self) -> &[String] {
        &self.names
    }
}
