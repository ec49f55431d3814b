//! Operating pgwarden: checking a config, reloading it with SIGHUP, and stopping
//! with SIGTERM without cutting running transactions.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Db, Options, Pgwarden, sqlstate};

fn check_config(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_names_file_key_and_reason() {
    let (ok, out) = check_config(std::path::Path::new("conf/pgwarden.toml"));
    assert!(ok, "{out}");
    assert!(out.contains("OK"), "{out}");

    let dir = std::env::temp_dir().join(format!("pgwarden-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[pool]\ndefault_pool_size = \"many\"\n[[backends]]\nname = \"a\"\nhost = \"h\"\n[databases.d]\n",
    )
    .unwrap();
    let (ok, out) = check_config(&bad);
    assert!(!ok);
    assert!(
        out.contains("bad.toml") && out.contains("pool.default_pool_size"),
        "{out}"
    );

    std::fs::write(
        &bad,
        "[auth]\nfile = \"missing.txt\"\n[[backends]]\nname = \"a\"\nhost = \"h\"\n[databases.d]\n",
    )
    .unwrap();
    let (ok, out) = check_config(&bad);
    assert!(!ok);
    assert!(
        out.contains("missing.txt") && out.contains("cannot read"),
        "{out}"
    );

    std::fs::write(dir.join("users.txt"), "\"a\" \"b\"\nbroken line\n").unwrap();
    std::fs::write(
        &bad,
        "[auth]\nfile = \"users.txt\"\n[[backends]]\nname = \"a\"\nhost = \"h\"\n[databases.d]\n",
    )
    .unwrap();
    let (ok, out) = check_config(&bad);
    assert!(!ok);
    assert!(out.contains("users.txt: line 2"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_lists_unsafe_settings_as_warnings() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pgwarden-unsafe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let users = dir.join("users.txt");
    std::fs::write(&users, "\"postgres\" \"secret-pw\"\n").unwrap();
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.join("open.toml");
    std::fs::write(
        &config,
        "[pgwarden]\nhttp_listen = \"0.0.0.0:9930\"\n[auth]\ntype = \"trust\"\nfile = \"users.txt\"\n\
         [[backends]]\nname = \"a\"\nhost = \"h\"\n[databases.d]\n",
    )
    .unwrap();
    let (ok, out) = check_config(&config);
    assert!(ok, "warnings do not fail the check: {out}");
    for expected in [
        "auth.type: trust",
        "pgwarden.http_listen",
        "users.txt: (file): mode 644",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in {out}");
    }
    assert!(
        !out.contains("secret-pw"),
        "a password reached the output: {out}"
    );

    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        &config,
        "[auth]\nfile = \"users.txt\"\n[[backends]]\nname = \"a\"\nhost = \"h\"\n[databases.d]\n",
    )
    .unwrap();
    let (ok, out) = check_config(&config);
    assert!(ok && !out.contains("warning"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sighup_reloads_users_and_pool_sizes_without_dropping_clients() {
    let db = Db::create();
    let newcomer = Db::create();
    let options = Options {
        pool: "default_pool_size = 1\nquery_wait_timeout = \"500ms\"".into(),
        ..Default::default()
    };
    let pgw = Pgwarden::start_with(&[&db], options.clone());
    let a = pgw.connect(&db).await;
    let b = pgw.connect(&db).await;
    a.batch_execute("BEGIN").await.unwrap();
    let err = b.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    // The newcomer's database is not configured yet.
    assert!(common::connect(&pgw.conninfo(&newcomer)).await.is_err());

    // A broken config is refused and the running one stays.
    std::fs::write(&pgw.config, "[pool]\nbroken = true\n").unwrap();
    pgw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pgw.log().contains("reload failed"), "{}", pgw.log());
    b.simple_query("SELECT 1").await.unwrap_err();

    let grown = Options {
        pool: "default_pool_size = 2\nquery_wait_timeout = \"500ms\"".into(),
        ..options
    };
    pgw.rewrite_config(&[&db, &newcomer], &grown);
    pgw.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pgw.log().contains("configuration reloaded"),
        "{}",
        pgw.log()
    );
    // The pool grew: b is served while a still holds its transaction.
    b.simple_query("SELECT 1").await.unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    pgw.connect(&newcomer)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_lets_running_transactions_finish_then_exits() {
    let db = Db::create();
    let mut pgw = Pgwarden::start(&[&db]);
    let busy = pgw.connect(&db).await;
    busy.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    let idle = pgw.connect(&db).await;
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    pgw.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New clients are no longer accepted.
    assert!(common::connect(&pgw.conninfo(&db)).await.is_err());
    // The idle client was told and let go.
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        sqlstate(&err).as_deref() == Some("57P01") || err.is_closed(),
        "{err}"
    );
    // The running transaction completes and commits.
    busy.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        pgw.wait_exit(Duration::from_secs(10)),
        Some(true),
        "{}",
        pgw.log()
    );
    let n = db.admin_sql("SELECT count(*) FROM t");
    assert_eq!(n, "2");
}
