//! The live rate-limit state (SPEC §7): one token bucket for rpm, one for tpm and an in-flight
//! count per key and per account, and the [`LimitHold`] a call keeps while it runs.
//!
//! Lock-free on the request path: a scope's state is found in a sharded map on the first call of
//! a compiled key or account and then kept with it (`super::handles`), as its quota counter is;
//! then compare-and-swap on its atomics. The state outlives table reloads (it is keyed
//! by counter id, and a bucket reads its limit from the current table on every call).
//!
//! On the shared ledger (Redis) rpm and tpm are taken from a lease instead: tokens this gateway
//! took from the scope's bucket in Redis ahead of use (see `lease::rates`); the local buckets
//! then only mirror the Redis bucket for the headers. A concurrency slot is taken from the
//! lease's spare slots as well (after the local count, which still caps this gateway alone)
//! and goes back to them when the call ends.

use super::lease::slot::{spare_slots, LeaseTake, RateSlot, SpareSlots, CONC, RPM, TPM};
use super::{handles, IdMap};
use crate::core::accounts::{LedgerCell, ACCOUNT_TAG, BUDGET_TAG};
use crate::core::limits::{
    retry_after_secs, Bucket, GoDuration, HeaderText, Limits, Take, WINDOW_NS,
};
use arrayvec::ArrayVec;
use http::HeaderName;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Nanoseconds on this process's monotonic clock (the buckets' time scale).
pub fn mono_ns() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    // Offset so that 0 ("full") is always in the past.
    i64::try_from(start.elapsed().as_nanos()).unwrap_or(i64::MAX) + WINDOW_NS
}

/// Whose limits: a key's or an account's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A key.
    Key = 0,
    /// An account.
    Account = 1,
}

impl Scope {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Account => "account",
        }
    }
}

/// One scope's live state.
#[derive(Debug, Default)]
pub struct ScopeLive {
    pub(crate) rpm: Bucket,
    pub(crate) tpm: Bucket,
    inflight: AtomicI64,
    /// Its lease on the scope's rpm and tpm buckets and concurrency slots in Redis (shared
    /// ledger only).
    pub(crate) lease: RateSlot,
}

impl ScopeLive {
    /// Calls in flight.
    pub fn inflight(&self) -> i64 {
        self.inflight.load(Ordering::Acquire)
    }
    /// Requests left and ns until full, at `now` (with what this gateway's lease holds).
    pub fn requests(&self, limit: u32, now: i64) -> (u64, i64) {
        let (left, reset) = self.rpm.state(limit, now);
        ((left + self.lease.held(RPM)).min(u64::from(limit)), reset)
    }
    /// Tokens left and ns until full, at `now` (with what this gateway's lease holds).
    pub fn tokens(&self, limit: u32, now: i64) -> (u64, i64) {
        let (left, reset) = self.tpm.state(limit, now);
        ((left + self.lease.held(TPM)).min(u64::from(limit)), reset)
    }
}

#[derive(Debug, Default)]
struct BookShared {
    scopes: IdMap<Arc<ScopeLive>>,
}

/// Every scope's live state. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct LimitBook {
    shared: Arc<BookShared>,
}

/// Why the limits refuse a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitRefusal {
    /// rpm reached; ns until a request is free.
    Requests(Scope, i64),
    /// tpm reached; ns until the tokens are free.
    Tokens(Scope, i64),
    /// The call's own estimate exceeds the tpm limit: retrying cannot help.
    TokensNever(Scope, u32),
    /// The concurrency limit is reached.
    Concurrency(Scope),
    /// The shared ledger cannot be reached and `on_unavailable` does not admit.
    Unavailable(Scope),
}

/// Why [`LimitBook::admit_leased`] did not admit.
pub(crate) enum Refused {
    /// A refusal.
    No(LimitRefusal),
    /// The lease of the scope at this index is short of this kind ([`RPM`], [`TPM`] or
    /// [`CONC`]): refill it and try again.
    Short(usize, usize),
}

/// The most scopes one call is limited in: its key and the key's account.
pub const MAX_SCOPES: usize = 2;

/// The scopes of one call, key first (on the stack).
pub type Scopes<'a> = ArrayVec<ScopeLimits<'a>, MAX_SCOPES>;

/// A scope to check: its counter id, kind and limits.
#[derive(Clone, Copy, Debug)]
pub struct ScopeLimits<'a> {
    /// Key id or account counter id.
    pub id: u64,
    /// Key or account.
    pub scope: Scope,
    /// Its limits.
    pub limits: Limits,
    /// Where its live state is kept once found (a compiled key's or account's): later calls
    /// take it from there, not from the book's map. Not used on the shared ledger.
    pub cell: Option<&'a LedgerCell>,
}

pub(crate) struct Part {
    pub(crate) id: u64,
    pub(crate) live: Arc<ScopeLive>,
    scope: Scope,
    pub(crate) limits: Limits,
    /// rpm and tpm come from the lease (shared ledger), not the local buckets.
    shared: bool,
    slot: bool,
    /// The concurrency slot came from the lease's spare slots (shared ledger).
    leased_slot: bool,
    rpm: bool,
    tokens: u64,
}

/// The rate-limit share a call holds: its requests and tokens (corrected at settle) and its
/// concurrency slots, released exactly once when the hold is dropped, on every exit path.
pub struct LimitHold {
    pub(crate) parts: ArrayVec<Part, MAX_SCOPES>,
    /// Told when a leased slot that came back leaves its scope with more spare than it keeps.
    spare: Option<Arc<dyn SpareSlots>>,
}

impl std::fmt::Debug for LimitHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LimitHold({} scopes)", self.parts.len())
    }
}

impl LimitBook {
    /// An empty book.
    pub fn new() -> LimitBook {
        LimitBook::default()
    }

    /// The live state of counter id `id` (created on first use).
    pub fn scope(&self, id: u64) -> Arc<ScopeLive> {
        if let Some(s) = self.shared.scopes.get(&id) {
            return s.clone();
        }
        self.shared.scopes.entry(id).or_default().clone()
    }

    /// The live state of `id`, if it was ever used (no insertion, for reads).
    pub fn peek(&self, id: u64) -> Option<Arc<ScopeLive>> {
        self.shared.scopes.get(&id).map(|s| s.clone())
    }

    /// Calls in flight holding a slot of a scope of this kind (`keygate_limit_inflight`).
    pub fn inflight(&self, scope: Scope) -> i64 {
        self.inflight_by_scope()[scope as usize]
    }

    /// Calls in flight holding a slot of a key's and of an account's scope, indexed by
    /// [`Scope`]: summed over the scopes when asked (a scrape, one pass over every scope) rather
    /// than kept in two counters that every call with a concurrency limit wrote twice. An
    /// account's scope is told by its id's tag ([`ACCOUNT_TAG`]), as the ledger tells its
    /// counters apart.
    pub fn inflight_by_scope(&self) -> [i64; 2] {
        let mut sum = [0; 2];
        for e in self.shared.scopes.iter() {
            let account = (ACCOUNT_TAG..BUDGET_TAG).contains(e.key());
            sum[usize::from(account)] += e.value().inflight();
        }
        sum
    }

    /// The rate-limit headers of `scopes` at `now`, nothing taken (nor added to the book: a
    /// scope this process never used is stated full).
    pub fn rate_headers(&self, scopes: &Scopes<'_>, now: i64) -> RateHeaders {
        let unused = ScopeLive::default();
        let live: ArrayVec<_, MAX_SCOPES> =
            scopes.iter().map(|s| (self.peek(s.id), s.limits)).collect();
        RateHeaders::of(
            live.iter()
                .map(|(l, s)| (l.as_deref().unwrap_or(&unused), *s)),
            now,
        )
    }

    /// Take one request, `tokens` tokens and a concurrency slot in every scope, or none of
    /// them. `now` is [`mono_ns`] (a test passes its own).
    pub fn admit(
        &self,
        scopes: &Scopes<'_>,
        tokens: u64,
        now: i64,
    ) -> Result<LimitHold, LimitRefusal> {
        let mut slot = None;
        self.admit_into(scopes, tokens, now, &mut slot)?;
        Ok(slot.unwrap_or_else(LimitHold::none))
    }

    /// [`LimitBook::admit`], building the hold in `slot` (not moved while its scopes are taken,
    /// nor after: a call keeps it where it was built). A refusal leaves `slot` empty, with
    /// everything taken so far given back.
    pub fn admit_into(
        &self,
        scopes: &Scopes<'_>,
        tokens: u64,
        now: i64,
        slot: &mut Option<LimitHold>,
    ) -> Result<(), LimitRefusal> {
        debug_assert!(slot.is_none(), "a hold in the slot");
        for s in scopes {
            if let Some(tpm) = s.limits.tpm {
                if tokens > u64::from(tpm) {
                    return Err(LimitRefusal::TokensNever(s.scope, tpm));
                }
            }
        }
        let hold = slot.insert(LimitHold::none());
        for s in scopes.iter().filter(|s| !s.limits.is_empty()) {
            let live = handles::kept(s.cell, &self.shared, s.id, |id| self.scope(id));
            // In the hold before anything is taken, so that a refusal gives back what was.
            hold.parts.push(Part::new(s, live, false));
            let taken = match hold.parts.last_mut() {
                Some(part) => part.take_slot().and_then(|()| part.take_local(tokens, now)),
                None => Ok(()),
            };
            if let Err(r) = taken {
                hold.cancel(now);
                *slot = None;
                return Err(r);
            }
        }
        Ok(())
    }

    /// [`LimitBook::admit`] on the shared ledger: rpm, tpm and concurrency slots from the
    /// scopes' leases (the same steps; kept apart so that the local path stays as it was).
    /// `spare` is told when a slot that came back leaves too many spare.
    pub(crate) fn admit_leased(
        &self,
        scopes: &Scopes<'_>,
        tokens: u64,
        now: i64,
        spare: &Arc<dyn SpareSlots>,
    ) -> Result<LimitHold, Refused> {
        for s in scopes {
            if let Some(tpm) = s.limits.tpm {
                if tokens > u64::from(tpm) {
                    return Err(Refused::No(LimitRefusal::TokensNever(s.scope, tpm)));
                }
            }
        }
        let mut hold = LimitHold {
            parts: ArrayVec::new(),
            spare: Some(spare.clone()),
        };
        for (i, s) in scopes.iter().enumerate() {
            if s.limits.is_empty() {
                continue;
            }
            let mut part = Part::new(s, self.scope(s.id), true);
            let refused = part
                .take_slot()
                .map_err(Refused::No)
                .and_then(|()| part.take_lease(i, tokens, now));
            hold.parts.push(part);
            if let Err(r) = refused {
                hold.cancel(now);
                return Err(r);
            }
        }
        Ok(hold)
    }
}

impl Part {
    /// Scope `s`'s share of a call, nothing taken yet; `shared`: rpm and tpm from its lease.
    #[inline]
    fn new(s: &ScopeLimits<'_>, live: Arc<ScopeLive>, shared: bool) -> Part {
        Part {
            id: s.id,
            live,
            scope: s.scope,
            limits: s.limits,
            shared,
            slot: false,
            leased_slot: false,
            rpm: false,
            tokens: 0,
        }
    }

    #[inline]
    fn take_slot(&mut self) -> Result<(), LimitRefusal> {
        if let Some(max) = self.limits.concurrency {
            let max = i64::from(max);
            self.live
                .inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .map_err(|_| LimitRefusal::Concurrency(self.scope))?;
            self.slot = true;
        }
        Ok(())
    }

    /// rpm, tpm and a concurrency slot from the scope's lease (shared ledger).
    fn take_lease(&mut self, i: usize, tokens: u64, now: i64) -> Result<(), Refused> {
        let lease = &self.live.lease;
        if self.slot {
            // A slot is never "empty until": one may come back any moment, here or elsewhere.
            match lease.take(CONC, 1, now) {
                LeaseTake::Ok => self.leased_slot = true,
                _ => return Err(Refused::Short(i, CONC)),
            }
        }
        if self.limits.rpm.is_some() {
            match lease.take(RPM, 1, now) {
                LeaseTake::Ok => self.rpm = true,
                LeaseTake::Wait(ns) => {
                    return Err(Refused::No(LimitRefusal::Requests(self.scope, ns)))
                }
                LeaseTake::Short => return Err(Refused::Short(i, RPM)),
            }
        }
        if self.limits.tpm.is_some() {
            match lease.take(TPM, tokens, now) {
                LeaseTake::Ok => self.tokens = tokens,
                LeaseTake::Wait(ns) => {
                    return Err(Refused::No(LimitRefusal::Tokens(self.scope, ns)))
                }
                LeaseTake::Short => return Err(Refused::Short(i, TPM)),
            }
        }
        Ok(())
    }

    #[inline]
    fn take_local(&mut self, tokens: u64, now: i64) -> Result<(), LimitRefusal> {
        if let Some(rpm) = self.limits.rpm {
            match self.live.rpm.take(rpm, 1, now) {
                Take::Ok => self.rpm = true,
                Take::Wait(ns) => return Err(LimitRefusal::Requests(self.scope, ns)),
                Take::Never => return Err(LimitRefusal::Requests(self.scope, WINDOW_NS)),
            }
        }
        if let Some(tpm) = self.limits.tpm {
            match self.live.tpm.take(tpm, tokens, now) {
                Take::Ok => self.tokens = tokens,
                Take::Wait(ns) => return Err(LimitRefusal::Tokens(self.scope, ns)),
                Take::Never => return Err(LimitRefusal::TokensNever(self.scope, tpm)),
            }
        }
        Ok(())
    }
}

impl LimitHold {
    /// A hold of nothing.
    fn none() -> LimitHold {
        LimitHold {
            parts: ArrayVec::new(),
            spare: None,
        }
    }

    /// The call used `actual` tokens: correct every tpm bucket by the difference.
    pub fn settle_tokens(&mut self, actual: u64, now: i64) {
        for p in &mut self.parts {
            if let Some(tpm) = p.limits.tpm {
                let delta = i64::try_from(actual).unwrap_or(i64::MAX)
                    - i64::try_from(p.tokens).unwrap_or(i64::MAX);
                if p.shared {
                    // A lease below zero is reported to Redis as tokens used beyond it.
                    p.live.lease.give(TPM, -delta);
                } else {
                    p.live.tpm.adjust(tpm, delta, now);
                }
                p.tokens = actual;
            }
        }
    }

    /// The call was not made (a later check refused it): give back its request and tokens.
    /// Its slots are released when the hold drops.
    pub fn cancel(&mut self, now: i64) {
        for p in &mut self.parts {
            let t = i64::try_from(p.tokens).unwrap_or(i64::MAX);
            if let (Some(rpm), true) = (p.limits.rpm, p.rpm) {
                if p.shared {
                    p.live.lease.give(RPM, 1);
                } else {
                    p.live.rpm.adjust(rpm, -1, now);
                }
                p.rpm = false;
            }
            if let Some(tpm) = p.limits.tpm {
                if p.shared {
                    p.live.lease.give(TPM, t);
                } else {
                    p.live.tpm.adjust(tpm, -t, now);
                }
                p.tokens = 0;
            }
        }
    }

    /// The rate-limit headers (the tightest scope for requests and for tokens), at `now`, as
    /// numbers: they are written with the answer.
    pub fn rate_headers(&self, now: i64) -> RateHeaders {
        RateHeaders::of(self.parts.iter().map(|p| (&*p.live, p.limits)), now)
    }
}

impl Drop for LimitHold {
    fn drop(&mut self) {
        for p in &mut self.parts {
            if std::mem::take(&mut p.slot) {
                p.live.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            if std::mem::take(&mut p.leased_slot) {
                let keep = spare_slots(p.limits.concurrency.unwrap_or(0));
                if p.live.lease.release(keep) {
                    if let Some(s) = &self.spare {
                        s.spare(p.id);
                    }
                }
            }
        }
    }
}

/// The numbers the rate-limit headers state (OpenAI's `x-ratelimit-*`, the IETF draft's
/// `RateLimit-Policy` / `RateLimit`: for requests and for tokens, the scope with the fewest
/// left), taken at admission or refusal: a call in flight keeps these (32 bytes) rather
/// than the eight header strings (about 600 bytes on the heap), and they are written when the
/// answer is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateHeaders {
    /// The tightest scope's (limit, left, ns until full) for requests, then for tokens (32
    /// bytes: a refusal carries them too, and stays small).
    kinds: [Option<Kind>; 2],
}

const _: () = assert!(std::mem::size_of::<RateHeaders>() == 32);

impl RateHeaders {
    /// The tightest of `scopes` for requests and for tokens, at `now`.
    pub fn of<'a>(
        scopes: impl Iterator<Item = (&'a ScopeLive, Limits)> + Clone,
        now: i64,
    ) -> RateHeaders {
        let tightest = |tpm: bool| {
            scopes
                .clone()
                .filter_map(|(live, l)| {
                    let limit = if tpm { l.tpm } else { l.rpm }?;
                    let (left, reset) = if tpm {
                        live.tokens(limit, now)
                    } else {
                        live.requests(limit, now)
                    };
                    // A limit is at least 1 (the sync file's check), and what is left of it
                    // is at most the limit.
                    let left = u32::try_from(left).unwrap_or(limit);
                    Some((NonZeroU32::new(limit)?, left, reset))
                })
                .min_by_key(|&(_, left, _)| left)
        };
        RateHeaders {
            kinds: [tightest(false), tightest(true)],
        }
    }

    /// No limit of either kind: no headers.
    pub fn is_empty(&self) -> bool {
        self.kinds.iter().all(Option::is_none)
    }

    /// How many headers [`RateHeaders::each`] hands out: three per kind with a limit, and the
    /// two IETF fields.
    pub fn count(&self) -> usize {
        match self.kinds.iter().flatten().count() {
            0 => 0,
            kinds => 3 * kinds + 2,
        }
    }

    /// Hand each header to `put`, in order: the three `x-ratelimit-*` of requests, of tokens,
    /// then `ratelimit-policy` and `ratelimit`.
    pub fn each<E>(
        &self,
        mut put: impl FnMut(&'static HeaderName, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.is_empty() {
            return Ok(());
        }
        let mut v = HeaderText::default();
        for (&(_, [l, r, t]), &(limit, left, reset)) in RATE_NAMES
            .iter()
            .zip(&self.kinds)
            .filter_map(|(n, k)| Some((n, k.as_ref()?)))
        {
            put(l, v.clear().num(limit.get()).as_bytes())?;
            put(r, v.clear().num(left).as_bytes())?;
            GoDuration(reset).write_to(v.clear());
            put(t, v.as_bytes())?;
        }
        // `"requests";q=60;w=60, "tokens";q=1000;w=60`
        v.clear();
        for (i, (name, (limit, _, _))) in self.present().enumerate() {
            if i > 0 {
                v.text(", ");
            }
            v.text("\"")
                .text(name)
                .text("\";q=")
                .num(limit.get())
                .text(";w=60");
        }
        put(&RATELIMIT_POLICY, v.as_bytes())?;
        // `"requests";r=59;t=1`: seconds until full, at most the window.
        v.clear();
        for (i, (name, (_, left, reset))) in self.present().enumerate() {
            let secs = retry_after_secs(reset).min(60) * u64::from(reset > 0);
            if i > 0 {
                v.text(", ");
            }
            v.text("\"")
                .text(name)
                .text("\";r=")
                .num(left)
                .text(";t=")
                .num(secs);
        }
        put(&RATELIMIT, v.as_bytes())
    }

    /// The kinds with a limit: (its name in the IETF fields, its numbers), requests first.
    fn present(&self) -> impl Iterator<Item = (&'static str, Kind)> + '_ {
        RATE_NAMES
            .iter()
            .zip(&self.kinds)
            .filter_map(|(&(name, _), k)| Some((name, *k.as_ref()?)))
    }

    /// The headers as (name, value) pairs, for the tests to read.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(self.count());
        let _ = self.each(|name, value| {
            out.push((name.as_str(), String::from_utf8_lossy(value).into_owned()));
            Ok::<(), ()>(())
        });
        out
    }
}

/// One kind's numbers in the headers: its limit, what is left, ns until full.
type Kind = (NonZeroU32, u32, i64);

/// The OpenAI headers' names for requests and for tokens: limit, remaining, reset.
static RATE_NAMES: [(&str, [&HeaderName; 3]); 2] = [
    (
        "requests",
        [&LIMIT_REQUESTS, &REMAINING_REQUESTS, &RESET_REQUESTS],
    ),
    ("tokens", [&LIMIT_TOKENS, &REMAINING_TOKENS, &RESET_TOKENS]),
];
static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn on<'a>(scopes: &[ScopeLimits<'a>]) -> Scopes<'a> {
        scopes.iter().copied().collect()
    }

    fn scope(
        id: u64,
        scope: Scope,
        rpm: Option<u32>,
        tpm: Option<u32>,
        c: Option<u32>,
    ) -> ScopeLimits<'static> {
        ScopeLimits {
            id,
            scope,
            limits: Limits {
                rpm,
                tpm,
                concurrency: c,
            },
            cell: None,
        }
    }

    #[test]
    fn both_scopes_or_neither() {
        let book = LimitBook::new();
        let now = 10 * S;
        let key = scope(1, Scope::Key, Some(100), None, Some(5));
        let acct = scope(ACCOUNT_TAG | 2, Scope::Account, Some(2), None, Some(3));
        let a = book.admit(&on(&[key, acct]), 0, now).unwrap();
        let _b = book.admit(&on(&[key, acct]), 0, now).unwrap();
        // The account's rpm is spent: the key's request and slot are given back.
        assert!(matches!(
            book.admit(&on(&[key, acct]), 0, now),
            Err(LimitRefusal::Requests(Scope::Account, _))
        ));
        assert_eq!(book.scope(1).requests(100, now).0, 98);
        assert_eq!(book.scope(1).inflight(), 2);
        assert_eq!(book.inflight(Scope::Key), 2);
        assert_eq!(book.inflight(Scope::Account), 2);
        drop(a);
        assert_eq!(book.scope(1).inflight(), 1);
        assert_eq!(book.inflight(Scope::Account), 1);
    }

    #[test]
    fn concurrency_slots_come_back_on_drop() {
        let book = LimitBook::new();
        let key = scope(1, Scope::Key, None, None, Some(2));
        let a = book.admit(&on(&[key]), 0, 0).unwrap();
        let b = book.admit(&on(&[key]), 0, 0).unwrap();
        assert_eq!(
            book.admit(&on(&[key]), 0, 0).unwrap_err(),
            LimitRefusal::Concurrency(Scope::Key)
        );
        drop((a, b));
        assert_eq!(book.inflight(Scope::Key), 0);
        assert!(book.admit(&on(&[key]), 0, 0).is_ok());
    }

    #[test]
    fn an_estimate_above_tpm_can_never_pass() {
        let book = LimitBook::new();
        let key = scope(1, Scope::Key, None, Some(100), None);
        assert_eq!(
            book.admit(&on(&[key]), 101, 0).unwrap_err(),
            LimitRefusal::TokensNever(Scope::Key, 100)
        );
        let mut h = book.admit(&on(&[key]), 80, S).unwrap();
        h.settle_tokens(30, S);
        assert_eq!(book.scope(1).tokens(100, S).0, 70);
        let hdr = h.rate_headers(S).to_vec();
        assert!(
            hdr.contains(&("x-ratelimit-remaining-tokens", "70".into())),
            "{hdr:?}"
        );
        assert!(hdr.contains(&("ratelimit-policy", "\"tokens\";q=100;w=60".into())));
    }

    /// Both kinds limited: the eight headers in order, with the tightest scope's numbers, and
    /// `count` says how many `each` hands out for none, one or both kinds.
    #[test]
    fn the_headers_of_both_kinds_in_order_and_their_count() {
        let book = LimitBook::new();
        let key = scope(1, Scope::Key, Some(60), Some(1000), None);
        let account = scope(2, Scope::Account, Some(10), None, None);
        let h = book.admit(&on(&[key, account]), 250, S).unwrap();
        let rate = h.rate_headers(S);
        let want: Vec<(&str, String)> = [
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-requests", "9"),
            ("x-ratelimit-reset-requests", "6s"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "750"),
            ("x-ratelimit-reset-tokens", "15s"),
            (
                "ratelimit-policy",
                "\"requests\";q=10;w=60, \"tokens\";q=1000;w=60",
            ),
            ("ratelimit", "\"requests\";r=9;t=6, \"tokens\";r=750;t=15"),
        ]
        .iter()
        .map(|&(n, v)| (n, v.to_string()))
        .collect();
        assert_eq!(rate.to_vec(), want);
        assert_eq!(rate.count(), 8);
        let only_tokens = book
            .admit(&on(&[scope(3, Scope::Key, None, Some(100), None)]), 1, S)
            .unwrap()
            .rate_headers(S);
        assert_eq!(only_tokens.count(), 5);
        assert_eq!(only_tokens.to_vec().len(), 5);
        assert_eq!(RateHeaders::default().count(), 0);
        assert!(RateHeaders::default().to_vec().is_empty());
    }

    /// The largest numbers the headers can state are written whole (the values are built in
    /// a fixed 128 bytes).
    #[test]
    fn the_largest_values_are_written_whole() {
        let most = Some((NonZeroU32::MAX, u32::MAX, i64::MAX));
        let rate = RateHeaders { kinds: [most; 2] };
        let all = rate.to_vec();
        assert_eq!(
            all[2],
            ("x-ratelimit-reset-requests", "2562047h47m16.855s".into())
        );
        assert_eq!(
            all[6].1,
            "\"requests\";q=4294967295;w=60, \"tokens\";q=4294967295;w=60"
        );
        assert_eq!(
            all[7].1,
            "\"requests\";r=4294967295;t=60, \"tokens\";r=4294967295;t=60"
        );
    }

    /// A scope's state kept in a record's cell serves only the book it came from, for its id:
    /// a table used with a second book, or a scope of another id, takes the right slot.
    #[test]
    fn a_kept_scope_serves_only_its_own_book_and_id() {
        let cell = LedgerCell::default();
        let (first, second) = (LimitBook::new(), LimitBook::new());
        let key = |id| ScopeLimits {
            cell: Some(&cell),
            ..scope(id, Scope::Key, None, None, Some(1))
        };
        let _a = first.admit(&on(&[key(1)]), 0, 0).unwrap();
        let _b = second.admit(&on(&[key(1)]), 0, 0).unwrap();
        let _c = first.admit(&on(&[key(2)]), 0, 0).unwrap();
        let inflight = |book: &LimitBook, id| book.peek(id).map(|s| s.inflight());
        assert_eq!(
            (
                inflight(&first, 1),
                inflight(&second, 1),
                inflight(&first, 2)
            ),
            (Some(1), Some(1), Some(1))
        );
        assert_eq!(
            first.admit(&on(&[key(1)]), 0, 0).unwrap_err(),
            LimitRefusal::Concurrency(Scope::Key)
        );
    }
}
