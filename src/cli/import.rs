//! `keygate import new-api`: merging a new-api token export into the sync file.
//!
//! A new-api token row has `key` (without `sk-`), integer `status` (1 enabled, 2 disabled,
//! 3 expired, 4 exhausted), `remain_quota`, `used_quota`, `unlimited_quota`, `expired_time`
//! (-1 = never), `model_limits_enabled` with comma-separated `model_limits`, newline-separated
//! `allow_ips`, and `group`. Granted quota = remain + used, the `used` baseline = `used_quota`,
//! keys are stored hashed, an empty group becomes `default`. Rows that cannot be imported are
//! skipped with a reason; the rest are written in one edit.

use crate::core::config::{KeyEntry, KeyStatus};
use crate::core::table::{digest_hex, key_digest, MAX_NAME_CHARS};
use crate::core::vault::Vault;
use crate::sync::edit::SyncEditor;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// One token row of a new-api export (other columns are ignored).
#[derive(Deserialize, Debug)]
struct Token {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    status: Option<i64>,
    #[serde(default)]
    remain_quota: Option<i64>,
    #[serde(default)]
    used_quota: Option<i64>,
    #[serde(default)]
    unlimited_quota: Option<bool>,
    #[serde(default)]
    expired_time: Option<i64>,
    #[serde(default)]
    model_limits_enabled: Option<bool>,
    #[serde(default)]
    model_limits: Option<String>,
    #[serde(default)]
    allow_ips: Option<String>,
    #[serde(default)]
    group: Option<String>,
}

/// What an import did.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ImportReport {
    /// `(id, name)` of each imported key.
    pub imported: Vec<(u64, String)>,
    /// `(row, reason)` of each skipped row (row = 1-based position and name).
    pub skipped: Vec<(String, String)>,
}

fn rows(bytes: &[u8]) -> Result<Vec<serde_json::Value>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let list = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(mut o) => match o.remove("data") {
            Some(serde_json::Value::Array(a)) => a,
            Some(serde_json::Value::Object(mut d)) => match d.remove("items") {
                Some(serde_json::Value::Array(a)) => a,
                _ => return Err("expected an array of token rows".into()),
            },
            _ => return Err("expected an array of token rows".into()),
        },
        _ => return Err("expected an array of token rows".into()),
    };
    Ok(list)
}

/// Merge a new-api token export into the sync file behind `editor`. Keys are stored hashed,
/// with their hint, and sealed when a `vault` is given.
pub fn import_new_api(
    editor: &SyncEditor,
    export: &[u8],
    vault: Option<&Vault>,
) -> Result<ImportReport, String> {
    let rows = rows(export)?;
    editor.edit(|file| {
        if let Some(v) = vault {
            crate::core::vault::check_same_secret(file, v)?;
        }
        let mut report = ImportReport::default();
        let mut ids: HashSet<u64> = file.keys.iter().map(|k| k.id).collect();
        let mut hashes: HashSet<String> = file
            .keys
            .iter()
            .filter_map(|k| {
                k.key_sha256.clone().or_else(|| {
                    k.key
                        .as_ref()
                        .map(|p| digest_hex(&key_digest(p.as_bytes())))
                })
            })
            .collect();
        let groups: HashSet<&str> = file.groups.keys().map(|g| g.as_str()).collect();
        let high_water = crate::sync::edit::next_free_id(file);
        let mut next_id = high_water;
        let mut new_entries = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            let label_name = row
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let label = format!("row {} ({label_name:?})", i + 1);
            let t: Token = match serde_json::from_value(row) {
                Ok(t) => t,
                Err(e) => {
                    report.skipped.push((label, format!("malformed row: {e}")));
                    continue;
                }
            };
            match token_entry(&t, &groups) {
                Err(reason) => report.skipped.push((label, reason)),
                Ok(mut entry) => {
                    let hash = entry.key_sha256.clone().unwrap_or_default();
                    if !hashes.insert(hash) {
                        report.skipped.push((label, "key already present".into()));
                        continue;
                    }
                    // A new-api id is kept when it is free and was never handed out here.
                    entry.id = match t.id.filter(|id| *id >= high_water && !ids.contains(id)) {
                        Some(id) => id,
                        None => {
                            while ids.contains(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        }
                    };
                    ids.insert(entry.id);
                    let key = t.key.as_deref().map(str::trim).unwrap_or("");
                    let key = if key.starts_with("sk-") {
                        key.to_string()
                    } else {
                        format!("sk-{key}")
                    };
                    crate::sync::edit::set_secret_fields(&mut entry, &key, vault)?;
                    report.imported.push((entry.id, entry.name.clone()));
                    new_entries.push(entry);
                }
            }
        }
        file.keys.extend(new_entries);
        file.next_id = Some(crate::sync::edit::next_free_id(file));
        Ok(report)
    })
}

/// The sync-file entry for a token row, or why it cannot be imported. The id is set later.
fn token_entry(t: &Token, groups: &HashSet<&str>) -> Result<KeyEntry, String> {
    let key = t.key.as_deref().map(str::trim).unwrap_or("");
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("no usable key".into());
    }
    let name = t.name.clone().unwrap_or_default();
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("name over {MAX_NAME_CHARS} characters"));
    }
    let status = match t.status.unwrap_or(1) {
        2 => KeyStatus::Disabled,
        1 | 3 | 4 => KeyStatus::Enabled,
        s => return Err(format!("unknown status {s}")),
    };
    let remain = t.remain_quota.unwrap_or(0);
    let used = t.used_quota.unwrap_or(0);
    if remain < 0 || used < 0 {
        return Err(format!("negative quota (remain {remain}, used {used})"));
    }
    let group = match t.group.as_deref().map(str::trim) {
        None | Some("") => "default".to_string(),
        Some(g) => g.to_string(),
    };
    if group != "default" && !groups.contains(group.as_str()) {
        return Err(format!(
            "unknown group {group:?} (add it to the sync file's groups first)"
        ));
    }
    let models = if t.model_limits_enabled.unwrap_or(false) {
        Some(
            t.model_limits
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect(),
        )
    } else {
        None
    };
    let allow: Vec<String> = t
        .allow_ips
        .as_deref()
        .unwrap_or("")
        .split(['\n', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for a in &allow {
        crate::core::net::parse_cidr(a)?;
    }
    let expires_at = match t.expired_time.unwrap_or(-1) {
        e if e <= 0 => -1,
        e => e,
    };
    Ok(KeyEntry {
        name,
        status,
        quota: remain + used,
        unlimited_quota: t.unlimited_quota.unwrap_or(false),
        used,
        expires_at,
        models,
        allow_ips: (!allow.is_empty()).then_some(allow),
        group,
        ..KeyEntry::new(0, digest_hex(&key_digest(key.as_bytes())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::KeyTable;

    #[test]
    fn imports_and_skips_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        let export = br#"[
            {"id": 5, "key": "abcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdef", "name": "web", "status": 1,
             "remain_quota": 700, "used_quota": 300, "unlimited_quota": false, "expired_time": -1,
             "model_limits_enabled": true, "model_limits": "gpt-4o-mini, gpt-4o", "allow_ips": "10.0.0.0/8\n203.0.113.7", "group": ""},
            {"id": 6, "key": "zzz", "name": "bad ip", "allow_ips": "10.0.0/8"},
            {"id": 7, "key": "yyy", "name": "vip", "group": "vip"},
            {"id": 8, "key": "abcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdef", "name": "dup"},
            {"id": 9, "key": "xxx", "name": "off", "status": 2, "remain_quota": 5}
        ]"#;
        let r = import_new_api(&ed, export, None).unwrap();
        assert_eq!(r.imported, vec![(5, "web".into()), (9, "off".into())]);
        let reasons: Vec<&str> = r.skipped.iter().map(|(_, why)| why.as_str()).collect();
        assert!(reasons[0].contains("10.0.0/8"));
        assert!(reasons[1].contains("unknown group \"vip\""));
        assert!(reasons[2].contains("already present"));
        let t = KeyTable::load(ed.path()).unwrap();
        let k = t
            .lookup(&key_digest(
                b"sk-abcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdef",
            ))
            .unwrap();
        assert_eq!((k.quota, k.used), (1000, 300));
        assert!(k.models.as_ref().unwrap().allows("gpt-4o"));
        assert_eq!(k.allow_ips.as_ref().unwrap().len(), 2);
        let text = std::fs::read_to_string(ed.path()).unwrap();
        assert!(!text.contains("abcdefabcdef"), "keys are stored hashed");
    }
}
