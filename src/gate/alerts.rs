//! Threshold alerts (SPEC §7) at settle: which counters a call's charge moved past a threshold
//! of their quota or budget, as events pushed (never waited for) into the alert queue. The
//! sender and the key-expiry sweep are [`crate::ops::alerts`].
//!
//! With alerts off, a settle pays one atomic load. With alerts on, it pays a compare or two
//! per charged counter (see [`crate::core::alerts::Thresholds::crossed`]); only a charge that
//! crosses a threshold builds an event.

use super::accounts::{counters_of, Counter, Owner};
use super::Gate;
use crate::core::accounts::budget_ledger_id;
use crate::core::alerts::{AlertEvent, AlertId, AlertScope, Alerting};
use crate::core::budget::Budget;
use crate::core::clock::{unix_now, unix_secs};
use crate::core::table::{KeyRecord, KeyTable};
use crate::ledger::{Charged, Reservation};
use std::time::SystemTime;

impl Gate {
    /// Turn threshold alerts on: from now on each settle pushes the events it crosses into
    /// `alerting`'s queue. False when they were on already (the first setting stays).
    pub fn enable_alerts(&self, alerting: Alerting) -> bool {
        self.inner.alerts.set(alerting).is_ok()
    }

    /// Settle `reservation` at `quota` units; with alerts on, queue an event for every
    /// threshold the charge crossed. `admitted` is when the call was admitted (it names the
    /// budget period it was charged to).
    pub(super) fn charge(
        &self,
        reservation: Reservation,
        quota: i64,
        table: &KeyTable,
        key: &KeyRecord,
        admitted: Option<SystemTime>,
    ) {
        let Some(alerting) = self.inner.alerts.get() else {
            return reservation.settle(quota);
        };
        let counters = counters_of(table, key);
        let mut events = Vec::new();
        reservation.settle_observed(quota, &mut |c| {
            if let (Some(limit), Some(Some(counter))) = (c.limit, counters.get(c.index)) {
                crossings(alerting, key, *counter, c, limit, admitted, &mut events);
            }
        });
        for event in events {
            if !alerting.queue.push(event) {
                self.inner
                    .metrics
                    .alerts
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc();
            }
        }
    }
}

/// Push an event for each threshold charge `c` crossed on `counter`, which could commit
/// `limit` in total when the call was admitted.
fn crossings(
    alerting: &Alerting,
    key: &KeyRecord,
    counter: Counter<'_>,
    c: Charged,
    limit: i64,
    admitted: Option<SystemTime>,
    out: &mut Vec<AlertEvent>,
) {
    let (owner, full) = match counter {
        Counter::Quota(Owner::Key) => (Owner::Key, key.quota),
        Counter::Quota(Owner::Account(a)) => (Owner::Account(a), a.quota),
        Counter::Budget { owner, budget, .. } => (owner, budget.amount),
    };
    // What counts against `full` outside the counter: the `used` baseline, or a rolling
    // window's earlier days.
    let base = full.saturating_sub(limit);
    let mut crossed = alerting
        .thresholds
        .crossed(full, base, c.before, c.after)
        .peekable();
    if crossed.peek().is_none() {
        return;
    }
    let now = unix_now();
    let (scope, id, name) = match owner {
        Owner::Key => (AlertScope::Key, AlertId::Key(key.id), key.name.clone()),
        Owner::Account(a) => (
            AlertScope::Account,
            AlertId::Account(a.id.clone()),
            a.name.clone(),
        ),
    };
    let (period, period_start, period_end) = match counter {
        Counter::Budget { budget, scope, .. } => {
            let (name, start, end) = period_of(budget, scope, c.id, admitted, now);
            (Some(name), Some(start), Some(end))
        }
        Counter::Quota(_) => (None, None, None),
    };
    for threshold in crossed {
        out.push(AlertEvent::QuotaThreshold {
            scope: scope.clone(),
            id: id.clone(),
            name: name.clone(),
            threshold,
            used: base.saturating_add(c.after),
            limit: full,
            period: period.clone(),
            period_start,
            period_end,
            at: now,
        });
    }
}

/// The budget period whose counter is `counter_id` (the one the call was admitted in, which
/// may have ended since): its name (`daily`, …, `rolling7`), start and end in unix seconds.
/// A rolling window starts on its first day.
fn period_of(
    budget: &Budget,
    scope: u64,
    counter_id: u64,
    admitted: Option<SystemTime>,
    now: i64,
) -> (Box<str>, i64, i64) {
    let described = budget.describe();
    let name = described.split(':').next().unwrap_or("period").into();
    let windows = [admitted.map(unix_secs), Some(now)]
        .into_iter()
        .flatten()
        .map(|t| budget.period.window(t));
    let mut last = None;
    for w in windows {
        let hit = budget_ledger_id(scope, w.current) == counter_id;
        let start = w.earlier.last().copied().unwrap_or(w.current);
        last = Some((start, w.resets_at));
        if hit {
            break;
        }
    }
    let (start, end) = last.unwrap_or((now, now));
    (name, start, end)
}
