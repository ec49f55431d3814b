//! Chaos runs: faults drawn from a seed, one after another, on a real three-node
//! cluster with synchronous replication, while writers go through pgwarden and
//! keep a ledger of every commit it acknowledged.
//!
//! Each fault is followed by what an operator would do (restart a killed standby,
//! rejoin an old primary with pg_rewind) and then by the checks that must hold
//! whatever happened: every acknowledged commit is on the primary, nothing was
//! written on a fenced node, exactly one primary is routed, and pgwarden is alive
//! and its metrics say what the cluster really is. A failed check panics with the
//! seed, so the run can be replayed with `PGWARDEN_CHAOS_SEED`.
//!
//! pgwarden reaches every node through a [`Relay`], so the path from pgwarden to
//! the primary can fail while the node and its replication (direct, through
//! `replication_port`) stay healthy.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden::cluster::{Cluster, free_port};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::common::relay::{Mode, Relay};
use crate::common::{Db, Options, Pgwarden, connect, sqlstate, three_nodes};

/// Probe settings of the run; a failover is confirmed within about a second.
const HEALTH: &str = "interval = \"500ms\"\ntimeout = \"1s\"\nfailure_threshold = 3";
/// Longest the harness waits for the cluster to settle after a fault.
const SETTLE: Duration = Duration::from_secs(60);
const WRITERS: i32 = 4;

/// Which run: the seed and how many faults.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub seed: u64,
    pub faults: usize,
}

impl Plan {
    /// `PGWARDEN_CHAOS_SEED` (default: a random one) and `PGWARDEN_CHAOS_FAULTS`
    /// (default `faults`).
    pub fn from_env(faults: usize) -> Plan {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Plan {
            seed: var("PGWARDEN_CHAOS_SEED").unwrap_or_else(rand::random),
            faults: var("PGWARDEN_CHAOS_FAULTS")
                .map(|n: u64| n as usize)
                .unwrap_or(faults),
        }
    }
}

/// The faults a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of every process of the primary
    KillPrimary,
    /// kill -9 of every process of a standby, restarted a little later
    KillStandby,
    /// SIGSTOP of the primary past the failure threshold, SIGCONT after the failover
    StopPrimary,
    /// the path from pgwarden to the primary fails (reset or silent), then heals
    CutPrimary,
    /// kill -9 of the primary, then kill -9 and restart of pgwarden mid-failover
    RestartDuringFailover,
}

const KINDS: [Fault; 5] = [
    Fault::KillPrimary,
    Fault::KillStandby,
    Fault::StopPrimary,
    Fault::CutPrimary,
    Fault::RestartDuringFailover,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillPrimary => "kill -9 primary",
            Fault::KillStandby => "kill -9 standby",
            Fault::StopPrimary => "SIGSTOP primary",
            Fault::CutPrimary => "cut pgwarden-primary",
            Fault::RestartDuringFailover => "restart pgwarden mid-failover",
        }
    }
}

/// The faults of a run: every kind once first (in a seeded order), then drawn at random.
fn schedule(rng: &mut StdRng, faults: usize) -> Vec<Fault> {
    let mut first = KINDS.to_vec();
    first.shuffle(rng);
    first.truncate(faults);
    let rest = (first.len()..faults).map(|_| KINDS[rng.random_range(0..KINDS.len())]);
    first.into_iter().chain(rest).collect()
}

/// What one fault did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub fault: Fault,
    /// the node it hit, and how
    pub detail: String,
    /// the primary once the cluster settled
    pub primary: String,
    /// the longest time without an acknowledged write around the fault
    pub window: Duration,
    /// fault to settled cluster, operator's repairs included
    pub took: Duration,
    /// WAL records touching the ledger on a fenced node after its fencing
    pub fenced_writes: u64,
}

/// The whole run, printed as the chaos report.
#[derive(Debug)]
pub struct Report {
    pub plan: Plan,
    pub outcomes: Vec<Outcome>,
    pub failovers: usize,
    pub acknowledged: usize,
    pub lost: usize,
    pub writer_errors: BTreeMap<String, u64>,
    pub took: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "chaos run: seed {} ({} faults, {:.0} s; replay with PGWARDEN_CHAOS_SEED={} PGWARDEN_CHAOS_FAULTS={})",
            self.plan.seed,
            self.outcomes.len(),
            self.took.as_secs_f64(),
            self.plan.seed,
            self.plan.faults
        )?;
        writeln!(
            f,
            "| # | fault | detail | primary after | write window ms | settled s |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|")?;
        for (i, o) in self.outcomes.iter().enumerate() {
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {:.1} |",
                i + 1,
                o.fault.name(),
                o.detail,
                o.primary,
                o.window.as_millis(),
                o.took.as_secs_f64()
            )?;
        }
        writeln!(
            f,
            "\n| fault | count | write window ms min / median / max |"
        )?;
        writeln!(f, "|---|---|---|")?;
        for kind in KINDS {
            let mut windows: Vec<u128> = self
                .outcomes
                .iter()
                .filter(|o| o.fault == kind)
                .map(|o| o.window.as_millis())
                .collect();
            windows.sort_unstable();
            if let (Some(min), Some(max)) = (windows.first(), windows.last()) {
                let median = windows[windows.len() / 2];
                writeln!(
                    f,
                    "| {} | {} | {min} / {median} / {max} |",
                    kind.name(),
                    windows.len()
                )?;
            }
        }
        let longest = self.outcomes.iter().max_by_key(|o| o.window);
        writeln!(
            f,
            "\nfailovers {}, longest write window {} ms ({}), acknowledged commits {}, \
             lost acknowledged commits {}, writes on fenced nodes {}",
            self.failovers,
            longest.map_or(0, |o| o.window.as_millis()),
            longest.map_or("-", |o| o.fault.name()),
            self.acknowledged,
            self.lost,
            self.outcomes.iter().map(|o| o.fenced_writes).sum::<u64>()
        )?;
        write!(f, "writer errors by SQLSTATE: {:?}", self.writer_errors)
    }
}

/// Runs `plan` on a cluster of its own and returns the report; panics (with the
/// seed) on the first check that fails.
pub async fn run(plan: Plan) -> Report {
    let started = Instant::now();
    eprintln!("chaos run: seed {} ({} faults)", plan.seed, plan.faults);
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let faults = schedule(&mut rng, plan.faults);
    let mut chaos = Chaos::start(rng, plan.seed).await;
    for (i, fault) in faults.into_iter().enumerate() {
        chaos.number = i + 1;
        let outcome = chaos.inject(fault).await;
        eprintln!(
            "chaos {}/{}: {} ({}): primary {}, write window {} ms, settled in {:.1} s",
            i + 1,
            plan.faults,
            fault.name(),
            outcome.detail,
            outcome.primary,
            outcome.window.as_millis(),
            outcome.took.as_secs_f64()
        );
        chaos.outcomes.push(outcome);
    }
    chaos.writers.stop.store(true, Ordering::Relaxed);
    for task in std::mem::take(&mut chaos.writers.tasks) {
        let _ = task.await;
    }
    let acknowledged = chaos.writers.acked.lock().unwrap().len();
    let lost = chaos.lost_commits();
    assert_eq!(lost, 0, "{}", chaos.context("lost acknowledged commits"));
    Report {
        plan,
        // Each of these ends only once a standby was promoted.
        failovers: chaos
            .outcomes
            .iter()
            .filter(|o| {
                matches!(
                    o.fault,
                    Fault::KillPrimary | Fault::StopPrimary | Fault::RestartDuringFailover
                )
            })
            .count(),
        outcomes: std::mem::take(&mut chaos.outcomes),
        acknowledged,
        lost,
        writer_errors: chaos.writers.errors.lock().unwrap().clone(),
        took: started.elapsed(),
    }
}

/// One acknowledged commit.
#[derive(Debug, Clone, Copy)]
struct Ack {
    writer: i32,
    seq: i64,
    value: i64,
    at: Instant,
}

/// Clients inserting through pgwarden, each with its ledger.
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Ack>>>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(conninfo: &str, seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(BTreeMap::new()));
        let tasks = (0..WRITERS)
            .map(|writer| {
                let (conninfo, stop) = (conninfo.to_owned(), stop.clone());
                let (acked, errors) = (acked.clone(), errors.clone());
                tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(seed ^ writer as u64);
                    let mut seq = 0i64;
                    let error =
                        |what: String| *errors.lock().unwrap().entry(what).or_insert(0) += 1;
                    while !stop.load(Ordering::Relaxed) {
                        // pgwarden keeps clients across failovers; only its own restart drops them.
                        let client = match connect(&conninfo).await {
                            Ok(c) => c,
                            Err(e) => {
                                error(sqlstate(&e).unwrap_or_else(|| "connect".into()));
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        while !stop.load(Ordering::Relaxed) {
                            seq += 1;
                            let value: i64 = rng.random_range(0..i64::MAX);
                            match client
                                .execute(
                                    "INSERT INTO chaos_ledger VALUES ($1, $2, $3)",
                                    &[&writer, &seq, &value],
                                )
                                .await
                            {
                                Ok(_) => acked.lock().unwrap().push(Ack {
                                    writer,
                                    seq,
                                    value,
                                    at: Instant::now(),
                                }),
                                Err(e) if e.is_closed() => {
                                    error("closed".into());
                                    break;
                                }
                                Err(e) => error(sqlstate(&e).unwrap_or_else(|| e.to_string())),
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            errors,
            tasks,
        }
    }

    fn last_ack(&self) -> Option<Instant> {
        self.acked.lock().unwrap().last().map(|a| a.at)
    }

    /// The longest stretch without an acknowledged write between `from` and `to`.
    fn window(&self, from: Instant, to: Instant) -> Duration {
        let acked = self.acked.lock().unwrap();
        let mut times: Vec<Instant> = acked.iter().map(|a| a.at).collect();
        times.sort_unstable();
        let start = times.iter().rposition(|&t| t <= from).unwrap_or(0);
        times[start..]
            .windows(2)
            .take_while(|w| w[0] <= to)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

struct Chaos {
    cluster: Cluster,
    db: Db,
    pgw: Pgwarden,
    relays: Vec<Relay>,
    rng: StdRng,
    writers: Writers,
    /// the node the harness knows to be primary
    primary: usize,
    /// failovers the running pgwarden process has counted
    failovers: u64,
    outcomes: Vec<Outcome>,
    /// the fault being injected, for messages
    number: usize,
    seed_note: String,
}

impl Chaos {
    async fn start(mut rng: StdRng, seed: u64) -> Chaos {
        let seed_note = format!("seed {seed}; replay with PGWARDEN_CHAOS_SEED={seed}");
        let cluster = three_nodes(true);
        let db = Db::create_on(&cluster);
        let mut relays = Vec::new();
        for node in &cluster.nodes {
            relays.push(Relay::start(node.port, free_port().unwrap()).await);
        }
        let options = Options {
            health: HEALTH.into(),
            failover: "client_wait_timeout = \"60s\"\nstate_file = \"state.json\"".into(),
            backends: cluster
                .nodes
                .iter()
                .zip(&relays)
                .map(|(n, r)| (n.name.clone(), r.port))
                .collect(),
            backend_keys: cluster
                .nodes
                .iter()
                .map(|n| format!("replication_port = {}", n.port))
                .collect(),
            ..Default::default()
        };
        let pgw = Pgwarden::start_with(&[&db], options);
        cluster.nodes[0]
            .sql_in(&db.name, "CREATE EXTENSION pg_walinspect")
            .unwrap();
        let setup = connect(&pgw.conninfo(&db)).await.unwrap();
        setup
            .batch_execute(
                "CREATE TABLE chaos_ledger (writer int, seq bigint, value bigint, \
                 PRIMARY KEY (writer, seq))",
            )
            .await
            .unwrap();
        let writers = Writers::start(&pgw.conninfo(&db), rng.random());
        let mut chaos = Chaos {
            cluster,
            db,
            pgw,
            relays,
            rng,
            writers,
            primary: 0,
            failovers: 0,
            outcomes: Vec::new(),
            number: 0,
            seed_note,
        };
        chaos.settled(Instant::now()).await;
        chaos
    }

    fn name(&self, node: usize) -> String {
        self.cluster.nodes[node].name.clone()
    }

    fn standbys(&self) -> Vec<usize> {
        (0..self.cluster.nodes.len())
            .filter(|&i| i != self.primary)
            .collect()
    }

    /// What a failed check says: the fault, the seed, the end of pgwarden's log, what
    /// the expected primary reports of its standbys, and the end of every node's log.
    fn context(&self, what: &str) -> String {
        let log = self.pgw.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let replication = self
            .sql(
                self.primary,
                "SELECT application_name, state, sent_lsn, replay_lsn FROM pg_stat_replication",
            )
            .unwrap_or_else(|| "(no answer)".into());
        let nodes: String = (0..self.cluster.nodes.len())
            .map(|i| {
                let node = &self.cluster.nodes[i];
                format!(
                    "--- {} log, last lines ---\n{}\n",
                    node.name,
                    node.log_tail(12)
                )
            })
            .collect();
        format!(
            "chaos fault #{} ({}): {what}\n--- pgwarden log, last lines ---\n{}\n\
             --- pg_stat_replication on {} ---\n{replication}\n{nodes}",
            self.number,
            self.seed_note,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            self.name(self.primary),
        )
    }

    /// Polls `check` every 100 ms until it gives a value; panics after `limit`.
    async fn wait<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut check: impl FnMut(&mut Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = tokio::task::block_in_place(|| check(self)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                self.context(&format!("timed out: {what}"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn status(&self) -> Option<Value> {
        let (head, body) = self.pgw.http_get("/status");
        head.contains("200")
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    fn backend(status: &Value, name: &str) -> Option<Value> {
        status["backends"]
            .as_array()?
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
    }

    /// The node other than `old` that pgwarden routes writes to, if it really is a primary.
    fn routed_primary_besides(&self, old: usize) -> Option<usize> {
        let status = self.status()?;
        let name = status["primary"].as_str()?;
        let index = self.cluster.nodes.iter().position(|n| n.name == name)?;
        (index != old && self.cluster.nodes[index].in_recovery().ok() == Some(false))
            .then_some(index)
    }

    fn sql(&self, node: usize, sql: &str) -> Option<String> {
        self.cluster.nodes[node].sql_in(&self.db.name, sql).ok()
    }

    /// Names of the standbys streaming from `node`.
    fn streaming_from(&self, node: usize) -> Vec<String> {
        self.sql(
            node,
            "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
    }

    async fn inject(&mut self, fault: Fault) -> Outcome {
        let at = Instant::now();
        let old = self.primary;
        let (detail, fenced_writes) = match fault {
            Fault::KillPrimary => {
                self.signal_all(old, libc::SIGKILL);
                let new = self.promoted(old).await;
                self.failovers += 1;
                self.rejoin(old, new).await;
                (self.name(old), 0)
            }
            Fault::KillStandby => {
                let standbys = self.standbys();
                let victim = standbys[self.rng.random_range(0..standbys.len())];
                self.signal_all(victim, libc::SIGKILL);
                let down = Duration::from_millis(self.rng.random_range(500..4000));
                tokio::time::sleep(down).await;
                tokio::task::block_in_place(|| self.cluster.nodes[victim].start())
                    .unwrap_or_else(|e| panic!("{}", self.context(&format!("restart: {e}"))));
                (
                    format!("{} down {} ms", self.name(victim), down.as_millis()),
                    0,
                )
            }
            Fault::StopPrimary => {
                self.signal_all(old, libc::SIGSTOP);
                let new = self.promoted(old).await;
                self.failovers += 1;
                let hung = Duration::from_millis(self.rng.random_range(0..2000));
                tokio::time::sleep(hung).await;
                self.signal_all(old, libc::SIGCONT);
                let fenced_writes = self.writes_while_fenced(old).await;
                self.rejoin(old, new).await;
                (
                    format!(
                        "{} woken {} ms after the failover",
                        self.name(old),
                        hung.as_millis()
                    ),
                    fenced_writes,
                )
            }
            Fault::CutPrimary => {
                let mode = if self.rng.random_bool(0.5) {
                    Mode::Reset
                } else {
                    Mode::Blackhole
                };
                let cut = Duration::from_millis(self.rng.random_range(3000..6000));
                self.relays[old].set(mode);
                tokio::time::sleep(cut).await;
                // The standbys still stream from the primary: no promotion may have happened.
                let primaries: Vec<usize> = (0..self.cluster.nodes.len())
                    .filter(|&i| self.cluster.nodes[i].in_recovery().ok() == Some(false))
                    .collect();
                assert_eq!(
                    primaries,
                    vec![old],
                    "{}",
                    self.context("a proxy cut off from a healthy primary promoted")
                );
                self.relays[old].set(Mode::Pass);
                (
                    format!("{} {:?} for {} ms", self.name(old), mode, cut.as_millis()),
                    0,
                )
            }
            Fault::RestartDuringFailover => {
                let log_from = std::fs::metadata(self.pgw.log_path()).map_or(0, |m| m.len());
                self.signal_all(old, libc::SIGKILL);
                let when = if self.rng.random_bool(0.5) {
                    let step = ["detected", "promoted"][self.rng.random_range(0..2)];
                    let marker = format!("step=\"{step}\"");
                    let path = self.pgw.log_path().to_owned();
                    self.wait(SETTLE, "the failover step to restart at", |_| {
                        log_since(&path, log_from).contains(&marker).then_some(())
                    })
                    .await;
                    format!("at step {step}")
                } else {
                    let delay = Duration::from_millis(self.rng.random_range(0..2000));
                    tokio::time::sleep(delay).await;
                    format!("{} ms after the crash", delay.as_millis())
                };
                tokio::task::block_in_place(|| self.pgw.restart());
                let new = self.promoted(old).await;
                self.rejoin(old, new).await;
                // The restarted pgwarden counts the failover only if it did (or finished)
                // the promotion; read once the rejoin gave it seconds to get there.
                self.failovers = self.metric("pgwarden_failovers_total").unwrap_or(0.0) as u64;
                assert!(
                    self.failovers <= 1,
                    "{}",
                    self.context("more than one failover counted")
                );
                (format!("{}, pgwarden restarted {when}", self.name(old)), 0)
            }
        };
        self.settled(at).await;
        Outcome {
            fault,
            detail,
            primary: self.name(self.primary),
            window: self.writers.window(at, Instant::now()),
            took: at.elapsed(),
            fenced_writes,
        }
    }

    fn signal_all(&self, node: usize, signal: i32) {
        self.cluster.nodes[node]
            .signal_all(signal)
            .unwrap_or_else(|e| panic!("{}", self.context(&format!("signal: {e}"))));
    }

    /// Waits until pgwarden routes writes to a node other than `old` that really is
    /// a primary, and takes it as the primary.
    async fn promoted(&mut self, old: usize) -> usize {
        let new = self
            .wait(SETTLE, "a standby promoted and routed", |c| {
                c.routed_primary_besides(old)
            })
            .await;
        self.primary = new;
        new
    }

    /// The operator's part after a failover: pg_rewind the old primary into a standby
    /// of the new one; pgwarden must unfence it once it streams.
    async fn rejoin(&mut self, old: usize, new: usize) {
        tokio::task::block_in_place(|| self.cluster.rejoin(old, new))
            .unwrap_or_else(|e| panic!("{}", self.context(&format!("pg_rewind rejoin: {e}"))));
    }

    /// Heap records on the ledger written on `node` (a woken old primary) between a
    /// second after it woke (what it was doing when it froze may finish) and three
    /// seconds later, while the writers go on: there must be none, and pgwarden must
    /// report it fenced.
    async fn writes_while_fenced(&mut self, node: usize) -> u64 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lsn = |c: &mut Self| c.sql(node, "SELECT pg_current_wal_flush_lsn()");
        let from = self
            .wait(SETTLE, "the woken node's WAL position", lsn)
            .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let to = self
            .wait(SETTLE, "the woken node's WAL position", lsn)
            .await;
        let name = self.name(node);
        let status = self.status().unwrap_or_default();
        let fenced = Self::backend(&status, &name).is_some_and(|b| b["fenced"] == true);
        assert!(
            fenced,
            "{}",
            self.context(&format!("{name} woke up unfenced: {status}"))
        );
        if from == to {
            return 0;
        }
        let count = self
            .sql(
                node,
                &format!(
                    "SELECT count(*) FROM pg_get_wal_records_info('{from}', '{to}') \
                     WHERE resource_manager = 'Heap' \
                     AND block_ref LIKE '%/' || pg_relation_filenode('chaos_ledger') || ' %'"
                ),
            )
            .unwrap_or_else(|| panic!("{}", self.context("pg_walinspect on the fenced node")));
        let count: u64 = count.trim().parse().unwrap();
        assert_eq!(
            count,
            0,
            "{}",
            self.context(&format!("{count} ledger writes on fenced {name}"))
        );
        count
    }

    /// After every fault: one primary routed (the real one), every node back and
    /// unfenced, writes acknowledged again, none lost, and metrics that agree.
    async fn settled(&mut self, since: Instant) {
        let primary = self.primary;
        let nodes = self.cluster.nodes.len();
        let names: Vec<String> = (0..nodes).map(|i| self.name(i)).collect();
        self.wait(
            SETTLE,
            "every node up, unfenced, in its role, and streaming",
            |c| {
                let status = c.status()?;
                let primary_ok =
                    status["primary"] == names[primary].as_str() && status["split_brain"] == false;
                let all_ok = names.iter().enumerate().all(|(i, name)| {
                    Chaos::backend(&status, name).is_some_and(|b| {
                        b["fenced"] == false
                            && b["state"] == "up"
                            && b["role"] == if i == primary { "primary" } else { "standby" }
                    })
                });
                let streaming = c.streaming_from(primary);
                (primary_ok && all_ok && streaming.len() == nodes - 1).then_some(())
            },
        )
        .await;
        let reality: Vec<usize> = (0..nodes)
            .filter(|&i| self.cluster.nodes[i].in_recovery().ok() == Some(false))
            .collect();
        assert_eq!(
            reality,
            vec![primary],
            "{}",
            self.context("primaries in the cluster")
        );
        let resumed = Instant::now();
        self.wait(SETTLE, "writes acknowledged again", |c| {
            c.writers.last_ack().filter(|&t| t > resumed && t > since)
        })
        .await;
        assert!(self.pgw.alive(), "{}", self.context("pgwarden died"));
        for (metric, want) in [
            ("pgwarden_primary_available".to_owned(), 1.0),
            ("pgwarden_split_brain".to_owned(), 0.0),
            ("pgwarden_failovers_total".to_owned(), self.failovers as f64),
            (
                format!(
                    "pgwarden_backend_role{{backend=\"{}\",role=\"primary\"}}",
                    names[primary]
                ),
                1.0,
            ),
        ]
        .into_iter()
        .chain(
            names
                .iter()
                .map(|n| (format!("pgwarden_backend_fenced{{backend=\"{n}\"}}"), 0.0)),
        ) {
            let got = self.metric(&metric);
            assert_eq!(
                got,
                Some(want),
                "{}",
                self.context(&format!("metric {metric}"))
            );
        }
        let lost = self.lost_commits();
        assert_eq!(
            lost,
            0,
            "{}",
            self.context(&format!("{lost} acknowledged commits lost"))
        );
    }

    /// A sample of pgwarden's /metrics, by its name with labels.
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.pgw.http_get("/metrics");
        body.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Acknowledged commits missing from the primary.
    fn lost_commits(&self) -> usize {
        let acked: Vec<Ack> = self.writers.acked.lock().unwrap().clone();
        let stored = self
            .sql(self.primary, "SELECT writer, seq, value FROM chaos_ledger")
            .unwrap_or_else(|| panic!("{}", self.context("reading the ledger")));
        let stored: HashSet<(i32, i64, i64)> = stored
            .lines()
            .filter_map(|l| {
                let mut f = l.split('|').map(str::parse::<i64>);
                Some((f.next()?.ok()? as i32, f.next()?.ok()?, f.next()?.ok()?))
            })
            .collect();
        acked
            .iter()
            .filter(|a| !stored.contains(&(a.writer, a.seq, a.value)))
            .count()
    }
}

/// The log written since byte `from`.
fn log_since(path: &std::path::Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path)
        && file.seek(SeekFrom::Start(from)).is_ok()
    {
        let _ = file.read_to_string(&mut text);
    }
    text
}
