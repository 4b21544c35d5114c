//! One scope's lease on its Redis rate buckets and concurrency slots, as the admission path
//! sees it: tokens and spare slots held per kind, taken and given with atomics (see
//! `lease::rates` for where they come from). Apart from the worker's module so that
//! `ledger::limits` can hold one without importing the worker.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// The rpm index of a [`RateSlot`]'s arrays.
pub(crate) const RPM: usize = 0;
/// The tpm index.
pub(crate) const TPM: usize = 1;
/// The concurrency index: slots held spare (not in use by a call).
pub(crate) const CONC: usize = 2;
/// The kinds a lease holds.
pub(crate) const KINDS: usize = 3;

/// The most concurrency slots a gateway keeps spare for a scope with limit `limit` once a
/// call ended: an eighth of it (none below 8, where every slot is asked for and handed back).
pub(crate) fn spare_slots(limit: u32) -> i64 {
    i64::from(limit / 8)
}

/// One scope's lease, per kind: tokens or spare slots held (negative tokens: used beyond it,
/// not yet reported) and until when Redis said the bucket is empty. For concurrency, `owned`
/// is every slot Redis counts for this gateway (spare and in use), as the worker last stated
/// it, and `recorded` what Redis's record says; only the worker writes them.
#[derive(Debug, Default)]
pub struct RateSlot {
    pub(super) held: [AtomicI64; KINDS],
    pub(super) empty_until: [AtomicI64; 2],
    pub(super) last_use: AtomicI64,
    pub(super) queued: AtomicBool,
    pub(super) owned: AtomicI64,
    pub(super) recorded: AtomicI64,
    /// When the record was last renewed ([`crate::ledger::limits::mono_ns`]).
    pub(super) renewed: AtomicI64,
    /// Redis's last answer granted fewer slots than asked: the limit is taken.
    pub(super) slots_full: AtomicBool,
}

/// Where a call that ended tells that its scope holds more spare slots than it keeps: the
/// rate worker, which hands the rest back to Redis.
pub(crate) trait SpareSlots: Send + Sync {
    /// Scope `id` holds more spare slots than [`spare_slots`].
    fn spare(&self, id: u64);
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
        let until = self
            .empty_until
            .get(k)
            .map_or(0, |u| u.load(Ordering::Acquire));
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

    /// A call's concurrency slot back to the lease: true when the lease now holds more than
    /// `keep` spare and no round of the worker is queued for it (the caller asks for one).
    #[inline]
    pub(crate) fn release(&self, keep: i64) -> bool {
        let spare = self.held[CONC].fetch_add(1, Ordering::AcqRel) + 1;
        spare > keep && !self.queued.swap(true, Ordering::AcqRel)
    }

    /// Take out up to `n` spare slots (or tokens) of kind `k`, to hand them back to Redis.
    pub(super) fn take_out_up_to(&self, k: usize, n: i64) -> i64 {
        let before = self.held[k]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h > 0 && n > 0).then(|| h - h.min(n))
            })
            .unwrap_or(0);
        before.min(n).max(0)
    }

    /// Whether Redis's last answer about slots said the limit is taken.
    pub(crate) fn slots_full(&self) -> bool {
        self.slots_full.load(Ordering::Acquire)
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
