//! Carrying out admin commands against the running proxy; the SHOW listings are in
//! [`super::show`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::command::Command;
use super::table::ResultSet;
use crate::config::ShutdownMode;
use crate::error::sqlstate;
use crate::health::Request;
use crate::pool::ServerPool;
use crate::protocol::ServerNotice;
use crate::proxy::{Shared, report_reload};
use crate::registry::Serving;

/// What a command answers.
pub enum Answer {
    /// a result set
    Rows(ResultSet),
    /// a command tag, with a NOTICE to show first
    Done {
        /// CommandComplete tag
        tag: &'static str,
        /// what happened, in words
        notice: Option<String>,
    },
    /// EmptyQueryResponse
    Empty,
}

fn failed(code: &str, message: impl Into<String>) -> ServerNotice {
    ServerNotice::new("ERROR", code, message)
}

fn done(tag: &'static str, notice: Option<String>) -> Result<Answer, ServerNotice> {
    Ok(Answer::Done { tag, notice })
}

/// Runs one command.
pub async fn run(shared: &Arc<Shared>, command: Command) -> Result<Answer, ServerNotice> {
    let config = shared.config.load_full();
    let known = |db: &str| {
        config.database(db).map(|_| ()).ok_or_else(|| {
            failed(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{db}\" is not configured"),
            )
        })
    };
    match command {
        Command::Show(what) => Ok(Answer::Rows(super::show::show(shared, what))),
        Command::Pause(db) => {
            if let Some(db) = &db {
                known(db)?;
            }
            shared.gate.pause(db.as_deref());
            while !shared
                .gate
                .drained(db.as_deref(), Duration::from_secs(1))
                .await
            {
                if shared.shutdown.is_cancelled() {
                    break;
                }
            }
            done("PAUSE", None)
        }
        Command::Resume(db) => {
            shared.gate.resume(db.as_deref());
            done("RESUME", None)
        }
        Command::Reload => match report_reload(shared) {
            Ok(()) => done("RELOAD", None),
            Err(e) => Err(failed(
                sqlstate::INVALID_PARAMETER_VALUE,
                format!("reload failed: {e}"),
            )),
        },
        Command::Shutdown(mode) => {
            let what = match shared.stop(mode, "SHUTDOWN") {
                ShutdownMode::WaitForServers => "once the running transactions finish",
                ShutdownMode::WaitForClients => "once the connected clients have left",
            };
            done(
                "SHUTDOWN",
                Some(format!("pgwarden stopped listening and exits {what}")),
            )
        }
        Command::Kill(db) => {
            known(&db)?;
            // Paused first, as in PgBouncer: clients that come back (drivers retry at
            // once) wait for RESUME instead of filling the pool just emptied.
            shared.gate.pause(Some(&db));
            let mut killed = 0;
            for client in shared.clients.all() {
                if client.identity.database() == db {
                    client.ending.kill();
                    killed += 1;
                }
            }
            shared.pools.retire_database(&db);
            done(
                "KILL",
                Some(format!(
                    "{killed} clients of \"{db}\" disconnected, its server connections closed; it stays paused until RESUME"
                )),
            )
        }
        Command::KillClient(pid) => {
            let client = shared.clients.get(pid).ok_or_else(|| {
                failed(
                    sqlstate::INVALID_PARAMETER_VALUE,
                    format!("no client with pid {pid} (SHOW CLIENTS lists them)"),
                )
            })?;
            client.ending.kill();
            done(
                "KILL_CLIENT",
                Some(format!(
                    "client {pid} ({}@{}) disconnected",
                    client.identity.user(),
                    client.identity.database()
                )),
            )
        }
        Command::Reconnect(db) => {
            if let Some(db) = &db {
                known(db)?;
            }
            let pools = shared.pools.reconnect(db.as_deref());
            done(
                "RECONNECT",
                Some(format!(
                    "server connections replaced as they are released (pools: {pools})"
                )),
            )
        }
        Command::WaitClose(db) => {
            if let Some(db) = &db {
                known(db)?;
            }
            while marked_in_use(shared, db.as_deref()) > 0 && !shared.shutdown.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done("WAIT_CLOSE", None)
        }
        Command::Disable(db) => {
            known(&db)?;
            shared.admissions.disable(&db);
            done("DISABLE", None)
        }
        Command::Enable(db) => {
            known(&db)?;
            shared.admissions.enable(&db);
            done("ENABLE", None)
        }
        Command::Fence(node) => cluster(shared, Request::Fence(node), "FENCE").await,
        Command::Unfence(node) => cluster(shared, Request::Unfence(node), "UNFENCE").await,
        Command::Promote(node) => cluster(shared, Request::Promote(node), "PROMOTE").await,
        Command::Switchover(to) => cluster(shared, Request::Switchover(to), "SWITCHOVER").await,
        Command::Verify(tables) => crate::verify::console(shared, &tables)
            .await
            .map(Answer::Rows)
            .map_err(|e| failed(sqlstate::NOT_IN_PREREQUISITE_STATE, e)),
        Command::Set(name) => {
            let key = config
                .flatten()
                .into_iter()
                .map(|(k, _)| k)
                .find(|k| k.rsplit('.').next() == Some(name.as_str()) || *k == name);
            match key {
                Some(key) => Err(failed(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "pgwarden reads its settings from {}: change {key} there and run RELOAD",
                        config.source.display()
                    ),
                )),
                None => done("SET", None),
            }
        }
        Command::Empty => Ok(Answer::Empty),
    }
}

async fn cluster(
    shared: &Shared,
    request: Request,
    tag: &'static str,
) -> Result<Answer, ServerNotice> {
    match shared.monitor.ask(request).await {
        Ok(message) => done(tag, Some(message)),
        Err(message) => Err(failed(sqlstate::NOT_IN_PREREQUISITE_STATE, message)),
    }
}

/// The pools (of `database`, or all) by id, to find the one a client's server
/// connection came from.
pub(super) fn pools_by_id(
    shared: &Shared,
    database: Option<&str>,
) -> HashMap<u64, Arc<ServerPool>> {
    shared
        .pools
        .all()
        .into_iter()
        .filter(|(key, _)| database.is_none_or(|db| key.database == db))
        .map(|(_, pool)| (pool.id, pool))
        .collect()
}

/// True when `serving`'s connection predates the last RECONNECT of its pool.
pub(super) fn close_needed(pools: &HashMap<u64, Arc<ServerPool>>, serving: &Serving) -> bool {
    pools
        .get(&serving.pool)
        .is_some_and(|pool| pool.close_needed(serving.opened))
}

/// Server connections in use (of `database`, or all) that a RECONNECT marked to close.
fn marked_in_use(shared: &Shared, database: Option<&str>) -> usize {
    let pools = pools_by_id(shared, database);
    shared
        .clients
        .all()
        .iter()
        .filter_map(|c| c.serving())
        .filter(|s| close_needed(&pools, s))
        .count()
}
