//! What the CLI shows of limits and budgets, shared by `keygate keys` and `keygate accounts`:
//! merging limit flags, and a budget's spending in its current period.

use crate::core::accounts::budget_ledger_id;
use crate::core::budget::Budget;
use crate::core::config::{BudgetEntry, LimitsEntry};
use serde::Serialize;

/// Set the limits given in `from` on `into` (creating it when needed).
pub fn merge_limits(into: &mut Option<LimitsEntry>, from: &LimitsEntry) {
    if from.rpm.is_none() && from.tpm.is_none() && from.concurrency.is_none() {
        return;
    }
    let l = into.get_or_insert_with(LimitsEntry::default);
    l.rpm = from.rpm.or(l.rpm);
    l.tpm = from.tpm.or(l.tpm);
    l.concurrency = from.concurrency.or(l.concurrency);
}

/// A budget and what was spent in its current period.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BudgetView {
    /// As the CLI writes it (`daily:200000@Europe/Berlin`).
    pub budget: String,
    /// Spent in the current window.
    pub spent: i64,
    /// When the window next moves (unix seconds).
    pub resets_at: i64,
}

/// The budget view of the scope with counter id `scope` (None when the budget is invalid).
pub fn budget_view(
    scope: u64,
    b: &BudgetEntry,
    consumed: &dyn Fn(u64) -> i64,
    now: i64,
) -> Option<BudgetView> {
    let b = Budget::compile(b).ok()?;
    let w = b.window(now);
    let spent = std::iter::once(w.current)
        .chain(w.earlier.iter().copied())
        .map(|start| consumed(budget_ledger_id(scope, start)))
        .sum();
    Some(BudgetView {
        budget: b.describe(),
        spent,
        resets_at: w.resets_at,
    })
}
