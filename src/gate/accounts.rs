//! Admission for a key with an account, rate limits or a budget (SPEC §7): the limits of the
//! key and its account (one [`LimitHold`]), then one joint reservation on the key's, the
//! account's and their budget periods' counters, both-or-neither. On this process's ledger both
//! are built where they stay, in the call's context, by a plain function ([`PolicyCall::admit_here`]):
//! no future, nothing moved (the async version moved its ~850-byte state and its results, and
//! those copies were a fifth of the admission's time). `settle.rs` settles them, and dropping
//! them releases them.

use super::{Gate, GateCtx};
use crate::core::accounts::{budget_ledger_id, Account, KeyPolicy};
use crate::core::budget::Budget;
use crate::core::clock::unix_now;
use crate::core::errors::{Denial, Reason};
use crate::core::limits::retry_after_secs;
use crate::core::table::{KeyRecord, KeyTable};
use crate::ledger::limits::{
    mono_ns, LimitBook, LimitHold, LimitRefusal, RateHeaders, Scope, ScopeLimits, Scopes,
};
use crate::ledger::{Behind, Ledger, Part, Parts, Reservation, ReserveError};

/// Whose quota a counter is.
#[derive(Clone, Copy)]
pub(super) enum Owner<'a> {
    Key,
    Account(&'a Account),
}

/// What a part of a call's reservation counts.
#[derive(Clone, Copy)]
pub(super) enum Counter<'a> {
    /// The lifetime quota of the key or its account.
    Quota(Owner<'a>),
    /// A budget period of the key or its account; `scope` is the owner's counter id.
    Budget {
        owner: Owner<'a>,
        budget: &'a Budget,
        scope: u64,
    },
}

/// The counters of `key`'s calls, in the order [`PolicyCall::parts`] reserves them (a test
/// holds the two to one order): the key, its account, the key's budget period, the
/// account's budget period. For a refusal's wording and the alerts, off the request path.
pub(super) fn counters_of<'a>(table: &'a KeyTable, key: &'a KeyRecord) -> [Option<Counter<'a>>; 4] {
    let mut out = [Some(Counter::Quota(Owner::Key)), None, None, None];
    let Some(policy) = key.policy.as_deref() else {
        return out;
    };
    let account = table.account_of(key);
    let budgets = [
        policy.budget.as_ref().map(|b| Counter::Budget {
            owner: Owner::Key,
            budget: b,
            scope: key.id,
        }),
        account.and_then(|a| {
            Some(Counter::Budget {
                owner: Owner::Account(a),
                budget: a.budget.as_ref()?,
                scope: a.ledger_id,
            })
        }),
    ];
    let rest = account
        .map(|a| Counter::Quota(Owner::Account(a)))
        .into_iter()
        .chain(budgets.into_iter().flatten());
    for (slot, c) in out[1..].iter_mut().zip(rest) {
        *slot = Some(c);
    }
    out
}

impl Gate {
    /// Take the limits, then reserve `amount` on every counter the key's call is charged to:
    /// the reservation and the limits' hold are built in the context, where they stay.
    pub(super) async fn reserve_with_policy(
        &self,
        ctx: &mut GateCtx,
        table: &KeyTable,
        key: &KeyRecord,
        amount: i64,
    ) -> Result<(), Denial> {
        let tokens = ctx.estimate.prompt_tokens + ctx.estimate.completion_tokens;
        let now_ns = mono_ns();
        let (ledger, book, now) = (&self.inner.ledger, &self.inner.limits, unix_now());
        let admitted = if ledger.is_shared() {
            // Boxed: this future then stays small on the local path, the common one.
            Box::pin(admit_policy(
                ledger, book, table, key, tokens, amount, now, now_ns,
            ))
            .await
            .map(|(r, hold)| {
                ctx.reservation = Some(r);
                ctx.limit_hold = hold;
            })
        } else {
            let (reservation, hold) = (&mut ctx.reservation, &mut ctx.limit_hold);
            let call = PolicyCall::new(table, key, now);
            match call.admit_here(ledger, book, tokens, amount, now_ns, reservation, hold) {
                Ok(behind) if behind.is_empty() => Ok(()),
                Ok(behind) => {
                    Box::pin(call.until_durable(ledger, behind, amount, now_ns, reservation, hold))
                        .await
                }
                Err(e) => Err(e),
            }
        };
        match admitted {
            Ok(()) => {
                if let Some(h) = &ctx.limit_hold {
                    ctx.rate = h.rate_headers(now_ns);
                }
                Ok(())
            }
            Err((d, rate)) => {
                ctx.rate = rate;
                Err(d)
            }
        }
    }

    /// The rate-limit headers of the call's key as its buckets stand, nothing taken: for an
    /// answer that comes before the limits are taken (the key's model or body refused, a local
    /// answer), so that every answer to a limited key carries them. Empty when the key was not
    /// admitted (unknown, disabled, expired, or refused for its address) or has no rpm or tpm.
    pub(super) fn rate_as_it_stands(&self, ctx: &GateCtx) -> RateHeaders {
        let (Some(table), Some(key)) = (ctx.table.as_deref(), ctx.key_record()) else {
            return RateHeaders::default();
        };
        let Some(policy) = key.policy.as_deref() else {
            return RateHeaders::default();
        };
        let scopes = PolicyCall::new(table, key, unix_now()).scopes(policy);
        self.inner.limits.rate_headers(&scopes, mono_ns())
    }
}

/// A refusal and the rate-limit headers to send with it.
pub type PolicyDenial = (Denial, RateHeaders);

/// The SPEC §7 admission of one call of `key` (which has a policy): the limits of the key and
/// its account for `tokens` tokens, then `amount` units on the key's, the account's and their
/// budget periods' counters, both-or-neither. `now` is unix seconds, `now_ns` [`mono_ns`].
/// On this process's ledger the gate builds both in place ([`PolicyCall::admit_here`]); this one
/// returns them, and serves a shared ledger too.
#[allow(clippy::too_many_arguments)]
pub async fn admit_policy(
    ledger: &Ledger,
    book: &LimitBook,
    table: &KeyTable,
    key: &KeyRecord,
    tokens: u64,
    amount: i64,
    now: i64,
    now_ns: i64,
) -> Result<(Reservation, Option<LimitHold>), PolicyDenial> {
    let call = PolicyCall::new(table, key, now);
    let (mut reservation, mut hold) = (None, None);
    if !ledger.is_shared() {
        let behind = call.admit_here(
            ledger,
            book,
            tokens,
            amount,
            now_ns,
            &mut reservation,
            &mut hold,
        )?;
        if !behind.is_empty() {
            let wait =
                call.until_durable(ledger, behind, amount, now_ns, &mut reservation, &mut hold);
            Box::pin(wait).await?;
        }
        return match reservation {
            Some(r) => Ok((r, hold)),
            None => Err((Denial::new(Reason::InvalidApiKey), RateHeaders::default())),
        };
    }
    let policy = call.policy()?;
    let scopes = call.scopes(policy);
    if !scopes.is_empty() {
        let admitted = match ledger.shared_rates() {
            Some(rates) => book.admit_shared(rates, &scopes, tokens).await,
            None => book.admit(&scopes, tokens, now_ns),
        };
        match admitted {
            Ok(h) => hold = Some(h),
            Err(refusal) => return Err(call.limit_refused(book, &scopes, refusal, now_ns)),
        }
    }
    let parts = call.parts(ledger, policy);
    match ledger.reserve_all(&parts, amount).await {
        Ok(r) => Ok((r, hold)),
        Err((i, e)) => Err(call.quota_refused(i, e, amount, now_ns, &mut hold)),
    }
}

/// One call of a key with a policy, at unix time `now`: what its admission takes, and how a
/// refusal is worded.
pub struct PolicyCall<'a> {
    table: &'a KeyTable,
    key: &'a KeyRecord,
    account: Option<&'a Account>,
    now: i64,
}

impl<'a> PolicyCall<'a> {
    /// The call of `key` (of `table`) at unix time `now`.
    pub fn new(table: &'a KeyTable, key: &'a KeyRecord, now: i64) -> PolicyCall<'a> {
        PolicyCall {
            table,
            key,
            account: table.account_of(key),
            now,
        }
    }

    fn policy(&self) -> Result<&'a KeyPolicy, PolicyDenial> {
        self.key
            .policy
            .as_deref()
            .ok_or_else(|| (Denial::new(Reason::InvalidApiKey), RateHeaders::default()))
    }

    /// The admission on this process's ledger, built in place: the limits' hold in `hold`
    /// (none when neither key nor account has limits), then the joint reservation in
    /// `reservation` (both slots empty when called). Granted, the parts whose durable ceiling
    /// is behind (rare), to wait for with [`PolicyCall::until_durable`] before the call goes
    /// on; refused, both slots are empty and everything taken is given back. No future:
    /// nothing here waits. A shared ledger is refused (503): its calls go through
    /// [`admit_policy`].
    #[allow(clippy::too_many_arguments)]
    pub fn admit_here(
        &self,
        ledger: &Ledger,
        book: &LimitBook,
        tokens: u64,
        amount: i64,
        now_ns: i64,
        reservation: &mut Option<Reservation>,
        hold: &mut Option<LimitHold>,
    ) -> Result<Behind, PolicyDenial> {
        debug_assert!(reservation.is_none() && hold.is_none(), "slots in use");
        let policy = self.policy()?;
        if ledger.is_shared() {
            return Err((
                Denial::new(Reason::QuotaBackendUnavailable),
                RateHeaders::default(),
            ));
        }
        let scopes = self.scopes(policy);
        if !scopes.is_empty() {
            if let Err(refusal) = book.admit_into(&scopes, tokens, now_ns, hold) {
                return Err(self.limit_refused(book, &scopes, refusal, now_ns));
            }
        }
        let parts = self.parts(ledger, policy);
        ledger
            .take_all(&parts, amount, reservation)
            .map_err(|(i, e)| self.quota_refused(i, e, amount, now_ns, hold))
    }

    /// Wait for the parts of the reservation `admit_here` built whose durable ceiling is
    /// `behind` (it stays in its slot meanwhile); when the disk does not keep up, the call is
    /// refused and both slots emptied (everything given back).
    #[allow(clippy::too_many_arguments)]
    pub async fn until_durable(
        &self,
        ledger: &Ledger,
        behind: Behind,
        amount: i64,
        now_ns: i64,
        reservation: &mut Option<Reservation>,
        hold: &mut Option<LimitHold>,
    ) -> Result<(), PolicyDenial> {
        let Some(r) = reservation.as_ref() else {
            return Err((
                Denial::new(Reason::QuotaBackendUnavailable),
                RateHeaders::default(),
            ));
        };
        if let Err((i, e)) = ledger.until_durable(r, behind).await {
            *reservation = None;
            return Err(self.quota_refused(i, e, amount, now_ns, hold));
        }
        Ok(())
    }

    /// The scopes whose limits the call takes: the key's, then its account's.
    fn scopes(&self, policy: &'a KeyPolicy) -> Scopes<'a> {
        let mut scopes = Scopes::new();
        if !policy.limits.is_empty() {
            scopes.push(ScopeLimits {
                id: self.key.id,
                scope: Scope::Key,
                limits: policy.limits,
                cell: Some(&policy.live),
            });
        }
        if let Some(a) = self.account.filter(|a| !a.limits.is_empty()) {
            scopes.push(ScopeLimits {
                id: a.ledger_id,
                scope: Scope::Account,
                limits: a.limits,
                cell: Some(&a.live),
            });
        }
        scopes
    }

    /// The counters the call is charged to, in order: the key's, its account's, then the
    /// current budget period of each (at most four).
    fn parts(&self, ledger: &Ledger, policy: &'a KeyPolicy) -> Parts<'a> {
        let key = self.key;
        let mut parts = Parts::new();
        parts.push(Part::lifetime_in(
            key.id,
            (!key.unlimited_quota).then(|| key.quota.saturating_sub(key.used)),
            &policy.counter,
        ));
        if let Some(a) = self.account {
            parts.push(Part::lifetime_in(a.ledger_id, a.quota_limit(), &a.counter));
        }
        for (scope, budget) in self.budgets(policy).into_iter().flatten() {
            let w = budget.window(self.now);
            let earlier: i64 = w
                .earlier
                .iter()
                .map(|&start| ledger.consumed(budget_ledger_id(scope, start)))
                .sum();
            parts.push(Part {
                id: budget_ledger_id(scope, w.current),
                limit: Some(budget.amount.saturating_sub(earlier)),
                until: w.until,
                cell: None,
            });
        }
        parts
    }

    /// The key's budget and its account's, with the scope of their counters.
    fn budgets(&self, policy: &'a KeyPolicy) -> [Option<(u64, &'a Budget)>; 2] {
        [
            policy.budget.as_ref().map(|b| (self.key.id, b)),
            self.account
                .and_then(|a| Some((a.ledger_id, a.budget.as_ref()?))),
        ]
    }

    /// The refusal of a limit, with the headers of the scopes' state.
    fn limit_refused(
        &self,
        book: &LimitBook,
        scopes: &Scopes<'_>,
        refusal: LimitRefusal,
        now_ns: i64,
    ) -> PolicyDenial {
        let headers = book.rate_headers(scopes, now_ns);
        (limit_denial(refusal, self.account.map(|a| &*a.id)), headers)
    }

    /// The refusal of part `i` of the joint reservation; the limits' hold (taken for a call
    /// that is not made) gives its request and tokens back and is released.
    fn quota_refused(
        &self,
        i: usize,
        e: ReserveError,
        amount: i64,
        now_ns: i64,
        hold: &mut Option<LimitHold>,
    ) -> PolicyDenial {
        let headers = hold
            .as_ref()
            .map(|h| h.rate_headers(now_ns))
            .unwrap_or_default();
        if let Some(mut h) = hold.take() {
            h.cancel(now_ns);
        }
        (self.part_denial(i, e, amount), headers)
    }

    /// The refusal of part `i` of [`PolicyCall::parts`] (what it stands for is found again
    /// here, only when a call is refused).
    fn part_denial(&self, i: usize, e: ReserveError, amount: i64) -> Denial {
        let counter = counters_of(self.table, self.key)
            .into_iter()
            .flatten()
            .nth(i);
        quota_denial(counter, e, amount, self.now)
    }
}

/// The refusal for a limit.
fn limit_denial(r: LimitRefusal, account: Option<&str>) -> Denial {
    let whose = |s: Scope| match (s, account) {
        (Scope::Account, Some(a)) => format!("the account {a:?}"),
        _ => "this API key".to_string(),
    };
    let d = Reason::RateLimitExceeded;
    match r {
        LimitRefusal::Requests(s, wait) => Denial::with_message(
            d,
            format!(
                "Rate limit reached for requests per minute of {}.",
                whose(s)
            ),
        )
        .kind("requests")
        .retry_after(retry_after_secs(wait)),
        LimitRefusal::Tokens(s, wait) => Denial::with_message(
            d,
            format!("Rate limit reached for tokens per minute of {}.", whose(s)),
        )
        .kind("tokens")
        .retry_after(retry_after_secs(wait)),
        LimitRefusal::TokensNever(s, tpm) => Denial::with_message(
            d,
            format!(
                "This request needs more tokens than the limit of {tpm} tokens per minute of {}; \
                 it can never pass. Ask for fewer tokens (max_tokens).",
                whose(s)
            ),
        )
        .kind("tokens"),
        LimitRefusal::Unavailable(_) => Denial::new(Reason::QuotaBackendUnavailable),
        LimitRefusal::Concurrency(s) => {
            Denial::with_message(d, format!("Too many calls in flight for {}.", whose(s)))
                .kind("concurrency")
                .retry_after(1)
        }
    }
}

/// The refusal for a part of the joint reservation (`counter`: what it counts).
fn quota_denial(counter: Option<Counter<'_>>, e: ReserveError, amount: i64, now: i64) -> Denial {
    let remaining = match e {
        ReserveError::Insufficient { remaining } => remaining.max(0),
        ReserveError::NotDurable | ReserveError::BackendUnavailable => {
            return Denial::new(Reason::QuotaBackendUnavailable)
        }
    };
    match counter {
        Some(Counter::Quota(Owner::Account(a))) => Denial::with_message(
            Reason::InsufficientQuota,
            format!(
                "The account {:?} has {remaining} quota units left; this call needs up to {amount}.",
                a.id
            ),
        ),
        Some(Counter::Budget { owner, budget, .. }) => {
            let whose = match owner {
                Owner::Key => "API key",
                Owner::Account(_) => "account",
            };
            let resets_at = budget.window(now).resets_at;
            Denial::with_message(
                Reason::BudgetExceeded,
                format!(
                    "The {} budget of this {whose} ({} units) is spent: {remaining} left, this \
                     call needs up to {amount}. It resets at unix time {resets_at}.",
                    budget.describe().split(':').next().unwrap_or("period"),
                    budget.amount
                ),
            )
            .retry_after(u64::try_from((resets_at - now).max(1)).unwrap_or(1))
        }
        Some(Counter::Quota(Owner::Key)) | None => Denial::with_message(
            Reason::InsufficientQuota,
            format!("This API key has {remaining} quota units left; this call needs up to {amount}."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::key_digest;

    /// `call.admit_here` of `amount` units and 10 tokens, now, into the slots given.
    fn admit_here(
        call: &PolicyCall<'_>,
        ledger: &Ledger,
        book: &LimitBook,
        amount: i64,
        reservation: &mut Option<Reservation>,
        hold: &mut Option<LimitHold>,
    ) -> Result<Behind, PolicyDenial> {
        call.admit_here(ledger, book, 10, amount, mono_ns(), reservation, hold)
    }

    /// Key 1 (`a`, quota 1,000, rpm 100) in account `acme` (quota 100, limits `account_limits`).
    fn key_in_acme(account_limits: &str) -> KeyTable {
        let json = format!(
            r#"{{"accounts":{{"acme":{{"quota":100,"limits":{account_limits}}}}},
                "keys":[{{"id":1,"key":"a","quota":1000,"account":"acme","limits":{{"rpm":100}}}}]}}"#
        );
        KeyTable::from_json(json.as_bytes(), "t").unwrap()
    }

    /// The cells of a compiled key and account keep the counters and limit state of the ledger
    /// and book that filled them; the same table used with another pair (a test's, a bench's)
    /// charges that pair's own, and both go on counting correctly.
    #[tokio::test]
    async fn one_table_with_two_ledgers_charges_each_its_own_counters() {
        let table = key_in_acme(r#"{"concurrency":1}"#);
        let key = table.lookup(&key_digest(b"a")).unwrap();
        let acme = table.accounts().by_id("acme").unwrap().ledger_id;
        let pairs = [
            (Ledger::in_memory(), LimitBook::new()),
            (Ledger::in_memory(), LimitBook::new()),
        ];
        let admit = |(ledger, book): &(Ledger, LimitBook)| {
            futures_util::FutureExt::now_or_never(admit_policy(
                ledger,
                book,
                &table,
                key,
                10,
                30,
                100,
                mono_ns(),
            ))
            .expect("an in-memory ledger never waits")
        };
        let policy = key.policy.as_deref().unwrap();
        let account = table.account_of(key).unwrap();
        let cells = [
            &policy.counter,
            &policy.live,
            &account.counter,
            &account.live,
        ];
        assert!(cells.iter().all(|c| !c.is_filled()));
        for (i, pair) in pairs.iter().enumerate() {
            let (r, hold) = admit(pair).unwrap();
            // The first call kept what it found (the first pair's).
            assert!(cells.iter().all(|c| c.is_filled()));
            // The account's one slot is held in this book only.
            assert!(admit(pair).is_err());
            r.settle(20 + i as i64);
            drop(hold);
        }
        for (i, (ledger, book)) in pairs.iter().enumerate() {
            let used = 20 + i as i64;
            assert_eq!((ledger.consumed(1), ledger.consumed(acme)), (used, used));
            assert_eq!(book.peek(1).unwrap().requests(100, mono_ns()).0, 99);
            assert_eq!(book.peek(acme).unwrap().inflight(), 0);
        }
        // Room left on the account of the first ledger (80) but not for 90.
        let (ledger, book) = &pairs[0];
        assert!(
            admit_policy(ledger, book, &table, key, 10, 90, 100, mono_ns())
                .await
                .is_err()
        );
    }

    /// Key 1 (`a`) with `key` added to it, and the accounts `accounts` (a JSON object).
    fn one_key(key: &str, accounts: &str) -> KeyTable {
        let json = format!(r#"{{"accounts":{accounts},"keys":[{{"id":1,"key":"a",{key}}}]}}"#);
        KeyTable::from_json(json.as_bytes(), "t").unwrap()
    }

    /// Tables of one key covering where its parts fall: with or without an account, with
    /// either budget, both or none. Each with the part that cannot take 20 units and what
    /// its refusal says.
    fn spent_parts() -> Vec<(KeyTable, Reason, &'static str)> {
        let week = |n| format!(r#""budget":{{"period":"weekly","amount":{n}}}"#);
        let day = |n| format!(r#""budget":{{"period":"daily","amount":{n}}}"#);
        let acme = |quota, budget: &str| format!(r#"{{"acme":{{"quota":{quota}{budget}}}}}"#);
        let in_acme = |quota, budget: &str| format!(r#""quota":{quota},"account":"acme"{budget}"#);
        let with = |b: String| format!(",{b}");
        let (quota, budget) = (Reason::InsufficientQuota, Reason::BudgetExceeded);
        vec![
            (
                one_key(&in_acme(10, &with(week(100))), &acme(100, &with(day(100)))),
                quota,
                "This API key has 10 quota",
            ),
            (
                one_key(&in_acme(100, &with(week(100))), &acme(10, &with(day(100)))),
                quota,
                "The account \"acme\" has 10",
            ),
            (
                one_key(&in_acme(100, &with(week(10))), &acme(100, &with(day(100)))),
                budget,
                "The weekly budget of this API key",
            ),
            (
                one_key(&in_acme(100, &with(week(100))), &acme(100, &with(day(10)))),
                budget,
                "The daily budget of this account",
            ),
            // No account: the key's budget is the second part.
            (
                one_key(&format!(r#""quota":100,{}"#, week(10)), "{}"),
                budget,
                "The weekly budget of this API key",
            ),
            // The account's budget only: the third part.
            (
                one_key(&in_acme(100, ""), &acme(100, &with(day(10)))),
                budget,
                "The daily budget of this account",
            ),
            (
                one_key(&in_acme(100, ""), &acme(10, "")),
                quota,
                "The account \"acme\" has 10",
            ),
        ]
    }

    /// Each part of the joint reservation that refuses is named in the refusal: the key's
    /// quota, its account's, the key's budget, the account's budget (what a part counts is
    /// found again from its index, only when a call is refused), and nothing stays taken.
    #[tokio::test]
    async fn a_refusal_names_the_part_that_refused() {
        for (table, reason, says) in spent_parts() {
            let key = table.lookup(&key_digest(b"a")).unwrap();
            let (ledger, book) = (Ledger::in_memory(), LimitBook::new());
            let refused = admit_policy(&ledger, &book, &table, key, 10, 20, 100_000, mono_ns())
                .await
                .err()
                .map(|(d, _)| d)
                .expect("refused");
            assert_eq!(refused.reason, reason, "{says}");
            assert!(refused.message.starts_with(says), "{}", refused.message);
            assert_eq!(ledger.outstanding(), 0);
            let parts = PolicyCall::new(&table, key, 100_000)
                .parts(&ledger, key.policy.as_deref().unwrap());
            for p in &parts {
                assert_eq!(ledger.counter(p.id).committed(), 0, "{says}");
            }
        }
    }

    /// Admit a call of `amount` units of key `a` at unix time `now` and settle it at that;
    /// the refusal's reason and `Retry-After` otherwise.
    async fn spend(
        ledger: &Ledger,
        table: &KeyTable,
        amount: i64,
        now: i64,
    ) -> Result<(), (Reason, Option<u64>)> {
        let key = table.lookup(&key_digest(b"a")).unwrap();
        let book = LimitBook::new();
        match admit_policy(ledger, &book, table, key, 1, amount, now, mono_ns()).await {
            Ok((r, _)) => {
                r.settle(amount);
                Ok(())
            }
            Err((d, _)) => Err((d.reason, d.retry_after)),
        }
    }

    /// A spent calendar budget admits again from its period's start in its time zone, with
    /// nothing running in between: the clock is the call's `now`, moved by the test. Each
    /// period has a DST change inside it (Berlin's day of 23 hours, New York's week of 167,
    /// Sydney's month of 30 days and 1 hour), so a boundary taken in UTC or at a fixed offset
    /// falls an hour or more off.
    #[tokio::test]
    async fn a_spent_budget_admits_again_when_its_period_turns_in_its_zone() {
        // (period, zone, a moment inside the period, its end: the next period's start)
        let cases = [
            ("daily", "Europe/Berlin", 1_774_742_400, 1_774_821_600),
            ("weekly", "America/New_York", 1_772_600_000, 1_773_028_800),
            ("monthly", "Australia/Sydney", 1_775_800_000, 1_777_557_600),
        ];
        for (period, zone, inside, end) in cases {
            let table = one_key(
                &format!(
                    r#""quota":1000000,"budget":{{"period":"{period}","amount":100,"timezone":"{zone}"}}"#
                ),
                "{}",
            );
            let ledger = Ledger::in_memory();
            spend(&ledger, &table, 100, inside).await.expect(period);
            assert_eq!(
                spend(&ledger, &table, 1, inside + 1).await,
                Err((Reason::BudgetExceeded, Some((end - inside - 1) as u64))),
                "{period}"
            );
            assert_eq!(
                spend(&ledger, &table, 1, end - 1).await,
                Err((Reason::BudgetExceeded, Some(1))),
                "{period}: a second before {zone}'s period ends"
            );
            spend(&ledger, &table, 100, end)
                .await
                .unwrap_or_else(|e| panic!("{period}: refused at the new period: {e:?}"));
            assert!(
                spend(&ledger, &table, 1, end + 1).await.is_err(),
                "{period}"
            );
        }
    }

    /// A rolling window counts its earlier days: 60 on day 0 and 40 on day 1 fill a 3-day
    /// budget of 100 until day 3, when day 0's 60 drop out.
    #[tokio::test]
    async fn a_rolling_budget_counts_its_earlier_days_until_they_drop_out() {
        let table = one_key(
            r#""quota":1000000,"budget":{"rolling_days":3,"amount":100}"#,
            "{}",
        );
        let ledger = Ledger::in_memory();
        let day = |n: i64| 1_780_000_000 / 86_400 * 86_400 + n * 86_400 + 3_600;
        spend(&ledger, &table, 60, day(0)).await.unwrap();
        spend(&ledger, &table, 40, day(1)).await.unwrap();
        assert_eq!(
            spend(&ledger, &table, 1, day(1)).await.map_err(|e| e.0),
            Err(Reason::BudgetExceeded)
        );
        assert_eq!(
            spend(&ledger, &table, 1, day(2)).await.map_err(|e| e.0),
            Err(Reason::BudgetExceeded),
            "day 0 is still in the window"
        );
        spend(&ledger, &table, 60, day(3))
            .await
            .expect("day 0 dropped out");
        assert_eq!(
            spend(&ledger, &table, 1, day(3)).await.map_err(|e| e.0),
            Err(Reason::BudgetExceeded),
            "day 1's 40 and day 3's 60"
        );
    }

    /// [`PolicyCall::parts`] (the request path) and [`counters_of`] (a refusal's wording, the
    /// alerts) list a call's counters in one order.
    #[test]
    fn the_parts_and_what_they_count_are_in_one_order() {
        let now = 100_000;
        for (table, _, says) in spent_parts() {
            let key = table.lookup(&key_digest(b"a")).unwrap();
            let parts = PolicyCall::new(&table, key, now)
                .parts(&Ledger::in_memory(), key.policy.as_deref().unwrap());
            let counted: Vec<u64> = counters_of(&table, key)
                .into_iter()
                .flatten()
                .map(|c| match c {
                    Counter::Quota(Owner::Key) => key.id,
                    Counter::Quota(Owner::Account(a)) => a.ledger_id,
                    Counter::Budget { budget, scope, .. } => {
                        budget_ledger_id(scope, budget.window(now).current)
                    }
                })
                .collect();
            let ids: Vec<u64> = parts.iter().map(|p| p.id).collect();
            assert_eq!(ids, counted, "{says}");
        }
    }

    /// A call refused by a quota after its limits were taken gives them back: its request
    /// (rpm 1) and its concurrency slot (1) serve the next call, which fits.
    #[tokio::test]
    async fn a_quota_refusal_gives_the_limits_back() {
        let table = one_key(r#""quota":100,"limits":{"rpm":1,"concurrency":1}"#, "{}");
        let key = table.lookup(&key_digest(b"a")).unwrap();
        let (ledger, book) = (Ledger::in_memory(), LimitBook::new());
        let call = PolicyCall::new(&table, key, 100);
        let (mut reservation, mut hold) = (None, None);
        let refused = admit_here(&call, &ledger, &book, 500, &mut reservation, &mut hold);
        assert_eq!(
            refused.err().map(|(d, _)| d.reason),
            Some(Reason::InsufficientQuota)
        );
        assert!(reservation.is_none() && hold.is_none());
        assert_eq!(book.peek(1).unwrap().inflight(), 0);
        admit_here(&call, &ledger, &book, 50, &mut reservation, &mut hold)
            .expect("the request and the slot were given back");
        assert_eq!(book.peek(1).unwrap().inflight(), 1);
        // Now both are taken: the next call is refused by the limits.
        let (mut r2, mut h2) = (None, None);
        assert!(admit_here(&call, &ledger, &book, 50, &mut r2, &mut h2).is_err());
    }

    /// On a persisted ledger a call whose counters' durable ceilings are behind (new counters)
    /// waits for the writer before it is admitted, and is then admitted with every ceiling on
    /// disk; the next call of that size waits for nothing.
    #[tokio::test]
    async fn a_call_waits_for_its_ceilings_on_disk_then_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let book = LimitBook::new();
        let table = key_in_acme(r#"{"concurrency":2}"#);
        let key = table.lookup(&key_digest(b"a")).unwrap();
        let acme = table.accounts().by_id("acme").unwrap().ledger_id;
        let call = PolicyCall::new(&table, key, 100);
        let (mut reservation, mut hold) = (None, None);
        let behind = admit_here(&call, &ledger, &book, 50, &mut reservation, &mut hold).unwrap();
        assert_eq!(behind.len(), 2, "the key's and the account's new counters");
        assert!(reservation.is_some() && hold.is_some());
        call.until_durable(&ledger, behind, 50, mono_ns(), &mut reservation, &mut hold)
            .await
            .unwrap();
        assert_eq!(ledger.durable_waits(), 2);
        reservation.take().unwrap().settle(5);
        drop(hold.take());
        let behind = admit_here(&call, &ledger, &book, 50, &mut reservation, &mut hold).unwrap();
        assert!(behind.is_empty());
        drop((reservation.take(), hold.take()));
        assert_eq!((ledger.consumed(1), ledger.consumed(acme)), (5, 5));
        assert_eq!(
            (ledger.outstanding(), book.peek(acme).unwrap().inflight()),
            (0, 0)
        );
        ledger.shutdown().unwrap();
    }

    /// On the shared ledger nothing is kept in the records' cells, not even when Redis is away
    /// and `on_unavailable: allow` admits from this gateway's own buckets: the rate worker
    /// forgets a scope once only it and the book hold it, and a kept reference would pin it.
    #[tokio::test]
    async fn the_shared_ledger_keeps_nothing_in_the_records_cells() {
        use crate::core::config::OnUnavailable;
        use crate::ledger::RedisSettings;
        let table = key_in_acme(r#"{"rpm":100}"#);
        let key = table.lookup(&key_digest(b"a")).unwrap();
        // A port nobody listens on: Redis is away from the first call.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let settings = RedisSettings {
            urls: vec![format!("redis://127.0.0.1:{port}")],
            cluster: false,
            on_unavailable: OnUnavailable::Allow,
            timeout: std::time::Duration::from_millis(200),
            lease_ttl: std::time::Duration::from_secs(30),
        };
        let ledger = Ledger::redis(settings, None).unwrap();
        let book = LimitBook::new();
        let admitted = admit_policy(&ledger, &book, &table, key, 10, 30, 100, mono_ns()).await;
        assert!(admitted.is_ok(), "allow admits while Redis is away");
        let policy = key.policy.as_deref().unwrap();
        let account = table.account_of(key).unwrap();
        assert!(!policy.live.is_filled() && !account.live.is_filled());
        assert!(!policy.counter.is_filled() && !account.counter.is_filled());
    }
}
