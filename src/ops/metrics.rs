//! The metrics listener: `/metrics`, `/healthz`, `/readyz` (the series are in [`crate::core::metrics`]).

use crate::core::clock::unix_now;
use crate::core::metrics::Metrics;
use crate::core::table::KeyTable;
use crate::gate::Gate;
use crate::ledger::limits::Scope;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

/// The metrics listener's app: `/metrics`, `/healthz`, `/readyz`.
pub struct MetricsApp {
    gate: Gate,
    metrics: Arc<Metrics>,
    table: Arc<ArcSwap<KeyTable>>,
}

impl MetricsApp {
    /// An app reporting `gate`'s metrics and the readiness of its table.
    pub fn new(gate: Gate) -> Self {
        MetricsApp {
            metrics: gate.metrics(),
            table: gate.table_handle(),
            gate,
        }
    }
}

/// Bring a counter mirrored from another count up to `total`.
fn catch_up(counter: &prometheus::IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn response(status: u16, content_type: &str, body: Vec<u8>) -> http::Response<Vec<u8>> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => {
                let table = self.table.load();
                self.metrics.observe_table(&table, unix_now());
                let ledger = self.gate.ledger();
                self.metrics.outstanding.set(ledger.outstanding());
                let inflight = self.gate.limit_book().inflight_by_scope();
                for scope in [Scope::Key, Scope::Account] {
                    self.metrics
                        .limit_inflight
                        .with_label_values(&[scope.label()])
                        .set(inflight[scope as usize]);
                }
                catch_up(&self.metrics.ledger_write_errors, ledger.write_errors());
                self.metrics
                    .ledger_counters
                    .set(i64::try_from(ledger.counters()).unwrap_or(i64::MAX));
                if let Some(b) = ledger.backend_state() {
                    self.metrics
                        .ledger_backend_up
                        .set(i64::from(b.up && b.connected));
                    catch_up(&self.metrics.ledger_backend_ops, b.ops);
                    catch_up(&self.metrics.ledger_backend_errors, b.errors);
                }
                if let Some(log) = self.gate.usage_log() {
                    catch_up(&self.metrics.usage_log_dropped, log.dropped());
                }
                if let Some(store) = self.gate.usage_store() {
                    use std::sync::atomic::Ordering::Relaxed;
                    let (s, m) = (store.stats(), &self.metrics.usage_store);
                    catch_up(&m.dropped, s.dropped.load(Relaxed));
                    catch_up(&m.written, s.written.load(Relaxed));
                    catch_up(&m.write_errors, s.write_errors.load(Relaxed));
                    catch_up(&m.batches, s.batches.load(Relaxed));
                    let secs = s.batch_micros.load(Relaxed) as f64 / 1e6;
                    if secs > m.batch_seconds.get() {
                        m.batch_seconds.inc_by(secs - m.batch_seconds.get());
                    }
                }
                self.gate.observe_targets();
                response(200, "text/plain; version=0.0.4", self.metrics.render())
            }
            "/healthz" => response(200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let table = self.table.load();
                let mut body = serde_json::json!({
                    "ready": true,
                    "revision": table.revision,
                    "keys": table.len(),
                    // Each pool's targets that are up (not ejected, passing their check).
                    "upstreams": self.gate.upstreams().iter().map(|u| serde_json::json!({
                        "name": u.name,
                        "targets": u.targets.len(),
                        "healthy": u.healthy_targets(),
                    })).collect::<Vec<_>>(),
                });
                let mut status = 200;
                if let Some(b) = self.gate.ledger().backend_state() {
                    // Degraded: Redis is away. With `deny` nothing metered can be served, so
                    // the gateway is not ready; with `lease` or `allow` it still serves.
                    let ready =
                        b.up || b.on_unavailable != crate::core::config::OnUnavailable::Deny;
                    body["ready"] = ready.into();
                    body["ledger"] = serde_json::json!({
                        "backend": "redis",
                        "state": match (b.connected, b.up) {
                            (_, false) => "degraded",
                            (false, true) => "connecting",
                            (true, true) => "ok",
                        },
                        "on_unavailable": b.on_unavailable,
                    });
                    if !ready {
                        status = 503;
                    }
                }
                response(status, "application/json", body.to_string().into_bytes())
            }
            _ => response(404, "text/plain", b"not found\n".to_vec()),
        }
    }
}
