//! `usage_store:` (SPEC §9): where every settled call is kept for queries.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which database holds the usage store.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StoreBackend {
    /// An SQLite file beside the gateway (default: `state_dir/usage.db`).
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by a fleet (`url`).
    Postgres,
}

/// `usage_store:` options. On by default (SQLite in `state_dir`); `enabled: false` turns it off.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UsageStoreConfig {
    /// Keep the store. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `sqlite` (default) or `postgres`.
    #[serde(default)]
    pub backend: StoreBackend,
    /// The SQLite file; default `usage.db` in `state_dir`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `postgres://…` (postgres only).
    #[serde(default)]
    pub url: Option<String>,
    /// Rows and roll-ups older than this many days are removed. Default 90.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Rows waiting for the writer at most; past it rows are dropped and counted. Default 65536.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// How often the writer writes what was queued, milliseconds (a `kill -9` loses at most
    /// this much, plus the batch being written). Default 500.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_retention_days() -> u32 {
    90
}
fn default_queue_size() -> usize {
    65_536
}
/// Half a second: every commit rewrites each page it touched, and a batch touches about one
/// page of the (key, time) index per active key whatever its size; at 100 ms the writer spent
/// 5.8 µs a call, at 500 ms 3.3 µs (100 keys, one core). A `kill -9` may lose this long.
fn default_flush_interval_ms() -> u64 {
    500
}

impl Default for UsageStoreConfig {
    fn default() -> Self {
        UsageStoreConfig {
            enabled: true,
            backend: StoreBackend::Sqlite,
            path: None,
            url: None,
            retention_days: default_retention_days(),
            queue_size: default_queue_size(),
            flush_interval_ms: default_flush_interval_ms(),
        }
    }
}

impl UsageStoreConfig {
    /// The SQLite file: `path`, or `usage.db` in `state_dir`.
    pub fn sqlite_path(&self, state_dir: &Path) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| state_dir.join("usage.db"))
    }

    /// Check the values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        match self.backend {
            StoreBackend::Sqlite => {
                if self.url.is_some() {
                    return Err("usage_store: url is for backend postgres".into());
                }
            }
            StoreBackend::Postgres => {
                if self.path.is_some() {
                    return Err(
                        "usage_store: path is for backend sqlite (postgres takes url)".into(),
                    );
                }
                let Some(url) = &self.url else {
                    return Err("usage_store: backend postgres needs url: postgres://…".into());
                };
                parse_postgres_url(url).map_err(|e| format!("usage_store: url: {e}"))?;
            }
        }
        if !(1..=36_500).contains(&self.retention_days) {
            return Err("usage_store: retention_days: must be between 1 and 36500".into());
        }
        if !(1..=16_777_216).contains(&self.queue_size) {
            return Err("usage_store: queue_size: must be between 1 and 16777216".into());
        }
        if !(1..=60_000).contains(&self.flush_interval_ms) {
            return Err("usage_store: flush_interval_ms: must be between 1 and 60000".into());
        }
        Ok(())
    }
}

/// How long a connection to PostgreSQL may take when the URL does not say
/// (`connect_timeout=`).
pub const POSTGRES_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The connection settings of a `postgres://…` (or `postgresql://…`) URL: it must name a host;
/// TLS (`sslmode=require`) is not built, so it is refused rather than silently not used.
/// Errors never repeat the URL (it may hold a password).
pub fn parse_postgres_url(url: &str) -> Result<postgres::Config, String> {
    let url = url.trim();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must start with postgres:// or postgresql://".into());
    }
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| format!("not a valid PostgreSQL URL: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("names no host (postgres://user:password@host:port/database)".into());
    }
    if matches!(config.get_ssl_mode(), postgres::config::SslMode::Require) {
        return Err("sslmode=require: TLS to PostgreSQL is not built in this keygate".into());
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(POSTGRES_CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("keygate");
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(url: &str) -> UsageStoreConfig {
        UsageStoreConfig {
            backend: StoreBackend::Postgres,
            url: Some(url.into()),
            ..UsageStoreConfig::default()
        }
    }

    #[test]
    fn postgres_urls_are_checked_and_never_echoed() {
        assert_eq!(
            pg("postgres://kg:pw@127.0.0.1:5432/usage").validate(),
            Ok(())
        );
        assert_eq!(pg("postgresql://db.internal/usage").validate(), Ok(()));
        for (url, says) in [
            ("mysql://kg:secret@h/db", "must start with postgres://"),
            (
                "postgres://kg:secret@h:notaport/db",
                "not a valid PostgreSQL URL",
            ),
            ("postgres://kg:secret@h/db?sslmode=require", "TLS"),
            ("postgres:///db?user=secret", "names no host"),
        ] {
            let e = pg(url).validate().unwrap_err();
            assert!(
                e.starts_with("usage_store: url: ") && e.contains(says),
                "{url}: {e}"
            );
            assert!(!e.contains("secret"), "{e}");
        }
        let none = UsageStoreConfig {
            backend: StoreBackend::Postgres,
            ..UsageStoreConfig::default()
        };
        assert!(none.validate().unwrap_err().contains("needs url"));
        let both = UsageStoreConfig {
            path: Some("x.db".into()),
            ..pg("postgres://h/db")
        };
        assert!(both
            .validate()
            .unwrap_err()
            .contains("path is for backend sqlite"));
    }
}
