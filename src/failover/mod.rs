//! The failover controller's steps: confirm that the primary is really gone,
//! select the most up-to-date standby, promote it, re-point the other standbys,
//! and fence what must not take writes again.
//!
//! The health monitor decides *when* (the primary is down, auto mode) and calls
//! these steps in order; each is a bounded conversation with PostgreSQL over a
//! short-lived control connection, and each returns why it could not proceed,
//! so that the monitor can log a readable timeline and try again later.

pub mod hooks;

use std::time::Duration;

use crate::backend::{Backend, Receiver, Role};
use crate::config::BackendConfig;
use crate::health::probe::{Login, connect, describe};
use crate::params::literal;
use tokio_postgres::Client;

/// Why a failover did not happen (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No healthy, unfenced standby answered.
    #[error("no healthy standby to promote")]
    NoCandidate,
    /// A standby still streams from the primary: pgwarden is the one cut off.
    #[error(
        "standby {witness} still streams from the primary; not promoting (this proxy may be cut off)"
    )]
    PrimaryAlive {
        /// the standby that still hears the primary
        witness: String,
    },
    /// The best candidate misses too much WAL.
    #[error(
        "best candidate {candidate} is {lag} bytes behind the old primary (maximum_lag_on_failover)"
    )]
    TooFarBehind {
        /// the candidate
        candidate: String,
        /// bytes behind the old primary's last known position
        lag: u64,
    },
    /// This process stopped listening (SHUTDOWN WAIT_FOR_CLIENTS): the one that took
    /// its port over decides.
    #[error(
        "this pgwarden stopped listening and waits for its clients to leave; the process that took its port over decides"
    )]
    Leaving,
    /// Another pgwarden on this port decides (a rolling restart).
    #[error(
        "another pgwarden on this port decides failovers ({decider}); this one follows until that one stops listening"
    )]
    AnotherDecides {
        /// which, and why it does
        decider: String,
    },
    /// With `[coordination]`: this proxy may not decide, or could not record its decision.
    #[error("{0}; waiting for the leader's decision")]
    Coordination(crate::coordination::Error),
    /// Promotion failed.
    #[error("promoting {candidate} failed: {reason}")]
    PromoteFailed {
        /// the candidate
        candidate: String,
        /// what PostgreSQL said
        reason: String,
    },
}

/// A standby's answer during confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// index in the monitor's node list
    pub index: usize,
    /// the standby still streams from the old primary
    pub hears_primary: bool,
    /// last WAL position it received and flushed
    pub received: Option<u64>,
}

const WITNESS: &str = "\
SELECT pg_is_in_recovery(),
       (SELECT status FROM pg_stat_wal_receiver),
       (SELECT sender_host FROM pg_stat_wal_receiver),
       (SELECT sender_port FROM pg_stat_wal_receiver),
       pg_last_wal_receive_lsn()";

/// Asks every healthy, unfenced standby (fresh, not from the last probe) whether it
/// still hears the old primary and how much WAL it has received.
pub async fn poll_standbys(nodes: &[Backend], old: usize, login: &Login) -> Vec<Witness> {
    let configs: Vec<BackendConfig> = nodes.iter().map(|n| n.config.clone()).collect();
    let asks = nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| *i != old && n.routable() && n.role() == Some(Role::Standby));
    let asks = asks.map(|(index, node)| {
        let configs = &configs;
        async move {
            let answer = tokio::time::timeout(login.timeout, async {
                let client = connect(&node.config, login).await?;
                client
                    .query_one(WITNESS, &[])
                    .await
                    .map_err(|e| describe(&e))
            })
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r);
            let row = answer.ok()?;
            if !row.get::<_, bool>(0) {
                return None;
            }
            let receiver = row.get::<_, Option<String>>(1).map(|status| Receiver {
                status,
                sender_host: row.get(2),
                sender_port: row.get(3),
            });
            Some(Witness {
                index,
                hears_primary: streams_from(receiver.as_ref(), old, configs),
                received: row
                    .get::<_, Option<tokio_postgres::types::PgLsn>>(4)
                    .map(u64::from),
            })
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// True when `receiver` is streaming from node `from` (or from somewhere that is not
/// another known node, which must be assumed to be it).
pub fn streams_from(receiver: Option<&Receiver>, from: usize, nodes: &[BackendConfig]) -> bool {
    let Some(r) = receiver.filter(|r| r.status == "streaming") else {
        return false;
    };
    is_sender(r, &nodes[from])
        || !nodes
            .iter()
            .enumerate()
            .any(|(i, c)| i != from && is_sender(r, c))
}

/// True when the WAL receiver's sender is `node` (hosts compared loosely for loopback).
pub fn is_sender(r: &Receiver, node: &BackendConfig) -> bool {
    let (host, port) = node.replication_addr();
    r.sender_port == Some(i32::from(port))
        && r.sender_host
            .as_deref()
            .is_none_or(|h| h == host || is_loopback(h) && is_loopback(host))
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1")
}

/// Picks the standby to promote: the most WAL received, then the highest priority,
/// then the name. `old_lsn` is the old primary's last known position.
pub fn choose(
    witnesses: &[Witness],
    nodes: &[Backend],
    old_lsn: Option<u64>,
    max_lag: u64,
    require_witness: bool,
) -> Result<usize, Refusal> {
    if require_witness && let Some(w) = witnesses.iter().find(|w| w.hears_primary) {
        return Err(Refusal::PrimaryAlive {
            witness: nodes[w.index].config.name.clone(),
        });
    }
    let best = witnesses.iter().max_by(|a, b| {
        let (na, nb) = (&nodes[a.index].config, &nodes[b.index].config);
        a.received
            .cmp(&b.received)
            .then(na.priority.cmp(&nb.priority))
            .then(nb.name.cmp(&na.name))
    });
    let best = best.ok_or(Refusal::NoCandidate)?;
    let lag = match (old_lsn, best.received) {
        (Some(old), Some(got)) => old.saturating_sub(got),
        (Some(_), None) => u64::MAX,
        (None, _) => 0,
    };
    if lag > max_lag {
        return Err(Refusal::TooFarBehind {
            candidate: nodes[best.index].config.name.clone(),
            lag,
        });
    }
    Ok(best.index)
}

/// How often a promotion under way is checked. pg_promote's own wait looks only
/// every 100 ms, most of which a failover would spend with the promotion done.
const PROMOTION_CHECK: Duration = Duration::from_millis(10);

/// Promotes `node` (unless it already is a primary) and returns its timeline.
pub async fn promote(
    node: &BackendConfig,
    login: &Login,
    wait_seconds: u64,
) -> Result<u32, Refusal> {
    let client = connect(node, login)
        .await
        .map_err(|reason| Refusal::PromoteFailed {
            candidate: node.name.clone(),
            reason,
        })?;
    promote_on(&client, node, wait_seconds).await
}

/// [`promote`] over an open control connection to `node`.
pub async fn promote_on(
    client: &Client,
    node: &BackendConfig,
    wait_seconds: u64,
) -> Result<u32, Refusal> {
    let failed = |reason: String| Refusal::PromoteFailed {
        candidate: node.name.clone(),
        reason,
    };
    // Bounded as a whole: a candidate that hangs would otherwise hold a query forever.
    let limit = Duration::from_secs(wait_seconds.max(1));
    let promoted = async {
        let mut signalled = false;
        loop {
            let row = client
                .query_one(
                    "SELECT pg_is_in_recovery(), CASE WHEN NOT pg_is_in_recovery() THEN \
                     ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
                    &[],
                )
                .await
                .map_err(|e| failed(describe(&e)))?;
            if !row.get::<_, bool>(0) {
                return Ok(row.get::<_, Option<i32>>(1).unwrap_or(0) as u32);
            }
            if signalled {
                tokio::time::sleep(PROMOTION_CHECK).await;
                continue;
            }
            // Only while in recovery: a new coordination leader repeats an interrupted
            // promotion, and pg_promote fails on a node that is already a primary.
            let sent: bool = client
                .query_one("SELECT pg_promote(false)", &[])
                .await
                .map_err(|e| failed(describe(&e)))?
                .get(0);
            if !sent {
                return Err(failed("pg_promote could not signal the promotion".into()));
            }
            signalled = true;
        }
    };
    tokio::time::timeout(limit, promoted)
        .await
        .unwrap_or_else(|_| {
            Err(failed(format!(
                "not promoted within promote_timeout ({limit:?})"
            )))
        })
}

/// The current WAL position of the primary `client` is connected to.
pub async fn current_lsn(client: &Client) -> Result<u64, String> {
    let lsn: tokio_postgres::types::PgLsn = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .map_err(|e| describe(&e))?
        .get(0);
    Ok(u64::from(lsn))
}

/// How a primary changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// automatic, after the primary failed
    Failover,
    /// planned, without client errors
    Switchover,
    /// ordered by an operator (PROMOTE)
    Promote,
}

impl Kind {
    /// Its name in logs and SHOW FAILOVERS.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Failover => "failover",
            Kind::Switchover => "switchover",
            Kind::Promote => "promote",
        }
    }
}

/// One primary change, for SHOW FAILOVERS and /status.
#[derive(Debug, Clone)]
pub struct Record {
    /// when it completed
    pub at: std::time::SystemTime,
    /// how
    pub kind: Kind,
    /// the primary before
    pub old_primary: Option<String>,
    /// the primary after
    pub new_primary: String,
    /// the new primary's timeline
    pub timeline: u32,
    /// failover: detection to the new primary routed; switchover: the pause
    pub window: std::time::Duration,
}

/// The last primary changes, newest last.
#[derive(Debug, Default)]
pub struct History {
    records: std::sync::Mutex<std::collections::VecDeque<Record>>,
}

impl History {
    const KEPT: usize = 100;

    /// Adds a record, forgetting the oldest beyond a hundred.
    pub fn record(&self, record: Record) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() == Self::KEPT {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// Every record kept, oldest first.
    pub fn all(&self) -> Vec<Record> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.iter().cloned().collect()
    }
}

/// Starts a checkpoint on a freshly promoted node, in the background: until its
/// first checkpoint its control file still names the old timeline, which makes
/// `pg_rewind` of the old primary conclude that no rewind is needed.
pub fn checkpoint_soon(node: BackendConfig, login: Login) {
    tokio::spawn(async move {
        let done = async {
            let client = connect(&node, &login).await?;
            client
                .batch_execute("CHECKPOINT")
                .await
                .map_err(|e| describe(&e))
        };
        if let Err(e) = done.await {
            tracing::warn!(backend = %node.name, error = %e, "post-promotion checkpoint failed");
        }
    });
}

/// Points `standby` at `primary`: it reloads `primary_conninfo` and follows the new
/// timeline without a restart (PostgreSQL 13+).
pub async fn repoint(
    standby: &BackendConfig,
    primary: &BackendConfig,
    login: &Login,
    replication: (&str, &str),
) -> Result<(), String> {
    let (host, port) = primary.replication_addr();
    let conninfo = format!(
        "host={} port={} user={} password={} application_name={}",
        conninfo_value(host),
        port,
        conninfo_value(replication.0),
        conninfo_value(replication.1),
        conninfo_value(&standby.name)
    );
    let client = connect(standby, login).await?;
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET primary_conninfo = {}",
            literal(&conninfo)
        ))
        .await
        .map_err(|e| describe(&e))?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(|e| describe(&e))
}

/// Makes new transactions on `node` read-only by default (or undoes it): the part
/// of fencing pgwarden can do to a node it can still reach.
pub async fn set_read_only(node: &BackendConfig, login: &Login, on: bool) -> Result<(), String> {
    read_only(&connect(node, login).await?, on).await
}

/// [`set_read_only`] over an open control connection.
pub async fn read_only(client: &Client, on: bool) -> Result<(), String> {
    let statement = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    client
        .batch_execute(statement)
        .await
        .map_err(|e| describe(&e))?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(|e| describe(&e))
}

/// A libpq connection-string value, quoted when it needs to be.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Health;

    fn node(name: &str, port: u16, priority: i32) -> Backend {
        Backend {
            health: Health::Up,
            ..Backend::new(BackendConfig {
                name: name.into(),
                host: "127.0.0.1".into(),
                port,
                priority,
                replication_host: None,
                replication_port: None,
            })
        }
    }

    fn witness(index: usize, received: u64) -> Witness {
        Witness {
            index,
            hears_primary: false,
            received: Some(received),
        }
    }

    #[test]
    fn the_most_wal_wins_then_priority_then_name() {
        let nodes = vec![
            node("old", 1, 0),
            node("b", 2, 0),
            node("c", 3, 5),
            node("d", 4, 5),
        ];
        assert_eq!(
            choose(
                &[witness(1, 90), witness(2, 80)],
                &nodes,
                Some(100),
                1000,
                true
            ),
            Ok(1)
        );
        assert_eq!(
            choose(
                &[witness(1, 90), witness(2, 90)],
                &nodes,
                Some(100),
                1000,
                true
            ),
            Ok(2)
        );
        assert_eq!(
            choose(
                &[witness(3, 90), witness(2, 90)],
                &nodes,
                Some(100),
                1000,
                true
            ),
            Ok(2)
        );
        assert_eq!(
            choose(&[], &nodes, Some(100), 1000, true),
            Err(Refusal::NoCandidate)
        );
    }

    #[test]
    fn refuses_when_a_witness_hears_the_primary_or_the_lag_is_too_large() {
        let nodes = vec![node("old", 1, 0), node("b", 2, 0)];
        let hearing = Witness {
            hears_primary: true,
            ..witness(1, 100)
        };
        assert!(matches!(
            choose(std::slice::from_ref(&hearing), &nodes, Some(100), 0, true),
            Err(Refusal::PrimaryAlive { .. })
        ));
        assert_eq!(choose(&[hearing], &nodes, Some(100), 0, false), Ok(1));
        assert!(matches!(
            choose(&[witness(1, 10)], &nodes, Some(100), 50, true),
            Err(Refusal::TooFarBehind { lag: 90, .. })
        ));
    }

    #[test]
    fn streaming_is_matched_to_the_sender() {
        let configs: Vec<BackendConfig> = [node("a", 1, 0), node("b", 2, 0)]
            .into_iter()
            .map(|n| n.config)
            .collect();
        let from = |port: i32, status: &str| Receiver {
            status: status.into(),
            sender_host: Some("localhost".into()),
            sender_port: Some(port),
        };
        assert!(streams_from(Some(&from(1, "streaming")), 0, &configs));
        assert!(!streams_from(Some(&from(2, "streaming")), 0, &configs));
        assert!(!streams_from(Some(&from(1, "waiting")), 0, &configs));
        assert!(!streams_from(None, 0, &configs));
        // An unknown sender (a relay, a DNS name) counts as the primary: be safe.
        assert!(streams_from(Some(&from(9, "streaming")), 0, &configs));
    }

    #[test]
    fn conninfo_values_are_quoted_when_needed() {
        assert_eq!(conninfo_value("pg1"), "pg1");
        assert_eq!(conninfo_value("it's"), "'it\\'s'");
        assert_eq!(conninfo_value(""), "''");
    }
}
