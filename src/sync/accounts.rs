//! Editing accounts in the sync file (`keygate accounts …`), with the same locked, validated,
//! atomic edit as keys ([`SyncEditor::edit`]); and the account and budget views the CLI lists.

use crate::core::accounts::account_ledger_id;
use crate::core::budget::Budget;
use crate::core::config::{AccountEntry, BudgetEntry, KeyStatus, LimitsEntry, SyncFile};
use crate::sync::edit::SyncEditor;
use crate::sync::spending::{budget_view, merge_limits, BudgetView};
use serde::Serialize;
use std::collections::HashMap;

/// The fields `accounts create` and `accounts update` take; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct AccountSpec {
    /// Display name.
    pub name: Option<String>,
    /// Granted quota.
    pub quota: Option<i64>,
    /// No lifetime cap.
    pub unlimited: Option<bool>,
    /// `Some(None)`: no limit on keys.
    pub max_keys: Option<Option<i64>>,
    /// Rate limits to set.
    pub limits: LimitsEntry,
    /// `Some(None)`: no budget.
    pub budget: Option<Option<BudgetEntry>>,
}

impl AccountSpec {
    fn apply(&self, a: &mut AccountEntry) {
        if let Some(n) = &self.name {
            a.name = n.clone();
        }
        if let Some(q) = self.quota {
            a.quota = q;
        }
        if let Some(u) = self.unlimited {
            a.unlimited_quota = u;
        }
        if let Some(m) = self.max_keys {
            a.max_keys = m;
        }
        merge_limits(&mut a.limits, &self.limits);
        if let Some(b) = &self.budget {
            a.budget = b.clone();
        }
    }
}

/// `daily:200000`, `weekly:5000@Europe/Berlin`, `monthly:10000000@America/New_York`,
/// `rolling7:5000`, or `none` (no budget).
pub fn parse_budget(s: &str) -> Result<Option<BudgetEntry>, String> {
    if s == "none" {
        return Ok(None);
    }
    let bad = || {
        format!("budget {s:?}: expected PERIOD:AMOUNT[@TIMEZONE] (PERIOD daily, weekly, monthly or rollingN), or none")
    };
    let (period, rest) = s.split_once(':').ok_or_else(bad)?;
    let (amount, tz) = match rest.split_once('@') {
        Some((a, tz)) => (a, Some(tz.to_string())),
        None => (rest, None),
    };
    let amount: i64 = amount.parse().map_err(|_| bad())?;
    let entry = match period.strip_prefix("rolling") {
        Some(n) => BudgetEntry {
            period: None,
            amount,
            timezone: tz,
            rolling_days: Some(n.parse().map_err(|_| bad())?),
        },
        None => BudgetEntry {
            period: Some(period.to_string()),
            amount,
            timezone: tz,
            rolling_days: None,
        },
    };
    Budget::compile(&entry).map_err(|e| format!("budget {s:?}: {e}"))?;
    Ok(Some(entry))
}

fn entry_mut<'a>(file: &'a mut SyncFile, id: &str) -> Result<&'a mut AccountEntry, String> {
    file.accounts
        .get_mut(id)
        .ok_or_else(|| format!("unknown account {id:?}"))
}

/// Create account `id`.
pub fn create(editor: &SyncEditor, id: &str, spec: &AccountSpec) -> Result<(), String> {
    editor.edit(|file| {
        if file.accounts.contains_key(id) {
            return Err(format!("account {id:?} exists already"));
        }
        let mut a = AccountEntry::default();
        spec.apply(&mut a);
        file.accounts.insert(id.to_string(), a);
        Ok(())
    })
}

/// Change some fields of account `id`.
pub fn update(editor: &SyncEditor, id: &str, spec: &AccountSpec) -> Result<(), String> {
    editor.edit(|file| {
        spec.apply(entry_mut(file, id)?);
        Ok(())
    })
}

/// Enable or disable account `id` (its keys are refused with `account_disabled` meanwhile).
pub fn set_status(editor: &SyncEditor, id: &str, status: KeyStatus) -> Result<(), String> {
    editor.edit(|file| {
        entry_mut(file, id)?.status = status;
        Ok(())
    })
}

/// Delete account `id`; refused while keys name it (its consumed counter stays in the ledger).
pub fn delete(editor: &SyncEditor, id: &str) -> Result<(), String> {
    editor.edit(|file| {
        let keys = file
            .keys
            .iter()
            .filter(|k| k.account.as_deref() == Some(id))
            .count();
        if keys > 0 {
            return Err(format!(
                "account {id:?} still has {keys} keys; move or delete them first"
            ));
        }
        file.accounts
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| format!("unknown account {id:?}"))
    })
}

/// One account as `keygate accounts list` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AccountView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `enabled` or `disabled`.
    pub status: &'static str,
    /// Granted quota.
    pub quota: i64,
    /// No cap.
    pub unlimited_quota: bool,
    /// `used` baseline plus what the gateway charged.
    pub used: i64,
    /// Keys naming it.
    pub keys: usize,
    /// Most keys.
    pub max_keys: Option<i64>,
    /// Rate limits.
    pub limits: Option<LimitsEntry>,
    /// Budget and spending.
    pub budget: Option<BudgetView>,
}

/// The accounts of `file` with what the gateway charged them.
pub fn views(file: &SyncFile, consumed: &HashMap<u64, i64>, now: i64) -> Vec<AccountView> {
    file.accounts
        .iter()
        .map(|(id, a)| {
            let scope = account_ledger_id(id);
            AccountView {
                id: id.clone(),
                name: a.name.clone(),
                status: if a.status == KeyStatus::Disabled {
                    "disabled"
                } else {
                    "enabled"
                },
                quota: a.quota,
                unlimited_quota: a.unlimited_quota,
                used: a.used + consumed.get(&scope).copied().unwrap_or(0),
                keys: file
                    .keys
                    .iter()
                    .filter(|k| k.account.as_deref() == Some(id))
                    .count(),
                max_keys: a.max_keys,
                limits: a.limits.clone(),
                budget: a.budget.as_ref().and_then(|b| {
                    budget_view(scope, b, &|id| consumed.get(&id).copied().unwrap_or(0), now)
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_flags_parse_or_say_why() {
        let b = parse_budget("daily:200000@Europe/Berlin").unwrap().unwrap();
        assert_eq!(b.period.as_deref(), Some("daily"));
        assert_eq!(b.timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(
            parse_budget("rolling7:10").unwrap().unwrap().rolling_days,
            Some(7)
        );
        assert_eq!(parse_budget("none").unwrap(), None);
        assert!(parse_budget("daily:5@Nowhere/City")
            .unwrap_err()
            .contains("not a known IANA time zone"));
        assert!(parse_budget("daily").unwrap_err().contains("PERIOD:AMOUNT"));
    }
}
