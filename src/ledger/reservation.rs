//! What a reservation holds (one counter or several of this process, or leases of a shared
//! ledger) and how it is settled or refunded, exactly once.

use super::{lease, request_ceiling, Charged, KeyCounter, Shared, MAX_AMOUNT, MAX_PARTS};
use arrayvec::ArrayVec;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Quota held for one call, on one counter or several ([`Ledger::reserve_all`]). Settle it once
/// with [`Reservation::settle`]; dropped unsettled, it refunds itself in full.
pub struct Reservation {
    /// The units held on each counter.
    pub(super) amount: i64,
    pub(super) done: bool,
    pub(super) hold: Hold,
}

/// Where a reservation's units were taken from.
pub(super) enum Hold {
    /// This process's counters. One reference to the ledger for all of them, and the
    /// reservation counts once in its outstanding total, however many counters it holds.
    Counters {
        ledger: Arc<Shared>,
        parts: ArrayVec<Held, MAX_PARTS>,
    },
    /// This gateway's leases on the counters, in a shared ledger.
    Leases {
        ledger: Arc<lease::LeaseLedger>,
        slots: ArrayVec<Arc<lease::Slot>, MAX_PARTS>,
    },
}

/// One counter of this process that a reservation holds units on.
pub(super) struct Held {
    pub(super) id: u64,
    /// What the counter may commit in total, as reserved against (`None` = no cap).
    pub(super) limit: Option<i64>,
    pub(super) counter: Arc<KeyCounter>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({})", self.amount)
    }
}

impl Reservation {
    /// The units held.
    pub fn amount(&self) -> i64 {
        self.amount
    }

    /// Charge `actual` units instead of the reservation (the difference may be negative).
    pub fn settle(mut self, actual: i64) {
        self.close(actual.clamp(0, MAX_AMOUNT), |_| {});
    }

    /// Charge `actual` units on every counter held (a refund charges 0 and does not count as
    /// consumed), telling `seen` what a charge above 0 did to each counter of this process.
    pub(super) fn close(&mut self, actual: i64, mut seen: impl FnMut(Charged)) {
        self.done = true;
        match &self.hold {
            Hold::Leases { ledger, slots } => {
                for slot in slots {
                    ledger.settle(slot, self.amount, actual);
                }
            }
            Hold::Counters { ledger, parts } => {
                for (index, p) in parts.iter().enumerate() {
                    let before = p.charge(ledger, self.amount, actual);
                    if actual > 0 {
                        seen(Charged {
                            index,
                            id: p.id,
                            limit: p.limit,
                            before,
                            after: before.saturating_add(actual),
                        });
                    }
                }
                ledger.outstanding_total.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Held {
    /// Charge `actual` units on this counter instead of the `amount` reserved; its settled
    /// value before the charge.
    fn charge(&self, ledger: &Shared, amount: i64, actual: i64) -> i64 {
        let c = &self.counter;
        let delta = actual - amount;
        let committed = c.committed.fetch_add(delta, Ordering::AcqRel) + delta;
        let before = if actual > 0 {
            c.consumed.fetch_add(actual, Ordering::AcqRel)
        } else {
            c.consumed()
        };
        if committed > c.durable.load(Ordering::Acquire) {
            // A settle above the reservation may pass the ceiling: ask the writer (no wait).
            request_ceiling(ledger, self.id, c, committed);
        }
        before
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.close(0, |_| {});
        }
    }
}
