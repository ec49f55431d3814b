//! A pool's slots and its idle connections, under one lock: a checkout takes a
//! free slot and the connection returned last (a stack, as PgBouncer's default),
//! or waits in line; a slot given back with its connection goes, connection and
//! all, to the first in line.
//!
//! Handing the connection over is why the slots and the idle list share a lock:
//! with more clients than connections most transactions wait, and a returned
//! connection would otherwise go through the idle list (a push, then the waiter's
//! pop and look at its age), while the waiter is woken by a semaphore that knows
//! nothing of connections. One lock also makes the checkout and the return of
//! most transactions a single critical section each.
//!
//! Waiters are served in arrival order. One that leaves before its turn stays in
//! the queue, marked, until it is passed over or those that left are as many as
//! those waiting: then one sweep clears them all. A crowd leaving thus costs each
//! of its members the same small step whatever its place (a removal from the
//! middle of the queue each would make it quadratic: 85 ms for 10,000 leaving last
//! first). A pool resized down by a reload retires its extra slots as they come
//! back.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// Waiters a line keeps room for once it has emptied; a larger line (a crowd of
/// clients that all ran a query at once) gives its memory back when the last leaves.
const LINE_KEPT: usize = 256;

/// Slots for server connections of one pool (or its reserve), with the pool's idle
/// connections of type `T`, which hold no slot.
#[derive(Debug)]
pub struct Slots<T> {
    state: Mutex<State<T>>,
}

/// The slots are closed: the pool was retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// What a wait in line ends with: a slot, with the connection that came back with it
/// (fresh from a finished transaction) or without; or the news that the pool closed.
pub type Grant<T> = Result<Option<T>, Closed>;

#[derive(Debug)]
struct State<T> {
    /// the configured number
    size: usize,
    /// slots held; after a shrink possibly more than `size`, until they come back
    taken: usize,
    /// connections that hold no slot, the one returned last at the end
    idle: Vec<T>,
    /// the waiters' keys in `waiters`, first come first; those of waiters that left
    /// are none, or fewer than those of waiters in line
    queue: VecDeque<usize>,
    /// waiters in line, those that left not counted
    waiting: usize,
    waiters: Slab<Waiter<T>>,
    closed: bool,
}

#[derive(Debug)]
enum Waiter<T> {
    /// in line, to be woken (outside the lock) when granted
    Waiting(Waker),
    /// out of line with its grant, for the checkout to pick up
    Granted(Grant<T>),
    /// gone before its turn, its key still queued
    Left,
}

impl<T> State<T> {
    /// True when a checkout may take a slot without waiting: one is free and
    /// nobody is in line before it.
    fn free(&self) -> bool {
        !self.closed && self.waiting == 0 && self.taken < self.size
    }

    /// A slot comes back with `conn`, if it is still usable: both go to the first in
    /// line, unless the slot is over the size. Returns the waker to wake, and whether
    /// `conn` went idle. Once closed, `conn` is dropped.
    fn give_back(&mut self, conn: Option<T>) -> (Option<Waker>, bool) {
        if self.closed {
            self.taken -= 1;
            return (None, false);
        }
        if self.taken <= self.size && self.waiting > 0 {
            return (self.grant_first(Ok(conn)), false);
        }
        self.taken -= 1;
        let parked = conn.map(|c| self.idle.push(c)).is_some();
        (None, parked)
    }

    /// Takes the first in line out of it with `grant`, passing over the keys of
    /// those that left before it; returns its waker. Someone must be waiting.
    fn grant_first(&mut self, grant: Grant<T>) -> Option<Waker> {
        while let Some(key) = self.queue.pop_front() {
            if matches!(self.waiters[key], Waiter::Left) {
                self.remove(key);
                continue;
            }
            self.waiting -= 1;
            let waiter = std::mem::replace(&mut self.waiters[key], Waiter::Granted(grant));
            self.sweep();
            return match waiter {
                Waiter::Waiting(waker) => Some(waker),
                Waiter::Granted(_) | Waiter::Left => None,
            };
        }
        None
    }

    /// The waiter under `key` leaves before its turn.
    fn leave(&mut self, key: usize) {
        self.waiters[key] = Waiter::Left;
        self.waiting -= 1;
        self.sweep();
    }

    /// Clears the queue of the keys of waiters that left once they are as many as
    /// those waiting: a sweep costs at most twice the leaves it clears, and the
    /// line's room stays within twice the waiters' (it would otherwise grow while a
    /// held pool serves nobody, and stay after the last waiter was served).
    #[inline(always)]
    fn sweep(&mut self) {
        let left = self.queue.len() - self.waiting;
        if left > 0 && left >= self.waiting {
            self.sweep_left();
        }
    }

    /// The sweep itself, kept out of the checkout's way.
    #[cold]
    fn sweep_left(&mut self) {
        let waiters = &mut self.waiters;
        self.queue.retain(|&key| {
            let gone = matches!(waiters[key], Waiter::Left);
            if gone {
                waiters.remove(key);
            }
            !gone
        });
        self.shed_if_empty();
    }

    /// Takes a waiter out of the line's slab, its key out of the queue already.
    #[inline]
    fn remove(&mut self, key: usize) -> Waiter<T> {
        let waiter = self.waiters.remove(key);
        self.shed_if_empty();
        waiter
    }

    /// Gives back the line's room if no waiter is left in it (see [`LINE_KEPT`]).
    #[inline]
    fn shed_if_empty(&mut self) {
        if self.waiters.is_empty() && self.waiters.capacity() > LINE_KEPT {
            self.shed_line();
        }
    }

    /// Gives back the room of a line that has emptied after a crowd: with no waiter
    /// in the slab, no key is queued.
    #[cold]
    fn shed_line(&mut self) {
        self.waiters = Slab::new();
        self.queue = VecDeque::new();
    }

    /// Grants free slots to the first in line, as far as the size allows.
    fn admit(&mut self) -> Vec<Waker> {
        let mut wakers = Vec::new();
        while self.taken < self.size && self.waiting > 0 {
            self.taken += 1;
            wakers.extend(self.grant_first(Ok(None)));
        }
        wakers
    }
}

impl<T> Slots<T> {
    /// `size` free slots and no idle connection.
    pub fn new(size: usize) -> Slots<T> {
        Slots {
            state: Mutex::new(State {
                size,
                taken: 0,
                idle: Vec::new(),
                queue: VecDeque::new(),
                waiting: 0,
                waiters: Slab::new(),
                closed: false,
            }),
        }
    }

    /// Takes a free slot, with the idle connection returned last if there is one
    /// (for the caller to look at: it may have expired or broken while idle).
    /// `None` when every slot is taken, someone is in line (nobody jumps it), or
    /// the slots are closed.
    pub fn try_take(&self) -> Option<Option<T>> {
        let mut state = self.lock();
        state.free().then(|| {
            state.taken += 1;
            state.idle.pop()
        })
    }

    /// Waits in line for a slot. Cancel-safe: dropped, it leaves the line, and a slot
    /// granted to it meanwhile goes on to the next in line.
    pub fn take(&self) -> Take<'_, T> {
        Take {
            slots: self,
            key: None,
        }
    }

    /// Gives a slot back with `conn`, its connection if it may serve again: both go
    /// to the first in line, or `conn` goes idle and the slot is free. True when
    /// `conn` went idle.
    pub fn give_back(&self, conn: Option<T>) -> bool {
        let (waker, parked) = self.lock().give_back(conn);
        if let Some(waker) = waker {
            waker.wake();
        }
        parked
    }

    /// Makes `conn` idle without giving a slot back.
    pub fn park(&self, conn: T) {
        self.lock().idle.push(conn);
    }

    /// Takes the idle connection returned last, for a checkout that holds its slot.
    pub fn take_idle(&self) -> Option<T> {
        self.lock().idle.pop()
    }

    /// Runs `f` on the idle connections (the one returned last at the end) under the
    /// lock; `f` must not call back into these slots.
    pub fn with_idle<R>(&self, f: impl FnOnce(&mut Vec<T>) -> R) -> R {
        f(&mut self.lock().idle)
    }

    /// Changes the number of slots: growth admits waiters at once, a shrink takes
    /// effect as slots come back.
    pub fn resize(&self, size: usize) {
        let wakers = {
            let mut state = self.lock();
            state.size = size;
            state.admit()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// (slots held, idle connections, configured size), read together.
    pub fn counts(&self) -> (usize, usize, usize) {
        let state = self.lock();
        (state.taken, state.idle.len(), state.size)
    }

    /// Wakes every waiter with [`Closed`], refuses new ones, and returns the idle
    /// connections for the caller to close.
    pub fn close(&self) -> Vec<T> {
        let (idle, wakers) = {
            let mut state = self.lock();
            let state = &mut *state;
            state.closed = true;
            let mut wakers = Vec::new();
            while state.waiting > 0 {
                wakers.extend(state.grant_first(Err(Closed)));
            }
            (std::mem::take(&mut state.idle), wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
        idle
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Every critical section leaves the state whole before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A checkout's place in line (see [`Slots::take`]).
#[derive(Debug)]
pub struct Take<'a, T> {
    slots: &'a Slots<T>,
    /// its key in the waiters once in line
    key: Option<usize>,
}

impl<T> Future for Take<'_, T> {
    type Output = Grant<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant<T>> {
        let slots = self.slots;
        let mut guard = slots.lock();
        let state = &mut *guard;
        let Some(key) = self.key else {
            if state.closed {
                return Poll::Ready(Err(Closed));
            }
            if state.free() {
                state.taken += 1;
                return Poll::Ready(Ok(None));
            }
            let key = state.waiters.insert(Waiter::Waiting(cx.waker().clone()));
            state.queue.push_back(key);
            state.waiting += 1;
            drop(guard);
            self.key = Some(key);
            return Poll::Pending;
        };
        if let Waiter::Waiting(waker) = &mut state.waiters[key] {
            if !waker.will_wake(cx.waker()) {
                waker.clone_from(cx.waker());
            }
            return Poll::Pending;
        }
        let Waiter::Granted(grant) = state.remove(key) else {
            unreachable!("a waiter marked as left is no longer polled")
        };
        drop(guard);
        self.key = None;
        Poll::Ready(grant)
    }
}

impl<T> Drop for Take<'_, T> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let waker = {
            let mut state = self.slots.lock();
            if let Waiter::Waiting(_) = state.waiters[key] {
                state.leave(key);
                None
            } else if let Waiter::Granted(Ok(conn)) = state.remove(key) {
                // Granted a slot it will not use: it goes on as if given back.
                state.give_back(conn).0
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// Polls `take` once: true when it waits.
    fn pending(take: Pin<&mut Take<'_, &str>>) -> bool {
        take.poll(&mut Context::from_waker(Waker::noop()))
            .is_pending()
    }

    #[test]
    fn a_checkout_takes_the_connection_returned_last_and_shrinking_waits_for_slots() {
        let slots = Slots::new(3);
        assert_eq!(slots.try_take(), Some(None));
        assert_eq!(slots.try_take(), Some(None));
        assert!(slots.give_back(Some("a")));
        assert!(slots.give_back(Some("b")));
        assert_eq!(slots.counts(), (0, 2, 3));
        assert_eq!(
            slots.try_take(),
            Some(Some("b")),
            "a stack: the last returned first"
        );
        assert_eq!(slots.try_take(), Some(Some("a")));
        slots.resize(1);
        // Both still held after the shrink: the first to come back is retired.
        assert_eq!(slots.counts(), (2, 0, 1));
        assert_eq!(slots.try_take(), None);
        assert!(
            slots.give_back(Some("a")),
            "a retired slot's connection goes idle"
        );
        assert_eq!(slots.try_take(), None);
        slots.give_back(None);
        assert_eq!(slots.counts(), (0, 1, 1));
        assert_eq!(slots.try_take(), Some(Some("a")));
    }

    #[tokio::test]
    async fn waiters_are_served_in_order_and_handed_the_returned_connection() {
        let slots = Arc::new(Slots::new(1));
        assert_eq!(slots.try_take(), Some(None));
        let waiter = |n: u32| {
            let slots = slots.clone();
            tokio::spawn(async move { (n, slots.take().await) })
        };
        let first = waiter(1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = waiter(2);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(slots.try_take(), None, "nobody jumps the line");
        assert!(!slots.give_back(Some("conn")), "handed over, not idle");
        assert_eq!(first.await.unwrap(), (1, Ok(Some("conn"))));
        // A slot that comes back without its connection comes alone.
        slots.give_back(None);
        assert_eq!(second.await.unwrap(), (2, Ok(None)));
        assert_eq!(slots.counts(), (1, 0, 1));
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_hands_its_grant_on() {
        let slots = Arc::new(Slots::new(1));
        assert_eq!(slots.try_take(), Some(None));
        let mut leaving = Box::pin(slots.take());
        assert!(pending(leaving.as_mut()));
        let staying = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take().await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        slots.give_back(Some("conn"));
        // Granted, but dropped before it looked: the next in line gets it all.
        drop(leaving);
        assert_eq!(staying.await.unwrap(), Ok(Some("conn")));
        // One that leaves before its turn only leaves the line.
        let mut gone = Box::pin(slots.take());
        assert!(pending(gone.as_mut()));
        drop(gone);
        assert!(slots.give_back(Some("conn")));
        assert_eq!(slots.counts(), (0, 1, 1));
    }

    #[tokio::test]
    async fn growth_admits_waiters_and_closing_wakes_the_rest() {
        let slots = Arc::new(Slots::<&str>::new(0));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let slots = slots.clone();
                tokio::spawn(async move { slots.take().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        slots.resize(1);
        let mut waiters = waiters.into_iter();
        assert_eq!(waiters.next().unwrap().await.unwrap(), Ok(None));
        slots.park("idle");
        assert_eq!(slots.close(), ["idle"]);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Err(Closed));
        }
        assert_eq!(slots.take().await, Err(Closed));
        assert_eq!(slots.try_take(), None);
        // The slot still held comes back; its connection is not kept.
        assert!(!slots.give_back(Some("late")));
        assert_eq!(slots.counts(), (0, 0, 1));
    }

    /// Room kept for (waiters, queued keys).
    fn line_capacity(slots: &Slots<&str>) -> (usize, usize) {
        let state = slots.lock();
        (state.waiters.capacity(), state.queue.capacity())
    }

    /// The line keeps room for no more than `LINE_KEPT` waiters.
    fn assert_room_given_back(slots: &Slots<&str>) {
        let (waiters, queue) = line_capacity(slots);
        assert!(
            waiters <= LINE_KEPT && queue <= LINE_KEPT,
            "{waiters}, {queue}"
        );
    }

    /// Four times `LINE_KEPT` checkouts waiting in line.
    fn crowd<'a>(slots: &'a Slots<&'static str>) -> Vec<Pin<Box<Take<'a, &'static str>>>> {
        let mut line: Vec<_> = (0..4 * LINE_KEPT).map(|_| Box::pin(slots.take())).collect();
        assert!(line.iter_mut().all(|take| pending(take.as_mut())));
        assert!(line_capacity(slots).0 >= 4 * LINE_KEPT);
        line
    }

    #[test]
    fn a_line_gives_its_memory_back_once_a_crowd_has_gone() {
        let slots = Slots::new(1);
        assert_eq!(slots.try_take(), Some(None));
        // Served one by one, each granted the connection the one before returned.
        for mut take in crowd(&slots) {
            slots.give_back(Some("conn"));
            let grant = take.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(grant, Poll::Ready(Ok(Some("conn"))));
        }
        assert_room_given_back(&slots);
        // Or leaving before their turn, the first one first, or the last one first.
        drop(crowd(&slots));
        assert_room_given_back(&slots);
        crowd(&slots).into_iter().rev().for_each(drop);
        assert_room_given_back(&slots);
        // Or the back of the line leaving (fewer than stay), the rest served.
        let mut line = crowd(&slots);
        line.truncate(2 * LINE_KEPT + 1);
        for mut take in line {
            slots.give_back(Some("conn"));
            let grant = take.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(grant, Poll::Ready(Ok(Some("conn"))));
        }
        assert_room_given_back(&slots);
        slots.give_back(Some("conn"));
        assert_eq!(slots.counts(), (0, 1, 1));
    }

    #[test]
    fn a_line_that_serves_nobody_does_not_grow_with_those_who_come_and_go() {
        let slots = Slots::new(1);
        assert_eq!(slots.try_take(), Some(None));
        let mut first = Box::pin(slots.take());
        assert!(pending(first.as_mut()));
        for _ in 0..4 * LINE_KEPT {
            let mut passing = Box::pin(slots.take());
            assert!(pending(passing.as_mut()));
        }
        let (waiters, queue) = line_capacity(&slots);
        assert!(waiters <= 4 && queue <= 4, "{waiters}, {queue}");
        slots.give_back(Some("conn"));
        let grant = first.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert_eq!(grant, Poll::Ready(Ok(Some("conn"))));
    }

    #[test]
    fn waiters_that_leave_mid_line_are_passed_over_and_the_line_stays_in_order() {
        let slots = Slots::new(1);
        assert_eq!(slots.try_take(), Some(None));
        let mut line: Vec<_> = (0..5).map(|_| Some(Box::pin(slots.take()))).collect();
        for take in line.iter_mut().flatten() {
            assert!(pending(take.as_mut()));
        }
        // The second, the third and the fifth leave; the first and the fourth stay.
        for gone in [1, 2, 4] {
            line[gone] = None;
        }
        let mut served = Vec::new();
        for (place, take) in line.iter_mut().enumerate() {
            let Some(take) = take else { continue };
            slots.give_back(Some("conn"));
            let grant = take.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(grant, Poll::Ready(Ok(Some("conn"))));
            served.push(place);
        }
        assert_eq!(served, [0, 3]);
        // With the line empty, the slot comes back free and is taken without waiting.
        assert!(slots.give_back(Some("conn")));
        assert_eq!(slots.try_take(), Some(Some("conn")));
        // Closing passes over those that left as well.
        let mut waiting = Box::pin(slots.take());
        let mut leaving = Box::pin(slots.take());
        let mut last = Box::pin(slots.take());
        for take in [&mut waiting, &mut leaving, &mut last] {
            assert!(pending(take.as_mut()));
        }
        drop(leaving);
        slots.close();
        for mut take in [waiting, last] {
            let grant = take.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(grant, Poll::Ready(Err(Closed)));
        }
    }
}
