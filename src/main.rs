//! The `keygate` binary: CLI, load config, build the Pingora server, run.
#![deny(clippy::unwrap_used, clippy::expect_used)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use keygate::config::Config;
use keygate::{Gate, KeyTable};
use std::path::PathBuf;

// mimalloc: measured 15-25% more throughput than the system allocator on a bare Pingora proxy
// (issue 6). Only the binary sets it; hosts embedding the library choose their own.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "An edge gateway for LLM API keys and quotas"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The YAML config file.
        #[arg(short, long, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Take the listeners over from the running keygate (then send it SIGQUIT).
        #[arg(short, long)]
        upgrade: bool,
    },
    /// Validate the config and the sync file; exit non-zero with the problem.
    Check {
        /// The YAML config file.
        #[arg(short, long, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Accept upstreams whose `api_key_env` variable is unset (to lint configs in CI,
        /// away from the production secrets); every other check still runs.
        #[arg(long)]
        no_env: bool,
    },
    /// The gateway plus a built-in mock backend and demo keys; prints curl lines to try.
    Demo {
        /// Where the demo gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Where the demo's metrics listen.
        #[arg(long, default_value = "127.0.0.1:9091")]
        metrics_listen: String,
        /// Where the demo's admin API and console listen.
        #[arg(long, default_value = "127.0.0.1:9092")]
        admin_listen: String,
    },
    /// Create, list, edit, enable, disable, delete and rotate keys in the sync file.
    Keys {
        /// The YAML config file (names the sync file and the state folder).
        #[arg(short, long, global = true, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Create, list, show, update, enable, disable and delete accounts in the sync file.
    Accounts {
        /// The YAML config file (names the sync file and the state folder).
        #[arg(short, long, global = true, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: keygate::cli::accounts::AccountsCommand,
    },
    /// The key vault: re-seal the stored keys under a new secret.
    Vault {
        /// The YAML config file (names the sync file and the vault).
        #[arg(short, long, global = true, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: keygate::cli::vault::VaultCommand,
    },
    /// A key's or an account's totals and an hourly table from the usage store.
    Usage {
        /// The YAML config file (names the state folder and the store).
        #[arg(short, long, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: keygate::cli::usage::UsageArgs,
    },
    /// Import keys from another gateway into the sync file.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Run only the built-in OpenAI-compatible mock backend.
    Mock {
        /// Where the mock listens.
        #[arg(long, default_value = "127.0.0.1:18000")]
        listen: String,
    },
}

#[derive(clap::Args, Clone, Default)]
struct KeyFlags {
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
    limits: keygate::cli::accounts::LimitFlags,
}

impl KeyFlags {
    fn spec(&self) -> anyhow::Result<keygate::sync::edit::KeySpec> {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        };
        Ok(keygate::sync::edit::KeySpec {
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
enum KeysCommand {
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

#[derive(Subcommand)]
enum ImportSource {
    /// A new-api token export (a JSON array of token rows).
    NewApi {
        /// The YAML config file (names the sync file).
        #[arg(short, long, default_value = "conf/keygate.yaml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The export file.
        file: PathBuf,
    },
}

/// mimalloc keeps freed pages for reuse; after a sync-file load they are returned.
#[cfg(not(feature = "system-alloc"))]
fn release_free_memory() {
    // SAFETY: `mi_collect` only walks mimalloc's own heaps; any thread may call it.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() {
    #[cfg(not(feature = "system-alloc"))]
    keygate::support::memory::set_release_hook(release_free_memory);
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("keygate=info,warn"),
    )
    .init();
    if let Err(e) = real_main() {
        eprintln!("keygate: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { config, upgrade } => run(&config, upgrade),
        Command::Check { config, no_env } => check(&config, no_env),
        Command::Demo {
            listen,
            metrics_listen,
            admin_listen,
        } => keygate::cli::demo::run(keygate::cli::demo::DemoListen {
            listen: &listen,
            metrics: &metrics_listen,
            admin: &admin_listen,
        }),
        Command::Keys {
            config,
            json,
            command,
        } => keys(&config, json, command),
        Command::Accounts {
            config,
            json,
            command,
        } => {
            let config = Config::load(&config)?;
            keygate::cli::accounts::run(&config, json, command).map_err(anyhow::Error::msg)
        }
        Command::Vault {
            config,
            json,
            command,
        } => {
            let config = Config::load(&config)?;
            keygate::cli::vault::run(&config, json, command).map_err(anyhow::Error::msg)
        }
        Command::Usage { config, json, args } => {
            let config = Config::load(&config)?;
            let out = keygate::cli::usage::run(&config, json, &args).map_err(anyhow::Error::msg)?;
            print!("{out}");
            Ok(())
        }
        Command::Import {
            source: ImportSource::NewApi { config, json, file },
        } => import(&config, json, &file),
        Command::Mock { listen } => {
            let addr = keygate::cli::demo::start_mock_thread(&listen)?;
            println!("keygate: mock backend on http://{addr}");
            loop {
                std::thread::park();
            }
        }
    }
}

fn run(path: &std::path::Path, upgrade: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let vault = keygate::cli::vault::check_at_start(&config).map_err(anyhow::Error::msg)?;
    keygate::sync::follow::prepare(&config).map_err(anyhow::Error::msg)?;
    let gate = Gate::from_config_with(&config, upgrade).map_err(anyhow::Error::msg)?;
    {
        // Not kept: holding the first table here would keep it in memory after every reload.
        let table = gate.table();
        log::info!(
            "loaded {} keys (revision {}) from {}",
            table.len(),
            table.revision,
            config.sync_file.display()
        );
    }
    let reloader = std::sync::Arc::new(keygate::sync::reload::Reloader::new(
        gate.clone(),
        &config.sync_file,
    ));
    reloader.clone().spawn(config.watch_sync_file)?;
    keygate::sync::follow::spawn(&config, reloader.clone()).map_err(anyhow::Error::msg)?;
    keygate::admin::start(&config, gate.clone(), reloader, vault)?;
    // Runs for the life of the process (a thread of its own).
    let _health = gate.upstreams().start_health_checks()?;
    let (server, _bound) = keygate::ops::server::build(&config, gate.clone(), upgrade)?;
    keygate::ops::server::run(server, &gate);
    Ok(())
}

fn check(path: &std::path::Path, no_env: bool) -> anyhow::Result<()> {
    let mut config = Config::load(path)?;
    let table = KeyTable::load(&config.sync_file)?;
    // Each credential variable unset here, named as `run` would name it; left out of the
    // upstream checks below, which check the rest (a set variable's value included) as the
    // gateway does at startup.
    let mut unset = Vec::new();
    for u in &mut config.upstreams {
        let name = u.name.clone();
        let vars = u
            .targets
            .iter_mut()
            .flatten()
            .map(|t| &mut t.api_key_env)
            .chain(std::iter::once(&mut u.api_key_env));
        for var in vars {
            if let Some(var) = var.take_if(|var| std::env::var_os(var.as_str()).is_none()) {
                unset.push(format!(
                    "upstream {name:?}: environment variable {var} (api_key_env) is not set"
                ));
            }
        }
    }
    if !no_env && !unset.is_empty() {
        anyhow::bail!(
            "config {}: {} (`keygate check --no-env` checks everything else without it)",
            path.display(),
            unset.join("; ")
        );
    }
    keygate::Upstreams::from_pools(&config.upstreams)
        .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    let vault_line = keygate::cli::vault::check_all(&config, no_env, &mut unset)
        .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
    println!(
        "ok: {} ({} upstreams), {} ({} keys, revision {})",
        path.display(),
        config.upstreams.len(),
        config.sync_file.display(),
        table.len(),
        table.revision
    );
    if let Some(line) = vault_line {
        println!("{line}");
    }
    for u in &unset {
        println!("not checked (--no-env): {u}");
    }
    for note in budget_notes(&table) {
        println!("note: {note}");
    }
    Ok(())
}

/// Budgets larger than the lifetime quota they sit under: allowed (the lifetime quota still
/// applies), but probably not what was meant.
fn budget_notes(table: &KeyTable) -> Vec<String> {
    let mut notes = Vec::new();
    let mut over =
        |what: String, budget: Option<&keygate::core::budget::Budget>, left: Option<i64>| {
            if let (Some(b), Some(left)) = (budget, left) {
                if b.amount > left {
                    notes.push(format!(
                    "{what}: budget {} per period is larger than its lifetime quota left ({left}); \
                     allowed, the lifetime quota still applies"
                    , b.amount
                ));
                }
            }
        };
    for a in table.accounts().iter() {
        over(
            format!("account {:?}", &*a.id),
            a.budget.as_ref(),
            a.quota_limit(),
        );
    }
    for k in table.records() {
        let budget = k.policy.as_ref().and_then(|p| p.budget.as_ref());
        let left = (!k.unlimited_quota).then(|| k.quota.saturating_sub(k.used));
        over(format!("key {}", k.id), budget, left);
    }
    notes
}

fn keys(path: &std::path::Path, json: bool, command: KeysCommand) -> anyhow::Result<()> {
    use keygate::sync::edit as keys;
    let config = Config::load(path)?;
    let editor = keys::SyncEditor::new(&config.sync_file);
    let now = keygate::gate::unix_now();
    let fail = anyhow::Error::msg;
    // Read only for the commands that seal keys, so the others work without the secret.
    let vault = || keygate::sync::vault::from_config(&config);
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
            keys::set_status(&editor, id, keygate::config::KeyStatus::Enabled).map_err(fail)?;
            done("enabled", id);
        }
        KeysCommand::Disable { id } => {
            keys::set_status(&editor, id, keygate::config::KeyStatus::Disabled).map_err(fail)?;
            done("disabled", id);
        }
        KeysCommand::Delete { id } => {
            keys::delete(&editor, id).map_err(fail)?;
            done("deleted", id);
        }
        KeysCommand::Reveal { id } => {
            keygate::cli::vault::reveal(&config, id, json).map_err(fail)?
        }
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
                keygate::ledger::Ledger::read_consumed(&config.state_dir).unwrap_or_default();
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
                    let store = keygate::cli::usage::key_totals(&config, id);
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

fn print_views(views: &[keygate::sync::edit::KeyView], json: bool) {
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
            restrictions.push(keygate::cli::accounts::limits_text(v.limits.as_ref()));
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

fn import(path: &std::path::Path, json: bool, file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let export = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    let editor = keygate::sync::edit::SyncEditor::new(&config.sync_file);
    let vault = keygate::sync::vault::from_config(&config)?;
    let report = keygate::cli::import::import_new_api(&editor, &export, vault.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "imported {} keys, skipped {} into {}",
            report.imported.len(),
            report.skipped.len(),
            config.sync_file.display()
        );
        for (id, name) in &report.imported {
            println!("  imported: id {id} {name:?}");
        }
        for (row, why) in &report.skipped {
            println!("  skipped: {row}: {why}");
        }
    }
    Ok(())
}
