//! The plugin API is enough: a host's own `ProxyHttp`, with its own logic, embeds `Gate` by
//! calling its phase methods, in a real Pingora server in this process.

mod common;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use keygate::config::UpstreamConfig;
use keygate::mock::MockBackend;
use keygate::{Gate, GateCtx, GateOptions, KeyTable, Outcome, Upstreams};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A host proxy with logic of its own: a header on every response, and a count of the requests
/// the gate refused, read from the context in `logging`.
struct HostProxy {
    gate: Gate,
    refused: Arc<AtomicUsize>,
}

#[async_trait]
impl ProxyHttp for HostProxy {
    type CTX = GateCtx;
    fn new_ctx(&self) -> GateCtx {
        self.gate.new_ctx()
    }
    async fn request_filter(&self, s: &mut Session, ctx: &mut GateCtx) -> Result<bool> {
        self.gate.request_filter(s, ctx).await
    }
    async fn upstream_peer(&self, _s: &mut Session, ctx: &mut GateCtx) -> Result<Box<HttpPeer>> {
        self.gate.upstream_peer(ctx)
    }
    async fn upstream_request_filter(
        &self,
        s: &mut Session,
        r: &mut RequestHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        self.gate.upstream_request_filter(s, r, ctx).await?;
        r.insert_header("x-host-saw-model", ctx.model().unwrap_or("-"))?;
        Ok(())
    }
    async fn request_body_filter(
        &self,
        s: &mut Session,
        b: &mut Option<Bytes>,
        eos: bool,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        self.gate.request_body_filter(s, b, eos, ctx).await
    }
    async fn response_filter(
        &self,
        s: &mut Session,
        r: &mut ResponseHeader,
        ctx: &mut GateCtx,
    ) -> Result<()> {
        self.gate.response_filter(s, r, ctx).await?;
        r.insert_header("x-host", "embedded")?;
        Ok(())
    }
    async fn logging(&self, s: &mut Session, e: Option<&pingora::Error>, ctx: &mut GateCtx) {
        if matches!(ctx.outcome(), Outcome::Denied(_)) {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        self.gate.logging(s, e, ctx).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_proxy_embeds_the_gate() {
    let mock = MockBackend::start("127.0.0.1:0").await.unwrap();
    let table =
        KeyTable::from_json(&serde_json::to_vec(&standard_sync()).unwrap(), "embedded").unwrap();
    let upstreams = Upstreams::from_config(&[UpstreamConfig {
        name: "mock".into(),
        url: format!("http://{}", mock.addr()),
        api_key_env: None,
        models: vec!["gpt-*".into()],
        tls_verify: true,
        connect_timeout_seconds: 5,
        read_timeout_seconds: 30,
        write_timeout_seconds: 30,
        idle_timeout_seconds: 30,
    }])
    .unwrap();
    let gate = Gate::new(table, upstreams, GateOptions::default()).unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let addr = keygate::server::resolve_port_zero("127.0.0.1:0").unwrap();

    let host = HostProxy {
        gate,
        refused: refused.clone(),
    };
    let listen = addr.clone();
    std::thread::spawn(move || {
        let conf = ServerConf {
            threads: 1,
            grace_period_seconds: Some(0),
            graceful_shutdown_timeout_seconds: Some(1),
            ..ServerConf::default()
        };
        let mut server = Server::new_with_opt_and_conf(Option::<Opt>::None, conf);
        server.bootstrap();
        let mut svc = pingora::proxy::http_proxy_service(&server.configuration, host);
        svc.add_tcp(&listen);
        server.add_service(svc);
        server.run(RunArgs::default());
    });
    wait_for_port(addr.parse().unwrap());

    let base = format!("http://{addr}");
    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(OK)
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-host"], "embedded");
    assert!(r.headers().contains_key("x-request-id"));
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.headers["x-host-saw-model"], "gpt-4o-mini");
    assert!(
        seen.headers.get("authorization").is_none(),
        "no upstream credential configured"
    );

    let r = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(DISABLED)
        .body(chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(denial(r).await.1, "key_disabled");
    // `logging` runs after the answer is written: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while refused.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(refused.load(Ordering::SeqCst), 1);
    assert_eq!(mock.request_count(), 1);
}
