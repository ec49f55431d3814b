//! Every connected client: its cancel key, the server connection serving it
//! right now, and what the admin console shows about it.
//!
//! A client only knows the BackendKeyData pgwarden issued. Each client
//! registers here for its lifetime; while it holds a server connection its
//! entry points at that connection's real key. A CancelRequest is forwarded to
//! that server connection only, and only while the client is using it: a
//! request that arrives after the transaction ended goes nowhere, so it can
//! never cancel another client's query.
//!
//! A CancelRequest may still be on its way to the server connection when the
//! transaction ends: the connection then waits for it to land (PostgreSQL drops
//! a cancel that finds its backend idle) before it serves anyone else, so a
//! client's late cancel cannot reach the next client's query either.
//!
//! The same record tells which pool a running transaction uses: when a pool is
//! retired (its backend left the routing table), the sessions on it are told
//! through their [`Ending`], the one thing outside its sockets a session waits on.

use crate::address::Address;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use tracing::{debug, info};

use crate::clock::Tick;
use crate::metrics::ClientState;
use crate::params::ParamSet;
use crate::server::CancelKey;
use crate::tls::Endpoint;

const SHARDS: usize = 16;

/// Who a client is, for the admin console.
#[derive(Debug, Clone)]
pub struct Identity {
    /// client address
    pub peer: Address,
    /// where it connected to, and its TLS
    pub endpoint: Endpoint,
    /// its database and user ([`ClientRegistry::pair`])
    pub pair: Arc<Pair>,
    /// its socket, watched while it waits for a server connection (none in tests)
    pub socket: Option<RawFd>,
}

impl Identity {
    /// The client-facing database.
    pub fn database(&self) -> &str {
        &self.pair.database
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.pair.user
    }
}

/// A (database, user) pair that has had clients: its names, kept once for all of
/// them rather than in each client's entry, and its number in the registry.
#[derive(Debug)]
pub struct Pair {
    database: String,
    user: String,
    /// for counting clients without reading or hashing the names
    number: u32,
}

impl Pair {
    /// Its database and user, as owned names (a key for tables by pair).
    pub fn names(&self) -> (String, String) {
        (self.database.clone(), self.user.clone())
    }
}

/// One client's entry.
#[derive(Debug)]
pub struct Entry {
    /// pid from its BackendKeyData
    pub pid: i32,
    secret: i32,
    /// who it is
    pub identity: Identity,
    /// when it logged in
    pub connected_at: SystemTime,
    state: AtomicU8,
    /// when it last began waiting for a server connection, as a [`Tick`]'s nanoseconds
    waiting_since: AtomicU64,
    /// when its wait for a server connection in progress must end, as a [`Tick`]'s
    /// nanoseconds: 0 while none is, [`UNBOUNDED`] for one without a bound (a
    /// request's wait is, between the bounded waits in it), [`OVERDUE`], [`CANCELED`]
    /// or [`LEFT`] once one was ended
    wait_deadline: AtomicU64,
    serving: Mutex<Option<Arc<Serving>>>,
    /// its settings now (shared with every client that has the same), for SHOW CLIENTS
    settings: Mutex<Arc<ParamSet>>,
    /// its CancelRequests on their way to a server connection
    cancels: AtomicUsize,
    /// the admin console's KILL, the process's shutdown and the eviction of the
    /// running transaction, for this session
    pub ending: Ending,
}

/// What the clients of one (database, user) are doing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// how many are in each state, indexed by `ClientState as usize`
    pub states: [usize; 3],
    /// the longest wait for a server connection in progress (zero when none waits)
    pub longest_wait: Duration,
}

/// The (database, user) pairs clients have had, each numbered once.
#[derive(Debug, Default)]
struct Pairs {
    all: Vec<Arc<Pair>>,
    numbers: HashMap<(String, String), u32>,
}

impl Pairs {
    /// The pair, made on its first client.
    fn pair(&mut self, database: &str, user: &str) -> Arc<Pair> {
        let key = (database.to_owned(), user.to_owned());
        if let Some(&n) = self.numbers.get(&key) {
            return self.all[n as usize].clone();
        }
        let number = self.all.len() as u32;
        let pair = Arc::new(Pair {
            database: key.0.clone(),
            user: key.1.clone(),
            number,
        });
        self.all.push(pair.clone());
        self.numbers.insert(key, number);
        pair
    }
}

/// The server connection a client is using.
#[derive(Debug)]
pub struct Serving {
    /// its cancel key
    pub key: CancelKey,
    /// its backend
    pub backend: Arc<str>,
    /// the id of the pool it came from ([`crate::pool::ServerPool::id`])
    pub pool: u64,
    /// when the connection was opened, for RECONNECT's `close_needed`
    pub opened: Tick,
    /// pgwarden's end of it, and its TLS
    pub endpoint: Endpoint,
}

/// Why a session must stop what it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// the admin console's KILL: at once
    Killed,
    /// pgwarden is shutting down: as soon as the session is idle
    ShutDown,
    /// the pool of the server connection in use was retired (its backend left the
    /// routing table, or its database was killed or reconfigured)
    Evicted,
}

/// What stops a session from outside, in one waker slot: a session waits on this
/// and on its sockets, nothing else. Inline in the entry, where cancellation tokens
/// or a `Notify` would cost every client an allocation, and every read a waiter
/// queued and dequeued under a lock.
///
/// Only the session polls it, several times per transaction, always with its task's
/// waker. A signal wakes that waker and leaves it in the slot, so the session
/// registers once: a later poll compares its waker with the notes of the last
/// registration, which costs no locked instruction, and takes the lock only when the
/// waker changed.
#[derive(Debug, Default)]
pub struct Ending {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
    /// the data and vtable addresses of the waker in `waker`, written by the session alone
    registered: [AtomicUsize; 2],
}

const KILLED: u8 = 1;
const SHUT_DOWN: u8 = 2;
const EVICTED: u8 = 4;

impl Ending {
    /// Ends the session (KILL).
    pub fn kill(&self) {
        self.set(KILLED);
    }

    /// Ends the session at its next idle moment (shutdown).
    pub fn shut_down(&self) {
        self.set(SHUT_DOWN);
    }

    /// Ends the transaction the session is running (its pool was retired).
    pub fn evict(&self) {
        self.set(EVICTED);
    }

    /// Clears an eviction, which concerned the transaction that just ended. Called
    /// under the serving lock, as [`ClientRegistry::evict`] sets it: the flag cannot
    /// be set between the look and the clearing, and the look spares the hot path a
    /// locked instruction when, as nearly always, there is nothing to clear.
    fn forget_eviction(&self) {
        if self.state.load(Ordering::SeqCst) & EVICTED != 0 {
            self.state.fetch_and(!EVICTED, Ordering::SeqCst);
        }
    }

    fn set(&self, bit: u8) {
        self.state.fetch_or(bit, Ordering::SeqCst);
        self.wake();
    }

    /// Wakes the session; its waker stays registered.
    fn wake(&self) {
        if let Some(waker) = &*lock(&self.waker) {
            waker.wake_by_ref();
        }
    }

    /// Makes `waker` the one a signal wakes, taking the lock only if it is not already.
    fn register(&self, waker: &Waker) {
        let id = [
            waker.data() as usize,
            std::ptr::from_ref(waker.vtable()) as usize,
        ];
        if self.registered[0].load(Ordering::Relaxed) != id[0]
            || self.registered[1].load(Ordering::Relaxed) != id[1]
        {
            // The slot holds the waker it names, so no other waker can have its addresses.
            *lock(&self.waker) = Some(waker.clone());
            self.registered[0].store(id[0], Ordering::Relaxed);
            self.registered[1].store(id[1], Ordering::Relaxed);
        }
    }

    /// Ready when the session is killed, shut down while `idle`, or evicted while
    /// `running` a transaction; otherwise the task is woken when one of those happens.
    pub fn poll(&self, cx: &mut Context<'_>, idle: bool, running: bool) -> Poll<Stop> {
        // Registered before the check, so a signal in between is not missed: its
        // setter looks at the slot after setting its bit.
        self.register(cx.waker());
        let state = self.state.load(Ordering::SeqCst);
        if state & KILLED != 0 {
            Poll::Ready(Stop::Killed)
        } else if running && state & EVICTED != 0 {
            Poll::Ready(Stop::Evicted)
        } else if idle && state & SHUT_DOWN != 0 {
            Poll::Ready(Stop::ShutDown)
        } else {
            Poll::Pending
        }
    }
}

impl Entry {
    /// Idle, waiting or active.
    pub fn state(&self) -> ClientState {
        // Acquire, paired with the Release in `set_state`: a waiting state comes
        // with its `waiting_since`.
        match self.state.load(Ordering::Acquire) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }

    /// How long it has been waiting for a server connection at `now`; `None` unless waiting.
    pub fn waited(&self, now: Tick) -> Option<Duration> {
        (self.state() == ClientState::Waiting).then(|| self.since_waiting(now))
    }

    /// The time from its last wait's start to `now`, whatever its state.
    fn since_waiting(&self, now: Tick) -> Duration {
        now.since(Tick::from_nanos(self.waiting_since.load(Ordering::Relaxed)))
    }

    /// The server connection serving it.
    pub fn serving(&self) -> Option<Arc<Serving>> {
        lock(&self.serving).clone()
    }

    /// Its `application_name` now.
    pub fn application_name(&self) -> String {
        let settings = lock(&self.settings);
        settings.get("application_name").unwrap_or("").to_owned()
    }

    /// When its last transaction began (none before the first).
    pub fn last_request(&self) -> Option<Tick> {
        match self.waiting_since.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Tick::from_nanos(nanos)),
        }
    }

    /// True while a CancelRequest of this client is on its way to a server connection.
    pub fn cancel_in_flight(&self) -> bool {
        self.cancels_in_flight() > 0
    }

    /// CancelRequests of this client on their way to a server connection.
    pub fn cancels_in_flight(&self) -> usize {
        self.cancels.load(Ordering::SeqCst)
    }

    /// Waits until no CancelRequest of this client is on its way to a server
    /// connection. Each is bounded by the connect timeout it is sent with.
    pub async fn cancels_landed(&self) {
        std::future::poll_fn(|cx| {
            // Registered before the check, so a landing in between is not missed.
            self.ending.register(cx.waker());
            if self.cancel_in_flight() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

/// A CancelRequest counted in flight for its entry until dropped, however its
/// forwarding ends (sent, failed, timed out, or abandoned at shutdown).
struct InFlight<'a>(&'a Entry);

impl<'a> InFlight<'a> {
    fn new(entry: &'a Entry) -> Self {
        entry.cancels.fetch_add(1, Ordering::SeqCst);
        InFlight(entry)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.cancels.fetch_sub(1, Ordering::SeqCst);
        self.0.ending.wake();
    }
}

/// How often the registry ends overdue waits: a wait ends at most this late.
pub const WAIT_SWEEP: Duration = Duration::from_millis(100);

/// [`Entry::wait_deadline`] of a wait that [`ClientRegistry::end_overdue_waits`] ended.
const OVERDUE: u64 = u64::MAX;
/// [`Entry::wait_deadline`] of a wait that the client's CancelRequest ended.
const CANCELED: u64 = u64::MAX - 1;
/// [`Entry::wait_deadline`] of a wait that ended because the client closed its connection.
const LEFT: u64 = u64::MAX - 2;
/// [`Entry::wait_deadline`] of a wait without a deadline; no clock reaches it, and
/// the marks of an ended wait are above it.
const UNBOUNDED: u64 = u64::MAX - 3;

/// True for the word of a wait in progress (not none, not ended).
fn in_progress(word: u64) -> bool {
    word != 0 && word <= UNBOUNDED
}

/// A client's wait for a server connection in progress: it ends early when the
/// client is killed, cancels its request or closes its connection, or once past its
/// deadline (`query_wait_timeout`). The deadline lifts when this drops.
///
/// A request waits from the moment it arrives until a server connection is recorded
/// as serving it ([`ClientHandle::wait_from`] to [`ClientHandle::served`]); the
/// waits in between (at a paused gate, in a pool's line, for the routing to change)
/// are bounded parts of that wait. A CancelRequest in any of it, also between those
/// parts or while the connection given is brought in line with the client's
/// settings, ends the request before it reaches a server.
///
/// No timer per wait: when most transactions wait for a connection (more clients
/// than the pool has), arming and disarming one in tokio's timer wheel each time
/// costs more than the rest of the wait's bookkeeping. The deadline is a word in
/// the entry instead, and one sweep over the registry a few times a second
/// ([`ClientRegistry::end_waits`]) ends the waits past theirs through the
/// session's waker, as PgBouncer's periodic maintenance does. The same sweep
/// ends the waits of clients that closed their connections: their requests must
/// not take a server connection, let alone run, and watching each waiting client's
/// socket from its session would cost every wait a system call and a waiter on the
/// socket.
#[derive(Debug)]
pub struct Wait<'a> {
    entry: &'a Entry,
    /// its word in the entry while it lasts
    deadline: u64,
    /// the word before it began, which it leaves when it drops
    before: u64,
}

/// Why a wait for a server connection ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// past its deadline
    Overdue,
    /// the admin console's KILL
    Killed,
    /// the client's CancelRequest: the request it waits for never reached a server
    Canceled,
    /// the client closed its connection: there is no one to answer
    Left,
}

impl Entry {
    /// Begins a wait for a server connection, to end at `deadline` unless it is `None`.
    pub fn begin_wait(&self, deadline: Option<Tick>) -> Wait<'_> {
        let deadline = deadline.map_or(UNBOUNDED, |d| d.as_nanos().min(UNBOUNDED - 1));
        // The request this wait is part of may be over already (canceled, or its
        // client gone): it stays so.
        let before = self
            .wait_deadline
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                (!matches!(w, CANCELED | LEFT)).then_some(deadline)
            })
            .unwrap_or_else(|w| w);
        Wait {
            entry: self,
            deadline,
            before,
        }
    }

    /// Ends its wait for a server connection, if one is in progress, as its
    /// CancelRequest asks; true if it did. A wait already ended stays ended as it was.
    fn cancel_wait(&self) -> bool {
        self.end_wait(CANCELED, in_progress)
    }

    /// Marks its wait ended by `end` if `ends` holds for the wait's word, and wakes
    /// the session; false if it did not.
    fn end_wait(&self, end: u64, ends: impl Fn(u64) -> bool) -> bool {
        let ended = self
            .wait_deadline
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |w| {
                ends(w).then_some(end)
            })
            .is_ok();
        if ended {
            self.ending.wake();
        }
        ended
    }
}

impl Wait<'_> {
    /// Ready once the client is killed or cancels, or the wait is past its deadline;
    /// otherwise the task is woken then.
    pub fn poll_end(&self, cx: &mut Context<'_>) -> Poll<WaitEnd> {
        // The ending's poll registers the waker before the deadline is read: the sweep
        // and a cancel wake it after they mark the wait.
        if self.entry.ending.poll(cx, false, false).is_ready() {
            return Poll::Ready(WaitEnd::Killed);
        }
        match self.entry.wait_deadline.load(Ordering::SeqCst) {
            OVERDUE => Poll::Ready(WaitEnd::Overdue),
            CANCELED => Poll::Ready(WaitEnd::Canceled),
            LEFT => Poll::Ready(WaitEnd::Left),
            _ => Poll::Pending,
        }
    }

    /// Completes when the wait must end (see [`Wait::poll_end`]).
    pub async fn ended(&self) -> WaitEnd {
        std::future::poll_fn(|cx| self.poll_end(cx)).await
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // An end marked stays, for the request's record of its connection to see.
        let _ = self.entry.wait_deadline.compare_exchange(
            self.deadline,
            self.before,
            Ordering::SeqCst,
            Ordering::Relaxed,
        );
    }
}

/// Every connected client.
#[derive(Debug)]
pub struct ClientRegistry {
    shards: [Mutex<HashMap<i32, Arc<Entry>>>; SHARDS],
    /// every (database, user) pair that has had a client, numbered in order
    pairs: Mutex<Pairs>,
    next_pid: AtomicU32,
    /// set by [`ClientRegistry::shut_down_all`]: later registrations start shut down
    closing: AtomicBool,
}

impl Default for ClientRegistry {
    fn default() -> Self {
        ClientRegistry {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            pairs: Mutex::default(),
            next_pid: AtomicU32::new(rand::random::<u32>()),
            closing: AtomicBool::new(false),
        }
    }
}

impl ClientRegistry {
    /// Issues a fresh (pid, secret) for a client; the entry lives as long as the handle.
    pub fn register(self: &Arc<Self>, identity: Identity, settings: Arc<ParamSet>) -> ClientHandle {
        loop {
            // Positive, non-zero pids, as PostgreSQL's are.
            let pid =
                (self.next_pid.fetch_add(1, Ordering::Relaxed) % (i32::MAX as u32)) as i32 + 1;
            let mut shard = self.shard(pid);
            if let std::collections::hash_map::Entry::Vacant(v) = shard.entry(pid) {
                let entry = Arc::new(Entry {
                    pid,
                    secret: rand::random(),
                    identity,
                    connected_at: SystemTime::now(),
                    state: AtomicU8::new(0),
                    waiting_since: AtomicU64::new(0),
                    wait_deadline: AtomicU64::new(0),
                    serving: Mutex::new(None),
                    settings: Mutex::new(settings),
                    cancels: AtomicUsize::new(0),
                    ending: Ending::default(),
                });
                // Checked under the shard's lock that shut_down_all takes too: an
                // entry it did not see was inserted after it set the flag.
                if self.closing.load(Ordering::SeqCst) {
                    entry.ending.shut_down();
                }
                v.insert(entry.clone());
                return ClientHandle {
                    registry: self.clone(),
                    entry,
                };
            }
        }
    }

    /// Tells every connected session that pgwarden is shutting down.
    pub fn shut_down_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for shard in &self.shards {
            for entry in lock(shard).values() {
                entry.ending.shut_down();
            }
        }
    }

    /// Ends the transactions running on server connections of the pools `pools`
    /// (retired: their connections must not serve another statement).
    pub fn evict(&self, pools: &[u64]) {
        for shard in &self.shards {
            for entry in lock(shard).values() {
                // Under the serving lock, which also clears the flag when the
                // transaction ends: a late eviction never reaches the next one.
                let serving = lock(&entry.serving);
                if serving.as_ref().is_some_and(|s| pools.contains(&s.pool)) {
                    entry.ending.evict();
                }
            }
        }
    }

    /// Ends overdue waits, and those of clients that left, every [`WAIT_SWEEP`], for
    /// as long as the process runs: the drain of a shutdown bounds its waits too.
    pub async fn sweep_waits(self: Arc<Self>) {
        let mut tick = tokio::time::interval(WAIT_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.end_waits(Tick::now());
        }
    }

    /// Ends the waits for a server connection whose deadline is not after `now`, and
    /// those of clients that have closed their connections (see [`Wait`]).
    pub fn end_waits(&self, now: Tick) {
        let mut waiting = Vec::new();
        for shard in &self.shards {
            for entry in lock(shard).values() {
                // The marks (UNBOUNDED, LEFT, CANCELED, OVERDUE) are past every deadline.
                let overdue = entry.end_wait(OVERDUE, |w| w != 0 && w <= now.as_nanos());
                let word = entry.wait_deadline.load(Ordering::Relaxed);
                if let Some(socket) = entry.identity.socket
                    && !overdue
                    && in_progress(word)
                {
                    waiting.push((entry.clone(), socket));
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        let mut sockets: Vec<libc::pollfd> = waiting
            .iter()
            .map(|&(_, fd)| libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: `sockets` is an array of `pollfd` of the length given, which poll
        // only reads and writes within; a timeout of 0 returns at once. A socket
        // closed and its number reused meanwhile is only looked at, and its entry's
        // session is ending anyway.
        let ready = unsafe { libc::poll(sockets.as_mut_ptr(), sockets.len() as libc::nfds_t, 0) };
        if ready <= 0 {
            return;
        }
        let gone = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        for ((entry, _), socket) in waiting.iter().zip(&sockets) {
            if socket.revents & gone != 0 && entry.end_wait(LEFT, in_progress) {
                info!(pid = entry.pid, peer = %entry.identity.peer, "client left while waiting for a server connection");
            }
        }
    }

    /// The client with BackendKeyData pid `pid`, if connected.
    pub fn get(&self, pid: i32) -> Option<Arc<Entry>> {
        self.shard(pid).get(&pid).cloned()
    }

    /// What the clients of each (database, user) are doing now. Looks at each entry's
    /// state and pair number in place: a scrape among thousands of idle clients
    /// neither copies nor hashes anything of theirs.
    pub fn tally(&self) -> HashMap<(String, String), Tally> {
        let now = Tick::now();
        let mut tallies: Vec<Tally> = Vec::new();
        for shard in &self.shards {
            for entry in lock(shard).values() {
                let pair = entry.identity.pair.number as usize;
                if pair >= tallies.len() {
                    tallies.resize(pair + 1, Tally::default());
                }
                let tally = &mut tallies[pair];
                let state = entry.state();
                tally.states[state as usize] += 1;
                if state == ClientState::Waiting {
                    tally.longest_wait = tally.longest_wait.max(entry.since_waiting(now));
                }
            }
        }
        // Numbered before their entries were inserted: every number seen is named.
        let pairs = lock(&self.pairs);
        pairs
            .all
            .iter()
            .zip(tallies)
            .filter(|(_, tally)| tally.states.iter().any(|&n| n > 0))
            .map(|(pair, tally)| (pair.names(), tally))
            .collect()
    }

    /// Every (database, user) pair that has had a client, in the order of their first.
    pub fn pairs(&self) -> Vec<(String, String)> {
        lock(&self.pairs).all.iter().map(|p| p.names()).collect()
    }

    /// The (database, user) pair for a client's [`Identity`], made on its first.
    pub fn pair(&self, database: &str, user: &str) -> Arc<Pair> {
        lock(&self.pairs).pair(database, user)
    }

    /// Every entry, in no particular order.
    pub fn all(&self) -> Vec<Arc<Entry>> {
        self.shards
            .iter()
            .flat_map(|s| lock(s).values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Forwards a client's CancelRequest to the server connection it is using now, if any.
    pub async fn cancel(&self, pid: i32, secret: i32, connect_timeout: Duration) {
        let entry = self.shard(pid).get(&pid).cloned();
        let Some(entry) = entry.filter(|e| e.secret == secret) else {
            debug!(pid, "cancel request matches no client");
            return;
        };
        // Counted before the lookup: a transaction that ends after it sees the count
        // and keeps its server connection until the cancel has landed.
        let _in_flight = InFlight::new(&entry);
        let serving = match entry.serving() {
            Some(serving) => serving,
            None => {
                // A request still waiting for a server connection never reaches one.
                let ended = entry.cancel_wait();
                // But the session may have recorded its connection since the look
                // above, and ended its wait before the mark: then the cancel follows
                // the request there (see `ClientHandle::served`).
                match entry.serving() {
                    Some(serving) => serving,
                    None if ended => {
                        info!(pid, "cancel request ended a wait for a server connection");
                        return;
                    }
                    None => {
                        debug!(pid, "cancel request matches no running query");
                        return;
                    }
                }
            }
        };
        let key = &serving.key;
        let sent = tokio::time::timeout(connect_timeout, key.clone().send()).await;
        match sent {
            Ok(Ok(())) => {
                info!(pid, server = %key.addr, server_pid = key.pid, "cancel request forwarded")
            }
            Ok(Err(e)) => {
                info!(pid, server = %key.addr, error = %e, "cancel request could not be forwarded")
            }
            Err(_) => info!(pid, server = %key.addr, "cancel request timed out"),
        }
    }

    fn shard(&self, pid: i32) -> MutexGuard<'_, HashMap<i32, Arc<Entry>>> {
        lock(&self.shards[pid as usize % SHARDS])
    }
}

/// A client's registration; dropping it forgets the client.
#[derive(Debug)]
pub struct ClientHandle {
    registry: Arc<ClientRegistry>,
    entry: Arc<Entry>,
}

impl ClientHandle {
    /// The pid sent in BackendKeyData.
    pub fn pid(&self) -> i32 {
        self.entry.pid
    }

    /// The secret sent in BackendKeyData.
    pub fn secret(&self) -> i32 {
        self.entry.secret
    }

    /// The registry entry.
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// Points cancels at the server connection now serving the client (or at
    /// nothing), and forgets an eviction of the transaction before.
    pub fn serving(&self, serving: Option<Arc<Serving>>) {
        let mut slot = lock(&self.entry.serving);
        self.entry.ending.forget_eviction();
        *slot = serving;
    }

    /// Records that the client's request begins waiting for a server connection at
    /// `at`, a wait its CancelRequest ends (see [`Wait`]) until [`ClientHandle::served`]
    /// or [`ClientHandle::stop_waiting`]. Set before its state turns waiting, so that a
    /// reader never pairs the state with an older wait.
    pub fn wait_from(&self, at: Tick) {
        self.entry
            .waiting_since
            .store(at.as_nanos(), Ordering::Relaxed);
        self.entry.wait_deadline.store(UNBOUNDED, Ordering::Release);
    }

    /// Points cancels at the server connection given to the client's request, and
    /// ends the request's wait; `Some` if the client canceled the request or left
    /// meanwhile (between the waits in line, while the connection was opened or took
    /// the client's settings): the request must not run.
    pub fn served(&self, serving: Arc<Serving>) -> Option<WaitEnd> {
        self.serving(Some(serving));
        // Looked at after the record, while a cancel marks the wait before it looks
        // for the record: one of the two sees the other, the serving lock orders them.
        let end = match self.entry.wait_deadline.load(Ordering::SeqCst) {
            CANCELED => Some(WaitEnd::Canceled),
            LEFT => Some(WaitEnd::Left),
            _ => None,
        };
        self.stop_waiting();
        end
    }

    /// Ends the request's wait (without a server connection, unless through `served`).
    pub fn stop_waiting(&self) {
        self.entry.wait_deadline.store(0, Ordering::Relaxed);
    }

    /// Points cancels at nothing once the request is done with its server connection;
    /// true while one sent before is still on its way there: the connection must then
    /// serve no one else until it has landed ([`Entry::cancels_landed`]).
    pub fn stop_serving(&self) -> bool {
        self.serving(None);
        self.entry.cancel_in_flight()
    }

    /// Records the client's settings after a transaction changed them.
    pub fn set_settings(&self, settings: Arc<ParamSet>) {
        *lock(&self.entry.settings) = settings;
    }

    /// Records the client's state for the admin console.
    pub fn set_state(&self, state: ClientState) {
        let code = match state {
            ClientState::Idle => 0,
            ClientState::Waiting => 1,
            ClientState::Active => 2,
        };
        self.entry.state.store(code, Ordering::Release);
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        let mut shard = self.registry.shard(self.entry.pid);
        shard.remove(&self.entry.pid);
        // A map keeps its capacity: after a connection storm has left, give it back.
        if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
            let len = shard.len();
            shard.shrink_to(len * 2);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A client's identity in `reg`, for tests that register one.
    pub(crate) fn someone(reg: &ClientRegistry) -> Identity {
        Identity {
            peer: Address::Tcp("127.0.0.1:1".parse().unwrap()),
            endpoint: Endpoint::default(),
            pair: reg.pair("db", "u"),
            socket: None,
        }
    }

    fn poll(entry: &Entry, idle: bool, running: bool) -> Poll<Stop> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        entry.ending.poll(&mut cx, idle, running)
    }

    #[test]
    fn the_tally_counts_each_pair_by_state_with_its_longest_wait() {
        let reg = Arc::new(ClientRegistry::default());
        let of = |database: &str, user: &str| {
            let identity = Identity {
                pair: reg.pair(database, user),
                ..someone(&reg)
            };
            reg.register(identity, Arc::default())
        };
        let idle = of("db", "u");
        let active = of("db", "u");
        active.set_state(ClientState::Active);
        let waiting = of("other", "u");
        waiting.wait_from(Tick::now());
        waiting.set_state(ClientState::Waiting);
        let gone = of("third", "v");
        drop(gone);
        let tallies = reg.tally();
        let pair = |d: &str, u: &str| tallies.get(&(d.to_owned(), u.to_owned())).copied();
        assert_eq!(pair("db", "u").map(|t| t.states), Some([1, 0, 1]));
        let other = pair("other", "u").unwrap();
        assert_eq!(other.states, [0, 1, 0]);
        assert!(other.longest_wait < Duration::from_secs(5));
        assert!(
            pair("third", "v").is_none(),
            "a pair without clients is left out"
        );
        drop((idle, active, waiting));
    }

    /// A waker that counts its wakes.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wait_ends_past_its_deadline_or_when_killed_and_leaves_the_next_alone() {
        let reg = Arc::new(ClientRegistry::default());
        let client = reg.register(someone(&reg), Arc::default());
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let start = Tick::now();
        let deadline = start.after(Duration::from_secs(1));
        let wait = client.entry().begin_wait(Some(deadline));
        assert!(wait.poll_end(&mut cx).is_pending());
        reg.end_waits(start);
        assert!(wait.poll_end(&mut cx).is_pending(), "not due yet");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        reg.end_waits(deadline);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the session is woken");
        assert_eq!(wait.poll_end(&mut cx), Poll::Ready(WaitEnd::Overdue));
        drop(wait);
        // The next wait starts unbounded by the last one's end ...
        let later = deadline.after(Duration::from_secs(1));
        let next = client.entry().begin_wait(Some(later));
        assert!(next.poll_end(&mut cx).is_pending());
        reg.end_waits(deadline);
        assert!(next.poll_end(&mut cx).is_pending());
        drop(next);
        // ... and a sweep after a wait ended finds nothing to end.
        reg.end_waits(deadline.after(Duration::from_secs(5)));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // A wait without a deadline is never overdue, and ends when the client is killed.
        let unbounded = client.entry().begin_wait(None);
        reg.end_waits(deadline.after(Duration::from_secs(3600)));
        assert!(unbounded.poll_end(&mut cx).is_pending());
        client.entry().ending.kill();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert_eq!(unbounded.poll_end(&mut cx), Poll::Ready(WaitEnd::Killed));
    }

    #[test]
    fn a_cancel_ends_the_request_waiting_for_a_connection_and_no_other() {
        let reg = Arc::new(ClientRegistry::default());
        let client = reg.register(someone(&reg), Arc::default());
        let entry = client.entry();
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(!entry.cancel_wait(), "no request, nothing to cancel");
        // Canceled in a wait in line.
        let start = Tick::now();
        client.wait_from(start);
        let wait = entry.begin_wait(None);
        assert!(wait.poll_end(&mut cx).is_pending());
        assert!(entry.cancel_wait());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the session is woken");
        assert_eq!(wait.poll_end(&mut cx), Poll::Ready(WaitEnd::Canceled));
        assert!(!entry.cancel_wait(), "ended once");
        drop(wait);
        client.stop_waiting();
        assert!(
            !entry.cancel_wait(),
            "a late cancel does not reach the next request"
        );
        // Canceled before its first wait: that wait ends at once, the sweep leaves
        // it so, and the connection given at last must not be used.
        client.wait_from(start);
        assert!(entry.cancel_wait());
        let next = entry.begin_wait(Some(start.after(Duration::from_secs(1))));
        reg.end_waits(start.after(Duration::from_secs(2)));
        assert_eq!(next.poll_end(&mut cx), Poll::Ready(WaitEnd::Canceled));
        drop(next);
        assert_eq!(client.served(Arc::new(serving(1))), Some(WaitEnd::Canceled));
        client.serving(None);
        // Canceled between its waits, or after them: the connection is not used.
        client.wait_from(start);
        drop(entry.begin_wait(Some(start.after(Duration::from_secs(1)))));
        assert!(entry.cancel_wait());
        assert_eq!(client.served(Arc::new(serving(1))), Some(WaitEnd::Canceled));
        client.serving(None);
        // Given its connection first, the request runs: the cancel finds it served.
        client.wait_from(start);
        drop(entry.begin_wait(None));
        assert_eq!(client.served(Arc::new(serving(1))), None);
        assert!(!entry.cancel_wait());
        assert!(entry.serving().is_some());
        client.serving(None);
        // An overdue wait stays overdue.
        client.wait_from(start);
        let late = entry.begin_wait(Some(start));
        reg.end_waits(start);
        assert!(!entry.cancel_wait());
        assert_eq!(late.poll_end(&mut cx), Poll::Ready(WaitEnd::Overdue));
    }

    #[test]
    fn the_sweep_ends_the_wait_of_a_client_that_closed_its_connection() {
        use std::os::fd::AsRawFd;
        let reg = Arc::new(ClientRegistry::default());
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut identity = someone(&reg);
        identity.socket = Some(ours.as_raw_fd());
        let client = reg.register(identity, Arc::default());
        let entry = client.entry();
        let mut cx = Context::from_waker(Waker::noop());
        let now = Tick::now();
        // Closed while idle: nothing to end.
        let (idle, gone) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut identity = someone(&reg);
        identity.socket = Some(idle.as_raw_fd());
        let idle_client = reg.register(identity, Arc::default());
        drop(gone);
        client.wait_from(now);
        let wait = entry.begin_wait(None);
        // Bytes sent while waiting are not an end.
        std::io::Write::write_all(&mut &theirs, b"Q").unwrap();
        reg.end_waits(now);
        assert!(wait.poll_end(&mut cx).is_pending());
        drop(theirs);
        reg.end_waits(now);
        assert_eq!(wait.poll_end(&mut cx), Poll::Ready(WaitEnd::Left));
        assert!(!entry.cancel_wait(), "over");
        assert_eq!(idle_client.entry().wait_deadline.load(Ordering::SeqCst), 0);
        // Gone between the waits: the connection given at last is not used.
        drop(wait);
        assert_eq!(client.served(Arc::new(serving(1))), Some(WaitEnd::Left));
        client.serving(None);
        client.wait_from(now);
        reg.end_waits(now);
        assert_eq!(client.served(Arc::new(serving(1))), Some(WaitEnd::Left));
    }

    #[test]
    fn a_signal_wakes_the_session_and_leaves_its_waker_registered_for_the_next() {
        let ending = Ending::default();
        let first = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(first.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(ending.poll(&mut cx, false, true).is_pending());
        // Not idle: the shutdown waits, but the session was told.
        ending.shut_down();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert!(ending.poll(&mut cx, false, true).is_pending());
        ending.kill();
        assert_eq!(first.0.load(Ordering::SeqCst), 2);
        assert_eq!(ending.poll(&mut cx, false, true), Poll::Ready(Stop::Killed));

        // Polled with another waker, the slot takes that one.
        let ending = Ending::default();
        assert!(ending.poll(&mut cx, true, false).is_pending());
        let second = Arc::new(Wakes(AtomicUsize::new(0)));
        let other = Waker::from(second.clone());
        assert!(
            ending
                .poll(&mut Context::from_waker(&other), true, false)
                .is_pending()
        );
        ending.evict();
        assert_eq!(
            (
                first.0.load(Ordering::SeqCst),
                second.0.load(Ordering::SeqCst)
            ),
            (2, 1)
        );
    }

    fn serving(pool: u64) -> Serving {
        Serving {
            key: CancelKey {
                addr: Address::Tcp("127.0.0.1:1".parse().unwrap()),
                pid: 1,
                secret: 1,
            },
            backend: "pg1".into(),
            pool,
            opened: Tick::now(),
            endpoint: Endpoint::default(),
        }
    }

    #[test]
    fn an_eviction_stops_only_the_transactions_of_the_retired_pool_and_is_forgotten_after() {
        let reg = Arc::new(ClientRegistry::default());
        let (a, b) = (
            reg.register(someone(&reg), Arc::default()),
            reg.register(someone(&reg), Arc::default()),
        );
        a.serving(Some(Arc::new(serving(1))));
        b.serving(Some(Arc::new(serving(2))));
        reg.evict(&[1]);
        assert_eq!(poll(a.entry(), false, true), Poll::Ready(Stop::Evicted));
        assert_eq!(poll(b.entry(), false, true), Poll::Pending);
        // Between transactions an eviction means nothing, and the next one starts clean.
        assert_eq!(poll(a.entry(), true, false), Poll::Pending);
        a.serving(None);
        a.serving(Some(Arc::new(serving(3))));
        assert_eq!(poll(a.entry(), false, true), Poll::Pending);
        // Nothing served, nothing evicted.
        a.serving(None);
        reg.evict(&[3]);
        a.serving(Some(Arc::new(serving(3))));
        assert_eq!(poll(a.entry(), false, true), Poll::Pending);
    }

    #[test]
    fn a_kill_stops_at_once_and_a_shutdown_when_idle_also_for_later_logins() {
        let reg = Arc::new(ClientRegistry::default());
        let a = reg.register(someone(&reg), Arc::default());
        reg.shut_down_all();
        assert_eq!(poll(a.entry(), false, true), Poll::Pending);
        assert_eq!(poll(a.entry(), true, false), Poll::Ready(Stop::ShutDown));
        let late = reg.register(someone(&reg), Arc::default());
        assert_eq!(poll(late.entry(), true, false), Poll::Ready(Stop::ShutDown));
        late.entry().ending.kill();
        assert_eq!(poll(late.entry(), false, true), Poll::Ready(Stop::Killed));
    }

    #[tokio::test]
    async fn a_signal_wakes_the_waiting_session() {
        let reg = Arc::new(ClientRegistry::default());
        let a = reg.register(someone(&reg), Arc::default());
        let entry = a.entry().clone();
        let waiting = tokio::spawn(async move {
            std::future::poll_fn(|cx| entry.ending.poll(cx, false, false)).await
        });
        tokio::task::yield_now().await;
        a.entry().ending.kill();
        let stop = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(stop.unwrap().unwrap(), Stop::Killed);
    }

    #[tokio::test]
    async fn keys_are_unique_and_forgotten_on_drop() {
        let reg = Arc::new(ClientRegistry::default());
        let a = reg.register(someone(&reg), Arc::default());
        let b = reg.register(someone(&reg), Arc::default());
        assert_eq!(reg.all().len(), 2);
        assert_ne!(a.pid(), b.pid());
        assert!(a.pid() > 0);
        let pid = a.pid();
        drop(a);
        assert!(reg.shard(pid).get(&pid).is_none());
        assert!(reg.shard(b.pid()).get(&b.pid()).is_some());
    }

    #[tokio::test]
    async fn a_wrong_secret_or_an_idle_client_cancels_nothing() {
        // A listener that records whether anything connected.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reg = Arc::new(ClientRegistry::default());
        let client = reg.register(someone(&reg), Arc::default());
        let key = CancelKey {
            addr: Address::Tcp(addr),
            pid: 42,
            secret: 7,
        };
        let t = Duration::from_secs(1);
        reg.cancel(client.pid(), client.secret(), t).await; // idle: nothing
        client.serving(Some(Arc::new(Serving {
            key,
            backend: "pg1".into(),
            pool: 1,
            opened: Tick::now(),
            endpoint: Endpoint::default(),
        })));
        reg.cancel(client.pid(), client.secret().wrapping_add(1), t)
            .await; // wrong secret
        assert!(
            tokio::time::timeout(Duration::from_millis(100), listener.accept())
                .await
                .is_err()
        );
        reg.cancel(client.pid(), client.secret(), t).await;
        let (mut s, _) = listener.accept().await.unwrap();
        let mut packet = [0u8; 16];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut packet)
            .await
            .unwrap();
        assert_eq!(&packet[8..12], &42i32.to_be_bytes());
        assert_eq!(&packet[12..16], &7i32.to_be_bytes());
    }
}
