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
/// A key unused for this long gives its lease back.
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
local granted = 0
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
  e = tonumber(e)
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
  if tonumber(e) >= now then holding = holding + tonumber(h) end
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
type Reply = oneshot::Sender<Result<(), ReserveError>>;

/// Reservations waiting for a refill: (amount, reply), in arrival order.
type Waiters = Vec<(i64, Reply)>;

enum Msg {
    /// A reservation that its lease cannot cover waits for a refill.
    Need {
        key_id: u64,
        slot: Arc<Slot>,
        amount: i64,
        reply: Reply,
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

    /// Whether the last Redis call succeeded.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
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
        };
        if self.tx.send(need).is_err() {
            return Err(ReserveError::BackendUnavailable);
        }
        // The worker answers within one script call; the bound is for a stuck worker.
        match tokio::time::timeout(self.timeout * 4 + Duration::from_secs(1), answer).await {
            Ok(Ok(Ok(()))) => Ok(slot),
            Ok(Ok(Err(e))) => Err(e),
            _ => Err(ReserveError::BackendUnavailable),
        }
    }

    /// Debit `amount` if the lease covers it; ask for a refill when it runs low.
    fn try_debit(&self, key_id: u64, slot: &Slot, amount: i64) -> bool {
        let taken = slot
            .avail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a >= amount).then(|| a - amount)
            });
        let Ok(before) = taken else {
            return false;
        };
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        slot.debited.fetch_add(amount, Ordering::Relaxed);
        if before - amount < slot.low_water.load(Ordering::Relaxed)
            && !slot.queued.swap(true, Ordering::AcqRel)
        {
            let _ = self.tx.send(Msg::Refill(key_id));
        }
        true
    }

    /// Debit unconditionally (unlimited keys; `allow` mode while Redis is away).
    fn debit(&self, slot: &Slot, amount: i64) {
        slot.avail.fetch_sub(amount, Ordering::AcqRel);
        slot.debited.fetch_add(amount, Ordering::Relaxed);
        slot.dirty.store(true, Ordering::Release);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
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
    /// stays when Redis does not answer).
    pub(crate) async fn refresh(&self, key_id: u64) {
        self.slot(key_id);
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Read(key_id, tx)).is_ok() {
            let _ = tokio::time::timeout(self.timeout + Duration::from_millis(50), rx).await;
        }
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

struct Scripts {
    sync: redis::Script,
    read: redis::Script,
    seed: redis::Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            sync: redis::Script::new(SYNC_SCRIPT),
            read: redis::Script::new(READ_SCRIPT),
            seed: redis::Script::new(SEED_SCRIPT),
        }
    }
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
    need: i64,
    want: i64,
    give: i64,
    deficit: i64,
    held: i64,
    waiters: Waiters,
}

/// The ledger thread: owns the connection and every key's `known` grant.
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
    /// The rate mark: units debited at `rate_at` (ms).
    rate_debited: i64,
    rate_at: u64,
    /// When the record was last written (ms).
    synced_at: u64,
}

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
                next_flush = Instant::now() + FLUSH_EVERY / 2;
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
                    } => needs
                        .entry(key_id)
                        .or_insert_with(|| (slot, Vec::new()))
                        .1
                        .push((amount, reply)),
                    Msg::Refill(id) => refills.push(id),
                    Msg::Read(id, done) => self.spawn_read(id, done),
                    Msg::Shutdown(done) => shutdown = Some(done),
                }
            }
            let flush = Instant::now() >= next_flush || shutdown.is_some();
            let asks = self.plan(needs, refills, flush, shutdown.is_some());
            if asks.is_empty() && flush && !self.ledger.is_up() {
                self.probe().await;
            }
            self.sync(asks).await;
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
                    let mut conn = self.conn.clone();
                    let script = &self.scripts.seed;
                    let timeout = self.settings.timeout;
                    async move {
                        let conn = conn.as_mut()?;
                        let (k, _) = redis_keys(*id);
                        let mut invocation = script.key(k);
                        let call = invocation.arg(*v).invoke_async::<i64>(conn);
                        tokio::time::timeout(timeout, call).await.ok()?.ok()
                    }
                });
                let results = futures_util::future::join_all(calls).await;
                self.ledger
                    .stats
                    .ops
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if results.iter().any(Option::is_none) {
                    return self.failed("seeding from the local ledger failed");
                }
                let applied = results.iter().flatten().filter(|r| **r == 1).count();
                for (id, _) in chunk {
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
                } => {
                    let _ = reply.send(self.admit_without_redis(&slot, amount));
                }
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

    fn admit_without_redis(&self, slot: &Slot, amount: i64) -> Result<(), ReserveError> {
        if self.ledger.mode == OnUnavailable::Allow {
            self.ledger.debit(slot, amount);
            Ok(())
        } else {
            Err(ReserveError::BackendUnavailable)
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
            let mut invocation = scripts.read.key(k);
            let call = invocation.key(leases).invoke_async::<i64>(&mut conn);
            ledger.stats.ops.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(v)) => {
                    if let Some(slot) = ledger.slots.get(&key_id) {
                        slot.consumption.store(v, Ordering::Release);
                    }
                }
                _ => {
                    ledger.stats.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = done.send(());
        });
    }

    /// The sync calls this round makes: keys with waiting calls, keys whose lease ran low, and
    /// on a flush every key with something to report, renew or give back.
    fn plan(
        &mut self,
        needs: HashMap<u64, (Arc<Slot>, Waiters)>,
        refills: Vec<u64>,
        flush: bool,
        closing: bool,
    ) -> Vec<Ask> {
        let now = self.ledger.now_ms();
        let renew_after = self.settings.lease_ttl.as_millis() as u64 / 3;
        let mut asks: HashMap<u64, Ask> = HashMap::new();
        for (key_id, (slot, waiters)) in needs {
            let total: i64 = waiters.iter().map(|(a, _)| *a).sum();
            let mut ask = self.ask(key_id, slot, now);
            ask.need = (total - ask.held.max(0)).max(0);
            ask.want = ask.need + self.lease_size(key_id, &ask.slot, now);
            ask.waiters = waiters;
            asks.insert(key_id, ask);
        }
        for key_id in refills {
            if asks.contains_key(&key_id) {
                continue;
            }
            let Some(slot) = self.ledger.slots.get(&key_id).map(|s| s.clone()) else {
                continue;
            };
            slot.queued.store(false, Ordering::Release);
            let mut ask = self.ask(key_id, slot, now);
            ask.want = self.lease_size(key_id, &ask.slot, now);
            asks.insert(key_id, ask);
        }
        if flush {
            let slots: Vec<(u64, Arc<Slot>)> = self
                .ledger
                .slots
                .iter()
                .map(|e| (*e.key(), e.value().clone()))
                .collect();
            for (key_id, slot) in slots {
                if asks.contains_key(&key_id) {
                    continue;
                }
                let avail = slot.avail.load(Ordering::Acquire);
                let idle = now.saturating_sub(slot.last_use.load(Ordering::Relaxed)) >= IDLE_MS;
                let stale = self
                    .keys
                    .get(&key_id)
                    .is_some_and(|k| avail != 0 && now.saturating_sub(k.synced_at) >= renew_after);
                let dirty = slot.dirty.swap(false, Ordering::AcqRel);
                if dirty || avail < 0 || stale || ((idle || closing) && avail > 0) {
                    let mut ask = self.ask(key_id, slot, now);
                    if (idle || closing) && ask.held > 0 {
                        // Give the lease back: taken out of `avail` first, so it is not spent
                        // meanwhile; put back if the call fails.
                        let taken =
                            ask.slot
                                .avail
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                                    (a > 0).then_some(0)
                                });
                        ask.give = taken.unwrap_or(0).max(0);
                        ask.held = ask.slot.avail.load(Ordering::Acquire);
                    }
                    asks.insert(key_id, ask);
                }
            }
        }
        asks.into_values().collect()
    }

    fn ask(&mut self, key_id: u64, slot: Arc<Slot>, now: u64) -> Ask {
        let known = self
            .keys
            .entry(key_id)
            .or_insert(KeyState {
                rate_at: now,
                ..KeyState::default()
            })
            .known;
        let held = slot.avail.load(Ordering::Acquire);
        Ask {
            key_id,
            known,
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
    /// recent spending, at least four of its last reservations. Redis caps it near the limit.
    fn lease_size(&mut self, key_id: u64, slot: &Slot, now: u64) -> i64 {
        let debited = slot.debited.load(Ordering::Relaxed);
        let last = slot.last_amount.load(Ordering::Relaxed).max(1);
        let state = self.keys.entry(key_id).or_insert(KeyState {
            rate_debited: debited,
            rate_at: now,
            ..KeyState::default()
        });
        let elapsed = now.saturating_sub(state.rate_at).max(1);
        let spent = (debited - state.rate_debited).max(0);
        let by_rate = (spent as f64 * LEASE_COVERS.as_millis() as f64 / elapsed as f64) as i64;
        if elapsed >= 1_000 {
            state.rate_debited = debited;
            state.rate_at = now;
        }
        let size = by_rate.max(4 * last).min(super::MAX_AMOUNT);
        slot.low_water.store(size / 2, Ordering::Relaxed);
        size
    }

    /// Run this round's script calls (several at once) and apply their answers.
    async fn sync(&mut self, asks: Vec<Ask>) {
        if asks.is_empty() {
            return;
        }
        let limit_of = |s: &Slot| s.limit.load(Ordering::Relaxed);
        let mut asks = asks;
        while !asks.is_empty() {
            let rest = asks.split_off(asks.len().min(CONCURRENT_CALLS));
            let batch = std::mem::replace(&mut asks, rest);
            let calls = batch.iter().map(|a| {
                let mut conn = self.conn.clone();
                let script = &self.scripts.sync;
                let gateway = self.gateway.as_str();
                let timeout = self.settings.timeout;
                let ttl = self.settings.lease_ttl.as_millis() as u64;
                let limit = limit_of(&a.slot);
                async move {
                    let conn = conn.as_mut()?;
                    let (k, leases) = redis_keys(a.key_id);
                    let mut invocation = script.key(k);
                    let call = invocation
                        .key(leases)
                        .arg(gateway)
                        .arg(a.known)
                        .arg(limit)
                        .arg(a.need)
                        .arg(a.want)
                        .arg(a.give)
                        .arg(a.deficit)
                        .arg(a.held)
                        .arg(ttl)
                        .invoke_async::<(i64, i64, i64, i64)>(conn);
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(r)) => Some(r),
                        Ok(Err(e)) => {
                            log::debug!("ledger: sync of key {}: {e}", a.key_id);
                            None
                        }
                        Err(_) => None,
                    }
                }
            });
            let results = futures_util::future::join_all(calls).await;
            self.ledger
                .stats
                .ops
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let mut failed = false;
            if results.iter().any(Option::is_some) {
                self.reached();
            }
            for (ask, result) in batch.into_iter().zip(results) {
                match result {
                    Some(r) => self.apply(ask, r),
                    None => {
                        failed = true;
                        self.abandon(ask);
                    }
                }
            }
            if failed {
                self.failed("a script call failed or timed out");
            }
        }
    }

    /// Apply one answer: credit what Redis granted beyond what this gateway knew (a grant, an
    /// overdraft turned into committed quota, or a lost earlier answer), then serve the waiting
    /// calls in order.
    fn apply(
        &mut self,
        ask: Ask,
        (applied, granted, committed, consumption): (i64, i64, i64, i64),
    ) {
        let slot = ask.slot;
        let now = self.ledger.now_ms();
        let state = self.keys.entry(ask.key_id).or_default();
        state.known = granted;
        state.synced_at = now;
        slot.avail
            .fetch_add(granted - ask.known + ask.give, Ordering::AcqRel);
        if applied == 1 {
            slot.recorded
                .store(ask.held + granted - ask.known + ask.give, Ordering::Release);
        } else {
            // Not applied: the record was ahead of this gateway (a lost answer). It is now
            // corrected; report again next round.
            slot.dirty.store(true, Ordering::Release);
        }
        slot.consumption.store(consumption, Ordering::Release);
        for (amount, reply) in ask.waiters {
            let ok = slot
                .avail
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                    (a >= amount).then(|| a - amount)
                })
                .is_ok();
            let answer = if ok {
                self.ledger.outstanding.fetch_add(1, Ordering::Relaxed);
                slot.debited.fetch_add(amount, Ordering::Relaxed);
                Ok(())
            } else {
                let limit = slot.limit.load(Ordering::Relaxed);
                Err(ReserveError::Insufficient {
                    remaining: (limit - committed).max(0),
                })
            };
            let _ = reply.send(answer);
        }
    }

    /// A call that failed: put back a lease being given back, answer waiters as
    /// `on_unavailable` says; the report is retried next round.
    fn abandon(&self, ask: Ask) {
        ask.slot.avail.fetch_add(ask.give, Ordering::AcqRel);
        ask.slot.dirty.store(true, Ordering::Release);
        for (amount, reply) in ask.waiters {
            let _ = reply.send(self.admit_without_redis(&ask.slot, amount));
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
