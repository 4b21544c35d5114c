//! [`GateOptions`], and building a [`Gate`] from the binary's config.

use super::Gate;
use crate::core::config::Config;
use crate::core::net::parse_cidr;
use crate::core::table::KeyTable;
use crate::upstream::Upstreams;
use ipnet::IpNet;
use std::path::PathBuf;
use std::time::Duration;

/// Settings the gate needs besides the key table and the upstreams.
#[derive(Clone, Debug)]
pub struct GateOptions {
    /// Largest request body accepted, bytes.
    pub max_body_bytes: u64,
    /// Time the whole request body may take to arrive (408 after it).
    pub body_read_timeout: Duration,
    /// Seconds a kept-alive client connection may idle before its next request, set on each
    /// session as Pingora's keep-alive timeout; `None` leaves it to the connection layer (the
    /// keygate server's [`crate::ops::limits::Limited`] times it; Pingora alone has no limit once a
    /// request has been served).
    pub keepalive_timeout_seconds: Option<u64>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Completion tokens reserved when a call names no `max_tokens`.
    pub default_max_tokens: u64,
    /// Where consumed quota is persisted; `None` keeps it in memory only. With a shared
    /// ledger, only read: what it holds is added to Redis once (see [`Ledger::redis`]).
    pub state_dir: Option<PathBuf>,
    /// Keep the counters in Redis, shared with other gateways, instead of this process.
    pub shared_ledger: Option<crate::ledger::RedisSettings>,
    /// The usage log; `None` for none.
    pub usage_log: Option<PathBuf>,
    /// The usage store (SPEC §9); `None` for none.
    pub usage_store: Option<crate::usage::store::StoreSettings>,
    /// One access-log line per request.
    pub access_log: bool,
    /// Per-key metric series.
    pub per_key_metrics: bool,
    /// This process is the new binary of an upgrade (see [`Ledger::open_with`]).
    pub upgrade: bool,
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            max_body_bytes: 10 * 1024 * 1024,
            body_read_timeout: Duration::from_secs(60),
            keepalive_timeout_seconds: Some(60),
            trusted_proxies: Vec::new(),
            default_max_tokens: 1024,
            state_dir: None,
            shared_ledger: None,
            usage_log: None,
            usage_store: None,
            access_log: false,
            per_key_metrics: false,
            upgrade: false,
        }
    }
}

impl Gate {
    /// A gate from a loaded config: reads the sync file, builds the upstreams.
    pub fn from_config(config: &Config) -> std::result::Result<Gate, String> {
        Gate::from_config_with(config, false)
    }

    /// [`Gate::from_config`], as the new binary of an upgrade when `upgrade`.
    pub fn from_config_with(config: &Config, upgrade: bool) -> std::result::Result<Gate, String> {
        // Loaded on a thread that then exits, as reloads are: an allocator returns a table's
        // memory to the system only through a thread that collects (see `memory`), and the
        // thread calling this one parks in the server for good.
        let path = &config.sync_file;
        let table = std::thread::scope(|s| s.spawn(|| KeyTable::load(path)).join())
            .map_err(|_| "loading the sync file failed".to_string())?
            .map_err(|e| e.to_string())?;
        let upstreams = Upstreams::from_pools(&config.upstreams)?;
        let trusted_proxies = config
            .trusted_proxies
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Gate::new(
            table,
            upstreams,
            GateOptions {
                max_body_bytes: config.max_body_bytes,
                body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds),
                // The server's connection guard times it (see `server::conn_limits`).
                keepalive_timeout_seconds: None,
                trusted_proxies,
                default_max_tokens: config.default_max_tokens,
                state_dir: Some(config.state_dir.clone()),
                shared_ledger: crate::ledger::RedisSettings::from_config(&config.ledger),
                usage_log: config.usage_log.clone(),
                usage_store: crate::usage::store::StoreSettings::from_config(
                    &config.usage_store,
                    &config.state_dir,
                ),
                access_log: config.access_log,
                per_key_metrics: config.metrics.per_key,
                upgrade,
            },
        )
    }
}
