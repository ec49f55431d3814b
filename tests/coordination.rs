//! Several proxies, one decision: three pgwarden processes in front of one
//! three-node cluster (synchronous replication), coordinated through a real etcd.
//! A primary crash is handled by exactly one promotion, every proxy follows the
//! leader's decision, a leader killed midway is replaced by one that finishes the
//! failover (or the switchover it left before promoting), and without etcd nobody
//! promotes until it is back. A follower that sees the primary fail makes the
//! leader probe at once (and stays in the election if etcd refuses that alarm).
//! Against an etcd that requires a password or a client certificate, only a
//! proxy configured with the right one leads; the others report why and keep
//! serving queries.

#![cfg(feature = "etcd")]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{Db, Options, Pgwarden, eventually, three_nodes, writer};
use pgwarden::cluster::Cluster;
use tokio_postgres::SimpleQueryMessage;

/// Nine PostgreSQL servers and nine proxies at once overload a two-core machine
/// (probes time out and nodes flap), so these tests run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// etcd, a three-node cluster, and three coordinated proxies.
struct Env {
    etcd: Etcd,
    cluster: Cluster,
    db: Db,
    proxies: Vec<Pgwarden>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// An admin console user of every proxy.
const ADMIN: (&str, &str) = ("ops", "ops-secret");

/// Every proxy's `[health]` unless a test says otherwise: a crash is confirmed in
/// well under a second.
const HEALTH: &str = "interval = \"200ms\"\ntimeout = \"500ms\"";

fn options(etcd: &Etcd, env: &[(&str, &str)], health: &str) -> Options {
    Options {
        pgwarden: format!("admin_users = [\"{}\"]", ADMIN.0),
        extra_users: format!("\"{}\" \"{}\"\n", ADMIN.0, ADMIN.1),
        health: health.into(),
        failover: "client_wait_timeout = \"20s\"".into(),
        sections: format!(
            "[coordination]\netcd = [\"{}\"]\nprefix = \"/pgwarden/test\"\nlease_ttl = \"3s\"\n",
            etcd.endpoint()
        ),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

impl Env {
    /// Starts everything; `first_env` goes to the first proxy only, which is
    /// started alone and made the leader before the others start.
    async fn start(first_env: &[(&str, &str)]) -> Env {
        Env::start_with(first_env, HEALTH).await
    }

    /// As [`Env::start`], with `first_health` as the first proxy's `[health]`.
    async fn start_with(first_env: &[(&str, &str)], first_health: &str) -> Env {
        let serial = SERIAL.lock().await;
        let etcd = Etcd::start();
        let cluster = three_nodes(true);
        let db = Db::create_on(&cluster);
        let backends: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.port))
            .collect();
        let start = |env: &[(&str, &str)], health: &str| {
            Pgwarden::start_with(
                &[&db],
                Options {
                    backends: backends.clone(),
                    ..options(&etcd, env, health)
                },
            )
        };
        let first = start(first_env, first_health);
        eventually(Duration::from_secs(15), "the first proxy leads", || {
            coordination(&first)["role"] == "leader"
        })
        .await;
        let proxies = vec![first, start(&[], HEALTH), start(&[], HEALTH)];
        let env = Env {
            etcd,
            cluster,
            db,
            proxies,
            _serial: serial,
        };
        for p in &env.proxies {
            eventually(Duration::from_secs(15), "every proxy routes to pg1", || {
                ready(p)["primary"] == "pg1"
            })
            .await;
        }
        env
    }

    fn primaries(&self) -> Vec<usize> {
        (0..self.cluster.nodes.len())
            .filter(|&i| self.cluster.nodes[i].postmaster_pid().is_some())
            .filter(|&i| self.cluster.nodes[i].in_recovery().ok() == Some(false))
            .collect()
    }

    /// Promotions PostgreSQL logged, over every node.
    fn promotions(&self) -> usize {
        self.cluster
            .nodes
            .iter()
            .map(|n| {
                n.log_tail(100_000)
                    .matches("received promote request")
                    .count()
            })
            .sum()
    }

    /// Waits for a standby to become the only primary.
    async fn new_primary(&self, within: Duration) -> usize {
        let started = Instant::now();
        loop {
            let primaries = self.primaries();
            if primaries.len() == 1 && primaries[0] != 0 {
                return primaries[0];
            }
            assert!(started.elapsed() < within, "no promotion:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// From the leader routing to its promoted node to the last follower doing
    /// the same, read from the logs' timestamps.
    fn follow_lag(&self) -> Duration {
        let at = |log: &str, what: &str| {
            let line = log.lines().rfind(|l| l.contains(what))?;
            humantime::parse_rfc3339(line.split_whitespace().next()?).ok()
        };
        let logs: Vec<String> = self.proxies.iter().map(|p| p.log()).collect();
        let decided = logs
            .iter()
            .find_map(|l| at(l, "step=\"published\""))
            .expect("the leader published a new primary");
        logs.iter()
            .filter_map(|l| at(l, "published by the coordination leader"))
            .filter_map(|t| t.duration_since(decided).ok())
            .max()
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        self.proxies
            .iter()
            .enumerate()
            .map(|(i, p)| format!("--- proxy {i} ---\n{}", p.log()))
            .collect()
    }

    /// Waits until every proxy (but `skip`) routes writes to `node`; returns how long it took.
    async fn all_route_to(&self, node: usize, skip: Option<usize>) -> Duration {
        let started = Instant::now();
        let name = self.cluster.nodes[node].name.clone();
        for (i, p) in self.proxies.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            eventually(
                Duration::from_secs(20),
                "every proxy routes to the new primary",
                || ready(p)["primary"] == name.as_str(),
            )
            .await;
            let client = p.connect(&self.db).await;
            let port: i32 = client
                .query_one("SELECT inet_server_port()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(port, i32::from(self.cluster.nodes[node].port), "proxy {i}");
        }
        started.elapsed()
    }

    /// Starts a SWITCHOVER on the leader's console; it may never answer.
    async fn switchover(
        &self,
    ) -> tokio::task::JoinHandle<Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>> {
        let console = common::connect(&format!(
            "host=127.0.0.1 port={} user={} password={} dbname=pgwarden",
            self.proxies[0].port, ADMIN.0, ADMIN.1
        ))
        .await
        .unwrap();
        tokio::spawn(async move { console.simple_query("SWITCHOVER").await })
    }

    /// Waits until the leader (proxy 0) holds at its fault-drill pause `before`.
    async fn leader_pauses_before(&self, before: &str, within: Duration) {
        let leader = &self.proxies[0];
        let line = format!("pausing before {before}");
        eventually(within, &line, || leader.log().contains(&line)).await;
    }

    /// Kills the leader (proxy 0) with SIGKILL and waits until it is gone.
    fn kill_leader(&mut self) {
        self.proxies[0].signal(libc::SIGKILL);
        let _ = self.proxies[0].wait_exit(Duration::from_secs(5));
    }

    /// The other standby streams from the new primary.
    async fn standby_follows(&self, new: usize) {
        let other = self.cluster.nodes[3 - new].name.clone();
        eventually(
            Duration::from_secs(20),
            "the other standby streams from the new primary",
            || {
                self.cluster.nodes[new]
                    .sql("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == other)
            },
        )
        .await;
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body.trim()).unwrap_or(serde_json::Value::Null)
}

fn ready(p: &Pgwarden) -> serde_json::Value {
    json(&p.http_get("/health/ready").1)
}

fn coordination(p: &Pgwarden) -> serde_json::Value {
    ready(p)["coordination"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_proxies_promote_once_and_all_follow_the_new_primary() {
    let env = Env::start(&[]).await;
    let leaders = env
        .proxies
        .iter()
        .filter(|p| coordination(p)["role"] == "leader")
        .count();
    assert_eq!(leaders, 1);
    let admin = env.proxies[1].connect(&env.db).await;
    admin
        .batch_execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(env.proxies[2].conninfo(&env.db), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    let new = env.new_primary(Duration::from_secs(20)).await;
    env.all_route_to(new, None).await;
    eprintln!(
        "followers routed to the new primary {:?} after the leader did",
        env.follow_lag()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failures) = writes.await.unwrap();
    assert!(
        failures.len() <= 1 && failures.iter().all(|c| c == "08006"),
        "{failures:?}"
    );
    let lost = common::lost_commits(
        &acked,
        &env.cluster.nodes[new]
            .sql_in(&env.db.name, "SELECT id FROM ledger")
            .unwrap(),
    );
    assert!(lost.is_empty(), "lost acknowledged commits {lost:?}");
    env.standby_follows(new).await;

    assert_eq!(env.promotions(), 1, "{}", env.logs());
    let timeline = env.cluster.nodes[new]
        .sql("SELECT timeline_id FROM pg_control_checkpoint()")
        .unwrap();
    assert_eq!(timeline.trim(), "2");
    let published = coordination(&env.proxies[0]);
    assert_eq!(
        published["published_primary"],
        env.cluster.nodes[new].name.as_str()
    );
    assert_eq!(published["failover_step"], "done");
}

/// The count of `pgwarden_coordination_alarms_total` in `direction` on proxy `p`.
fn alarms(p: &Pgwarden, direction: &str) -> u64 {
    let series = format!("pgwarden_coordination_alarms_total{{direction=\"{direction}\"}} ");
    let (_, body) = p.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The leader probes every 30 s here and its followers every 200 ms, so the
/// followers see the crash first. Alone, the leader would notice at its next
/// probe and confirm over two more, 7.5 s apart; acting on what the followers
/// relay through etcd, it promotes within a second or two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_probes_at_once_when_a_follower_sees_the_primary_fail() {
    let env = Env::start_with(&[], "interval = \"30s\"\ntimeout = \"500ms\"").await;
    let crashed = Instant::now();
    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    let new = env.new_primary(Duration::from_secs(10)).await;
    eprintln!("promoted {:?} after the crash", crashed.elapsed());
    env.all_route_to(new, None).await;
    assert!(alarms(&env.proxies[0], "received") >= 1);
    assert_eq!(alarms(&env.proxies[0], "sent"), 0);
    assert!(alarms(&env.proxies[1], "sent") + alarms(&env.proxies[2], "sent") >= 1);
    assert_eq!(env.promotions(), 1, "{}", env.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_failover_a_killed_leader_left_midway() {
    let mut env = Env::start(&[("PGWARDEN_PAUSE_BEFORE_REPOINT", "60s")]).await;
    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    let new = env.new_primary(Duration::from_secs(20)).await;
    env.leader_pauses_before("re-pointing", Duration::from_secs(10))
        .await;
    env.kill_leader();

    // Another proxy takes the lease and re-points the other standby.
    env.standby_follows(new).await;
    env.all_route_to(new, Some(0)).await;
    assert_eq!(env.promotions(), 1, "{}", env.logs());
    let leaders: Vec<_> = env.proxies[1..]
        .iter()
        .map(|p| coordination(p)["role"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(leaders.iter().any(|r| r == "leader"), "{leaders:?}");
    let logs = env.logs();
    assert!(logs.contains("finishing an interrupted failover"), "{logs}");
    env.proxies.remove(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_switchover_a_killed_leader_left_before_promoting() {
    let mut env = Env::start(&[("PGWARDEN_PAUSE_BEFORE_PROMOTE", "60s")]).await;
    // It will not answer: its proxy dies while the switchover waits to promote.
    let switchover = env.switchover().await;
    env.leader_pauses_before("promoting", Duration::from_secs(20))
        .await;
    env.kill_leader();
    let _ = switchover.await;

    // Another proxy takes the lease and promotes the standby the intent names (the
    // old primary, read-only since the switchover began, stays up).
    let mut promoted = None;
    eventually(Duration::from_secs(30), "a standby is promoted", || {
        promoted = (1..3).find(|&i| env.cluster.nodes[i].in_recovery().ok() == Some(false));
        promoted.is_some()
    })
    .await;
    let new = promoted.unwrap();
    env.standby_follows(new).await;
    env.all_route_to(new, Some(0)).await;
    assert_eq!(env.promotions(), 1, "{}", env.logs());
    let logs = env.logs();
    assert!(logs.contains("finishing an interrupted failover"), "{logs}");
    env.proxies.remove(0);
}

/// A switchover whose leader dies after making the old primary read-only, before
/// any promotion, is undone by the next leader: the old primary takes writes
/// again and stays the primary, where it used to stay read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_undoes_a_switchover_a_killed_leader_left_before_promoting() {
    let mut env = Env::start(&[("PGWARDEN_PAUSE_BEFORE_CATCHUP", "60s")]).await;
    let switchover = env.switchover().await;
    env.leader_pauses_before("catching up", Duration::from_secs(20))
        .await;
    let read_only = |env: &Env| {
        env.cluster.nodes[0]
            .sql("SHOW default_transaction_read_only")
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert_eq!(read_only(&env), "on", "the switchover began");
    env.kill_leader();
    let _ = switchover.await;

    eventually(
        Duration::from_secs(30),
        "the old primary takes writes again",
        || read_only(&env) == "off",
    )
    .await;
    env.all_route_to(0, Some(0)).await;
    let client = env.proxies[1].connect(&env.db).await;
    client
        .batch_execute("CREATE TABLE after_undone_switchover(x int); INSERT INTO after_undone_switchover VALUES (1)")
        .await
        .unwrap_or_else(|e| panic!("a write through a proxy: {e:?}\n{}", env.logs()));
    assert_eq!(env.primaries(), [0]);
    assert_eq!(env.promotions(), 0, "{}", env.logs());
    assert!(env.logs().contains("takes writes again"), "{}", env.logs());
    env.proxies.remove(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_nobody_promotes_until_it_is_back() {
    let mut env = Env::start(&[]).await;
    env.etcd.stop();
    for p in &env.proxies {
        eventually(
            Duration::from_secs(10),
            "every proxy sees etcd gone",
            || coordination(p)["etcd_reachable"] == false,
        )
        .await;
    }
    env.cluster.nodes[0].signal(libc::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        env.primaries().is_empty(),
        "a standby was promoted without etcd"
    );
    for p in &env.proxies {
        let c = coordination(p);
        assert_eq!(c["role"], "disconnected", "{c}");
        let metrics = p.http_get("/metrics").1;
        assert!(metrics.contains("pgwarden_coordination_up 0"), "{metrics}");
    }
    assert!(
        env.logs().contains("waiting for the leader's decision"),
        "{}",
        env.logs()
    );

    env.etcd.resume();
    let new = env.new_primary(Duration::from_secs(30)).await;
    env.all_route_to(new, None).await;
    assert_eq!(env.promotions(), 1, "{}", env.logs());
}

/// One proxy in front of the test binary's shared PostgreSQL, coordinated
/// through `etcd` with `keys` added to its `[coordination]`.
fn lone_proxy(db: &Db, etcd: &Etcd, keys: &str) -> Pgwarden {
    let mut options = options(etcd, &[], HEALTH);
    options.sections += keys;
    Pgwarden::start_with(&[db], options)
}

/// Waits until `p` reports an etcd error that says `why` (in any case), then
/// checks that it logged it, shows it in SHOW COORDINATION, never led, and still
/// serves queries.
async fn refused(p: &Pgwarden, db: &Db, why: &str) {
    let says = |e: &str| e.to_lowercase().contains(why);
    eventually(Duration::from_secs(10), why, || {
        coordination(p)["error"].as_str().is_some_and(says)
    })
    .await;
    let c = coordination(p);
    assert_eq!(c["role"], "disconnected", "{c}");
    let log = p.log();
    assert!(
        log.lines()
            .any(|l| l.contains("coordination: cannot use etcd") && says(l)),
        "{log}"
    );
    assert!(!log.contains("took the leader key"), "{log}");
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user={} password={} dbname=pgwarden",
        p.port, ADMIN.0, ADMIN.1
    ))
    .await
    .unwrap();
    let shown = console.simple_query("SHOW COORDINATION").await.unwrap();
    let error = shown.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get("error").map(str::to_owned),
        _ => None,
    });
    assert!(error.as_deref().is_some_and(says), "{error:?}");
    let client = p.connect(db).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// An admin client of `etcd` with a `root` user (password `root_password`) holding
/// the root role, which etcd needs before authentication can be enabled.
async fn etcd_admin(etcd: &Etcd, root_password: &str) -> etcd_client::Client {
    let mut client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    client.user_add("root", root_password, None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client
}

/// `[coordination]` keys for etcd `user`, with `password` written to `file` in etcd's folder.
fn password_keys(etcd: &Etcd, user: &str, file: &str, password: &str) -> String {
    let path = etcd.dir.join(file);
    std::fs::write(&path, format!("{password}\n")).unwrap();
    format!(
        "user = \"{user}\"\npassword_file = \"{}\"\n",
        path.display()
    )
}

async fn leads(p: &Pgwarden) {
    eventually(Duration::from_secs(10), "the proxy leads", || {
        coordination(p)["role"] == "leader"
    })
    .await;
    assert_eq!(coordination(p)["error"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_authentication_only_the_right_password_leads() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let mut client = etcd_admin(&etcd, "correct horse").await;
    client.auth_enable().await.unwrap();
    let db = Db::create();

    // Alone, so it would lead if etcd let it in.
    let wrong = lone_proxy(
        &db,
        &etcd,
        &password_keys(&etcd, "root", "wrong", "battery staple"),
    );
    refused(&wrong, &db, "authentication failed").await;
    let right = lone_proxy(
        &db,
        &etcd,
        &password_keys(&etcd, "root", "right", "correct horse"),
    );
    leads(&right).await;
    assert_eq!(coordination(&wrong)["role"], "disconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_client_certificates_only_a_certified_proxy_leads() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start_tls();
    let db = Db::create();
    let pki = etcd.tls();
    let ca = format!("ca_file = \"{}\"\n", pki.ca.display());

    // Trusting a certificate that did not sign etcd's: pgwarden refuses etcd.
    let misled = lone_proxy(
        &db,
        &etcd,
        &format!("ca_file = \"{}\"\n", pki.client_cert.display()),
    );
    refused(&misled, &db, "invalid peer certificate: unknownissuer").await;
    // Without a client certificate: etcd refuses pgwarden.
    let anonymous = lone_proxy(&db, &etcd, &ca);
    refused(&anonymous, &db, "certificate").await;
    let certified = lone_proxy(
        &db,
        &etcd,
        &format!(
            "{ca}cert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.client_cert.display(),
            pki.client_key.display()
        ),
    );
    leads(&certified).await;
    for p in [&misled, &anonymous] {
        assert_eq!(coordination(p)["role"], "disconnected");
    }
}

/// A role that may elect and publish but not write the alarm keys: a follower's
/// alarm is refused, logged, and the follower stays in the election (the leader
/// still probes on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refused_the_alarm_keys_stays_in_the_election() {
    use etcd_client::Permission;
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let mut client = etcd_admin(&etcd, "root-secret").await;
    client.role_add("pgwarden").await.unwrap();
    let prefix = "/pgwarden/test/";
    for permission in [
        Permission::read(prefix).with_prefix(),
        Permission::write(format!("{prefix}leader")),
        Permission::write(format!("{prefix}state")),
    ] {
        client
            .role_grant_permission("pgwarden", permission)
            .await
            .unwrap();
    }
    client.user_add("pgw", "pgw-secret", None).await.unwrap();
    client.user_grant_role("pgw", "pgwarden").await.unwrap();
    client.auth_enable().await.unwrap();
    let db = Db::create();
    let keys = password_keys(&etcd, "pgw", "password", "pgw-secret");
    let leader = lone_proxy(&db, &etcd, &keys);
    leads(&leader).await;
    let follower = lone_proxy(&db, &etcd, &keys);
    eventually(Duration::from_secs(10), "the second proxy follows", || {
        coordination(&follower)["role"] == "follower"
    })
    .await;

    // A server connection lost mid-transaction raises the follower's alarm.
    let app = follower.connect(&db).await;
    app.batch_execute("BEGIN").await.unwrap();
    let pid = common::backend_pid(&app).await;
    db.admin_sql(&format!("SELECT pg_terminate_backend({pid})"));
    assert!(app.simple_query("SELECT 1").await.is_err());
    let refused = "could not pass an alarm on to the leader";
    eventually(Duration::from_secs(10), refused, || {
        follower.log().contains(refused)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = coordination(&follower);
    assert_eq!(c["role"], "follower", "{c}\n{}", follower.log());
    assert!(
        !follower.log().contains("etcd session lost"),
        "{}",
        follower.log()
    );
    assert_eq!(alarms(&follower, "sent"), 0);
}

/// CPU seconds the process has used (utime + stime, all threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a system constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_waiting_for_its_clients_to_leave_stays_in_the_election() {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start();
    let db = Db::create();
    let mut p = lone_proxy(&db, &etcd, "");
    leads(&p).await;
    let client = p.connect(&db).await;
    let console = common::connect(&format!(
        "host=127.0.0.1 port={} user={} password={} dbname=pgwarden",
        p.port, ADMIN.0, ADMIN.1
    ))
    .await
    .unwrap();
    console
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .unwrap();
    // Only waiting: it serves its client, leads on (the election, not the port,
    // decides who promotes), and idles rather than spins.
    let before = cpu_seconds(p.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(p.pid()) - before;
    assert!(used < 0.5, "{used} s of CPU in 2 s while waiting");
    client.simple_query("SELECT 1").await.unwrap();
    // Its HTTP endpoint closed with its listener: the console still answers.
    let shown = console.simple_query("SHOW COORDINATION").await.unwrap();
    let role = shown.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get("role").map(str::to_owned),
        _ => None,
    });
    assert_eq!(role.as_deref(), Some("leader"), "{}", p.log());
    assert!(!p.log().contains("failover mode changed"), "{}", p.log());
    drop(client);
    drop(console);
    p.exits_cleanly(Duration::from_secs(10));
}
