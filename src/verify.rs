//! Data verification: do the standbys hold what the primary holds?
//!
//! For every other node: its replication lag, and for each chosen table a
//! comparison with the primary once the node has replayed the primary's WAL
//! position taken at the start. Both sides stream `(key, md5(row))` ordered by
//! the key's bytes through COPY and are merged row by row, so tables of any size
//! are compared in constant memory. Differences are re-checked after the node
//! caught up again, so that writes in flight during the comparison are not
//! reported as inconsistencies. Used by `pgwarden verify` and the admin `VERIFY`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::admin::{Cell, ResultSet, lsn};
use crate::auth::UserList;
use crate::backend::{Receiver, Role};
use crate::config::{BackendConfig, Config};
use crate::failover::is_sender;
use crate::health::probe::{Login, connect, describe};
use crate::proxy::Shared;
use crate::tls::Tls;

/// Differing keys reported per table at most.
const MAX_REPORTED: usize = 10;

/// A table to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// real database name
    pub database: String,
    /// table name, optionally schema-qualified
    pub table: String,
    /// key columns; the primary key when empty
    pub key: Vec<String>,
}

impl TableSpec {
    /// Parses `[database.]table[(key, …)]`; `database` defaults to `default_db`.
    /// A schema-qualified table needs the database too: `db.schema.table`.
    pub fn parse(text: &str, default_db: &str) -> Result<TableSpec, String> {
        let (name, key) = match text.split_once('(') {
            Some((name, rest)) => {
                let cols = rest
                    .strip_suffix(')')
                    .ok_or_else(|| format!("\"{text}\": missing ')' after the key columns"))?;
                (
                    name,
                    cols.split(',')
                        .map(|c| c.trim().to_owned())
                        .filter(|c| !c.is_empty())
                        .collect(),
                )
            }
            None => (text, Vec::new()),
        };
        let parts: Vec<&str> = name.split('.').collect();
        let (database, table) = match parts.as_slice() {
            [table] => (default_db.to_owned(), (*table).to_owned()),
            [db, table] => ((*db).to_owned(), (*table).to_owned()),
            [db, schema, table] => ((*db).to_owned(), format!("{schema}.{table}")),
            _ => return Err(format!("\"{text}\" is not [database.]table[(key)]")),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
        };
        if !valid(&table) || !key.iter().all(|k: &String| valid(k)) {
            return Err(format!(
                "\"{text}\": names may only hold letters, digits and '_'"
            ));
        }
        Ok(TableSpec {
            database,
            table,
            key,
        })
    }
}

/// One line of a report.
#[derive(Debug, Clone)]
pub struct Finding {
    /// the node compared with the primary
    pub node: String,
    /// `lag`, or the table
    pub check: String,
    /// rows on the primary
    pub primary_rows: Option<i64>,
    /// rows on the node
    pub node_rows: Option<i64>,
    /// `ok`, `DIFFERENT`, `unreachable`, …
    pub result: String,
    /// details: lag, first differing keys
    pub detail: String,
}

impl Finding {
    fn bad(&self) -> bool {
        self.result != "ok" && self.result != "lag"
    }
}

/// Compares every node but `primary` with it.
pub async fn verify(
    nodes: &[BackendConfig],
    primary: usize,
    login: &Login,
    tables: &[TableSpec],
    wait: Duration,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        if i == primary {
            continue;
        }
        let lag = lag(&nodes[primary], node, login).await;
        let reachable = lag.is_ok();
        findings.push(match lag {
            Ok(detail) => Finding {
                node: node.name.clone(),
                check: "lag".into(),
                primary_rows: None,
                node_rows: None,
                result: "lag".into(),
                detail,
            },
            Err(e) => Finding {
                node: node.name.clone(),
                check: "lag".into(),
                primary_rows: None,
                node_rows: None,
                result: "unreachable".into(),
                detail: e,
            },
        });
        if !reachable {
            continue;
        }
        for spec in tables {
            let finding = compare(&nodes[primary], node, login, spec, wait)
                .await
                .unwrap_or_else(|e| Finding {
                    node: node.name.clone(),
                    check: spec.table.clone(),
                    primary_rows: None,
                    node_rows: None,
                    result: "error".into(),
                    detail: e,
                });
            findings.push(finding);
        }
    }
    findings
}

/// True when no finding is an inconsistency or an error.
pub fn consistent(findings: &[Finding]) -> bool {
    !findings.iter().any(Finding::bad)
}

async fn lag(
    primary: &BackendConfig,
    node: &BackendConfig,
    login: &Login,
) -> Result<String, String> {
    let top = current_lsn(&connect(primary, login).await?).await?;
    let client = connect(node, login).await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), \
             extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
            &[],
        )
        .await
        .map_err(|e| describe(&e))?;
    if !row.get::<_, bool>(0) {
        return Ok("not a standby: it is a primary itself".into());
    }
    let replayed = row.get::<_, Option<PgLsn>>(1).map(u64::from).unwrap_or(0);
    let seconds = row.get::<_, Option<f64>>(2);
    let behind = top.saturating_sub(replayed);
    Ok(format!(
        "{behind} bytes behind (replayed {}), {}",
        lsn(replayed),
        match (behind, seconds) {
            (0, _) => "caught up".to_owned(),
            (_, Some(s)) => format!("last replayed transaction {s:.1} s ago"),
            (_, None) => "nothing replayed yet".to_owned(),
        }
    ))
}

async fn current_lsn(client: &Client) -> Result<u64, String> {
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END",
            &[],
        )
        .await
        .map_err(|e| describe(&e))?;
    Ok(row.get::<_, Option<PgLsn>>(0).map(u64::from).unwrap_or(0))
}

/// Waits until `node` has replayed `primary`'s position `target`; false if it does
/// not within `wait`, or at once when it is not streaming from `primary` at all
/// (such a node is then compared as it is).
async fn wait_for_replay(
    node: &Client,
    primary: &BackendConfig,
    target: u64,
    wait: Duration,
) -> Result<bool, String> {
    let deadline = Instant::now() + wait;
    loop {
        let row = node
            .query_one(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), \
                 (SELECT status FROM pg_stat_wal_receiver), \
                 (SELECT sender_host FROM pg_stat_wal_receiver), \
                 (SELECT sender_port FROM pg_stat_wal_receiver)",
                &[],
            )
            .await
            .map_err(|e| describe(&e))?;
        let receiver = row.get::<_, Option<String>>(2).map(|status| Receiver {
            status,
            sender_host: row.get(3),
            sender_port: row.get(4),
        });
        let streaming = receiver
            .as_ref()
            .is_some_and(|r| r.status == "streaming" && is_sender(r, primary));
        if !row.get::<_, bool>(0) || !streaming {
            return Ok(false);
        }
        if row.get::<_, Option<PgLsn>>(1).map(u64::from) >= Some(target) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn compare(
    primary: &BackendConfig,
    node: &BackendConfig,
    login: &Login,
    spec: &TableSpec,
    wait: Duration,
) -> Result<Finding, String> {
    let login = Login {
        dbname: spec.database.clone(),
        ..login.clone()
    };
    let (p, n) = (
        connect(primary, &login).await?,
        connect(node, &login).await?,
    );
    let key = match spec.key.as_slice() {
        [] => primary_key(&p, &spec.table).await?,
        k => k.to_vec(),
    };
    let key_text = if key.len() == 1 {
        format!("{}::text", key[0])
    } else {
        format!("({})::text", key.join(", "))
    };
    let start = current_lsn(&p).await?;
    let replayed = wait_for_replay(&n, primary, start, wait).await?;
    // Hex of the key's bytes: its byte order is what the merge compares.
    let copy = format!(
        "COPY (SELECT encode(convert_to({key_text}, 'UTF8'), 'hex') COLLATE \"C\", md5(t::text) \
         FROM {} t ORDER BY 1) TO STDOUT",
        spec.table
    );
    let (a, b) = tokio::try_join!(p.copy_out(copy.as_str()), n.copy_out(copy.as_str()))
        .map_err(|e| describe(&e))?;
    let (a, b) = (Box::pin(a), Box::pin(b));
    let mut diff = merge(Lines::new(a), Lines::new(b)).await?;
    if !diff.keys.is_empty() {
        // Writes may have landed on the primary during the scan: look again at the
        // differing keys once the node has caught up with the primary.
        let now = current_lsn(&p).await?;
        wait_for_replay(&n, primary, now, wait).await?;
        let again = format!(
            "SELECT md5(t::text) FROM {} t WHERE {key_text} = $1",
            spec.table
        );
        let mut still = Vec::new();
        for k in diff.keys {
            let key_value = String::from_utf8(hex_decode(&k)).unwrap_or(k.clone());
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key_value];
            let (x, y) =
                tokio::try_join!(p.query_opt(&again, &params), n.query_opt(&again, &params))
                    .map_err(|e| describe(&e))?;
            let hash = |r: Option<tokio_postgres::Row>| r.map(|r| r.get::<_, String>(0));
            if hash(x) != hash(y) {
                still.push(key_value);
            }
        }
        diff.keys = still;
    }
    let different = !diff.keys.is_empty();
    let mut detail = if different {
        format!("first differing keys ({key:?}): {}", diff.keys.join(", "))
    } else {
        format!("{} rows match", diff.primary_rows)
    };
    if !replayed {
        detail.push_str(
            "; the node did not replay the primary's position in time, compared as it was",
        );
    }
    Ok(Finding {
        node: node.name.clone(),
        check: spec.table.clone(),
        primary_rows: Some(diff.primary_rows),
        node_rows: Some(diff.node_rows),
        result: if different {
            "DIFFERENT".into()
        } else {
            "ok".into()
        },
        detail,
    })
}

async fn primary_key(client: &Client, table: &str) -> Result<Vec<String>, String> {
    let rows = client
        .query(
            "SELECT a.attname FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
            &[&table],
        )
        .await
        .map_err(|e| describe(&e))?;
    let key: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    if key.is_empty() {
        return Err(format!(
            "{table} has no primary key; name the key columns: {table}(col, …)"
        ));
    }
    Ok(key)
}

/// What a merge found.
struct Diff {
    primary_rows: i64,
    node_rows: i64,
    /// hex keys that differ, are missing, or are extra (up to MAX_REPORTED)
    keys: Vec<String>,
}

async fn merge<A, B>(mut a: Lines<A>, mut b: Lines<B>) -> Result<Diff, String>
where
    A: futures_util::Stream<Item = Result<Bytes, tokio_postgres::Error>> + Unpin,
    B: futures_util::Stream<Item = Result<Bytes, tokio_postgres::Error>> + Unpin,
{
    let mut diff = Diff {
        primary_rows: 0,
        node_rows: 0,
        keys: Vec::new(),
    };
    let note = |key: &[u8], diff: &mut Diff| {
        if diff.keys.len() < MAX_REPORTED {
            diff.keys.push(String::from_utf8_lossy(key).into_owned());
        }
    };
    let (mut x, mut y) = (a.next().await?, b.next().await?);
    loop {
        match (&x, &y) {
            (None, None) => return Ok(diff),
            (Some((k, h)), Some((k2, h2))) if k == k2 => {
                if h != h2 {
                    note(k, &mut diff);
                }
                diff.primary_rows += 1;
                diff.node_rows += 1;
                x = a.next().await?;
                y = b.next().await?;
            }
            (Some((k, _)), Some((k2, _))) if k < k2 => {
                note(k, &mut diff);
                diff.primary_rows += 1;
                x = a.next().await?;
            }
            (Some((k, _)), None) => {
                note(k, &mut diff);
                diff.primary_rows += 1;
                x = a.next().await?;
            }
            (_, Some((k2, _))) => {
                note(k2, &mut diff);
                diff.node_rows += 1;
                y = b.next().await?;
            }
        }
    }
}

/// `key\thash` lines out of a COPY stream.
struct Lines<S> {
    stream: S,
    buf: BytesMut,
    done: bool,
}

impl<S> Lines<S>
where
    S: futures_util::Stream<Item = Result<Bytes, tokio_postgres::Error>> + Unpin,
{
    fn new(stream: S) -> Self {
        Lines {
            stream,
            buf: BytesMut::new(),
            done: false,
        }
    }

    async fn next(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>, String> {
        loop {
            if let Some(end) = self.buf.iter().position(|&c| c == b'\n') {
                let line = self.buf.split_to(end + 1);
                let line = &line[..end];
                let tab = line.iter().position(|&c| c == b'\t').unwrap_or(line.len());
                return Ok(Some((
                    line[..tab].to_vec(),
                    line[(tab + 1).min(line.len())..].to_vec(),
                )));
            }
            if self.done {
                return Ok(None);
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(describe(&e)),
                None => self.done = true,
            }
        }
    }
}

fn hex_decode(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// The report as a result set.
pub fn result_set(findings: &[Finding]) -> ResultSet {
    let mut rs = ResultSet::new(&[
        "node",
        "check",
        "primary_rows#",
        "node_rows#",
        "result",
        "detail",
    ]);
    for f in findings {
        rs.row(vec![
            f.node.clone().into(),
            f.check.clone().into(),
            f.primary_rows.into(),
            f.node_rows.into(),
            f.result.clone().into(),
            Cell::Text(f.detail.clone()),
        ]);
    }
    rs
}

/// The admin console's VERIFY: against the routed primary, every other node.
pub async fn console(shared: &Shared, args: &[String]) -> Result<ResultSet, String> {
    let config = shared.config.load_full();
    let table = shared.routing.load_full();
    let primary = table
        .primary
        .filter(|&p| table.backends[p].role() == Some(Role::Primary))
        .ok_or("there is no routable primary to compare with")?;
    let default_db = config
        .databases
        .keys()
        .next()
        .and_then(|name| config.database(name))
        .map(|d| d.dbname)
        .unwrap_or_else(|| "postgres".into());
    let specs = args
        .iter()
        .map(|a| TableSpec::parse(a, &default_db))
        .collect::<Result<Vec<_>, _>>()?;
    let login = monitor_login(shared)?;
    let nodes: Vec<BackendConfig> = table.backends.iter().map(|b| b.config.clone()).collect();
    let findings = verify(&nodes, primary, &login, &specs, Duration::from_secs(30)).await;
    Ok(result_set(&findings))
}

/// `pgwarden verify`: finds the primary (the node out of recovery on the newest
/// timeline, unless named), compares, prints a report; returns whether all is consistent.
pub async fn command(
    config: &Config,
    users: &UserList,
    specs: &[TableSpec],
    wait: Duration,
    primary_name: Option<&str>,
) -> Result<bool, String> {
    let tls = Tls::load(config).map_err(|e| e.to_string())?;
    let login = login_from(config, users, Arc::new(tls))?;
    let nodes: Vec<BackendConfig> = config.backends.clone();
    let mut primary = match primary_name {
        Some(name) => Some((
            nodes
                .iter()
                .position(|n| n.name == name)
                .ok_or_else(|| format!("--primary: no backend named \"{name}\""))?,
            i32::MAX,
        )),
        None => None,
    };
    for (i, node) in nodes.iter().enumerate() {
        if primary_name.is_some() {
            break;
        }
        let Ok(client) = connect(node, &login).await else {
            continue;
        };
        let Ok(row) = client
            .query_one(
                "SELECT pg_is_in_recovery(), CASE WHEN NOT pg_is_in_recovery() THEN \
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END",
                &[],
            )
            .await
        else {
            continue;
        };
        if !row.get::<_, bool>(0) {
            let timeline = row.get::<_, Option<i32>>(1).unwrap_or(0);
            if primary.is_none_or(|(_, t)| timeline > t) {
                primary = Some((i, timeline));
            }
        }
    }
    let (primary, _) = primary.ok_or("no reachable node reports itself primary")?;
    println!(
        "primary: {} ({}:{})",
        nodes[primary].name, nodes[primary].host, nodes[primary].port
    );
    let findings = verify(&nodes, primary, &login, specs, wait).await;
    for f in &findings {
        let rows = match (f.primary_rows, f.node_rows) {
            (Some(a), Some(b)) => format!(" rows {a}/{b}"),
            _ => String::new(),
        };
        println!(
            "{:<12} {:<24} {:<11}{rows} {}",
            f.node, f.check, f.result, f.detail
        );
    }
    let ok = consistent(&findings);
    println!("{}", if ok { "consistent" } else { "INCONSISTENT" });
    Ok(ok)
}

fn login_from(config: &Config, users: &UserList, tls: Arc<Tls>) -> Result<Login, String> {
    let health = &config.health;
    match users.get(&health.user).map(|c| c.secret.clone()) {
        Some(crate::auth::Secret::Plain(password)) => Ok(Login {
            user: health.user.clone(),
            password,
            dbname: health.dbname.clone(),
            timeout: health.timeout.max(Duration::from_secs(5)),
            tls,
        }),
        _ => Err(format!(
            "health.user \"{}\" has no plain password in the user list",
            health.user
        )),
    }
}

/// The monitor user's login, from the running configuration.
fn monitor_login(shared: &Shared) -> Result<Login, String> {
    login_from(
        &shared.config.load(),
        &shared.users.load(),
        shared.tls.load_full(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_specs_name_database_table_and_key() {
        assert_eq!(
            TableSpec::parse("accounts", "appdb").unwrap(),
            TableSpec {
                database: "appdb".into(),
                table: "accounts".into(),
                key: vec![]
            }
        );
        assert_eq!(
            TableSpec::parse("shop.orders(region, id)", "appdb").unwrap(),
            TableSpec {
                database: "shop".into(),
                table: "orders".into(),
                key: vec!["region".into(), "id".into()]
            }
        );
        assert_eq!(
            TableSpec::parse("shop.sales.orders", "x").unwrap().table,
            "sales.orders"
        );
        assert!(TableSpec::parse("orders(id", "x").is_err());
        assert!(TableSpec::parse("orders; DROP TABLE x", "x").is_err());
        assert!(TableSpec::parse("a.b.c.d", "x").is_err());
    }

    #[tokio::test]
    async fn merge_finds_changed_missing_and_extra_keys() {
        let lines = |text: &'static str| {
            let chunks: Vec<Result<Bytes, tokio_postgres::Error>> = text
                .as_bytes()
                .chunks(5)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            Lines::new(futures_util::stream::iter(chunks))
        };
        let diff = merge(
            lines("01\ta\n02\tb\n03\tc\n05\te\n"),
            lines("01\ta\n02\tX\n04\td\n05\te\n"),
        )
        .await
        .unwrap();
        assert_eq!(diff.primary_rows, 4);
        assert_eq!(diff.node_rows, 4);
        assert_eq!(diff.keys, vec!["02", "03", "04"]);
        let same = merge(lines("01\ta\n"), lines("01\ta\n")).await.unwrap();
        assert!(same.keys.is_empty());
        assert_eq!(hex_decode("6869"), b"hi");
    }
}
