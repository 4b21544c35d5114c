//! One reservation over several counters (SPEC §7): a key's, its account's and their budget
//! periods'. Taken in order, both-or-neither: when one counter refuses, the ones already taken
//! are refunded before the refusal is returned. Settled and refunded together, exactly once.
//!
//! Each part is one atomic read-modify-write, so no counter ever passes its limit. While a
//! call that is about to be refused still holds its first parts, a concurrent call may see that
//! room as taken and be refused too: the joint step errs on the side of refusing, never of
//! overspending.
//!
//! A settle can report what it did to each counter ([`Reservation::settle_observed`]): the
//! alerts (SPEC §7) look for thresholds in it.

use super::{Ledger, Reservation, ReserveError, MAX_AMOUNT};
use std::sync::atomic::{AtomicI64, Ordering};

/// One counter of a joint reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Counter id (key id, account or budget-period counter id).
    pub id: u64,
    /// What the counter may commit in total; `None` = no cap.
    pub limit: Option<i64>,
    /// When the counter may be dropped, in unix seconds (a budget period's counter, once no
    /// window reads it: [`crate::core::budget::Window::until`]); 0: never (lifetime counters).
    pub until: i64,
}

impl Part {
    /// A counter kept for ever (a key's or an account's lifetime quota).
    pub const fn lifetime(id: u64, limit: Option<i64>) -> Part {
        Part {
            id,
            limit,
            until: 0,
        }
    }
}

impl Ledger {
    /// Reserve `amount` on every part, or on none: the error says which part refused (its
    /// index) and why. The returned reservation settles every part with the same actual.
    pub async fn reserve_all(
        &self,
        parts: &[Part],
        amount: i64,
    ) -> Result<Reservation, (usize, ReserveError)> {
        let mut first: Option<Reservation> = None;
        for (i, p) in parts.iter().enumerate() {
            // Dropping `first` on the error path refunds every part taken so far.
            let r = self.reserve_part(*p, amount).await.map_err(|e| (i, e))?;
            match first.as_mut() {
                None => first = Some(r),
                Some(f) => f.also.push(r),
            }
        }
        first.ok_or((0, ReserveError::Insufficient { remaining: 0 }))
    }
}

/// Record a part's `until` on its counter (`cell`): a plain load on the request path, a store
/// only when it changes (a new counter, a budget whose kind changed, a counter from a ledger
/// written before counters had one). Lifetime parts (0) leave it alone.
#[inline]
pub(super) fn note_until(cell: &AtomicI64, until: i64) {
    if until != 0 && cell.load(Ordering::Relaxed) != until {
        cell.store(until, Ordering::Relaxed);
    }
}

/// What a settle did to one counter: its settled value before and after the charge. Each
/// charge is one atomic add, so concurrent settles of a counter see disjoint intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charged {
    /// The part's place in the reservation (0: the first part reserved).
    pub index: usize,
    /// The counter id.
    pub id: u64,
    /// What the counter could commit in total when the call was reserved (`None` = no cap).
    pub limit: Option<i64>,
    /// Settled units before the charge.
    pub before: i64,
    /// Settled units after it.
    pub after: i64,
}

impl Reservation {
    /// [`Reservation::settle`], telling `seen` what the charge did to each counter (in the
    /// order they were reserved: the first part, then the others of [`Ledger::reserve_all`]).
    /// Counters of a shared ledger (Redis) are not reported: their settled value is not
    /// known here.
    pub fn settle_observed(mut self, actual: i64, seen: &mut dyn FnMut(Charged)) {
        let actual = actual.clamp(0, MAX_AMOUNT);
        self.done = true;
        let mut report = |index: usize, r: &Reservation, before: Option<(u64, i64)>| {
            if let Some((id, before)) = before.filter(|_| actual > 0) {
                seen(Charged {
                    index,
                    id,
                    limit: r.limit,
                    before,
                    after: before.saturating_add(actual),
                });
            }
        };
        let first = self.charge(actual);
        report(0, &self, first);
        for (i, mut other) in self.also.drain(..).enumerate() {
            other.done = true;
            let before = other.charge(actual);
            report(i + 1, &other, before);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_parts_or_none_and_settled_together() {
        let l = Ledger::in_memory();
        let key = Part::lifetime(1, None);
        let account = Part::lifetime(2, Some(100));
        let r = l.reserve_all(&[key, account], 60).await.unwrap();
        let err = l.reserve_all(&[key, account], 60).await.unwrap_err();
        assert_eq!(err.0, 1);
        // The refused call's key part was refunded.
        assert_eq!(l.counter(1).committed(), 60);
        r.settle(25);
        assert_eq!((l.consumed(1), l.consumed(2)), (25, 25));
        drop(l.reserve_all(&[key, account], 70).await.unwrap());
        assert_eq!(
            (l.counter(1).committed(), l.counter(2).committed()),
            (25, 25)
        );
        assert_eq!(l.outstanding(), 0);
    }

    #[tokio::test]
    async fn an_observed_settle_reports_each_counter_before_and_after() {
        let l = Ledger::in_memory();
        let parts = [Part::lifetime(1, Some(100)), Part::lifetime(2, None)];
        l.reserve_all(&parts, 10).await.unwrap().settle(30);
        let mut seen = Vec::new();
        l.reserve_all(&parts, 10)
            .await
            .unwrap()
            .settle_observed(25, &mut |c| seen.push(c));
        let c = |index, id, limit, before, after| Charged {
            index,
            id,
            limit,
            before,
            after,
        };
        assert_eq!(
            seen,
            vec![c(0, 1, Some(100), 30, 55), c(1, 2, None, 30, 55)]
        );
        assert_eq!((l.consumed(1), l.consumed(2)), (55, 55));
        assert_eq!(l.outstanding(), 0);
        // A refund charges nothing and reports nothing.
        let mut none = 0;
        l.reserve_all(&parts, 10)
            .await
            .unwrap()
            .settle_observed(0, &mut |_| none += 1);
        assert_eq!((none, l.counter(1).committed()), (0, 55));
    }
}
