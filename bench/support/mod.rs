//! Shared pieces of the benchmarks: a PostgreSQL with a pgbench database, the
//! poolers under comparison (pgwarden and PgBouncer) in front of it, pgbench
//! runs, CPU accounting of a process, and table printing.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgwarden::cluster::{Cluster, ClusterSpec, Programs, free_port};

/// The benchmark user, its password and database.
pub const USER: &str = "bench";
pub const PASSWORD: &str = "bench";
pub const DATABASE: &str = "bench";

/// An environment variable parsed, or a default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated list from the environment, or a default.
pub fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A PostgreSQL with the benchmark user and an initialised pgbench database.
pub fn cluster(scale: u32) -> Cluster {
    cluster_with(scale, &ClusterSpec::default())
}

/// A cluster as `spec` says, with the benchmark user and a pgbench database.
pub fn cluster_with(scale: u32, spec: &ClusterSpec) -> Cluster {
    let cluster = Cluster::start(spec).expect("start PostgreSQL");
    cluster.create_user(USER, PASSWORD).unwrap();
    cluster.create_database(DATABASE, USER).unwrap();
    let out = cluster
        .client_program("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string()])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.primary().port.to_string(),
            "-U",
            USER,
            DATABASE,
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster
}

/// Something pgbench can connect to.
pub struct Target {
    pub name: &'static str,
    pub port: u16,
    /// the pooler's process, for CPU accounting; `None` for direct PostgreSQL
    pub pid: Option<i32>,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        // SIGTERM first: a pooler that exits by itself writes what it must on the
        // way out (an instrumented build's profile, for `scripts/pgo-build`).
        if let (Some(pid), Some(child)) = (self.pid, self.child.as_mut()) {
            // SAFETY: signalling a process this benchmark started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(pid) = self.pid {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Direct connections to PostgreSQL.
pub fn direct(cluster: &Cluster) -> Target {
    Target {
        name: "direct",
        port: cluster.primary().port,
        pid: None,
        child: None,
        dir: None,
    }
}

fn scratch_dir(programs: &Programs, name: &str) -> PathBuf {
    // Numbered: a benchmark may run several poolers at once (BENCH_PROXIES).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("pgwarden-bench-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    programs.make_dir(&dir).unwrap();
    dir
}

fn wait_listening(port: u16, what: &str, child: &mut Child, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            panic!(
                "{what} did not start listening on {port} ({exited:?}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// pgwarden (release build) in transaction mode with `pool_size` server connections,
/// in front of every node of `cluster`; `extra` is appended to `[pgwarden]` and
/// `sections` after it (e.g. `[health]` settings).
pub fn pgwarden(cluster: &Cluster, pool_size: u32, extra: &str, sections: &str) -> Target {
    let programs = Programs::find().unwrap();
    let dir = scratch_dir(&programs, "pgwarden");
    let port = free_port().unwrap();
    // No HTTP endpoint unless the benchmark asks for one.
    let http = if extra.contains("http_listen") {
        ""
    } else {
        "http_listen = \"\"\n"
    };
    std::fs::write(
        dir.join("pgwarden.toml"),
        format!(
            "[pgwarden]\nlisten = \"127.0.0.1:{port}\"\n{http}log_level = \"warn\"\n{extra}\n\
             [auth]\ntype = \"scram-sha-256\"\nfile = \"userlist.txt\"\n\
             [pool]\nmode = \"transaction\"\ndefault_pool_size = {pool_size}\n\
             {sections}\n{}\
             [databases.{DATABASE}]\n",
            cluster
                .nodes
                .iter()
                .map(|n| format!(
                    "[[backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\n",
                    n.name, n.port
                ))
                .collect::<String>()
        ),
    )
    .unwrap();
    let (superuser, superpassword) = pgwarden::cluster::SUPERUSER;
    std::fs::write(
        dir.join("userlist.txt"),
        // "admin" serves benchmarks that set pgwarden.admin_users.
        format!(
            "\"{USER}\" \"{PASSWORD}\"\n\"{superuser}\" \"{superpassword}\"\n\"admin\" \"admin\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(pgwarden_binary())
        .arg("--config")
        .arg(dir.join("pgwarden.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("pgwarden.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    wait_listening(port, "pgwarden", &mut child, &dir.join("pgwarden.log"));
    Target {
        name: "pgwarden",
        port,
        pid: Some(pid),
        child: Some(child),
        dir: Some(dir),
    }
}

/// A second pgwarden on `first`'s configuration, which must set `so_reuseport`:
/// it listens on the same port beside it. Returns once it listens.
pub fn pgwarden_beside(first: &Target) -> Target {
    let dir = first.dir.as_ref().expect("a pgwarden target");
    let log = dir.join(format!("pgwarden-{}.log", free_port().unwrap()));
    let mut child = Command::new(pgwarden_binary())
        .arg("--config")
        .arg(dir.join("pgwarden.toml"))
        // Its "listening" line is at info, above the benchmarks' log level.
        .env("RUST_LOG", "pgwarden::proxy=info,warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("pgwarden listening")
    {
        let exited = child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "the second pgwarden did not listen ({exited:?}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Target {
        name: "pgwarden",
        port: first.port,
        pid: Some(child.id() as i32),
        child: Some(child),
        dir: None,
    }
}

impl Target {
    /// True once the pooler process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }
}

/// The pgwarden to measure: `BENCH_PGWARDEN_BIN` (a build made another way, such as
/// `scripts/pgo-build`'s), else the one cargo built for this benchmark.
pub fn pgwarden_binary() -> PathBuf {
    std::env::var_os("BENCH_PGWARDEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pgwarden")))
}

/// PgBouncer from the distribution, configured like pgwarden.
pub fn pgbouncer(cluster: &Cluster, pool_size: u32) -> Option<Target> {
    let binary = pgbouncer_binary()?;
    // Named prepared statements in transaction mode exist from PgBouncer 1.21 on.
    let prepared = if pgbouncer_supports_prepared() {
        "max_prepared_statements = 200\n"
    } else {
        ""
    };
    let programs = Programs::find().unwrap();
    let dir = scratch_dir(&programs, "pgbouncer");
    let port = free_port().unwrap();
    let ini = dir.join("pgbouncer.ini");
    programs
        .write_file(
            &ini,
            &format!(
                "[databases]\n{DATABASE} = host=127.0.0.1 port={} dbname={DATABASE}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = scram-sha-256\nauth_file = {}\npool_mode = transaction\n\
                 default_pool_size = {pool_size}\nmax_client_conn = 20000\n\
                 logfile = {}\npidfile = {}\nlog_connections = 0\nlog_disconnections = 0\n{prepared}",
                cluster.primary().port,
                dir.join("userlist.txt").display(),
                dir.join("pgbouncer.log").display(),
                dir.join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
    programs
        .write_file(
            &dir.join("userlist.txt"),
            &format!("\"{USER}\" \"{PASSWORD}\"\n"),
        )
        .unwrap();
    let mut child = programs
        .command_path(std::path::Path::new(binary))
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port, "pgbouncer", &mut child, &dir.join("pgbouncer.log"));
    let pid = std::fs::read_to_string(dir.join("pgbouncer.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Some(Target {
        name: "pgbouncer",
        port,
        pid,
        child: Some(child),
        dir: Some(dir),
    })
}

/// User + system CPU time a process has used so far (all threads).
pub fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat; 12 and 13 after the name.
    from_ticks(ticks(11) + ticks(12))
}

/// The whole machine's CPU time so far, all CPUs: (busy, idle), from `/proc/stat`.
/// Busy is user, nice, system, irq and softirq; idle is idle and iowait; steal,
/// time the hypervisor gave to others, is neither.
pub fn machine_cpu() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .unwrap_or_default()
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let sum = |ix: &[usize]| from_ticks(ix.iter().filter_map(|&i| fields.get(i)).sum());
    (sum(&[0, 1, 2, 5, 6]), sum(&[3, 4]))
}

/// User + system CPU time of this process's children that have been waited for.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Clock ticks (`/proc`'s unit) as a duration.
fn from_ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part of a process's resident memory in KiB (heap, stacks):
/// RSS without the pages of the program and libraries it has run.
pub fn anon_rss_kib(pid: i32) -> u64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one pgbench run measured.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub tps: f64,
    pub transactions: u64,
    pub failed: u64,
    pub latency_ms: f64,
    /// pooler CPU microseconds per transaction
    pub cpu_us_per_tx: Option<f64>,
    /// pgbench's own CPU microseconds per transaction (its logins included)
    pub client_us_per_tx: f64,
    /// the whole machine's busy CPU microseconds per transaction, every process
    pub machine_us_per_tx: f64,
    /// CPU microseconds per transaction that no process used
    pub idle_us_per_tx: f64,
}

/// Runs pgbench against `target` with `args` and accounts the pooler's CPU.
pub fn pgbench(cluster: &Cluster, target: &Target, args: &[&str]) -> Run {
    let before = target.pid.map(cpu_time);
    let (client_before, (busy_before, idle_before)) = (children_cpu(), machine_cpu());
    let out = cluster
        .client_program("pgbench")
        .args(["-n"])
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &target.port.to_string(),
            "-U",
            USER,
            DATABASE,
        ])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let after = target.pid.map(cpu_time);
    let (client_after, (busy_after, idle_after)) = (children_cpu(), machine_cpu());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench {args:?} against {}: {stdout}{}",
        target.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let number = |s: String| {
        s.split([' ', '/'])
            .next()
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let transactions = number(field("number of transactions actually processed: ")) as u64;
    let per_tx = |after: Duration, before: Duration| {
        after.saturating_sub(before).as_secs_f64() * 1e6 / transactions.max(1) as f64
    };
    Run {
        tps: number(field("tps = ")),
        transactions,
        failed: number(field("number of failed transactions: ")) as u64,
        latency_ms: number(field("latency average = ")),
        cpu_us_per_tx: before
            .zip(after)
            .filter(|_| transactions > 0)
            .map(|(b, a)| per_tx(a, b)),
        client_us_per_tx: per_tx(client_after, client_before),
        machine_us_per_tx: per_tx(busy_after, busy_before),
        idle_us_per_tx: per_tx(idle_after, idle_before),
    }
}

/// Median of a sample (0 for an empty one).
/// True when PgBouncer is installed.
pub fn pgbouncer_available() -> bool {
    pgbouncer_binary().is_some()
}

fn pgbouncer_binary() -> Option<&'static str> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
}

/// True when the installed PgBouncer (1.21 or later) supports named prepared
/// statements in transaction mode.
pub fn pgbouncer_supports_prepared() -> bool {
    let Some(binary) = pgbouncer_binary() else {
        return false;
    };
    let out = Command::new(binary).arg("--version").output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // "PgBouncer 1.18.0"
    let version: Vec<u32> = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .split('.')
        .filter_map(|p| p.parse().ok())
        .collect();
    matches!(version.as_slice(), [1, minor, ..] if *minor >= 21) || version.first() > Some(&1)
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// One line describing the machine, for the report.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
