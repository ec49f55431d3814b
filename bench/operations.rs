//! Operations costs: the pause a SWITCHOVER imposes on a loaded cluster, and the
//! failed transactions, which must be 0; then rolling restarts under load, which
//! must cost no client an error. (What many idle clients cost, and the time to
//! scrape /metrics among them, is bench/connections.rs.)
//!
//! Run: `cargo bench --bench operations`.
//! Knobs: BENCH_RUNS=5 (switchovers, each on a fresh cluster), BENCH_HANDOVERS=4
//! (rolling restarts, one every 2 s).

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use pgwarden::cluster::ClusterSpec;
use support::{env_or, median};
use tokio_postgres::SimpleQueryMessage;

const ADMIN: (&str, &str) = ("admin", "admin");

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    switchovers(&runtime, env_or("BENCH_RUNS", 5));
    rolling_restarts(env_or("BENCH_HANDOVERS", 4));
}

fn admin_extra() -> String {
    format!(
        "admin_users = [\"{}\"]\nhttp_listen = \"127.0.0.1:{}\"",
        ADMIN.0,
        pgwarden::cluster::free_port().unwrap()
    )
}

fn switchovers(runtime: &tokio::runtime::Runtime, runs: usize) {
    let mut pauses = Vec::new();
    let mut failed = 0u64;
    let mut lines = Vec::new();
    for run in 0..runs {
        let cluster = support::cluster_with(
            1,
            &ClusterSpec {
                standbys: 2,
                synchronous: true,
                settings: vec![("wal_receiver_timeout".into(), "2s".into())],
            },
        );
        let target = support::pgwarden(&cluster, 20, &admin_extra(), "");
        let load = {
            let mut cmd = cluster.client_program("pgbench");
            cmd.args(["-n", "-c", "20", "-j", "2", "-T", "10", "-M", "extended"])
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &target.port.to_string(),
                    "-U",
                    support::USER,
                    support::DATABASE,
                ])
                .env("PGPASSWORD", support::PASSWORD);
            std::thread::spawn(move || cmd.output().unwrap())
        };
        std::thread::sleep(Duration::from_secs(3));
        let pause = runtime.block_on(async {
            let admin = connect_admin(target.port).await;
            admin.simple_query("SWITCHOVER").await.expect("SWITCHOVER");
            let rows = admin.simple_query("SHOW FAILOVERS").await.unwrap();
            rows.iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(r) => {
                        r.get("window_ms").and_then(|w| w.parse::<f64>().ok())
                    }
                    _ => None,
                })
                .next_back()
                .unwrap_or(f64::NAN)
        });
        let out = load.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let count = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let run_failed = count("number of failed transactions: ") as u64;
        eprintln!(
            "switchover run {run}: paused {pause:.0} ms, {run_failed} failed transactions, {:.0} tps",
            count("tps = ")
        );
        lines.push(format!(
            "| {run} | {pause:.0} ms | {run_failed} | {:.0} |",
            count("tps = ")
        ));
        failed += run_failed;
        pauses.push(pause);
    }
    println!("\n## SWITCHOVER under pgbench (tpcb-like, extended, -c 20, sync replication ANY 1)");
    println!("Machine: {}\n", support::machine());
    println!("| run | pause | failed transactions | tps during the run |\n|---|---|---|---|");
    for l in &lines {
        println!("{l}");
    }
    println!(
        "\nmedian pause {:.0} ms over {} switchovers; failed transactions in total: {failed}",
        median(&mut pauses),
        pauses.len()
    );
}

async fn connect_admin(port: u16) -> tokio_postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname=pgwarden",
        ADMIN.0, ADMIN.1
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// New pgwarden processes take the port over one after another (so_reuseport;
/// each old one gets SIGTERM with `sigterm = "wait_for_clients"`) while one
/// pgbench connects anew for every transaction and another keeps its
/// connections, on the first process, to the end. Every transaction of both must
/// succeed, and each old process must exit once its last client left.
fn rolling_restarts(handovers: usize) {
    let cluster = support::cluster(1);
    let extra = "so_reuseport = true\nsigterm = \"wait_for_clients\"";
    // The state file, in the first process's folder, keeps the decider lock there too.
    let state = "[failover]\nstate_file = \"state.json\"";
    let mut first = support::pgwarden(&cluster, 20, extra, state);
    let duration = (2 * handovers + 4).to_string();
    let (reconnecting, persistent, mut successors) = std::thread::scope(|scope| {
        let first = &first;
        let load = |connect_each: bool| {
            let (cluster, duration) = (&cluster, &duration);
            scope.spawn(move || {
                let mut args = vec!["-S", "-c", "4", "-j", "2", "-T", duration.as_str()];
                if connect_each {
                    args.push("-C");
                }
                support::pgbench(cluster, first, &args)
            })
        };
        let reconnecting = load(true);
        let persistent = load(false);
        let mut successors: Vec<support::Target> = Vec::new();
        for _ in 0..handovers {
            std::thread::sleep(Duration::from_secs(2));
            let leaving = successors.last().map_or(first.pid, |t| t.pid).unwrap();
            successors.push(support::pgwarden_beside(first));
            // SAFETY: signalling a process this benchmark started.
            unsafe { libc::kill(leaving, libc::SIGTERM) };
        }
        let reconnecting = reconnecting
            .join()
            .expect("pgbench -C: every connection got in");
        let persistent = persistent.join().expect("pgbench: every transaction ran");
        (reconnecting, persistent, successors)
    });
    let loads_ended = Instant::now();
    // The old processes with only reconnecting clients are gone by now; the first
    // one goes once the persistent clients have left.
    let others_gone = successors
        .iter_mut()
        .take(handovers - 1)
        .filter_map(|t| t.exited().then_some(()))
        .count();
    while !first.exited() && loads_ended.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_gone = loads_ended.elapsed();
    println!("\n## Rolling restarts under pgbench -S (4 clients reconnecting, 4 persistent)");
    println!("Machine: {}\n", support::machine());
    println!("| load | transactions | failed | tps |\n|---|---|---|---|");
    for (name, run) in [
        ("a new connection per transaction (-C)", reconnecting),
        ("persistent connections", persistent),
    ] {
        println!(
            "| {name} | {} | {} | {:.0} |",
            run.transactions, run.failed, run.tps
        );
    }
    println!(
        "\n{handovers} handovers, one every 2 s; {others_gone} of {} later old processes had \
         exited when the load ended; the first (persistent clients) exited {:.0} ms after \
         they left{}",
        handovers - 1,
        first_gone.as_secs_f64() * 1e3,
        if first.exited() {
            ""
        } else {
            " (no: still running)"
        }
    );
}
