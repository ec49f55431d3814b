//! Limits a client runs into: `pool.query_timeout` cancels a query and keeps the
//! client and its server connection, `pool.max_message_size` closes only the
//! client that sent a message over it, and `pool.client_idle_timeout` closes a
//! client silent between transactions.

mod common;

use std::time::{Duration, Instant};

use common::{
    Db, Options, Pgwarden, Raw, backend_pid, error_code, frame, message, pool, server_pids,
    sqlstate,
};

#[tokio::test]
async fn a_query_over_query_timeout_is_cancelled_and_the_client_carries_on() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        pool("default_pool_size = 2\nquery_timeout = \"500ms\""),
    );
    let slow = pgw.connect(&db).await;
    let other = pgw.connect(&db).await;
    let pid = backend_pid(&slow).await;

    let started = Instant::now();
    let (timed_out, others) = tokio::join!(slow.simple_query("SELECT pg_sleep(5)"), async {
        // Another client's queries under the limit run meanwhile, untouched.
        let mut done = 0;
        while started.elapsed() < Duration::from_millis(900) {
            other.simple_query("SELECT pg_sleep(0.2)").await.unwrap();
            done += 1;
        }
        done
    });
    let e = timed_out.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(message(&e).contains("query_timeout"), "{}", message(&e));
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(others >= 2, "{others}");

    // The same client goes on. The cancel was confirmed, so the server connection
    // was kept (no third one opened) and its sleep really stopped.
    assert_eq!(
        slow.query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    let pids = server_pids(&db);
    assert!(pids.len() == 2 && pids.contains(&pid), "{pids:?}");
    assert_eq!(pgw.log().matches("server connection opened").count(), 2);
    let sleeping = db.admin_sql(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(5)'",
    );
    assert_eq!(sleeping.trim(), "0");

    // Inside a transaction block the cancel fails the block, as PostgreSQL's own
    // cancel does; ROLLBACK ends it and the connection serves on.
    slow.batch_execute("BEGIN").await.unwrap();
    let e = slow.simple_query("SELECT pg_sleep(5)").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    let e = slow.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "{e:?}");
    slow.batch_execute("ROLLBACK").await.unwrap();
    slow.simple_query("SELECT 1").await.unwrap();
    assert!(
        pgw.log().contains("query_timeout: cancelling the request"),
        "{}",
        pgw.log()
    );
}

#[tokio::test]
async fn a_server_that_does_not_act_on_the_cancel_costs_its_connection_not_the_client() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        pool("default_pool_size = 1\nquery_timeout = \"300ms\"\nserver_connect_timeout = \"1s\""),
    );
    let client = pgw.connect(&db).await;
    let pid = backend_pid(&client).await;
    // A stopped backend neither acts on the cancel nor answers.
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // SAFETY: plain syscalls on a PostgreSQL backend this test owns.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        tokio::time::sleep(Duration::from_secs(3)).await;
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let started = Instant::now();
    let e = client
        .simple_query("SELECT pg_sleep(0.5)")
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    // 08006: the statement's outcome is unknown, and the connection is gone.
    assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
    assert!(message(&e).contains("query_timeout"), "{}", message(&e));
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    // The client stays, on a new server connection.
    assert_ne!(backend_pid(&client).await, pid);
    stopper.await.unwrap();
}

/// A raw client logged in (trust), at ReadyForQuery.
fn logged_in(pgw: &Pgwarden, db: &Db) -> Raw {
    let mut raw = Raw::connect(pgw.port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let seen = raw.read_until(b'Z');
    assert_eq!(seen.last().map(|m| m.0), Some(b'Z'), "login: {seen:?}");
    raw
}

#[tokio::test]
async fn a_message_over_max_message_size_closes_only_that_client() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            auth: Some("trust".into()),
            pool: "max_message_size = \"4MB\"".into(),
            ..Default::default()
        },
    );
    let bystander = pgw.connect(&db).await;
    bystander
        .batch_execute("CREATE TABLE blobs(b bytea)")
        .await
        .unwrap();

    // Under the limit: a 2 MB value streams through both ways.
    let blob = vec![7u8; 2 << 20];
    bystander
        .execute("INSERT INTO blobs VALUES ($1)", &[&blob])
        .await
        .unwrap();
    let back: Vec<u8> = bystander
        .query_one("SELECT b FROM blobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back, blob);

    // Over it: the header alone is enough for the error, then the close.
    let mut raw = logged_in(&pgw, &db);
    let mut header = vec![b'Q'];
    header.extend_from_slice(&((4 << 20) + 100u32).to_be_bytes());
    raw.send(&header);
    raw.send(&[b' '; 1000]);
    let (tag, body) = raw.read().expect("an error before the close");
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "54000"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("pool.max_message_size"), "{text}");
    assert!(raw.read().is_none(), "connection left open");

    // A streamed message (CopyData) over it, in the middle of a COPY, the same.
    let mut raw = logged_in(&pgw, &db);
    raw.message(b'Q', b"COPY blobs FROM STDIN\0");
    assert_eq!(raw.read().map(|m| m.0), Some(b'G'));
    raw.send(&frame(b'd', b"\\\\x00\n"));
    let mut header = vec![b'd'];
    header.extend_from_slice(&((5 << 20) as u32).to_be_bytes());
    raw.send(&header);
    let (tag, body) = raw.read().expect("an error before the close");
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "54000"));
    assert!(raw.read().is_none(), "connection left open");

    // Nobody else noticed, and the COPY's server connection was not pooled mid-copy.
    let rows: i64 = bystander
        .query_one("SELECT count(*) FROM blobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);

    // A reload that lowers the limit holds for clients already logged in, from their
    // next request on.
    let mut raw = logged_in(&pgw, &db);
    let lowered = Options {
        auth: Some("trust".into()),
        pool: "max_message_size = \"1MB\"".into(),
        ..Default::default()
    };
    pgw.rewrite_config(&[&db], &lowered);
    pgw.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pgw.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", pgw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut header = vec![b'Q'];
    header.extend_from_slice(&((2 << 20) as u32).to_be_bytes());
    raw.send(&header);
    let (tag, body) = raw.read().expect("an error before the close");
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "54000"));
    assert!(raw.read().is_none(), "connection left open");
}

#[tokio::test]
async fn a_client_silent_between_transactions_past_client_idle_timeout_is_closed() {
    client_idle_timeout_closes_only_silent_clients("transaction").await;
}

/// In session mode the client holds its server connection between transactions,
/// and the limit still applies there; the connection goes back to the pool.
#[tokio::test]
async fn a_session_mode_client_silent_past_client_idle_timeout_is_closed() {
    client_idle_timeout_closes_only_silent_clients("session").await;
}

/// One pool connection, `client_idle_timeout` 700 ms in `mode`: a client silent
/// after a query is closed with 57P05, and the next client gets the connection;
/// one that talks, waits for a long query or sits in an open transaction is kept.
async fn client_idle_timeout_closes_only_silent_clients(mode: &str) {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            auth: Some("trust".into()),
            pool: format!(
                "mode = \"{mode}\"\ndefault_pool_size = 1\nclient_idle_timeout = \"700ms\""
            ),
            ..Default::default()
        },
    );
    let mut idler = logged_in(&pgw, &db);
    idler.message(b'Q', b"SELECT 1\0");
    let answered = idler.read_until(b'Z');
    assert_eq!(answered.last().map(|m| m.0), Some(b'Z'), "{answered:?}");
    let started = Instant::now();
    let (tag, body) = idler.read().expect("an error before the close");
    let waited = started.elapsed();
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "57P05"));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("pool.client_idle_timeout"), "{text}");
    assert!(idler.read().is_none(), "connection left open");
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // Talking, a long query, and a silent open transaction (idle_transaction_timeout's
    // business, not this one's) all keep a client; this one needs the pool's only
    // connection, which the closed client must have given back.
    let busy = pgw.connect(&db).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.simple_query("SELECT 1").await.unwrap();
    }
    busy.simple_query("SELECT pg_sleep(1.2)").await.unwrap();
    busy.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    busy.batch_execute("COMMIT").await.unwrap();
    assert!(pgw.log().contains("client_idle_timeout"), "{}", pgw.log());
}
