//! The `pgwarden` command: run the proxy, check a configuration, or start a demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgwarden::auth::UserList;
use pgwarden::config::Config;
use pgwarden::tls::Tls;
use pgwarden::{cluster, proxy};

/// jemalloc rather than glibc's allocator: with thousands of sessions allocating
/// and freeing on every worker thread, glibc's per-thread arenas cost more per
/// client and keep freed memory long after the clients have gone.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options: a background thread returns memory freed by departed
/// clients to the system within about a second.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// PostgreSQL connection pooler and fault-tolerance proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = "conf/pgwarden.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and the user list, then exit.
    CheckConfig,
    /// Start a local primary with two streaming standbys and pgwarden in front of them,
    /// with automatic failover, for trying pgwarden out.
    Demo,
    /// Report replication lag and compare tables between the primary and every other node;
    /// exits 1 when they differ.
    Verify {
        /// a table to compare: [database.]table[(key, ...)] (repeatable)
        #[arg(long = "table")]
        tables: Vec<String>,
        /// key columns of the table at the same position, comma-separated (default: its primary key)
        #[arg(long = "key")]
        keys: Vec<String>,
        /// database of tables given without one (default: the first [databases] entry)
        #[arg(long)]
        database: Option<String>,
        /// how long to wait for a standby to replay the primary's position
        #[arg(long, default_value = "30s")]
        wait: String,
        /// the node to compare the others with (default: the one out of recovery on the newest timeline)
        #[arg(long)]
        primary: Option<String>,
    },
    /// Rehearse a planned switchover on the running pgwarden and report what clients saw.
    Drill {
        /// really do it (the primary changes)
        #[arg(long)]
        yes: bool,
        /// the standby to promote (default: the most up to date)
        #[arg(long)]
        to: Option<String>,
        /// switch back to the original primary afterwards (it must have rejoined as a standby)
        #[arg(long)]
        back: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config),
        Command::CheckConfig => check_config(&cli.config),
        Command::Demo => cluster::demo::run(),
        Command::Verify {
            tables,
            keys,
            database,
            wait,
            primary,
        } => verify(
            &cli.config,
            &tables,
            &keys,
            database,
            &wait,
            primary.as_deref(),
        ),
        Command::Drill { yes, to, back } => drill(&cli.config, yes, to, back),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn verify(
    path: &Path,
    tables: &[String],
    keys: &[String],
    database: Option<String>,
    wait: &str,
    primary: Option<&str>,
) -> ExitCode {
    let result = (|| {
        let (config, users, _) = load(path)?;
        let wait = pgwarden::config::duration::parse(wait).map_err(|e| format!("--wait: {e}"))?;
        let default_db = database
            .or_else(|| {
                config
                    .databases
                    .keys()
                    .next()
                    .and_then(|n| config.database(n))
                    .map(|d| d.dbname)
            })
            .unwrap_or_else(|| "postgres".into());
        let mut specs = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            let mut spec = pgwarden::verify::TableSpec::parse(table, &default_db)
                .map_err(|e| format!("--table {e}"))?;
            if let Some(key) = keys.get(i) {
                spec.key = key.split(',').map(|k| k.trim().to_owned()).collect();
            }
            specs.push(spec);
        }
        runtime()?.block_on(pgwarden::verify::command(
            &config, &users, &specs, wait, primary,
        ))
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("verify: {e}");
            ExitCode::from(2)
        }
    }
}

fn drill(path: &Path, yes: bool, to: Option<String>, back: bool) -> ExitCode {
    if !yes {
        eprintln!(
            "pgwarden drill performs a real, planned switchover on the pgwarden running with {}:\n\
             it connects to its admin console (the first pgwarden.admin_users entry), starts a probe\n\
             client that runs SELECT 1 every 10 ms through pgwarden, runs SWITCHOVER{}, and reports\n\
             the pause and any error the probe saw{}. The primary changes and the old one stays fenced\n\
             until it rejoins as a standby. Run again with --yes to do it.",
            path.display(),
            to.as_deref()
                .map(|t| format!(" TO {t}"))
                .unwrap_or_default(),
            if back { ", then switches back" } else { "" }
        );
        return ExitCode::from(2);
    }
    let result = load(path).and_then(|(config, users, _)| {
        runtime()?.block_on(pgwarden::drill::run(&config, &users, to.as_deref(), back))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drill: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> Result<(Config, UserList, Tls), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let users = UserList::load(&config.auth_file()).map_err(|e| e.to_string())?;
    config.check_users(&users).map_err(|e| e.to_string())?;
    let tls = Tls::load(&config).map_err(|e| e.to_string())?;
    Ok((config, users, tls))
}

/// Every valid but unsafe setting, as (file, key, why), for check-config and start-up.
fn unsafe_settings(config: &Config) -> Vec<(PathBuf, String, String)> {
    let mut out: Vec<_> = config
        .warnings()
        .into_iter()
        .map(|(key, why)| (config.source.clone(), key.to_owned(), why))
        .collect();
    // Files that hold secrets: the user list, and etcd's password and client key.
    let mut secrets = vec![config.auth_file()];
    if let Some(c) = &config.coordination {
        let files = [&c.password_file, &c.key_file];
        secrets.extend(files.into_iter().flatten().map(|f| config.resolve(f)));
    }
    for file in secrets {
        if let Some(mode) = pgwarden::auth::userlist::open_to_others(&file) {
            out.push((
                file,
                "(file)".into(),
                format!("mode {mode:o}: readable by other users; chmod 600 it"),
            ));
        }
    }
    out
}

fn check_config(path: &Path) -> ExitCode {
    match load(path) {
        Ok((config, users, _)) => {
            println!(
                "{}: OK ({} backends, {} databases, {} users)",
                path.display(),
                config.backends.len(),
                config.databases.len(),
                users.len()
            );
            for (file, key, why) in unsafe_settings(&config) {
                println!("warning: {}: {key}: {why}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let (config, users, tls) = match load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    pgwarden::init_logging(&config.pgwarden.log_level);
    // Logged here: loading ran before logging was set up.
    for (file, key, why) in unsafe_settings(&config) {
        tracing::warn!(file = %file.display(), key, "unsafe setting: {why}");
    }
    pgwarden::open_files::raise_and_report(&config, users.len());
    let runtime = match proxy::runtime(&config) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = proxy::bind(&config).await?;
        proxy::serve(listener, proxy::Shared::new(config, users, tls)).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pgwarden failed");
            ExitCode::FAILURE
        }
    }
}
