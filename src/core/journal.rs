//! The sync file's edit journal (SPEC §8, README "Admin API"): the admin API appends one JSON
//! line per batch of writes to `<sync file>.journal` instead of rewriting the whole file, so a
//! write costs what it changed, not the table's size. A line holds every key and account the
//! batch touched, whole, and the ids it deleted; the state is the file with every line above
//! the file's `revision` folded in, in order. Lines at or below it are skipped: they were
//! folded into the file already (a compaction or `keygate keys` wrote the file, then was
//! stopped before it emptied the journal).
//!
//! Pure: the bytes come from the caller (`crate::support::sync_file` reads and appends them).

use crate::core::config::{AccountEntry, KeyEntry, SyncFile};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// One batch of edits, as written on one line.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Line {
    /// The file's revision once this line is folded in.
    pub revision: u64,
    /// The file's `next_id` once this line is folded in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_id: Option<u64>,
    /// Keys created or changed, whole (one with an id already in the file replaces it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyEntry>,
    /// Ids of keys deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_keys: Vec<u64>,
    /// Accounts created or changed, whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub accounts: BTreeMap<String, AccountEntry>,
    /// Ids of accounts deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_accounts: Vec<String>,
}

/// A journal's lines as read.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Every whole, well-formed line, in order.
    pub lines: Vec<Line>,
    /// How many bytes those lines take: what follows is a torn last line, to be cut off
    /// before anything is appended (or a line appended after it would make it a bad middle
    /// line).
    pub good_len: usize,
    /// The last line was torn (cut short by a crash) and is ignored: why, for a warning.
    pub torn: Option<String>,
}

/// Parse a journal's bytes. A bad line before the last is an error naming its number (the
/// file was damaged or edited by hand: folding what follows it could apply edits out of order);
/// a bad last line is one a crash cut short, never acknowledged, and is ignored.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut at = 0;
    let mut number = 0;
    while at < bytes.len() {
        number += 1;
        let end = memchr::memchr(b'\n', &bytes[at..]).map(|n| at + n + 1);
        let text = &bytes[at..end.unwrap_or(bytes.len())];
        let line = match (end, serde_json::from_slice::<Line>(text)) {
            (Some(_), Ok(line)) => Ok(line),
            (None, Ok(_)) => Err("no end of line".to_string()),
            (_, Err(e)) => Err(e.to_string()),
        };
        let is_last = end.is_none_or(|e| e == bytes.len());
        match line {
            Ok(line) => {
                if let Some(before) = parsed.lines.last().map(|l| l.revision) {
                    if line.revision <= before {
                        return Err(format!(
                            "line {number}: revision {} is not above the line before's ({before})",
                            line.revision
                        ));
                    }
                }
                parsed.lines.push(line);
                at = end.unwrap_or(bytes.len());
                parsed.good_len = at;
            }
            Err(e) if is_last => {
                parsed.torn = Some(format!("line {number} is incomplete ({e}); ignored"));
                break;
            }
            Err(e) => return Err(format!("line {number}: {e}")),
        }
    }
    Ok(parsed)
}

/// Fold the lines above `file.revision` into `file`, in order. Every key is visited once,
/// however many lines there are.
pub fn fold(file: &mut SyncFile, lines: &[Line]) {
    let lines: Vec<&Line> = lines
        .iter()
        .filter(|l| l.revision > file.revision)
        .collect();
    let Some(last) = lines.last() else {
        return;
    };
    // What each id ends up as: `None` deleted.
    let mut keys: HashMap<u64, Option<&KeyEntry>> = HashMap::new();
    for line in &lines {
        for k in &line.keys {
            keys.insert(k.id, Some(k));
        }
        for id in &line.deleted_keys {
            keys.insert(*id, None);
        }
        for (id, a) in &line.accounts {
            file.accounts.insert(id.clone(), a.clone());
        }
        for id in &line.deleted_accounts {
            file.accounts.remove(id);
        }
        if line.next_id.is_some() {
            file.next_id = line.next_id;
        }
    }
    file.revision = last.revision;
    file.keys.retain_mut(|k| match keys.remove(&k.id) {
        None => true,
        Some(Some(new)) => {
            *k = new.clone();
            true
        }
        Some(None) => false,
    });
    // New keys, in id order (as they were created).
    let mut new: Vec<&KeyEntry> = keys.into_values().flatten().collect();
    new.sort_unstable_by_key(|k| k.id);
    file.keys.extend(new.into_iter().cloned());
}

/// What a file's keys were, by id: a 128-bit fingerprint of each entry, so that an edit's
/// journal line can be found by comparing fingerprints, without a copy of the keys from
/// before it (at a million keys, a copy costs more than the rest of the edit).
#[derive(Clone, Debug)]
pub struct Fingerprints(Vec<(u64, u128)>);

impl Fingerprints {
    /// The fingerprints of `keys`.
    pub fn of(keys: &[KeyEntry]) -> Fingerprints {
        let mut v: Vec<(u64, u128)> = keys.iter().map(|k| (k.id, fingerprint(k))).collect();
        // Usually in order already (keys are appended as they are created): linear then.
        v.sort_unstable_by_key(|(id, _)| *id);
        Fingerprints(v)
    }
}

fn fingerprint(k: &KeyEntry) -> u128 {
    let a = foldhash::quality::FixedState::with_seed(0x6b65_7967_6174_6531).hash_one(k);
    let b = foldhash::quality::FixedState::with_seed(0x6a6f_7572_6e61_6c32).hash_one(k);
    (u128::from(a) << 64) | u128::from(b)
}

/// What a batch may touch and still be journaled: keys, accounts, `next_id`. Anything else
/// (groups, prices, `quota_per_unit`) changes how every key is read: the file is written whole.
#[derive(Clone, Debug)]
pub struct Before {
    keys: Fingerprints,
    accounts: BTreeMap<String, AccountEntry>,
    quota_per_unit: f64,
    groups: BTreeMap<String, crate::core::config::GroupEntry>,
    models: BTreeMap<String, crate::core::config::ModelPrice>,
}

impl Before {
    /// What `file` holds now, whose keys have `keys` as fingerprints.
    pub fn new(file: &SyncFile, keys: Fingerprints) -> Before {
        Before {
            keys,
            accounts: file.accounts.clone(),
            quota_per_unit: file.quota_per_unit,
            groups: file.groups.clone(),
            models: file.models.clone(),
        }
    }

    /// The fingerprints of the keys before (still theirs when nothing changed).
    pub fn into_keys(self) -> Fingerprints {
        self.keys
    }

    /// The line that takes a file from this state to `after` (with the fingerprints of
    /// `after`'s keys), or `None` when the change is not key- or account-shaped.
    pub fn line_to(&self, after: &SyncFile, after_keys: &Fingerprints) -> Option<Line> {
        let rest_same = self.quota_per_unit == after.quota_per_unit
            && self.groups == after.groups
            && self.models == after.models;
        if !rest_same {
            return None;
        }
        let (changed, deleted_keys) = compare(&self.keys, after_keys);
        let index: HashMap<u64, usize> = if changed.is_empty() {
            HashMap::new()
        } else {
            // The changed keys are usually at the end (new keys): look there first.
            after
                .keys
                .iter()
                .enumerate()
                .rev()
                .map(|(i, k)| (k.id, i))
                .collect()
        };
        let keys = changed
            .iter()
            .filter_map(|id| index.get(id).map(|&i| after.keys[i].clone()))
            .collect();
        let accounts = after
            .accounts
            .iter()
            .filter(|(id, a)| self.accounts.get(*id) != Some(a))
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        let deleted_accounts = self
            .accounts
            .keys()
            .filter(|id| !after.accounts.contains_key(*id))
            .cloned()
            .collect();
        Some(Line {
            revision: after.revision,
            next_id: after.next_id,
            keys,
            deleted_keys,
            accounts,
            deleted_accounts,
        })
    }
}

/// Ids new or changed in `after`, and ids gone from it, by a walk of both (sorted by id).
fn compare(before: &Fingerprints, after: &Fingerprints) -> (Vec<u64>, Vec<u64>) {
    let (mut changed, mut deleted) = (Vec::new(), Vec::new());
    let (mut b, mut a) = (before.0.iter().peekable(), after.0.iter().peekable());
    loop {
        match (b.peek(), a.peek()) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                if x.1 != y.1 {
                    changed.push(y.0);
                }
                b.next();
                a.next();
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                deleted.push(x.0);
                b.next();
            }
            (_, Some(y)) => {
                changed.push(y.0);
                a.next();
            }
            (Some(x), None) => {
                deleted.push(x.0);
                b.next();
            }
            (None, None) => return (changed, deleted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(ids: &[u64]) -> SyncFile {
        let mut f = SyncFile::parse(b"{}").unwrap();
        f.keys = ids
            .iter()
            .map(|&id| KeyEntry::new(id, format!("{id:064x}")))
            .collect();
        f
    }

    #[test]
    fn a_line_carries_what_changed_and_folds_back_to_the_same_file() {
        let mut f = file(&[1, 2, 3]);
        f.accounts.insert("gone".into(), AccountEntry::default());
        let before = Before::new(&f, Fingerprints::of(&f.keys));
        let start = f.clone();
        f.keys.retain(|k| k.id != 2);
        f.keys[0].name = "renamed".into();
        f.keys.push(KeyEntry::new(4, "4".repeat(64)));
        f.accounts.clear();
        f.accounts.insert("new".into(), AccountEntry::default());
        f.next_id = Some(5);
        f.revision = 1;
        let line = before.line_to(&f, &Fingerprints::of(&f.keys)).unwrap();
        assert_eq!(line.keys.iter().map(|k| k.id).collect::<Vec<_>>(), [1, 4]);
        assert_eq!(line.deleted_keys, [2]);
        assert_eq!(line.deleted_accounts, ["gone"]);
        let mut folded = start;
        let text = format!("{}\n", serde_json::to_string(&line).unwrap());
        fold(&mut folded, &parse(text.as_bytes()).unwrap().lines);
        assert_eq!(folded, f);
    }

    #[test]
    fn a_group_change_is_not_journaled() {
        let mut f = file(&[1]);
        let before = Before::new(&f, Fingerprints::of(&f.keys));
        f.quota_per_unit = 1.0;
        assert!(before.line_to(&f, &Fingerprints::of(&f.keys)).is_none());
    }

    #[test]
    fn lines_at_or_below_the_file_revision_are_skipped() {
        let mut f = file(&[1]);
        f.revision = 5;
        let line = |rev: u64, id: u64| Line {
            revision: rev,
            keys: vec![KeyEntry::new(id, "a".repeat(64))],
            ..Line::default()
        };
        fold(&mut f, &[line(5, 7), line(6, 8)]);
        assert_eq!(f.keys.iter().map(|k| k.id).collect::<Vec<_>>(), [1, 8]);
        assert_eq!(f.revision, 6);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_bad_middle_line_is_an_error() {
        let good = "{\"revision\": 2}\n";
        let p = parse(format!("{good}{{\"revision\": 3, \"ke").as_bytes()).unwrap();
        assert_eq!((p.lines.len(), p.good_len), (1, good.len()));
        assert!(p.torn.unwrap().starts_with("line 2 is incomplete"));
        let e = parse(format!("{good}{{\"revision\": 3, \"ke\n{good}").as_bytes()).unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse(format!("{good}{good}").as_bytes()).unwrap_err();
        assert!(e.contains("not above"), "{e}");
    }
}
