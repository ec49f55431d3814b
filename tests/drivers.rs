//! Real drivers through pgwarden in transaction pooling: asyncpg (named statements
//! and its statement cache, `conn.prepare()`), psycopg 3 with every query
//! server-prepared, and node-postgres named queries. Each driver runs a script from
//! tests/drivers/ against a fresh database behind a pgwarden with a small pool; the
//! script checks every result and exits non-zero on the first wrong one.
//!
//! The drivers live in target/drivers, installed by `.ci/install-drivers` (pinned,
//! into a venv and a node folder; `.ci/run` calls it, and so does the first of
//! these tests when they are missing). When they cannot be installed, the tests
//! fail and say so: they never pass without running.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, Options, Pgwarden};

/// How long one driver script may run before it counts as hung.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/drivers")
}

fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// Installs the drivers if they are missing, once per test process; then fails the
/// test if they are still missing: it must never pass without running.
fn require(path: &Path, what: &str) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/install-drivers");
        match Command::new("bash").arg(&script).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("{} failed: {other:?}", script.display()),
        }
    });
    assert!(
        path.exists(),
        "{what} is not installed ({} is missing): run `.ci/run`, or just `.ci/install-drivers`, \
         which installs the pinned drivers into target/drivers",
        path.display()
    );
}

fn python() -> Command {
    let python = drivers_dir().join("venv/bin/python");
    require(&python, "the Python driver venv (asyncpg, psycopg)");
    Command::new(python)
}

fn node() -> Command {
    let modules = drivers_dir().join("node/node_modules");
    require(&modules.join("pg/package.json"), "node-postgres (pg)");
    let mut node = Command::new("node");
    node.env("NODE_PATH", modules);
    node
}

/// pgwarden in transaction pooling with a small pool for `db`.
fn pgwarden(db: &Db, pool_size: u32) -> Pgwarden {
    pgwarden_with(db, pool_size, "")
}

/// The same with more `[pool]` settings.
fn pgwarden_with(db: &Db, pool_size: u32, pool: &str) -> Pgwarden {
    Pgwarden::start_with(
        &[db],
        Options {
            pool: format!("mode = \"transaction\"\ndefault_pool_size = {pool_size}\n{pool}"),
            ..Default::default()
        },
    )
}

/// Runs a driver script with the connection parameters through pgwarden; panics with
/// its output and pgwarden's log unless it exits successfully within the limit.
fn run_script(mut program: Command, script: &str, pgw: &Pgwarden, db: &Db) -> String {
    let started = Instant::now();
    let mut child = program
        .arg(scripts_dir().join(script))
        .args([
            "127.0.0.1",
            &pgw.port.to_string(),
            &db.user,
            &db.password,
            &db.name,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let outcome = match status {
        Some(s) if s.success() => {
            eprintln!("{script}: {}", stdout.trim());
            return stdout;
        }
        Some(s) => format!("{script} failed ({s})"),
        None => format!("{script} hung: killed after {SCRIPT_LIMIT:?}"),
    };
    panic!(
        "{outcome} after {:.1}s\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- pgwarden log ---\n{}",
        started.elapsed().as_secs_f64(),
        pgw.log()
    );
}

#[test]
fn asyncpg_pool_and_prepared_statements_through_a_pool_of_five() {
    let db = Db::create();
    let pgw = pgwarden(&db, 5);
    let out = run_script(python(), "asyncpg_pool.py", &pgw, &db);
    assert!(out.contains("asyncpg_pool: ok"), "{out}");
}

#[test]
fn psycopg_with_every_query_prepared_through_a_pool_of_three() {
    let db = Db::create();
    let pgw = pgwarden(&db, 3);
    let out = run_script(python(), "psycopg_prepared.py", &pgw, &db);
    assert!(out.contains("psycopg_prepared: ok"), "{out}");
}

#[test]
fn node_postgres_named_queries_through_a_pool_of_three() {
    let db = Db::create();
    let pgw = pgwarden(&db, 3);
    let out = run_script(node(), "node_named.js", &pgw, &db);
    assert!(out.contains("node_named: ok"), "{out}");
}

/// Six named statements per client against a server-side cache of two per server
/// connection: statements are evicted (closed) and prepared again all the time.
#[test]
fn node_postgres_named_queries_with_a_server_statement_cache_of_two() {
    let db = Db::create();
    let pgw = pgwarden_with(&db, 3, "max_prepared_statements = 2");
    let out = run_script(node(), "node_named.js", &pgw, &db);
    assert!(out.contains("node_named: ok"), "{out}");
}

#[test]
fn psycopg_settings_made_by_prepared_set_statements_stay_with_their_connection() {
    let db = Db::create();
    let pgw = pgwarden(&db, 2);
    let out = run_script(python(), "psycopg_settings.py", &pgw, &db);
    assert!(out.contains("psycopg_settings: ok"), "{out}");
}

/// spreaker's PgBouncer exporter scrapes pgwarden's console as it scrapes
/// PgBouncer's: all its SHOW queries answer, and its gauges carry pgwarden's figures.
#[test]
fn a_pgbouncer_exporter_scrapes_the_console() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: format!("stats_users = [\"{}\"]", db.user),
            pool: "default_pool_size = 2".into(),
            ..Default::default()
        },
    );
    let out = run_script(python(), "pgbouncer_exporter.py", &pgw, &db);
    let value = |metric: &str| -> f64 {
        out.lines()
            .find_map(|line| line.strip_prefix(metric)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {metric} in:\n{out}"))
    };
    let (name, user) = (&db.name, &db.user);
    assert!(
        value(&format!(
            "pgbouncer_stats_transactions_total{{database={name}}}"
        )) >= 3.0
    );
    assert!(value(&format!("pgbouncer_stats_queries_total{{database={name}}}")) >= 3.0);
    assert_eq!(
        value(&format!(
            "pgbouncer_databases_database_pool_size{{backend_database={name},database={name}}}"
        )),
        2.0
    );
    assert_eq!(
        value(&format!(
            "pgbouncer_pools_server_idle_connections{{database={name},user={user}}}"
        )),
        1.0
    );
    assert_eq!(value("pgbouncer_config_max_client_conn{}"), 10_000.0);
    assert_eq!(value("pgbouncer_config_max_user_connections{}"), 0.0);
}
