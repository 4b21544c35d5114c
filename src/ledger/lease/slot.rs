//! One scope's lease on its Redis rate buckets, as the admission path sees it: tokens held per
//! kind, taken and given with atomics (see `lease::rates` for where they come from). Apart from
//! the worker's module so that `ledger::limits` can hold one without importing the worker.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// The rpm index of a [`RateSlot`]'s pairs.
pub(crate) const RPM: usize = 0;
/// The tpm index.
pub(crate) const TPM: usize = 1;

/// One scope's lease, per kind: tokens held (negative: used beyond it, not yet reported) and
/// until when Redis said the bucket is empty.
#[derive(Debug, Default)]
pub struct RateSlot {
    pub(super) held: [AtomicI64; 2],
    pub(super) empty_until: [AtomicI64; 2],
    pub(super) last_use: AtomicI64,
    pub(super) queued: AtomicBool,
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
    pub(super) fn take_out(&self, k: usize, positive: bool) -> i64 {
        self.held[k]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                ((h > 0) == positive && h != 0).then_some(0)
            })
            .unwrap_or(0)
    }
}
