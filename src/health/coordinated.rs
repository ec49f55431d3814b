//! The monitor's side of the kept cluster state: when it may promote, recording
//! each failover step (in etcd with `[coordination]`, else in
//! `failover.state_file`), adopting what was recorded (by the leader, or by this
//! proxy before a restart), and finishing a failover left midway.
//!
//! It lives here rather than in `crate::coordination` because it works on the
//! monitor's own state (nodes, primary, fences), which only the monitor writes;
//! `crate::coordination` owns the etcd session and the file, and knows nothing of
//! backends. With neither, every function here is a no-op that says "go ahead".

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, info, warn};

use super::Monitor;
use crate::backend::Health;
use crate::coordination::{ClusterState, Failover, Role, Snapshot, Step};
use crate::failover::{self, Kind, Refusal};

/// A point where a fault drill can hold the failover controller.
#[derive(Debug, Clone, Copy)]
pub(super) enum Drill {
    /// a switchover made the old primary read-only, the candidate not caught up yet
    CatchUp,
    /// the intent is published, the candidate not promoted yet
    Promote,
    /// the candidate is promoted, the other standbys not re-pointed yet
    Repoint,
}

/// Fault drill: `PGWARDEN_PAUSE_BEFORE_PROMOTE=3s` makes the failover controller
/// (failover, PROMOTE or switchover) wait between publishing its intent and
/// promoting, `PGWARDEN_PAUSE_BEFORE_REPOINT=3s` between promoting and
/// re-pointing, and `PGWARDEN_PAUSE_BEFORE_CATCHUP=3s` a switchover between making
/// the old primary read-only and waiting for the candidate, so that an operator
/// (or a test) can kill the leader there and watch another proxy finish or undo
/// it. Each is read once; unset means no pause.
pub(super) async fn pause_before(drill: Drill) {
    static PAUSES: OnceLock<[Option<Duration>; 3]> = OnceLock::new();
    const VARS: [&str; 3] = [
        "PGWARDEN_PAUSE_BEFORE_CATCHUP",
        "PGWARDEN_PAUSE_BEFORE_PROMOTE",
        "PGWARDEN_PAUSE_BEFORE_REPOINT",
    ];
    let pauses = PAUSES.get_or_init(|| {
        VARS.map(|var| {
            let value = std::env::var(var).ok()?;
            humantime::parse_duration(&value)
                .inspect_err(|e| warn!(%value, error = %e, "ignoring {var}"))
                .ok()
        })
    });
    let (at, what) = match drill {
        Drill::CatchUp => (0, "catching up"),
        Drill::Promote => (1, "promoting"),
        Drill::Repoint => (2, "re-pointing"),
    };
    if let Some(pause) = pauses[at] {
        warn!(?pause, "failover: pausing before {what} ({})", VARS[at]);
        tokio::time::sleep(pause).await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Monitor {
    /// Clients saw a server connection fail: every node is probed now, and the
    /// leader told.
    pub(super) fn on_alarm(&mut self) {
        self.probers.iter().for_each(super::Prober::wake);
        self.relay_alarm();
    }

    /// Tells the coordination leader (when this proxy follows one) that the primary
    /// looks down, at most once per `health.interval`: the leader re-probes a
    /// failing node every quarter interval on its own, so more would only load etcd.
    pub(super) fn relay_alarm(&mut self) {
        let Some(c) = &self.shared.coordination else {
            return;
        };
        let interval = self.config.health.interval;
        if self.relayed_at.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        if c.relay_alarm() {
            self.relayed_at = Some(Instant::now());
        }
    }

    /// Ok when this proxy may promote: no coordination, or it is the leader.
    pub(super) fn may_promote(&self) -> Result<(), Refusal> {
        if self.hands_over() {
            return Err(Refusal::Leaving);
        }
        if let Some(lock) = self.waiting_lock() {
            return Err(Refusal::AnotherDecides {
                decider: lock.who_decides(),
            });
        }
        match &self.shared.coordination {
            Some(c) if !c.is_leader() => Err(Refusal::Coordination(match c.snapshot().role {
                Role::Disconnected => crate::coordination::Error::Etcd("unreachable".into()),
                _ => crate::coordination::Error::NotLeader,
            })),
            _ => Ok(()),
        }
    }

    /// A follower leaves fenced what the leader fenced; only the leader lifts it.
    pub(super) fn may_unfence(&self, index: usize) -> bool {
        let name = &self.nodes[index].config.name;
        self.may_promote().is_ok()
            || !self
                .published
                .as_ref()
                .is_some_and(|s| s.fenced.contains(name))
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.config.name == name)
    }

    /// The cluster as this monitor sees it, with `failover` as the last failover.
    fn cluster_state(&self, failover: Option<Failover>) -> ClusterState {
        ClusterState {
            primary: self.primary.map(|p| self.nodes[p].config.name.clone()),
            timeline: self
                .primary
                .and_then(|p| self.nodes[p].facts.as_ref())
                .and_then(|f| f.timeline),
            fenced: self
                .nodes
                .iter()
                .filter(|n| n.fenced)
                .map(|n| n.config.name.clone())
                .collect(),
            failover,
        }
    }

    /// `failover.state_file`, resolved, when this proxy keeps its state on disk.
    fn state_file(&self) -> Option<PathBuf> {
        let path = self.config.failover.state_file.as_deref()?;
        self.shared
            .coordination
            .is_none()
            .then(|| self.config.resolve(path))
    }

    /// True when decisions are kept somewhere a restarted or new leader reads them.
    fn keeps_state(&self) -> bool {
        self.shared.coordination.is_some() || self.state_file().is_some()
    }

    /// Writes the cluster state with `failover` to etcd, or to the state file. A
    /// state file that cannot be written is logged, not fatal: failing over matters
    /// more than remembering it.
    async fn record(
        &mut self,
        failover: Option<Failover>,
    ) -> Result<(), crate::coordination::Error> {
        let state = self.cluster_state(failover);
        let primary = state.primary.as_deref().unwrap_or("none");
        let step = state.failover.as_ref().map_or("none", |f| f.step.name());
        if let Some(coordinator) = self.shared.coordination.clone() {
            let revision = coordinator.write(&state).await?;
            info!(revision, primary, fenced = ?state.fenced, step, "coordination: cluster state published");
        } else if let Some(path) = self.state_file() {
            match crate::coordination::file::save(path, &state).await {
                Ok(()) => info!(primary, fenced = ?state.fenced, step, "cluster state saved"),
                Err(e) => {
                    warn!(error = %e, "could not save the cluster state (failover.state_file)")
                }
            }
        } else {
            return Ok(());
        }
        self.published = Some(state);
        Ok(())
    }

    /// Before a switchover makes the old primary read-only: the intent to, so that
    /// a leader that takes over before the promotion gives the old primary its
    /// writes back instead of leaving the cluster read-only. Returns the failover
    /// it replaces, for [`Monitor::withdraw`].
    pub(super) async fn announce_demotion(
        &mut self,
        old: usize,
        candidate: usize,
    ) -> Result<Option<Failover>, Refusal> {
        let before = self.published.as_ref().and_then(|s| s.failover.clone());
        self.publish_intent(Some(old), candidate, Step::Demoting)
            .await?;
        Ok(before)
    }

    /// Before promoting `candidate` (a failover, PROMOTE or a switchover): the
    /// intent, so that a leader that takes over midway promotes the same node rather
    /// than another one. Returns the failover it replaces, for [`Monitor::withdraw`].
    pub(super) async fn intend(
        &mut self,
        old: Option<usize>,
        candidate: usize,
    ) -> Result<Option<Failover>, Refusal> {
        let before = self.published.as_ref().and_then(|s| s.failover.clone());
        self.publish_intent(old, candidate, Step::Promoting).await?;
        pause_before(Drill::Promote).await;
        Ok(before)
    }

    async fn publish_intent(
        &mut self,
        old: Option<usize>,
        candidate: usize,
        step: Step,
    ) -> Result<(), Refusal> {
        let intent = Failover {
            old: old.map(|o| self.nodes[o].config.name.clone()),
            new: self.nodes[candidate].config.name.clone(),
            step,
            timeline: None,
            repoint: Vec::new(),
            at: unix_now(),
        };
        self.record(Some(intent))
            .await
            .map_err(Refusal::Coordination)
    }

    /// Takes back the intent of a PROMOTE or switchover whose promotion failed (the
    /// old primary stays), so that no leader carries it out later: publishes
    /// `before`, the failover the intent replaced, again. False when the intent
    /// could not be taken back.
    pub(super) async fn withdraw(&mut self, before: Option<Failover>) -> bool {
        if !self.keeps_state() {
            return true;
        }
        match self.record(before).await {
            Ok(()) => {
                info!("coordination: intent withdrawn, the promotion did not happen");
                true
            }
            Err(e) => {
                error!(error = %e, "coordination: could not withdraw the intent of a promotion that did not happen; a leader may still carry it out");
                false
            }
        }
    }

    /// After promoting: `step` with the standbys still to re-point. A failed write
    /// is logged only: the promotion happened, and the next leader repeats the
    /// idempotent steps it finds unfinished.
    pub(super) async fn record_step(
        &mut self,
        old: Option<usize>,
        new: usize,
        timeline: u32,
        step: Step,
        repoint: &[usize],
    ) {
        if !self.keeps_state() {
            return;
        }
        let at = self
            .published
            .as_ref()
            .and_then(|s| s.failover.as_ref())
            .filter(|f| f.new == self.nodes[new].config.name)
            .map_or_else(unix_now, |f| f.at);
        let failover = Failover {
            old: old.map(|o| self.nodes[o].config.name.clone()),
            new: self.nodes[new].config.name.clone(),
            step,
            timeline: Some(timeline),
            repoint: repoint
                .iter()
                .map(|&i| self.nodes[i].config.name.clone())
                .collect(),
            at,
        };
        if let Err(e) = self.record(Some(failover)).await {
            warn!(step = step.name(), error = %e, "coordination: could not publish the failover step");
        }
    }

    /// The leader: records routing decisions taken outside a failover (split
    /// brain, fences lifted, the primary found at start-up).
    pub(super) async fn share_decision(&mut self) {
        if !self.keeps_state() || self.may_promote().is_err() || self.resume().await {
            return;
        }
        let last = self.published.as_ref().and_then(|s| s.failover.clone());
        let now = self.cluster_state(last);
        let differs = self
            .published
            .as_ref()
            .is_none_or(|s| s.primary != now.primary || s.fenced != now.fenced);
        if differs
            && now.primary.is_some()
            && let Err(e) = self.record(now.failover).await
        {
            warn!(error = %e, "coordination: could not publish the cluster state");
        }
    }

    /// A new coordination snapshot: adopt the published primary and fences, and
    /// as the leader finish what a previous leader left undone.
    pub(super) async fn adopt(&mut self, snapshot: Snapshot) {
        let leader = snapshot.role == Role::Leader;
        if let Some(state) = snapshot.state {
            self.take_state(state, leader);
        }
        if leader {
            self.resume().await;
        }
    }

    /// At start-up: the state this proxy saved before it stopped, taken as a
    /// leader takes its own (an unfinished failover is resumed at the first report).
    pub(super) fn restore(&mut self) {
        let Some(path) = self.state_file() else {
            return;
        };
        match crate::coordination::file::load(&path) {
            Ok(Some(state)) => {
                info!(path = %path.display(), primary = state.primary.as_deref().unwrap_or("none"), fenced = ?state.fenced, step = state.failover.as_ref().map_or("none", |f| f.step.name()), "cluster state restored");
                self.take_state(state, true);
            }
            Ok(None) => info!(path = %path.display(), "no saved cluster state yet"),
            Err(e) => warn!(error = %e, "ignoring the saved cluster state"),
        }
    }

    /// Takes a recorded state's fences and primary.
    fn take_state(&mut self, state: ClusterState, leader: bool) {
        let recorder = if self.shared.coordination.is_some() {
            "recorded by the coordination leader"
        } else {
            "recorded before a restart"
        };
        if self.published.as_ref() != Some(&state) {
            if state.unfinished().is_some_and(|f| f.step == Step::Unknown) {
                warn!(
                    by = recorder,
                    "the recorded failover is at a step this version does not know (a newer pgwarden wrote it): following its primary and fences, starting no failover until a newer leader finishes it or an operator runs PROMOTE"
                );
            }
            for name in &state.fenced {
                if let Some(i) = self.index(name)
                    && !self.nodes[i].fenced
                {
                    info!(backend = %name, by = recorder, "fenced: as recorded");
                    self.nodes[i].fenced = true;
                }
            }
            // The leader trusts its own decisions; a follower (or a leader that has
            // none yet, just restarted) takes the published primary unless its own
            // probes show it down.
            if let Some(p) = state.primary.as_deref().and_then(|n| self.index(n))
                && self.primary != Some(p)
                && (!leader || self.primary.is_none())
                && self.nodes[p].health != Health::Down
            {
                self.assume_primary(p, state.timeline);
                self.set_primary(p, recorder);
                self.pending = None;
            }
            self.published = Some(state);
            self.publish();
        }
    }

    /// The leader finishes an interrupted failover with the same candidate; true
    /// when there was one to finish (or it is being finished).
    pub(super) async fn resume(&mut self) -> bool {
        let Some(f) = self
            .published
            .as_ref()
            .and_then(ClusterState::unfinished)
            .cloned()
        else {
            return false;
        };
        if self.may_promote().is_err() {
            return false;
        }
        if f.step == Step::Unknown {
            // A newer pgwarden's failover (`take_state` said so): acting on it, or
            // starting another over it, could undo what that version did.
            return true;
        }
        if Instant::now() < self.resume_at {
            return true;
        }
        self.resume_at = Instant::now() + self.config.health.interval;
        let Some(new) = self.index(&f.new) else {
            warn!(candidate = %f.new, "failover: the interrupted failover names an unknown backend");
            return false;
        };
        let Some(login) = self.login() else {
            return true;
        };
        let old = f.old.as_deref().and_then(|n| self.index(n));
        if self.unprobed(old) {
            return true;
        }
        let since = Duration::from_secs(unix_now().saturating_sub(f.at));
        info!(step = f.step.name(), candidate = %f.new, "failover: finishing an interrupted failover");
        let timeline = match f.step {
            Step::Demoting => {
                self.undo_demotion(old, &login).await;
                return true;
            }
            Step::Promoting if self.nodes[new].health == Health::Down => {
                warn!(candidate = %f.new, "failover: the interrupted failover's candidate is down; choosing again");
                self.published.as_mut().and_then(|s| s.failover.take());
                return false;
            }
            Step::Promoting => {
                if !self.nodes[new].routable() {
                    return true;
                }
                match failover::promote(
                    &self.nodes[new].config,
                    &login,
                    self.config.failover.promote_timeout.as_secs(),
                )
                .await
                {
                    Ok(timeline) => timeline,
                    Err(e) => {
                        warn!(candidate = %f.new, error = %e, "failover: could not finish the interrupted promotion");
                        return true;
                    }
                }
            }
            Step::Unknown => return true,
            Step::Repointing | Step::Done => {
                let timeline = f.timeline.unwrap_or(0);
                self.repoint_standbys(old, new, timeline, &login, Kind::Failover)
                    .await;
                return true;
            }
        };
        self.pending = None;
        self.publish_promotion(old, new, timeline, &login);
        self.shared.metrics.failovers.inc();
        self.after_promotion(old, new, timeline, &login, Kind::Failover, since)
            .await;
        true
    }

    /// A switchover whose leader vanished before promoting: the old primary takes
    /// writes again (nothing else was changed), and the intent is cleared. When the
    /// old primary cannot be reached the intent is cleared all the same, so that
    /// the ordinary failover deals with it.
    async fn undo_demotion(&mut self, old: Option<usize>, login: &crate::health::probe::Login) {
        if let Some(o) = old
            && self.nodes[o].health != Health::Down
        {
            if let Err(e) = failover::set_read_only(&self.nodes[o].config, login, false).await {
                warn!(node = %self.nodes[o].config.name, error = %e, "switchover: could not give the old primary its writes back; retrying");
                return;
            }
            info!(node = %self.nodes[o].config.name, "switchover: its leader left before promoting; the old primary takes writes again");
        }
        if let Err(e) = self.record(None).await {
            warn!(error = %e, "coordination: could not clear the undone switchover");
        }
    }
}
