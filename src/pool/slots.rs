//! A bounded number of slots, handed out first come, first served.
//!
//! tokio's semaphore is fair (FIFO), so waiting clients are served in arrival
//! order. What it lacks is shrinking while slots are in use: a pool resized
//! down by a reload keeps a deficit that returning slots pay off instead of
//! going back.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Slots for server connections of one pool (or its reserve).
#[derive(Debug)]
pub struct Slots {
    semaphore: Semaphore,
    /// the configured number; the lock also serializes resizes
    size: Mutex<usize>,
    /// slots to retire as they come back, after a shrink. An atomic rather than a
    /// field under `size`'s lock: every transaction's release reads it, and a release
    /// racing a shrink at worst adds a permit that the next release retires instead.
    deficit: AtomicUsize,
}

/// The slots are closed: the pool was retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl Slots {
    /// `size` free slots.
    pub fn new(size: usize) -> Slots {
        Slots {
            semaphore: Semaphore::new(size),
            size: Mutex::new(size),
            deficit: AtomicUsize::new(0),
        }
    }

    /// Takes a free slot if there is one. Never jumps the queue: tokio's semaphore
    /// hands returned permits to waiters first, so free permits mean nobody waits.
    pub fn try_acquire(&self) -> bool {
        self.semaphore
            .try_acquire()
            .map(|permit| permit.forget())
            .is_ok()
    }

    /// Waits for a free slot. Cancel-safe: dropping the future leaves the queue.
    pub async fn acquire(&self) -> Result<(), Closed> {
        self.semaphore
            .acquire()
            .await
            .map(|permit| permit.forget())
            .map_err(|_| Closed)
    }

    /// Gives a slot back (or retires it, while the size is above its target).
    pub fn release(&self) {
        let retired = self.deficit.load(Ordering::Relaxed) > 0
            && self
                .deficit
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1))
                .is_ok();
        if !retired {
            self.semaphore.add_permits(1);
        }
    }

    /// Changes the number of slots; a shrink takes effect as slots come back.
    pub fn resize(&self, size: usize) {
        let mut current = self.lock();
        if size >= *current {
            let grow = size - *current;
            // Growth repays a deficit still owed before it adds slots.
            let owed = self
                .deficit
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    Some(d.saturating_sub(grow))
                })
                .unwrap_or_else(|d| d);
            self.semaphore.add_permits(grow.saturating_sub(owed));
        } else {
            let shrink = *current - size;
            let forgotten = self.semaphore.forget_permits(shrink);
            self.deficit
                .fetch_add(shrink - forgotten, Ordering::Relaxed);
        }
        *current = size;
    }

    /// The configured number of slots.
    pub fn size(&self) -> usize {
        *self.lock()
    }

    /// Slots held right now (after a shrink, possibly more than the size).
    pub fn taken(&self) -> usize {
        let size = *self.lock();
        (size + self.deficit.load(Ordering::Relaxed))
            .saturating_sub(self.semaphore.available_permits())
    }

    /// Wakes every waiter with [`Closed`] and refuses new ones.
    pub fn close(&self) {
        self.semaphore.close();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        // The guarded data is one number, written whole: a poisoned lock is still usable.
        self.size.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shrinking_waits_for_slots_to_come_back() {
        let slots = Slots::new(3);
        slots.acquire().await.unwrap();
        slots.acquire().await.unwrap();
        slots.resize(1);
        // One free slot was forgotten at once; one more must be repaid.
        assert_eq!(slots.semaphore.available_permits(), 0);
        assert_eq!(slots.taken(), 2, "both still held after the shrink");
        slots.release();
        assert_eq!(slots.semaphore.available_permits(), 0);
        slots.release();
        assert_eq!(slots.semaphore.available_permits(), 1);
        assert_eq!(slots.taken(), 0);
        slots.resize(4);
        assert_eq!(slots.semaphore.available_permits(), 4);
        assert_eq!(slots.size(), 4);
    }

    #[tokio::test]
    async fn growing_repays_a_deficit_first() {
        let slots = Slots::new(2);
        slots.acquire().await.unwrap();
        slots.acquire().await.unwrap();
        slots.resize(0);
        slots.resize(1);
        slots.release();
        slots.release();
        assert_eq!(slots.semaphore.available_permits(), 1);
    }

    #[tokio::test]
    async fn waiters_are_served_in_order_and_woken_on_close() {
        let slots = std::sync::Arc::new(Slots::new(1));
        slots.acquire().await.unwrap();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire().await })
        };
        tokio::task::yield_now().await;
        slots.close();
        assert_eq!(waiter.await.unwrap(), Err(Closed));
        assert_eq!(slots.acquire().await, Err(Closed));
    }
}
