//! Failover timing: a writer inserts through pgwarden every 10 ms while the
//! primary of a three-node cluster (synchronous replication, ANY 1) fails; the
//! write-unavailability window is the time from the last acknowledged insert
//! before the fault to the first one after it. Each run starts a fresh cluster.
//! Prints min / median / max of the window and the acknowledged commits missing
//! on the new primary (which must be 0).
//!
//! Run: `cargo bench --bench failover`.
//! Knobs: BENCH_RUNS=5; BENCH_FAULT=kill (SIGKILL of the postmaster) or stop
//! (SIGSTOP of every server process: a silent hang only timeouts reveal);
//! BENCH_SETTINGS="defaults;250ms" (which `[health]` settings to measure);
//! BENCH_PROXIES=1 or 3: with 3, three pgwarden processes coordinate through a
//! real etcd (`[coordination]`, lease_ttl 5s) and the writer goes through one
//! that is not the leader, so the window includes following the leader's decision.

#[path = "support/mod.rs"]
mod support;

#[path = "../tests/common/etcd.rs"]
mod etcd;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgwarden::cluster::ClusterSpec;
use support::{env_or, median};
use tokio_postgres::types::Type;

struct Outcome {
    window: Duration,
    acknowledged: usize,
    lost: usize,
    failed: usize,
}

fn main() {
    let runs: usize = env_or("BENCH_RUNS", 5);
    let fault = std::env::var("BENCH_FAULT").unwrap_or_else(|_| "kill".into());
    let settings = std::env::var("BENCH_SETTINGS").unwrap_or_else(|_| "defaults;250ms".into());
    let proxies: usize = env_or("BENCH_PROXIES", 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut table = Vec::new();
    for name in settings.split(';') {
        let health = match name {
            "defaults" => String::new(),
            interval => format!("[health]\ninterval = \"{interval}\"\n"),
        };
        let mut outcomes = Vec::new();
        for run in 0..runs {
            let o = runtime.block_on(one_run(&fault, &health, proxies));
            eprintln!(
                "{name} run {run}: window {:.0} ms, {} acknowledged, {} failed, {} lost",
                o.window.as_secs_f64() * 1e3,
                o.acknowledged,
                o.failed,
                o.lost
            );
            outcomes.push(o);
        }
        table.push((name.to_owned(), outcomes));
    }
    println!(
        "\n## failover: {fault} the primary, {runs} runs per setting, sync replication ANY 1, {proxies} proxies"
    );
    println!("Machine: {}\n", support::machine());
    println!(
        "| health settings | window min | median | max | failed writes (total) | lost acknowledged commits |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, outcomes) in &table {
        let mut ms: Vec<f64> = outcomes
            .iter()
            .map(|o| o.window.as_secs_f64() * 1e3)
            .collect();
        let min = ms.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ms.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {name} | {min:.0} ms | {:.0} ms | {max:.0} ms | {} | {} |",
            median(&mut ms),
            outcomes.iter().map(|o| o.failed).sum::<usize>(),
            outcomes.iter().map(|o| o.lost).sum::<usize>(),
        );
    }
}

async fn one_run(fault: &str, health: &str, proxies: usize) -> Outcome {
    let cluster = support::cluster_with(
        1,
        &ClusterSpec {
            standbys: 2,
            synchronous: true,
            settings: vec![("wal_receiver_timeout".into(), "2s".into())],
        },
    );
    let etcd = (proxies > 1).then(etcd::Etcd::start);
    let sections = match &etcd {
        Some(etcd) => format!(
            "{health}[coordination]\netcd = [\"{}\"]\nprefix = \"/pgwarden/bench\"\n",
            etcd.endpoint()
        ),
        None => health.to_owned(),
    };
    // The first proxy takes the leader key; the writer uses the last one, a follower.
    let mut started = Vec::new();
    for _ in 0..proxies {
        started.push(support::pgwarden(&cluster, 5, "", &sections));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let target = started.last().expect("at least one proxy");
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname={}",
        target.port,
        support::USER,
        support::PASSWORD,
        support::DATABASE
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        .await
        .unwrap();

    let mut acked: Vec<(i32, Instant)> = Vec::new();
    let mut failed = 0;
    let mut fault_at = None;
    // A real fault comes at any moment of the probe cycle, and where it falls decides
    // how long the first failed probe takes to start: a fixed moment would measure one
    // point of that cycle every run. So the fault comes 2 s in, plus up to a second.
    let fault_after = Duration::from_millis(2000 + rand::random_range(0..1000));
    let started = Instant::now();
    let mut id = 0;
    loop {
        id += 1;
        match client
            .execute_typed("INSERT INTO ledger VALUES ($1)", &[(&id, Type::INT4)])
            .await
        {
            Ok(_) => acked.push((id, Instant::now())),
            Err(_) => failed += 1,
        }
        if fault_at.is_none() && started.elapsed() > fault_after {
            let primary = &cluster.nodes[0];
            match fault {
                "stop" => primary.signal_all(libc::SIGSTOP).unwrap(),
                _ => primary.signal(libc::SIGKILL).unwrap(),
            }
            fault_at = Some(Instant::now());
        }
        if let Some(at) = fault_at {
            let resumed = acked.iter().filter(|(_, t)| *t > at).count();
            if resumed >= 50 || at.elapsed() > Duration::from_secs(90) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at = fault_at.unwrap();
    let before = acked
        .iter()
        .rev()
        .find(|(_, t)| *t < at)
        .map(|(_, t)| *t)
        .unwrap_or(at);
    let after = acked
        .iter()
        .find(|(_, t)| *t > at)
        .map(|(_, t)| *t)
        .unwrap_or_else(Instant::now);
    let new_primary = cluster
        .nodes
        .iter()
        .skip(1)
        .find(|n| n.in_recovery().ok() == Some(false))
        .expect("a promoted standby");
    let stored: BTreeSet<i32> = new_primary
        .sql_in(support::DATABASE, "SELECT id FROM ledger")
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    Outcome {
        window: after - before,
        acknowledged: acked.len(),
        lost: acked.iter().filter(|(id, _)| !stored.contains(id)).count(),
        failed,
    }
}
