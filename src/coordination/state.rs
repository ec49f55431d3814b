//! The cluster state the leader publishes in etcd: which node is the primary,
//! on which timeline, which nodes are fenced, and the last failover with how far
//! it got. It is written as one JSON value in one transaction, so a reader sees a
//! whole decision or none of it.

use serde::{Deserialize, Serialize};

/// One decision about the cluster, as stored under `<prefix>/state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// the node writes go to
    pub primary: Option<String>,
    /// the primary's timeline when it was published
    pub timeline: Option<u32>,
    /// nodes no proxy may route to
    pub fenced: Vec<String>,
    /// the last failover (or the one in progress)
    pub failover: Option<Failover>,
}

/// A primary change, written before each step so that a new leader can finish it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    /// the primary that failed (or was switched over from)
    pub old: Option<String>,
    /// the standby chosen for promotion
    pub new: String,
    /// how far it got
    pub step: Step,
    /// the new primary's timeline, once promoted
    pub timeline: Option<u32>,
    /// standbys still to re-point at the new primary
    pub repoint: Vec<String>,
    /// when the decision was taken (seconds since the Unix epoch)
    pub at: u64,
}

/// The steps of a failover, in order; each is idempotent, so a new leader
/// repeats the one it finds rather than guessing whether it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// a switchover is making the old primary read-only and waiting for the
    /// candidate to catch up; nothing is promoted yet, so a new leader undoes it
    Demoting,
    /// the candidate is (being) promoted
    Promoting,
    /// the candidate is the primary; the other standbys are (being) re-pointed
    Repointing,
    /// nothing left to do
    Done,
    /// a step this version does not know, written by a newer pgwarden during a
    /// rolling upgrade: the state's primary and fences still hold, but only that
    /// version knows how to finish its failover
    #[serde(other)]
    Unknown,
}

impl Step {
    /// Its name in logs and SHOW COORDINATION.
    pub fn name(self) -> &'static str {
        match self {
            Step::Demoting => "demoting",
            Step::Promoting => "promoting",
            Step::Repointing => "repointing",
            Step::Done => "done",
            Step::Unknown => "unknown",
        }
    }
}

impl ClusterState {
    /// The failover a new leader must finish, if the last one was interrupted.
    pub fn unfinished(&self) -> Option<&Failover> {
        self.failover.as_ref().filter(|f| f.step != Step::Done)
    }

    /// Parses a stored value. A newer writer's additions are tolerated (fields
    /// ignored, a step read as [`Step::Unknown`]) so that a rolling upgrade keeps
    /// every proxy on the published primary; a broken value is reported, not trusted.
    pub fn parse(bytes: &[u8]) -> Result<ClusterState, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a cluster state always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_round_trips_and_knows_what_is_unfinished() {
        let mut state = ClusterState {
            primary: Some("pg2".into()),
            timeline: Some(2),
            fenced: vec!["pg1".into()],
            failover: Some(Failover {
                old: Some("pg1".into()),
                new: "pg2".into(),
                step: Step::Repointing,
                timeline: Some(2),
                repoint: vec!["pg3".into()],
                at: 1,
            }),
        };
        let back = ClusterState::parse(state.to_json().as_bytes()).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.unfinished().map(|f| f.step), Some(Step::Repointing));
        state.failover.as_mut().unwrap().step = Step::Done;
        assert!(state.unfinished().is_none());
        assert!(ClusterState::parse(b"{\"primary\": 3}").is_err());
    }

    #[test]
    fn a_newer_writers_state_is_read_with_its_step_unknown() {
        let newer = br#"{"primary": "pg2", "timeline": 2, "fenced": ["pg1"], "epoch": 7,
            "failover": {"old": "pg1", "new": "pg2", "step": "rewinding", "timeline": 2,
            "repoint": [], "at": 1, "by": "pgwarden 2"}}"#;
        let state = ClusterState::parse(newer).unwrap();
        assert_eq!(state.primary.as_deref(), Some("pg2"));
        assert_eq!(state.fenced, ["pg1"]);
        assert_eq!(state.unfinished().map(|f| f.step), Some(Step::Unknown));
    }
}
