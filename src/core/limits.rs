//! Rate limits (SPEC §7): `rpm`, `tpm` and `concurrency`, compiled from the sync file, and the
//! token bucket they are enforced with. Pure: the clock is an argument (nanoseconds on any
//! monotonic scale), so tests move it by hand.
//!
//! The bucket is GCRA, the token bucket written as one number: the "theoretical arrival time"
//! `tat`, the moment the bucket would be full again. With limit `L` per 60 s each token costs
//! `60 s / L` of it; taking `n` tokens at `now` moves `tat` to `max(tat, now) + n × 60 s / L`,
//! allowed while that is at most `now + 60 s` (capacity `L`). One compare-and-swap decides, so
//! concurrent callers never both take the last token. In any span of `T` seconds at most
//! `L + L × T / 60` tokens are taken: `L` from a full bucket plus what refills meanwhile.

use crate::core::config::LimitsEntry;
use arrayvec::ArrayVec;
use std::sync::atomic::{AtomicI64, Ordering};

/// The refill window: a bucket refills from empty to full in this many nanoseconds.
pub const WINDOW_NS: i64 = 60_000_000_000;

/// The largest accepted limit (so that a token's cost is at least 1 ns... in practice 60 ns).
pub const MAX_LIMIT: i64 = 1_000_000_000;

/// Compiled limits of one scope (a key, an account, or a group's default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u32>,
    /// Calls in flight.
    pub concurrency: Option<u32>,
}

impl Limits {
    /// Validate `entry`: every limit given must be a positive whole number.
    pub fn compile(entry: &LimitsEntry) -> Result<Limits, String> {
        let one = |name: &str, v: Option<i64>| -> Result<Option<u32>, String> {
            match v {
                None => Ok(None),
                Some(v) if v <= 0 => Err(format!(
                    "limits.{name} is {v}; a limit must be a positive number (omit it for none)"
                )),
                Some(v) if v > MAX_LIMIT => Err(format!(
                    "limits.{name} is {v}; at most {MAX_LIMIT} is accepted"
                )),
                Some(v) => Ok(u32::try_from(v).ok()),
            }
        };
        Ok(Limits {
            rpm: one("rpm", entry.rpm)?,
            tpm: one("tpm", entry.tpm)?,
            concurrency: one("concurrency", entry.concurrency)?,
        })
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.concurrency.is_none()
    }
}

/// A token bucket (GCRA): one atomic, refilled continuously over [`WINDOW_NS`]. The limit is
/// passed on each call, so a reload that changes it keeps the bucket's state.
#[derive(Debug, Default)]
pub struct Bucket {
    /// The theoretical arrival time, ns; 0 = full.
    tat: AtomicI64,
}

/// What a bucket says about a request for tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Taken.
    Ok,
    /// Not enough tokens: this many ns until there will be.
    Wait(i64),
    /// More tokens than the bucket holds when full: waiting cannot help.
    Never,
}

/// The nanoseconds `n` tokens cost at `limit` per window.
#[inline]
fn cost(limit: u32, n: u64) -> i64 {
    let ns = u128::from(n) * WINDOW_NS as u128 / u128::from(limit.max(1));
    i64::try_from(ns).unwrap_or(i64::MAX)
}

impl Bucket {
    /// Take `n` tokens at `now` (ns), or say how long to wait.
    #[inline]
    pub fn take(&self, limit: u32, n: u64, now: i64) -> Take {
        if n > u64::from(limit) {
            return Take::Never;
        }
        let c = cost(limit, n);
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            let next = cur.max(now).saturating_add(c);
            let over = next - now - WINDOW_NS;
            if over > 0 {
                return Take::Wait(over);
            }
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Take::Ok,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Give back (`delta` < 0) or take more (`delta` > 0) tokens without a check: the tpm
    /// correction at settle, and undoing a take when a later check refuses the call.
    #[inline]
    pub fn adjust(&self, limit: u32, delta: i64, now: i64) {
        if delta == 0 {
            return;
        }
        let c = cost(limit, delta.unsigned_abs());
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(if delta > 0 {
                    cur.max(now).saturating_add(c)
                } else {
                    // Never below `now`: a refund cannot fill the bucket past full.
                    cur.saturating_sub(c).max(now.min(cur))
                })
            });
    }

    /// Put the bucket in a state learned elsewhere: full again at `tat` (the shared ledger
    /// mirrors its Redis bucket here, for the headers).
    pub fn set_tat(&self, tat: i64) {
        self.tat.store(tat, Ordering::Release);
    }

    /// Tokens left at `now` and ns until the bucket is full again.
    pub fn state(&self, limit: u32, now: i64) -> (u64, i64) {
        let debt = (self.tat.load(Ordering::Acquire) - now).max(0);
        let free = (WINDOW_NS - debt).max(0);
        let left = u128::from(limit) * free as u128 / WINDOW_NS as u128;
        (u64::try_from(left).unwrap_or(u64::MAX), debt)
    }
}

/// A duration of `.0` ns written the way Go's `time.Duration.String` does, for the OpenAI
/// headers: `120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`. Under a second it is whole milliseconds,
/// rounded up; above, seconds with up to three decimals: a client waiting this long finds room.
#[derive(Clone, Copy, Debug)]
pub struct GoDuration(pub i64);

impl GoDuration {
    /// Append the text to `out`.
    pub fn write_to(self, out: &mut HeaderText) {
        let ns = self.0.max(0);
        if ns == 0 {
            out.text("0s");
            return;
        }
        let total_ms = ns / 1_000_000 + i64::from(ns % 1_000_000 != 0);
        if ns < 1_000_000_000 {
            match total_ms {
                1000.. => out.text("1s"),
                ms => out.num(ms).text("ms"),
            };
            return;
        }
        let (h, rest) = (total_ms / 3_600_000, total_ms % 3_600_000);
        let (m, rest) = (rest / 60_000, rest % 60_000);
        let (s, ms) = (rest / 1000, rest % 1000);
        if h > 0 {
            out.num(h).text("h").num(m).text("m");
        } else if m > 0 {
            out.num(m).text("m");
        }
        out.num(s);
        if ms > 0 {
            // Three digits without the trailing zeros: .5, .25, .125.
            let digits = [ms / 100, ms / 10 % 10, ms % 10].map(|d| b'0' + d as u8);
            let len = 3 - digits.iter().rev().take_while(|&&d| d == b'0').count();
            out.text(".").bytes(&digits[..len]);
        }
        out.text("s");
    }
}

/// A header value built on the stack from text and integers, without the formatting
/// machinery: the answer of a limited key carries eight of them. Room for 128 bytes, more
/// than twice the longest (56: `ratelimit` with both kinds at `u32::MAX`); a piece that does
/// not fit would be left out.
#[derive(Default)]
pub struct HeaderText(ArrayVec<u8, 128>);

impl HeaderText {
    /// Append `s`.
    pub fn text(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Append `n` in decimal.
    pub fn num(&mut self, n: impl itoa::Integer) -> &mut Self {
        self.bytes(itoa::Buffer::new().format(n).as_bytes())
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let fits = self.0.try_extend_from_slice(b).is_ok();
        debug_assert!(fits, "a header value over 128 bytes");
        self
    }

    /// Empty it, for the next value.
    pub fn clear(&mut self) -> &mut Self {
        self.0.clear();
        self
    }

    /// The value written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Whole seconds, rounded up, at least 1: a `Retry-After` for a wait of `ns`.
pub fn retry_after_secs(ns: i64) -> u64 {
    u64::try_from(ns.max(1))
        .unwrap_or(u64::MAX)
        .div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn zero_negative_and_huge_limits_are_refused_by_name() {
        let e = |rpm, tpm, c| {
            Limits::compile(&LimitsEntry {
                rpm,
                tpm,
                concurrency: c,
            })
        };
        assert!(e(Some(0), None, None)
            .unwrap_err()
            .contains("limits.rpm is 0"));
        assert!(e(None, Some(-5), None)
            .unwrap_err()
            .contains("limits.tpm is -5"));
        assert!(e(None, None, Some(MAX_LIMIT + 1))
            .unwrap_err()
            .contains("concurrency"));
        assert_eq!(e(Some(60), None, Some(4)).unwrap().concurrency, Some(4));
    }

    #[test]
    fn a_full_bucket_gives_its_limit_then_refills_continuously() {
        let b = Bucket::default();
        let now = 1_000 * S;
        for _ in 0..60 {
            assert_eq!(b.take(60, 1, now), Take::Ok);
        }
        // Empty: the next token comes in one second.
        assert_eq!(b.take(60, 1, now), Take::Wait(S));
        assert_eq!(b.take(60, 1, now + S / 2), Take::Wait(S / 2));
        assert_eq!(b.take(60, 1, now + S), Take::Ok);
        // A minute later it is full again (and no fuller).
        let later = now + 10 * 60 * S;
        assert_eq!(b.state(60, later), (60, 0));
        assert_eq!(b.take(60, 61, later), Take::Never);
    }

    /// The stated bound: in any span of T seconds at most `L + L*T/60` tokens, under
    /// concurrent callers.
    #[test]
    fn concurrent_takes_hold_the_bound() {
        let b = Bucket::default();
        let limit = 600u32;
        let start = 5 * S;
        let taken = std::sync::atomic::AtomicU64::new(0);
        // 8 threads, the clock advancing 30 s in 10 ms steps, each thread trying every step.
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for step in 0..3_000 {
                        let now = start + step * 10_000_000;
                        if b.take(limit, 1, now) == Take::Ok {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let t = taken.load(Ordering::Relaxed);
        let bound = 600 + 600 * 30 / 60;
        assert!(t <= bound, "{t} > {bound}");
        assert!(
            t >= bound - 10,
            "{t}: the bucket should have been used fully"
        );
    }

    #[test]
    fn tokens_are_corrected_at_settle() {
        let b = Bucket::default();
        let now = 100 * S;
        assert_eq!(b.take(1000, 800, now), Take::Ok);
        assert_eq!(b.state(1000, now).0, 200);
        // The call used 300, not 800.
        b.adjust(1000, -500, now);
        assert_eq!(b.state(1000, now).0, 700);
        // A refund never fills past full.
        b.adjust(1000, -5000, now);
        assert_eq!(b.state(1000, now), (1000, 0));
        b.adjust(1000, 1000, now);
        assert_eq!(b.state(1000, now).0, 0);
    }

    #[test]
    fn go_durations_read_like_openais() {
        let go = |ns: i64| {
            let mut text = HeaderText::default();
            GoDuration(ns).write_to(&mut text);
            String::from_utf8(text.as_bytes().to_vec()).unwrap()
        };
        assert_eq!(go(0), "0s");
        assert_eq!(go(120 * 1_000_000), "120ms");
        assert_eq!(go(S), "1s");
        assert_eq!(go(6 * 60 * S), "6m0s");
        assert_eq!(go(S + S / 2), "1.5s");
        assert_eq!(go(3_723 * S), "1h2m3s");
        assert_eq!(go(1), "1ms");
        assert_eq!(go(999_999_999), "1s");
        assert_eq!(go(S + 1), "1.001s");
        assert_eq!(go(S + 250_000_000), "1.25s");
        assert_eq!(go(S + 50_000_000), "1.05s");
        assert_eq!(go(61 * S + 7_000_000), "1m1.007s");
        assert_eq!(go(3_600 * S), "1h0m0s");
        assert_eq!(go(-5), "0s");
        assert_eq!(go(S + 10_000_000), "1.01s");
        assert_eq!(go(i64::MAX), "2562047h47m16.855s");
        assert_eq!(retry_after_secs(S + 1), 2);
        assert_eq!(retry_after_secs(1), 1);
    }
}
