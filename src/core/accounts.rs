//! Accounts (SPEC §7), compiled, and what a key adds to the plain key checks: its account, its
//! rate limits (its own, else its group's) and its period budget ([`KeyPolicy`]).
//!
//! Counter ids. The ledger keeps one counter per `u64` id and persists it. Key ids are below
//! 2^62 (validation refuses others); an account's counter is `ACCOUNT_TAG | h(account id)` and a
//! budget period's is `BUDGET_TAG | h(scope, period start)`, so no key id and no account or
//! budget counter can ever share a counter (two accounts whose hashes collide are refused).

use crate::core::budget::Budget;
use crate::core::config::{AccountEntry, GroupEntry, KeyEntryOf, KeyStatus, SyncFile};
use crate::core::limits::Limits;
use sha2::{Digest as _, Sha256};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

/// Key ids must be below this.
pub const KEY_ID_LIMIT: u64 = 1 << 62;
/// The tag of an account's counter id.
pub const ACCOUNT_TAG: u64 = 2 << 62;
/// The tag of a budget period's counter id.
pub const BUDGET_TAG: u64 = 3 << 62;
const LOW: u64 = KEY_ID_LIMIT - 1;
/// Longest account name, in characters (as for keys).
pub const MAX_ACCOUNT_NAME_CHARS: usize = 50;

/// A compiled account.
#[derive(Clone, Debug)]
pub struct Account {
    /// The account's id (its key in `accounts`).
    pub id: Box<str>,
    /// Display name.
    pub name: Box<str>,
    /// Enabled or disabled.
    pub status: KeyStatus,
    /// Granted quota, units.
    pub quota: i64,
    /// Baseline consumed elsewhere.
    pub used: i64,
    /// No lifetime cap.
    pub unlimited_quota: bool,
    /// Most keys.
    pub max_keys: Option<u64>,
    /// Rate limits shared by its keys.
    pub limits: Limits,
    /// Period budget.
    pub budget: Option<Budget>,
    /// The account's counter id in the ledger.
    pub ledger_id: u64,
    /// The ledger's counter of `ledger_id`, once a call found it.
    pub counter: LedgerCell,
    /// The account's rate-limit state, once a call found it.
    pub live: LedgerCell,
}

impl Account {
    /// What the account may commit in total (`quota − used`); `None` when unlimited.
    pub fn quota_limit(&self) -> Option<i64> {
        (!self.unlimited_quota).then(|| self.quota.saturating_sub(self.used))
    }
}

/// The accounts of a table.
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    list: Vec<Account>,
    by_id: HashMap<Box<str>, u32>,
}

impl Accounts {
    /// The account at `index` ([`KeyPolicy::account`]).
    #[inline]
    pub fn get(&self, index: u32) -> Option<&Account> {
        self.list.get(index as usize)
    }
    /// The account with this id.
    pub fn by_id(&self, id: &str) -> Option<&Account> {
        self.get(*self.by_id.get(id)?)
    }
    /// Every account.
    pub fn iter(&self) -> impl Iterator<Item = &Account> {
        self.list.iter()
    }
    /// Number of accounts.
    pub fn len(&self) -> usize {
        self.list.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Validate and compile the sync file's `accounts`.
    pub fn compile(file: &SyncFile) -> Result<Accounts, String> {
        Self::compile_entries(&file.accounts)
    }

    /// Validate and compile a sync file's `accounts` member.
    pub fn compile_entries(entries: &BTreeMap<String, AccountEntry>) -> Result<Accounts, String> {
        let mut out = Accounts::default();
        let mut tagged: HashMap<u64, &str> = HashMap::new();
        for (id, a) in entries {
            let at = |m: String| format!("account {id:?}: {m}");
            if id.is_empty() || id.chars().count() > 64 {
                return Err(at("the id must be 1 to 64 characters".into()));
            }
            if a.name.chars().count() > MAX_ACCOUNT_NAME_CHARS {
                return Err(at("name is longer than 50 characters".into()));
            }
            if a.quota < 0 {
                return Err(at(format!("negative quota {}", a.quota)));
            }
            if a.used < 0 {
                return Err(at(format!("negative used {}", a.used)));
            }
            let max_keys = match a.max_keys {
                None => None,
                Some(n) if n < 0 => return Err(at(format!("max_keys is {n}; must be >= 0"))),
                Some(n) => Some(n as u64),
            };
            let limits = match &a.limits {
                Some(l) => Limits::compile(l).map_err(at)?,
                None => Limits::default(),
            };
            let budget = match &a.budget {
                Some(b) => Some(Budget::compile(b).map_err(at)?),
                None => None,
            };
            let ledger_id = account_ledger_id(id);
            if let Some(other) = tagged.insert(ledger_id, id) {
                return Err(at(format!(
                    "its counter id collides with account {other:?}; rename one of them"
                )));
            }
            let index = u32::try_from(out.list.len()).map_err(|_| "too many accounts")?;
            out.by_id.insert(id.as_str().into(), index);
            out.list.push(Account {
                id: id.as_str().into(),
                name: a.name.as_str().into(),
                status: a.status,
                quota: a.quota,
                used: a.used,
                unlimited_quota: a.unlimited_quota,
                max_keys,
                limits,
                budget,
                ledger_id,
                counter: LedgerCell::default(),
                live: LedgerCell::default(),
            });
        }
        Ok(out)
    }
}

/// What SPEC §7 adds to a key. Absent (`None` in the record) for a key with no account, no
/// limits and no budget, which then costs nothing extra on the request path.
#[derive(Clone, Debug, Default)]
pub struct KeyPolicy {
    /// Index into the table's [`Accounts`].
    pub account: Option<u32>,
    /// The key's limits (its own, else its group's).
    pub limits: Limits,
    /// The key's budget.
    pub budget: Option<Budget>,
    /// The ledger's counter of the key, once a call found it.
    pub counter: LedgerCell,
    /// The key's rate-limit state, once a call found it.
    pub live: LedgerCell,
}

/// What the ledger found for a compiled key or account (its counter, its rate-limit state),
/// kept with the record so that each call does not look it up again in a shared map (a shard
/// lock, a probe and a reference count each, several per call). Filled on first use and kept
/// as long as the table; a reload compiles new records with empty cells. Opaque here, since
/// the core knows no ledger types: the ledger puts its own value in and reads it back by type,
/// and checks that the value is its own (a table may be used with several ledgers). A clone
/// starts empty: the copy finds its own.
#[derive(Default)]
pub struct LedgerCell(OnceLock<Box<dyn Any + Send + Sync>>);

impl LedgerCell {
    /// Whether a value was put in.
    pub fn is_filled(&self) -> bool {
        self.0.get().is_some()
    }

    /// The value, made by `init` if the cell is empty; `None` when it holds another type.
    #[inline]
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.0.get_or_init(|| Box::new(init())).downcast_ref()
    }
}

impl Clone for LedgerCell {
    fn clone(&self) -> LedgerCell {
        LedgerCell::default()
    }
}

impl std::fmt::Debug for LedgerCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.is_filled() { "filled" } else { "empty" };
        write!(f, "LedgerCell({state})")
    }
}

/// Compiles every key's [`KeyPolicy`], counting keys per account for `max_keys`.
#[derive(Default)]
pub struct PolicyCompiler {
    group_limits: HashMap<Box<str>, Limits>,
    keys_per_account: Vec<u64>,
}

impl PolicyCompiler {
    /// A compiler for keys of a file with these `groups` (whose `limits` it checks) against
    /// `accounts`.
    pub fn new(
        groups: &BTreeMap<String, GroupEntry>,
        accounts: &Accounts,
    ) -> Result<PolicyCompiler, String> {
        let mut group_limits = HashMap::new();
        for (name, g) in groups {
            if let Some(l) = &g.limits {
                let l = Limits::compile(l).map_err(|e| format!("group {name:?}: {e}"))?;
                group_limits.insert(name.as_str().into(), l);
            }
        }
        Ok(PolicyCompiler {
            group_limits,
            keys_per_account: vec![0; accounts.len()],
        })
    }

    /// Forget the keys counted so far (the keys are compiled again, against `accounts`).
    pub fn restart(&mut self, accounts: &Accounts) {
        self.keys_per_account = vec![0; accounts.len()];
    }

    /// The key's policy, or why the key is invalid (the caller names the key). `accounts` is
    /// the one this compiler was made with.
    pub fn key<S: AsRef<str>>(
        &mut self,
        accounts: &Accounts,
        k: &KeyEntryOf<S>,
    ) -> Result<Option<Arc<KeyPolicy>>, String> {
        if k.id >= KEY_ID_LIMIT {
            return Err(format!(
                "id {} is too large; key ids must be below 2^62",
                k.id
            ));
        }
        let account = match &k.account {
            None => None,
            Some(name) => {
                let name = name.as_ref();
                let index = accounts
                    .by_id
                    .get(name)
                    .copied()
                    .filter(|&i| (i as usize) < self.keys_per_account.len())
                    .ok_or_else(|| format!("unknown account {name:?}"))?;
                let n = &mut self.keys_per_account[index as usize];
                *n += 1;
                if let Some(a) = accounts.get(index) {
                    if a.max_keys.is_some_and(|max| *n > max) {
                        return Err(format!(
                            "account {name:?} allows at most {} keys (max_keys)",
                            a.max_keys.unwrap_or(0)
                        ));
                    }
                }
                Some(index)
            }
        };
        let limits = match &k.limits {
            Some(l) => Limits::compile(l)?,
            None => self
                .group_limits
                .get(k.group.as_ref())
                .copied()
                .unwrap_or_default(),
        };
        let budget = match &k.budget {
            Some(b) => Some(Budget::compile(b)?),
            None => None,
        };
        if account.is_none() && limits.is_empty() && budget.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(KeyPolicy {
            account,
            limits,
            budget,
            counter: LedgerCell::default(),
            live: LedgerCell::default(),
        })))
    }
}

/// The ledger counter id of account `id`.
pub fn account_ledger_id(id: &str) -> u64 {
    let h = Sha256::digest(id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    ACCOUNT_TAG | (u64::from_le_bytes(b) & LOW)
}

/// The ledger counter id of the budget period starting at `start` of the scope whose counter
/// id is `scope` (a key id or an account's counter id).
#[inline]
pub fn budget_ledger_id(scope: u64, start: i64) -> u64 {
    // splitmix64 over both: cheap, and well mixed for ids that differ in few bits.
    let mut z = scope ^ (start as u64).rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    BUDGET_TAG | (z & LOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_ids_never_meet() {
        let a = account_ledger_id("acme");
        assert_eq!(a & (3 << 62), ACCOUNT_TAG);
        let b = budget_ledger_id(a, 1_700_000_000);
        assert_eq!(b & (3 << 62), BUDGET_TAG);
        assert_ne!(budget_ledger_id(1, 0), budget_ledger_id(1, 86_400));
        assert_ne!(budget_ledger_id(1, 0), budget_ledger_id(2, 0));
    }

    #[test]
    fn a_ledger_cell_keeps_its_first_value_and_a_clone_starts_empty() {
        let cell = LedgerCell::default();
        assert_eq!(cell.get_or_init(|| 7u64), Some(&7));
        assert_eq!(cell.get_or_init(|| 8u64), Some(&7));
        // Another type is not there: the caller looks it up instead.
        assert_eq!(cell.get_or_init(|| 9u32), None);
        assert_eq!(cell.clone().get_or_init(|| 8u64), Some(&8));
    }
}
