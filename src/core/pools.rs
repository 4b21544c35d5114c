//! The schema of an upstream pool (SPEC §11) as plain data: its targets, retry policy,
//! first-byte timeout and health check, and their validation. Today's single `url` +
//! `api_key_env` is a pool of one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One entry of `upstreams:` as written: a named pool serving some models.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// The single target's URL (a pool of one); exclusive with `targets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The single target's credential variable; only with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The targets; exclusive with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetConfig>>,
    /// The models this upstream serves (suffix `*` wildcard).
    pub models: Vec<String>,
    /// Verify the targets' TLS certificates (https only). Default true.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// TCP (and TLS) connect timeout, seconds. Default 10.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// Longest silence between two reads from a target, seconds. Default 300.
    #[serde(default = "default_read_timeout")]
    pub read_timeout_seconds: u64,
    /// Longest a write to a target may block, seconds. Default 60.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_seconds: u64,
    /// How long an idle pooled connection is kept, seconds. Default 60.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// When to try another target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// Longest wait for the response head, seconds (see the README: Pingora 0.9 has one read
    /// timeout per connection, so this also bounds later silences). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout_seconds: Option<u64>,
    /// The optional active health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
}

/// One target of a pool.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `http://host:port` or `https://host[:port]`, optionally with a base path.
    pub url: String,
    /// The environment variable holding this target's credential.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Share of the traffic within its priority. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// 0 is tried first; a higher priority only when no lower one is available.
    #[serde(default)]
    pub priority: u32,
    /// The model name this target is sent instead of the client's.
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
}

/// `retry:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries per request, the first included. Default 2.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// What is retried: `connect`, `timeout`, and statuses 429, 500, 502, 503, 504.
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOnEntry>,
    /// Retries may be at most this share of the pool's recent requests. Default 20.
    #[serde(default = "default_budget")]
    pub budget_percent: u32,
}

/// One `retry.on` entry as written: a word or a status code.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RetryOnEntry {
    /// `429`, `502`, …
    Status(u16),
    /// `connect`, `timeout`, or a status written as a string.
    Word(String),
}

/// A failure that may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    /// The connection could not be made (or broke before the response head).
    Connect,
    /// No response head in time.
    Timeout,
    /// The target answered with this status.
    Status(u16),
}

/// The statuses `retry.on` accepts.
pub const RETRY_STATUSES: [u16; 5] = [429, 500, 502, 503, 504];

impl RetryOnEntry {
    /// The failure it names, or a message saying why it names none.
    pub fn parse(&self) -> Result<RetryOn, String> {
        let status = match self {
            RetryOnEntry::Word(w) if w == "connect" => return Ok(RetryOn::Connect),
            RetryOnEntry::Word(w) if w == "timeout" => return Ok(RetryOn::Timeout),
            RetryOnEntry::Word(w) => w.parse::<u16>().ok(),
            RetryOnEntry::Status(s) => Some(*s),
        };
        match status {
            Some(s) if RETRY_STATUSES.contains(&s) => Ok(RetryOn::Status(s)),
            _ => Err(format!(
                "retry.on: unknown value {} (expected connect, timeout, 429, 500, 502, 503 or 504)",
                match self {
                    RetryOnEntry::Word(w) => format!("{w:?}"),
                    RetryOnEntry::Status(s) => s.to_string(),
                }
            )),
        }
    }
}

/// `health:`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// What is fetched (GET); any status below 500 counts as healthy. Default `/v1/models`.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Seconds between probes of one target. Default 10.
    #[serde(default = "default_interval")]
    pub interval_seconds: u64,
    /// Consecutive failed probes that take a target out. Default 3.
    #[serde(default = "default_unhealthy")]
    pub unhealthy_after: u32,
    /// Consecutive good probes that bring it back. Default 2.
    #[serde(default = "default_healthy")]
    pub healthy_after: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            on: default_retry_on(),
            budget_percent: default_budget(),
        }
    }
}

impl PoolConfig {
    /// The targets: the `targets` list, or the one `url` names.
    pub fn target_list(&self) -> Result<Vec<TargetConfig>, String> {
        let name = &self.name;
        match (&self.url, &self.targets) {
            (Some(_), Some(_)) => Err(format!(
                "upstream {name:?}: give either url or targets, not both"
            )),
            (None, None) => Err(format!(
                "upstream {name:?}: no targets (give url, or a non-empty targets list)"
            )),
            (None, Some(t)) if t.is_empty() => Err(format!(
                "upstream {name:?}: no targets (give url, or a non-empty targets list)"
            )),
            (None, Some(_)) if self.api_key_env.is_some() => Err(format!(
                "upstream {name:?}: api_key_env goes on each target when targets are given"
            )),
            (None, Some(t)) => Ok(t.clone()),
            (Some(url), None) => Ok(vec![TargetConfig {
                url: url.clone(),
                api_key_env: self.api_key_env.clone(),
                weight: 1,
                priority: 0,
                model_map: BTreeMap::new(),
            }]),
        }
    }

    /// The retry policy in force: the configured one, else two attempts for a pool of several
    /// targets and one for a pool of one.
    pub fn retry_policy(&self) -> RetryConfig {
        self.retry.clone().unwrap_or_else(|| {
            let several = self.targets.as_ref().is_some_and(|t| t.len() > 1);
            RetryConfig {
                attempts: if several { 2 } else { 1 },
                ..RetryConfig::default()
            }
        })
    }

    /// Check everything that needs no environment or network, with a message naming the
    /// upstream and the field.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        let targets = self.target_list()?;
        if targets.iter().all(|t| t.weight == 0) {
            return Err(format!(
                "upstream {name:?}: every target has weight 0 (at least one must be above 0)"
            ));
        }
        for (i, t) in targets.iter().enumerate() {
            crate::core::url::UpstreamUrl::parse(&t.url)
                .map_err(|e| format!("upstream {name:?}: target {i}: {e}"))?;
            check_model_map(&t.model_map)
                .map_err(|e| format!("upstream {name:?}: target {i}: model_map: {e}"))?;
        }
        if let Some(r) = &self.retry {
            if r.attempts == 0 {
                return Err(format!(
                    "upstream {name:?}: retry.attempts: must be at least 1"
                ));
            }
            if r.attempts > 16 {
                return Err(format!("upstream {name:?}: retry.attempts: at most 16"));
            }
            if r.budget_percent > 100 {
                return Err(format!(
                    "upstream {name:?}: retry.budget_percent: must be between 0 and 100"
                ));
            }
            for o in &r.on {
                o.parse().map_err(|e| format!("upstream {name:?}: {e}"))?;
            }
        }
        if self.first_byte_timeout_seconds == Some(0) {
            return Err(format!(
                "upstream {name:?}: first_byte_timeout_seconds: must be at least 1"
            ));
        }
        if let Some(h) = &self.health {
            if h.interval_seconds == 0 || h.unhealthy_after == 0 || h.healthy_after == 0 {
                return Err(format!(
                    "upstream {name:?}: health: interval_seconds, unhealthy_after and healthy_after must be at least 1"
                ));
            }
            if !h.path.starts_with('/') {
                return Err(format!("upstream {name:?}: health.path: must start with /"));
            }
        }
        if targets.len() > 64 {
            return Err(format!("upstream {name:?}: at most 64 targets"));
        }
        for m in &self.models {
            crate::core::models::ModelPattern::parse(m)
                .map_err(|e| format!("upstream {name:?}: models: {e}"))?;
        }
        Ok(())
    }
}

/// A mapping to an empty name, or one that leads back to where it started, is refused.
fn check_model_map(map: &BTreeMap<String, String>) -> Result<(), String> {
    for (from, to) in map {
        if from.is_empty() || to.trim().is_empty() {
            return Err(format!("{from:?} maps to an empty name"));
        }
        let mut path = vec![from.as_str()];
        let mut at = to.as_str();
        while let Some(next) = map.get(at) {
            path.push(at);
            if path.contains(&next.as_str()) {
                path.push(next);
                return Err(format!("a loop: {}", path.join(" -> ")));
            }
            at = next;
        }
    }
    Ok(())
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
fn default_weight() -> u32 {
    1
}
fn default_attempts() -> u32 {
    2
}
fn default_retry_on() -> Vec<RetryOnEntry> {
    let mut on = vec![
        RetryOnEntry::Word("connect".into()),
        RetryOnEntry::Word("timeout".into()),
    ];
    on.extend(RETRY_STATUSES.iter().map(|s| RetryOnEntry::Status(*s)));
    on
}
fn default_budget() -> u32 {
    20
}
fn default_health_path() -> String {
    "/v1/models".into()
}
fn default_interval() -> u64 {
    10
}
fn default_unhealthy() -> u32 {
    3
}
fn default_healthy() -> u32 {
    2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> Result<PoolConfig, String> {
        let p: PoolConfig = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        p.validate().map(|()| p)
    }

    #[test]
    fn a_single_url_is_a_pool_of_one() {
        let p = pool("name: a\nurl: http://127.0.0.1:1\napi_key_env: K\nmodels: ['*']\n").unwrap();
        let t = p.target_list().unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].api_key_env.as_deref(), Some("K"));
        assert_eq!(p.retry_policy().attempts, 1);
    }

    #[test]
    fn a_pool_with_no_targets_is_refused() {
        let e = pool("name: a\ntargets: []\nmodels: ['*']\n").unwrap_err();
        assert!(e.contains("upstream \"a\": no targets"), "{e}");
        let e = pool("name: a\nmodels: ['*']\n").unwrap_err();
        assert!(e.contains("no targets"), "{e}");
    }

    #[test]
    fn weight_zero_everywhere_is_refused() {
        let e = pool("name: a\nmodels: ['*']\ntargets:\n  - {url: 'http://h:1', weight: 0}\n  - {url: 'http://h:2', weight: 0}\n")
            .unwrap_err();
        assert!(e.contains("every target has weight 0"), "{e}");
    }

    #[test]
    fn model_map_loops_and_empty_names_are_refused() {
        let e = pool(
            "name: a\nmodels: ['*']\ntargets:\n  - {url: 'http://h:1', model_map: {a: b, b: a}}\n",
        )
        .unwrap_err();
        assert!(
            e.contains("target 0: model_map: a loop: a -> b -> a"),
            "{e}"
        );
        let e = pool(
            "name: a\nmodels: ['*']\ntargets:\n  - {url: 'http://h:1', model_map: {fast: ''}}\n",
        )
        .unwrap_err();
        assert!(e.contains("\"fast\" maps to an empty name"), "{e}");
        pool(
            "name: a\nmodels: ['*']\ntargets:\n  - {url: 'http://h:1', model_map: {a: b, b: c}}\n",
        )
        .unwrap();
    }

    #[test]
    fn unknown_retry_on_values_are_refused() {
        for bad in ["[connect, 418]", "[reset]", "['999']"] {
            let e = pool(&format!(
                "name: a\nurl: http://h:1\nmodels: ['*']\nretry: {{on: {bad}}}\n"
            ))
            .unwrap_err();
            assert!(e.contains("retry.on: unknown value"), "{bad}: {e}");
        }
        let p = pool("name: a\nurl: http://h:1\nmodels: ['*']\nretry: {attempts: 3, on: [connect, timeout, 429, '503'], budget_percent: 20}\n").unwrap();
        let on: Vec<_> = p
            .retry_policy()
            .on
            .iter()
            .map(|o| o.parse().unwrap())
            .collect();
        assert_eq!(
            on,
            [
                RetryOn::Connect,
                RetryOn::Timeout,
                RetryOn::Status(429),
                RetryOn::Status(503)
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(
            pool("name: a\nmodels: ['*']\ntargets:\n  - {url: 'http://h:1', wieght: 2}\n").is_err()
        );
        assert!(pool("name: a\nurl: http://h:1\nmodels: ['*']\nretry: {tries: 2}\n").is_err());
    }
}
