//! Steering a real three-node cluster through pgwarden: a switchover under load
//! without client errors, readiness while there is no primary, metrics that
//! follow a failover, data verification, manual promotion, and the drill.

mod common;

use std::time::{Duration, Instant};

use common::{Db, Options, Pgwarden, eventually, sqlstate};
use pgwarden::cluster::{Cluster, ClusterSpec};
use tokio_postgres::{Client, SimpleQueryMessage};

const ADMIN: (&str, &str) = ("admin", "admin-pw");

fn cluster() -> Cluster {
    Cluster::start(&ClusterSpec {
        standbys: 2,
        synchronous: false,
        settings: vec![("wal_receiver_timeout".into(), "2s".into())],
    })
    .expect("start a three-node cluster")
}

fn options(cluster: &Cluster, failover: &str) -> Options {
    Options {
        pgwarden: format!("admin_users = [\"{}\"]", ADMIN.0),
        extra_users: format!("\"{}\" \"{}\"\n", ADMIN.0, ADMIN.1),
        health: "interval = \"200ms\"\ntimeout = \"500ms\"".into(),
        failover: failover.into(),
        backends: cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.port))
            .collect(),
        ..Default::default()
    }
}

async fn console(pgw: &Pgwarden) -> Client {
    common::connect(&format!(
        "host=127.0.0.1 port={} user={} password={} dbname=pgwarden",
        pgw.port, ADMIN.0, ADMIN.1
    ))
    .await
    .unwrap()
}

async fn column(client: &Client, sql: &str, name: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(name).map(str::to_owned),
            _ => None,
        })
        .collect()
}

fn scrape(pgw: &Pgwarden) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pgw.http_port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn ready(pgw: &Pgwarden) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pgw.http_port)).unwrap();
    s.write_all(b"GET /health/ready HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn metric(scrape: &str, line_start: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_pgbench_load_fails_no_transaction() {
    let cluster = cluster();
    let db = Db::create_on(&cluster);
    let pgw = Pgwarden::start_with(&[&db], options(&cluster, "switchover_timeout = \"10s\""));
    let pgbench = |args: &[&str]| {
        cluster
            .client_program("pgbench")
            .args(args)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pgw.port.to_string(),
                "-U",
                &db.user,
                &db.name,
            ])
            .env("PGPASSWORD", &db.password)
            .output()
            .unwrap()
    };
    assert!(pgbench(&["-i", "-q", "-s", "1"]).status.success());
    let load = {
        let mut cmd = cluster.client_program("pgbench");
        cmd.args(["-n", "-c", "20", "-j", "2", "-T", "8", "-M", "extended"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pgw.port.to_string(),
                "-U",
                &db.user,
                &db.name,
            ])
            .env("PGPASSWORD", &db.password);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    console(&pgw)
        .await
        .simple_query("SWITCHOVER")
        .await
        .unwrap();
    let load = load.await.unwrap();
    let out = String::from_utf8_lossy(&load.stdout);
    assert!(
        load.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&load.stderr)
    );
    assert!(out.contains("number of failed transactions: 0 "), "{out}");

    let admin = console(&pgw).await;
    let kinds = column(&admin, "SHOW FAILOVERS", "kind").await;
    assert_eq!(kinds, ["switchover"]);
    let paused: u64 = column(&admin, "SHOW FAILOVERS", "window_ms").await[0]
        .parse()
        .unwrap();
    eprintln!("switchover pause under load: {paused} ms");
    let new_primary = column(&admin, "SHOW FAILOVERS", "new_primary").await[0].clone();
    assert_ne!(new_primary, "pg1");
    let metrics = scrape(&pgw);
    assert_eq!(metric(&metrics, "pgwarden_switchovers_total"), 1.0);
    assert_eq!(
        metric(
            &metrics,
            &format!("pgwarden_backend_role{{backend=\"{new_primary}\",role=\"primary\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "pgwarden_backend_fenced{backend=\"pg1\"}"),
        1.0
    );
    // The old primary was made read-only and received nothing after the switch.
    assert_eq!(
        cluster.nodes[0]
            .sql("SHOW default_transaction_read_only")
            .unwrap(),
        "on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_metrics_follow_a_failover() {
    let cluster = cluster();
    let db = Db::create_on(&cluster);
    let pgw = Pgwarden::start_with(
        &[&db],
        options(&cluster, "mode = \"follow\"\nclient_wait_timeout = \"1s\""),
    );
    // The first probes log in to every node; on a loaded machine that can take
    // longer than the 1 s a login waits for a primary.
    eventually(Duration::from_secs(10), "/health/ready says 200", || {
        ready(&pgw) == 200
    })
    .await;
    let client = pgw.connect(&db).await;
    for _ in 0..10 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    assert_eq!(ready(&pgw), 200);
    let before = scrape(&pgw);
    assert_eq!(metric(&before, "pgwarden_primary_available"), 1.0);
    assert!(
        metric(
            &before,
            &format!("pgwarden_transactions_total{{database=\"{}\"}}", db.name)
        ) >= 10.0
    );

    // Follow mode: no promotion, so there is no primary after the crash.
    cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    eventually(Duration::from_secs(10), "/health/ready says 503", || {
        ready(&pgw) == 503
    })
    .await;
    let during = scrape(&pgw);
    assert_eq!(metric(&during, "pgwarden_primary_available"), 0.0);
    assert_eq!(metric(&during, "pgwarden_backend_up{backend=\"pg1\"}"), 0.0);
    assert!(
        metric(
            &during,
            "pgwarden_health_probe_failures_total{backend=\"pg1\"}"
        ) >= 3.0
    );
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");

    // An operator promotes pg2 through the console: ready again, roles updated.
    let admin = console(&pgw).await;
    admin.simple_query("PROMOTE pg2").await.unwrap();
    eventually(Duration::from_secs(10), "/health/ready says 200", || {
        ready(&pgw) == 200
    })
    .await;
    let after = scrape(&pgw);
    assert_eq!(
        metric(
            &after,
            "pgwarden_backend_role{backend=\"pg2\",role=\"primary\"}"
        ),
        1.0
    );
    assert_eq!(metric(&after, "pgwarden_primary_available"), 1.0);
    let port: i32 = client
        .query_typed_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(cluster.nodes[1].port));
    assert_eq!(column(&admin, "SHOW FAILOVERS", "kind").await, ["promote"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_on_a_healthy_cluster_and_finds_a_rewritten_row() {
    let cluster = cluster();
    let db = Db::create_on(&cluster);
    // Routing stays on pg1 whatever happens to the other nodes.
    let pgw = Pgwarden::start_with(&[&db], options(&cluster, "mode = \"off\""));
    let client = pgw.connect(&db).await;
    client
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric);
             INSERT INTO accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 20000) g;
             CREATE TABLE events (region text, seq int, payload text, PRIMARY KEY (region, seq));
             INSERT INTO events SELECT 'r' || (g % 7), g, md5(g::text) FROM generate_series(1, 5000) g;",
        )
        .await
        .unwrap();
    let admin = console(&pgw).await;
    let verify = format!("VERIFY accounts {}.events", db.name);
    let results = column(&admin, &verify, "result").await;
    assert_eq!(
        results.iter().filter(|r| *r == "ok").count(),
        4,
        "{results:?}"
    );
    assert!(
        results.iter().all(|r| r == "ok" || r == "lag"),
        "{results:?}"
    );

    // The CLI agrees, and exits 0.
    let cli = |tables: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"));
        cmd.args(["verify", "--primary", "pg1", "--config"])
            .arg(&pgw.config);
        for t in tables {
            cmd.args(["--table", t]);
        }
        cmd.output().unwrap()
    };
    let out = cli(&["accounts"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("consistent"));

    // pg3 is promoted away and one of its rows rewritten: verify names it.
    cluster.nodes[2].promote().unwrap();
    cluster.nodes[2]
        .sql_in(&db.name, "UPDATE accounts SET balance = -1 WHERE id = 4242")
        .unwrap();
    let report = admin.simple_query(&verify).await.unwrap();
    let rows: Vec<(String, String, String)> = report
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((
                r.get("node")?.to_owned(),
                r.get("result")?.to_owned(),
                r.get("detail")?.to_owned(),
            )),
            _ => None,
        })
        .collect();
    let pg3 = rows
        .iter()
        .find(|(node, result, _)| node == "pg3" && result == "DIFFERENT")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert!(pg3.2.contains("4242"), "{pg3:?}");
    assert!(
        rows.iter()
            .any(|(node, result, _)| node == "pg2" && result == "ok")
    );
    let out = cli(&["accounts"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("INCONSISTENT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_reports_a_switchover_without_client_errors() {
    let cluster = cluster();
    let db = Db::create_on(&cluster);
    let pgw = Pgwarden::start_with(&[&db], options(&cluster, ""));
    let drill = |yes: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"));
        cmd.args(["drill", "--config"]).arg(&pgw.config);
        if yes {
            cmd.arg("--yes");
        }
        cmd.output().unwrap()
    };
    let refused = drill(false);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let started = Instant::now();
    let out = drill(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("switchover pg1 -> pg"), "{stdout}");
    assert!(stdout.contains(", 0 errors"), "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_connections_move_to_the_new_primary_before_any_client_returns() {
    let cluster = cluster();
    let db = Db::create_on(&cluster);
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pool: "default_pool_size = 5\nmin_pool_size = 2".into(),
            ..options(&cluster, "")
        },
    );
    let sessions = |node: usize| -> usize {
        cluster.nodes[node]
            .sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND datname = '{}'",
                db.user, db.name
            ))
            .ok()
            .and_then(|out| out.trim().parse().ok())
            .unwrap_or(0)
    };
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    let limit = Duration::from_secs(15);
    eventually(limit, "two warm connections on pg1", || sessions(0) == 2).await;

    cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    // No client comes back: the new primary's pool fills on its own, the standby's does not.
    eventually(limit, "two warm connections on the new primary", || {
        (sessions(1), sessions(2)) == (2, 0) || (sessions(1), sessions(2)) == (0, 2)
    })
    .await;
    let primary = if sessions(1) == 2 { 1 } else { 2 };
    let role = cluster.nodes[primary]
        .sql("SELECT pg_is_in_recovery()")
        .unwrap();
    assert_eq!(role.trim(), "f", "{}", pgw.log());
}
