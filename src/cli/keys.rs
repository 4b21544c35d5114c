//! `keygate keys …`: the flags a key takes, the subcommands, and what each prints.

use crate::config::Config;
use clap::Subcommand;

#[derive(clap::Args, Clone, Default)]
pub struct KeyFlags {
    /// Display name (at most 50 characters).
    #[arg(long)]
    name: Option<String>,
    /// Granted quota, in quota units.
    #[arg(long, allow_negative_numbers = true, conflicts_with = "unlimited")]
    quota: Option<i64>,
    /// No quota cap (usage is still counted).
    #[arg(long)]
    unlimited: bool,
    /// Make an unlimited key limited again (update only).
    #[arg(long, conflicts_with = "unlimited")]
    limited: bool,
    /// Unix seconds, or -1 for never.
    #[arg(long, allow_negative_numbers = true)]
    expires_at: Option<i64>,
    /// Allowed models, comma-separated (suffix * wildcard); "" allows none.
    #[arg(long, conflicts_with = "any_model")]
    models: Option<String>,
    /// Remove the model restriction.
    #[arg(long)]
    any_model: bool,
    /// Allowed client IPs and CIDRs, comma-separated.
    #[arg(long, conflicts_with = "any_ip")]
    allow_ips: Option<String>,
    /// Remove the IP restriction.
    #[arg(long)]
    any_ip: bool,
    /// The group.
    #[arg(long)]
    group: Option<String>,
    /// The account the key belongs to ("" for none).
    #[arg(long)]
    account: Option<String>,
    #[command(flatten)]
    limits: crate::cli::accounts::LimitFlags,
}

impl KeyFlags {
    fn spec(&self) -> anyhow::Result<crate::sync::edit::KeySpec> {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        Ok(crate::sync::edit::KeySpec {
            name: self.name.clone(),
            quota: self.quota,
            unlimited: if self.unlimited {
                Some(true)
            } else if self.limited {
                Some(false)
            } else {
                None
            },
            expires_at: self.expires_at,
            models: if self.any_model {
                Some(None)
            } else {
                self.models.as_deref().map(|m| Some(list(m)))
            },
            allow_ips: if self.any_ip {
                Some(None)
            } else {
                self.allow_ips
                    .as_deref()
                    .map(|a| Some(list(a)).filter(|l| !l.is_empty()))
            },
            group: self.group.clone(),
            account: self
                .account
                .as_ref()
                .map(|a| Some(a.clone()).filter(|a| !a.is_empty())),
            limits: self.limits.limits(),
            budget: self.limits.budget()?,
        })
    }
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints it once (only its SHA-256 is stored).
    Create(KeyFlags),
    /// List keys with their status and usage (never a key).
    List,
    /// Show one key.
    Show { id: u64 },
    /// Change some fields of a key.
    Update {
        id: u64,
        #[command(flatten)]
        flags: KeyFlags,
    },
    /// Enable a key.
    Enable { id: u64 },
    /// Disable a key (401 key_disabled).
    Disable { id: u64 },
    /// Delete a key (401 invalid_api_key).
    Delete { id: u64 },
    /// Print a key in full: needs the key vault (`key_vault` in the config and its secret);
    /// a key stored only as a hash is not recoverable (rotate it instead).
    Reveal { id: u64 },
    /// A new key for the same id (usage and quota stay); prints it once.
    Rotate {
        id: u64,
        /// Keep the old key working this many seconds.
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Granted, used, remaining, and the last calls from the usage log.
    Usage {
        id: u64,
        /// How many recent calls to show.
        #[arg(long, default_value_t = 10)]
        last: usize,
    },
}

pub fn run(path: &std::path::Path, json: bool, command: KeysCommand) -> anyhow::Result<()> {
    use crate::sync::edit as keys;
    let config = Config::load(path)?;
    let editor = keys::SyncEditor::new(&config.sync_file);
    let now = crate::gate::unix_now();
    let fail = anyhow::Error::msg;
    // Read only for the commands that seal keys, so the others work without the secret.
    let vault = || crate::sync::vault::from_config(&config);
    let done = |what: &str, id: u64| {
        if json {
            println!("{}", serde_json::json!({"id": id, "ok": true}));
        } else {
            eprintln!("key {id}: {what}");
        }
    };
    match command {
        KeysCommand::Create(flags) => {
            let (id, key) =
                keys::create(&editor, &flags.spec()?, vault()?.as_ref()).map_err(fail)?;
            if json {
                println!("{}", serde_json::json!({"id": id, "key": key}));
            } else {
                eprintln!("created key {id}; it is shown once, store it now:");
                println!("{key}");
            }
        }
        KeysCommand::Update { id, flags } => {
            keys::update(&editor, id, &flags.spec()?).map_err(fail)?;
            done("updated", id);
        }
        KeysCommand::Enable { id } => {
            keys::set_status(&editor, id, crate::config::KeyStatus::Enabled).map_err(fail)?;
            done("enabled", id);
        }
        KeysCommand::Disable { id } => {
            keys::set_status(&editor, id, crate::config::KeyStatus::Disabled).map_err(fail)?;
            done("disabled", id);
        }
        KeysCommand::Delete { id } => {
            keys::delete(&editor, id).map_err(fail)?;
            done("deleted", id);
        }
        KeysCommand::Reveal { id } => crate::cli::vault::reveal(&config, id, json).map_err(fail)?,
        KeysCommand::Rotate { id, grace } => {
            let key = keys::rotate(&editor, id, grace, now, vault()?.as_ref()).map_err(fail)?;
            if json {
                println!("{}", serde_json::json!({"id": id, "key": key}));
            } else {
                match grace {
                    Some(g) if g > 0 => eprintln!("key {id} rotated; the old key works {g} s more"),
                    _ => eprintln!("key {id} rotated; the old key no longer works"),
                }
                println!("{key}");
            }
        }
        KeysCommand::List | KeysCommand::Show { .. } | KeysCommand::Usage { .. } => {
            let file = editor.read().map_err(fail)?;
            let consumed =
                crate::ledger::Ledger::read_consumed(&config.state_dir).unwrap_or_default();
            let mut views = keys::views(&file, &consumed, now);
            match command {
                KeysCommand::List => print_views(&views, json),
                KeysCommand::Show { id } => {
                    views.retain(|v| v.id == id);
                    if views.is_empty() {
                        anyhow::bail!("unknown id {id}");
                    }
                    if json {
                        println!("{}", serde_json::to_string_pretty(&views[0])?);
                    } else {
                        print_views(&views, false);
                    }
                }
                KeysCommand::Usage { id, last } => {
                    let v = views
                        .into_iter()
                        .find(|v| v.id == id)
                        .ok_or_else(|| anyhow::anyhow!("unknown id {id}"))?;
                    let calls = recent_calls(config.usage_log.as_deref(), id, last);
                    let store = crate::cli::usage::key_totals(&config, id);
                    if json {
                        let store = match &store {
                            Some(Ok(t)) => serde_json::json!(t),
                            Some(Err(e)) => serde_json::json!({"error": e}),
                            None => serde_json::Value::Null,
                        };
                        println!(
                            "{}",
                            serde_json::json!({"id": id, "granted": v.quota, "used": v.used,
                                "remaining": v.remaining, "unlimited_quota": v.unlimited_quota,
                                "calls": calls, "store": store})
                        );
                    } else {
                        let remaining = v.remaining.map_or("unlimited".into(), |r| r.to_string());
                        println!(
                            "key {id} ({}): granted {}, used {}, remaining {remaining}",
                            v.name, v.quota, v.used
                        );
                        match &store {
                            Some(Ok(t)) => println!(
                                "  usage store (last 366 days): {} calls, {} errors, prompt {}, completion {}, quota {}",
                                t.requests, t.errors, t.prompt_tokens, t.completion_tokens, t.quota
                            ),
                            Some(Err(e)) => println!("  usage store: {e}"),
                            None => {}
                        }
                        for c in &calls {
                            println!(
                                "  {} {} {} prompt={} completion={} quota={} status={}",
                                c["created_at"],
                                c["request_id"],
                                c["model"],
                                c["prompt_tokens"],
                                c["completion_tokens"],
                                c["quota"],
                                c["status"]
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn print_views(views: &[crate::sync::edit::KeyView], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(views).unwrap_or_default()
        );
        return;
    }
    println!(
        "{:>6}  {:<24} {:<21} {:<9} {:<10} {:>12} {:>12} {:>12}  {:<11} restrictions",
        "id", "name", "key", "status", "group", "quota", "used", "remaining", "expires"
    );
    for v in views {
        let remaining = v.remaining.map_or("unlimited".into(), |r| r.to_string());
        let quota = if v.unlimited_quota {
            "unlimited".into()
        } else {
            v.quota.to_string()
        };
        let expires = if v.expires_at <= 0 {
            "never".into()
        } else {
            v.expires_at.to_string()
        };
        let mut restrictions = Vec::new();
        if let Some(m) = &v.models {
            restrictions.push(format!("models={}", m.join(",")));
        }
        if let Some(a) = &v.allow_ips {
            restrictions.push(format!("ips={}", a.join(",")));
        }
        if let Some(a) = &v.account {
            restrictions.push(format!("account={a}"));
        }
        if v.limits.is_some() {
            restrictions.push(crate::cli::accounts::limits_text(v.limits.as_ref()));
        }
        if let Some(b) = &v.budget {
            restrictions.push(format!("budget={} spent={}", b.budget, b.spent));
        }
        println!(
            "{:>6}  {:<24} {:<21} {:<9} {:<10} {:>12} {:>12} {:>12}  {:<11} {}",
            v.id,
            v.name.chars().take(24).collect::<String>(),
            v.key_hint.as_deref().unwrap_or("-"),
            v.status,
            v.group,
            quota,
            v.used,
            remaining,
            expires,
            restrictions.join(" ")
        );
    }
}

/// The last `n` usage records of key `id` (newest last).
fn recent_calls(log: Option<&std::path::Path>, id: u64, n: usize) -> Vec<serde_json::Value> {
    let Some(text) = log.and_then(|p| std::fs::read_to_string(p).ok()) else {
        return Vec::new();
    };
    let mut calls: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["key_id"] == id)
        .collect();
    let skip = calls.len().saturating_sub(n);
    calls.drain(..skip);
    calls
}
