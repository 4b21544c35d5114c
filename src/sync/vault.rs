//! The key vault where it meets the environment and the sync file (SPEC §8, "View full key"):
//! the secret read from `key_vault.secret_env`, revealing a key, the check that the secret opens
//! the file's sealed keys (at startup and in `keygate check`), and re-sealing every key under a
//! new secret (`keygate vault rekey`) in one locked, atomic edit.
//!
//! Sealing and opening themselves are pure and live in [`crate::core::vault`].

use crate::core::config::{Config, KeyEntry, SyncFile};
use crate::core::table::{digest_hex, key_digest};
pub use crate::core::vault::{check_same_secret, key_hint, Vault, VaultError};
use crate::sync::edit::SyncEditor;
use serde::Deserialize;
use std::path::Path;

/// The vault secret could not be read. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The variable is not set.
    #[error("key_vault: environment variable {var} is not set (it holds the vault secret: 32 random bytes as 64 hex characters)")]
    Unset {
        /// The variable.
        var: String,
    },
    /// The variable does not hold 64 hex characters.
    #[error("key_vault: environment variable {var}: {problem}")]
    Format {
        /// The variable.
        var: String,
        /// What is wrong with its value.
        problem: VaultError,
    },
}

/// The vault whose secret is in environment variable `var`.
pub fn from_env(var: &str) -> Result<Vault, SecretError> {
    let value = std::env::var_os(var).ok_or_else(|| SecretError::Unset { var: var.into() })?;
    let text = zeroize::Zeroizing::new(value.to_string_lossy().into_owned());
    Vault::from_hex(&text).map_err(|problem| SecretError::Format {
        var: var.into(),
        problem,
    })
}

/// The vault `config` names (`key_vault.secret_env`), or `None` when it has no `key_vault`.
pub fn from_config(config: &Config) -> Result<Option<Vault>, SecretError> {
    config
        .key_vault
        .as_ref()
        .map(|v| from_env(&v.secret_env))
        .transpose()
}

/// Why `reveal` gives no key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevealError {
    /// No key has this id.
    #[error("unknown id {0}")]
    UnknownId(u64),
    /// The key cannot be given back: no vault, or only its hash is stored.
    #[error("not_recoverable: key {id}: {why}; rotate it for a new key instead")]
    NotRecoverable {
        /// The key id.
        id: u64,
        /// Why.
        why: &'static str,
    },
    /// The sealed value does not open (edited, another secret, another id) or is malformed.
    #[error("{0}")]
    Sealed(VaultError),
    /// The sealed value opens but is not the key the file's `key_sha256` names: the key was
    /// changed without the vault after it was sealed.
    #[error("key {id}: sealed value is stale (it is not the key key_sha256 names); rotate it for a new key instead")]
    Stale {
        /// The key id.
        id: u64,
    },
}

impl RevealError {
    /// A short machine-readable code: `unknown_id`, `not_recoverable`, `sealed_value_invalid`.
    pub fn code(&self) -> &'static str {
        match self {
            RevealError::UnknownId(_) => "unknown_id",
            RevealError::NotRecoverable { .. } => "not_recoverable",
            RevealError::Sealed(_) | RevealError::Stale { .. } => "sealed_value_invalid",
        }
    }
}

/// The full key of entry `k`, opened with `vault` and checked against its `key_sha256`.
pub fn reveal_entry(k: &KeyEntry, vault: Option<&Vault>) -> Result<String, RevealError> {
    let id = k.id;
    let not_recoverable = |why| RevealError::NotRecoverable { id, why };
    if k.key_sealed.is_none() && k.key.is_none() {
        return Err(not_recoverable("it is stored only as a hash"));
    }
    let vault = vault.ok_or_else(|| not_recoverable("no key_vault is configured"))?;
    let Some(sealed) = &k.key_sealed else {
        // Given in clear in the file.
        return Ok(k.key.clone().unwrap_or_default());
    };
    let key = vault.open(id, sealed).map_err(RevealError::Sealed)?;
    let matches = match (&k.key_sha256, &k.key) {
        (Some(h), _) => h.eq_ignore_ascii_case(&digest_hex(&key_digest(key.as_bytes()))),
        (None, Some(plain)) => key_digest(plain.as_bytes()) == key_digest(key.as_bytes()),
        (None, None) => false,
    };
    if matches {
        Ok(key)
    } else {
        Err(RevealError::Stale { id })
    }
}

/// The full key of key `id` in `file`.
pub fn reveal(file: &SyncFile, id: u64, vault: Option<&Vault>) -> Result<String, RevealError> {
    let k = file
        .keys
        .iter()
        .find(|k| k.id == id)
        .ok_or(RevealError::UnknownId(id))?;
    reveal_entry(k, vault)
}

/// The vault secret does not open a sealed key of the sync file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The file cannot be read or parsed.
    #[error("sync file {path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// At least one sealed value does not open.
    #[error("sync file {path}: vault secret does not open key {first}'s sealed value ({detail})")]
    DoesNotOpen {
        /// The file.
        path: String,
        /// The first key whose sealed value does not open.
        first: u64,
        /// What that means: every sealed value failed (the wrong secret?) or only some.
        detail: String,
        /// The first failures, one message per key.
        failures: Vec<String>,
    },
}

impl CheckError {
    /// The first failures, one message per key (none for a file that cannot be read).
    pub fn failures(&self) -> &[String] {
        match self {
            CheckError::File { .. } => &[],
            CheckError::DoesNotOpen { failures, .. } => failures,
        }
    }
}

/// Just what the vault check reads of each key (so a large file is not parsed whole again).
#[derive(Deserialize)]
struct SealedOnly {
    #[serde(default)]
    keys: Vec<SealedKey>,
}

#[derive(Deserialize)]
struct SealedKey {
    id: u64,
    #[serde(default)]
    key_sealed: Option<String>,
}

/// Which sealed keys a check opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Every one (`keygate check`).
    All,
    /// At most this many, spread evenly over the file, the first included (`keygate run`:
    /// opening costs microseconds a key, as much as compiling the table again at 1M keys; a
    /// wrong secret fails on the first one, a value damaged by hand is refused at reveal).
    Sample(usize),
}

/// What a check found: the sealed keys in the file, and how many of them it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Keys with a `key_sealed`.
    pub sealed: usize,
    /// How many of them were opened (all of them under [`Coverage::All`]).
    pub tried: usize,
}

/// Open the sealed keys of the sync file at `path` that `coverage` names with `vault`; an
/// absent file has none.
pub fn check_file(path: &Path, vault: &Vault, coverage: Coverage) -> Result<Checked, CheckError> {
    let name = path.display().to_string();
    let file_err = |message: String| CheckError::File {
        path: name.clone(),
        message,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Checked {
                sealed: 0,
                tried: 0,
            })
        }
        Err(e) => return Err(file_err(e.to_string())),
    };
    let parsed: SealedOnly = serde_json::from_slice(&bytes).map_err(|e| file_err(e.to_string()))?;
    drop(bytes);
    let sealed: Vec<(u64, &str)> = parsed
        .keys
        .iter()
        .filter_map(|k| Some((k.id, k.key_sealed.as_deref()?)))
        .collect();
    let step = match coverage {
        Coverage::Sample(n) if n > 0 && sealed.len() > n => sealed.len().div_ceil(n),
        _ => 1,
    };
    let tried = check_sealed(sealed.iter().step_by(step).copied(), vault).map_err(
        |(first, detail, failures)| CheckError::DoesNotOpen {
            path: name.clone(),
            first,
            detail,
            failures,
        },
    )?;
    Ok(Checked {
        sealed: sealed.len(),
        tried,
    })
}

type Failure = (u64, String, Vec<String>);

/// Failures listed one by one in [`CheckError::DoesNotOpen`]; the rest are counted.
const LISTED_FAILURES: usize = 20;

fn check_sealed<'a>(
    sealed: impl Iterator<Item = (u64, &'a str)>,
    vault: &Vault,
) -> Result<usize, Failure> {
    let (mut total, mut failed) = (0usize, 0usize);
    let mut failures = Vec::new();
    let mut first = None;
    for (id, value) in sealed {
        total += 1;
        if let Err(e) = vault.open(id, value) {
            first.get_or_insert(id);
            failed += 1;
            if failures.len() < LISTED_FAILURES {
                failures.push(e.to_string());
            }
        }
    }
    match first {
        None => Ok(total),
        Some(first) => {
            let detail = if failed == total {
                format!(
                    "none of the {total} sealed values tried opens: is it the secret they were sealed with?"
                )
            } else {
                format!(
                    "{failed} of {total} sealed values tried do not open: edited by hand? {}",
                    failures.first().map(String::as_str).unwrap_or("")
                )
            };
            Err((first, detail, failures))
        }
    }
}

/// The vault cannot be used at startup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The secret is missing or malformed.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The secret does not open the sync file's sealed keys.
    #[error(transparent)]
    Check(#[from] CheckError),
}

/// At startup (`keygate run`: a sample; `keygate check`: all): the vault `config` names, once
/// it has opened the sealed keys of its sync file that `coverage` names; `None` without
/// `key_vault`.
pub fn load_checked(
    config: &Config,
    coverage: Coverage,
) -> Result<Option<(Vault, Checked)>, StartError> {
    let Some(vault) = from_config(config)? else {
        return Ok(None);
    };
    let checked = check_file(&config.sync_file, &vault, coverage)?;
    Ok(Some((vault, checked)))
}

/// Re-seal every sealed key under `to` (opened with `from`) in one locked, atomic edit: all
/// keys or none. Returns how many were re-sealed.
pub fn rekey(editor: &SyncEditor, from: &Vault, to: &Vault) -> Result<usize, String> {
    editor.edit(|file| {
        let mut n = 0;
        for k in &mut file.keys {
            let Some(sealed) = &k.key_sealed else {
                continue;
            };
            let key = zeroize::Zeroizing::new(
                from.open(k.id, sealed)
                    .map_err(|e| format!("{e} under the old secret; nothing was changed"))?,
            );
            k.key_sealed = Some(to.seal(k.id, &key).map_err(|e| e.to_string())?);
            n += 1;
        }
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::edit::{create, rotate, KeySpec};

    fn vault(b: u8) -> Vault {
        Vault::from_bytes(&[b; 32])
    }

    #[test]
    fn reveal_gives_back_the_created_and_the_rotated_key() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        let v = vault(1);
        let (id, key) = create(&ed, &KeySpec::default(), Some(&v)).unwrap();
        let file = ed.read().unwrap();
        assert_eq!(file.keys[0].key_hint.as_deref(), Some(&*key_hint(&key)));
        assert_eq!(reveal(&file, id, Some(&v)).unwrap(), key);
        let new = rotate(&ed, id, None, 0, Some(&v)).unwrap();
        assert_eq!(reveal(&ed.read().unwrap(), id, Some(&v)).unwrap(), new);
        let all = Checked {
            sealed: 1,
            tried: 1,
        };
        assert_eq!(check_file(ed.path(), &v, Coverage::All), Ok(all));
        // A rotation without the vault drops the sealed value, which would be stale.
        rotate(&ed, id, None, 0, None).unwrap();
        let e = reveal(&ed.read().unwrap(), id, Some(&v)).unwrap_err();
        assert_eq!(e.code(), "not_recoverable", "{e}");
        assert!(e.to_string().contains("rotate"), "{e}");
    }

    #[test]
    fn a_sealed_value_of_a_changed_key_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        let v = vault(1);
        let (id, _) = create(&ed, &KeySpec::default(), Some(&v)).unwrap();
        ed.edit(|f| {
            f.keys[0].key_sha256 = Some(digest_hex(&key_digest(b"sk-other")));
            Ok(())
        })
        .unwrap();
        let e = reveal(&ed.read().unwrap(), id, Some(&v)).unwrap_err();
        assert_eq!(e, RevealError::Stale { id });
    }

    #[test]
    fn rekey_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        let (old, new) = (vault(1), vault(2));
        let (a, ka) = create(&ed, &KeySpec::default(), Some(&old)).unwrap();
        let (b, kb) = create(&ed, &KeySpec::default(), Some(&old)).unwrap();
        assert_eq!(rekey(&ed, &old, &new), Ok(2));
        let f = ed.read().unwrap();
        assert_eq!(reveal(&f, a, Some(&new)).unwrap(), ka);
        assert_eq!(reveal(&f, b, Some(&new)).unwrap(), kb);
        assert!(reveal(&f, a, Some(&old)).is_err());
        // The wrong old secret changes nothing.
        let before = std::fs::read(ed.path()).unwrap();
        let e = rekey(&ed, &old, &vault(3)).unwrap_err();
        assert!(
            e.contains("fails authentication") && e.contains("nothing"),
            "{e}"
        );
        assert_eq!(std::fs::read(ed.path()).unwrap(), before);
        let e = check_file(ed.path(), &old, Coverage::All)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not open key 1's sealed value (none of the 2"),
            "{e}"
        );
    }

    #[test]
    fn a_sample_opens_an_even_spread_with_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        let v = vault(1);
        for _ in 0..10 {
            create(&ed, &KeySpec::default(), Some(&v)).unwrap();
        }
        let sample = check_file(ed.path(), &v, Coverage::Sample(4)).unwrap();
        assert_eq!((sample.sealed, sample.tried), (10, 4));
        // Keys 1, 4, 7 and 10 are tried: a damaged key 2 passes the sample, not the full check.
        ed.edit(|f| {
            f.keys[1].key_sealed = f.keys[2].key_sealed.clone();
            Ok(())
        })
        .unwrap();
        assert!(check_file(ed.path(), &v, Coverage::Sample(4)).is_ok());
        let e = check_file(ed.path(), &v, Coverage::All)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key 2's sealed value (1 of 10"), "{e}");
        let e = check_file(ed.path(), &vault(2), Coverage::Sample(4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key 1's sealed value (none of the 4"), "{e}");
    }

    #[test]
    fn a_second_secret_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let ed = SyncEditor::new(&dir.path().join("keys.json"));
        create(&ed, &KeySpec::default(), Some(&vault(1))).unwrap();
        let before = std::fs::read(ed.path()).unwrap();
        let e = create(&ed, &KeySpec::default(), Some(&vault(2))).unwrap_err();
        assert!(e.contains("another secret"), "{e}");
        assert_eq!(std::fs::read(ed.path()).unwrap(), before);
    }
}
