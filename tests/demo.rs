//! `pgwarden demo`, the README's first command, end to end: it starts a primary
//! and two streaming standbys behind the proxy and takes writes; after a kill -9
//! of the primary it fails over without losing an acknowledged commit; on Ctrl-C
//! it stops everything it started and removes its folder.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The running demo; interrupted (as by Ctrl-C) when dropped, so that a failing
/// test still stops the PostgreSQL servers it started.
struct Demo {
    child: Child,
    log: PathBuf,
}

impl Demo {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGINT and waits up to `limit` for the demo to exit.
    fn interrupt(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && self.interrupt(Duration::from_secs(60)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What the demo prints about itself once it runs.
struct Banner {
    /// pgwarden's address
    listen: String,
    /// each node's data folder, the primary's first
    data: Vec<PathBuf>,
    /// the folder everything lives in
    root: PathBuf,
}

/// Reads the demo's standard output up to its "Press Ctrl-C" line.
fn banner(lines: impl Iterator<Item = String>) -> Option<Banner> {
    let (mut listen, mut data, mut root) = (None, Vec::new(), None);
    for line in lines {
        if let Some(rest) = line.strip_prefix("pgwarden demo is running: pgwarden on ") {
            listen = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some((_, dir)) = line.split_once("  data ") {
            data.push(PathBuf::from(dir.trim()));
        } else if let Some(path) = line.strip_prefix("Config: ") {
            root = Path::new(path.trim()).parent().map(Path::to_path_buf);
        } else if line.starts_with("Press Ctrl-C") {
            return Some(Banner {
                listen: listen?,
                data,
                root: root?,
            });
        }
    }
    None
}

/// The postmaster's pid, from the first line of `data`'s postmaster.pid.
fn postmaster(data: &Path) -> i32 {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_fails_over_without_losing_a_commit_and_cleans_up() {
    let log = std::env::temp_dir().join(format!("pgwarden-demo-test-{}.log", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut demo = Demo { child, log };
    // Ends at the banner's last line, or when the demo exits without one.
    let read = tokio::task::spawn_blocking(move || {
        banner(BufReader::new(stdout).lines().map_while(Result::ok))
    });
    let banner = tokio::time::timeout(Duration::from_secs(180), read)
        .await
        .expect("the demo printed how to connect within 3 minutes")
        .unwrap()
        .unwrap_or_else(|| panic!("the demo stopped before it ran:\n{}", demo.log()));
    assert_eq!(banner.data.len(), 3, "a primary and two standbys");

    let (host, port) = banner.listen.rsplit_once(':').unwrap();
    let conninfo = |db: &str| {
        format!("host={host} port={port} user=app password=app dbname={db} connect_timeout=5")
    };
    let app = common::connect(&conninfo("appdb")).await.unwrap();
    app.batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        .await
        .unwrap();
    for id in 1..=20 {
        app.execute("INSERT INTO ledger VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    let reads = common::connect(&conninfo("appdb_ro")).await.unwrap();
    reads.simple_query("SELECT 1").await.unwrap();

    // kill -9 of the primary, as the banner suggests: writes come back on a
    // promoted standby, with every acknowledged commit.
    let standbys: Vec<i32> = banner.data[1..].iter().map(|d| postmaster(d)).collect();
    // SAFETY: kill(2) on the demo primary's postmaster.
    unsafe { libc::kill(postmaster(&banner.data[0]), libc::SIGKILL) };
    let killed = Instant::now();
    let writer = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "no writes within a minute of the kill:\n{}",
            demo.log()
        );
        if let Ok(client) = common::connect(&conninfo("appdb")).await
            && client
                .execute("INSERT INTO ledger VALUES (21)", &[])
                .await
                .is_ok()
        {
            break client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let kept: i64 = writer
        .query_one("SELECT count(*) FROM ledger WHERE id <= 20", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 20, "acknowledged commits lost in the failover");
    let admin = common::connect(&format!(
        "host={host} port={port} user=admin password=admin dbname=pgwarden"
    ))
    .await
    .unwrap();
    // The history records a failover once all of it (re-pointing, fencing) is done,
    // which may be after the first write went through.
    let failovers = loop {
        let rows = admin
            .simple_query("SHOW FAILOVERS")
            .await
            .unwrap()
            .into_iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        if rows > 0 || killed.elapsed() > Duration::from_secs(60) {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failovers, 1, "{}", demo.log());
    drop((app, reads, writer, admin));

    // Ctrl-C: pgwarden stops, the servers stop, the folder goes.
    let status = demo
        .interrupt(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the demo did not stop on SIGINT:\n{}", demo.log()));
    assert!(status.success(), "{status}:\n{}", demo.log());
    assert!(
        !banner.root.exists(),
        "{} left behind",
        banner.root.display()
    );
    // pg_ctl stop returns once the pid file is gone, a moment before the process.
    common::eventually(
        Duration::from_secs(10),
        "the standbys' postmasters gone",
        || standbys.iter().all(|&pid| !alive(pid)),
    )
    .await;
}
