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
//! lost is credited on the next call.
//!
//! The bound: a call is admitted only against a lease, and leases come only out of room under
//! the limit, so a key's consumption passes its limit only by settle differences (a call that
//! costs more than it reserved) that its gateway's lease cannot absorb: at most one call's
//! settle difference per call in flight when the key ran out, the bound of a single gateway.
//! Leases shrink near the limit (at most an eighth of the room left, or what the waiting calls
//! need), so the quota stranded in other gateways' leases shrinks with it.

use super::ReserveError;
use crate::config::OnUnavailable;
use dashmap::DashMap;
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

/// Grant, give back and report, in one atomic step per key and gateway (see the module doc).
/// KEYS: the key's hash (`committed`, `seeded`) and its lease records (gateway -> "granted
/// held valid_until_ms"); both carry the hash tag `{id}`, so they share one cluster slot.
const SYNC_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gw, known, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local need, want = tonumber(ARGV[4]), tonumber(ARGV[5])
local give, deficit, held = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed') or '0')
-- A record removed (a day after it expired) while its gateway was away: trust the gateway,
-- whose grants are already in `committed`.
local granted = known
local rec = redis.call('HGET', KEYS[2], gw)
if rec then granted = tonumber(string.match(rec, '^(%S+)')) end
local applied, grant = 0, 0
if granted == known then
  applied = 1
  committed = committed - give + deficit
  granted = granted - give + deficit
  if want > 0 then
    grant = want
    if limit >= 0 then
      local room = limit - committed
      grant = math.max(0, math.min(want, math.max(need, math.floor(room / 8)), room))
    end
    committed = committed + grant
    granted = granted + grant
  end
  redis.call('HSET', KEYS[1], 'committed', string.format('%d', committed))
  local left = held + deficit + grant
  if granted == 0 and left == 0 then
    redis.call('HDEL', KEYS[2], gw)
  else
    redis.call('HSET', KEYS[2], gw, string.format('%d %d %d', granted, left, now + ttl))
  end
end
local holding = 0
local records = redis.call('HGETALL', KEYS[2])
for i = 1, #records, 2 do
  local g, h, e = string.match(records[i + 1], '^(%S+) (%S+) (%S+)$')
  e = tonumber(e or '0')
  if e >= now then
    holding = holding + tonumber(h)
  elseif e < now - 86400000 then
    redis.call('HDEL', KEYS[2], records[i])
  end
end
return {applied, granted, committed, committed - holding}
";

/// A key's consumption across all gateways (read only).
const READ_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local committed = tonumber(redis.call('HGET', KEYS[1], 'committed') or '0')
local holding = 0
local records = redis.call('HGETALL', KEYS[2])
for i = 1, #records, 2 do
  local g, h, e = string.match(records[i + 1], '^(%S+) (%S+) (%S+)$')
  if tonumber(e or '0') >= now then holding = holding + tonumber(h) end
end
return committed - holding
";

/// Add what a gateway charged before it used Redis (its local ledger), once per key: the first
/// gateway to seed a key wins, so gateways starting together never double it.
const SEED_SCRIPT: &str = r"
if redis.call('HSETNX', KEYS[1], 'seeded', ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'committed', ARGV[1])
  return 1
end
return 0
";

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
    pub fn from_config(c: &crate::config::LedgerConfig) -> Option<RedisSettings> {
        use crate::config::LedgerBackend;
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
    slots: DashMap<u64, Arc<Slot>>,
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
    /// `seed`: what this gateway charged before it used Redis (from its local ledger).
    pub(crate) fn start(
        settings: RedisSettings,
        seed: HashMap<u64, i64>,
    ) -> std::io::Result<Arc<LeaseLedger>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let ledger = Arc::new(LeaseLedger {
            slots: DashMap::new(),
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
    /// unlimited keys (always admitted, counted).
    pub(crate) async fn reserve(
        &self,
        key_id: u64,
        limit: Option<i64>,
        amount: i64,
    ) -> Result<Arc<Slot>, ReserveError> {
        let slot = self.slot(key_id);
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
fn gateway_id() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("{}-{}", std::process::id(), hex::encode(b))
}

/// The key's two Redis keys; the `{id}` hash tag puts them in one cluster slot.
fn redis_keys(key_id: u64) -> (String, String) {
    (
        format!("keygate:{{{key_id}}}"),
        format!("keygate:{{{key_id}}}:leases"),
    )
}

/// A Lua script: its text and SHA-1. Sent with `EVALSHA`, and with `EVAL` when the node does
/// not have it yet (`NOSCRIPT`), so on a cluster it is loaded only on the key's own node.
struct Script {
    code: &'static str,
    sha: String,
}

impl Script {
    fn new(code: &'static str) -> Script {
        Script {
            code,
            sha: redis::Script::new(code).get_hash().to_string(),
        }
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        conn: &mut Conn,
        keys: &[&str],
        args: &[i64],
        gateway: Option<&str>,
    ) -> redis::RedisResult<T> {
        let command = |name: &str, script: &str| {
            let mut c = redis::cmd(name);
            c.arg(script).arg(keys.len()).arg(keys);
            if let Some(g) = gateway {
                c.arg(g);
            }
            c.arg(args);
            c
        };
        match command("EVALSHA", &self.sha).query_async(conn).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                command("EVAL", self.code).query_async(conn).await
            }
            other => other,
        }
    }
}

struct Scripts {
    sync: Script,
    read: Script,
    seed: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            sync: Script::new(SYNC_SCRIPT),
            read: Script::new(READ_SCRIPT),
            seed: Script::new(SEED_SCRIPT),
        }
    }
}

/// Whether an error means Redis (or the key's node) cannot be reached, as opposed to a fault
/// of one call (a script error, a wrong type), which is refused for that key alone.
fn unreachable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    !matches!(
        e.kind(),
        ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Server(S::ResponseError | S::ExecAbort | S::CrossSlot | S::NoPerm)
    )
}

/// A connection to one server (reconnecting by itself) or to a cluster (following redirects
/// and failovers by itself).
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

async fn connect(settings: &RedisSettings) -> redis::RedisResult<Conn> {
    if settings.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(settings.urls.clone())
            .connection_timeout(settings.timeout)
            .response_timeout(settings.timeout)
            .retries(1)
            .build()?;
        Ok(Conn::Cluster(client.get_async_connection().await?))
    } else {
        let client = redis::Client::open(settings.urls[0].as_str())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        Ok(Conn::Single(
            redis::aio::ConnectionManager::new_with_config(client, config).await?,
        ))
    }
}

/// What one sync call asks for a key.
struct Ask {
    key_id: u64,
    slot: Arc<Slot>,
    /// What this gateway believes Redis granted it (its record's `granted`).
    known: i64,
    /// A give-back whose answer was lost: held back from `avail` until an answer shows
    /// whether Redis applied it.
    pending: i64,
    need: i64,
    want: i64,
    give: i64,
    deficit: i64,
    held: i64,
    waiters: Waiters,
}

/// One script call's outcome.
enum Outcome {
    /// `(applied, granted, committed, consumption)`.
    Answered(i64, i64, i64, i64),
    /// Redis (or the key's node) could not be reached in time.
    Unreachable,
    /// Redis refused this call (a script error, a wrong type at the key).
    Refused,
}

/// The ledger thread: owns the connection and what it knows of each key.
struct Worker {
    ledger: Arc<LeaseLedger>,
    settings: RedisSettings,
    conn: Option<Conn>,
    gateway: String,
    seed: HashMap<u64, i64>,
    keys: HashMap<u64, KeyState>,
    scripts: Arc<Scripts>,
}

/// What the worker knows of one key.
#[derive(Debug, Default, Clone, Copy)]
struct KeyState {
    /// What Redis granted this gateway, as far as it knows (its record's `granted`).
    known: i64,
    /// A give-back sent without an answer (see [`Ask::pending`]).
    pending_give: i64,
    /// The rate mark: units debited at `rate_at` (ms).
    rate_debited: i64,
    rate_at: u64,
    /// When the record was last written (ms).
    synced_at: u64,
}

/// A waiting reservation gets another round (a grant taken by a faster call, an answer that
/// corrected this gateway instead of granting) this many times before it is refused.
const WAIT_ROUNDS: u8 = 3;

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next_flush = Instant::now() + FLUSH_EVERY;
        if self.ensure_ready().await {
            self.probe().await;
        }
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => Some(m),
                    None => return,
                },
                _ = tokio::time::sleep_until(next_flush.into()) => None,
            };
            let mut msgs: Vec<Msg> = first.into_iter().collect();
            while let Ok(m) = rx.try_recv() {
                msgs.push(m);
            }
            if !self.ensure_ready().await {
                self.answer_unavailable(msgs);
                next_flush = Instant::now() + FLUSH_EVERY;
                continue;
            }
            let mut shutdown = None;
            let mut needs: HashMap<u64, (Arc<Slot>, Waiters)> = HashMap::new();
            let mut refills = Vec::new();
            for m in msgs {
                match m {
                    Msg::Need {
                        key_id,
                        slot,
                        amount,
                        reply,
                        rounds,
                    } => needs
                        .entry(key_id)
                        .or_insert_with(|| (slot, Vec::new()))
                        .1
                        .push((amount, reply, rounds)),
                    Msg::Refill(id) => refills.push(id),
                    Msg::Read(id, done) => self.spawn_read(id, done),
                    Msg::Shutdown(done) => shutdown = Some(done),
                }
            }
            let flush = Instant::now() >= next_flush || shutdown.is_some();
            let (urgent, background) = self.plan(needs, refills, flush, shutdown.is_some());
            if urgent.is_empty() && background.is_empty() && flush && !self.ledger.is_up() {
                self.probe().await;
            }
            // Calls that wait go first, in their own round.
            self.sync(urgent).await;
            self.sync(background).await;
            if flush {
                next_flush = Instant::now() + FLUSH_EVERY;
            }
            if let Some(done) = shutdown {
                let _ = done.send(());
                return;
            }
        }
    }

    /// Connect and seed, if not done yet. False while Redis cannot be reached.
    async fn ensure_ready(&mut self) -> bool {
        if self.conn.is_none() {
            match tokio::time::timeout(self.settings.timeout * 2, connect(&self.settings)).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err(e)) => return self.failed(&format!("connect: {e}")),
                Err(_) => return self.failed("connect: timed out"),
            }
        }
        if !self.seed.is_empty() {
            let seed: Vec<(u64, i64)> = self.seed.iter().map(|(k, v)| (*k, *v)).collect();
            for chunk in seed.chunks(CONCURRENT_CALLS) {
                let calls = chunk.iter().map(|(id, v)| {
                    let conn = self.conn.clone();
                    let script = &self.scripts.seed;
                    let timeout = self.settings.timeout;
                    async move {
                        let mut conn = conn?;
                        let (k, _) = redis_keys(*id);
                        let (keys, args) = ([k.as_str()], [*v]);
                        let call = script.call::<i64>(&mut conn, &keys, &args, None);
                        Some(tokio::time::timeout(timeout, call).await)
                    }
                });
                let results = futures_util::future::join_all(calls).await;
                self.ledger
                    .stats
                    .ops
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let mut applied = 0;
                for ((id, _), r) in chunk.iter().zip(results) {
                    match r {
                        Some(Ok(Ok(1))) => applied += 1,
                        Some(Ok(Ok(_))) => {}
                        Some(Ok(Err(e))) if !unreachable(&e) => {
                            // This key cannot be seeded (say, a foreign value at its Redis
                            // key); the others can.
                            log::error!("ledger: seeding key {id}: {e}");
                        }
                        _ => return self.failed("seeding from the local ledger failed"),
                    }
                    self.seed.remove(id);
                }
                log::info!(
                    "ledger: seeded {applied} of {} keys from the local ledger",
                    chunk.len()
                );
            }
        }
        true
    }

    /// A `PING`, to learn whether Redis is back when there is nothing else to send.
    async fn probe(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        self.ledger.stats.ops.fetch_add(1, Ordering::Relaxed);
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(conn);
        match tokio::time::timeout(self.settings.timeout, ping).await {
            Ok(Ok(_)) => self.reached(),
            Ok(Err(e)) => {
                self.failed(&format!("PING: {e}"));
            }
            Err(_) => {
                self.failed("PING timed out");
            }
        }
    }

    fn reached(&self) {
        self.ledger.reached.store(true, Ordering::Release);
        if !self.ledger.up.swap(true, Ordering::AcqRel) {
            log::info!("ledger: Redis reachable again");
        }
    }

    fn failed(&self, why: &str) -> bool {
        self.ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.ledger.up.swap(false, Ordering::AcqRel) {
            log::error!(
                "ledger: Redis unreachable ({why}); on_unavailable: {:?}",
                self.ledger.mode
            );
        }
        false
    }

    /// Answer waiting calls while Redis is away, as `on_unavailable` says.
    fn answer_unavailable(&self, msgs: Vec<Msg>) {
        for m in msgs {
            match m {
                Msg::Need {
                    slot,
                    amount,
                    reply,
                    ..
                } => self.admit_without_redis(&slot, amount, reply),
                Msg::Refill(id) => {
                    if let Some(s) = self.ledger.slots.get(&id) {
                        s.queued.store(false, Ordering::Release);
                    }
                }
                Msg::Read(_, done) => {
                    let _ = done.send(());
                }
                Msg::Shutdown(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// A waiting call without Redis: admitted and counted locally with `allow`, else refused.
    fn admit_without_redis(&self, slot: &Arc<Slot>, amount: i64, reply: Reply) {
        let answer = if self.ledger.mode == OnUnavailable::Allow {
            self.ledger.debit(slot, amount);
            Ok(self.granted(slot, amount))
        } else {
            Err(ReserveError::BackendUnavailable)
        };
        let _ = reply.send(answer);
    }

    /// Units already debited for a waiting call, refunded if the call gave up meanwhile.
    fn granted(&self, slot: &Arc<Slot>, amount: i64) -> Granted {
        Granted {
            slot: slot.clone(),
            ledger: self.ledger.clone(),
            amount,
            claimed: false,
        }
    }

    fn spawn_read(&self, key_id: u64, done: oneshot::Sender<()>) {
        let Some(mut conn) = self.conn.clone() else {
            let _ = done.send(());
            return;
        };
        let ledger = self.ledger.clone();
        let timeout = self.settings.timeout;
        let scripts = self.scripts.clone();
        tokio::spawn(async move {
            let (k, leases) = redis_keys(key_id);
            let keys = [k.as_str(), leases.as_str()];
            let deadline = tokio::time::Instant::now() + timeout;
            // A connection broken by a Redis restart fails its first command and reconnects:
            // one more try, within the same time.
            for _ in 0..2 {
                ledger.stats.ops.fetch_add(1, Ordering::Relaxed);
                let call = scripts.read.call::<i64>(&mut conn, &keys, &[], None);
                match tokio::time::timeout_at(deadline, call).await {
                    Ok(Ok(v)) => {
                        if let Some(slot) = ledger.slots.get(&key_id) {
                            slot.consumption.store(v, Ordering::Release);
                            slot.consumption_read.store(true, Ordering::Release);
                        }
                        break;
                    }
                    Ok(Err(_)) => {
                        ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            let _ = done.send(());
        });
    }

    /// This round's sync calls: first the keys with waiting calls, then keys whose lease ran
    /// low and, on a flush, every key with something to report, renew or give back.
    fn plan(
        &mut self,
        needs: HashMap<u64, (Arc<Slot>, Waiters)>,
        refills: Vec<u64>,
        flush: bool,
        closing: bool,
    ) -> (Vec<Ask>, Vec<Ask>) {
        let now = self.ledger.now_ms();
        let ttl = self.settings.lease_ttl.as_millis() as u64;
        let renew_after = ttl / 3;
        let idle_after = IDLE_MS.min(ttl);
        let mut urgent = Vec::new();
        let mut planned = std::collections::HashSet::new();
        for (key_id, (slot, waiters)) in needs {
            let total = waiters
                .iter()
                .fold(0i64, |sum, (a, _, _)| sum.saturating_add(*a));
            let mut ask = self.ask(key_id, slot, now);
            ask.need = total.saturating_sub(ask.held.max(0)).max(0);
            ask.want = ask
                .need
                .saturating_add(self.lease_size(key_id, &ask.slot, now))
                .min(super::MAX_AMOUNT);
            ask.waiters = waiters;
            planned.insert(key_id);
            urgent.push(ask);
        }
        let mut background = Vec::new();
        for key_id in refills {
            let Some(slot) = self.ledger.slots.get(&key_id).map(|s| s.clone()) else {
                continue;
            };
            slot.queued.store(false, Ordering::Release);
            if !planned.insert(key_id) {
                continue;
            }
            let mut ask = self.ask(key_id, slot, now);
            // Top the lease up to its size, not beyond.
            ask.want = (self.lease_size(key_id, &ask.slot, now) - ask.held.max(0)).max(0);
            background.push(ask);
        }
        if flush {
            let slots: Vec<(u64, Arc<Slot>)> = self
                .ledger
                .slots
                .iter()
                .map(|e| (*e.key(), e.value().clone()))
                .collect();
            for (key_id, slot) in slots {
                if planned.contains(&key_id) {
                    continue;
                }
                let avail = slot.avail.load(Ordering::Acquire);
                let idle = now.saturating_sub(slot.last_use.load(Ordering::Relaxed)) >= idle_after;
                let state = self.keys.get(&key_id).copied().unwrap_or_default();
                let stale = avail != 0 && now.saturating_sub(state.synced_at) >= renew_after;
                let dirty = slot.dirty.swap(false, Ordering::AcqRel);
                let give_back = (idle || closing) && avail > 0;
                if !(dirty || avail < 0 || stale || give_back || state.pending_give != 0) {
                    continue;
                }
                let mut ask = self.ask(key_id, slot, now);
                if give_back {
                    // Taken out of `avail` first, so it is not spent meanwhile.
                    let taken =
                        ask.slot
                            .avail
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                                (a > 0).then_some(0)
                            });
                    ask.give = taken.unwrap_or(0).max(0);
                    ask.held = ask.slot.avail.load(Ordering::Acquire);
                    ask.deficit = (-ask.held).max(0);
                }
                background.push(ask);
            }
        }
        (urgent, background)
    }

    fn ask(&mut self, key_id: u64, slot: Arc<Slot>, now: u64) -> Ask {
        let debited = slot.debited.load(Ordering::Relaxed);
        let state = self.keys.entry(key_id).or_insert(KeyState {
            rate_debited: debited,
            rate_at: now,
            ..KeyState::default()
        });
        let held = slot.avail.load(Ordering::Acquire);
        Ask {
            key_id,
            known: state.known,
            pending: state.pending_give,
            need: 0,
            want: 0,
            give: 0,
            deficit: (-held).max(0),
            held,
            waiters: Vec::new(),
            slot,
        }
    }

    /// The lease to hold beyond what waiting calls need: about `LEASE_COVERS` of the key's
    /// spending over the last second or more, at least four of its last reservations. Redis
    /// caps what it grants near the limit.
    fn lease_size(&mut self, key_id: u64, slot: &Slot, now: u64) -> i64 {
        let debited = slot.debited.load(Ordering::Relaxed);
        let last = slot.last_amount.load(Ordering::Relaxed).max(1);
        let state = self.keys.entry(key_id).or_default();
        let elapsed = now.saturating_sub(state.rate_at);
        let spent = (debited - state.rate_debited).max(0);
        let window = elapsed.max(1_000) as f64;
        let by_rate = (spent as f64 * LEASE_COVERS.as_millis() as f64 / window) as i64;
        if elapsed >= 1_000 {
            state.rate_debited = debited;
            state.rate_at = now;
        }
        let size = by_rate.max(last.saturating_mul(4)).min(super::MAX_AMOUNT);
        slot.low_water.store(size / 2, Ordering::Relaxed);
        size
    }

    /// Run script calls (several at once) and apply their answers. Once Redis proves
    /// unreachable, the rest are not sent this round.
    async fn sync(&mut self, asks: Vec<Ask>) {
        let mut asks = asks;
        while !asks.is_empty() {
            let rest = asks.split_off(asks.len().min(CONCURRENT_CALLS));
            let batch = std::mem::replace(&mut asks, rest);
            let calls = batch.iter().map(|a| {
                let conn = self.conn.clone();
                let script = &self.scripts.sync;
                let gateway = self.gateway.as_str();
                let timeout = self.settings.timeout;
                let args = [
                    a.known,
                    a.slot.limit.load(Ordering::Relaxed),
                    a.need,
                    a.want,
                    a.give,
                    a.deficit,
                    a.held,
                    self.settings.lease_ttl.as_millis() as i64,
                ];
                async move {
                    let Some(mut conn) = conn else {
                        return Outcome::Unreachable;
                    };
                    let (k, leases) = redis_keys(a.key_id);
                    let keys = [k.as_str(), leases.as_str()];
                    let call =
                        script.call::<(i64, i64, i64, i64)>(&mut conn, &keys, &args, Some(gateway));
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok((x, g, c, u))) => Outcome::Answered(x, g, c, u),
                        Ok(Err(e)) if !unreachable(&e) => {
                            log::error!("ledger: key {}: Redis refused: {e}", a.key_id);
                            Outcome::Refused
                        }
                        Ok(Err(e)) => {
                            log::debug!("ledger: key {}: {e}", a.key_id);
                            Outcome::Unreachable
                        }
                        Err(_) => Outcome::Unreachable,
                    }
                }
            });
            let results = futures_util::future::join_all(calls).await;
            self.ledger
                .stats
                .ops
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let reached = results.iter().any(|r| !matches!(r, Outcome::Unreachable));
            for (ask, result) in batch.into_iter().zip(results) {
                match result {
                    Outcome::Answered(applied, granted, committed, consumption) => {
                        self.apply(ask, applied == 1, granted, committed, consumption)
                    }
                    outcome => self.abandon(ask, matches!(outcome, Outcome::Refused)),
                }
            }
            if reached {
                self.reached();
            } else {
                self.failed("script calls failed or timed out");
                for ask in std::mem::take(&mut asks) {
                    self.abandon(ask, false);
                }
            }
        }
    }

    /// Apply one answer: credit what Redis granted beyond what this gateway knew (a grant, an
    /// overdraft turned into committed quota, a lost earlier answer) and settle a give-back
    /// whose answer was lost, then serve the waiting calls in order.
    fn apply(&mut self, ask: Ask, applied: bool, granted: i64, committed: i64, consumption: i64) {
        let slot = ask.slot;
        let state = self.keys.entry(ask.key_id).or_default();
        state.known = granted;
        state.pending_give -= ask.pending;
        state.synced_at = self.ledger.now_ms();
        // Applied: `granted − known` is −give + deficit + grant, so this adds deficit + grant
        // (the give was taken out of `avail` beforehand). Not applied: it restores the give and
        // corrects `avail` by what Redis shows. A lost give-back (`pending`) is restored here
        // and taken off again by `granted − known` if Redis had applied it.
        let delta = granted - ask.known + ask.give + ask.pending;
        slot.avail.fetch_add(delta, Ordering::AcqRel);
        if ask.pending != 0 {
            // Redis's record does not show the restored give-back yet.
            slot.dirty.store(true, Ordering::Release);
        }
        if applied {
            slot.recorded
                .store(ask.held + delta - ask.pending, Ordering::Release);
            let got = delta - ask.pending - ask.deficit;
            if ask.want > 0 && got < ask.want {
                // Redis capped the lease near the limit: ask again only once half of what it
                // gave is spent, not at every call.
                slot.low_water.store(got / 2, Ordering::Relaxed);
            }
        } else {
            // The record was ahead of this gateway (a lost answer). It is corrected now;
            // report again next round.
            slot.dirty.store(true, Ordering::Release);
        }
        slot.consumption.store(consumption, Ordering::Release);
        slot.consumption_read.store(true, Ordering::Release);
        let limit = slot.limit.load(Ordering::Relaxed);
        for (amount, reply, rounds) in ask.waiters {
            if self.ledger.take(&slot, amount).is_some() {
                let _ = reply.send(Ok(self.granted(&slot, amount)));
                continue;
            }
            let room = limit < 0 || limit.saturating_sub(committed) >= amount;
            if (room || !applied) && rounds < WAIT_ROUNDS {
                // There is room, or this answer only corrected the gateway: one more round.
                let _ = self.ledger.tx.send(Msg::Need {
                    key_id: ask.key_id,
                    slot: slot.clone(),
                    amount,
                    reply,
                    rounds: rounds + 1,
                });
                continue;
            }
            let _ = reply.send(Err(ReserveError::Insufficient {
                remaining: limit.saturating_sub(committed).max(0),
            }));
        }
    }

    /// A call without an answer: a give-back stays held back until an answer shows whether
    /// Redis applied it; waiting calls are answered as `on_unavailable` says (or refused, when
    /// Redis refused the call); the report is retried next round.
    fn abandon(&mut self, ask: Ask, refused: bool) {
        if ask.give > 0 {
            self.keys.entry(ask.key_id).or_default().pending_give += ask.give;
        }
        ask.slot.dirty.store(true, Ordering::Release);
        for (amount, reply, _) in ask.waiters {
            if refused {
                let _ = reply.send(Err(ReserveError::BackendUnavailable));
            } else {
                self.admit_without_redis(&ask.slot, amount, reply);
            }
        }
    }
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

/// What this gateway charged before it used Redis: its local ledger in `dir`, if any.
pub(crate) fn local_history(dir: &Path) -> HashMap<u64, i64> {
    if !dir.exists() {
        return HashMap::new();
    }
    match super::Ledger::read_consumed(dir) {
        Ok(m) => m.into_iter().filter(|(_, v)| *v > 0).collect(),
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
    use super::*;

    struct Server(std::process::Child, u16);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    async fn server() -> Option<(Server, Conn)> {
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

    /// One SYNC call: (applied, granted, committed, consumption).
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
        let (k, l) = redis_keys(7);
        let args = [known, limit, need, want, give, deficit, held, ttl_ms];
        Script::new(SYNC_SCRIPT)
            .call(conn, &[k.as_str(), l.as_str()], &args, Some(gw))
            .await
            .unwrap()
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

    #[tokio::test]
    async fn a_removed_record_trusts_the_gateway_and_keeps_committed() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        sync(&mut c, "a", 0, 1_000, 0, 100, 0, 0, 0, 30_000).await;
        let (_, l) = redis_keys(7);
        let _: i64 = redis::cmd("DEL").arg(&l).query_async(&mut c).await.unwrap();
        let (applied, g, committed, _) =
            sync(&mut c, "a", 100, 1_000, 0, 0, 0, 0, 100, 30_000).await;
        assert_eq!((applied, g, committed), (1, 100, 100));
    }

    #[tokio::test]
    async fn seeding_adds_once() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        let (k, _) = redis_keys(7);
        let seed = Script::new(SEED_SCRIPT);
        let first: i64 = seed
            .call(&mut c, &[k.as_str()], &[500], None)
            .await
            .unwrap();
        let second: i64 = seed
            .call(&mut c, &[k.as_str()], &[500], None)
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
}
