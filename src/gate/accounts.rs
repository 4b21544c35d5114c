//! Admission for a key with an account, rate limits or a budget (SPEC §7): the limits of the
//! key and its account (one [`LimitHold`]), then one joint reservation on the key's, the
//! account's and their budget periods' counters, both-or-neither. The hold and the reservation
//! are kept in the context; `settle.rs` settles them, and dropping them releases them.

use super::{Gate, GateCtx};
use crate::core::accounts::budget_ledger_id;
use crate::core::budget::Budget;
use crate::core::clock::unix_now;
use crate::core::errors::{Denial, Reason};
use crate::core::limits::retry_after_secs;
use crate::core::table::{KeyRecord, KeyTable};
use crate::ledger::limits::{
    self, mono_ns, LimitBook, LimitHold, LimitRefusal, Scope, ScopeLimits, Scopes,
};
use crate::ledger::{Ledger, Part, Parts, Reservation, ReserveError, MAX_PARTS};
use arrayvec::ArrayVec;

/// What a part of the joint reservation stands for, to word its refusal.
enum PartKind<'a> {
    Key,
    Account(&'a str),
    Budget {
        whose: &'static str,
        budget: &'a Budget,
        resets_at: i64,
    },
}

impl Gate {
    /// Take the limits, then reserve `amount` on every counter the key's call is charged to.
    pub(super) async fn reserve_with_policy(
        &self,
        ctx: &mut GateCtx,
        table: &KeyTable,
        key: &KeyRecord,
        amount: i64,
    ) -> Result<Reservation, Denial> {
        let tokens = ctx.estimate.prompt_tokens + ctx.estimate.completion_tokens;
        let now_ns = mono_ns();
        let admitted = admit_policy(
            &self.inner.ledger,
            &self.inner.limits,
            table,
            key,
            tokens,
            amount,
            unix_now(),
            now_ns,
        )
        .await;
        match admitted {
            Ok((r, hold)) => {
                if let Some(h) = &hold {
                    ctx.rate = h.rate_headers(now_ns);
                }
                ctx.limit_hold = hold;
                Ok(r)
            }
            Err((d, headers)) => {
                ctx.headers.extend(headers);
                Err(d)
            }
        }
    }
}

/// A refusal and the rate-limit headers to send with it.
pub type PolicyDenial = (Denial, Vec<(&'static str, String)>);

/// The SPEC §7 admission of one call of `key` (which has a policy): the limits of the key and
/// its account for `tokens` tokens, then `amount` units on the key's, the account's and their
/// budget periods' counters, both-or-neither. `now` is unix seconds, `now_ns` [`mono_ns`].
/// Public for the benches; the gate calls it through `reserve_with_policy`.
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
    let Some(policy) = key.policy.as_deref() else {
        return Err((Denial::new(Reason::InvalidApiKey), Vec::new()));
    };
    let account = table.account_of(key);

    // Key first, then account.
    let mut scopes = Scopes::new();
    if !policy.limits.is_empty() {
        scopes.push(ScopeLimits {
            id: key.id,
            scope: Scope::Key,
            limits: policy.limits,
            cell: Some(&policy.live),
        });
    }
    if let Some(a) = account.filter(|a| !a.limits.is_empty()) {
        scopes.push(ScopeLimits {
            id: a.ledger_id,
            scope: Scope::Account,
            limits: a.limits,
            cell: Some(&a.live),
        });
    }
    let mut hold = None;
    if !scopes.is_empty() {
        // On Redis from leases on the shared buckets (boxed: this call's future then stays
        // small on the local path, which every call moves); else this gateway's own (no await).
        let admitted = match ledger.shared_rates() {
            Some(rates) => Box::pin(book.admit_shared(rates, &scopes, tokens)).await,
            None => book.admit(&scopes, tokens, now_ns),
        };
        match admitted {
            Ok(h) => hold = Some(h),
            Err(refusal) => {
                let live: Vec<_> = scopes
                    .iter()
                    .map(|s| (book.scope(s.id), s.limits))
                    .collect();
                let headers = limits::headers(live.iter().map(|(l, s)| (&**l, *s)), now_ns);
                return Err((limit_denial(refusal, account.map(|a| &*a.id)), headers));
            }
        }
    }

    // At most four parts: the key, its account, and a budget of each.
    let mut parts = Parts::new();
    let mut kinds = ArrayVec::<PartKind, MAX_PARTS>::new();
    let mut push = |part, kind| {
        parts.push(part);
        kinds.push(kind);
    };
    push(
        Part::lifetime_in(
            key.id,
            (!key.unlimited_quota).then(|| key.quota.saturating_sub(key.used)),
            &policy.counter,
        ),
        PartKind::Key,
    );
    if let Some(a) = account {
        push(
            Part::lifetime_in(a.ledger_id, a.quota_limit(), &a.counter),
            PartKind::Account(&a.id),
        );
    }
    let budgets = [
        policy.budget.as_ref().map(|b| (key.id, "API key", b)),
        account.and_then(|a| Some((a.ledger_id, "account", a.budget.as_ref()?))),
    ];
    for (scope, whose, budget) in budgets.into_iter().flatten() {
        let w = budget.window(now);
        let earlier: i64 = w
            .earlier
            .iter()
            .map(|&start| ledger.consumed(budget_ledger_id(scope, start)))
            .sum();
        push(
            Part {
                id: budget_ledger_id(scope, w.current),
                limit: Some(budget.amount.saturating_sub(earlier)),
                until: w.until,
                cell: None,
            },
            PartKind::Budget {
                whose,
                budget,
                resets_at: w.resets_at,
            },
        );
    }

    match ledger.reserve_all(&parts, amount).await {
        Ok(r) => Ok((r, hold)),
        Err((i, e)) => {
            let headers = hold.as_ref().map(|h| h.headers(now_ns)).unwrap_or_default();
            if let Some(h) = hold.as_mut() {
                // The call is not made: its request and tokens go back.
                h.cancel(now_ns);
            }
            Err((quota_denial(kinds.get(i), e, amount, now), headers))
        }
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

/// The refusal for a part of the joint reservation.
fn quota_denial(kind: Option<&PartKind<'_>>, e: ReserveError, amount: i64, now: i64) -> Denial {
    let remaining = match e {
        ReserveError::Insufficient { remaining } => remaining.max(0),
        ReserveError::NotDurable | ReserveError::BackendUnavailable => {
            return Denial::new(Reason::QuotaBackendUnavailable)
        }
    };
    match kind {
        Some(PartKind::Account(id)) => Denial::with_message(
            Reason::InsufficientQuota,
            format!(
                "The account {id:?} has {remaining} quota units left; this call needs up to {amount}."
            ),
        ),
        Some(PartKind::Budget {
            whose,
            budget,
            resets_at,
        }) => Denial::with_message(
            Reason::BudgetExceeded,
            format!(
                "The {} budget of this {whose} ({} units) is spent: {remaining} left, this call \
                 needs up to {amount}. It resets at unix time {resets_at}.",
                budget.describe().split(':').next().unwrap_or("period"),
                budget.amount
            ),
        )
        .retry_after(u64::try_from((resets_at - now).max(1)).unwrap_or(1)),
        _ => Denial::with_message(
            Reason::InsufficientQuota,
            format!("This API key has {remaining} quota units left; this call needs up to {amount}."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::key_digest;

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
