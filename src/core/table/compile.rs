//! Validating and compiling a sync file's members one at a time, as they are read (see
//! [`Compiler`]). [`KeyTable::compile`] of a parsed file goes through the same steps, so both
//! check alike and say the same.

use super::{
    implicit_default_group, key_digest, Digest, DigestMap, Group, KeyRecord, KeyTable,
    ModelPattern, ModelSet, ALIAS, MAX_NAME_CHARS,
};
use crate::core::accounts::{Accounts, PolicyCompiler};
use crate::core::config::{AccountEntry, GroupEntry, KeyEntryOf, ModelPrice};
use crate::core::net::parse_cidr;
use ipnet::IpNet;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Validates and compiles a sync file member by member, keys one at a time, so a file can be
/// compiled while it is read and no key is held once compiled. Reports what checking the
/// whole parsed file reports: `quota_per_unit`, then the groups, the model prices, the
/// accounts, the groups' limits, then the first bad key and its first failed check (once a key
/// is bad, the keys after it are only counted).
///
/// Keys need the groups and the accounts. Until those members are read, they are taken to be
/// absent (as in most files: `keygate keys` writes groups before keys, and no `accounts` when
/// there are none). When one of them comes after keys were compiled, those keys are dropped
/// and the compiler turns [`Compiler::stale`]: the caller then reads the file again, handing
/// it only the keys ([`Compiler::restart_keys`]).
pub(super) struct Compiler {
    pub(super) revision: u64,
    pub(super) quota_per_unit: f64,
    groups: Vec<Group>,
    group_index: HashMap<Box<str>, u16>,
    group_error: Option<String>,
    prices: HashMap<Box<str>, ModelPrice>,
    model_error: Option<String>,
    accounts: Accounts,
    account_error: Option<String>,
    /// The groups' limits as given: the policies are compiled from them and the accounts.
    group_entries: BTreeMap<String, GroupEntry>,
    policies: PolicyCompiler,
    limits_error: Option<String>,
    /// Keys that share a model list share one compiled set.
    model_sets: HashMap<Vec<String>, Arc<ModelSet>>,
    /// The last model list and IP list compiled: runs of keys with the same lists are the
    /// common case, and a comparison costs less than a hash lookup or a parse.
    last_models: Option<(Vec<String>, Arc<ModelSet>)>,
    last_ips: Option<(Vec<String>, Box<[IpNet]>)>,
    /// The highest id so far while ids only increase (as `keygate keys` writes them): no set
    /// is needed to find a repeat until one comes out of order.
    max_id: Option<u64>,
    ids: Option<HashSet<u64>>,
    keys_hint: usize,
    index: DigestMap<u32>,
    records: Vec<KeyRecord>,
    aliases: Vec<KeyRecord>,
    /// Key entries read so far.
    entries: usize,
    key_error: Option<String>,
    /// Keys were compiled against groups or accounts that a later member replaced.
    stale: bool,
    /// Only keys are taken (a second read): the other members are known already.
    keys_only: bool,
    /// Only count the keys (the file is being parsed for serde's verdict alone).
    pub(super) parse_only: bool,
}

impl Compiler {
    pub(super) fn new(keys_hint: usize) -> Compiler {
        let mut c = Compiler {
            revision: 0,
            quota_per_unit: 500_000.0,
            groups: Vec::new(),
            group_index: HashMap::new(),
            group_error: None,
            prices: HashMap::new(),
            model_error: None,
            accounts: Accounts::default(),
            account_error: None,
            group_entries: BTreeMap::new(),
            policies: PolicyCompiler::default(),
            limits_error: None,
            model_sets: HashMap::new(),
            last_models: None,
            last_ips: None,
            max_id: None,
            ids: None,
            keys_hint,
            index: DigestMap::default(),
            records: Vec::new(),
            aliases: Vec::new(),
            entries: 0,
            key_error: None,
            stale: false,
            keys_only: false,
            parse_only: false,
        };
        c.set_groups(BTreeMap::new());
        c.clear_keys();
        c
    }

    /// Whether the keys must be read again (see [`Compiler`]).
    pub(super) fn stale(&self) -> bool {
        self.stale
    }

    /// Compile the keys again, from a second read of the file; only its keys are taken.
    pub(super) fn restart_keys(&mut self) {
        self.stale = false;
        self.keys_only = true;
        self.clear_keys();
    }

    fn clear_keys(&mut self) {
        self.model_sets = HashMap::new();
        self.last_models = None;
        self.last_ips = None;
        self.max_id = None;
        self.ids = None;
        self.index = DigestMap::default();
        self.records = Vec::new();
        self.aliases = Vec::new();
        self.entries = 0;
        self.key_error = None;
        self.policies.restart(&self.accounts);
    }

    /// A member the keys depend on changed: keys compiled so far are of no use.
    fn keys_depend_on_it(&mut self) {
        if self.entries > 0 && !self.parse_only {
            self.stale = true;
            self.clear_keys();
        }
        self.policies = match PolicyCompiler::new(&self.group_entries, &self.accounts) {
            Ok(p) => {
                self.limits_error = None;
                p
            }
            Err(e) => {
                self.limits_error = Some(e);
                PolicyCompiler::default()
            }
        };
    }

    pub(super) fn set_groups(&mut self, file_groups: BTreeMap<String, GroupEntry>) {
        if self.keys_only {
            return;
        }
        let mut groups = Vec::with_capacity(file_groups.len() + 1);
        let mut group_index = HashMap::new();
        let mut compile = || -> Result<(), String> {
            for (name, g) in &file_groups {
                if !(g.ratio.is_finite() && g.ratio >= 0.0) {
                    return Err(format!("group {name:?}: ratio must be >= 0"));
                }
                let models = match &g.models {
                    None => None,
                    Some(list) => Some(Arc::new(
                        ModelSet::compile(list).map_err(|e| format!("group {name:?}: {e}"))?,
                    )),
                };
                let idx = u16::try_from(groups.len()).map_err(|_| "too many groups")?;
                group_index.insert(name.as_str().into(), idx);
                groups.push(Group {
                    name: name.as_str().into(),
                    ratio: g.ratio,
                    models,
                });
            }
            if !group_index.contains_key("default") {
                let idx = u16::try_from(groups.len()).map_err(|_| "too many groups")?;
                group_index.insert("default".into(), idx);
                groups.push(implicit_default_group());
            }
            Ok(())
        };
        self.group_error = compile().err();
        (self.groups, self.group_index) = (groups, group_index);
        self.group_entries = file_groups;
        self.keys_depend_on_it();
    }

    pub(super) fn set_models(&mut self, models: &BTreeMap<String, ModelPrice>) {
        if self.keys_only {
            return;
        }
        let check = || -> Result<(), String> {
            for (name, p) in models {
                ModelPattern::parse(name).map_err(|e| format!("models: {e}"))?;
                for (field, v) in [
                    ("ratio", p.ratio),
                    ("completion_ratio", p.completion_ratio),
                    ("price", p.price),
                ] {
                    if let Some(v) = v {
                        if !(v.is_finite() && v >= 0.0) {
                            return Err(format!("model {name:?}: {field} must be >= 0"));
                        }
                    }
                }
                if p.ratio.is_none() && p.price.is_none() {
                    return Err(format!("model {name:?}: needs a ratio or a price"));
                }
            }
            Ok(())
        };
        self.model_error = check().err();
        self.prices = models
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.clone()))
            .collect();
    }

    pub(super) fn set_accounts(&mut self, accounts: &BTreeMap<String, AccountEntry>) {
        if self.keys_only || (accounts.is_empty() && self.accounts.is_empty()) {
            return;
        }
        (self.accounts, self.account_error) = match Accounts::compile_entries(accounts) {
            Ok(a) => (a, None),
            Err(e) => (Accounts::default(), Some(e)),
        };
        self.keys_depend_on_it();
    }

    /// Validate and compile the next key entry.
    pub(super) fn add_key<S: AsRef<str>>(&mut self, k: &KeyEntryOf<S>) {
        let entry = self.entries;
        self.entries += 1;
        if self.key_error.is_some() || self.stale || self.parse_only {
            return;
        }
        if entry == 0 && self.records.capacity() < self.keys_hint {
            // Sized once, not grown by doubling while the file is read.
            self.index = DigestMap::with_capacity_and_hasher(self.keys_hint, Default::default());
            self.records = Vec::with_capacity(self.keys_hint);
        }
        if let Err(m) = self.compile_key(k) {
            self.key_error = Some(format!("key {} (entry {}): {m}", k.id, entry + 1));
        }
    }

    fn compile_key<S: AsRef<str>>(&mut self, k: &KeyEntryOf<S>) -> Result<(), String> {
        if !self.new_id(k.id) {
            return Err("duplicate id".into());
        }
        let name = k.name.as_ref();
        let name_len = name.chars().count();
        if name_len > MAX_NAME_CHARS {
            return Err(format!(
                "name is {name_len} characters, at most {MAX_NAME_CHARS} are allowed"
            ));
        }
        if k.quota < 0 {
            return Err(format!("negative quota {}", k.quota));
        }
        if k.used < 0 {
            return Err(format!("negative used {}", k.used));
        }
        if k.expires_at < -1 {
            return Err(format!(
                "expires_at {} is neither -1 (never) nor a unix time",
                k.expires_at
            ));
        }
        let digest = match (&k.key_sha256, &k.key) {
            (Some(h), None) => parse_hex_digest(h.as_ref())?,
            (None, Some(plain)) => {
                let plain = plain.as_ref();
                if plain.is_empty()
                    || plain == "sk-"
                    || !plain.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err("key: must be printable ASCII without spaces".into());
                }
                key_digest(plain.as_bytes())
            }
            (Some(_), Some(_)) => return Err("give either key_sha256 or key, not both".into()),
            (None, None) => return Err("needs key_sha256 (or key)".into()),
        };
        let group = *self
            .group_index
            .get(k.group.as_ref())
            .ok_or_else(|| format!("unknown group {:?}", k.group.as_ref()))?;
        let models = match &k.models {
            None => None,
            Some(list) => Some(match &self.last_models {
                Some((last, set)) if same_list(last, list) => set.clone(),
                _ => {
                    let owned: Vec<String> = list.iter().map(|m| m.as_ref().to_owned()).collect();
                    let set = match self.model_sets.get(&owned) {
                        Some(set) => set.clone(),
                        None => {
                            let set = Arc::new(ModelSet::compile(&owned)?);
                            self.model_sets.insert(owned.clone(), set.clone());
                            set
                        }
                    };
                    self.last_models = Some((owned, set.clone()));
                    set
                }
            }),
        };
        let allow_ips = match &k.allow_ips {
            Some(list) if !list.is_empty() => Some(match &self.last_ips {
                Some((last, nets)) if same_list(last, list) => nets.clone(),
                _ => {
                    let nets = list
                        .iter()
                        .map(|s| parse_cidr(s.as_ref()))
                        .collect::<Result<Box<[_]>, _>>()?;
                    let owned = list.iter().map(|s| s.as_ref().to_owned()).collect();
                    self.last_ips = Some((owned, nets.clone()));
                    nets
                }
            }),
            _ => None,
        };
        let record = KeyRecord {
            id: k.id,
            name: name.into(),
            status: k.status,
            unlimited_quota: k.unlimited_quota,
            quota: k.quota,
            used: k.used,
            expires_at: (k.expires_at > 0).then_some(k.expires_at),
            models,
            allow_ips,
            group,
            policy: self.policies.key(&self.accounts, k)?,
        };
        let slot = |n: usize| u32::try_from(n).ok().filter(|n| n & ALIAS == 0);
        for prev in &k.previous_keys {
            let old = parse_hex_digest(&prev.key_sha256)?;
            let mut alias = record.clone();
            alias.expires_at = Some(alias.expires_at.map_or(prev.until, |e| e.min(prev.until)));
            let n = slot(self.aliases.len()).ok_or("too many keys")?;
            if self.index.insert(old, n | ALIAS).is_some() {
                return Err("duplicate key (a previous key equals another key)".into());
            }
            self.aliases.push(alias);
        }
        let n = slot(self.records.len()).ok_or("too many keys")?;
        if self.index.insert(digest, n).is_some() {
            return Err("duplicate key (same hash as an earlier entry)".into());
        }
        self.records.push(record);
        Ok(())
    }

    /// Whether no earlier key has this id.
    fn new_id(&mut self, id: u64) -> bool {
        if self.ids.is_none() {
            if self.max_id.is_none_or(|max| id > max) {
                self.max_id = Some(id);
                return true;
            }
            // Out of order: from here on, a set of the ids so far (every key before this one
            // compiled, or this one would not be compiled).
            let mut set = HashSet::with_capacity(self.keys_hint.max(self.records.len() + 1));
            set.extend(self.records.iter().map(|r| r.id));
            self.ids = Some(set);
        }
        self.ids.as_mut().is_some_and(|set| set.insert(id))
    }

    /// The table, or the problem a check of the whole file reports first.
    pub(super) fn finish(self) -> Result<KeyTable, String> {
        if !(self.quota_per_unit.is_finite() && self.quota_per_unit > 0.0) {
            return Err("quota_per_unit: must be a positive number".into());
        }
        let header = [
            self.group_error,
            self.model_error,
            self.account_error,
            self.limits_error,
        ];
        if let Some(e) = header.into_iter().flatten().next() {
            return Err(e);
        }
        if let Some(e) = self.key_error {
            return Err(e);
        }
        let mut records = self.records;
        // A key-count hint far above the real count (see `count_id_members`) is not kept.
        if records.capacity() - records.len() > records.len() / 8 {
            records.shrink_to_fit();
        }
        Ok(KeyTable {
            revision: self.revision,
            quota_per_unit: self.quota_per_unit,
            source_digest: [0; 32],
            index: self.index,
            records,
            aliases: self.aliases,
            groups: self.groups,
            prices: self.prices,
            accounts: self.accounts,
        })
    }
}

/// Whether a list read from the file is `last`.
fn same_list<S: AsRef<str>>(last: &[String], list: &[S]) -> bool {
    last.len() == list.len() && last.iter().zip(list).all(|(a, b)| a == b.as_ref())
}

pub(super) fn parse_hex_digest(h: &str) -> Result<Digest, String> {
    /// Each byte's value as a hex digit, 0xFF for the others: a lookup, so that the random
    /// digits of a hash cost no mispredicted branches (a sync file holds a million of them).
    const HEX: [u8; 256] = {
        let mut t = [0xFF; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let mut d = [0u8; 32];
    let mut bad = h.len() != 64;
    if !bad {
        for (out, pair) in d.iter_mut().zip(h.as_bytes().chunks_exact(2)) {
            let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
            bad |= (hi | lo) == 0xFF;
            *out = hi << 4 | (lo & 0x0F);
        }
    }
    if bad {
        return Err(format!(
            "key_sha256 must be 64 hex characters, got {:?}",
            h.chars().take(70).collect::<String>()
        ));
    }
    Ok(d)
}
