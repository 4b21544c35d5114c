//! Choosing a target: by priority (0 first), then by weight among the targets that are up and
//! not cooling down. Lock-free: one shared counter (`fetch_add`) and a load or three per
//! target; the counter walks the weights, so a priority's split is exact over every
//! `sum of weights` picks (a weighted round-robin).

use super::target::Target;
use std::sync::atomic::{AtomicU64, Ordering};

/// What [`select`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Send the attempt here.
    Target(usize),
    /// Every target is cooling down (Retry-After); the soonest is free at this
    /// [`super::now_ms`] time.
    Cooling(u64),
}

/// Choose a target for an attempt at `now`. Targets in `tried` (a bit per target) are
/// avoided while others are available, and those in `keep_off` (a subset of `tried`: the
/// target whose failure this attempt retries) even then; when none is available, a target
/// that is down is tried anyway (the least recently failed one), unless every target that is
/// not down is cooling.
///
/// `levels` holds the target indices by priority, lowest first.
#[inline]
pub fn select(
    targets: &[Target],
    levels: &[Box<[usize]>],
    counter: &AtomicU64,
    now: u64,
    tried: u64,
    keep_off: u64,
) -> Pick {
    for avoid in [tried, keep_off] {
        for level in levels {
            let mut sum = 0u64;
            let mut free = 0u64;
            for &i in level.iter() {
                let t = &targets[i];
                if avoid & (1 << i) == 0 && t.weight > 0 && t.state.available(now) {
                    sum += u64::from(t.weight);
                    free |= 1 << i;
                }
            }
            if sum == 0 {
                continue;
            }
            let mut r = counter.fetch_add(1, Ordering::Relaxed) % sum;
            for &i in level.iter() {
                if free & (1 << i) == 0 {
                    continue;
                }
                let w = u64::from(targets[i].weight);
                if r < w {
                    targets[i].state.claim_probe(now);
                    return Pick::Target(i);
                }
                r -= w;
            }
        }
        if tried == keep_off {
            break;
        }
    }
    // Nothing available. Only cooling: say until when. Some down: try the one that failed
    // longest ago (an untried one first).
    let mut soonest = None::<u64>;
    let mut down = None::<(bool, u64, usize)>;
    for (i, t) in targets.iter().enumerate() {
        if let Some(until) = t.state.cooling(now) {
            soonest = Some(soonest.map_or(until, |s| s.min(until)));
        } else if !t.state.up(now) || t.weight == 0 {
            let key = (
                tried & (1 << i) != 0,
                t.state.last_failure.load(Ordering::Relaxed),
                i,
            );
            if down.is_none_or(|d| key < d) {
                down = Some(key);
            }
        }
    }
    match (down, soonest) {
        (Some((_, _, i)), _) => {
            targets[i].state.claim_probe(now);
            Pick::Target(i)
        }
        (None, Some(until)) => Pick::Cooling(until),
        (None, None) => Pick::Target(0),
    }
}
