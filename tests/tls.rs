//! TLS through pgwarden, with certificates made by the test: psql with
//! sslmode=require and verify-full, plaintext refused under `tls.mode =
//! "require"`, and TLS from pgwarden to PostgreSQL checked against a CA (the
//! server reports the session as encrypted in pg_stat_ssl).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{Db, Options, Pgwarden};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA, a certificate it signed for 127.0.0.1 and localhost, and an unrelated CA.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    stranger_ca: PathBuf,
    /// the CA's signer, for client certificates
    issuer: Issuer<'static, KeyPair>,
    /// the unrelated CA's signer
    stranger: Issuer<'static, KeyPair>,
}

fn make_ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (Issuer::new(params, key), pem)
}

fn write_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let (issuer, ca_pem) = make_ca("pgwarden test CA");
    let (stranger, stranger_pem) = make_ca("some other CA");
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        stranger_ca: dir.join("stranger.pem"),
        issuer,
        stranger,
    };
    std::fs::write(&pki.ca, ca_pem).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    std::fs::write(&pki.stranger_ca, stranger_pem).unwrap();
    pki
}

/// The test binary's certificates, also installed on its PostgreSQL (ssl = on).
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        common::with_cluster(|c| {
            let pki = write_pki(&c.root().join("tls"));
            // PostgreSQL reads its key only if its own user owns it, mode 0600.
            let owner = std::fs::metadata(c.root()).unwrap();
            for f in [&pki.cert, &pki.key] {
                std::os::unix::fs::chown(f, Some(owner_uid(&owner)), None).unwrap();
                std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .unwrap();
            }
            let node = c.primary();
            node.sql(&format!(
                "ALTER SYSTEM SET ssl_cert_file = '{}'",
                pki.cert.display()
            ))
            .unwrap();
            node.sql(&format!(
                "ALTER SYSTEM SET ssl_key_file = '{}'",
                pki.key.display()
            ))
            .unwrap();
            node.sql("ALTER SYSTEM SET ssl = on").unwrap();
            node.sql("SELECT pg_reload_conf()").unwrap();
            pki
        })
    })
}

/// psql's connection keywords for a client certificate naming `name`, signed by
/// `issuer`, written to `dir` (the key readable by its owner only, as libpq wants).
fn client_cert(dir: &Path, issuer: &Issuer<'static, KeyPair>, name: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer).unwrap();
    let n = rand::random::<u32>();
    let (cert_path, key_path) = (
        dir.join(format!("client-{n}.pem")),
        dir.join(format!("client-{n}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &key_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    format!(
        "sslcert={} sslkey={}",
        cert_path.display(),
        key_path.display()
    )
}

fn owner_uid(meta: &std::fs::Metadata) -> u32 {
    std::os::unix::fs::MetadataExt::uid(meta)
}

fn client_tls(mode: &str, pki: &Pki) -> String {
    format!(
        "[tls]\nmode = \"{mode}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.cert.display(),
        pki.key.display()
    )
}

/// psql through pgwarden with extra connection keywords; returns its output.
fn psql(pgw: &Pgwarden, db: &Db, keywords: &str, sql: &str) -> Output {
    common::with_cluster(|c| {
        c.client_program("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user={} dbname={} {keywords}",
                pgw.port, db.user, db.name
            ))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", &db.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    })
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const CLIENT_SSL: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// SHOW SERVERS' `tls` of pgwarden's one server connection, read by its stats user.
async fn server_tls_column(pgw: &Pgwarden) -> String {
    let watcher = common::connect(&format!(
        "host=127.0.0.1 port={} user=watcher password=watcher-pw dbname=pgwarden",
        pgw.port
    ))
    .await
    .unwrap();
    let shown = watcher.simple_query("SHOW SERVERS").await.unwrap();
    let rows: Vec<String> = shown
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("tls").map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows[0].clone()
}

#[test]
fn require_takes_tls_clients_and_refuses_plaintext() {
    let pki = pki();
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            sections: client_tls("require", pki),
            pgwarden: "unix_socket_dir = \".\"\nstats_users = [\"watcher\"]".into(),
            extra_users: "\"watcher\" \"watcher-pw\"\n".into(),
            ..Default::default()
        },
    );
    let out = psql(&pgw, &db, "sslmode=require", "SELECT 40 + 2");
    assert!(out.status.success(), "{}\n{}", stderr(&out), pgw.log());
    assert_eq!(stdout(&out), "42");

    // SHOW CLIENTS names the TLS version and cipher suite of a client connected now.
    let mut sleeper = common::with_cluster(|c| {
        c.client_program("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user={} dbname={} sslmode=require application_name=sleeper",
                pgw.port, db.user, db.name
            ))
            .args(["-X", "-c", "SELECT pg_sleep(3)"])
            .env("PGPASSWORD", &db.password)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    });
    let show = || {
        common::with_cluster(|c| {
            c.client_program("psql")
                .arg(format!(
                    "host=127.0.0.1 port={} user=watcher dbname=pgwarden sslmode=require",
                    pgw.port
                ))
                .args(["-X", "-A", "-t", "-F", " ", "-c", "SHOW CLIENTS"])
                .env("PGPASSWORD", "watcher-pw")
                .output()
                .unwrap()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let row = loop {
        let out = show();
        assert!(out.status.success(), "{}", stderr(&out));
        if let Some(row) = stdout(&out).lines().find(|l| l.contains("sleeper")) {
            break row.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sleeper in {}",
            stdout(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(row.contains(" TLSv1_3/TLS13_"), "{row}");
    assert!(sleeper.wait().unwrap().success());

    // verify-full: the certificate chains to our CA and names 127.0.0.1.
    let keywords = format!("sslmode=verify-full sslrootcert={}", pki.ca.display());
    let out = psql(&pgw, &db, &keywords, "SELECT current_user");
    assert!(out.status.success(), "{}\n{}", stderr(&out), pgw.log());
    assert_eq!(stdout(&out), db.user);

    // A CA that did not sign pgwarden's certificate: the client refuses it.
    let keywords = format!(
        "sslmode=verify-full sslrootcert={}",
        pki.stranger_ca.display()
    );
    let out = psql(&pgw, &db, &keywords, "SELECT 1");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));

    // Plaintext is refused with a message that says what to do.
    let out = psql(&pgw, &db, "sslmode=disable", "SELECT 1");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("pgwarden requires TLS"),
        "{}",
        stderr(&out)
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(common::connect(&pgw.conninfo(&db)))
        .expect_err("plaintext login must fail");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("28000"), "{e}");

    // The local socket is not encrypted, as PostgreSQL's is not: the requirement
    // is for the network.
    let out = common::with_cluster(|c| {
        c.client_program("psql")
            .arg(format!(
                "host={} port={} user={} dbname={}",
                pgw.dir.display(),
                pgw.port,
                db.user,
                db.name
            ))
            .args(["-X", "-A", "-t", "-c", "SELECT 40 + 2"])
            .env("PGPASSWORD", &db.password)
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{}\n{}", stderr(&out), pgw.log());
    assert_eq!(stdout(&out), "42");
}

#[test]
fn allow_serves_both_and_transactions_run_over_tls() {
    let pki = pki();
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            sections: client_tls("allow", pki),
            pool: "default_pool_size = 2".into(),
            ..Default::default()
        },
    );
    for mode in ["disable", "require"] {
        let out = psql(&pgw, &db, &format!("sslmode={mode}"), "SELECT 1");
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
    }
    // A longer exchange over TLS: many rows, a COPY and an error in the middle.
    let sql = "CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g;\
               SELECT count(*), sum(length(pad)) FROM t;";
    let out = psql(&pgw, &db, "sslmode=require", sql);
    assert!(out.status.success(), "{}\n{}", stderr(&out), pgw.log());
    assert_eq!(stdout(&out).lines().last(), Some("20000|4000000"));
    let out = psql(&pgw, &db, "sslmode=require", "SELECT 1/0");
    assert!(
        stderr(&out).contains("division by zero"),
        "{}",
        stderr(&out)
    );
    let out = psql(
        &pgw,
        &db,
        "sslmode=require",
        "\\copy (SELECT id FROM t) TO STDOUT",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 20000);
}

#[test]
fn pgwarden_reaches_postgres_over_verified_tls() {
    let pki = pki();
    let db = Db::create();
    let server_tls = |mode: &str, ca: &Path| {
        format!(
            "[server_tls]\nmode = \"{mode}\"\nca_file = \"{}\"\n",
            ca.display()
        )
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for mode in ["require", "verify-ca", "verify-full"] {
        let pgw = Pgwarden::start_with(
            &[&db],
            Options {
                sections: server_tls(mode, &pki.ca),
                pgwarden: "stats_users = [\"watcher\"]".into(),
                extra_users: "\"watcher\" \"watcher-pw\"\n".into(),
                ..Default::default()
            },
        );
        rt.block_on(async {
            let client = pgw.connect(&db).await;
            let ssl: bool = client
                .query_one(CLIENT_SSL, &[])
                .await
                .unwrap_or_else(|e| panic!("{mode}: {e}\n{}", pgw.log()))
                .get(0);
            assert!(ssl, "{mode}: the server session is not encrypted");
            // SHOW SERVERS names what the now idle server connection negotiated.
            let tls = server_tls_column(&pgw).await;
            assert!(tls.starts_with("TLSv1_"), "{mode}: {tls:?}");
        });
        // The monitor reached the backend over TLS too: it is up and routed.
        assert!(
            pgw.log().contains("routing writes to new primary"),
            "{mode}: {}",
            pgw.log()
        );
    }
    // Without server TLS the session is plain, so the check above can fail.
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pgwarden: "stats_users = [\"watcher\"]".into(),
            extra_users: "\"watcher\" \"watcher-pw\"\n".into(),
            ..Default::default()
        },
    );
    rt.block_on(async {
        let client = pgw.connect(&db).await;
        let ssl: bool = client.query_one(CLIENT_SSL, &[]).await.unwrap().get(0);
        assert!(!ssl);
        assert_eq!(server_tls_column(&pgw).await, "");
    });

    // A backend certificate from a CA pgwarden does not trust: no connection, and
    // the log says why.
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            sections: server_tls("verify-full", &pki.stranger_ca),
            failover: "client_wait_timeout = \"1s\"".into(),
            ..Default::default()
        },
    );
    rt.block_on(async {
        let client = common::connect(&pgw.conninfo(&db)).await;
        let result = match client {
            Ok(c) => c.simple_query("SELECT 1").await.map(|_| ()),
            Err(e) => Err(e),
        };
        let e = result.expect_err("an untrusted backend certificate must not be used");
        assert!(pgw.log().contains("UnknownIssuer"), "{e:?}\n{}", pgw.log());
    });
}

#[test]
fn bad_certificate_files_are_config_errors() {
    let pki = pki();
    let dir = common::Folder::new("tls-check");
    std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"postgres\"\n").unwrap();
    let check = |tls: &str| {
        let config = dir.join("pgwarden.toml");
        std::fs::write(
            &config,
            format!(
                "[auth]\nfile = \"userlist.txt\"\n[[backends]]\nname = \"pg1\"\nhost = \"127.0.0.1\"\n\
                 [databases.appdb]\n{tls}"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgwarden"))
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (out.status.success(), stderr(&out))
    };
    let (ok, _) = check(&client_tls("require", pki));
    assert!(ok);
    let (ok, err) = check(&format!(
        "[tls]\nmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"missing.key\"\n",
        pki.cert.display()
    ));
    assert!(!ok);
    assert!(
        err.contains("tls.key_file") && err.contains("missing.key"),
        "{err}"
    );
    // A certificate where the key should be.
    let (ok, err) = check(&format!(
        "[tls]\nmode = \"allow\"\ncert_file = \"{0}\"\nkey_file = \"{0}\"\n",
        pki.cert.display()
    ));
    assert!(!ok);
    assert!(err.contains("tls.key_file"), "{err}");
    let (ok, err) = check(&format!(
        "[server_tls]\nmode = \"verify-full\"\nca_file = \"{}\"\n",
        pki.key.display()
    ));
    assert!(!ok);
    assert!(err.contains("server_tls.ca_file"), "{err}");
}

#[test]
fn cert_authentication_takes_the_user_from_a_verified_client_certificate() {
    let pki = pki();
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            auth: Some("cert".into()),
            sections: format!(
                "{}ca_file = \"{}\"\n",
                client_tls("require", pki),
                pki.ca.display()
            ),
            ..Default::default()
        },
    );
    // No password is asked: the certificate is the proof.
    let mine = client_cert(&pgw.dir, &pki.issuer, &db.user);
    let keywords = format!("sslmode=require {mine} password=wrong");
    let out = psql(&pgw, &db, &keywords, "SELECT current_user");
    assert!(out.status.success(), "{}\n{}", stderr(&out), pgw.log());
    assert_eq!(stdout(&out), db.user);

    // Another user's certificate, none at all, or one from a CA pgwarden does not trust.
    let theirs = client_cert(&pgw.dir, &pki.issuer, "someone_else");
    let forged = client_cert(&pgw.dir, &pki.stranger, &db.user);
    for (keywords, why) in [
        (
            format!("sslmode=require {theirs}"),
            "certificate authentication failed for user",
        ),
        (
            "sslmode=require".to_owned(),
            "certificate authentication failed for user",
        ),
        // Refused by the handshake itself.
        (format!("sslmode=require {forged}"), "unknown ca"),
    ] {
        let out = psql(&pgw, &db, &keywords, "SELECT 1");
        assert!(!out.status.success(), "{keywords}: {}", stdout(&out));
        assert!(stderr(&out).contains(why), "{keywords}: {}", stderr(&out));
    }
    let refused = pgw.log();
    assert!(
        refused.contains("authentication failed"),
        "the log names the refusals: {refused}"
    );
}
