//! The compiled, immutable key table: SHA-256 digest -> key record, with groups, model sets and
//! prices parsed once, built from a validated sync file.
//!
//! The table is never mutated after it is built; a reload builds a new one and swaps it in whole
//! (the gate's `swap_table`). Plaintext keys are hashed here and dropped. A table is built from
//! a sync file while it is read ([`KeyTable::from_reader`]), or from a parsed one
//! ([`KeyTable::compile`]); both go through the same checks (`compile.rs`).

use crate::core::accounts::{Account, Accounts, KeyPolicy};
use crate::core::config::{KeyStatus, ModelPrice};
pub use crate::core::models::{ModelPattern, ModelSet};
use ipnet::IpNet;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

mod compile;
mod load;
pub mod verdict;

pub use load::SyncFileSummary;

/// A key's SHA-256 digest.
pub type Digest = [u8; 32];

/// Longest accepted key name, in characters.
pub const MAX_NAME_CHARS: usize = 50;

/// The SHA-256 of a presented or imported key; `sk-` is added when the string lacks it, so
/// `sk-abc` and `abc` are the same key (as in new-api).
pub fn key_digest(secret: &[u8]) -> Digest {
    let mut h = Sha256::new();
    if !secret.starts_with(b"sk-") {
        h.update(b"sk-");
    }
    h.update(secret);
    h.finalize().into()
}

/// A new key: `sk-` + 48 characters from [0-9A-Za-z], from the OS's secure random source.
pub fn generate_key() -> std::io::Result<String> {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut key = String::with_capacity(51);
    key.push_str("sk-");
    let mut buf = [0u8; 64];
    while key.len() < 51 {
        getrandom::fill(&mut buf).map_err(|e| std::io::Error::other(e.to_string()))?;
        // 248 = 4 * 62: rejecting larger bytes keeps every character equally likely.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if key.len() == 51 {
                break;
            }
            key.push(char::from(ALPHABET[usize::from(b % 62)]));
        }
    }
    Ok(key)
}

/// Lower-case hex of a digest.
pub fn digest_hex(d: &Digest) -> String {
    hex::encode(d)
}

/// Hashes a digest by its first eight bytes. SHA-256 output is already uniform, and table keys
/// are chosen by the operator, not by clients, so no keyed hash is needed.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
    fn write_usize(&mut self, _: usize) {}
}

type DigestMap<V> = HashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

/// The index bit that marks a rotated-out key (an entry of `aliases`).
const ALIAS: u32 = 1 << 31;

/// A compiled group.
#[derive(Clone, Debug)]
pub struct Group {
    /// The group's name.
    pub name: Box<str>,
    /// Price multiplier.
    pub ratio: f64,
    /// Allowed models; `None` = all.
    pub models: Option<Arc<ModelSet>>,
}

/// A compiled key. Holds no secret: the table is keyed by the digest.
#[derive(Clone, Debug)]
pub struct KeyRecord {
    /// Stable id; counters attach to it.
    pub id: u64,
    /// Display name.
    pub name: Box<str>,
    /// Enabled or disabled.
    pub status: KeyStatus,
    /// No cap.
    pub unlimited_quota: bool,
    /// Granted quota, units.
    pub quota: i64,
    /// Baseline consumed elsewhere, units.
    pub used: i64,
    /// Unix seconds; `None` = never.
    pub expires_at: Option<i64>,
    /// Allowed models; `None` = no restriction (the group still applies).
    pub models: Option<Arc<ModelSet>>,
    /// Allowed client networks; `None` = no restriction.
    pub allow_ips: Option<Box<[IpNet]>>,
    /// Index into [`KeyTable::groups`].
    pub group: u16,
    /// Account, limits and budget (SPEC §7); `None` when the key has none of them.
    pub policy: Option<Arc<KeyPolicy>>,
}

/// A problem with a sync file; the message names the file, the key and the value.
#[derive(Debug, thiserror::Error)]
#[error("sync file {source_name}: {message}")]
pub struct TableError {
    /// The file (or "<memory>").
    pub source_name: String,
    /// What is wrong.
    pub message: String,
}

/// The runtime key table.
pub struct KeyTable {
    /// The sync file's revision.
    pub revision: u64,
    /// Quota units per USD.
    pub quota_per_unit: f64,
    /// SHA-256 of the file content this table was compiled from (zero when built in memory).
    pub source_digest: Digest,
    /// Digest -> index into `records` (or, with [`ALIAS`] set, into `aliases`). An index map
    /// plus a dense vector costs far less than records stored in the map's (power-of-two
    /// sized) slots: about 240 bytes per key at 1M keys instead of about 300.
    index: DigestMap<u32>,
    records: Vec<KeyRecord>,
    /// Rotated-out keys still in their grace period.
    aliases: Vec<KeyRecord>,
    groups: Vec<Group>,
    prices: HashMap<Box<str>, ModelPrice>,
    /// Accounts (SPEC §7).
    accounts: Accounts,
}

impl fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyTable")
            .field("revision", &self.revision)
            .field("keys", &self.records.len())
            .field("groups", &self.groups.len())
            .finish()
    }
}

impl KeyTable {
    /// A table with no keys (everything is refused with `invalid_api_key`).
    pub fn empty() -> KeyTable {
        KeyTable {
            revision: 0,
            quota_per_unit: 500_000.0,
            source_digest: [0; 32],
            index: DigestMap::default(),
            records: Vec::new(),
            aliases: Vec::new(),
            groups: vec![implicit_default_group()],
            prices: HashMap::new(),
            accounts: Accounts::default(),
        }
    }

    /// The key with this digest.
    #[inline]
    pub fn lookup(&self, digest: &Digest) -> Option<&KeyRecord> {
        self.lookup_slot(digest).map(|(_, k)| k)
    }

    /// [`KeyTable::lookup`], with the record's slot: [`KeyTable::at_slot`] finds the record
    /// again in this table without hashing.
    #[inline]
    pub fn lookup_slot(&self, digest: &Digest) -> Option<(u32, &KeyRecord)> {
        let &slot = self.index.get(digest)?;
        Some((slot, self.at_slot(slot)?))
    }

    /// The record in `slot` (from [`KeyTable::lookup_slot`] on this same table).
    #[inline]
    pub fn at_slot(&self, slot: u32) -> Option<&KeyRecord> {
        if slot & ALIAS == 0 {
            self.records.get(slot as usize)
        } else {
            self.aliases.get((slot & !ALIAS) as usize)
        }
    }

    /// The key's group.
    #[inline]
    pub fn group_of(&self, key: &KeyRecord) -> &Group {
        // `group` indexes are assigned at compile time from this same vector.
        &self.groups[usize::from(key.group)]
    }

    /// The account `key` belongs to.
    #[inline]
    pub fn account_of(&self, key: &KeyRecord) -> Option<&Account> {
        self.accounts.get(key.policy.as_ref()?.account?)
    }

    /// The accounts.
    pub fn accounts(&self) -> &Accounts {
        &self.accounts
    }

    /// All groups.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// Number of keys (rotated-out keys in their grace period not counted).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every key record (no digests).
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.records.iter()
    }

    /// Whether the sync file prices `model` by name (metrics label it by name; others are `other`).
    pub fn is_known_model(&self, model: &str) -> bool {
        model != "*" && self.prices.contains_key(model)
    }

    /// The model names the sync file prices by name.
    pub fn priced_models(&self) -> impl Iterator<Item = &str> {
        self.prices.keys().map(|k| &**k).filter(|k| *k != "*")
    }

    /// The price entry for `model`: its exact entry, else the longest matching `prefix*`
    /// entry, else the `"*"` entry.
    pub fn price(&self, model: &str) -> Option<&ModelPrice> {
        if let Some(p) = self.prices.get(model) {
            return Some(p);
        }
        self.prices
            .iter()
            .filter_map(|(k, v)| {
                let prefix = k.strip_suffix('*').filter(|p| !p.is_empty())?;
                model.starts_with(prefix).then_some((prefix.len(), v))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, v)| v)
            .or_else(|| self.prices.get("*"))
    }
}

fn implicit_default_group() -> Group {
    Group {
        name: "default".into(),
        ratio: 1.0,
        models: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(json: &str) -> Result<KeyTable, TableError> {
        KeyTable::from_json(json.as_bytes(), "test.json")
    }

    #[test]
    fn plaintext_key_with_or_without_prefix_is_the_same_key() {
        assert_eq!(key_digest(b"sk-abc"), key_digest(b"abc"));
        let t = table(r#"{"keys":[{"id":1,"key":"abc"}]}"#).unwrap();
        assert!(t.lookup(&key_digest(b"sk-abc")).is_some());
    }

    #[test]
    fn validation_names_the_key_and_the_problem() {
        let cases = [
            (
                r#"{"keys":[{"id":1,"key":"a"},{"id":1,"key":"b"}]}"#,
                "duplicate id",
            ),
            (
                r#"{"keys":[{"id":1,"key":"a"},{"id":2,"key":"sk-a"}]}"#,
                "duplicate key",
            ),
            (
                r#"{"keys":[{"id":1,"key":"a","group":"vip"}]}"#,
                "unknown group \"vip\"",
            ),
            (
                r#"{"keys":[{"id":1,"key":"a","allow_ips":["10.0.0/8"]}]}"#,
                "10.0.0/8",
            ),
            (
                r#"{"keys":[{"id":1,"key":"a","quota":-5}]}"#,
                "negative quota",
            ),
            (r#"{"keys":[{"id":1,"key_sha256":"abc"}]}"#, "64 hex"),
            (
                r#"{"keys":[{"id":3,"key":"a","name":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}"#,
                "51 characters",
            ),
            (
                r#"{"keys":[{"id":1,"key":"a","models":["g*x"]}]}"#,
                "only allowed at the end",
            ),
        ];
        for (json, want) in cases {
            let e = table(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
            assert!(e.starts_with("sync file test.json:"), "{e}");
        }
    }

    #[test]
    fn model_sets_match_exact_prefix_and_any() {
        let s = ModelSet::compile(&["gpt-4o*", "o1"]).unwrap();
        assert!(s.allows("gpt-4o-mini"));
        assert!(s.allows("o1"));
        assert!(!s.allows("o1-mini"));
        assert!(ModelSet::compile(&["*"]).unwrap().allows("anything"));
        assert!(!ModelSet::compile::<&str>(&[]).unwrap().allows("gpt-4o"));
    }

    #[test]
    fn identical_model_lists_share_one_set() {
        let t = table(
            r#"{"keys":[{"id":1,"key":"a","models":["m"]},{"id":2,"key":"b","models":["m"]}]}"#,
        )
        .unwrap();
        let a = t.lookup(&key_digest(b"a")).unwrap().models.clone().unwrap();
        let b = t.lookup(&key_digest(b"b")).unwrap().models.clone().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn generated_keys_have_the_specs_shape() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 51);
        assert!(a.starts_with("sk-") && a[3..].bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn prices_match_exact_then_longest_prefix_then_star() {
        let t = table(
            r#"{"models":{"gpt-4o":{"ratio":1},"gpt-4o*":{"ratio":2},"gpt-*":{"ratio":3},"*":{"ratio":4}}}"#,
        )
        .unwrap();
        let r = |m: &str| t.price(m).and_then(|p| p.ratio);
        assert_eq!(r("gpt-4o"), Some(1.0));
        assert_eq!(r("gpt-4o-mini"), Some(2.0));
        assert_eq!(r("gpt-3.5"), Some(3.0));
        assert_eq!(r("claude"), Some(4.0));
    }

    #[test]
    fn implicit_default_group_exists() {
        let t = table(r#"{"keys":[{"id":1,"key":"a"}]}"#).unwrap();
        let k = t.lookup(&key_digest(b"a")).unwrap();
        assert_eq!(&*t.group_of(k).name, "default");
    }
}
