//! Coordination of several proxies in front of one cluster: one decision, taken
//! once, by one proxy.
//!
//! pgwarden often runs as a sidecar, one per application pod, so many proxies
//! watch the same nodes. If each promoted on its own, two could pick different
//! standbys and split the cluster. With `[coordination]` configured, the proxies
//! elect a leader through an etcd lease ([`etcd`]); only the leader runs the
//! failover controller's steps, and it publishes the resulting [`ClusterState`]
//! in etcd, before each step (as an intent) and after it. Every proxy watches
//! that key and the health monitor adopts what it says, while still probing, so
//! no proxy routes to a node its own probes show down.
//!
//! Safety rules: no etcd, no promotion (the intent must be written first, under
//! a compare on the leader key); a restarted proxy takes the published primary
//! and fences before deciding anything; a new leader finishes an interrupted
//! failover with the same candidate (every step is idempotent).
//!
//! This module owns the [`Snapshot`] (role, lease, last state) that the monitor,
//! SHOW COORDINATION, /health/ready and the metrics read. Without `[coordination]`
//! there is no [`Coordinator`] and the monitor decides alone, as before; when two
//! processes share one port for a rolling restart, a lock file ([`local`]) picks
//! which of them decides.

#[cfg(feature = "etcd")]
mod etcd;
pub mod file;
pub mod local;
pub mod state;

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{Notify, watch};

use crate::config::CoordinationConfig;
use crate::proxy::Shared;
pub use state::{ClusterState, Failover, Step};

/// Why the coordination store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// pgwarden was built without the `etcd` feature.
    #[error("[coordination] needs pgwarden built with the `etcd` feature")]
    NotBuilt,
    /// This proxy does not hold the leader key (any more).
    #[error("this proxy is not the coordination leader")]
    NotLeader,
    /// etcd did not answer, or answered with an error.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The lease was not renewed in time: leadership may already be someone else's.
    #[error("the etcd lease expired")]
    LeaseExpired,
}

/// This proxy's part in the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// etcd is unreachable: route from probes and the last known state, never promote
    Disconnected,
    /// connected, another proxy (or nobody yet) holds the leader key
    Follower,
    /// this proxy holds the leader key and may promote
    Leader,
}

impl Role {
    /// Its name in logs, SHOW COORDINATION and /health/ready.
    pub fn name(self) -> &'static str {
        match self {
            Role::Disconnected => "disconnected",
            Role::Follower => "follower",
            Role::Leader => "leader",
        }
    }
}

/// What this proxy knows about the coordination, as of now.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// this proxy's part
    pub role: Role,
    /// since when
    pub since: SystemTime,
    /// who holds the leader key (`name#lease`), when known
    pub leader: Option<String>,
    /// this proxy's lease, while connected
    pub lease: Option<i64>,
    /// the etcd revision of `state` (0: never read)
    pub revision: i64,
    /// the last cluster state read from etcd
    pub state: Option<ClusterState>,
    /// why the last etcd session failed, until one is up again
    pub error: Option<String>,
}

impl Snapshot {
    /// The JSON object /health/ready and /status show.
    pub fn to_json(&self) -> serde_json::Value {
        let state = self.state.as_ref();
        serde_json::json!({
            "role": self.role.name(),
            "etcd_reachable": self.role != Role::Disconnected,
            "leader": self.leader,
            "revision": self.revision,
            "published_primary": state.and_then(|s| s.primary.as_deref()),
            "fenced": state.map(|s| s.fenced.as_slice()).unwrap_or_default(),
            "failover_step": state.and_then(|s| s.failover.as_ref()).map(|f| f.step.name()),
            "error": self.error,
        })
    }
}

/// The handle the monitor, the admin console and the HTTP endpoint share.
#[derive(Debug)]
pub struct Coordinator {
    /// the `[coordination]` section it was started with (a reload does not change it)
    pub config: CoordinationConfig,
    /// this proxy's name in etcd
    pub name: String,
    snapshot: watch::Sender<Snapshot>,
    /// a follower's alarm waiting for the etcd session to pass it on to the leader
    relay: Notify,
    #[cfg(feature = "etcd")]
    leadership: std::sync::Mutex<Option<etcd::Leadership>>,
}

impl Coordinator {
    /// A coordinator for `config`, not connected yet; [`run`] connects it.
    pub fn new(config: CoordinationConfig) -> Coordinator {
        let name = config.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let (snapshot, _) = watch::channel(Snapshot {
            role: Role::Disconnected,
            since: SystemTime::now(),
            leader: None,
            lease: None,
            revision: 0,
            state: None,
            error: None,
        });
        Coordinator {
            config,
            name,
            snapshot,
            relay: Notify::new(),
            #[cfg(feature = "etcd")]
            leadership: std::sync::Mutex::new(None),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// True while this proxy may take failover decisions.
    pub fn is_leader(&self) -> bool {
        self.snapshot.borrow().role == Role::Leader
    }

    /// Passes this proxy's alarm (its clients or probes saw the primary fail) on to
    /// the leader through etcd, so that the leader probes at once rather than at
    /// its next interval: the proxy whose clients write is often a follower. The
    /// leader still decides from its own probes. Only a follower relays; returns
    /// whether it did.
    pub fn relay_alarm(&self) -> bool {
        if self.snapshot.borrow().role != Role::Follower {
            return false;
        }
        self.relay.notify_one();
        true
    }

    /// A receiver that wakes on every change (role or state), starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        let mut receiver = self.snapshot.subscribe();
        receiver.mark_changed();
        receiver
    }

    /// Writes `state` under the leader key's guard; returns the new revision.
    /// Fails unless this proxy is the leader and etcd confirms it in the same transaction.
    pub async fn write(&self, state: &ClusterState) -> Result<i64, Error> {
        #[cfg(feature = "etcd")]
        {
            etcd::write(self, state).await
        }
        #[cfg(not(feature = "etcd"))]
        {
            let _ = state;
            Err(Error::NotBuilt)
        }
    }

    /// Moves to `role`, logging the named transition and updating the metrics.
    #[cfg(feature = "etcd")]
    fn transition(&self, shared: &Shared, role: Role, why: &str) {
        let from = self.snapshot.borrow().role;
        if from != role {
            tracing::info!(
                from = from.name(),
                to = role.name(),
                why,
                name = %self.name,
                "coordination role changed"
            );
        }
        self.snapshot.send_modify(|s| {
            if s.role != role {
                s.since = SystemTime::now();
            }
            s.role = role;
            if role == Role::Disconnected {
                s.lease = None;
            } else {
                s.error = None;
            }
        });
        let metrics = &shared.metrics;
        metrics
            .coordination_up
            .set(i64::from(role != Role::Disconnected));
        metrics
            .coordination_leader
            .set(i64::from(role == Role::Leader));
    }

    /// Records a state read from etcd (or written by this proxy) at `revision`.
    #[cfg(feature = "etcd")]
    fn observe(&self, shared: &Shared, state: Option<ClusterState>, revision: i64) {
        shared.metrics.coordination_revision.set(revision);
        self.snapshot.send_modify(|s| {
            s.state = state;
            s.revision = revision;
        });
    }
}

/// Waits for the next change of the coordination snapshot; never returns
/// without `[coordination]`.
pub async fn changed(receiver: &mut Option<watch::Receiver<Snapshot>>) -> Snapshot {
    if let Some(r) = receiver
        && r.changed().await.is_ok()
    {
        return r.borrow_and_update().clone();
    }
    std::future::pending().await
}

/// Keeps this proxy in the election until shutdown (a no-op without `[coordination]`).
pub async fn run(shared: Arc<Shared>) {
    #[cfg(feature = "etcd")]
    if let Some(coordinator) = shared.coordination.clone() {
        etcd::run(shared, coordinator).await;
    }
    #[cfg(not(feature = "etcd"))]
    let _ = shared;
}
