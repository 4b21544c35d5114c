//! The ready `ProxyHttp` the `keygate` binary runs: every phase delegates to [`Gate`].

use crate::gate::{Gate, GateCtx};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::Result;
use std::time::Duration;

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
    /// Boxed: Pingora keeps the context inline in each request's future, whose every await
    /// point then carries it; a box keeps that future (held for the whole call) smaller.
    type CTX = Box<GateCtx>;

    fn new_ctx(&self) -> Self::CTX {
        Box::new(self.gate.new_ctx())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        self.gate.request_filter(session, ctx).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        self.gate.upstream_peer(ctx)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
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
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.gate
            .request_body_filter(session, body, end_of_stream, ctx)
            .await
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
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
        ctx: &mut Self::CTX,
    ) -> Result<Option<Duration>> {
        self.gate
            .response_body_filter(session, body, end_of_stream, ctx)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Self::CTX,
        e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        self.gate.fail_to_connect(session, peer, ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<pingora::Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<pingora::Error> {
        let e = e.more_context(format!("Peer: {peer}"));
        self.gate
            .error_while_proxy(peer, session, e, ctx, client_reused)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &pingora::Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        self.gate.fail_to_proxy(session, e, ctx).await
    }

    async fn logging(
        &self,
        session: &mut Session,
        e: Option<&pingora::Error>,
        ctx: &mut Self::CTX,
    ) {
        self.gate.logging(session, e, ctx).await
    }

    fn request_summary(&self, session: &Session, _ctx: &Self::CTX) -> String {
        crate::gate::request_summary(session.req_header())
    }

    fn suppress_error_log(
        &self,
        _session: &Session,
        _ctx: &Self::CTX,
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
    use crate::ops::limits::{ConnLimits, Limited};
    use crate::{GateOptions, KeyTable, Upstreams};
    use pingora::apps::{HttpServerApp, ServerApp};
    use pingora::protocols::http::ServerSession;
    use pingora::protocols::l4::stream::Stream as L4Stream;
    use pingora::protocols::Stream;
    use pingora::server::configuration::ServerConf;
    use std::sync::Arc;

    /// The futures a connection holds for as long as its call is in flight: their sizes are
    /// memory per call (issue 21). Printed for the README's breakdown (`--nocapture`).
    #[tokio::test]
    async fn the_futures_held_per_call_stay_small() {
        let gate = Gate::new(
            KeyTable::empty(),
            Upstreams::from_config(&[]).unwrap(),
            GateOptions::default(),
        )
        .unwrap();
        let conf = Arc::new(ServerConf::default());
        let proxy = Arc::new(pingora::proxy::http_proxy(
            &conf,
            KeygateProxy::new(gate.clone()),
        ));
        let limited = Arc::new(Limited::new(
            pingora::proxy::http_proxy(&conf, KeygateProxy::new(gate.clone())),
            ConnLimits::default(),
            gate,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Vec::new();
        for _ in 0..2 {
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            accepted.push((client, Box::new(L4Stream::from(server)) as Stream));
        }
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let (_c1, s1) = accepted.pop().unwrap();
        let (_c2, s2) = accepted.pop().unwrap();

        let connection = limited.process_new(s1, &shutdown);
        let connection_bytes = std::mem::size_of_val(&*connection);
        let request = proxy.process_new_http(ServerSession::new_http1(s2), &shutdown);
        let request_bytes = std::mem::size_of_val(&*request);
        eprintln!(
            "connection future {connection_bytes} B, request future {request_bytes} B, \
             GateCtx {} B",
            std::mem::size_of::<GateCtx>()
        );
        // The guard's own future holds the boxed request future, not a session of its own.
        assert!(connection_bytes <= 512, "{connection_bytes}");
        // The context is boxed: Pingora keeps CTX inline in the request's future.
        assert_eq!(std::mem::size_of::<<KeygateProxy as ProxyHttp>::CTX>(), 8);
        drop((connection, request, shutdown_tx));
    }
}
