//! The health monitor: probes every backend, keeps each node's state, decides
//! which node is the primary, runs the failover controller when the primary is
//! down, and publishes the routing table.
//!
//! It is the only writer of the routing table. Each backend has a prober task
//! ([`probe`]) that reports to this loop; each report moves the node's state
//! machine (`Unknown → Up ⇄ Suspect → Down`, see [`Health`]), after which the
//! monitor re-decides and publishes a new table when anything changed. Clients
//! that see a server connection fail raise an alarm that makes every prober
//! probe at once, so a crash is confirmed in a few hundred milliseconds rather
//! than at the next interval. A coordination follower passes that alarm, and its
//! failed probes of the primary, on to the leader, which decides.
//!
//! Failover modes: `auto` promotes (see [`crate::failover`]); `follow` routes to
//! whichever node reports itself primary, newest timeline first; `off` routes to
//! the first backend whatever happens.
//!
//! A process that waits for its clients to leave (SHUTDOWN WAIT_FOR_CLIENTS, a
//! rolling restart) has handed its port to a new process, which now decides:
//! without `[coordination]` to elect one of the two, the leaving one turns from
//! `auto` to `follow`, and promotes, records and unfences nothing more. Until
//! then the new process follows: on a shared port only the holder of the
//! decider lock ([`crate::coordination::local`]) decides.

mod coordinated;
pub mod probe;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::backend::{Backend, BackendTable, Health, Role};
use crate::config::{Config, FailoverMode};
use crate::coordination::Step;
use crate::coordination::local::{self, Added, DeciderLock};
use crate::failover::hooks::{self, Event, EventKind};
use crate::failover::{self, Kind, Record, Refusal};
use crate::proxy::Shared;
use probe::{Login, Prober, Report};
use tokio_postgres::Client;

/// An operator's request to the monitor, which owns the routing table.
#[derive(Debug)]
pub enum Request {
    /// FENCE node
    Fence(String),
    /// UNFENCE node
    Unfence(String),
    /// PROMOTE node
    Promote(String),
    /// SWITCHOVER [TO node]
    Switchover(Option<String>),
}

type Reply = oneshot::Sender<Result<String, String>>;

/// The admin console's line to the monitor.
#[derive(Debug)]
pub struct Commands {
    sender: mpsc::UnboundedSender<(Request, Reply)>,
    receiver: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(Request, Reply)>>>,
}

impl Default for Commands {
    fn default() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Commands {
            sender,
            receiver: std::sync::Mutex::new(Some(receiver)),
        }
    }
}

impl Commands {
    /// Sends a request and waits for the monitor's answer.
    pub async fn ask(&self, request: Request) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send((request, reply))
            .map_err(|_| "the health monitor is not running".to_owned())?;
        answer
            .await
            .map_err(|_| "the health monitor stopped".to_owned())?
    }

    fn take(&self) -> Option<mpsc::UnboundedReceiver<(Request, Reply)>> {
        self.receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Runs the monitor until shutdown; with `decider`, it decides failovers only
/// while it holds that lock.
pub async fn run(shared: Arc<Shared>, decider: Option<DeciderLock>) {
    let Some(mut commands) = shared.monitor.take() else {
        error!("the health monitor is already running");
        return;
    };
    let mut published = shared.coordination.as_ref().map(|c| c.subscribe());
    let mut monitor = Monitor::new(shared, decider);
    monitor.start_probers();
    monitor.restore();
    monitor.announce_lock();
    monitor.publish();
    let mut lock_retry = tokio::time::interval(local::RETRY);
    lock_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            snapshot = crate::coordination::changed(&mut published) => monitor.adopt(snapshot).await,
            Some(report) = monitor.reports.recv() => monitor.on_report(report).await,
            () = monitor.shared.alarm.notified() => monitor.on_alarm(),
            () = monitor.shared.reconfigured.notified() => monitor.reconfigure(),
            () = monitor.shared.leaving.cancelled(), if !monitor.leaving => monitor.leave(),
            _ = lock_retry.tick(), if monitor.waits_for_lock() => monitor.retry_lock(),
            Some((request, reply)) = commands.recv() => {
                let answer = monitor.command(request).await;
                let _ = reply.send(answer);
            }
            () = monitor.shared.shutdown.cancelled() => return,
        }
    }
}

struct Monitor {
    shared: Arc<Shared>,
    config: Arc<Config>,
    nodes: Vec<Backend>,
    probers: Vec<Prober>,
    /// the node pgwarden routes writes to (it may be down while a failover is pending)
    primary: Option<usize>,
    split_brain: bool,
    generation: u64,
    epoch: u64,
    reports: mpsc::UnboundedReceiver<Report>,
    report_sender: mpsc::UnboundedSender<Report>,
    /// the failover in progress: when it was detected, and the last refusal logged
    pending: Option<(Instant, Option<Refusal>)>,
    next_attempt: Instant,
    /// fenced nodes pgwarden made read-only
    read_only: HashSet<usize>,
    /// per node: reports of probes started before this are stale (the node was just promoted)
    not_before: Vec<SystemTime>,
    /// the cluster state last read from (or written to) etcd or the state file
    published: Option<crate::coordination::ClusterState>,
    /// when an unfinished failover found recorded may next be retried
    resume_at: Instant,
    /// when this proxy last passed an alarm on to the coordination leader
    relayed_at: Option<Instant>,
    /// this process stopped listening (SHUTDOWN WAIT_FOR_CLIENTS)
    leaving: bool,
    /// on a shared port without `[coordination]`: decide only while holding it
    decider_lock: Option<DeciderLock>,
}

impl Monitor {
    fn new(shared: Arc<Shared>, decider_lock: Option<DeciderLock>) -> Monitor {
        let config = shared.config.load_full();
        let table = shared.routing.load_full();
        let (report_sender, reports) = mpsc::unbounded_channel();
        Monitor {
            nodes: table.backends.clone(),
            primary: table.primary,
            split_brain: false,
            generation: table.generation,
            epoch: 0,
            probers: Vec::new(),
            reports,
            report_sender,
            pending: None,
            next_attempt: Instant::now(),
            read_only: HashSet::new(),
            not_before: Vec::new(),
            published: None,
            resume_at: Instant::now(),
            relayed_at: None,
            leaving: false,
            decider_lock,
            config,
            shared,
        }
    }

    /// How the monitor and the controller log in.
    fn login(&self) -> Option<Login> {
        let health = &self.config.health;
        let users = self.shared.users.load();
        match users.get(&health.user).map(|c| c.secret.clone()) {
            Some(crate::auth::Secret::Plain(password)) => Some(Login {
                user: health.user.clone(),
                password,
                dbname: health.dbname.clone(),
                timeout: health.timeout,
                tls: self.shared.tls.load_full(),
            }),
            _ => None,
        }
    }

    fn start_probers(&mut self) {
        self.epoch += 1;
        self.probers.clear();
        self.not_before = vec![SystemTime::UNIX_EPOCH; self.nodes.len()];
        let Some(login) = self.login() else {
            error!(user = %self.config.health.user, "health.user has no plain password in the user list: backends are not probed");
            return;
        };
        for (index, node) in self.nodes.iter().enumerate() {
            self.probers.push(Prober::start(
                index,
                self.epoch,
                node.config.clone(),
                login.clone(),
                self.config.health.interval,
                self.report_sender.clone(),
            ));
        }
    }

    /// A reload: keep what is known about unchanged backends, start over for the rest.
    fn reconfigure(&mut self) {
        let config = self.shared.config.load_full();
        let primary_name = self.primary.map(|p| self.nodes[p].config.name.clone());
        let old = std::mem::take(&mut self.nodes);
        self.nodes = config
            .backends
            .iter()
            .map(|c| {
                old.iter()
                    .find(|n| n.config == *c)
                    .cloned()
                    .unwrap_or_else(|| Backend::new(c.clone()))
            })
            .collect();
        self.primary =
            primary_name.and_then(|name| self.nodes.iter().position(|n| n.config.name == name));
        self.read_only.clear();
        self.add_lock_file(&config);
        self.config = self.decider(config);
        self.start_probers();
        self.decide_static();
        self.publish();
    }

    /// After a reload: the decider lock also covers the file the new configuration
    /// names, where a process started with it will look.
    fn add_lock_file(&mut self, config: &Config) {
        let Some(lock) = &mut self.decider_lock else {
            return;
        };
        let path = DeciderLock::path(config);
        match lock.add(&path) {
            Ok(Added::Known) => {}
            Ok(Added::Taken) => {
                info!(lock = %lock.files(), added = %path.display(), "the decider lock now covers the lock file of the reloaded configuration too");
            }
            Ok(Added::HeldElsewhere) => {
                warn!(lock = %lock.files(), added = %path.display(), "another process holds the lock file of the reloaded configuration and decides failovers through it, as this one does: both will fail over on their own until one of them stops");
            }
            Err(e) => {
                warn!(error = %e, "cannot open the lock file of the reloaded configuration; a pgwarden started with it will decide beside this one");
            }
        }
    }

    /// This process stopped listening. Without `[coordination]` it stops deciding:
    /// it follows. (Once only: the token stays cancelled.)
    fn leave(&mut self) {
        self.leaving = true;
        // Closing the file lets the process that took the port over decide.
        self.decider_lock = None;
        // A shutdown stops listening too, but then this monitor is about to stop.
        if !self.hands_over() || self.shared.shutdown.is_cancelled() {
            return;
        }
        if self.config.failover.mode == FailoverMode::Auto {
            info!(
                from = "auto",
                to = "follow",
                "failover mode changed: this process stopped listening, the one that took its port over decides"
            );
        }
        self.config = self.decider(self.config.clone());
    }

    /// True once this process stopped listening, with no election to leave the
    /// decisions to: the process that took its port over makes them.
    fn hands_over(&self) -> bool {
        self.leaving && self.shared.coordination.is_none()
    }

    /// The decider lock while another process on this port holds it.
    fn waiting_lock(&self) -> Option<&DeciderLock> {
        self.decider_lock.as_ref().filter(|l| !l.held())
    }

    /// True while another process on this port holds the decider lock.
    fn waits_for_lock(&self) -> bool {
        self.waiting_lock().is_some()
    }

    /// At start-up, with a shared port: says which process decides.
    fn announce_lock(&mut self) {
        let Some(lock) = &self.decider_lock else {
            return;
        };
        if lock.held() {
            info!(lock = %lock.files(), "this pgwarden decides failovers for its port (it holds the decider lock)");
            return;
        }
        if self.config.failover.mode == FailoverMode::Auto {
            info!(
                from = "auto",
                to = "follow",
                decider = %lock.who_decides(),
                "failover mode changed: another pgwarden on this port decides; this one follows until that one stops listening"
            );
        }
        self.config = self.decider(self.config.clone());
    }

    /// Tries the decider lock again; once it is taken this process decides, from
    /// the state file the previous holder left.
    fn retry_lock(&mut self) {
        let Some(lock) = &mut self.decider_lock else {
            return;
        };
        match lock.try_take() {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => {
                warn!(lock = %lock.files(), error = %e, "cannot take the decider lock; still following");
                return;
            }
        }
        let config = self.shared.config.load_full();
        if config.failover.mode == FailoverMode::Auto {
            info!(
                from = "follow",
                to = "auto",
                lock = %lock.files(),
                "failover mode changed: the pgwarden that decided let go of the decider lock or stopped listening (or exited); this one decides"
            );
        }
        self.config = self.decider(config);
        self.restore();
    }

    /// `config`, in `follow` mode while this process does not decide: it handed
    /// the decisions over, or another process on its port holds the decider lock.
    fn decider(&self, config: Arc<Config>) -> Arc<Config> {
        if !(self.hands_over() || self.waits_for_lock())
            || config.failover.mode != FailoverMode::Auto
        {
            return config;
        }
        let mut following = (*config).clone();
        following.failover.mode = FailoverMode::Follow;
        Arc::new(following)
    }

    async fn on_report(&mut self, report: Report) {
        if report.epoch != self.epoch
            || report.index >= self.nodes.len()
            || report.started < self.not_before[report.index]
        {
            return;
        }
        let threshold = self.config.health.failure_threshold;
        let node = &mut self.nodes[report.index];
        // A probe that only ran out of time while the node went on completing clients'
        // transactions met a busy server, not a dead one: counting it would cut every
        // transaction on a primary that is merely loaded. A hung node completes none.
        if report.timed_out
            && self
                .shared
                .pools
                .backend_answered_within(&node.config.name, self.config.health.timeout)
        {
            info!(backend = %node.config.name, "probe timed out while the backend kept answering clients; not counted as a failure");
            return;
        }
        if report.result.is_err() && self.primary == Some(report.index) {
            self.relay_alarm();
        }
        let node = &mut self.nodes[report.index];
        let before = (node.health, node.role());
        node.health = node.health.after(report.result.is_ok(), threshold);
        node.checked_at = Some(report.started);
        let name = node.config.name.as_str();
        let reason = match report.result {
            Ok(facts) => {
                self.shared
                    .metrics
                    .probe_seconds
                    .with_label_values(&[name])
                    .observe(facts.latency.as_secs_f64());
                node.facts = Some(facts);
                None
            }
            Err(reason) => {
                self.shared
                    .metrics
                    .probe_failures
                    .with_label_values(&[name])
                    .inc();
                Some(reason)
            }
        };
        let after = (node.health, node.role());
        if before != after {
            let name = &node.config.name;
            match after.0 {
                Health::Down => {
                    warn!(backend = %name, from = before.0.name(), to = "down", reason = reason.as_deref().unwrap_or(""), "backend state changed")
                }
                Health::Suspect { failures } => {
                    info!(backend = %name, from = before.0.name(), to = "suspect", failures, reason = reason.as_deref().unwrap_or(""), "backend state changed")
                }
                _ => {
                    info!(backend = %name, from = before.0.name(), to = after.0.name(), role = ?after.1, "backend state changed")
                }
            }
        }
        match self.config.failover.mode {
            FailoverMode::Auto => self.decide_auto().await,
            FailoverMode::Follow | FailoverMode::Off => self.decide_static(),
        }
        self.watch_fenced().await;
        self.publish();
        self.share_decision().await;
    }

    /// `off` and `follow`: no promotions, only the choice of where to route.
    fn decide_static(&mut self) {
        match self.config.failover.mode {
            FailoverMode::Off => self.primary = Some(0).filter(|_| !self.nodes.is_empty()),
            FailoverMode::Follow => {
                let reporting = self.reporting_primaries();
                self.split_brain = reporting.len() > 1;
                if let Some(best) = self.newest(&reporting)
                    && self.primary != Some(best)
                {
                    self.set_primary(best, "reports itself primary");
                }
            }
            FailoverMode::Auto => {}
        }
    }

    /// `auto`: keep the primary, fail over when it is down, and settle two primaries.
    async fn decide_auto(&mut self) {
        let reporting = self.reporting_primaries();
        let Some(p) = self.primary else {
            // Start-up (or the primary was demoted outside pgwarden): take the node
            // that reports itself primary; never promote without having seen one.
            if let Some(best) = self.newest(&reporting) {
                self.set_primary(best, "reports itself primary");
                self.fence_others(best, &reporting);
            }
            return;
        };
        let node = &self.nodes[p];
        if node.health == Health::Down && !node.fenced {
            self.fail_over(p).await;
            return;
        }
        if self.pending.take().is_some() {
            info!(backend = %self.nodes[p].config.name, "primary is reachable again; no failover");
        }
        if node.routable() && node.role() == Some(Role::Standby) {
            warn!(backend = %node.config.name, "the primary is now a standby (demoted outside pgwarden)");
            self.primary = None;
            if let Some(best) = self.newest(&reporting) {
                self.set_primary(best, "reports itself primary");
            }
            return;
        }
        if reporting.iter().any(|&q| q != p) {
            let best = self.newest(&reporting).unwrap_or(p);
            if best != p {
                self.set_primary(best, "newer timeline than the current primary");
            }
            self.fence_others(best, &reporting);
        }
    }

    /// Nodes that are routable and report themselves primary.
    fn reporting_primaries(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].routable() && self.nodes[i].role() == Some(Role::Primary))
            .collect()
    }

    /// Of `candidates`, the newest timeline; ties go to the current primary, then config order.
    fn newest(&self, candidates: &[usize]) -> Option<usize> {
        let timeline = |i: usize| {
            self.nodes[i]
                .facts
                .as_ref()
                .and_then(|f| f.timeline)
                .unwrap_or(0)
        };
        candidates
            .iter()
            .copied()
            .max_by_key(|&i| (timeline(i), Some(i) == self.primary, std::cmp::Reverse(i)))
    }

    fn set_primary(&mut self, index: usize, why: &str) {
        let timeline = self.nodes[index].facts.as_ref().and_then(|f| f.timeline);
        info!(backend = %self.nodes[index].config.name, ?timeline, why, "routing writes to new primary");
        self.primary = Some(index);
    }

    /// Fences every node in `reporting` but `keep`: two primaries, one routed.
    fn fence_others(&mut self, keep: usize, reporting: &[usize]) {
        for &q in reporting.iter().filter(|&&q| q != keep) {
            error!(
                backend = %self.nodes[q].config.name,
                primary = %self.nodes[keep].config.name,
                "split brain: two nodes report themselves primary; fencing the older timeline"
            );
            self.fence(q);
            self.hook(EventKind::SplitBrain, q, Some(keep), None);
        }
    }

    fn fence(&mut self, index: usize) {
        if !self.nodes[index].fenced {
            self.nodes[index].fenced = true;
            self.shared.metrics.fencings.inc();
            info!(backend = %self.nodes[index].config.name, "fenced: no longer routed to");
            let primary = self.primary;
            self.hook(EventKind::Fence, index, primary, None);
        }
    }

    /// Detect → confirm → select → promote → publish → re-point → fence.
    async fn fail_over(&mut self, old: usize) {
        if Instant::now() < self.next_attempt {
            return;
        }
        self.next_attempt = Instant::now() + self.config.health.interval;
        let old_name = self.nodes[old].config.name.clone();
        let detected = match &self.pending {
            Some((at, _)) => *at,
            None => {
                warn!(step = "detected", backend = %old_name, "failover: primary is down");
                self.pending = Some((Instant::now(), None));
                Instant::now()
            }
        };
        let ms = || detected.elapsed().as_millis() as u64;
        if let Err(refusal) = self.may_promote() {
            self.refuse(&old_name, detected, refusal);
            return;
        }
        if self.resume().await {
            return;
        }
        if self.unprobed(Some(old)) {
            self.next_attempt = Instant::now();
            return;
        }
        let Some(login) = self.login() else { return };
        let f = self.config.failover.clone();
        let witnesses = failover::poll_standbys(&self.nodes, old, &login).await;
        let old_lsn = self.nodes[old].facts.as_ref().and_then(|f| f.lsn);
        let candidate = match failover::choose(
            &witnesses,
            &self.nodes,
            old_lsn,
            f.maximum_lag_on_failover,
            f.require_witness,
        ) {
            Ok(c) => c,
            Err(refusal) => {
                self.refuse(&old_name, detected, refusal);
                return;
            }
        };
        if let Err(refusal) = self.intend(Some(old), candidate).await {
            self.refuse(&old_name, detected, refusal);
            return;
        }
        let new_name = self.nodes[candidate].config.name.clone();
        info!(step = "confirmed", backend = %old_name, witnesses = witnesses.len(), require_witness = f.require_witness, elapsed_ms = ms(), "failover: primary loss confirmed");
        info!(step = "selected", candidate = %new_name, received_lsn = ?witnesses.iter().find(|w| w.index == candidate).and_then(|w| w.received), elapsed_ms = ms(), "failover: candidate selected");
        let timeline = match failover::promote(
            &self.nodes[candidate].config,
            &login,
            f.promote_timeout.as_secs(),
        )
        .await
        {
            Ok(t) => t,
            Err(refusal) => {
                error!(step = "promote_failed", candidate = %new_name, reason = %refusal, elapsed_ms = ms(), "failover: promotion failed");
                self.pending = Some((detected, Some(refusal)));
                return;
            }
        };
        info!(step = "promoted", backend = %new_name, timeline, elapsed_ms = ms(), "failover: standby promoted");
        self.pending = None;
        self.publish_promotion(Some(old), candidate, timeline, &login);
        info!(step = "published", primary = %new_name, generation = self.generation, elapsed_ms = ms(), "failover: new primary routed");
        self.shared.metrics.failovers.inc();
        self.after_promotion(
            Some(old),
            candidate,
            timeline,
            &login,
            Kind::Failover,
            detected.elapsed(),
        )
        .await;
    }

    /// True (and logged) while a node other than `old` has not answered a first
    /// probe: right after a start-up, choosing without it could promote a standby
    /// with less WAL than it has, and re-pointing would skip it (stranded on the
    /// dead primary, where synchronous commits wait for it forever).
    fn unprobed(&self, old: Option<usize>) -> bool {
        let Some(n) = (0..self.nodes.len())
            .filter(|&i| Some(i) != old)
            .map(|i| &self.nodes[i])
            .find(|n| !n.fenced && n.health == Health::Unknown)
        else {
            return false;
        };
        info!(step = "waiting", backend = %n.config.name, "failover: waiting for the first probe of every standby");
        true
    }

    /// Logs why a failover does not happen (once per reason) and keeps it pending.
    fn refuse(&mut self, old_name: &str, detected: Instant, refusal: Refusal) {
        if self.pending.as_ref().and_then(|p| p.1.as_ref()) != Some(&refusal) {
            let elapsed_ms = detected.elapsed().as_millis() as u64;
            warn!(step = "refused", backend = %old_name, reason = %refusal, elapsed_ms, "failover: not promoting");
            self.pending = Some((detected, Some(refusal)));
        }
    }

    /// Takes `new` as the primary on `timeline` before any probe says so.
    fn assume_primary(&mut self, new: usize, timeline: Option<u32>) {
        if let Some(facts) = self.nodes[new].facts.as_mut() {
            facts.role = Role::Primary;
            facts.timeline = timeline.or(facts.timeline);
        }
        self.primary = Some(new);
        // A probe of the new primary that started before the promotion would say "standby".
        // (Without a monitor login there are no probers: adopting a published primary still works.)
        if let Some(since) = self.not_before.get_mut(new) {
            *since = SystemTime::now();
        }
        if let Some(prober) = self.probers.get(new) {
            prober.wake();
        }
    }

    /// Routes writes to a freshly promoted node and fences the old primary.
    fn publish_promotion(&mut self, old: Option<usize>, new: usize, timeline: u32, login: &Login) {
        self.assume_primary(new, Some(timeline));
        if let Some(old) = old.filter(|&o| o != new) {
            self.fence(old);
        }
        self.publish();
        failover::checkpoint_soon(self.nodes[new].config.clone(), login.clone());
    }

    /// Points every healthy standby at the new primary, publishing before and after
    /// which ones are left (a new leader retries those).
    async fn repoint_standbys(
        &mut self,
        old: Option<usize>,
        new: usize,
        timeline: u32,
        login: &Login,
        kind: Kind,
    ) {
        let f = &self.config.failover;
        let new_name = self.nodes[new].config.name.clone();
        let replication_user = f.replication_user(&self.config.health).to_owned();
        let password = match self
            .shared
            .users
            .load()
            .get(&replication_user)
            .map(|c| c.secret.clone())
        {
            Some(crate::auth::Secret::Plain(p)) => p,
            _ => String::new(),
        };
        let new_config = self.nodes[new].config.clone();
        let standbys: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                let n = &self.nodes[i];
                i != new && Some(i) != old && n.routable() && n.role() == Some(Role::Standby)
            })
            .collect();
        self.record_step(old, new, timeline, Step::Repointing, &standbys)
            .await;
        coordinated::pause_before(coordinated::Drill::Repoint).await;
        let mut failed = Vec::new();
        for i in standbys {
            let n = &self.nodes[i];
            match failover::repoint(
                &n.config,
                &new_config,
                login,
                (&replication_user, &password),
            )
            .await
            {
                Ok(()) => {
                    info!(step = "repointed", standby = %n.config.name, primary = %new_name, "{}: standby follows the new primary", kind.name());
                    self.hook(EventKind::Repoint, i, Some(new), Some(timeline));
                }
                Err(e) => {
                    error!(step = "repoint_failed", standby = %n.config.name, error = %e, "{}: could not re-point standby", kind.name());
                    failed.push(i);
                }
            }
        }
        let step = if failed.is_empty() {
            Step::Done
        } else {
            Step::Repointing
        };
        self.record_step(old, new, timeline, step, &failed).await;
    }

    /// What follows a promotion once writes flow again: re-point the other standbys,
    /// run the hook, and record the event.
    async fn after_promotion(
        &mut self,
        old: Option<usize>,
        new: usize,
        timeline: u32,
        login: &Login,
        kind: Kind,
        window: std::time::Duration,
    ) {
        self.repoint_standbys(old, new, timeline, login, kind).await;
        let f = self.config.failover.clone();
        let new_name = self.nodes[new].config.name.clone();
        let old_name = old.map(|o| self.nodes[o].config.name.clone());
        if let Some(name) = &old_name {
            info!(step = "fenced", backend = %name, "{}: old primary fenced", kind.name());
        }
        self.shared.history.record(Record {
            at: SystemTime::now(),
            kind,
            old_primary: old_name.clone(),
            new_primary: new_name.clone(),
            timeline,
            window,
        });
        let event = Event {
            kind: match kind {
                Kind::Switchover => EventKind::Switchover,
                Kind::Failover | Kind::Promote => EventKind::Failover,
            },
            backend: new_name.clone(),
            old_primary: old_name,
            new_primary: Some(new_name),
            timeline: Some(timeline),
        };
        hooks::run(f.on_event.as_deref(), f.hook_timeout, event);
    }

    /// Carries out an operator's command.
    async fn command(&mut self, request: Request) -> Result<String, String> {
        let index = |name: &str| {
            self.nodes
                .iter()
                .position(|n| n.config.name == name)
                .ok_or_else(|| format!("no backend named \"{name}\""))
        };
        match request {
            Request::Fence(name) => {
                let i = index(&name)?;
                if self.nodes[i].fenced {
                    return Ok(format!("{name} is already fenced"));
                }
                self.fence(i);
                self.publish();
                let warning = if self.primary == Some(i) {
                    "; it was the primary: writes wait for PROMOTE or UNFENCE"
                } else {
                    ""
                };
                Ok(format!("{name} fenced{warning}"))
            }
            Request::Unfence(name) => {
                let i = index(&name)?;
                if !self.nodes[i].fenced {
                    return Ok(format!("{name} is not fenced"));
                }
                self.nodes[i].fenced = false;
                info!(backend = %name, "unfenced by the admin console");
                if self.read_only.remove(&i) {
                    let login = self
                        .login()
                        .ok_or("the monitor user has no plain password")?;
                    failover::set_read_only(&self.nodes[i].config, &login, false)
                        .await
                        .map_err(|e| format!("{name} unfenced, but default_transaction_read_only could not be lifted: {e}"))?;
                }
                let primary = self.primary;
                self.hook(EventKind::Unfence, i, primary, None);
                self.publish();
                Ok(format!("{name} unfenced"))
            }
            Request::Promote(name) => {
                let i = index(&name)?;
                self.may_promote().map_err(|e| e.to_string())?;
                let node = &self.nodes[i];
                if self.primary == Some(i) && node.role() == Some(Role::Primary) {
                    return Ok(format!("{name} is already the primary"));
                }
                if !node.routable() || node.role() != Some(Role::Standby) {
                    return Err(format!("{name} is not a reachable, unfenced standby"));
                }
                let login = self
                    .login()
                    .ok_or("the monitor user has no plain password")?;
                let started = Instant::now();
                let old = self.primary;
                let before = self
                    .intend(old, i)
                    .await
                    .map_err(|r| format!("{name} not promoted: {r}"))?;
                let promoted = failover::promote(
                    &self.nodes[i].config,
                    &login,
                    self.config.failover.promote_timeout.as_secs(),
                )
                .await;
                let timeline = match promoted {
                    Ok(t) => t,
                    Err(e) => {
                        self.withdraw(before).await;
                        return Err(format!("{name} not promoted: {e}"));
                    }
                };
                info!(backend = %name, timeline, "promoted by the admin console");
                self.pending = None;
                self.publish_promotion(old, i, timeline, &login);
                self.after_promotion(old, i, timeline, &login, Kind::Promote, started.elapsed())
                    .await;
                Ok(format!("{name} promoted (timeline {timeline})"))
            }
            Request::Switchover(target) => {
                self.may_promote().map_err(|e| e.to_string())?;
                self.switchover(target).await
            }
        }
    }

    /// A planned primary change: pause new transactions, let running ones finish,
    /// make the old primary read-only, wait for the target to replay everything it
    /// wrote, promote the target, resume. Clients see a pause, not an error.
    async fn switchover(&mut self, target: Option<String>) -> Result<String, String> {
        let p = self
            .primary
            .filter(|&p| self.nodes[p].routable())
            .ok_or("there is no routable primary to switch over from")?;
        let login = self
            .login()
            .ok_or("the monitor user has no plain password")?;
        let configs: Vec<_> = self.nodes.iter().map(|n| n.config.clone()).collect();
        let eligible = |i: usize| {
            let n = &self.nodes[i];
            i != p
                && n.routable()
                && n.role() == Some(Role::Standby)
                && failover::streams_from(
                    n.facts.as_ref().and_then(|f| f.receiver.as_ref()),
                    p,
                    &configs,
                )
        };
        let c = match target {
            Some(name) => {
                let i = self
                    .nodes
                    .iter()
                    .position(|n| n.config.name == name)
                    .ok_or_else(|| format!("no backend named \"{name}\""))?;
                if !eligible(i) {
                    return Err(format!(
                        "{name} is not a healthy standby streaming from the primary"
                    ));
                }
                i
            }
            None => (0..self.nodes.len())
                .filter(|&i| eligible(i))
                .max_by_key(|&i| {
                    let n = &self.nodes[i];
                    let lsn = n.facts.as_ref().and_then(|f| f.replay_lsn).unwrap_or(0);
                    (
                        lsn,
                        n.config.priority,
                        std::cmp::Reverse(n.config.name.clone()),
                    )
                })
                .ok_or("no healthy standby streams from the primary")?,
        };
        let (old_name, new_name) = (configs[p].name.clone(), configs[c].name.clone());
        let timeout = self.config.failover.switchover_timeout;
        let started = Instant::now();
        let ms = || started.elapsed().as_millis() as u64;
        info!(step = "pausing", from = %old_name, to = %new_name, "switchover: pausing new transactions");
        self.shared.gate.pause(None);
        let abort = |monitor: &Monitor, why: String| {
            monitor.shared.gate.resume(None);
            warn!(step = "aborted", from = %old_name, to = %new_name, reason = %why, elapsed_ms = ms(), "switchover aborted; clients resumed");
            Err(format!("switchover aborted: {why}"))
        };
        if !self.shared.gate.drained(None, timeout).await {
            let running = self.shared.gate.in_flight(None);
            return abort(
                self,
                format!(
                    "{running} transactions still running after switchover_timeout ({timeout:?})"
                ),
            );
        }
        info!(
            step = "drained",
            elapsed_ms = ms(),
            "switchover: no transaction running"
        );
        let before = match self.announce_demotion(p, c).await {
            Ok(before) => before,
            Err(refusal) => return abort(self, refusal.to_string()),
        };
        // Undoes the demotion: the old primary takes writes again once no leader
        // can carry the switchover out (writes taken before a later promotion
        // would be lost).
        let undo = async |monitor: &mut Monitor, before| {
            if monitor.withdraw(before).await {
                let _ = failover::set_read_only(&configs[p], &login, false).await;
            }
        };
        // One control connection to each node for the whole pause: each new one
        // costs a login.
        let demoted = async {
            let client = probe::connect(&configs[p], &login).await?;
            failover::read_only(&client, true).await?;
            Ok::<Client, String>(client)
        };
        let old_primary = match demoted.await {
            Ok(client) => client,
            Err(e) => {
                undo(self, before).await;
                return abort(self, format!("could not make {old_name} read-only: {e}"));
            }
        };
        coordinated::pause_before(coordinated::Drill::CatchUp).await;
        let caught_up = async {
            let lsn = failover::current_lsn(&old_primary).await?;
            let client = probe::connect(&configs[c], &login).await?;
            loop {
                let replayed: Option<tokio_postgres::types::PgLsn> = client
                    .query_one("SELECT pg_last_wal_replay_lsn()", &[])
                    .await
                    .map_err(|e| probe::describe(&e))?
                    .get(0);
                if replayed.map(u64::from) >= Some(lsn) {
                    return Ok::<(u64, Client), String>((lsn, client));
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        };
        let remaining = timeout.saturating_sub(started.elapsed());
        let target = match tokio::time::timeout(remaining, caught_up).await {
            Ok(Ok((lsn, target))) => {
                info!(
                    step = "caught_up",
                    lsn,
                    elapsed_ms = ms(),
                    "switchover: {new_name} replayed everything {old_name} wrote"
                );
                target
            }
            outcome => {
                undo(self, before).await;
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!("{new_name} did not catch up within switchover_timeout"),
                };
                return abort(self, why);
            }
        };
        if let Err(refusal) = self.intend(Some(p), c).await {
            undo(self, before).await;
            return abort(self, refusal.to_string());
        }
        let timeline = match failover::promote_on(
            &target,
            &configs[c],
            self.config.failover.promote_timeout.as_secs(),
        )
        .await
        {
            Ok(t) => t,
            Err(e) => {
                undo(self, before).await;
                return abort(self, e.to_string());
            }
        };
        self.read_only.insert(p);
        self.publish_promotion(Some(p), c, timeline, &login);
        self.shared.gate.resume(None);
        let paused = started.elapsed();
        info!(step = "resumed", from = %old_name, to = %new_name, timeline, paused_ms = paused.as_millis() as u64, "switchover: clients resumed on the new primary");
        self.shared.metrics.switchovers.inc();
        self.after_promotion(Some(p), c, timeline, &login, Kind::Switchover, paused)
            .await;
        Ok(format!(
            "switched over from {old_name} to {new_name} (timeline {timeline}); transactions paused {} ms",
            paused.as_millis()
        ))
    }

    /// Fenced nodes: unfence those that rejoined as standbys of the primary; report
    /// (and make read-only) those that came back as primaries.
    async fn watch_fenced(&mut self) {
        let configs: Vec<_> = self.nodes.iter().map(|n| n.config.clone()).collect();
        let mut split = false;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if !n.fenced || !matches!(n.health, Health::Up) {
                continue;
            }
            match n.facts.as_ref().map(|f| (f.role, f.receiver.as_ref())) {
                Some((Role::Standby, receiver)) => {
                    let follows = self
                        .primary
                        .is_some_and(|p| failover::streams_from(receiver, p, &configs));
                    if follows && self.may_unfence(i) {
                        info!(backend = %n.config.name, "unfenced: rejoined as a standby of the primary");
                        self.nodes[i].fenced = false;
                        if self.read_only.remove(&i)
                            && let Some(login) = self.login()
                            && let Err(e) =
                                failover::set_read_only(&configs[i], &login, false).await
                        {
                            warn!(backend = %configs[i].name, error = %e, "could not lift default_transaction_read_only");
                        }
                        let primary = self.primary;
                        self.hook(EventKind::Unfence, i, primary, None);
                    }
                }
                // A fenced node that reports itself primary while another node is the
                // routed primary: two primaries. (A fenced sole primary is just fenced.)
                Some((Role::Primary, _))
                    if self.primary.is_some_and(|p| {
                        p != i
                            && self.nodes[p].routable()
                            && self.nodes[p].role() == Some(Role::Primary)
                    }) =>
                {
                    split = true;
                    if !self.split_brain {
                        error!(backend = %n.config.name, "split brain: a fenced node reports itself primary; it stays fenced");
                        let primary = self.primary;
                        self.hook(EventKind::SplitBrain, i, primary, None);
                    }
                    if self.config.failover.fence_read_only
                        && self.read_only.insert(i)
                        && let Some(login) = self.login()
                    {
                        match failover::set_read_only(&configs[i], &login, true).await {
                            Ok(()) => {
                                info!(backend = %configs[i].name, "fenced node set to default_transaction_read_only")
                            }
                            Err(e) => {
                                self.read_only.remove(&i);
                                warn!(backend = %configs[i].name, error = %e, "could not make the fenced node read-only");
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if self.config.failover.mode == FailoverMode::Auto {
            self.split_brain = split;
        }
    }

    fn hook(&self, kind: EventKind, index: usize, primary: Option<usize>, timeline: Option<u32>) {
        let name = |i: usize| self.nodes[i].config.name.clone();
        let f = &self.config.failover;
        hooks::run(
            f.on_event.as_deref(),
            f.hook_timeout,
            Event {
                kind,
                backend: name(index),
                old_primary: None,
                new_primary: primary.map(name),
                timeline,
            },
        );
    }

    /// Publishes the current view; the generation moves only when routing changes.
    fn publish(&mut self) {
        let primary_lsn = self
            .primary
            .and_then(|p| self.nodes[p].facts.as_ref())
            .filter(|f| f.role == Role::Primary)
            .and_then(|f| f.lsn);
        for node in &mut self.nodes {
            node.lag_bytes = match (&node.facts, primary_lsn) {
                (Some(f), Some(top)) if f.role == Role::Standby => {
                    Some(top.saturating_sub(f.replay_lsn.or(f.lsn).unwrap_or(0)))
                }
                _ => None,
            };
        }
        let routed = match self.config.failover.mode {
            FailoverMode::Off => self.primary,
            _ => self.primary.filter(|&p| self.nodes[p].routable()),
        };
        let mut table = BackendTable {
            generation: self.generation,
            backends: self.nodes.clone(),
            primary: routed,
            split_brain: self.split_brain,
        };
        let previous = self.shared.routing.load_full();
        if table.routing_differs(&previous) {
            self.generation += 1;
            table.generation = self.generation;
            for (before, now) in previous.backends.iter().zip(&table.backends) {
                if before.routable() && !now.routable() && before.config == now.config {
                    self.shared.pools.retire_backend(&now.config.name);
                }
            }
            let routable: Vec<&str> = table
                .backends
                .iter()
                .filter(|b| b.routable())
                .map(|b| b.config.name.as_str())
                .collect();
            info!(
                generation = self.generation,
                primary = table
                    .primary()
                    .map(|b| b.config.name.as_str())
                    .unwrap_or("none"),
                ?routable,
                "routing table changed"
            );
        }
        self.shared.metrics.observe_table(&table);
        self.shared.routing.store(table);
    }
}
