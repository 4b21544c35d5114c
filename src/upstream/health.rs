//! The optional active health check: a background thread probes every target of the pools
//! that configure `health`, and takes a target out after `unhealthy_after` failed probes in a
//! row, back in after `healthy_after` good ones.
//!
//! A probe is a `GET {path}` (reqwest, HTTP/1.1, no redirects followed) for `http` targets:
//! any status below 500 is healthy (a 401 still says the server is there). `https` targets get a
//! TCP connect only: a TLS probe would judge the upstream's certificate by other rules than the
//! proxy's own connection does.

use super::{Target, Upstream};
use std::sync::Arc;
use std::time::Duration;

/// Start the checks for every pool with `health`, on a thread of their own. Returns `None`
/// when no pool has one.
pub fn spawn_health_checks(
    pools: Arc<Vec<Upstream>>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if pools.iter().all(|p| p.health.is_none()) {
        return Ok(None);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = std::thread::Builder::new()
        .name("keygate-health".into())
        .spawn(move || {
            rt.block_on(async move {
                let client = match reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent("keygate-health")
                    .http1_only()
                    .build()
                {
                    Ok(c) => c,
                    Err(e) => {
                        log::error!("health checks: cannot build their HTTP client: {e}");
                        return;
                    }
                };
                let mut tasks = Vec::new();
                for p in 0..pools.len() {
                    for t in 0..pools[p].targets.len() {
                        tasks.push(tokio::spawn(watch(client.clone(), pools.clone(), p, t)));
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })?;
    Ok(Some(handle))
}

async fn watch(client: reqwest::Client, pools: Arc<Vec<Upstream>>, p: usize, t: usize) {
    let pool = &pools[p];
    let Some(h) = pool.health.clone() else {
        return;
    };
    let target = &pool.targets[t];
    let interval = Duration::from_secs(h.interval_seconds);
    let (mut good, mut bad) = (0u32, 0u32);
    loop {
        let ok = probe(
            &client,
            target,
            &h.path,
            interval.min(Duration::from_secs(5)),
        )
        .await;
        if ok {
            good += 1;
            bad = 0;
            if good >= h.healthy_after && target.state.set_health_down(false) {
                log::info!(
                    "upstream {}: target {} is healthy again",
                    pool.name,
                    target.label
                );
            }
        } else {
            bad += 1;
            good = 0;
            if bad >= h.unhealthy_after && target.state.set_health_down(true) {
                log::warn!(
                    "upstream {}: target {} failed its health check",
                    pool.name,
                    target.label
                );
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// One probe, bounded by `limit`.
async fn probe(client: &reqwest::Client, target: &Target, path: &str, limit: Duration) -> bool {
    let Some(addr) = target.addr() else {
        return false;
    };
    if target.url.tls {
        let connect = tokio::net::TcpStream::connect(addr);
        return matches!(tokio::time::timeout(limit, connect).await, Ok(Ok(_)));
    }
    let url = format!(
        "http://{}{}{}",
        target.url.authority(),
        target.url.base_path,
        path
    );
    let answer = client.get(url).timeout(limit).send().await;
    answer.is_ok_and(|r| r.status().as_u16() < 500)
}
