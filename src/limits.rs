//! Per-user and per-database client limits: `pgwarden.max_user_client_conn` and
//! `pgwarden.max_db_client_conn`, beside the process-wide `max_client_conn`; and
//! the databases the admin console closed to new clients (`DISABLE`).
//!
//! One user or one application must not be able to take every client slot. The
//! check runs once per login, after authentication (so only a user who knows
//! the password can use up that user's slots), under one short lock; the
//! returned [`Admitted`] gives the slots back when the session drops it. With
//! both limits at 0 (the default) nothing is counted and nothing is held.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::General;
use crate::error::ClientError;

/// Client counts per user and per database, for the limits that are set.
#[derive(Debug, Default)]
pub struct Admissions {
    counts: Mutex<Counts>,
    /// databases closed to new clients
    disabled: Mutex<BTreeSet<String>>,
    /// whether `disabled` has any, so that most logins skip its lock
    any_disabled: AtomicBool,
}

#[derive(Debug, Default)]
struct Counts {
    users: HashMap<String, usize>,
    databases: HashMap<String, usize>,
}

/// A session's slots; dropping it gives them back.
#[derive(Debug)]
pub struct Admitted {
    admissions: Arc<Admissions>,
    user: Option<String>,
    database: Option<String>,
}

impl Admissions {
    /// Takes a slot for `user` and one for `database` where a limit is set, or
    /// refuses the login (SQLSTATE 53300) naming the limit.
    pub fn admit(
        self: &Arc<Self>,
        limits: &General,
        user: &str,
        database: &str,
    ) -> Result<Option<Admitted>, ClientError> {
        if self.is_disabled(database) {
            return Err(ClientError::Disabled(database.to_owned()));
        }
        let (max_user, max_db) = (limits.max_user_client_conn, limits.max_db_client_conn);
        if max_user == 0 && max_db == 0 {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let over = |map: &HashMap<String, usize>, name: &str, max: usize| {
            max > 0 && map.get(name).copied().unwrap_or(0) >= max
        };
        if over(&counts.users, user, max_user) {
            return Err(ClientError::LimitReached {
                key: "max_user_client_conn",
                what: format!("user \"{user}\""),
                max: max_user,
            });
        }
        if over(&counts.databases, database, max_db) {
            return Err(ClientError::LimitReached {
                key: "max_db_client_conn",
                what: format!("database \"{database}\""),
                max: max_db,
            });
        }
        let take = |map: &mut HashMap<String, usize>, name: &str| {
            *map.entry(name.to_owned()).or_default() += 1;
            Some(name.to_owned())
        };
        Ok(Some(Admitted {
            admissions: self.clone(),
            user: if max_user > 0 {
                take(&mut counts.users, user)
            } else {
                None
            },
            database: if max_db > 0 {
                take(&mut counts.databases, database)
            } else {
                None
            },
        }))
    }

    /// Refuses new clients of `database` (DISABLE) until [`Admissions::enable`].
    pub fn disable(&self, database: &str) {
        let mut disabled = self.lock_disabled();
        disabled.insert(database.to_owned());
        self.any_disabled.store(true, Ordering::SeqCst);
    }

    /// Lets new clients of `database` in again (ENABLE).
    pub fn enable(&self, database: &str) {
        let mut disabled = self.lock_disabled();
        disabled.remove(database);
        self.any_disabled
            .store(!disabled.is_empty(), Ordering::SeqCst);
    }

    /// True while `database` is closed to new clients; without DISABLE, one atomic load.
    pub fn is_disabled(&self, database: &str) -> bool {
        self.any_disabled.load(Ordering::SeqCst) && self.lock_disabled().contains(database)
    }

    /// The databases closed to new clients.
    pub fn disabled(&self) -> BTreeSet<String> {
        self.lock_disabled().clone()
    }

    fn lock_disabled(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.disabled.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self
            .admissions
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let give_back = |map: &mut HashMap<String, usize>, name: &Option<String>| {
            if let Some(name) = name
                && let Some(n) = map.get_mut(name)
            {
                *n -= 1;
                if *n == 0 {
                    map.remove(name);
                }
            }
        };
        give_back(&mut counts.users, &self.user);
        give_back(&mut counts.databases, &self.database);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(user: usize, db: usize) -> General {
        General {
            max_user_client_conn: user,
            max_db_client_conn: db,
            ..General::default()
        }
    }

    #[test]
    fn counts_per_user_and_database_and_gives_slots_back() {
        let a = Arc::new(Admissions::default());
        assert!(a.admit(&limits(0, 0), "u", "d").unwrap().is_none());
        let l = limits(2, 3);
        let first = a.admit(&l, "u", "d").unwrap();
        let _second = a.admit(&l, "u", "d").unwrap();
        let err = a.admit(&l, "u", "d").unwrap_err();
        assert_eq!(err.sqlstate(), "53300");
        assert!(
            err.to_string().contains("max_user_client_conn = 2"),
            "{err}"
        );
        let _other_user = a.admit(&l, "v", "d").unwrap();
        let err = a.admit(&l, "w", "d").unwrap_err();
        assert!(err.to_string().contains("max_db_client_conn = 3"), "{err}");
        drop(first);
        assert!(a.admit(&l, "u", "d").is_ok());
    }
}
