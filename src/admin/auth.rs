//! Who is calling: admin tokens resolved at start (from the environment or as SHA-256 digests),
//! compared in constant time, and failed sign-ins slowed down per client address.

use crate::core::admin_config::{AdminTokenConfig, Role};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// A caller the tokens let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (never its secret).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Sees only this account's keys.
    pub account: Option<String>,
}

impl Caller {
    /// May it write?
    pub fn can_write(&self) -> bool {
        self.role == Role::Admin
    }
}

struct Token {
    digest: [u8; 32],
    caller: Caller,
}

/// The admin tokens.
pub struct Tokens(Vec<Token>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: a digest of a short token could be searched.
        f.debug_list()
            .entries(self.0.iter().map(|t| &t.caller.name))
            .finish()
    }
}

impl Tokens {
    /// Resolve the configured tokens: each `token_env` must be set and non-empty.
    pub fn resolve(config: &[AdminTokenConfig]) -> Result<Tokens, String> {
        let mut out = Vec::with_capacity(config.len());
        for t in config {
            let digest = match (&t.token_env, &t.token_sha256) {
                (Some(var), _) => {
                    let value = std::env::var(var).map_err(|_| {
                        format!(
                            "admin token {:?}: environment variable {var} (token_env) is not set",
                            t.name
                        )
                    })?;
                    if value.trim().is_empty() {
                        return Err(format!(
                            "admin token {:?}: environment variable {var} is empty",
                            t.name
                        ));
                    }
                    Sha256::digest(value.trim().as_bytes()).into()
                }
                (None, Some(hex_digest)) => {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(hex_digest, &mut d).map_err(|_| {
                        format!(
                            "admin token {:?}: token_sha256 must be 64 hex characters",
                            t.name
                        )
                    })?;
                    d
                }
                (None, None) => {
                    return Err(format!(
                        "admin token {:?}: give token_env or token_sha256",
                        t.name
                    ))
                }
            };
            out.push(Token {
                digest,
                caller: Caller {
                    name: t.name.clone(),
                    role: t.role,
                    account: t.account.clone(),
                },
            });
        }
        Ok(Tokens(out))
    }

    /// The caller whose token is `presented`. Every configured token is compared, each in
    /// constant time, so the answer's timing says nothing about which one nearly matched.
    pub fn check(&self, presented: &[u8]) -> Option<&Caller> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for t in &self.0 {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(&t.caller);
            }
        }
        found
    }
}

/// Failures from one address within this window count together.
const WINDOW: Duration = Duration::from_secs(60);
/// Failures in a window answered without delay.
const FREE_FAILURES: u32 = 5;
/// The longest delay before a failed sign-in is answered.
const MAX_DELAY: Duration = Duration::from_secs(3);
/// Addresses remembered at most (the oldest windows are forgotten first).
const MAX_ADDRESSES: usize = 10_000;

/// Slows down repeated failed sign-ins from one address: after [`FREE_FAILURES`] in a minute,
/// each further failure is answered after 100 ms, doubling up to [`MAX_DELAY`].
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Throttle {
    /// Record a failure from `ip`; returns how long to wait before answering it and how many
    /// failures that address has in the current window.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> (Duration, u32) {
        let mut map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_ADDRESSES {
            map.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
            if map.len() >= MAX_ADDRESSES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        let n = entry.0;
        let delay = match n.checked_sub(FREE_FAILURES + 1) {
            None => Duration::ZERO,
            Some(extra) => Duration::from_millis(100)
                .saturating_mul(1u32 << extra.min(10))
                .min(MAX_DELAY),
        };
        (delay, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_their_secret() {
        let digest = hex::encode(Sha256::digest(b"s3cret"));
        let t = Tokens::resolve(&[AdminTokenConfig {
            name: "ops".into(),
            token_env: None,
            token_sha256: Some(digest),
            role: Role::Viewer,
            account: None,
        }])
        .unwrap();
        assert_eq!(t.check(b"s3cret").unwrap().name, "ops");
        assert!(t.check(b"s3cre").is_none());
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn a_missing_variable_is_named() {
        let e = Tokens::resolve(&[AdminTokenConfig {
            name: "ops".into(),
            token_env: Some("KEYGATE_TEST_UNSET_ADMIN_TOKEN".into()),
            token_sha256: None,
            role: Role::Admin,
            account: None,
        }])
        .unwrap_err();
        assert!(e.contains("KEYGATE_TEST_UNSET_ADMIN_TOKEN"), "{e}");
    }

    #[test]
    fn repeated_failures_wait_longer() {
        let t = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.failed(ip, now).0, Duration::ZERO);
        }
        assert_eq!(t.failed(ip, now).0, Duration::from_millis(100));
        assert_eq!(t.failed(ip, now).0, Duration::from_millis(200));
        for _ in 0..20 {
            t.failed(ip, now);
        }
        assert_eq!(t.failed(ip, now).0, MAX_DELAY);
        // Another address is not slowed; a new window starts over.
        assert_eq!(
            t.failed("192.0.2.2".parse().unwrap(), now).0,
            Duration::ZERO
        );
        assert_eq!(t.failed(ip, now + WINDOW).0, Duration::ZERO);
    }
}
