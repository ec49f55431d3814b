//! `pgwarden demo`: a local PostgreSQL with pgwarden in front of it, to try pgwarden
//! out with nothing but the PostgreSQL packages installed. Everything it starts
//! lives in a temporary folder and is removed on Ctrl-C.

use std::process::ExitCode;

use super::{Cluster, ClusterSpec};
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
    eprintln!("starting a local PostgreSQL …");
    let cluster = Cluster::start(&ClusterSpec::default())?;
    let (user, password, database) = APP;
    cluster.create_user(user, password)?;
    cluster.create_database(database, user)?;
    let primary = cluster.primary();

    let listen = if std::net::TcpListener::bind("127.0.0.1:6432").is_ok() {
        "127.0.0.1:6432".to_owned()
    } else {
        format!("127.0.0.1:{}", super::free_port()?)
    };
    let config_path = cluster.root().join("pgwarden.toml");
    let config_text = format!(
        "[pgwarden]\nlisten = \"{listen}\"\n\
         [auth]\ntype = \"scram-sha-256\"\nfile = \"userlist.txt\"\n\
         [[backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n\
         [databases.{database}]\n",
        primary.name, primary.port
    );
    std::fs::write(&config_path, &config_text)?;
    std::fs::write(
        cluster.root().join("userlist.txt"),
        format!("\"{user}\" \"{password}\"\n"),
    )?;
    let config = Config::load(&config_path)?;
    let users = UserList::load(&config.auth_file())?;
    crate::init_logging(&config.pgwarden.log_level);

    let (host, port) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "6432"));
    println!(
        "\npgwarden demo is running.\n\n\
         PostgreSQL {name} on 127.0.0.1:{pg_port}, pgwarden on {listen} (transaction pooling).\n\
         Config: {config}\n\n\
         Connect:    psql \"host={host} port={port} user={user} password={password} dbname={database}\"\n\
         Benchmark:  PGPASSWORD={password} pgbench -h {host} -p {port} -U {user} -i {database}\n\
         \u{20}           PGPASSWORD={password} pgbench -h {host} -p {port} -U {user} -c 20 -T 10 -S {database}\n\n\
         Press Ctrl-C to stop; everything started here is removed.\n",
        name = primary.name,
        pg_port = primary.port,
        config = config_path.display(),
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = proxy::bind(&config).await?;
        proxy::serve(listener, proxy::Shared::new(config, users)).await
    })?;
    drop(cluster);
    Ok(())
}
