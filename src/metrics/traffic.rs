//! Each database's traffic figures: transactions, queries, bytes and times, with
//! the histograms of transaction and wait durations. A session adds what one
//! transaction did under one lock as it ends; the Prometheus exposition and SHOW
//! STATS read copies.
//!
//! Why not a Prometheus counter per figure: every update of one is a locked
//! instruction (a histogram observation four), about 5 ns apiece on the machines
//! measured, and a transaction made sixteen of them. One uncontended mutex costs
//! two, and the figures share a cache line instead of moving a dozen between
//! threads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};

use super::SECONDS;

/// Durations counted into the buckets of [`SECONDS`], as a Prometheus histogram does.
#[derive(Debug, Clone, Default)]
pub struct Durations {
    /// per bucket, not cumulative; the last counts those past the largest bound
    counts: [u64; SECONDS.len() + 1],
    /// the durations' sum in seconds
    pub sum: f64,
    /// how many there were
    pub count: u64,
}

impl Durations {
    /// Counts one duration of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        // A bucket holds the durations up to and including its bound.
        let bucket = SECONDS.partition_point(|&bound| bound < seconds);
        self.counts[bucket] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    fn proto(&self) -> proto::Histogram {
        let mut cumulative = 0;
        let buckets = SECONDS
            .iter()
            .zip(self.counts)
            .map(|(&bound, n)| {
                cumulative += n;
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(bound);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        let mut h = proto::Histogram::default();
        h.set_bucket(buckets);
        h.set_sample_sum(self.sum);
        h.set_sample_count(self.count);
        h
    }
}

/// What the sessions of one database did, since pgwarden started.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    /// transactions finished (a ReadyForQuery with the server idle)
    pub transactions: u64,
    /// server connections given to clients
    pub server_assignments: u64,
    /// Query and Execute messages
    pub queries: u64,
    /// named statements clients prepared
    pub client_parses: u64,
    /// statements pgwarden prepared on servers for them
    pub server_parses: u64,
    /// Binds of clients' named statements
    pub binds: u64,
    /// time servers spent answering, within transactions
    pub query_seconds: f64,
    /// bytes from clients
    pub received_bytes: u64,
    /// bytes to clients
    pub sent_bytes: u64,
    /// `query_wait_timeout` expirations
    pub wait_timeouts: u64,
    /// time a server connection served one transaction
    pub transaction_seconds: Durations,
    /// time a client waited for a server connection
    pub wait_seconds: Durations,
}

/// One database's totals, shared by its sessions.
#[derive(Debug, Default)]
pub struct DatabaseTraffic(Mutex<Totals>);

impl DatabaseTraffic {
    /// Adds to the totals, under the lock; `add` should only add.
    pub fn add(&self, add: impl FnOnce(&mut Totals)) {
        add(&mut self.lock());
    }

    /// A copy of the totals.
    pub fn totals(&self) -> Totals {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Totals> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every database's traffic, and its Prometheus families.
#[derive(Clone)]
pub struct Traffic {
    databases: Arc<Mutex<BTreeMap<String, Arc<DatabaseTraffic>>>>,
    families: Arc<[Family; 10]>,
}

/// A figure of one database's totals.
type Figure = fn(&Totals) -> Sample;

/// One Prometheus family of the totals.
struct Family {
    desc: Desc,
    kind: MetricType,
    /// its samples of one database's totals: one, or one per value of the `kind`
    /// label (the prepared statements)
    samples: Vec<(Option<&'static str>, Figure)>,
}

enum Sample {
    Count(f64),
    Histogram(proto::Histogram),
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic::new()
    }
}

impl Traffic {
    /// No database yet, and the descriptions of the families.
    pub fn new() -> Traffic {
        let counter = |name: &str, help: &str, sample: Figure| Family {
            desc: desc(name, help, &["database"]),
            kind: MetricType::COUNTER,
            samples: vec![(None, sample)],
        };
        let histogram = |name: &str, help: &str, sample: Figure| Family {
            desc: desc(name, help, &["database"]),
            kind: MetricType::HISTOGRAM,
            samples: vec![(None, sample)],
        };
        let prepared: Vec<(Option<&'static str>, Figure)> = vec![
            (Some("client_parse"), |t| {
                Sample::Count(t.client_parses as f64)
            }),
            (Some("server_parse"), |t| {
                Sample::Count(t.server_parses as f64)
            }),
            (Some("bind"), |t| Sample::Count(t.binds as f64)),
        ];
        Traffic {
            databases: Arc::default(),
            families: Arc::new([
                counter(
                    "transactions_total",
                    "Transactions finished (a ReadyForQuery with the server idle)",
                    |t| Sample::Count(t.transactions as f64),
                ),
                counter(
                    "server_assignments_total",
                    "Times a client was given a server connection",
                    |t| Sample::Count(t.server_assignments as f64),
                ),
                counter(
                    "queries_total",
                    "Query and Execute messages forwarded",
                    |t| Sample::Count(t.queries as f64),
                ),
                Family {
                    desc: desc(
                        "prepared_statements_total",
                        "Named statements: prepared by clients (client_parse), prepared by pgwarden on servers (server_parse), bound (bind)",
                        &["database", "kind"],
                    ),
                    kind: MetricType::COUNTER,
                    samples: prepared,
                },
                histogram(
                    "transaction_duration_seconds",
                    "Time a server connection served one transaction",
                    |t| Sample::Histogram(t.transaction_seconds.proto()),
                ),
                counter(
                    "query_seconds_total",
                    "Time servers spent answering requests: from a request sent while nothing was owed to the last answer owed",
                    |t| Sample::Count(t.query_seconds),
                ),
                histogram(
                    "client_wait_seconds",
                    "Time a client waited for a server connection",
                    |t| Sample::Histogram(t.wait_seconds.proto()),
                ),
                counter(
                    "client_received_bytes_total",
                    "Bytes received from clients",
                    |t| Sample::Count(t.received_bytes as f64),
                ),
                counter("client_sent_bytes_total", "Bytes sent to clients", |t| {
                    Sample::Count(t.sent_bytes as f64)
                }),
                counter(
                    "pool_wait_timeouts_total",
                    "Requests refused after query_wait_timeout",
                    |t| Sample::Count(t.wait_timeouts as f64),
                ),
            ]),
        }
    }

    /// The traffic of `database`, created (all zero) on first use.
    pub fn of(&self, database: &str) -> Arc<DatabaseTraffic> {
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(traffic) = databases.get(database) {
            return traffic.clone();
        }
        databases.entry(database.to_owned()).or_default().clone()
    }

    /// A copy of every database's totals.
    pub fn totals(&self) -> BTreeMap<String, Totals> {
        let databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        databases
            .iter()
            .map(|(name, traffic)| (name.clone(), traffic.totals()))
            .collect()
    }
}

fn desc(name: &str, help: &str, labels: &[&str]) -> Desc {
    let labels = labels.iter().map(|l| (*l).to_owned()).collect();
    Desc::new(name.into(), help.into(), labels, Default::default()).expect("valid metric")
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.into());
    pair.set_value(value.into());
    pair
}

impl Collector for Traffic {
    fn desc(&self) -> Vec<&Desc> {
        self.families.iter().map(|f| &f.desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let totals = self.totals();
        self.families
            .iter()
            .map(|family| {
                let metrics = totals.iter().flat_map(|(database, t)| {
                    family.samples.iter().map(move |(kind, figure)| {
                        let mut labels = vec![label("database", database)];
                        labels.extend(kind.map(|kind| label("kind", kind)));
                        let mut m = proto::Metric::from_label(labels);
                        match figure(t) {
                            Sample::Count(value) => {
                                let mut counter = proto::Counter::default();
                                counter.set_value(value);
                                m.set_counter(counter);
                            }
                            Sample::Histogram(h) => m.set_histogram(h),
                        }
                        m
                    })
                });
                let mut f = MetricFamily::default();
                f.set_name(family.desc.fq_name.clone());
                f.set_help(family.desc.help.clone());
                f.set_field_type(family.kind);
                f.set_metric(metrics.collect());
                f
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_bucket_of_their_bound_and_count_cumulatively() {
        let mut d = Durations::default();
        for seconds in [0.0001, 0.00011, 0.7, 100.0] {
            d.observe(seconds);
        }
        let h = d.proto();
        let cumulative: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(
            cumulative[0],
            (0.0001, 1),
            "a bound's own value is in its bucket"
        );
        assert_eq!(cumulative[1], (0.00025, 2));
        assert_eq!(cumulative[11], (0.5, 2));
        assert_eq!(cumulative[12], (1.0, 3));
        assert_eq!(cumulative.last(), Some(&(30.0, 3)), "100 s only in +Inf");
        assert_eq!(h.get_sample_count(), 4);
        assert!((h.get_sample_sum() - 100.70021).abs() < 1e-9);
    }
}
