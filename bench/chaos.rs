//! The long chaos run: `PGWARDEN_CHAOS_FAULTS` (default 100) faults drawn from
//! `PGWARDEN_CHAOS_SEED` (default random, printed), on a cluster of its own, with
//! the checks of tests/common/chaos.rs after each; prints the report as markdown.
//! Run with `cargo bench --bench chaos`.

#[path = "../tests/common/chaos.rs"]
mod chaos;
#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime.block_on(chaos::run(chaos::Plan::from_env(100)));
    println!("{report}");
}
