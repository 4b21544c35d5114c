//! The upstreams a request can go to: which upstream serves a model, how to reach it, and the
//! credential it expects.

use crate::core::config::UpstreamConfig;
use crate::core::credential::CredentialStyle;
use crate::core::table::ModelPattern;
pub use crate::core::url::UpstreamUrl;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::Result;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// One backend, ready to route to.
pub struct Upstream {
    /// Its name (logs, metrics).
    pub name: String,
    /// Where it is.
    pub url: UpstreamUrl,
    models: Vec<ModelPattern>,
    host_header: HeaderValue,
    credential: Option<UpstreamCredential>,
    peer: HttpPeer,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
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

impl Upstream {
    /// Build from config: read the credential from its environment variable, resolve the host.
    pub fn from_config(c: &UpstreamConfig) -> std::result::Result<Upstream, String> {
        let url = UpstreamUrl::parse(&c.url).map_err(|e| format!("upstream {:?}: {e}", c.name))?;
        let models = c
            .models
            .iter()
            .map(|m| ModelPattern::parse(m))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| format!("upstream {:?}: models: {e}", c.name))?;
        let credential = match &c.api_key_env {
            None => None,
            Some(var) => {
                let secret = std::env::var(var).map_err(|_| {
                    format!(
                        "upstream {:?}: environment variable {var} (api_key_env) is not set",
                        c.name
                    )
                })?;
                let bad = || {
                    format!(
                        "upstream {:?}: {var} holds characters not allowed in a header",
                        c.name
                    )
                };
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
            .map_err(|e| format!("upstream {:?}: cannot resolve {}: {e}", c.name, url.host))?
            .next()
            .ok_or_else(|| format!("upstream {:?}: {} has no address", c.name, url.host))?;
        let mut peer = HttpPeer::new(addr, url.tls, url.host.clone());
        peer.options.connection_timeout = Some(Duration::from_secs(c.connect_timeout_seconds));
        peer.options.total_connection_timeout = Some(Duration::from_secs(
            c.connect_timeout_seconds.saturating_mul(2),
        ));
        peer.options.read_timeout = Some(Duration::from_secs(c.read_timeout_seconds));
        peer.options.write_timeout = Some(Duration::from_secs(c.write_timeout_seconds));
        peer.options.idle_timeout = Some(Duration::from_secs(c.idle_timeout_seconds));
        peer.options.verify_cert = c.tls_verify;
        peer.options.verify_hostname = c.tls_verify;
        let host_header = HeaderValue::from_str(&url.authority())
            .map_err(|_| format!("upstream {:?}: bad host", c.name))?;
        Ok(Upstream {
            name: c.name.clone(),
            url,
            models,
            host_header,
            credential,
            peer,
        })
    }

    /// Whether this upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|p| p.matches(model))
    }

    /// The exact model names this upstream lists (for `/v1/models`).
    pub fn exact_models(&self) -> impl Iterator<Item = &str> {
        self.models.iter().filter_map(|p| match p {
            ModelPattern::Exact(e) => Some(&**e),
            _ => None,
        })
    }

    /// A peer to connect to.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }

    /// Point `req` at this upstream: `Host`, base path, and the upstream's credential in the
    /// style the client used. The client's own credential must already be gone.
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

/// The upstreams, in config order.
#[derive(Debug, Default)]
pub struct Upstreams {
    list: Vec<Upstream>,
}

impl Upstreams {
    /// Build all upstreams from config.
    pub fn from_config(list: &[UpstreamConfig]) -> std::result::Result<Upstreams, String> {
        Ok(Upstreams {
            list: list
                .iter()
                .map(Upstream::from_config)
                .collect::<std::result::Result<_, _>>()?,
        })
    }

    /// The first upstream whose models match `model`.
    #[inline]
    pub fn route(&self, model: &str) -> Option<usize> {
        self.list.iter().position(|u| u.serves(model))
    }

    /// The upstream at `index`.
    pub fn get(&self, index: usize) -> Option<&Upstream> {
        self.list.get(index)
    }

    /// All upstreams.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.list.iter()
    }
}
