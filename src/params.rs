//! Session parameters: what a client asked for, what a server connection has, and
//! the statement that makes the second match the first.
//!
//! In transaction pooling a client's settings (application_name, TimeZone,
//! search_path, extra_float_digits, …) must follow it from server connection to
//! server connection and must never leak to the next client. Each client holds
//! an immutable [`ParamSet`]; each server connection remembers the set last
//! applied to it. At checkout the two are compared (a pointer check in the common
//! case) and, only when they differ, one statement sets what is missing and
//! resets what is extra.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, Weak};

/// Reported parameters (ParameterStatus) a client can change with SET; when the server
/// reports a new value for one of these, it becomes part of the client's set.
const SETTABLE_REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "default_transaction_read_only",
    "intervalstyle",
    "search_path",
    "standard_conforming_strings",
    "timezone",
];

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// One shared copy of each distinct set clients log in with. Most clients of an
/// application send the same startup settings, so they share one set: less memory
/// per client, and a server connection last used by any of them already matches
/// (the pointer check at checkout).
#[derive(Debug, Default)]
pub struct Interner {
    sets: Mutex<HashMap<ParamSet, Weak<ParamSet>>>,
}

/// Above this many sets, the ones no client holds any more are dropped.
const PRUNE_AT: usize = 1024;

impl Interner {
    /// The shared copy of `set`.
    pub fn intern(&self, set: ParamSet) -> Arc<ParamSet> {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = sets.get(&set).and_then(Weak::upgrade) {
            return shared;
        }
        if sets.len() >= PRUNE_AT {
            sets.retain(|_, w| w.strong_count() > 0);
        }
        // One copy as the key (per distinct set, not per client); the value dies with
        // the last client that holds the set.
        let shared = Arc::new(set.clone());
        sets.insert(set, Arc::downgrade(&shared));
        shared
    }
}

/// A client's session settings: lower-cased names with values, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ParamSet {
    entries: Vec<(String, String)>,
}

impl ParamSet {
    /// Builds a set from `(name, value)` pairs; later pairs win.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> ParamSet {
        let mut set = ParamSet::default();
        for (name, value) in pairs {
            set.set(name, value);
        }
        set
    }

    /// Value of `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.position(&name)
            .ok()
            .map(|i| self.entries[i].1.as_str())
    }

    /// The entries, sorted by lower-cased name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, lower: &str) -> Result<usize, usize> {
        self.entries
            .binary_search_by(|(n, _)| n.as_str().cmp(lower))
    }

    fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.position(&name) {
            Ok(i) => self.entries[i].1 = value.to_owned(),
            Err(i) => self.entries.insert(i, (name, value.to_owned())),
        }
    }

    /// Sets `name` (any case) to `value`.
    pub fn insert(&mut self, name: &str, value: &str) {
        self.set(name, value);
    }

    /// Removes `name` (any case).
    pub fn remove(&mut self, name: &str) {
        let name = name.to_ascii_lowercase();
        if let Ok(i) = self.position(&name) {
            self.entries.remove(i);
        }
    }

    /// The set after the server reported `name = value`, if that changes the client's
    /// settings; `None` when the report is not the client's business or changes nothing.
    pub fn after_report(&self, name: &str, value: &str) -> Option<ParamSet> {
        let lower = name.to_ascii_lowercase();
        let tracked = SETTABLE_REPORTED.contains(&lower.as_str()) || self.position(&lower).is_ok();
        if !tracked || self.get(&lower) == Some(value) {
            return None;
        }
        let mut next = self.clone();
        next.set(&lower, value);
        Some(next)
    }
}

/// True for startup parameter names pgwarden applies as settings.
pub fn is_setting(name: &str) -> bool {
    !NOT_SETTINGS.contains(&name) && !name.starts_with("_pq_.")
}

/// True for names that are safe to put in a statement unquoted (GUC names, including
/// custom `prefix.name` ones).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Parses a startup `options` value: `-c name=value` and `--name=value` items,
/// separated by spaces, with `\` escaping the next character (PostgreSQL's rules).
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                word.extend(chars.next());
                in_word = true;
            }
            c if c.is_ascii_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let assignment = if w == "-c" {
            words
                .next()
                .ok_or_else(|| "\"-c\" in options is missing name=value".to_owned())?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(format!(
                "unsupported item \"{w}\" in options; only -c name=value and --name=value are supported"
            ));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("\"{assignment}\" in options is not name=value"))?;
        // PostgreSQL treats '-' in option names as '_'.
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

/// The statement that turns a server connection's settings `from` (None: server
/// defaults) into `to`, or `None` when they already agree.
pub fn sync_statement(from: Option<&Arc<ParamSet>>, to: &Arc<ParamSet>) -> Option<String> {
    let empty = ParamSet::default();
    let from = match from {
        Some(f) if Arc::ptr_eq(f, to) => return None,
        Some(f) => f.as_ref(),
        None => &empty,
    };
    if from == to.as_ref() {
        return None;
    }
    let mut sets = Vec::new();
    for (name, value) in to.iter() {
        if from.get(name) != Some(value) {
            sets.push(format!(
                "pg_catalog.set_config('{name}', {}, false)",
                literal(value)
            ));
        }
    }
    let mut sql = String::new();
    if !sets.is_empty() {
        let _ = write!(sql, "SELECT {};", sets.join(", "));
    }
    for (name, _) in from.iter() {
        if to.get(name).is_none() {
            let _ = write!(sql, "RESET {name};");
        }
    }
    Some(sql)
}

/// An escape-string literal: correct whatever `standard_conforming_strings` says.
pub fn literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 3);
    out.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_sets_are_shared_and_forgotten_with_their_last_holder() {
        let interner = Interner::default();
        let a = interner.intern(ParamSet::from_pairs([("timezone", "UTC")]));
        let b = interner.intern(ParamSet::from_pairs([("timezone", "UTC")]));
        let c = interner.intern(ParamSet::from_pairs([("timezone", "CET")]));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(
            weak.upgrade().is_none(),
            "the interner holds no client's set"
        );
    }

    fn set(pairs: &[(&str, &str)]) -> Arc<ParamSet> {
        Arc::new(ParamSet::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn names_are_case_insensitive_and_sorted() {
        let s = ParamSet::from_pairs([("TimeZone", "UTC"), ("application_name", "a")]);
        assert_eq!(s.get("timezone"), Some("UTC"));
        assert_eq!(s.get("TIMEZONE"), Some("UTC"));
        let names: Vec<_> = s.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["application_name", "timezone"]);
    }

    #[test]
    fn sync_sets_missing_and_resets_extra() {
        let a = set(&[("application_name", "a"), ("timezone", "UTC")]);
        let b = set(&[("application_name", "b"), ("search_path", "x, y")]);
        assert_eq!(sync_statement(Some(&a), &a), None);
        assert_eq!(
            sync_statement(
                Some(&set(&[("timezone", "UTC")])),
                &set(&[("timezone", "UTC")])
            ),
            None
        );
        assert_eq!(sync_statement(None, &set(&[])), None);
        assert_eq!(
            sync_statement(Some(&a), &b).unwrap(),
            "SELECT pg_catalog.set_config('application_name', E'b', false), \
             pg_catalog.set_config('search_path', E'x, y', false);RESET timezone;"
        );
        assert_eq!(
            sync_statement(Some(&a), &set(&[])).unwrap(),
            "RESET application_name;RESET timezone;"
        );
    }

    #[test]
    fn values_cannot_escape_their_literal() {
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(
            literal("a\\'; DROP TABLE x; --"),
            "E'a\\\\''; DROP TABLE x; --'"
        );
    }

    #[test]
    fn reports_update_only_tracked_settings() {
        let s = ParamSet::from_pairs([("extra_float_digits", "3")]);
        let next = s.after_report("TimeZone", "Europe/Paris").unwrap();
        assert_eq!(next.get("timezone"), Some("Europe/Paris"));
        assert_eq!(next.after_report("TimeZone", "Europe/Paris"), None);
        assert_eq!(s.after_report("is_superuser", "on"), None);
        assert_eq!(s.after_report("server_version", "15"), None);
    }

    #[test]
    fn options_follow_postgres_rules() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB").unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "1MB".into())
            ]
        );
        assert_eq!(
            parse_options(r"-c application_name=with\ space").unwrap(),
            vec![("application_name".into(), "with space".into())]
        );
        assert!(parse_options("-d 5").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
        assert_eq!(parse_options("  ").unwrap(), vec![]);
    }
}
