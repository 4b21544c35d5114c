//! An upstream's URL, parsed once from the config: scheme, host, port and base path. Pure.

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
