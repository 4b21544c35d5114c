//! Rate limits across gateways (SPEC §7): the rpm and tpm buckets of a key or an account live
//! in Redis, one hash per scope (`keygate:{id}:rate`, fields `rpm` and `tpm`: the bucket's
//! "theoretical arrival time" in µs of Redis's clock, the GCRA of `core::limits`). The hash tag
//! `{id}` puts it on the node of the scope's quota counter.
//!
//! A gateway does not ask Redis per request: it takes a *lease*, tokens taken out of the Redis
//! bucket ahead of use, and admits locally from it with one atomic. A lease is at most
//! [`lease_size`] tokens: what the limit refills in [`LEASE_COVERS`] (2 s), at least one. When
//! it runs below half, a background call tops it up; a call that finds it empty waits for one
//! script call (several waiting calls of a scope share it). When Redis says the bucket is
//! empty, the gateway refuses locally until the time Redis named, without asking again.
//! Tokens used beyond the lease (a settle above the call's tpm estimate) are reported as a
//! debt, and a lease idle for [`IDLE`] goes back to the bucket.
//!
//! The bound (README): tokens admitted in a span of `W` s come from what the gateways held at
//! its start (at most `lease_size` each) and what Redis granted during it (at most
//! `L + L × W / 60`, the bucket's own bound), so across `G` gateways at most
//! `L + L × W / 60 + G × lease_size(L)` with `lease_size(L) = max(1, ⌈L × 2 / 60⌉)`; for tpm,
//! plus what settles below their estimate gave back to a lease.
//!
//! Concurrency stays per gateway. While Redis is away, `on_unavailable` applies: `lease` admits
//! from what is held, then refuses (503); `deny` refuses at once; `allow` falls back to this
//! gateway's own buckets, which mirror the Redis bucket as last seen.

use super::scripts::{connect, unreachable, Conn, Script};
use super::RedisSettings;
use crate::core::config::OnUnavailable;
use crate::ledger::limits::{
    mono_ns, LimitBook, LimitHold, LimitRefusal, Refused, ScopeLimits, ScopeLive,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The rpm index of a [`RateSlot`]'s pairs.
pub(crate) const RPM: usize = 0;
/// The tpm index.
pub(crate) const TPM: usize = 1;

/// A lease covers what the limit refills in this long.
pub(crate) const LEASE_COVERS: Duration = Duration::from_secs(2);
/// A lease unused this long goes back to the bucket.
const IDLE: Duration = Duration::from_secs(5);
/// Debts and idle leases are reported this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A call that found its lease short tries again this many times after a refill.
const ROUNDS: usize = 4;
/// Script calls in flight at once.
const CONCURRENT_CALLS: usize = 64;
const WINDOW_US: i64 = 60_000_000;

/// The most tokens a gateway holds for a scope with limit `limit`.
pub(crate) fn lease_size(limit: u32) -> i64 {
    let covers = LEASE_COVERS.as_millis() as i64;
    ((i64::from(limit) * covers + 59_999) / 60_000).max(1)
}

/// Take tokens, give back, report a debt: one atomic step per scope. KEYS[1]: the scope's
/// hash. ARGV per kind (rpm, then tpm): limit (0: none), tokens wanted, tokens given back
/// (negative: used beyond the lease). Returns per kind: tokens granted and the bucket's
/// `tat − now` in µs (how far it is from full).
pub(super) const RATE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for k = 0, 1 do
  local limit, want, give = tonumber(ARGV[k*3+1]), tonumber(ARGV[k*3+2]), tonumber(ARGV[k*3+3])
  local grant, ahead = 0, 0
  if limit > 0 then
    local field = (k == 0) and 'rpm' or 'tpm'
    local cost = 60000000 / limit
    local tat = math.max(tonumber(redis.call('HGET', KEYS[1], field) or '0'), now)
    -- A give-back never fills the bucket past full; a debt moves it on unconditionally.
    tat = math.max(tat - give * cost, now)
    local room = math.floor((now + 60000000 - tat) / cost + 0.000001)
    grant = math.max(0, math.min(want, room))
    tat = math.ceil(tat + grant * cost)
    if give ~= 0 or grant > 0 then
      redis.call('HSET', KEYS[1], field, string.format('%d', tat))
    end
    ahead = tat - now
  end
  out[#out + 1] = grant
  out[#out + 1] = ahead
end
redis.call('PEXPIRE', KEYS[1], 120000)
return out
";

/// The scope's Redis key.
pub(super) fn rate_key(id: u64) -> String {
    format!("keygate:{{{id}}}:rate")
}

/// One scope's lease, per kind: tokens held (negative: used beyond it, not yet reported) and
/// until when Redis said the bucket is empty.
#[derive(Debug, Default)]
pub struct RateSlot {
    held: [AtomicI64; 2],
    empty_until: [AtomicI64; 2],
    last_use: AtomicI64,
    queued: AtomicBool,
}

/// What a lease says about a request for tokens.
pub(crate) enum LeaseTake {
    Ok,
    /// Redis said the bucket is empty: this many ns until a token is free.
    Wait(i64),
    /// Not enough held: ask Redis.
    Short,
}

impl RateSlot {
    /// Take `n` tokens of kind `k` from the lease.
    #[inline]
    pub(crate) fn take(&self, k: usize, n: u64, now: i64) -> LeaseTake {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.last_use.store(now, Ordering::Relaxed);
        let took = self.held[k].fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
            (h >= n).then(|| h - n)
        });
        if took.is_ok() {
            return LeaseTake::Ok;
        }
        let until = self.empty_until[k].load(Ordering::Acquire);
        if until > now {
            LeaseTake::Wait(until - now)
        } else {
            LeaseTake::Short
        }
    }

    /// Give `n` tokens back to the lease (negative: take them, below zero if need be).
    pub(crate) fn give(&self, k: usize, n: i64) {
        if n != 0 {
            self.held[k].fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Tokens held, for the headers.
    pub(crate) fn held(&self, k: usize) -> u64 {
        u64::try_from(self.held[k].load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Take out what is held (`positive`) or owed (not `positive`), to send it to Redis.
    fn take_out(&self, k: usize, positive: bool) -> i64 {
        self.held[k]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                ((h > 0) == positive && h != 0).then_some(0)
            })
            .unwrap_or(0)
    }
}

/// A scope the worker is asked about.
struct Ask {
    id: u64,
    live: Arc<ScopeLive>,
    /// rpm and tpm limits (0: none).
    limits: [u32; 2],
    /// Tokens the waiting calls need, per kind.
    need: [i64; 2],
    replies: Vec<oneshot::Sender<bool>>,
}

enum Msg {
    /// Calls of a scope wait for tokens (a top-up, when `reply` is `None`).
    Fill(Ask),
    /// Give every lease back, then answer.
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// The shared rate limits of one gateway.
pub(crate) struct RateLeases {
    mode: OnUnavailable,
    up: AtomicBool,
    timeout: Duration,
    ops: AtomicU64,
    tx: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for RateLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RateLeases({:?}, up: {})", self.mode, self.is_up())
    }
}

impl RateLeases {
    /// Start the worker thread (its own connection, made in the background).
    pub(crate) fn start(settings: RedisSettings) -> std::io::Result<Arc<RateLeases>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let leases = Arc::new(RateLeases {
            mode: settings.on_unavailable,
            up: AtomicBool::new(true),
            timeout: settings.timeout,
            ops: AtomicU64::new(0),
            tx,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let worker = Worker {
            leases: leases.clone(),
            settings,
            conn: None,
            script: Script::new(RATE_SCRIPT),
            known: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("keygate-rates".into())
            .spawn(move || runtime.block_on(worker.run(rx)))?;
        Ok(leases)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Script calls made so far.
    pub(crate) fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Ask for tokens for the scope `s` and wait for the answer: false when Redis did not
    /// answer.
    async fn fill(&self, s: &ScopeLimits, live: Arc<ScopeLive>, tokens: u64) -> bool {
        let (tx, rx) = oneshot::channel();
        let t = i64::try_from(tokens).unwrap_or(i64::MAX);
        let ask = Ask {
            id: s.id,
            live,
            limits: [s.limits.rpm.unwrap_or(0), s.limits.tpm.unwrap_or(0)],
            need: [
                i64::from(s.limits.rpm.is_some()),
                t * i64::from(s.limits.tpm.is_some()),
            ],
            replies: vec![tx],
        };
        if self.tx.send(Msg::Fill(ask)).is_err() {
            return false;
        }
        let wait = self.timeout * 2 + Duration::from_secs(1);
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(true)))
    }

    /// After an admission: top up the leases that ran below half, in the background.
    fn top_up(&self, hold: &LimitHold) {
        for p in hold.parts.iter() {
            let limits = [p.limits.rpm.unwrap_or(0), p.limits.tpm.unwrap_or(0)];
            let low = (0..2).any(|k| {
                limits[k] > 0
                    && p.live.lease.held[k].load(Ordering::Relaxed) * 2 < lease_size(limits[k])
            });
            if low && !p.live.lease.queued.swap(true, Ordering::AcqRel) {
                let _ = self.tx.send(Msg::Fill(Ask {
                    id: p.id,
                    live: p.live.clone(),
                    limits,
                    need: [0, 0],
                    replies: Vec::new(),
                }));
            }
        }
    }

    /// Give every lease back (waiting at most `wait`).
    pub(crate) fn shutdown(&self, wait: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Shutdown(tx)).is_ok() {
            let _ = rx.recv_timeout(wait);
        }
    }
}

impl LimitBook {
    /// [`LimitBook::admit`] on the shared ledger: rpm and tpm from the scopes' leases, refilled
    /// from Redis when short; `on_unavailable` while Redis is away.
    pub(crate) async fn admit_shared(
        &self,
        rates: &RateLeases,
        scopes: &[ScopeLimits],
        tokens: u64,
    ) -> Result<LimitHold, LimitRefusal> {
        let first = scopes.first().map(|s| s.scope);
        let unavailable =
            || LimitRefusal::Unavailable(first.unwrap_or(crate::ledger::limits::Scope::Key));
        if !rates.is_up() {
            match rates.mode {
                OnUnavailable::Deny => return Err(unavailable()),
                OnUnavailable::Allow => return self.admit(scopes, tokens, mono_ns()),
                OnUnavailable::Lease => {}
            }
        }
        let mut short = (0, RPM);
        for _ in 0..ROUNDS {
            match self.admit_from(scopes, tokens, mono_ns(), true) {
                Ok(hold) => {
                    rates.top_up(&hold);
                    return Ok(hold);
                }
                Err(Refused::No(r)) => return Err(r),
                Err(Refused::Short(i, kind)) => {
                    short = (i, kind);
                    let s = &scopes[i];
                    if !rates.fill(s, self.scope(s.id), tokens).await {
                        return match rates.mode {
                            OnUnavailable::Allow => self.admit(scopes, tokens, mono_ns()),
                            _ => Err(unavailable()),
                        };
                    }
                }
            }
        }
        // Other calls took every refill: the bucket is all but empty; try again in a moment.
        let scope = scopes[short.0].scope;
        Err(match short.1 {
            RPM => LimitRefusal::Requests(scope, 1_000_000_000),
            _ => LimitRefusal::Tokens(scope, 1_000_000_000),
        })
    }
}

/// One script call: per kind, what to want and what was taken out to give back.
struct Call {
    ask: Ask,
    want: [i64; 2],
    give: [i64; 2],
}

/// The worker thread: owns the connection and the scopes it holds leases for.
struct Worker {
    leases: Arc<RateLeases>,
    settings: RedisSettings,
    conn: Option<Conn>,
    script: Script,
    /// Scopes with a lease: the live state and their last limits.
    known: HashMap<u64, (Arc<ScopeLive>, [u32; 2])>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut next_flush = Instant::now() + FLUSH_EVERY;
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
            let mut asks: HashMap<u64, Ask> = HashMap::new();
            let mut shutdown = None;
            for m in msgs {
                match m {
                    Msg::Fill(a) => {
                        a.live.lease.queued.store(false, Ordering::Release);
                        self.known.insert(a.id, (a.live.clone(), a.limits));
                        match asks.get_mut(&a.id) {
                            Some(b) => {
                                for k in 0..2 {
                                    b.need[k] = b.need[k].saturating_add(a.need[k]);
                                }
                                b.limits = a.limits;
                                b.replies.extend(a.replies);
                            }
                            None => {
                                asks.insert(a.id, a);
                            }
                        }
                    }
                    Msg::Shutdown(done) => shutdown = Some(done),
                }
            }
            let flush = Instant::now() >= next_flush || shutdown.is_some();
            let closing = shutdown.is_some();
            let mut calls: Vec<Call> = asks.into_values().map(|a| self.plan(a, false)).collect();
            if flush {
                calls.extend(self.flush(&calls, closing));
                next_flush = Instant::now() + FLUSH_EVERY;
            }
            calls.retain(|c| c.want != [0, 0] || c.give != [0, 0] || !c.ask.replies.is_empty());
            if !calls.is_empty() {
                self.send(calls).await;
            }
            if let Some(done) = shutdown {
                let _ = done.send(());
                return;
            }
        }
    }

    /// What to ask for a scope: the waiting calls' need plus a lease; a debt goes along.
    fn plan(&self, ask: Ask, give_back: bool) -> Call {
        let mut call = Call {
            want: [0, 0],
            give: [0, 0],
            ask,
        };
        let lease = &call.ask.live.lease;
        for k in 0..2 {
            let limit = call.ask.limits[k];
            if limit == 0 {
                continue;
            }
            call.give[k] = lease.take_out(k, false);
            if give_back {
                call.give[k] += lease.take_out(k, true);
                continue;
            }
            let held = lease.held[k].load(Ordering::Acquire).max(0);
            let target = call.ask.need[k].saturating_add(lease_size(limit));
            call.want[k] = (target - held).max(0).min(i64::from(limit));
        }
        call
    }

    /// Scopes not asked about this round with a debt to report or an idle lease to give back.
    fn flush(&mut self, asked: &[Call], closing: bool) -> Vec<Call> {
        let now = mono_ns();
        let idle_ns = IDLE.as_nanos() as i64;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, (live, limits)) in &self.known {
            if asked.iter().any(|c| c.ask.id == *id) {
                continue;
            }
            let lease = &live.lease;
            let held = [0, 1].map(|k| lease.held[k].load(Ordering::Acquire));
            let idle = closing || now - lease.last_use.load(Ordering::Relaxed) >= idle_ns;
            if held == [0, 0] {
                if idle {
                    gone.push(*id);
                }
                continue;
            }
            if !(idle || held.iter().any(|h| *h < 0)) {
                continue;
            }
            let ask = Ask {
                id: *id,
                live: live.clone(),
                limits: *limits,
                need: [0, 0],
                replies: Vec::new(),
            };
            let mut call = self.plan(ask, idle);
            if !idle {
                // Only the debt: the lease stays as it is.
                call.want = [0, 0];
            }
            out.push(call);
        }
        for id in gone {
            self.known.remove(&id);
        }
        out
    }

    async fn ensure_conn(&mut self) -> bool {
        if self.conn.is_none() {
            match tokio::time::timeout(self.settings.timeout * 2, connect(&self.settings)).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err(e)) => return self.failed(&format!("connect: {e}")),
                Err(_) => return self.failed("connect: timed out"),
            }
        }
        true
    }

    fn failed(&self, why: &str) -> bool {
        if self.leases.up.swap(false, Ordering::AcqRel) {
            log::error!(
                "rate limits: Redis unreachable ({why}); on_unavailable: {:?}",
                self.leases.mode
            );
        }
        false
    }

    /// Make the calls (several at once) and apply the answers.
    async fn send(&mut self, mut calls: Vec<Call>) {
        if !self.ensure_conn().await {
            for c in calls {
                undo(c);
            }
            return;
        }
        while !calls.is_empty() {
            let rest = calls.split_off(calls.len().min(CONCURRENT_CALLS));
            let batch = std::mem::replace(&mut calls, rest);
            let answers = futures_util::future::join_all(batch.iter().map(|c| {
                let mut conn = self.conn.clone();
                let script = &self.script;
                let timeout = self.settings.timeout;
                let key = rate_key(c.ask.id);
                let mut args = [0i64; 6];
                for k in 0..2 {
                    args[k * 3] = i64::from(c.ask.limits[k]);
                    args[k * 3 + 1] = c.want[k];
                    args[k * 3 + 2] = c.give[k];
                }
                async move {
                    let conn = conn.as_mut()?;
                    let keys = [key.as_str()];
                    let call = script.call::<(i64, i64, i64, i64)>(conn, &keys, &args, None);
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok((a, b, c, d))) => Some(Ok([a, b, c, d])),
                        Ok(Err(e)) if !unreachable(&e) => Some(Err(e)),
                        Ok(Err(e)) => {
                            log::debug!("rate limits: {e}");
                            None
                        }
                        Err(_) => None,
                    }
                }
            }))
            .await;
            self.leases
                .ops
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let reached = answers.iter().any(Option::is_some);
            for (call, answer) in batch.into_iter().zip(answers) {
                match answer {
                    Some(Ok(v)) => apply(call, v),
                    Some(Err(e)) => {
                        log::error!("rate limits: scope {}: Redis refused: {e}", call.ask.id);
                        undo(call);
                    }
                    None => undo(call),
                }
            }
            if reached {
                if !self.leases.up.swap(true, Ordering::AcqRel) {
                    log::info!("rate limits: Redis reachable again");
                }
            } else {
                self.failed("script calls failed or timed out");
                for c in std::mem::take(&mut calls) {
                    undo(c);
                }
            }
        }
    }
}

/// Credit an answer `[granted rpm, ahead rpm µs, granted tpm, ahead tpm µs]`: the tokens go to
/// the lease, the local bucket mirrors the Redis one, and a grant short of what was asked marks
/// the bucket empty until its next token.
fn apply(call: Call, v: [i64; 4]) {
    let now = mono_ns();
    let live = &call.ask.live;
    for k in 0..2 {
        let limit = call.ask.limits[k];
        if limit == 0 {
            continue;
        }
        let (granted, ahead_ns) = (v[k * 2], v[k * 2 + 1].saturating_mul(1_000));
        live.lease.give(k, granted);
        let bucket = if k == RPM { &live.rpm } else { &live.tpm };
        bucket.set_tat(now.saturating_add(ahead_ns));
        if call.want[k] == 0 {
            continue;
        }
        // Less than asked: the bucket is empty until its next token (calls that the lease
        // cannot cover are refused here until then); all of it: not empty.
        let until = if granted < call.want[k] {
            let token_ns = WINDOW_US * 1_000 / i64::from(limit);
            now + (ahead_ns + token_ns - WINDOW_US * 1_000).max(1_000_000)
        } else {
            0
        };
        live.lease.empty_until[k].store(until, Ordering::Release);
    }
    for r in call.ask.replies {
        let _ = r.send(true);
    }
}

/// A call without an answer: what was taken out to send goes back to the lease (a lost answer
/// that Redis applied leaves the bucket stricter, never looser, except for a give-back), and
/// the waiting calls are told.
fn undo(call: Call) {
    for k in 0..2 {
        call.ask.live.lease.give(k, call.give[k]);
    }
    for r in call.ask.replies {
        let _ = r.send(false);
    }
}
