//! The ready `ProxyHttp` that the binary runs, and the upstreams it routes to: which upstream
//! serves a model, how to reach it, and the credential it expects.

use crate::config::UpstreamConfig;
use crate::credential::CredentialStyle;
use crate::gate::{Gate, GateCtx};
use crate::table::ModelPattern;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::Result;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// A parsed upstream URL: scheme, host, port and an optional base path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// https.
    pub tls: bool,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path prefix without trailing slash (`""` for none).
    pub base_path: String,
}

impl UpstreamUrl {
    /// Parse `http(s)://host[:port][/base]`.
    pub fn parse(s: &str) -> std::result::Result<UpstreamUrl, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("url {s:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("url {s:?}: the scheme must be http or https")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("url {s:?}: no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.query().is_some() {
            return Err(format!("url {s:?}: a query string is not allowed"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            base_path,
        })
    }

    /// The `Host` header value for this upstream.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

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

/// The proxy the `keygate` binary runs: every phase delegates to [`Gate`].
pub struct KeygateProxy {
    gate: Gate,
}

impl KeygateProxy {
    /// A proxy around `gate`.
    pub fn new(gate: Gate) -> Self {
        KeygateProxy { gate }
    }
}

#[async_trait]
impl ProxyHttp for KeygateProxy {
    type CTX = GateCtx;

    fn new_ctx(&self) -> GateCtx {
        self.gate.new_ctx()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut GateCtx) -> Result<bool> {
        self.gate.request_filter(session, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut GateCtx,
    ) -> Result<Box<HttpPeer>> {
        self.gate.upstream_peer(ctx)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        self.gate
            .upstream_request_filter(session, upstream_request, ctx)
            .await
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        self.gate
            .request_body_filter(session, body, end_of_stream, ctx)
            .await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        self.gate
            .response_filter(session, upstream_response, ctx)
            .await
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut GateCtx,
    ) -> Result<Option<Duration>> {
        self.gate
            .response_body_filter(session, body, end_of_stream, ctx)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut GateCtx,
    ) -> FailToProxy {
        self.gate.fail_to_proxy(session, e, ctx).await
    }

    async fn logging(&self, session: &mut Session, e: Option<&pingora::Error>, ctx: &mut GateCtx) {
        self.gate.logging(session, e, ctx).await
    }

    fn request_summary(&self, session: &Session, _ctx: &GateCtx) -> String {
        crate::gate::request_summary(session.req_header())
    }

    fn suppress_error_log(
        &self,
        _session: &Session,
        _ctx: &GateCtx,
        error: &pingora::Error,
    ) -> bool {
        // A client that goes away is routine (and already settled and counted); upstream and
        // internal failures stay in the log.
        crate::gate::is_client_gone(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = UpstreamUrl::parse("https://api.openai.com").unwrap();
        assert_eq!((u.tls, u.port, u.base_path.as_str()), (true, 443, ""));
        assert_eq!(u.authority(), "api.openai.com");
        let u = UpstreamUrl::parse("http://127.0.0.1:8000/openai/").unwrap();
        assert_eq!((u.port, u.base_path.as_str()), (8000, "/openai"));
        assert_eq!(u.authority(), "127.0.0.1:8000");
        assert!(UpstreamUrl::parse("ftp://x").is_err());
        assert!(UpstreamUrl::parse("not a url").is_err());
    }
}
