//! The alert webhook (SPEC §7), off the request path: a thread that takes events from the
//! bounded queue and POSTs each as JSON on a runtime of its own (bounded attempts with
//! back-off, then dropped and counted), and a thread that sweeps the key table for keys
//! expiring within seven days.
//!
//! At most once: the sender forgets no event it took (an event seen again is skipped), and
//! the sweep remembers the expiries it announced in `state_dir/alerts-expiring.json`, so a
//! reload or a restart does not announce them again. Threshold events cannot repeat across
//! reloads or restarts by construction (see [`crate::core::alerts`]).

use crate::core::alerts::{
    AlertEvent, AlertIdentity, AlertQueue, AlertScope, Alerting, Thresholds, EXPIRING_DAYS,
};
use crate::core::clock::unix_now;
use crate::core::config::{AlertsConfig, Config, KeyStatus, LedgerBackend};
use crate::core::metrics::Metrics;
use crate::core::table::KeyTable;
use crate::gate::Gate;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Events being delivered at once; more wait in the queue.
const IN_FLIGHT: usize = 16;
/// The first wait between two attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the key table is swept for expiring keys (and at once after a reload).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// The file the announced expiries are kept in, in `state_dir`.
pub const EXPIRING_FILE: &str = "alerts-expiring.json";

/// With `alerts:` configured, start the sender and the expiry sweep and turn threshold alerts
/// on in `gate`. Nothing to do without it.
pub fn start(config: &Config, gate: &Gate) -> Result<(), String> {
    let Some(ac) = &config.alerts else {
        return Ok(());
    };
    let thresholds = Thresholds::compile(&ac.thresholds)?;
    if config.ledger.backend != LedgerBackend::Local {
        log::warn!(
            "alerts: on a shared ledger only key_expiring events are sent; quota thresholds \
             are watched on the local ledger"
        );
    }
    let (queue, rx) = AlertQueue::bounded(ac.queue_size);
    let sender = Sender::new(ac, gate.metrics())?;
    std::thread::Builder::new()
        .name("keygate-alerts".into())
        .spawn(move || sender.run(rx))
        .map_err(|e| format!("alerts: {e}"))?;
    gate.enable_alerts(Alerting {
        thresholds,
        queue: queue.clone(),
    });
    let sweep = Sweep {
        gate: gate.clone(),
        queue,
        file: config.state_dir.join(EXPIRING_FILE),
    };
    std::thread::Builder::new()
        .name("keygate-alerts-expiry".into())
        .spawn(move || sweep.run())
        .map_err(|e| format!("alerts: {e}"))?;
    Ok(())
}

/// Delivers events to the webhook.
struct Sender {
    runtime: tokio::runtime::Runtime,
    delivery: Arc<Delivery>,
}

struct Delivery {
    client: reqwest::Client,
    url: String,
    attempts: u32,
    metrics: Arc<Metrics>,
}

impl Sender {
    fn new(ac: &AlertsConfig, metrics: Arc<Metrics>) -> Result<Sender, String> {
        let timeout = Duration::from_secs(ac.timeout_seconds);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("keygate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("alerts: http client: {e}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keygate-alerts-send")
            .enable_all()
            .build()
            .map_err(|e| format!("alerts: runtime: {e}"))?;
        Ok(Sender {
            runtime,
            delivery: Arc::new(Delivery {
                client,
                url: ac.webhook_url.clone(),
                attempts: ac.max_attempts,
                metrics,
            }),
        })
    }

    /// Take events until the queue closes; each is delivered on a task of its own, at most
    /// [`IN_FLIGHT`] at once (the queue fills behind them, and the request path drops and
    /// counts what does not fit).
    fn run(self, rx: Receiver<AlertEvent>) {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut seen: HashSet<AlertIdentity> = HashSet::new();
        let mut taken = 0u64;
        while let Ok(event) = rx.recv() {
            if !seen.insert(event.identity()) {
                continue;
            }
            taken += 1;
            if taken.is_multiple_of(4096) {
                forget_past(&mut seen, unix_now());
            }
            let Ok(permit) = self.runtime.block_on(in_flight.clone().acquire_owned()) else {
                return;
            };
            let delivery = self.delivery.clone();
            self.runtime.spawn(async move {
                delivery.deliver(event).await;
                drop(permit);
            });
        }
    }
}

/// Drop from `seen` what cannot come again: expiries past, and threshold events of budget
/// periods that began more than 100 days ago (the longest period is a 90-day window).
fn forget_past(seen: &mut HashSet<AlertIdentity>, now: i64) {
    seen.retain(|id| match id {
        AlertIdentity::Expiring(_, at) => *at > now,
        AlertIdentity::Threshold(_, _, _, 0) => true,
        AlertIdentity::Threshold(_, _, _, start) => *start > now - 100 * 86_400,
    });
}

impl Delivery {
    /// POST `event`; retry on a connection failure, a timeout, 408, 429 or 5xx, waiting
    /// 0.5 s, 1 s, 2 s, … between attempts; then drop it and count why.
    async fn deliver(&self, event: AlertEvent) {
        let kind = event.kind();
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(e) => {
                log::error!("alerts: {kind} event not serializable: {e}");
                return self.drop_event("failed");
            }
        };
        let mut backoff = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            if attempt > 1 {
                self.metrics.alerts.retries.inc();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            let sent = self
                .client
                .post(&self.url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    self.metrics.alerts.sent.with_label_values(&[kind]).inc();
                    return;
                }
                Ok(r)
                    if r.status().is_client_error()
                        && !matches!(r.status().as_u16(), 408 | 429) =>
                {
                    log::warn!(
                        "alerts: the webhook refused a {kind} event with {}; dropped",
                        r.status()
                    );
                    return self.drop_event("rejected");
                }
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = e.to_string(),
            }
        }
        log::warn!(
            "alerts: a {kind} event dropped after {} attempts: {last}",
            self.attempts
        );
        self.drop_event("failed");
    }

    fn drop_event(&self, reason: &str) {
        self.metrics
            .alerts
            .dropped
            .with_label_values(&[reason])
            .inc();
    }
}

/// Sweeps the table for keys expiring within [`EXPIRING_DAYS`] days.
struct Sweep {
    gate: Gate,
    queue: AlertQueue,
    file: PathBuf,
}

impl Sweep {
    fn run(self) {
        let mut announced = load_announced(&self.file);
        // A weak reference: holding the table would keep it in memory after a reload.
        let mut swept: Weak<KeyTable> = Weak::new();
        let mut last = Instant::now();
        let mut first = true;
        loop {
            let table = self.gate.table();
            let reloaded = !std::ptr::eq(swept.as_ptr(), Arc::as_ptr(&table));
            if first || reloaded || last.elapsed() >= SWEEP_EVERY {
                first = false;
                last = Instant::now();
                swept = Arc::downgrade(&table);
                if self.sweep(&table, unix_now(), &mut announced) {
                    save_announced(&self.file, &announced);
                }
            }
            drop(table);
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Queue a `key_expiring` event for each enabled key expiring within the horizon that was
    /// not announced for this expiry; true when `announced` changed. A full queue stops the
    /// sweep (counted once); the next sweep tries again.
    fn sweep(&self, table: &KeyTable, now: i64, announced: &mut HashMap<u64, i64>) -> bool {
        let horizon = now + EXPIRING_DAYS * 86_400;
        let before = announced.len();
        announced.retain(|_, at| *at > now);
        let mut changed = announced.len() != before;
        for k in table.records() {
            let Some(at) = k.expires_at else { continue };
            if at <= now || at > horizon || k.status != KeyStatus::Enabled {
                continue;
            }
            if announced.get(&k.id) == Some(&at) {
                continue;
            }
            let event = AlertEvent::KeyExpiring {
                scope: AlertScope::Key,
                id: k.id,
                name: k.name.clone(),
                expires_at: at,
                expires_in_seconds: at - now,
                at: now,
            };
            if !self.queue.push(event) {
                self.gate
                    .metrics()
                    .alerts
                    .dropped
                    .with_label_values(&["queue_full"])
                    .inc();
                break;
            }
            announced.insert(k.id, at);
            changed = true;
        }
        changed
    }
}

/// The expiries announced before (key id → expiry); empty when there is no file yet.
fn load_announced(path: &Path) -> HashMap<u64, i64> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            log::warn!(
                "alerts: {}: {e}; expiries may be announced again",
                path.display()
            );
            return HashMap::new();
        }
    };
    let parsed: Result<HashMap<String, i64>, _> = serde_json::from_slice(&text);
    match parsed {
        Ok(m) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
            .collect(),
        Err(e) => {
            log::warn!(
                "alerts: {}: {e}; expiries may be announced again",
                path.display()
            );
            HashMap::new()
        }
    }
}

fn save_announced(path: &Path, announced: &HashMap<u64, i64>) {
    let m: std::collections::BTreeMap<String, i64> =
        announced.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let written = serde_json::to_vec(&m)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::support::fsutil::write_atomic(path, &b));
    if let Err(e) = written {
        log::warn!("alerts: {}: {e}", path.display());
    }
}
