//! Caps on the server connections several pools open together, as PgBouncer's
//! `max_db_connections` (every user's pool of one database) and
//! `max_user_connections` (every database's pool of one user) bound them, per node.
//!
//! A pool's own size bounds one (database, user); these protect the server's
//! `max_connections` when many users or databases share it. A connection holds a
//! [`Place`] under each cap of its pool for as long as it is open, so every way a
//! connection can close gives its places back. A pool that needs a connection
//! while a cap is full closes an idle connection of another pool under the same
//! cap, and otherwise waits until a place frees or a connection somewhere goes
//! idle. Only a pool that is not in use (no client waiting for it, no transaction
//! finished on it within [`ACTIVE`]), or one holding more than its fair share (the
//! cap divided among the pools in use), gives up an idle connection: under
//! contention connections settle into shares instead of being closed and reopened
//! for every transaction.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::ServerPool;

/// How often a pool waiting for room looks again without being woken.
const RECHECK: Duration = Duration::from_millis(100);

/// A pool that finished a transaction this recently is in use: its idle
/// connections are between its transactions, not spare.
const ACTIVE: Duration = Duration::from_secs(1);

/// One cap: a limit on the connections its member pools have open together.
#[derive(Debug, Default)]
pub struct Cap {
    /// 0: no limit (connections are still counted, so that a reload may set one)
    limit: AtomicUsize,
    open: AtomicUsize,
    /// pools waiting for room; a change wakes them only when there are some
    waiters: AtomicUsize,
    changed: Notify,
    /// the pools it bounds, for closing an idle connection of one when another needs room
    members: Mutex<Vec<Weak<ServerPool>>>,
}

/// A connection's place under a cap, given back when it is dropped.
#[derive(Debug)]
pub struct Place(Arc<Cap>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed_now();
    }
}

impl Cap {
    /// A cap of `limit` connections (0: none).
    pub fn new(limit: usize) -> Arc<Cap> {
        let cap = Cap::default();
        cap.limit.store(limit, Ordering::Relaxed);
        Arc::new(cap)
    }

    /// Applies a reloaded limit; a lower one takes effect as connections close.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::SeqCst);
        self.changed_now();
    }

    /// The limit (0: none).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Connections open under it.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Makes `pool` a member.
    pub fn join(&self, pool: &Arc<ServerPool>) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.retain(|m| m.strong_count() > 0);
        members.push(Arc::downgrade(pool));
    }

    /// A place, if the cap has room.
    fn try_take(self: &Arc<Self>) -> Option<Place> {
        let mut open = self.open.load(Ordering::SeqCst);
        loop {
            let limit = self.limit.load(Ordering::SeqCst);
            if limit != 0 && open >= limit {
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Place(self.clone())),
                Err(now) => open = now,
            }
        }
    }

    /// True when a place can be taken now.
    fn has_room(&self) -> bool {
        let limit = self.limit.load(Ordering::SeqCst);
        limit == 0 || self.open.load(Ordering::SeqCst) < limit
    }

    /// The members other than `asking` that may give up an idle connection for it:
    /// those not in use, and those holding more than a fair share.
    fn yielding(&self, asking: &ServerPool) -> Vec<Arc<ServerPool>> {
        let members: Vec<Arc<ServerPool>> = {
            let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            members.iter().filter_map(Weak::upgrade).collect()
        };
        let in_use = |m: &ServerPool| m.demand() > 0 || m.answered_within(ACTIVE);
        // `asking`, with a client waiting, is one of them.
        let sharing = members.iter().filter(|m| in_use(m)).count().max(1);
        let share = self.limit().div_ceil(sharing);
        members
            .into_iter()
            .filter(|m| !std::ptr::eq(Arc::as_ptr(m), asking))
            .filter(|m| !in_use(m) || m.open_connections() > share)
            .collect()
    }

    /// True when the cap has room, or a member may close an idle connection for it.
    fn can_make_room(&self, asking: &ServerPool) -> bool {
        self.has_room() || self.yielding(asking).iter().any(|m| m.has_idle())
    }

    /// Closes idle connections of members that may give them up until the cap has
    /// room; false when they run out first.
    fn make_room(&self, asking: &ServerPool) -> bool {
        while !self.has_room() {
            if !self.yielding(asking).iter().any(|m| m.close_oldest_idle()) {
                return false;
            }
        }
        true
    }

    /// Something that may make room happened: a place was given back, a member's
    /// connection went idle, or the limit changed. One atomic load when nobody waits.
    pub fn changed_now(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }
}

/// The caps a pool's connections count toward.
#[derive(Debug, Clone)]
pub struct Caps {
    /// the database's, on this node
    pub database: Arc<Cap>,
    /// the user's, on this node
    pub user: Arc<Cap>,
    /// the pool's own, without a limit: it counts the pool's open connections
    pub pool: Arc<Cap>,
}

impl Caps {
    /// The caps of a new pool: `database` and `user` shared, its own counter new.
    pub fn new(database: Arc<Cap>, user: Arc<Cap>) -> Caps {
        Caps {
            database,
            user,
            pool: Cap::new(0),
        }
    }

    /// Places under both caps if both have room now, without closing anything (for
    /// the connections a pool opens on its own, toward `min_pool_size`).
    pub fn take_now(&self) -> Option<Places> {
        // Looked at before either place is taken: a place taken and given back
        // wakes every waiter, as any place given back does.
        if !(self.database.has_room() && self.user.has_room()) {
            return None;
        }
        self.take_both()
    }

    /// Places under both caps, making room by closing other pools' idle
    /// connections when one is full; `None` when that cannot make room now.
    pub fn take(&self, asking: &ServerPool) -> Option<Places> {
        // Nothing is closed unless both caps can give a place; nothing is taken
        // unless both have room (see take_now).
        if !(self.database.can_make_room(asking) && self.user.can_make_room(asking)) {
            return None;
        }
        if !(self.database.make_room(asking) && self.user.make_room(asking)) {
            return None;
        }
        self.take_both()
    }

    fn take_both(&self) -> Option<Places> {
        Some(Places {
            _database: self.database.try_take()?,
            _user: self.user.try_take()?,
            _pool: self.pool.try_take()?,
        })
    }

    /// Waits until something changes under either cap (see [`Cap::changed_now`]),
    /// or [`RECHECK`] passes: whether a pool may give up a connection also depends on
    /// whether its clients wait, which wakes no one. `look` runs once the wait is
    /// registered, so that a change after it is not missed; its `Some` ends the wait.
    pub async fn wait_for<T>(&self, mut look: impl FnMut() -> Option<T>) -> T {
        loop {
            let _waiting = [
                Counted::new(&self.database.waiters),
                Counted::new(&self.user.waiters),
            ];
            let mut database = pin!(self.database.changed.notified());
            let mut user = pin!(self.user.changed.notified());
            database.as_mut().enable();
            user.as_mut().enable();
            if let Some(found) = look() {
                return found;
            }
            tokio::select! {
                () = database => {}
                () = user => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// The places one connection holds, one under each cap of its pool.
#[derive(Debug)]
pub struct Places {
    _database: Place,
    _user: Place,
    _pool: Place,
}

/// Counts one of something (a waiter, a connection being opened) on `counter` for as
/// long as it lives.
pub struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    /// Adds it.
    pub fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_by_the_limit_and_given_back_when_dropped() {
        let cap = Cap::new(2);
        let a = cap.try_take().unwrap();
        let _b = cap.try_take().unwrap();
        assert!(cap.try_take().is_none());
        assert_eq!(cap.open(), 2);
        drop(a);
        assert_eq!(cap.open(), 1);
        assert!(cap.try_take().is_some());
    }

    #[test]
    fn no_limit_still_counts_and_a_lower_limit_holds_as_places_come_back() {
        let cap = Cap::new(0);
        let places: Vec<Place> = (0..5).map(|_| cap.try_take().unwrap()).collect();
        assert_eq!(cap.open(), 5);
        cap.set_limit(3);
        assert!(cap.try_take().is_none());
        drop(places);
        assert_eq!(cap.open(), 0);
        let kept: Vec<Place> = (0..3).map(|_| cap.try_take().unwrap()).collect();
        assert!(cap.try_take().is_none());
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn a_full_cap_refuses_and_nothing_is_taken_under_the_other() {
        let caps = Caps::new(Cap::new(0), Cap::new(1));
        let held = caps.take_now().unwrap();
        assert!(caps.take_now().is_none());
        // Nothing was taken under the database's cap either.
        assert_eq!((caps.database.open(), caps.user.open()), (1, 1));
        drop(held);
        assert_eq!((caps.database.open(), caps.user.open()), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_a_place_is_given_back() {
        let caps = Caps::new(Cap::new(1), Cap::new(0));
        let held = caps.take_now().unwrap();
        let waiter = tokio::spawn({
            let caps = caps.clone();
            async move { caps.wait_for(|| caps.take_now()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(held);
        let places = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(caps.database.open(), 1);
        drop(places);
        assert_eq!(caps.database.waiters.load(Ordering::SeqCst), 0);
    }
}
