//! The admission gate: PAUSE and RESUME, and the pause of a switchover.
//!
//! Every transaction passes the gate before it looks for a server connection
//! and leaves it when the connection goes back. While a database (or all of
//! them) is paused, new transactions wait at the gate and the ones already
//! through finish; [`Gate::drained`] tells when none is left. The open-gate
//! path is two atomic operations.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::registry::{Entry, WaitEnd};

/// What is paused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused {
    /// every database
    pub all: bool,
    /// these databases
    pub databases: BTreeSet<String>,
}

impl Paused {
    /// True when `database`'s transactions wait.
    pub fn covers(&self, database: &str) -> bool {
        self.all || self.databases.contains(database)
    }
}

/// The admission gate.
#[derive(Debug)]
pub struct Gate {
    any: AtomicBool,
    paused: watch::Sender<Paused>,
    counters: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            any: AtomicBool::new(false),
            paused: watch::Sender::new(Paused::default()),
            counters: Mutex::new(HashMap::new()),
        }
    }
}

/// A transaction admitted through the gate; dropping it lets a pause complete.
#[derive(Debug)]
pub struct Admission<'a> {
    /// borrowed rather than shared: a reference count would cost two more locked
    /// instructions per transaction
    counter: &'a AtomicUsize,
    /// whether the transaction waited at a paused gate
    pub waited: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    /// The in-flight counter of `database` (sessions keep it, so entering takes no lock).
    pub fn counter(&self, database: &str) -> Arc<AtomicUsize> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters.entry(database.to_owned()).or_default().clone()
    }

    /// Admits a transaction of `database`, waiting while it is paused; the wait is
    /// registered with the client's entry `waiter`, and ends early when the client is
    /// killed or cancels its request.
    pub async fn enter<'a>(
        &self,
        database: &str,
        counter: &'a AtomicUsize,
        waiter: &Entry,
    ) -> Result<Admission<'a>, WaitEnd> {
        let mut wait = None;
        loop {
            // Count first, then look: a pause that starts now either sees this
            // transaction in flight or is seen by it.
            counter.fetch_add(1, Ordering::SeqCst);
            if !self.is_paused(database) {
                let waited = wait.is_some();
                return Ok(Admission { counter, waited });
            }
            counter.fetch_sub(1, Ordering::SeqCst);
            let wait = wait.get_or_insert_with(|| waiter.begin_wait(None));
            let mut changes = self.paused.subscribe();
            tokio::select! {
                _ = changes.wait_for(|p| !p.covers(database)) => {}
                end = wait.ended() => return Err(end),
            }
        }
    }

    /// True while `database`'s transactions wait; without a pause, one atomic load.
    pub fn is_paused(&self, database: &str) -> bool {
        self.any.load(Ordering::SeqCst) && self.paused.borrow().covers(database)
    }

    /// Pauses `database`, or every database.
    pub fn pause(&self, database: Option<&str>) {
        self.paused.send_modify(|p| match database {
            Some(db) => {
                p.databases.insert(db.to_owned());
            }
            None => p.all = true,
        });
        self.any.store(true, Ordering::SeqCst);
    }

    /// Resumes `database`, or everything.
    pub fn resume(&self, database: Option<&str>) {
        self.paused.send_modify(|p| match database {
            Some(db) => {
                p.databases.remove(db);
            }
            None => *p = Paused::default(),
        });
        let any = {
            let p = self.paused.borrow();
            p.all || !p.databases.is_empty()
        };
        self.any.store(any, Ordering::SeqCst);
    }

    /// What is paused now.
    pub fn paused(&self) -> Paused {
        self.paused.borrow().clone()
    }

    /// Transactions of `database` (or of all) admitted and not finished.
    pub fn in_flight(&self, database: Option<&str>) -> usize {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .iter()
            .filter(|(db, _)| database.is_none_or(|d| d == db.as_str()))
            .map(|(_, c)| c.load(Ordering::SeqCst))
            .sum()
    }

    /// Waits until no transaction of `database` (or of all) is in flight; false on timeout.
    pub async fn drained(&self, database: Option<&str>, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.in_flight(database) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ClientRegistry, tests::someone};

    #[tokio::test]
    async fn a_pause_holds_new_transactions_and_waits_for_running_ones() {
        let gate = Arc::new(Gate::default());
        let counter = gate.counter("db");
        let registry = Arc::new(ClientRegistry::default());
        let client = Arc::new(registry.register(someone(&registry), Arc::default()));
        let running = gate.enter("db", &counter, client.entry()).await.unwrap();
        assert!(!running.waited);
        gate.pause(Some("db"));
        assert!(!gate.drained(Some("db"), Duration::from_millis(20)).await);
        // The waiter holds its admission until released, and tells whether it waited.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let gate = gate.clone();
            let counter = counter.clone();
            let client = client.clone();
            tokio::spawn(async move {
                let admitted = gate.enter("db", &counter, client.entry()).await.unwrap();
                let _ = released.await;
                admitted.waited
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(running);
        assert!(gate.drained(Some("db"), Duration::from_millis(100)).await);
        // Other databases are not paused.
        let other = gate.counter("other");
        drop(gate.enter("other", &other, client.entry()).await);
        gate.resume(Some("db"));
        let admitted = tokio::time::timeout(Duration::from_secs(5), async {
            while gate.in_flight(None) != 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        assert!(admitted.await.is_ok(), "the waiter was not admitted");
        release.send(()).unwrap();
        assert!(waiter.await.unwrap(), "it waited");
        assert_eq!(gate.in_flight(None), 0);
    }

    #[tokio::test]
    async fn a_killed_or_canceling_session_stops_waiting_at_a_paused_gate() {
        let gate = Arc::new(Gate::default());
        let counter = gate.counter("db");
        gate.pause(None);
        let registry = Arc::new(ClientRegistry::default());
        for (end, how) in [(WaitEnd::Canceled, "cancel"), (WaitEnd::Killed, "KILL")] {
            let client = Arc::new(registry.register(someone(&registry), Arc::default()));
            let waiter = {
                let (gate, counter, client) = (gate.clone(), counter.clone(), client.clone());
                tokio::spawn(async move { gate.enter("db", &counter, client.entry()).await.err() })
            };
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!waiter.is_finished());
            match end {
                WaitEnd::Canceled => {
                    let (pid, secret) = (client.pid(), client.secret());
                    registry.cancel(pid, secret, Duration::from_secs(1)).await
                }
                _ => client.entry().ending.kill(),
            }
            let refused = tokio::time::timeout(Duration::from_secs(5), waiter).await;
            let refused = refused.unwrap_or_else(|_| panic!("still waiting after {how}"));
            assert_eq!(refused.unwrap(), Some(end));
            assert_eq!(gate.in_flight(None), 0, "a refused session is not counted");
        }
    }
}
