//! Every Prometheus series in one place (in-memory counters; the listener that serves them is
//! [`crate::ops::metrics`]). Label values are bounded: no raw keys, unknown models folded to `other`.

use crate::core::errors::Reason;
use crate::core::table::KeyTable;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// The model label for `model`: itself when the sync file prices it, else `other`.
pub fn model_label<'a>(table: &KeyTable, model: Option<&'a str>) -> &'a str {
    match model {
        Some(m) if table.is_known_model(m) => m,
        Some(_) => "other",
        None => "",
    }
}

/// keygate's series, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// `keygate_requests_total{outcome,reason,model,group}`
    pub requests: IntCounterVec,
    /// `keygate_gate_duration_seconds`: keygate's own logic per request.
    pub gate_duration: Histogram,
    /// `keygate_upstream_duration_seconds{upstream}`: from forwarding to the last byte.
    pub upstream_duration: HistogramVec,
    /// `keygate_keys{state}`, computed at scrape time.
    pub keys: IntGaugeVec,
    /// `keygate_config_reloads_total{result}`
    pub reloads: IntCounterVec,
    /// `keygate_config_revision`
    pub revision: IntGauge,
    /// `keygate_sync_file_reads_total`: times the sync file was read and hashed to look for a
    /// change (each costs a read of the whole file).
    pub sync_file_reads: prometheus::IntCounter,
    /// `keygate_config_loaded_timestamp_seconds`: when the table in force was loaded.
    pub loaded_at: IntGauge,
    /// `keygate_quota_consumed_total{model,group}`
    pub quota_consumed: IntCounterVec,
    /// `keygate_tokens_total{model,group,kind}`
    pub tokens: IntCounterVec,
    /// `keygate_reservations_outstanding`, set at scrape time.
    pub outstanding: IntGauge,
    /// `keygate_usage_missing_total`: successful responses without usage (charged an estimate).
    pub usage_missing: prometheus::IntCounter,
    /// `keygate_usage_log_dropped_total`, brought up to date at scrape time.
    pub usage_log_dropped: prometheus::IntCounter,
    /// `keygate_admin_requests_total{status}`: admin API calls by HTTP status.
    pub admin_requests: IntCounterVec,
    /// `keygate_admin_auth_failures_total`: admin calls with no or an unknown token.
    pub admin_auth_failures: prometheus::IntCounter,
    /// The usage store's series, brought up to date at scrape time.
    pub usage_store: StoreSeries,
    /// The alert webhook's series (SPEC §7).
    pub alerts: AlertSeries,
    /// `keygate_ledger_write_errors_total`, brought up to date at scrape time.
    pub ledger_write_errors: prometheus::IntCounter,
    /// `keygate_ledger_counters`: counters the ledger holds in memory (keys, accounts, budget
    /// periods not yet ended), set at scrape time.
    pub ledger_counters: IntGauge,
    /// `keygate_ledger_backend_up`: 1 while the quota ledger's backend answers (always 1 for
    /// the local ledger), 0 while Redis cannot be reached. Set at scrape time.
    pub ledger_backend_up: IntGauge,
    /// `keygate_ledger_backend_operations_total`: calls made to Redis (scripts and probes).
    pub ledger_backend_ops: prometheus::IntCounter,
    /// `keygate_ledger_backend_errors_total`: Redis calls that failed or timed out.
    pub ledger_backend_errors: prometheus::IntCounter,
    /// `keygate_upstream_errors_total{upstream,kind}`: connect, timeout, broken, status_5xx.
    pub upstream_errors: IntCounterVec,
    /// `keygate_upstream_attempts_total{upstream,target,result}`: every try of a target
    /// (`ok`, `status` for a 429/5xx answer, `connect`, `timeout`, `error`).
    pub upstream_attempts: IntCounterVec,
    /// `keygate_upstream_target_up{upstream,target}`, set at scrape time.
    pub upstream_target_up: IntGaugeVec,
    /// `keygate_upstream_retries_total{upstream,reason}`: attempts after the first.
    pub upstream_retries: IntCounterVec,
    /// `keygate_upstream_cooldowns_total{upstream,target}`: a `Retry-After` that set or
    /// extended a target's cooldown.
    pub upstream_cooldowns: IntCounterVec,
    /// `keygate_key_requests_total{key_id,key_name,outcome}` (only with `metrics.per_key`).
    pub key_requests: IntCounterVec,
    /// `keygate_key_quota_consumed_total{key_id,key_name}` (only with `metrics.per_key`).
    pub key_quota: IntCounterVec,
    /// `keygate_limit_inflight{scope}`: calls holding a concurrency slot of a key or an
    /// account (scope `key` / `account`), set at scrape time.
    pub limit_inflight: prometheus::IntGaugeVec,
    /// `keygate_account_requests_total{account,outcome}` (only with `metrics.per_key`).
    pub account_requests: IntCounterVec,
    /// `keygate_account_quota_consumed_total{account}` (only with `metrics.per_key`).
    pub account_quota: IntCounterVec,
    /// The series of [`CallSeries`], by model label and group: resolving four labelled series
    /// for every call (each hashes its label values and locks its family) is most of what
    /// counting a call costs.
    calls: RwLock<HashMap<Box<str>, SeriesByGroup>>,
}

/// [`CallSeries`] of one model label, by group.
type SeriesByGroup = HashMap<Box<str>, Arc<CallSeries>>;

/// The series a settled call adds to, for one model label and group.
pub struct CallSeries {
    /// `keygate_requests_total{outcome="admitted",reason="",model,group}`
    pub admitted: IntCounter,
    /// `keygate_quota_consumed_total{model,group}`
    pub quota: IntCounter,
    /// `keygate_tokens_total{model,group,kind="prompt"}`
    pub prompt_tokens: IntCounter,
    /// `keygate_tokens_total{model,group,kind="completion"}`
    pub completion_tokens: IntCounter,
}

/// `made`, registered in `registry`. A definition or registration that fails is a programming
/// error (a bad name, a name used twice): it panics at start-up.
/// The usage store's series (SPEC §9).
pub struct StoreSeries {
    /// `keygate_usage_store_dropped_total`: rows dropped (queue full, or a failed write).
    pub dropped: prometheus::IntCounter,
    /// `keygate_usage_store_rows_written_total`.
    pub written: prometheus::IntCounter,
    /// `keygate_usage_store_write_errors_total`: batches whose transaction failed.
    pub write_errors: prometheus::IntCounter,
    /// `keygate_usage_store_batches_total`.
    pub batches: prometheus::IntCounter,
    /// `keygate_usage_store_batch_seconds_total`: time spent writing batches (divide by
    /// the batches for the mean latency).
    pub batch_seconds: prometheus::Counter,
}

impl StoreSeries {
    fn new(registry: &Registry) -> StoreSeries {
        let int =
            |name: &str, help: &str| registered(registry, prometheus::IntCounter::new(name, help));
        StoreSeries {
            dropped: int(
                "keygate_usage_store_dropped_total",
                "Usage store rows dropped: the queue was full or their batch failed.",
            ),
            written: int(
                "keygate_usage_store_rows_written_total",
                "Usage store rows written.",
            ),
            write_errors: int(
                "keygate_usage_store_write_errors_total",
                "Usage store batches whose transaction failed.",
            ),
            batches: int(
                "keygate_usage_store_batches_total",
                "Usage store batches written.",
            ),
            batch_seconds: registered(
                registry,
                prometheus::Counter::new(
                    "keygate_usage_store_batch_seconds_total",
                    "Time spent writing usage store batches.",
                ),
            ),
        }
    }
}

/// The alert webhook's series (SPEC §7).
pub struct AlertSeries {
    /// `keygate_alerts_sent_total{event}`: events the receiver accepted (2xx).
    pub sent: IntCounterVec,
    /// `keygate_alerts_dropped_total{reason}`: events given up: `queue_full` (never queued),
    /// `failed` (every attempt failed), `rejected` (the receiver answered 4xx).
    pub dropped: IntCounterVec,
    /// `keygate_alerts_retries_total`: delivery attempts after the first.
    pub retries: IntCounter,
}

/// The `event` label values of [`AlertSeries::sent`].
pub const ALERT_EVENTS: [&str; 2] = ["quota_threshold", "key_expiring"];
/// The `reason` label values of [`AlertSeries::dropped`].
pub const ALERT_DROP_REASONS: [&str; 3] = ["queue_full", "failed", "rejected"];

impl AlertSeries {
    fn new(registry: &Registry) -> AlertSeries {
        let vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let v = registered(
                registry,
                IntCounterVec::new(Opts::new(name, help), &[label]),
            );
            for l in values {
                v.with_label_values(&[*l]);
            }
            v
        };
        AlertSeries {
            sent: vec(
                "keygate_alerts_sent_total",
                "Alert events the webhook accepted, by event.",
                "event",
                &ALERT_EVENTS,
            ),
            dropped: vec(
                "keygate_alerts_dropped_total",
                "Alert events given up, by reason (queue_full, failed, rejected).",
                "reason",
                &ALERT_DROP_REASONS,
            ),
            retries: registered(
                registry,
                IntCounter::new(
                    "keygate_alerts_retries_total",
                    "Alert delivery attempts after the first.",
                ),
            ),
        }
    }
}

fn registered<M>(registry: &Registry, made: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let m = made.unwrap_or_else(|e| panic!("metric definition: {e}"));
    registry
        .register(Box::new(m.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    m
}

impl Metrics {
    /// Create and register every series.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("keygate_requests_total", "Requests by outcome and reason."),
                &["outcome", "reason", "model", "group"],
            ),
        );
        let gate_duration = registered(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "keygate_gate_duration_seconds",
                    "Time spent in keygate's own logic per request (not I/O).",
                )
                .buckets(vec![
                    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3,
                ]),
            ),
        );
        let upstream_duration = registered(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "keygate_upstream_duration_seconds",
                    "Time from forwarding a request to the end of the upstream's response.",
                )
                .buckets(vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ]),
                &["upstream"],
            ),
        );
        let keys = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new("keygate_keys", "Keys in the loaded table by state."),
                &["state"],
            ),
        );
        let reloads = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("keygate_config_reloads_total", "Sync-file loads by result."),
                &["result"],
            ),
        );
        let revision = registered(
            &registry,
            IntGauge::new(
                "keygate_config_revision",
                "Revision of the loaded sync file.",
            ),
        );
        let quota_consumed = registered(
            &registry,
            IntCounterVec::new(
                Opts::new("keygate_quota_consumed_total", "Quota units charged."),
                &["model", "group"],
            ),
        );
        let tokens = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_tokens_total",
                    "Tokens charged, by kind (prompt, completion).",
                ),
                &["model", "group", "kind"],
            ),
        );
        let outstanding = registered(
            &registry,
            IntGauge::new(
                "keygate_reservations_outstanding",
                "Quota reservations taken and not yet settled.",
            ),
        );
        let usage_missing = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_usage_missing_total",
                "Successful responses without usage, charged an estimate.",
            ),
        );
        let usage_log_dropped = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_usage_log_dropped_total",
                "Usage records dropped because the log writer could not keep up.",
            ),
        );
        let admin_requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_admin_requests_total",
                    "Admin API calls by HTTP status.",
                ),
                &["status"],
            ),
        );
        let admin_auth_failures = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_admin_auth_failures_total",
                "Admin API calls refused for a missing or unknown token.",
            ),
        );
        let usage_store = StoreSeries::new(&registry);
        let alerts = AlertSeries::new(&registry);
        let ledger_write_errors = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_ledger_write_errors_total",
                "Failed ledger journal or snapshot writes.",
            ),
        );
        let ledger_counters = registered(
            &registry,
            IntGauge::new(
                "keygate_ledger_counters",
                "Counters the quota ledger holds in memory (keys, accounts, budget periods).",
            ),
        );
        let ledger_backend_up = registered(
            &registry,
            IntGauge::new(
                "keygate_ledger_backend_up",
                "1 while the quota ledger's backend answers (always 1 for the local ledger).",
            ),
        );
        ledger_backend_up.set(1);
        let ledger_backend_ops = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_ledger_backend_operations_total",
                "Calls made to the shared ledger's Redis (scripts and probes).",
            ),
        );
        let ledger_backend_errors = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_ledger_backend_errors_total",
                "Calls to the shared ledger's Redis that failed or timed out.",
            ),
        );
        let loaded_at = registered(
            &registry,
            IntGauge::new(
                "keygate_config_loaded_timestamp_seconds",
                "Unix time the key table in force was loaded (its age: time() minus this).",
            ),
        );
        loaded_at.set(crate::core::clock::unix_now());
        let upstream_errors = registered(&registry, IntCounterVec::new(
            Opts::new(
                "keygate_upstream_errors_total",
                "Upstream failures by upstream and kind (connect, timeout, broken, status_5xx).",
            ),
            &["upstream", "kind"],
        ));
        let upstream_attempts = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_upstream_attempts_total",
                    "Tries of a pool's targets by result (ok, status, connect, timeout, error).",
                ),
                &["upstream", "target", "result"],
            ),
        );
        let upstream_target_up = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "keygate_upstream_target_up",
                    "1 while a pool's target is up (not ejected, passing its health check).",
                ),
                &["upstream", "target"],
            ),
        );
        let upstream_retries = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_upstream_retries_total",
                    "Attempts sent to another target after a failure, by the failure.",
                ),
                &["upstream", "reason"],
            ),
        );
        let upstream_cooldowns = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_upstream_cooldowns_total",
                    "Retry-After answers that set or extended a target's cooldown.",
                ),
                &["upstream", "target"],
            ),
        );
        let sync_file_reads = registered(
            &registry,
            prometheus::IntCounter::new(
                "keygate_sync_file_reads_total",
                "Times the sync file was read and hashed to look for a change.",
            ),
        );
        let key_requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_key_requests_total",
                    "Requests per key (metrics.per_key).",
                ),
                &["key_id", "key_name", "outcome"],
            ),
        );
        let key_quota = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_key_quota_consumed_total",
                    "Quota units charged per key (metrics.per_key).",
                ),
                &["key_id", "key_name"],
            ),
        );
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        let limit_inflight = registered(
            &registry,
            prometheus::IntGaugeVec::new(
                Opts::new(
                    "keygate_limit_inflight",
                    "Calls holding a concurrency slot, by scope (key, account).",
                ),
                &["scope"],
            ),
        );
        for s in ["key", "account"] {
            limit_inflight.with_label_values(&[s]);
        }
        let account_requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_account_requests_total",
                    "Requests per account (metrics.per_key).",
                ),
                &["account", "outcome"],
            ),
        );
        let account_quota = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "keygate_account_quota_consumed_total",
                    "Quota units charged per account (metrics.per_key).",
                ),
                &["account"],
            ),
        );
        Arc::new(Metrics {
            registry,
            requests,
            gate_duration,
            upstream_duration,
            keys,
            reloads,
            revision,
            sync_file_reads,
            loaded_at,
            quota_consumed,
            tokens,
            outstanding,
            usage_missing,
            usage_log_dropped,
            admin_requests,
            admin_auth_failures,
            usage_store,
            alerts,
            ledger_write_errors,
            ledger_counters,
            ledger_backend_up,
            ledger_backend_ops,
            ledger_backend_errors,
            upstream_errors,
            upstream_attempts,
            upstream_target_up,
            upstream_retries,
            upstream_cooldowns,
            key_requests,
            key_quota,
            limit_inflight,
            account_requests,
            account_quota,
            calls: RwLock::default(),
        })
    }

    /// The series a call on `model` (a [`model_label`]) in `group` adds to.
    pub fn call_series(&self, model: &str, group: &str) -> Arc<CallSeries> {
        let known = self
            .calls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .and_then(|groups| groups.get(group))
            .cloned();
        if let Some(series) = known {
            return series;
        }
        let series = Arc::new(CallSeries {
            admitted: self
                .requests
                .with_label_values(&["admitted", "", model, group]),
            quota: self.quota_consumed.with_label_values(&[model, group]),
            prompt_tokens: self.tokens.with_label_values(&[model, group, "prompt"]),
            completion_tokens: self.tokens.with_label_values(&[model, group, "completion"]),
        });
        self.calls
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(model.into())
            .or_default()
            .insert(group.into(), series.clone());
        series
    }

    /// Count one finished request.
    pub fn count_request(&self, outcome: &str, reason: Option<Reason>, model: &str, group: &str) {
        self.requests
            .with_label_values(&[outcome, reason.map_or("", |r| r.code()), model, group])
            .inc();
    }

    /// Refresh the per-state key gauges from `table` at time `now`.
    pub fn observe_table(&self, table: &KeyTable, now: i64) {
        let (mut enabled, mut disabled, mut expired) = (0i64, 0i64, 0i64);
        for k in table.records() {
            if k.status == crate::core::config::KeyStatus::Disabled {
                disabled += 1;
            } else if k.expires_at.is_some_and(|e| now >= e) {
                expired += 1;
            } else {
                enabled += 1;
            }
        }
        self.keys.with_label_values(&["enabled"]).set(enabled);
        self.keys.with_label_values(&["disabled"]).set(disabled);
        self.keys.with_label_values(&["expired"]).set(expired);
        self.revision
            .set(i64::try_from(table.revision).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}
