//! `Gate`: the plugin API. One method per Pingora phase, called from a host's own `ProxyHttp`
//! (or from [`crate::ops::proxy::KeygateProxy`]); plus the pure admission core they are built on.
//!
//! A request's path: [`Gate::request_filter`] takes one table snapshot, finds the credential,
//! checks the key (status, expiry, IP), reads the body up to the cap, finds the model, checks it
//! against the key and its group, and picks the upstream. A refusal is written there and the
//! phase returns `Ok(true)`. [`Gate::upstream_request_filter`] swaps the client's credential for
//! the upstream's; [`Gate::request_body_filter`] forwards the buffered body;
//! [`Gate::logging`] records the outcome. The quota reservation (SPEC §4) is taken at the end of
//! `request_filter` and settled in `logging`.

pub mod accounts;
mod admission;
mod alerts;
mod answer;
mod attempts;
mod body;
mod ctx;
mod detail;
mod headers;
mod local;
mod log;
mod options;
mod response;
mod settle;
mod store;
mod upstream;

pub use self::admission::admit_model;
pub use self::ctx::{GateCtx, Outcome};
pub use self::local::{go_float, is_usage_path};
pub use self::log::request_summary;
pub use self::options::GateOptions;
pub use self::settle::is_client_gone;
pub use self::upstream::strip_client_credentials;
pub use crate::core::admission::{admit_key, admit_key_for, find_model, BodyFacts, KeyAdmission};
pub use crate::core::clock::unix_now;

use crate::core::credential;
use crate::core::metrics::Metrics;
use crate::core::table::KeyTable;
use crate::ledger::limits::LimitBook;
use crate::ledger::Ledger;
use crate::upstream::Upstreams;
use crate::usage::store::UsageStore;
use crate::usage::{LineSink, UsageLog};
use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use prometheus::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Inner {
    table: Arc<ArcSwap<KeyTable>>,
    upstreams: Upstreams,
    options: GateOptions,
    metrics: Arc<Metrics>,
    /// `keygate_upstream_duration_seconds` of each upstream, in their order.
    upstream_durations: Vec<Histogram>,
    /// The attempt, retry and cooldown series of each pool, in their order.
    pool_series: Vec<attempts::PoolSeries>,
    ledger: Ledger,
    /// The live rate-limit state (SPEC §7).
    limits: LimitBook,
    usage_log: Option<UsageLog>,
    /// The usage store (SPEC §9), when on.
    usage_store: Option<UsageStore>,
    access_log: Option<LineSink>,
    id_prefix: String,
    id_counter: AtomicU64,
    draining: AtomicBool,
    /// Threshold alerts (SPEC §7), once [`Gate::enable_alerts`] has been called.
    alerts: std::sync::OnceLock<crate::core::alerts::Alerting>,
}

/// The gate. Cheap to clone; all clones share the table, upstreams and metrics.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

impl Gate {
    /// A gate over `table` routing to `upstreams`; opens the ledger in `options.state_dir`
    /// (in memory when `None`) and the usage log.
    pub fn new(
        table: KeyTable,
        upstreams: Upstreams,
        options: GateOptions,
    ) -> std::result::Result<Gate, String> {
        let ledger = match (&options.shared_ledger, &options.state_dir) {
            (Some(settings), dir) => Ledger::redis(settings.clone(), dir.as_deref())
                .map_err(|e| format!("ledger: {e}"))?,
            (None, Some(dir)) => Ledger::open_with(dir, options.upgrade)
                .map_err(|e| format!("state_dir {}: {e}", dir.display()))?,
            (None, None) => Ledger::in_memory(),
        };
        let usage_log = match &options.usage_log {
            Some(p) => {
                Some(UsageLog::open(p).map_err(|e| format!("usage_log {}: {e}", p.display()))?)
            }
            None => None,
        };
        let usage_store = match &options.usage_store {
            Some(s) => Some(UsageStore::open(s).map_err(|e| e.to_string())?),
            None => None,
        };
        let access_log = if options.access_log {
            Some(crate::usage::LineSink::stderr().map_err(|e| format!("access log: {e}"))?)
        } else {
            None
        };
        let mut seed = [0u8; 4];
        let _ = getrandom::fill(&mut seed);
        let metrics = Metrics::new();
        metrics.observe_table(&table, unix_now());
        for u in upstreams.iter() {
            for kind in ["connect", "timeout", "broken", "status_5xx"] {
                metrics
                    .upstream_errors
                    .with_label_values(&[u.name.as_str(), kind]);
            }
        }
        metrics.reloads.with_label_values(&["ok"]).inc();
        let upstream_durations = upstreams
            .iter()
            .map(|u| {
                metrics
                    .upstream_duration
                    .with_label_values(&[u.name.as_str()])
            })
            .collect();
        let pool_series = upstreams
            .iter()
            .map(|u| attempts::PoolSeries::new(&metrics, u))
            .collect();
        Ok(Gate {
            inner: Arc::new(Inner {
                table: Arc::new(ArcSwap::from_pointee(table)),
                upstreams,
                options,
                metrics,
                upstream_durations,
                pool_series,
                ledger,
                limits: LimitBook::new(),
                usage_log,
                usage_store,
                access_log,
                id_prefix: hex::encode(seed),
                id_counter: AtomicU64::new(0),
                draining: std::sync::atomic::AtomicBool::new(false),
                alerts: std::sync::OnceLock::new(),
            }),
        })
    }

    /// From now on every response closes its connection (`Connection: close`), so clients move
    /// to the new process of an upgrade (or go away before a shutdown) without racing a close.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// The live rate-limit state (`keygate_limit_inflight` reads it).
    pub fn limit_book(&self) -> &LimitBook {
        &self.inner.limits
    }

    /// The quota ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    /// The usage log, when configured.
    pub fn usage_log(&self) -> Option<&UsageLog> {
        self.inner.usage_log.as_ref()
    }

    /// After the server stopped: flush the usage log and the usage store, and write exact ledger values; after a
    /// binary upgrade (`handed_over`), hand them to the new process instead.
    pub fn shutdown(&self, handed_over: bool) {
        if let Some(log) = &self.inner.usage_log {
            log.flush(Duration::from_secs(5));
        }
        if let Some(store) = &self.inner.usage_store {
            store.flush(Duration::from_secs(10));
        }
        let done = if handed_over {
            self.inner.ledger.handoff()
        } else {
            self.inner.ledger.shutdown()
        };
        if let Err(e) = done {
            ::log::error!("ledger: final write failed: {e}");
        }
    }

    /// The current table snapshot.
    pub fn table(&self) -> Arc<KeyTable> {
        self.inner.table.load_full()
    }

    /// The shared handle the table is published through.
    pub fn table_handle(&self) -> Arc<ArcSwap<KeyTable>> {
        self.inner.table.clone()
    }

    /// Publish a new table; requests already running keep the one they started with.
    pub fn swap_table(&self, table: KeyTable) {
        self.inner.metrics.observe_table(&table, unix_now());
        self.inner.table.store(Arc::new(table));
    }

    /// The metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The upstreams.
    pub fn upstreams(&self) -> &Upstreams {
        &self.inner.upstreams
    }

    /// A fresh per-request context.
    pub fn new_ctx(&self) -> GateCtx {
        GateCtx::default()
    }

    fn request_id_for(&self, req: &RequestHeader) -> HeaderValue {
        if let Some(v) = req.headers.get("x-request-id") {
            if credential::sane_request_id(v.as_bytes()) {
                return v.clone();
            }
        }
        self.new_request_id()
    }

    /// A fresh request id (`kg-{process}-{n}`), for answers given outside a request's phases.
    pub fn new_request_id(&self) -> HeaderValue {
        let n = self.inner.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 64];
        let len = request_id_text(self.inner.id_prefix.as_bytes(), n, &mut id);
        HeaderValue::from_bytes(&id[..len]).unwrap_or(HeaderValue::from_static("kg"))
    }
}

/// `kg-{prefix}-{n:x}` into `out`, written by hand (no formatting machinery: this runs for
/// every request without an id); returns the length. The prefix is cut to fit.
fn request_id_text(prefix: &[u8], n: u64, out: &mut [u8; 64]) -> usize {
    let prefix = &prefix[..prefix.len().min(out.len() - 3 - 1 - 16)];
    let head = 3 + prefix.len() + 1;
    out[..3].copy_from_slice(b"kg-");
    out[3..head - 1].copy_from_slice(prefix);
    out[head - 1] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
        out[head + i] = b"0123456789abcdef"[nibble as usize];
    }
    head + digits
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_read_like_the_format() {
        for n in [0u64, 1, 9, 10, 255, 256, 0xdead_beef, u64::MAX] {
            let mut out = [0u8; 64];
            let len = request_id_text(b"228d056c", n, &mut out);
            assert_eq!(&out[..len], format!("kg-228d056c-{n:x}").as_bytes());
        }
        let mut out = [0u8; 64];
        let len = request_id_text(&[b'a'; 100], u64::MAX, &mut out);
        assert_eq!(len, 64);
    }
}
