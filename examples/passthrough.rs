//! The baseline for `benches/e2e.sh`: a bare Pingora passthrough proxy, built like keygate
//! (same Pingora, same release profile, same allocator), that forwards every request to one
//! upstream with no checks. Usage: `passthrough LISTEN UPSTREAM_ADDR`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(upstream)) = (args.get(1), args.get(2).and_then(|a| a.parse().ok()))
    else {
        eprintln!("usage: passthrough LISTEN UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Option::<Opt>::None, conf);
    server.bootstrap();
    let mut svc =
        pingora::proxy::http_proxy_service(&server.configuration, Passthrough { upstream });
    svc.add_tcp(listen);
    server.add_service(svc);
    println!("passthrough on http://{listen}");
    server.run(pingora::server::RunArgs::default());
}
