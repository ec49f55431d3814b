//! `pgwarden drill`: a planned switchover against the running pgwarden, with a
//! probe client that keeps querying through it, and a short report of what the
//! clients saw (the pause, any error).
//!
//! The drill is an operator's rehearsal, so it talks to pgwarden the way an
//! operator does: through the admin console (`SWITCHOVER`) and as a client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::auth::{Secret, UserList};
use crate::config::Config;

/// What the drill saw.
#[derive(Debug, Default)]
struct Probe {
    queries: u64,
    errors: Vec<String>,
    slowest: Duration,
}

/// Runs the drill; `to` picks the new primary, `back` switches back afterwards.
pub async fn run(
    config: &Config,
    users: &UserList,
    to: Option<&str>,
    back: bool,
) -> Result<(), String> {
    let password = |user: &str| match users.get(user).map(|c| c.secret.clone()) {
        Some(Secret::Plain(p)) => Ok(p),
        _ => Err(format!(
            "user \"{user}\" needs a plain password in the user list"
        )),
    };
    let admin = config
        .pgwarden
        .admin_users
        .first()
        .ok_or("the drill needs an admin user: set pgwarden.admin_users")?;
    let addr = config.listen_addr();
    let conninfo = |user: &str, db: &str| -> Result<String, String> {
        Ok(format!(
            "host={} port={} user={user} password='{}' dbname={db}",
            addr.ip(),
            addr.port(),
            password(user)?.replace('\\', "\\\\").replace('\'', "\\'")
        ))
    };
    let console = connect(&conninfo(admin, crate::config::ADMIN_DATABASE)?).await?;
    let database = config
        .databases
        .iter()
        .find(|(name, _)| {
            config
                .database(name)
                .is_some_and(|d| d.target == crate::config::Target::Primary)
        })
        .map(|(name, _)| name.clone())
        .ok_or("the drill needs a primary-routed [databases] entry for its probe client")?;
    let probe_client = connect(&conninfo(&config.health.user, &database)?).await?;

    let before = primary(&console).await?;
    println!("pgwarden at {addr}: primary {before}; probing database \"{database}\" every 10 ms");
    let target = to.map(|t| format!(" TO {t}")).unwrap_or_default();
    let report = switch(&console, &probe_client, &format!("SWITCHOVER{target}")).await?;
    let after = primary(&console).await?;
    print_report(&before, &after, &report);
    if back {
        let again = switch(&console, &probe_client, &format!("SWITCHOVER TO {before}")).await;
        match again {
            Ok(report) => print_report(&after, &before, &report),
            Err(e) => println!(
                "switching back failed: {e}\n{before} must first rejoin as a standby of {after} (see the README)"
            ),
        }
    }
    Ok(())
}

fn print_report(from: &str, to: &str, (probe, window, took): &(Probe, Option<u64>, Duration)) {
    println!(
        "switchover {from} -> {to}: took {} ms; pgwarden paused transactions {} ms; \
         probe client: {} queries, slowest {} ms, {} errors",
        took.as_millis(),
        window.map_or("?".into(), |w| w.to_string()),
        probe.queries,
        probe.slowest.as_millis(),
        probe.errors.len()
    );
    for e in &probe.errors {
        println!("  error seen by the probe client: {e}");
    }
}

async fn connect(conninfo: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| crate::health::probe::describe(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Cell `column` of the rows a simple query returned.
async fn rows(client: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| crate::health::probe::describe(&e))?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect())
}

async fn primary(console: &Client) -> Result<String, String> {
    rows(console, "SHOW BACKENDS")
        .await?
        .into_iter()
        .find(|r| r.get(2).and_then(|c| c.as_deref()) == Some("primary"))
        .and_then(|r| r.first().cloned().flatten())
        .ok_or_else(|| "pgwarden routes to no primary right now".to_owned())
}

/// Runs `command` while the probe client queries; returns what the probe saw, the
/// pause pgwarden recorded, and how long the command took.
async fn switch(
    console: &Client,
    probe: &Client,
    command: &str,
) -> Result<(Probe, Option<u64>, Duration), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let probing = {
        let stop = stop.clone();
        async move {
            let mut seen = Probe::default();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match probe.simple_query("SELECT 1").await {
                    Ok(_) => seen.queries += 1,
                    Err(e) => seen.errors.push(crate::health::probe::describe(&e)),
                }
                seen.slowest = seen.slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        }
    };
    let switching = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let outcome = console.simple_query(command).await;
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        outcome
            .map(|_| took)
            .map_err(|e| crate::health::probe::describe(&e))
    };
    let (seen, took) = tokio::join!(probing, switching);
    let took = took?;
    let window = rows(console, "SHOW FAILOVERS")
        .await?
        .last()
        .and_then(|r| r.get(5).cloned().flatten())
        .and_then(|w| w.parse().ok());
    Ok((seen, window, took))
}
