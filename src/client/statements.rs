//! Named prepared statements across pooled server connections.
//!
//! Drivers prepare a named statement once (Parse "s1") and use it later
//! (Bind "s1"), often on another server connection when transactions are
//! pooled. pgwarden gives each distinct statement (query text and parameter
//! types) one server-side name, `pgw_<hash>`, shared by every client that
//! prepares the same text, and keeps:
//!
//! - per client, its names → the statement ([`ClientStatements`]);
//! - per server connection, which server-side names it has prepared, bounded
//!   and least-recently-used first out ([`ServerStatements`]).
//!
//! A Bind or Describe of a statement the chosen server connection lacks is
//! preceded by an injected Parse whose ParseComplete is swallowed; a client's
//! Parse of a statement the server already has is answered by pgwarden itself,
//! and so is one between transactions that a server of the database has
//! accepted before; a client's Close only forgets the client's name.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{BufMut, Bytes, BytesMut};

/// One distinct statement.
#[derive(Debug)]
pub struct Statement {
    /// its name on every server connection
    pub server_name: Arc<str>,
    /// the Parse body after the statement name: query, NUL, parameter types
    pub body: Bytes,
    /// session settings its SQL changes (a prepared `SET`), re-read after it runs
    pub settings: Box<[String]>,
    /// the registry's key: the search_path it was prepared under, NUL, the body
    key: Bytes,
    /// a server of this database has accepted it
    parsed: AtomicBool,
    /// how many client names stand for it
    clients: AtomicUsize,
}

/// Statements are the same when their server-side names are.
impl PartialEq for Statement {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
    }
}

impl Eq for Statement {}

impl Statement {
    /// Notes that a server accepted the statement.
    pub fn confirm(&self) {
        self.parsed.store(true, Ordering::Relaxed);
    }

    /// True once a server has accepted it: a client preparing it again can be
    /// answered without a server.
    pub fn confirmed(&self) -> bool {
        self.parsed.load(Ordering::Relaxed)
    }

    /// True while some client holds it by name. A statement only server connections
    /// hold may predate a schema change, so a client preparing its text has it
    /// prepared again rather than answered from what the server holds.
    pub fn in_use(&self) -> bool {
        self.clients.load(Ordering::Relaxed) > 0
    }

    /// A Parse message preparing this statement under its server-side name.
    pub fn parse_message(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.server_name.len() + self.body.len() + 6);
        out.put_u8(b'P');
        out.put_i32((4 + self.server_name.len() + 1 + self.body.len()) as i32);
        out.put_slice(self.server_name.as_bytes());
        out.put_u8(0);
        out.put_slice(&self.body);
        out
    }
}

/// One registry per client-facing database: whether a statement is valid depends
/// on the database it is prepared in.
#[derive(Debug, Default)]
pub struct Registries {
    by_database: Mutex<HashMap<String, Arc<Registry>>>,
}

impl Registries {
    /// The registry of `database`, created on first use.
    pub fn of(&self, database: &str) -> Arc<Registry> {
        let mut map = self.by_database.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = map.get(database) {
            return r.clone();
        }
        let registry = Arc::new(Registry::default());
        map.insert(database.to_owned(), registry.clone());
        registry
    }
}

/// Every statement a database's clients have prepared, by content and the
/// search_path it was prepared under (the same text can mean different tables);
/// entries die when no client and no server connection holds them.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    by_body: HashMap<Bytes, Weak<Statement>>,
    by_name: HashMap<Arc<str>, Weak<Statement>>,
}

/// Above this many entries the registry drops the dead ones.
const PRUNE_AT: usize = 10_000;

impl Registry {
    /// The statement for a Parse body (query and parameter types) under `search_path`,
    /// created on first use. Identical ones share one statement; the name is a hash,
    /// made unique within the process if two ever hash alike (or a retired one lives on).
    pub fn statement(&self, search_path: &str, body: &[u8]) -> Arc<Statement> {
        let key = registry_key(search_path, body);
        let mut known = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = known.by_body.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        if known.by_body.len() >= PRUNE_AT {
            known.by_body.retain(|_, w| w.strong_count() > 0);
            known.by_name.retain(|_, w| w.strong_count() > 0);
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let hash = hasher.finish();
        let taken = |known: &Known, name: &str| {
            known
                .by_name
                .get(name)
                .is_some_and(|w| w.strong_count() > 0)
        };
        let mut name = format!("pgw_{hash:016x}");
        let mut n = 0;
        while taken(&known, &name) {
            n += 1;
            name = format!("pgw_{hash:016x}_{n}");
        }
        let glance = super::sql::glance(crate::protocol::messages::cstr(body).0);
        let statement = Arc::new(Statement {
            server_name: name.into(),
            body: key.slice(search_path.len() + 1..),
            settings: glance.settings.into(),
            key: key.clone(),
            parsed: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&statement);
        known.by_body.insert(key, weak.clone());
        known.by_name.insert(statement.server_name.clone(), weak);
        statement
    }

    /// Stops handing out `statement` for new Parses: a server said its result type
    /// changed (the schema changed under it), so the next Parse prepares it afresh
    /// under a new name. Clients holding it keep it, and its errors, as they would
    /// keep a stale statement on a direct connection.
    pub fn retire(&self, statement: &Statement) {
        let mut known = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let current = known
            .by_body
            .get(&statement.key)
            .and_then(Weak::upgrade)
            .is_some_and(|s| s.server_name == statement.server_name);
        if current {
            known.by_body.remove(&statement.key);
        }
    }

    /// The statement for a Parse body under `search_path`, if it exists and a server
    /// has accepted it.
    pub fn confirmed(&self, search_path: &str, body: &[u8]) -> Option<Arc<Statement>> {
        let key = registry_key(search_path, body);
        let known = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        known
            .by_body
            .get(&key)
            .and_then(Weak::upgrade)
            .filter(|s| s.confirmed() && s.in_use())
    }
}

fn registry_key(search_path: &str, body: &[u8]) -> Bytes {
    let mut key = BytesMut::with_capacity(search_path.len() + 1 + body.len());
    key.put_slice(search_path.as_bytes());
    key.put_u8(0);
    key.put_slice(body);
    key.freeze()
}

/// A client's named statements.
#[derive(Debug, Default)]
pub struct ClientStatements {
    /// made at the first name: most clients never name a statement, and every
    /// session, idle ones included, carries this field (a map's own is 48 bytes)
    #[allow(clippy::box_collection)]
    names: Option<Box<HashMap<String, Arc<Statement>>>>,
}

impl ClientStatements {
    /// The statement a client name stands for.
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.names.as_ref()?.get(std::str::from_utf8(name).ok()?)
    }

    /// True when the client has a statement by this name.
    pub fn contains(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    /// Records a client name.
    pub fn insert(&mut self, name: &[u8], statement: Arc<Statement>) {
        statement.clients.fetch_add(1, Ordering::Relaxed);
        let old = self
            .names
            .get_or_insert_default()
            .insert(String::from_utf8_lossy(name).into_owned(), statement);
        old.inspect(released);
    }

    /// Forgets a client name (Close, DEALLOCATE, a failed Parse).
    pub fn remove(&mut self, name: &[u8]) -> bool {
        let name = std::str::from_utf8(name).ok();
        name.and_then(|n| self.names.as_mut()?.remove(n))
            .inspect(released)
            .is_some()
    }

    /// Forgets every name (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        if let Some(names) = &mut self.names {
            names.drain().for_each(|(_, s)| released(&s));
        }
    }

    /// How many names the client holds.
    pub fn len(&self) -> usize {
        self.names.as_ref().map_or(0, |names| names.len())
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ClientStatements {
    fn drop(&mut self) {
        self.clear();
    }
}

fn released(statement: &Arc<Statement>) {
    statement.clients.fetch_sub(1, Ordering::Relaxed);
}

/// The statements one server connection has prepared, least recently used first out.
/// Holding them keeps them in the registry, known good, while any server has them.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<Arc<str>, (u64, Arc<Statement>)>,
    tick: u64,
}

impl ServerStatements {
    /// True when `name` is prepared here; marks it used.
    pub fn touch(&mut self, name: &Arc<str>) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some((t, _)) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `statement` as prepared; returns the server-side name evicted to stay
    /// within `capacity`.
    pub fn insert(&mut self, statement: Arc<Statement>, capacity: usize) -> Option<Arc<str>> {
        self.tick += 1;
        let name = statement.server_name.clone();
        let evicted = if self.used.len() >= capacity.max(1) && !self.used.contains_key(&name) {
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(n, _)| n.clone());
            oldest.inspect(|n| {
                self.used.remove(n);
            })
        } else {
            None
        };
        self.used.insert(name, (self.tick, statement));
        evicted
    }

    /// Forgets `name` (its Parse failed).
    pub fn remove(&mut self, name: &str) {
        self.used.remove(name);
    }

    /// Forgets everything (the session was reset).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// How many statements are prepared here.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// A Close message for a server-side statement name.
pub fn close_message(name: &str) -> BytesMut {
    let mut out = BytesMut::with_capacity(name.len() + 7);
    out.put_u8(b'C');
    out.put_i32((4 + 1 + name.len() + 1) as i32);
    out.put_u8(b'S');
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_statements_share_one_server_name() {
        let registry = Registry::default();
        let a = registry.statement("", b"SELECT $1\0\0\x01\0\0\0\x17");
        let b = registry.statement("", b"SELECT $1\0\0\x01\0\0\0\x17");
        let c = registry.statement("", b"SELECT $1\0\0\x01\0\0\0\x19");
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.server_name, c.server_name);
        assert!(a.server_name.starts_with("pgw_"));
        // A Parse for it names the server-side statement and keeps the body.
        let parse = a.parse_message();
        assert_eq!(parse[0], b'P');
        assert_eq!(
            i32::from_be_bytes([parse[1], parse[2], parse[3], parse[4]]) as usize,
            parse.len() - 1
        );
        assert!(parse.ends_with(&a.body));
    }

    #[test]
    fn dead_statements_are_recreated() {
        let registry = Registry::default();
        let name = registry
            .statement("", b"SELECT 1\0\0\0")
            .server_name
            .clone();
        let again = registry.statement("", b"SELECT 1\0\0\0");
        assert_eq!(again.server_name, name);
    }

    #[test]
    fn the_server_cache_evicts_the_least_recently_used() {
        let registry = Registry::default();
        let mut cache = ServerStatements::default();
        let [a, b, c] =
            [b"a\0\0\0", b"b\0\0\0", b"c\0\0\0"].map(|body| registry.statement("", body));
        assert_eq!(cache.insert(a.clone(), 2), None);
        assert_eq!(cache.insert(b.clone(), 2), None);
        assert!(cache.touch(&a.server_name));
        assert_eq!(cache.insert(c.clone(), 2), Some(b.server_name.clone()));
        assert!(!cache.touch(&b.server_name));
        assert!(cache.touch(&a.server_name) && cache.touch(&c.server_name));
        cache.remove(&a.server_name);
        assert_eq!(cache.len(), 1);
        // A statement is answered without a server only once a server accepted it
        // and while a client holds it.
        let body = c.body.clone();
        let mut client = ClientStatements::default();
        client.insert(b"s", c.clone());
        assert!(registry.confirmed("", &body).is_none(), "never accepted");
        c.confirm();
        assert!(registry.confirmed("", &body).is_some());
        drop(client);
        assert!(
            registry.confirmed("", &body).is_none(),
            "no client holds it"
        );
        // What a server connection holds stays in the registry after its clients are gone.
        drop(c);
        assert!(Arc::ptr_eq(
            &registry.statement("", &body),
            &cache.used.values().next().unwrap().1
        ));
    }

    #[test]
    fn client_names_map_to_statements() {
        let registry = Registry::default();
        let mut client = ClientStatements::default();
        client.insert(b"s1", registry.statement("", b"SELECT 1\0\0\0"));
        assert!(client.contains(b"s1"));
        assert!(!client.contains(b"s2"));
        assert!(client.remove(b"s1"));
        assert!(client.is_empty());
        let close = close_message("pgw_1");
        assert_eq!(&close[5..], b"Spgw_1\0");
    }
}
