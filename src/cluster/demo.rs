//! `pgwarden demo`: a local primary with two streaming standbys (synchronous
//! replication, ANY 1) and pgwarden in front of them with automatic failover, to
//! try pgwarden out with nothing but the PostgreSQL packages installed.
//! Everything it starts lives in a temporary folder and is removed on Ctrl-C.

use std::process::ExitCode;

use super::{Cluster, ClusterSpec, SUPERUSER};
use crate::auth::UserList;
use crate::config::Config;
use crate::proxy;

/// The demo's application user, password and database.
const APP: (&str, &str, &str) = ("app", "app", "appdb");

/// Runs the demo until Ctrl-C.
pub fn run() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn start() -> Result<(), Box<dyn std::error::Error>> {
    eprintln!("starting a local primary and two streaming standbys …");
    let cluster = Cluster::start(&ClusterSpec {
        standbys: 2,
        synchronous: true,
        // Standbys notice a silent primary within the monitor's detection window.
        settings: vec![("wal_receiver_timeout".into(), "3s".into())],
    })?;
    let (user, password, database) = APP;
    cluster.create_user(user, password)?;
    cluster.create_database(database, user)?;
    // The read-only database is served by the standbys: it must exist there too.
    cluster.wait_replayed(std::time::Duration::from_secs(30))?;

    let port_or_free = |preferred: &str| -> Result<String, super::ClusterError> {
        if std::net::TcpListener::bind(preferred).is_ok() {
            Ok(preferred.to_owned())
        } else {
            Ok(format!("127.0.0.1:{}", super::free_port()?))
        }
    };
    let listen = port_or_free("127.0.0.1:6432")?;
    let http = port_or_free("127.0.0.1:9930")?;
    let backends: String = cluster
        .nodes
        .iter()
        .map(|n| {
            format!(
                "[[backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n",
                n.name, n.port
            )
        })
        .collect();
    let config_path = cluster.root().join("pgwarden.toml");
    std::fs::write(
        &config_path,
        format!(
            "[pgwarden]\nlisten = \"{listen}\"\nhttp_listen = \"{http}\"\nadmin_users = [\"admin\"]\n\
             [auth]\ntype = \"scram-sha-256\"\nfile = \"userlist.txt\"\n\
             [failover]\nmode = \"auto\"\nstate_file = \"state.json\"\n\
             {backends}\
             [databases.{database}]\n\
             [databases.{database}_ro]\ndbname = \"{database}\"\ntarget = \"prefer-standby\"\n"
        ),
    )?;
    std::fs::write(
        cluster.root().join("userlist.txt"),
        format!(
            "\"{user}\" \"{password}\"\n\"admin\" \"admin\"\n\"{}\" \"{}\"\n",
            SUPERUSER.0, SUPERUSER.1
        ),
    )?;
    let config = Config::load(&config_path)?;
    let users = UserList::load(&config.auth_file())?;
    config.check_users(&users)?;
    let tls = crate::tls::Tls::load(&config)?;
    crate::init_logging(&config.pgwarden.log_level);

    let runtime = proxy::runtime(&config)?;
    // Bound before the banner, so that what it says to run works at once.
    let listener = runtime.block_on(proxy::bind(&config))?;

    let (host, port) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "6432"));
    let nodes: String = cluster
        .nodes
        .iter()
        .map(|n| {
            format!(
                "  {} on 127.0.0.1:{}  data {}\n",
                n.name,
                n.port,
                n.data.display()
            )
        })
        .collect();
    let pidfile = cluster.primary().data.join("postmaster.pid");
    println!(
        "\npgwarden demo is running: pgwarden on {listen} in front of\n{nodes}\
         ({first} is the primary; synchronous replication to ANY 1 standby).\n\
         Config: {config}\n\n\
         Connect:     psql \"host={host} port={port} user={user} password={password} dbname={database}\"\n\
         Reads:       dbname={database}_ro goes to a standby when one is healthy\n\
         Admin:       psql \"host={host} port={port} user=admin password=admin dbname=pgwarden\" -c 'SHOW BACKENDS'\n\
         \u{20}            (also SHOW POOLS, SHOW FAILOVERS, SWITCHOVER, VERIFY, …)\n\
         Metrics:     curl http://{http}/metrics   (and /health/ready, /status)\n\
         Load:        PGPASSWORD={password} pgbench -h {host} -p {port} -U {user} -i {database}\n\
         \u{20}            PGPASSWORD={password} pgbench -h {host} -p {port} -U {user} -c 10 -T 60 {database}\n\
         Fail over:   kill -9 $(head -1 {pidfile})\n\
         \u{20}            pgwarden confirms the loss with the standbys, promotes the most\n\
         \u{20}            up-to-date one, re-points the other and fences {first}; the log\n\
         \u{20}            below shows each step with its time.\n\n\
         Press Ctrl-C to stop; everything started here is removed.\n",
        first = cluster.primary().name,
        config = config_path.display(),
        pidfile = pidfile.display(),
    );

    runtime.block_on(proxy::serve(
        listener,
        proxy::Shared::new(config, users, tls),
    ))?;
    drop(cluster);
    Ok(())
}
