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
        command: keygate::cli::keys::KeysCommand,
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
        } => keygate::cli::keys::run(&config, json, command),
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
    keygate::ops::alerts::start(&config, &gate).map_err(anyhow::Error::msg)?;
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
