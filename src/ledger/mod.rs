//! Quota: reserve before, settle exactly once after, persist. The only place counters change.
//!
//! Each key id has one [`KeyCounter`]. `committed` (consumed plus outstanding reservations) is
//! what admission compares against the key's limit, with one atomic read-modify-write, so
//! concurrent calls can never both take the last room. A [`Reservation`] is an RAII value: it is
//! settled once to the real price, or refunded in full when dropped unsettled (error,
//! disconnect, panic).
//!
//! Durability without disk I/O on the request path: the disk holds, per key, a *ceiling* that is
//! always at or above `committed`. A background writer raises ceilings ahead of use (journal
//! line + fsync, compacted into a snapshot written by temp file + fsync + rename + directory
//! fsync). A raise asks for what is committed plus a *headroom* sized by the key's recent
//! spending ([`headroom`]): two seconds of it, at least [`MIN_HEADROOM`] units and at least the
//! reservation asking, at most [`max_headroom`] (2% of the key's limit). After a crash a key
//! restarts at its ceiling, so a `kill -9` strands at most the reservations in flight plus one
//! headroom per key, but never gives quota back. A request whose reservation would pass its
//! key's durable ceiling waits (asynchronously) for the writer; ceilings are raised when less
//! than half the headroom is left, about one second of a busy key's spending ahead of it, so
//! this is rare once a key's rate is known ([`Ledger::durable_waits`] counts it).
//! A clean shutdown writes exact values.
//!
//! Counters of budget periods end: each carries an `until` ([`Part::until`]) after which no
//! window reads it. The writer drops ended counters that hold no reservation every
//! [`FORGET_EVERY`], from memory and from the files (the snapshot is rewritten without them
//! and the journal emptied); lifetime counters (`until` 0) are never dropped.

mod expiry;
mod files;
mod handles;
mod joint;
mod lease;
pub mod limits;
mod reservation;
mod writer;

use self::expiry::{sweep_in_memory, unknown_until};
use self::files::{load_state, DiskState, HANDOFF, LOCK};
pub use expiry::FORGET_EVERY;
pub use joint::{Behind, Charged, Part, Parts, MAX_PARTS};
pub use lease::RedisSettings;
pub use reservation::Reservation;

use dashmap::DashMap;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use crate::core::pricing::MAX_AMOUNT;

/// A concurrent map by counter id, found on every admission: foldhash instead of the default
/// SipHash (several lookups a call; the ids are set by the operator or are hashes already, and
/// the seed is random per map all the same).
pub(crate) type IdMap<V> = DashMap<u64, V, foldhash::fast::RandomState>;

/// The counters of one key id.
#[derive(Debug, Default)]
pub struct KeyCounter {
    /// Settled charges plus outstanding reservations.
    committed: AtomicI64,
    /// Settled charges.
    consumed: AtomicI64,
    /// The ceiling known to be on disk.
    durable: AtomicI64,
    /// The ceiling the writer has been asked for.
    wanted: AtomicI64,
    /// Whether the id is in the writer's queue.
    queued: AtomicBool,
    /// `consumed` as last written to the consumed report.
    reported: AtomicI64,
    /// [`HEADROOM_COVERS`] of the key's spending, as the writer last measured it.
    rate_room: AtomicI64,
    /// `committed` when the writer's current measuring window began (writer only).
    rate_mark: AtomicI64,
    /// When that window began, in ms since the ledger started (writer only).
    rate_since: AtomicU64,
    /// When the counter may be dropped, in unix seconds ([`Part::until`]); 0: never.
    until: AtomicI64,
    /// `until` as last written to the journal (writer only).
    until_logged: AtomicI64,
}

impl KeyCounter {
    /// Settled charges.
    pub fn consumed(&self) -> i64 {
        self.consumed.load(Ordering::Acquire)
    }
    /// Settled charges plus outstanding reservations.
    pub fn committed(&self) -> i64 {
        self.committed.load(Ordering::Acquire)
    }
    /// When the counter may be dropped, in unix seconds; 0: never.
    pub fn until(&self) -> i64 {
        self.until.load(Ordering::Relaxed)
    }
}

/// Why a reservation was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveError {
    /// The key's remaining quota cannot cover the reservation.
    Insufficient {
        /// What is left (may be ≤ 0).
        remaining: i64,
    },
    /// The ceiling could not be made durable in time (slow or failing disk).
    NotDurable,
    /// The shared ledger (Redis) cannot be reached and `on_unavailable` refuses the call.
    BackendUnavailable,
}

/// The state of a shared ledger, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendState {
    /// Whether Redis answered the last call (true before the first call is made).
    pub up: bool,
    /// Whether Redis has answered at least once since the gateway started.
    pub connected: bool,
    /// What the gateway does while it does not.
    pub on_unavailable: crate::core::config::OnUnavailable,
    /// Redis calls made so far.
    pub ops: u64,
    /// Redis calls that failed or timed out.
    pub errors: u64,
}

struct Shared {
    counters: IdMap<Arc<KeyCounter>>,
    dir: Option<PathBuf>,
    queue: Mutex<Vec<u64>>,
    wake: Condvar,
    flushed: tokio::sync::watch::Sender<u64>,
    stop: AtomicBool,
    outstanding_total: AtomicI64,
    write_errors: AtomicU64,
    /// Reservations that found their key's ceiling not yet on disk and waited for the writer.
    waits: AtomicU64,
    wait_timeout: Duration,
    /// The origin of the writer's rate windows.
    started: Instant,
    /// Journal appends take it shared, compaction exclusive, so that two processes sharing the
    /// folder during a binary upgrade never lose each other's entries.
    lock: Option<File>,
    /// A successor (binary upgrade) started at this time with these values, and waits for its
    /// predecessor's exact final values to correct them.
    successor: Mutex<Option<(i64, HashMap<u64, i64>)>>,
    /// The writer thread, joined before the final write.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held while this process appends to the journal or rewrites the snapshot: the folder's
    /// lock (`flock`) is shared by all threads of a process, so it does not order them.
    disk: Mutex<()>,
}

/// The ledger. Cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
    /// The shared ledger on Redis, when configured: counters live there, not in `shared`.
    lease: Option<Arc<lease::LeaseLedger>>,
    /// The rate limits shared through Redis, with `lease`.
    rates: Option<Arc<lease::rates::RateLeases>>,
}

/// The least headroom a key's durable ceiling is raised with, in units: what a key spending
/// little can strand in a crash, beyond its reservations in flight.
pub const MIN_HEADROOM: i64 = 1_000;

/// How much of a key's recent spending its headroom covers (as the shared ledger sizes its
/// leases). The spending is measured by the writer over windows of one second.
pub const HEADROOM_COVERS: Duration = Duration::from_secs(2);

/// The most headroom a key's ceiling is raised with: 2% of its limit, between 1 000 and
/// 1 000 000 units (1 000 000 for unlimited keys).
pub fn max_headroom(limit: Option<i64>) -> i64 {
    match limit {
        Some(l) => (l / 50).clamp(MIN_HEADROOM, 1_000_000),
        None => 1_000_000,
    }
}

/// The headroom a raise of a key's durable ceiling asks for beyond what is committed:
/// `rate_room` ([`HEADROOM_COVERS`] of the key's spending), at least [`MIN_HEADROOM`] and at
/// least `amount` (the reservation asking, so that the next call of its size finds room), at
/// most [`max_headroom`]. A crash strands at most this plus the reservations in flight.
pub fn headroom(rate_room: i64, amount: i64, limit: Option<i64>) -> i64 {
    rate_room
        .max(amount)
        .max(MIN_HEADROOM)
        .min(max_headroom(limit))
}

impl Ledger {
    /// A ledger that lives in memory only (nothing survives the process). For embedding and tests.
    /// A thread drops its ended budget counters every [`FORGET_EVERY`] (a persisted ledger's
    /// writer does it for one with files); it ends with the ledger.
    pub fn in_memory() -> Ledger {
        let ledger = Ledger::build(None, DiskState::default());
        let shared = Arc::downgrade(&ledger.shared);
        let swept = std::thread::Builder::new()
            .name("keygate-ledger-sweep".into())
            .spawn(move || sweep_in_memory(&shared));
        if let Err(e) = swept {
            log::error!("ledger: cannot start the thread that drops ended budget counters: {e}");
        }
        ledger
    }

    /// A ledger shared with other gateways through Redis (see the `lease` module). What this
    /// gateway charged before, in its local ledger in `history` (if any), is added to Redis
    /// once per key (the first gateway to seed a key wins).
    pub fn redis(settings: RedisSettings, history: Option<&Path>) -> std::io::Result<Ledger> {
        let seed = history.map(lease::local_history).unwrap_or_default();
        let mut ledger = Ledger::in_memory();
        ledger.rates = Some(lease::rates::RateLeases::start(settings.clone())?);
        ledger.lease = Some(lease::LeaseLedger::start(settings, seed)?);
        Ok(ledger)
    }

    /// The rate limits shared with other gateways (the ledger is on Redis); `None`: this
    /// gateway's own buckets decide.
    #[inline]
    pub(crate) fn shared_rates(&self) -> Option<&Arc<lease::rates::RateLeases>> {
        self.rates.as_ref()
    }

    /// Rate-limit script calls made to Redis so far (0 for a local ledger).
    pub fn rate_ops(&self) -> u64 {
        self.rates.as_ref().map_or(0, |r| r.ops())
    }

    /// The shared ledger's state; `None` for a local one.
    pub fn backend_state(&self) -> Option<BackendState> {
        let l = self.lease.as_ref()?;
        let (ops, errors) = l.ops();
        let ops = ops + self.rate_ops();
        Some(BackendState {
            up: l.is_up(),
            connected: l.has_reached(),
            on_unavailable: l.mode(),
            ops,
            errors,
        })
    }

    /// Bring the cached consumption of `key_id` up to date before [`Ledger::consumed`] is read
    /// (a shared ledger reads Redis, within its timeout; a local one has nothing to do).
    /// False when a shared ledger has never been able to read it: [`Ledger::consumed`] would
    /// only know this gateway's part.
    pub async fn refresh(&self, key_id: u64) -> bool {
        match &self.lease {
            Some(l) => l.refresh(key_id).await,
            None => true,
        }
    }

    /// Open (or create) the persisted ledger in `dir` and start its writer thread.
    pub fn open(dir: &Path) -> std::io::Result<Ledger> {
        Ledger::open_with(dir, false)
    }

    /// Open the ledger in `dir`; a `successor` (the new process of a binary upgrade, started
    /// while the old one still serves) starts from the old process's durable ceilings and, once
    /// the old process has exited and handed off its exact values, corrects its counters by the
    /// difference. Quota is never given back while both run.
    pub fn open_with(dir: &Path, successor: bool) -> std::io::Result<Ledger> {
        std::fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK))?;
        lock.lock_shared()?;
        let state = load_state(dir)?;
        lock.unlock()?;
        let handoff = dir.join(HANDOFF);
        if !successor && handoff.exists() {
            // A stale handoff (its successor never applied it): its values are below the
            // ceilings just loaded, so dropping it gives nothing back.
            let _ = std::fs::remove_file(&handoff);
        }
        let ceilings = state.ceilings.clone();
        let mut ledger = Ledger::build(Some(dir.to_path_buf()), state);
        if let Some(shared) = Arc::get_mut(&mut ledger.shared) {
            shared.lock = Some(lock);
            if successor {
                shared.successor = Mutex::new(Some((crate::core::clock::unix_now(), ceilings)));
            }
        }
        let writer = ledger.clone();
        let handle = std::thread::Builder::new()
            .name("keygate-ledger".into())
            .spawn(move || writer.writer_loop())?;
        if let Ok(mut w) = ledger.shared.writer.lock() {
            *w = Some(handle);
        }
        Ok(ledger)
    }

    fn build(dir: Option<PathBuf>, state: DiskState) -> Ledger {
        let now = crate::core::clock::unix_now();
        let counters = IdMap::with_capacity_and_hasher(state.ceilings.len(), Default::default());
        for (id, c) in state.ceilings {
            let k = KeyCounter::default();
            k.committed.store(c, Ordering::Relaxed);
            k.consumed.store(c, Ordering::Relaxed);
            k.durable.store(c, Ordering::Relaxed);
            k.wanted.store(c, Ordering::Relaxed);
            k.rate_mark.store(c, Ordering::Relaxed);
            match state.until.get(&id) {
                Some(&u) => {
                    k.until.store(u, Ordering::Relaxed);
                    k.until_logged.store(u, Ordering::Relaxed);
                }
                None => k.until.store(unknown_until(id, now), Ordering::Relaxed),
            }
            counters.insert(id, Arc::new(k));
        }
        let (flushed, _) = tokio::sync::watch::channel(0);
        Ledger {
            lease: None,
            rates: None,
            shared: Arc::new(Shared {
                counters,
                dir,
                queue: Mutex::new(Vec::new()),
                wake: Condvar::new(),
                flushed,
                stop: AtomicBool::new(false),
                outstanding_total: AtomicI64::new(0),
                write_errors: AtomicU64::new(0),
                waits: AtomicU64::new(0),
                wait_timeout: Duration::from_secs(5),
                started: Instant::now(),
                lock: None,
                successor: Mutex::new(None),
                writer: Mutex::new(None),
                disk: Mutex::new(()),
            }),
        }
    }

    /// Whether counters are persisted.
    pub fn is_persistent(&self) -> bool {
        self.shared.dir.is_some()
    }

    /// The counter for `key_id` (created at zero on first use).
    pub fn counter(&self, key_id: u64) -> Arc<KeyCounter> {
        if let Some(c) = self.shared.counters.get(&key_id) {
            return c.clone();
        }
        self.shared
            .counters
            .entry(key_id)
            .or_insert_with(|| {
                let k = KeyCounter::default();
                if self.shared.dir.is_none() {
                    k.durable.store(i64::MAX, Ordering::Relaxed);
                }
                Arc::new(k)
            })
            .clone()
    }

    /// What keygate has charged `key_id` (settled calls), without creating a counter.
    pub fn consumed(&self, key_id: u64) -> i64 {
        if let Some(l) = &self.lease {
            return l.consumed(key_id);
        }
        self.shared
            .counters
            .get(&key_id)
            .map_or(0, |c| c.consumed())
    }

    /// Reservations outstanding across all keys (a joint reservation of this process counts
    /// once; on a shared ledger each of its counters does).
    pub fn outstanding(&self) -> i64 {
        let leased = self.lease.as_ref().map_or(0, |l| l.outstanding());
        self.shared.outstanding_total.load(Ordering::Relaxed) + leased
    }

    /// Counters held in memory: this process's, or on a shared ledger its entries for the
    /// counters it used (ended budget periods go, see [`Ledger::forget_ended`]).
    pub fn counters(&self) -> usize {
        self.shared.counters.len() + self.lease.as_ref().map_or(0, |l| l.slots())
    }

    /// Failed journal or snapshot writes so far.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Reservations so far that found their key's durable ceiling too low and waited for the
    /// writer (a local, persisted ledger only).
    pub fn durable_waits(&self) -> u64 {
        self.shared.waits.load(Ordering::Relaxed)
    }

    /// Take `amount` units of `key_id`'s quota, or refuse. `limit` is what the key may commit in
    /// total (`quota − used`), `None` for unlimited keys. One atomic read-modify-write decides.
    pub async fn reserve(
        &self,
        key_id: u64,
        limit: Option<i64>,
        amount: i64,
    ) -> Result<Reservation, ReserveError> {
        let parts = Parts::from_iter([Part::lifetime(key_id, limit)]);
        self.reserve_all(&parts, amount).await.map_err(|(_, e)| e)
    }

    /// After a settle above its reservation, wait (at most the usual timeout) until the key's
    /// durable ceiling covers what is committed, so a crash right after cannot give the
    /// overage back. Nothing to wait for in the common case (settled at or below the estimate).
    pub async fn make_committed_durable(&self, key_id: u64) {
        let Some(counter) = self.shared.counters.get(&key_id).map(|c| c.clone()) else {
            return;
        };
        let committed = counter.committed();
        if committed > counter.durable.load(Ordering::Acquire) {
            // The least headroom: it is within every key's bound, whatever its limit.
            let _ = self
                .make_durable(key_id, &counter, committed, MIN_HEADROOM)
                .await;
        }
    }

    /// Make sure `counter`'s durable ceiling covers `needed`: [`Ledger::ceiling_covers`], then
    /// [`Ledger::on_disk`] (within the timeout) when it does not.
    async fn make_durable(
        &self,
        key_id: u64,
        counter: &KeyCounter,
        needed: i64,
        room: i64,
    ) -> Result<(), ReserveError> {
        if self.ceiling_covers(key_id, counter, needed, room) {
            return Ok(());
        }
        self.within_wait_timeout(self.on_disk(counter, needed))
            .await
    }

    /// Whether `counter`'s durable ceiling covers `needed`; asks the writer for `needed` plus
    /// `room` once less than half of `room` is left above `needed` (never waits).
    #[inline]
    fn ceiling_covers(&self, key_id: u64, counter: &KeyCounter, needed: i64, room: i64) -> bool {
        let durable = counter.durable.load(Ordering::Acquire);
        if needed <= durable.saturating_sub(room / 2) {
            return true;
        }
        request_ceiling(&self.shared, key_id, counter, needed.saturating_add(room));
        needed <= durable
    }

    /// Wait until the writer has `counter`'s ceiling on disk at `needed` or more (counted in
    /// [`Ledger::durable_waits`]); callers bound it with [`Ledger::within_wait_timeout`].
    async fn on_disk(&self, counter: &KeyCounter, needed: i64) {
        self.shared.waits.fetch_add(1, Ordering::Relaxed);
        let mut rx = self.shared.flushed.subscribe();
        loop {
            if counter.durable.load(Ordering::Acquire) >= needed {
                return;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// `waits`, given at most the ledger's timeout for durable ceilings (all of them together:
    /// a call waiting for several counters on a stalled disk is refused after one timeout).
    async fn within_wait_timeout<T>(
        &self,
        waits: impl std::future::Future<Output = T>,
    ) -> Result<T, ReserveError> {
        tokio::time::timeout(self.shared.wait_timeout, waits)
            .await
            .map_err(|_| ReserveError::NotDurable)
    }
}

/// Ask the writer to raise `counter`'s durable ceiling to at least `target` (never waits).
fn request_ceiling(shared: &Shared, key_id: u64, counter: &KeyCounter, target: i64) {
    // SeqCst pairs with the writer's clear-then-read of `queued` and `wanted`: either the writer
    // sees this `wanted`, or this swap sees `queued` cleared and queues the id again.
    counter.wanted.fetch_max(target, Ordering::SeqCst);
    if shared.dir.is_none() {
        counter.durable.store(i64::MAX, Ordering::Release);
        return;
    }
    if !counter.queued.swap(true, Ordering::SeqCst) {
        if let Ok(mut q) = shared.queue.lock() {
            q.push(key_id);
        }
        shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::expiry::UNKNOWN_KEEP;
    use super::files::*;
    use super::writer::measure_rate;
    use super::*;

    #[tokio::test]
    async fn reserve_settle_refund() {
        let l = Ledger::in_memory();
        let r = l.reserve(1, Some(100), 60).await.unwrap();
        assert_eq!(
            l.reserve(1, Some(100), 50).await.unwrap_err(),
            ReserveError::Insufficient { remaining: 40 }
        );
        r.settle(30);
        assert_eq!(l.consumed(1), 30);
        let r = l.reserve(1, Some(100), 70).await.unwrap();
        drop(r);
        assert_eq!(l.counter(1).committed(), 30);
        assert_eq!(l.outstanding(), 0);
        // Unlimited keys are never refused.
        l.reserve(2, None, i64::MAX / 2).await.unwrap().settle(5);
        assert_eq!(l.consumed(2), 5);
    }

    /// Many threads racing on one key: the committed total never passes the limit through
    /// reservations, and every reservation is either settled or refunded.
    #[test]
    fn concurrent_reservations_never_pass_the_limit() {
        let l = Ledger::in_memory();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let limit = 1_000;
        let granted = Arc::new(AtomicI64::new(0));
        std::thread::scope(|s| {
            for t in 0..8 {
                let (l, granted) = (l.clone(), granted.clone());
                let rt = &rt;
                s.spawn(move || {
                    for i in 0..2_000 {
                        let amount = 1 + (i + t) % 7;
                        if let Ok(r) = rt.block_on(l.reserve(9, Some(limit), amount)) {
                            assert!(l.counter(9).committed() <= limit);
                            granted.fetch_add(1, Ordering::Relaxed);
                            if i % 3 == 0 {
                                drop(r);
                            } else {
                                r.settle(amount - 1);
                            }
                        }
                    }
                });
            }
        });
        let c = l.counter(9);
        assert_eq!(l.outstanding(), 0);
        assert_eq!(c.committed(), c.consumed());
        assert!(c.consumed() <= limit);
        assert!(granted.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn ceilings_survive_reopen_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        for _ in 0..10 {
            l.reserve(7, Some(1_000_000), 100)
                .await
                .unwrap()
                .settle(100);
        }
        assert_eq!(l.consumed(7), 1_000);
        // No clean shutdown: a crash. The reopened ledger starts at the durable ceiling, which
        // a key spending this little keeps at most its headroom (plus the reservation that
        // asked) above what it committed: the least headroom, or `HEADROOM_COVERS` of its
        // rate when the writer measured one meanwhile (a slow loop, under load: all 1 000 in
        // one second is 2 000); 2% of its limit (20 000) before.
        let crashed = Ledger::open(dir.path()).unwrap();
        let after = crashed.consumed(7);
        assert!(after >= 1_000, "gave quota back: {after}");
        let covers = HEADROOM_COVERS.as_secs() as i64 * 1_000;
        assert!(
            after <= 1_000 + MIN_HEADROOM.max(covers) + 100,
            "stranded too much: {after}"
        );
        // A clean shutdown writes exact values.
        l.shutdown().unwrap();
        let reopened = Ledger::open(dir.path()).unwrap();
        assert_eq!(reopened.consumed(7), 1_000);
        // Nothing is above the exact value on disk now: the first call waits for one write,
        // whose headroom lets the next ones through.
        for _ in 0..50 {
            reopened
                .reserve(7, Some(1_000_000), 10)
                .await
                .unwrap()
                .settle(10);
        }
        assert_eq!(reopened.durable_waits(), 1);
    }

    #[test]
    fn headroom_follows_the_rate_between_the_floor_and_the_cap() {
        let limit = Some(10_000_000);
        assert_eq!(headroom(0, 10, limit), MIN_HEADROOM);
        assert_eq!(headroom(50_000, 10, limit), 50_000);
        // A reservation larger than the rate's headroom leaves room for another like it.
        assert_eq!(headroom(50_000, 80_000, limit), 80_000);
        // Capped at 2% of the limit, between 1 000 and 1 000 000 (unlimited: 1 000 000).
        assert_eq!(headroom(5_000_000, 10, limit), 200_000);
        assert_eq!(headroom(0, 5_000_000, limit), 200_000);
        assert_eq!(headroom(5_000_000, 10, None), 1_000_000);
        assert_eq!(headroom(5_000_000, 10, Some(10_000)), MIN_HEADROOM);
        assert_eq!(headroom(i64::MAX, MAX_AMOUNT, Some(i64::MAX)), 1_000_000);
    }

    #[test]
    fn the_rate_is_measured_over_windows_of_a_second() {
        let c = KeyCounter::default();
        let spend = |n| c.committed.fetch_add(n, Ordering::Relaxed);
        spend(1_000);
        // Half a second in: counted as a second, so far (2 s of 1 000/s).
        measure_rate(&c, 500);
        assert_eq!(c.rate_room.load(Ordering::Relaxed), 2_000);
        spend(2_000);
        // The window ends: 3 000 in 1 s.
        measure_rate(&c, 1_000);
        assert_eq!(c.rate_room.load(Ordering::Relaxed), 6_000);
        // A quiet half second only measures; it does not lower what the last window saw.
        spend(100);
        measure_rate(&c, 1_500);
        assert_eq!(c.rate_room.load(Ordering::Relaxed), 6_000);
        // The window ends after 1.5 s: 100 units, 2 s of 66.7/s.
        measure_rate(&c, 2_500);
        assert_eq!(c.rate_room.load(Ordering::Relaxed), 133);
        measure_rate(&c, 4_000);
        assert_eq!(c.rate_room.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_large_reservation_is_covered_with_room_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        // Limit 10 000 000: the headroom is capped at 200 000.
        let r = l.reserve(1, Some(10_000_000), 150_000).await.unwrap();
        assert_eq!(l.durable_waits(), 1);
        let c = l.counter(1);
        assert_eq!(c.durable.load(Ordering::Acquire), 150_000 + 150_000);
        r.settle(50_000);
        // The next call of its size fits under what is on disk: no wait.
        l.reserve(1, Some(10_000_000), 150_000)
            .await
            .unwrap()
            .settle(50_000);
        assert_eq!(l.durable_waits(), 1);
        // Larger than the cap: the ceiling covers it plus the cap.
        let r = l.reserve(1, Some(10_000_000), 500_000).await.unwrap();
        assert_eq!(l.durable_waits(), 2);
        assert_eq!(c.durable.load(Ordering::Acquire), 600_000 + 200_000);
        drop(r);
        // Unlimited: capped at 1 000 000.
        l.reserve(2, None, 3_000_000).await.unwrap().settle(1);
        assert_eq!(l.counter(2).durable.load(Ordering::Acquire), 4_000_000);
    }

    /// A key driven at a steady rate through the real writer (journal, fsync): its reservations
    /// almost never wait, and what a crash would strand follows its rate, not its limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_key_rarely_waits_and_strands_about_two_seconds_of_spending() {
        const TASKS: i64 = 4;
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        // Limit 100 000 000: 2% is 2 000 000, the old chunk (and the cap) 1 000 000.
        let limit = Some(100_000_000);
        let started = Instant::now();
        let calls = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (l, calls) = (l.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while started.elapsed() < Duration::from_secs(3) {
                    tick.tick().await;
                    l.reserve(1, limit, 10).await.unwrap().settle(4);
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let calls = calls.load(Ordering::Relaxed);
        let rate = l.consumed(1) as f64 / elapsed;
        let waits = l.durable_waits();
        // Crash now (the writer may still be writing): the disk holds the ceiling.
        let stranded = Ledger::open(dir.path()).unwrap().consumed(1) - l.consumed(1);
        eprintln!(
            "busy key: {calls} calls in {elapsed:.2} s ({rate:.0} units/s), {waits} waited; \
             a crash strands {stranded} = {:.2} s of spending",
            stranded as f64 / rate
        );
        assert!(calls > 1_000, "the load ran: {calls} calls");
        assert!(waits * 100 <= calls, "{waits} of {calls} calls waited");
        assert!(stranded >= 0);
        let bound = (3.0 * rate) as i64 + MIN_HEADROOM + TASKS * 10;
        assert!(stranded <= bound, "stranded {stranded} > {bound}");

        // Idle until the writer measures no spending (a window or two), then a burst of 200
        // at once: the headroom left on disk from the busy time covers it.
        let idle = Instant::now();
        while l.counter(1).rate_room.load(Ordering::Relaxed) > 0 {
            assert!(
                idle.elapsed() < Duration::from_secs(5),
                "the rate never fell"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let burst = (0..200).map(|_| l.reserve(1, limit, 10));
        for r in futures_util::future::join_all(burst).await {
            r.unwrap().settle(4);
        }
        let burst_waits = l.durable_waits() - waits;
        eprintln!(
            "burst of 200 after {:.1} s idle: {burst_waits} waited",
            idle.elapsed().as_secs_f64()
        );
        assert_eq!(burst_waits, 0);
    }

    /// Long calls reserve at once and settle seconds later: their burst must widen the headroom
    /// as the reservations come, not when they settle (measured on what settled, the headroom
    /// stayed at the floor and each writer round let only about fifty 20-unit calls through).
    /// Checked on the measure itself: how many reservations wait for a writer round depends on
    /// how fast this machine polls against how fast it fsyncs, so it is not asserted.
    #[tokio::test]
    async fn a_burst_of_long_calls_widens_the_headroom_as_they_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let limit = Some(1_000_000_000_000);
        l.reserve(1, limit, 20).await.unwrap().settle(20);
        // A window that starts far ahead of the writer's clock: its rounds during the burst
        // only raise the room, they never start a new window.
        let c = l.counter(1);
        let start = u64::MAX / 2;
        c.rate_mark.store(c.committed(), Ordering::Relaxed);
        c.rate_since.store(start, Ordering::Relaxed);
        let burst = (0..2_000).map(|_| l.reserve(1, limit, 20));
        let held: Vec<Reservation> = futures_util::future::join_all(burst)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        // Nothing has settled; the window's measure sees the 40 000 units reserved.
        measure_rate(&c, start + 1_000);
        let room = c.rate_room.load(Ordering::Relaxed);
        assert!(
            room >= 2 * 40_000,
            "headroom {room} after 40 000 units reserved in a second"
        );
        assert!(headroom(room, 20, limit) >= 80_000);
        drop(held);
    }

    #[test]
    fn torn_journal_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(JOURNAL),
            "1 500\nuntil 2 1800000000\n1 900\n2 30\n1 12\nuntil 2 17",
        )
        .unwrap();
        let m = load_state(dir.path()).unwrap();
        assert_eq!(m.ceilings[&1], 900);
        assert_eq!(m.ceilings[&2], 30);
        // A torn `until` would end the counter too early: not taken.
        assert_eq!(m.until[&2], 1_800_000_000);
        assert!(!m.until.contains_key(&1));
    }

    /// An in-memory ledger (a gateway with no ledger folder) drops ended counters too.
    #[tokio::test]
    async fn an_in_memory_ledger_drops_ended_budget_counters() {
        let l = Ledger::in_memory();
        let budget = Part {
            id: crate::core::accounts::budget_ledger_id(7, 0),
            limit: Some(500),
            until: 1_000,
            cell: None,
        };
        let parts = Parts::from_iter([Part::lifetime(7, None), budget]);
        l.reserve_all(&parts, 10).await.unwrap().settle(10);
        assert_eq!(l.forget_ended(999).unwrap(), 0);
        assert_eq!(l.forget_ended(1_000).unwrap(), 1);
        assert_eq!((l.counters(), l.consumed(7)), (1, 10));
    }

    /// A key's calls charged to the key, its account and a daily budget: once period A's
    /// `until` passes (a moved clock), A's counter goes from memory and from the files; the
    /// lifetime counters and the next period's stay, with their values, across a crash and a
    /// clean restart.
    #[tokio::test]
    async fn ended_budget_counters_leave_memory_and_files() {
        use crate::core::accounts::{account_ledger_id, budget_ledger_id};
        use crate::core::budget::KEEP_ENDED;
        const DAY: i64 = 86_400;
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        // Far ahead of the real clock: the writer's own sweeps never reach these periods.
        let a_start = (crate::core::clock::unix_now() / DAY + 100) * DAY;
        let (key, account) = (7, account_ledger_id("acme"));
        let (a, b) = (
            budget_ledger_id(key, a_start),
            budget_ledger_id(key, a_start + DAY),
        );
        let (a_until, b_until) = (a_start + DAY + KEEP_ENDED, a_start + 2 * DAY + KEEP_ENDED);
        let parts = |budget, until| {
            Parts::from_iter([
                Part::lifetime(key, Some(1_000_000)),
                Part::lifetime(account, None),
                Part {
                    id: budget,
                    limit: Some(500),
                    until,
                    cell: None,
                },
            ])
        };
        for _ in 0..3 {
            l.reserve_all(&parts(a, a_until), 100)
                .await
                .unwrap()
                .settle(40);
        }
        l.reserve_all(&parts(b, b_until), 100)
            .await
            .unwrap()
            .settle(25);
        // A crash before any sweep: the journal kept when each period ends.
        let crashed = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            (crashed.counter(a).until(), crashed.counter(b).until()),
            (a_until, b_until)
        );
        assert_eq!(crashed.counter(key).until(), 0);
        drop(crashed);

        assert_eq!(l.forget_ended(a_until - 1).unwrap(), 0, "A is still read");
        let held = l.reserve_all(&parts(a, a_until), 10).await.unwrap();
        assert_eq!(l.forget_ended(a_until).unwrap(), 0, "a call holds A");
        drop(held);
        assert_eq!(l.counters(), 4);
        assert_eq!(l.forget_ended(a_until).unwrap(), 1);
        assert!(l.shared.counters.get(&a).is_none());
        assert_eq!(l.counters(), 3);
        assert_eq!(
            (l.consumed(key), l.consumed(account), l.consumed(b)),
            (145, 145, 25)
        );

        // On disk: the snapshot has no A, the journal is empty.
        let disk = load_state(dir.path()).unwrap();
        assert!(!disk.ceilings.contains_key(&a) && !disk.until.contains_key(&a));
        assert_eq!(disk.until.get(&b), Some(&b_until));
        assert!(!disk.until.contains_key(&key) && !disk.until.contains_key(&account));
        assert_eq!(
            std::fs::metadata(dir.path().join(JOURNAL)).unwrap().len(),
            0
        );
        // A crash now: A does not come back; the others restart at their ceilings.
        let crashed = Ledger::open(dir.path()).unwrap();
        assert!(crashed.shared.counters.get(&a).is_none());
        assert!(crashed.consumed(key) >= 145 && crashed.consumed(account) >= 145);
        assert!(crashed.consumed(b) >= 25);
        drop(crashed);
        // A clean shutdown and restart: exact values, B still ending when it did.
        l.shutdown().unwrap();
        let reopened = Ledger::open(dir.path()).unwrap();
        assert!(reopened.shared.counters.get(&a).is_none());
        assert_eq!(
            (
                reopened.consumed(key),
                reopened.consumed(account),
                reopened.consumed(b)
            ),
            (145, 145, 25)
        );
        assert_eq!(reopened.counter(b).until(), b_until);
        // B ends in turn; the lifetime counters never do.
        assert_eq!(reopened.forget_ended(i64::MAX).unwrap(), 1);
        assert_eq!(
            (reopened.consumed(key), reopened.consumed(account)),
            (145, 145)
        );
        reopened.shutdown().unwrap();
        let last = load_state(dir.path()).unwrap();
        assert_eq!(last.ceilings.len(), 2, "{:?}", last.ceilings);
    }

    /// A ledger written before counters had an `until`: its budget counters still end
    /// ([`UNKNOWN_KEEP`] after they are found, or their own `until` once used), its other
    /// counters never.
    #[test]
    fn budget_counters_of_an_older_ledger_still_end() {
        use crate::core::accounts::budget_ledger_id;
        let dir = tempfile::tempdir().unwrap();
        let budget = budget_ledger_id(7, 0);
        std::fs::write(
            dir.path().join(SNAPSHOT),
            format!("{{\"version\":1,\"ceilings\":{{\"7\":50,\"{budget}\":20}}}}\n"),
        )
        .unwrap();
        let now = crate::core::clock::unix_now();
        let l = Ledger::open(dir.path()).unwrap();
        let until = l.counter(budget).until();
        assert!((now + UNKNOWN_KEEP..=now + UNKNOWN_KEEP + 5).contains(&until));
        assert_eq!(l.counter(7).until(), 0);
        assert_eq!(l.forget_ended(until - 1).unwrap(), 0);
        assert_eq!(l.forget_ended(until).unwrap(), 1);
        assert_eq!((l.consumed(7), l.consumed(budget)), (50, 0));
        // Gone from the snapshot too, though it had no `until` on disk.
        let disk = load_state(dir.path()).unwrap();
        assert_eq!(disk.ceilings, HashMap::from([(7, 50)]));
    }
}
