//! What logins of one (database, user) learn from servers: the ParameterStatus a
//! new session reports, and which startup settings servers accept (with the value
//! they report back). Shared by that database's pools on every backend, so that
//! a client can log in without waiting for a server, even during a failover.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::params::ParamSet;

/// Most distinct accepted settings remembered; beyond it the memory starts over.
const MAX_ACCEPTED: usize = 1024;

/// Login facts of one (database, user).
#[derive(Debug, Default)]
pub struct Logins {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// ParameterStatus a new server session reports (server defaults)
    welcome: Option<Arc<Vec<(String, String)>>>,
    /// (lower-cased name, value) known to be accepted → the value servers report
    accepted: HashMap<(String, String), String>,
}

impl Logins {
    /// Remembers the ParameterStatus set of a fresh server session (the latest wins,
    /// so that a failover to a newer server version shows).
    pub fn remember_welcome(&self, reported: &[(String, String)]) {
        self.lock().welcome = Some(Arc::new(reported.to_vec()));
    }

    /// The ParameterStatus set for a client with `settings`, if every setting is known to
    /// be accepted and a server session has been seen; `None` means a server must be asked.
    pub fn welcome_for(&self, settings: &ParamSet) -> Option<Vec<(String, String)>> {
        self.lock().welcome_for(settings)
    }

    /// Records that a server accepted `settings`, reporting `reports` while applying
    /// them, and returns the ParameterStatus set such a client is welcomed with.
    pub fn accept(
        &self,
        settings: &ParamSet,
        reports: &[(String, String)],
    ) -> Vec<(String, String)> {
        let mut inner = self.lock();
        if inner.accepted.len() + settings.iter().count() > MAX_ACCEPTED {
            inner.accepted.clear();
        }
        for (name, value) in settings.iter() {
            let reported = reports
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map_or(value, |(_, v)| v.as_str());
            inner
                .accepted
                .insert((name.to_owned(), value.to_owned()), reported.to_owned());
        }
        inner.welcome_for(settings).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn welcome_for(&self, settings: &ParamSet) -> Option<Vec<(String, String)>> {
        let welcome = self.welcome.as_ref()?;
        let mut shown = HashMap::new();
        for (name, value) in settings.iter() {
            let normalized = self.accepted.get(&(name.to_owned(), value.to_owned()))?;
            shown.insert(name, normalized.as_str());
        }
        Some(
            welcome
                .iter()
                .map(|(name, value)| {
                    let v = shown
                        .get(name.to_ascii_lowercase().as_str())
                        .copied()
                        .unwrap_or(value);
                    (name.clone(), v.to_owned())
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_see_server_defaults_overridden_by_their_normalized_settings() {
        let logins = Logins::default();
        let settings =
            ParamSet::from_pairs([("client_encoding", "utf8"), ("extra_float_digits", "3")]);
        assert_eq!(logins.welcome_for(&settings), None);
        logins.remember_welcome(&[
            ("client_encoding".into(), "SQL_ASCII".into()),
            ("server_version".into(), "15.0".into()),
        ]);
        // Settings not yet seen by a server: ask one.
        assert_eq!(logins.welcome_for(&settings), None);
        let shown = logins.accept(&settings, &[("client_encoding".into(), "UTF8".into())]);
        assert_eq!(
            shown,
            vec![
                ("client_encoding".to_owned(), "UTF8".to_owned()),
                ("server_version".to_owned(), "15.0".to_owned())
            ]
        );
        assert_eq!(logins.welcome_for(&settings), Some(shown));
        assert_eq!(
            logins.welcome_for(&ParamSet::default()).unwrap()[0].1,
            "SQL_ASCII"
        );
    }
}
