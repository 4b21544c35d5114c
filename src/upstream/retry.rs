//! When a failed attempt is tried again: the pool's retry policy, its retry budget (no retry
//! storms), and `Retry-After`.

use crate::core::config::{RetryConfig, RetryOn, RETRY_STATUSES};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// The longest cooldown a `Retry-After` can set; a longer one is cut to this.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

/// One retry costs this many budget tokens; each request adds `budget_percent` of them.
const RETRY_COST: i64 = 100;
/// At most this many retries are banked while traffic is calm...
const BUDGET_CAP: i64 = 10 * RETRY_COST;
/// ...and a fresh pool starts with this many, so a quiet pool still retries.
const BUDGET_START: i64 = 3 * RETRY_COST;

/// A pool's compiled retry policy.
#[derive(Debug)]
pub struct RetryPolicy {
    /// Tries per request, the first included.
    pub attempts: u32,
    connect: bool,
    timeout: bool,
    /// A bit per entry of [`RETRY_STATUSES`].
    statuses: u8,
    percent: i64,
    tokens: AtomicI64,
}

impl RetryPolicy {
    /// From the config (already validated: unknown entries are skipped here).
    pub fn new(c: &RetryConfig) -> RetryPolicy {
        let mut p = RetryPolicy {
            attempts: c.attempts.max(1),
            connect: false,
            timeout: false,
            statuses: 0,
            percent: i64::from(c.budget_percent.min(100)),
            tokens: AtomicI64::new(BUDGET_START),
        };
        for on in c.on.iter().filter_map(|o| o.parse().ok()) {
            match on {
                RetryOn::Connect => p.connect = true,
                RetryOn::Timeout => p.timeout = true,
                RetryOn::Status(s) => {
                    if let Some(i) = RETRY_STATUSES.iter().position(|x| *x == s) {
                        p.statuses |= 1 << i;
                    }
                }
            }
        }
        p
    }

    /// Whether this kind of failure is retried at all.
    #[inline]
    pub fn covers(&self, on: RetryOn) -> bool {
        match on {
            RetryOn::Connect => self.connect,
            RetryOn::Timeout => self.timeout,
            RetryOn::Status(s) => RETRY_STATUSES
                .iter()
                .position(|x| *x == s)
                .is_some_and(|i| self.statuses & (1 << i) != 0),
        }
    }

    /// A request came in: it adds its share to the budget (one atomic; skipped when the
    /// pool never retries).
    #[inline]
    pub fn note_request(&self) {
        if self.attempts > 1
            && self.percent > 0
            && self.tokens.fetch_add(self.percent, Ordering::Relaxed) > BUDGET_CAP
        {
            self.tokens.fetch_sub(self.percent, Ordering::Relaxed);
        }
    }

    /// Take one retry from the budget, if there is one.
    pub fn take_retry(&self) -> bool {
        if self.tokens.fetch_sub(RETRY_COST, Ordering::Relaxed) >= RETRY_COST {
            true
        } else {
            self.tokens.fetch_add(RETRY_COST, Ordering::Relaxed);
            false
        }
    }
}

/// A `Retry-After` value (seconds, or an HTTP-date) as a duration from `now`, capped at
/// [`MAX_COOLDOWN`]. Garbage, a date in the past and zero give `None`.
pub fn parse_retry_after(v: &[u8], now: SystemTime) -> Option<Duration> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // Digits beyond what a u64 holds are a cap, not garbage.
        Duration::from_secs(
            s.parse::<u64>()
                .unwrap_or(u64::MAX)
                .min(MAX_COOLDOWN.as_secs()),
        )
    } else {
        httpdate::parse_http_date(s)
            .ok()?
            .duration_since(now)
            .ok()?
    };
    (!d.is_zero()).then(|| d.min(MAX_COOLDOWN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::RetryOnEntry;

    #[test]
    fn retry_after_reads_seconds_and_dates_and_caps_them() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(b"7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(b" 30 ", now),
            Some(Duration::from_secs(30))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        assert_eq!(
            parse_retry_after(later.as_bytes(), now),
            Some(Duration::from_secs(120))
        );
        // A year, in seconds or as a date: the cap.
        assert_eq!(parse_retry_after(b"31536000", now), Some(MAX_COOLDOWN));
        assert_eq!(
            parse_retry_after(b"99999999999999999999999", now),
            Some(MAX_COOLDOWN)
        );
        let next_year = httpdate::fmt_http_date(now + Duration::from_secs(31_536_000));
        assert_eq!(
            parse_retry_after(next_year.as_bytes(), now),
            Some(MAX_COOLDOWN)
        );
        // Garbage, the past, zero, negative: ignored.
        for bad in [&b"soon"[..], b"", b"-5", b"0", b"1.5", b"\xff"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        assert_eq!(parse_retry_after(past.as_bytes(), now), None);
    }

    #[test]
    fn the_budget_caps_retries_to_a_share_of_requests() {
        let p = RetryPolicy::new(&RetryConfig {
            attempts: 3,
            on: vec![
                RetryOnEntry::Word("connect".into()),
                RetryOnEntry::Status(503),
            ],
            budget_percent: 20,
        });
        assert!(p.covers(RetryOn::Connect) && p.covers(RetryOn::Status(503)));
        assert!(!p.covers(RetryOn::Timeout) && !p.covers(RetryOn::Status(502)));
        let mut retries = 0;
        for _ in 0..1000 {
            p.note_request();
            while p.take_retry() {
                retries += 1;
            }
        }
        // 20 % of 1,000 requests, plus the starting allowance.
        assert_eq!(retries, 200 + 3);
    }
}
