//! Alerts (SPEC §7): the `alerts:` config, the thresholds a charge can cross, the events, and
//! the bounded queue the request path hands events to. Pure: the sender (HTTP, retries,
//! back-off) and the key-expiry sweep are [`crate::ops::alerts`].
//!
//! A threshold is crossed by a charge: the ledger reports a counter's settled value before and
//! after each charge, and a threshold `t` of a quota `Q` is crossed when that interval passes
//! `ceil(t × Q)`. Settled values only grow and each charge is one atomic add, so concurrent
//! charges see disjoint intervals: exactly one of them crosses a given point, and a reload
//! (which keeps the counters) cannot cross it again.

use serde::{Deserialize, Serialize};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

/// Most thresholds (each costs a compare per charged counter while alerts are on).
pub const MAX_THRESHOLDS: usize = 16;
/// Days before its expiry a key's `key_expiring` event is sent.
pub const EXPIRING_DAYS: i64 = 7;

/// `alerts:` (SPEC §7): where events go and which thresholds of a quota or budget send one.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// The receiver: each event is one `POST` of JSON to it.
    pub webhook_url: String,
    /// Fractions of a quota or period budget, each in (0, 1]. Default `[0.8, 1.0]`.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<f64>,
    /// Longest one delivery attempt may take, seconds. Default 5.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Attempts per event before it is dropped (back-off 0.5 s, 1 s, 2 s, … between them).
    /// Default 4.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Events waiting to be sent; one more is dropped (and counted). Default 1024.
    #[serde(default = "default_queue")]
    pub queue_size: usize,
}

fn default_thresholds() -> Vec<f64> {
    vec![0.8, 1.0]
}
fn default_timeout() -> u64 {
    5
}
fn default_attempts() -> u32 {
    4
}
fn default_queue() -> usize {
    1024
}

impl AlertsConfig {
    /// Check the URL, the thresholds and the bounds (messages name the field and the value).
    pub fn validate(&self) -> Result<(), String> {
        check_webhook_url(&self.webhook_url)?;
        Thresholds::compile(&self.thresholds)?;
        if !(1..=300).contains(&self.timeout_seconds) {
            return Err(format!(
                "alerts: timeout_seconds is {}; it must be between 1 and 300",
                self.timeout_seconds
            ));
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err(format!(
                "alerts: max_attempts is {}; it must be between 1 and 20",
                self.max_attempts
            ));
        }
        if !(1..=1_000_000).contains(&self.queue_size) {
            return Err(format!(
                "alerts: queue_size is {}; it must be between 1 and 1000000",
                self.queue_size
            ));
        }
        Ok(())
    }
}

/// `webhook_url` must be an absolute http(s) URL with a host.
fn check_webhook_url(u: &str) -> Result<(), String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("alerts: webhook_url {u:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "alerts: webhook_url {u:?}: the scheme must be http or https, not {:?}",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("alerts: webhook_url {u:?}: no host"));
    }
    Ok(())
}

/// The thresholds, sorted and without repeats, as fractions and in parts per million (the
/// integer form the crossing points are computed with).
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    values: Vec<(f64, i128)>,
}

impl Thresholds {
    /// Validate, sort and drop repeats.
    pub fn compile(list: &[f64]) -> Result<Thresholds, String> {
        if list.is_empty() {
            return Err("alerts: thresholds: at least one is needed (e.g. [0.8, 1.0])".into());
        }
        if list.len() > MAX_THRESHOLDS {
            return Err(format!(
                "alerts: thresholds: {} given; at most {MAX_THRESHOLDS}",
                list.len()
            ));
        }
        let mut values = Vec::with_capacity(list.len());
        for &t in list {
            // `!(t > 0.0)` also refuses NaN.
            if !(t > 0.0 && t <= 1.0) {
                return Err(format!(
                    "alerts: thresholds: {t} is not a fraction in (0, 1] (0.8 is 80%)"
                ));
            }
            values.push((t, ((t * 1e6).round() as i128).max(1)));
        }
        values.sort_by_key(|v| v.1);
        values.dedup_by_key(|v| v.1);
        Ok(Thresholds { values })
    }

    /// The thresholds, ascending.
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.values.iter().map(|v| v.0)
    }

    /// The thresholds a charge crossed (their points `ceil(t × full)`, in units). `full`
    /// is the quota or budget; `base` what counts against it outside the counter (a key's
    /// `used` baseline, a rolling window's earlier days); `before` and `after` the counter's
    /// settled value around the charge.
    pub fn crossed(
        &self,
        full: i64,
        base: i64,
        before: i64,
        after: i64,
    ) -> impl Iterator<Item = f64> + '_ {
        // `before < ceil(full × t) − base ≤ after`, in integers and without a division:
        // `(base + before) × 10⁶ < full × ppm ≤ (base + after) × 10⁶`.
        let (full, base) = (i128::from(full), i128::from(base));
        let lo = (base + i128::from(before)) * 1_000_000;
        let hi = (base + i128::from(after)) * 1_000_000;
        let inside = move |ppm: i128| lo < full * ppm && full * ppm <= hi;
        let possible = full > 0
            && after > before
            && self.values.first().is_some_and(|f| full * f.1 <= hi)
            && self.values.last().is_some_and(|l| full * l.1 > lo);
        self.values
            .iter()
            .filter(move |v| possible && inside(v.1))
            .map(|v| v.0)
    }
}

/// Whose quota an event is about.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AlertScope {
    /// An API key.
    Key,
    /// An account.
    Account,
}

/// A key's numeric id or an account's id.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum AlertId {
    /// A key id.
    Key(u64),
    /// An account id.
    Account(Box<str>),
}

/// One event, as POSTed (`{"event":"quota_threshold",…}`).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AlertEvent {
    /// A key or an account crossed a threshold of its lifetime quota (`period` null) or of a
    /// budget period (`period` `daily`, `weekly`, `monthly`, `rollingN`).
    QuotaThreshold {
        /// `key` or `account`.
        scope: AlertScope,
        /// The key id (a number) or the account id (a string).
        id: AlertId,
        /// Its display name.
        name: Box<str>,
        /// The threshold crossed (as configured, e.g. 0.8).
        threshold: f64,
        /// Units used of `limit` after the charge that crossed it.
        used: i64,
        /// The quota or the period's budget, units.
        limit: i64,
        /// `null` for the lifetime quota, else the budget's period.
        period: Option<Box<str>>,
        /// Unix seconds the period (a rolling window: its first day) started; `null` for the
        /// lifetime quota.
        period_start: Option<i64>,
        /// Unix seconds the period ends (a rolling window: when its first day drops out).
        period_end: Option<i64>,
        /// Unix seconds the charge was made.
        at: i64,
    },
    /// A key expires within [`EXPIRING_DAYS`] days.
    KeyExpiring {
        /// Always `key`.
        scope: AlertScope,
        /// The key id.
        id: u64,
        /// Its display name.
        name: Box<str>,
        /// Unix seconds it expires.
        expires_at: i64,
        /// Seconds left when the event was made.
        expires_in_seconds: i64,
        /// Unix seconds the event was made.
        at: i64,
    },
}

/// What makes two events the same for "at most once": a threshold event's scope, id,
/// threshold and period; an expiry event's key and expiry time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AlertIdentity {
    /// scope, id, threshold (ppm), period start (0 for the lifetime quota).
    Threshold(AlertScope, AlertId, i64, i64),
    /// key id, expiry.
    Expiring(u64, i64),
}

impl AlertEvent {
    /// The event's `event` member.
    pub fn kind(&self) -> &'static str {
        match self {
            AlertEvent::QuotaThreshold { .. } => "quota_threshold",
            AlertEvent::KeyExpiring { .. } => "key_expiring",
        }
    }

    /// What identifies it for "at most once".
    pub fn identity(&self) -> AlertIdentity {
        match self {
            AlertEvent::QuotaThreshold {
                scope,
                id,
                threshold,
                period_start,
                ..
            } => AlertIdentity::Threshold(
                scope.clone(),
                id.clone(),
                (threshold * 1e6).round() as i64,
                period_start.unwrap_or(0),
            ),
            AlertEvent::KeyExpiring { id, expires_at, .. } => {
                AlertIdentity::Expiring(*id, *expires_at)
            }
        }
    }
}

/// The request path's end of the alert queue: a push never blocks.
#[derive(Clone, Debug)]
pub struct AlertQueue {
    tx: SyncSender<AlertEvent>,
}

impl AlertQueue {
    /// A queue holding at most `size` events, and its receiving end.
    pub fn bounded(size: usize) -> (AlertQueue, Receiver<AlertEvent>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(size);
        (AlertQueue { tx }, rx)
    }

    /// Hand `event` to the sender; false when the queue is full (or the sender is gone).
    pub fn push(&self, event: AlertEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

/// What the request path needs to raise threshold alerts: the thresholds and the queue.
#[derive(Clone, Debug)]
pub struct Alerting {
    /// The thresholds.
    pub thresholds: Thresholds,
    /// Where events go.
    pub queue: AlertQueue,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, thresholds: Vec<f64>) -> AlertsConfig {
        AlertsConfig {
            webhook_url: url.into(),
            thresholds,
            timeout_seconds: 5,
            max_attempts: 4,
            queue_size: 16,
        }
    }

    #[test]
    fn bad_config_is_refused_precisely() {
        let e = |url: &str, t: Vec<f64>| config(url, t).validate().unwrap_err();
        assert!(e("ftp://h/x", vec![0.8]).contains("the scheme must be http or https"));
        assert!(e("not a url", vec![0.8]).contains("webhook_url \"not a url\""));
        assert!(e("http://h/x", vec![]).contains("at least one"));
        assert!(e("http://h/x", vec![0.0]).contains("0 is not a fraction in (0, 1]"));
        assert!(e("http://h/x", vec![1.5]).contains("1.5 is not a fraction"));
        assert!(e("http://h/x", vec![f64::NAN]).contains("NaN is not a fraction"));
        assert!(e("http://h/x", vec![0.5; 17]).contains("at most 16"));
        config("https://hooks.example.com/keygate", vec![1.0, 0.5, 0.5])
            .validate()
            .unwrap();
    }

    #[test]
    fn thresholds_are_sorted_without_repeats() {
        let t = Thresholds::compile(&[1.0, 0.8, 0.8, 0.5]).unwrap();
        assert_eq!(t.values().collect::<Vec<_>>(), vec![0.5, 0.8, 1.0]);
    }

    #[test]
    fn a_charge_crosses_the_points_it_passes_once() {
        let t = Thresholds::compile(&[0.8, 1.0]).unwrap();
        let crossed = |before, after| t.crossed(1000, 0, before, after).collect::<Vec<_>>();
        assert!(crossed(0, 799).is_empty());
        assert_eq!(crossed(799, 800), vec![0.8]);
        assert!(crossed(800, 999).is_empty());
        assert_eq!(crossed(999, 1000), vec![1.0]);
        assert_eq!(crossed(0, 5000), vec![0.8, 1.0]);
        assert!(crossed(1000, 5000).is_empty());
        // A baseline used elsewhere moves the points down the counter.
        assert_eq!(
            t.crossed(1000, 300, 499, 500).collect::<Vec<_>>(),
            vec![0.8]
        );
        // Past before the counter started: never crossed here.
        assert!(t.crossed(1000, 900, 0, 50).next().is_none());
        // A zero quota has nothing to cross.
        assert!(t.crossed(0, 0, 0, 10).next().is_none());
        // Odd fractions round up to the unit.
        let third = Thresholds::compile(&[1.0 / 3.0]).unwrap();
        assert_eq!(third.crossed(10, 0, 3, 4).count(), 1);
    }

    #[test]
    fn events_serialize_as_specified() {
        let e = AlertEvent::QuotaThreshold {
            scope: AlertScope::Account,
            id: AlertId::Account("acme".into()),
            name: "Acme".into(),
            threshold: 0.8,
            used: 800,
            limit: 1000,
            period: None,
            period_start: None,
            period_end: None,
            at: 1,
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "quota_threshold");
        assert_eq!(v["scope"], "account");
        assert_eq!(v["id"], "acme");
        assert_eq!(v["threshold"], 0.8);
        assert!(v["period"].is_null());
    }

    #[test]
    fn a_full_queue_refuses_without_blocking() {
        let (q, rx) = AlertQueue::bounded(1);
        let e = AlertEvent::KeyExpiring {
            scope: AlertScope::Key,
            id: 1,
            name: "k".into(),
            expires_at: 10,
            expires_in_seconds: 5,
            at: 5,
        };
        assert!(q.push(e.clone()));
        assert!(!q.push(e.clone()));
        assert_eq!(rx.recv().unwrap(), e);
    }
}
