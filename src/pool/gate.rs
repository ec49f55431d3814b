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

use crate::registry::Ending;

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

    /// Admits a transaction of `database`, waiting while it is paused; `None` when the
    /// session's `ending` says it was killed meanwhile.
    pub async fn enter<'a>(
        &self,
        database: &str,
        counter: &'a AtomicUsize,
        ending: &Ending,
    ) -> Option<Admission<'a>> {
        let mut waited = false;
        loop {
            // Count first, then look: a pause that starts now either sees this
            // transaction in flight or is seen by it.
            counter.fetch_add(1, Ordering::SeqCst);
            if !self.is_paused(database) {
                return Some(Admission { counter, waited });
            }
            counter.fetch_sub(1, Ordering::SeqCst);
            waited = true;
            let mut changes = self.paused.subscribe();
            tokio::select! {
                _ = changes.wait_for(|p| !p.covers(database)) => {}
                _ = ending.killed() => return None,
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

    #[tokio::test]
    async fn a_pause_holds_new_transactions_and_waits_for_running_ones() {
        let gate = Arc::new(Gate::default());
        let counter = gate.counter("db");
        let ending = Arc::new(Ending::default());
        let running = gate.enter("db", &counter, &ending).await.unwrap();
        assert!(!running.waited);
        gate.pause(Some("db"));
        assert!(!gate.drained(Some("db"), Duration::from_millis(20)).await);
        // The waiter holds its admission until released, and tells whether it waited.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let waiter = {
            let gate = gate.clone();
            let counter = counter.clone();
            let ending = ending.clone();
            tokio::spawn(async move {
                let admitted = gate.enter("db", &counter, &ending).await.unwrap();
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
        drop(gate.enter("other", &other, &ending).await);
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
    async fn a_killed_session_stops_waiting_at_a_paused_gate() {
        let gate = Arc::new(Gate::default());
        let counter = gate.counter("db");
        gate.pause(None);
        let ending = Arc::new(Ending::default());
        let waiter = {
            let (gate, counter, ending) = (gate.clone(), counter.clone(), ending.clone());
            tokio::spawn(async move { gate.enter("db", &counter, &ending).await.is_none() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        ending.kill();
        let refused = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(refused.expect("still waiting after KILL").unwrap());
        assert_eq!(gate.in_flight(None), 0, "a refused session is not counted");
    }
}
