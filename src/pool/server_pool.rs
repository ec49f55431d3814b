//! The server connections of one (backend, database, user): checkout with a
//! bounded, fair wait; return; retirement.
//!
//! A checked-out connection is a [`PooledConn`]: it goes back with
//! [`PooledConn::release`] when the caller knows it is clean, and is closed on
//! drop otherwise, so an early return or a panic can never hand a dirty
//! connection to the next client.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use super::caps::{Caps, Counted, Places};
use super::logins::Logins;
use super::slots::Slots;
use crate::auth::Secrets;
use crate::clock::{Tick, nanos};
use crate::error::ServerError;
use crate::keepalive::Keepalive;
use crate::registry::{Entry, Serving, Wait, WaitEnd};
use crate::server::{ServerConn, ServerTarget};
use crate::tls::Tls;

/// The limits and timeouts of one pool; replaced whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// server connections
    pub size: usize,
    /// connections kept open even when idle
    pub min_size: usize,
    /// extra connections for clients that waited `reserve_timeout`
    pub reserve_size: usize,
    /// wait before the reserve may be used
    pub reserve_timeout: Duration,
    /// bound on a client's wait; zero waits forever
    pub wait_timeout: Duration,
    /// bound on connect + login
    pub connect_timeout: Duration,
    /// close connections idle this long; zero keeps them
    pub idle_timeout: Duration,
    /// close connections this old; zero keeps them
    pub lifetime: Duration,
    /// TCP keepalive of new connections
    pub keepalive: Keepalive,
}

/// Why no server connection was handed out.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The wait bound expired.
    #[error("no server connection within {0:?}")]
    Timeout(Duration),
    /// Connecting failed.
    #[error("{0}")]
    Connect(#[from] ServerError),
    /// The pool was retired while waiting (its backend left the routing table).
    #[error("pool retired")]
    Retired,
    /// The client was killed (the admin console's KILL) while waiting.
    #[error("killed while waiting")]
    Killed,
    /// The client canceled its request while waiting.
    #[error("canceled while waiting")]
    Canceled,
    /// The client closed its connection while waiting.
    #[error("the client left while waiting")]
    Left,
}

/// Which slots a checkout took, so that it gives back to the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Main,
    Reserve,
}

/// The connection a checkout's slot came with.
enum WithSlot {
    /// one that finished a transaction just now and was handed over with its slot
    HandedOver(Box<Held>),
    /// the idle connection taken with a free slot, still to be looked at, if any
    Idle(Option<Box<Held>>),
}

impl From<Option<Box<Held>>> for WithSlot {
    /// What a wait in line was granted: a slot with a connection handed over, or alone.
    fn from(conn: Option<Box<Held>>) -> Self {
        conn.map_or(WithSlot::Idle(None), WithSlot::HandedOver)
    }
}

/// The reserve a wait for a slot may use, copied out of the pool's settings so that
/// a long wait holds no reference to them.
#[derive(Debug, Clone, Copy)]
struct Reserve {
    size: usize,
    timeout: Duration,
}

/// A checkout's waits (for a slot, for room under the caps, for a new connection's
/// login), registered with the client's entry so that KILL, its CancelRequest and
/// its leaving end them, and bounded together by `query_wait_timeout` (zero:
/// unbounded) from the first.
struct Patience<'a> {
    timeout: Duration,
    wait: Wait<'a>,
}

impl<'a> Patience<'a> {
    fn begin(timeout: Duration, waiter: &'a Entry) -> Self {
        let deadline = (!timeout.is_zero()).then(|| Tick::now().after(timeout));
        Patience {
            timeout,
            wait: waiter.begin_wait(deadline),
        }
    }

    /// The error that ends the wait: the bound passed, or the client was killed or
    /// canceled.
    async fn exhausted(&self) -> CheckoutError {
        match self.wait.ended().await {
            WaitEnd::Overdue => CheckoutError::Timeout(self.timeout),
            WaitEnd::Killed => CheckoutError::Killed,
            WaitEnd::Canceled => CheckoutError::Canceled,
            WaitEnd::Left => CheckoutError::Left,
        }
    }
}

/// The server connections to one target.
#[derive(Debug)]
pub struct ServerPool {
    /// unique in the process: the client registry knows a client's pool by it
    pub id: u64,
    /// where connections go
    pub target: ServerTarget,
    settings: ArcSwap<PoolSettings>,
    /// `settings.lifetime` in nanoseconds, read at every checkout and return: a plain
    /// word is cheaper to read there than the settings behind their `ArcSwap`
    lifetime: AtomicU64,
    /// The main slots, with the pool's idle connections. Boxed, here and in
    /// [`PooledConn`]: a connection changes hands several times per transaction, and
    /// a pointer moves for less than the whole connection.
    main: Slots<Box<Held>>,
    /// the reserve's slots; their connections are idle among the main slots'
    reserve: Slots<Box<Held>>,
    /// `max_db_connections` and `max_user_connections`, shared with sibling pools
    pub(super) caps: Caps,
    /// checkouts that wait for a slot or for room under the caps
    demand: AtomicUsize,
    /// connections being opened (connect, TLS, login), each with when it began
    opening: Mutex<Vec<(u64, Tick)>>,
    /// the number the next connection opened takes in `opening`
    next_opening: AtomicU64,
    secrets: Secrets,
    tls: Arc<ArcSwap<Tls>>,
    logins: Arc<Logins>,
    /// The transactions running on it are ended through the client registry
    /// ([`crate::registry::ClientRegistry::evict`]), not by waiting on this.
    retired: AtomicBool,
    /// when a transaction last completed here, as a [`Tick`]'s nanoseconds (0: never)
    answered: AtomicU64,
    /// set while a [`ServerPool::fill`] runs
    filling: AtomicBool,
    /// connections opened before this [`Tick`] (in nanoseconds; 0: none) close when
    /// next released (RECONNECT)
    reconnect_before: AtomicU64,
}

impl ServerPool {
    /// An empty pool.
    pub fn new(
        target: ServerTarget,
        settings: PoolSettings,
        caps: Caps,
        secrets: Secrets,
        tls: Arc<ArcSwap<Tls>>,
        logins: Arc<Logins>,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        ServerPool {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            target,
            main: Slots::new(settings.size),
            reserve: Slots::new(settings.reserve_size),
            lifetime: AtomicU64::new(nanos(settings.lifetime)),
            settings: ArcSwap::from_pointee(settings),
            caps,
            demand: AtomicUsize::new(0),
            opening: Mutex::new(Vec::new()),
            next_opening: AtomicU64::new(1),
            secrets,
            tls,
            logins,
            retired: AtomicBool::new(false),
            answered: AtomicU64::new(0),
            filling: AtomicBool::new(false),
            reconnect_before: AtomicU64::new(0),
        }
    }

    /// True when a transaction completed on this pool within the last `window`: the
    /// server is answering clients, whatever a slow health probe says.
    pub fn answered_within(&self, window: Duration) -> bool {
        let at = self.answered.load(Ordering::Relaxed);
        at != 0 && Tick::from_nanos(at).elapsed() <= window
    }

    /// The checkout of most transactions, without waiting: a free slot and a live
    /// idle connection, judged by the clock reading `now` the caller already has.
    /// `None` leaves the pool as it was, for [`ServerPool::checkout`]. Not async, so
    /// that the common case polls no future of its own.
    pub fn try_checkout(self: &Arc<Self>, now: Tick) -> Option<PooledConn> {
        let idle = self.main.try_take()?;
        let mut pooled = PooledConn {
            pool: self.clone(),
            conn: None,
            slot: Some(Slot::Main),
        };
        // Without a connection, dropping `pooled` gives the slot back.
        pooled.conn = Some(self.live_idle(idle, now)?);
        Some(pooled)
    }

    /// Hands out a server connection: an idle one that is still alive, or a new one.
    /// A wait for one, the opening of a new one included, is bounded by
    /// `query_wait_timeout`, and ended by KILL, the client's CancelRequest or its
    /// leaving, through `waiter`, the client's registry entry.
    pub async fn checkout(self: &Arc<Self>, waiter: &Entry) -> Result<PooledConn, CheckoutError> {
        let _waiting = Counted::new(&self.demand);
        let mut patience = None;
        // A free slot is taken without arming the wait's bound: most checkouts. The
        // wait is not boxed: the request it belongs to is (see `Session::request`),
        // and a box of its own cost a malloc and free per wait, more than the request
        // box's growth costs a transaction that does not wait.
        let (slot, idle) = if let Some(idle) = self.main.try_take() {
            (Slot::Main, WithSlot::Idle(idle))
        } else {
            let settings = self.settings.load();
            let reserve = Reserve {
                size: settings.reserve_size,
                timeout: settings.reserve_timeout,
            };
            let patience = patience.insert(Patience::begin(settings.wait_timeout, waiter));
            drop(settings);
            self.acquire(reserve, patience).await?
        };
        let mut pooled = PooledConn {
            pool: self.clone(),
            conn: None,
            slot: Some(slot),
        };
        // A connection handed over with the slot has just finished a transaction: it
        // needs no look at its age or its socket.
        let idle = match idle {
            WithSlot::HandedOver(conn) => {
                pooled.conn = Some(conn);
                return Ok(pooled);
            }
            WithSlot::Idle(idle) => idle,
        };
        let room = match self.room(idle) {
            Some(room) => room,
            None => {
                let patience = patience.get_or_insert_with(|| self.patience(waiter));
                Box::pin(self.wait_for_room(patience)).await
            }
        }?;
        match room {
            Room::Idle(conn) => {
                pooled.conn = Some(conn);
                Ok(pooled)
            }
            Room::Places(places) => {
                let patience = patience.get_or_insert_with(|| self.patience(waiter));
                self.open_for(pooled, places, patience).await
            }
        }
    }

    /// The bound of a checkout's wait that did not wait for a slot, from now.
    fn patience<'a>(&self, waiter: &'a Entry) -> Patience<'a> {
        Patience::begin(self.settings.load().wait_timeout, waiter)
    }

    /// Opens a new connection under `places` for the checkout that holds `pooled`'s
    /// slot. The open is part of the checkout's wait, and when `patience` runs out
    /// first the connection it brings joins the pool ([`unless_ended`]).
    async fn open_for(
        self: &Arc<Self>,
        mut pooled: PooledConn,
        places: Places,
        patience: &Patience<'_>,
    ) -> Result<PooledConn, CheckoutError> {
        let pool = self.clone();
        let open = async move {
            match pool.open(places).await {
                Ok(conn) => {
                    pooled.conn = Some(conn);
                    Ok((pooled, ()))
                }
                Err(e) => {
                    warn!(backend = %pool.target.backend, db = %pool.target.dbname, user = %pool.target.user, error = %e, "server connection failed");
                    Err(CheckoutError::from(e))
                }
            }
        };
        let (opened, ()) = unless_ended(open, patience.exhausted()).await??;
        Ok(opened)
    }

    /// What a checkout holding a slot can have now: `idle`, the idle connection it
    /// took with the slot, or another of the pool's (looked at now: the wait for the
    /// slot may have been long), or places under the caps for a new one. `None`
    /// while a cap is full.
    fn room(&self, idle: Option<Box<Held>>) -> Option<Result<Room, CheckoutError>> {
        if self.is_retired() {
            // The idle connection taken with the slot is closed like the pool's others.
            if let Some(conn) = idle {
                conn.close();
            }
            return Some(Err(CheckoutError::Retired));
        }
        if let Some(conn) = self.live_idle(idle, Tick::now()) {
            return Some(Ok(Room::Idle(conn)));
        }
        self.caps.take(self).map(|places| Ok(Room::Places(places)))
    }

    /// Waits, within `patience`, until a cap that was full has room.
    async fn wait_for_room(&self, patience: &Patience<'_>) -> Result<Room, CheckoutError> {
        debug!(backend = %self.target.backend, db = %self.target.dbname, user = %self.target.user, "waiting for room under max_db_connections / max_user_connections");
        tokio::select! {
            biased;
            room = self.caps.wait_for(|| self.room(None)) => room,
            e = patience.exhausted() => Err(e),
        }
    }

    /// Opens a new server connection under `places` (the caller holds a slot for it).
    async fn open(&self, places: Places) -> Result<Box<Held>, ServerError> {
        let _opening = Opening::new(self);
        let credential = self.secrets.get(&self.target.user).ok_or_else(|| {
            ServerError::Credentials(format!(
                "user \"{}\" is not in the user list",
                self.target.user
            ))
        })?;
        let tls = self.tls.load();
        let settings = self.settings.load();
        let conn = Box::pin(ServerConn::connect(
            &self.target,
            &credential,
            &tls,
            settings.connect_timeout,
            settings.keepalive,
        ))
        .await?;
        debug!(backend = %self.target.backend, server = conn.id, db = %self.target.dbname, user = %self.target.user, "server connection opened");
        self.logins.remember_welcome(&conn.reported);
        Ok(Box::new(Held {
            serving: Arc::new(self.serving(&conn)),
            conn,
            _places: places,
        }))
    }

    /// When the pool has fewer connections open than its minimum and nobody is
    /// opening them yet: the work that opens them, one at a time, to be spawned.
    /// It stops early when a connect fails (the next maintenance round tries again)
    /// or when clients hold every slot (their connections count toward the minimum).
    pub fn fill(self: &Arc<Self>) -> Option<impl Future<Output = ()> + Send + 'static> {
        if self.missing() == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return None;
        }
        let pool = self.clone();
        Some(async move {
            while pool.missing() > 0
                && !pool.is_retired()
                && let Some(idle) = pool.main.try_take()
            {
                // Only the slot is wanted: a connection taken with it stays idle.
                if let Some(conn) = idle {
                    pool.main.park(conn);
                }
                // Warm connections never crowd out others under a cap.
                let Some(places) = pool.caps.take_now() else {
                    pool.release_slot(Slot::Main);
                    break;
                };
                match pool.open(places).await {
                    Ok(conn) => pool.park(conn, Slot::Main, Tick::now()),
                    Err(e) => {
                        pool.release_slot(Slot::Main);
                        debug!(backend = %pool.target.backend, db = %pool.target.dbname, error = %e, "could not open a connection toward min_pool_size");
                        break;
                    }
                }
            }
            pool.filling.store(false, Ordering::Release);
        })
    }

    /// How many connections the pool must open to reach its minimum.
    fn missing(&self) -> usize {
        let (in_use, idle, _) = self.counts();
        self.settings.load().min_size.saturating_sub(in_use + idle)
    }

    /// Waits for a main slot, or after `reserve_timeout` for whichever of a main and a
    /// reserve slot comes first, within `patience`; a main slot wins a tie, and a slot
    /// that comes as the bound expires is taken. The reserve is a branch of the same
    /// `select!`, pending forever when unset.
    async fn acquire(
        &self,
        reserve: Reserve,
        patience: &Patience<'_>,
    ) -> Result<(Slot, WithSlot), CheckoutError> {
        let main = self.main.take();
        tokio::pin!(main);
        let reserve = async {
            if reserve.size == 0 {
                return std::future::pending().await;
            }
            tokio::time::sleep(reserve.timeout).await;
            let r = self.reserve.take().await;
            if r.is_ok() {
                info!(backend = %self.target.backend, db = %self.target.dbname, "using the reserve pool");
            }
            r
        };
        tokio::pin!(reserve);
        let slot = tokio::select! {
            biased;
            r = &mut main => r.map(|conn| (Slot::Main, WithSlot::from(conn))),
            r = &mut reserve => r.map(|conn| (Slot::Reserve, WithSlot::from(conn))),
            e = patience.exhausted() => return Err(e),
        };
        slot.map_err(|_| CheckoutError::Retired)
    }

    /// Takes an idle connection that is still alive, `first` if it is one, closing the
    /// expired and broken ones met on the way.
    fn live_idle(&self, mut first: Option<Box<Held>>, now: Tick) -> Option<Box<Held>> {
        while let Some(mut conn) = first.take().or_else(|| self.main.take_idle()) {
            if self.expired(&conn, now) {
                debug!(server = conn.id, "closing expired server connection");
                conn.close();
                continue;
            }
            match conn.check_idle() {
                Ok(()) => return Some(conn),
                Err(reason) => {
                    info!(backend = %self.target.backend, server = conn.id, %reason, "discarding broken idle server connection");
                    conn.close();
                }
            }
        }
        None
    }

    fn give_back(&self, conn: Box<Held>, slot: Slot, now: Tick) {
        self.answered.store(now.as_nanos(), Ordering::Relaxed);
        self.park(conn, slot, now);
    }

    /// Hands a connection with its slot to the first checkout in line, or puts it
    /// among the idle ones and frees the slot (or closes it, if its pool or its
    /// lifetime is over).
    fn park(&self, mut conn: Box<Held>, slot: Slot, now: Tick) {
        if self.is_retired() || self.expired(&conn, now) {
            conn.close();
            self.release_slot(slot);
            return;
        }
        conn.mark_idle(now);
        let idle = match slot {
            Slot::Main => self.main.give_back(Some(conn)),
            Slot::Reserve => {
                self.main.park(conn);
                self.reserve.give_back(None);
                true
            }
        };
        if idle {
            // A pool waiting under a full cap may close it to make room.
            self.caps.database.changed_now();
            self.caps.user.changed_now();
        }
    }

    /// Checkouts of the pool waiting now.
    pub(super) fn demand(&self) -> usize {
        self.demand.load(Ordering::SeqCst)
    }

    /// Connections the pool has open, idle or in use.
    pub(super) fn open_connections(&self) -> usize {
        self.caps.pool.open()
    }

    /// True when the pool has an idle connection.
    pub(super) fn has_idle(&self) -> bool {
        self.main.with_idle(|idle| !idle.is_empty())
    }

    /// Closes the idle connection that waited longest, for a pool under the same
    /// cap that needs room; false when there is none.
    pub(super) fn close_oldest_idle(&self) -> bool {
        let oldest = self
            .main
            .with_idle(|idle| (!idle.is_empty()).then(|| idle.remove(0)));
        match oldest {
            Some(conn) => {
                debug!(backend = %self.target.backend, server = conn.id, db = %self.target.dbname, user = %self.target.user, "closing an idle server connection to make room under a cap");
                conn.close();
                true
            }
            None => false,
        }
    }

    fn release_slot(&self, slot: Slot) {
        match slot {
            Slot::Main => self.main.give_back(None),
            Slot::Reserve => self.reserve.give_back(None),
        };
    }

    /// The bound on connecting, also used for pgwarden's own short statements.
    pub fn connect_timeout(&self) -> Duration {
        self.settings.load().connect_timeout
    }

    /// Applies new settings from a reload.
    pub fn update(&self, settings: PoolSettings) {
        if **self.settings.load() == settings {
            return;
        }
        self.main.resize(settings.size);
        self.reserve.resize(settings.reserve_size);
        self.lifetime
            .store(nanos(settings.lifetime), Ordering::Relaxed);
        self.settings.store(Arc::new(settings));
    }

    /// Closes idle connections past their lifetime, broken ones, and those past the
    /// idle timeout while more than the minimum are open (none are kept unless the
    /// pool is `warm`); returns how many.
    pub fn reap(&self, warm: bool) -> usize {
        let settings = self.settings.load();
        let min_size = if warm { settings.min_size } else { 0 };
        let in_use = self.in_use();
        let closing: Vec<Box<Held>> = self.main.with_idle(|idle| {
            let now = Tick::now();
            let mut open = in_use + idle.len();
            let mut keep = Vec::with_capacity(idle.len());
            let mut close = Vec::new();
            // Oldest first: the idle list is a stack, so its front waited longest.
            for mut c in idle.drain(..) {
                let idle_too_long = !settings.idle_timeout.is_zero()
                    && c.idle_for() >= settings.idle_timeout
                    && open > min_size;
                if self.expired(&c, now) || idle_too_long || c.check_idle().is_err() {
                    open -= 1;
                    close.push(c);
                } else {
                    keep.push(c);
                }
            }
            *idle = keep;
            close
        });
        let n = closing.len();
        closing.into_iter().for_each(|c| c.close());
        n
    }

    /// Stops the pool: waiters are told, idle connections close, and returned ones close too.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.reserve.close();
        self.main.close().into_iter().for_each(|c| c.close());
    }

    /// What the registry and SHOW SERVERS keep of one of this pool's connections.
    fn serving(&self, conn: &ServerConn) -> Serving {
        Serving {
            key: conn.cancel_key.clone(),
            backend: self.target.backend.clone(),
            pool: self.id,
            opened: conn.opened(),
            endpoint: conn.endpoint,
        }
    }

    /// The idle connections, for SHOW SERVERS, each with when it was last returned.
    pub fn idle_servers(&self) -> Vec<(Arc<Serving>, Tick)> {
        self.main.with_idle(|idle| {
            idle.iter()
                .map(|c| (c.serving.clone(), c.idle_since()))
                .collect()
        })
    }

    /// Counts for the admin console and metrics: (in use, idle, size). A
    /// connection in use (or being opened) holds a slot; an idle one does not.
    pub fn counts(&self) -> (usize, usize, usize) {
        let (taken, idle, size) = self.main.counts();
        let (reserve_taken, _, reserve_size) = self.reserve.counts();
        (taken + reserve_taken, idle, size + reserve_size)
    }

    /// Connections being opened, among those [`ServerPool::counts`] calls in use.
    pub fn opening(&self) -> usize {
        lock(&self.opening).len()
    }

    /// The connections being opened, for SHOW SERVERS: each one's number in this
    /// pool and when it began.
    pub fn opening_servers(&self) -> Vec<(u64, Tick)> {
        lock(&self.opening).clone()
    }

    /// Connections in use or being opened: the slots taken, main and reserve.
    fn in_use(&self) -> usize {
        self.counts().0
    }

    /// Login facts shared by the pools of this (database, user).
    pub fn logins(&self) -> &Arc<Logins> {
        &self.logins
    }

    /// True once the pool is retired: transactions on it must end.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// True when `conn` has outlived the pool's lifetime at `now`, or is older than
    /// the last RECONNECT.
    fn expired(&self, conn: &ServerConn, now: Tick) -> bool {
        let lifetime = self.lifetime.load(Ordering::Relaxed);
        (lifetime != 0 && now.nanos_since(conn.opened()) >= lifetime)
            || self.close_needed(conn.opened())
    }

    /// True when a connection opened at `opened` predates the last RECONNECT: it
    /// closes when released (SHOW SERVERS' `close_needed`, what WAIT_CLOSE waits for).
    pub fn close_needed(&self, opened: Tick) -> bool {
        let reconnect = self.reconnect_before.load(Ordering::Relaxed);
        reconnect != 0 && opened < Tick::from_nanos(reconnect)
    }

    /// Closes the idle connections now and every other one when it is released
    /// (RECONNECT); new transactions get new connections.
    pub fn reconnect(&self) {
        let now = Tick::now();
        self.reconnect_before
            .store(now.as_nanos(), Ordering::Relaxed);
        let idle = self.main.with_idle(std::mem::take);
        idle.into_iter().for_each(|c| c.close());
    }
}

/// A connection being opened, listed in its pool's `opening` until dropped.
struct Opening<'a> {
    pool: &'a ServerPool,
    number: u64,
}

impl<'a> Opening<'a> {
    /// Lists a connection `pool` begins to open now.
    fn new(pool: &'a ServerPool) -> Self {
        let number = pool.next_opening.fetch_add(1, Ordering::Relaxed);
        lock(&pool.opening).push((number, Tick::now()));
        Opening { pool, number }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        lock(&self.pool.opening).retain(|(n, _)| *n != self.number);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing is held across a panic point inside these critical sections.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server connection checked out of its pool.
#[derive(Debug)]
pub struct PooledConn {
    pool: Arc<ServerPool>,
    conn: Option<Box<Held>>,
    /// taken when the slot goes back, so that it goes back exactly once
    slot: Option<Slot>,
}

impl PooledConn {
    /// The pool it came from.
    pub fn pool(&self) -> &Arc<ServerPool> {
        &self.pool
    }

    /// What the registry shows of it while a client uses it.
    pub fn serving(&self) -> &Arc<Serving> {
        &self
            .conn
            .as_ref()
            .expect("connection present until release")
            .serving
    }

    /// Returns a clean connection (idle, nothing owed to anyone) to the pool.
    pub fn release(self) {
        self.release_at(Tick::now());
    }

    /// [`PooledConn::release`] with the time of day the caller has just read.
    pub fn release_at(mut self, now: Tick) {
        if let (Some(conn), Some(slot)) = (self.conn.take(), self.slot.take()) {
            self.pool.give_back(conn, slot, now);
        }
    }

    /// Closes the connection instead of returning it.
    pub fn discard(self) {
        // Drop closes whatever was not released.
    }
}

/// Awaits `work`, which readies a server connection for a request (and yields it
/// with what else it learnt, `R`), unless `ended` (the end of the request's wait:
/// KILL, a cancel, the client gone, its bound passed) completes first. Then `work`
/// goes on in a task of its own and the connection it yields goes to the pool: a
/// login or a change of settings under way is worth finishing for the next client,
/// where stopping it halfway would waste it or leave the connection in a state
/// nobody knows.
///
/// `work` is boxed at the call, not in the returned future: that future is awaited
/// inside every request's, which would otherwise keep room for all of `work`.
pub fn unless_ended<R, F, E>(
    work: impl Future<Output = Result<(PooledConn, R), F>> + Send + 'static,
    ended: impl Future<Output = E>,
) -> impl Future<Output = Result<Result<(PooledConn, R), F>, E>>
where
    R: Send + 'static,
    F: Send + 'static,
{
    let mut work = Box::pin(work);
    async move {
        tokio::select! {
            biased;
            done = &mut work => Ok(done),
            end = ended => {
                debug!("a request's wait ended while its server connection was readied; the connection goes to the pool");
                tokio::spawn(async move {
                    if let Ok((conn, _)) = work.await {
                        conn.release();
                    }
                });
                Err(end)
            }
        }
    }
}

impl Deref for PooledConn {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        &self
            .conn
            .as_ref()
            .expect("connection present until release")
            .conn
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self
            .conn
            .as_mut()
            .expect("connection present until release")
            .conn
    }
}

/// What a checkout found room for.
enum Room {
    /// an idle connection of the pool
    Idle(Box<Held>),
    /// places under the caps, for a new connection
    Places(Places),
}

/// A server connection of the pool with its places under the caps, which it holds
/// until it closes.
#[derive(Debug)]
struct Held {
    conn: ServerConn,
    /// what the registry and SHOW SERVERS show of it: made once, so that each
    /// transaction that takes the connection shares it instead of building a copy
    serving: Arc<Serving>,
    _places: Places,
}

impl Held {
    /// Closes the connection; its places go back.
    fn close(self: Box<Self>) {
        self.conn.close();
    }
}

impl Deref for Held {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        &self.conn
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self.conn
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        // Not released explicitly: its state is unknown, so it must not be reused.
        if let Some(conn) = self.conn.take() {
            conn.close();
        }
        if let Some(slot) = self.slot.take() {
            self.pool.release_slot(slot);
        }
    }
}
