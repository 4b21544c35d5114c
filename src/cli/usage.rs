//! `keygate usage` (SPEC §9): a key's or an account's totals and an hourly table for a time
//! range, read from the usage store; and the store's totals `keygate keys usage` adds.

use crate::config::Config;
use crate::core::clock::unix_now;
use crate::usage::store::query::{self, Bucket, StatsFilter, Totals, MAX_SPAN};
use crate::usage::store::{open_query, StoreSettings};
use serde_json::json;

/// The flags of `keygate usage`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct UsageArgs {
    /// One key's usage.
    #[arg(long, conflicts_with = "account")]
    pub key: Option<u64>,
    /// One account's usage.
    #[arg(long)]
    pub account: Option<String>,
    /// From: unix seconds, an RFC 3339 time, or an age (`90m`, `24h`, `7d`). Default 24h.
    #[arg(long)]
    pub since: Option<String>,
    /// To: as `--since`. Default now.
    #[arg(long)]
    pub until: Option<String>,
}

/// A time as `--since` reads it: unix seconds, RFC 3339, or an age before `now`.
pub fn parse_time(s: &str, now: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    for (suffix, unit) in [("m", 60), ("h", 3600), ("d", 86_400)] {
        if let Some(n) = s.strip_suffix(suffix).and_then(|n| n.parse::<i64>().ok()) {
            if n >= 0 {
                return Ok(now.saturating_sub(n.saturating_mul(unit)));
            }
        }
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|_| format!("{s:?} is not unix seconds, an RFC 3339 time or an age like 24h"))
}

/// `keygate usage`: what it prints (text, or JSON with `json`).
pub fn run(config: &Config, json_out: bool, args: &UsageArgs) -> Result<String, String> {
    let now = unix_now();
    let since = args
        .since
        .as_deref()
        .map(|s| parse_time(s, now))
        .transpose()
        .map_err(|e| format!("--since: {e}"))?;
    let until = args
        .until
        .as_deref()
        .map(|s| parse_time(s, now))
        .transpose()
        .map_err(|e| format!("--until: {e}"))?;
    let settings = StoreSettings::from_config(&config.usage_store, &config.state_dir)
        .ok_or("the usage store is off (usage_store.enabled: false)")?;
    let mut db = open_query(&settings).map_err(|e| e.to_string())?;
    let filter = StatsFilter {
        key_id: args.key,
        account: args.account.clone(),
        start: Some(since.unwrap_or(until.unwrap_or(now) - 86_400)),
        end: until,
        bucket: Bucket::Hour,
        ..StatsFilter::default()
    };
    let page = query::stats(&mut *db, &filter, now).map_err(|e| e.to_string())?;
    let totals = query::totals_by_model(
        &mut *db,
        args.key,
        args.account.as_deref(),
        page.start,
        page.end,
    )
    .map_err(|e| e.to_string())?;
    let hours: Vec<&Totals> = page.buckets.iter().filter(|b| b.requests > 0).collect();
    let who = match (&args.key, &args.account) {
        (Some(k), _) => format!("key {k}"),
        (_, Some(a)) => format!("account {a}"),
        _ => "all keys".to_string(),
    };
    if json_out {
        let v = json!({
            "scope": who, "start": page.start, "end": page.end, "notes": page.notes,
            "totals": totals[0].1,
            "models": totals[1..].iter().map(|(m, t)| json!({"model": m, "totals": t})).collect::<Vec<_>>(),
            "hourly": hours,
        });
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut out = format!(
        "{who}, {} .. {} ({})\n",
        time_text(page.start),
        time_text(page.end),
        settings.describe()
    );
    for n in &page.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out.push_str(&format!(
        "{:<24} {:>9} {:>7} {:>12} {:>12} {:>14}\n",
        "model", "requests", "errors", "prompt", "completion", "quota"
    ));
    for (model, t) in &totals {
        let name = if model.is_empty() { "TOTAL" } else { model };
        out.push_str(&row(name, t));
    }
    out.push_str(&format!("\n{:<24}\n", "hourly (UTC)"));
    if hours.is_empty() {
        out.push_str("  no calls in this range\n");
    }
    for t in hours {
        out.push_str(&row(&time_text(t.t), t));
    }
    Ok(out)
}

fn row(name: &str, t: &Totals) -> String {
    format!(
        "{:<24} {:>9} {:>7} {:>12} {:>12} {:>14}\n",
        name, t.requests, t.errors, t.prompt_tokens, t.completion_tokens, t.quota
    )
}

fn time_text(t: i64) -> String {
    jiff::Timestamp::from_second(t)
        .map(|ts| ts.strftime("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|_| t.to_string())
}

/// The store's totals for key `id` over the last [`MAX_SPAN`] (for `keygate keys usage`):
/// `None` when the store is off or (SQLite) has no file yet.
pub fn key_totals(config: &Config, id: u64) -> Option<Result<Totals, String>> {
    let settings = StoreSettings::from_config(&config.usage_store, &config.state_dir)?;
    if let crate::usage::store::Backend::Sqlite(path) = &settings.backend {
        if !path.exists() {
            return None;
        }
    }
    let now = unix_now();
    Some(
        open_query(&settings)
            .and_then(|mut db| {
                query::totals_by_model(&mut *db, Some(id), None, now - MAX_SPAN, now)
            })
            .map_err(|e| e.to_string())
            .map(|mut t| t.swap_remove(0).1),
    )
}
