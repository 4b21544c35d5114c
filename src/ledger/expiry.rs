//! When counters end (SPEC §7, budget periods): a budget period's counter carries an `until`
//! ([`super::Part::until`]) after which no window reads it; ended counters that hold no
//! reservation are dropped, by the persisted ledger's writer or, for an in-memory ledger, by a
//! thread of its own. Lifetime counters (`until` 0) never end.

use super::{KeyCounter, Ledger, Shared};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether `c` may be dropped at `now`: its period ended and nothing holds it (a reservation
/// holds its counter, so none is outstanding). Checked under the map's lock, where no new
/// holder can appear.
pub(super) fn ended(c: &Arc<KeyCounter>, now: i64) -> bool {
    let until = c.until();
    until != 0 && until <= now && Arc::strong_count(c) == 1
}

/// How often the writer drops ended counters.
pub const FORGET_EVERY: Duration = Duration::from_secs(60);

/// The sweep of an in-memory ledger: every [`FORGET_EVERY`], until the ledger is gone (looked
/// at every second, so a dropped ledger's thread ends soon after it).
pub(super) fn sweep_in_memory(shared: &std::sync::Weak<Shared>) {
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if last.elapsed() >= FORGET_EVERY {
            last = Instant::now();
            let ledger = Ledger {
                shared,
                lease: None,
                rates: None,
            };
            let dropped = ledger.drop_ended(crate::core::clock::unix_now()).len();
            if dropped > 0 {
                log::info!("ledger: dropped {dropped} counters of ended budget periods");
            }
        }
    }
}

/// How long a budget counter found without an `until` is kept, from when it is found: it was
/// written before counters had one (or by such a binary during an upgrade). The longest a
/// window reads a period, plus a day; a counter still in use gets its own `until` back at once.
pub(super) const UNKNOWN_KEEP: i64 =
    (crate::core::budget::MAX_ROLLING_DAYS + 1) * 86_400 + crate::core::budget::KEEP_ENDED;

/// The `until` of counter `id` when none is known at `now`: [`UNKNOWN_KEEP`] for a budget
/// counter, never for the others.
pub(super) fn unknown_until(id: u64, now: i64) -> i64 {
    use crate::core::accounts::BUDGET_TAG;
    if id & BUDGET_TAG == BUDGET_TAG {
        now.saturating_add(UNKNOWN_KEEP)
    } else {
        0
    }
}

impl Ledger {
    /// Drop the counters whose `until` passed at `now` (unix seconds) and that hold no
    /// reservation: from memory and, for a persisted ledger, from its files (the snapshot is
    /// rewritten without them and the journal emptied, so a restart does not bring them back).
    /// How many went. The writer calls it every [`FORGET_EVERY`] with the clock's time.
    pub fn forget_ended(&self, now: i64) -> std::io::Result<usize> {
        let dropped = self.drop_ended(now);
        if let (Some(dir), false) = (&self.shared.dir, dropped.is_empty()) {
            self.compact(dir, now, &dropped)?;
        }
        Ok(dropped.len())
    }

    /// Remove the counters ended at `now` from memory; their ids.
    pub(super) fn drop_ended(&self, now: i64) -> HashSet<u64> {
        let counters = &self.shared.counters;
        // Collected first: removing while iterating would wait on the iterator's own lock.
        let candidates: Vec<u64> = counters
            .iter()
            .filter(|e| ended(e.value(), now))
            .map(|e| *e.key())
            .collect();
        candidates
            .into_iter()
            .filter(|id| counters.remove_if(id, |_, c| ended(c, now)).is_some())
            .collect()
    }
}
