//! `keygate keys reveal` and `keygate vault rekey`: the command-line side of the key vault
//! (SPEC §8). The work is done by [`crate::sync::vault`].

use crate::core::config::Config;
use crate::sync::edit::SyncEditor;
use crate::sync::vault::{self, Coverage, SecretError, StartError};

/// `keygate vault …`
#[derive(clap::Subcommand, Debug)]
pub enum VaultCommand {
    /// Re-seal every sealed key under a new secret, in one locked, atomic edit of the sync
    /// file (all keys or none). Then give the gateway the new secret and restart it.
    Rekey {
        /// The variable holding the current secret (default: the config's key_vault.secret_env).
        #[arg(long)]
        from_env: Option<String>,
        /// The variable holding the new secret (64 hex characters).
        #[arg(long)]
        to_env: String,
    },
}

/// Run a `keygate vault` command.
pub fn run(config: &Config, json: bool, command: VaultCommand) -> Result<(), String> {
    match command {
        VaultCommand::Rekey { from_env, to_env } => {
            let from_var = from_env
                .or_else(|| config.key_vault.as_ref().map(|v| v.secret_env.clone()))
                .ok_or("--from-env is needed: the config has no key_vault to take it from")?;
            let from = vault::from_env(&from_var).map_err(|e| e.to_string())?;
            let to = vault::from_env(&to_env).map_err(|e| e.to_string())?;
            let editor = SyncEditor::new(&config.sync_file);
            let n = vault::rekey(&editor, &from, &to)?;
            if json {
                println!("{}", serde_json::json!({"resealed": n, "ok": true}));
            } else {
                println!("re-sealed {n} keys in {}", config.sync_file.display());
                let var = config
                    .key_vault
                    .as_ref()
                    .map_or("key_vault.secret_env", |v| v.secret_env.as_str());
                eprintln!(
                    "now give the gateway the new secret in {var} and restart it: the old \
                     secret no longer opens these keys"
                );
            }
            Ok(())
        }
    }
}

/// `keygate keys reveal ID`: print key `id` in full.
pub fn reveal(config: &Config, id: u64, json: bool) -> Result<(), String> {
    let file = SyncEditor::new(&config.sync_file).read()?;
    let k = file
        .keys
        .iter()
        .find(|k| k.id == id)
        .ok_or_else(|| format!("unknown id {id}"))?;
    // The secret is read only when there is something to open.
    let v = if config.key_vault.is_some() && (k.key_sealed.is_some() || k.key.is_some()) {
        vault::from_config(config).map_err(|e| e.to_string())?
    } else {
        None
    };
    let key = vault::reveal_entry(k, v.as_ref()).map_err(|e| match e {
        vault::RevealError::NotRecoverable { .. } => {
            format!("{e} (keygate keys rotate {id})")
        }
        _ => e.to_string(),
    })?;
    if json {
        println!("{}", serde_json::json!({"id": id, "key": key}));
    } else {
        println!("{key}");
    }
    Ok(())
}

/// `keygate run`, before anything is served: the vault secret must be set, well-formed, and
/// open a sample of the sync file's sealed keys (a wrong secret fails on the first one). The
/// vault, for the admin API to seal and reveal with.
pub fn check_at_start(config: &Config) -> Result<Option<crate::core::vault::Vault>, String> {
    match vault::load_checked(config, Coverage::Sample(64)).map_err(|e| e.to_string())? {
        Some((v, c)) => {
            log::info!(
                "key vault: the secret opens the {} sealed keys tried of {}",
                c.tried,
                c.sealed
            );
            Ok(Some(v))
        }
        None => Ok(None),
    }
}

/// `keygate check`: every sealed key must open; the line to print, if the config has a vault.
/// With `no_env`, an unset secret variable is added to `unset` instead of failing.
pub fn check_all(
    config: &Config,
    no_env: bool,
    unset: &mut Vec<String>,
) -> Result<Option<String>, String> {
    match vault::load_checked(config, Coverage::All) {
        Ok(None) => Ok(None),
        Ok(Some((_, c))) => Ok(Some(format!(
            "key vault: the secret opens all {} sealed keys",
            c.sealed
        ))),
        Err(StartError::Secret(SecretError::Unset { var })) if no_env => {
            unset.push(format!("key_vault: environment variable {var} is not set"));
            Ok(None)
        }
        Err(e) => {
            // Each key that failed on a line of its own.
            let mut message = e.to_string();
            if let StartError::Check(c) = &e {
                if c.failures().len() > 1 {
                    for f in c.failures() {
                        message.push_str("\n  ");
                        message.push_str(f);
                    }
                }
            }
            Err(message)
        }
    }
}
