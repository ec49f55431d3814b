//! The routing table: which PostgreSQL nodes exist and which one is the primary.
//!
//! A [`BackendTable`] is an immutable snapshot behind an `ArcSwap`. Whoever
//! learns something about the cluster stores a new snapshot with a higher
//! generation; every transaction reads the current one with a single atomic
//! load and never takes a lock.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{BackendConfig, Config};

/// What a node is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// accepts writes
    Primary,
    /// replays WAL from a primary
    Standby,
}

/// One node as the table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// name, host and port from the config
    pub config: BackendConfig,
    /// what it is
    pub role: Role,
}

/// A snapshot of the cluster as pgwarden routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTable {
    /// increases with every change
    pub generation: u64,
    /// every configured node
    pub backends: Vec<Backend>,
    /// index into `backends` of the node writes go to
    pub primary: Option<usize>,
}

impl BackendTable {
    /// The table for a configuration without health information: the first
    /// backend is the primary, the others standbys.
    pub fn from_config(config: &Config, generation: u64) -> BackendTable {
        let backends = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Backend {
                config: b.clone(),
                role: if i == 0 { Role::Primary } else { Role::Standby },
            })
            .collect();
        BackendTable {
            generation,
            backends,
            primary: Some(0).filter(|_| !config.backends.is_empty()),
        }
    }

    /// The node writes go to, if there is one.
    pub fn primary(&self) -> Option<&Backend> {
        self.primary.and_then(|i| self.backends.get(i))
    }
}

/// The shared, swappable routing table.
pub type Routing = Arc<ArcSwap<BackendTable>>;

/// A routing table initialised from `config`.
pub fn routing(config: &Config) -> Routing {
    Arc::new(ArcSwap::from_pointee(BackendTable::from_config(config, 1)))
}
