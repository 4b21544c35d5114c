//! `keygate keys reveal` and `keygate vault rekey`: the command-line side of the key vault
//! (SPEC §8). The work is done by [`crate::sync::vault`].

use crate::core::config::Config;
use crate::sync::edit::SyncEditor;
use crate::sync::vault;

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
