//! Operating pgwarden: the admin console (`psql -p 6432 pgwarden`), the HTTP
//! endpoint (/metrics, /health/*, /status), and the shipped alert rules and
//! dashboard.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Db, Options, Pgwarden, http, sqlstate};
use tokio_postgres::{Client, SimpleQueryMessage};

const ADMIN: (&str, &str) = ("admin", "admin-pw");
const STATS: (&str, &str) = ("watcher", "watcher-pw");

fn operated(extra: &str) -> Options {
    Options {
        pgwarden: format!(
            "admin_users = [\"{}\"]\nstats_users = [\"{}\"]\n{extra}",
            ADMIN.0, STATS.0
        ),
        extra_users: format!(
            "\"{}\" \"{}\"\n\"{}\" \"{}\"\n",
            ADMIN.0, ADMIN.1, STATS.0, STATS.1
        ),
        ..Default::default()
    }
}

async fn console(
    pgw: &Pgwarden,
    (user, password): (&str, &str),
) -> Result<Client, tokio_postgres::Error> {
    common::connect(&format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=pgwarden",
        pgw.port
    ))
    .await
}

/// The rows of a simple query, as (column name → value) maps.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<(String, Option<String>)>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// SHOW SERVERS' `close_needed` of the server connection with backend pid `pid`.
async fn close_needed(admin: &Client, pid: i32) -> String {
    let servers = rows(admin, "SHOW SERVERS").await;
    let pid = pid.to_string();
    servers
        .iter()
        .find(|r| get(r, "server_pid") == Some(pid.as_str()))
        .and_then(|r| get(r, "close_needed"))
        .unwrap_or_else(|| panic!("server {pid} not listed: {servers:?}"))
        .to_owned()
}

/// The value in `column` of a row of (column, value) pairs.
fn cell<'a, T: std::fmt::Debug>(row: &'a [(String, T)], column: &str) -> &'a T {
    &row.iter()
        .find(|(c, _)| c == column)
        .unwrap_or_else(|| panic!("no column {column} in {row:?}"))
        .1
}

fn get<'a>(row: &'a [(String, Option<String>)], column: &str) -> Option<&'a str> {
    cell(row, column).as_deref()
}

#[tokio::test]
async fn show_commands_describe_pools_clients_servers_and_stats() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], operated(""));
    let client = pgw.connect(&db).await;
    for _ in 0..5 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let holder = pgw.connect(&db).await;
    holder.batch_execute("BEGIN").await.unwrap();
    // A second server connection, back in the pool once its transaction ends.
    let other = common::connect(&format!("{} application_name=probe", pgw.conninfo(&db)))
        .await
        .unwrap();
    other.batch_execute("BEGIN").await.unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    let admin = console(&pgw, ADMIN).await.unwrap();

    let pools = rows(&admin, "SHOW POOLS").await;
    let pool = pools
        .iter()
        .find(|r| get(r, "database") == Some(db.name.as_str()))
        .unwrap();
    assert_eq!(get(pool, "user"), Some(db.user.as_str()));
    // As in PgBouncer, cl_active counts the idle clients too (cl_idle tells them).
    assert_eq!(get(pool, "cl_active"), Some("3"));
    assert_eq!(get(pool, "cl_idle"), Some("2"));
    assert_eq!(get(pool, "sv_active"), Some("1"), "{pool:?}");
    assert_eq!(get(pool, "sv_idle"), Some("1"), "{pool:?}");
    assert_eq!(get(pool, "pool_mode"), Some("transaction"));
    // PgBouncer's columns first, in its order, for the tools that read them.
    let columns: Vec<&str> = pool.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        columns[..16],
        [
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "cl_active_cancel_req",
            "cl_waiting_cancel_req",
            "sv_active",
            "sv_active_cancel",
            "sv_being_canceled",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
        ]
    );
    for quiet in ["cl_active_cancel_req", "sv_being_canceled", "sv_login"] {
        assert_eq!(get(pool, quiet), Some("0"), "{pool:?}");
    }

    let clients = rows(&admin, "show clients;").await;
    assert_eq!(clients.len(), 3);
    assert!(
        clients
            .iter()
            .any(|c| get(c, "state") == Some("active") && get(c, "backend") == Some("pg1"))
    );

    let servers = rows(&admin, "SHOW SERVERS").await;
    assert!(
        servers
            .iter()
            .any(|s| get(s, "state") == Some("active") && get(s, "backend") == Some("pg1"))
    );
    // PgBouncer's columns first, in its order, in both.
    for listing in [&clients, &servers] {
        let columns: Vec<&str> = listing[0].iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            columns[..18],
            [
                "type",
                "user",
                "database",
                "state",
                "addr",
                "port",
                "local_addr",
                "local_port",
                "connect_time",
                "request_time",
                "wait",
                "wait_us",
                "close_needed",
                "ptr",
                "link",
                "remote_pid",
                "tls",
                "application_name",
            ]
        );
    }
    let probe = clients
        .iter()
        .find(|c| get(c, "application_name") == Some("probe"))
        .unwrap_or_else(|| panic!("no probe in {clients:?}"));
    assert_eq!(get(probe, "local_addr"), Some("127.0.0.1"));
    assert_eq!(
        get(probe, "local_port"),
        Some(pgw.port.to_string().as_str())
    );
    // Idle counts as active, as in PgBouncer; an idle client links to no server.
    assert_eq!(get(probe, "state"), Some("active"));
    assert_eq!(get(probe, "link"), None);
    assert_eq!(get(probe, "tls"), Some(""));
    let probe_pid = get(probe, "pid").unwrap().to_owned();
    // A SET in a transaction shows at once, as the server reported it.
    other
        .batch_execute("SET application_name = 'renamed'")
        .await
        .unwrap();
    let again = rows(&admin, "SHOW CLIENTS").await;
    let renamed = again
        .iter()
        .find(|c| get(c, "pid") == Some(probe_pid.as_str()))
        .unwrap();
    assert_eq!(get(renamed, "application_name"), Some("renamed"));
    // The client in a transaction and its server connection link to each other.
    let linked = clients.iter().find(|c| get(c, "link").is_some()).unwrap();
    let server = servers
        .iter()
        .find(|s| get(s, "ptr") == get(linked, "link"))
        .unwrap_or_else(|| panic!("{linked:?} links to none of {servers:?}"));
    assert_eq!(get(server, "link"), get(linked, "ptr"));
    // Named for the node too: two nodes may run server processes of the same pid.
    assert!(get(server, "ptr").unwrap().ends_with("@pg1"), "{server:?}");
    assert_eq!(get(server, "remote_pid"), get(linked, "server_pid"));
    assert_eq!(get(server, "state"), Some("active"));
    // pgwarden's end of the server connection.
    assert_eq!(get(server, "local_addr"), Some("127.0.0.1"), "{server:?}");
    let local_port: u16 = get(server, "local_port").unwrap().parse().unwrap();
    assert!(local_port > 0);
    assert_eq!(get(server, "tls"), Some(""));

    let stats = rows(&admin, "SHOW STATS").await;
    let stat = stats
        .iter()
        .find(|r| get(r, "database") == Some(db.name.as_str()))
        .unwrap();
    let xacts: i64 = get(stat, "total_xact_count").unwrap().parse().unwrap();
    assert!(xacts >= 5, "{stat:?}");
    let received: i64 = get(stat, "total_received").unwrap().parse().unwrap();
    let sent: i64 = get(stat, "total_sent").unwrap().parse().unwrap();
    assert!(received > 0 && sent > 0, "{stat:?}");

    let dbs = rows(&admin, "SHOW DATABASES").await;
    let listed = dbs
        .iter()
        .find(|r| get(r, "name") == Some(db.name.as_str()))
        .unwrap();
    assert_eq!(get(listed, "primary"), Some("pg1"));
    let columns: Vec<&str> = listed.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        columns[..13],
        [
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool",
            "pool_mode",
            "max_connections",
            "current_connections",
            "paused",
            "disabled",
        ]
    );
    assert_eq!(get(listed, "host"), Some("127.0.0.1"));
    assert_eq!(
        get(listed, "port"),
        Some(db.server_port.to_string().as_str())
    );
    assert_eq!(get(listed, "paused"), Some("0"));
    // The same two server connections SHOW POOLS counts; no max_db_connections.
    assert_eq!(get(listed, "current_connections"), Some("2"), "{listed:?}");
    assert_eq!(get(listed, "max_connections"), Some("0"), "{listed:?}");
    let backends = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(get(&backends[0], "role"), Some("primary"));
    assert_eq!(get(&backends[0], "state"), Some("up"));
    let config = rows(&admin, "SHOW CONFIG").await;
    let key = |name: &str| config.iter().find(|r| get(r, "key") == Some(name)).unwrap();
    let columns: Vec<&str> = config[0].iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(columns, ["key", "value", "default", "changeable"]);
    let pool_size = key("pool.default_pool_size");
    assert_eq!(get(pool_size, "value"), Some("20"));
    assert_eq!(get(pool_size, "default"), Some("20"));
    assert_eq!(get(pool_size, "changeable"), Some("yes"));
    assert_eq!(get(key("pgwarden.listen"), "changeable"), Some("no"));
    assert_eq!(get(key("pgwarden.http_listen"), "changeable"), Some("no"));
    assert_eq!(get(key("backends[0].name"), "default"), None);

    let users = rows(&admin, "SHOW USERS").await;
    let user = users
        .iter()
        .find(|r| get(r, "name") == Some(db.user.as_str()))
        .unwrap_or_else(|| panic!("{} not in {users:?}", db.user));
    assert_eq!(
        get(user, "current_client_connections"),
        Some("3"),
        "{user:?}"
    );
    assert_eq!(get(user, "current_connections"), Some("2"), "{user:?}");
    let admin_row = users
        .iter()
        .find(|r| get(r, "name") == Some(ADMIN.0))
        .unwrap();
    assert_eq!(get(admin_row, "current_client_connections"), Some("0"));
    let state = rows(&admin, "SHOW STATE").await;
    let states: Vec<(&str, &str)> = state
        .iter()
        .map(|r| (get(r, "key").unwrap(), get(r, "value").unwrap()))
        .collect();
    assert_eq!(
        states,
        [("active", "yes"), ("paused", "no"), ("suspended", "no")]
    );
    let help = rows(&admin, "SHOW HELP").await;
    assert!(
        get(&help[0], "command")
            .unwrap()
            .starts_with("SHOW POOLS|CLIENTS|")
    );
    assert!(
        help.iter()
            .any(|r| get(r, "command") == Some("SWITCHOVER [TO node]"))
    );

    // Three clients and this console, all past login, on two server connections;
    // the user list holds the monitor's user, the database's, admin and watcher.
    let lists = rows(&admin, "SHOW LISTS").await;
    let list = |name: &str| {
        let row = lists.iter().find(|r| get(r, "list") == Some(name)).unwrap();
        get(row, "items").unwrap().to_owned()
    };
    let names: Vec<&str> = lists.iter().map(|r| get(r, "list").unwrap()).collect();
    assert_eq!(names.len(), 12, "{names:?}");
    for (name, items) in [
        ("databases", "1"),
        ("users", "4"),
        ("pools", "1"),
        ("used_clients", "4"),
        ("login_clients", "0"),
        ("used_servers", "2"),
    ] {
        assert_eq!(list(name), items, "{name} in {lists:?}");
    }
    assert!(
        config
            .iter()
            .all(|r| get(r, "value") != Some(db.password.as_str()))
    );
    assert!(
        get(&rows(&admin, "SHOW VERSION").await[0], "version")
            .unwrap()
            .starts_with("pgwarden ")
    );
    assert!(rows(&admin, "SHOW FAILOVERS").await.is_empty());

    // Mistakes get clear errors and the console stays usable.
    let err = admin.simple_query("SHOW tables").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"));
    let err = admin.simple_query("DROP DATABASE x").await.unwrap_err();
    assert!(common::message(&err).contains("unknown command"), "{err}");
    // A driver's session SET is accepted; a pgwarden setting is not silently ignored.
    admin
        .simple_query("SET application_name = 'psql'")
        .await
        .unwrap();
    let err = admin
        .simple_query("SET default_pool_size = 50")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"), "{err}");
    assert!(
        common::message(&err).contains("change pool.default_pool_size there and run RELOAD"),
        "{err}"
    );
    let err = admin.query("SHOW POOLS", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("0A000"));
    rows(&admin, "SHOW VERSION").await;
    holder.batch_execute("COMMIT").await.unwrap();
}

/// One database's row of a SHOW STATS-like command, as figures by column.
async fn stats_row(admin: &Client, command: &str, database: &str) -> Vec<(String, i64)> {
    let all = rows(admin, command).await;
    let row = all
        .iter()
        .find(|r| get(r, "database") == Some(database))
        .unwrap_or_else(|| panic!("{command}: no row for {database} in {all:?}"));
    row.iter()
        .skip(1)
        .map(|(c, v)| (c.clone(), v.as_deref().unwrap().parse().unwrap()))
        .collect()
}

fn figure(row: &[(String, i64)], column: &str) -> i64 {
    *cell(row, column)
}

#[tokio::test]
async fn show_stats_gives_pgbouncers_figures_and_averages_over_stats_period() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], operated("stats_period = \"1s\"\n"));
    let client = pgw.connect(&db).await;
    // Four autocommit statements, a block of three, one named statement prepared
    // and run twice: 8 transactions on 8 server assignments, 9 queries.
    for _ in 0..4 {
        client.simple_query("SELECT pg_sleep(0.01)").await.unwrap();
    }
    for sql in ["BEGIN", "SELECT 1", "COMMIT"] {
        client.simple_query(sql).await.unwrap();
    }
    let statement = client.prepare("SELECT $1::int").await.unwrap();
    for i in 0..2 {
        client.query(&statement, &[&i]).await.unwrap();
    }
    let admin = console(&pgw, STATS).await.unwrap();

    // PgBouncer 1.24's columns, in its order: monitoring tools look them up by name.
    let columns: Vec<String> = rows(&admin, "SHOW STATS").await[0]
        .iter()
        .map(|(c, _)| c.clone())
        .collect();
    let figures = [
        "xact_count",
        "query_count",
        "server_assignment_count",
        "received",
        "sent",
        "xact_time",
        "query_time",
        "wait_time",
        "client_parse_count",
        "server_parse_count",
        "bind_count",
    ];
    let average_columns = figures.map(|f| match f {
        "received" => "avg_recv".to_owned(),
        f => format!("avg_{f}"),
    });
    let mut expected = vec!["database".to_owned()];
    expected.extend(figures.iter().map(|f| format!("total_{f}")));
    expected.extend(average_columns);
    assert_eq!(columns, expected);

    let stats = stats_row(&admin, "SHOW STATS", &db.name).await;
    assert_eq!(figure(&stats, "total_xact_count"), 8, "{stats:?}");
    assert_eq!(figure(&stats, "total_server_assignment_count"), 8);
    assert_eq!(figure(&stats, "total_query_count"), 9);
    assert_eq!(figure(&stats, "total_client_parse_count"), 1);
    assert_eq!(figure(&stats, "total_server_parse_count"), 1);
    assert_eq!(figure(&stats, "total_bind_count"), 2);
    assert!(figure(&stats, "total_received") > 0 && figure(&stats, "total_sent") > 0);
    // Four sleeps of 10 ms were the server's work, within the assignments' time.
    let query_time = figure(&stats, "total_query_time");
    assert!(query_time >= 40_000, "{stats:?}");
    assert!(figure(&stats, "total_xact_time") >= query_time, "{stats:?}");

    let totals = stats_row(&admin, "SHOW STATS_TOTALS", &db.name).await;
    assert_eq!(figure(&totals, "xact_count"), 8);
    assert_eq!(
        figure(&totals, "bytes_received"),
        figure(&stats, "total_received")
    );
    assert_eq!(figure(&totals, "query_time"), query_time);
    let all = rows(&admin, "SHOW TOTALS").await;
    let total = |name: &str| -> i64 {
        let row = all.iter().find(|r| get(r, "name") == Some(name)).unwrap();
        get(row, "value").unwrap().parse().unwrap()
    };
    assert_eq!(total("total_xact_count"), 8);
    assert_eq!(total("total_query_time"), query_time);

    // The same figures on /metrics.
    let (_, body) = get_path(pgw.http_port, "/metrics");
    let value = |line: String| -> f64 {
        let found = body.lines().find(|l| l.starts_with(&line));
        let found = found.unwrap_or_else(|| panic!("{line} missing"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let label = format!("database=\"{}\"", db.name);
    assert_eq!(
        value(format!("pgwarden_server_assignments_total{{{label}}}")),
        8.0
    );
    assert!(value(format!("pgwarden_query_seconds_total{{{label}}}")) >= 0.04);
    assert_eq!(
        value(format!(
            "pgwarden_prepared_statements_total{{{label},kind=\"bind\"}}"
        )),
        2.0
    );
    // One wait and one duration per assignment; the bytes as SHOW STATS counts them.
    for histogram in ["client_wait_seconds", "transaction_duration_seconds"] {
        let count = value(format!("pgwarden_{histogram}_count{{{label}}}"));
        let all = value(format!(
            "pgwarden_{histogram}_bucket{{{label},le=\"+Inf\"}}"
        ));
        assert_eq!((count, all), (8.0, 8.0), "{histogram}");
    }
    assert_eq!(
        value(format!("pgwarden_client_received_bytes_total{{{label}}}")),
        figure(&stats, "total_received") as f64
    );

    // A period with work averages it; once the work stops, a quiet period averages nothing.
    let work = tokio::spawn(async move {
        loop {
            client.simple_query("SELECT 1").await.unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let averages = stats_row(&admin, "SHOW STATS_AVERAGES", &db.name).await;
        if figure(&averages, "xact_count") > 0 {
            break averages;
        }
        assert!(Instant::now() < deadline, "no averages: {averages:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    work.abort();
    assert!(figure(&busy, "query_count") > 0, "{busy:?}");
    assert!(figure(&busy, "bytes_sent") > 0, "{busy:?}");
    assert!(figure(&busy, "xact_time") > 0, "{busy:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = stats_row(&admin, "SHOW STATS_AVERAGES", &db.name).await;
    assert!(quiet.iter().all(|(_, v)| *v == 0), "{quiet:?}");
    let stats = stats_row(&admin, "SHOW STATS", &db.name).await;
    assert_eq!(figure(&stats, "avg_xact_count"), 0, "{stats:?}");
    assert!(figure(&stats, "total_xact_count") > 8, "{stats:?}");
}

#[tokio::test]
async fn a_session_mode_client_shows_in_the_stats_transaction_by_transaction() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            database: "pool_mode = \"session\"".into(),
            ..operated("")
        },
    );
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();
    for sql in ["BEGIN", "SELECT pg_sleep(0.05)", "COMMIT"] {
        client.simple_query(sql).await.unwrap();
    }
    // Idle between transactions, holding its server connection all along.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.simple_query("SELECT 2").await.unwrap();
    let admin = console(&pgw, STATS).await.unwrap();
    let stats = stats_row(&admin, "SHOW STATS", &db.name).await;
    assert_eq!(figure(&stats, "total_xact_count"), 3, "{stats:?}");
    assert_eq!(figure(&stats, "total_query_count"), 5, "{stats:?}");
    assert_eq!(
        figure(&stats, "total_server_assignment_count"),
        1,
        "{stats:?}"
    );
    assert!(figure(&stats, "total_received") > 0, "{stats:?}");
    // The transactions' time: the block's sleep, not the session's idle 300 ms.
    let xact_time = figure(&stats, "total_xact_time");
    assert!((50_000..300_000).contains(&xact_time), "{stats:?}");
    assert!(figure(&stats, "total_query_time") >= 50_000, "{stats:?}");
    let (_, body) = get_path(pgw.http_port, "/metrics");
    let series = format!("pgwarden_transactions_total{{database=\"{}\"}} 3", db.name);
    assert!(body.contains(&series), "{series} in\n{body}");
}

#[tokio::test]
async fn only_admin_users_may_change_things_and_others_may_not_log_in() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], operated(""));
    let stats = console(&pgw, STATS).await.unwrap();
    rows(&stats, "SHOW POOLS").await;
    let err = stats.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    let err = stats.simple_query("SHUTDOWN").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"));
    // A database user is not an admin.
    let err = console(&pgw, (&db.user, &db.password)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    // A wrong password is a wrong password.
    let err = console(&pgw, (ADMIN.0, "nope")).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    // PgBouncer's console name reaches the console too, for the same users only.
    let as_pgbouncer = |(user, password): (&str, &str)| {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=pgbouncer",
            pgw.port
        )
    };
    let bouncer = common::connect(&as_pgbouncer(STATS)).await.unwrap();
    assert!(
        get(&rows(&bouncer, "SHOW VERSION").await[0], "version")
            .unwrap()
            .starts_with("pgwarden ")
    );
    let err = bouncer.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
    let err = common::connect(&as_pgbouncer((&db.user, &db.password)))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42501"), "{err}");
}

#[tokio::test]
async fn pause_holds_new_transactions_until_resume_and_kill_drops_clients_and_pauses() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], operated(""));
    let admin = console(&pgw, ADMIN).await.unwrap();
    let busy = pgw.connect(&db).await;
    busy.batch_execute("BEGIN").await.unwrap();
    // PAUSE returns once the running transaction is done. Logged in beforehand, so
    // that the time measured is PAUSE's alone.
    let pauser = console(&pgw, ADMIN).await.unwrap();
    let pausing = tokio::spawn({
        let name = db.name.clone();
        async move {
            let started = Instant::now();
            pauser.simple_query(&format!("PAUSE {name}")).await.unwrap();
            started.elapsed()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pausing.is_finished());
    busy.batch_execute("COMMIT").await.unwrap();
    let waited = pausing.await.unwrap();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    let waiter = pgw.connect(&db).await;
    let query = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!query.is_finished(), "a transaction ran while paused");
    rows(&admin, "SHOW DATABASES").await.iter().for_each(|r| {
        if get(r, "name") == Some(db.name.as_str()) {
            assert_eq!(get(r, "paused"), Some("1"));
        }
    });
    admin
        .simple_query(&format!("RESUME {}", db.name))
        .await
        .unwrap();
    query.await.unwrap().unwrap();

    // KILL disconnects the database's clients at once and pauses it, as PgBouncer's
    // does: a client that comes back logs in, but its transaction waits for RESUME.
    let victim = pgw.connect(&db).await;
    victim.simple_query("SELECT 1").await.unwrap();
    admin
        .simple_query(&format!("KILL {}", db.name))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(victim.simple_query("SELECT 1").await.is_err());
    let returning = pgw.connect(&db).await;
    let query = common::waits("RESUME after KILL", async move {
        returning.simple_query("SELECT 1").await.map(drop)
    })
    .await;
    admin
        .simple_query(&format!("RESUME {}", db.name))
        .await
        .unwrap();
    common::served(query).await.unwrap();
    // Naming a database that does not exist is an error.
    let err = admin.simple_query("KILL nowhere").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"));
}

#[tokio::test]
async fn reconnect_replaces_server_connections_wait_close_waits_disable_refuses_logins_and_kill_client_drops_one()
 {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], operated(""));
    let admin = console(&pgw, ADMIN).await.unwrap();

    // RECONNECT: an idle connection closes at once, a busy one when it is released.
    let idle = pgw.connect(&db).await;
    let busy = pgw.connect(&db).await;
    busy.batch_execute("BEGIN").await.unwrap();
    let busy_pid = common::backend_pid(&busy).await;
    let idle_pid = common::backend_pid(&idle).await;
    assert_ne!(idle_pid, busy_pid);
    admin
        .simple_query(&format!("RECONNECT {}", db.name))
        .await
        .unwrap();
    let open = || common::server_pids(&db);
    common::eventually(Duration::from_secs(5), "the idle connection closed", || {
        open() == [busy_pid]
    })
    .await;
    assert_eq!(
        common::backend_pid(&busy).await,
        busy_pid,
        "the transaction keeps its connection"
    );
    // SHOW SERVERS marks it close_needed, and WAIT_CLOSE waits for its release.
    assert_eq!(close_needed(&admin, busy_pid).await, "1");
    let waiter = console(&pgw, ADMIN).await.unwrap();
    let name = db.name.clone();
    let waiting = common::waits("the marked connection in use", async move {
        waiter.simple_query(&format!("WAIT_CLOSE {name}")).await
    })
    .await;
    busy.batch_execute("COMMIT").await.unwrap();
    common::served(waiting).await.unwrap();
    common::eventually(
        Duration::from_secs(5),
        "the connection released after RECONNECT closed",
        || open().is_empty(),
    )
    .await;
    let fresh = common::backend_pid(&idle).await;
    assert!(![idle_pid, busy_pid].contains(&fresh));
    // Connections opened afterwards are kept, and not marked.
    assert_eq!(common::backend_pid(&idle).await, fresh);
    idle.batch_execute("BEGIN").await.unwrap();
    assert_eq!(close_needed(&admin, fresh).await, "0");
    admin.simple_query("WAIT_CLOSE").await.unwrap();
    idle.batch_execute("COMMIT").await.unwrap();

    // DISABLE refuses new clients with 55000; connected ones carry on; ENABLE.
    admin
        .simple_query(&format!("DISABLE {}", db.name))
        .await
        .unwrap();
    let err = common::connect(&pgw.conninfo(&db)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("55000"), "{err}");
    assert!(
        common::message(&err).contains("is not currently accepting connections"),
        "{err}"
    );
    idle.simple_query("SELECT 1").await.unwrap();
    let listed = rows(&admin, "SHOW DATABASES").await;
    let row = listed
        .iter()
        .find(|r| get(r, "name") == Some(db.name.as_str()))
        .unwrap();
    assert_eq!(get(row, "disabled"), Some("1"));
    admin
        .simple_query(&format!("ENABLE {}", db.name))
        .await
        .unwrap();
    let other = pgw.connect(&db).await;

    // KILL_CLIENT drops exactly the client named: the one whose open transaction
    // SHOW CLIENTS shows on its server connection.
    other.batch_execute("BEGIN").await.unwrap();
    let server_pid = common::backend_pid(&other).await.to_string();
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let pid = clients
        .iter()
        .find(|r| get(r, "server_pid") == Some(server_pid.as_str()))
        .and_then(|r| get(r, "pid"))
        .unwrap_or_else(|| panic!("no client on server {server_pid}: {clients:?}"))
        .to_owned();
    admin
        .simple_query(&format!("KILL_CLIENT {pid}"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(other.simple_query("SELECT 1").await.is_err());
    idle.simple_query("SELECT 1").await.unwrap();
    busy.simple_query("SELECT 1").await.unwrap();
    let err = admin.simple_query("KILL_CLIENT 0").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err}");
}

#[tokio::test]
async fn kill_client_a_cancel_or_a_close_ends_a_wait_for_a_connection_a_paused_gate_or_a_node_at_once()
 {
    let db = Db::create();
    let mut options = operated("");
    options.pool = "default_pool_size = 1\nquery_wait_timeout = \"60s\"".into();
    let pgw = Pgwarden::start_with(&[&db], options);
    let admin = console(&pgw, ADMIN).await.unwrap();
    let holder = pgw.connect(&db).await;
    holder
        .batch_execute("CREATE TABLE waited (n int)")
        .await
        .unwrap();
    let mut canceled = Vec::new();
    for interrupt in [Interrupt::KillClient, Interrupt::Cancel, Interrupt::Leave] {
        holder.batch_execute("BEGIN").await.unwrap();
        canceled
            .extend(end_a_wait(&pgw, &db, &admin, "the pool's only connection", interrupt).await);
        // The transaction that held the pool is not disturbed.
        holder.batch_execute("SELECT 1; COMMIT").await.unwrap();

        // The same at a paused database's gate.
        let pause = format!("PAUSE {}", db.name);
        admin.simple_query(&pause).await.unwrap();
        canceled.extend(end_a_wait(&pgw, &db, &admin, "the pause", interrupt).await);
        let resume = format!("RESUME {}", db.name);
        admin.simple_query(&resume).await.unwrap();

        // And while no node can serve it (here: its only node fenced), within
        // failover.client_wait_timeout.
        admin.simple_query("FENCE pg1").await.unwrap();
        canceled.extend(end_a_wait(&pgw, &db, &admin, "a node to route to", interrupt).await);
        admin.simple_query("UNFENCE pg1").await.unwrap();
    }
    // None of the ended requests ran later, and a canceled client carries on.
    let rows = holder.query_one("SELECT count(*) FROM waited", &[]).await;
    assert_eq!(rows.unwrap().get::<_, i64>(0), 0);
    assert_eq!(canceled.len(), 3);
    for client in canceled {
        client
            .batch_execute("INSERT INTO waited VALUES (2)")
            .await
            .unwrap();
    }
}

/// How a test ends a client's wait for a server connection.
#[derive(Clone, Copy)]
enum Interrupt {
    /// the admin console's KILL_CLIENT: the session ends (57P01)
    KillClient,
    /// the client's CancelRequest: the request fails (57014), the session stays
    Cancel,
    /// the client closes its connection
    Leave,
}

/// A new client's INSERT waits for `blocked_by`; `interrupt` ends the request at
/// once. Returns the client when it stays connected. The canceled INSERT goes in
/// the extended protocol (Parse, Bind, Execute, Sync: the error comes at the Sync),
/// the others as simple queries.
async fn end_a_wait(
    pgw: &Pgwarden,
    db: &Db,
    admin: &Client,
    blocked_by: &str,
    interrupt: Interrupt,
) -> Option<Arc<Client>> {
    let (client, connection) = tokio_postgres::connect(&pgw.conninfo(db), tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let client = Arc::new(client);
    let waiting = common::waits(blocked_by, {
        let client = client.clone();
        async move {
            match interrupt {
                Interrupt::KillClient | Interrupt::Leave => {
                    client.batch_execute("INSERT INTO waited VALUES (1)").await
                }
                Interrupt::Cancel => {
                    let insert = "INSERT INTO waited VALUES ($1)";
                    client.execute(insert, &[&1i32]).await.map(drop)
                }
            }
        }
    })
    .await;
    match interrupt {
        Interrupt::KillClient => {
            let clients = rows(admin, "SHOW CLIENTS").await;
            let pid = clients
                .iter()
                .find(|r| get(r, "state") == Some("waiting"))
                .and_then(|r| get(r, "pid"))
                .unwrap_or_else(|| panic!("no waiting client: {clients:?}"))
                .to_owned();
            admin
                .simple_query(&format!("KILL_CLIENT {pid}"))
                .await
                .unwrap();
            common::ended_by_admin_shutdown(&common::served(waiting).await.unwrap_err());
            None
        }
        Interrupt::Cancel => {
            let token = client.cancel_token();
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
            let err = common::served(waiting).await.unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
            Some(client)
        }
        Interrupt::Leave => {
            // The socket closes under the waiting request.
            connection.abort();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while rows(admin, "SHOW CLIENTS")
                .await
                .iter()
                .any(|r| get(r, "state") == Some("waiting"))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a client that left still waits for {blocked_by}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = waiting.await;
            None
        }
    }
}

#[tokio::test]
async fn show_pools_and_metrics_report_clients_by_state_and_the_longest_wait() {
    let db = Db::create();
    let mut options = operated("");
    options.pool = "default_pool_size = 1".into();
    let pgw = Pgwarden::start_with(&[&db], options);
    let admin = console(&pgw, ADMIN).await.unwrap();
    let holder = pgw.connect(&db).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = pgw.connect(&db).await;
    // The task gives the client back, so that it stays connected.
    let waiting = tokio::spawn(async move {
        let done = waiter.simple_query("SELECT 1").await.map(|_| ());
        (waiter, done)
    });
    let _idle = pgw.connect(&db).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let pools = rows(&admin, "SHOW POOLS").await;
    let row = pools
        .iter()
        .find(|r| get(r, "database") == Some(db.name.as_str()))
        .unwrap();
    assert_eq!(get(row, "cl_waiting"), Some("1"), "{row:?}");
    assert_eq!(get(row, "maxwait"), Some("1"), "{row:?}");
    // A sample of the pair's series whose labels include `label`.
    let sample = |scrape: &str, name: &str, label: &str| -> f64 {
        let pair = [
            format!("database=\"{}\"", db.name),
            format!("user=\"{}\"", db.user),
        ];
        scrape
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| l.contains(label) && pair.iter().all(|p| l.contains(p.as_str())))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let clients = |scrape: &str| -> [f64; 3] {
        ["active", "waiting", "idle"]
            .map(|state| sample(scrape, "pgwarden_clients", &format!("state=\"{state}\"")))
    };
    let (_, scrape) = pgw.http_get("/metrics");
    let waited = sample(&scrape, "pgwarden_client_longest_wait_seconds", "");
    assert!((1.3..5.0).contains(&waited), "{waited}");
    assert_eq!(clients(&scrape), [1.0, 1.0, 1.0], "active, waiting, idle");

    holder.batch_execute("COMMIT").await.unwrap();
    let (_waiter, done) = waiting.await.unwrap();
    done.unwrap();
    let pools = rows(&admin, "SHOW POOLS").await;
    let row = pools
        .iter()
        .find(|r| get(r, "database") == Some(db.name.as_str()))
        .unwrap();
    assert_eq!(
        (get(row, "maxwait"), get(row, "maxwait_us")),
        (Some("0"), Some("0"))
    );
    let (_, scrape) = pgw.http_get("/metrics");
    assert_eq!(
        sample(&scrape, "pgwarden_client_longest_wait_seconds", ""),
        0.0
    );
    assert_eq!(clients(&scrape), [0.0, 0.0, 3.0], "active, waiting, idle");
    drop(holder);
    // A client that left is no longer counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while clients(&pgw.http_get("/metrics").1) != [0.0, 0.0, 2.0] {
        assert!(
            std::time::Instant::now() < deadline,
            "the departed client is still counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn fence_and_unfence_steer_routing_and_reload_and_shutdown_work() {
    let db = Db::create();
    let mut options = operated("");
    options.failover = "client_wait_timeout = \"1s\"".into();
    let mut pgw = Pgwarden::start_with(&[&db], options);
    let admin = console(&pgw, ADMIN).await.unwrap();
    let client = pgw.connect(&db).await;
    admin.simple_query("FENCE pg1").await.unwrap();
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    let backends = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(get(&backends[0], "fenced"), Some("yes"));
    let err = admin.simple_query("FENCE nosuch").await.unwrap_err();
    assert!(common::message(&err).contains("no backend named"), "{err}");
    admin.simple_query("UNFENCE pg1").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();

    admin.simple_query("RELOAD").await.unwrap();
    assert!(pgw.log().contains("configuration reloaded"));
    admin.simple_query("SHUTDOWN").await.unwrap();
    pgw.exits_cleanly(Duration::from_secs(10));
}

fn get_path(port: u16, path: &str) -> (String, String) {
    http(port, &format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n"))
}

#[tokio::test]
async fn the_http_endpoint_serves_metrics_health_and_status_and_survives_garbage() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], operated(""));
    let client = pgw.connect(&db).await;
    for _ in 0..20 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let (status, body) = get_path(pgw.http_port, "/metrics");
    assert!(status.contains("200"), "{status}");
    let line = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let xacts: f64 = line(&format!(
        "pgwarden_transactions_total{{database=\"{}\"}}",
        db.name
    ))
    .rsplit(' ')
    .next()
    .unwrap()
    .parse()
    .unwrap();
    assert!(xacts >= 20.0);
    assert!(line("pgwarden_primary_available").ends_with(" 1"));
    assert!(line("pgwarden_backend_role{backend=\"pg1\",role=\"primary\"}").ends_with(" 1"));
    assert!(body.contains("pgwarden_client_wait_seconds_bucket"));
    assert!(body.contains("pgwarden_build_info"));
    assert!(!body.contains(&db.password));

    let (status, body) = get_path(pgw.http_port, "/health/live");
    assert!(
        status.contains("200") && body.contains("live"),
        "{status} {body}"
    );
    let (status, body) = get_path(pgw.http_port, "/health/ready");
    assert!(
        status.contains("200") && body.contains("\"primary\":\"pg1\""),
        "{status} {body}"
    );
    let (status, body) = get_path(pgw.http_port, "/status");
    assert!(status.contains("200"));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["primary"], "pg1");
    assert_eq!(json["backends"][0]["role"], "primary");

    assert!(get_path(pgw.http_port, "/nothing").0.contains("404"));
    assert!(
        http(
            pgw.http_port,
            "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n"
        )
        .0
        .contains("405")
    );
    // Garbage, a huge header and a slow client: each is answered or closed, nothing more.
    let _ = http(pgw.http_port, "\x00\x01\x02 garbage\r\n\r\n");
    let _ = http(
        pgw.http_port,
        &format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(200_000)),
    );
    let half = std::net::TcpStream::connect(("127.0.0.1", pgw.http_port)).unwrap();
    assert!(get_path(pgw.http_port, "/health/live").0.contains("200"));
    drop(half);
    client.simple_query("SELECT 1").await.unwrap();
}

/// The metric names an expression uses (histogram series mapped to their family):
/// pgwarden's own, and the process figures it exports.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    let next = |from: usize| {
        ["pgwarden_", "process_"]
            .iter()
            .filter_map(|prefix| text[from..].find(prefix))
            .min()
    };
    while let Some(found) = next(i) {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(family.to_owned());
        i = end;
    }
    names
}

#[test]
fn alert_rules_and_dashboard_use_only_metrics_pgwarden_exports() {
    let metrics = pgwarden::metrics::Metrics::new();
    let known = metrics.names();
    let alerts = std::fs::read_to_string("conf/alerts.yml").unwrap();
    let dashboard = std::fs::read_to_string("conf/grafana-dashboard.json").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&dashboard).expect("dashboard is valid JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() > 5));
    for (file, text) in [
        ("alerts.yml", &alerts),
        ("grafana-dashboard.json", &dashboard),
    ] {
        let used = metric_names(text);
        assert!(!used.is_empty());
        for name in used {
            assert!(
                known.contains(&name),
                "{file} uses {name}, which pgwarden does not export"
            );
        }
    }
    // The rules are valid Prometheus rules (promtool comes with Debian's prometheus package).
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", "conf/alerts.yml"])
        .output()
        .expect("promtool not found: apt-get install -y prometheus (.ci/run does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A backend whose host is a folder is reached through PostgreSQL's own socket
/// file there: pooled connections, the monitor's probes and forwarded cancels all
/// take it, and the console shows those server connections as `unix`.
#[tokio::test]
async fn a_backend_behind_its_unix_socket_is_pooled_probed_and_cancelled() {
    let db = Db::create();
    let socket_dir = common::with_cluster(|c| c.root().display().to_string());
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            backend_host: Some(socket_dir),
            ..operated("")
        },
    );
    let client = pgw.connect(&db).await;
    // PostgreSQL has no server address for a session on its Unix-domain socket.
    let local: bool = client
        .query_one("SELECT inet_server_addr() IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(local, "the server connection should be local");

    let sleeping = common::Sleeping::start(client).await;
    let admin = console(&pgw, ADMIN).await.unwrap();
    let servers = rows(&admin, "SHOW SERVERS").await;
    let port = db.server_port.to_string();
    assert!(
        servers
            .iter()
            .any(|s| get(s, "addr") == Some("unix") && get(s, "port") == Some(port.as_str())),
        "{servers:?}"
    );
    let client = sleeping.cancel().await;
    client.simple_query("SELECT 1").await.unwrap();

    let backends = rows(&admin, "SHOW BACKENDS").await;
    assert_eq!(get(&backends[0], "role"), Some("primary"), "{backends:?}");
    assert_eq!(get(&backends[0], "state"), Some("up"), "{backends:?}");
}

/// A cluster of the test's own, whose postmaster the test may stop, behind a
/// pgwarden with `pool` settings whose monitor does not call the node down while
/// it is stopped.
fn stoppable(pool: &str) -> (pgwarden::cluster::Cluster, Db, Pgwarden) {
    let cluster = pgwarden::cluster::Cluster::start(&Default::default()).unwrap();
    let node = cluster.primary();
    let db = Db::create_on(&cluster);
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            backends: vec![(node.name.clone(), node.port)],
            pool: pool.into(),
            health: "interval = \"1min\"\ntimeout = \"30s\"".into(),
            ..operated("")
        },
    );
    (cluster, db, pgw)
}

/// A client whose next request needs a new server connection, and the client
/// whose open transaction holds the pool's first one.
async fn needing_a_login(pgw: &Pgwarden, db: &Db) -> (Client, Client) {
    let holder = pgw.connect(db).await;
    holder.batch_execute("BEGIN").await.unwrap();
    (holder, pgw.connect(db).await)
}

/// SHOW SERVERS, once a server connection in `state` is among them (within 10 s),
/// and that connection's row.
async fn servers_with(
    admin: &Client,
    state: &str,
) -> (
    Vec<Vec<(String, Option<String>)>>,
    Vec<(String, Option<String>)>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let servers = rows(admin, "SHOW SERVERS").await;
        if let Some(row) = servers.iter().find(|r| get(r, "state") == Some(state)) {
            let row = row.clone();
            return (servers, row);
        }
        assert!(
            Instant::now() < deadline,
            "no server connection {state}: {servers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn show_servers_lists_a_connection_being_opened_as_new() {
    let (cluster, db, pgw) = stoppable("server_connect_timeout = \"30s\"");
    let node = cluster.primary();
    let admin = console(&pgw, ADMIN).await.unwrap();
    let (holder, client) = needing_a_login(&pgw, &db).await;
    // A stopped postmaster: the kernel completes the TCP handshake, nobody forks a
    // server process to answer the startup packet.
    node.signal(libc::SIGSTOP).unwrap();
    let query = tokio::spawn(async move { client.simple_query("SELECT 1").await.map(|_| ()) });

    let (_, opening) = servers_with(&admin, "new").await;
    assert_eq!(get(&opening, "type"), Some("S"));
    assert_eq!(get(&opening, "user"), Some(db.user.as_str()));
    assert_eq!(get(&opening, "database"), Some(db.name.as_str()));
    assert_eq!(get(&opening, "addr"), Some("127.0.0.1"));
    assert_eq!(get(&opening, "port"), Some(node.port.to_string().as_str()));
    assert_eq!(get(&opening, "backend"), Some(node.name.as_str()));
    // No process and no local end yet; PgBouncer shows remote_pid 0 then.
    assert_eq!(get(&opening, "remote_pid"), Some("0"));
    assert_eq!(get(&opening, "server_pid"), None);
    assert_eq!(get(&opening, "local_addr"), None);
    assert_eq!(get(&opening, "link"), None);
    assert!(get(&opening, "connect_time").is_some());
    let pools = rows(&admin, "SHOW POOLS").await;
    let pool = pools
        .iter()
        .find(|r| get(r, "database") == Some(db.name.as_str()))
        .unwrap();
    assert_eq!(get(pool, "sv_login"), Some("1"), "{pool:?}");
    let logins = |scrape: &str| {
        let series = format!(
            "pgwarden_server_connections{{backend=\"{}\",database=\"{}\",state=\"login\"}} ",
            node.name, db.name
        );
        let line = scrape.lines().find(|l| l.starts_with(&series));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
    };
    assert_eq!(logins(&pgw.http_get("/metrics").1), Some(1));

    node.signal(libc::SIGCONT).unwrap();
    tokio::time::timeout(Duration::from_secs(20), query)
        .await
        .expect("the query completes once the server answers")
        .unwrap()
        .unwrap();
    // Logged in, it is listed as the idle connection it now is, and no longer as new.
    let servers = rows(&admin, "SHOW SERVERS").await;
    let mut states: Vec<_> = servers.iter().map(|r| get(r, "state")).collect();
    states.sort();
    assert_eq!(states, [Some("active"), Some("idle")], "{servers:?}");
    assert!(servers.iter().all(|r| get(r, "server_pid").is_some()));
    assert_eq!(logins(&pgw.http_get("/metrics").1), Some(0));
    holder.batch_execute("COMMIT").await.unwrap();
}

/// A client's request that waits for a new server connection's login ends at once
/// when the client is killed, cancels or leaves, as a wait in the pool's line does;
/// the login goes on, and the connection it brings joins the pool.
#[tokio::test]
async fn kill_client_a_cancel_or_a_close_ends_a_wait_for_a_login_and_the_connection_joins_the_pool()
{
    let (cluster, db, pgw) = stoppable("default_pool_size = 4\nserver_connect_timeout = \"30s\"");
    let node = cluster.primary();
    let admin = console(&pgw, ADMIN).await.unwrap();
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute("CREATE TABLE waited (n int)")
        .await
        .unwrap();
    let states = |servers: &[Vec<(String, Option<String>)>], state: &str| {
        servers
            .iter()
            .filter(|r| get(r, "state") == Some(state))
            .count()
    };
    // Each round's transactions hold every connection the pool has, so that the
    // next request needs a new one.
    let mut holders = vec![setup];
    let mut canceled = Vec::new();
    for interrupt in [Interrupt::KillClient, Interrupt::Cancel, Interrupt::Leave] {
        for holder in &holders {
            holder.batch_execute("BEGIN").await.unwrap();
        }
        // A stopped postmaster: the kernel completes the TCP handshake, nobody forks
        // a server process to answer the startup packet.
        node.signal(libc::SIGSTOP).unwrap();
        canceled.extend(end_a_wait(&pgw, &db, &admin, "a login", interrupt).await);
        let servers = rows(&admin, "SHOW SERVERS").await;
        assert_eq!(states(&servers, "new"), 1, "the login goes on: {servers:?}");

        node.signal(libc::SIGCONT).unwrap();
        // The new connection joined the pool.
        let (servers, _) = servers_with(&admin, "idle").await;
        assert_eq!(states(&servers, "idle"), 1, "{servers:?}");
        assert_eq!(states(&servers, "new"), 0, "{servers:?}");
        for holder in &holders {
            holder.batch_execute("COMMIT").await.unwrap();
        }
        holders.push(pgw.connect(&db).await);
    }
    // None of the ended requests ran later, and the canceled client carries on.
    let rows = holders[0]
        .query_one("SELECT count(*) FROM waited", &[])
        .await;
    assert_eq!(rows.unwrap().get::<_, i64>(0), 0);
    assert_eq!(canceled.len(), 1);
    canceled[0]
        .batch_execute("INSERT INTO waited VALUES (2)")
        .await
        .unwrap();
}

/// `query_wait_timeout` bounds a request's wait for a login as it bounds its wait
/// in the pool's line: 53300, the client stays, and the login goes on for the pool.
#[tokio::test]
async fn query_wait_timeout_ends_a_wait_for_a_login_and_the_connection_joins_the_pool() {
    let (cluster, db, pgw) = stoppable(
        "default_pool_size = 2\nquery_wait_timeout = \"1s\"\nserver_connect_timeout = \"30s\"",
    );
    let node = cluster.primary();
    let admin = console(&pgw, ADMIN).await.unwrap();
    let (holder, client) = needing_a_login(&pgw, &db).await;
    node.signal(libc::SIGSTOP).unwrap();
    let started = Instant::now();
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // The login goes on, and once the server answers its connection joins the pool.
    servers_with(&admin, "new").await;
    node.signal(libc::SIGCONT).unwrap();
    let (_, joined) = servers_with(&admin, "idle").await;
    // The same client, served by the connection that logged in meanwhile.
    let served: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        get(&joined, "remote_pid"),
        Some(served.to_string().as_str())
    );
    holder.batch_execute("COMMIT").await.unwrap();
}
