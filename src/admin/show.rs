//! The admin console's SHOW commands: what pgwarden, its pools, clients and
//! cluster look like now. The listings PgBouncer also has lead with its columns,
//! in its order, so that the tools built on them read pgwarden's unchanged.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::command::Show;
use super::exec::{close_needed, pools_by_id};
use super::stats;
use super::table::{Cell, ResultSet};
use crate::address::is_socket_dir;
use crate::backend::Health;
use crate::clock::Tick;
use crate::coordination::Role;
use crate::metrics::ClientState;
use crate::proxy::Shared;
use crate::registry::Serving;
use crate::server::ServerTarget;

/// SHOW CLIENTS' and SHOW SERVERS' columns: PgBouncer's, in its order, then
/// pgwarden's own (the client's pid, the backend, the server's pid).
const CONNECTION_COLUMNS: [&str; 21] = [
    "type",
    "user",
    "database",
    "state",
    "addr",
    "port#",
    "local_addr",
    "local_port#",
    "connect_time",
    "request_time",
    "wait#",
    "wait_us#",
    "close_needed#",
    "ptr",
    "link",
    "remote_pid#",
    "tls",
    "application_name",
    "pid#",
    "backend",
    "server_pid#",
];

/// One server connection, as SHOW SERVERS lists it.
struct ServerRow<'a> {
    user: &'a str,
    database: &'a str,
    server: Server<'a>,
    /// when it was last handed to a client, or returned to the pool (or began
    /// to open)
    used: Tick,
    /// the pid of the client it serves
    client: Option<i32>,
    /// a RECONNECT came after it opened
    marked: bool,
}

/// A server connection open, or being opened.
enum Server<'a> {
    /// open: its process, its ends and its TLS are known
    Open(&'a Serving),
    /// being opened (connect, TLS, login) to `target`, PgBouncer's state `new`:
    /// no process and no local end yet; `number` tells it from its pool's others
    New {
        target: &'a ServerTarget,
        number: u64,
    },
}

impl ServerRow<'_> {
    /// The row in [`CONNECTION_COLUMNS`]' order.
    fn cells(&self, now: Tick) -> Vec<Cell> {
        let (state, addr, port, opened, backend) = match &self.server {
            Server::Open(s) => (
                if self.client.is_some() {
                    "active"
                } else {
                    "idle"
                },
                s.key.addr.column(),
                s.key.addr.port(),
                s.opened,
                &*s.backend,
            ),
            Server::New { target, .. } => (
                "new",
                if is_socket_dir(&target.host) {
                    "unix".to_owned()
                } else {
                    target.host.clone()
                },
                target.port,
                self.used,
                &*target.backend,
            ),
        };
        let (local, ptr, pid, tls) = match &self.server {
            Server::Open(s) => (
                s.endpoint.local,
                server_ptr(backend, s.key.pid),
                Some(s.key.pid),
                s.endpoint.tls_description(),
            ),
            Server::New { number, .. } => {
                (None, format!("n{number:x}@{backend}"), None, String::new())
            }
        };
        vec![
            "S".into(),
            self.user.into(),
            self.database.into(),
            state.into(),
            addr.into(),
            i64::from(port).into(),
            local.map(|a| a.ip().to_string()).into(),
            local.map(|a| i64::from(a.port())).into(),
            time(wall(opened, now)),
            time(wall(self.used, now)),
            0_i64.into(),
            0_i64.into(),
            i64::from(self.marked).into(),
            ptr.into(),
            self.client.map(client_ptr).into(),
            // PgBouncer's remote_pid is 0 until the server names its process.
            i64::from(pid.unwrap_or(0)).into(),
            tls.into(),
            "".into(),
            self.client.map(i64::from).into(),
            backend.into(),
            pid.map(i64::from).into(),
        ]
    }
}

/// A client's `ptr` in SHOW CLIENTS, and its `link` in SHOW SERVERS.
fn client_ptr(pid: i32) -> String {
    format!("c{pid:x}")
}

/// A server connection's `ptr` in SHOW SERVERS, and its `link` in SHOW CLIENTS:
/// its process on its node, as two nodes may run processes of the same pid.
fn server_ptr(backend: &str, pid: i32) -> String {
    format!("s{pid:x}@{backend}")
}

/// The wall-clock time of a monotonic reading, `now` being the reading now.
fn wall(t: Tick, now: Tick) -> SystemTime {
    SystemTime::now() - now.since(t)
}

/// One SHOW POOLS row being counted up.
#[derive(Default)]
struct PoolRow {
    /// clients by [`ClientState`]
    clients: [usize; 3],
    /// their CancelRequests on the way
    cancels: usize,
    /// server connections kept from the pool until a cancel lands
    held_for_cancel: usize,
    /// server connections in use or being opened
    in_use: usize,
    /// server connections being opened
    opening: usize,
    /// idle server connections
    idle: usize,
    /// pool size
    max: usize,
}

/// A wait's whole seconds, as `maxwait` and `wait` give them; [`micros`] the rest.
fn seconds(wait: Duration) -> Cell {
    i64::try_from(wait.as_secs()).unwrap_or(i64::MAX).into()
}

/// The microseconds of a wait past its whole seconds (`maxwait_us`, `wait_us`).
fn micros(wait: Duration) -> Cell {
    i64::from(wait.subsec_micros()).into()
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn time(t: SystemTime) -> Cell {
    humantime::format_rfc3339_seconds(t).to_string().into()
}

/// `X/Y`, as PostgreSQL prints WAL positions.
pub fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// The listing `what` asks for.
pub(super) fn show(shared: &Shared, what: Show) -> ResultSet {
    let config = shared.config.load_full();
    let table = shared.routing.load_full();
    let clients = shared.clients.all();
    let paused = shared.gate.paused();
    match what {
        Show::Pools => {
            // PgBouncer's columns in its order (monitoring tools read them by
            // name), then pgwarden's own.
            let mut rs = ResultSet::new(&[
                "database",
                "user",
                "cl_active#",
                "cl_waiting#",
                "cl_active_cancel_req#",
                "cl_waiting_cancel_req#",
                "sv_active#",
                "sv_active_cancel#",
                "sv_being_canceled#",
                "sv_idle#",
                "sv_used#",
                "sv_tested#",
                "sv_login#",
                "maxwait#",
                "maxwait_us#",
                "pool_mode",
                "cl_idle#",
                "sv_max#",
                "target",
                "paused#",
            ]);
            let mut rows: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
            for c in &clients {
                let row = rows.entry(c.identity.pair.names()).or_default();
                let state = c.state();
                row.clients[state as usize] += 1;
                let cancels = c.cancels_in_flight();
                row.cancels += cancels;
                // Its transaction is over, but its server connection waits for the
                // cancel to land before it serves anyone else.
                if cancels > 0 && state == ClientState::Active && c.serving().is_none() {
                    row.held_for_cancel += 1;
                }
            }
            let tallies = shared.clients.tally();
            for (key, pool) in shared.pools.all() {
                let (in_use, idle, max) = pool.counts();
                let row = rows
                    .entry((key.database.clone(), key.target.user.clone()))
                    .or_default();
                row.in_use += in_use;
                row.opening += pool.opening();
                row.idle += idle;
                row.max = row.max.max(max);
            }
            for ((db, user), row) in rows {
                let settings = config.database(&db);
                let wait = tallies
                    .get(&(db.clone(), user.clone()))
                    .map_or(Duration::ZERO, |t| t.longest_wait);
                let active = row.in_use.saturating_sub(row.opening + row.held_for_cancel);
                rs.row(vec![
                    db.clone().into(),
                    user.into(),
                    // PgBouncer's cl_active: in a transaction or idle, not waiting.
                    (row.clients[ClientState::Active as usize]
                        + row.clients[ClientState::Idle as usize])
                        .into(),
                    row.clients[ClientState::Waiting as usize].into(),
                    // Cancels go out at once on their own connections: none wait.
                    row.cancels.into(),
                    0usize.into(),
                    active.into(),
                    row.cancels.into(),
                    row.held_for_cancel.into(),
                    row.idle.into(),
                    // No idle connection waits for a check, or is being checked.
                    0usize.into(),
                    0usize.into(),
                    row.opening.into(),
                    seconds(wait),
                    micros(wait),
                    settings.as_ref().map(|s| s.pool_mode.to_string()).into(),
                    row.clients[ClientState::Idle as usize].into(),
                    row.max.into(),
                    settings.map(|s| s.target.name().to_owned()).into(),
                    i64::from(paused.covers(&db)).into(),
                ]);
            }
            rs
        }
        Show::Clients => {
            let mut rs = ResultSet::new(&CONNECTION_COLUMNS);
            let mut clients = clients;
            clients.sort_by_key(|c| c.pid);
            let now = Tick::now();
            for c in clients {
                let serving = c.serving();
                let waited = c.waited(now).unwrap_or_default();
                let state = match c.state() {
                    ClientState::Waiting => "waiting",
                    // PgBouncer's "active": in a transaction or idle.
                    ClientState::Active | ClientState::Idle => "active",
                };
                let (local_addr, local_port) = match c.identity.endpoint.local {
                    Some(local) => (local.ip().to_string(), local.port()),
                    None => ("unix".to_owned(), c.identity.peer.port()),
                };
                let requested = c.last_request().map_or(c.connected_at, |t| wall(t, now));
                rs.row(vec![
                    "C".into(),
                    c.identity.user().to_owned().into(),
                    c.identity.database().to_owned().into(),
                    state.into(),
                    c.identity.peer.column().into(),
                    i64::from(c.identity.peer.port()).into(),
                    local_addr.into(),
                    i64::from(local_port).into(),
                    time(c.connected_at),
                    time(requested),
                    seconds(waited),
                    micros(waited),
                    0_i64.into(),
                    client_ptr(c.pid).into(),
                    serving
                        .as_ref()
                        .map(|s| server_ptr(&s.backend, s.key.pid))
                        .into(),
                    0_i64.into(),
                    c.identity.endpoint.tls_description().into(),
                    c.application_name().into(),
                    i64::from(c.pid).into(),
                    serving.as_ref().map(|s| s.backend.to_string()).into(),
                    serving.map(|s| i64::from(s.key.pid)).into(),
                ]);
            }
            rs
        }
        Show::Servers => {
            let mut rs = ResultSet::new(&CONNECTION_COLUMNS);
            let now = Tick::now();
            let pools = pools_by_id(shared, None);
            for c in &clients {
                if let Some(serving) = c.serving() {
                    let row = ServerRow {
                        user: c.identity.user(),
                        database: c.identity.database(),
                        marked: close_needed(&pools, &serving),
                        server: Server::Open(&serving),
                        used: c.last_request().unwrap_or(serving.opened),
                        client: Some(c.pid),
                    };
                    rs.row(row.cells(now));
                }
            }
            for (key, pool) in shared.pools.all() {
                for (server, idle_since) in pool.idle_servers() {
                    let row = ServerRow {
                        user: &key.target.user,
                        database: &key.database,
                        server: Server::Open(&server),
                        used: idle_since,
                        client: None,
                        // RECONNECT closes idle connections at once: none is marked.
                        marked: false,
                    };
                    rs.row(row.cells(now));
                }
                for (number, began) in pool.opening_servers() {
                    let row = ServerRow {
                        user: &key.target.user,
                        database: &key.database,
                        server: Server::New {
                            target: &pool.target,
                            number,
                        },
                        used: began,
                        client: None,
                        // It counts as opened when its login completes, after
                        // any RECONNECT so far.
                        marked: false,
                    };
                    rs.row(row.cells(now));
                }
            }
            rs
        }
        Show::Databases => {
            // PgBouncer's columns in its order (monitoring tools read them by
            // name), then pgwarden's own.
            let mut rs = ResultSet::new(&[
                "name",
                "host",
                "port#",
                "database",
                "force_user",
                "pool_size#",
                "min_pool_size#",
                "reserve_pool#",
                "pool_mode",
                "max_connections#",
                "current_connections#",
                "paused#",
                "disabled#",
                "target",
                "primary",
                "clients#",
            ]);
            let disabled = shared.admissions.disabled();
            for name in config.databases.keys() {
                let Some(db) = config.database(name) else {
                    continue;
                };
                let count = clients
                    .iter()
                    .filter(|c| c.identity.database() == name)
                    .count();
                // Where its next transaction would go (one of several for a standby target).
                let node = table.route(db.target, config.health.max_standby_lag, 0);
                rs.row(vec![
                    name.clone().into(),
                    node.map(|n| n.config.host.clone()).into(),
                    node.map(|n| i64::from(n.config.port)).into(),
                    db.dbname.into(),
                    Cell::Null,
                    i64::from(db.pool_size).into(),
                    i64::from(db.min_pool_size).into(),
                    i64::from(config.pool.reserve_pool_size).into(),
                    db.pool_mode.to_string().into(),
                    i64::from(db.max_db_connections).into(),
                    shared.pools.database_connections(name).into(),
                    i64::from(paused.covers(name)).into(),
                    i64::from(disabled.contains(name)).into(),
                    db.target.name().into(),
                    table.primary().map(|p| p.config.name.clone()).into(),
                    count.into(),
                ]);
            }
            rs
        }
        Show::Stats | Show::StatsTotals | Show::StatsAverages => {
            let mut totals = stats::Figures::read(&shared.metrics);
            // Every configured database has a row, as in PgBouncer, even before its first client.
            for name in config.databases.keys() {
                totals.entry(name.clone()).or_default();
            }
            let averages = shared.stats.last().databases;
            let mut columns = vec!["database"];
            match what {
                Show::Stats => {
                    columns.extend(stats::NAMES.iter().map(|n| n.1));
                    columns.extend(stats::NAMES.iter().map(|n| n.2));
                }
                _ => columns.extend(stats::NAMES.iter().map(|n| n.0)),
            }
            let mut rs = ResultSet::new(&columns);
            let zero = stats::Figures::default();
            for (db, total) in &totals {
                let average = averages.get(db).unwrap_or(&zero);
                let figures = match what {
                    Show::Stats => vec![total, average],
                    Show::StatsTotals => vec![total],
                    _ => vec![average],
                };
                let mut row = vec![db.clone().into()];
                row.extend(
                    figures
                        .iter()
                        .flat_map(|f| f.values())
                        .map(|v| Cell::from(v as i64)),
                );
                rs.row(row);
            }
            rs
        }
        Show::Totals => {
            let total = stats::Figures::sum(stats::Figures::read(&shared.metrics).values());
            let average = shared.stats.last().all;
            let names = stats::NAMES.iter().map(|n| n.1);
            let names = names.chain(stats::NAMES.iter().map(|n| n.2));
            let values = total.values().into_iter().chain(average.values());
            let mut rs = ResultSet::new(&["name", "value#"]);
            for (name, value) in names.zip(values) {
                rs.row(vec![
                    name.trim_end_matches('#').into(),
                    (value as i64).into(),
                ]);
            }
            rs
        }
        Show::Users => {
            // PgBouncer's columns; pool size and mode are per database here, not per user.
            let mut rs = ResultSet::new(&[
                "name",
                "pool_size#",
                "reserve_pool_size#",
                "pool_mode",
                "max_user_connections#",
                "current_connections#",
                "max_user_client_connections#",
                "current_client_connections#",
            ]);
            let users = shared.users.load();
            let mut names: Vec<&str> = users.names().collect();
            names.sort_unstable();
            for name in names {
                let clients = clients.iter().filter(|c| c.identity.user() == name).count();
                rs.row(vec![
                    name.into(),
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    i64::from(config.pool.max_user_connections).into(),
                    shared.pools.user_connections(name).into(),
                    config.pgwarden.max_user_client_conn.into(),
                    clients.into(),
                ]);
            }
            rs
        }
        Show::State => {
            let mut rs = ResultSet::new(&["key", "value"]);
            let shutting_down = shared.leaving.is_cancelled();
            // pgwarden has no SUSPEND: it is never suspended.
            for (key, value) in [
                ("active", !shutting_down),
                ("paused", paused.all),
                ("suspended", false),
            ] {
                rs.row(vec![key.into(), yes_no(value).into()]);
            }
            rs
        }
        Show::Help => {
            let mut rs = ResultSet::new(&["command"]);
            let show = format!(
                "SHOW {}",
                super::command::listings().collect::<Vec<_>>().join("|")
            );
            rs.row(vec![show.into()]);
            for usage in super::command::USAGE {
                rs.row(vec![usage.into()]);
            }
            rs
        }
        Show::Config => {
            // PgBouncer's four columns: tools that read it check their number.
            let mut rs = ResultSet::new(&["key", "value", "default", "changeable"]);
            let defaults = crate::config::Config::defaults();
            // `restart_key`: the pgwarden key that decides whether a reload changes it.
            let mut row =
                |key: String, value: String, default: Option<String>, restart_key: &str| {
                    let changeable = yes_no(!crate::config::Config::needs_restart(restart_key));
                    rs.row(vec![
                        key.into(),
                        value.into(),
                        default.into(),
                        changeable.into(),
                    ]);
                };
            let running = config.flatten();
            for (k, v) in &running {
                row(k.clone(), v.clone(), defaults.get(k).cloned(), k);
            }
            let running = running.into_iter().collect();
            for r in super::compat::rows(&running, &defaults) {
                row(r.key.into(), r.value, r.default, r.pgwarden_key);
            }
            rs
        }
        Show::Lists => {
            let connections = shared.connections();
            let logged_in = shared.sessions.load(std::sync::atomic::Ordering::Relaxed);
            // PgBouncer's rows, in its order. pgwarden keeps no free lists of client
            // or server records and no DNS cache, so those rows are 0.
            let lists = [
                ("databases", config.databases.len()),
                ("users", shared.users.load().len()),
                ("pools", shared.pools.all().len()),
                ("free_clients", 0),
                ("used_clients", connections),
                ("login_clients", connections.saturating_sub(logged_in)),
                ("free_servers", 0),
                ("used_servers", shared.pools.server_connections()),
                ("dns_names", 0),
                ("dns_zones", 0),
                ("dns_queries", 0),
                ("dns_pending", 0),
            ];
            let mut rs = ResultSet::new(&["list", "items#"]);
            for (list, items) in lists {
                rs.row(vec![list.into(), items.into()]);
            }
            rs
        }
        Show::Version => {
            let mut rs = ResultSet::new(&["version"]);
            rs.row(vec![concat!("pgwarden ", env!("CARGO_PKG_VERSION")).into()]);
            rs
        }
        Show::Backends => {
            let mut rs = ResultSet::new(&[
                "name",
                "addr",
                "role",
                "state",
                "fenced",
                "timeline#",
                "lsn",
                "lag_bytes#",
                "lag_seconds",
                "last_check_ms#",
                "latency_ms",
                "priority#",
            ]);
            for (i, b) in table.backends.iter().enumerate() {
                let facts = b.facts.as_ref();
                let role = match (table.primary == Some(i), b.role()) {
                    (true, _) => "primary",
                    (false, Some(crate::backend::Role::Primary)) => "primary (not routed)",
                    (false, Some(crate::backend::Role::Standby)) => "standby",
                    (false, None) => "unknown",
                };
                let state = match b.health {
                    Health::Suspect { failures } => format!("suspect ({failures} failed)"),
                    other => other.name().to_owned(),
                };
                rs.row(vec![
                    b.config.name.clone().into(),
                    b.addr().into(),
                    role.into(),
                    state.into(),
                    yes_no(b.fenced).into(),
                    facts.and_then(|f| f.timeline).map(i64::from).into(),
                    facts.and_then(|f| f.lsn).map(lsn).into(),
                    b.lag_bytes.map(|l| l as i64).into(),
                    facts
                        .and_then(|f| f.replay_delay)
                        .map(|d| format!("{d:.3}"))
                        .into(),
                    b.checked_at
                        .and_then(|t| t.elapsed().ok())
                        .map(|d| d.as_millis() as i64)
                        .into(),
                    facts
                        .map(|f| format!("{:.3}", f.latency.as_secs_f64() * 1e3))
                        .into(),
                    i64::from(b.config.priority).into(),
                ]);
            }
            rs
        }
        Show::Failovers => {
            let mut rs = ResultSet::new(&[
                "time",
                "kind",
                "old_primary",
                "new_primary",
                "timeline#",
                "window_ms#",
            ]);
            for r in shared.history.all() {
                rs.row(vec![
                    time(r.at),
                    r.kind.name().into(),
                    r.old_primary.into(),
                    r.new_primary.into(),
                    i64::from(r.timeline).into(),
                    (r.window.as_millis() as i64).into(),
                ]);
            }
            rs
        }
        Show::Coordination => {
            let mut rs = ResultSet::new(&[
                "name",
                "role",
                "since",
                "etcd",
                "leader",
                "lease",
                "lease_ttl_s#",
                "revision#",
                "primary",
                "timeline#",
                "fenced",
                "failover_step",
                "error",
            ]);
            let Some(c) = &shared.coordination else {
                rs.row(vec![
                    Cell::Null,
                    "off".into(),
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                    Cell::Null,
                ]);
                return rs;
            };
            let s = c.snapshot();
            let state = s.state.as_ref();
            rs.row(vec![
                c.name.clone().into(),
                s.role.name().into(),
                time(s.since),
                (if s.role == Role::Disconnected {
                    "unreachable"
                } else {
                    "reachable"
                })
                .into(),
                s.leader.clone().into(),
                s.lease.map(|l| format!("{l:x}")).into(),
                (c.config.lease_ttl.as_secs() as i64).into(),
                s.revision.into(),
                state.and_then(|s| s.primary.clone()).into(),
                state.and_then(|s| s.timeline).map(i64::from).into(),
                state.map(|s| s.fenced.join(",")).into(),
                state
                    .and_then(|s| s.failover.as_ref())
                    .map(|f| {
                        format!(
                            "{} {} ({})",
                            f.step.name(),
                            f.new,
                            f.old.as_deref().unwrap_or("-")
                        )
                    })
                    .into(),
                s.error.clone().into(),
            ]);
            rs
        }
    }
}
