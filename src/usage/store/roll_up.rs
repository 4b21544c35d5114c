//! A batch's hourly roll-ups per key, model and account, summed before they are written: both
//! backends' writers add one row per group, not per call.

use super::StoreRow;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// One hour's sums for a key, model and account, added up over a batch.
#[derive(Default)]
pub(super) struct Sums {
    pub requests: i64,
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub quota: i64,
}

/// A group: key id, hour (unix seconds), model, account (`""` for none).
pub(super) type Group<'a> = (u64, i64, Cow<'a, str>, Cow<'a, str>);

/// The roll-ups of `batch`, sorted by key, hour, model and account (the order in which every
/// gateway takes the roll-up rows' locks on PostgreSQL, so two batches never deadlock).
/// `text` is applied to the model and account first: what the backend stores, so that names it
/// stores alike fall in one group.
pub(super) fn roll_up<'a>(
    batch: &[StoreRow<&'a str>],
    text: impl Fn(&'a str) -> Cow<'a, str>,
) -> BTreeMap<Group<'a>, Sums> {
    let mut groups: BTreeMap<Group<'a>, Sums> = BTreeMap::new();
    for r in batch {
        let hour = r.created_at.div_euclid(3600) * 3600;
        let account = text(r.account.unwrap_or(""));
        let s = groups
            .entry((r.key_id, hour, text(r.model), account))
            .or_default();
        s.requests += 1;
        s.errors += i64::from(r.status >= 400);
        s.prompt_tokens = s.prompt_tokens.saturating_add(int(r.prompt_tokens));
        s.completion_tokens = s.completion_tokens.saturating_add(int(r.completion_tokens));
        s.quota = s.quota.saturating_add(r.quota);
    }
    groups
}

/// u64 counts as SQL integers (saturating: neither SQLite nor PostgreSQL has an unsigned type).
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
