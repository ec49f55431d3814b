//! Operator hooks: a shell command run on cluster events (failover, fencing,
//! split brain, …) with the event in its environment, for STONITH, DNS updates
//! or paging. A hook runs in the background with a time bound; its failure is
//! logged and never delays or blocks the failover that triggered it.

use std::time::Duration;

use tracing::{info, warn};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// a standby was promoted after the primary failed
    Failover,
    /// a node was fenced: never routed to until it rejoins or an operator unfences it
    Fence,
    /// a fenced node rejoined as a standby of the current primary
    Unfence,
    /// two nodes report themselves primary
    SplitBrain,
    /// a standby now streams from the new primary
    Repoint,
    /// a planned primary change completed
    Switchover,
}

impl EventKind {
    /// The value of `PGWARDEN_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Failover => "failover",
            EventKind::Fence => "fence",
            EventKind::Unfence => "unfence",
            EventKind::SplitBrain => "split_brain",
            EventKind::Repoint => "repoint",
            EventKind::Switchover => "switchover",
        }
    }
}

/// An event with the nodes it concerns.
#[derive(Debug, Clone)]
pub struct Event {
    /// what happened
    pub kind: EventKind,
    /// the node the event is about
    pub backend: String,
    /// the primary before the event
    pub old_primary: Option<String>,
    /// the primary after the event
    pub new_primary: Option<String>,
    /// the new primary's timeline
    pub timeline: Option<u32>,
}

/// Runs `command` for `event` in the background, bounded by `timeout`.
pub fn run(command: Option<&str>, timeout: Duration, event: Event) {
    let Some(command) = command.map(str::to_owned) else {
        return;
    };
    tokio::spawn(async move {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&command)
            .env("PGWARDEN_EVENT", event.kind.name())
            .env("PGWARDEN_BACKEND", &event.backend)
            .env(
                "PGWARDEN_OLD_PRIMARY",
                event.old_primary.as_deref().unwrap_or(""),
            )
            .env(
                "PGWARDEN_NEW_PRIMARY",
                event.new_primary.as_deref().unwrap_or(""),
            )
            .env(
                "PGWARDEN_TIMELINE",
                event.timeline.map(|t| t.to_string()).unwrap_or_default(),
            )
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let outcome = match cmd.spawn() {
            Ok(child) => tokio::time::timeout(timeout, child.wait_with_output()).await,
            Err(e) => {
                warn!(event = event.kind.name(), error = %e, "hook could not start");
                return;
            }
        };
        match outcome {
            Ok(Ok(out)) if out.status.success() => {
                info!(event = event.kind.name(), backend = %event.backend, "hook succeeded");
            }
            Ok(Ok(out)) => warn!(
                event = event.kind.name(),
                status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "hook failed"
            ),
            Ok(Err(e)) => warn!(event = event.kind.name(), error = %e, "hook failed"),
            Err(_) => warn!(
                event = event.kind.name(),
                ?timeout,
                "hook timed out and was killed"
            ),
        }
    });
}
