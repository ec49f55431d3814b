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

    let dir = common::Folder::new("check");
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
}

#[test]
fn check_config_lists_unsafe_settings_as_warnings() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::Folder::new("unsafe");
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
    common::ended_by_admin_shutdown(&err);
    // The running transaction completes and commits.
    busy.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    pgw.exits_cleanly(Duration::from_secs(10));
    let n = db.admin_sql("SELECT count(*) FROM t");
    assert_eq!(n, "2");
}

const ADMIN: (&str, &str) = ("admin", "admin-pw");

/// The admin console of the pgwarden listening on `port`.
async fn console(port: u16) -> tokio_postgres::Client {
    common::connect(&format!(
        "host=127.0.0.1 port={port} user={} password={} dbname=pgwarden",
        ADMIN.0, ADMIN.1
    ))
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_hands_the_port_over_without_refusing_or_cutting_a_client() {
    let db = Db::create();
    let sockets = common::Folder::new("sockets");
    let old = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: format!(
                "so_reuseport = true\nsigterm = \"wait_for_clients\"\n\
                 unix_socket_dir = \"{}\"\nadmin_users = [\"{}\"]",
                sockets.display(),
                ADMIN.0
            ),
            extra_users: format!("\"{}\" \"{}\"\n", ADMIN.0, ADMIN.1),
            ..Default::default()
        },
    );
    let mut old = old;
    let staying = old.connect(&db).await;
    staying
        .batch_execute("CREATE TABLE t (v int)")
        .await
        .unwrap();
    let old_console = console(old.port).await;
    let mut new = old.beside();
    // Until the old process stops listening, it alone decides failovers; the new
    // one (whose console the socket file now reaches) follows.
    assert!(
        old.log().contains("this pgwarden decides failovers"),
        "{}",
        old.log()
    );
    assert!(!warned_of_another_lock_file(&new));
    promote_refused(&new, &sockets, "another pgwarden on this port decides").await;

    // Clients keep arriving over TCP and the socket file while the port changes hands.
    let tcp = old.conninfo(&db);
    let local = tcp.replace("host=127.0.0.1", &format!("host={}", sockets.display()));
    let arriving = tokio::spawn(async move {
        let mut failures = Vec::new();
        for i in 0..60 {
            let conninfo = if i % 2 == 0 { &tcp } else { &local };
            match common::connect(conninfo).await {
                Ok(client) => {
                    if let Err(e) = client.simple_query("SELECT 1").await {
                        failures.push(format!("query {i}: {e}"));
                    }
                }
                Err(e) => failures.push(format!("connect {i}: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    old.signal(libc::SIGTERM);
    let failures = arriving.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}\n{}", old.log());
    takes_the_decisions(&new);

    // Clients that arrive now are all the new process's: the old one exits with
    // its own clients gone even while these stay connected.
    let mut arrived = Vec::new();
    for _ in 0..10 {
        arrived.push(new.connect(&db).await);
    }
    // The old process serves the client it has, and no longer decides failovers.
    for v in 0..3 {
        staying
            .batch_execute(&format!("BEGIN; INSERT INTO t VALUES ({v}); COMMIT"))
            .await
            .unwrap();
    }
    let refused = old_console.simple_query("PROMOTE pg1").await.unwrap_err();
    assert!(
        common::message(&refused).contains("stopped listening"),
        "{refused}"
    );
    assert!(old.alive(), "left before its clients did:\n{}", old.log());
    drop(staying);
    drop(old_console);
    old.exits_cleanly(Duration::from_secs(10));
    assert!(old.log().contains("the last client left"), "{}", old.log());
    for client in &arrived {
        client.simple_query("SELECT 1").await.unwrap();
    }
    // The socket file now belongs to the new process: the old one left it in place.
    let socket = sockets.join(format!(".s.PGSQL.{}", new.port));
    assert!(socket.exists());
    common::connect(&local_conninfo(&new, &db, &sockets))
        .await
        .unwrap();
    drop(arrived);
    new.signal(libc::SIGTERM);
    new.exits_cleanly(Duration::from_secs(10));
    assert!(!socket.exists(), "the last process removes the file");
    assert_eq!(db.admin_sql("SELECT count(*) FROM t"), "3");
}

/// The admin console of the pgwarden whose socket file is in `folder`.
async fn local_console(pgw: &Pgwarden, folder: &std::path::Path) -> tokio_postgres::Client {
    common::connect(&format!(
        "host={} port={} user={} password={} dbname=pgwarden",
        folder.display(),
        pgw.port,
        ADMIN.0,
        ADMIN.1
    ))
    .await
    .unwrap()
}

/// The options of a pgwarden that shares its port and its socket folder `dir`,
/// with an admin for its console.
fn sharing(dir: &std::path::Path) -> Options {
    Options {
        pgwarden: format!(
            "so_reuseport = true\nunix_socket_dir = \"{}\"\nadmin_users = [\"{}\"]",
            dir.display(),
            ADMIN.0
        ),
        extra_users: format!("\"{}\" \"{}\"\n", ADMIN.0, ADMIN.1),
        ..Default::default()
    }
}

/// Checks that `pgw`'s console (through its socket file in `folder`) refuses
/// PROMOTE, saying `why`.
async fn promote_refused(pgw: &Pgwarden, folder: &std::path::Path, why: &str) {
    let console = local_console(pgw, folder).await;
    let refused = console.simple_query("PROMOTE pg1").await.unwrap_err();
    assert!(common::message(&refused).contains(why), "{refused}");
}

/// True when `pgw` said at start that another process listened on its address
/// without sharing its lock file.
fn warned_of_another_lock_file(pgw: &Pgwarden) -> bool {
    pgw.log()
        .contains("yet this pgwarden took the decider lock")
}

/// Waits until `pgw` says it took the decider lock over.
fn takes_the_decisions(pgw: &Pgwarden) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pgw.log().contains("this one decides") {
        assert!(
            std::time::Instant::now() < deadline,
            "did not take the decisions over:\n{}",
            pgw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_crashed_decider_leaves_the_decisions_to_the_process_beside_it() {
    let db = Db::create();
    let sockets = common::Folder::new("crash");
    let first = Pgwarden::start_with(&[&db], sharing(&sockets));
    let second = first.beside();
    let lock = sockets.join(format!("pgwarden-{}.lock", first.port));
    assert!(
        second.log().contains(&lock.display().to_string()),
        "{}",
        second.log()
    );
    // However the holder ends, the kernel releases its lock.
    first.signal(libc::SIGKILL);
    takes_the_decisions(&second);
    let console = local_console(&second, &sockets).await;
    // It decides now: PROMOTE gets past the decider check to the node itself.
    let answer = console.simple_query("PROMOTE pg1").await;
    if let Err(e) = &answer {
        assert!(!common::message(e).contains("another pgwarden"), "{e}");
    }
    drop(console);
    drop(second);
}

/// A reload that moves the lock file (here: a state file set where there was none)
/// makes the holder take the new file too, so that a process started with the new
/// configuration follows instead of deciding beside it.
#[tokio::test]
async fn a_reload_that_moves_the_lock_file_keeps_one_decider() {
    let db = Db::create();
    let dir = common::Folder::new("relock");
    let first = Pgwarden::start_with(&[&db], sharing(&dir));
    let with_state_file = Options {
        failover: format!("state_file = \"{}\"", dir.join("state.json").display()),
        ..sharing(&dir)
    };
    first.rewrite_config(&[&db], &with_state_file);
    first.signal(libc::SIGHUP);
    common::eventually(Duration::from_secs(5), "the reload's lock file", || {
        first.log().contains("state.json.lock")
    })
    .await;
    let second = first.beside();
    assert!(!warned_of_another_lock_file(&second), "{}", second.log());
    promote_refused(&second, &dir, "another pgwarden on this port decides").await;
    first.signal(libc::SIGKILL);
    takes_the_decisions(&second);
    drop((first, second));
}

/// An older pgwarden (or one told of another lock file) beside a new one: each
/// would hold a lock of its own and decide. The one that starts second finds the
/// other listening, says so, and follows until it stops.
#[tokio::test]
async fn a_process_beside_one_with_another_lock_file_follows_until_it_stops() {
    let db = Db::create();
    let (one, other) = (
        common::Folder::new("lock-one"),
        common::Folder::new("lock-other"),
    );
    let mut first = Pgwarden::start_with(&[&db], sharing(&one));
    assert!(!warned_of_another_lock_file(&first));
    first.rewrite_config(&[&db], &sharing(&other));
    let second = first.beside();
    assert!(warned_of_another_lock_file(&second), "{}", second.log());
    promote_refused(&second, &other, "listened on").await;
    first.signal(libc::SIGTERM);
    first.exits_cleanly(Duration::from_secs(10));
    takes_the_decisions(&second);
}

fn local_conninfo(pgw: &Pgwarden, db: &Db, folder: &std::path::Path) -> String {
    pgw.conninfo(db)
        .replace("host=127.0.0.1", &format!("host={}", folder.display()))
}

#[tokio::test]
async fn shutdown_wait_for_clients_serves_them_until_a_second_request_drains() {
    let db = Db::create();
    let mut pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: format!("admin_users = [\"{}\"]", ADMIN.0),
            extra_users: format!("\"{}\" \"{}\"\n", ADMIN.0, ADMIN.1),
            ..Default::default()
        },
    );
    let client = pgw.connect(&db).await;
    let admin = console(pgw.port).await;
    admin
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .unwrap();
    assert!(pgw.log().contains("no longer listening"), "{}", pgw.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(common::connect(&pgw.conninfo(&db)).await.is_err());
    for _ in 0..3 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pgw.alive());
    // SIGINT waits for running transactions only: the idle client and the idle
    // console are let go (within the 10 s shutdown_timeout: nothing holds it up).
    pgw.signal(libc::SIGINT);
    pgw.exits_cleanly(Duration::from_secs(5));
    for session in [&client, &admin] {
        let err = session.simple_query("SELECT 1").await.unwrap_err();
        common::ended_by_admin_shutdown(&err);
    }
}

#[tokio::test]
async fn sigusr1_pauses_and_sigusr2_resumes_every_database() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();
    pgw.signal(libc::SIGUSR1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let query = common::waits("SIGUSR2", async move {
        client.simple_query("SELECT 1").await.map(|_| ())
    })
    .await;
    pgw.signal(libc::SIGUSR2);
    common::served(query).await.unwrap();
    assert!(pgw.log().contains("SIGUSR1: pausing"), "{}", pgw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_soft_open_files_limit_is_raised_to_the_hard_one() {
    const SOFT: u64 = 128;
    const HARD: u64 = 4096;
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            open_files: Some((SOFT, HARD)),
            ..Default::default()
        },
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pgw.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{open_files}");
    // max_client_conn (10 000) does not fit under the hard limit: the log says so.
    assert!(
        pgw.log().contains("open-files limit is below"),
        "{}",
        pgw.log()
    );
    // /metrics reports the limit in force, and the descriptors in use.
    let (_, body) = pgw.http_get("/metrics");
    assert!(body.contains("\nprocess_max_fds 4096\n"), "{body}");
    assert!(body.contains("\nprocess_open_fds "), "{body}");
    // More clients than the soft limit it started with are held and served.
    let mut clients = Vec::new();
    for _ in 0..SOFT + 50 {
        clients.push(pgw.connect(&db).await);
    }
    for client in &clients {
        client.simple_query("SELECT 1").await.unwrap();
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    // verify needs the program to exist: point the unit at the one just built.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/pgwarden.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/pgwarden run --config "));
    let dir = common::Folder::new("unit");
    let path = dir.join("pgwarden.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/pgwarden", env!("CARGO_BIN_EXE_pgwarden")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[tokio::test]
async fn a_reload_applies_a_new_log_level() {
    let db = Db::create();
    // Quiet but for the line that says it listens (the harness waits for it); no
    // RUST_LOG, which would rule over log_level.
    let options = |level: &str| Options {
        pgwarden: format!("log_level = \"{level},pgwarden::admin::http=info\""),
        env: vec![("RUST_LOG".into(), String::new())],
        ..Default::default()
    };
    let pgw = Pgwarden::start_with(&[&db], options("warn"));
    pgw.connect(&db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    assert!(!pgw.log().contains("client logged in"), "{}", pgw.log());
    pgw.rewrite_config(&[&db], &options("info"));
    pgw.signal(libc::SIGHUP);
    common::eventually(Duration::from_secs(5), "the log level changed", || {
        pgw.log().contains("log level changed")
    })
    .await;
    pgw.connect(&db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    assert!(pgw.log().contains("client logged in"), "{}", pgw.log());
}
