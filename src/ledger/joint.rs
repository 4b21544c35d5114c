//! One reservation over several counters (SPEC §7): a key's, its account's and their budget
//! periods'. Taken in order, both-or-neither: when one counter refuses, the ones already taken
//! are refunded before the refusal is returned. Settled and refunded together, exactly once.
//!
//! Each part is one atomic read-modify-write, so no counter ever passes its limit. While a
//! call that is about to be refused still holds its first parts, a concurrent call may see that
//! room as taken and be refused too: the joint step errs on the side of refusing, never of
//! overspending. On this process's counters every part is taken first and only then are the
//! parts whose durable ceiling is behind waited for (one after another, all within one of the
//! ledger's timeouts), so while a disk stalls the later parts are held during that wait too.
//!
//! A settle can report what it did to each counter ([`Reservation::settle_observed`]): the
//! alerts (SPEC §7) look for thresholds in it.

use super::lease::LeaseLedger;
use super::reservation::{Held, Hold};
use super::{handles, headroom, Ledger, Reservation, ReserveError, MAX_AMOUNT};
use crate::core::accounts::LedgerCell;
use arrayvec::ArrayVec;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// The most counters one reservation holds: a key, its account, and a budget period of each.
pub const MAX_PARTS: usize = 4;

/// The counters of a joint reservation, in the order they are taken (on the stack).
pub type Parts<'a> = ArrayVec<Part<'a>, MAX_PARTS>;

/// One counter of a joint reservation.
#[derive(Clone, Copy, Debug)]
pub struct Part<'a> {
    /// Counter id (key id, account or budget-period counter id).
    pub id: u64,
    /// What the counter may commit in total; `None` = no cap.
    pub limit: Option<i64>,
    /// When the counter may be dropped, in unix seconds (a budget period's counter, once no
    /// window reads it: [`crate::core::budget::Window::until`]); 0: never (lifetime counters).
    pub until: i64,
    /// Where the counter is kept once found (a lifetime counter of a compiled key or account):
    /// later calls take it from there, not from the ledger's map.
    pub cell: Option<&'a LedgerCell>,
}

impl<'a> Part<'a> {
    /// A counter kept for ever (a key's or an account's lifetime quota).
    pub const fn lifetime(id: u64, limit: Option<i64>) -> Part<'a> {
        Part {
            id,
            limit,
            until: 0,
            cell: None,
        }
    }

    /// [`Part::lifetime`], its counter kept in `cell` once found. Only lifetime counters are
    /// kept: a kept counter is never dropped (see `handles`), and a budget period's must be.
    pub const fn lifetime_in(id: u64, limit: Option<i64>, cell: &'a LedgerCell) -> Part<'a> {
        Part {
            id,
            limit,
            until: 0,
            cell: Some(cell),
        }
    }
}

impl Ledger {
    /// Reserve `amount` on every part, or on none: the error says which part refused (its
    /// index) and why. The returned reservation settles every part with the same actual.
    ///
    /// On this process's counters every part is taken without waiting; only a counter whose
    /// durable ceiling is behind (rare: the writer raises ceilings ahead of use) has to wait,
    /// and that wait is boxed, so the future every call moves stays a few words. On a shared
    /// ledger every call goes through a boxed future (one allocation per call).
    pub async fn reserve_all(
        &self,
        parts: &Parts<'_>,
        amount: i64,
    ) -> Result<Reservation, (usize, ReserveError)> {
        if let Some(l) = &self.lease {
            if parts.is_empty() {
                return Err((0, ReserveError::Insufficient { remaining: 0 }));
            }
            return Box::pin(reserve_leased(l, parts, amount.clamp(0, MAX_AMOUNT))).await;
        }
        let mut slot = None;
        let behind = self.take_all(parts, amount, &mut slot)?;
        let Some(r) = slot else {
            unreachable!("take_all fills the slot when it grants")
        };
        if !behind.is_empty() {
            // Dropping `r` on the error path refunds every part.
            Box::pin(self.until_durable(&r, behind)).await?;
        }
        Ok(r)
    }

    /// Whether counters live in a shared ledger (Redis), where reservations go through
    /// [`Ledger::reserve_all`]; else [`Ledger::take_all`] serves without a future.
    #[inline]
    pub fn is_shared(&self) -> bool {
        self.lease.is_some()
    }

    /// Take `amount` on every part from this process's counters (one atomic step each, in
    /// order), building the reservation in `slot` (empty when called; the reservation is not
    /// moved while its parts are taken, and the gate keeps it in that slot). A refusal leaves
    /// `slot` empty, every part taken so far refunded. Granted, it returns the parts whose
    /// durable ceiling does not yet cover what they commit (the writer has been asked): wait
    /// for them with [`Ledger::until_durable`] before the call goes on (rare: the writer
    /// raises ceilings ahead of use). A shared ledger is refused (`BackendUnavailable`): its
    /// reservations go through [`Ledger::reserve_all`].
    pub fn take_all(
        &self,
        parts: &Parts<'_>,
        amount: i64,
        slot: &mut Option<Reservation>,
    ) -> Result<Behind, (usize, ReserveError)> {
        debug_assert!(slot.is_none(), "a reservation in the slot");
        if self.lease.is_some() {
            return Err((0, ReserveError::BackendUnavailable));
        }
        if parts.is_empty() {
            return Err((0, ReserveError::Insufficient { remaining: 0 }));
        }
        let amount = amount.clamp(0, MAX_AMOUNT);
        self.shared
            .outstanding_total
            .fetch_add(1, Ordering::Relaxed);
        let r = slot.insert(Reservation {
            amount,
            done: false,
            hold: Hold::Counters {
                ledger: self.shared.clone(),
                parts: ArrayVec::new(),
            },
        });
        let Hold::Counters { parts: held, .. } = &mut r.hold else {
            unreachable!("built as counters just above")
        };
        let mut behind = Behind::new();
        for (i, p) in parts.iter().enumerate() {
            let counter = handles::kept(p.cell, &self.shared, p.id, |id| self.counter(id));
            note_until(&counter.until, p.until);
            let taken =
                counter
                    .committed
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| match p.limit {
                        Some(l) if cur.saturating_add(amount) > l => None,
                        _ => Some(cur.saturating_add(amount)),
                    });
            let previous = match taken {
                Ok(previous) => previous,
                Err(cur) => {
                    // Dropping the reservation refunds every part taken so far.
                    *slot = None;
                    let remaining = p.limit.unwrap_or(i64::MAX).saturating_sub(cur);
                    return Err((i, ReserveError::Insufficient { remaining }));
                }
            };
            let needed = previous.saturating_add(amount);
            let room = headroom(counter.rate_room.load(Ordering::Relaxed), amount, p.limit);
            if !self.ceiling_covers(p.id, &counter, needed, room) {
                behind.push((i, needed));
            }
            held.push(Held {
                id: p.id,
                limit: p.limit,
                counter,
            });
        }
        Ok(behind)
    }

    /// Wait until each part of `r` in `behind` has its durable ceiling at what it needs, all
    /// of them within one timeout; else the part still waited for when the time ran out (the
    /// caller then drops `r`, which refunds every part).
    pub async fn until_durable(
        &self,
        r: &Reservation,
        behind: Behind,
    ) -> Result<(), (usize, ReserveError)> {
        let Hold::Counters { parts, .. } = &r.hold else {
            return Ok(());
        };
        let mut at = 0;
        let waits = async {
            for &(i, needed) in &behind {
                at = i;
                self.on_disk(&parts[i].counter, needed).await;
            }
        };
        self.within_wait_timeout(waits).await.map_err(|e| (at, e))
    }
}

/// The parts of a reservation whose durable ceiling is behind: (index, units needed on disk).
pub type Behind = ArrayVec<(usize, i64), MAX_PARTS>;

/// [`Ledger::reserve_all`] on a shared ledger: a lease of each part, in order.
async fn reserve_leased(
    l: &Arc<LeaseLedger>,
    parts: &Parts<'_>,
    amount: i64,
) -> Result<Reservation, (usize, ReserveError)> {
    let mut r = Reservation {
        amount,
        done: false,
        hold: Hold::Leases {
            ledger: l.clone(),
            slots: ArrayVec::new(),
        },
    };
    for (i, p) in parts.iter().enumerate() {
        // Dropping `r` on the error path gives back every part taken so far.
        let slot = l
            .reserve(p.id, p.limit, p.until, amount)
            .await
            .map_err(|e| (i, e))?;
        if let Hold::Leases { slots, .. } = &mut r.hold {
            slots.push(slot);
        }
    }
    Ok(r)
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
    /// order they were reserved). Counters of a shared ledger (Redis) are not reported: their
    /// settled value is not known here.
    pub fn settle_observed(mut self, actual: i64, seen: &mut dyn FnMut(Charged)) {
        self.close(actual.clamp(0, MAX_AMOUNT), seen);
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
        let r = l
            .reserve_all(&Parts::from_iter([key, account]), 60)
            .await
            .unwrap();
        let err = l
            .reserve_all(&Parts::from_iter([key, account]), 60)
            .await
            .unwrap_err();
        assert_eq!(err.0, 1);
        // The refused call's key part was refunded.
        assert_eq!(l.counter(1).committed(), 60);
        r.settle(25);
        assert_eq!((l.consumed(1), l.consumed(2)), (25, 25));
        drop(
            l.reserve_all(&Parts::from_iter([key, account]), 70)
                .await
                .unwrap(),
        );
        assert_eq!(
            (l.counter(1).committed(), l.counter(2).committed()),
            (25, 25)
        );
        assert_eq!(l.outstanding(), 0);
    }

    #[tokio::test]
    async fn an_observed_settle_reports_each_counter_before_and_after() {
        let l = Ledger::in_memory();
        let parts = Parts::from_iter([Part::lifetime(1, Some(100)), Part::lifetime(2, None)]);
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

    /// Every part whose durable ceiling is behind what it commits is on disk before the joint
    /// reservation is granted (all parts are taken first, then each one behind is waited for),
    /// and the ones already covered are not waited for.
    #[tokio::test]
    async fn every_part_behind_its_ceiling_is_on_disk_before_the_reservation_is_granted() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let parts = Parts::from_iter([
            Part::lifetime(1, Some(10_000_000)),
            Part::lifetime(2, None),
            Part::lifetime(3, Some(10_000_000)),
        ]);
        let r = l.reserve_all(&parts, 150_000).await.unwrap();
        assert_eq!(l.durable_waits(), 3);
        for id in [1, 2, 3] {
            assert!(
                l.counter(id).durable.load(Ordering::Acquire) >= 150_000,
                "{id}"
            );
        }
        r.settle(100_000);
        // Each ceiling now has room for the next call of this size: nothing waits.
        l.reserve_all(&parts, 150_000).await.unwrap().settle(1);
        assert_eq!(l.durable_waits(), 3);
        // A counter that is already covered while another is not: one wait, the new one's.
        let mixed =
            Parts::from_iter([Part::lifetime(1, Some(10_000_000)), Part::lifetime(4, None)]);
        l.reserve_all(&mixed, 150_000).await.unwrap().settle(1);
        assert_eq!(l.durable_waits(), 4);
        assert_eq!((l.consumed(1), l.consumed(4)), (100_002, 1));
        assert_eq!(l.outstanding(), 0);
        l.shutdown().unwrap();
    }

    /// A part whose ceiling is behind followed by a part that refuses: the call is refused
    /// at once (nothing is waited for) and both parts are given back.
    #[tokio::test]
    async fn a_refusal_after_a_part_behind_its_ceiling_refunds_both_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        let parts = Parts::from_iter([Part::lifetime(1, None), Part::lifetime(2, Some(5))]);
        let err = l.reserve_all(&parts, 150_000).await.unwrap_err();
        assert_eq!(err, (1, ReserveError::Insufficient { remaining: 5 }));
        assert_eq!((l.counter(1).committed(), l.counter(2).committed()), (0, 0));
        assert_eq!((l.outstanding(), l.durable_waits()), (0, 0));
        l.shutdown().unwrap();
    }

    /// On a disk that does not keep up (here: the writer has stopped), a call whose parts are
    /// all behind is refused as `NotDurable` once the timeout has passed, naming the part it
    /// was waiting for, and every part is given back.
    #[tokio::test]
    async fn parts_behind_on_a_stalled_disk_are_refused_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.shutdown().unwrap();
        let parts = Parts::from_iter([1, 2, 3].map(|id| Part::lifetime(id, None)));
        let started = std::time::Instant::now();
        let err = l.reserve_all(&parts, 150_000).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(err, (0, ReserveError::NotDurable));
        assert!(took >= l.shared.wait_timeout, "{took:?}");
        assert!(took < l.shared.wait_timeout * 2, "{took:?}");
        for id in [1, 2, 3] {
            assert_eq!(l.counter(id).committed(), 0, "{id}");
        }
        assert_eq!(l.outstanding(), 0);
    }

    /// A counter kept in a record's cell serves only the ledger it came from, for its id: a
    /// table used with a second ledger, or a part of another id, charges the right counter.
    #[tokio::test]
    async fn a_kept_counter_serves_only_its_own_ledger_and_id() {
        let cell = LedgerCell::default();
        let (first, second) = (Ledger::in_memory(), Ledger::in_memory());
        let on = |id| Parts::from_iter([Part::lifetime_in(id, Some(100), &cell)]);
        first.reserve_all(&on(1), 10).await.unwrap().settle(10);
        second.reserve_all(&on(1), 10).await.unwrap().settle(7);
        first.reserve_all(&on(2), 10).await.unwrap().settle(5);
        first.reserve_all(&on(1), 10).await.unwrap().settle(1);
        assert_eq!(
            (first.consumed(1), second.consumed(1), first.consumed(2)),
            (11, 7, 5)
        );
        assert_eq!(second.counter(1).committed(), 7);
    }

    /// A ledger reopened from its files (a restart, a test's second ledger) does not use the
    /// counters kept for the one before: its own counter is charged and checked.
    #[tokio::test]
    async fn a_reopened_ledger_does_not_use_the_counters_kept_for_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let cell = LedgerCell::default();
        let parts = Parts::from_iter([Part::lifetime_in(1, Some(100), &cell)]);
        let old = Ledger::open(dir.path()).unwrap();
        old.reserve_all(&parts, 10).await.unwrap().settle(40);
        old.shutdown().unwrap();
        drop(old);
        let new = Ledger::open(dir.path()).unwrap();
        new.reserve_all(&parts, 10).await.unwrap().settle(40);
        assert_eq!(new.consumed(1), 80);
        // 80 of 100 on the reopened counter: 30 more do not fit.
        assert!(new.reserve_all(&parts, 30).await.is_err());
        new.shutdown().unwrap();
    }
}
