//! A glance at the SQL text clients send, for the few statements transaction
//! pooling must know about: settings the client changes (SET, RESET), named
//! statements it drops (DEALLOCATE, DISCARD ALL), and features that cannot
//! outlive a transaction (SQL PREPARE, LISTEN, WITH HOLD cursors, temporary
//! tables, session advisory locks), which earn a NOTICE.
//!
//! This is not a parser: it reads keywords, skipping whitespace, comments and
//! quoted text, and a statement it does not recognise is simply passed on.

/// What a query string holds that matters to pooling.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Glance {
    /// settings the statements may change for the rest of the session (lower-cased)
    pub settings: Vec<String>,
    /// a RESET ALL (or DISCARD ALL) is among the statements
    pub reset_all: bool,
    /// the whole text is one `DEALLOCATE [PREPARE] name` (`Some(None)`: `DEALLOCATE ALL`)
    pub deallocate: Option<Option<String>>,
    /// the whole text is one `DISCARD ALL`
    pub discard_all: bool,
    /// why the text will not behave as on a direct connection, if it will not
    pub notice: Option<&'static str>,
}

/// Reads the statements of a query string. Most texts (a single SELECT, INSERT, …)
/// are dismissed after their first word without allocating.
pub fn glance(sql: &[u8]) -> Glance {
    const WORTH_READING: &[&[u8]] = &[
        b"set",
        b"reset",
        b"deallocate",
        b"discard",
        b"prepare",
        b"listen",
        b"declare",
        b"create",
    ];
    let first = first_word(sql);
    let interesting =
        WORTH_READING.iter().any(|w| first.eq_ignore_ascii_case(w)) || needs_reading(sql);
    if !interesting {
        return Glance::default();
    }
    read(sql)
}

fn first_word(sql: &[u8]) -> &[u8] {
    let start = sql
        .iter()
        .position(|b| b.is_ascii_alphabetic())
        .unwrap_or(sql.len());
    let end = sql[start..]
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .map_or(sql.len(), |e| start + e);
    // A comment or quote before the first word: read the whole text to be safe.
    if sql[..start]
        .iter()
        .any(|b| matches!(b, b'-' | b'/' | b'"' | b'\'' | b'$'))
    {
        return b"set";
    }
    &sql[start..end]
}

/// True when the text holds a second statement or names an advisory lock
/// function. Every query text is searched, in one scan for both: for a `;` and for
/// the rarest letter of "advisory", its `v`, which memchr finds many bytes per
/// instruction. Only where one occurs is more read; after the first `;` that ends
/// the text (only blanks follow) there is no `v` left to find.
fn needs_reading(sql: &[u8]) -> bool {
    const WORD: &[u8] = b"advisory";
    for at in memchr::memchr3_iter(b';', b'v', b'V', sql) {
        if sql[at] == b';' {
            return sql[at + 1..]
                .iter()
                .any(|b| !b.is_ascii_whitespace() && *b != b';' && *b != 0);
        }
        if at >= 2
            && sql
                .get(at - 2..at - 2 + WORD.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(WORD))
        {
            return true;
        }
    }
    false
}

fn read(sql: &[u8]) -> Glance {
    let mut glance = Glance::default();
    let statements = split(sql);
    let single = statements.len() == 1;
    for words in &statements {
        let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        match w(0) {
            "set" => {
                let (at, session) = if w(1) == "session" {
                    (2, true)
                } else {
                    (1, false)
                };
                let name = match (w(at), w(at + 1)) {
                    ("local", _) | ("transaction", _) | ("constraints", _) => None,
                    ("characteristics", _) if session => None,
                    ("authorization", _) if session => Some("session_authorization"),
                    ("time", "zone") => Some("timezone"),
                    ("names", _) => Some("client_encoding"),
                    ("schema", _) => Some("search_path"),
                    ("xml", "option") => Some("xmloption"),
                    (name, _) if !name.is_empty() => Some(name),
                    _ => None,
                };
                glance.settings.extend(name.map(str::to_owned));
            }
            "reset" => match (w(1), w(2)) {
                ("all", _) => glance.reset_all = true,
                ("session", "authorization") => {
                    glance.settings.push("session_authorization".into())
                }
                ("time", "zone") => glance.settings.push("timezone".into()),
                (name, _) if !name.is_empty() => glance.settings.push(name.to_owned()),
                _ => {}
            },
            "deallocate" if single => {
                let name = if w(1) == "prepare" { w(2) } else { w(1) };
                glance.deallocate = Some((name != "all").then(|| name.to_owned()));
            }
            "discard" if w(1) == "all" => {
                glance.reset_all = true;
                glance.discard_all = single;
            }
            "prepare" => {
                glance.notice = Some(
                    "SQL PREPARE lives on one server connection and does not survive the transaction in transaction pooling; use the driver's prepared statements (protocol-level, which pgwarden supports) or session pooling",
                );
            }
            "listen" => {
                glance.notice = Some(
                    "LISTEN does not work in transaction pooling: notifications reach whichever client holds that server connection; use session pooling for listeners",
                );
            }
            "declare" if words.windows(2).any(|p| p[0] == "with" && p[1] == "hold") => {
                glance.notice = Some(
                    "cursors WITH HOLD outlive the transaction on one server connection, which the next transaction may not get in transaction pooling; use session pooling",
                );
            }
            "create"
                if matches!(w(1), "temp" | "temporary")
                    || (w(1) == "local" || w(1) == "global")
                        && matches!(w(2), "temp" | "temporary") =>
            {
                glance.notice = Some(
                    "temporary objects live on one server connection, which the next transaction may not get in transaction pooling; create and drop them in the same transaction, or use session pooling",
                );
            }
            _ => {}
        }
        if words
            .iter()
            .any(|t| t.starts_with("pg_advisory_lock") || t.starts_with("pg_try_advisory_lock"))
            && !words.iter().any(|t| t.contains("xact"))
        {
            glance.notice = Some(
                "session advisory locks stay with one server connection after the transaction in transaction pooling; use pg_advisory_xact_lock, or session pooling",
            );
        }
    }
    glance
}

/// The statements of a query string as lower-cased words, quoted text and comments left out.
fn split(sql: &[u8]) -> Vec<Vec<String>> {
    let mut statements = vec![Vec::new()];
    let mut i = 0;
    while i < sql.len() {
        let c = sql[i];
        match c {
            b';' => {
                statements.push(Vec::new());
                i += 1;
            }
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < sql.len() && !(sql[i] == b'*' && sql[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'\'' | b'"' => {
                let mut text = Vec::new();
                i += 1;
                while i < sql.len() {
                    if sql[i] == c {
                        if sql.get(i + 1) == Some(&c) {
                            text.push(c);
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    text.push(sql[i]);
                    i += 1;
                }
                i += 1;
                // A quoted identifier is a word whose case matters; a string literal is not a word.
                if c == b'"'
                    && let Some(current) = statements.last_mut()
                {
                    current.push(String::from_utf8_lossy(&text).into_owned());
                }
            }
            b'$' => {
                // $tag$ … $tag$ quoting
                let end = sql[i + 1..]
                    .iter()
                    .position(|&b| !(b.is_ascii_alphanumeric() || b == b'_'));
                match end.map(|e| i + 1 + e) {
                    Some(close) if sql[close] == b'$' => {
                        let tag = &sql[i..=close];
                        let body = close + 1;
                        let found = sql[body..].windows(tag.len()).position(|w| w == tag);
                        i = found.map_or(sql.len(), |f| body + f + tag.len());
                    }
                    _ => i += 1,
                }
            }
            c if c.is_ascii_alphanumeric() || c == b'_' => {
                let start = i;
                while i < sql.len()
                    && (sql[i].is_ascii_alphanumeric() || sql[i] == b'_' || sql[i] == b'.')
                {
                    i += 1;
                }
                let word = String::from_utf8_lossy(&sql[start..i]).to_ascii_lowercase();
                if let Some(current) = statements.last_mut() {
                    current.push(word);
                }
            }
            _ => i += 1,
        }
    }
    statements.retain(|s| !s.is_empty());
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_session_settings_but_not_local_ones() {
        assert_eq!(
            glance(b"SET statement_timeout = '5s'").settings,
            ["statement_timeout"]
        );
        assert_eq!(
            glance(b"set session search_path to a, b;").settings,
            ["search_path"]
        );
        assert_eq!(glance(b"SET TIME ZONE 'UTC'").settings, ["timezone"]);
        assert_eq!(glance(b"SET ROLE admin").settings, ["role"]);
        assert_eq!(glance(b"SET myapp.tenant = 7").settings, ["myapp.tenant"]);
        assert!(glance(b"SET LOCAL work_mem = '1MB'").settings.is_empty());
        assert!(
            glance(b"SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                .settings
                .is_empty()
        );
        assert_eq!(glance(b"RESET work_mem").settings, ["work_mem"]);
        assert!(glance(b"RESET ALL").reset_all);
        assert_eq!(
            glance(b"BEGIN; SET work_mem = '2MB'; SELECT ';'; SET x.y = 1; COMMIT").settings,
            ["work_mem", "x.y"]
        );
        assert!(glance(b"SELECT 'SET x = 1'").settings.is_empty());
        assert!(
            glance(b"/* SET x = 1 */ SELECT 1 -- SET y = 2")
                .settings
                .is_empty()
        );
        assert!(glance(b"SELECT $$ ; SET x = 1 $$").settings.is_empty());
    }

    #[test]
    fn recognises_deallocate_and_discard_only_alone() {
        assert_eq!(glance(b"DEALLOCATE s1").deallocate, Some(Some("s1".into())));
        assert_eq!(
            glance(b"deallocate prepare \"S1\";").deallocate,
            Some(Some("S1".into()))
        );
        assert_eq!(glance(b"DEALLOCATE ALL").deallocate, Some(None));
        assert_eq!(glance(b"DEALLOCATE a; SELECT 1").deallocate, None);
        let g = glance(b"DISCARD ALL");
        assert!(g.discard_all && g.reset_all);
        assert!(!glance(b"DISCARD PLANS").discard_all);
    }

    #[test]
    fn warns_about_what_does_not_survive_the_transaction() {
        assert!(glance(b"PREPARE q AS SELECT 1").notice.is_some());
        assert!(glance(b"LISTEN jobs").notice.is_some());
        assert!(
            glance(b"DECLARE c CURSOR WITH HOLD FOR SELECT 1")
                .notice
                .is_some()
        );
        assert!(glance(b"CREATE TEMP TABLE t (x int)").notice.is_some());
        assert!(glance(b"SELECT pg_advisory_lock(1)").notice.is_some());
        assert!(glance(b"SELECT pg_advisory_xact_lock(1)").notice.is_none());
        assert!(glance(b"select PG_ADVISORY_LOCK(1)").notice.is_some());
        assert!(needs_reading(b"an Advisory"));
        assert!(!needs_reading(b"v ad visory advisor"));
        assert!(needs_reading(b"select pg_advisory_lock(1);"));
        assert!(!needs_reading(b"select avg(v) from t; \n;\0"));
        assert!(needs_reading(b"select avg(v) from t; select 2"));
        assert!(needs_reading(b"select 1;;v"));
        assert!(glance(b"DECLARE c CURSOR FOR SELECT 1").notice.is_none());
        assert!(
            glance(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1")
                .notice
                .is_none()
        );
        assert_eq!(glance(b"SELECT 1"), Glance::default());
    }
}
