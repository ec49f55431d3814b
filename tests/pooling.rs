//! Pooling behaviour: many clients on few server connections, the bounded
//! wait, session mode, and what happens to server connections that break.

mod common;

use std::time::{Duration, Instant};

use common::{Db, Options, Pgwarden, backend_pid, pool, server_pids, sqlstate};
use tokio_postgres::types::Type;

#[tokio::test]
async fn fifty_clients_share_a_pool_of_five() {
    fifty_clients_on_five("").await;
}

/// The same on tokio's multi-thread scheduler, which machines of more than two
/// CPUs run by default (and this one does not).
#[tokio::test]
async fn fifty_clients_share_a_pool_of_five_on_two_worker_threads() {
    fifty_clients_on_five("workers = 2").await;
}

async fn fifty_clients_on_five(pgwarden: &str) {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: pgwarden.into(),
            ..pool("default_pool_size = 5")
        },
    );
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute("CREATE TABLE hits (client int, n int)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..50i32 {
        let client = pgw.connect(&db).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..20i32 {
                client
                    .execute_typed(
                        "INSERT INTO hits VALUES ($1, $2)",
                        &[(&c, Type::INT4), (&n, Type::INT4)],
                    )
                    .await?;
                client
                    .simple_query("BEGIN; SELECT pg_sleep(0.001); COMMIT")
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let n: i64 = setup
        .query_typed_one("SELECT count(*) FROM hits", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
    let servers = server_pids(&db);
    assert!(
        servers.len() <= 5,
        "{} server connections for a pool of 5",
        servers.len()
    );
}

#[tokio::test]
async fn a_held_pool_makes_waiters_time_out_with_53300_and_they_stay_connected() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        pool("default_pool_size = 1\nquery_wait_timeout = \"1s\""),
    );
    let holder = pgw.connect(&db).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let waiter = pgw.connect(&db).await;
    let started = Instant::now();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The extended protocol gets the same answer.
    let err = waiter
        .query_typed("SELECT $1::int", &[(&1i32, Type::INT4)])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    // Same client connection, now served.
    let row = waiter
        .query_typed_one("SELECT $1::int", &[(&5i32, Type::INT4)])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 5);
}

#[tokio::test]
async fn the_reserve_serves_a_client_that_waited_reserve_pool_timeout_and_no_more_than_its_size() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        pool(
            "default_pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = \"500ms\"\nquery_wait_timeout = \"2s\"",
        ),
    );
    let holder = pgw.connect(&db).await;
    holder.batch_execute("BEGIN").await.unwrap();
    // The only pool connection is held: the next client gets the reserve's, after the wait.
    let second = pgw.connect(&db).await;
    let started = Instant::now();
    second.batch_execute("BEGIN").await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert!(waited < Duration::from_millis(1900), "{waited:?}");
    assert_ne!(backend_pid(&second).await, backend_pid(&holder).await);
    // Main and reserve both held: a third waits out query_wait_timeout.
    let third = pgw.connect(&db).await;
    let err = third.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    second.batch_execute("COMMIT").await.unwrap();
    let row = third.query_one("SELECT 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test]
async fn waiting_clients_are_served_in_arrival_order_past_those_that_left_the_line() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let holder = pgw.connect(&db).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut leaving = Vec::new();
    for i in 0..7 {
        let client = pgw.connect(&db).await;
        if i % 2 == 1 {
            leaving.push(client.cancel_token());
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            // Served, or refused with the SQLSTATE (if any) of its error.
            let answer = client.simple_query("SELECT 1").await;
            tx.send((i, answer.map(drop).map_err(|e| sqlstate(&e))))
                .unwrap();
        });
        // Make the arrival order unambiguous.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every other one leaves the line (psql's Ctrl-C), from its middle.
    for token in leaving {
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    }
    let mut left = Vec::new();
    for _ in 0..3 {
        left.push(rx.recv().await.unwrap());
    }
    left.sort();
    let cancelled = Err(Some("57014".to_string()));
    assert_eq!(
        left,
        [
            (1, cancelled.clone()),
            (3, cancelled.clone()),
            (5, cancelled)
        ]
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        order.push(rx.recv().await.unwrap());
    }
    assert_eq!(order, [(0, Ok(())), (2, Ok(())), (4, Ok(())), (6, Ok(()))]);
}

#[tokio::test]
async fn session_mode_keeps_one_server_connection_and_discards_state_after() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            database: "pool_mode = \"session\"\npool_size = 1".into(),
            ..Default::default()
        },
    );
    let a = pgw.connect(&db).await;
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    for _ in 0..3 {
        let again: i32 = a
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(again, pid);
    }
    // LISTEN/NOTIFY works in session mode.
    a.batch_execute("LISTEN chan").await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = pgw.connect(&db).await;
    let row = b
        .query_one(
            "SELECT pg_backend_pid(), current_setting('work_mem'), to_regclass('pg_temp.scratch') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        pid,
        "the server connection was reused"
    );
    assert_eq!(
        row.get::<_, String>(1),
        "4MB",
        "DISCARD ALL reset the session"
    );
    assert!(row.get::<_, bool>(2), "temporary table survived");
}

#[tokio::test]
async fn server_connections_killed_while_idle_are_never_handed_out() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 3"));
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();
    let before = server_pids(&db);
    assert!(!before.is_empty());
    db.admin_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
        db.user
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let after = server_pids(&db);
    assert!(after.iter().all(|p| !before.contains(p)));
}

#[tokio::test]
async fn a_server_lost_mid_transaction_costs_the_transaction_not_the_client() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    client
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();

    // Outside a transaction block: the statement fails with 08006, the next one works.
    let pid = backend_pid(&client).await;
    let victim = tokio::spawn({
        let db = db.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            db.admin_sql(&format!("SELECT pg_terminate_backend({pid})"));
        }
    });
    let err = client.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    victim.await.unwrap();
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    assert!(
        common::message(&err).contains("pg1"),
        "names the backend: {err}"
    );
    client.simple_query("SELECT 1").await.unwrap();

    // Inside a block: the lost transaction stays failed until the client rolls back,
    // so nothing after the loss runs outside the transaction the client believes in.
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    db.admin_sql(&format!("SELECT pg_terminate_backend({pid})"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = client
        .execute_typed("INSERT INTO t VALUES (2)", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err}");
    let err = client
        .simple_query("INSERT INTO t VALUES (3)")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"), "{err}");
    // pgjdbc-style ROLLBACK through the extended protocol.
    client.execute("ROLLBACK", &[]).await.unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (4)")
        .await
        .unwrap();
    let rows: Vec<i32> = client
        .query_typed("SELECT v FROM t ORDER BY v", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [4]);
}

#[tokio::test]
async fn idle_server_connections_are_closed_after_server_idle_timeout() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("server_idle_timeout = \"1s\""));
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(server_pids(&db).len(), 1);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(server_pids(&db).len(), 0, "{}", pgw.log());
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn min_pool_size_keeps_connections_open_past_idle_timeouts_and_replaces_lost_ones() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        pool("default_pool_size = 5\nmin_pool_size = 3\nserver_idle_timeout = \"1s\""),
    );
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();
    let limit = Duration::from_secs(10);
    common::eventually(limit, "the pool filled to its minimum", || {
        server_pids(&db).len() == 3
    })
    .await;
    let kept = server_pids(&db);
    // Three idle timeouts later the minimum is still open, the same connections.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server_pids(&db), kept, "{}", pgw.log());

    // Lost connections (terminated by the server) are found and replaced.
    db.admin_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
        db.user
    ));
    common::eventually(limit, "three new server connections", || {
        let now = server_pids(&db);
        now.len() == 3 && now.iter().all(|pid| !kept.contains(pid))
    })
    .await;
    client.simple_query("SELECT 1").await.unwrap();
    // Transactions use the kept connections rather than opening more.
    assert_eq!(server_pids(&db).len(), 3, "{}", pgw.log());
}

#[tokio::test]
async fn server_connections_are_replaced_after_server_lifetime() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("server_lifetime = \"1s\""));
    let client = pgw.connect(&db).await;
    let first = backend_pid(&client).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = backend_pid(&client).await;
    assert_ne!(first, second);
}

#[tokio::test]
async fn client_and_server_sockets_carry_the_configured_keepalive() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: "tcp_keepidle = \"42s\"".into(),
            ..Default::default()
        },
    );
    let client = pgw.connect(&db).await;
    // pgwarden's end of the server connection that ran this query.
    let server_side: i32 = client
        .query_one(
            "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for (what, port) in [("server", server_side as u16), ("client", pgw.port)] {
        // Until the last answer is acknowledged the kernel shows its retransmission
        // timer instead; on loopback that takes well under a second.
        let deadline = Instant::now() + Duration::from_secs(5);
        let timers = loop {
            let timers = established_timers(port);
            if timers.iter().all(|&(kind, _)| kind == KEEPALIVE) || Instant::now() > deadline {
                break timers;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!timers.is_empty(), "no {what} socket on local port {port}");
        for (kind, ticks) in timers {
            assert_eq!(kind, KEEPALIVE, "{what} socket without a keepalive timer");
            // /proc/net/tcp counts in 1/100 s: the probe is due within tcp_keepidle.
            assert!(
                ticks <= 4200,
                "{what} socket's first probe in {ticks} ticks"
            );
        }
    }
}

/// The timer kind /proc/net/tcp shows for a pending keepalive probe.
const KEEPALIVE: u8 = 2;

/// (timer kind, ticks until it fires) of each established IPv4 socket whose local
/// port is `port`, from /proc/net/tcp.
fn established_timers(port: u16) -> Vec<(u8, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok()?;
            let established = fields[3] == "01";
            let (kind, when) = fields[5].split_once(':')?;
            (local_port == port && established).then(|| {
                (
                    u8::from_str_radix(kind, 16).unwrap(),
                    u64::from_str_radix(when, 16).unwrap(),
                )
            })
        })
        .collect()
}

#[tokio::test]
async fn a_client_that_vanishes_during_its_query_leaves_the_connection_to_finish_and_serve_on() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let (client, connection) = tokio_postgres::connect(&pgw.conninfo(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let first = backend_pid(&client).await;
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(0.5)").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The client's socket closes while the server runs its query.
    query.abort();
    driver.abort();
    let _ = driver.await;
    let other = pgw.connect(&db).await;
    let started = Instant::now();
    // The pool's one connection finished the query, came back clean and serves the
    // next client; no second server session was opened beside the running query.
    assert_eq!(backend_pid(&other).await, first);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server_pids(&db), vec![first]);
}

#[tokio::test]
async fn a_client_that_leaves_mid_transaction_does_not_leak_its_transaction() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let setup = pgw.connect(&db).await;
    setup.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let leaver = pgw.connect(&db).await;
    leaver
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    drop(leaver);
    // The single server connection must come back clean (or be replaced) for the next client.
    let n: i64 = tokio::time::timeout(
        Duration::from_secs(5),
        setup.query_typed_one("SELECT count(*) FROM t", &[]),
    )
    .await
    .unwrap()
    .unwrap()
    .get(0);
    assert_eq!(n, 0);
    // No transaction (with the leaver's write) is open on the connection served to us.
    let fresh: bool = setup
        .query_typed_one("SELECT pg_current_xact_id_if_assigned() IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(fresh);
}

#[tokio::test]
async fn a_client_idle_in_a_transaction_is_disconnected_and_its_transaction_rolled_back() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        pool("default_pool_size = 1\nidle_transaction_timeout = \"500ms\""),
    );
    let idler = pgw.connect(&db).await;
    idler
        .batch_execute("CREATE TABLE t_idle(x int)")
        .await
        .unwrap();
    idler
        .batch_execute("BEGIN; INSERT INTO t_idle VALUES (1)")
        .await
        .unwrap();
    // A client that keeps talking inside its transaction is left alone.
    let busy = pgw.connect(&db).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let err = idler.simple_query("COMMIT").await.unwrap_err();
    assert!(
        err.to_string().contains("idle-in-transaction") || idler.is_closed(),
        "{err:?}"
    );
    // The one server connection came back clean: the insert was rolled back.
    let rows = busy
        .query_one("SELECT count(*) FROM t_idle", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    busy.batch_execute("BEGIN").await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.simple_query("SELECT 1").await.unwrap();
    }
    busy.batch_execute("COMMIT").await.unwrap();
    assert!(
        pgw.log().contains("idle_transaction_timeout"),
        "{}",
        pgw.log()
    );
}

/// Server connections open to `database`, whoever opened them.
fn sessions_in(db: &Db, database: &str) -> usize {
    db.admin_sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    ))
    .trim()
    .parse()
    .unwrap()
}

/// A database, a second login role that may use it too, and a pgwarden in front
/// of it that knows both users, with `pool_settings` as its `[pool]` section.
fn two_users(pool_settings: &str) -> (Db, Db, Pgwarden) {
    let db = Db::create();
    let second = Db {
        user: format!("{}_second", db.user),
        password: "pw_second".into(),
        ..db.clone()
    };
    common::with_cluster(|c| c.create_user(&second.user, &second.password).unwrap());
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            extra_users: format!("\"{}\" \"{}\"\n", second.user, second.password),
            ..pool(pool_settings)
        },
    );
    (db, second, pgw)
}

#[tokio::test]
async fn max_db_connections_bounds_every_users_pools_of_a_database_together() {
    let (db, second, pgw) =
        two_users("default_pool_size = 5\nmax_db_connections = 2\nquery_wait_timeout = \"2s\"");
    let open = || sessions_in(&db, &db.name);
    // Logged in first: a pool's first login reads the server's welcome, which
    // takes a server connection too.
    let b = std::sync::Arc::new(pgw.connect(&second).await);
    // Two transactions of the first user fill the cap: the second user's idle
    // connection is closed for room once that user has been quiet for a second.
    let a1 = pgw.connect(&db).await;
    let a2 = pgw.connect(&db).await;
    a1.batch_execute("BEGIN").await.unwrap();
    a2.batch_execute("BEGIN").await.unwrap();
    assert_eq!(open(), 2);
    // The second user's request waits for room ...
    let waiting = common::waits("max_db_connections", {
        let b = b.clone();
        async move { b.simple_query("SELECT 1").await.map(drop) }
    })
    .await;
    assert_eq!(open(), 2);
    // ... and gets it when one of them goes idle: that connection is closed for it.
    a1.batch_execute("COMMIT").await.unwrap();
    common::served(waiting).await.unwrap();
    assert_eq!(open(), 2, "{}", pgw.log());
    // With every connection under the cap in a transaction, query_wait_timeout
    // answers 53300 and the client stays.
    a1.batch_execute("BEGIN").await.unwrap();
    let started = Instant::now();
    let err = b.batch_execute("BEGIN").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    a2.batch_execute("COMMIT").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();
    assert!(open() <= 2, "{}", pgw.log());
}

#[tokio::test]
async fn max_user_connections_bounds_a_users_pools_of_every_database_together() {
    let db = Db::create();
    let other = Db {
        name: format!("{}_other", db.name),
        ..db.clone()
    };
    common::with_cluster(|c| c.create_database(&other.name, &db.user).unwrap());
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            databases: format!("[databases.{}]\n", other.name),
            ..pool("default_pool_size = 5\nmax_user_connections = 1")
        },
    );
    let here = pgw.connect(&db).await;
    let there = pgw.connect(&other).await;
    here.batch_execute("BEGIN").await.unwrap();
    let waiting = common::waits("max_user_connections", async move {
        there.simple_query("SELECT 1").await.map(drop)
    })
    .await;
    here.batch_execute("COMMIT").await.unwrap();
    common::served(waiting).await.unwrap();
    assert_eq!(
        sessions_in(&db, &db.name) + sessions_in(&db, &other.name),
        1,
        "{}",
        pgw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_sharing_a_full_cap_keep_their_connections_instead_of_trading_them() {
    let (db, second, pgw) = two_users("default_pool_size = 4\nmax_db_connections = 2");
    let stop = Instant::now() + Duration::from_secs(2);
    let mut load = Vec::new();
    for who in [&db, &db, &second, &second] {
        let client = pgw.connect(who).await;
        load.push(tokio::spawn(async move {
            let mut done = 0;
            while Instant::now() < stop {
                client.simple_query("SELECT 1").await.unwrap();
                done += 1;
            }
            done
        }));
    }
    // Server connections seen while both users run transactions back to back: a
    // cap traded on every transaction would show a new one at each look.
    let mut seen = std::collections::BTreeSet::new();
    while Instant::now() < stop {
        seen.extend(
            db.admin_sql(&format!(
                "SELECT pid FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
                db.name
            ))
            .lines()
            .map(str::to_owned),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut done = Vec::new();
    for task in load {
        done.push(task.await.unwrap());
    }
    assert!(
        done.iter().all(|&n| n > 0),
        "a client was starved: {done:?}"
    );
    assert!(
        seen.len() <= 6,
        "{} server connections: {seen:?}",
        seen.len()
    );
}
