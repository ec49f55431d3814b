//! Fault tolerance on a real three-node cluster (a primary and two streaming
//! standbys made with pg_basebackup -R): detection, promotion of the best
//! standby, re-pointing, fencing, the witness check, follow mode, and what
//! clients see meanwhile.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::relay::{Mode, Relay};
use common::{Db, Options, Pgwarden, eventually, sqlstate, three_nodes, writer};
use pgwarden::cluster::Cluster;
use tokio_postgres::types::Type;

/// A three-node cluster and a pgwarden in front of it.
struct Env {
    cluster: Cluster,
    db: Db,
    pgw: Pgwarden,
}

/// Fast probes keep the tests short; the defaults are measured by bench/failover.
fn fast(failover: &str) -> Options {
    Options {
        health: "interval = \"200ms\"\ntimeout = \"500ms\"".into(),
        failover: if failover.contains("client_wait_timeout") {
            failover.to_owned()
        } else {
            format!("client_wait_timeout = \"15s\"\n{failover}")
        },
        ..Default::default()
    }
}

fn start(cluster: Cluster, mut options: Options) -> Env {
    let db = Db::create_on(&cluster);
    if options.backends.is_empty() {
        options.backends = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.port))
            .collect();
    }
    let pgw = Pgwarden::start_with(&[&db], options);
    Env { cluster, db, pgw }
}

impl Env {
    /// The index of the node a client's next statement runs on.
    async fn serving(&self, client: &tokio_postgres::Client) -> usize {
        let port: i32 = client
            .query_typed_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        self.cluster
            .nodes
            .iter()
            .position(|n| i32::from(n.port) == port)
            .unwrap()
    }

    fn sql(&self, node: usize, sql: &str) -> String {
        self.cluster.nodes[node]
            .sql_in(&self.db.name, sql)
            .unwrap_or_default()
    }

    fn primaries(&self) -> Vec<usize> {
        (0..self.cluster.nodes.len())
            .filter(|&i| self.cluster.nodes[i].postmaster_pid().is_some())
            .filter(|&i| self.cluster.nodes[i].in_recovery().ok() == Some(false))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_promotes_a_standby_and_loses_no_acknowledged_commit() {
    let events = std::env::temp_dir().join(format!("pgwarden-events-{}", std::process::id()));
    let _ = std::fs::remove_file(&events);
    let hook = format!(
        "on_event = \"echo $PGWARDEN_EVENT $PGWARDEN_BACKEND old=$PGWARDEN_OLD_PRIMARY new=$PGWARDEN_NEW_PRIMARY tl=$PGWARDEN_TIMELINE >> {}\"",
        events.display()
    );
    let env = start(three_nodes(true), fast(&hook));
    let admin = env.pgw.connect(&env.db).await;
    admin
        .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        .await
        .unwrap();
    assert_eq!(env.serving(&admin).await, 0);
    let idle: Vec<_> =
        futures_util::future::join_all((0..5).map(|_| env.pgw.connect(&env.db))).await;
    let in_block = env.pgw.connect(&env.db).await;
    in_block.batch_execute("BEGIN; SELECT 1").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(env.pgw.conninfo(&env.db), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = Instant::now();
    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();

    // Writes resume on a promoted standby.
    let new = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let primaries = env.primaries();
        if primaries.len() == 1 && primaries[0] != 0 {
            break primaries[0];
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no promotion:\n{}",
            env.pgw.log()
        );
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failures) = writes.await.unwrap();
    let last_before = acked.iter().rev().find(|(_, t)| *t < killed_at).unwrap().1;
    let first_after = acked
        .iter()
        .find(|(_, t)| *t > killed_at)
        .expect("writes resumed")
        .1;
    eprintln!(
        "write window {:?}; {} acknowledged, failures {failures:?}",
        first_after - last_before,
        acked.len()
    );
    // At most the one insert in flight at the crash fails, with 08006.
    assert!(
        failures.len() <= 1 && failures.iter().all(|c| c == "08006"),
        "{failures:?}"
    );

    // Every acknowledged commit is on the new primary.
    let lost = common::lost_commits(&acked, &env.sql(new, "SELECT id FROM ledger"));
    assert!(lost.is_empty(), "lost acknowledged commits {lost:?}");

    // The other standby follows the new primary.
    let other = 3 - new;
    let other_name = env.cluster.nodes[other].name.clone();
    eventually(
        Duration::from_secs(15),
        "the other standby streams from the new primary",
        || {
            env.sql(
                new,
                "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .lines()
            .any(|l| l == other_name)
        },
    )
    .await;

    // The operator's hook heard about it.
    let new_name = env.cluster.nodes[new].name.clone();
    eventually(Duration::from_secs(5), "the failover hook ran", || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("failover {new_name} old=pg1 new={new_name} tl=2")))
    })
    .await;

    // Idle clients carry on without reconnecting, on the new primary.
    for client in &idle {
        assert_eq!(env.serving(client).await, new);
    }
    // The client whose transaction block died learns it, and rolls back.
    let err = in_block.simple_query("SELECT 2").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    assert!(common::message(&err).contains("pg1"), "{err}");
    in_block.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(env.serving(&in_block).await, new);

    // The old primary comes back on its old timeline: it stays fenced, gets no
    // traffic, and is made read-only.
    env.cluster.nodes[0].start().unwrap();
    eventually(Duration::from_secs(10), "split brain reported", || {
        env.pgw.log().contains("split brain")
    })
    .await;
    for id in 100_000..100_020 {
        admin
            .execute_typed("INSERT INTO ledger VALUES ($1)", &[(&id, Type::INT4)])
            .await
            .unwrap();
    }
    assert_eq!(
        env.sql(0, "SELECT count(*) FROM ledger WHERE id >= 100000"),
        "0"
    );
    assert_eq!(
        env.sql(new, "SELECT count(*) FROM ledger WHERE id >= 100000"),
        "20"
    );
    eventually(
        Duration::from_secs(10),
        "the fenced node is read-only",
        || env.sql(0, "SHOW default_transaction_read_only") == "on",
    )
    .await;

    // Rejoined as a standby of the new primary (pg_rewind), it is unfenced.
    env.cluster.rejoin(0, new).unwrap();
    eventually(
        Duration::from_secs(20),
        "the old primary is unfenced",
        || env.pgw.log().contains("unfenced"),
    )
    .await;
    assert_eq!(env.sql(0, "SHOW default_transaction_read_only"), "off");
    assert_eq!(
        env.sql(0, "SELECT count(*) FROM ledger WHERE id >= 100000"),
        "20"
    );
    // Hooks run in the background: give the last one a moment.
    eventually(
        Duration::from_secs(5),
        "fence, split brain, unfence and repoint events",
        || {
            let heard = std::fs::read_to_string(&events).unwrap_or_default();
            ["fence pg1", "split_brain pg1", "unfence pg1", "repoint"]
                .iter()
                .all(|event| heard.contains(event))
        },
    )
    .await;
    let _ = std::fs::remove_file(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgwarden_restarted_while_the_primary_is_down_fails_over_from_its_state_file() {
    let mut env = start(three_nodes(true), fast("state_file = \"state.json\""));
    let client = env.pgw.connect(&env.db).await;
    client
        .batch_execute("CREATE TABLE ledger (id int)")
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the primary recorded", || {
        std::fs::read_to_string(env.pgw.dir.join("state.json"))
            .is_ok_and(|s| s.contains("\"primary\":\"pg1\""))
    })
    .await;
    drop(client);

    // pgwarden is down when the primary dies, and comes back after: it has never
    // seen this cluster's primary alive, only its own record of it.
    env.pgw.signal(libc::SIGKILL);
    env.cluster.nodes[0].signal_all(libc::SIGKILL).unwrap();
    env.pgw.restart();
    let client = env.pgw.connect(&env.db).await;
    client
        .batch_execute("INSERT INTO ledger VALUES (1)")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", env.pgw.log()));
    let new = env.serving(&client).await;
    assert_ne!(new, 0);
    assert_eq!(env.primaries(), vec![new]);
    let log = env.pgw.log();
    assert!(log.contains("cluster state restored"), "{log}");
    assert!(log.contains("step=\"promoted\""), "{log}");
    let status: serde_json::Value = serde_json::from_str(&env.pgw.http_get("/status").1).unwrap();
    assert_eq!(status["backends"][0]["fenced"], true, "{status}");
}

/// A rolling restart's overlap: two pgwardens on one port, both in `auto` mode.
/// Only the holder of the decider lock promotes; the other follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pgwardens_sharing_a_port_fail_over_once() {
    let sockets = common::Folder::new("shared");
    let mut options = fast("");
    options.pgwarden = format!(
        "so_reuseport = true\nunix_socket_dir = \"{}\"",
        sockets.display()
    );
    let env = start(three_nodes(true), options);
    let beside = env.pgw.beside();
    let client = env.pgw.connect(&env.db).await;
    client
        .batch_execute("CREATE TABLE ledger (id int)")
        .await
        .unwrap();
    drop(client);

    env.cluster.nodes[0].signal_all(libc::SIGKILL).unwrap();
    // Every client lands on a primary again, whichever process the kernel picks.
    let mut wrote = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while wrote < 10 {
        assert!(
            Instant::now() < deadline,
            "writes did not resume:\n{}",
            env.pgw.log()
        );
        let write = async {
            let client = common::connect(&env.pgw.conninfo(&env.db)).await?;
            client.batch_execute("INSERT INTO ledger VALUES (1)").await
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), write).await {
            wrote += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let primaries = env.primaries();
    assert_eq!(primaries.len(), 1);
    assert_ne!(primaries[0], 0);
    assert!(
        env.pgw.log().contains("step=\"promoted\""),
        "{}",
        env.pgw.log()
    );
    let follower = beside.log();
    assert!(follower.contains("holds the decider lock"), "{follower}");
    assert!(!follower.contains("step=\"promoted\""), "{follower}");
    drop(beside);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_off_never_moves_the_primary() {
    let env = start(
        three_nodes(false),
        fast("mode = \"off\"\nclient_wait_timeout = \"1s\""),
    );
    let client = env.pgw.connect(&env.db).await;
    assert_eq!(env.serving(&client).await, 0);
    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        matches!(sqlstate(&err).as_deref(), Some("08001") | Some("08006")),
        "{err}"
    );
    assert!(env.primaries().is_empty(), "a standby was promoted");
    env.cluster.nodes[0].start().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.serving(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_with_the_most_wal_is_promoted() {
    let env = start(three_nodes(false), fast(""));
    let client = env.pgw.connect(&env.db).await;
    client
        .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        .await
        .unwrap();
    // pg2 stops receiving WAL; pg3 keeps streaming. Name order would favour pg2.
    env.cluster.nodes[1]
        .sql("ALTER SYSTEM SET primary_conninfo = ''")
        .unwrap();
    env.cluster.nodes[1].sql("SELECT pg_reload_conf()").unwrap();
    eventually(
        Duration::from_secs(10),
        "pg2's WAL receiver stopped",
        || {
            env.cluster.nodes[1]
                .sql("SELECT count(*) FROM pg_stat_wal_receiver")
                .ok()
                == Some("0".into())
        },
    )
    .await;
    for id in 0..200 {
        client
            .execute_typed("INSERT INTO ledger VALUES ($1)", &[(&id, Type::INT4)])
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "pg3 received everything", || {
        env.sql(2, "SELECT count(*) FROM ledger") == "200"
    })
    .await;
    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    eventually(Duration::from_secs(20), "a promotion", || {
        !env.primaries().is_empty()
    })
    .await;
    assert_eq!(env.primaries(), vec![2], "{}", env.pgw.log());
    assert_eq!(env.serving(&client).await, 2);
    // pg2 was re-pointed at pg3 and catches up across the timeline switch.
    eventually(Duration::from_secs(20), "pg2 caught up from pg3", || {
        env.sql(1, "SELECT count(*) FROM ledger") == "200"
    })
    .await;
}

/// The cluster's backends for pgwarden, with pg1 reached through a relay on `relay_port`.
fn pg1_through(cluster: &Cluster, relay_port: u16) -> Vec<(String, u16)> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let port = if n.name == "pg1" { relay_port } else { n.port };
            (n.name.clone(), port)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_a_healthy_primary_does_not_promote() {
    let cluster = three_nodes(false);
    let relay_port = pgwarden::cluster::free_port().unwrap();
    let relay = Relay::start(cluster.nodes[0].port, relay_port).await;
    let mut options = fast("client_wait_timeout = \"2s\"");
    options.backends = pg1_through(&cluster, relay.port);
    let env = start(cluster, options);
    let client = env.pgw.connect(&env.db).await;
    client
        .batch_execute("CREATE TABLE ledger (id int)")
        .await
        .unwrap();

    relay.set(Mode::Reset);
    eventually(Duration::from_secs(10), "pg1 marked down", || {
        env.pgw.log().contains("to=\"down\"") || env.pgw.log().contains("to=down")
    })
    .await;
    eventually(Duration::from_secs(10), "the refusal is logged", || {
        env.pgw.log().contains("still streams from the primary")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.primaries(),
        vec![0],
        "a standby was promoted:\n{}",
        env.pgw.log()
    );
    // Writes wait for a primary, then get 57P03; the client stays connected.
    let started = Instant::now();
    let err = client
        .batch_execute("INSERT INTO ledger VALUES (1)")
        .await
        .unwrap_err();
    assert!(
        matches!(sqlstate(&err).as_deref(), Some("57P03") | Some("08001")),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // The link comes back: pg1 is the primary again, no failover happened.
    relay.set(Mode::Pass);
    eventually(Duration::from_secs(10), "pg1 routable again", || {
        env.pgw.log().contains("primary is reachable again")
    })
    .await;
    client
        .batch_execute("INSERT INTO ledger VALUES (2)")
        .await
        .unwrap();
    assert_eq!(env.sql(0, "SELECT count(*) FROM ledger"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_mode_routes_to_a_node_promoted_by_hand() {
    let env = start(three_nodes(false), fast("mode = \"follow\""));
    let client = env.pgw.connect(&env.db).await;
    assert_eq!(env.serving(&client).await, 0);
    env.cluster.nodes[1].promote().unwrap();
    let promoted = Instant::now();
    // pg1 still runs: two primaries, and the newer timeline wins.
    let mut routed = None;
    while promoted.elapsed() < Duration::from_secs(5) {
        if env.serving(&client).await == 1 {
            routed = Some(promoted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let routed = routed.unwrap_or_else(|| panic!("not routed to pg2:\n{}", env.pgw.log()));
    assert!(routed < Duration::from_millis(1500), "took {routed:?}");
    // follow mode never promotes: pg3 is still a standby.
    assert!(env.cluster.nodes[2].in_recovery().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_primary_writes_get_57p03_and_standby_reads_go_on() {
    let cluster = three_nodes(false);
    let mut options = fast("mode = \"follow\"\nclient_wait_timeout = \"1s\"");
    let db_name = {
        let db = Db::create_on(&cluster);
        options.databases = format!(
            "[databases.reads]\ndbname = \"{}\"\ntarget = \"standby\"\n",
            db.name
        );
        db
    };
    options.backends = cluster
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.port))
        .collect();
    let pgw = Pgwarden::start_with(&[&db_name], options);
    let writer = pgw.connect(&db_name).await;
    writer
        .batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // Asynchronous replication: the standbys have the database and the row soon, not at once.
    eventually(
        Duration::from_secs(10),
        "the standbys replayed the row",
        || {
            cluster.nodes[1..].iter().all(|n| {
                n.sql_in(&db_name.name, "SELECT count(*) FROM t")
                    .is_ok_and(|c| c == "1")
            })
        },
    )
    .await;
    let reads = Db {
        name: "reads".into(),
        ..db_name.clone()
    };
    let reader = pgw.connect(&reads).await;
    cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let err = writer
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap_err();
    assert!(
        matches!(
            sqlstate(&err).as_deref(),
            Some("57P03") | Some("08001") | Some("08006")
        ),
        "{err}"
    );
    let err = writer
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    assert!(common::message(&err).contains("no primary"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    for _ in 0..10 {
        let n: i64 = reader
            .query_typed_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        let standby: bool = reader
            .query_typed_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(standby);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_probes_of_a_primary_that_keeps_answering_clients_do_not_take_it_down() {
    let cluster = three_nodes(false);
    let relay_port = pgwarden::cluster::free_port().unwrap();
    let relay = Relay::start(cluster.nodes[0].port, relay_port).await;
    let mut options = fast("");
    options.backends = pg1_through(&cluster, relay_port);
    let env = start(cluster, options);
    let client = env.pgw.connect(&env.db).await;
    client
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();

    // Every probe of pg1 now takes a second (timeout 500 ms) while clients keep
    // writing: pg1 must stay the primary and no client transaction may be cut.
    relay.set(Mode::SlowMonitor);
    let until = Instant::now() + Duration::from_secs(4);
    let mut writes = 0;
    while Instant::now() < until {
        client
            .batch_execute("INSERT INTO t VALUES (1)")
            .await
            .unwrap_or_else(|e| panic!("write {writes} failed: {e:?}\n{}", env.pgw.log()));
        writes += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = env.pgw.log();
    assert!(
        log.contains("kept answering clients"),
        "the probes were not slowed:\n{log}"
    );
    assert!(!log.contains("to=\"down\""), "pg1 was taken down:\n{log}");
    assert_eq!(env.primaries(), vec![0]);

    // With no client traffic, the same slow probes do count: silence is what a hang looks like.
    eventually(Duration::from_secs(10), "pg1 marked down", || {
        env.pgw.log().contains("to=\"down\"")
    })
    .await;
}
