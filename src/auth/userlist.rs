//! The user list: PgBouncer's `auth_file` format.
//!
//! One user per line, `"name" "secret"`, with `""` standing for a quote inside a
//! field. A secret is a plain password, an md5 hash (`md5` + 32 hex digits) or a
//! SCRAM-SHA-256 verifier as PostgreSQL stores it. Lines starting with `#` or `;`
//! and blank lines are ignored; anything else that is not two quoted fields is an
//! error naming the line.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pgwire::api::auth::sasl::scram::{SCRAM_ITERATIONS, ScramSecret, gen_salted_password};

use super::scram::{Key, recover_client_key};
use crate::config::ConfigError;

/// What the user list stores for one user.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// a plain password
    Plain(String),
    /// `md5` followed by md5(password || user) in hex
    Md5(String),
    /// a SCRAM-SHA-256 verifier
    Scram(ScramVerifier),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets never reach logs, not even through Debug.
        f.write_str(match self {
            Secret::Plain(_) => "Plain(<redacted>)",
            Secret::Md5(_) => "Md5(<redacted>)",
            Secret::Scram(_) => "Scram(<redacted>)",
        })
    }
}

impl Secret {
    /// Reads a secret as PostgreSQL stores it: a SCRAM verifier, an md5 hash, or
    /// else a plain password.
    pub fn parse(s: &str) -> Result<Secret, String> {
        if s.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(s)
                .map(Secret::Scram)
                .ok_or_else(|| "malformed SCRAM-SHA-256 verifier".to_owned());
        }
        let is_md5 =
            s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit());
        Ok(if is_md5 {
            Secret::Md5(s.to_ascii_lowercase())
        } else {
            Secret::Plain(s.to_owned())
        })
    }

    /// The kind of secret, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain password",
            Secret::Md5(_) => "md5 hash",
            Secret::Scram(_) => "SCRAM verifier",
        }
    }
}

/// The parts of a `SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey` verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    /// PBKDF2 iteration count
    pub iterations: usize,
    /// salt
    pub salt: Vec<u8>,
    /// SHA-256(ClientKey)
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key")
    pub server_key: Vec<u8>,
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ScramVerifier({} iterations, <redacted>)",
            self.iterations
        )
    }
}

impl ScramVerifier {
    /// Parses PostgreSQL's textual verifier.
    pub fn parse(text: &str) -> Option<ScramVerifier> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let verifier = ScramVerifier {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: STANDARD.decode(salt).ok()?,
            stored_key: STANDARD.decode(stored).ok()?,
            server_key: STANDARD.decode(server).ok()?,
        };
        (verifier.stored_key.len() == 32 && verifier.server_key.len() == 32).then_some(verifier)
    }

    /// Derives a verifier from a plain password with a fresh random salt.
    pub fn from_password(password: &str) -> ScramVerifier {
        let salt: [u8; 16] = rand::random();
        let salted = gen_salted_password(password, &salt, SCRAM_ITERATIONS);
        match ScramSecret::verifier_from_salted_password(salt.to_vec(), salted, SCRAM_ITERATIONS) {
            ScramSecret::Verifier {
                salt,
                iterations,
                stored_key,
                server_key,
            } => ScramVerifier {
                iterations,
                salt,
                stored_key,
                server_key,
            },
            ScramSecret::SaltedPassword { .. } => unreachable!("verifier_from_salted_password"),
        }
    }

    /// The form pgwire's SCRAM server takes.
    pub fn to_secret(&self) -> ScramSecret {
        ScramSecret::Verifier {
            salt: self.salt.clone(),
            iterations: self.iterations,
            stored_key: self.stored_key.clone(),
            server_key: self.server_key.clone(),
        }
    }
}

/// One user's entry.
#[derive(Debug)]
pub struct Credential {
    /// user name
    pub name: String,
    /// stored secret
    pub secret: Secret,
    /// SCRAM verifier derived once from a plain password, on first use
    derived_scram: OnceLock<ScramVerifier>,
    /// for a stored SCRAM verifier: the ClientKey a client proved it has
    client_key: OnceLock<[u8; 32]>,
}

impl Credential {
    /// A credential for `name` with `secret`.
    pub fn new(name: String, secret: Secret) -> Credential {
        Credential {
            name,
            secret,
            derived_scram: OnceLock::new(),
            client_key: OnceLock::new(),
        }
    }

    /// Keeps the ClientKey of a client that passed SCRAM against the stored
    /// verifier (see [`super::scram`]); plain passwords need none.
    pub fn learn_client_key(&self, client_first: &[u8], server_first: &[u8], client_final: &[u8]) {
        if let Secret::Scram(v) = &self.secret
            && self.client_key.get().is_none()
            && let Some(key) = recover_client_key(v, client_first, server_first, client_final)
        {
            let _ = self.client_key.set(key);
        }
    }

    /// What pgwarden can log in to a server's SCRAM with, if anything.
    pub fn scram_key(&self) -> Option<Key> {
        match &self.secret {
            Secret::Plain(p) => Some(Key::Password(p.clone())),
            Secret::Scram(v) => self.client_key.get().map(|k| Key::Recovered {
                verifier: v.clone(),
                client_key: *k,
            }),
            Secret::Md5(_) => None,
        }
    }

    /// The SCRAM verifier clients are checked against, if this secret allows SCRAM.
    pub fn scram(&self) -> Option<&ScramVerifier> {
        match &self.secret {
            Secret::Scram(v) => Some(v),
            Secret::Plain(p) => Some(
                self.derived_scram
                    .get_or_init(|| ScramVerifier::from_password(p)),
            ),
            Secret::Md5(_) => None,
        }
    }

    /// The md5 hash (`md5…`) clients are checked against, if this secret allows md5.
    pub fn md5(&self) -> Option<String> {
        match &self.secret {
            Secret::Md5(h) => Some(h.clone()),
            Secret::Plain(p) => Some(md5_secret(&self.name, p)),
            Secret::Scram(_) => None,
        }
    }
}

/// `md5` + hex(md5(password || user)), PostgreSQL's stored md5 form.
pub fn md5_secret(user: &str, password: &str) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{:x}", h.finalize())
}

/// The answer to an md5 challenge: `md5` + hex(md5(hex part of the stored hash || salt)).
pub fn md5_response(stored: &str, salt: &[u8; 4]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(stored.trim_start_matches("md5").as_bytes());
    h.update(salt);
    format!("md5{:x}", h.finalize())
}

/// All users pgwarden knows.
#[derive(Debug, Default)]
pub struct UserList {
    users: HashMap<String, Arc<Credential>>,
}

impl UserList {
    /// Reads and parses a user list file.
    pub fn load(path: &Path) -> Result<UserList, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "(file)", format!("cannot read: {e}")))?;
        warn_if_readable_by_others(path);
        UserList::parse(&text, path)
    }

    /// Parses user list text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<UserList, ConfigError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let key = format!("line {}", i + 1);
            let (name, rest) = quoted(line).ok_or_else(|| {
                ConfigError::new(path, &key, "expected \"user\" \"secret\" in double quotes")
            })?;
            let (secret, _) = quoted(rest.trim_start()).ok_or_else(|| {
                ConfigError::new(path, &key, "expected a quoted secret after the user name")
            })?;
            if name.is_empty() {
                return Err(ConfigError::new(path, &key, "empty user name"));
            }
            let secret = Secret::parse(&secret).map_err(|r| ConfigError::new(path, &key, r))?;
            if users
                .insert(
                    name.clone(),
                    Arc::new(Credential::new(name.clone(), secret)),
                )
                .is_some()
            {
                return Err(ConfigError::new(
                    path,
                    &key,
                    format!("user \"{name}\" is listed twice"),
                ));
            }
        }
        Ok(UserList { users })
    }

    /// The credential of `user`, if listed.
    pub fn get(&self, user: &str) -> Option<Arc<Credential>> {
        self.users.get(user).cloned()
    }

    /// The users' names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when no user is listed.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Reads one `"…"` field (with `""` as an escaped quote) and returns it with the rest of the line.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices().peekable();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if chars.peek().is_some_and(|&(_, n)| n == '"') {
                chars.next();
                out.push('"');
            } else {
                return Some((out, &s[i + 2..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

/// The file's permission bits when group or others may access it: a user list holds secrets.
pub fn open_to_others(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Some(mode) = open_to_others(path) {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:o}"),
            "user list is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
# comment
"alice" "secret"
"bob" "md5c2a5d02c1d4bd4bcd6d00ad3cd7cd2a7"
"carol" "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$G5KZDbtwShYpmJqGGAfjQ1Tpr6ekoYnwZYpbgp5Lmk8=:YWhQvbkWvYdcnQIcTxMfr/jqbfqPHgiP6E2vHpKpf6s="
"quote""d" "pass""word"
"#;

    #[test]
    fn parses_every_secret_kind() {
        let list = UserList::parse(SAMPLE, Path::new("u.txt")).unwrap();
        assert_eq!(list.len(), 4);
        assert!(matches!(list.get("alice").unwrap().secret, Secret::Plain(ref p) if p == "secret"));
        assert!(matches!(list.get("bob").unwrap().secret, Secret::Md5(_)));
        let carol = list.get("carol").unwrap();
        let v = carol.scram().unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt, b"saltsaltsaltsalt");
        assert!(carol.md5().is_none());
        assert!(
            matches!(list.get("quote\"d").unwrap().secret, Secret::Plain(ref p) if p == "pass\"word")
        );
        assert!(list.get("nobody").is_none());
    }

    #[test]
    fn plain_passwords_serve_md5_and_scram() {
        let c = Credential::new("app".into(), Secret::Plain("pw".into()));
        assert_eq!(c.md5().unwrap(), md5_secret("app", "pw"));
        // md5("pwapp"), as PostgreSQL would store it.
        assert_eq!(c.md5().unwrap(), "md581ad3d00fcdf98fbc5f8f9a859590b46");
        let v = c.scram().unwrap();
        assert_eq!(v.iterations, SCRAM_ITERATIONS);
        // Derived once: the same verifier every time.
        assert!(std::ptr::eq(v, c.scram().unwrap()));
    }

    #[test]
    fn errors_name_the_line() {
        let e = UserList::parse("\"a\" \"b\"\nalice secret\n", Path::new("u.txt")).unwrap_err();
        assert_eq!(e.key, "line 2");
        let e = UserList::parse("\"a\"\n", Path::new("u.txt")).unwrap_err();
        assert_eq!(e.key, "line 1");
        let e = UserList::parse("\"a\" \"SCRAM-SHA-256$x\"\n", Path::new("u.txt")).unwrap_err();
        assert!(e.reason.contains("SCRAM"));
        let e = UserList::parse("\"a\" \"1\"\n\"a\" \"2\"\n", Path::new("u.txt")).unwrap_err();
        assert_eq!(e.key, "line 2");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let c = Credential::new("app".into(), Secret::Plain("hunter2".into()));
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
