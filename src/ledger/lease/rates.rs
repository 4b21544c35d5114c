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
//! Concurrency is shared the same way, in the same hash and script call: each gateway has a
//! field `c:<gateway>` = "slots deadline_ms", the slots Redis counts for it (in use by its
//! calls, or spare) and until when the record lives. A grant comes only out of the room the
//! limit leaves beside every live record, so the calls in flight of a scope across gateways
//! never exceed its limit. A call takes a spare slot of the lease (asking Redis only when there
//! is none) and puts it back when it ends; a gateway keeps at most [`spare_slots`] (an eighth
//! of the limit, none below 8) spare and hands the rest back in the worker's next round, which
//! the call that ended asks for; all of it after [`IDLE`] without calls and at shutdown. Each
//! call states the gateway's slots anew (not a difference), so a lost answer is corrected by
//! the next one. A gateway with slots renews its record every third of `lease_ttl_seconds`; the
//! script drops a record past its deadline, so the slots of a gateway killed with `-9` come
//! back at most `lease_ttl_seconds` after it died.
//!
//! While Redis is away, `on_unavailable` applies: `lease` admits from what is held, then
//! refuses (503); `deny` refuses at once; `allow` falls back to this gateway's own buckets
//! and in-flight count, which mirror the Redis bucket as last seen.

use super::slot::{spare_slots, SpareSlots, CONC, KINDS, RPM};
use crate::core::config::OnUnavailable;
use crate::ledger::limits::{
    mono_ns, LimitBook, LimitHold, LimitRefusal, Refused, ScopeLimits, ScopeLive, Scopes,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A lease covers what the limit refills in this long.
pub(crate) const LEASE_COVERS: Duration = Duration::from_secs(2);
/// A lease unused this long goes back to the bucket.
pub(super) const IDLE: Duration = Duration::from_secs(5);
/// Debts and idle leases are reported this often.
pub(super) const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A call that found its lease short tries again this many times after a refill.
const ROUNDS: usize = 4;
/// Script calls in flight at once.
pub(super) const CONCURRENT_CALLS: usize = 64;
pub(super) const WINDOW_US: i64 = 60_000_000;

/// The most tokens a gateway holds for a scope with limit `limit`.
pub(crate) fn lease_size(limit: u32) -> i64 {
    let covers = LEASE_COVERS.as_millis() as i64;
    ((i64::from(limit) * covers + 59_999) / 60_000).max(1)
}

/// Take tokens, give back, report a debt, state and take concurrency slots: one atomic step per
/// scope and gateway. KEYS[1]: the scope's hash. ARGV[1]: the gateway; then per kind (rpm, then
/// tpm): limit (0: none), tokens wanted, tokens given back (negative: used beyond the lease);
/// then concurrency: limit (0: none), the slots the gateway has (in use and spare, after what
/// it gives back), slots wanted, the record's lifetime in ms. Returns per kind: tokens granted
/// and the bucket's `tat − now` in µs (how far it is from full); then slots granted and the
/// room left (negative: the live records hold more than the limit).
pub(super) const RATE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local keep = 120000
for k = 0, 1 do
  local limit, want, give = tonumber(ARGV[k*3+2]), tonumber(ARGV[k*3+3]), tonumber(ARGV[k*3+4])
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
  -- Kept until the bucket is full again (a debt can move it minutes ahead), and a minute more.
  keep = math.max(keep, math.ceil(ahead / 1000) + 60000)
end
local climit, has, cwant, ttl = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local mine = 'c:' .. ARGV[1]
local grant, room = 0, 0
if climit > 0 or has > 0 or redis.call('HEXISTS', KEYS[1], mine) == 1 then
  local ms = math.floor(now / 1000)
  local others = 0
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f ~= mine and string.sub(f, 1, 2) == 'c:' then
      local n, e = string.match(fields[i + 1], '^(%S+) (%S+)$')
      -- A gateway silent past its record's deadline is gone: its slots are free.
      if tonumber(e or '0') < ms then
        redis.call('HDEL', KEYS[1], f)
      else
        others = others + tonumber(n)
      end
    end
  end
  room = climit - others - has
  if climit > 0 then grant = math.max(0, math.min(cwant, room)) end
  room = room - grant
  if has + grant > 0 then
    redis.call('HSET', KEYS[1], mine, string.format('%d %d', has + grant, ms + ttl))
  else
    redis.call('HDEL', KEYS[1], mine)
  end
  keep = math.max(keep, 2 * ttl)
end
out[#out + 1] = grant
out[#out + 1] = room
redis.call('PEXPIRE', KEYS[1], keep)
return out
";

/// The scope's Redis key.
pub(super) fn rate_key(id: u64) -> String {
    format!("keygate:{{{id}}}:rate")
}

/// A scope the worker is asked about.
pub(super) struct Ask {
    pub(super) id: u64,
    pub(super) live: Arc<ScopeLive>,
    /// rpm, tpm and concurrency limits (0: none).
    pub(super) limits: [u32; KINDS],
    /// Tokens (slots) the waiting calls need, per kind.
    pub(super) need: [i64; KINDS],
    pub(super) replies: Vec<oneshot::Sender<bool>>,
}

pub(super) enum Msg {
    /// Calls of a scope wait for tokens (a top-up, when `reply` is `None`).
    Fill(Ask),
    /// A scope holds more spare slots than it keeps: hand the rest back.
    Spare(u64),
    /// Give every lease back, then answer.
    Shutdown(std::sync::mpsc::Sender<()>),
}

/// The shared rate limits of one gateway.
pub(crate) struct RateLeases {
    pub(super) mode: OnUnavailable,
    /// A concurrency record's lifetime without renewal (`lease_ttl_seconds`).
    pub(super) ttl: Duration,
    pub(super) up: AtomicBool,
    pub(super) timeout: Duration,
    pub(super) ops: AtomicU64,
    pub(super) tx: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for RateLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RateLeases({:?}, up: {})", self.mode, self.is_up())
    }
}

impl RateLeases {
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Script calls made so far.
    pub(crate) fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Ask for tokens for the scope `s` and wait for the answer: false when Redis did not
    /// answer.
    async fn fill(&self, s: &ScopeLimits<'_>, live: Arc<ScopeLive>, tokens: u64) -> bool {
        let (tx, rx) = oneshot::channel();
        let t = i64::try_from(tokens).unwrap_or(i64::MAX);
        let ask = Ask {
            id: s.id,
            live,
            limits: limits_of(&s.limits),
            need: [
                i64::from(s.limits.rpm.is_some()),
                t * i64::from(s.limits.tpm.is_some()),
                i64::from(s.limits.concurrency.is_some()),
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
            let limits = limits_of(&p.limits);
            let low = (0..KINDS).any(|k| {
                let size = if k == CONC {
                    spare_slots(limits[k])
                } else {
                    lease_size(limits[k])
                };
                limits[k] > 0 && p.live.lease.held[k].load(Ordering::Relaxed) * 2 < size
            });
            if low && !p.live.lease.queued.swap(true, Ordering::AcqRel) {
                let _ = self.tx.send(Msg::Fill(Ask {
                    id: p.id,
                    live: p.live.clone(),
                    limits,
                    need: [0; KINDS],
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

impl SpareSlots for RateLeases {
    fn spare(&self, id: u64) {
        let _ = self.tx.send(Msg::Spare(id));
    }
}

/// A scope's rpm, tpm and concurrency limits as the script takes them (0: none).
fn limits_of(l: &crate::core::limits::Limits) -> [u32; KINDS] {
    [
        l.rpm.unwrap_or(0),
        l.tpm.unwrap_or(0),
        l.concurrency.unwrap_or(0),
    ]
}

impl LimitBook {
    /// [`LimitBook::admit`] on the shared ledger: rpm, tpm and concurrency slots from the
    /// scopes' leases, refilled from Redis when short; `on_unavailable` while Redis is away.
    pub(crate) async fn admit_shared(
        &self,
        rates: &Arc<RateLeases>,
        scopes: &Scopes<'_>,
        tokens: u64,
    ) -> Result<LimitHold, LimitRefusal> {
        // No state is kept in the records' cells here: the rate worker forgets a scope once
        // only it and the book hold it, and a kept reference would pin it (Allow mode below
        // goes through the local `admit`).
        let unkept: Scopes<'_> = scopes
            .iter()
            .map(|s| ScopeLimits { cell: None, ..*s })
            .collect();
        let scopes = &unkept;
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
        let spare: Arc<dyn SpareSlots> = rates.clone();
        let mut short = (0, RPM);
        // The scopes whose slots Redis was asked for: a slot is not "empty until" a time, so
        // once Redis said the limit is taken, a call still short is refused (while it had room,
        // a call that found its slot taken by another asks again).
        let mut slots_asked = 0u64;
        for _ in 0..ROUNDS {
            match self.admit_leased(scopes, tokens, mono_ns(), &spare) {
                Ok(hold) => {
                    rates.top_up(&hold);
                    return Ok(hold);
                }
                Err(Refused::No(r)) => return Err(r),
                Err(Refused::Short(i, kind)) => {
                    if kind == CONC {
                        let asked = slots_asked & (1 << i.min(63)) != 0;
                        if asked && self.scope(scopes[i].id).lease.slots_full() {
                            return Err(LimitRefusal::Concurrency(scopes[i].scope));
                        }
                        slots_asked |= 1 << i.min(63);
                    }
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
            CONC => LimitRefusal::Concurrency(scope),
            _ => LimitRefusal::Tokens(scope, 1_000_000_000),
        })
    }
}

#[cfg(test)]
mod tests {
    //! The rate script's guarantees, against a real redis-server (skipped when it is not
    //! installed, unless `KEYGATE_REQUIRE_REDIS` is set).
    use super::super::scripts::{Conn, Script};
    use super::super::tests::server;
    use super::*;

    /// One call for scope 9: rpm (limit, want, give), tpm (limit, want, give) → granted rpm,
    /// granted tpm, and how far the rpm bucket is from full (s).
    async fn rate(c: &mut Conn, rpm: [i64; 3], tpm: [i64; 3]) -> (i64, i64, f64) {
        let key = rate_key(9);
        let args = [rpm[0], rpm[1], rpm[2], tpm[0], tpm[1], tpm[2], 0, 0, 0, 0];
        let (g0, a0, g1, _, _, _): (i64, i64, i64, i64, i64, i64) = Script::new(RATE_SCRIPT)
            .call(c, &[key.as_str()], &args, Some("gw"))
            .await
            .unwrap();
        (g0, g1, a0 as f64 / 1e6)
    }

    /// One concurrency call for scope 9 by gateway `gw`: limit, slots it has, slots wanted,
    /// record lifetime (ms) → slots granted, room left.
    async fn slots(
        c: &mut Conn,
        gw: &str,
        limit: i64,
        has: i64,
        want: i64,
        ttl: i64,
    ) -> (i64, i64) {
        let key = rate_key(9);
        let args = [0, 0, 0, 0, 0, 0, limit, has, want, ttl];
        let (_, _, _, _, g, room): (i64, i64, i64, i64, i64, i64) = Script::new(RATE_SCRIPT)
            .call(c, &[key.as_str()], &args, Some(gw))
            .await
            .unwrap();
        (g, room)
    }

    #[tokio::test]
    async fn slots_are_granted_only_out_of_the_limit_across_gateways() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        assert_eq!(slots(&mut c, "a", 4, 0, 3, 10_000).await, (3, 1));
        // b wants 3, gets the 1 left; then nothing.
        assert_eq!(slots(&mut c, "b", 4, 0, 3, 10_000).await, (1, 0));
        assert_eq!(slots(&mut c, "b", 4, 1, 1, 10_000).await, (0, 0));
        // a states it has 1 (2 handed back): b gets them.
        assert_eq!(slots(&mut c, "a", 4, 1, 0, 10_000).await, (0, 2));
        assert_eq!(slots(&mut c, "b", 4, 1, 5, 10_000).await, (2, 0));
        // A lowered limit: the room is negative, nothing is granted.
        assert_eq!(slots(&mut c, "a", 2, 1, 1, 10_000).await, (0, -2));
        // A restatement corrects a record a lost answer left too high (b: 3 → 1).
        assert_eq!(slots(&mut c, "b", 4, 1, 0, 10_000).await, (0, 2));
        // Stating 0 removes the record.
        slots(&mut c, "a", 4, 0, 0, 10_000).await;
        assert_eq!(slots(&mut c, "b", 4, 1, 0, 10_000).await, (0, 3));
    }

    #[tokio::test]
    async fn a_silent_gateways_slots_come_back_after_its_record_lapses() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        assert_eq!(slots(&mut c, "dead", 2, 0, 2, 300).await, (2, 0));
        assert_eq!(slots(&mut c, "live", 2, 0, 1, 10_000).await, (0, 0));
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!(slots(&mut c, "live", 2, 0, 1, 10_000).await, (1, 1));
    }

    #[tokio::test]
    async fn grants_come_only_out_of_the_bucket() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        // A full bucket of 60 grants 60 of 100 wanted, then nothing; it is a minute from full.
        let (g, _, ahead) = rate(&mut c, [60, 100, 0], [0, 0, 0]).await;
        assert_eq!(g, 60);
        assert!((59.9..=60.0).contains(&ahead), "{ahead}");
        assert_eq!(rate(&mut c, [60, 10, 0], [0, 0, 0]).await.0, 0);
        // Tokens given back can be granted again; never more than the bucket holds.
        assert_eq!(rate(&mut c, [60, 0, 5], [0, 0, 0]).await.0, 0);
        assert_eq!(rate(&mut c, [60, 10, 0], [0, 0, 0]).await.0, 5);
        // tpm is a bucket of its own.
        assert_eq!(rate(&mut c, [60, 0, 0], [1_000, 400, 0]).await.1, 400);
    }

    #[tokio::test]
    async fn a_give_back_never_fills_past_full_and_a_debt_is_charged() {
        let Some((_s, mut c)) = server().await else {
            return;
        };
        // Giving back to a full bucket leaves it full (not 1 060).
        rate(&mut c, [60, 0, 1_000], [0, 0, 0]).await;
        assert_eq!(rate(&mut c, [60, 100, 0], [0, 0, 0]).await.0, 60);
        // tpm: 300 tokens used beyond a lease are charged whatever the room.
        rate(&mut c, [0, 0, 0], [1_000, 0, -300]).await;
        assert_eq!(rate(&mut c, [0, 0, 0], [1_000, 1_000, 0]).await.1, 700);
        rate(&mut c, [0, 0, 0], [1_000, 0, -50]).await;
        assert_eq!(rate(&mut c, [0, 0, 0], [1_000, 10, 0]).await.1, 0);
    }
}
