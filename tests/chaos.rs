//! A short chaos run in CI: one fault of each kind (kill -9 of the primary and of
//! a standby, a hung primary, a cut between pgwarden and the primary, a restart of
//! pgwarden in the middle of a failover), in an order and with timings drawn from
//! a seed, each followed by the operator's repair and every check of
//! `common/chaos.rs`. The long run is `cargo bench --bench chaos`.

#[path = "common/chaos.rs"]
mod chaos;
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_fault_loses_no_acknowledged_commit_and_writes_nothing_on_fenced_nodes() {
    let report = chaos::run(chaos::Plan::from_env(5)).await;
    eprintln!("{report}");
    assert_eq!(report.lost, 0);
    assert!(report.outcomes.iter().all(|o| o.fenced_writes == 0));
}
