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

    fn fail_to_connect(
        &self,
        session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut GateCtx,
        e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        self.gate.fail_to_connect(session, peer, ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<pingora::Error>,
        ctx: &mut GateCtx,
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
