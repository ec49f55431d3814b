//! The etcd side of coordination: one session per connection, holding a lease,
//! campaigning for the leader key, and watching the cluster state.
//!
//! Keys under `prefix`: `leader` holds the leader's `name#lease`, bound to its
//! lease (so it vanishes when the leader stops renewing), created only if absent
//! (a compare on its create revision); `state` holds the [`ClusterState`] JSON,
//! written only in a transaction that compares `leader` with the writer's id, so a
//! proxy that lost the lease cannot publish anything; `alarm/<name>`, bound to
//! the follower's lease, is rewritten whenever that follower saw the primary fail,
//! and the leader probes at once on every write it watches there. A session that fails for
//! any reason (etcd down, a wrong password, a refused certificate) drops to
//! [`Role::Disconnected`], keeps the reason in the snapshot for SHOW COORDINATION,
//! and a new one starts a second later.

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tracing::{debug, warn};

use super::{ClusterState, Coordinator, Error, Role};
use crate::config::CoordinationConfig;
use crate::proxy::Shared;

/// What the leader needs to write: a client and the value of its leader key.
pub(super) struct Leadership {
    client: Client,
    id: String,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("id", &self.id).finish()
    }
}

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Self {
        Error::Etcd(describe(&e))
    }
}

/// One line for an etcd error: etcd's own message for a refused request (a wrong
/// password, a missing permission), and every cause after it, since a failed TLS
/// handshake only shows there (the client's message is "transport error").
fn describe(e: &etcd_client::Error) -> String {
    let (mut line, mut cause) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            (format!("{:?}: {}", s.code(), s.message()), s.source())
        }
        etcd_client::Error::TransportError(t) => (t.to_string(), t.source()),
        other => (other.to_string(), None),
    };
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = c.source();
    }
    line
}

/// How to reach etcd: every wait bounded by a third of the lease, with the
/// section's user and TLS material.
fn connect_options(c: &CoordinationConfig) -> ConnectOptions {
    let bound = c.lease_ttl / 3;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(bound)
        .with_timeout(bound)
        .with_keep_alive(bound, bound);
    if let Some((user, password)) = &c.access.credentials {
        // etcd's tokens expire (after 5 minutes by default): renewing one beats
        // losing the session, and the leadership with it.
        options = options
            .with_user(user, password)
            .with_auto_token_refresh(true);
    }
    if c.uses_tls() {
        let tls = TlsOptions::new().timeout(bound);
        let tls = match &c.access.ca {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        let tls = match &c.access.identity {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        };
        options = options.with_tls(tls);
    }
    options
}

fn leader_key(c: &Coordinator) -> String {
    format!("{}/leader", c.config.prefix)
}

fn state_key(c: &Coordinator) -> String {
    format!("{}/state", c.config.prefix)
}

fn alarm_prefix(c: &Coordinator) -> String {
    format!("{}/alarm/", c.config.prefix)
}

/// How many distinct failures are remembered so as not to log them again.
const REPORTED: usize = 8;

/// Sessions until shutdown, a second apart when etcd fails.
pub(super) async fn run(shared: Arc<Shared>, coordinator: Arc<Coordinator>) {
    let mut reported = Vec::with_capacity(REPORTED);
    loop {
        let ended = tokio::select! {
            ended = session(&shared, &coordinator) => ended,
            () = shared.shutdown.cancelled() => Ok(()),
        };
        let resigned = step_down(&coordinator);
        match ended {
            Ok(()) => {
                // Shutting down: hand the leadership over now rather than after the lease.
                if let Some(mut l) = resigned {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        l.client.delete(leader_key(&coordinator), None),
                    )
                    .await;
                }
                coordinator.transition(&shared, Role::Disconnected, "shutting down");
                return;
            }
            Err(e) => {
                let was_up = coordinator.snapshot().role != Role::Disconnected;
                let error = reason(&coordinator.config, &e, was_up);
                if was_up {
                    reported.clear();
                }
                // Each cause once while etcd stays out of reach, not at every retry: a
                // wrong password fails the same way each second, and a refused client
                // certificate in one of two ways (see `reason`).
                if !reported.contains(&error) {
                    if was_up {
                        warn!(error = %error, "coordination: etcd session lost; no promotion until it is back");
                    } else {
                        warn!(error = %error, endpoints = ?coordinator.config.etcd, "coordination: cannot use etcd; no promotion until it can");
                    }
                    if reported.len() == REPORTED {
                        reported.remove(0);
                    }
                    reported.push(error.clone());
                }
                coordinator.snapshot.send_modify(|s| s.error = Some(error));
                coordinator.transition(&shared, Role::Disconnected, "etcd session lost");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shared.shutdown.cancelled() => return,
        }
    }
}

/// What to report for a failed session: its error, with a hint where etcd's own
/// reason is lost. Over TLS 1.3 the client finishes its handshake before etcd
/// checks the client certificate, so etcd's refusal races the first request and
/// often shows only as a closed connection.
fn reason(c: &CoordinationConfig, e: &Error, was_up: bool) -> String {
    let reason = e.to_string();
    if c.uses_tls() && !was_up && reason.ends_with("connection closed") {
        return format!(
            "{reason} (etcd may have refused the client certificate: check cert_file and key_file, and etcd's --trusted-ca-file)"
        );
    }
    reason
}

fn step_down(c: &Coordinator) -> Option<Leadership> {
    c.leadership
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
}

/// One connection's life: lease, state, watch, campaign; returns only on failure or shutdown.
async fn session(shared: &Shared, c: &Coordinator) -> Result<(), Error> {
    let ttl = c.config.lease_ttl;
    let mut client = Client::connect(&c.config.etcd, Some(connect_options(&c.config))).await?;
    let lease = client
        .lease_grant(ttl.as_secs().max(2) as i64, None)
        .await?
        .id();
    let id = format!("{}#{lease:x}", c.name);
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await?;
    let mut renewed = Instant::now();

    // The state first: a restarted proxy adopts it before it may decide anything.
    let got = client.get(state_key(c), None).await?;
    let revision = got.header().map_or(0, |h| h.revision());
    c.observe(
        shared,
        parse(got.kvs().first().map(|kv| kv.value())),
        revision,
    );
    let mut watch = client
        .watch(
            c.config.prefix.clone() + "/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    c.snapshot.send_modify(|s| s.lease = Some(lease));
    c.transition(shared, Role::Follower, "connected to etcd");
    campaign(shared, c, &mut client, lease, &id).await?;

    let mut tick = tokio::time::interval(ttl / 4);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A partition may swallow answers without an error: trust the lease
                // only as long as etcd confirmed it recently.
                if renewed.elapsed() > ttl * 2 / 3 {
                    return Err(Error::LeaseExpired);
                }
                keeper.keep_alive().await?;
                if c.snapshot().role != Role::Leader {
                    campaign(shared, c, &mut client, lease, &id).await?;
                }
            }
            () = c.relay.notified() => {
                // Only a head start for the leader, which also probes on its own: a
                // refused write (say, a role without rights on the alarm keys) is
                // reported, not a reason to leave the election.
                let key = alarm_prefix(c) + &c.name;
                match client.put(key, id.as_str(), Some(PutOptions::new().with_lease(lease))).await {
                    Ok(_) => shared.metrics.coordination_alarms.with_label_values(&["sent"]).inc(),
                    Err(e) => warn!(error = %describe(&e), "coordination: could not pass an alarm on to the leader"),
                }
            }
            renewal = renewals.message() => match renewal? {
                Some(r) if r.ttl() > 0 => renewed = Instant::now(),
                _ => return Err(Error::LeaseExpired),
            },
            event = watch.message() => {
                let response = event?.ok_or_else(|| Error::Etcd("watch closed".into()))?;
                for e in response.events() {
                    let Some(kv) = e.kv() else { continue };
                    if kv.key() == state_key(c).as_bytes() && e.event_type() == EventType::Put {
                        c.observe(shared, parse(Some(kv.value())), kv.mod_revision());
                    } else if kv.key() == leader_key(c).as_bytes() && e.event_type() == EventType::Delete {
                        // The leader resigned or its lease expired: campaign at once.
                        campaign(shared, c, &mut client, lease, &id).await?;
                    } else if e.event_type() == EventType::Put && c.is_leader()
                        && let Some(from) = kv.key().strip_prefix(alarm_prefix(c).as_bytes())
                        && from != c.name.as_bytes()
                    {
                        debug!(from = %String::from_utf8_lossy(from), "coordination: a follower saw the primary fail; probing now");
                        shared.metrics.coordination_alarms.with_label_values(&["received"]).inc();
                        shared.alarm.notify_one();
                    }
                }
            }
        }
    }
}

/// Takes the leader key if nobody holds it; otherwise notes who does.
async fn campaign(
    shared: &Shared,
    c: &Coordinator,
    client: &mut Client,
    lease: i64,
    id: &str,
) -> Result<(), Error> {
    let key = leader_key(c);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            id,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let response = client.txn(txn).await?;
    if response.succeeded() {
        *c.leadership.lock().unwrap_or_else(|e| e.into_inner()) = Some(Leadership {
            client: client.clone(),
            id: id.to_owned(),
        });
        c.snapshot.send_modify(|s| s.leader = Some(id.to_owned()));
        c.transition(shared, Role::Leader, "took the leader key");
        return Ok(());
    }
    let holder = response.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        _ => None,
    });
    c.snapshot.send_modify(|s| s.leader = holder);
    Ok(())
}

/// A stored state, or none when absent or unreadable (logged: a proxy must not
/// act on a value it does not understand).
fn parse(value: Option<&[u8]>) -> Option<ClusterState> {
    let value = value?;
    ClusterState::parse(value)
        .inspect_err(|e| warn!(error = %e, "coordination: ignoring an unreadable cluster state"))
        .ok()
}

/// Writes `state` if this proxy still holds the leader key, in one transaction.
pub(super) async fn write(c: &Coordinator, state: &ClusterState) -> Result<i64, Error> {
    let (mut client, id) = {
        let guard = c.leadership.lock().unwrap_or_else(|e| e.into_inner());
        let l = guard.as_ref().ok_or(Error::NotLeader)?;
        (l.client.clone(), l.id.clone())
    };
    let txn = Txn::new()
        .when([Compare::value(leader_key(c), CompareOp::Equal, id)])
        .and_then([TxnOp::put(state_key(c), state.to_json(), None)]);
    let response = tokio::time::timeout(c.config.lease_ttl / 3, client.txn(txn))
        .await
        .map_err(|_| Error::Etcd("timed out".into()))??;
    if !response.succeeded() {
        return Err(Error::NotLeader);
    }
    Ok(response.header().map_or(0, |h| h.revision()))
}
