//! Throughput and pooler CPU per transaction: pgbench against direct PostgreSQL,
//! pgwarden and PgBouncer, alternating the targets in every round so that a
//! noisy machine affects all three alike. Prints median TPS, the ratios
//! pgwarden/PgBouncer and pgwarden/direct, and each pooler's CPU µs per transaction;
//! then, per target, where the whole machine's CPU went per transaction (the
//! pooler, pgbench, the rest) and how much stayed idle.
//!
//! Run: `cargo bench --bench throughput` (needs `apt-get install -y pgbouncer`).
//! Knobs (environment): BENCH_ROUNDS=3, BENCH_SECONDS=10, BENCH_SCALE=10,
//! BENCH_CLIENTS=10,50,200, BENCH_MODES=simple,extended,prepared, BENCH_SCRIPT=-S, BENCH_POOL=20,
//! BENCH_PGWARDEN (extra `[pgwarden]` lines, e.g. "workers = 1"), BENCH_PGWARDEN_BIN
//! (measure that pgwarden binary, e.g. `scripts/pgo-build`'s, instead of cargo's).

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;

use support::{Run, Target, env_list, env_or, median};

fn main() {
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let seconds: u32 = env_or("BENCH_SECONDS", 10);
    let scale: u32 = env_or("BENCH_SCALE", 10);
    let pool: u32 = env_or("BENCH_POOL", 20);
    let clients = env_list("BENCH_CLIENTS", "10,50,200");
    let modes = env_list("BENCH_MODES", "simple,extended,prepared");
    let script = std::env::var("BENCH_SCRIPT").unwrap_or_else(|_| "-S".into());

    eprintln!("preparing PostgreSQL with a pgbench database at scale {scale} …");
    let cluster = support::cluster(scale);
    let mut targets: Vec<Target> = vec![
        support::direct(&cluster),
        support::pgwarden(
            &cluster,
            pool,
            &std::env::var("BENCH_PGWARDEN").unwrap_or_default(),
            "",
        ),
    ];
    match support::pgbouncer(&cluster, pool) {
        Some(t) => targets.push(t),
        None => {
            eprintln!("PgBouncer not found (apt-get install -y pgbouncer): comparing without it")
        }
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    let prepared_ok = support::pgbouncer_supports_prepared();
    if modes.iter().any(|m| m == "prepared") && !prepared_ok {
        eprintln!(
            "this PgBouncer predates 1.21 (no prepared statements in transaction mode): -M prepared runs without it"
        );
    }

    let mut results: HashMap<(String, String, &str), Vec<Run>> = HashMap::new();
    for mode in &modes {
        for c in &clients {
            for round in 0..rounds {
                // Rotate the order every round: A B C, then B C A, then C A B.
                for i in 0..targets.len() {
                    let target = &targets[(i + round) % targets.len()];
                    if mode == "prepared" && target.name == "pgbouncer" && !prepared_ok {
                        continue;
                    }
                    // BENCH_SCRIPT may hold several words ("-b tpcb-like").
                    let seconds = seconds.to_string();
                    let args: Vec<&str> = script
                        .split_whitespace()
                        .chain(["-M", mode, "-c", c, "-j", "2", "-T", &seconds])
                        .collect();
                    let run = support::pgbench(&cluster, target, &args);
                    eprintln!(
                        "{mode:>8} -c {c:>3} round {round} {:>9}: {:>9.0} tps, {} failed{}",
                        target.name,
                        run.tps,
                        run.failed,
                        run.cpu_us_per_tx
                            .map(|u| format!(", {u:.1} µs CPU/tx"))
                            .unwrap_or_default()
                    );
                    results
                        .entry((mode.clone(), c.clone(), target.name))
                        .or_default()
                        .push(run);
                }
            }
        }
    }

    println!(
        "\n## pgbench {script}, {seconds} s runs, {rounds} rounds, pool {pool}, scale {scale}"
    );
    println!("Machine: {}", support::machine());
    println!("pgwarden: {}\n", support::pgwarden_binary().display());
    let mut header = String::from("| mode | clients |");
    for n in &names {
        header.push_str(&format!(" {n} TPS |"));
    }
    header.push_str(" pgwarden/pgbouncer | pgwarden/direct | pgwarden CPU µs/tx | pgbouncer CPU µs/tx | failed |");
    println!("{header}");
    println!("|{}", "---|".repeat(header.matches('|').count() - 1));
    let runs = |mode: &str, c: &str, name: &str| {
        results
            .get(&(mode.to_owned(), c.to_owned(), name))
            .cloned()
            .unwrap_or_default()
    };
    // The median of one figure over a cell's runs of `name`; `None` without runs.
    let figure = |mode: &str, c: &str, name: &str, f: &dyn Fn(&Run) -> Option<f64>| {
        let mut v: Vec<f64> = runs(mode, c, name).iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let shown =
        |v: Option<f64>, digits: usize| v.map_or("–".to_owned(), |v| format!("{v:.digits$}"));
    for mode in &modes {
        for c in &clients {
            let tps = |name: &str| figure(mode, c, name, &|r| Some(r.tps)).unwrap_or(0.0);
            let cpu = |name: &str| shown(figure(mode, c, name, &|r| r.cpu_us_per_tx), 1);
            let ratio = |a: f64, b: f64| shown((b > 0.0).then(|| a / b), 2);
            let failed: u64 = names
                .iter()
                .map(|n| runs(mode, c, n).iter().map(|r| r.failed).sum::<u64>())
                .sum();
            let mut line = format!("| {mode} | {c} |");
            for n in &names {
                // No runs: PgBouncer before 1.21 in `-M prepared`.
                let median_tps = figure(mode, c, n, &|r| Some(r.tps));
                line.push_str(&format!(" {} |", shown(median_tps, 0)));
            }
            line.push_str(&format!(
                " {} | {} | {} | {} | {failed} |",
                ratio(tps("pgwarden"), tps("pgbouncer")),
                ratio(tps("pgwarden"), tps("direct")),
                cpu("pgwarden"),
                cpu("pgbouncer"),
            ));
            println!("{line}");
        }
    }

    // Where the machine's CPU went: on two shared CPUs the pooler competes with
    // pgbench and the servers, so TPS follows the whole machine's cost per
    // transaction, and idle time shows waits that no process filled.
    println!(
        "\nCPU µs per transaction across the machine (medians; pgbench's includes its logins):\n"
    );
    println!(
        "| mode | clients | target | pooler | pgbench | rest (PostgreSQL, kernel) | machine busy | idle |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for mode in &modes {
        for c in &clients {
            for n in &names {
                let of = |f: &dyn Fn(&Run) -> Option<f64>| figure(mode, c, n, f);
                let (pooler, client, busy) = (
                    of(&|r| r.cpu_us_per_tx),
                    of(&|r| Some(r.client_us_per_tx)),
                    of(&|r| Some(r.machine_us_per_tx)),
                );
                let Some(busy) = busy else { continue };
                let rest = of(&|r| {
                    Some(r.machine_us_per_tx - r.client_us_per_tx - r.cpu_us_per_tx.unwrap_or(0.0))
                });
                println!(
                    "| {mode} | {c} | {n} | {} | {} | {} | {busy:.1} | {} |",
                    shown(pooler, 1),
                    shown(client, 1),
                    shown(rest, 1),
                    shown(of(&|r| Some(r.idle_us_per_tx)), 1),
                );
            }
        }
    }
}
