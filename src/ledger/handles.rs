//! A counter or a rate-limit state found once per compiled key or account, kept in its
//! [`LedgerCell`] instead of being looked up in a shared map on every call (each lookup takes
//! a shard lock, so that every call of one account met on one lock word).
//!
//! A kept handle is only used by the map it came from, for the id it was found for: it names
//! its owner (the ledger's or the limit book's shared state, by address; the weak reference
//! keeps that address from being reused) and its id, and anything else looks the value up as
//! before. A handle never outlives the owner's use of the value: the limit book never drops a
//! scope, and the ledger drops a counter only when nothing else holds it
//! ([`super::expiry::ended`]) — a kept handle holds it — and never a lifetime counter, the
//! only kind kept here.

use crate::core::accounts::LedgerCell;
use std::sync::{Arc, Weak};

/// What a cell keeps: `value`, found in `owner`'s map under `id`.
struct Kept<O, T> {
    owner: Weak<O>,
    id: u64,
    value: Arc<T>,
}

/// `owner`'s value for `id`: the one kept in `cell` when it is `owner`'s for `id`, else
/// `find(id)` (which fills an empty cell).
#[inline]
pub(super) fn kept<O, T>(
    cell: Option<&LedgerCell>,
    owner: &Arc<O>,
    id: u64,
    find: impl Fn(u64) -> Arc<T>,
) -> Arc<T>
where
    O: Send + Sync + 'static,
    T: Send + Sync + 'static,
{
    let Some(cell) = cell else {
        return find(id);
    };
    let kept = cell.get_or_init(|| Kept {
        owner: Arc::downgrade(owner),
        id,
        value: find(id),
    });
    match kept {
        Some(k) if k.id == id && std::ptr::eq(k.owner.as_ptr(), Arc::as_ptr(owner)) => {
            k.value.clone()
        }
        _ => find(id),
    }
}
