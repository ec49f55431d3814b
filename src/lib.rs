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
pub mod boxed;
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

/// The handle that swaps the log filter when a reload changes `log_level`; unset
/// while `RUST_LOG` rules instead.
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// One event per line on stderr; a non-empty `RUST_LOG` overrides the configured level.
pub fn init_logging(level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, reload};
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .map(EnvFilter::new);
    let configured = from_env.is_none();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(level)));
    let output = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .try_init()
        .is_ok();
    if installed && configured {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Applies a reloaded `log_level` (unless `RUST_LOG` rules); says whether it did.
pub fn set_log_level(level: &str) -> bool {
    LOG_FILTER.get().is_some_and(|handle| {
        handle
            .reload(tracing_subscriber::EnvFilter::new(level))
            .is_ok()
    })
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
