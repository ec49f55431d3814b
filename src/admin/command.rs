//! The admin console's language: PgBouncer's SHOW/PAUSE/RESUME/RELOAD/SHUTDOWN/
//! KILL/KILL_CLIENT/RECONNECT/WAIT_CLOSE/DISABLE/ENABLE, plus pgwarden's cluster
//! commands.
//! Case-insensitive, a trailing `;` optional; names may be double-quoted.

use crate::config::ShutdownMode;

/// What SHOW can show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// one row per (database, user): client and server connection counts
    Pools,
    /// one row per client
    Clients,
    /// one row per server connection
    Servers,
    /// one row per configured database
    Databases,
    /// per database: totals, and averages of the last `stats_period`
    Stats,
    /// the totals of SHOW STATS
    StatsTotals,
    /// the averages of SHOW STATS
    StatsAverages,
    /// SHOW STATS of every database together, one figure a row
    Totals,
    /// counts of databases, users, pools, clients and server connections
    Lists,
    /// the users of the user list, with their connection limits and counts
    Users,
    /// whether the proxy is running, paused or suspended
    State,
    /// the commands and listings the console knows
    Help,
    /// every configuration key
    Config,
    /// pgwarden's version
    Version,
    /// the routing table: every node with role, state, LSN, lag
    Backends,
    /// the history of failovers and switchovers
    Failovers,
    /// the etcd election and the published cluster state
    Coordination,
}

/// Every SHOW listing, by the name it is asked for with.
const LISTINGS: [(&str, Show); 17] = [
    ("POOLS", Show::Pools),
    ("CLIENTS", Show::Clients),
    ("SERVERS", Show::Servers),
    ("DATABASES", Show::Databases),
    ("USERS", Show::Users),
    ("STATS", Show::Stats),
    ("STATS_TOTALS", Show::StatsTotals),
    ("STATS_AVERAGES", Show::StatsAverages),
    ("TOTALS", Show::Totals),
    ("LISTS", Show::Lists),
    ("STATE", Show::State),
    ("CONFIG", Show::Config),
    ("VERSION", Show::Version),
    ("BACKENDS", Show::Backends),
    ("FAILOVERS", Show::Failovers),
    ("COORDINATION", Show::Coordination),
    ("HELP", Show::Help),
];

/// Every command's usage but SHOW's (whose listings are in [`LISTINGS`]), for SHOW HELP.
pub const USAGE: [&str; 15] = [
    "PAUSE [db]",
    "RESUME [db]",
    "RELOAD",
    "SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]",
    "KILL db",
    "KILL_CLIENT pid",
    "RECONNECT [db]",
    "WAIT_CLOSE [db]",
    "DISABLE db",
    "ENABLE db",
    "FENCE node",
    "UNFENCE node",
    "PROMOTE node",
    "SWITCHOVER [TO node]",
    "VERIFY [[db.]table[(key,…)] …]",
];

/// The names SHOW takes, for SHOW HELP.
pub fn listings() -> impl Iterator<Item = &'static str> {
    LISTINGS.iter().map(|(name, _)| *name)
}

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// SHOW …
    Show(Show),
    /// PAUSE [db]: new transactions wait; returns once running ones finished
    Pause(Option<String>),
    /// RESUME [db]
    Resume(Option<String>),
    /// RELOAD: re-read the configuration and the user list
    Reload,
    /// SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]: stop listening, and exit once
    /// the running transactions (the default), or the connected clients, are done
    Shutdown(ShutdownMode),
    /// KILL db: drop the database's clients and server connections now, and pause it
    Kill(String),
    /// KILL_CLIENT pid: drop one client now
    KillClient(i32),
    /// RECONNECT [db]: close each server connection when it is next released
    Reconnect(Option<String>),
    /// WAIT_CLOSE [db]: wait until no server connection a RECONNECT marked is in use
    WaitClose(Option<String>),
    /// DISABLE db: refuse new clients of the database
    Disable(String),
    /// ENABLE db
    Enable(String),
    /// FENCE node: never route to it
    Fence(String),
    /// UNFENCE node
    Unfence(String),
    /// PROMOTE node: make it the primary (the operator decides)
    Promote(String),
    /// SWITCHOVER [TO node]: planned primary change without client errors
    Switchover(Option<String>),
    /// VERIFY [[db.]table[(key)] …]: replication lag, and primary/standby data comparison
    Verify(Vec<String>),
    /// SET name …: drivers send session settings at connect, which are accepted and
    /// ignored; a pgwarden configuration key is refused (it lives in the file)
    Set(String),
    /// an empty query string
    Empty,
}

impl Command {
    /// True for commands that only read (what `stats_users` may run).
    pub fn is_read_only(&self) -> bool {
        matches!(self, Command::Show(_) | Command::Set(_) | Command::Empty)
    }
}

/// Parses one command, or explains what is wrong.
pub fn parse(sql: &str) -> Result<Command, String> {
    let text = sql.trim().trim_end_matches(';').trim();
    if text.is_empty() {
        return Ok(Command::Empty);
    }
    let words = split(text)?;
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let arg = |i: usize| words.get(i).cloned();
    let one_name = |what: &str| -> Result<String, String> {
        match words.len() {
            2 => Ok(words[1].clone()),
            _ => Err(format!("{} takes exactly one {what}", upper[0])),
        }
    };
    let optional_name = || -> Result<Option<String>, String> {
        match words.len() {
            1 => Ok(None),
            2 => Ok(arg(1)),
            _ => Err(format!("{} takes at most one database name", upper[0])),
        }
    };
    match upper[0].as_str() {
        "SHOW" => {
            let what = upper.get(1).map(String::as_str).unwrap_or("");
            let Some(&(_, show)) = LISTINGS.iter().find(|(name, _)| *name == what) else {
                return Err(format!(
                    "unknown SHOW \"{}\"; try {}",
                    words.get(1).map(String::as_str).unwrap_or(""),
                    listings().collect::<Vec<_>>().join(", ")
                ));
            };
            if words.len() > 2 {
                return Err(format!("SHOW {what} takes no arguments"));
            }
            Ok(Command::Show(show))
        }
        "PAUSE" => optional_name().map(Command::Pause),
        "RESUME" => optional_name().map(Command::Resume),
        "RELOAD" if words.len() == 1 => Ok(Command::Reload),
        "SHUTDOWN" => match upper.get(1).map(String::as_str) {
            None => Ok(Command::Shutdown(ShutdownMode::WaitForServers)),
            Some("WAIT_FOR_SERVERS") if words.len() == 2 => {
                Ok(Command::Shutdown(ShutdownMode::WaitForServers))
            }
            Some("WAIT_FOR_CLIENTS") if words.len() == 2 => {
                Ok(Command::Shutdown(ShutdownMode::WaitForClients))
            }
            _ => Err("usage: SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]".into()),
        },
        "KILL" => one_name("database name").map(Command::Kill),
        "KILL_CLIENT" => one_name("client pid").and_then(|pid| {
            pid.parse()
                .map(Command::KillClient)
                .map_err(|_| format!("\"{pid}\" is not a client pid (SHOW CLIENTS lists them)"))
        }),
        "RECONNECT" => optional_name().map(Command::Reconnect),
        "WAIT_CLOSE" => optional_name().map(Command::WaitClose),
        "DISABLE" => one_name("database name").map(Command::Disable),
        "ENABLE" => one_name("database name").map(Command::Enable),
        "FENCE" => one_name("node name").map(Command::Fence),
        "UNFENCE" => one_name("node name").map(Command::Unfence),
        "PROMOTE" => one_name("node name").map(Command::Promote),
        "SWITCHOVER" => match upper.get(1).map(String::as_str) {
            None => Ok(Command::Switchover(None)),
            Some("TO") if words.len() == 3 => Ok(Command::Switchover(arg(2))),
            _ => Err("usage: SWITCHOVER [TO node]".into()),
        },
        "VERIFY" => Ok(Command::Verify(words[1..].to_vec())),
        "SET" => {
            // SET [SESSION | LOCAL] name { = | TO } value; `name=value` may come unspaced.
            let mut rest = words[1..].iter().map(String::as_str);
            let mut name = rest.next().unwrap_or("");
            if name.eq_ignore_ascii_case("session") || name.eq_ignore_ascii_case("local") {
                name = rest.next().unwrap_or("");
            }
            let name = name.split('=').next().unwrap_or("");
            Ok(Command::Set(name.to_ascii_lowercase()))
        }
        "RELOAD" => Err("RELOAD takes no arguments".into()),
        _ => {
            let known: Vec<&str> = std::iter::once("SHOW")
                .chain(USAGE.iter().filter_map(|u| u.split(' ').next()))
                .collect();
            Err(format!(
                "unknown command \"{}\"; the admin console knows {} (SHOW HELP)",
                words[0],
                known.join(", ")
            ))
        }
    }
}

/// Splits on whitespace, keeping "double quoted" words whole (with `""` inside).
fn split(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        word.push('"');
                    }
                    Some('"') => break,
                    Some(c) => word.push(c),
                    None => return Err("unterminated quoted name".into()),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_in_any_case() {
        assert_eq!(parse("show pools;"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("  SHOW Backends "), Ok(Command::Show(Show::Backends)));
        assert_eq!(
            parse("show coordination"),
            Ok(Command::Show(Show::Coordination))
        );
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(
            parse("PAUSE appdb;"),
            Ok(Command::Pause(Some("appdb".into())))
        );
        assert_eq!(
            parse("resume \"My Db\""),
            Ok(Command::Resume(Some("My Db".into())))
        );
        assert_eq!(parse("reload"), Ok(Command::Reload));
        assert_eq!(
            parse("shutdown;"),
            Ok(Command::Shutdown(ShutdownMode::WaitForServers))
        );
        assert_eq!(
            parse("SHUTDOWN wait_for_servers"),
            Ok(Command::Shutdown(ShutdownMode::WaitForServers))
        );
        assert_eq!(
            parse("shutdown WAIT_FOR_CLIENTS;"),
            Ok(Command::Shutdown(ShutdownMode::WaitForClients))
        );
        assert_eq!(parse("KILL appdb"), Ok(Command::Kill("appdb".into())));
        assert_eq!(parse("kill_client 42"), Ok(Command::KillClient(42)));
        assert_eq!(parse("RECONNECT"), Ok(Command::Reconnect(None)));
        assert_eq!(
            parse("reconnect appdb"),
            Ok(Command::Reconnect(Some("appdb".into())))
        );
        assert_eq!(parse("wait_close"), Ok(Command::WaitClose(None)));
        assert_eq!(
            parse("WAIT_CLOSE appdb;"),
            Ok(Command::WaitClose(Some("appdb".into())))
        );
        assert!(parse("WAIT_CLOSE a b").is_err());
        assert_eq!(parse("DISABLE appdb"), Ok(Command::Disable("appdb".into())));
        assert_eq!(parse("enable appdb"), Ok(Command::Enable("appdb".into())));
        assert_eq!(parse("fence pg1"), Ok(Command::Fence("pg1".into())));
        assert_eq!(parse("switchover"), Ok(Command::Switchover(None)));
        assert_eq!(
            parse("switchover to pg2"),
            Ok(Command::Switchover(Some("pg2".into())))
        );
        assert_eq!(
            parse("verify appdb.accounts(id)"),
            Ok(Command::Verify(vec!["appdb.accounts(id)".into()]))
        );
        assert_eq!(
            parse("SET application_name = 'x'"),
            Ok(Command::Set("application_name".into()))
        );
        assert_eq!(
            parse("set session DateStyle to ISO"),
            Ok(Command::Set("datestyle".into()))
        );
        assert_eq!(
            parse("SET default_pool_size=50"),
            Ok(Command::Set("default_pool_size".into()))
        );
        assert_eq!(parse(";"), Ok(Command::Empty));
    }

    #[test]
    fn explains_what_is_wrong() {
        assert!(parse("SHOW tables").unwrap_err().contains("unknown SHOW"));
        assert!(
            parse("DROP TABLE x")
                .unwrap_err()
                .contains("unknown command \"DROP\"")
        );
        assert!(parse("KILL").unwrap_err().contains("exactly one"));
        assert!(parse("KILL a b").is_err());
        assert!(
            parse("KILL_CLIENT me")
                .unwrap_err()
                .contains("not a client pid")
        );
        assert!(parse("DISABLE").unwrap_err().contains("exactly one"));
        assert!(parse("PAUSE a b").is_err());
        assert!(parse("SWITCHOVER pg2").unwrap_err().contains("usage"));
        assert!(parse("RELOAD now").is_err());
        assert!(parse("SHUTDOWN now").unwrap_err().contains("usage"));
        assert!(parse("FENCE \"pg1").unwrap_err().contains("unterminated"));
    }

    #[test]
    fn only_show_is_read_only() {
        assert!(parse("show stats").unwrap().is_read_only());
        assert!(!parse("pause").unwrap().is_read_only());
        assert!(!parse("verify").unwrap().is_read_only());
    }
}
