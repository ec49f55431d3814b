//! Logging in: authentication methods and secrets, refusals with the right
//! SQLSTATE, and hostile or broken startup traffic that must not hurt anyone else.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Db, Options, Pgwarden, Raw, error_code, sqlstate};

fn auth(method: &str) -> Options {
    Options {
        auth: Some(method.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn scram_accepts_the_right_password_and_refuses_others_with_28p01() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    pgw.connect(&db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();

    let err = common::connect(&strip_password(&pgw.conninfo(&db), "nope"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");

    let unknown = Db {
        user: "nobody_here".into(),
        ..db.clone()
    };
    let err = common::connect(&pgw.conninfo(&unknown)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    // Same message shape for both: user names cannot be probed.
    assert!(
        common::message(&err).contains("password authentication failed"),
        "{err}"
    );
    assert!(pgw.log().contains("authentication failed"));
    assert!(
        !pgw.log().contains(&db.password),
        "a password reached the log"
    );
}

fn strip_password(conninfo: &str, password: &str) -> String {
    let kept: Vec<&str> = conninfo
        .split(' ')
        .filter(|kv| !kv.starts_with("password="))
        .collect();
    format!("{} password={password}", kept.join(" "))
}

#[tokio::test]
async fn md5_and_trust_methods_and_md5_or_scram_secrets_work() {
    let db = Db::create();
    // md5 method with a plain-password user list.
    let pgw = Pgwarden::start_with(&[&db], auth("md5"));
    pgw.connect(&db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let err = common::connect(&strip_password(&pgw.conninfo(&db), "bad"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    drop(pgw);

    // trust asks for nothing.
    let pgw = Pgwarden::start_with(&[&db], auth("trust"));
    common::connect(&strip_password(&pgw.conninfo(&db), "anything"))
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    assert!(
        pgw.log().contains("unsafe setting") && pgw.log().contains("auth.type"),
        "trust is warned about at start-up:\n{}",
        pgw.log()
    );
    drop(pgw);

    // A SCRAM verifier in the user list authenticates clients; the server login then
    // reuses the key recovered from the client's proof (no plain password needed).
    let scram_user = Db::create();
    let own_verifier = scram_user.admin_sql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
        scram_user.user
    ));
    assert!(own_verifier.starts_with("SCRAM-SHA-256$"));
    // Another user listed with `db`'s verifier: the client passes pgwarden (same
    // password as `db`), but the server holds a different secret for that user.
    let stranger = Db::create();
    let borrowed_verifier = db.admin_sql(&format!(
        "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
        db.user
    ));
    let mut pgw_dbs = Pgwarden::start_with(
        &[&db],
        Options {
            extra_users: format!(
                "\"{}\" \"{own_verifier}\"\n\"{}\" \"{borrowed_verifier}\"\n",
                scram_user.user, stranger.user
            ),
            databases: format!(
                "[databases.{}]\n[databases.{}]\n",
                scram_user.name, stranger.name
            ),
            ..Default::default()
        },
    );
    let client = common::connect(&pgw_dbs.conninfo(&scram_user))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pgw_dbs.log()));
    let who = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert_eq!(who.get::<_, String>(0), scram_user.user);
    // A wrong password still fails at pgwarden.
    let err = common::connect(&strip_password(&pgw_dbs.conninfo(&scram_user), "bad"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));

    let as_stranger = Db {
        password: db.password.clone(),
        ..stranger.clone()
    };
    let err = common::connect(&pgw_dbs.conninfo(&as_stranger))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
    assert!(
        common::message(&err).contains("differs from the one pgwarden checked"),
        "{err}"
    );
    pgw_dbs.signal(libc::SIGTERM);
    pgw_dbs.exits_cleanly(Duration::from_secs(10));
}

#[tokio::test]
async fn an_unknown_database_gets_3d000() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let other = Db {
        name: "not_configured".into(),
        ..db.clone()
    };
    let err = common::connect(&pgw.conninfo(&other)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("3D000"));
}

#[tokio::test]
async fn garbage_and_oversized_startup_packets_are_refused_while_others_keep_working() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let client = pgw.connect(&db).await;
    client.simple_query("SELECT 1").await.unwrap();

    // An HTTP request is not a startup packet.
    let mut raw = Raw::connect(pgw.port);
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let (tag, body) = raw.read().expect("an error before closing");
    assert_eq!(tag, b'E');
    assert_eq!(error_code(&body), "08P01");
    assert!(raw.read().is_none(), "connection closed");

    // A length of 2 GiB is refused before anything is allocated.
    let mut raw = Raw::connect(pgw.port);
    raw.send(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]);
    let (tag, body) = raw.read().unwrap();
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "08P01"));

    // Garbage after a valid login ends that client only.
    let mut raw = Raw::connect(pgw.port);
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let _ = raw.read_until(b'R');
    raw.send(b"\x00\x01garbage");
    let _ = raw.read();

    // A protocol version that does not exist.
    let mut raw = Raw::connect(pgw.port);
    raw.send(&[0, 0, 0, 8, 0, 9, 0, 0]);
    let (_, body) = raw.read().unwrap();
    assert_eq!(error_code(&body), "0A000");

    // Random bytes of every length never take the process down.
    for len in [1usize, 3, 4, 7, 8, 9, 100, 20_000] {
        let mut raw = Raw::connect(pgw.port);
        let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
        // pgwarden may close before reading everything: write errors are fine here.
        let _ = std::io::Write::write_all(&mut raw.stream, &bytes);
        let _ = raw.stream.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = raw.stream.read_to_end(&mut rest);
    }

    client.simple_query("SELECT 1").await.unwrap();
    pgw.connect(&db)
        .await
        .simple_query("SELECT 2")
        .await
        .unwrap();
}

#[tokio::test]
async fn ssl_and_gss_requests_are_answered_no_and_the_login_continues() {
    let db = Db::create();
    let pgw = Pgwarden::start(&[&db]);
    let mut raw = Raw::connect(pgw.port);
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    let mut answer = [0u8; 1];
    raw.stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    raw.send(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);
    raw.stream.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    raw.startup(&[("user", &db.user), ("database", &db.name)]);
    let (tag, body) = raw.read().unwrap();
    assert_eq!(tag, b'R');
    assert_eq!(&body[..4], &10u32.to_be_bytes(), "SASL requested");

    // psql with sslmode=prefer falls back to plaintext; sslmode=require gets a clear refusal.
    let psql = |mode: &str| {
        common::with_cluster(|c| {
            c.client_program("psql")
                .arg(format!("{} sslmode={mode}", pgw.conninfo(&db)))
                .args(["-X", "-A", "-t", "-c", "SELECT 42"])
                .output()
                .unwrap()
        })
    };
    let out = psql("prefer");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    let out = psql("require");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SSL"));
}

#[tokio::test]
async fn silent_clients_are_closed_after_client_login_timeout() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: "client_login_timeout = \"1s\"".into(),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let mut silent = Raw::connect(pgw.port);
    let mut buf = [0u8; 16];
    let n = silent.stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // A client that stops in the middle of SCRAM is closed too.
    let mut stuck = Raw::connect(pgw.port);
    stuck.startup(&[("user", &db.user), ("database", &db.name)]);
    let (tag, _) = stuck.read().unwrap();
    assert_eq!(tag, b'R');
    assert!(stuck.read().is_none());
}

#[tokio::test]
async fn clients_over_max_client_conn_get_53300() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: "max_client_conn = 3".into(),
            ..Default::default()
        },
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pgw.connect(&db).await);
    }
    let err = common::connect(&pgw.conninfo(&db)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    pgw.connect(&db)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn clients_over_the_per_user_or_per_database_limit_get_53300() {
    let db = Db::create();
    let other = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db, &other],
        Options {
            pgwarden: "max_user_client_conn = 2\nmax_db_client_conn = 3".into(),
            ..Default::default()
        },
    );
    // The other user, in the first user's database.
    let visitor = Db {
        user: other.user.clone(),
        password: other.password.clone(),
        ..db.clone()
    };
    let mut held = vec![pgw.connect(&db).await, pgw.connect(&db).await];
    let err = common::connect(&pgw.conninfo(&db)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(
        common::message(&err).contains("max_user_client_conn = 2"),
        "{err}"
    );
    held.push(pgw.connect(&visitor).await);
    let err = common::connect(&pgw.conninfo(&visitor)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(
        common::message(&err).contains("max_db_client_conn = 3"),
        "{err}"
    );
    // Other databases are not affected, and a slot comes back when its client leaves.
    pgw.connect(&other)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    held.remove(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    pgw.connect(&visitor)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    for client in &held {
        client.simple_query("SELECT 1").await.unwrap();
    }
}

#[tokio::test]
async fn replication_connections_and_unknown_protocol_options_are_handled() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(&[&db], auth("trust"));
    let mut raw = Raw::connect(pgw.port);
    raw.startup(&[
        ("user", &db.user),
        ("database", &db.name),
        ("replication", "database"),
    ]);
    let (tag, body) = raw.read().unwrap();
    assert_eq!((tag, error_code(&body).as_str()), (b'E', "0A000"));

    // Protocol 3.2 with a _pq_ option: NegotiateProtocolVersion, then a normal login.
    let mut raw = Raw::connect(pgw.port);
    raw.send(&common::startup_packet(
        196_610,
        &[
            ("user", &db.user),
            ("database", &db.name),
            ("_pq_.test", "1"),
        ],
    ));
    let messages = raw.read_until(b'Z');
    assert_eq!(messages[0].0, b'v');
    assert!(messages.iter().any(|(t, _)| *t == b'K'));
    assert_eq!(messages.last().unwrap().0, b'Z');
}

#[tokio::test]
async fn auth_query_finds_users_that_exist_only_in_postgres() {
    let listed = Db::create();
    // This user and database exist in PostgreSQL only; pgwarden's user list lacks them.
    let unlisted = Db::create();
    let (superuser, _) = pgwarden::cluster::SUPERUSER;
    let query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";
    let pgw = Pgwarden::start_with(
        &[&listed],
        Options {
            auth_keys: format!("query = \"{query}\"\nuser = \"{superuser}\"\ncache_ttl = \"0\""),
            databases: format!("[databases.{}]\n", unlisted.name),
            pool: "default_pool_size = 2".into(),
            ..Default::default()
        },
    );
    // The client proves itself against the verifier read from pg_shadow, and pgwarden
    // logs in to PostgreSQL as that user with the key recovered from the proof.
    let client = common::connect(&pgw.conninfo(&unlisted))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pgw.log()));
    for _ in 0..5 {
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), unlisted.user);
    }
    let err = common::connect(&strip_password(&pgw.conninfo(&unlisted), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    let nobody = Db {
        user: "nobody_at_all".into(),
        ..unlisted.clone()
    };
    let err = common::connect(&pgw.conninfo(&nobody)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));

    // A new password takes effect at the next login (cache_ttl = 0): the old one
    // fails, the new one logs in, and new server connections use the new secret.
    unlisted.admin_sql(&format!("ALTER ROLE {} PASSWORD 'fresh_pw'", unlisted.user));
    let err = common::connect(&pgw.conninfo(&unlisted)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"));
    let renewed = Db {
        password: "fresh_pw".into(),
        ..unlisted.clone()
    };
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(
            common::connect(&pgw.conninfo(&renewed))
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", pgw.log())),
        );
    }
    // Three clients at once on a pool of two: transactions spread over both servers.
    let results = futures_util::future::join_all(clients.iter().map(|c| async move {
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = current_user",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
    }))
    .await;
    for r in results {
        assert!(r.unwrap() >= 1);
    }
    // Users in the user list are unaffected.
    pgw.connect(&listed)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failing_auth_query_is_reported_not_taken_for_a_wrong_password() {
    let listed = Db::create();
    let unlisted = Db::create();
    let (superuser, _) = pgwarden::cluster::SUPERUSER;
    let pgw = Pgwarden::start_with(
        &[&listed],
        Options {
            auth_keys: format!(
                "query = \"SELECT usename, passwd FROM no_such_table WHERE usename = $1\"\nuser = \"{superuser}\""
            ),
            databases: format!("[databases.{}]\n", unlisted.name),
            ..Default::default()
        },
    );
    let err = common::connect(&pgw.conninfo(&unlisted)).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("08001"), "{err}");
    assert!(common::message(&err).contains("no_such_table"), "{err}");
}

#[tokio::test]
async fn local_clients_use_the_unix_socket_which_outlives_a_crash_but_not_a_shutdown() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    const ADMIN: (&str, &str) = ("admin", "admin-pw");
    let db = Db::create();
    let mut pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: format!(
                "unix_socket_dir = \".\"\nunix_socket_mode = \"0770\"\nadmin_users = [\"{}\"]",
                ADMIN.0
            ),
            extra_users: format!("\"{}\" \"{}\"\n", ADMIN.0, ADMIN.1),
            ..Default::default()
        },
    );
    let socket = pgw.dir.join(format!(".s.PGSQL.{}", pgw.port));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o770);
    let local = format!(
        "host={} port={} user={} password={} dbname={}",
        pgw.dir.display(),
        pgw.port,
        db.user,
        common::quote(&db.password),
        db.name
    );

    // Queries, and a cancel that travels the same way.
    let client = common::connect(&local).await.unwrap();
    let n: i32 = client.query_one("SELECT 40 + 2", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
    let client = common::Sleeping::start(client).await.cancel().await;

    // libpq's own client, on the console: the client shows as PgBouncer shows it.
    let out = common::with_cluster(|c| {
        c.client_program("psql")
            .arg(format!(
                "host={} port={} user={} dbname=pgwarden",
                pgw.dir.display(),
                pgw.port,
                ADMIN.0
            ))
            .args(["-X", "-A", "-t", "-F", ",", "-c", "SHOW CLIENTS"])
            .env("PGPASSWORD", ADMIN.1)
            .output()
            .unwrap()
    });
    let shown = String::from_utf8_lossy(&out.stdout);
    let port = format!(",unix,{},", pgw.port);
    assert!(
        shown
            .lines()
            .any(|l| l.contains(&db.user) && l.contains(&port)),
        "{shown}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(client);

    // No TLS on a local socket, as in PostgreSQL: an SSLRequest is answered N and
    // the login goes on.
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .unwrap();
    let mut answer = [0u8; 1];
    raw.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"N");
    raw.write_all(&common::startup_packet(
        196_608,
        &[("user", &db.user), ("database", &db.name)],
    ))
    .unwrap();
    raw.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"R", "an authentication request follows");
    drop(raw);

    // A killed process leaves its socket file; the next one replaces it.
    pgw.restart();
    let client = common::connect(&local).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);

    // A shutdown takes the file away.
    pgw.signal(libc::SIGTERM);
    pgw.exits_cleanly(Duration::from_secs(15));
    assert!(!socket.exists(), "{}", pgw.log());
}

/// Logs in over TCP from `source` (a loopback address) to pgwarden on 127.0.0.1.
async fn connect_from(
    source: &str,
    port: u16,
    conninfo: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let config: tokio_postgres::Config = conninfo.parse().unwrap();
    let (client, connection) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test]
async fn the_hba_file_decides_by_address_database_user_and_socket() {
    let os_user = String::from_utf8(
        std::process::Command::new("id")
            .arg("-un")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    let db = Db::create();
    let mut options = Options {
        pgwarden: format!("unix_socket_dir = \".\"\nadmin_users = [\"{os_user}\", \"admin\"]"),
        extra_users: "\"admin\" \"admin-pw\"\n".into(),
        ..Default::default()
    };
    let mut pgw = Pgwarden::start_with(&[&db], options.clone());
    let hba = |trusted: &str| {
        format!(
            "# TYPE  DATABASE  USER  ADDRESS  METHOD\n\
             local   pgwarden  all                        peer\n\
             local   all       all                        reject\n\
             host    {db}      {user}  127.0.0.2/32       {trusted}\n\
             host    all       all     127.0.0.3 255.255.255.255  reject\n\
             host    {db}      all     127.0.0.0/8        scram-sha-256\n",
            db = db.name,
            user = db.user,
        )
    };
    std::fs::write(pgw.dir.join("hba.conf"), hba("trust")).unwrap();
    options.auth = Some("hba".into());
    options.auth_keys = "hba_file = \"hba.conf\"".into();
    pgw.rewrite_config(&[&db], &options);
    pgw.restart();

    let app = pgw.conninfo(&db);
    let wrong = strip_password(&app, "nope");
    let refused = |r: Result<tokio_postgres::Client, tokio_postgres::Error>| {
        let Err(e) = r else {
            panic!("the login was accepted")
        };
        (sqlstate(&e).unwrap_or_default(), common::message(&e))
    };
    // 127.0.0.1: the password line.
    let client = connect_from("127.0.0.1", pgw.port, &app).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let (code, _) = refused(connect_from("127.0.0.1", pgw.port, &wrong).await);
    assert_eq!(code, "28P01");
    // 127.0.0.2: trusted for this database and user only.
    let client = connect_from("127.0.0.2", pgw.port, &wrong).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    // 127.0.0.3: rejected before any password is asked.
    let (code, message) = refused(connect_from("127.0.0.3", pgw.port, &app).await);
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        format!(
            "auth.hba_file rejects connection for host \"127.0.0.3\", user \"{}\", database \"{}\", no encryption",
            db.user, db.name
        )
    );
    // No line for the console over TCP.
    let console = format!(
        "host=127.0.0.1 port={} user=admin password=admin-pw dbname=pgwarden",
        pgw.port
    );
    let (code, message) = refused(connect_from("127.0.0.1", pgw.port, &console).await);
    assert_eq!(code, "28000");
    assert!(
        message.starts_with("no auth.hba_file entry for host \"127.0.0.1\", user \"admin\""),
        "{message}"
    );

    // The local socket: the console for the operating-system user, without a password.
    let local = |user: &str, dbname: &str| {
        format!(
            "host={} port={} user={user} dbname={dbname}",
            pgw.dir.display(),
            pgw.port
        )
    };
    let admin = common::connect(&local(&os_user, "pgwarden")).await.unwrap();
    admin.simple_query("SHOW VERSION").await.unwrap();
    let (code, message) = refused(common::connect(&local("admin", "pgwarden")).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("28000", "peer authentication failed for user \"admin\"")
    );
    let (code, message) = refused(common::connect(&local(&db.user, &db.name)).await);
    assert_eq!(code, "28000");
    assert!(message.contains("host \"[local]\""), "{message}");

    // A reload applies an edited file.
    std::fs::write(pgw.dir.join("hba.conf"), hba("reject")).unwrap();
    pgw.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect_from("127.0.0.2", pgw.port, &wrong).await {
            Err(e) if sqlstate(&e).as_deref() == Some("28000") => break,
            _ => assert!(Instant::now() < deadline, "the edited file was not applied"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = pgw.log();
    assert!(log.contains("login refused by auth.hba_file"), "{log}");
}
