//! One target of a pool: where it is, its credential, its model names, and its health state
//! (atomics only: the request path never takes a lock).

use super::now_ms;
use crate::core::config::{PoolConfig, TargetConfig};
use crate::core::credential::CredentialStyle;
use crate::core::url::UpstreamUrl;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::Result;
use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest a passively ejected target stays out before it is probed again.
pub const MAX_EJECTION: Duration = Duration::from_secs(60);
/// The first ejection's length; each consecutive one doubles it.
pub const FIRST_EJECTION: Duration = Duration::from_secs(1);
/// While one request probes a target that is due back, the others keep away this long.
pub const PROBE_WINDOW: Duration = Duration::from_secs(5);

/// One backend of a pool.
pub struct Target {
    /// Its metric label: `host:port`, with `#index` when two targets share it.
    pub label: String,
    /// Where it is.
    pub url: UpstreamUrl,
    /// Share of the traffic within its priority.
    pub weight: u32,
    /// 0 first.
    pub priority: u32,
    model_map: HashMap<String, String>,
    host_header: HeaderValue,
    credential: Option<UpstreamCredential>,
    peer: HttpPeer,
    /// Health and cooldown, shared by every request.
    pub state: TargetState,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("label", &self.label)
            .field("url", &self.url)
            .field("credential", &self.credential.is_some())
            .finish()
    }
}

/// The upstream's own credential, pre-rendered for each header style.
struct UpstreamCredential {
    bearer: HeaderValue,
    raw: HeaderValue,
}

/// A target's health, in milliseconds of [`now_ms`]: all atomics.
#[derive(Debug, Default)]
pub struct TargetState {
    /// Consecutive failed attempts.
    pub fails: AtomicU32,
    /// Consecutive ejections (the back-off grows with them).
    pub ejections: AtomicU32,
    /// Ejected until then (0: not ejected).
    pub down_until: AtomicU64,
    /// A request is probing the target after its ejection ran out ([`Self::claim_probe`]).
    pub probing: AtomicBool,
    /// Cooling down (Retry-After) until then.
    pub cooling_until: AtomicU64,
    /// When it last failed (0: never).
    pub last_failure: AtomicU64,
    /// The active health check's verdict (set through [`TargetState::set_health_down`]).
    pub health_down: AtomicBool,
    /// Shared by the pool's targets: bumped after any change that can take a target out of
    /// the choice (a cooldown, an ejection, a failed health check), so that while it stays
    /// put the pool knows every target is available without reading their states (see
    /// [`super::Upstream::select`]).
    pub(super) troubles: Arc<AtomicU64>,
}

impl TargetState {
    /// Whether a request may be sent now (a target due back from ejection counts: the next
    /// request is its probe).
    #[inline]
    pub fn available(&self, now: u64) -> bool {
        self.cooling_until.load(Ordering::Relaxed) <= now
            && self.down_until.load(Ordering::Relaxed) <= now
            && !self.health_down.load(Ordering::Relaxed)
    }

    /// Whether it is in service (`keygate_upstream_target_up`, `/readyz`): not ejected, nor
    /// ejected and still to be probed (its back-off ran out, but nothing has shown it answers
    /// again), and passing its health check.
    pub fn in_service(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) == 0 && !self.health_down.load(Ordering::Relaxed)
    }

    /// Whether it can be chosen as up at `now` (an ejection that ran out counts: the next
    /// request is its probe).
    pub fn up(&self, now: u64) -> bool {
        self.down_until.load(Ordering::Relaxed) <= now && !self.health_down.load(Ordering::Relaxed)
    }

    /// Whether it is only cooling down (not ejected, not failing its health check).
    pub fn cooling(&self, now: u64) -> Option<u64> {
        let until = self.cooling_until.load(Ordering::Relaxed);
        (until > now && self.up(now)).then_some(until)
    }

    /// A request is about to probe a target whose ejection ran out: keep the others away
    /// while it does.
    pub fn claim_probe(&self, now: u64) {
        let until = self.down_until.load(Ordering::Relaxed);
        if until != 0 && until <= now {
            let claimed = self.down_until.compare_exchange(
                until,
                now + PROBE_WINDOW.as_millis() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if claimed.is_ok() {
                self.probing.store(true, Ordering::Relaxed);
            }
        }
    }

    /// An attempt got an answer: the failure streak ends (two loads when there was none).
    #[inline]
    pub fn succeeded(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
        if self.down_until.load(Ordering::Relaxed) != 0 {
            self.down_until.store(0, Ordering::Relaxed);
            self.ejections.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Relaxed);
        }
    }

    /// An attempt failed; after `eject_after` in a row the target is ejected for a back-off
    /// that doubles with each ejection in a row. Returns whether it was ejected. While it is
    /// ejected, only its probe's failure ejects it again: the failures of calls sent before
    /// the ejection (many, under concurrency) do not each double the back-off.
    pub fn failed(&self, eject_after: u32) -> bool {
        let now = now_ms();
        self.last_failure.store(now, Ordering::Relaxed);
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails < eject_after {
            return false;
        }
        if self.down_until.load(Ordering::Relaxed) > now
            && !self.probing.swap(false, Ordering::Relaxed)
        {
            return false;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = (FIRST_EJECTION.as_millis() as u64)
            .saturating_mul(1 << n)
            .min(MAX_EJECTION.as_millis() as u64);
        self.down_until.store(now + backoff, Ordering::Relaxed);
        self.troubles.fetch_add(1, Ordering::Release);
        true
    }

    /// The active health check's verdict; returns whether it changed.
    pub fn set_health_down(&self, down: bool) -> bool {
        let changed = self.health_down.swap(down, Ordering::Relaxed) != down;
        if changed && down {
            self.troubles.fetch_add(1, Ordering::Release);
        }
        changed
    }

    /// Whether nothing keeps it out of the choice at `now`: not cooling, not ejected (nor
    /// waiting for its probe), passing its health check.
    pub(super) fn clear(&self, now: u64) -> bool {
        self.cooling_until.load(Ordering::Relaxed) <= now && self.in_service()
    }

    /// Cool down for `secs` from now; a cooldown is extended, never shortened. Returns whether
    /// it was extended.
    pub fn cool_down(&self, duration: Duration) -> bool {
        let until = now_ms() + duration.as_millis() as u64;
        let extended = self.cooling_until.fetch_max(until, Ordering::Relaxed) < until;
        if extended {
            self.troubles.fetch_add(1, Ordering::Release);
        }
        extended
    }
}

impl Target {
    /// Build from a pool's config and one of its targets: read the credential, resolve the host.
    pub fn from_config(
        pool: &PoolConfig,
        index: usize,
        c: &TargetConfig,
    ) -> std::result::Result<Target, String> {
        let name = &pool.name;
        let url = UpstreamUrl::parse(&c.url)
            .map_err(|e| format!("upstream {name:?}: target {index}: {e}"))?;
        let credential = match &c.api_key_env {
            None => None,
            Some(var) => {
                let secret = std::env::var(var).map_err(|_| {
                    format!(
                        "upstream {name:?}: environment variable {var} (api_key_env) is not set"
                    )
                })?;
                let bad =
                    || format!("upstream {name:?}: {var} holds characters not allowed in a header");
                let mut bearer =
                    HeaderValue::from_str(&format!("Bearer {secret}")).map_err(|_| bad())?;
                let mut raw = HeaderValue::from_str(&secret).map_err(|_| bad())?;
                bearer.set_sensitive(true);
                raw.set_sensitive(true);
                Some(UpstreamCredential { bearer, raw })
            }
        };
        let addr: SocketAddr = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| format!("upstream {name:?}: cannot resolve {}: {e}", url.host))?
            .next()
            .ok_or_else(|| format!("upstream {name:?}: {} has no address", url.host))?;
        let mut peer = HttpPeer::new(addr, url.tls, url.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(Duration::from_secs(pool.connect_timeout_seconds));
        o.total_connection_timeout = Some(Duration::from_secs(
            pool.connect_timeout_seconds.saturating_mul(2),
        ));
        // Pingora 0.9 has one read timeout per upstream connection: the first-byte timeout,
        // when set, is it (see the README).
        let read = pool
            .first_byte_timeout_seconds
            .unwrap_or(pool.read_timeout_seconds);
        o.read_timeout = Some(Duration::from_secs(read));
        o.write_timeout = Some(Duration::from_secs(pool.write_timeout_seconds));
        o.idle_timeout = Some(Duration::from_secs(pool.idle_timeout_seconds));
        o.verify_cert = pool.tls_verify;
        o.verify_hostname = pool.tls_verify;
        let host_header = HeaderValue::from_str(&url.authority())
            .map_err(|_| format!("upstream {name:?}: bad host"))?;
        Ok(Target {
            label: format!("{}:{}", url.host, url.port),
            url,
            weight: c.weight,
            priority: c.priority,
            model_map: c
                .model_map
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            host_header,
            credential,
            peer,
            state: TargetState::default(),
        })
    }

    /// The name this target knows `model` by, when it differs.
    #[inline]
    pub fn mapped_model(&self, model: &str) -> Option<&str> {
        if self.model_map.is_empty() {
            return None;
        }
        self.model_map.get(model).map(String::as_str)
    }

    /// A peer to connect to.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }

    /// The socket address it resolved to (health checks).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.peer._address.as_inet().copied()
    }

    /// Point `req` at this target: `Host`, base path, and its credential in the style the
    /// client used. The client's own credential must already be gone.
    pub fn prepare_request(&self, req: &mut RequestHeader, style: CredentialStyle) -> Result<()> {
        req.insert_header(http::header::HOST, self.host_header.clone())?;
        if !self.url.base_path.is_empty() {
            let pq = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let new = format!("{}{}", self.url.base_path, pq);
            if let Ok(uri) = new.parse::<http::Uri>() {
                req.set_uri(uri);
            }
        }
        if let Some(c) = &self.credential {
            match style {
                CredentialStyle::Bearer | CredentialStyle::WebSocketProtocol => {
                    req.insert_header(http::header::AUTHORIZATION, c.bearer.clone())?
                }
                CredentialStyle::XApiKey => req.insert_header("x-api-key", c.raw.clone())?,
                CredentialStyle::XGoogApiKey | CredentialStyle::QueryKey => {
                    req.insert_header("x-goog-api-key", c.raw.clone())?
                }
            }
        }
        Ok(())
    }
}
