//! pgwarden: a PostgreSQL connection pooler and fault-tolerance proxy.
//!
//! The crate is laid out by concern; this file only names the parts.
//! A client's bytes flow `proxy` (accept) → `client` (login, transactions) →
//! `pool` (a server connection to the backend `backend` routes to) → `server`.
//! Beside that path, `health` probes the nodes, runs `failover`, and publishes
//! the routing table that `backend` defines.

pub mod address;
pub mod admin;
pub mod auth;
pub mod backend;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coordination;
pub mod drill;
pub mod error;
pub mod failover;
pub mod health;
pub mod keepalive;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod open_files;
pub mod params;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod registry;
pub mod server;
pub mod tls;
pub mod verify;

/// One event per line on stderr; `RUST_LOG` overrides the configured level.
pub fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A fresh folder under the system's temporary one, for a unit test's files.
#[cfg(test)]
fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pgwarden-{tag}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
