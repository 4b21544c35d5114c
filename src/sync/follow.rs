//! Following an admin instance (SPEC §8, fleets): with `sync_url`, a gateway long-polls
//! `GET /admin/v1/sync?after=<revision>` and applies each file it gets exactly like a reload of
//! a local file (validated whole, one atomic swap; a file that fails is rejected and the last
//! good table stays). Each file in force is kept in `sync_file` (by default
//! `state_dir/followed-keys.json`), so the gateway starts from its last good copy when the
//! admin instance is away, and keeps serving while it is.

use crate::core::config::Config;
use crate::sync::reload::{ReloadOutcome, Reloader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The longest wait between two attempts while the admin instance is away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Before the gateway loads its table: with `sync_url`, the last good copy must exist (an
/// empty table the first time, until the admin instance answers) and the token be set.
pub fn prepare(config: &Config) -> Result<(), String> {
    let Some(url) = &config.sync_url else {
        return Ok(());
    };
    token(config)?;
    if !config.sync_file.exists() {
        log::warn!(
            "sync_url {url}: no copy in {} yet; starting with no keys until the admin instance answers",
            config.sync_file.display()
        );
        if let Some(dir) = config.sync_file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        crate::support::fsutil::write_atomic(&config.sync_file, b"{\"revision\": 0}\n")
            .map_err(|e| format!("{}: {e}", config.sync_file.display()))?;
    }
    Ok(())
}

fn token(config: &Config) -> Result<String, String> {
    let var = config
        .sync_token_env
        .as_deref()
        .ok_or("sync_url: sync_token_env is needed")?;
    std::env::var(var)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().to_string())
        .ok_or_else(|| format!("sync_url: environment variable {var} (sync_token_env) is not set"))
}

/// Follow `config.sync_url` on a thread of its own, publishing through `reloader`.
pub fn spawn(config: &Config, reloader: Arc<Reloader>) -> Result<(), String> {
    let Some(url) = config.sync_url.clone() else {
        return Ok(());
    };
    let token = token(config)?;
    let copy = config.sync_file.clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(45))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("sync_url: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("sync_url: {e}"))?;
    std::thread::Builder::new()
        .name("keygate-follow".into())
        .spawn(move || {
            runtime.block_on(follow(client, url, token, copy, reloader));
        })
        .map_err(|e| format!("sync_url: {e}"))?;
    Ok(())
}

async fn follow(
    client: reqwest::Client,
    url: String,
    token: String,
    copy: PathBuf,
    reloader: Arc<Reloader>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut away = false;
    // A revision the admin served that failed validation here: not asked for again.
    let mut rejected = 0u64;
    loop {
        let after = reloader.gate_revision().max(rejected);
        let answer = client
            .get(&url)
            .query(&[("after", after)])
            .bearer_auth(&token)
            .send()
            .await;
        let wait = match answer {
            Ok(r) if r.status() == reqwest::StatusCode::OK => {
                let revision = r
                    .headers()
                    .get("x-keygate-revision")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match r.bytes().await {
                    Ok(bytes) => {
                        if away {
                            log::info!("sync_url {url}: the admin instance answers again");
                            away = false;
                        }
                        match apply(&reloader, &url, &copy, &bytes) {
                            true => Duration::ZERO,
                            false => {
                                rejected = revision.unwrap_or(after).max(after);
                                MAX_BACKOFF
                            }
                        }
                    }
                    Err(e) => {
                        log::warn!("sync_url {url}: reading the file: {e}");
                        backoff
                    }
                }
            }
            Ok(r) if r.status() == reqwest::StatusCode::NOT_MODIFIED => Duration::ZERO,
            Ok(r) => {
                log::warn!("sync_url {url}: answered {}", r.status());
                backoff
            }
            Err(e) => {
                if !away {
                    log::warn!(
                        "sync_url {url}: the admin instance is away ({e}); serving revision {} until it answers",
                        reloader.gate_revision()
                    );
                    away = true;
                }
                backoff
            }
        };
        if wait.is_zero() {
            backoff = Duration::from_millis(100);
        } else {
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Apply one file from the admin instance; keep it as the last good copy. False when rejected.
/// Under the copy's writers' lock, which the reload watcher waits for: between putting a file
/// in force and keeping it, the copy on disk is the file before, and a watcher that read it
/// then would put that older file back in force (and stay there if the admin instance went
/// away at that moment).
fn apply(reloader: &Reloader, url: &str, copy: &Path, bytes: &[u8]) -> bool {
    let _writers = crate::support::fsutil::lock_beside(copy).ok();
    match reloader.apply(bytes, url) {
        ReloadOutcome::Rejected(_) => false,
        ReloadOutcome::Reloaded { .. } | ReloadOutcome::Unchanged => {
            let same = std::fs::read(copy).is_ok_and(|old| old == bytes);
            if !same {
                if let Err(e) = crate::support::fsutil::write_atomic(copy, bytes) {
                    log::error!(
                        "sync_url {url}: the table is in force but cannot be kept in {}: {e}",
                        copy.display()
                    );
                }
            }
            true
        }
    }
}
