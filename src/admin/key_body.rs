//! What a key create or change may set (SPEC §1 and §7), and the checks made before the
//! sync file is touched.

use super::auth::Caller;
use super::http::ApiError;
use crate::core::budget::Budget;
use crate::core::config::{BudgetEntry, KeyEntry, KeyStatus, LimitsEntry, SyncFile};
use crate::core::limits::Limits;
use crate::core::models::ModelSet;
use crate::core::table::MAX_NAME_CHARS;
use serde::{Deserialize, Deserializer};

/// `Some(None)` for an explicit `null`, `None` when absent.
pub fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// The fields a create or a change may set (SPEC §1 and §7). Absent: unchanged (or the
/// default); `null` clears `models`, `allow_ips`, `account`, `limits`, `budget`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    /// ≤ 50 characters.
    pub name: Option<String>,
    /// `enabled` or `disabled`.
    pub status: Option<KeyStatus>,
    /// Units, ≥ 0.
    pub quota: Option<i64>,
    /// No cap.
    pub unlimited_quota: Option<bool>,
    /// Baseline already consumed elsewhere.
    pub used: Option<i64>,
    /// Unix seconds, or -1 for never.
    pub expires_at: Option<i64>,
    /// Allowed models (`null`: any).
    #[serde(default, deserialize_with = "nullable")]
    pub models: Option<Option<Vec<String>>>,
    /// Allowed client IPs and CIDRs (`null` or `[]`: any).
    #[serde(default, deserialize_with = "nullable")]
    pub allow_ips: Option<Option<Vec<String>>>,
    /// The group.
    pub group: Option<String>,
    /// The account.
    #[serde(default, deserialize_with = "nullable")]
    pub account: Option<Option<String>>,
    /// The key's own rate limits (replaced whole).
    #[serde(default, deserialize_with = "nullable")]
    pub limits: Option<Option<LimitsEntry>>,
    /// The key's period budget (replaced whole).
    #[serde(default, deserialize_with = "nullable")]
    pub budget: Option<Option<BudgetEntry>>,
    /// Create this many keys alike (create only; 1 to 100).
    pub count: Option<u32>,
}

impl KeyBody {
    /// The names of the fields it sets (for the audit log).
    pub fn fields(&self) -> Vec<String> {
        let set = [
            ("name", self.name.is_some()),
            ("status", self.status.is_some()),
            ("quota", self.quota.is_some()),
            ("unlimited_quota", self.unlimited_quota.is_some()),
            ("used", self.used.is_some()),
            ("expires_at", self.expires_at.is_some()),
            ("models", self.models.is_some()),
            ("allow_ips", self.allow_ips.is_some()),
            ("group", self.group.is_some()),
            ("account", self.account.is_some()),
            ("limits", self.limits.is_some()),
            ("budget", self.budget.is_some()),
        ];
        set.iter()
            .filter(|(_, s)| *s)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Everything that can be checked without the file.
    pub fn check(&self) -> Result<(), ApiError> {
        if let Some(n) = &self.name {
            let len = n.chars().count();
            if len > MAX_NAME_CHARS {
                return Err(ApiError::field(
                    "name",
                    format!("name is {len} characters, at most {MAX_NAME_CHARS} are allowed"),
                ));
            }
        }
        for (field, v) in [("quota", self.quota), ("used", self.used)] {
            if let Some(v) = v.filter(|v| *v < 0) {
                return Err(ApiError::field(
                    field,
                    format!("{field} is {v}; it must be >= 0"),
                ));
            }
        }
        if let Some(e) = self.expires_at.filter(|e| *e < -1) {
            return Err(ApiError::field(
                "expires_at",
                format!("expires_at {e} is neither -1 (never) nor a unix time"),
            ));
        }
        if let Some(Some(list)) = &self.models {
            ModelSet::compile(list)
                .map_err(|e| ApiError::field("models", format!("models: {e}")))?;
        }
        if let Some(Some(list)) = &self.allow_ips {
            for ip in list {
                crate::core::net::parse_cidr(ip)
                    .map_err(|e| ApiError::field("allow_ips", format!("allow_ips: {e}")))?;
            }
        }
        if let Some(Some(l)) = &self.limits {
            Limits::compile(l).map_err(|e| ApiError::field("limits", e))?;
        }
        if let Some(Some(b)) = &self.budget {
            Budget::compile(b).map_err(|e| ApiError::field("budget", e))?;
        }
        Ok(())
    }

    /// Checks against the file, then sets the fields on `k`.
    pub(super) fn apply(
        &self,
        file: &SyncFile,
        caller: &Caller,
        k: &mut KeyEntry,
    ) -> Result<(), ApiError> {
        if let Some(g) = &self.group {
            if g != "default" && !file.groups.contains_key(g) {
                return Err(ApiError::field("group", format!("unknown group {g:?}")));
            }
        }
        if let Some(Some(a)) = &self.account {
            let visible = caller.account.as_ref().is_none_or(|own| own == a);
            if !visible || !file.accounts.contains_key(a) {
                return Err(ApiError::field("account", format!("unknown account {a:?}")));
            }
        }
        if let (Some(None), Some(_)) = (&self.account, &caller.account) {
            return Err(ApiError::field(
                "account",
                "an account token cannot take a key out of its account",
            ));
        }
        let b = self.clone();
        if let Some(v) = b.name {
            k.name = v;
        }
        if let Some(v) = b.status {
            k.status = v;
        }
        if let Some(v) = b.quota {
            k.quota = v;
        }
        if let Some(v) = b.unlimited_quota {
            k.unlimited_quota = v;
        }
        if let Some(v) = b.used {
            k.used = v;
        }
        if let Some(v) = b.expires_at {
            k.expires_at = if v == 0 { -1 } else { v };
        }
        if let Some(v) = b.models {
            k.models = v;
        }
        if let Some(v) = b.allow_ips {
            k.allow_ips = v.filter(|l| !l.is_empty());
        }
        if let Some(v) = b.group {
            k.group = v;
        }
        if let Some(v) = b.account {
            k.account = v;
        }
        if let Some(v) = b.limits {
            k.limits = v;
        }
        if let Some(v) = b.budget {
            k.budget = v;
        }
        Ok(())
    }
}
