//! The YAML configuration (SPEC §5) and the sync-file schema (SPEC §2) as serde reads them.
//!
//! Both are parsed strictly (`deny_unknown_fields`: a typo must not silently disable a
//! restriction) and only describe the files; [`crate::core::table`] compiles a sync file into the
//! runtime table and [`Config::load`] resolves paths against the config file's folder.

pub use super::alerts::AlertsConfig;
pub use super::pools::{
    HealthConfig, PoolConfig, RetryConfig, RetryOn, RetryOnEntry, TargetConfig, RETRY_STATUSES,
};
pub use super::store_config::{StoreBackend, UsageStoreConfig};
pub use super::sync_schema::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors while reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown/mistyped keys.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, which names the key and the line.
        message: String,
    },
    /// The values are individually well-typed but do not make sense.
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One or several listen addresses.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Listen {
    /// `listen: "0.0.0.0:8080"`
    One(String),
    /// `listen: ["0.0.0.0:8080", "[::]:8080"]`
    Many(Vec<String>),
}

impl Listen {
    /// The addresses as a list.
    pub fn addresses(&self) -> Vec<String> {
        match self {
            Listen::One(a) => vec![a.clone()],
            Listen::Many(v) => v.clone(),
        }
    }
}

/// TLS on the proxy listener.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `metrics:` options.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Per-key series (labelled by key id and name). Off by default: they grow with the keys.
    #[serde(default)]
    pub per_key: bool,
}

/// Where quota counters live (`ledger.backend`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LedgerBackend {
    /// In this process, persisted in `state_dir`.
    #[default]
    Local,
    /// One Redis (or Valkey) server shared by several gateways.
    Redis,
    /// A Redis Cluster shared by several gateways.
    RedisCluster,
}

/// What a gateway on a shared ledger does while Redis cannot be reached
/// (`ledger.on_unavailable`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnavailable {
    /// Spend the allowance this gateway already holds, then refuse with 503.
    #[default]
    Lease,
    /// Refuse every metered call with 503 at once.
    Deny,
    /// Admit and count locally; the count is added to Redis when it is back.
    Allow,
}

/// `ledger:` options.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// `local` (default), `redis` or `redis-cluster`.
    #[serde(default)]
    pub backend: LedgerBackend,
    /// `redis://host:port[/db]`; for `redis-cluster` a comma-separated list of seed nodes.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// `lease` (default), `deny` or `allow`.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Longest a Redis call may take before Redis counts as unreachable, milliseconds.
    /// Default 250.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// Seconds a gateway's lease record lives without renewal; after that, what the gateway
    /// held counts as spent (a dead gateway's lease is stranded, never given back). Live
    /// gateways renew every third of it. Default 30.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_seconds: u64,
}

fn default_lease_ttl() -> u64 {
    30
}

fn default_redis_timeout_ms() -> u64 {
    250
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            backend: LedgerBackend::Local,
            redis_url: None,
            on_unavailable: OnUnavailable::Lease,
            redis_timeout_ms: default_redis_timeout_ms(),
            lease_ttl_seconds: default_lease_ttl(),
        }
    }
}

impl LedgerConfig {
    /// The Redis seed addresses (`redis_url` split at commas, blanks dropped).
    pub fn redis_urls(&self) -> Vec<String> {
        self.redis_url
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        if self.backend == LedgerBackend::Local {
            return Ok(());
        }
        let urls = self.redis_urls();
        if urls.is_empty() {
            return Err("ledger: redis_url is needed for a redis backend".into());
        }
        if self.backend == LedgerBackend::Redis && urls.len() > 1 {
            return Err(
                "ledger: redis_url: one address for backend redis (a list is for redis-cluster)"
                    .into(),
            );
        }
        for u in &urls {
            if !(u.starts_with("redis://") || u.starts_with("valkey://")) {
                return Err(format!(
                    "ledger: redis_url: {u:?} is not a redis:// address"
                ));
            }
        }
        if !(10..=60_000).contains(&self.redis_timeout_ms) {
            return Err("ledger: redis_timeout_ms: must be between 10 and 60000".into());
        }
        if !(2..=86_400).contains(&self.lease_ttl_seconds) {
            return Err("ledger: lease_ttl_seconds: must be between 2 and 86400".into());
        }
        Ok(())
    }
}

/// One backend.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// `http://host:port` or `https://host[:port]`, optionally with a base path.
    pub url: String,
    /// The environment variable holding the credential sent upstream.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The models this upstream serves (suffix `*` wildcard).
    pub models: Vec<String>,
    /// Verify the upstream's TLS certificate (https only). Default true.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// TCP (and TLS) connect timeout, seconds. Default 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// Longest silence between two reads from the upstream, seconds. A stream that keeps
    /// producing events is never cut; a silent one is. Default 300.
    #[serde(default = "default_read_timeout")]
    pub read_timeout_seconds: u64,
    /// Longest a write to the upstream may block, seconds. Default 60.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_seconds: u64,
    /// How long an idle pooled connection to this upstream is kept, seconds. Default 60.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
}

impl From<&UpstreamConfig> for PoolConfig {
    fn from(c: &UpstreamConfig) -> PoolConfig {
        PoolConfig {
            name: c.name.clone(),
            url: Some(c.url.clone()),
            api_key_env: c.api_key_env.clone(),
            targets: None,
            models: c.models.clone(),
            tls_verify: c.tls_verify,
            connect_timeout_seconds: c.connect_timeout_seconds,
            read_timeout_seconds: c.read_timeout_seconds,
            write_timeout_seconds: c.write_timeout_seconds,
            idle_timeout_seconds: c.idle_timeout_seconds,
            retry: None,
            first_byte_timeout_seconds: None,
            health: None,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_read_timeout() -> u64 {
    300
}
fn default_write_timeout() -> u64 {
    60
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_max_body() -> u64 {
    10 * 1024 * 1024
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("var")
}
fn default_grace() -> u64 {
    30
}
fn default_pool() -> usize {
    1024
}
fn default_max_tokens() -> u64 {
    1024
}

/// The configuration file as written (SPEC §5).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Proxy listener address(es).
    pub listen: Listen,
    /// Proxy worker threads; default: the number of cores.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Address of the `/metrics`, `/healthz`, `/readyz` listener.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// The key table (SPEC §2). With `sync_url`, where the last good copy from the admin
    /// instance is kept (default `state_dir/followed-keys.json`).
    #[serde(default)]
    pub sync_file: PathBuf,
    /// Follow an admin instance (`https://admin:9092/admin/v1/sync`) instead of a local file
    /// (SPEC §8, fleets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_url: Option<String>,
    /// The variable holding the admin token `sync_url` is fetched with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_token_env: Option<String>,
    /// Where consumed quota is persisted.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// One JSON line per settled call.
    #[serde(default)]
    pub usage_log: Option<PathBuf>,
    /// Largest request body accepted, bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// CIDRs whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// TLS on the proxy listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// The backends, tried in order for a model match.
    pub upstreams: Vec<PoolConfig>,
    /// Seconds in-flight requests get to finish after SIGTERM. Default 30.
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u64,
    /// Idle keep-alive connections kept per upstream. Default 1024.
    #[serde(default = "default_pool")]
    pub upstream_pool_size: usize,
    /// The Unix socket a new binary takes the listeners over (`keygate run --upgrade`).
    /// Default: `upgrade.sock` in `state_dir`.
    #[serde(default)]
    pub upgrade_sock: Option<PathBuf>,
    /// One structured access-log line per request (`keygate::access {json}` on stderr).
    /// Default true.
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// Metrics options.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Watch the sync file and reload it when it changes (SIGHUP always reloads). Default true.
    #[serde(default = "default_true")]
    pub watch_sync_file: bool,
    /// Completion tokens reserved for a call that names no `max_tokens`. Default 1024.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// Seconds a request head may take from its first byte (a new connection: from accept);
    /// 408 after that. Default 15.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_seconds: u64,
    /// Largest request head (request line and headers), bytes; 431 above. Default 32768.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Seconds the whole request body may take to arrive; 408 after that. Default 60.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_seconds: u64,
    /// Seconds an idle keep-alive client connection is kept open. Default 60.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout_seconds: u64,
    /// Requests served on one client connection before it is closed; 0 for no limit.
    /// Default 1000.
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: u32,
    /// Bytes of read buffer kept per client connection on a plain-TCP listener. Default 0: the
    /// request head and body are read straight into their own buffers, so an idle or waiting
    /// connection holds none (Pingora's default is 64 KiB, zero-filled, per connection). TLS
    /// listeners keep Pingora's 64 KiB, which saves system calls under 16 KiB TLS records.
    #[serde(default)]
    pub client_read_buffer_bytes: usize,
    /// Where quota counters live: this process (default) or Redis shared by several gateways.
    #[serde(default)]
    pub ledger: LedgerConfig,
    /// The admin API and console listener (SPEC §8); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<crate::core::admin_config::AdminConfig>,
    /// The key vault (SPEC §8): keys created or rotated here are also stored sealed, so that
    /// they can be revealed again.
    #[serde(default)]
    pub key_vault: Option<KeyVaultConfig>,
    /// The usage store (SPEC §9): on by default, SQLite in `state_dir`.
    #[serde(default)]
    pub usage_store: UsageStoreConfig,
    /// Alerts (SPEC §7): a webhook told when quotas and budgets cross thresholds and keys
    /// near their expiry; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<AlertsConfig>,
}

/// `key_vault:` where the vault secret comes from.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyVaultConfig {
    /// The environment variable holding the secret: 32 random bytes as 64 hex characters.
    pub secret_env: String,
}

fn default_header_read_timeout() -> u64 {
    15
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_body_read_timeout() -> u64 {
    60
}
fn default_keepalive_timeout() -> u64 {
    60
}
fn default_max_requests_per_connection() -> u32 {
    1000
}

impl Config {
    /// Read, parse and check a config file; relative paths in it become relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        if config.sync_url.is_some() && config.sync_file.as_os_str().is_empty() {
            config.sync_file = config.state_dir.join("followed-keys.json");
        }
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Parse YAML text (no path resolution, no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }

    /// Make every relative path relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if !self.sync_file.as_os_str().is_empty() {
            fix(&mut self.sync_file);
        }
        fix(&mut self.state_dir);
        if let Some(p) = self.usage_log.as_mut() {
            fix(p);
        }
        if let Some(tls) = self.tls.as_mut() {
            fix(&mut tls.cert);
            fix(&mut tls.key);
        }
        if let Some(p) = self.upgrade_sock.as_mut() {
            fix(p);
        }
        if let Some(p) = self.admin.as_mut().and_then(|a| a.audit_log.as_mut()) {
            fix(p);
        }
        if let Some(p) = self.usage_store.path.as_mut() {
            fix(p);
        }
    }

    /// Check what serde cannot: non-empty lists, parseable addresses, CIDRs and URLs.
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.addresses().is_empty() {
            return Err("listen: at least one address is needed".into());
        }
        for a in self.listen.addresses() {
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("listen: {a:?} is not an IP:port address"))?;
        }
        if let Some(m) = &self.metrics_listen {
            m.parse::<std::net::SocketAddr>()
                .map_err(|_| format!("metrics_listen: {m:?} is not an IP:port address"))?;
        }
        if self.sync_file.as_os_str().is_empty() {
            return Err("sync_file: needed (or sync_url, to follow an admin instance)".into());
        }
        if let Some(u) = &self.sync_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("sync_url: {u:?} is not an http:// or https:// URL"));
            }
            if self.sync_token_env.is_none() {
                return Err("sync_url: sync_token_env names the admin token's variable".into());
            }
        }
        if self.threads == Some(0) {
            return Err("threads: must be at least 1".into());
        }
        if self.max_body_bytes == 0 {
            return Err("max_body_bytes: must be at least 1".into());
        }
        for (name, value) in [
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("body_read_timeout_seconds", self.body_read_timeout_seconds),
            ("keepalive_timeout_seconds", self.keepalive_timeout_seconds),
        ] {
            if value == 0 {
                return Err(format!("{name}: must be at least 1"));
            }
        }
        // Pingora refuses heads over 1 MiB with 400 before keygate sees them.
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err("max_header_bytes: must be between 1024 and 1048576".into());
        }
        for c in &self.trusted_proxies {
            crate::core::net::parse_cidr(c).map_err(|e| format!("trusted_proxies: {e}"))?;
        }
        self.ledger.validate()?;
        if let Some(v) = &self.key_vault {
            if v.secret_env.trim().is_empty() {
                return Err(
                    "key_vault: secret_env: the name of an environment variable is needed".into(),
                );
            }
        }
        self.usage_store.validate()?;
        if self.upstreams.is_empty() {
            return Err("upstreams: at least one upstream is needed".into());
        }
        for u in &self.upstreams {
            u.validate()?;
        }
        if let Some(a) = &self.admin {
            a.validate()?;
        }
        if let Some(a) = &self.alerts {
            a.validate()?;
        }
        Ok(())
    }

    /// The listen addresses.
    pub fn listen_addresses(&self) -> Vec<String> {
        self.listen.addresses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen: \"127.0.0.1:0\"\nsync_file: keys.json\nupstreams:\n  - name: a\n    url: http://127.0.0.1:1\n    models: [\"*\"]\n";

    #[test]
    fn unknown_config_key_is_named() {
        let err = Config::parse(&format!("{MINIMAL}listne: x\n")).unwrap_err();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.resolve_paths(Path::new("/etc/keygate"));
        assert_eq!(c.sync_file, PathBuf::from("/etc/keygate/keys.json"));
        assert_eq!(c.state_dir, PathBuf::from("/etc/keygate/var"));
    }

    #[test]
    fn listen_may_be_a_list() {
        let c = Config::parse(&MINIMAL.replace(
            "listen: \"127.0.0.1:0\"",
            "listen: [\"127.0.0.1:0\", \"[::1]:0\"]",
        ))
        .unwrap();
        assert_eq!(c.listen_addresses().len(), 2);
    }

    #[test]
    fn sync_file_rejects_trailing_garbage_and_unknown_fields() {
        assert!(SyncFile::parse(b"{\"keys\":[]} x").is_err());
        let e =
            SyncFile::parse(b"{\"keys\":[{\"id\":1,\"key\":\"a\",\"alow_ips\":[]}]}").unwrap_err();
        assert!(e.contains("alow_ips"), "{e}");
    }
}
