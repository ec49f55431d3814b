//! Operations costs: the pause a SWITCHOVER imposes on a loaded cluster (and the
//! failed transactions, which must be 0), and what many idle clients cost —
//! resident memory per client and the time to scrape /metrics among them.
//!
//! Run: `cargo bench --bench operations`.
//! Knobs: BENCH_RUNS=5 (switchovers, each on a fresh cluster), BENCH_IDLE=1000,10000
//! (idle client counts), BENCH_SKIP=switchover|idle (measure only the other).

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use pgwarden::cluster::ClusterSpec;
use support::{env_list, env_or, median};
use tokio_postgres::SimpleQueryMessage;

const ADMIN: (&str, &str) = ("admin", "admin");

fn main() {
    let skip = std::env::var("BENCH_SKIP").unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if skip != "switchover" {
        switchovers(&runtime, env_or("BENCH_RUNS", 5));
    }
    if skip != "idle" {
        let counts: Vec<usize> = env_list("BENCH_IDLE", "1000,10000")
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        runtime.block_on(idle_clients(&counts));
    }
}

fn admin_extra() -> String {
    format!(
        "admin_users = [\"{}\"]\nmax_client_conn = 20000\nhttp_listen = \"127.0.0.1:{}\"",
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

async fn idle_clients(counts: &[usize]) {
    let mut lines = Vec::new();
    for &n in counts {
        let cluster = support::cluster(1);
        let extra = admin_extra();
        let http_port: u16 = extra
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('"')
            .parse()
            .unwrap();
        let target = support::pgwarden(&cluster, 20, &extra, "");
        let pid = target.pid.unwrap();
        // One client first, so that pools and logins exist before the baseline.
        let first = client(target.port).await;
        first.simple_query("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = support::rss_kib(pid);
        let opening = Instant::now();
        let mut clients = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(250) {
            let batch = (chunk * 250..((chunk + 1) * 250).min(n)).map(|_| client(target.port));
            clients.extend(futures_util::future::join_all(batch).await);
        }
        let opened = opening.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = support::rss_kib(pid);
        let mut scrapes = Vec::new();
        let mut size = 0;
        for _ in 0..20 {
            let t = Instant::now();
            size = scrape(http_port).await;
            scrapes.push(t.elapsed().as_secs_f64() * 1e3);
        }
        for batch in clients.chunks(250) {
            futures_util::future::join_all(batch.iter().map(|c| c.simple_query("SELECT 1"))).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let used = support::rss_kib(pid);
        drop(clients);
        // The allocator gives memory back over a second or so: wait until RSS is
        // within 10 % of the start, up to 15 s, and report how long that took.
        let leaving = Instant::now();
        let mut after = support::rss_kib(pid);
        while after as f64 > start as f64 * 1.1 && leaving.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            after = support::rss_kib(pid);
        }
        let settled = leaving.elapsed();
        let per = |kib: u64| (kib.saturating_sub(start)) as f64 * 1024.0 / n as f64;
        let line = format!(
            "| {n} | {:.1} s | {:.0} B | {:.0} B | {start} → {after} KiB ({:+.1} %) after {:.1} s | {:.2} ms ({size} B) |",
            opened.as_secs_f64(),
            per(idle),
            per(used),
            (after as f64 - start as f64) * 100.0 / start as f64,
            settled.as_secs_f64(),
            median(&mut scrapes),
        );
        eprintln!("{line}");
        lines.push(line);
    }
    println!("\n## Idle clients (SCRAM login, then idle; pgwarden RSS from /proc)");
    println!("Machine: {}\n", support::machine());
    println!(
        "| clients | time to open all | RSS per idle client | RSS per client after one SELECT 1 each | RSS start → after all left | /metrics scrape (median of 20) |"
    );
    println!("|---|---|---|---|---|---|");
    for l in &lines {
        println!("{l}");
    }
}

async fn client(port: u16) -> tokio_postgres::Client {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={}",
        support::USER,
        support::PASSWORD,
        support::DATABASE
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

async fn scrape(port: u16) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    out.len()
}
