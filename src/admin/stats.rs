//! The figures of PgBouncer's SHOW STATS, per database: totals since the start, and
//! averages over the last `pgwarden.stats_period`.
//!
//! The totals are read from the metrics when asked. The averages are worked out
//! by a task at the end of each period, as PgBouncer does, so that every reader in
//! one period sees the same figures and none of them costs the hot path anything.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::proxy::Shared;

/// One database's figures: totals since the start, or the averages of a period.
/// Times are in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// transactions finished
    pub xact_count: u64,
    /// Query and Execute messages
    pub query_count: u64,
    /// server connections given to clients
    pub server_assignment_count: u64,
    /// bytes from clients
    pub received: u64,
    /// bytes to clients
    pub sent: u64,
    /// time server connections were given to clients
    pub xact_time: u64,
    /// time servers owed answers
    pub query_time: u64,
    /// time clients waited for a server connection
    pub wait_time: u64,
    /// named statements clients prepared
    pub client_parse_count: u64,
    /// statements pgwarden prepared on servers for them
    pub server_parse_count: u64,
    /// Binds of clients' named statements
    pub bind_count: u64,
}

/// Each figure's names, in PgBouncer's order: in SHOW STATS_TOTALS and
/// STATS_AVERAGES, then in SHOW STATS (and TOTALS) as a total and as an average.
/// As column names of a [`super::ResultSet`], they end in `#` (integers).
pub const NAMES: [(&str, &str, &str); 11] = [
    ("xact_count#", "total_xact_count#", "avg_xact_count#"),
    ("query_count#", "total_query_count#", "avg_query_count#"),
    (
        "server_assignment_count#",
        "total_server_assignment_count#",
        "avg_server_assignment_count#",
    ),
    ("bytes_received#", "total_received#", "avg_recv#"),
    ("bytes_sent#", "total_sent#", "avg_sent#"),
    ("xact_time#", "total_xact_time#", "avg_xact_time#"),
    ("query_time#", "total_query_time#", "avg_query_time#"),
    ("wait_time#", "total_wait_time#", "avg_wait_time#"),
    (
        "client_parse_count#",
        "total_client_parse_count#",
        "avg_client_parse_count#",
    ),
    (
        "server_parse_count#",
        "total_server_parse_count#",
        "avg_server_parse_count#",
    ),
    ("bind_count#", "total_bind_count#", "avg_bind_count#"),
];

impl Figures {
    /// The figures in the order of [`NAMES`].
    pub fn values(&self) -> [u64; 11] {
        [
            self.xact_count,
            self.query_count,
            self.server_assignment_count,
            self.received,
            self.sent,
            self.xact_time,
            self.query_time,
            self.wait_time,
            self.client_parse_count,
            self.server_parse_count,
            self.bind_count,
        ]
    }

    /// The figures of several databases together.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Figures>) -> Figures {
        all.into_iter().fold(Figures::default(), |a, b| Figures {
            xact_count: a.xact_count + b.xact_count,
            query_count: a.query_count + b.query_count,
            server_assignment_count: a.server_assignment_count + b.server_assignment_count,
            received: a.received + b.received,
            sent: a.sent + b.sent,
            xact_time: a.xact_time + b.xact_time,
            query_time: a.query_time + b.query_time,
            wait_time: a.wait_time + b.wait_time,
            client_parse_count: a.client_parse_count + b.client_parse_count,
            server_parse_count: a.server_parse_count + b.server_parse_count,
            bind_count: a.bind_count + b.bind_count,
        })
    }

    /// Every database's totals, read from the metrics.
    pub fn read(metrics: &Metrics) -> BTreeMap<String, Figures> {
        let micros = |seconds: f64| (seconds * 1e6) as u64;
        metrics
            .traffic_totals()
            .into_iter()
            .map(|(database, t)| {
                let figures = Figures {
                    server_assignment_count: t.server_assignments,
                    xact_count: t.transactions,
                    query_count: t.queries,
                    received: t.received_bytes,
                    sent: t.sent_bytes,
                    xact_time: micros(t.transaction_seconds.sum),
                    query_time: micros(t.query_seconds),
                    wait_time: micros(t.wait_seconds.sum),
                    client_parse_count: t.client_parses,
                    server_parse_count: t.server_parses,
                    bind_count: t.binds,
                };
                (database, figures)
            })
            .collect()
    }

    /// The averages of the period that went from `before` to these totals in `period`.
    pub fn averages_since(&self, before: &Figures, period: Duration) -> Figures {
        let delta = |now: u64, then: u64| now.saturating_sub(then);
        let micros = period.as_micros().max(1) as u64;
        // Counts and bytes per second.
        let per_second = |now, then| delta(now, then).saturating_mul(1_000_000) / micros;
        // Times per event of the period: what one transaction, query or wait took.
        let per = |now, then, events: u64| delta(now, then).checked_div(events).unwrap_or(0);
        let xacts = delta(self.xact_count, before.xact_count);
        let queries = delta(self.query_count, before.query_count);
        let assignments = delta(self.server_assignment_count, before.server_assignment_count);
        Figures {
            server_assignment_count: per_second(
                self.server_assignment_count,
                before.server_assignment_count,
            ),
            xact_count: per_second(self.xact_count, before.xact_count),
            query_count: per_second(self.query_count, before.query_count),
            received: per_second(self.received, before.received),
            sent: per_second(self.sent, before.sent),
            xact_time: per(self.xact_time, before.xact_time, xacts),
            query_time: per(self.query_time, before.query_time, queries),
            wait_time: per(self.wait_time, before.wait_time, assignments),
            client_parse_count: per_second(self.client_parse_count, before.client_parse_count),
            server_parse_count: per_second(self.server_parse_count, before.server_parse_count),
            bind_count: per_second(self.bind_count, before.bind_count),
        }
    }
}

/// The averages of one period: per database, and of all of them together.
#[derive(Debug, Clone, Default)]
pub struct Period {
    /// by database
    pub databases: BTreeMap<String, Figures>,
    /// every database together
    pub all: Figures,
}

impl Period {
    /// The averages of the period that went from `before` to `now` in `length`.
    fn between(
        before: &BTreeMap<String, Figures>,
        now: &BTreeMap<String, Figures>,
        length: Duration,
    ) -> Period {
        let zero = Figures::default();
        Period {
            databases: now
                .iter()
                .map(|(db, totals)| {
                    let then = before.get(db).unwrap_or(&zero);
                    (db.clone(), totals.averages_since(then, length))
                })
                .collect(),
            all: Figures::sum(now.values()).averages_since(&Figures::sum(before.values()), length),
        }
    }
}

/// The averages of the last finished period.
#[derive(Debug, Default)]
pub struct Averages {
    last: Mutex<Period>,
}

impl Averages {
    /// The averages of the last finished period (zero before the first one ends).
    pub fn last(&self) -> Period {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Works out the averages at the end of every `pgwarden.stats_period`, until shutdown.
/// A reload's new period applies from the next one.
pub async fn run(shared: Arc<Shared>) {
    let mut before = Figures::read(&shared.metrics);
    let mut since = Instant::now();
    loop {
        let length = shared.config.load().pgwarden.stats_period;
        tokio::select! {
            _ = tokio::time::sleep(length) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let now = Figures::read(&shared.metrics);
        let at = Instant::now();
        let period = Period::between(&before, &now, at - since);
        *shared.stats.last.lock().unwrap_or_else(|e| e.into_inner()) = period;
        (before, since) = (now, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_average_per_second_and_times_per_event() {
        let before = Figures {
            server_assignment_count: 10,
            xact_count: 10,
            query_count: 20,
            received: 1_000,
            sent: 5_000,
            xact_time: 1_000,
            query_time: 800,
            wait_time: 0,
            client_parse_count: 0,
            server_parse_count: 0,
            bind_count: 0,
        };
        let now = Figures {
            server_assignment_count: 40,
            xact_count: 70,
            query_count: 140,
            received: 7_000,
            sent: 17_000,
            xact_time: 7_000,
            query_time: 2_000,
            wait_time: 600,
            client_parse_count: 6,
            server_parse_count: 3,
            bind_count: 12,
        };
        let avg = now.averages_since(&before, Duration::from_secs(2));
        assert_eq!(avg.server_assignment_count, 15);
        assert_eq!(avg.xact_count, 30);
        assert_eq!(avg.query_count, 60);
        assert_eq!(avg.received, 3_000);
        assert_eq!(avg.sent, 6_000);
        // 6 000 µs over 60 transactions, 1 200 µs over 120 queries, 600 µs over 30 waits.
        assert_eq!(avg.xact_time, 100);
        assert_eq!(avg.query_time, 10);
        assert_eq!(avg.wait_time, 20);
        assert_eq!(
            (
                avg.client_parse_count,
                avg.server_parse_count,
                avg.bind_count
            ),
            (3, 1, 6)
        );
    }

    #[test]
    fn every_database_together_averages_its_times_over_all_events() {
        let figures = |xacts, time| Figures {
            xact_count: xacts,
            xact_time: time,
            ..Figures::default()
        };
        let before = BTreeMap::from([("a".to_owned(), figures(0, 0))]);
        let now = BTreeMap::from([
            ("a".to_owned(), figures(10, 1_000)),
            ("b".to_owned(), figures(30, 9_000)),
        ]);
        let period = Period::between(&before, &now, Duration::from_secs(1));
        assert_eq!(period.databases["a"].xact_time, 100);
        assert_eq!(period.databases["b"].xact_time, 300);
        // 10 000 µs over 40 transactions, not the mean of the two databases' means.
        assert_eq!(period.all.xact_time, 250);
        assert_eq!(period.all.xact_count, 40);
    }

    #[test]
    fn a_quiet_period_averages_zero() {
        let totals = Figures {
            xact_count: 5,
            xact_time: 500,
            ..Figures::default()
        };
        assert_eq!(
            totals.averages_since(&totals, Duration::from_secs(60)),
            Figures::default()
        );
        // A database first seen in this period counts from zero.
        let avg = totals.averages_since(&Figures::default(), Duration::from_millis(500));
        assert_eq!((avg.xact_count, avg.xact_time), (10, 100));
    }
}
