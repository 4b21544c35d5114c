//! One reservation over several counters (SPEC §7): a key's, its account's and their budget
//! periods'. Taken in order, both-or-neither: when one counter refuses, the ones already taken
//! are refunded before the refusal is returned. Settled and refunded together, exactly once.
//!
//! Each part is one atomic read-modify-write, so no counter ever passes its limit. While a
//! call that is about to be refused still holds its first parts, a concurrent call may see that
//! room as taken and be refused too: the joint step errs on the side of refusing, never of
//! overspending.

use super::{Ledger, Reservation, ReserveError};

/// One counter of a joint reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Counter id (key id, account or budget-period counter id).
    pub id: u64,
    /// What the counter may commit in total; `None` = no cap.
    pub limit: Option<i64>,
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
            let r = self
                .reserve(p.id, p.limit, amount)
                .await
                .map_err(|e| (i, e))?;
            match first.as_mut() {
                None => first = Some(r),
                Some(f) => f.also.push(r),
            }
        }
        first.ok_or((0, ReserveError::Insufficient { remaining: 0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_parts_or_none_and_settled_together() {
        let l = Ledger::in_memory();
        let key = Part { id: 1, limit: None };
        let account = Part {
            id: 2,
            limit: Some(100),
        };
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
}
