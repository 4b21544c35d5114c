//! The sync file's schema (SPEC §2 and §7) as serde reads it: keys, groups, model prices and
//! accounts. Parsed strictly (`deny_unknown_fields`); [`crate::core::table`] compiles it.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// `enabled` or `disabled`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// The key may be used.
    #[default]
    Enabled,
    /// The key is refused with 401 `key_disabled`.
    Disabled,
}

/// A group: a model range and a price ratio.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    /// Multiplies every price in this group.
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Models this group may use; absent = all.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Default rate limits for the group's keys that set none (SPEC §7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsEntry>,
}

fn default_ratio() -> f64 {
    1.0
}

/// A model's price (new-api's ratios, or a fixed price per call).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Quota units per token.
    #[serde(default)]
    pub ratio: Option<f64>,
    /// Completion tokens cost this many times a prompt token. Default 1.
    #[serde(default)]
    pub completion_ratio: Option<f64>,
    /// A fixed price per call in USD.
    #[serde(default)]
    pub price: Option<f64>,
}

/// One key as written in the sync file, with owned strings: what the CLI edits and writes.
pub type KeyEntry = KeyEntryOf<String>;

/// [`KeyEntryOf`] as the table loader reads it: its strings borrowed from the file's bytes
/// where they have no escapes, so loading a million keys does not allocate (and free) several
/// strings per key only to compile them.
pub type KeyEntryRef<'a> = KeyEntryOf<Text<'a>>;

/// One key as written in the sync file, over its string type `S`: [`KeyEntry`] (owned) and
/// [`KeyEntryRef`] (borrowed) are this one declaration, so a new member is added here once and
/// both read it alike (the same defaults, checks and messages; `rename` keeps serde's messages
/// naming `struct KeyEntry`). The table compiles either ([`crate::core::table`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Hash)]
#[serde(
    deny_unknown_fields,
    rename = "KeyEntry",
    bound(
        deserialize = "S: Deserialize<'de> + Default + From<&'static str>",
        serialize = "S: Serialize"
    )
)]
pub struct KeyEntryOf<S> {
    /// Stable id; counters attach to it.
    pub id: u64,
    /// A recognizable name, at most 50 characters.
    #[serde(default)]
    pub name: S,
    /// Hex SHA-256 of the full key string including `sk-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<S>,
    /// The plaintext key (imports); hashed at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<S>,
    /// `enabled` or `disabled`.
    #[serde(default)]
    pub status: KeyStatus,
    /// Total granted quota in units.
    #[serde(default)]
    pub quota: i64,
    /// No cap (usage still counted).
    #[serde(default)]
    pub unlimited_quota: bool,
    /// Quota consumed elsewhere before this gateway counts.
    #[serde(default)]
    pub used: i64,
    /// Unix seconds; -1 (or 0) for never.
    #[serde(default = "never")]
    pub expires_at: i64,
    /// Allowed models; absent = no restriction; empty = nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<S>>,
    /// Allowed client IPs and CIDRs; absent or empty = no restriction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_ips: Option<Vec<S>>,
    /// The group.
    #[serde(default = "default_group")]
    pub group: S,
    /// Keys this entry had before a rotation with a grace period; each works until `until`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_keys: Vec<PreviousKey>,
    /// The account the key belongs to (SPEC §7); its checks and charges apply too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<S>,
    /// The key's own rate limits (else its group's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsEntry>,
    /// The key's period budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetEntry>,
    /// The masked key listings show (`sk-abcd**********wxyz`, SPEC §8); written when the key is
    /// created or rotated here, computed from `key` when the key is given in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hint: Option<S>,
    /// The key sealed under the vault secret (`v1:<base64>`, [`crate::core::vault`]); written
    /// when `key_vault` is configured, so that `reveal` can give the key back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sealed: Option<S>,
}

/// A string read from a file: borrowed from the file's bytes when it has no escapes. Reads as a
/// `String` reads (the same checks and messages).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<&'static str> for Text<'_> {
    fn from(s: &'static str) -> Self {
        Text(Cow::Borrowed(s))
    }
}

impl Serialize for Text<'_> {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Text<'de>, E> {
                // As `String` does.
                match std::str::from_utf8(v) {
                    Ok(s) => Ok(Text(Cow::Owned(s.to_owned()))),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(v), &self)),
                }
            }
        }
        d.deserialize_string(V)
    }
}

/// `limits`: rate limits of a key, an account or a group's keys (SPEC §7). Signed, so that a
/// negative value is read and refused with a precise message rather than a serde one.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct LimitsEntry {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<i64>,
    /// Tokens per minute (prompt estimate + reserved completion, corrected at settle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<i64>,
    /// Calls in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<i64>,
}

/// `budget`: what may be spent per period, in quota units (SPEC §7).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct BudgetEntry {
    /// `daily`, `weekly` or `monthly`; absent when `rolling_days` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    /// Units per period.
    pub amount: i64,
    /// IANA time zone of the period's boundaries; default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// A rolling window of this many days (whole UTC days) instead of a calendar period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_days: Option<i64>,
}

/// An account in the sync file (SPEC §7): keys that name it are checked and charged against it.
/// Its default is what a file's `{}` means: enabled, no quota, no limits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccountEntry {
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// `enabled` or `disabled` (its keys are refused with `account_disabled`).
    #[serde(default)]
    pub status: KeyStatus,
    /// Total granted quota in units.
    #[serde(default)]
    pub quota: i64,
    /// Quota consumed elsewhere before this gateway counts.
    #[serde(default)]
    pub used: i64,
    /// No lifetime cap.
    #[serde(default)]
    pub unlimited_quota: bool,
    /// Most keys that may name this account; absent = no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<i64>,
    /// Rate limits shared by all the account's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsEntry>,
    /// The account's period budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetEntry>,
}

/// A rotated-out key that still works until its grace period ends.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct PreviousKey {
    /// Hex SHA-256 of the old key.
    pub key_sha256: String,
    /// Unix seconds after which the old key is refused.
    pub until: i64,
}

fn never() -> i64 {
    -1
}
fn default_group<S: From<&'static str>>() -> S {
    S::from("default")
}
fn default_quota_per_unit() -> f64 {
    500_000.0
}

/// The sync file as written (SPEC §2).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncFile {
    /// Bumped on every edit.
    #[serde(default)]
    pub revision: u64,
    /// Quota units per USD.
    #[serde(default = "default_quota_per_unit")]
    pub quota_per_unit: f64,
    /// The next id `keygate keys create` hands out: ids are never reused, since consumed quota
    /// stays attached to an id after its key is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_id: Option<u64>,
    /// Groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupEntry>,
    /// Prices by model name (`"*"` = any other model).
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
    /// The keys.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// Accounts by id (SPEC §7).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accounts: BTreeMap<String, AccountEntry>,
}

impl KeyEntry {
    /// A new key as creating one writes it before its settings are applied: enabled, group
    /// `default`, no quota, never expires, known by its hash only.
    pub fn new(id: u64, key_sha256: String) -> KeyEntry {
        KeyEntry {
            id,
            name: String::new(),
            key_sha256: Some(key_sha256),
            key: None,
            status: KeyStatus::Enabled,
            quota: 0,
            unlimited_quota: false,
            used: 0,
            expires_at: -1,
            models: None,
            allow_ips: None,
            group: "default".into(),
            previous_keys: Vec::new(),
            account: None,
            limits: None,
            budget: None,
            key_hint: None,
            key_sealed: None,
        }
    }
}

impl<S> KeyEntryOf<S> {
    /// The key's state as shown to people: `disabled`, `expired`, `exhausted` (its `used`
    /// plus what the gateway has charged since, `consumed`, reached its quota) or `enabled`.
    pub fn state(&self, consumed: i64, now: i64) -> &'static str {
        if self.status == KeyStatus::Disabled {
            "disabled"
        } else if self.expires_at > 0 && self.expires_at <= now {
            "expired"
        } else if !self.unlimited_quota && self.quota - self.used - consumed <= 0 {
            "exhausted"
        } else {
            "enabled"
        }
    }
}

impl SyncFile {
    /// Parse sync-file JSON strictly (unknown fields and trailing garbage are errors).
    pub fn parse(bytes: &[u8]) -> Result<SyncFile, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}
