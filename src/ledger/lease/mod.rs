//! The shared ledger: several gateways, one quota, kept in Redis (or Valkey, or Redis Cluster).
//!
//! Redis holds, per key id, `committed`: every unit granted to a gateway as a *lease*, plus
//! overdrafts, minus leases given back. A lease is taken with one atomic script that grants only
//! out of the room left under the key's limit, so leases alone can never overspend. Each gateway
//! debits its leases with atomics on the request path; a background task refills them before
//! they run out, gives back what idle keys hold, and every second reports what changed.
//!
//! Per key and gateway, Redis also keeps a lease record: what the gateway was granted in total,
//! what it still holds unspent, and until when the record is valid (renewed with every sync).
//! A key's consumption, as `/api/usage/token/` shows it on any gateway, is `committed` minus
//! what live gateways hold. When a gateway dies its record expires and what it held counts as
//! spent: stranded (at most one lease per key), never given back, so a `kill -9` loses no
//! consumption and frees no quota.
//!
//! Every script call carries what the gateway believes it was granted; Redis applies the call
//! only when that matches its record, and the gateway corrects itself from the answer. So a
//! call whose answer was lost (a timeout) is never applied twice, and a grant whose answer was
//! lost is credited on the next call. A missing record is trusted (the gateway's word taken,
//! less a give-back whose answer it lost) only when it may have been deleted for age, a day and
//! an hour after it expired: not when the gateway saw it valid within the day (every answer
//! says until when, on Redis's clock), nor when `committed` is below that word. Then Redis lost
//! it with its grants, and the gateway commits what it spent from them again.
//!
//! The bound: a call is admitted only against a lease, and leases come only out of room under
//! the limit, so a key's consumption passes its limit only by settle differences (a call that
//! costs more than it reserved) that its gateway's lease cannot absorb: at most one call's
//! settle difference per call in flight when the key ran out, the bound of a single gateway.
//! Leases shrink near the limit (at most an eighth of the room left, or what the waiting calls
//! need), so the quota stranded in other gateways' leases shrinks with it.
//!
//! A budget period's counter ends ([`crate::ledger::Part::until`]): every sync sets its two
//! Redis keys to expire then (`EXPIREAT`), and the worker forgets the key's slot once its
//! lease is given back. Lifetime counters never expire.

mod rate_worker;
pub(crate) mod rates;
mod scripts;
pub(crate) mod slot;
mod worker;

use self::scripts::{connect, Scripts};
use self::worker::Worker;
use super::ReserveError;
use crate::core::config::OnUnavailable;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Settle differences and consumption are reported at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A key unused for this long (or the lease TTL, if shorter) gives its lease back.
const IDLE_MS: u64 = 10_000;
/// A lease covers about this much of a key's recent spending.
const LEASE_COVERS: Duration = Duration::from_secs(2);
/// Script calls in flight at once.
const CONCURRENT_CALLS: usize = 64;

/// Where the shared ledger is and what to do without it.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// Seed nodes of a cluster, or the one server's address.
    pub urls: Vec<String>,
    /// Whether `urls` name a Redis Cluster.
    pub cluster: bool,
    /// What to do while Redis cannot be reached.
    pub on_unavailable: OnUnavailable,
    /// Longest one Redis call may take.
    pub timeout: Duration,
    /// How long a lease record lives without renewal (renewed every third of it); after that
    /// its holder counts as gone and what it held as spent.
    pub lease_ttl: Duration,
}

impl RedisSettings {
    /// The settings of a `ledger:` config section; `None` for `backend: local`.
    pub fn from_config(c: &crate::core::config::LedgerConfig) -> Option<RedisSettings> {
        use crate::core::config::LedgerBackend;
        (c.backend != LedgerBackend::Local).then(|| RedisSettings {
            urls: c.redis_urls(),
            cluster: c.backend == LedgerBackend::RedisCluster,
            on_unavailable: c.on_unavailable,
            timeout: Duration::from_millis(c.redis_timeout_ms),
            lease_ttl: Duration::from_secs(c.lease_ttl_seconds),
        })
    }
}

/// One key's allowance on this gateway.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    /// Units this gateway may still reserve from its lease; negative is an overdraft (settles
    /// above reservations, or admissions in `allow` mode) not yet reported.
    avail: AtomicI64,
    /// The key's limit at its last reservation (`-1`: unlimited).
    limit: AtomicI64,
    /// The last reservation's size.
    last_amount: AtomicI64,
    /// Units reserved so far (the lease size follows its rate).
    debited: AtomicI64,
    /// When the key was last used (ms since the ledger started).
    last_use: AtomicU64,
    /// A settle changed `avail` since the last report.
    dirty: AtomicBool,
    /// Queued for a refill.
    queued: AtomicBool,
    /// Below this, a refill is asked for.
    low_water: AtomicI64,
    /// All gateways' consumption, as of the last script answer.
    consumption: AtomicI64,
    /// `consumption` has been read from Redis at least once.
    consumption_read: AtomicBool,
    /// `avail` as recorded in Redis by that answer.
    recorded: AtomicI64,
    /// When the key's counter ends, in unix seconds (its Redis keys expire then); 0: never.
    until: AtomicI64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    ops: AtomicU64,
    errors: AtomicU64,
}

/// Where a waiting reservation learns whether it was granted.
type Reply = oneshot::Sender<Result<Granted, ReserveError>>;

/// Reservations waiting for a refill: (amount, reply, rounds waited), in arrival order.
type Waiters = Vec<(i64, Reply, u8)>;

enum Msg {
    /// A reservation that its lease cannot cover waits for a refill.
    Need {
        key_id: u64,
        slot: Arc<Slot>,
        amount: i64,
        reply: Reply,
        rounds: u8,
    },
    /// A lease ran low: refill it in the background.
    Refill(u64),
    /// Read a key's consumption now.
    Read(u64, oneshot::Sender<()>),
    /// Give every lease back and report everything, then answer.
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// The shared ledger of one gateway.
pub(crate) struct LeaseLedger {
    slots: crate::ledger::IdMap<Arc<Slot>>,
    mode: OnUnavailable,
    up: AtomicBool,
    /// Redis has answered at least once.
    reached: AtomicBool,
    stats: Stats,
    outstanding: AtomicI64,
    timeout: Duration,
    started: Instant,
    tx: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for LeaseLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseLedger({:?}, up: {})", self.mode, self.is_up())
    }
}

impl LeaseLedger {
    /// Start the ledger's own thread (a small tokio runtime that does all Redis I/O). The
    /// connection is made there, in the background: a gateway starts while Redis is down.
    /// `seed`: what this gateway charged before it used Redis, per counter with when it ends
    /// (from its local ledger).
    pub(crate) fn start(
        settings: RedisSettings,
        seed: HashMap<u64, (i64, i64)>,
    ) -> std::io::Result<Arc<LeaseLedger>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let ledger = Arc::new(LeaseLedger {
            slots: Default::default(),
            mode: settings.on_unavailable,
            // Not known to be down: the first calls wait for the worker's first connection.
            up: AtomicBool::new(true),
            reached: AtomicBool::new(false),
            stats: Stats::default(),
            outstanding: AtomicI64::new(0),
            timeout: settings.timeout,
            started: Instant::now(),
            tx,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker {
            ledger: ledger.clone(),
            settings,
            conn: None,
            gateway: gateway_id(),
            seed,
            keys: HashMap::new(),
            scripts: Arc::new(Scripts::new()),
        };
        std::thread::Builder::new()
            .name("keygate-ledger".into())
            .spawn(move || runtime.block_on(worker.run(rx)))?;
        Ok(ledger)
    }

    /// Whether the last Redis call succeeded (or none was made yet).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Whether Redis has answered at least once.
    pub(crate) fn has_reached(&self) -> bool {
        self.reached.load(Ordering::Acquire)
    }

    /// What to do while Redis is unreachable.
    pub(crate) fn mode(&self) -> OnUnavailable {
        self.mode
    }

    /// Script calls made so far, and the ones that failed.
    pub(crate) fn ops(&self) -> (u64, u64) {
        (
            self.stats.ops.load(Ordering::Relaxed),
            self.stats.errors.load(Ordering::Relaxed),
        )
    }

    /// Keys this gateway holds a slot for.
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Reservations not yet settled.
    pub(crate) fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn slot(&self, key_id: u64) -> Arc<Slot> {
        if let Some(s) = self.slots.get(&key_id) {
            return s.clone();
        }
        self.slots.entry(key_id).or_default().clone()
    }

    /// Take `amount` from this gateway's lease on `key_id`; when the lease cannot cover it, wait
    /// for one script call to refill it. `limit`: what the key may commit in total, `None` for
    /// unlimited keys (always admitted, counted); `until`: when its counter ends (0: never).
    pub(crate) async fn reserve(
        &self,
        key_id: u64,
        limit: Option<i64>,
        until: i64,
        amount: i64,
    ) -> Result<Arc<Slot>, ReserveError> {
        let slot = self.slot(key_id);
        super::joint::note_until(&slot.until, until);
        slot.limit.store(limit.unwrap_or(-1), Ordering::Relaxed);
        slot.last_amount.store(amount, Ordering::Relaxed);
        slot.last_use.store(self.now_ms(), Ordering::Relaxed);
        let up = self.is_up();
        if !up && self.mode == OnUnavailable::Deny {
            return Err(ReserveError::BackendUnavailable);
        }
        if limit.is_none() || (!up && self.mode == OnUnavailable::Allow) {
            self.debit(&slot, amount);
            return Ok(slot);
        }
        if self.try_debit(key_id, &slot, amount) {
            return Ok(slot);
        }
        if !up {
            return Err(ReserveError::BackendUnavailable);
        }
        let (reply, answer) = oneshot::channel();
        let need = Msg::Need {
            key_id,
            slot: slot.clone(),
            amount,
            reply,
            rounds: 0,
        };
        if self.tx.send(need).is_err() {
            return Err(ReserveError::BackendUnavailable);
        }
        // The worker answers within a few script calls; the bound is for a stuck worker. Units
        // granted after it passed go back to the lease (see `Granted`).
        match tokio::time::timeout(self.timeout * 4 + Duration::from_secs(1), answer).await {
            Ok(Ok(Ok(granted))) => {
                granted.claim();
                Ok(slot)
            }
            Ok(Ok(Err(e))) => Err(e),
            _ => Err(ReserveError::BackendUnavailable),
        }
    }

    /// Debit `amount` if the lease covers it; ask for a refill when it runs low.
    fn try_debit(&self, key_id: u64, slot: &Slot, amount: i64) -> bool {
        let Some(left) = self.take(slot, amount) else {
            return false;
        };
        if left < slot.low_water.load(Ordering::Relaxed)
            && !slot.queued.swap(true, Ordering::AcqRel)
        {
            let _ = self.tx.send(Msg::Refill(key_id));
        }
        true
    }

    /// Take `amount` from the lease if it covers it, counting the reservation; what is left.
    fn take(&self, slot: &Slot, amount: i64) -> Option<i64> {
        let before = slot
            .avail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a >= amount).then(|| a - amount)
            })
            .ok()?;
        self.count_reservation(slot, amount);
        Some(before - amount)
    }

    /// Debit unconditionally (unlimited keys; `allow` mode while Redis is away).
    fn debit(&self, slot: &Slot, amount: i64) {
        slot.avail.fetch_sub(amount, Ordering::AcqRel);
        slot.dirty.store(true, Ordering::Release);
        self.count_reservation(slot, amount);
    }

    /// One more reservation outstanding, and `amount` more debited (the rate leases follow).
    fn count_reservation(&self, slot: &Slot, amount: i64) {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        slot.debited.fetch_add(amount, Ordering::Relaxed);
    }

    /// A reservation of `amount` settled at `actual`: the difference goes back to (or comes
    /// out of) the lease, and is reported with the next flush.
    pub(crate) fn settle(&self, slot: &Slot, amount: i64, actual: i64) {
        slot.avail.fetch_add(amount - actual, Ordering::AcqRel);
        slot.dirty.store(true, Ordering::Release);
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
    }

    /// The consumption of `key_id` across all gateways, as last read, plus what this gateway
    /// spent since.
    pub(crate) fn consumed(&self, key_id: u64) -> i64 {
        let Some(slot) = self.slots.get(&key_id).map(|s| s.clone()) else {
            return 0;
        };
        let here = slot.recorded.load(Ordering::Acquire) - slot.avail.load(Ordering::Acquire);
        slot.consumption.load(Ordering::Acquire) + here
    }

    /// Read `key_id`'s consumption from Redis now (bounded by the timeout; the last value read
    /// stays when Redis does not answer). False when no value was ever read for it.
    pub(crate) async fn refresh(&self, key_id: u64) -> bool {
        let slot = self.slot(key_id);
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Read(key_id, tx)).is_ok() {
            let _ = tokio::time::timeout(self.timeout + Duration::from_millis(50), rx).await;
        }
        slot.consumption_read.load(Ordering::Acquire)
    }

    /// Give every lease back and report what is left, waiting at most `wait`.
    pub(crate) fn shutdown(&self, wait: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.recv_timeout(wait);
        }
    }
}

/// A random name for this gateway process's lease records.
pub(super) fn gateway_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("{}-{}", std::process::id(), hex::encode(b))
}

/// Units debited from a lease for a call that waited for a refill. The call claims them; if
/// it gave up meanwhile (its deadline passed, its client went away), they go back to the lease.
pub(crate) struct Granted {
    slot: Arc<Slot>,
    ledger: Arc<LeaseLedger>,
    amount: i64,
    claimed: bool,
}

impl Granted {
    fn claim(mut self) {
        self.claimed = true;
    }
}

impl Drop for Granted {
    fn drop(&mut self) {
        if !self.claimed {
            self.ledger.settle(&self.slot, self.amount, 0);
        }
    }
}

/// What this gateway charged before it used Redis, from its local ledger in `dir` (if any):
/// per counter, the units and when the counter ends (0: never). Ended counters are left out.
pub(crate) fn local_history(dir: &Path) -> HashMap<u64, (i64, i64)> {
    if !dir.exists() {
        return HashMap::new();
    }
    match super::Ledger::read_history(dir) {
        Ok(m) => {
            let now = crate::core::clock::unix_now();
            m.into_iter()
                .filter(|(_, (v, until))| *v > 0 && (*until == 0 || *until > now))
                .collect()
        }
        Err(e) => {
            log::warn!("ledger: local ledger in {} not read: {e}", dir.display());
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    //! The scripts' guarantees, against a real redis-server (skipped when it is not installed,
    //! unless `KEYGATE_REQUIRE_REDIS` is set).
    use super::scripts::*;
    use super::*;

    pub(super) struct Server(std::process::Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    pub(super) async fn server() -> Option<(Server, Conn)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            assert!(
                std::env::var_os("KEYGATE_REQUIRE_REDIS").is_none(),
                "redis-server is not installed"
            );
            return None;
        };
        let server = Server(child, port);
        let settings = RedisSettings {
            urls: vec![format!("redis://127.0.0.1:{}", server.1)],
            cluster: false,
            on_unavailable: OnUnavailable::Lease,
            timeout: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(30),
        };
        for _ in 0..200 {
            if let Ok(conn) = connect(&settings).await {
                return Some((server, conn));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start");
    }

    /// One SYNC call of a gateway that saw its record valid until now (so it is not removed
    /// for age): (applied, granted, committed, consumption).
    #[allow(clippy::too_many_arguments)]
    async fn sync(
        conn: &mut Conn,
        gw: &str,
        known: i64,
        limit: i64,
        need: i64,
        want: i64,
        give: i64,
        deficit: i64,
        held: i64,
        ttl_ms: i64,
    ) -> (i64, i64, i64, i64) {
        let args = [
            known,
            limit,
            need,
            want,
            give,
            deficit,
            held,
            ttl_ms,
            0,
            i64::MAX,
            0,
        ];
        let (applied, granted, committed, consumption, _) = sync_args(conn, gw, args).await;
        (applied, granted, committed, consumption)
    }

    /// One SYNC call with every argument given: (applied, granted, committed, consumption,
    /// the record's valid_until_ms).
    async fn sync_args(conn: &mut Conn, gw: &str, args: [i64; 11]) -> (i64, i64, i64, i64, i64) {
        let (k, l) = redis_keys(7);
        Script::new(SYNC_SCRIPT)
            .call(conn, &[k.as_str(), l.as_str()], &args, Some(gw))
            .await
            .unwrap()
    }

    /// Delete gateway `gw`'s lease record of key 7, as Redis losing it or sweeping it would.
    async fn drop_record(conn: &mut Conn, gw: &str) {
        let (_, l) = redis_keys(7);
        let _: i64 = redis::cmd("HDEL")
            .arg(&l)
            .arg(gw)
            .query_async(conn)
            .await
            .unwrap();
    }

    async fn read(conn: &mut Conn) -> i64 {
        let (k, l) = redis_keys(7);
        Script::new(READ_SCRIPT)
            .call(conn, &[k.as_str(), l.as_str()], &[], None)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_repeated_call_is_never_applied_twice() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        // A grant whose answer is lost, sent again with the same `known`: applied once.
        let first = sync(&mut c, "a", 0, 1_000, 10, 100, 0, 0, 0, 30_000).await;
        assert_eq!(first, (1, 100, 100, 0));
        let again = sync(&mut c, "a", 0, 1_000, 10, 100, 0, 0, 0, 30_000).await;
        assert_eq!(
            again,
            (0, 100, 100, 0),
            "not applied; the gateway learns 100"
        );
        // A give-back likewise.
        let give = sync(&mut c, "a", 100, 1_000, 0, 0, 40, 0, 60, 30_000).await;
        assert_eq!(give, (1, 60, 60, 0));
        let again = sync(&mut c, "a", 100, 1_000, 0, 0, 40, 0, 60, 30_000).await;
        assert_eq!(again.0, 0);
        assert_eq!(again.2, 60, "given back once");
    }

    #[tokio::test]
    async fn leases_come_only_out_of_the_room_and_shrink_near_the_limit() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        // Room 1000: at most an eighth of it beyond what is needed.
        assert_eq!(
            sync(&mut c, "a", 0, 1_000, 10, 900, 0, 0, 0, 30_000)
                .await
                .1,
            125
        );
        assert_eq!(
            sync(&mut c, "b", 0, 1_000, 10, 900, 0, 0, 0, 30_000)
                .await
                .1,
            109
        );
        // What is needed, when it fits, even past an eighth.
        let (_, g, committed, _) = sync(&mut c, "b", 109, 1_000, 700, 900, 0, 0, 109, 30_000).await;
        assert_eq!((g, committed), (809, 934));
        // Never past the limit: only the room left, then nothing.
        let (_, g, committed, _) = sync(&mut c, "a", 125, 1_000, 500, 900, 0, 0, 125, 30_000).await;
        assert_eq!((g, committed), (191, 1_000));
        let (_, g, committed, _) = sync(&mut c, "a", 191, 1_000, 10, 900, 0, 0, 191, 30_000).await;
        assert_eq!((g, committed), (191, 1_000));
        // An overdraft (a settle above its reservation) is committed even past the limit.
        let (_, g, committed, _) = sync(&mut c, "a", 191, 1_000, 0, 0, 0, 30, -30, 30_000).await;
        assert_eq!((g, committed), (221, 1_030));
    }

    #[tokio::test]
    async fn a_dead_gateways_lease_counts_as_spent_never_given_back() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        // `a` holds 100 unspent of 100 on a short-lived record; `b` spent 30 of 50.
        sync(&mut c, "a", 0, 1_000, 0, 100, 0, 0, 0, 300).await;
        sync(&mut c, "b", 0, 1_000, 0, 50, 0, 0, 0, 30_000).await;
        let (_, _, committed, used) = sync(&mut c, "b", 50, 1_000, 0, 0, 0, 0, 20, 30_000).await;
        assert_eq!((committed, used), (150, 30));
        assert_eq!(read(&mut c).await, 30);
        tokio::time::sleep(Duration::from_millis(400)).await;
        // `a` stopped renewing: what it held is spent (stranded), and stays committed.
        assert_eq!(read(&mut c).await, 130);
        let (_, _, committed, used) = sync(&mut c, "b", 50, 1_000, 0, 0, 0, 0, 20, 30_000).await;
        assert_eq!((committed, used), (150, 130));
    }

    /// A record removed for age while its gateway was away (it saw the record valid until
    /// more than a day ago): the gateway is trusted, its grants are in `committed`. Had it
    /// seen the record valid within the day, the record was lost, not removed.
    #[tokio::test]
    async fn a_removed_record_trusts_the_gateway_and_keeps_committed() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        sync(&mut c, "a", 0, 1_000, 0, 100, 0, 0, 0, 30_000).await;
        drop_record(&mut c, "a").await;
        let away = [100, 1_000, 0, 0, 0, 0, 100, 30_000, 0, 0, 0];
        let (applied, g, committed, _, _) = sync_args(&mut c, "a", away).await;
        assert_eq!((applied, g, committed), (1, 100, 100));
        drop_record(&mut c, "a").await;
        let (applied, g, committed, _) =
            sync(&mut c, "a", 100, 1_000, 0, 0, 0, 0, 100, 30_000).await;
        assert_eq!(
            (applied, g, committed),
            (0, 0, 100),
            "seen within the day: lost"
        );
    }

    /// Every answer shows the record's validity on Redis's clock, applied or not. A gateway
    /// whose grant's answer was lost learns it from the next (unapplied) answer; when the
    /// record is then lost, that gateway is not trusted on its word, though another gateway's
    /// grants keep `committed` above it. Seen valid until more than a day ago, it would be.
    #[tokio::test]
    async fn a_record_seen_valid_within_the_day_was_lost_when_missing() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        sync(&mut c, "b", 0, 10_000, 0, 500, 0, 0, 0, 30_000).await;
        // `a` is granted 100; the answer is lost: `a` still knows 0 and no validity.
        sync_args(&mut c, "a", [0, 10_000, 0, 100, 0, 0, 0, 30_000, 0, 0, 0]).await;
        let (applied, g, _, _, valid) =
            sync_args(&mut c, "a", [0, 10_000, 0, 0, 0, 0, 0, 30_000, 0, 0, 0]).await;
        assert_eq!((applied, g), (0, 100), "corrected, not applied");
        assert!(valid > 0);
        drop_record(&mut c, "a").await;
        let lost = [100, 10_000, 0, 0, 0, 0, 100, 30_000, 0, valid, 0];
        let (applied, g, committed, _, _) = sync_args(&mut c, "a", lost).await;
        assert_eq!((applied, g, committed), (0, 0, 600));
        let away = [
            100,
            10_000,
            0,
            0,
            0,
            0,
            100,
            30_000,
            0,
            valid - 30_000 - 86_400_001,
            0,
        ];
        let (applied, g, committed, _, _) = sync_args(&mut c, "a", away).await;
        assert_eq!((applied, g, committed), (1, 100, 600));
    }

    /// A give-back of everything leaves an empty record, kept (not deleted) until it is
    /// removed for age: when its answer is lost the gateway sends the same `known` again (with
    /// the give held back as `pending`) and is told it holds nothing, as Redis applied, even
    /// when its last answer is too old to tell a lost record from one removed for age.
    /// Trusting it would credit the lease again while `committed` no longer counts it (another
    /// gateway's grants keep `committed` up).
    #[tokio::test]
    async fn a_give_back_of_everything_whose_answer_was_lost_is_not_granted_again() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        sync(&mut c, "b", 0, 10_000, 0, 500, 0, 0, 0, 30_000).await;
        sync(&mut c, "a", 0, 10_000, 0, 100, 0, 0, 0, 30_000).await;
        // `a` gives back all of its 100, unspent: its record is emptied. The answer is lost.
        let gone = sync(&mut c, "a", 100, 10_000, 0, 0, 100, 0, 0, 30_000).await;
        assert_eq!((gone.0, gone.1, gone.2), (1, 0, 500));
        let (_, l) = redis_keys(7);
        let record: String = redis::cmd("HGET")
            .arg(&l)
            .arg("a")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(record.starts_with("0 0 "), "{record}");
        // Sent again as the gateway saw it, with no validity to go by: nothing granted,
        // nothing committed twice.
        let again = [100, 10_000, 0, 0, 0, 0, 0, 30_000, 0, 0, 100];
        let (applied, g, committed, _, _) = sync_args(&mut c, "a", again).await;
        assert_eq!((applied, g, committed), (0, 0, 500));
        // Even once the record is swept for age: trusted, the gateway's word less what it
        // gave back without an answer.
        drop_record(&mut c, "a").await;
        let (applied, g, committed, _, _) = sync_args(&mut c, "a", again).await;
        assert_eq!((applied, g, committed), (0, 0, 500));
    }

    /// A record swept for age after a give-back whose answer was lost: `committed` is below
    /// the gateway's word by that give-back, which is not a loss. The gateway is taken at its
    /// word less the give-back, and commits nothing twice.
    #[tokio::test]
    async fn a_swept_record_after_a_lost_give_back_is_taken_at_the_word_less_the_give() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        sync(&mut c, "a", 0, 1_000, 0, 100, 0, 0, 0, 30_000).await;
        // 40 of the 100 go back (applied; the answer is lost), and the record is swept.
        sync(&mut c, "a", 100, 1_000, 0, 0, 40, 0, 60, 30_000).await;
        drop_record(&mut c, "a").await;
        let away = [100, 1_000, 0, 0, 0, 0, 60, 30_000, 0, 0, 40];
        let (applied, g, committed, _, _) = sync_args(&mut c, "a", away).await;
        assert_eq!((applied, g, committed), (0, 60, 60));
    }

    /// A record lost with its grant (a failover, a Redis that lost its data) is not trusted:
    /// the gateway learns it holds nothing granted, and its spending comes back as an overdraft.
    #[tokio::test]
    async fn a_record_lost_with_its_grant_is_not_trusted() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        sync(&mut c, "a", 0, 1_000, 0, 100, 0, 0, 0, 30_000).await;
        let (k, l) = redis_keys(7);
        let _: i64 = redis::cmd("DEL")
            .arg(&k)
            .arg(&l)
            .query_async(&mut c)
            .await
            .unwrap();
        // `a` spent 40 of its 100: not applied, nothing granted.
        let lost = sync(&mut c, "a", 100, 1_000, 0, 0, 0, 0, 60, 30_000).await;
        assert_eq!(lost, (0, 0, 0, 0));
        // Corrected (60 − 100 = −40 held): the 40 are committed, and count as spent.
        let (applied, g, committed, used) =
            sync(&mut c, "a", 0, 1_000, 0, 0, 0, 40, -40, 30_000).await;
        assert_eq!((applied, g, committed, used), (1, 40, 40, 40));
        assert_eq!(read(&mut c).await, 40);
    }

    #[tokio::test]
    async fn seeding_adds_once() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        let (k, _) = redis_keys(7);
        let seed = Script::new(SEED_SCRIPT);
        let first: i64 = seed
            .call(&mut c, &[k.as_str()], &[500, 0], None)
            .await
            .unwrap();
        let second: i64 = seed
            .call(&mut c, &[k.as_str()], &[500, 0], None)
            .await
            .unwrap();
        assert_eq!((first, second), (1, 0));
        let committed: i64 = redis::cmd("HGET")
            .arg(&k)
            .arg("committed")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(committed, 500);
        assert_eq!(read(&mut c).await, 500);
    }

    /// Seconds until each of key `id`'s two Redis keys expires (-1: never, -2: no such key).
    async fn ttls(conn: &mut Conn, id: u64) -> (i64, i64) {
        let (k, l) = redis_keys(id);
        let ttl = |key: String| redis::cmd("TTL").arg(key).to_owned();
        let mut conn2 = conn.clone();
        (
            ttl(k).query_async(conn).await.unwrap(),
            ttl(l).query_async(&mut conn2).await.unwrap(),
        )
    }

    #[tokio::test]
    async fn budget_keys_expire_when_their_period_ends_lifetime_keys_never() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        let now = crate::core::clock::unix_now();
        let until = now + 3 * 86_400;
        let grant = |id: u64, expire: i64| {
            let mut c = c.clone();
            async move {
                let (k, l) = redis_keys(id);
                let args = [0, 1_000, 10, 100, 0, 0, 0, 30_000, expire, 1, 0];
                let _: (i64, i64, i64, i64, i64) = Script::new(SYNC_SCRIPT)
                    .call(&mut c, &[k.as_str(), l.as_str()], &args, Some("a"))
                    .await
                    .unwrap();
            }
        };
        grant(1, until).await;
        grant(2, 0).await;
        // An end already past on Redis's clock (a gateway's clock far behind): kept as is,
        // never expired at once.
        grant(3, now - 60).await;
        let (k, l) = ttls(&mut c, 1).await;
        let near = |t: i64| (until - now - 5..=until - now).contains(&t);
        assert!(near(k) && near(l), "budget key TTLs {k} {l}");
        assert_eq!(ttls(&mut c, 2).await, (-1, -1));
        assert_eq!(ttls(&mut c, 3).await, (-1, -1));
        // Seeded from a local ledger: the same.
        let seed = Script::new(SEED_SCRIPT);
        for (id, expire) in [(4u64, until), (5, 0)] {
            let (k, _) = redis_keys(id);
            let _: i64 = seed
                .call(&mut c, &[k.as_str()], &[500, expire], None)
                .await
                .unwrap();
        }
        assert!(near(ttls(&mut c, 4).await.0));
        assert_eq!(ttls(&mut c, 5).await.0, -1);
    }

    /// A gateway forgets its slot of a budget counter once the counter ended and its lease
    /// went back; a lifetime key's slot stays.
    #[tokio::test]
    async fn an_ended_counters_slot_is_forgotten_once_its_lease_is_back() {
        let Some((s, _c)) = server().await else {
            return;
        };
        let ledger = LeaseLedger::start(
            RedisSettings {
                urls: vec![format!("redis://127.0.0.1:{}", s.1)],
                cluster: false,
                on_unavailable: OnUnavailable::Lease,
                timeout: Duration::from_secs(1),
                // Idle leases go back after a second.
                lease_ttl: Duration::from_secs(1),
            },
            HashMap::new(),
        )
        .unwrap();
        let ended = crate::core::clock::unix_now() - 1;
        for (id, until) in [(8, 0), (9, ended)] {
            let slot = ledger.reserve(id, Some(1_000), until, 10).await.unwrap();
            ledger.settle(&slot, 10, 4);
        }
        assert_eq!(ledger.slots(), 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ledger.slots() > 1 {
            assert!(Instant::now() < deadline, "the ended counter's slot stayed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ledger.slots.contains_key(&8));
        ledger.shutdown(Duration::from_secs(1));
    }
}
