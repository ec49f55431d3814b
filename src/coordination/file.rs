//! `failover.state_file`: the cluster state of a proxy that decides alone, kept
//! on its own disk, so that a restart (even one in the middle of a failover)
//! resumes where the last run stopped: the primary it routed to, the nodes it
//! fenced, and the failover step it reached. Without it a restarted proxy knows
//! nothing: it will not promote before it has seen a primary, so a restart while
//! the primary is down leaves writes unavailable until an operator steps in.
//! With `[coordination]`, etcd keeps the same [`ClusterState`] instead.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::ClusterState;

/// Reads the saved state; `None` when there is none yet.
pub fn load(path: &Path) -> Result<Option<ClusterState>, String> {
    match std::fs::read(path) {
        Ok(bytes) => ClusterState::parse(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: not a pgwarden state file: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Replaces the saved state durably: a crash leaves the old state or the new
/// one, never a torn file.
pub async fn save(path: PathBuf, state: &ClusterState) -> Result<(), String> {
    let json = state.to_json();
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(json.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| format!("{}: {e}", path.display()))
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_saved_state_loads_back_and_a_missing_file_is_no_state() {
        let dir = std::env::temp_dir().join(format!("pgwarden-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert_eq!(load(&path), Ok(None));
        let state = ClusterState {
            primary: Some("pg2".into()),
            timeline: Some(2),
            fenced: vec!["pg1".into()],
            failover: None,
        };
        save(path.clone(), &state).await.unwrap();
        assert_eq!(load(&path), Ok(Some(state)));
        std::fs::write(&path, "{not json").unwrap();
        assert!(
            load(&path)
                .unwrap_err()
                .contains("not a pgwarden state file")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
