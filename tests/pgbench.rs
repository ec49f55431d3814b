//! pgbench, a real libpq client, through pgwarden: read-only and TPC-B-like
//! workloads in the simple, extended and prepared protocols, with zero failed
//! transactions.

mod common;

use common::{Db, Options, Pgwarden};

fn pgbench(pgw: &Pgwarden, db: &Db, args: &[&str]) -> String {
    let out = common::with_cluster(|c| {
        c.client_program("pgbench")
            .args(args)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pgw.port.to_string(),
                "-U",
                &db.user,
                &db.name,
            ])
            .env("PGPASSWORD", &db.password)
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench {args:?} failed:\n{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pgw.log()
    );
    stdout
}

#[test]
fn pgbench_runs_with_zero_failures_in_every_protocol() {
    let db = Db::create();
    let pgw = Pgwarden::start_with(
        &[&db],
        Options {
            pool: "default_pool_size = 10".into(),
            ..Default::default()
        },
    );
    pgbench(&pgw, &db, &["-i", "-s", "2", "-q"]);
    for (mode, script) in [
        ("simple", "-S"),
        ("extended", "-S"),
        ("simple", "-N"),
        ("extended", "-b"),
        ("prepared", "-S"),
        ("prepared", "-b"),
    ] {
        let script_args: &[&str] = if script == "-b" {
            &["-b", "tpcb-like"]
        } else {
            &[script]
        };
        let mut args = vec!["-n", "-c", "20", "-j", "2", "-T", "3", "-M", mode];
        args.extend_from_slice(script_args);
        let out = pgbench(&pgw, &db, &args);
        assert!(
            out.contains("number of failed transactions: 0 "),
            "{mode} {script}: {out}"
        );
        let processed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next()?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            processed > 100,
            "{mode} {script}: only {processed} transactions\n{out}"
        );
    }
    // The ledger adds up: every committed TPC-B transaction left one history row.
    let history: u64 = db
        .admin_sql("SELECT count(*) FROM pgbench_history")
        .parse()
        .unwrap();
    assert!(history > 0);
    let balanced = db.admin_sql(
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history)",
    );
    assert_eq!(balanced, "t");
}
