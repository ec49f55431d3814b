//! PgBouncer's names for the settings pgwarden shares with it. Monitoring built
//! for PgBouncer reads SHOW CONFIG by PgBouncer's keys (exporters turn
//! `max_client_conn` and `max_user_connections` into gauges that alerts compare
//! client counts against), so SHOW CONFIG lists these rows too, after pgwarden's
//! own, in PgBouncer's units: durations in seconds, booleans as 0 and 1.

use std::collections::HashMap;

/// How a pgwarden value reads in PgBouncer's terms.
#[derive(Debug, Clone, Copy)]
enum Unit {
    /// the same text
    Same,
    /// a duration (`"10m"`), as seconds
    Seconds,
    /// `true` / `false`, as 1 / 0
    Flag,
}

/// PgBouncer's key, pgwarden's key, and how the value converts.
const NAMES: &[(&str, &str, Unit)] = &[
    ("max_client_conn", "pgwarden.max_client_conn", Unit::Same),
    (
        "max_user_client_connections",
        "pgwarden.max_user_client_conn",
        Unit::Same,
    ),
    (
        "max_db_client_connections",
        "pgwarden.max_db_client_conn",
        Unit::Same,
    ),
    (
        "max_user_connections",
        "pool.max_user_connections",
        Unit::Same,
    ),
    ("max_db_connections", "pool.max_db_connections", Unit::Same),
    ("default_pool_size", "pool.default_pool_size", Unit::Same),
    ("min_pool_size", "pool.min_pool_size", Unit::Same),
    ("reserve_pool_size", "pool.reserve_pool_size", Unit::Same),
    (
        "reserve_pool_timeout",
        "pool.reserve_pool_timeout",
        Unit::Seconds,
    ),
    ("pool_mode", "pool.mode", Unit::Same),
    (
        "max_prepared_statements",
        "pool.max_prepared_statements",
        Unit::Same,
    ),
    ("server_lifetime", "pool.server_lifetime", Unit::Seconds),
    (
        "server_idle_timeout",
        "pool.server_idle_timeout",
        Unit::Seconds,
    ),
    (
        "server_connect_timeout",
        "pool.server_connect_timeout",
        Unit::Seconds,
    ),
    ("query_timeout", "pool.query_timeout", Unit::Seconds),
    (
        "query_wait_timeout",
        "pool.query_wait_timeout",
        Unit::Seconds,
    ),
    (
        "client_idle_timeout",
        "pool.client_idle_timeout",
        Unit::Seconds,
    ),
    (
        "idle_transaction_timeout",
        "pool.idle_transaction_timeout",
        Unit::Seconds,
    ),
    (
        "client_login_timeout",
        "pgwarden.client_login_timeout",
        Unit::Seconds,
    ),
    ("stats_period", "pgwarden.stats_period", Unit::Seconds),
    ("so_reuseport", "pgwarden.so_reuseport", Unit::Flag),
    ("unix_socket_dir", "pgwarden.unix_socket_dir", Unit::Same),
    ("unix_socket_mode", "pgwarden.unix_socket_mode", Unit::Same),
    ("auth_type", "auth.type", Unit::Same),
    ("auth_file", "auth.file", Unit::Same),
    ("auth_hba_file", "auth.hba_file", Unit::Same),
    ("auth_user", "auth.user", Unit::Same),
    ("auth_query", "auth.query", Unit::Same),
];

/// A SHOW CONFIG row under PgBouncer's name.
#[derive(Debug, PartialEq, Eq)]
pub struct Row {
    /// PgBouncer's key
    pub key: &'static str,
    /// the running value, in PgBouncer's units
    pub value: String,
    /// the default, in PgBouncer's units
    pub default: Option<String>,
    /// pgwarden's key, which decides whether a reload changes it
    pub pgwarden_key: &'static str,
}

/// The rows under PgBouncer's names, from the running configuration's keys and
/// values (`running`) and the defaults, both as SHOW CONFIG lists them.
pub fn rows(running: &HashMap<String, String>, defaults: &HashMap<String, String>) -> Vec<Row> {
    NAMES
        .iter()
        .filter_map(|&(key, pgwarden_key, unit)| {
            Some(Row {
                key,
                value: convert(running.get(pgwarden_key)?, unit),
                default: defaults.get(pgwarden_key).map(|d| convert(d, unit)),
                pgwarden_key,
            })
        })
        .collect()
}

fn convert(value: &str, unit: Unit) -> String {
    match unit {
        Unit::Same => value.to_owned(),
        Unit::Flag => match value {
            "true" => "1".into(),
            "false" => "0".into(),
            other => other.to_owned(),
        },
        Unit::Seconds => match crate::config::duration::parse(value) {
            Ok(d) if d.subsec_millis() == 0 => d.as_secs().to_string(),
            Ok(d) => format!("{:.3}", d.as_secs_f64()),
            Err(_) => value.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pgwarden_key_named_exists_and_converts_to_pgbouncer_units() {
        let defaults = crate::config::Config::defaults();
        let all = rows(&defaults, &defaults);
        assert_eq!(all.len(), NAMES.len(), "a pgwarden key in NAMES is gone");
        let value = |key: &str| all.iter().find(|r| r.key == key).unwrap().value.clone();
        assert_eq!(value("max_client_conn"), "10000");
        assert_eq!(value("server_idle_timeout"), "600");
        assert_eq!(value("server_lifetime"), "3600");
        assert_eq!(value("so_reuseport"), "0");
        assert_eq!(value("pool_mode"), "transaction");
        let running = HashMap::from([("pool.query_timeout".to_owned(), "1500ms".to_owned())]);
        let row = &rows(&running, &HashMap::new())[0];
        assert_eq!((row.key, row.value.as_str()), ("query_timeout", "1.500"));
    }
}
