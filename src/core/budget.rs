//! Budget periods (SPEC §7): what a key or an account may spend per day, week, month (in an
//! IANA time zone, DST-correct) or rolling window of days. Pure: the time is an argument.
//!
//! Nothing is ever reset: the current period's start is computed from the clock, and spending
//! is counted per period start, so a new period starts from zero by itself. A period's counter
//! is read until [`Window::until`]; after that the ledger drops it.

use crate::core::config::BudgetEntry;
use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};
use std::sync::atomic::{AtomicU64, Ordering};

/// Longest rolling window, in days.
pub const MAX_ROLLING_DAYS: i64 = 90;

const DAY: i64 = 86_400;

/// How long a period's counter is kept after the last moment it is read (unix seconds): a day,
/// for clocks of gateways that disagree and calls admitted just before the end.
pub const KEEP_ENDED: i64 = DAY;

/// How a budget's periods are cut.
#[derive(Clone, Debug)]
pub enum Period {
    /// From 00:00 to 00:00 in the zone.
    Daily(TimeZone),
    /// From Monday 00:00 to Monday 00:00 in the zone.
    Weekly(TimeZone),
    /// From the 1st 00:00 to the next 1st 00:00 in the zone.
    Monthly(TimeZone),
    /// The last N whole UTC days, today included: spending of each day drops out N days later.
    RollingDays(u32),
}

/// A compiled budget.
#[derive(Clone, Debug)]
pub struct Budget {
    /// The periods.
    pub period: Period,
    /// Units per period.
    pub amount: i64,
    /// The zone's name as written (`UTC` by default), for display.
    pub timezone: Box<str>,
    /// The calendar period found last: every call of the key asks for its window, and the
    /// time-zone arithmetic costs more than the rest of an admission.
    last: LastPeriod,
}

impl Budget {
    /// Validate `entry` (the messages name the field and the value).
    pub fn compile(entry: &BudgetEntry) -> Result<Budget, String> {
        if entry.amount < 0 {
            return Err(format!(
                "budget.amount is {}; it must be >= 0",
                entry.amount
            ));
        }
        let tz_name = entry.timezone.as_deref().unwrap_or("UTC");
        let tz = TimeZone::get(tz_name).map_err(|_| {
            format!("budget.timezone {tz_name:?} is not a known IANA time zone (e.g. \"Europe/Berlin\")")
        })?;
        let period = match (entry.period.as_deref(), entry.rolling_days) {
            (Some(_), Some(_)) => {
                return Err("budget: give either period or rolling_days, not both".into())
            }
            (None, None) => {
                return Err(
                    "budget: needs a period (daily, weekly, monthly) or rolling_days".into(),
                )
            }
            (None, Some(n)) if !(1..=MAX_ROLLING_DAYS).contains(&n) => {
                return Err(format!(
                    "budget.rolling_days is {n}; it must be between 1 and {MAX_ROLLING_DAYS}"
                ))
            }
            (None, Some(n)) => {
                if entry.timezone.is_some() {
                    return Err("budget: rolling_days counts whole UTC days; drop timezone".into());
                }
                Period::RollingDays(n as u32)
            }
            (Some("daily"), None) => Period::Daily(tz),
            (Some("weekly"), None) => Period::Weekly(tz),
            (Some("monthly"), None) => Period::Monthly(tz),
            (Some(other), None) => {
                return Err(format!(
                    "budget.period {other:?} is not one of daily, weekly, monthly"
                ))
            }
        };
        Ok(Budget {
            period,
            amount: entry.amount,
            timezone: tz_name.into(),
            last: LastPeriod::default(),
        })
    }

    /// The window at `now`: [`Period::window`], with the calendar period kept until it ends.
    pub fn window(&self, now: i64) -> Window {
        if let Period::RollingDays(_) = self.period {
            return self.period.window(now);
        }
        let (current, resets_at) = match self.last.get(now) {
            Some(bounds) => bounds,
            None => {
                let bounds = self.period.bounds(now);
                self.last.set(bounds);
                bounds
            }
        };
        Window {
            current,
            earlier: Vec::new(),
            resets_at,
            until: resets_at.saturating_add(KEEP_ENDED),
        }
    }

    /// The budget as the CLI writes it: `daily:200000@Europe/Berlin`, `rolling7:5000`.
    pub fn describe(&self) -> String {
        let (name, zoned) = match &self.period {
            Period::Daily(_) => ("daily".to_string(), true),
            Period::Weekly(_) => ("weekly".to_string(), true),
            Period::Monthly(_) => ("monthly".to_string(), true),
            Period::RollingDays(n) => (format!("rolling{n}"), false),
        };
        if zoned && &*self.timezone != "UTC" {
            format!("{name}:{}@{}", self.amount, self.timezone)
        } else {
            format!("{name}:{}", self.amount)
        }
    }
}

/// The counting window at `now` (unix seconds): the start of every period it counts (one for
/// a calendar period; N days for a rolling window, today first) and when the first of them
/// drops out (the reset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// The current period's start: spending is charged to it.
    pub current: i64,
    /// Earlier periods still counted (rolling windows only), newest first.
    pub earlier: Vec<i64>,
    /// When spending next drops out of the window: the period's end.
    pub resets_at: i64,
    /// Until when the current period's counter must be kept: the last moment a window reads it
    /// (its end; N − 1 days later for a rolling window of N days) plus [`KEEP_ENDED`].
    pub until: i64,
}

/// A calendar period `[start, end)` in one word, so that a reader never sees the start of one
/// period with the end of another: the start (unix seconds) in the high 42 bits, the length in
/// the low 22 (up to 48 days; a month with a DST change is at most 31 days + 1 hour). 0: none
/// yet. Periods that do not fit (before 1970, after year 141,000) are not kept.
#[derive(Debug, Default)]
struct LastPeriod(AtomicU64);

const LENGTH_BITS: u32 = 22;

impl LastPeriod {
    fn get(&self, now: i64) -> Option<(i64, i64)> {
        let packed = self.0.load(Ordering::Relaxed);
        if packed == 0 {
            return None;
        }
        let start = (packed >> LENGTH_BITS) as i64;
        let end = start + (packed & ((1 << LENGTH_BITS) - 1)) as i64;
        (start <= now && now < end).then_some((start, end))
    }

    fn set(&self, (start, end): (i64, i64)) {
        let length = end - start;
        if (0..1 << (64 - LENGTH_BITS)).contains(&start) && (1..1 << LENGTH_BITS).contains(&length)
        {
            let packed = (start as u64) << LENGTH_BITS | length as u64;
            self.0.store(packed, Ordering::Relaxed);
        }
    }
}

impl Clone for LastPeriod {
    fn clone(&self) -> LastPeriod {
        LastPeriod(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

impl Period {
    /// The window at `now`.
    pub fn window(&self, now: i64) -> Window {
        match self {
            Period::RollingDays(n) => {
                let today = now.div_euclid(DAY) * DAY;
                Window {
                    current: today,
                    earlier: (1..i64::from(*n)).map(|d| today - d * DAY).collect(),
                    resets_at: today + DAY,
                    until: today + i64::from(*n) * DAY + KEEP_ENDED,
                }
            }
            _ => {
                let (start, end) = self.bounds(now);
                Window {
                    current: start,
                    earlier: Vec::new(),
                    resets_at: end,
                    until: end.saturating_add(KEEP_ENDED),
                }
            }
        }
    }

    /// The calendar period containing `now`: `[start, end)` in unix seconds.
    pub fn bounds(&self, now: i64) -> (i64, i64) {
        let (tz, unit) = match self {
            Period::Daily(tz) => (tz, 0),
            Period::Weekly(tz) => (tz, 1),
            Period::Monthly(tz) => (tz, 2),
            Period::RollingDays(_) => {
                let today = now.div_euclid(DAY) * DAY;
                return (today, today + DAY);
            }
        };
        let fallback = {
            let today = now.div_euclid(DAY) * DAY;
            (today, today + DAY)
        };
        let Ok(ts) = Timestamp::from_second(now) else {
            return fallback;
        };
        let date = ts.to_zoned_datetime(tz.clone()).date();
        let (start, next) = match unit {
            0 => (date, date.checked_add(Span::new().days(1))),
            1 => {
                let back = Weekday::Monday.until(date.weekday());
                let monday = date.checked_sub(Span::new().days(back));
                match monday {
                    Ok(m) => (m, m.checked_add(Span::new().days(7))),
                    Err(_) => return fallback,
                }
            }
            _ => {
                let first = date.first_of_month();
                (first, first.checked_add(Span::new().months(1)))
            }
        };
        match (midnight(start, tz), next.ok().and_then(|n| midnight(n, tz))) {
            (Some(s), Some(e)) => (s, e),
            _ => fallback,
        }
    }
}

/// 00:00 of `date` in `tz`, in unix seconds (where a DST change skips midnight, the first
/// moment of the day).
fn midnight(date: Date, tz: &TimeZone) -> Option<i64> {
    Some(
        date.to_zoned_datetime(tz.clone())
            .ok()?
            .timestamp()
            .as_second(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(period: &str, tz: Option<&str>) -> Budget {
        Budget::compile(&BudgetEntry {
            period: Some(period.into()),
            amount: 100,
            timezone: tz.map(Into::into),
            rolling_days: None,
        })
        .unwrap()
    }

    fn unix(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn the_kept_period_is_the_computed_one_at_every_moment() {
        // A year in steps of 47 minutes, across both DST changes, in three zones; forwards,
        // then backwards (a clock that steps back must not keep a later period).
        let from = unix("2024-01-01T00:00:00Z");
        let steps: Vec<i64> = (0..11_200).map(|i| from + i * 47 * 60).collect();
        for (period, tz) in [
            ("daily", Some("Europe/Berlin")),
            ("weekly", Some("America/New_York")),
            ("monthly", Some("Australia/Lord_Howe")),
            ("daily", None),
        ] {
            let b = budget(period, tz);
            for &now in steps.iter().chain(steps.iter().rev()) {
                let (kept, computed) = (b.window(now), b.period.window(now));
                assert_eq!(
                    (kept.current, kept.resets_at, kept.until),
                    (computed.current, computed.resets_at, computed.until),
                    "{period} {tz:?} at {now}"
                );
            }
        }
    }

    #[test]
    fn daily_in_utc_and_in_berlin() {
        let utc = budget("daily", None);
        assert_eq!(
            utc.period.bounds(unix("2024-06-20T15:00:00Z")),
            (unix("2024-06-20T00:00:00Z"), unix("2024-06-21T00:00:00Z"))
        );
        let berlin = budget("daily", Some("Europe/Berlin"));
        // 23:30 UTC on the 20th is already the 21st in Berlin (UTC+2 in summer).
        assert_eq!(
            berlin.period.bounds(unix("2024-06-20T23:30:00Z")),
            (unix("2024-06-20T22:00:00Z"), unix("2024-06-21T22:00:00Z"))
        );
    }

    #[test]
    fn days_across_dst_changes_are_23_and_25_hours_long() {
        let berlin = budget("daily", Some("Europe/Berlin"));
        // Spring forward: 2024-03-31 02:00 -> 03:00 in Berlin.
        let (s, e) = berlin.period.bounds(unix("2024-03-31T12:00:00Z"));
        assert_eq!(s, unix("2024-03-30T23:00:00Z"));
        assert_eq!(e, unix("2024-03-31T22:00:00Z"));
        assert_eq!(e - s, 23 * 3600);
        // Fall back: 2024-10-27 03:00 -> 02:00.
        let (s, e) = berlin.period.bounds(unix("2024-10-27T12:00:00Z"));
        assert_eq!((s, e - s), (unix("2024-10-26T22:00:00Z"), 25 * 3600));
        let ny = budget("daily", Some("America/New_York"));
        // 2024-03-10: 02:00 -> 03:00 in New York.
        let (s, e) = ny.period.bounds(unix("2024-03-10T12:00:00Z"));
        assert_eq!((s, e - s), (unix("2024-03-10T05:00:00Z"), 23 * 3600));
        // 2024-11-03: 02:00 -> 01:00; the second before midnight still belongs to the 2nd.
        let (s, e) = ny.period.bounds(unix("2024-11-03T03:59:59Z"));
        assert_eq!(
            (s, e),
            (unix("2024-11-02T04:00:00Z"), unix("2024-11-03T04:00:00Z"))
        );
        let (s, e) = ny.period.bounds(unix("2024-11-03T04:00:00Z"));
        assert_eq!((s, e - s), (unix("2024-11-03T04:00:00Z"), 25 * 3600));
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        let week = budget("weekly", Some("Europe/Berlin"));
        // Sunday 2024-03-31 (the DST day) belongs to the week of Monday 2024-03-25 (UTC+1).
        let (s, e) = week.period.bounds(unix("2024-03-31T20:00:00Z"));
        assert_eq!(s, unix("2024-03-24T23:00:00Z"));
        // The next Monday 00:00 is in summer time (UTC+2): the week is 167 hours.
        assert_eq!(e, unix("2024-03-31T22:00:00Z"));
        let month = budget("monthly", Some("America/New_York"));
        let (s, e) = month.period.bounds(unix("2024-03-15T00:00:00Z"));
        assert_eq!(s, unix("2024-03-01T05:00:00Z"));
        assert_eq!(e, unix("2024-04-01T04:00:00Z"));
        // The first second of a month starts a new period.
        assert_eq!(month.period.bounds(e).0, e);
        assert_eq!(month.period.bounds(e - 1).0, s);
    }

    #[test]
    fn rolling_days_count_today_and_the_days_before() {
        let b = Budget::compile(&BudgetEntry {
            period: None,
            amount: 10,
            timezone: None,
            rolling_days: Some(3),
        })
        .unwrap();
        let w = b.period.window(unix("2024-06-20T15:00:00Z"));
        assert_eq!(w.current, unix("2024-06-20T00:00:00Z"));
        assert_eq!(
            w.earlier,
            vec![unix("2024-06-19T00:00:00Z"), unix("2024-06-18T00:00:00Z")]
        );
        assert_eq!(w.resets_at, unix("2024-06-21T00:00:00Z"));
        // Today's counter is read as an earlier day until the 22nd ends, then kept a day.
        assert_eq!(w.until, unix("2024-06-24T00:00:00Z"));
    }

    #[test]
    fn bad_budgets_are_refused_precisely() {
        let e = |period: Option<&str>, tz: Option<&str>, rolling: Option<i64>, amount: i64| {
            Budget::compile(&BudgetEntry {
                period: period.map(Into::into),
                amount,
                timezone: tz.map(Into::into),
                rolling_days: rolling,
            })
            .unwrap_err()
        };
        assert!(e(Some("daily"), Some("Europe/Berlln"), None, 1)
            .contains("\"Europe/Berlln\" is not a known IANA time zone"));
        assert!(e(Some("yearly"), None, None, 1).contains("\"yearly\""));
        assert!(e(None, None, Some(0), 1).contains("rolling_days is 0"));
        assert!(e(Some("daily"), None, None, -1).contains("budget.amount is -1"));
        assert!(e(None, None, None, 1).contains("needs a period"));
    }
}
