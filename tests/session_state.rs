//! Session state in transaction pooling: named statements a client prepared once and
//! uses in many later transactions on whichever server connection serves it, and
//! settings (SET outside a transaction) that follow their client and never leak to
//! the clients that share its server connections.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Db, Options, Pgwarden, sqlstate};
use tokio_postgres::SimpleQueryMessage;

fn pool(settings: &str) -> Options {
    Options {
        pool: format!("mode = \"transaction\"\n{settings}"),
        ..Default::default()
    }
}

/// The first value of the first row a simple query returned.
async fn simple_value(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<String, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row")))
}

#[tokio::test]
async fn statements_prepared_once_serve_many_transactions_across_a_pool_of_two() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 2"));
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL);
             INSERT INTO items SELECT i, 'item-' || i FROM generate_series(1, 100) i;
             CREATE TABLE log (client int, n int)",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for c in 0..10i32 {
        let client = pgw.connect(&db).await;
        tasks.push(tokio::spawn(async move {
            // Prepared once, before any of the transactions that use them.
            let add = client.prepare("SELECT $1::int + 1").await?;
            let scale = client
                .prepare(&format!("SELECT $1::int * {}", c + 2))
                .await?;
            let item = client
                .prepare("SELECT label, pg_backend_pid() FROM items WHERE id = $1")
                .await?;
            let insert = client.prepare("INSERT INTO log VALUES ($1, $2)").await?;
            let mut pids = HashSet::new();
            let mut client = client;
            for i in 0..50i32 {
                let n = c * 1000 + i;
                let tx = client.transaction().await?;
                let sum: i32 = tx.query_one(&add, &[&n]).await?.get(0);
                assert_eq!(sum, n + 1, "client {c}");
                let product: i32 = tx.query_one(&scale, &[&n]).await?.get(0);
                assert_eq!(product, n * (c + 2), "client {c}");
                let id = (c + i) % 100 + 1;
                let row = tx.query_one(&item, &[&id]).await?;
                assert_eq!(row.get::<_, String>(0), format!("item-{id}"), "client {c}");
                pids.insert(row.get::<_, i32>(1));
                assert_eq!(tx.execute(&insert, &[&c, &i]).await?, 1);
                tx.commit().await?;
                // And outside a transaction block.
                let sum: i32 = client.query_one(&add, &[&(n + 1)]).await?.get(0);
                assert_eq!(sum, n + 2, "client {c}");
                tokio::task::yield_now().await;
            }
            Ok::<_, tokio_postgres::Error>(pids)
        }));
    }
    let mut pids = HashSet::new();
    for t in tasks {
        let seen = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:?}\n{}", pgw.log()));
        pids.extend(seen);
    }
    assert_eq!(
        pids.len(),
        2,
        "the statements ran on both server connections of the pool: {pids:?}"
    );
    let rows = setup
        .query_one("SELECT count(*), count(DISTINCT (client, n)) FROM log", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 500);
    assert_eq!(rows.get::<_, i64>(1), 500);
}

#[tokio::test]
async fn a_set_outside_a_transaction_stays_with_its_client_and_never_leaks() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 2"));
    let default = simple_value(&db.direct().await, "SHOW statement_timeout")
        .await
        .unwrap();
    assert_ne!(default, "1ms");

    let a = pgw.connect(&db).await;
    a.batch_execute("SET statement_timeout = '1ms'")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", pgw.log()));

    // Fifty other clients share the two server connections with A, while A keeps using them.
    let mut others = Vec::new();
    for o in 0..50 {
        let client = pgw.connect(&db).await;
        let default = default.clone();
        others.push(tokio::spawn(async move {
            for _ in 0..3 {
                let shown = simple_value(&client, "SHOW statement_timeout").await?;
                assert_eq!(shown, default, "client {o} sees another client's setting");
                client.simple_query("SELECT pg_sleep(0.01)").await?;
                client
                    .query_one("SELECT pg_sleep(0.01)::text, $1::int", &[&o])
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    // Meanwhile A keeps using the same server connections.
    let mut a_saw = Vec::new();
    for _ in 0..10 {
        a_saw.push(match simple_value(&a, "SHOW statement_timeout").await {
            Ok(shown) => shown,
            // SHOW runs well under 1 ms, but a 57014 would show the setting in force too.
            Err(e) if sqlstate(&e).as_deref() == Some("57014") => "1ms".into(),
            Err(e) => panic!("A: {e:?}\n{}", pgw.log()),
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (o, t) in others.into_iter().enumerate() {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("client {o}: {e:?}\n{}", pgw.log()));
    }
    assert!(
        a_saw.iter().all(|s| s == "1ms"),
        "A lost its own setting: SHOW statement_timeout gave {a_saw:?}\n{}",
        pgw.log()
    );

    // A's next transaction still runs with 1ms.
    let shown = simple_value(&a, "BEGIN; SHOW statement_timeout; COMMIT")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", pgw.log()));
    assert_eq!(shown, "1ms");
    let err = a.simple_query("SELECT pg_sleep(0.05)").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");
    let err = a
        .query_one("SELECT pg_sleep(0.05)::text", &[])
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err:?}");

    // RESET: A is back to the default.
    a.batch_execute("RESET statement_timeout")
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", pgw.log()));
    assert_eq!(
        simple_value(&a, "SHOW statement_timeout").await.unwrap(),
        default
    );
    a.simple_query("SELECT pg_sleep(0.05)").await.unwrap();
}

#[tokio::test]
async fn search_path_is_kept_per_client() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 2"));
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute(
            "CREATE SCHEMA sa; CREATE SCHEMA sb;
             CREATE TABLE public.t (v text); INSERT INTO public.t VALUES ('public');
             CREATE TABLE sa.t (v text); INSERT INTO sa.t VALUES ('a');
             CREATE TABLE sb.t (v text); INSERT INTO sb.t VALUES ('b')",
        )
        .await
        .unwrap();
    let cases = [
        (Some("SET search_path = sa"), "a"),
        (Some("SET search_path TO sb, public"), "b"),
        (Some("SET SCHEMA 'sa'"), "a"),
        (None, "public"),
    ];
    let mut tasks = Vec::new();
    for (k, (set, expected)) in cases.into_iter().enumerate() {
        for copy in 0..3 {
            let client = pgw.connect(&db).await;
            if let Some(set) = set {
                client.batch_execute(set).await.unwrap();
            }
            tasks.push(tokio::spawn(async move {
                // The same statement text in every client: each must read its own schema.
                let stmt = client.prepare("SELECT v FROM t").await?;
                for i in 0..30 {
                    let simple = simple_value(&client, "SELECT v FROM t").await?;
                    assert_eq!(
                        simple, expected,
                        "client {k}.{copy}, round {i}: simple query"
                    );
                    let prepared: String = client.query_one(&stmt, &[]).await?.get(0);
                    assert_eq!(prepared, expected, "client {k}.{copy}, round {i}: prepared");
                    let tx_value = simple_value(&client, "BEGIN; SELECT v FROM t; COMMIT").await?;
                    assert_eq!(
                        tx_value, expected,
                        "client {k}.{copy}, round {i}: in a block"
                    );
                }
                Ok::<_, tokio_postgres::Error>(())
            }));
        }
    }
    for t in tasks {
        t.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{e:?}\n{}", pgw.log()));
    }
}

/// The same statement text means different things to clients with different
/// search paths; on a direct connection each client's statement is its own.
#[tokio::test]
async fn one_statement_text_prepared_under_two_search_paths_answers_each_client() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute(
            "CREATE SCHEMA sa; CREATE SCHEMA sb;
             CREATE TABLE sa.t (v text); INSERT INTO sa.t VALUES ('a');
             CREATE TABLE sb.t (v int); INSERT INTO sb.t VALUES (2)",
        )
        .await
        .unwrap();
    let a = pgw.connect(&db).await;
    let b = pgw.connect(&db).await;
    a.batch_execute("SET search_path = sa").await.unwrap();
    b.batch_execute("SET search_path = sb").await.unwrap();
    let in_a = a.prepare("SELECT v FROM t").await.unwrap();
    assert_eq!(
        a.query_one(&in_a, &[]).await.unwrap().get::<_, String>(0),
        "a"
    );
    let in_b = b
        .prepare("SELECT v FROM t")
        .await
        .unwrap_or_else(|e| panic!("B's prepare: {}\n{}", common::message(&e), pgw.log()));
    assert_eq!(b.query_one(&in_b, &[]).await.unwrap().get::<_, i32>(0), 2);
    assert_eq!(
        a.query_one(&in_a, &[]).await.unwrap().get::<_, String>(0),
        "a"
    );
}

/// A client that prepares a statement after a schema change gets the new row
/// type, as on a direct connection, even though an earlier (now gone) client
/// prepared the same text on the same server connection before the change.
#[tokio::test]
async fn a_new_client_prepares_after_a_schema_change() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('a')")
        .await
        .unwrap();
    {
        let before = pgw.connect(&db).await;
        let stmt = before.prepare("SELECT * FROM t").await.unwrap();
        assert_eq!(before.query_one(&stmt, &[]).await.unwrap().len(), 1);
    }
    setup
        .batch_execute("ALTER TABLE t ADD COLUMN w int DEFAULT 1")
        .await
        .unwrap();
    let after = pgw.connect(&db).await;
    let stmt = after.prepare("SELECT * FROM t").await.unwrap_or_else(|e| {
        panic!(
            "prepare after ALTER TABLE: {}\n{}",
            common::message(&e),
            pgw.log()
        )
    });
    let row = after.query_one(&stmt, &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("a".into(), 1)
    );
}

/// A client still holding a statement prepared before a schema change gets
/// PostgreSQL's own error when it uses it, as on a direct connection; that error
/// retires the shared statement, so preparing the text again (what drivers do on
/// this error) and new clients get the new row type.
#[tokio::test]
async fn a_stale_shared_statement_is_retired_by_its_error() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 1"));
    let setup = pgw.connect(&db).await;
    setup
        .batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('a')")
        .await
        .unwrap();
    let holder = pgw.connect(&db).await;
    let old = holder.prepare("SELECT * FROM t").await.unwrap();
    assert_eq!(holder.query_one(&old, &[]).await.unwrap().len(), 1);
    setup
        .batch_execute("ALTER TABLE t ADD COLUMN w int DEFAULT 1")
        .await
        .unwrap();
    let e = holder.query_one(&old, &[]).await.unwrap_err();
    assert_eq!(common::sqlstate(&e).as_deref(), Some("0A000"), "{e}");
    for client in [&holder, &pgw.connect(&db).await] {
        let fresh = client
            .prepare("SELECT * FROM t")
            .await
            .unwrap_or_else(|e| panic!("{}\n{}", common::message(&e), pgw.log()));
        assert_eq!(client.query_one(&fresh, &[]).await.unwrap().len(), 2);
    }
}

/// A SET sent as a named prepared statement (Parse "s1" / Bind / Execute: what
/// tokio-postgres does for every statement, even `client.execute("SET …", &[])`,
/// and psycopg with prepare_threshold=0) is a SET like any other.
#[tokio::test]
async fn a_set_through_a_named_prepared_statement_stays_with_its_client() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], pool("default_pool_size = 2"));
    let default = simple_value(&db.direct().await, "SHOW statement_timeout")
        .await
        .unwrap();
    let a = pgw.connect(&db).await;
    let set = a.prepare("SET statement_timeout = '7s'").await.unwrap();
    a.execute(&set, &[]).await.unwrap();
    let mut others = Vec::new();
    for _ in 0..10 {
        others.push(pgw.connect(&db).await);
    }
    for round in 0..5 {
        for (o, other) in others.iter().enumerate() {
            let shown = simple_value(other, "SHOW statement_timeout").await.unwrap();
            assert_eq!(
                shown, default,
                "client {o}, round {round}: A's setting leaked"
            );
        }
        let shown = simple_value(&a, "SHOW statement_timeout").await.unwrap();
        assert_eq!(shown, "7s", "round {round}: A lost its setting");
    }
}
