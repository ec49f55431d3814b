//! Throughput and pooler CPU per transaction: pgbench against direct PostgreSQL,
//! pgwarden and PgBouncer, alternating the targets in every round so that a
//! noisy machine affects all three alike. Prints median TPS, the ratios
//! pgwarden/PgBouncer and pgwarden/direct, and each pooler's CPU µs per transaction.
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
    for mode in &modes {
        for c in &clients {
            let runs = |name: &str| {
                results
                    .get(&(mode.clone(), c.clone(), name))
                    .cloned()
                    .unwrap_or_default()
            };
            let tps =
                |name: &str| median(&mut runs(name).iter().map(|r| r.tps).collect::<Vec<_>>());
            let cpu = |name: &str| {
                let mut v: Vec<f64> = runs(name).iter().filter_map(|r| r.cpu_us_per_tx).collect();
                if v.is_empty() {
                    "–".to_owned()
                } else {
                    format!("{:.1}", median(&mut v))
                }
            };
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}", a / b)
                } else {
                    "–".into()
                }
            };
            let failed: u64 = names
                .iter()
                .map(|n| runs(n).iter().map(|r| r.failed).sum::<u64>())
                .sum();
            let mut line = format!("| {mode} | {c} |");
            for n in &names {
                // No runs: PgBouncer before 1.21 in `-M prepared`.
                if runs(n).is_empty() {
                    line.push_str(" – |");
                } else {
                    line.push_str(&format!(" {:.0} |", tps(n)));
                }
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
}
