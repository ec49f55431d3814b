//! The `pgwarden` command: run the proxy, check a configuration, or start a demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgwarden::auth::UserList;
use pgwarden::config::Config;
use pgwarden::{cluster, proxy};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config),
        Command::CheckConfig => check_config(&cli.config),
        Command::Demo => cluster::demo::run(),
    }
}

fn load(path: &Path) -> Result<(Config, UserList), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let users = UserList::load(&config.auth_file()).map_err(|e| e.to_string())?;
    config.check_users(&users).map_err(|e| e.to_string())?;
    Ok((config, users))
}

fn check_config(path: &Path) -> ExitCode {
    match load(path) {
        Ok((config, users)) => {
            println!(
                "{}: OK ({} backends, {} databases, {} users)",
                path.display(),
                config.backends.len(),
                config.databases.len(),
                users.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let (config, users) = match load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    pgwarden::init_logging(&config.pgwarden.log_level);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.pgwarden.workers > 0 {
        runtime.worker_threads(config.pgwarden.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = proxy::bind(&config).await?;
        proxy::serve(listener, proxy::Shared::new(config, users)).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pgwarden failed");
            ExitCode::FAILURE
        }
    }
}
