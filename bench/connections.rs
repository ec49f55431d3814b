//! What client connections cost a pooler, pgwarden beside PgBouncer in the same run:
//! resident memory per idle client (SCRAM login, then idle), after one `SELECT 1`
//! each, and after they all left (no leak); the time for a connection storm of
//! clients connecting at once to have all run `SELECT 1`; and the time to scrape
//! pgwarden's /metrics among the idle clients.
//!
//! Run: `cargo bench --bench connections` (PgBouncer from `apt-get install -y pgbouncer`).
//! Knobs: BENCH_IDLE=1000,10000 (idle client counts), BENCH_STORM=2000 (clients
//! in the storm), BENCH_RUNS=3 (storms per pooler).

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use support::{Target, env_list, env_or, median};

/// Clients opened together while building up the idle set.
const BATCH: usize = 250;

fn main() {
    // This process holds every client socket: let it hold 10 000 and more.
    pgwarden::open_files::raise().expect("the open-files limit can be read");
    let idle: Vec<usize> = env_list("BENCH_IDLE", "1000,10000")
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    let storm: usize = env_or("BENCH_STORM", 2000);
    let runs: usize = env_or("BENCH_RUNS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = support::cluster(1);
    if !support::pgbouncer_available() {
        eprintln!("PgBouncer not found (apt-get install -y pgbouncer): measuring pgwarden alone");
    }
    // A fresh pooler for every measurement, and pgwarden's HTTP port with it.
    let start = |name: &str| -> Option<(Target, Option<u16>)> {
        if name == "pgbouncer" {
            return support::pgbouncer(&cluster, 20).map(|t| (t, None));
        }
        let http = pgwarden::cluster::free_port().unwrap();
        let extra = format!("max_client_conn = 20000\nhttp_listen = \"127.0.0.1:{http}\"");
        Some((support::pgwarden(&cluster, 20, &extra, ""), Some(http)))
    };

    let mut idle_lines = Vec::new();
    for &n in &idle {
        for name in ["pgwarden", "pgbouncer"] {
            let Some((target, scrape_port)) = start(name) else {
                continue;
            };
            let line = runtime.block_on(idle_clients(&target, n, scrape_port));
            eprintln!("{line}");
            idle_lines.push(line);
        }
    }

    let mut storm_lines = Vec::new();
    for name in ["pgwarden", "pgbouncer"] {
        let mut times = Vec::new();
        let mut failed = 0;
        for _ in 0..runs {
            let Some((target, _)) = start(name) else {
                break;
            };
            let (took, errors) = runtime.block_on(connection_storm(target.port, storm));
            eprintln!(
                "storm {name}: {storm} clients in {:.2} s, {errors} failed",
                took.as_secs_f64()
            );
            times.push(took.as_secs_f64());
            failed += errors;
        }
        if !times.is_empty() {
            let mut sorted = times.clone();
            storm_lines.push(format!(
                "| {name} | {storm} | {:.2} s | {:.2} s | {:.2} s | {failed} |",
                sorted.iter().cloned().fold(f64::MAX, f64::min),
                median(&mut sorted),
                times.iter().cloned().fold(0.0, f64::max),
            ));
        }
    }

    println!("\n## Idle clients (SCRAM login, then idle; pooler RSS from /proc)");
    println!("Machine: {}\n", support::machine());
    println!(
        "| pooler | clients | time to open all | RSS per idle client | RSS per client after one SELECT 1 each | RSS start → at rest after all left | of which anonymous (heap, stacks) | /metrics scrape (median of 20) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for l in &idle_lines {
        println!("{l}");
    }
    println!("\n## Connection storm: clients connecting at once (SCRAM), each runs SELECT 1");
    println!("\n| pooler | clients | min | median | max | failed clients (all runs) |");
    println!("|---|---|---|---|---|---|");
    for l in &storm_lines {
        println!("{l}");
    }
}

/// Opens `n` idle clients through a freshly started pooler and reports its RSS
/// along the way, as one table line.
async fn idle_clients(target: &Target, n: usize, scrape_port: Option<u16>) -> String {
    let pid = target.pid.expect("poolers have a pid");
    // Clients first, so that pools and logins exist before the baseline, and the
    // code that logs clients in, serves and sees them off has run once: its pages
    // are resident from then on, whatever the number of clients.
    let first = client(target.port).await.expect("first client");
    first.simple_query("SELECT 1").await.unwrap();
    let warm = join_all((0..BATCH).map(|_| client(target.port))).await;
    for c in warm.iter().flatten() {
        c.simple_query("SELECT 1").await.unwrap();
    }
    drop(warm);
    // And one scrape, for the same reason: the pages of the code that answers it
    // are the program's, not the clients'.
    if let Some(port) = scrape_port {
        scrape(port).await;
    }
    let start = settled_rss(pid).await;
    let start_anon = support::anon_rss_kib(pid);
    let opening = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(BATCH) {
        let batch = (chunk * BATCH..((chunk + 1) * BATCH).min(n)).map(|_| client(target.port));
        for c in join_all(batch).await {
            clients.push(c.unwrap_or_else(|e| panic!("{} refused a client: {e}", target.name)));
        }
    }
    let opened = opening.elapsed();
    let idle = settled_rss(pid).await;
    let scrape = match scrape_port {
        Some(port) => {
            let mut times = Vec::new();
            let mut size = 0;
            for _ in 0..20 {
                let t = Instant::now();
                size = scrape(port).await;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            format!("{:.2} ms ({size} B)", median(&mut times))
        }
        None => "–".to_owned(),
    };
    for batch in clients.chunks(BATCH) {
        join_all(batch.iter().map(|c| c.simple_query("SELECT 1"))).await;
    }
    let used = settled_rss(pid).await;
    drop(clients);
    // Where RSS comes to rest once they left, and how long that took.
    let leaving = Instant::now();
    let after = settled_rss(pid).await;
    let left = leaving.elapsed();
    let after_anon = support::anon_rss_kib(pid);
    let per = |kib: u64| (kib.saturating_sub(start)) as f64 * 1024.0 / n as f64;
    let growth = |from: u64, to: u64| (to as f64 - from as f64) * 100.0 / from.max(1) as f64;
    format!(
        "| {} | {n} | {:.1} s | {:.0} B | {:.0} B | {start} → {after} KiB ({:+.1} %) after {:.1} s | {start_anon} → {after_anon} KiB ({:+.1} %) | {scrape} |",
        target.name,
        opened.as_secs_f64(),
        per(idle),
        per(used),
        growth(start, after),
        left.as_secs_f64(),
        growth(start_anon, after_anon),
    )
}

/// RSS once it holds still: what logins and queries allocated and freed is given
/// back by the allocator (pgwarden's jemalloc returns freed pages over about a
/// second), and only what the clients keep counts. A pause of one reading could
/// fall before the allocator starts giving back and then count the garbage of the
/// logins as the clients' memory, or not, from run to run: RSS must hold for 2 s.
async fn settled_rss(pid: i32) -> u64 {
    const STEADY: usize = 4;
    let mut readings = vec![support::rss_kib(pid)];
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        readings.push(support::rss_kib(pid));
        let recent = &readings[readings.len().saturating_sub(STEADY + 1)..];
        let (low, high) = (recent.iter().min().unwrap(), recent.iter().max().unwrap());
        if recent.len() > STEADY && (high - low) * 200 <= *low {
            return *recent.last().unwrap();
        }
    }
    *readings.last().unwrap()
}

/// `n` clients connect at once and each runs `SELECT 1`: the time until the last
/// one has its answer, and how many failed.
async fn connection_storm(port: u16, n: usize) -> (Duration, usize) {
    let started = Instant::now();
    let clients = (0..n).map(|_| {
        tokio::spawn(async move {
            let c = client(port).await?;
            c.simple_query("SELECT 1").await.map(|_| c)
        })
    });
    let results = join_all(clients).await;
    let took = started.elapsed();
    let failed = results.iter().filter(|r| !matches!(r, Ok(Ok(_)))).count();
    (took, failed)
}

async fn client(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={} connect_timeout=60",
        support::USER,
        support::PASSWORD,
        support::DATABASE
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
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
