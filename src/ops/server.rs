//! Assembling the Pingora server the binary runs: the proxy service on `listen` (with TLS when
//! configured) and the metrics service on `metrics_listen`.

use crate::core::config::Config;
use crate::gate::Gate;
use crate::ops::limits::{ConnLimits, Limited};
use crate::ops::metrics::MetricsApp;
use crate::ops::proxy::KeygateProxy;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use std::net::SocketAddr;

/// Replace port 0 by a free port, so the address can be reported before Pingora binds it.
///
/// The chosen port stays held for the life of the process by a bound, non-listening socket with
/// `SO_REUSEADDR` (as Pingora's listener has), so no other socket (an outgoing connection's
/// ephemeral port, another server) can take it between this call and Pingora's bind.
pub fn resolve_port_zero(addr: &str) -> std::io::Result<String> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::other(format!("{addr:?} is not an IP:port address")))?;
    if parsed.port() != 0 {
        return Ok(addr.to_string());
    }
    let holder = if parsed.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    holder.set_reuseaddr(true)?;
    holder.bind(parsed)?;
    let bound = holder.local_addr()?;
    // Deliberately kept open (not listening) until the process exits.
    std::mem::forget(holder);
    Ok(bound.to_string())
}

/// The connection limits the configuration asks for.
pub fn conn_limits(config: &Config) -> ConnLimits {
    ConnLimits {
        header_read_timeout: std::time::Duration::from_secs(config.header_read_timeout_seconds),
        max_header_bytes: config.max_header_bytes,
        keepalive_timeout_seconds: config.keepalive_timeout_seconds,
        max_requests_per_connection: (config.max_requests_per_connection > 0)
            .then_some(config.max_requests_per_connection),
    }
}

/// The addresses the server will listen on, after port-0 resolution.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Proxy listener addresses.
    pub proxy: Vec<String>,
    /// Metrics listener address.
    pub metrics: Option<String>,
}

/// Run a built server until it has shut down (SIGTERM: graceful, within
/// `grace_period_seconds`), then write the ledger's exact values and flush the usage log.
pub fn run(server: Server, gate: &Gate) {
    use pingora::server::ExecutionPhase;
    let mut phases = server.watch_execution_phase();
    // Once an upgrade or a shutdown starts, close connections after each response.
    let mut watcher = server.watch_execution_phase();
    let draining = gate.clone();
    let _ = std::thread::Builder::new()
        .name("keygate-phase".into())
        .spawn(move || loop {
            match watcher.blocking_recv() {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulTerminate,
                ) => {
                    draining.set_draining();
                    return;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        });
    server.run(pingora::server::RunArgs::default());
    let mut handed_over = false;
    while let Ok(phase) = phases.try_recv() {
        handed_over |= matches!(
            phase,
            ExecutionPhase::GracefulUpgradeTransferringFds
                | ExecutionPhase::GracefulUpgradeCloseTimeout
        );
    }
    gate.shutdown(handed_over);
}

/// Build the server for `config` around `gate`. Prints the bound addresses on stdout. With
/// `upgrade`, take the listening sockets over from the running process (which must then get
/// SIGQUIT) through `upgrade_sock`.
pub fn build(config: &Config, gate: Gate, upgrade: bool) -> anyhow::Result<(Server, Bound)> {
    let conf = ServerConf {
        threads: config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        grace_period_seconds: Some(config.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.grace_period_seconds.clamp(1, 10)),
        upstream_keepalive_pool_size: config.upstream_pool_size,
        upgrade_sock: config
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| config.state_dir.join("upgrade.sock"))
            .to_string_lossy()
            .into_owned(),
        pid_file: config
            .state_dir
            .join("keygate.pid")
            .to_string_lossy()
            .into_owned(),
        ..ServerConf::default()
    };
    std::fs::create_dir_all(&config.state_dir)?;
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let app = pingora::proxy::http_proxy(&server.configuration, KeygateProxy::new(gate.clone()));
    let mut proxy = Service::new(
        "keygate proxy".to_string(),
        Limited::new(app, conn_limits(config), gate.clone()),
    );
    let mut bound = Bound {
        proxy: Vec::new(),
        metrics: None,
    };
    for addr in config.listen_addresses() {
        let addr = resolve_port_zero(&addr)?;
        match &config.tls {
            Some(tls) => proxy
                .add_tls(
                    &addr,
                    &tls.cert.to_string_lossy(),
                    &tls.key.to_string_lossy(),
                )
                .map_err(|e| anyhow::anyhow!("tls on {addr}: {e}"))?,
            None => proxy.add_listener(
                ListenerConfig::tcp(&addr)
                    .l4_buffer(L4BufferSettings::default().read(config.client_read_buffer_bytes)),
            ),
        }
        bound.proxy.push(addr);
    }
    server.add_service(proxy);

    if let Some(m) = &config.metrics_listen {
        let addr = resolve_port_zero(m)?;
        let app = HttpServer::new_app(MetricsApp::new(gate.clone()));
        let mut svc = Service::new("keygate metrics".to_string(), app);
        svc.threads = Some(1);
        svc.add_tcp(&addr);
        server.add_service(svc);
        bound.metrics = Some(addr);
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    for a in &bound.proxy {
        println!("keygate: proxy on {scheme}://{a}");
    }
    if let Some(a) = &bound.metrics {
        println!("keygate: metrics on http://{a}");
    }
    Ok((server, bound))
}
