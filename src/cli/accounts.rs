//! `keygate accounts …` (SPEC §7) and the limit and budget flags `keygate keys` shares.

use crate::config::Config;
use crate::core::config::{KeyStatus, LimitsEntry};
use crate::sync::accounts::{self, AccountSpec, AccountView};
use crate::sync::edit::SyncEditor;

/// `--rpm`, `--tpm`, `--concurrency` and `--budget`, for keys and accounts.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LimitFlags {
    /// Requests per minute.
    #[arg(long, allow_negative_numbers = true)]
    pub rpm: Option<i64>,
    /// Tokens per minute.
    #[arg(long, allow_negative_numbers = true)]
    pub tpm: Option<i64>,
    /// Calls in flight.
    #[arg(long, allow_negative_numbers = true)]
    pub concurrency: Option<i64>,
    /// PERIOD:AMOUNT[@TIMEZONE] (daily, weekly, monthly, rollingN), or none.
    #[arg(long)]
    pub budget: Option<String>,
}

impl LimitFlags {
    /// The limits given.
    pub fn limits(&self) -> LimitsEntry {
        LimitsEntry {
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
        }
    }

    /// The budget given: `None` = unchanged, `Some(None)` = remove.
    pub fn budget(
        &self,
    ) -> Result<Option<Option<crate::core::config::BudgetEntry>>, anyhow::Error> {
        self.budget
            .as_deref()
            .map(accounts::parse_budget)
            .transpose()
            .map_err(anyhow::Error::msg)
    }
}

/// The fields of `accounts create` and `accounts update`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AccountFlags {
    /// Display name.
    #[arg(long)]
    pub name: Option<String>,
    /// Granted quota, in quota units.
    #[arg(long, allow_negative_numbers = true, conflicts_with = "unlimited")]
    pub quota: Option<i64>,
    /// No lifetime cap.
    #[arg(long)]
    pub unlimited: bool,
    /// Make an unlimited account limited again.
    #[arg(long, conflicts_with = "unlimited")]
    pub limited: bool,
    /// Most keys that may name the account (-1: no limit).
    #[arg(long, allow_negative_numbers = true)]
    pub max_keys: Option<i64>,
    #[command(flatten)]
    pub limits: LimitFlags,
}

/// `keygate accounts` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum AccountsCommand {
    /// Create an account.
    Create {
        /// Its id (what keys name in `account`).
        id: String,
        #[command(flatten)]
        flags: AccountFlags,
    },
    /// List accounts with their usage, limits and period spending.
    List,
    /// Show one account.
    Show {
        /// The account's id.
        id: String,
    },
    /// Change some fields of an account.
    Update {
        /// The account's id.
        id: String,
        #[command(flatten)]
        flags: AccountFlags,
    },
    /// Enable an account.
    Enable {
        /// The account's id.
        id: String,
    },
    /// Disable an account: its keys are refused with 401 `account_disabled`.
    Disable {
        /// The account's id.
        id: String,
    },
    /// Delete an account that no key names any more.
    Delete {
        /// The account's id.
        id: String,
    },
}

impl AccountFlags {
    fn spec(&self) -> Result<AccountSpec, String> {
        Ok(AccountSpec {
            name: self.name.clone(),
            quota: self.quota,
            unlimited: if self.unlimited {
                Some(true)
            } else if self.limited {
                Some(false)
            } else {
                None
            },
            max_keys: self.max_keys.map(|m| (m >= 0).then_some(m)),
            limits: self.limits.limits(),
            budget: self.limits.budget().map_err(|e| e.to_string())?,
        })
    }
}

/// Run one `keygate accounts` command against `config`'s sync file.
pub fn run(config: &Config, json: bool, command: AccountsCommand) -> Result<(), String> {
    let editor = SyncEditor::new(&config.sync_file);
    let done = |what: &str, id: &str| {
        if json {
            println!("{}", serde_json::json!({"id": id, "ok": true}));
        } else {
            eprintln!("account {id:?}: {what}");
        }
    };
    match command {
        AccountsCommand::Create { id, flags } => {
            accounts::create(&editor, &id, &flags.spec()?)?;
            done("created", &id);
        }
        AccountsCommand::Update { id, flags } => {
            accounts::update(&editor, &id, &flags.spec()?)?;
            done("updated", &id);
        }
        AccountsCommand::Enable { id } => {
            accounts::set_status(&editor, &id, KeyStatus::Enabled)?;
            done("enabled", &id);
        }
        AccountsCommand::Disable { id } => {
            accounts::set_status(&editor, &id, KeyStatus::Disabled)?;
            done("disabled", &id);
        }
        AccountsCommand::Delete { id } => {
            accounts::delete(&editor, &id)?;
            done("deleted", &id);
        }
        AccountsCommand::List | AccountsCommand::Show { .. } => {
            let file = editor.read()?;
            let consumed =
                crate::ledger::Ledger::read_consumed(&config.state_dir).unwrap_or_default();
            let mut views = accounts::views(&file, &consumed, crate::core::clock::unix_now());
            if let AccountsCommand::Show { id } = &command {
                views.retain(|v| &v.id == id);
                if views.is_empty() {
                    return Err(format!("unknown account {id:?}"));
                }
            }
            print(&views, json);
        }
    }
    Ok(())
}

/// `rpm=60 tpm=200000 concurrency=4`, or `-`.
pub fn limits_text(l: Option<&LimitsEntry>) -> String {
    let Some(l) = l else { return "-".into() };
    let parts: Vec<String> = [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("concurrency", l.concurrency),
    ]
    .into_iter()
    .filter_map(|(n, v)| Some(format!("{n}={}", v?)))
    .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

fn print(views: &[AccountView], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(views).unwrap_or_default()
        );
        return;
    }
    println!(
        "{:<16} {:<20} {:<9} {:>12} {:>12} {:>5}  {:<32} budget",
        "id", "name", "status", "quota", "used", "keys", "limits"
    );
    for v in views {
        let quota = if v.unlimited_quota {
            "unlimited".into()
        } else {
            v.quota.to_string()
        };
        let budget = v.budget.as_ref().map_or("-".into(), |b| {
            format!("{} spent {} (resets {})", b.budget, b.spent, b.resets_at)
        });
        println!(
            "{:<16} {:<20} {:<9} {:>12} {:>12} {:>5}  {:<32} {}",
            v.id,
            v.name.chars().take(20).collect::<String>(),
            v.status,
            quota,
            v.used,
            v.keys,
            limits_text(v.limits.as_ref()),
            budget
        );
    }
}
