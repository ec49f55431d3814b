//! What clients send passes through intact: simple and extended queries,
//! pipelines, COPY, large results, errors and transaction blocks.

mod common;

use std::time::Duration;

use common::relay::{Mode, Relay};
use common::{Db, Options, Pgwarden, pool, sqlstate};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pgwarden::cluster::free_port;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

#[tokio::test]
async fn simple_and_extended_queries_return_what_the_server_returns() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;

    let rows = client
        .simple_query("SELECT 1 AS one, 'two' AS two; SELECT 3")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "3"]);

    // Extended protocol with the unnamed statement: one round trip, any server connection.
    let row = client
        .query_typed_one(
            "SELECT $1::int + 1, $2::text || '!'",
            &[(&41i32, Type::INT4), (&"hi", Type::TEXT)],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");

    // A named statement prepared and used inside one transaction block.
    client.batch_execute("BEGIN").await.unwrap();
    let stmt = client.prepare("SELECT $1::int * 10").await.unwrap();
    for i in 0..3i32 {
        let row = client.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 10);
    }
    client.batch_execute("COMMIT").await.unwrap();

    // NOTICE messages reach the client.
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_pipeline_of_one_hundred_executions_is_answered_in_order() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    // tokio-postgres writes every request before reading any answer when the
    // futures are polled together: 100 Parse/Bind/Execute/Sync in flight at once.
    let futures = (0..100i32).map(|i| {
        let client = &client;
        async move {
            client
                .query_typed_one("SELECT $1::int * 2", &[(&i, Type::INT4)])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let results = futures_util::future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), 2 * i as i32);
    }
}

#[tokio::test]
async fn a_libpq_pipeline_with_a_single_sync_works() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let script = pgw.dir.join("pipeline.sql");
    let mut text = String::from("\\startpipeline\n");
    for i in 0..100 {
        text.push_str(&format!("SELECT {i};\n"));
    }
    text.push_str("\\endpipeline\n");
    std::fs::write(&script, text).unwrap();
    let out = common::with_cluster(|c| {
        c.client_program("pgbench")
            .args(["-n", "-M", "extended", "-t", "20", "-c", "2", "-f"])
            .arg(&script)
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
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("number of transactions actually processed: 40/40"),
        "{stdout}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
}

#[tokio::test]
async fn copy_in_and_out_of_100k_rows() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, label text)")
        .await
        .unwrap();

    // tokio-postgres prepares COPY as a named statement, so it runs in a block
    // (named statements across transactions are not pooled yet).
    client.batch_execute("BEGIN").await.unwrap();
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tlabel number {i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 100_000);
    client.batch_execute("COMMIT").await.unwrap();

    client.batch_execute("BEGIN").await.unwrap();
    let stream = client.copy_out("COPY items TO STDOUT").await.unwrap();
    let data: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    let text: Vec<u8> = data.concat();
    assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 100_000);
    assert!(text.starts_with(b"0\tlabel number 0\n"));

    // The connection is usable after both directions of COPY.
    let n: i64 = client
        .query_typed_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100_000);

    // A COPY the server rejects midway leaves a working connection.
    client.batch_execute("BEGIN").await.unwrap();
    let sink = client.copy_in("COPY items FROM STDIN").await.unwrap();
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::from_static(b"1\tduplicate\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"));
    client.batch_execute("ROLLBACK").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();

    // psql's \copy uses the simple protocol, outside any block, in both directions.
    let file = pgw.dir.join("items.tsv");
    std::fs::write(&file, &text).unwrap();
    let psql = |command: String| {
        common::with_cluster(|c| {
            c.client_program("psql")
                .arg(pgw.conninfo(&db))
                .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", &command])
                .output()
                .unwrap()
        })
    };
    client
        .batch_execute("CREATE TABLE copies (LIKE items)")
        .await
        .unwrap();
    let out = psql(format!("\\copy copies FROM '{}'", file.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "COPY 100000");
    let back = pgw.dir.join("back.tsv");
    let out = psql(format!("\\copy copies TO '{}'", back.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).unwrap(), text);
}

#[tokio::test]
async fn a_million_row_result_streams_through() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    let rows = client
        .query_typed_raw(
            "SELECT g, repeat('x', 20) FROM generate_series(1, 1000000) g",
            Vec::<(i32, Type)>::new(),
        )
        .await
        .unwrap();
    let mut rows = std::pin::pin!(rows);
    let (mut count, mut sum) = (0u64, 0i64);
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        count += 1;
        sum += row.get::<_, i32>(0) as i64;
    }
    assert_eq!(count, 1_000_000);
    assert_eq!(sum, 500_000_500_000);
}

#[tokio::test]
async fn an_error_does_not_break_the_connection() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    let err = client
        .simple_query("SELECT * FROM missing_table")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42P01"));
    let err = client.query_typed("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    let row = client.query_typed_one("SELECT 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);

    // An error inside a transaction block is followed by 25P02 until ROLLBACK, as on PostgreSQL.
    client.batch_execute("BEGIN").await.unwrap();
    assert!(client.simple_query("SELECT 1/0").await.is_err());
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    client.batch_execute("ROLLBACK").await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn rollback_leaves_nothing_and_commit_keeps_everything() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    client
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (1); INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    // Another client does not see uncommitted rows.
    let other = pgw.connect(&db).await;
    let n: i64 = other
        .query_typed_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    client.batch_execute("ROLLBACK").await.unwrap();
    let n: i64 = client
        .query_typed_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    client
        .batch_execute("BEGIN; INSERT INTO t VALUES (3); COMMIT")
        .await
        .unwrap();
    let n: i64 = other
        .query_typed_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn startup_settings_follow_the_client_across_server_connections() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        common::Options {
            pool: "default_pool_size = 2".into(),
            ..Default::default()
        },
    );
    let conninfo = |extra: &str| format!("{} {extra}", pgw.conninfo(&db));
    let tokyo = common::connect(&conninfo(
        "application_name=tokyo options='-c TimeZone=Asia/Tokyo -c search_path=s1,public'",
    ))
    .await
    .unwrap();
    let plain = common::connect(&conninfo("application_name=plain"))
        .await
        .unwrap();
    for _ in 0..10 {
        // Alternate so that both clients use both server connections.
        let row = tokyo
            .query_typed_one(
                "SELECT current_setting('TimeZone'), current_setting('application_name'), current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "Asia/Tokyo");
        assert_eq!(row.get::<_, String>(1), "tokyo");
        assert_eq!(row.get::<_, String>(2), "s1,public");
        let row = plain
            .query_typed_one(
                "SELECT current_setting('TimeZone') <> 'Asia/Tokyo', current_setting('application_name'), current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        assert!(row.get::<_, bool>(0), "TimeZone leaked");
        assert_eq!(row.get::<_, String>(1), "plain");
        assert_eq!(row.get::<_, String>(2), "\"$user\", public");
    }

    // A SET of a reported setting sticks to the client that made it, and only to it.
    plain
        .batch_execute("SET TimeZone = 'Europe/Paris'")
        .await
        .unwrap();
    for _ in 0..4 {
        let tz: String = plain
            .query_typed_one("SHOW TimeZone", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(tz, "Europe/Paris");
        let tz: String = tokyo
            .query_typed_one("SHOW TimeZone", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(tz, "Asia/Tokyo");
    }

    // A setting the server refuses is refused at login, as PostgreSQL does.
    let err = common::connect(&conninfo("options='-c no_such_setting=1'"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42704"), "{err}");
    let err = common::connect(&conninfo("options='-c statement_timeout=abc'"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{err}");
}

#[tokio::test]
async fn cancel_reaches_the_running_query_only() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    let bystander = pgw.connect(&db).await;
    let token = client.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    let other = tokio::spawn(async move {
        bystander
            .simple_query("SELECT pg_sleep(1.5)")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The other client's query was not cancelled.
    other.await.unwrap().unwrap();

    // A cancel for a client that is idle reaches nobody.
    let idle = pgw.connect(&db).await;
    idle.cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_cancel_still_on_its_way_when_its_query_ends_never_reaches_the_next_client() {
    let db = Db::create();
    let relay = Relay::start(db.server_port, free_port().unwrap()).await;
    relay.set(Mode::SlowCancel);
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            backends: vec![("pg1".into(), relay.port)],
            ..pool("default_pool_size = 1")
        },
    );
    let first = pgw.connect(&db).await;
    let next = pgw.connect(&db).await;
    let token = first.cancel_token();
    let ends = tokio::spawn(async move { first.simple_query("SELECT pg_sleep(0.4)").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The cancel reaches the server a second later, after the query has ended.
    let cancel = tokio::spawn(async move { token.cancel_query(tokio_postgres::NoTls).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The only server connection goes to this client next; the cancel must not end its query.
    let waits = tokio::spawn(async move { next.simple_query("SELECT pg_sleep(1.5)").await });
    ends.await.unwrap().unwrap();
    cancel.await.unwrap().unwrap();
    waits.await.unwrap().unwrap();
}

/// A server process stopped (SIGSTOP) until this drops, also when the test fails.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Self {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[tokio::test]
async fn a_cancel_or_a_close_while_the_connection_takes_settings_ends_the_request_unsent() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let named = |name: &str| format!("{} application_name={name}", pgw.conninfo(&db));
    let other = common::connect(&named("other")).await.unwrap();
    other
        .batch_execute("CREATE TABLE canceled (i int)")
        .await
        .unwrap();
    for (leaves, logged) in [
        (false, "cancel request ended a wait"),
        (true, "client left while waiting"),
    ] {
        let (client, connection) = tokio_postgres::connect(&named("ending"), tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        // The pool's only connection has the other client's settings: this client's
        // request first has them changed, which lasts as long as the server is stopped.
        let server = Stopped::new(common::backend_pid(&other).await);
        let token = client.cancel_token();
        let insert = common::waits("the stopped server", async move {
            let done = client
                .batch_execute("INSERT INTO canceled VALUES (1)")
                .await;
            (client, done)
        })
        .await;
        let seen = pgw.log().matches(logged).count();
        if leaves {
            connection.abort();
        } else {
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        }
        common::eventually(Duration::from_secs(5), logged, || {
            pgw.log().matches(logged).count() > seen
        })
        .await;
        // Answered while the server is still stopped; the change of settings goes
        // on, for the pool.
        let (client, done) = common::served(insert).await;
        drop(server);
        if !leaves {
            let err = done.unwrap_err();
            assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
            client
                .batch_execute("INSERT INTO canceled VALUES (2)")
                .await
                .unwrap();
        }
    }
    let ran: i64 = other
        .query_one("SELECT count(*) FROM canceled WHERE i = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ran, 0, "an INSERT that was canceled or left ran");
}
